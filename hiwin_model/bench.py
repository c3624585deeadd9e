"""Vision-path benchmark at real dimensions (random weights): ``hiwin bench-vision``.

Builds CLIP ViT-L/14-336 (23 blocks), the JBU stack (1024 channels) and the Hiwin projector (4096
wide) with random weights, encodes one image (default 1008x672 -> 7 crops), and prints per-stage
wall time and the process's peak RSS. Run it as its own process: peak RSS is process-wide.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

from .config import HiwinConfig
from .demo import draw_scene
from .jbu import JBUStack
from .processor import stack_group
from .projector import HiwinProjector
from .slicing import apply_plan, normalize, plan_slices
from .vision import VisionTower


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bench(width: int, height: int, max_slices: int, threads: int | None, dtype=torch.float32) -> dict:
    if threads:
        torch.set_num_threads(threads)
    cfg = HiwinConfig()  # released dimensions
    t0 = time.perf_counter()
    with torch.no_grad():
        vt = VisionTower(cfg.vision, dtype=dtype).eval()
        jbu = JBUStack(cfg.jbu.dim, dtype=dtype).eval()
        proj = HiwinProjector(cfg.projector.dim, cfg.projector.vision_dim, cfg.projector.num_heads, dtype=dtype).eval()
    build_s = time.perf_counter() - t0
    rss_weights = peak_rss_mib()
    plan = plan_slices((width, height), max_slices)
    crops = [normalize(c) for c in apply_plan(draw_scene(width, height, "circle", "blue", "bench"), plan).crops]
    groups: dict = {}
    for i, c in enumerate(crops):
        groups.setdefault(tuple(c.shape[-2:]), []).append(i)
    times = {"vit": 0.0, "jbu": 0.0, "projector": 0.0}
    with torch.no_grad():
        for idx in groups.values():
            batch = stack_group(crops, idx).to(dtype)
            t = time.perf_counter()
            f1 = vt(batch)
            times["vit"] += time.perf_counter() - t
            for j in range(len(idx)):
                t = time.perf_counter()
                f2, f4 = jbu(f1[j:j + 1], batch[j:j + 1])
                times["jbu"] += time.perf_counter() - t
                t = time.perf_counter()
                proj([f1[j:j + 1], f2, f4])
                times["projector"] += time.perf_counter() - t
    n_params = sum(p.numel() for m in (vt, jbu, proj) for p in m.parameters())
    return dict(image=f"{width}x{height}", crops=len(crops), grid=plan.grid, crop_sizes=sorted(groups),
                threads=torch.get_num_threads(), build_s=build_s, params_m=n_params / 1e6,
                weights_mib=n_params * torch.finfo(dtype).bits / 8 / 2**20, rss_after_build_mib=rss_weights,
                peak_rss_mib=peak_rss_mib(), **{f"{k}_s": v for k, v in times.items()},
                total_s=sum(times.values()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hiwin bench-vision", description=__doc__)
    ap.add_argument("--width", type=int, default=1008)
    ap.add_argument("--height", type=int, default=672)
    ap.add_argument("--max-slices", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    r = bench(a.width, a.height, a.max_slices, a.threads)
    print(f"vision path, real dims, random weights, fp32, {r['threads']} threads, torch {torch.__version__}")
    print(f"image {r['image']}: grid {r['grid']}, {r['crops']} crops, crop shapes (H, W) {r['crop_sizes']}")
    print(f"weights {r['params_m']:.1f}M params = {r['weights_mib']:.0f} MiB (built in {r['build_s']:.1f} s)")
    print("| stage | seconds |\n|---|---|")
    for k in ("vit", "jbu", "projector", "total"):
        print(f"| {k} | {r[k + '_s']:.2f} |")
    print(f"peak RSS after building {r['rss_after_build_mib']:.0f} MiB, after encoding {r['peak_rss_mib']:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
