"""Builds of the C/C++ runtime (``engines/runtime``) for tests and benchmarks.

``build("release")`` configures and builds ``libhiwin_runtime``, ``hiwin-encode`` and the test programs
with CMake; ``build("sanitize")`` the test driver with AddressSanitizer + UndefinedBehaviorSanitizer,
``build("tsan")`` with ThreadSanitizer. Builds
are cached under ``$HIWIN_CACHE_DIR/runtime/<flavour>-<hash>/`` (default ``~/.cache/hiwin``), keyed by
a hash of the sources; each is built in a temporary folder and renamed into place, so concurrent
processes never see a half-built tree. Same recipe as :mod:`hiwin_export.plugin_lib`.

    python3 -m hiwin_export.runtime_lib bench photo.jpg      # C++ vs Python preprocessing table
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .plugin_lib import PluginBuildError, _find_tools, _run, cache_dir

__all__ = ["RuntimeBuildError", "runtime_source_dir", "source_hash", "build", "FLAVOURS"]

_CACHE_FORMAT = 1
_SOURCE_SUFFIXES = (".h", ".hpp", ".c", ".cpp", ".txt")
FLAVOURS = {
    "release": ["-DCMAKE_BUILD_TYPE=Release"],
    # -O1 keeps the sanitizer build short; only the library and the test driver are built
    "sanitize": ["-DCMAKE_BUILD_TYPE=Debug", "-DHIWIN_SANITIZE=ON", "-DCMAKE_CXX_FLAGS_DEBUG=-O1 -g",
                 "-DCMAKE_C_FLAGS_DEBUG=-O1 -g"],
    "tsan": ["-DCMAKE_BUILD_TYPE=Debug", "-DHIWIN_TSAN=ON", "-DCMAKE_CXX_FLAGS_DEBUG=-O1 -g",
             "-DCMAKE_C_FLAGS_DEBUG=-O1 -g"],
}
TARGETS = {"release": ["hiwin_runtime", "hiwin-encode", "hiwin_runtime_tests", "hiwin_c99_check"],
           "sanitize": ["hiwin_runtime_tests"], "tsan": ["hiwin_runtime_tests"]}


class RuntimeBuildError(PluginBuildError):
    """The runtime could not be built (missing tools, libraries or a compile error)."""


def runtime_source_dir() -> Path:
    env = os.environ.get("HIWIN_RUNTIME_SOURCE_DIR")
    d = Path(env) if env else Path(__file__).resolve().parents[1] / "engines" / "runtime"
    if not (d / "CMakeLists.txt").is_file():
        raise RuntimeBuildError(f"runtime sources not found at {d} (a source checkout is needed; set "
                                "HIWIN_RUNTIME_SOURCE_DIR to the engines/runtime folder)")
    return d


def source_hash(src: Path | None = None, flavour: str = "release") -> str:
    src = src or runtime_source_dir()
    h = hashlib.sha256(f"{_CACHE_FORMAT}|{flavour}|{sys.platform}|{platform.machine()}".encode())
    for p in sorted(p for p in src.rglob("*") if p.is_file() and p.suffix in _SOURCE_SUFFIXES
                    and "build" not in p.relative_to(src).parts[:-1]):
        h.update(p.relative_to(src).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build(flavour: str = "release", *, force: bool = False, extra_args: list[str] | None = None) -> Path:
    """Folder holding the built programs of ``flavour`` (``libhiwin_runtime.so``, ``hiwin-encode``,
    ``hiwin_runtime_tests``, ``hiwin_c99_check``; the sanitizer flavours ``sanitize`` (ASan + UBSan) and
    ``tsan`` (ThreadSanitizer) only the test driver), building them first when needed."""
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {sorted(FLAVOURS)}, got {flavour!r}")
    src = runtime_source_dir()
    key = source_hash(src, flavour)
    if extra_args:
        key = hashlib.sha256((key + "|" + "|".join(extra_args)).encode()).hexdigest()[:16]
    final = cache_dir() / "runtime" / f"{flavour}-{key}"
    if (final / "build-info.json").is_file() and not force:
        return final
    try:
        cmake, cxx = _find_tools()
    except PluginBuildError as e:
        raise RuntimeBuildError(str(e)) from None
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        bdir = tmp / "build"
        try:
            _run([cmake, "-S", str(src), "-B", str(bdir), f"-DCMAKE_CXX_COMPILER={cxx}", *FLAVOURS[flavour],
                  *(extra_args or [])], tmp)
            _run([cmake, "--build", str(bdir), "--parallel", "2", "--target", *TARGETS[flavour]], tmp)
        except PluginBuildError as e:
            raise RuntimeBuildError(str(e)) from None
        out = tmp / "out"
        out.mkdir()
        for p in bdir.iterdir():
            if p.is_file() and (os.access(p, os.X_OK) or p.suffix in (".so", ".dylib", ".dll")):
                shutil.copy2(p, out / p.name)
        (out / "build-info.json").write_text(json.dumps({"source_dir": str(src), "flavour": flavour,
                                                         "cmake": cmake, "cxx": cxx, "hash": key}, indent=1))
        if force and final.exists():
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(out, final)
        except OSError:
            if not (final / "build-info.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------ benchmark
def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def bench(image: str, repeats: int = 5, max_slices: int | None = None, threads: int = 0) -> dict:
    """Decode + preprocessing of one image: the Python reference (HiwinProcessor's image half, one
    thread) vs ``hiwin-encode --bench`` (best of ``repeats`` each): C++ decode then prepare, the
    one-call ``hiwin_prepare_memory`` (JPEG rows resized on other threads while it decodes), and the
    one call on the calling thread only. ``threads`` is hiwin_options.num_threads (0: every usable CPU)."""
    import io
    import subprocess

    from PIL import Image

    from hiwin_runtime.image import load_image
    from hiwin_runtime.slicing import apply_plan, normalize, plan_slices

    exe = build("release") / "hiwin-encode"
    data = Path(image).read_bytes()
    size = Image.open(image).size
    py = {"decode_s": float("inf"), "prepare_s": float("inf")}
    for _ in range(repeats):
        t0 = time.perf_counter()
        img = load_image(io.BytesIO(data))
        t1 = time.perf_counter()
        plan = plan_slices(img.size, max_slices or 9)
        _ = [normalize(c) for c in apply_plan(img, plan).crops]
        t2 = time.perf_counter()
        py["decode_s"] = min(py["decode_s"], t1 - t0)
        py["prepare_s"] = min(py["prepare_s"], t2 - t1)
    py["total_s"] = py["decode_s"] + py["prepare_s"]
    cmd = [str(exe), image, "--bench", str(repeats), "--threads", str(threads)]
    cmd += ["--max-slices", str(max_slices)] if max_slices else []
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if res.returncode:
        raise RuntimeError(f"hiwin-encode --bench failed: {res.stderr.strip()}")
    cpp = json.loads(res.stdout.strip().splitlines()[-1])
    env_threads = os.environ.get("HIWIN_NUM_THREADS", "")
    used = threads or (int(env_threads) if env_threads.isdigit() and int(env_threads) > 0 else _usable_cpus())
    return {"image": str(image), "size": list(size), "repeats": repeats, "python": py, "cpp": cpp,
            "cpu_count": os.cpu_count(), "cpp_threads": min(used, 64), "simd": cpp.get("simd"),
            "speedup_total": py["total_s"] / cpp["total_s"], "speedup_one_call": py["total_s"] / cpp["one_call_s"],
            "speedup_one_call_1t": py["total_s"] / cpp["one_call_1t_s"],
            "speedup_prepare": py["prepare_s"] / cpp["prepare_s"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m hiwin_export.runtime_lib",
                                 description="Build the C/C++ runtime, or compare its preprocessing time with Python's.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (cached) and print the folder")
    b.add_argument("--flavour", choices=sorted(FLAVOURS), default="release")
    b.add_argument("--force", action="store_true")
    be = sub.add_parser("bench", help="C++ vs Python decode + preprocessing (best of N) on one image")
    be.add_argument("image")
    be.add_argument("--repeats", type=int, default=5)
    be.add_argument("--max-slices", type=int, default=None)
    be.add_argument("--threads", type=int, default=0,
                    help="C++ threads per call (hiwin_options.num_threads; default 0: every usable CPU)")
    be.add_argument("--json", help="also write the result here")
    a = ap.parse_args(argv)
    if a.cmd == "build":
        print(build(a.flavour, force=a.force))
        return 0
    r = bench(a.image, a.repeats, a.max_slices, a.threads)
    w, h = r["size"]
    n = r["cpp_threads"]
    print(f"decode + preprocessing of {Path(a.image).name} ({w}x{h}), best of {a.repeats} (python: Pillow + numpy, "
          f"one thread; c++: hiwin_runtime, {r['simd']} kernels, {n} thread{'s' if n > 1 else ''}; "
          f"{r['cpu_count']} CPUs)")
    print(f"{'stage':<46}{'python s':>10}{'c++ s':>10}{'speed-up':>10}")
    rows = [("decode", "decode_s", "decode_s"),
            ("preprocess (plan, resizes, crops, norm)", "prepare_s", "prepare_s"),
            ("total, c++ two steps", "total_s", "total_s"),
            ("total, c++ one call (hiwin_prepare_memory)", "total_s", "one_call_s"),
            ("total, c++ one call, 1 thread", "total_s", "one_call_1t_s")]
    for name, pk, ck in rows:
        print(f"{name:<46}{r['python'][pk]:>10.4f}{r['cpp'][ck]:>10.4f}{r['python'][pk] / r['cpp'][ck]:>9.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
