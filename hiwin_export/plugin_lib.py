"""The CPU launchers of the native plugins (``engines/plugins``) as numpy functions.

``HiwinRoiAlign`` and ``HiwinJbuConv`` are TensorRT plugins whose per-element maths is shared by a
CUDA launcher and a CPU launcher. This module builds the CPU launchers' C ABI library
(``libhiwin_plugins_cpu``, see ``engines/plugins/capi.h``) with CMake, loads it with ctypes and wraps
it, so the plugins' maths can be checked against the PyTorch reference on any machine.

The build is cached under ``$HIWIN_CACHE_DIR/plugins/<hash>/`` (default ``~/.cache/hiwin``), keyed by a
hash of the plugin sources; it is built in a temporary folder and renamed into place, so concurrent
test processes never see a half-written library. numpy + ctypes only (no torch).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

__all__ = ["PluginBuildError", "plugin_source_dir", "cache_dir", "source_hash", "build_cpu_library",
           "load_cpu_library", "roi_align", "jbu_conv", "float_to_half", "half_to_float"]

_LIB_STEM = "hiwin_plugins_cpu"
_CACHE_FORMAT = 1  # bump when the build recipe below changes
_SOURCE_SUFFIXES = (".h", ".cpp", ".cu", ".txt")
_MSG_SIZE = 1024
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}


class PluginBuildError(RuntimeError):
    """The plugin library could not be built (missing tools or a compile error)."""


def plugin_source_dir() -> Path:
    """``engines/plugins`` of the source tree (override with ``HIWIN_PLUGIN_SOURCE_DIR``)."""
    env = os.environ.get("HIWIN_PLUGIN_SOURCE_DIR")
    d = Path(env) if env else Path(__file__).resolve().parents[1] / "engines" / "plugins"
    if not (d / "CMakeLists.txt").is_file():
        raise PluginBuildError(f"plugin sources not found at {d} (a source checkout is needed; set "
                               "HIWIN_PLUGIN_SOURCE_DIR to the engines/plugins folder)")
    return d


def cache_dir() -> Path:
    """Root of the build cache: ``$HIWIN_CACHE_DIR`` or ``$XDG_CACHE_HOME/hiwin`` or ``~/.cache/hiwin``."""
    env = os.environ.get("HIWIN_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "hiwin"


def _source_files(src: Path) -> list[Path]:
    return sorted(p for p in src.rglob("*") if p.is_file() and p.suffix in _SOURCE_SUFFIXES
                  and "build" not in p.relative_to(src).parts[:-1])


def source_hash(src: Path | None = None) -> str:
    """Hash of the plugin sources (paths and contents) plus the platform and build-recipe version."""
    src = src or plugin_source_dir()
    h = hashlib.sha256(f"{_CACHE_FORMAT}|{sys.platform}|{platform.machine()}".encode())
    for p in _source_files(src):
        h.update(p.relative_to(src).as_posix().encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _lib_name() -> str:
    if sys.platform == "win32":
        return f"{_LIB_STEM}.dll"
    return f"lib{_LIB_STEM}.dylib" if sys.platform == "darwin" else f"lib{_LIB_STEM}.so"


def _find_tools() -> tuple[str, str]:
    cmake = shutil.which("cmake")
    if cmake is None:
        raise PluginBuildError("cmake was not found on PATH: install CMake >= 3.18 (e.g. `apt-get install cmake` "
                               "or `pip install cmake`) to build the plugin CPU library")
    cxx_env = os.environ.get("CXX")
    candidates = [cxx_env] if cxx_env else ["c++", "g++", "clang++"]
    for c in candidates:
        found = shutil.which(c)
        if found:
            return cmake, found
    what = f"CXX={cxx_env!r} is not an executable" if cxx_env else "no C++ compiler (c++, g++, clang++) on PATH"
    raise PluginBuildError(f"{what}: install a C++17 compiler (e.g. `apt-get install g++`) to build the plugin "
                           "CPU library")


def _run(cmd: list[str], cwd: Path) -> None:
    res = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if res.returncode != 0:
        tail = "\n".join(res.stdout.splitlines()[-40:])
        raise PluginBuildError(f"command failed ({res.returncode}): {' '.join(cmd)}\n{tail}")


def build_cpu_library(*, force: bool = False) -> Path:
    """Path of the cached ``libhiwin_plugins_cpu``, building it first when needed."""
    src = plugin_source_dir()
    final = cache_dir() / "plugins" / source_hash(src)
    lib = final / _lib_name()
    if lib.is_file() and not force:
        return lib
    cmake, cxx = _find_tools()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build = tmp / "build"
        _run([cmake, "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_CXX_COMPILER={cxx}",
              "-DHIWIN_BUILD_CPU=ON", "-DHIWIN_BUILD_CUDA=OFF", "-DHIWIN_BUILD_TRT=OFF"], tmp)
        _run([cmake, "--build", str(build), "--target", _LIB_STEM, "--config", "Release", "--parallel", "2"], tmp)
        built = [p for p in build.rglob(_lib_name()) if p.is_file()]
        if not built:
            raise PluginBuildError(f"the build produced no {_lib_name()} under {build}")
        out = tmp / "out"
        out.mkdir()
        shutil.copy2(built[0], out / _lib_name())
        (out / "build-info.json").write_text(json.dumps({"source_dir": str(src), "cmake": cmake, "cxx": cxx,
                                                         "hash": final.name}, indent=1))
        if force and final.exists():
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(out, final)  # atomic publish; loses the race gracefully
        except OSError:
            if not lib.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return lib


_f32p = ctypes.POINTER(ctypes.c_float)
_u16p = ctypes.POINTER(ctypes.c_uint16)
_i64, _i32, _vp, _cp, _sz = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t


def _declare(lib: ctypes.CDLL) -> None:
    for suffix, fp in (("f32", _vp), ("f16", _vp)):
        f = getattr(lib, f"hiwin_roi_align_cpu_{suffix}")
        f.argtypes = [fp, _i64, _i64, _i64, _i64, fp, _i64, _vp, _i32, _i32, _i32, _i32, ctypes.c_float, _i32, fp,
                      _cp, _sz]
        f.restype = _i32
        g = getattr(lib, f"hiwin_jbu_conv_cpu_{suffix}")
        g.argtypes = [fp, fp, fp, _i64, _i64, _i64, _i64, _i64] + [_vp] * 6 + [_i32, fp, _cp, _sz]
        g.restype = _i32
    lib.hiwin_f32_to_f16.argtypes = [_vp, _vp, _sz]
    lib.hiwin_f32_to_f16.restype = None
    lib.hiwin_f16_to_f32.argtypes = [_vp, _vp, _sz]
    lib.hiwin_f16_to_f32.restype = None
    lib.hiwin_capi_version.restype = _i32


def load_cpu_library() -> ctypes.CDLL:
    """The loaded CPU library (built on first use, then cached per process)."""
    with _lock:
        path = str(build_cpu_library())
        if path not in _loaded:
            lib = ctypes.CDLL(path)
            _declare(lib)
            if lib.hiwin_capi_version() != 1:
                raise PluginBuildError(f"{path}: unexpected C ABI version {lib.hiwin_capi_version()}")
            _loaded[path] = lib
        return _loaded[path]


# ----------------------------------------------------------------------------- argument checks
def _float_array(name: str, a, ndim: int) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype not in (np.float32, np.float16):
        raise ValueError(f"{name} must be float32 or float16, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
    return np.ascontiguousarray(a)


def _same_dtype(name: str, a: np.ndarray, ref: np.ndarray, ref_name: str) -> None:
    if a.dtype != ref.dtype:
        raise ValueError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {a.dtype}")


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _call(fn, *args) -> None:
    msg = ctypes.create_string_buffer(_MSG_SIZE)
    status = fn(*args, msg, _MSG_SIZE)
    if status != 0:
        text = msg.value.decode(errors="replace") or f"status {status}"
        raise (ValueError if status in (1, 2) else RuntimeError)(text)


# ----------------------------------------------------------------------------- public functions
def roi_align(x: np.ndarray, rois: np.ndarray, batch_indices: np.ndarray, output_hw: tuple[int, int],
              sampling_ratio: int = 0, spatial_scale: float = 1.0, aligned: bool = True) -> np.ndarray:
    """HiwinRoiAlign on the CPU: x (N, C, H, W), rois (R, 4) (x1, y1, x2, y2) of x's dtype, batch_indices
    (R,) int32/int64 -> (R, C, oh, ow) of x's dtype (float32 or float16; fp32 accumulation).

    ``aligned`` True is ONNX ``half_pixel`` (torchvision aligned=True), False ``output_half_pixel``;
    ``sampling_ratio <= 0`` is adaptive.
    """
    x = _float_array("x", x, 4)
    if not isinstance(rois, np.ndarray) or rois.ndim != 2 or rois.shape[1] != 4:
        raise ValueError(f"rois must be a (R, 4) numpy array, got {getattr(rois, 'shape', type(rois).__name__)}")
    _same_dtype("rois", rois, x, "x")
    rois = np.ascontiguousarray(rois)
    if not isinstance(batch_indices, np.ndarray) or batch_indices.dtype not in (np.int32, np.int64):
        raise ValueError("batch_indices must be an int32 or int64 numpy array, got "
                         f"{getattr(batch_indices, 'dtype', type(batch_indices).__name__)}")
    if batch_indices.shape != (rois.shape[0],):
        raise ValueError(f"batch_indices must have shape ({rois.shape[0]},) to match rois, got {batch_indices.shape}")
    batch_indices = np.ascontiguousarray(batch_indices)
    try:
        oh, ow = (int(v) for v in output_hw)
    except (TypeError, ValueError):
        raise ValueError(f"output_hw must be two ints, got {output_hw!r}") from None
    if oh < 1 or ow < 1:
        raise ValueError(f"output_hw must be positive, got {(oh, ow)}")
    N, C, H, W = x.shape
    R = rois.shape[0]
    out = np.empty((R, C, oh, ow), dtype=x.dtype)
    lib = load_cpu_library()
    fn = lib.hiwin_roi_align_cpu_f32 if x.dtype == np.float32 else lib.hiwin_roi_align_cpu_f16
    _call(fn, _ptr(x), N, C, H, W, _ptr(rois), R, _ptr(batch_indices), batch_indices.dtype.itemsize, oh, ow,
          int(sampling_ratio), float(spatial_scale), int(bool(aligned)), _ptr(out))
    return out


def _param(name: str, a, shapes: list[tuple[int, ...]]) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype.kind != "f":
        raise ValueError(f"{name} must be a float array, got {arr.dtype}")
    for s in shapes:
        if arr.shape == s or (arr.size == int(np.prod(s)) and arr.shape == s + (1,) * (arr.ndim - len(s))):
            return np.ascontiguousarray(arr.reshape(shapes[0]), dtype=np.float32)
    raise ValueError(f"{name} must have shape {' or '.join(str(s) for s in shapes)}, got {arr.shape}")


def jbu_conv(hr: np.ndarray, q: np.ndarray, guidance: np.ndarray, range_temp, sigma_spatial, w1, b1, w2, b2,
             radius: int = 3) -> np.ndarray:
    """HiwinJbuConv on the CPU: one JBU layer's adaptive convolution, fused.

    hr (B, C, H, W) un-padded, q (B, K, H, W) = range_proj(guidance), guidance (B, 3, H, W), all float32
    or all float16; the parameters (range_temp, sigma_spatial scalars; fixup conv weights w1 (T, T+3),
    b1 (T,), w2 (T, T), b2 (T,), T = (2r+1)^2, 1x1-conv shapes (.., 1, 1) accepted) are used as float32.
    Returns (B, C, H, W) of hr's dtype.
    """
    hr = _float_array("hr", hr, 4)
    q = _float_array("q", q, 4)
    guidance = _float_array("guidance", guidance, 4)
    _same_dtype("q", q, hr, "hr")
    _same_dtype("guidance", guidance, hr, "hr")
    B, C, H, W = hr.shape
    if q.shape[0] != B or q.shape[2:] != (H, W):
        raise ValueError(f"q must be (B={B}, K, H={H}, W={W}), got {q.shape}")
    if guidance.shape != (B, 3, H, W):
        raise ValueError(f"guidance must be {(B, 3, H, W)}, got {guidance.shape}")
    if isinstance(radius, bool) or int(radius) != radius or not 1 <= int(radius) <= 4:
        raise ValueError(f"radius must be an int in [1, 4], got {radius!r}")
    r = int(radius)
    if min(H, W) <= r:
        raise ValueError(f"H and W must be > radius {r} for reflect padding, got H={H}, W={W}")
    T = (2 * r + 1) ** 2
    rt = _param("range_temp", range_temp, [(1,), ()])
    sg = _param("sigma_spatial", sigma_spatial, [(1,), ()])
    w1 = _param("w1", w1, [(T, T + 3)])
    b1 = _param("b1", b1, [(T,)])
    w2 = _param("w2", w2, [(T, T)])
    b2 = _param("b2", b2, [(T,)])
    out = np.empty_like(hr)
    lib = load_cpu_library()
    fn = lib.hiwin_jbu_conv_cpu_f32 if hr.dtype == np.float32 else lib.hiwin_jbu_conv_cpu_f16
    _call(fn, _ptr(hr), _ptr(q), _ptr(guidance), B, C, q.shape[1], H, W, _ptr(rt), _ptr(sg), _ptr(w1), _ptr(b1),
          _ptr(w2), _ptr(b2), r, _ptr(out))
    return out


def float_to_half(x: np.ndarray) -> np.ndarray:
    """float32 -> float16 with the launchers' host conversion (round to nearest even)."""
    src = np.ascontiguousarray(x, dtype=np.float32)
    dst = np.empty(src.shape, dtype=np.float16)
    load_cpu_library().hiwin_f32_to_f16(_ptr(src), _ptr(dst), src.size)
    return dst


def half_to_float(x: np.ndarray) -> np.ndarray:
    """float16 -> float32 with the launchers' host conversion (exact)."""
    src = np.ascontiguousarray(x, dtype=np.float16)
    dst = np.empty(src.shape, dtype=np.float32)
    load_cpu_library().hiwin_f16_to_f32(_ptr(src), _ptr(dst), src.size)
    return dst
