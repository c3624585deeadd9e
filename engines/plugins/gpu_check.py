#!/usr/bin/env python3
"""GPU check of the HiwinRoiAlign / HiwinJbuConv CUDA launchers (no TensorRT needed).

Builds a small shared library of the CUDA launchers with a C ABI (capi_cuda.cu) with nvcc, runs them on
the GPU through ctypes on PyTorch CUDA tensors (data_ptr(), current stream), compares them with the
PyTorch reference on the GPU and times both with CUDA events (warm-up, median of --repeats runs):

* RoI-align, the projector's use: feature maps (7, 1024, 96, 96), 144 uniform windows per image, 3x3
  output, adaptive sampling, aligned=False; reference hiwin_model.roi_align.roi_align.
* JBU, one layer at C=1024, K=32, H=W=96, B=7: reference = JBULayer.forward minus the bicubic resize
  (range projection + kernel + fixup + reflect pad + adaptive conv); plugin = the fused kernel (and,
  like for like, the range projection in PyTorch + the fused kernel).

Checks: fp32 I/O max |out - ref| <= 1e-5 * max |ref|; fp16 I/O (reference in fp32 on the fp16-rounded
inputs) cosine >= 0.9999. TF32 is disabled so that the reference really is fp32.

Run from the repository root:  python3 engines/plugins/gpu_check.py --out gpu_check.json
``--dry-run`` runs the same argument handling, reference computations and comparisons at tiny sizes on
the CPU, with the plugins' CPU launchers (hiwin_export.plugin_lib) standing in for the CUDA library; the
CUDA parts are skipped with a message. Exit status: 0 when every correctness check passes.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _root in (Path.cwd(), HERE.parents[1]):  # the repository root (working directory when run as documented)
    if (_root / "hiwin_model").is_dir() and str(_root) not in sys.path:
        sys.path.insert(0, str(_root))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from hiwin_model.jbu import JBULayer, adaptive_conv  # noqa: E402
from hiwin_model.projector import window_boxes  # noqa: E402
from hiwin_model.roi_align import roi_align as torch_roi_align  # noqa: E402

import torch.nn.functional as F  # noqa: E402

SIZES = {
    "real": {"roi": dict(N=7, C=1024, H=96, W=96, grid=12, out=(3, 3)),
             "jbu": dict(B=7, C=1024, K=32, H=96, W=96, radius=3)},
    "tiny": {"roi": dict(N=2, C=8, H=24, W=36, grid=12, out=(3, 3)),
             "jbu": dict(B=2, C=8, K=4, H=12, W=10, radius=3)},
}
CUDA_SOURCES = ["capi_cuda.cu", "roiAlign/roiAlignKernel.cu", "jbuConv/jbuConvKernel.cu"]
# Small shapes that the real sizes do not reach: partial tiles, H = W = r + 1, channel counts that are
# not multiples of the kernel's chunk, every radius; RoIs beyond, across and at the map's edges.
JBU_EDGE_CASES = [  # (B, C, K, H, W, radius)
    (1, 3, 4, 4, 4, 3), (2, 5, 3, 13, 37, 3), (3, 17, 9, 9, 33, 3), (1, 2, 2, 5, 6, 1), (1, 2, 3, 3, 9, 2),
    (1, 3, 2, 5, 40, 4)]
ROI_EDGE_BOXES = [[11.5, 9.0, 15.0, 12.0], [-8.0, -7.0, -2.5, -1.5], [-2.0, -1.5, 3.0, 2.5], [7.0, 4.0, 11.0, 8.0],
                  [1.2, 2.1, 1.5, 2.35], [0.0, 3.0, 9.0, 3.4], [8.0, 0.0, 9.0, 7.0], [0.0, 6.0, 9.0, 7.0],
                  [0.0, 0.0, 9.0, 7.0], [2.0, 2.0, 2.0, 2.0], [4.0, 3.0, 1.0, 1.0], [-1.0, -1.0, 0.0, 0.0],
                  [8.5, 6.5, 10.0, 8.0]]  # on a 7 x 9 map
FP32_TOL = 1e-5
FP16_COS = 0.9999
GOALS = {"roi_align": 2.0, "jbu": 5.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU only: tiny sizes, CPU launchers instead of the CUDA library, no timing goals")
    p.add_argument("--sizes", choices=sorted(SIZES), help="problem sizes (default: real, tiny with --dry-run)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs before timing")
    p.add_argument("--arch", help="CUDA arch for nvcc, e.g. 90 (default: the device's)")
    p.add_argument("--build-dir", type=Path, default=Path("build") / "gpu_check",
                   help="where the CUDA library is built (cached by source hash)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.sizes is None:
        a.sizes = "tiny" if a.dry_run else "real"
    if a.repeats < 1 or a.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return a


# ----------------------------------------------------------------------------- the CUDA library
def _sources_hash(extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for p in sorted(HERE.rglob("*")):
        if p.is_file() and p.suffix in (".h", ".cu", ".cpp"):
            h.update(p.relative_to(HERE).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def build_cuda_library(arch: str, build_dir: Path) -> Path:
    nvcc = shutil.which("nvcc") or next((str(p) for p in [Path("/usr/local/cuda/bin/nvcc")] if p.is_file()), None)
    if nvcc is None:
        raise RuntimeError("nvcc not found (install the CUDA toolkit or put nvcc on PATH)")
    out_dir = build_dir / _sources_hash(f"{arch}|{nvcc}")
    lib = out_dir / "libhiwin_plugins_cuda.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".tmp-{lib.name}"
    cmd = [nvcc, "-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden", "-lineinfo",
           "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-I", str(HERE),
           *[str(HERE / s) for s in CUDA_SOURCES], "-o", str(tmp)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed:\n{' '.join(cmd)}\n{res.stdout[-4000:]}")
    tmp.rename(lib)
    print(f"built {lib} in {time.perf_counter() - t0:.1f} s")
    return lib


class CudaLib:
    """ctypes wrapper of capi_cuda.h on torch CUDA tensors."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        vp, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
        self.lib.hiwin_roi_align_cuda.argtypes = [i32, vp, i64, i64, i64, i64, vp, i64, vp, i32, i32, i32, i32,
                                                  ctypes.c_float, i32, vp, vp, ctypes.c_char_p, ctypes.c_size_t]
        self.lib.hiwin_roi_align_cuda.restype = i32
        self.lib.hiwin_jbu_conv_cuda.argtypes = [i32, vp, vp, vp, i64, i64, i64, i64, i64] + [vp] * 6 + [
            i32, vp, vp, ctypes.c_char_p, ctypes.c_size_t]
        self.lib.hiwin_jbu_conv_cuda.restype = i32

    @staticmethod
    def _check(status: int, msg) -> None:
        if status != 0:
            raise RuntimeError(msg.value.decode(errors="replace"))

    @staticmethod
    def _dtype(t: torch.Tensor) -> int:
        return {torch.float32: 0, torch.float16: 1}[t.dtype]

    def roi_align(self, x, rois, bidx, out_hw, sampling_ratio=-1, spatial_scale=1.0, aligned=False):
        x, rois, bidx = x.contiguous(), rois.to(x.dtype).contiguous(), bidx.contiguous()
        N, C, H, W = x.shape
        out = torch.empty(rois.shape[0], C, *out_hw, dtype=x.dtype, device=x.device)
        msg = ctypes.create_string_buffer(512)
        self._check(self.lib.hiwin_roi_align_cuda(
            self._dtype(x), x.data_ptr(), N, C, H, W, rois.data_ptr(), rois.shape[0], bidx.data_ptr(),
            bidx.element_size(), out_hw[0], out_hw[1], sampling_ratio, spatial_scale, int(aligned), out.data_ptr(),
            torch.cuda.current_stream().cuda_stream, msg, 512), msg)
        return out

    def jbu_conv(self, hr, q, guidance, p):
        hr, q, guidance = hr.contiguous(), q.contiguous(), guidance.contiguous()
        B, C, H, W = hr.shape
        out = torch.empty_like(hr)
        msg = ctypes.create_string_buffer(512)
        self._check(self.lib.hiwin_jbu_conv_cuda(
            self._dtype(hr), hr.data_ptr(), q.data_ptr(), guidance.data_ptr(), B, C, q.shape[1], H, W,
            *[p[k].data_ptr() for k in ("range_temp", "sigma_spatial", "w1", "b1", "w2", "b2")], p["radius"],
            out.data_ptr(), torch.cuda.current_stream().cuda_stream, msg, 512), msg)
        return out


