"""int8 vision graphs for ONNX Runtime's CPU kernels, calibrated through the one crop chain.

``<family>.int8.onnx`` is the fp32 graph with static QDQ quantisation (ONNX Runtime's
``quantize_static``): int8 weights per output channel (symmetric), uint8 activations per tensor
(MinMax over the calibration set), on the op types where ONNX Runtime's CPU kernels gain from int8
(:data:`OP_TYPES`). Everything else (LayerNorm, softmax, the shape-derived RoI / pooling /
bicubic matrices, the JBU kernel arithmetic) stays fp32: only the listed op types are quantised.

Calibration data are the real inputs each graph sees: images are sliced, and their crops go through
the exported fp32 graphs by the crop chain with a :class:`~hiwin_runtime.crop_chain.Recorder`, so the
JBU and projector are calibrated on the fp32 ViT's / JBU's outputs, shape by shape. The set's
content hash, the method, the op types, the exclusions and the tool versions are written into the
manifest entry of every int8 graph (``provenance``).

This is ONNX Runtime's CPU path. TensorRT takes int8 / fp8 as Q/DQ placed the way it fuses them
(NVIDIA ModelOpt), a different placement: not built here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from hiwin_runtime.crop_chain import BatchPolicy, CropChain, Recorder
from hiwin_runtime.graph_id import GraphId
from hiwin_runtime.manifest import ExportDir, ExportError, sha256
from hiwin_runtime.ort import OnnxRunner

log = logging.getLogger("hiwin_export")

OP_TYPES = ("MatMul", "Gemm", "Conv")  # GEMM-shaped ops: where int8 kernels pay off on the CPU
FAMILIES = ("vit", "jbu", "hiwin")


def calibration_feeds(export: ExportDir, images, *, max_slices: int = 9, families=FAMILIES) -> dict[str, list]:
    """{family: [feeds dict per stage call]} from ``images`` (PIL) through the fp32 graphs."""
    from hiwin_runtime.config import HiwinConfig
    from hiwin_runtime.image import load_image
    from hiwin_runtime.slicing import apply_plan, normalize, plan_slices

    runner = OnnxRunner(export)
    s = HiwinConfig.from_dict(export.manifest["config"]).slicing
    out: dict[str, list] = {f: [] for f in families}
    recorder = Recorder()
    chain = CropChain(recorder.wrap(runner.vision_stages("fp32")), patch_size=export.manifest["shape_ranges"]["patch_size"],
                      policy=BatchPolicy(1, 1), bucket_for=export.bucket_for)
    for i, img in enumerate(images, 1):
        img = load_image(img)  # sliced and normalised as the runtime does (HiwinProcessor.prepare_image)
        plan = plan_slices(img.size, max_slices, scale_resolution=s.scale_resolution, patch_size=s.patch_size)
        crops = [normalize(c, s.mean, s.std) for c in apply_plan(img, plan).crops]
        chain.encode_crops(crops)
        log.info("calibration image %d/%d (%dx%d, %d crops)", i, len(images), img.size[0], img.size[1], len(crops))
    for call in recorder.calls:
        if call.family in out:
            out[call.family].append({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in call.inputs.items()})
    return out


def data_hash(feeds: list[dict]) -> str:
    """Content hash of one graph's calibration set (names, shapes, bytes, in order)."""
    h = hashlib.sha256()
    for f in feeds:
        for k in sorted(f):
            h.update(k.encode() + str(f[k].shape).encode() + f[k].tobytes())
    return h.hexdigest()


class _Reader:
    """ONNX Runtime ``CalibrationDataReader`` over a list of feeds (one stage call per sample)."""

    def __init__(self, feeds: list[dict]):
        self.feeds, self.i = feeds, 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self):
        self.i = 0


def quantize_int8(export_dir: str | os.PathLike, images, *, families=FAMILIES, max_slices: int = 9,
                  nodes_to_exclude=()) -> dict:
    """Add ``<family>.int8.onnx`` (+ ``.int8.weights``) to an export directory; returns the new
    manifest entries. The directory is updated atomically per file (temp then rename) and the
    manifest last, so an interrupted run leaves the old manifest, which never lists a half-written
    graph."""
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    bad = [f for f in families if f not in FAMILIES]
    if bad:
        raise ValueError(f"unknown graph family {bad} for int8 (known: {', '.join(FAMILIES)})")
    export = ExportDir(export_dir)
    if export.manifest.get("flavour", "onnx") != "onnx":
        raise ExportError(f"{export.path}: int8 graphs are for ONNX Runtime; this is a "
                          f"{export.manifest['flavour']!r}-flavour export")
    missing = [f for f in families if GraphId(f) not in set(export.graph_ids())]
    if missing:
        raise ExportError(f"{export.path}: no fp32 graph for {missing} (int8 is calibrated from the fp32 graphs; "
                          "the projector must be the any-grid graph `hiwin`)")
    if not images:
        raise ValueError("calibration needs at least one image")
    feeds = calibration_feeds(export, images, max_slices=max_slices, families=families)
    entries = {}
    with tempfile.TemporaryDirectory(prefix="hiwin-int8-", dir=export.path) as tmp:
        tmp = Path(tmp)
        for fam in families:
            src, gid = GraphId(fam), GraphId(fam, None, "int8")
            log.info("quantising %s (%d calibration samples) ...", src.file, len(feeds[fam]))
            raw = tmp / f"{fam}.raw.onnx"
            quantize_static(str(export.graph_path(src)), str(raw), _Reader(feeds[fam]), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(OP_TYPES), per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=list(nodes_to_exclude),
                            use_external_data_format=True, calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
            model = onnx.load(str(raw))
            onnx.save_model(model, str(tmp / gid.file), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=gid.weights_file, size_threshold=1024)
            base = dict(export.graphs[src.name])
            base.update(file=gid.file, sha256=sha256(tmp / gid.file), precision="int8", provenance={
                "method": "onnxruntime.quantization.quantize_static, QDQ, MinMax", "op_types": list(OP_TYPES),
                "weights": "int8 per output channel, symmetric", "activations": "uint8 per tensor, asymmetric",
                "nodes_excluded": list(nodes_to_exclude), "calibration_samples": len(feeds[fam]),
                "calibration_sha256": data_hash(feeds[fam]), "onnxruntime": onnxruntime.__version__,
                "onnx": onnx.__version__})
            entries[gid.name] = base
        mf = dict(export.manifest)
        mf["graphs"] = {**mf["graphs"], **entries}
        mf["weights"] = dict(mf.get("weights", {}))
        for fam in families:
            gid = GraphId(fam, None, "int8")
            for name in (gid.file, gid.weights_file):
                os.replace(tmp / name, export.path / name)
            wf = export.path / gid.weights_file
            mf["weights"][gid.weights_file] = {"sha256": sha256(wf), "bytes": wf.stat().st_size}
        tmp_mf = export.path / "manifest.json.tmp"
        tmp_mf.write_text(json.dumps(mf, indent=2, sort_keys=True))
        os.replace(tmp_mf, export.path / "manifest.json")
    return entries
