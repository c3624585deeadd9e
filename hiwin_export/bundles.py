"""Polygraphy parity bundles: check a graph or engine on the target without PyTorch.

``bundles/<graph>/<h>x<w>/`` holds ``inputs.json`` (Polygraphy's list-of-feed-dicts format, from a
real generated page preprocessed like the reference) and ``reference_outputs.json`` (a Polygraphy
``RunResults`` of the PyTorch reference), plus ``bundle.json`` with the exact commands:

    polygraphy run vit.onnx --onnxrt --load-inputs bundles/vit/24x24/inputs.json \\
        --load-outputs bundles/vit/24x24/reference_outputs.json --check-error-stat max --rtol 0 --atol features:...

``--atol`` per output is the fp32 bound (1e-4) times that output's max |ref|, i.e. the harness's
"max rel" criterion in Polygraphy's terms. The ``--trt`` command pins the profile to the bundle's
shapes. A graph with TensorRT plugin nodes (tensorrt flavour) gets no ``--onnxrt`` command (``null``:
ONNX Runtime cannot run it) and its ``--trt`` command loads the plugin library
(``--plugins libhiwin_plugins.so``: give the path of the library built from engines/plugins).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from hiwin_model.projector import ORACLE
from hiwin_runtime.crop_chain import Recorder
from hiwin_runtime.graph_id import GraphId, serving_graph
from hiwin_runtime.slicing import normalize

# One real-content crop shape (h, w patches) per projector bucket; ViT/JBU (and the any-grid
# projector graph) bundles use all of them.
BUNDLE_GRIDS = ((24, 24), (19, 29), (29, 19), (16, 32), (32, 16), (18, 24), (24, 18))
FP32_MAX_REL = 1e-4
PLUGIN_LIBRARY = "libhiwin_plugins.so"  # built from engines/plugins (cmake); the commands name it relatively


def _save(graph_dir: Path, feeds: dict[str, np.ndarray], outs: dict[str, np.ndarray], graph_file: str,
          bound: float, plugins: list[str] = ()) -> dict:
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.json import save_json

    graph_dir.mkdir(parents=True, exist_ok=True)
    save_json([feeds], str(graph_dir / "inputs.json"))
    rr = RunResults()
    rr.append(("pytorch-reference", [IterationResult(outs, runner_name="pytorch-reference")]))
    rr.save(str(graph_dir / "reference_outputs.json"))
    atol = " ".join(f"{k}:{bound * float(np.abs(v).max()):.6g}" for k, v in outs.items())
    rel = graph_dir.relative_to(graph_dir.parents[2])
    common = (f"--load-inputs {rel}/inputs.json --load-outputs {rel}/reference_outputs.json "
              f"--check-error-stat max --rtol 0 --atol {atol}")
    shapes = " ".join(f"{k}:[{','.join(map(str, v.shape))}]" for k, v in feeds.items())
    info = {"graph": graph_file, "inputs": {k: list(v.shape) for k, v in feeds.items()},
            "outputs": {k: list(v.shape) for k, v in outs.items()},
            "onnxrt_command": None if plugins else f"polygraphy run {graph_file} --onnxrt {common}",
            "trt_command": (f"polygraphy run {graph_file} --trt --trt-min-shapes {shapes} --trt-opt-shapes {shapes} "
                            f"--trt-max-shapes {shapes} "
                            + (f"--plugins {PLUGIN_LIBRARY} " if plugins else "") + common)}
    if plugins:
        info["plugins"] = list(plugins)
    (graph_dir / "bundle.json").write_text(json.dumps(info, indent=1))
    return info


def write_bundles(model, out_dir: Path, graphs: set[GraphId], crops, bound: float = FP32_MAX_REL,
                  plugins: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Write bundles for the exported fp32 vision ``graphs`` into ``out_dir/bundles``: each crop image
    (sides multiples of the patch size; the exporter passes one per shape in :data:`BUNDLE_GRIDS`)
    through the reference crop chain, each stage call saved with the graph's I/O names. ``plugins``:
    graph name -> the TensorRT plugin ops it holds (tensorrt flavour). Returns {graph name: [bundle dirs]}."""
    p = model.config.vision.patch_size
    written: dict[str, list[str]] = {}
    root = out_dir / "bundles"
    for img in crops:
        if img.width % p or img.height % p:
            raise ValueError(f"bundle crop of {img.width}x{img.height} px is not a multiple of the {p}-px patch")
        h, w = img.height // p, img.width // p
        recorder = Recorder()
        with torch.no_grad():
            model.crop_chain(stages=recorder.wrap(model.stages(ORACLE))).encode_crops([normalize(img)])
        for call in recorder.calls:
            gid = serving_graph(call.family, call.bucket, "fp32", graphs)
            if gid not in graphs:
                continue
            d = root / gid.name / f"{h}x{w}"
            _save(d, {k: v.float().numpy() for k, v in call.inputs.items()},
                  {k: v.float().numpy() for k, v in call.outputs.items()}, gid.file, bound,
                  (plugins or {}).get(gid.name, []))
            written.setdefault(gid.name, []).append(str(d.relative_to(out_dir)))
    return written
