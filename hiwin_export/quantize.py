"""Quantised vision graphs, calibrated through the one crop chain (:mod:`hiwin_export.calibration`).

Two backends, three precisions (each its own graphs ``<family>.<precision>.onnx`` in the export
directory, listed in the manifest with their provenance):

* ``ort`` -> ``int8``: ONNX Runtime's ``quantize_static`` (QDQ), int8 weights per output channel
  (symmetric), uint8 activations per tensor (MinMax), on the op types where ONNX Runtime's CPU
  kernels gain from int8 (:data:`ORT_OP_TYPES`). This is the CPU path (``hiwin-run --precision int8``).
* ``modelopt`` -> ``int8trt`` / ``fp8trt``: NVIDIA ModelOpt's ONNX PTQ
  (``modelopt.onnx.quantization.quantize``): Q/DQ placed the way TensorRT fuses them (A100 / Orin
  int8, H100 fp8). TensorRT builds them as explicitly quantised networks; ONNX Runtime's CPU kernels
  do not speed them up, but they run there (the accuracy report evaluates them on the CPU).

The exclusion policy (:func:`exclusions`), the same for both backends, with its reasons in
:data:`POLICY`: nothing whose values are computed from shapes or constants only (the RoI sampling
windows, pooling and bicubic matrices, the grid rule) and no MatMul that applies such a matrix to the
data (a quantised sampling matrix moves samples); LayerNorm, Softmax, Resize, RoiAlign stay fp32; in the JBU only the
convolutions are quantised: its kernel arithmetic (spatial x range weights, normalisation) and its
resampling products stay fp32. Per graph the parity report shows each graph's cosine, so a graph that
turns out fragile is named there.

Calibration data: a :class:`~hiwin_export.calibration.CalibrationSet` (``hiwin-export calibrate``),
recorded on this export's fp32 graphs (checked). The set's content hash, the method, the exclusions
and the tool versions go into each graph's manifest entry (``provenance``). Files are written to a
temp dir and renamed; the manifest last, so an interrupted run never lists a half-written graph.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import onnx

from hiwin_runtime.graph_id import GraphId
from hiwin_runtime.manifest import ExportDir, ExportError, sha256

from .calibration import FAMILIES, CalibrationSet, build_calibration

log = logging.getLogger("hiwin_export")

ORT_OP_TYPES = ("MatMul", "Gemm", "Conv")  # GEMM-shaped ops: where int8 kernels pay off on the CPU
OP_TYPES = ORT_OP_TYPES  # (old name)
BACKENDS = {"ort": ("int8",), "modelopt": ("int8", "fp8")}
PRECISION = {("ort", "int8"): "int8", ("modelopt", "int8"): "int8trt", ("modelopt", "fp8"): "fp8trt"}
# ModelOpt's calibration method per mode, chosen by measurement on the recipe's held-out split (tiny model,
# docs/quantization.md; `--method` overrides): int8 max gives visual-token cosine 0.99970 (max rel 0.031),
# entropy 0.99483 (max rel 0.114), so max. fp8 has only max in ModelOpt's ONNX path.
DEFAULT_METHOD = {"int8": "max", "fp8": "max"}
METHODS = {"int8": ("max", "entropy"), "fp8": ("max",)}

# The exclusion policy: what stays in fp32 and why (recorded in every quantised graph's provenance).
POLICY = {
    "shape-derived nodes": "values computed from input shapes and constants only (RoI sampling windows, pooling "
                           "and bicubic matrices, the grid rule): TensorRT folds them per profile, nothing to gain, "
                           "and a rounded window edge moves samples across pixels",
    "sampling products": "MatMuls that apply a shape-derived matrix (RoI pooling, JBU resampling, position "
                         "interpolation) to the data: quantising the matrix moves the samples' weights",
    "attention products": "ONNX Runtime int8 only: MatMuls of two activations (query x key scores, probabilities "
                          "x values), one uint8 scale per tensor for both operands; in the trained demo tower "
                          "they took the ViT's output cosine to 0.86 (0.9995 with them in fp32) and held-out "
                          "accuracy down 6.5 points (docs/quantization.md)",
    "LayerNormalization": "statistics over the channel axis; CLIP's outlier channels",
    "Softmax": "attention probabilities and the JBU range kernel",
    "Resize": "bicubic position-embedding interpolation",
    "RoiAlign": "the released RoI sampling (faithful projector graphs)",
    "JBU kernel path": "in the JBU only the convolutions are quantised: the spatial x range kernel, its "
                       "normalisation (ReduceSum, Div) and the kernel-weighted sums stay fp32",
}
KEEP_OP_TYPES = ("LayerNormalization", "Softmax", "Resize", "RoiAlign")


def _shape_dependent(graph: onnx.GraphProto) -> tuple[set[str], set[str]]:
    """(tensor names whose values depend on input shapes but not on float data, nodes that compute
    only from shapes/constants)."""
    from .precision import _shape_derived_nodes

    const_nodes = set(_shape_derived_nodes(graph))
    shape_vals: set[str] = set()
    for n in graph.node:  # topological order
        if n.op_type in ("Shape", "Size") or (n.name in const_nodes and any(i in shape_vals for i in n.input)):
            shape_vals.update(n.output)
    return shape_vals, const_nodes


def exclusions(proto: onnx.ModelProto, family: str, backend: str = "ort") -> dict[str, list[str]]:
    """The policy applied to one graph: {reason: [node names]} of the nodes left out of quantisation
    (attention products: ``ort`` only; ModelOpt places Q/DQ where TensorRT fuses them)."""
    g = proto.graph
    shape_vals, const_nodes = _shape_dependent(g)
    out: dict[str, list[str]] = {"shape-derived nodes": sorted(const_nodes), "sampling products": [],
                                 "JBU kernel path": [], "attention products": []}
    constant = {t.name for t in g.initializer} | {o for n in g.node if n.name in const_nodes or n.op_type == "Constant"
                                                  for o in n.output}
    for n in g.node:
        if n.name in const_nodes:
            continue
        if n.op_type in ("MatMul", "Gemm") and any(i in shape_vals for i in n.input):
            out["sampling products"].append(n.name)
        elif family == "jbu" and n.op_type != "Conv":
            out["JBU kernel path"].append(n.name)
        elif backend == "ort" and n.op_type == "MatMul" and not any(i in constant for i in n.input):
            out["attention products"].append(n.name)
        elif n.op_type in KEEP_OP_TYPES:
            out.setdefault(n.op_type, []).append(n.name)
    return {k: v for k, v in out.items() if v}


def _excluded_names(ex: dict[str, list[str]]) -> list[str]:
    return sorted({n for v in ex.values() for n in v})


def _check_export(export: ExportDir, families) -> None:
    if export.flavour != "onnx":
        raise ExportError(f"{export.path}: quantisation starts from the onnx-flavour fp32 graphs; this is a "
                          f"{export.flavour!r}-flavour export")
    missing = [f for f in families if GraphId(f) not in set(export.graph_ids())]
    if missing:
        raise ExportError(f"{export.path}: no fp32 graph for {missing} (quantised graphs are calibrated from the fp32 "
                          "graphs; the projector must be the any-grid graph `hiwin`)")


def quantize(export_dir: str | os.PathLike, calibration: str | os.PathLike | CalibrationSet, *, backend: str = "ort",
             mode: str = "int8", method: str | None = None, families=FAMILIES, nodes_to_exclude=()) -> dict:
    """Add ``<family>.<precision>.onnx`` (+ weights) for ``families``; returns the new manifest entries."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    if mode not in BACKENDS[backend]:
        raise ValueError(f"backend {backend} has no mode {mode!r} (it has {', '.join(BACKENDS[backend])})")
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        raise ValueError(f"unknown graph family {bad} for quantisation (known: {', '.join(FAMILIES)})")
    if backend == "modelopt":
        method = method or DEFAULT_METHOD[mode]
        if method not in METHODS[mode]:
            raise ValueError(f"modelopt {mode}: calibration method must be one of {METHODS[mode]}, got {method!r}")
    elif method not in (None, "minmax"):
        raise ValueError(f"backend ort calibrates with minmax, got method {method!r}")
    export = ExportDir(export_dir)
    _check_export(export, families)
    cs = calibration if isinstance(calibration, CalibrationSet) else CalibrationSet(calibration)
    cs.check_export(export, families)
    precision = PRECISION[backend, mode]
    entries = {}
    with tempfile.TemporaryDirectory(prefix=f"hiwin-{precision}-", dir=export.path) as tmp:
        tmp = Path(tmp)
        for fam in families:
            src, gid = GraphId(fam), GraphId(fam, None, precision)
            fp32 = onnx.load(str(export.graph_path(src)))
            ex = exclusions(fp32, fam, backend)
            skip = sorted(set(_excluded_names(ex)) | set(nodes_to_exclude))
            log.info("quantising %s -> %s (%s %s, %d calibration samples, %d nodes excluded) ...", src.file, gid.file,
                     backend, mode, cs.samples(fam), len(skip))
            raw = tmp / f"{fam}.raw.onnx"
            if backend == "ort":
                tool = _ort_int8(export.graph_path(src), raw, cs, fam, skip)
            else:
                tool = _modelopt(fp32, tmp, raw, cs, fam, mode, method, skip)
            model = onnx.load(str(raw))
            onnx.save_model(model, str(tmp / gid.file), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=gid.weights_file, size_threshold=1024)
            base = dict(export.graphs[src.name])
            base.update(file=gid.file, sha256=sha256(tmp / gid.file), precision=precision, provenance={
                **tool, "backend": backend, "mode": mode, "policy": POLICY,
                "nodes_excluded": {k: len(v) for k, v in ex.items()}, "nodes_excluded_extra": list(nodes_to_exclude),
                "qdq_pairs": sum(n.op_type == "QuantizeLinear" for n in model.graph.node),
                "calibration_samples": cs.samples(fam), "calibration_sha256": cs.content_sha256(fam),
                "onnx": onnx.__version__})
            entries[gid.name] = base
        _commit(export, tmp, entries)
    return entries