class CpuStandIn:
    """The CPU launchers (hiwin_export.plugin_lib) behind the CudaLib interface, for --dry-run."""

    def __init__(self):
        from hiwin_export import plugin_lib

        self.pl = plugin_lib
        plugin_lib.load_cpu_library()

    def roi_align(self, x, rois, bidx, out_hw, sampling_ratio=-1, spatial_scale=1.0, aligned=False):
        np_dtype = np.float32 if x.dtype == torch.float32 else np.float16
        out = self.pl.roi_align(x.numpy(), rois.to(x.dtype).numpy().astype(np_dtype), bidx.numpy(), out_hw,
                                sampling_ratio, spatial_scale, aligned)
        return torch.from_numpy(out)

    def jbu_conv(self, hr, q, guidance, p):
        kw = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in p.items()}
        return torch.from_numpy(self.pl.jbu_conv(hr.numpy(), q.numpy(), guidance.numpy(), **kw))


# ----------------------------------------------------------------------------- references
class _Const(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, _):
        return self.value


def jbu_reference(layer: JBULayer, hr: torch.Tensor, guidance: torch.Tensor, q: torch.Tensor | None = None):
    """JBULayer.forward without the bicubic resize (hr is already at the output size); with ``q`` the range
    projection's output is replaced by q (to feed fp16-rounded q to the fp32 reference)."""
    saved = layer.range_proj
    if q is not None:
        layer.range_proj = _Const(q)
    try:
        kernel = layer.range_kernel(guidance) * layer.spatial_kernel()
        kernel = kernel / kernel.sum(1, keepdim=True).clamp_min(1e-7)
        kernel = kernel + 0.1 * layer.fixup_proj(torch.cat([kernel, guidance], dim=1))
        return adaptive_conv(F.pad(hr, [layer.radius] * 4, mode="reflect"), kernel, layer.diameter)
    finally:
        layer.range_proj = saved


