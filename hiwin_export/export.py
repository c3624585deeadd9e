"""Export orchestration: every graph of a model into one export directory, atomically.

Per graph spec (:mod:`.graphs`, :mod:`.language`): torch -> ONNX (:mod:`.onnx_export`), weights to the
family's shared external file (:mod:`.weights`), precision variants (:mod:`.precision`), the full
``onnx.checker`` with strict shape inference, the manifest entry (:mod:`.manifest`); then the
Polygraphy bundles (:mod:`.bundles`) and a parity run (:mod:`.parity`) on the fresh graphs before
the temporary directory is renamed into place: a failed or interrupted export never leaves a mix of
old and new files, and a graph beyond its parity bound is never put in place.

Two flavours of the same graphs: ``"onnx"`` (standard ONNX, ONNX Runtime and TensorRT) and
``"tensorrt"`` (TensorRT plugin nodes in the JBU and faithful projector graphs, :mod:`.plugin_graphs`),
whose parity runs on ``onnx.reference.ReferenceEvaluator`` with the plugins' CPU launchers, ONNX
Runtime being unable to run them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import onnx

from hiwin_model.checkpoint import atomic_directory
from hiwin_runtime.graph_id import GraphId

from .graphs import graph_specs
from .language import language_manifest, language_specs
from .manifest import graph_entry, manifest_header, sha256
from .onnx_export import export_graph
from .plugin_graphs import FLAVOURS
from .precision import fp16_variant
from .weights import SharedWeights

log = logging.getLogger("hiwin_export")


def export_model(model, out_dir: str | os.PathLike, *, overwrite: bool = False,
                 graphs: list[str] | None = None, bundles: bool = True, parity: str | None = "quick",
                 precisions: tuple[str, ...] = ("fp32", "fp16"), projector_impl: str = "fast",
                 flavour: str = "onnx", genai: str | None = None) -> dict:
    """Export every (or the named) graph of ``model`` into ``out_dir``; returns the manifest.

    Vision graphs always; the ``embed`` and ``llm`` graphs, the tokenizer and the runtime facts
    (``manifest["language"]``) when ``model`` has its LLM. ``bundles`` writes Polygraphy parity
    bundles; ``parity`` ("quick", "full" or None) runs the harness on the fresh graphs before the
    directory is put in place: a graph beyond its bound aborts the export
    (:class:`~hiwin_export.parity.ParityError`) and nothing is written. ``projector_impl``: the
    form the projector graphs compute (docs/model.md §4.9); parity compares either with the
    faithful reference. ``flavour``: ``"onnx"`` (default) or ``"tensorrt"``, the graphs with TensorRT plugin
    nodes (``HiwinJbuConv`` in the JBU graph, ``HiwinRoiAlign`` in the faithful projector graphs; fp16
    variants too, :mod:`.precision`), ``manifest["flavour"]`` and per graph ``manifest["graphs"][g]["plugins"]``;
    its parity runs on the reference executor (:class:`~hiwin_export.plugin_graphs.ReferenceRunner`) and its
    bundles carry the TensorRT command only. ``genai``: also the language half as an ONNX Runtime GenAI
    directory at this precision (``fp32``, ``fp16``, ``int4``; docs/genai.md) in ``genai/``, recorded in
    ``manifest["language"]["genai"]``: the runtime's default language path for this export.
    """
    if not set(precisions) <= {"fp32", "fp16"} or "fp32" not in precisions:
        raise ValueError(f"precisions must include fp32 and may add fp16, got {precisions}")
    if parity not in (None, "quick", "full"):
        raise ValueError(f"parity must be 'quick', 'full' or None, got {parity!r}")
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r} (known: {', '.join(FLAVOURS)})")
    known = [replace(s, flavour=flavour) for s in graph_specs(projector_impl, flavour) + language_specs(model)]
    specs = [s for s in known if graphs is None or s.name in graphs]
    unknown = sorted(set(graphs or ()) - {s.name for s in known})
    if unknown or not specs:
        raise ValueError(f"unknown graphs {unknown} (known: {[s.name for s in known]})" if unknown
                         else f"no graphs selected (known: {[s.name for s in known]})")
    if genai is not None:
        from .genai import PRECISIONS as GENAI_PRECISIONS

        if genai not in GENAI_PRECISIONS:
            raise ValueError(f"genai must be one of {', '.join(GENAI_PRECISIONS)}, got {genai!r}")
        if not any(s.kind == "language" for s in specs):
            raise ValueError("genai= needs the language graphs (a model with its LLM, no --graphs subset without llm)")
    manifest: dict = {}

    def write(tmp: Path) -> None:
        exported = _export_fp32(model, specs, tmp)
        if "fp16" in precisions:
            exported.update(_export_fp16(exported, tmp))
        manifest["graphs"] = {}
        for gid, (spec, proto) in sorted(exported.items()):
            path = tmp / gid.file
            onnx.checker.check_model(str(path), full_check=True)  # includes strict shape inference
            manifest["graphs"][gid.name] = graph_entry(gid, spec, proto, path)
        manifest["weights"] = {f.name: {"sha256": sha256(f), "bytes": f.stat().st_size}
                               for f in sorted(tmp.glob("*.weights"))}
        manifest.update(manifest_header(model, {g.at('fp32') for g in exported}, flavour))
        if any(s.kind == "language" for s in specs):
            manifest["language"] = language_manifest(model)
            if model.processor is not None:
                tok_dir = tmp / manifest["language"]["tokenizer"]
                model.processor.tokenizer.save_pretrained(str(tok_dir))
                manifest["files"] = {str(p.relative_to(tmp)): sha256(p) for p in sorted(tok_dir.rglob("*"))
                                     if p.is_file()}
            if genai is not None:
                from hiwin_runtime.genai import FACTS, GENAI_SUBDIR

                from .genai import build_genai

                log.info("building the ONNX Runtime GenAI directory (%s) ...", genai)
                build_genai(tmp / GENAI_SUBDIR, model=model, precision=genai)
                manifest["language"]["genai"] = {"dir": GENAI_SUBDIR, "precision": genai}
                # the GenAI directory checks its own files against its facts; the export pins the facts
                manifest.setdefault("files", {})[f"{GENAI_SUBDIR}/{FACTS}"] = sha256(tmp / GENAI_SUBDIR / FACTS)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if bundles:
            from hiwin_model.synthetic import bundle_crops

            from .bundles import BUNDLE_GRIDS, write_bundles

            vision = {gid for gid in exported if gid.is_vision and gid.precision == "fp32"}
            if vision:
                log.info("writing Polygraphy parity bundles ...")
                crops = bundle_crops(BUNDLE_GRIDS, model.config.vision.patch_size)
                plugins = {n: g["plugins"] for n, g in manifest["graphs"].items() if g.get("plugins")}
                manifest["bundles"] = write_bundles(model, tmp, vision, crops, plugins=plugins)
        if parity:
            manifest["parity"] = _run_parity(model, tmp, parity, set(exported), flavour)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))

    atomic_directory(Path(out_dir), write, overwrite=overwrite)
    return manifest


def _export_fp32(model, specs, tmp: Path) -> dict:
    """torch -> ONNX per spec, config in the metadata, weights to the family's shared file."""
    cfg_json = json.dumps(model.config.to_dict(), sort_keys=True)
    out, shared = {}, {}
    try:
        for i, spec in enumerate(specs, 1):
            t0 = time.perf_counter()
            log.info("[%d/%d] exporting %s ...", i, len(specs), spec.graph.file)
            proto = export_graph(spec, model)
            for k, v in (("hiwin_config", cfg_json), ("hiwin_graph", spec.name), ("hiwin_meta", json.dumps(spec.meta))):
                proto.metadata_props.add(key=k, value=v)
            _save(proto, spec.graph, tmp, shared)
            log.info("[%d/%d] %s exported in %.1f s", i, len(specs), spec.graph.file, time.perf_counter() - t0)
            out[spec.graph] = (spec, proto)
    finally:
        for w in shared.values():
            w.close()
    return out


