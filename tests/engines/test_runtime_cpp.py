"""The C/C++ runtime (engines/runtime) against the Python reference, bit for bit.

CMake builds the library, ``hiwin-encode`` and the test driver once (cached by source hash, see
:mod:`hiwin_export.runtime_lib`); the Python reference writes golden data for >= 200 images (real
photos in every PNG/JPEG form the reference accepts, documents, extreme and random sizes, EXIF
orientations) plus 10^4 random sizes, and the C++ driver must reproduce every decoded pixel, plan,
crop, normalised tensor (hashes of the exact bytes), bucket, shape group, layout and prompt table,
and hiwin_encode_image's crop chain (through test-double stages set with hiwin_vision_backend) must
give CropChain's visual tokens.
A second, ASan + UBSan build feeds bad files, a few hundred random sizes and API misuse and must
get a status with a message every time, with no sanitizer report and no leak. Every resampling
kernel (AVX-512, AVX2, portable) and thread count gives the same bytes; a ThreadSanitizer build
checks the threaded paths for data races.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import runtime_golden  # noqa: E402

from hiwin_export import runtime_lib  # noqa: E402

SRC = Path(__file__).resolve().parents[2] / "engines" / "runtime"
NEEDS_TRT = "needs TensorRT headers: set TENSORRT_INCLUDE_DIRS"
_trt_dirs = [d for d in os.environ.get("TENSORRT_INCLUDE_DIRS", "").split(os.pathsep) if d]


def _tools_missing() -> str | None:
    if not shutil.which("cmake"):
        return "needs cmake"
    if not (shutil.which("g++") or shutil.which("c++") or os.environ.get("CXX")):
        return "needs a C++17 compiler"
    if not Path("/usr/include/jpeglib.h").is_file() and not os.environ.get("CMAKE_PREFIX_PATH"):
        return "needs libjpeg(-turbo) development headers"
    return None


@pytest.fixture(scope="module")
def release():
    why = _tools_missing()
    if why:
        pytest.skip(why)
    return runtime_lib.build("release")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    pytest.importorskip("skimage", reason="needs scikit-image (its bundled photos; in the `test` extra)")
    root = tmp_path_factory.mktemp("runtime_golden")
    cases = runtime_golden.write_images(root / "img")
    counts = runtime_golden.write_golden(root / "golden", cases)
    return root, cases, counts


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)


def _passed(out: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^PASSED (.+?) (\d+)$", out, re.M)}


def test_golden_bit_exact(release, data):
    root, cases, counts = data
    assert len(cases) >= 200 and counts["decoded"] >= 200
    res = _run([release / "hiwin_runtime_tests", "golden", root / "golden" / "golden.txt", root / "golden"])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert re.search(r"^KERNELS (avx512|avx2|generic)$", res.stdout, re.M)
    got = _passed(res.stdout)
    assert got["decoded"] == counts["decoded"]  # every decoded RGB byte equal to Pillow's
    assert got["crops"] == counts["crops"]  # every crop's RGB bytes and float32 tensor bits
    assert got["errors"] == counts["errors"]  # the same refusals (extreme aspect ratios, ...)
    assert got["image plans"] + counts["errors"] == counts["images"]
    assert got["one-call prepares"] == counts["images"]  # hiwin_prepare_file (threaded JPEG path) == two steps
    assert got["visual tokens"] == got["image plans"]  # hiwin_encode_image's crop chain + layout == CropChain's
    assert got["size plans"] == counts["sizes"] == 10_000
    assert got["layouts"] > 0 and got["prompt tables"] == 60 and got["buckets"] == 1600
    assert "FAILURES 0" in res.stdout


def _x86_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(m.group(1).split()) if m else set()


@pytest.mark.parametrize("kernels,threads", [("avx2", 3), ("generic", 1)])
def test_golden_bit_exact_other_kernels(release, data, kernels, threads):
    """The same golden data through the other resampling kernels (test_golden_bit_exact uses the best
    the CPU has) and other thread counts: 3 threads (more than this machine's cores: any split of the
    work gives the same bytes) and the calling thread only (no decoding overlapped with resizing)."""
    if kernels == "avx2" and "avx2" not in _x86_flags():
        pytest.skip("needs an x86-64 CPU with AVX2 (the AVX2 kernels)")
    root, _, counts = data
    env = {**os.environ, "HIWIN_SIMD": kernels, "HIWIN_NUM_THREADS": str(threads)}
    res = _run([release / "hiwin_runtime_tests", "golden", root / "golden" / "golden.txt", root / "golden"], env=env)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert f"KERNELS {kernels}\n" in res.stdout
    got = _passed(res.stdout)
    assert got["decoded"] == counts["decoded"] and got["crops"] == counts["crops"]
    assert got["one-call prepares"] == counts["images"] and "FAILURES 0" in res.stdout


def test_c99_header(release, tmp_path):
    res = _run([release / "hiwin_c99_check"])  # built with -std=c99 -pedantic -Werror
    assert res.returncode == 0 and "c99 ok" in res.stdout, res.stdout + res.stderr
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc:
        src = tmp_path / "h.c"
        src.write_text('#include "hiwin/hiwin.h"\nint main(void) { return hiwin_status_code(0); }\n')
        r = _run([cc, "-std=c99", "-pedantic", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", f"-I{SRC / 'include'}",
                  src])
        assert r.returncode == 0, r.stderr


def test_hiwin_encode_matches_reference(release, tmp_path):
    """The sample CLI end to end: .npy crops equal to hiwin_runtime's normalised crops."""
    from PIL import Image

    from hiwin_runtime.image import load_image
    from hiwin_runtime.slicing import apply_plan, normalize, plan_slices

    rng = np.random.default_rng(3)
    img = tmp_path / "photo.jpg"
    Image.fromarray(runtime_golden._texture(1200, 700, rng)).save(img, quality=88)
    out = tmp_path / "out"
    out.mkdir()
    res = _run([release / "hiwin-encode", img, "--out", out, "--max-slices", "7"])
    assert res.returncode == 0, res.stderr
    ref = load_image(img)
    plan = plan_slices(ref.size, 7)
    crops = [normalize(c) for c in apply_plan(ref, plan).crops]
    import json

    got = json.loads((out / "plan.json").read_text())
    assert got["grid"] == list(plan.grid) and got["boxes"] == [list(b) for b in plan.boxes]
    for i, c in enumerate(crops):
        a = np.load(out / f"crop_{i}.npy")
        assert a.dtype == np.float32 and a.shape == c.shape
        assert np.array_equal(a.view(np.uint32), c.view(np.uint32))
    # bad input: a clear message and exit status 1, no output
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(img.read_bytes()[:300])
    r = _run([release / "hiwin-encode", bad])
    assert r.returncode == 1 and "truncated" in r.stderr
    r = _run([release / "hiwin-encode", img, "--export", tmp_path, "--engines", tmp_path])
    assert r.returncode == 1 and "manifest.json: not found" in r.stderr, r.stderr


