"""Export the vision graphs to ONNX (fp32): ``torch.onnx.export(dynamo=True)`` per :mod:`.graphs` spec.

* ``hiwin::roi_align`` becomes standard ONNX ``RoiAlign`` (opset 18) with every attribute written:
  ``mode="avg"``, ``coordinate_transformation_mode="output_half_pixel"`` (torchvision
  ``aligned=False``), ``sampling_ratio=0`` (adaptive), ``spatial_scale=1``, fp32 inputs.
* Weights go to external data; the projector buckets share one file (``hiwin.weights``), written
  once, so seven graphs cost one copy of the projector.
* Each graph passes the full ``onnx.checker`` and strict shape inference, carries the model config
  in its metadata, and is listed in ``manifest.json`` with its sha256.
* The output directory is written atomically (temp dir, then rename): a failed or interrupted
  export never leaves a mix of old and new files.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import platform
import time
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, numpy_helper

from hiwin_model.checkpoint import atomic_directory

from .graphs import HIWIN_BUCKETS, MAX_BATCH, MAX_PATCHES, MIN_PATCHES, OUTPUT_AXES, GraphSpec, graph_specs

log = logging.getLogger("hiwin_export")
OPSET = 18  # >= 17 for LayerNormalization, >= 16 for RoiAlign's coordinate_transformation_mode
EXTERNAL_MIN_BYTES = 1024
# The fp16 precision policy, in one place: ops that stay fp32 inside the fp16 graphs (explicit
# Cast nodes around them, so the graphs are strongly typed as TensorRT 11 requires).
FP16_KEEP_FP32 = {
    "LayerNormalization": "variance overflows/underflows in fp16 (CLIP, projector LayerNorms)",
    "Softmax": "attention and the JBU range kernel: fp32 accumulation",
    "ReduceSum": "JBU kernel normalisation and range logits",
    "ReduceMean": "statistics",
    "Exp": "JBU spatial/range temperature",
    "RoiAlign": "fp16 coordinates are coarse at large maps and the adaptive grid accumulates many samples",
    "Resize": "bicubic position-embedding interpolation (ViT and projector key positions)",
    "Pow": "RMSNorm squares: Llama activations reach 1e3, whose square overflows fp16",
}
MANIFEST_VERSION = 1


def roi_align_to_onnx(input, boxes, batch_idx, output_h: int, output_w: int, spatial_scale: float,
                      sampling_ratio: int, aligned: bool):
    """onnxscript translation of ``hiwin::roi_align`` (torchvision semantics) to ``RoiAlign``."""
    from onnxscript import opset18 as op

    return op.RoiAlign(input, boxes, op.Cast(batch_idx, to=TensorProto.INT64), mode="avg",
                       output_height=output_h, output_width=output_w,
                       sampling_ratio=max(int(sampling_ratio), 0), spatial_scale=float(spatial_scale),
                       coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel")


def _export_one(spec: GraphSpec, model) -> onnx.ModelProto:
    module = spec.module(model).eval()
    args = spec.dummy(model)
    shapes = spec.dynamic_shapes()
    if spec.export_shapes is not None:  # already keyed by forward() parameter
        dyn = shapes
    else:  # map our I/O names onto forward()'s
        params = list(inspect.signature(module.forward).parameters)
        dyn = {p: shapes[n] for p, n in zip(params, spec.inputs)}
    with torch.no_grad():
        prog = torch.onnx.export(module, args, None, dynamo=True, input_names=list(spec.inputs),
                                 output_names=list(spec.outputs), dynamic_shapes=dyn, opset_version=OPSET,
                                 custom_translation_table={torch.ops.hiwin.roi_align.default: roi_align_to_onnx},
                                 verbose=False)
    return prog.model_proto


class SharedWeights:
    """Appends initializers to one external-data file; identical tensors are stored once."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0
        self.index: dict[tuple[str, str], tuple[int, int]] = {}
        self.fh = open(path, "wb")

    def externalize(self, model: onnx.ModelProto) -> None:
        for t in model.graph.initializer:
            raw = numpy_helper.to_array(t).tobytes() if not t.HasField("raw_data") else t.raw_data
            if len(raw) < EXTERNAL_MIN_BYTES:
                continue
            key = (t.name, hashlib.sha1(raw).hexdigest())
            if key not in self.index:
                pad = (-self.offset) % 64  # aligned offsets allow mmap
                self.fh.write(b"\0" * pad)
                self.offset += pad
                self.fh.write(raw)
                self.index[key] = (self.offset, len(raw))
                self.offset += len(raw)
            off, n = self.index[key]
            for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                t.ClearField(f)
            t.data_location = TensorProto.EXTERNAL
            del t.external_data[:]
            for k, v in (("location", self.path.name), ("offset", str(off)), ("length", str(n))):
                e = t.external_data.add()
                e.key, e.value = k, v

    def close(self) -> None:
        self.fh.close()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _io_entry(v: onnx.ValueInfoProto, axes: dict[int, str]) -> dict:
    tt = v.type.tensor_type
    dims = [d.dim_param or d.dim_value for d in tt.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
    return {"name": v.name, "dtype": dtype, "shape": dims,
            "dynamic_axes": {str(k): s for k, s in axes.items()}}


def export_model(model, out_dir: str | os.PathLike, *, overwrite: bool = False,
                 graphs: list[str] | None = None, bundles: bool = True, parity: str | None = "quick",
                 precisions: tuple[str, ...] = ("fp32", "fp16")) -> dict:
    """Export every (or the named) graph of ``model`` into ``out_dir``; returns the manifest.

    Vision graphs always; the ``embed`` and ``llm`` graphs, the tokenizer and the runtime facts
    (``manifest["language"]``) when ``model`` has its LLM. ``bundles`` writes Polygraphy parity
    bundles; ``parity`` ("quick", "full" or None) runs the harness on the fresh graphs before the
    directory is put in place: a graph beyond its bound aborts the export
    (:class:`~hiwin_export.parity.ParityError`) and nothing is written.
    """
    from .language import language_manifest, language_specs

    if not set(precisions) <= {"fp32", "fp16"} or "fp32" not in precisions:
        raise ValueError(f"precisions must include fp32 and may add fp16, got {precisions}")
    if parity not in (None, "quick", "full"):
        raise ValueError(f"parity must be 'quick', 'full' or None, got {parity!r}")
    known = graph_specs() + language_specs(model)
    specs = [s for s in known if graphs is None or s.name in graphs]
    unknown = sorted(set(graphs or ()) - {s.name for s in known})
    if unknown or not specs:
        raise ValueError(f"unknown graphs {unknown} (known: {[s.name for s in known]})" if unknown
                         else f"no graphs selected (known: {[s.name for s in known]})")
    cfg_json = json.dumps(model.config.to_dict(), sort_keys=True)
    manifest: dict = {}

    def write(tmp: Path) -> None:
        entries = {}
        shared: dict[str, SharedWeights] = {}
        try:
            for i, spec in enumerate(specs, 1):
                t0 = time.perf_counter()
                log.info("[%d/%d] exporting %s.onnx ...", i, len(specs), spec.name)
                proto = _export_one(spec, model)
                proto.metadata_props.add(key="hiwin_config", value=cfg_json)
                proto.metadata_props.add(key="hiwin_graph", value=spec.name)
                proto.metadata_props.add(key="hiwin_meta", value=json.dumps(spec.meta))
                fam = _family(spec.name)
                if fam not in shared:  # (not setdefault: opening the file truncates it)
                    shared[fam] = SharedWeights(tmp / f"{fam}.weights")
                shared[fam].externalize(proto)
                path = tmp / f"{spec.name}.onnx"
                onnx.save_model(proto, str(path))
                log.info("[%d/%d] %s.onnx exported in %.1f s", i, len(specs), spec.name, time.perf_counter() - t0)
                entries[spec.name] = proto
        finally:
            for s in shared.values():
                s.close()
        if "fp16" in precisions:
            fp16_shared: dict[str, SharedWeights] = {}
            entries.update(_fp16_variants(tmp, entries, fp16_shared))
            shared.update({f"{k}.fp16": v for k, v in fp16_shared.items()})
        for name, proto in entries.items():
            path = tmp / f"{name}.onnx"
            onnx.checker.check_model(str(path), full_check=True)  # includes strict shape inference
            spec = next(s for s in specs if s.name == name.split(".")[0])
            all_axes = {**spec.axes, **OUTPUT_AXES, **spec.output_axes}
            manifest.setdefault("graphs", {})[name] = {
                "file": path.name, "sha256": sha256(path), "kind": spec.kind,
                "inputs": [_io_entry(v, all_axes.get(v.name, {})) for v in proto.graph.input],
                "outputs": [_io_entry(v, all_axes.get(v.name, {})) for v in proto.graph.output],
                "precision": "fp16" if name.endswith(".fp16") else "fp32", **spec.meta}
        for s in shared.values():
            manifest.setdefault("weights", {})[s.path.name] = {"sha256": sha256(s.path),
                                                               "bytes": s.path.stat().st_size}
        manifest.update(_manifest_header(model))
        if any(s.kind == "language" for s in specs):
            manifest["language"] = language_manifest(model)
            if model.processor is not None:
                tok_dir = tmp / manifest["language"]["tokenizer"]
                model.processor.tokenizer.save_pretrained(str(tok_dir))
                manifest["files"] = {str(p.relative_to(tmp)): sha256(p) for p in sorted(tok_dir.rglob("*"))
                                     if p.is_file()}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if bundles:
            from .bundles import write_bundles

            vision = {n for n in entries if "." not in n and _family(n) in ("vit", "jbu", "hiwin")}
            if vision:
                log.info("writing Polygraphy parity bundles ...")
                manifest["bundles"] = write_bundles(model, tmp, vision)
        if parity:
            manifest["parity"] = _run_parity(model, tmp, parity, set(entries))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))

    atomic_directory(Path(out_dir), write, overwrite=overwrite)
    return manifest


