"""Vision-path benchmark of the reference at real dimensions (random weights): ``hiwin bench-vision``.

Builds CLIP ViT-L/14-336 (23 blocks), the JBU stack (1024 channels) and the Hiwin projector (4096
wide) with random weights, encodes one generated image (default 1008x672 -> 7 crops) through the
crop chain, and prints per-stage wall time and the process's peak RSS (same report format and
``--json`` as ``hiwin-export bench``, which adds ONNX Runtime and the FLOP floor). Run it as its
own process: peak RSS is process-wide.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from hiwin_runtime.bench import Report, peak_rss_mib, timed_stages, write_json
from hiwin_runtime.slicing import apply_plan, normalize, plan_slices

from .config import HiwinConfig
from .model import HiwinVision
from .synthetic import draw_scene


def bench(width: int, height: int, max_slices: int, threads: int | None, dtype=torch.float32) -> Report:
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    with torch.no_grad():
        model = HiwinVision(HiwinConfig(), dtype=dtype).eval()  # released dimensions
    build_s = time.perf_counter() - t0
    rss_weights = peak_rss_mib()
    plan = plan_slices((width, height), max_slices)
    crops = [normalize(c) for c in apply_plan(draw_scene(width, height, "circle", "blue", "bench"), plan).crops]
    times: dict[str, float] = {}
    with torch.no_grad():
        model.crop_chain(stages=timed_stages(model.stages(), times)).encode_crops(crops)
    n_params = sum(p.numel() for p in model.parameters())
    weights_mib = n_params * torch.finfo(dtype).bits / 8 / 2**20
    rep = Report(f"vision path, real dims, random weights, {dtype}, {torch.get_num_threads()} threads, "
                 f"torch {torch.__version__}; image {width}x{height}: grid {plan.grid}, {len(crops)} crops",
                 [("stage", "stage"), ("seconds", "seconds")],
                 meta={"image": f"{width}x{height}", "crops": len(crops), "grid": plan.grid,
                       "params_m": n_params / 1e6, "weights_mib": weights_mib, "build_s": build_s,
                       "rss_after_build_mib": rss_weights, "peak_rss_mib": peak_rss_mib()})
    for stage, name in (("vit", "ViT"), ("jbu", "JBU 2x + 4x"), ("hiwin", "Hiwin projector")):
        rep.add(stage=name, seconds=times.get(stage, 0.0))
    rep.add(stage="total", seconds=sum(times.values()))
    rep.notes.append(f"weights {n_params / 1e6:.1f}M params = {weights_mib:.0f} MiB (built in {build_s:.1f} s); "
                     f"peak RSS after building {rss_weights:.0f} MiB, after encoding {rep.meta['peak_rss_mib']:.0f} MiB")
    return rep


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--width", type=int, default=1008)
    ap.add_argument("--height", type=int, default=672)
    ap.add_argument("--max-slices", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="also write the report as JSON to this file")


def run(a) -> int:
    rep = bench(a.width, a.height, a.max_slices, a.threads)
    print(rep.markdown())
    if a.json:
        write_json([rep], a.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hiwin bench-vision", description=__doc__)
    add_args(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