def test_bench_command_runs(release, tmp_path, capsys):
    """`python3 -m hiwin_export.runtime_lib bench` end to end on a small JPEG (it prints timings; no
    timing is asserted here), and hiwin-encode's --threads reaching the options check."""
    from PIL import Image

    img = tmp_path / "small.jpg"
    Image.fromarray(runtime_golden._texture(640, 480, np.random.default_rng(5))).save(img, quality=90)
    assert runtime_lib.main(["bench", str(img), "--repeats", "1", "--threads", "2", "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "2 threads" in out and "total, c++ one call (hiwin_prepare_memory)" in out
    import json

    r = json.loads((tmp_path / "b.json").read_text())
    assert r["size"] == [640, 480] and r["cpp"]["threads"] == 2 and r["simd"] in ("avx512", "avx2", "generic")
    assert all(r["cpp"][k] > 0 for k in ("decode_s", "prepare_s", "one_call_s", "one_call_1t_s"))
    res = _run([release / "hiwin-encode", img, "--threads", "-1"])
    assert res.returncode == 1 and "num_threads must be >= 0" in res.stderr


def test_manifest_rule_is_read(release, tmp_path):
    """The bucket rule and slicing settings come from manifest.json; unknown rules are refused."""
    import json

    from hiwin_runtime.buckets import bucket_rule

    man = {"manifest_version": 2, "buckets": {"rule": bucket_rule()}, "config": {"hiwin_max_slices": 4}}
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    img = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(runtime_golden._texture(1500, 900, np.random.default_rng(0))).save(img)
    res = _run([release / "hiwin-encode", img, "--export", tmp_path])
    assert res.returncode == 0, res.stderr
    from hiwin_runtime.slicing import plan_slices

    want = plan_slices((1500, 900), 4)
    assert json.loads(res.stdout.splitlines()[0])["grid"] == list(want.grid)
    man["buckets"]["rule"]["kind"] = "nearest_area"
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    res = _run([release / "hiwin-encode", img, "--export", tmp_path])
    assert res.returncode == 1 and "unknown bucket rule 'nearest_area'" in res.stderr
    man["manifest_version"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    res = _run([release / "hiwin-encode", img, "--export", tmp_path])
    assert res.returncode == 1 and "manifest version 1" in res.stderr
    (tmp_path / "manifest.json").write_text("{not json")
    res = _run([release / "hiwin-encode", img, "--export", tmp_path])
    assert res.returncode == 1 and "invalid JSON" in res.stderr


def test_sanitizers_bad_inputs(data, tmp_path):
    """ASan + UBSan (LeakSanitizer on): bad files, random sizes incl. extremes, API misuse."""
    why = _tools_missing()
    if why:
        pytest.skip(why)
    probe = tmp_path / "p.cpp"
    probe.write_text("int main() { return 0; }\n")
    cxx = shutil.which(os.environ.get("CXX", "")) if os.environ.get("CXX") else (shutil.which("g++") or shutil.which("c++"))
    if _run([cxx, "-fsanitize=address,undefined", probe, "-o", tmp_path / "p"]).returncode != 0:
        pytest.skip("the C++ compiler cannot link ASan/UBSan here (libasan/libubsan missing)")
    build = runtime_lib.build("sanitize")
    _, cases, _ = data
    good = [p for p, _, _ in cases[::12]]
    lst = runtime_golden.write_robustness(tmp_path / "robust", good)
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=23",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1:exitcode=24"}
    # the kernels this CPU picks with 2 threads (JPEG rows handed between threads), then the portable
    # kernels with 3
    for kernels, threads in ((None, 2), ("generic", 3)):
        run_env = {**env, "HIWIN_NUM_THREADS": str(threads)}
        if kernels:
            run_env["HIWIN_SIMD"] = kernels
        res = _run([build / "hiwin_runtime_tests", "robust", lst], env=run_env)
        out = res.stdout + res.stderr
        assert res.returncode == 0, out[-6000:]
        assert "AddressSanitizer" not in out and "runtime error" not in out and "LeakSanitizer" not in out
        got = _passed(res.stdout)
        assert got["bad files"] >= 25 and got["random sizes"] >= 300 and got["api misuse"] >= 16
        assert "FAILURES 0" in res.stdout


def _thread_images(cases, largest: int = 6) -> list[Path]:
    """JPEGs (the one-call path resizes their rows while decoding), the `largest` biggest and grey,
    CMYK, EXIF-rotated, tall, wide and refused ones, and two PNGs (decoded first)."""
    paths = [Path(p) for p, _, _ in cases]
    jpegs = sorted((p for p in paths if p.suffix == ".jpg"), key=lambda p: -p.stat().st_size)
    pngs = sorted((p for p in paths if p.suffix == ".png"), key=lambda p: -p.stat().st_size)
    special = ("cmyk_0", "grey_0", "exif_5", "exif_6", "doc_3_", "doc_4_", "rand_7_")  # rand_7: refused
    if not largest:  # small ones only (ThreadSanitizer is slow)
        special = ("cmyk_0", "grey_0", "exif_6", "jpeg_q75_s0_p0", "rand_7_")
    picked = jpegs[:largest] + [p for p in jpegs if any(p.name.startswith(k) for k in special)]
    return list(dict.fromkeys(picked + (pngs[:2] if largest else pngs[-1:])))


def test_threads_bit_identical(release, data):
    """hiwin_prepare_file with 2, 3, 5 and 8 threads, two calls at once on one context, and decode +
    prepare: the same bytes as one thread."""
    _, cases, _ = data
    imgs = _thread_images(cases)
    assert len(imgs) >= 8
    res = _run([release / "hiwin_runtime_tests", "threads", *imgs])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert _passed(res.stdout)["thread runs"] == len(imgs) * 4 * 3 and "FAILURES 0" in res.stdout


@pytest.mark.slow
def test_thread_sanitizer(data, tmp_path):
    """The same under ThreadSanitizer: no data race in the row ring, the work split or the kernels."""
    why = _tools_missing()
    if why:
        pytest.skip(why)
    probe = tmp_path / "p.cpp"
    probe.write_text("#include <thread>\nint main() { std::thread t([] {}); t.join(); return 0; }\n")
    cxx = shutil.which(os.environ.get("CXX", "")) if os.environ.get("CXX") else (shutil.which("g++") or shutil.which("c++"))
    r = _run([cxx, "-fsanitize=thread", probe, "-o", tmp_path / "p"])
    if r.returncode != 0 or _run([tmp_path / "p"]).returncode != 0:
        pytest.skip("the C++ compiler cannot build and run ThreadSanitizer programs here (libtsan missing)")
    build = runtime_lib.build("tsan")
    _, cases, _ = data
    imgs = _thread_images(cases, largest=0)
    assert len(imgs) >= 5
    env = {**os.environ, "TSAN_OPTIONS": "halt_on_error=1:exitcode=25"}
    res = _run([build / "hiwin_runtime_tests", "threads", *imgs], env=env)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    assert "ThreadSanitizer" not in out and "FAILURES 0" in res.stdout


@pytest.mark.parametrize("trt", _trt_dirs or [pytest.param(None, id="no-tensorrt-headers")])
def test_tensorrt_backend_compiles(trt, tmp_path):
    """The TensorRT backend compiles (-Wall -Wextra -Werror) against each header set."""
    if trt is None:
        pytest.skip(NEEDS_TRT)
    why = _tools_missing()
    if why:
        pytest.skip(why)
    cmake = shutil.which("cmake")
    import hashlib

    ver = Path(trt) / "NvInferVersion.h"
    key = hashlib.sha256("|".join([runtime_lib.source_hash(SRC, "trt-check"), trt,
                                   ver.read_text() if ver.is_file() else "", str(shutil.which("c++"))]).encode())
    ok = runtime_lib.cache_dir() / "checks" / (key.hexdigest()[:24] + ".runtime-trt.ok")
    if ok.is_file():  # passed before with these sources and headers
        return
    b = tmp_path / "b"
    r = _run([cmake, "-S", SRC, "-B", b, "-DHIWIN_RUNTIME_TESTS=OFF", f"-DTENSORRT_INCLUDE_DIRS={trt}"])
    if r.returncode != 0 and "CUDA toolkit" in (r.stdout + r.stderr):
        pytest.skip("needs the CUDA toolkit headers (cuda_runtime_api.h) next to TensorRT's")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = _run([cmake, "--build", b, "--target", "hiwin_trt_compile_check", "--parallel", "2"])
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    ok.parent.mkdir(parents=True, exist_ok=True)
    ok.write_text("ok\n")
