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


# The forms compared by ``--forms``: (label, projector form, JBU convolution).
FORMS = (("released (faithful projector, JBU tap loop)", "faithful", "taps"),
         ("fast projector, JBU tiles", "fast", "tiled"),
         ("exported form (any-grid projector, JBU tiles)", "any-grid", "tiled"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_forms(width: int, height: int, max_slices: int, device: str = "cpu", dtype=torch.float32,
                repeats: int = 3, config: HiwinConfig | None = None) -> Report:
    """The same weights and crops through each of :data:`FORMS` on one device: per stage median
    seconds (synchronised on CUDA), the speed-up against the released form, and each form's visual
    tokens against the released form's (max rel, cosine). Real dimensions unless ``config``."""
    import statistics

    dev = torch.device(device)
    torch.manual_seed(0)
    with torch.no_grad():
        model = HiwinVision(config or HiwinConfig(), dtype=dtype).to(dev).eval()
    plan = plan_slices((width, height), max_slices)
    crops = [normalize(c) for c in apply_plan(draw_scene(width, height, "circle", "blue", "bench"), plan).crops]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    rep = Report(f"vision path forms, {'real' if config is None else 'given'} dims, random weights, {dtype}, {name}, "
                 f"torch {torch.__version__}; image {width}x{height}: {len(crops)} crops; median of {repeats}",
                 [("form", "form"), ("vit_s", "ViT s"), ("jbu_s", "JBU s"), ("hiwin_s", "projector s"),
                  ("total_s", "total s"), ("speedup", "speed-up"), ("max_rel", "tokens max rel"),
                  ("cosine", "tokens cosine")],
                 meta={"device": name, "dtype": str(dtype), "image": f"{width}x{height}", "crops": len(crops)})
    ref_tokens = None
    ref_total = None
    for label, impl, conv in FORMS:
        runs = []
        for r in range(repeats + 1):  # the first run warms up (allocator, kernels)
            times: dict[str, float] = {}
            stages = timed_stages(model.stages(impl, conv), times, around=_synced(dev))
            with torch.no_grad():
                tokens = model.crop_chain(stages=stages).encode_crops(crops)
            _sync(dev)
            if r:
                runs.append(times)
        med = {k: statistics.median(t[k] for t in runs) for k in ("vit", "jbu", "hiwin")}
        total = sum(med.values())
        tokens = tokens.float().cpu()
        if ref_tokens is None:
            ref_tokens, ref_total = tokens, total
        err = float((tokens - ref_tokens).abs().max() / ref_tokens.abs().max())
        cos = float(torch.nn.functional.cosine_similarity(tokens.double().flatten(), ref_tokens.double().flatten(), dim=0))
        rep.add(form=label, vit_s=med["vit"], jbu_s=med["jbu"], hiwin_s=med["hiwin"], total_s=total,
                speedup=ref_total / total, max_rel=err, cosine=cos)
    return rep


def _synced(device: torch.device):
    """``around`` for :func:`timed_stages`: synchronise the device after each stage call so that
    its time is the stage's own."""
    def around(family, fn):
        def call(*args):
            out = fn(*args)
            _sync(device)
            return out
        return call
    return around


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--width", type=int, default=1008)
    ap.add_argument("--height", type=int, default=672)
    ap.add_argument("--max-slices", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="also write the report as JSON to this file")
    ap.add_argument("--forms", action="store_true",
                    help="compare the released form with the fast and exported forms (time and token parity)")
    ap.add_argument("--device", default="cpu", help="torch device for --forms (cpu, cuda)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and compute dtype for --forms")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per form for --forms (after one warm-up)")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def run(a) -> int:
    if a.forms:
        if a.threads:
            torch.set_num_threads(a.threads)
        rep = bench_forms(a.width, a.height, a.max_slices, a.device, DTYPES[a.dtype], a.repeats)
        print(rep.markdown())
        if a.json:
            write_json([rep], a.json)
        return 0
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
