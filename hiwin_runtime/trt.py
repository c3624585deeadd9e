"""TensorRT engines for the vision path (built by ``hiwin-export engines``), without torch.

    from hiwin_runtime import Pipeline
    pipe = Pipeline.from_export("hiwin-onnx", engines="engines-h100")   # vision on TensorRT, LLM on ORT

    from hiwin_runtime.trt import TrtRunner
    runner = TrtRunner("engines-h100", export=ExportDir("hiwin-onnx"))
    stages = runner.vision_stages()        # the crop chain's Stages, like OnnxRunner.vision_stages

An engine set is a directory with one serialized engine per vision graph (``vit``, ``jbu``, ``hiwin``
or the faithful export's ``hiwin_{oh}x{ow}``) and ``engines.json``: the TensorRT version and GPU it
was built with, the optimisation profiles (in patches) and batch range of each engine, the sha256 of
every engine, of its source graph and of the plugin library. :class:`TrtRunner` refuses a set built
by another TensorRT version or for another compute capability, a modified file, or engines built
from other graphs than the export's, each with a message that says what to rebuild.

Quantised sets (``int8trt`` / ``fp8trt``: ModelOpt Q/DQ graphs, built strongly typed) run the same
way, with fp32 inputs and outputs; the set's precision is the one in ``engines.json``.

Per stage call the runner picks the engine's optimisation profile from the crop's patch grid
(:func:`choose_profile`: the smallest profile box containing it), splits a batch beyond the
profile's maximum into chunks, copies the inputs to device buffers that are kept and grown across
calls, runs the engine on the runner's one CUDA stream and returns numpy outputs. Calls are
serialised by a lock (one stream, one execution context per engine).

Needs the ``tensorrt`` Python package (10.x or 11.x) and CUDA Python bindings (``cuda-python``:
``cuda.bindings.runtime``, or the older ``cuda.cudart``) for device memory and the stream; both are
imported only when a runner is created, and their absence (or a machine without a GPU) is a
:class:`TrtUnavailable` naming what is missing. Everything above the TensorRT and CUDA calls is
tested with test doubles of both (``tests/runtime/test_trt_backend.py``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .crop_chain import STAGE_IO, Stages, stage_args
from .graph_id import serving_graph
from .manifest import ExportDir, ExportError, sha256

log = logging.getLogger("hiwin_runtime")

ENGINES_JSON = "engines.json"
ENGINES_FORMAT = 1
SUPPORTED_TRT_MAJORS = (10, 11)


class TrtUnavailable(RuntimeError):
    """TensorRT, the CUDA Python bindings or a GPU is missing here."""


class EngineError(ExportError):
    """An engine set that cannot serve this request (missing, modified, incompatible, uncovered)."""


# ------------------------------------------------------------------------------------ TensorRT
def trt_major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return -1


def load_tensorrt(module: Any = None):
    """The ``tensorrt`` module (or ``module``, a test double), checked to be a usable 10.x / 11.x."""
    trt = module
    if trt is None:
        try:
            import tensorrt as trt  # noqa: PLC0415 (lazy: the runtime must import without it)
        except ImportError as e:
            raise TrtUnavailable(f"TensorRT's Python package is not installed (`import tensorrt`: {e}); install "
                                 "TensorRT 10.x or 11.x (`pip install tensorrt` with NVIDIA's index, or JetPack 6 "
                                 "on Jetson Orin)") from None
    if not hasattr(trt, "Runtime") or not hasattr(trt, "__version__"):
        where = getattr(trt, "__path__", None) or getattr(trt, "__file__", "?")
        raise TrtUnavailable(f"the `tensorrt` module at {where} has no Runtime: only type stubs (e.g. "
                             "tensorrt-stubs) are installed, not TensorRT itself")
    if trt_major(trt.__version__) not in SUPPORTED_TRT_MAJORS:
        raise TrtUnavailable(f"TensorRT {trt.__version__} is installed; hiwin supports TensorRT 10.x and 11.x")
    return trt


def plugin_registry(trt, builder=None):
    """The process-wide plugin registry (``builder.get_plugin_registry()`` where a builder exists)."""
    if builder is not None and hasattr(builder, "get_plugin_registry"):
        return builder.get_plugin_registry()
    return trt.get_plugin_registry()


# ------------------------------------------------------------------------------------ CUDA
@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: tuple[int, int]
    index: int = 0

    @property
    def sm(self) -> str:
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"

    def to_json(self) -> dict:
        return {"name": self.name, "compute_capability": list(self.compute_capability), "index": self.index}


class CudaApi:
    """The few CUDA runtime calls the engines need (device pointers are ints)."""

    def device(self) -> DeviceInfo: ...
    def malloc(self, nbytes: int) -> int: ...
    def free(self, ptr: int) -> None: ...
    def stream(self) -> int: ...
    def h2d(self, ptr: int, array: np.ndarray, stream: int) -> None: ...
    def d2h(self, array: np.ndarray, ptr: int, stream: int) -> None: ...
    def sync(self, stream: int) -> None: ...


def _import_cudart():
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6

        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart  # older cuda-python

        return cudart
    except ImportError:
        raise TrtUnavailable("the CUDA Python bindings are not installed (`pip install cuda-python`; hiwin uses "
                             "cuda.bindings.runtime for device memory and the CUDA stream)") from None


class CudaRuntime(CudaApi):
    """:class:`CudaApi` on cuda-python's runtime bindings (every call returns ``(err, *values)``)."""

    def __init__(self, device: int = 0, module: Any = None):
        self.rt = module if module is not None else _import_cudart()
        self.index = device
        self._streams: dict[int, Any] = {}
        try:
            (count,) = self._call("cudaGetDeviceCount", self.rt.cudaGetDeviceCount())
        except RuntimeError as e:
            raise TrtUnavailable(f"no usable CUDA GPU here ({e})") from None
        if count < 1:
            raise TrtUnavailable("no CUDA GPU is visible (cudaGetDeviceCount = 0; check CUDA_VISIBLE_DEVICES)")
        if device >= count:
            raise TrtUnavailable(f"CUDA device {device} requested, {count} visible")
        self._call("cudaSetDevice", self.rt.cudaSetDevice(device))

    def _call(self, what: str, res) -> tuple:
        err, *values = res if isinstance(res, tuple) else (res,)
        if int(err) != int(self.rt.cudaError_t.cudaSuccess):
            msg = err
            try:
                msg = self.rt.cudaGetErrorString(err)[1]
                msg = msg.decode() if isinstance(msg, bytes) else msg
            except Exception:  # noqa: BLE001 (the error text is a nicety)
                pass
            raise RuntimeError(f"{what} failed: {msg}")
        return tuple(values)

    def device(self) -> DeviceInfo:
        (prop,) = self._call("cudaGetDeviceProperties", self.rt.cudaGetDeviceProperties(self.index))
        name = prop.name.split(b"\0")[0].decode() if isinstance(prop.name, bytes) else str(prop.name)
        return DeviceInfo(name, (int(prop.major), int(prop.minor)), self.index)

    def malloc(self, nbytes: int) -> int:
        (ptr,) = self._call("cudaMalloc", self.rt.cudaMalloc(nbytes))
        return int(ptr)

    def free(self, ptr: int) -> None:
        self._call("cudaFree", self.rt.cudaFree(ptr))

    def stream(self) -> int:
        (s,) = self._call("cudaStreamCreate", self.rt.cudaStreamCreate())
        self._streams[int(s)] = s
        return int(s)

    def _stream(self, stream: int):
        return self._streams.get(stream, stream)

    def h2d(self, ptr: int, array: np.ndarray, stream: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call("cudaMemcpyAsync", self.rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind,
                                                              self._stream(stream)))

    def d2h(self, array: np.ndarray, ptr: int, stream: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call("cudaMemcpyAsync", self.rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind,
                                                              self._stream(stream)))

    def sync(self, stream: int) -> None:
        self._call("cudaStreamSynchronize", self.rt.cudaStreamSynchronize(self._stream(stream)))