def jbu_params(layer: JBULayer) -> dict:
    c1, c2 = layer.fixup_proj[0], layer.fixup_proj[3]
    T = layer.diameter ** 2
    f = lambda t: t.detach().float().contiguous()  # noqa: E731
    return dict(range_temp=f(layer.range_temp).reshape(1), sigma_spatial=f(layer.sigma_spatial).reshape(1),
                w1=f(c1.weight).reshape(T, T + 3), b1=f(c1.bias), w2=f(c2.weight).reshape(T, T), b2=f(c2.bias),
                radius=layer.radius)


def make_jbu(cfg: dict, device, seed: int):
    torch.manual_seed(seed)
    layer = JBULayer(cfg["C"], cfg["K"], cfg["radius"], device=device).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        layer.range_temp.fill_(float(torch.empty(1).uniform_(-0.5, 0.5, generator=g)))
        layer.sigma_spatial.fill_(float(torch.empty(1).uniform_(0.7, 1.3, generator=g)))
        for m in layer.fixup_proj:
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(3.0)
    gen = torch.Generator(device="cpu").manual_seed(seed + 2)
    hr = torch.randn(cfg["B"], cfg["C"], cfg["H"], cfg["W"], generator=gen).to(device)
    guidance = torch.randn(cfg["B"], 3, cfg["H"], cfg["W"], generator=gen).to(device)
    return layer, hr, guidance


def make_roi(cfg: dict, device, seed: int):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(cfg["N"], cfg["C"], cfg["H"], cfg["W"], generator=gen).to(device)
    boxes = window_boxes(cfg["H"], cfg["W"], cfg["grid"])
    rois = boxes.repeat(cfg["N"], 1).to(device)
    bidx = torch.arange(cfg["N"]).repeat_interleave(boxes.shape[0]).to(device)
    return x, rois, bidx


# ----------------------------------------------------------------------------- comparison and timing
def compare(out: torch.Tensor, ref: torch.Tensor, fp16: bool) -> dict:
    o, r = out.double().flatten(), ref.double().flatten()
    scale = float(r.abs().max()) if r.numel() else 0.0
    err = float((o - r).abs().max()) if r.numel() else 0.0
    cos = float(torch.dot(o, r) / (o.norm() * r.norm()).clamp_min(1e-300)) if r.numel() else 1.0
    rel = err / scale if scale > 0 else err
    ok = bool(torch.isfinite(o).all()) and (cos >= FP16_COS if fp16 else rel <= FP32_TOL)
    return {"max_abs_err": err, "max_abs_ref": scale, "rel_err": rel, "cosine": cos, "ok": ok,
            "rule": f"cosine >= {FP16_COS}" if fp16 else f"max abs err <= {FP32_TOL} * max|ref|"}


