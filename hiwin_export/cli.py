"""``hiwin-export``: ONNX export, parity check, runtime and benchmarks.

  hiwin-export export --model DIR --out EXPORT_DIR [--graphs vit,jbu,llm,...] [--overwrite]
  hiwin-export parity --model DIR --export EXPORT_DIR [--report-dir DIR] [--quick] [--precision fp16]
  hiwin-export run --model EXPORT_DIR --image FILE --prompt TEXT     answer (streamed), ONNX Runtime
  hiwin-export eval [--model DIR|EXPORT_DIR] [--reference DIR] [--backend torch,onnx,genai]
               [--precision fp32,fp16,int8] [--limit N] [--out eval.json]   demo-task accuracy (docs/demo.md)
  hiwin-export bench [--sizes 1008x672 336x336] [--repeats 3] [--e2e tiny real-width]
  hiwin-export engines --export EXPORT_DIR --out ENGINE_DIR --target a100|h100|orin [--precision fp16|int8trt|fp8trt]
               [--plugin-lib libhiwin_plugins.so] [--emit-trtexec [SCRIPT]]     TensorRT engine set (docs/tensorrt.md)
  hiwin-export verify-engines --export EXPORT_DIR --engines ENGINE_DIR [--mode runner|polygraphy]
  hiwin-export llama-dir --model DIR --out LLAMA_DIR      the LLM as a plain HF Llama directory
  hiwin-export genai --model DIR|--llama LLAMA_DIR --out GENAI_DIR [--precision fp32|fp16|int4]
               [--export EXPORT_DIR]      ONNX Runtime GenAI model of the LLM (docs/genai.md)
  hiwin-export trtllm --model DIR|--llama LLAMA_DIR --out DIR [--precision fp16|fp8|int4_awq]
               [--export EXPORT_DIR]      TensorRT-LLM checkpoint of the LLM (docs/trtllm.md)

Without ``--model`` the embedded demo model is used (trained on a generated task, docs/demo.md; no
network; ``run`` exports it to a temporary directory first and, without ``--image`` and ``--prompt``,
answers a held-out demo question, printing the question, the answer and the expected answer).
``parity`` exits 1 when a bound is exceeded and writes ``parity.json`` + ``parity.md`` (default: into
the export directory's ``reports/``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("hiwin_export")


def _model(path: str | None):
    from hiwin_model.model import HiwinForCausalLM

    if path:
        return HiwinForCausalLM.from_pretrained(path)
    from hiwin_model.demo_task import demo_model_dir

    log.info("no --model: using the embedded demo model (docs/demo.md)")
    return HiwinForCausalLM.from_pretrained(demo_model_dir())


def cmd_export(a) -> int:
    from .export import export_model

    graphs = a.graphs.split(",") if a.graphs else None
    model = _model(a.model)
    genai = a.genai
    if genai is None:  # default: the GenAI directory (fp32) whenever the LLM is exported
        genai = "fp32" if getattr(model, "llm", None) is not None and (graphs is None or "llm" in graphs) else "none"
    mf = export_model(model, a.out, overwrite=a.overwrite, graphs=graphs, bundles=not a.no_bundles,
                       parity=None if a.parity == "none" else a.parity,
                       precisions=("fp32",) if a.no_fp16 else ("fp32", "fp16"), projector_impl=a.projector_impl,
                       flavour=a.flavour, genai=None if genai == "none" else genai)
    own = mf.get("language", {}).get("genai")
    print(f"{a.out}: {len(mf['graphs'])} graphs ({', '.join(sorted(mf['graphs']))}), opset {mf['opset']}, "
          f"flavour {mf['flavour']}" + (f"; ONNX Runtime GenAI directory {own['dir']}/ ({own['precision']})"
                                        if own else ""))
    return 0


def cmd_run(a) -> int:
    image, expected = a.image, None
    if image is None and a.prompt is None:  # the main job: a held-out demo question, answer checked
        image, a.prompt, expected = _demo_question()
    elif image is None:
        image = _demo_question()[0]
    if a.model is not None:
        return _run_checked(a, a.model, image, expected)
    from .export import export_model

    with tempfile.TemporaryDirectory(prefix="hiwin-run-") as tmp:
        log.info("no --model: exporting the embedded demo model (docs/demo.md) ...")
        path = str(Path(tmp) / "export")
        export_model(_model(None), path, bundles=False, parity="quick", precisions=("fp32",), genai="fp32")
        return _run_checked(a, path, image, expected)


def _run_checked(a, path: str, image, expected: str | None) -> int:
    """``run``, with the question before the answer and, for the demo question, the expected answer."""
    from hiwin_runtime.cli import run

    prompt = a.prompt or "What is in the image?"
    sys.stdout.write(f"question: {prompt}\nanswer: ")
    answer: list[str] = []
    rc = run(a, path, image, on_answer=answer.append)
    if expected is not None:
        got = answer[0] if answer else ""
        sys.stdout.write(f"expected: {expected} ({'correct' if got == expected else 'WRONG'})\n")
    return rc


def _demo_question():
    from hiwin_model.demo_task import demo_question

    return demo_question()


def cmd_eval(a) -> int:
    from .evaluate import evaluate, table

    report = evaluate(a.model, reference=a.reference, genai=a.genai,
                      backends=a.backend.split(",") if a.backend else None,
                      precisions=a.precision.split(",") if a.precision else None, limit=a.limit, out=a.out)
    print(f"held-out demo questions: {report['questions']} (seed {report['heldout_seed']}, "
          f"sha256 {report['questions_sha256'][:12]})")
    print(table(report))
    if a.out:
        print(f"wrote {a.out}")
    return 0


def cmd_parity(a) -> int:
    from .parity import IMAGE_SIZES, QUANTIZED, RANDOM_GRIDS, Harness, ParityError

    try:
        h = Harness(_model(a.model), a.export, precision=a.precision)
    except ParityError as e:  # another checkpoint than the export's: refused before anything runs
        print(f"hiwin-export: parity: {e}", file=sys.stderr)
        return 2
    extra = {}
    if a.precision in QUANTIZED:
        # quantised graphs: real images only (random inputs are outside any calibration), the held-out split
        # of the calibration recipe (or of --data DIR) unless --images, then greedy tokens through the LLM
        from hiwin_runtime.image import load_image

        from .calibration import load_recipe, select_images

        if a.images:
            images = [load_image(p) for p in a.images]
            extra["images"] = list(a.images)
        else:
            recipe = load_recipe(a.recipe)
            specs = select_images("held_out", data=a.data, recipe=recipe)
            specs = specs[:3] if a.quick else specs
            images = [sp.load() for sp in specs]
            extra["images"] = [sp.name for sp in specs]
            extra["split"] = "held_out"
        if not images:
            print("hiwin-export: parity: no held-out images", file=sys.stderr)
            return 2
        h.image_cases(images)
        if "language" in h.export.manifest and a.tokens > 0:
            h.token_agreement(images, max_new_tokens=a.tokens)
        extra["provenance"] = {g: e.get("provenance") for g, e in h.export.graphs.items()
                               if e.get("precision") == a.precision}
    else:
        grids = RANDOM_GRIDS[:4] if a.quick else RANDOM_GRIDS
        h.random_cases(grids)
        language = [g for g in ("embed", "llm") if g in h.export.graphs]
        if language:
            h.language_cases(language)
        if not a.quick or a.images:
            from hiwin_model.synthetic import parity_pages

            h.image_cases(a.images or parity_pages(IMAGE_SIZES[:3] if a.quick else IMAGE_SIZES))
    if a.report_json or a.report_md:
        out_dir = a.report_dir or Path(a.export) / "reports"
        jp, mp = h.write_report(out_dir, json_path=a.report_json, md_path=a.report_md, extra=extra)
    else:
        jp, mp = h.write_report(a.report_dir or Path(a.export) / "reports", extra=extra)
    print(h.markdown())
    print(f"reports: {jp}, {mp}")
    try:
        h.assert_ok()
    except ParityError as e:
        print(f"hiwin-export: parity FAILED: {e}", file=sys.stderr)
        return 1
    return 0


# Default calibration pages of `quantize --images` when neither --calibration nor --data is given: the recipe
# (hiwin_export.calibration.DEFAULT_RECIPE). Kept for the README's Python example: aspect ratios 1:3 ... 3:1,
# none of them a parity page size.
CALIBRATION_SIZES = ((1000, 660), (800, 600), (660, 1000), (600, 800), (1200, 400), (400, 1200), (700, 700))


def cmd_calibrate(a) -> int:
    from .calibration import build_calibration, load_recipe

    idx = build_calibration(a.export, a.out, data=a.data, recipe=load_recipe(a.recipe),
                            families=tuple(a.families.split(",")), max_slices=a.max_slices, overwrite=a.overwrite)
    for f, g in idx["graphs"].items():
        print(f"{a.out}/{g['file']}: {g['samples']} samples from {len(idx['images'])} images, "
              f"content sha256 {g['content_sha256'][:12]}")
    return 0


def cmd_quantize(a) -> int:
    from .calibration import build_calibration, load_recipe
    from .quantize import quantize

    families = tuple(a.families.split(","))
    with tempfile.TemporaryDirectory(prefix="hiwin-calib-") as tmp:
        calib = a.calibration
        if calib is None:  # calibrate now (the recipe's calibration split, or --data / --images), then quantise
            from PIL import Image

            calib = str(Path(tmp) / "calibration")
            images = [Image.open(p) for p in a.images] if a.images else None
            build_calibration(a.export, calib, data=a.data, recipe=load_recipe(a.recipe), images=images,
                              families=families, max_slices=a.max_slices)
        entries = quantize(a.export, calib, backend=a.backend, mode=a.mode, method=a.method, families=families)
    for name, e in sorted(entries.items()):
        p = e["provenance"]
        print(f"{a.export}/{e['file']}: {p['qdq_pairs']} Q/DQ pairs, {p['calibration_samples']} calibration samples, "
              f"sha256 {p['calibration_sha256'][:12]} ({p['method']})")
    return 0


def cmd_fp16_compare(a) -> int:
    import json

    from .calibration import build_calibration, held_out_images, load_recipe
    from .fp16_compare import compare, markdown

    families = tuple(a.families.split(","))
    recipe = load_recipe(a.recipe)
    with tempfile.TemporaryDirectory(prefix="hiwin-calib-") as tmp:
        calib = a.calibration
        if calib is None:
            calib = str(Path(tmp) / "calibration")
            build_calibration(a.export, calib, recipe=recipe, families=families)
        result = compare(_model(a.model), a.export, calib, held_out_images(recipe=recipe), families=families)
        print(markdown(result))
        if a.apply:
            from .fp16_compare import apply_autocast

            for name in apply_autocast(a.export, calib, tuple(a.apply.split(","))):
                print(f"{a.export}: {name} is now ModelOpt AutoCast's conversion (check: hiwin-export parity "
                      "--precision fp16)")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


def cmd_bench_quant(a) -> int:
    from .quant_bench import report

    report(a)
    return 0


def cmd_bench(a) -> int:
    from .bench import report

    report(a)
    return 0


def cmd_engines(a) -> int:
    from hiwin_runtime.trt import TrtUnavailable

    from .engines import BuildError, EngineOptions, build_engines, emit_trtexec, index_engines

    try:
        opts = EngineOptions(target=a.target, precision=a.precision, plugin_lib=a.plugin_lib,
                             workspace_gib=a.workspace_gib, opt_level=a.opt_level, timing_cache=a.timing_cache,
                             num_profiles=a.num_profiles, max_slices=a.max_slices, vision_batch=a.vision_batch,
                             upsample_batch=a.upsample_batch, serialize_plugins=a.serialize_plugins,
                             trt_major=a.trt_major)
    except ValueError as e:  # an option that cannot work (e.g. fp8trt for a target without FP8 tensor cores)
        print(f"hiwin-export: engines: {e}", file=sys.stderr)
        return 2
    if a.emit_trtexec is not None:
        script = a.emit_trtexec or f"{a.out}.{a.target}.trtexec.sh"
        text = emit_trtexec(a.export, a.out, opts, script)
        n = sum(line.startswith("trtexec ") for line in text.splitlines())
        print(f"{script}: {n} trtexec builds for {a.target} (run it on the target)")
        return 0
    try:
        info = (index_engines(a.export, a.out, opts) if a.index
                else build_engines(a.export, a.out, opts, overwrite=a.overwrite))
    except (BuildError, TrtUnavailable) as e:
        print(f"hiwin-export: engines: {e}", file=sys.stderr)
        return 2
    e = info["engines"]
    print(f"{a.out}: {len(e)} engines ({', '.join(sorted(e))}) for {info['gpu']['name']} "
          f"(sm_{''.join(map(str, info['gpu']['compute_capability']))}), TensorRT {info['tensorrt']['version']}")
    return 0


def cmd_verify_engines(a) -> int:
    import json

    from hiwin_runtime.trt import TrtUnavailable

    from .engines import verify_engines

    try:
        results = verify_engines(a.export, a.engines, mode=a.mode, plugin_lib=a.plugin_lib)
    except TrtUnavailable as e:
        print(f"hiwin-export: verify-engines: {e}", file=sys.stderr)
        return 2
    for r in results:
        print(r.line())
    counts = {k: sum(r.passed is v for r in results) for k, v in (("passed", True), ("failed", False),
                                                                    ("skipped", None))}
    print(f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
    if a.json:
        Path(a.json).write_text(json.dumps([r.__dict__ for r in results], indent=1))
    return 1 if counts["failed"] else 0


def cmd_llama_dir(a) -> int:
    from .llama_dir import write_llama_dir

    out = write_llama_dir(_model(a.model), a.out, overwrite=a.overwrite)
    print(f"{out}: Llama directory ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0


def _llm_source(a, name: str) -> tuple[bool, dict | None]:
    """Shared checks of ``genai`` / ``trtllm``: ``--model`` and ``--llama`` exclusive; the language
    manifest of ``--export`` (None without it). ``(False, None)`` after printing the error."""
    if a.model and a.llama:
        print(f"hiwin-export: {name}: give --model or --llama, not both", file=sys.stderr)
        return False, None
    if not a.export:
        return True, None
    from hiwin_runtime.manifest import ExportDir

    language = ExportDir(a.export, verify=False).manifest.get("language")
    if language is None:
        print(f"hiwin-export: {name}: {a.export} has no language model", file=sys.stderr)
        return False, None
    return True, language


def cmd_genai(a) -> int:
    from .genai import GenAIBuildError, build_genai

    ok, language = _llm_source(a, "genai")
    if not ok:
        return 2
    try:
        facts = build_genai(a.out, model=None if a.llama else _model(a.model), llama_dir=a.llama,
                            precision=a.precision, overwrite=a.overwrite, int4_block_size=a.int4_block_size)
    except (GenAIBuildError, ValueError) as e:
        print(f"hiwin-export: genai: {e}", file=sys.stderr)
        return 2
    if language is not None:
        from hiwin_runtime.genai import GenAIDir

        GenAIDir(a.out).check_matches(language, a.export)
    print(f"{a.out}: ONNX Runtime GenAI model ({facts['precision']}, onnxruntime-genai {facts['genai_version']}; "
          f"{len(facts['files'])} files)")
    return 0


def cmd_trtllm(a) -> int:
    from .trtllm import TrtLlmExportError, build_trtllm

    ok, language = _llm_source(a, "trtllm")
    if not ok:
        return 2
    images = None
    if a.images:
        from hiwin_runtime.image import load_image

        images = [load_image(f) for f in a.images]
    try:
        facts = build_trtllm(a.out, model=None if a.llama else _model(a.model), llama_dir=a.llama,
                             precision=a.precision, images=images, device=a.device, overwrite=a.overwrite,
                             check=not a.no_check)
    except TrtLlmExportError as e:
        print(f"hiwin-export: trtllm: {e}", file=sys.stderr)
        return 2
    if language is not None:
        from hiwin_runtime.trtllm import TrtLlmDir

        TrtLlmDir(a.out).check_matches(language, a.export)
    r = facts["recipe"]
    check = f"; logits cosine vs source >= {r['check']['cosine_min']:.5f}" if "check" in r else ""
    print(f"{a.out}: TensorRT-LLM checkpoint ({facts['precision']}"
          f"{', ' + r['quant_algo'] if 'quant_algo' in r else ''}; {len(facts['files'])} files{check})")
    return 0


def _add_engine_args(g: argparse.ArgumentParser) -> None:
    g.add_argument("--export", required=True, help="export directory (hiwin-export export)")
    g.add_argument("--out", required=True, help="engine set directory to write")
    g.add_argument("--target", required=True, choices=["a100", "h100", "orin"])
    g.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8trt", "fp8trt"],
                   help="which exported graphs; int8trt / fp8trt: ModelOpt Q/DQ graphs (hiwin-export quantize "
                   "--backend modelopt), fp8trt on h100 only")
    g.add_argument("--plugin-lib", help="libhiwin_plugins.so (needed for tensorrt-flavour exports)")
    g.add_argument("--workspace-gib", type=float, help="builder workspace limit (default: 8 on a100/h100, 2 on orin)")
    g.add_argument("--opt-level", type=int, default=3, help="builder optimisation level 0-5 (default 3)")
    g.add_argument("--timing-cache", help="timing cache file, read if present and updated")
    g.add_argument("--num-profiles", type=int, default=9, help="optimisation profiles per engine (default 9)")
    g.add_argument("--max-slices", type=int, default=9, help="slicer's max_slices (ViT batch up to this + 1)")
    g.add_argument("--vision-batch", type=int, help="ViT profile batch maximum (default max-slices + 1)")
    g.add_argument("--upsample-batch", type=int, default=1, help="JBU / projector profile batch maximum (default 1)")
    g.add_argument("--serialize-plugins", action="store_true", help="embed the plugin library in the engines")
    g.add_argument("--trt-major", type=int, choices=[10, 11], help="TensorRT major of the emitted script "
                   "(default: 10; Jetson Orin has 10.3)")
    g.add_argument("--emit-trtexec", nargs="?", const="", default=None, metavar="SCRIPT",
                   help="write the trtexec + CMake script for the target instead of building (no TensorRT needed)")
    g.add_argument("--index", action="store_true", help="only write engines.json for engines the script built")
    g.add_argument("--overwrite", action="store_true", help="replace an existing engine set")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hiwin-export", description="LLaVA-UHD v2 ONNX export and parity")
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="export vit / jbu / hiwin_* graphs (fp32) with a manifest")
    e.add_argument("--model", help="HF model directory (default: embedded demo model)")
    e.add_argument("--out", required=True)
    e.add_argument("--graphs", help="comma-separated subset, e.g. vit,jbu,hiwin_3x3")
    e.add_argument("--overwrite", action="store_true", help="replace an existing export directory")
    e.add_argument("--parity", default="quick", choices=["quick", "full", "none"],
                   help="check the graphs before the directory is put in place (default: quick)")
    e.add_argument("--no-bundles", action="store_true", help="skip the Polygraphy parity bundles")
    e.add_argument("--no-fp16", action="store_true", help="skip the fp16 (strongly typed) variants")
    e.add_argument("--projector-impl", default="fast", choices=["fast", "faithful"],
                   help="projector graphs: fast (separable RoI MatMuls, keys absorbed; default) or faithful "
                        "(ONNX RoiAlign, the released order of operations)")
    e.add_argument("--genai", default=None, choices=["fp32", "fp16", "int4", "none"],
                   help="also the language half as an ONNX Runtime GenAI directory (genai/, docs/genai.md) at this "
                        "precision: the runtime's default language path for the export. Default fp32 whenever "
                        "the LLM is exported; none: only the export's own llm graph (hiwin's loop)")
    e.add_argument("--flavour", default="onnx", choices=["onnx", "tensorrt"],
                   help="onnx: standard ONNX (ONNX Runtime, TensorRT; default); tensorrt: the JBU layers as "
                        "HiwinJbuConv and RoiAlign as HiwinRoiAlign TensorRT plugin nodes (engines/plugins; parity on "
                        "the ONNX reference evaluator, ONNX Runtime cannot run them)")
    e.set_defaults(func=cmd_export)
    p = sub.add_parser("parity", help="compare the graphs with the PyTorch reference (ONNX Runtime)")
    p.add_argument("--model", help="the HF model directory the graphs were exported from")
    p.add_argument("--export", required=True)
    p.add_argument("--report-dir")
    p.add_argument("--images", nargs="*", help="image files for the real-image cases")
    p.add_argument("--quick", action="store_true", help="fewer shapes (smoke test)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8", "int8trt", "fp8trt"],
                   help="int8 / int8trt / fp8trt (hiwin-export quantize): the vision graphs on the held-out images "
                        "of the calibration recipe (or --data / --images), and greedy tokens through the fp32 LLM")
    p.add_argument("--data", help="quantised precisions: image folder whose held-out split is checked")
    p.add_argument("--recipe", help="quantised precisions: calibration recipe JSON (default: calibration/recipe.json's)")
    p.add_argument("--tokens", type=int, default=16, help="quantised precisions: greedy tokens compared (0: none)")
    p.add_argument("--report-json", help="write the JSON report here (default: REPORT_DIR/parity.<precision>.json)")
    p.add_argument("--report-md", help="write the Markdown report here")
    p.set_defaults(func=cmd_parity)
    c = sub.add_parser("calibrate", help="calibration tensors for the quantised vision graphs (calibration/README.md)")
    c.add_argument("--export", required=True, help="export directory with the fp32 vit, jbu and hiwin graphs")
    c.add_argument("--out", required=True, help="calibration directory to write")
    c.add_argument("--data", help="image folder (split by a hash of each file; default: the recipe's sets)")
    c.add_argument("--recipe", help="recipe JSON (default: the built-in one, calibration/recipe.json)")
    c.add_argument("--families", default="vit,jbu,hiwin")
    c.add_argument("--max-slices", type=int, default=None, help="default: the recipe's (9)")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=cmd_calibrate)
    q = sub.add_parser("quantize", help="add quantised vision graphs: int8 for ONNX Runtime (ort), int8 / fp8 Q/DQ "
                                        "for TensorRT (modelopt)")
    q.add_argument("--export", required=True, help="export directory with the fp32 vit, jbu and hiwin graphs")
    q.add_argument("--backend", default="ort", choices=["ort", "modelopt"],
                   help="ort: int8 graphs for ONNX Runtime's CPU kernels (default); modelopt: Q/DQ for TensorRT")
    q.add_argument("--mode", default="int8", choices=["int8", "fp8"], help="fp8: modelopt only (H100)")
    q.add_argument("--method", help="modelopt calibration method (int8: max or entropy; default max)")
    q.add_argument("--calibration", help="calibration directory (hiwin-export calibrate); default: calibrate now")
    q.add_argument("--data", help="image folder to calibrate on now (default: the recipe's calibration split)")
    q.add_argument("--recipe", help="recipe JSON (default: the built-in one)")
    q.add_argument("--images", nargs="*", help="calibration image files instead of a folder or the recipe")
    q.add_argument("--families", default="vit,jbu,hiwin", help="graphs to quantize (default: vit,jbu,hiwin)")
    q.add_argument("--max-slices", type=int, default=None)
    q.set_defaults(func=cmd_quantize)
    f = sub.add_parser("fp16-compare", help="our fp16 pass vs ModelOpt AutoCast on the same parity sweep")
    f.add_argument("--export", required=True, help="export directory with the fp32 and fp16 vision graphs")
    f.add_argument("--model", help="the HF model directory the graphs were exported from")
    f.add_argument("--calibration", help="calibration directory (AutoCast's real inputs; default: calibrate now)")
    f.add_argument("--recipe", help="recipe JSON (default: the built-in one)")
    f.add_argument("--families", default="vit,jbu,hiwin")
    f.add_argument("--json", help="also write the comparison as JSON")
    f.add_argument("--apply", help="then replace these fp16 graphs by AutoCast's (e.g. jbu: where it measured at "
                                   "least as good; docs/quantization.md)")
    f.set_defaults(func=cmd_fp16_compare)
    r = sub.add_parser("run", help="answer a question about an image from an export directory (streamed)")
    from hiwin_runtime.cli import add_run_args

    add_run_args(r, model_required=False)  # default: the embedded demo model, exported on the fly
    r.set_defaults(func=cmd_run)
    from .bench import add_args

    ev = sub.add_parser("eval", help="exact-answer accuracy on the demo task's held-out set, per backend and precision")
    ev.add_argument("--model", help="HF model directory (PyTorch) or export directory (ONNX Runtime, every "
                    "precision it holds); default: the embedded demo model on PyTorch")
    ev.add_argument("--reference", help="also score this HF model directory on PyTorch (the export's source)")
    ev.add_argument("--genai", help="with an export: also score the LLM on this ONNX Runtime GenAI directory")
    ev.add_argument("--backend", help="comma-separated subset of torch,onnx,genai")
    ev.add_argument("--precision", help="comma-separated subset of fp32,fp16,int8")
    ev.add_argument("--limit", type=int, default=None, help="first N held-out questions (default: all 400)")
    ev.add_argument("--out", default="eval.json", help="JSON report (default: eval.json)")
    ev.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="vision path at real dims: PyTorch eager vs ONNX Runtime, FLOP floor, peak RSS")
    add_args(b)
    b.set_defaults(func=cmd_bench)
    from .quant_bench import add_args as add_quant_args

    bq = sub.add_parser("bench-quant", help="ONNX Runtime int8 vs fp32 vision graphs, calibration time and peak RSS")
    add_quant_args(bq)
    bq.set_defaults(func=cmd_bench_quant)
    g = sub.add_parser("engines", help="TensorRT engine set of an export (or the trtexec script that builds it)")
    _add_engine_args(g)
    g.set_defaults(func=cmd_engines)
    v = sub.add_parser("verify-engines", help="run the export's Polygraphy parity bundles on an engine set")
    v.add_argument("--export", required=True)
    v.add_argument("--engines", required=True)
    v.add_argument("--mode", default="runner", choices=["runner", "polygraphy"],
                   help="runner: through the runtime's TensorRT backend; polygraphy: polygraphy run --trt per engine")
    v.add_argument("--plugin-lib", help="plugin library, when not the copy inside the engine set")
    v.add_argument("--json", help="write the results as JSON")
    v.set_defaults(func=cmd_verify_engines)
    ld = sub.add_parser("llama-dir", help="the LLM as a plain Hugging Face Llama directory")
    ld.add_argument("--model", help="HF model directory (default: embedded demo model)")
    ld.add_argument("--out", required=True)
    ld.add_argument("--overwrite", action="store_true")
    ld.set_defaults(func=cmd_llama_dir)
    ga = sub.add_parser("genai", help="the LLM as an ONNX Runtime GenAI model directory (docs/genai.md)")
    ga.add_argument("--model", help="HF model directory (default: embedded demo model)")
    ga.add_argument("--llama", help="a Llama directory from `hiwin-export llama-dir` instead of --model")
    ga.add_argument("--export", help="export directory the GenAI model will serve with (checked to match)")
    ga.add_argument("--out", required=True)
    ga.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int4"])
    ga.add_argument("--int4-block-size", type=int, choices=[16, 32, 64, 128, 256],
                    help="int4: MatMulNBits block size (default: the builder's 32; 128 decodes faster on CPU, "
                         "docs/genai.md)")
    ga.add_argument("--overwrite", action="store_true")
    ga.set_defaults(func=cmd_genai)
    tl = sub.add_parser("trtllm", help="the LLM as a TensorRT-LLM checkpoint, fp16 / fp8 / int4-AWQ (docs/trtllm.md)")
    tl.add_argument("--model", help="HF model directory (default: embedded tiny model)")
    tl.add_argument("--llama", help="a Llama directory from `hiwin-export llama-dir` instead of --model "
                                    "(calibration is then text-only)")
    tl.add_argument("--export", help="export directory the checkpoint will serve with (checked to match)")
    tl.add_argument("--out", required=True)
    tl.add_argument("--precision", default="fp16", choices=["fp16", "fp8", "int4_awq"])
    tl.add_argument("--images", nargs="*", help="calibration images (default: synthetic pages of 4 aspect ratios)")
    tl.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where ModelOpt calibrates (cpu: fp32, ~4 bytes of RAM per parameter)")
    tl.add_argument("--no-check", action="store_true",
                    help="skip the logits check of the written checkpoint against the source")
    tl.add_argument("--overwrite", action="store_true")
    tl.set_defaults(func=cmd_trtllm)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # onnxscript/onnx_ir log every folded constant; the fp16 converter dumps whole nodes at INFO
    for name in ("onnxscript", "onnx_ir", "onnxruntime.transformers.float16"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from hiwin_model.checkpoint import CheckpointError
    from hiwin_runtime.cli import user_errors

    from .parity import ParityError

    try:
        return a.func(a)
    except ParityError as e:
        print(f"hiwin-export: parity FAILED (nothing written; --parity none keeps the graphs): {e}",
              file=sys.stderr)
        return 1
    except (CheckpointError, *user_errors()) as e:
        print(f"hiwin-export: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