# ------------------------------------------------------------------------------------ profiles
def choose_profile(profiles: list[dict], h: int, w: int) -> int | None:
    """Index of the optimisation profile for an (h, w)-patch crop: among the profiles whose box
    (``{"h": [min, opt, max], "w": [...]}``) contains it, the one admitting the fewest (h, w) pairs;
    ties go to the first. None when no profile contains it."""
    best, best_area = None, None
    for i, p in enumerate(profiles):
        (h0, _, h1), (w0, _, w1) = p["h"], p["w"]
        if h0 <= h <= h1 and w0 <= w <= w1:
            area = (h1 - h0 + 1) * (w1 - w0 + 1)
            if best_area is None or area < best_area:
                best, best_area = i, area
    return best


def grid_of(inputs: list[dict], feeds: dict[str, np.ndarray]) -> tuple[int, int]:
    """(h, w) patch grid of a stage call, from the first input with ``h`` / ``w`` symbols
    (``inputs``: the manifest's input entries: name, dynamic_axes)."""
    for spec in inputs:
        axes = {s[-1]: (int(a), int(s[:-1]) if s[:-1] else 1) for a, s in spec["dynamic_axes"].items() if s != "batch"}
        if "h" in axes and "w" in axes and spec["name"] in feeds:
            shape = feeds[spec["name"]].shape
            return shape[axes["h"][0]] // axes["h"][1], shape[axes["w"][0]] // axes["w"][1]
    raise EngineError("no input with a patch grid (h, w) among " + ", ".join(s["name"] for s in inputs))


