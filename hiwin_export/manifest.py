"""Writing ``manifest.json``: graph entries (file, sha256, identity, I/O with dynamic axes; in the
``tensorrt`` flavour the plugin ops each graph holds), the flavour, the shape ranges, the bucket rule as
data, the model config and the tool versions.

Reading it back (integrity, input checks) is :class:`hiwin_runtime.manifest.ExportDir`, re-exported
here together with :class:`ExportError`.
"""

from __future__ import annotations

import platform
from pathlib import Path

import onnx

from hiwin_runtime.buckets import HIWIN_BUCKETS, bucket_rule
from hiwin_runtime.graph_id import GraphId, serving_graph
from hiwin_runtime.manifest import MANIFEST_VERSION, ExportDir, ExportError, sha256

from .graphs import MAX_BATCH, MAX_PATCHES, MIN_PATCHES, OUTPUT_AXES, GraphSpec
from .onnx_export import OPSET
from .plugin_graphs import plugin_ops

__all__ = ["ExportDir", "ExportError", "graph_entry", "manifest_header", "sha256"]


def _io_entry(v: onnx.ValueInfoProto, axes: dict[int, str]) -> dict:
    tt = v.type.tensor_type
    dims = [d.dim_param or d.dim_value for d in tt.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
    return {"name": v.name, "dtype": dtype, "shape": dims,
            "dynamic_axes": {str(k): s for k, s in axes.items()}}


def graph_entry(gid: GraphId, spec: GraphSpec, proto: onnx.ModelProto, path: Path) -> dict:
    axes = {**spec.axes, **OUTPUT_AXES, **spec.output_axes}
    return {"file": path.name, "sha256": sha256(path), "kind": spec.kind, "family": gid.family,
            "bucket": list(gid.bucket) if gid.bucket else None, "precision": gid.precision,
            "inputs": [_io_entry(v, axes.get(v.name, {})) for v in proto.graph.input],
            "outputs": [_io_entry(v, axes.get(v.name, {})) for v in proto.graph.output], **spec.meta,
            **({"plugins": plugin_ops(proto)} if spec.flavour == "tensorrt" else {})}


def weights_sha256(model) -> str:
    """sha256 over the model's state dict: every key, shape and value as float32, in key order (the same
    for a checkpoint loaded at any floating dtype that holds its values exactly)."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for k, t in sorted(model.state_dict().items()):
        t = t.detach()
        h.update(f"{k}:{tuple(t.shape)}:".encode())
        h.update((t.to(torch.float32) if t.is_floating_point() else t).contiguous().cpu().numpy())  # no copy
    return h.hexdigest()


def manifest_header(model, graphs=(), flavour: str = "onnx") -> dict:
    """Directory-wide facts; ``graphs`` (the exported :class:`GraphId` s) maps each projector
    bucket to the graph that serves it; ``flavour`` says who can run the graphs (a manifest without
    it is ``"onnx"``)."""
    import onnxruntime
    import torch

    v = model.config.vision
    return {
        "manifest_version": MANIFEST_VERSION, "opset": OPSET, "flavour": flavour,
        "shape_ranges": {"batch": [1, MAX_BATCH], "patches_per_side": [MIN_PATCHES, MAX_PATCHES],
                         "patch_size": v.patch_size},
        "buckets": {"family": "hiwin", "rule": bucket_rule(),
                    "graphs": {f"{oh}x{ow}": serving_graph("hiwin", (oh, ow), "fp32", set(graphs)).name
                               for oh, ow in HIWIN_BUCKETS}},
        "config": model.config.to_dict(),
        # which weights the graphs were made from: parity refuses another checkpoint by this, up front
        "source": {"weights_sha256": weights_sha256(model)},
        "tools": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                  "python": platform.python_version()},
    }