def _merge(worst: dict, c: dict) -> None:
    """Fold one case's comparison into the worst-case summary."""
    worst["cases"] += 1
    worst["ok"] = worst["ok"] and c["ok"]
    if c["rel_err"] >= worst["rel_err"]:
        worst.update(max_abs_err=c["max_abs_err"], max_abs_ref=c["max_abs_ref"], rel_err=c["rel_err"])
    worst["cosine"] = min(worst["cosine"], c["cosine"])


def time_ms(fn, *, device: str, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ----------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict:
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("no CUDA device visible to PyTorch (use --dry-run for the CPU-only check)")
    device = "cuda" if cuda else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if cuda:
        major, minor = torch.cuda.get_device_capability()
        arch = args.arch or f"{major}{minor}"
        impl = CudaLib(build_cuda_library(arch, args.build_dir))
        device_name = torch.cuda.get_device_name()
    else:
        print("dry run: CUDA parts skipped (no nvcc build, no GPU run, no CUDA-event timing); the plugins' CPU "
              "launchers stand in for the CUDA library")
        arch = None
        impl = CpuStandIn()
        device_name = f"cpu (dry run, {platform.processor() or platform.machine()})"
    timing = dict(device=device, warmup=args.warmup, repeats=args.repeats)
    sizes = SIZES[args.sizes]
    results: dict = {"device": device_name, "arch": arch, "dry_run": bool(args.dry_run), "sizes": sizes,
                     "torch": torch.__version__, "cuda": torch.version.cuda, "tf32": False, "checks": {},
                     "timings_ms": {}, "speedup": {}, "goals": {}}
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    with torch.no_grad():
        # ---------------- RoI-align
        rc = sizes["roi"]
        x, rois, bidx = make_roi(rc, device, args.seed)
        out_hw = tuple(rc["out"])
        ref = torch_roi_align(x, rois, out_hw, batch_idx=bidx, spatial_scale=1.0, sampling_ratio=-1, aligned=False)
        out = impl.roi_align(x, rois, bidx, out_hw)
        sync()
        results["checks"]["roi_align_fp32"] = compare(out.cpu(), ref.cpu(), fp16=False)
        x16, rois16 = x.half(), rois.half()
        ref16 = torch_roi_align(x16.float(), rois16.float(), out_hw, batch_idx=bidx, sampling_ratio=-1, aligned=False)
        out16 = impl.roi_align(x16, rois16, bidx, out_hw)
        sync()
        results["checks"]["roi_align_fp16"] = compare(out16.float().cpu(), ref16.cpu(), fp16=True)
        t = results["timings_ms"]
        t["roi_align_reference_fp32"] = time_ms(
            lambda: torch_roi_align(x, rois, out_hw, batch_idx=bidx, sampling_ratio=-1, aligned=False), **timing)
        t["roi_align_plugin_fp32"] = time_ms(lambda: impl.roi_align(x, rois, bidx, out_hw), **timing)
        t["roi_align_plugin_fp16"] = time_ms(lambda: impl.roi_align(x16, rois16, bidx, out_hw), **timing)
        x = x16 = ref = ref16 = out = out16 = None  # free the GPU memory before the JBU part

        # ---------------- edge cases (correctness only)
        worst = {"max_abs_err": 0.0, "max_abs_ref": 0.0, "rel_err": 0.0, "cosine": 1.0, "ok": True,
                 "rule": f"max abs err <= {FP32_TOL} * max|ref|, each case", "cases": 0}
        gen = torch.Generator().manual_seed(args.seed + 5)
        xe = torch.randn(2, 3, 7, 9, generator=gen).to(device)
        be = torch.tensor(ROI_EDGE_BOXES)
        rand = torch.rand(12, 4, generator=gen) * torch.tensor([12.0, 10.0, 6.0, 5.0])
        rand -= torch.tensor([2.0, 2.0, 0.0, 0.0])
        rand[:, 2:] += rand[:, :2]
        be = torch.cat([be, rand]).to(device)
        for dt in (torch.int32, torch.int64):
            ie = (torch.arange(be.shape[0]) % 2).to(dt).to(device)
            for aligned in (True, False):
                for sr in (0, 2):
                    for ohw in ((3, 3), (1, 1), (4, 2)):
                        r_ = torch_roi_align(xe, be, ohw, batch_idx=ie, sampling_ratio=sr, aligned=aligned)
                        o_ = impl.roi_align(xe, be, ie, ohw, sampling_ratio=sr, aligned=aligned)
                        sync()
                        _merge(worst, compare(o_.cpu(), r_.cpu(), fp16=False))
        results["checks"]["edge_roi_align_fp32"] = worst
        worst = dict(worst, max_abs_err=0.0, max_abs_ref=0.0, rel_err=0.0, cosine=1.0, ok=True, cases=0)
        worst16 = dict(worst, rule=f"cosine >= {FP16_COS}, each case")
        for i, (B, C, K, H, W, r) in enumerate(JBU_EDGE_CASES):
            lay, hr_, g_ = make_jbu(dict(B=B, C=C, K=K, H=H, W=W, radius=r), device, args.seed + 10 + i)
            pe = jbu_params(lay)
            q_ = lay.range_proj(g_)
            _merge(worst, compare(impl.jbu_conv(hr_, q_, g_, pe).cpu(), jbu_reference(lay, hr_, g_).cpu(), False))
            h16, q16_, g16_ = hr_.half(), q_.half(), g_.half()
            ref_ = jbu_reference(lay, h16.float(), g16_.float(), q=q16_.float())
            _merge(worst16, compare(impl.jbu_conv(h16, q16_, g16_, pe).float().cpu(), ref_.cpu(), True))
        results["checks"]["edge_jbu_fp32"] = worst
        results["checks"]["edge_jbu_fp16"] = worst16

        # ---------------- JBU
        jc = sizes["jbu"]
        layer, hr, guidance = make_jbu(jc, device, args.seed)
        p = jbu_params(layer)
        q = layer.range_proj(guidance)
        ref = jbu_reference(layer, hr, guidance)
        out = impl.jbu_conv(hr, q, guidance, p)
        sync()
        results["checks"]["jbu_fp32"] = compare(out.cpu(), ref.cpu(), fp16=False)
        del out
        hr16, q16, g16 = hr.half(), q.half(), guidance.half()
        ref16 = jbu_reference(layer, hr16.float(), g16.float(), q=q16.float())
        out16 = impl.jbu_conv(hr16, q16, g16, p)
        sync()
        results["checks"]["jbu_fp16"] = compare(out16.float().cpu(), ref16.cpu(), fp16=True)
        del ref, ref16, out16
        t["jbu_reference_fp32"] = time_ms(lambda: jbu_reference(layer, hr, guidance), **timing)
        t["jbu_plugin_fp32"] = time_ms(lambda: impl.jbu_conv(hr, q, guidance, p), **timing)
        t["jbu_range_proj_plus_plugin_fp32"] = time_ms(
            lambda: impl.jbu_conv(hr, layer.range_proj(guidance), guidance, p), **timing)
        t["jbu_plugin_fp16"] = time_ms(lambda: impl.jbu_conv(hr16, q16, g16, p), **timing)

    s = results["speedup"]
    s["roi_align"] = t["roi_align_reference_fp32"] / t["roi_align_plugin_fp32"]
    s["jbu"] = t["jbu_reference_fp32"] / t["jbu_plugin_fp32"]
    s["jbu_with_range_proj"] = t["jbu_reference_fp32"] / t["jbu_range_proj_plus_plugin_fp32"]
    for k, goal in GOALS.items():
        results["goals"][k] = {"goal": f">= {goal}x", "speedup": s[k],
                               "met": (s[k] >= goal) if cuda else None}
    results["ok"] = all(c["ok"] for c in results["checks"].values())
    return results


def markdown(r: dict) -> str:
    lines = [f"Device: **{r['device']}**" + (f" (sm_{r['arch']})" if r["arch"] else "")
             + f", torch {r['torch']}, CUDA {r['cuda']}, TF32 off", "",
             "| check | rule | max abs err | max abs ref | rel err | cosine | ok |", "|---|---|---|---|---|---|---|"]
    for k, c in r["checks"].items():
        lines.append(f"| {k} | {c['rule']} | {c['max_abs_err']:.3g} | {c['max_abs_ref']:.3g} | {c['rel_err']:.3g} | "
                     f"{c['cosine']:.7f} | {'yes' if c['ok'] else 'NO'} |")
    lines += ["", "| op | time (ms, median) |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in r["timings_ms"].items()]
    lines += ["", "| speed-up vs PyTorch eager | value | goal | met |", "|---|---|---|---|"]
    for k, v in r["speedup"].items():
        g = r["goals"].get(k)
        met = "-" if g is None or g["met"] is None else ("yes" if g["met"] else "NO")
        lines.append(f"| {k} | {v:.2f}x | {g['goal'] if g else '-'} | {met} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    print(markdown(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