# ------------------------------------------------------------------------------------ engine set
def read_engine_set(path: str | os.PathLike, *, verify: bool = True) -> dict:
    """``engines.json`` of an engine set; with ``verify`` every engine (and a bundled plugin
    library) must exist and match its sha256."""
    path = Path(path)
    if not path.is_dir():
        raise EngineError(f"{path}: engine directory not found")
    f = path / ENGINES_JSON
    if not f.is_file():
        raise EngineError(f"{path}: no {ENGINES_JSON} (not an engine set of `hiwin-export engines`; after the emitted "
                          "trtexec script, `hiwin-export engines --index` writes it)")
    try:
        info = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise EngineError(f"{f}: invalid JSON ({e})") from None
    if info.get("format") != ENGINES_FORMAT:
        raise EngineError(f"{f}: engine set format {info.get('format')}, this runtime reads format {ENGINES_FORMAT}")
    if verify:
        files = {e["file"]: e["sha256"] for e in info["engines"].values()}
        lib = (info.get("plugins") or {}).get("bundled")
        if lib:
            files[lib] = info["plugins"]["sha256"]
        missing = sorted(n for n in files if not (path / n).is_file())
        modified = sorted(n for n, d in files.items() if n not in missing and sha256(path / n) != d)
        problems = [f"{', '.join(missing)} missing"] if missing else []
        if modified:
            problems.append(f"{', '.join(modified)} modified (sha256 mismatch with {ENGINES_JSON})")
        if problems:
            raise EngineError(f"{path}: " + "; ".join(problems))
    return info


def check_compatible(info: dict, trt_version: str, device: DeviceInfo, where: Path | str = "engine set") -> None:
    """Refuse engines from another TensorRT version or for another compute capability."""
    built = info["tensorrt"]["version"]
    if built != trt_version:
        raise EngineError(f"{where}: the engines were built with TensorRT {built}, this process has TensorRT "
                          f"{trt_version}; a TensorRT engine loads only in the version that built it: rebuild them "
                          "here (`hiwin-export engines`)")
    cc = tuple(info["gpu"]["compute_capability"])
    if cc != tuple(device.compute_capability):
        raise EngineError(f"{where}: the engines were built on {info['gpu']['name']} (sm_{cc[0]}{cc[1]}, target "
                          f"{info.get('target')}), this GPU is {device.name} ({device.sm}); engines run only on the "
                          "compute capability they were built for: rebuild them on this GPU")
    if info["gpu"].get("name") and info["gpu"]["name"] != device.name:
        log.warning("%s: built on %s, running on %s (same compute capability %s)", where, info["gpu"]["name"],
                    device.name, device.sm)


