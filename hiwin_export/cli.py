"""``hiwin-export``: ONNX export, parity check, runtime and benchmarks.

  hiwin-export export --model DIR --out EXPORT_DIR [--graphs vit,jbu,llm,...] [--overwrite]
  hiwin-export parity --model DIR --export EXPORT_DIR [--report-dir DIR] [--quick] [--precision fp16]
  hiwin-export run --model EXPORT_DIR --image FILE --prompt TEXT     answer (streamed), ONNX Runtime
  hiwin-export bench [--sizes 1008x672 336x336] [--repeats 3] [--e2e tiny real-width]

Without ``--model`` the embedded tiny model is used (no network; ``run`` exports it to a temporary
directory first). ``parity`` exits 1 when a bound is exceeded and writes ``parity.json`` +
``parity.md`` (default: into the export directory's ``reports/``).
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
    from hiwin_model.tiny import write_tiny_checkpoint

    log.info("no --model: using the embedded tiny model (random weights)")
    with tempfile.TemporaryDirectory(prefix="hiwin-tiny-") as tmp:
        return HiwinForCausalLM.from_pretrained(write_tiny_checkpoint(Path(tmp) / "tiny"))


def cmd_export(a) -> int:
    from .export import export_model

    graphs = a.graphs.split(",") if a.graphs else None
    mf = export_model(_model(a.model), a.out, overwrite=a.overwrite, graphs=graphs, bundles=not a.no_bundles,
                       parity=None if a.parity == "none" else a.parity,
                       precisions=("fp32",) if a.no_fp16 else ("fp32", "fp16"), projector_impl=a.projector_impl)
    print(f"{a.out}: {len(mf['graphs'])} graphs ({', '.join(sorted(mf['graphs']))}), opset {mf['opset']}")
    return 0


def cmd_run(a) -> int:
    from hiwin_runtime.cli import run

    if a.model is not None:
        return run(a, a.model, a.image or _demo_image())
    from .export import export_model

    with tempfile.TemporaryDirectory(prefix="hiwin-run-") as tmp:
        log.info("no --model: exporting the embedded tiny model (random weights; the answer is noise) ...")
        path = str(Path(tmp) / "export")
        export_model(_model(None), path, bundles=False, parity="quick", precisions=("fp32",))
        return run(a, path, a.image or _demo_image())


def _demo_image():
    from hiwin_model.synthetic import demo_image

    return demo_image()


def cmd_parity(a) -> int:
    from .parity import IMAGE_SIZES, RANDOM_GRIDS, Harness, ParityError

    h = Harness(_model(a.model), a.export, precision=a.precision)
    grids = RANDOM_GRIDS[:4] if a.quick else RANDOM_GRIDS
    h.random_cases(grids)
    language = [g for g in ("embed", "llm") if g in h.export.graphs]
    if language:
        h.language_cases(language)
    if not a.quick or a.images:
        from hiwin_model.synthetic import parity_pages

        h.image_cases(a.images or parity_pages(IMAGE_SIZES[:3] if a.quick else IMAGE_SIZES))
    jp, mp = h.write_report(a.report_dir or Path(a.export) / "reports")
    print(h.markdown())
    print(f"reports: {jp}, {mp}")
    try:
        h.assert_ok()
    except ParityError as e:
        print(f"hiwin-export: parity FAILED: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_bench(a) -> int:
    from .bench import report

    report(a)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hiwin-export", description="LLaVA-UHD v2 ONNX export and parity")
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="export vit / jbu / hiwin_* graphs (fp32) with a manifest")
    e.add_argument("--model", help="HF model directory (default: embedded tiny model)")
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
    e.set_defaults(func=cmd_export)
    p = sub.add_parser("parity", help="compare the graphs with the PyTorch reference (ONNX Runtime)")
    p.add_argument("--model", help="the HF model directory the graphs were exported from")
    p.add_argument("--export", required=True)
    p.add_argument("--report-dir")
    p.add_argument("--images", nargs="*", help="image files for the real-image cases")
    p.add_argument("--quick", action="store_true", help="fewer shapes (smoke test)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    p.set_defaults(func=cmd_parity)
    r = sub.add_parser("run", help="answer a question about an image from an export directory (streamed)")
    from hiwin_runtime.cli import add_run_args

    add_run_args(r, model_required=False)  # default: the embedded tiny model, exported on the fly
    r.set_defaults(func=cmd_run)
    from .bench import add_args

    b = sub.add_parser("bench", help="vision path at real dims: PyTorch eager vs ONNX Runtime, FLOP floor, peak RSS")
    add_args(b)
    b.set_defaults(func=cmd_bench)
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