def _export_fp16(fp32: dict, tmp: Path) -> dict:
    """``<name>.fp16.onnx`` of every fp32 graph (:func:`~hiwin_export.precision.fp16_variant`)."""
    out, shared = {}, {}
    try:
        for gid, (spec, _) in fp32.items():
            log.info("fp16 variant of %s ...", gid.file)
            f16 = fp16_variant(onnx.load(str(tmp / gid.file)))  # with its external weights
            _save(f16, gid.at("fp16"), tmp, shared)
            out[gid.at("fp16")] = (spec, f16)
    finally:
        for w in shared.values():
            w.close()
    return out


def _save(proto: onnx.ModelProto, gid: GraphId, tmp: Path, shared: dict) -> None:
    """Graphs of one family and precision share one external weights file."""
    if gid.weights_file not in shared:  # (not setdefault: opening the file truncates it)
        shared[gid.weights_file] = SharedWeights(tmp / gid.weights_file)
    shared[gid.weights_file].externalize(proto)
    onnx.save_model(proto, str(tmp / gid.file))


def _run_parity(model, tmp: Path, level: str, graphs: set[GraphId], flavour: str = "onnx") -> dict:
    from hiwin_model.synthetic import parity_pages
    from hiwin_runtime.buckets import HIWIN_BUCKETS

    from .parity import IMAGE_SIZES, RANDOM_GRIDS, REFERENCE_QUICK_GRIDS, REFERENCE_QUICK_IMAGES, Harness

    executor = "reference" if flavour == "tensorrt" else "onnxruntime"
    log.info("parity (%s, %s) against the PyTorch reference ...", level, executor)
    # The reference executor runs node by node in numpy: its quick check uses small crops (every bucket
    # at its smallest, the 2-patch minimum, odd shapes) and one sliced page.
    small = executor == "reference" and level == "quick"
    grids = REFERENCE_QUICK_GRIDS if small else RANDOM_GRIDS
    pages = REFERENCE_QUICK_IMAGES if small else IMAGE_SIZES if level == "full" else IMAGE_SIZES[1:4]
    summary: dict = {"executor": executor}
    for precision in ("fp32", "fp16"):
        present = {g.at("fp32") for g in graphs if g.precision == precision}
        if not present:
            continue
        # the manifest's weights hash was just taken from this very model: no second pass over the weights
        h = Harness(model, tmp, precision=precision, executor=executor, check_source=False)
        language = sorted(g.family for g in present if not g.is_vision)
        vision = {g for g in present if g.is_vision}
        projector = {GraphId("hiwin")} <= vision or {GraphId("hiwin", b) for b in HIWIN_BUCKETS} <= vision
        full = {GraphId("vit"), GraphId("jbu")} <= vision and projector
        if full:
            h.random_cases(grids)
            h.image_cases(parity_pages(pages))
        else:  # a subset export: per-graph random cases only
            for gid in sorted(vision):
                h.graph_cases(gid, grids)
        if language:
            h.language_cases(language)
        h.write_report(tmp / "reports")
        h.assert_ok()
        summary[precision] = {"level": level if full else "subset", **h.summary()}
    return summary
