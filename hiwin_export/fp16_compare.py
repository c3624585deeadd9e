"""fp16 policy check: our strongly typed fp16 pass (:func:`hiwin_export.precision.fp16_variant`) against
NVIDIA ModelOpt's AutoCast (``modelopt.onnx.autocast.convert_to_mixed_precision``) on the same graphs and
the same parity sweep (``hiwin-export fp16-compare``).

Per vision graph: the parity statistics of each variant against the PyTorch reference (random cases
and real pages), how many compute nodes stay fp32 (Cast and shape-only nodes not counted), how many
Casts each adds, and the nodes whose float inputs mix fp32 and fp16 (TensorRT's strongly typed mode
refuses a graph with such a node; ONNX itself rejects most of them). AutoCast is given real inputs
(samples of the calibration set) for its range check (``data_max``), as its documentation asks.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from hiwin_runtime.graph_id import GraphId
from hiwin_runtime.manifest import ExportDir, sha256

log = logging.getLogger("hiwin_export")

FAMILIES = ("vit", "jbu", "hiwin")
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16)
# inputs that ONNX defines as fp32 whatever the data type (not a mix)
_FP32_BY_SPEC = {"Resize": (1, 2)}


def type_census(proto: onnx.ModelProto) -> dict:
    """{fp32_nodes, fp16_nodes, casts, mixed_type_nodes: [names]} of a graph (types by shape inference)."""
    from .precision import _shape_derived_nodes

    m = onnx.shape_inference.infer_shapes(proto)
    g = m.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    for n in g.node:  # Constant nodes
        if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR:
            types[n.output[0]] = n.attribute[0].t.data_type
    shape_only = set(_shape_derived_nodes(g))
    out = {"fp32_nodes": 0, "fp16_nodes": 0, "casts": 0, "mixed_type_nodes": []}
    for n in g.node:
        if n.op_type == "Cast":
            out["casts"] += 1
            continue
        skip = _FP32_BY_SPEC.get(n.op_type, ())
        ins = {types.get(x) for i, x in enumerate(n.input) if x and i not in skip} & set(_FLOATS)
        if len(ins) > 1:
            out["mixed_type_nodes"].append(n.name)
        if n.name in shape_only or n.op_type in ("Shape", "Size", "Constant"):
            continue
        t = types.get(n.output[0])
        if t == TensorProto.FLOAT:
            out["fp32_nodes"] += 1
        elif t == TensorProto.FLOAT16:
            out["fp16_nodes"] += 1
    return out


def autocast_variant(fp32_path: Path, data_dir: Path) -> onnx.ModelProto:
    from modelopt.onnx.autocast import convert_to_mixed_precision

    for name in ("modelopt", "modelopt.onnx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return convert_to_mixed_precision(str(fp32_path), low_precision_type="fp16", keep_io_types=True,
                                      calibration_data=str(data_dir))


def _replace_graph(export_path: Path, gid: GraphId, proto: onnx.ModelProto) -> None:
    """Put ``proto`` in place of graph ``gid`` of a scratch copy of an export (manifest updated)."""
    mf = json.loads((export_path / "manifest.json").read_text())
    onnx.save_model(proto, str(export_path / gid.file), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=gid.weights_file, size_threshold=1024)
    mf["graphs"][gid.name]["sha256"] = sha256(export_path / gid.file)
    wf = export_path / gid.weights_file
    mf["weights"][gid.weights_file] = {"sha256": sha256(wf), "bytes": wf.stat().st_size}
    (export_path / "manifest.json").write_text(json.dumps(mf, indent=2))


def compare(model, export_dir: str | os.PathLike, calibration, images, *, families=FAMILIES, grids=None,
            samples: int = 4) -> dict:
    """{family: {"ours": {...}, "autocast": {...}}}: parity summary + type census of each variant."""
    from .calibration import CalibrationSet
    from .parity import RANDOM_GRIDS, Harness

    export = ExportDir(export_dir)
    cs = calibration if isinstance(calibration, CalibrationSet) else CalibrationSet(calibration)
    cs.check_export(export, families)
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="hiwin-fp16cmp-") as tmp:
        tmp = Path(tmp)
        scratch = tmp / "autocast-export"
        shutil.copytree(export.path, scratch, ignore=shutil.ignore_patterns("reports", "bundles"))
        for fam in families:
            data = tmp / f"data-{fam}"
            data.mkdir()
            n = cs.samples(fam)
            pick = set(np.linspace(0, n - 1, min(samples, n)).round().astype(int).tolist())
            for i, f in enumerate(cs.feeds(fam)):
                if i in pick:
                    np.savez(data / f"{i:05d}.npz", **f)
            log.info("AutoCast fp16: %s (%d real input samples) ...", fam, len(pick))
            ac = autocast_variant(export.graph_path(GraphId(fam)), data)
            _replace_graph(scratch, GraphId(fam, None, "fp16"), ac)
            ours = onnx.load(str(export.graph_path(GraphId(fam, None, "fp16"))))
            result[fam] = {"ours": type_census(ours), "autocast": type_census(ac)}
        for name, path in (("ours", export.path), ("autocast", scratch)):
            h = Harness(model, path, precision="fp16")
            for fam in families:
                h.graph_cases(GraphId(fam), grids or RANDOM_GRIDS)
            h.image_cases(images)
            for fam, s in h.summary().items():
                if fam in result:
                    result[fam][name].update(cases=s["cases"], min_cosine=s["min_cosine"],
                                             worst_max_rel=s["worst_max_rel"], ok=s["ok"])
    return result


def apply_autocast(export_dir: str | os.PathLike, calibration, families=("jbu",), *, samples: int = 4) -> dict:
    """Replace ``<family>.fp16`` of an onnx-flavour export by AutoCast's conversion (where the comparison
    shows the library at least as good: the JBU, see :mod:`hiwin_export.precision`). Atomic per file,
    manifest last; the entry's ``provenance`` names the tool. Returns the new entries."""
    import modelopt

    from .calibration import CalibrationSet
    from .quantize import _commit

    export = ExportDir(export_dir)
    if export.flavour != "onnx":
        raise ValueError(f"{export.path}: AutoCast cannot convert the {export.flavour!r} flavour's plugin nodes here; "
                         "its fp16 graphs stay ours")
    cs = calibration if isinstance(calibration, CalibrationSet) else CalibrationSet(calibration)
    cs.check_export(export, families)
    entries = {}
    with tempfile.TemporaryDirectory(prefix="hiwin-autocast-", dir=export.path) as tmp:
        tmp = Path(tmp)
        for fam in families:
            gid = GraphId(fam, None, "fp16")
            export.graph_path(gid)
            data = tmp / f"data-{fam}"
            data.mkdir()
            n = cs.samples(fam)
            pick = set(np.linspace(0, n - 1, min(samples, n)).round().astype(int).tolist())
            for i, f in enumerate(cs.feeds(fam)):
                if i in pick:
                    np.savez(data / f"{i:05d}.npz", **f)
            ac = autocast_variant(export.graph_path(GraphId(fam)), data)
            onnx.save_model(ac, str(tmp / gid.file), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=gid.weights_file, size_threshold=1024)
            e = dict(export.graphs[gid.name])
            e.update(sha256=sha256(tmp / gid.file), provenance={
                "tool": "modelopt.onnx.autocast.convert_to_mixed_precision", "modelopt": modelopt.__version__,
                "keep_io_types": True, "reference_samples": len(pick), "calibration_sha256": cs.content_sha256(fam)})
            entries[gid.name] = e
        _commit(export, tmp, entries)
    return entries


def markdown(result: dict) -> str:
    lines = ["| graph | variant | min cosine | worst max rel | parity (cos >= 0.999) | fp32 compute nodes | "
             "fp16 compute nodes | Casts | mixed fp32/fp16 nodes |", "|---|---|---|---|---|---|---|---|---|"]
    for fam, r in result.items():
        for name in ("ours", "autocast"):
            v = r[name]
            lines.append(f"| {fam} | {name} | {v.get('min_cosine', float('nan')):.6f} | "
                         f"{v.get('worst_max_rel', float('nan')):.3e} | {'yes' if v.get('ok') else 'NO'} | "
                         f"{v['fp32_nodes']} | {v['fp16_nodes']} | {v['casts']} | {len(v['mixed_type_nodes'])} |")
    return "\n".join(lines) + "\n"