def check_sources(info: dict, export: ExportDir, where: Path | str = "engine set") -> None:
    """Every engine was built from the graph this export directory holds (sha256)."""
    for name, e in info["engines"].items():
        graph = e["source"]["graph"]
        if graph not in export.graphs:
            raise EngineError(f"{where}: engine {name} was built from {graph}, which {export.path} does not have")
        if export.graphs[graph]["sha256"] != e["source"]["sha256"]:
            raise EngineError(f"{where}: engine {name} was built from another {export.graphs[graph]['file']} than "
                              f"{export.path} holds (sha256 differs): rebuild the engines for this export")


# ------------------------------------------------------------------------------------ runner
class _Engine:
    """One deserialized engine, its execution context and device buffers."""

    def __init__(self, runner: "TrtRunner", name: str, entry: dict):
        self.runner, self.name, self.entry = runner, name, entry
        trt = runner.trt
        self.engine = runner.runtime.deserialize_cuda_engine((runner.path / entry["file"]).read_bytes())
        if self.engine is None:
            raise EngineError(f"{runner.path / entry['file']}: TensorRT could not deserialize the engine (see its log "
                              "above; a plugin library that is not loaded?)")
        self.profiles = entry["profiles"]
        n = self.engine.num_optimization_profiles
        if n != len(self.profiles):
            raise EngineError(f"{entry['file']}: the engine has {n} optimisation profiles, {ENGINES_JSON} lists "
                              f"{len(self.profiles)}")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [t for t in names if self.engine.get_tensor_mode(t) == trt.TensorIOMode.INPUT]
        self.outputs = [t for t in names if t not in self.inputs]
        want = [i["name"] for i in entry["inputs"]]
        if sorted(self.inputs) != sorted(want):
            raise EngineError(f"{entry['file']}: engine inputs {self.inputs}, {ENGINES_JSON} says {want}")
        self.dtypes = {t: np.dtype(trt.nptype(self.engine.get_tensor_dtype(t))) for t in names}
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"{entry['file']}: no execution context (out of GPU memory?)")
        self.active: int | None = None
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity in bytes)

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, cap = self.buffers.get(name, (0, 0))
        if nbytes > cap:
            if ptr:
                self.runner.cuda.free(ptr)
            ptr, cap = self.runner.cuda.malloc(nbytes), nbytes
            self.buffers[name] = (ptr, cap)
        return ptr

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        h, w = grid_of(self.entry["inputs"], feeds)
        idx = choose_profile(self.profiles, h, w)
        if idx is None:
            boxes = "; ".join(f"h {p['h'][0]}-{p['h'][2]}, w {p['w'][0]}-{p['w'][2]}" for p in self.profiles)
            raise EngineError(f"{self.name}: no optimisation profile covers a crop of {h}x{w} patches (profiles: "
                              f"{boxes}); the engines cover every crop the slicer makes within the exported range")
        batch = int(next(iter(feeds.values())).shape[0])
        bmax = int(self.entry["batch"][2])
        if batch <= bmax:
            return self._run(idx, feeds)
        parts = [self._run(idx, {k: v[i:i + bmax] for k, v in feeds.items()}) for i in range(0, batch, bmax)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _run(self, idx: int, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda, ctx, stream = self.runner.cuda, self.context, self.runner.stream
        if self.active != idx:
            if not ctx.set_optimization_profile_async(idx, stream):
                raise EngineError(f"{self.name}: TensorRT refused optimisation profile {idx}")
            self.active = idx
        keep = []  # host arrays stay alive until the stream is synchronised
        for name in self.inputs:
            a = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
            if not ctx.set_input_shape(name, tuple(int(d) for d in a.shape)):
                raise EngineError(f"{self.name}: input {name!r} of shape {a.shape} is outside optimisation profile "
                                  f"{idx} ({self.profiles[idx]})")
            ptr = self._buffer(name, max(a.nbytes, 1))
            cuda.h2d(ptr, a, stream)
            ctx.set_tensor_address(name, ptr)
            keep.append(a)
        outs = {}
        for name in self.outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EngineError(f"{self.name}: output {name!r} has an unresolved shape {shape}")
            out = np.empty(shape, self.dtypes[name])
            ctx.set_tensor_address(name, self._buffer(name, max(out.nbytes, 1)))
            outs[name] = out
        if not ctx.execute_async_v3(stream):
            raise EngineError(f"{self.name}: execute_async_v3 failed (see the TensorRT log)")
        for name, out in outs.items():
            cuda.d2h(out, self.buffers[name][0], stream)
        cuda.sync(stream)
        del keep
        return outs

    def close(self) -> None:
        for ptr, _ in self.buffers.values():
            self.runner.cuda.free(ptr)
        self.buffers.clear()


class TrtRunner:
    """The engines of an engine set (``hiwin-export engines``), ready to run stage calls.

    ``export``: the export directory the engines were built from (inputs are then validated like
    ONNX Runtime's, and the engines' source graphs are checked against it). ``plugin_lib``: where the
    plugin library is, when not the copy inside the set. ``trt`` / ``cuda``: test doubles."""

    def __init__(self, engines_dir: str | os.PathLike, *, export: ExportDir | None = None,
                 plugin_lib: str | os.PathLike | None = None, trt: Any = None, cuda: CudaApi | None = None,
                 verify: bool = True):
        self.path = Path(engines_dir)
        self.info = read_engine_set(self.path, verify=verify)
        self.trt = load_tensorrt(trt)
        self.cuda = cuda if cuda is not None else CudaRuntime()
        self.device = self.cuda.device()
        check_compatible(self.info, self.trt.__version__, self.device, self.path)
        if export is not None:
            check_sources(self.info, export, self.path)
        self.export = export
        self.precision = self.info["precision"]
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self._load_plugins(plugin_lib)
        self.runtime = self.trt.Runtime(self.logger)
        if (self.info.get("plugins") or {}).get("serialized"):
            self.runtime.engine_host_code_allowed = True  # plugin code serialised into the engines
        self.stream = self.cuda.stream()
        self._lock = threading.Lock()
        self.engines = {name: _Engine(self, name, e) for name, e in sorted(self.info["engines"].items())}

    def _load_plugins(self, override) -> None:
        plug = self.info.get("plugins") or {}
        if not plug.get("required") or plug.get("serialized"):
            return
        path = Path(override) if override else self.path / plug["bundled"]
        if not path.is_file():
            raise EngineError(f"{self.path}: the engines need the plugin library {path}, which does not exist")
        if sha256(path) != plug["sha256"]:
            raise EngineError(f"{path}: not the plugin library the engines were built with (sha256 differs from "
                              f"{ENGINES_JSON})")
        if plugin_registry(self.trt).load_library(str(path)) is None:
            raise EngineError(f"{path}: TensorRT could not load the plugin library")

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        name = str(graph)
        if name not in self.engines:
            raise EngineError(f"{self.path}: no engine for graph {name!r} (has {sorted(self.engines)})")
        if self.export is not None:
            self.export.check_feeds(name, feeds)
        with self._lock:
            return self.engines[name].run(feeds)

    def vision_stages(self, precision: str | None = None) -> Stages:
        """The engines as crop-chain stages (as :meth:`OnnxRunner.vision_stages`); ``precision``
        must be the one the set was built from (None: that one)."""
        if precision not in (None, self.precision):
            raise EngineError(f"{self.path}: the engines were built from the {self.precision} graphs, {precision} "
                              "was requested")
        present = set(self.engines)

        def stage(family: str):
            names_in, names_out = STAGE_IO[family]

            def run(*args):
                bucket, data = stage_args(family, args)
                gid = serving_graph(family, bucket, self.precision, present)
                out = self.run(gid.name, {n: np.asarray(a) for n, a in zip(names_in, data)})
                return out[names_out[0]] if len(names_out) == 1 else tuple(out[n] for n in names_out)
            return run

        return Stages(stage("vit"), stage("jbu"), stage("hiwin"))

    def close(self) -> None:
        with self._lock:
            for e in self.engines.values():
                e.close()

    def __enter__(self) -> "TrtRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
