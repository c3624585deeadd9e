"""``hiwin-export bench-quant``: ONNX Runtime int8 vs fp32 vision graphs (CPU), and what calibration costs.

One run, ratios side by side: the vision graphs at real dimensions with seeded random weights (or
``--export DIR``), calibrated with the recipe (``--calib-images N``: its first N calibration images)
and quantised with ``--backend ort`` in a child process whose peak RSS and wall time are reported
(progress on stderr), then fp32 and int8 timed in one child process each on generated pages (median of
``--repeats`` after a warm-up run): per graph and for the whole vision path, int8 / fp32.

Goals (docs/quantization.md): int8 ViT >= 1.4x faster than fp32, whole path >= 1.25x; calibration of
the real-dims graphs within 16 GiB RSS.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("hiwin_export")
GRAPHS = ("vit", "jbu", "hiwin")


def time_worker(export_dir: str, precision: str, sizes, repeats: int, max_slices: int, threads: int | None) -> dict:
    from hiwin_runtime.bench import peak_rss_mib, timed_stages
    from hiwin_runtime.crop_chain import BatchPolicy, CropChain
    from hiwin_runtime.manifest import ExportDir
    from hiwin_runtime.ort import OnnxRunner

    from .bench import bench_crops

    export = ExportDir(export_dir)
    stages = OnnxRunner(export, threads=threads).vision_stages(precision)
    out: dict = {"precision": precision, "images": {}}
    for w, h in sizes:
        crops = bench_crops(w, h, max_slices)
        runs = []
        for r in range(repeats + 1):  # run 0 warms up (session creation, allocations)
            times: dict = {}
            chain = CropChain(timed_stages(stages, times), patch_size=export.manifest["shape_ranges"]["patch_size"],
                              policy=BatchPolicy(None, 1), bucket_for=export.bucket_for)
            chain.encode_crops(crops)
            if r:
                runs.append(times)
        out["images"][f"{w}x{h}"] = {"crops": len(crops), **{g: statistics.median(t[g] for t in runs) for g in GRAPHS}}
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def calib_worker(export_dir: str, calib_images: int | None, max_slices: int) -> dict:
    """Calibrate (recipe) + quantise (ort int8) in this process: seconds and peak RSS."""
    from hiwin_runtime.bench import peak_rss_mib

    from .calibration import build_calibration, load_recipe, recipe_images
    from .quantize import quantize

    recipe = load_recipe()
    images = None
    if calib_images:
        images = [s.load() for s in recipe_images(recipe, "calibration")[:calib_images]]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hiwin-calib-") as tmp:
        idx = build_calibration(export_dir, Path(tmp) / "c", recipe=recipe, images=images, max_slices=max_slices)
        t1 = time.perf_counter()
        quantize(export_dir, Path(tmp) / "c", backend="ort", mode="int8")
        disk = sum(f.stat().st_size for f in (Path(tmp) / "c").iterdir())
    return {"images": len(idx["images"]), "samples": idx["graphs"]["vit"]["samples"], "calibrate_s": t1 - t0,
            "quantize_s": time.perf_counter() - t1, "peak_rss_mib": peak_rss_mib(), "calibration_mib": disk / 2**20}


def _child(args: list[str], show_progress: bool = False) -> dict:
    cmd = [sys.executable, "-m", "hiwin_export.quant_bench", *args]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if show_progress else subprocess.PIPE, text=True,
                       env=dict(os.environ))
    if r.returncode:
        raise RuntimeError(f"{' '.join(args[:2])} failed:\n{(r.stderr or '')[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(a):
    from hiwin_runtime.bench import Report

    with tempfile.TemporaryDirectory(prefix="hiwin-bench-quant-") as tmp:
        export_dir = a.export
        if export_dir is None:
            from .bench import _config, vision_model
            from .export import export_model

            log.info("exporting the %s vision graphs (fp32, random weights) ...", "tiny" if a.tiny else "real-size")
            export_dir = str(Path(tmp) / "graphs")
            export_model(vision_model(_config(a.tiny)), export_dir, bundles=False, parity=None, precisions=("fp32",))
        calib = None
        if not a.no_quantize:
            log.info("calibrating + quantising (child process; progress below) ...")
            calib = _child(["--calib-worker", export_dir, "--max-slices", str(a.max_slices),
                            *(["--calib-images", str(a.calib_images)] if a.calib_images else [])], show_progress=True)
        res = {}
        for p in ("fp32", "int8"):
            log.info("timing %s ...", p)
            res[p] = _child(["--time-worker", export_dir, "--precision", p, "--repeats", str(a.repeats),
                             "--max-slices", str(a.max_slices), "--sizes", *a.sizes,
                             *(["--threads", str(a.threads)] if a.threads else [])])
    rep = Report(f"ONNX Runtime CPU, {'tiny' if a.tiny else 'real'} dimensions, random weights: int8 (QDQ) vs fp32 "
                 f"vision graphs; median of {a.repeats}; threads {a.threads or 'ORT default'}",
                 [("image", "image"), ("stage", "stage"), ("fp32_s", "fp32 s"), ("int8_s", "int8 s"),
                  ("speedup", "fp32/int8")], meta={"calibration": calib, "repeats": a.repeats,
                                                   "peak_rss_mib": {p: res[p]["peak_rss_mib"] for p in res}})
    for img, f in res["fp32"]["images"].items():
        q = res["int8"]["images"][img]
        label = f"{img} ({f['crops']} crops)"
        for g in GRAPHS:
            rep.add(image=label, stage=g, fp32_s=f[g], int8_s=q[g], speedup=f[g] / q[g])
        tf, tq = sum(f[g] for g in GRAPHS), sum(q[g] for g in GRAPHS)
        rep.add(image=label, stage="**whole path**", fp32_s=tf, int8_s=tq, speedup=tf / tq)
    if calib:
        rep.notes.append(f"calibration: {calib['images']} images, {calib['samples']} crops, {calib['calibrate_s']:.0f} s "
                         f"recording + {calib['quantize_s']:.0f} s quantising, peak RSS "
                         f"{calib['peak_rss_mib'] / 1024:.2f} GiB, tensors on disk {calib['calibration_mib']:.0f} MiB")
    rep.notes.append("peak RSS while timing: " + ", ".join(f"{p} {res[p]['peak_rss_mib']:.0f} MiB" for p in res))
    return rep


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--export", help="export directory (fp32 vision graphs; default: export random real-size graphs)")
    p.add_argument("--sizes", nargs="+", default=["1008x672", "336x336"], help="page sizes WxH to time")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-slices", type=int, default=9)
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: its own)")
    p.add_argument("--calib-images", type=int, help="calibrate on the recipe's first N calibration images only")
    p.add_argument("--no-quantize", action="store_true", help="the export already has the int8 graphs")
    p.add_argument("--tiny", action="store_true", help="tiny dimensions (smoke test)")
    p.add_argument("--json", help="also write the report as JSON")


def report(a) -> None:
    from hiwin_runtime.bench import write_json

    rep = run(a)
    print(rep.markdown())
    if a.json:
        write_json([rep], a.json)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hiwin-export bench-quant", description=__doc__)
    add_args(ap)
    ap.add_argument("--time-worker", help=argparse.SUPPRESS)
    ap.add_argument("--calib-worker", help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for name in ("onnxscript", "onnx_ir", "onnxruntime.transformers.float16"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if a.time_worker:
        sizes = [tuple(int(x) for x in s.split("x")) for s in a.sizes]
        print(json.dumps(time_worker(a.time_worker, a.precision, sizes, a.repeats, a.max_slices, a.threads)))
        return 0
    if a.calib_worker:
        print(json.dumps(calib_worker(a.calib_worker, a.calib_images, a.max_slices)))
        return 0
    report(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