def _family(graph: str) -> str:
    """Graphs of one family share one external weights file (``hiwin_3x3`` -> ``hiwin``)."""
    return graph.split(".")[0].split("_")[0]


def _fp16_variants(tmp: Path, fp32: dict[str, onnx.ModelProto],
                   fp16_shared: dict[str, SharedWeights]) -> dict[str, onnx.ModelProto]:
    """``<name>.fp16.onnx``: fp16 compute with :data:`FP16_KEEP_FP32` ops in fp32, fp32 I/O."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    out = {}
    shared = fp16_shared
    try:
        for name in fp32:
            log.info("fp16 variant of %s.onnx ...", name)
            proto = onnx.load(str(tmp / f"{name}.onnx"))  # with its external weights
            f16 = convert_float_to_float16(proto, keep_io_types=True, op_block_list=sorted(FP16_KEEP_FP32),
                                           node_block_list=_shape_derived_nodes(proto.graph))
            _drop_fp16_round_trips(f16.graph)
            _toposort(f16.graph)  # the converter appends its I/O casts at the end
            del f16.graph.value_info[:]  # stale fp32 annotations; strict shape inference redoes them
            fam = _family(name)
            if fam not in shared:  # (not setdefault: opening the file truncates it)
                shared[fam] = SharedWeights(tmp / f"{fam}.fp16.weights")
            shared[fam].externalize(f16)
            onnx.save_model(f16, str(tmp / f"{name}.fp16.onnx"))
            out[f"{name}.fp16"] = f16
    finally:
        for s in shared.values():
            s.close()
    return out


def _shape_derived_nodes(graph: onnx.GraphProto) -> list[str]:
    """Nodes whose values depend on input *shapes*, integer inputs and constants only, never on
    float input data: the RoI window boxes, the pooling and bicubic matrices, the key-position
    interpolation; in the decoder, the rotary cos/sin of ``position_ids`` and the attention mask.

    They stay fp32 in the fp16 graphs (TensorRT folds the shape-only ones per profile anyway):
    fp16 window edges move RoI samples across pixel borders, the same defect as the released
    model's bf16 box rounding (MODEL.md §4.7); fp16 positions are not even integers beyond 2048,
    and ONNX ``Range`` has no fp16 at all."""
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
    weights = {t.name for t in graph.initializer}
    # integer inputs that index a weight table (token ids -> embedding Gather) are data too
    lookups = {n.input[1] for n in graph.node if n.op_type == "Gather" and n.input[0] in weights}
    data = {i.name for i in graph.input if i.type.tensor_type.elem_type in floats or i.name in lookups}
    names = []
    for n in graph.node:  # topological order
        if n.op_type in ("Shape", "Size"):
            continue
        if any(i in data for i in n.input):
            data.update(n.output)
        else:
            names.append(n.name)
    return names


def _drop_fp16_round_trips(graph: onnx.GraphProto) -> int:
    """Remove ``x -> Cast(fp16) -> Cast(fp32)`` pairs the converter puts between two fp32 ops.

    The converter wraps each kept-fp32 op in casts, so a chain of fp32 ops (the RoI box arithmetic,
    LayerNorm followed by RoiAlign, ...) is rounded to fp16 between every two of its ops. Feeding
    the fp32 value straight through keeps the chain fp32, as the precision policy intends.
    """
    def cast_to(n):
        return onnx.helper.get_attribute_value(n.attribute[0]) if n.op_type == "Cast" else None

    producer = {o: n for n in graph.node for o in n.output}
    rename: dict[str, str] = {}
    for n in graph.node:
        if cast_to(n) == TensorProto.FLOAT:
            up = producer.get(n.input[0])
            if up is not None and cast_to(up) == TensorProto.FLOAT16:
                rename[n.output[0]] = up.input[0]
    if not rename:
        return 0
    outputs = {o.name for o in graph.output}
    for n in graph.node:
        for i, x in enumerate(n.input):
            if x in rename:
                n.input[i] = rename[x]
    keep = [n for n in graph.node if not (n.output and n.output[0] in rename and n.output[0] not in outputs)]
    used = {x for n in keep for x in n.input} | outputs
    keep = [n for n in keep if any(o in used for o in n.output) or not n.output]
    del graph.node[:]
    graph.node.extend(keep)
    return len(rename)


def _toposort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so every node follows the producers of its inputs (stable)."""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in known for i in n.input):
                ordered.append(n)
                known.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError(f"graph {graph.name!r} has a cycle or dangling inputs at {rest[0].name!r}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def _run_parity(model, tmp: Path, level: str, graphs: set[str]) -> dict:
    from hiwin_model.demo import draw_scene

    from .parity import IMAGE_SIZES, Harness

    log.info("parity (%s) against the PyTorch reference ...", level)
    summary: dict = {}
    for precision in ("fp32", "fp16"):
        names = {g.split(".")[0] for g in graphs if (g.endswith(".fp16")) == (precision == "fp16")}
        if not names:
            continue
        h = Harness(model, tmp, precision=precision)
        language = names & {"embed", "llm"}
        vision = names - language
        full = {"vit", "jbu"} <= vision and all(f"hiwin_{a}x{b}" in vision for a, b in HIWIN_BUCKETS)
        if full:
            h.random_cases()
            sizes = IMAGE_SIZES if level == "full" else IMAGE_SIZES[1:4]
            h.image_cases([draw_scene(w, hh, "circle", "red", f"{w}x{hh}", seed=i) for i, (w, hh) in enumerate(sizes)])
        else:  # a subset export: per-graph random cases only
            for name in sorted(vision):
                h.graph_cases(name)
        if language:
            h.language_cases(sorted(language))
        h.write_report(tmp / "reports")
        h.assert_ok()
        summary[precision] = {"level": level if full else "subset", **h.summary()}
    return summary


def _manifest_header(model) -> dict:
    import onnxruntime

    v = model.config.vision
    return {
        "manifest_version": MANIFEST_VERSION, "opset": OPSET, "precision": "fp32",
        "shape_ranges": {"batch": [1, MAX_BATCH], "patches_per_side": [MIN_PATCHES, MAX_PATCHES],
                         "patch_size": v.patch_size},
        "hiwin_buckets": {f"{h}x{w}": f"hiwin_{h}x{w}.onnx" for h, w in HIWIN_BUCKETS},
        "hiwin_bucket_rule": "sampling_grid(w_patches, h_patches) of hiwin_model.projector: argmin over "
                             "(w,h) in (4,2),(3,2),(4,3),(3,3),(2,4),(2,3),(3,4) of |ln(W/H) - ln(w/h)|",
        "config": model.config.to_dict(),
        "tools": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                  "python": platform.python_version()},
    }
