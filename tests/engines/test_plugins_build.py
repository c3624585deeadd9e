"""Compile checks of the native plugins (engines/plugins) that need no GPU and no TensorRT runtime.

(a) the IPluginV3 sources and getCreators compile (g++ -c, -Wall -Wextra -Werror) against the TensorRT
    headers of every folder in TENSORRT_INCLUDE_DIRS (os.pathsep-separated);
(b) the CUDA launchers compile with nvcc for sm_80, sm_87 and sm_90;
(c) with both: CMake builds libhiwin_plugins.so (linked with --no-undefined), and a host driver loads it
    with dlopen like TensorRT does and drives the creators and plugin interfaces (fields, serialisation
    round trip, clone, formats, shape checks, error messages).

Passing results are remembered under the plugin build cache, keyed by a hash of the sources, the
headers' version file and the tool paths, so reruns are cheap.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from hiwin_export import plugin_lib

SRC = Path(__file__).resolve().parents[2] / "engines" / "plugins"
PLUGIN_SOURCES = ["hiwinPlugins.cpp", "common/pluginLogger.cpp", "roiAlign/hiwinRoiAlignPlugin.cpp",
                  "jbuConv/hiwinJbuConvPlugin.cpp"]
CUDA_SOURCES = ["roiAlign/roiAlignKernel.cu", "jbuConv/jbuConvKernel.cu", "capi_cuda.cu"]
ARCHS = ["80", "87", "90"]
NEEDS_TRT = "needs TensorRT headers: set TENSORRT_INCLUDE_DIRS"

_trt_dirs = [d for d in os.environ.get("TENSORRT_INCLUDE_DIRS", "").split(os.pathsep) if d]


def _trt_params():
    if not _trt_dirs:
        return [pytest.param(None, id="no-tensorrt-headers")]
    return [pytest.param(d, id=Path(d).parent.name if Path(d).name == "include" else Path(d).name)
            for d in _trt_dirs]


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def _cuda_include() -> Path | None:
    """Folder with cuda_runtime_api.h (the TensorRT headers include it)."""
    cands = []
    nvcc = _nvcc()
    if nvcc:
        cands.append(Path(nvcc).resolve().parents[1] / "include")
    cands += [Path(r) / "include" for r in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")) if r]
    cands.append(Path("/usr/local/cuda/include"))
    return next((c for c in cands if (c / "cuda_runtime_api.h").is_file()), None)


def _cxx() -> str | None:
    return shutil.which(os.environ.get("CXX", "")) if os.environ.get("CXX") else (
        shutil.which("g++") or shutil.which("c++"))


def _check_key(*parts: str) -> Path:
    h = hashlib.sha256(plugin_lib.source_hash(SRC).encode())
    for p in parts:
        h.update(b"\0" + p.encode())
    d = plugin_lib.cache_dir() / "checks"
    d.mkdir(parents=True, exist_ok=True)
    return d / (h.hexdigest()[:24] + ".ok")


def _headers_id(trt: str) -> str:
    v = Path(trt) / "NvInferVersion.h"
    return hashlib.sha256(v.read_bytes()).hexdigest() if v.is_file() else "?"


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    res = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))}\n{res.stdout[-6000:]}"


def _trt_or_skip(trt: str | None) -> str:
    if trt is None:
        pytest.skip(NEEDS_TRT)
    if not (Path(trt) / "NvInfer.h").is_file():
        pytest.fail(f"TENSORRT_INCLUDE_DIRS entry {trt} has no NvInfer.h")
    return trt


@pytest.mark.parametrize("trt", _trt_params())
def test_plugins_compile_against_tensorrt_headers(trt, tmp_path):
    trt = _trt_or_skip(trt)
    cuda_inc = _cuda_include()
    if cuda_inc is None:
        pytest.skip("needs CUDA headers (cuda_runtime_api.h): set CUDA_HOME")
    cxx = _cxx()
    if cxx is None:
        pytest.skip("needs a C++ compiler (g++)")
    marker = _check_key("trt-compile", trt, _headers_id(trt), cxx, str(cuda_inc))
    if marker.exists():
        return
    for src in PLUGIN_SOURCES:
        _run([cxx, "-std=c++17", "-c", "-Wall", "-Wextra", "-Werror", "-fPIC", "-isystem", trt, "-isystem",
              str(cuda_inc), "-I", str(SRC), str(SRC / src), "-o", str(tmp_path / (Path(src).stem + ".o"))])
    _run([cxx, "-std=c++17", "-c", "-Wall", "-Wextra", "-Werror", "-isystem", trt, "-isystem", str(cuda_inc),
          str(SRC / "test" / "pluginHostSmoke.cpp"), "-o", str(tmp_path / "smoke.o")])
    marker.touch()


def test_cuda_launchers_compile_with_nvcc(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("needs nvcc")
    marker = _check_key("nvcc", nvcc, *ARCHS)
    if marker.exists():
        return
    gencode = [a for arch in ARCHS for a in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
    for src in CUDA_SOURCES:
        _run([nvcc, "-std=c++17", "-O3", "-c", "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra", *gencode,
              "-I", str(SRC), str(SRC / src), "-o", str(tmp_path / (Path(src).stem + ".o"))])
    marker.touch()


@pytest.mark.parametrize("trt", _trt_params())
def test_plugin_library_builds_and_loads(trt):
    trt = _trt_or_skip(trt)
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("needs nvcc (the plugin library links the CUDA launchers)")
    cmake, cxx = shutil.which("cmake"), _cxx()
    if cmake is None or cxx is None:
        pytest.skip("needs cmake and a C++ compiler")
    cuda_inc = _cuda_include()
    marker = _check_key("trt-lib", trt, _headers_id(trt), nvcc, cmake, cxx)
    if marker.exists():
        return
    with tempfile.TemporaryDirectory(prefix="hiwin-trt-") as tmp:
        build = Path(tmp) / "build"
        _run([cmake, "-S", str(SRC), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_CXX_COMPILER={cxx}",
              f"-DCMAKE_CUDA_COMPILER={nvcc}", "-DCMAKE_CUDA_ARCHITECTURES=80", "-DHIWIN_BUILD_CPU=OFF",
              "-DHIWIN_BUILD_CUDA=ON", f"-DTENSORRT_INCLUDE_DIRS={trt}"])
        _run([cmake, "--build", str(build), "--target", "hiwin_plugins", "--parallel", "2"])
        lib = build / "libhiwin_plugins.so"
        assert lib.is_file()
        exported = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
        names = {line.split()[-1] for line in exported.splitlines() if " T " in line}
        assert {"getCreators", "setLoggerFinder"} <= names
        driver = Path(tmp) / "smoke"
        _run([cxx, "-std=c++17", "-isystem", trt, "-isystem", str(cuda_inc), str(SRC / "test" / "pluginHostSmoke.cpp"),
              "-o", str(driver), "-ldl"])
        res = subprocess.run([str(driver), str(lib)], capture_output=True, text=True)
        assert res.returncode == 0 and res.stdout.strip() == "OK", res.stdout + res.stderr
    marker.touch()