def _ort_int8(src: Path, raw: Path, cs: CalibrationSet, fam: str, skip: list[str]) -> dict:
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(str(src), str(raw), cs.reader(fam), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(ORT_OP_TYPES), per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_exclude=skip, use_external_data_format=True,
                    calibrate_method=CalibrationMethod.MinMax,
                    # no CalibMaxIntermediateOutputs: in onnxruntime 1.32 it drops the collected ranges instead of
                    # merging them (only the last partial group counts). MinMax keeps per-sample ReduceMin/Max
                    # results only, not activations, so memory does not grow with the sample count anyway.
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
    return {"method": "onnxruntime.quantization.quantize_static, QDQ, MinMax", "op_types": list(ORT_OP_TYPES),
            "weights": "int8 per output channel, symmetric", "activations": "uint8 per tensor, asymmetric",
            "onnxruntime": onnxruntime.__version__}


def _modelopt(fp32: onnx.ModelProto, tmp: Path, raw: Path, cs: CalibrationSet, fam: str, mode: str, method: str,
              skip: list[str]) -> dict:
    """ModelOpt PTQ on a private copy of the fp32 graph (ModelOpt rewrites its input file in place)."""
    import modelopt
    import onnxruntime
    from modelopt.onnx.quantization import quantize as mo_quantize

    work = tmp / f"modelopt-{fam}"
    work.mkdir()
    src = work / f"{fam}.onnx"
    onnx.save_model(fp32, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{fam}.data", size_threshold=1024)
    for name in ("modelopt", "modelopt.onnx"):  # it logs every pass at INFO, twice
        logging.getLogger(name).setLevel(logging.WARNING)
    with _ort_patches_undone():
        mo_quantize(str(src), quantize_mode=mode, calibration_data_reader=cs.reader(fam), calibration_method=method,
                    calibration_eps=["cpu"], high_precision_dtype="fp32", mha_accumulation_dtype="fp32",
                    # ModelOpt reads node names as regular expressions matched at the start (re.match): anchor
                    # and escape them, or `node_matmul_1` would also exclude `node_matmul_10` ...
                    op_types_to_exclude=list(KEEP_OP_TYPES), nodes_to_exclude=[re.escape(n) + "$" for n in skip],
                    use_external_data_format=True,
                    output_path=str(raw), log_level="WARNING")
    shutil.rmtree(work, ignore_errors=True)
    return {"method": f"modelopt.onnx.quantization.quantize, mode {mode}, calibration {method}",
            "high_precision_dtype": "fp32", "calibration_eps": ["cpu"], "modelopt": modelopt.__version__,
            "onnxruntime": onnxruntime.__version__}


@contextlib.contextmanager
def _ort_patches_undone():
    """ModelOpt monkeypatches ONNX Runtime's calibrators and quantizer classes process-wide (its
    ``patch_ort_modules``); after it, ONNX Runtime's own ``quantize_static`` (the ``ort`` backend) fails.
    Every attribute of those classes and of the ``calibrate`` module is put back afterwards."""
    from onnxruntime.quantization import base_quantizer, calibrate, qdq_quantizer

    owners = [calibrate, *(v for v in vars(calibrate).values() if isinstance(v, type)),
              base_quantizer.BaseQuantizer, qdq_quantizer.QDQQuantizer]
    saved = [(o, dict(vars(o))) for o in owners]
    try:
        yield
    finally:
        for o, attrs in saved:
            for k, v in attrs.items():
                if vars(o).get(k) is not v:
                    try:
                        setattr(o, k, v)
                    except (AttributeError, TypeError):  # read-only slots (__dict__, __doc__ of types)
                        pass


def _commit(export: ExportDir, tmp: Path, entries: dict) -> None:
    mf = dict(export.manifest)
    mf["graphs"] = {**mf["graphs"], **entries}
    mf["weights"] = dict(mf.get("weights", {}))
    for name in entries:
        gid = GraphId.parse(name)
        for f in (gid.file, gid.weights_file):
            os.replace(tmp / f, export.path / f)
        wf = export.path / gid.weights_file
        mf["weights"][gid.weights_file] = {"sha256": sha256(wf), "bytes": wf.stat().st_size}
    tmp_mf = export.path / "manifest.json.tmp"
    tmp_mf.write_text(json.dumps(mf, indent=2, sort_keys=True))
    os.replace(tmp_mf, export.path / "manifest.json")


def quantize_int8(export_dir: str | os.PathLike, images, *, families=FAMILIES, max_slices: int = 9,
                  nodes_to_exclude=()) -> dict:
    """ONNX Runtime int8 graphs calibrated on ``images`` (PIL): a calibration set is built in a temp
    dir (:func:`~hiwin_export.calibration.build_calibration`) and :func:`quantize` run on it."""
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        raise ValueError(f"unknown graph family {bad} for int8 (known: {', '.join(FAMILIES)})")
    if not images:
        raise ValueError("calibration needs at least one image")
    export = ExportDir(export_dir)
    if export.flavour != "onnx":
        raise ExportError(f"{export.path}: int8 graphs are for ONNX Runtime; this is a {export.flavour!r}-flavour export")
    _check_export(export, families)
    with tempfile.TemporaryDirectory(prefix="hiwin-calib-") as tmp:
        build_calibration(export.path, Path(tmp) / "calibration", images=list(images), families=families,
                          max_slices=max_slices)
        return quantize(export.path, Path(tmp) / "calibration", backend="ort", mode="int8", families=families,
                        nodes_to_exclude=nodes_to_exclude)


def quantised_nodes(proto: onnx.ModelProto) -> list[str]:
    """Compute nodes of a Q/DQ graph that read a dequantised tensor (the nodes quantisation changed)."""
    dq = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    return [n.name for n in proto.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
            and any(i in dq for i in n.input)]


def sensitivity(model, export_dir: str | os.PathLike, calibration, images, *, family: str = "hiwin",
                backend: str = "modelopt", mode: str = "fp8", method: str | None = None) -> list[dict]:
    """Per-node sensitivity of one graph: quantise it with each quantised node left out in turn (on
    a scratch copy of the export) and measure the visual tokens on ``images`` (the held-out split);
    rows sorted by the cosine gained. The first row is the node to keep in fp32 first."""
    from .parity import Harness

    precision = PRECISION[backend, mode]
    rows = []
    with tempfile.TemporaryDirectory(prefix="hiwin-sensitivity-") as tmp:
        scratch = Path(tmp) / "export"
        shutil.copytree(export_dir, scratch, ignore=shutil.ignore_patterns("reports", "bundles", "*.int8*", "*trt*"))

        def tokens_cosine(extra=()) -> float:
            # the baseline quantises every graph; each trial re-quantises only `family`, one node left out
            quantize(scratch, calibration, backend=backend, mode=mode, method=method,
                     families=(family,) if extra else FAMILIES, nodes_to_exclude=extra)
            h = Harness(model, scratch, precision=precision)
            h.image_cases(images)
            return h.summary()["vision-path"]["min_cosine"]

        base = tokens_cosine()
        nodes = quantised_nodes(onnx.load(str(scratch / GraphId(family, None, precision).file),
                                          load_external_data=False))
        for i, node in enumerate(nodes, 1):
            log.info("sensitivity %d/%d: %s left out", i, len(nodes), node)
            cos = tokens_cosine((node,))
            rows.append({"node": node, "tokens_min_cosine": cos, "gain": cos - base, "baseline": base})
    return sorted(rows, key=lambda r: -r["gain"])
