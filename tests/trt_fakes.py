"""Test doubles for the TensorRT path: a fake ``tensorrt`` module, a fake CUDA memory layer, a fake
``cuda.bindings.runtime`` and a small synthetic export directory.

The fake ``tensorrt`` records every call and follows the documented 10.x / 11.x Python API closely
enough for hiwin's code to reach every branch up to the real calls: ``OnnxParser.parse_from_file``
reads the ONNX graph (and fails on plugin ops whose library was not loaded, like the real parser),
``build_serialized_network`` returns a JSON "plan" holding the graph path and the profiles,
``Runtime.deserialize_cuda_engine`` refuses a plan of another version, and an execution context runs
the graph with ONNX Runtime on the fake device memory, so outputs are real numbers. None of this is
TensorRT: it checks hiwin's calls and data flow, never TensorRT's behaviour or speed.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np

PLUGIN_OPS = ("HiwinRoiAlign", "HiwinJbuConv")


# ------------------------------------------------------------------------------------ fake CUDA
class FakeCuda:
    """:class:`hiwin_runtime.trt.CudaApi` on host bytearrays."""

    def __init__(self, name: str = "NVIDIA H100 80GB HBM3", cc=(9, 0)):
        from hiwin_runtime.trt import DeviceInfo

        self.info = DeviceInfo(name, tuple(cc))
        self.mem: dict[int, bytearray] = {}
        self.next = 0x1000
        self.calls: list[tuple] = []

    def device(self):
        self.calls.append(("device",))
        return self.info

    def malloc(self, nbytes: int) -> int:
        ptr, self.next = self.next, self.next + ((nbytes + 255) // 256 + 1) * 256
        self.mem[ptr] = bytearray(nbytes)
        self.calls.append(("malloc", nbytes))
        return ptr

    def free(self, ptr: int) -> None:
        assert ptr in self.mem, f"double free / unknown pointer {ptr:#x}"
        del self.mem[ptr]
        self.calls.append(("free", ptr))

    def stream(self) -> int:
        self.calls.append(("stream",))
        return 77

    def h2d(self, ptr: int, array: np.ndarray, stream: int) -> None:
        assert stream == 77 and array.flags.c_contiguous
        buf = self.mem[ptr]
        assert array.nbytes <= len(buf), "host-to-device copy beyond the buffer"
        buf[:array.nbytes] = array.tobytes()
        self.calls.append(("h2d", ptr, array.nbytes))

    def d2h(self, array: np.ndarray, ptr: int, stream: int) -> None:
        assert stream == 77
        buf = self.mem[ptr]
        assert array.nbytes <= len(buf)
        array.reshape(-1).view(np.uint8)[:] = np.frombuffer(bytes(buf[:array.nbytes]), np.uint8)
        self.calls.append(("d2h", ptr, array.nbytes))

    def sync(self, stream: int) -> None:
        self.calls.append(("sync", stream))

    # for the fake engine
    def read(self, ptr: int, shape, dtype) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return np.frombuffer(bytes(self.mem[ptr][:n]), dtype).reshape(shape).copy()

    def write(self, ptr: int, array: np.ndarray) -> None:
        buf = self.mem[ptr]
        assert array.nbytes <= len(buf), "engine output beyond its buffer"
        buf[:array.nbytes] = np.ascontiguousarray(array).tobytes()


# ------------------------------------------------------------------------------------ fake tensorrt
def _strip_plugins(model):
    """The graph without plugin nodes whose outputs nothing uses (the synthetic plugin graphs carry a
    dangling one so the build path sees a plugin op while ONNX Runtime can still run the rest)."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [n for n in model.graph.node if not (n.op_type in PLUGIN_OPS and not set(n.output) & used)]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def make_fake_trt(version: str = "10.3.0", cuda: FakeCuda | None = None):
    """A fake ``tensorrt`` module (install it with ``monkeypatch.setitem(sys.modules, "tensorrt", m)``
    or pass it as ``trt=``). ``m.calls`` records (what, args); ``m.fail_build`` / ``m.fail_parse``
    simulate failures; ``m.cuda`` is the memory its contexts read and write."""
    m = types.ModuleType("tensorrt")
    m.__version__ = version
    m.calls = []
    m.cuda = cuda
    m.fail_build = False
    m.fail_parse = False
    m.loaded_libraries = []
    major = int(version.split(".")[0])

    def rec(*what):
        m.calls.append(what)

    class Logger:
        ERROR, WARNING, INFO, VERBOSE = 1, 2, 3, 4

        def __init__(self, severity=2):
            rec("Logger", severity)

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 0  # TensorRT 11: deprecated, ignored; EXPLICIT_BATCH removed
        if major < 11:
            EXPLICIT_BATCH = 1

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    class TensorIOMode:
        INPUT, OUTPUT = "INPUT", "OUTPUT"

    class DataType:
        FLOAT, HALF = "FLOAT", "HALF"

    class BuilderFlag:  # precision flags exist in 10.x only (removed in 11); hiwin never sets them
        TF32 = "TF32"
        if major < 11:
            FP16, INT8 = "FP16", "INT8"

    def nptype(dt):
        return {"FLOAT": np.float32, "HALF": np.float16}[dt]

    class Registry:
        def load_library(self, path):
            rec("load_library", path)
            if not Path(path).is_file():
                return None
            m.loaded_libraries.append(path)
            return object()

    registry = Registry()

    def get_plugin_registry():
        rec("get_plugin_registry")
        return registry

    class Network:
        def __init__(self, flags):
            self.flags, self.source, self.inputs, self.outputs = flags, None, [], []

    class OnnxParser:
        def __init__(self, network, logger):
            rec("OnnxParser")
            self.network, self.errors = network, []

        def parse_from_file(self, path):
            import onnx

            rec("parse_from_file", path)
            if m.fail_parse:
                self.errors = ["In node 3 (importFoo): UNSUPPORTED_NODE: fake failure"]
                return False
            model = onnx.load(path, load_external_data=False)
            ops = sorted({n.op_type for n in model.graph.node if n.op_type in PLUGIN_OPS})
            if ops and not m.loaded_libraries:
                self.errors = [f"No importer registered for op: {ops[0]}"]
                return False
            init = {i.name for i in model.graph.initializer}
            # what a strongly typed build takes its precision from: the Q/DQ nodes and their zero-point types
            zps = {i.name: i.data_type for i in model.graph.initializer}
            qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
            rec("parsed", path, len(qdq), sorted({onnx.TensorProto.DataType.Name(zps[n.input[2]])
                                                  for n in qdq if len(n.input) > 2 and n.input[2] in zps}))
            self.network.source = path
            self.network.inputs = [i.name for i in model.graph.input if i.name not in init]
            self.network.outputs = [o.name for o in model.graph.output]
            self.network.plugin_ops = ops
            return True

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return memoryview(self.data + b"+")

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            rec("set_shape", name, list(lo), list(opt), list(hi))
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), (name, lo, opt, hi)
            self.shapes[name] = [list(lo), list(opt), list(hi)]

    class Config:
        def __init__(self):
            self.profiles, self.pools, self.cache = [], {}, None
            self.builder_optimization_level = 3
            self.plugins_to_serialize = []

        def set_memory_pool_limit(self, pool, size):
            rec("set_memory_pool_limit", pool, size)
            self.pools[pool] = size

        def set_flag(self, flag):
            rec("set_flag", flag)

        def create_timing_cache(self, data):
            rec("create_timing_cache", bytes(data))
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            rec("set_timing_cache", cache.data, ignore_mismatch)
            if cache.data.startswith(b"OTHER-GPU"):
                return False
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, p):
            self.profiles.append(p)
            return len(self.profiles) - 1

    class Builder:
        def __init__(self, logger):
            rec("Builder")

        def get_plugin_registry(self):
            rec("builder.get_plugin_registry")
            return registry

        def create_network(self, flags=0):
            rec("create_network", flags)
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            rec("build_serialized_network", network.source, config.builder_optimization_level,
                config.pools.get("WORKSPACE"), len(config.profiles), list(config.plugins_to_serialize))
            if m.fail_build or network.source is None:
                return None
            config.cache = TimingCache((config.cache.data if config.cache else b"") + b"|" + Path(network.source).name.encode())
            plan = {"version": m.__version__, "onnx": network.source, "inputs": network.inputs,
                    "outputs": network.outputs, "profiles": [p.shapes for p in config.profiles],
                    "plugins": network.plugin_ops, "serialized_plugins": list(config.plugins_to_serialize)}
            return memoryview(b"FAKETRT" + json.dumps(plan).encode())

    class Engine:
        def __init__(self, plan):
            self.plan = plan
            self.names = plan["inputs"] + plan["outputs"]
            self._session = None

        @property
        def num_io_tensors(self):
            return len(self.names)

        @property
        def num_optimization_profiles(self):
            return len(self.plan["profiles"])

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return TensorIOMode.INPUT if name in self.plan["inputs"] else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return DataType.FLOAT

        def get_tensor_profile_shape(self, name, i):
            return self.plan["profiles"][i][name]

        def create_execution_context(self):
            rec("create_execution_context")
            return Context(self)

        def session(self):
            if self._session is None:
                import onnx
                import onnxruntime as ort

                model = _strip_plugins(onnx.load(self.plan["onnx"]))
                self._session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            return self._session

    class Context:
        def __init__(self, engine):
            self.engine, self.profile, self.shapes, self.addr = engine, 0, {}, {}
            self._shape_cache = {}

        def set_optimization_profile_async(self, idx, stream):
            rec("set_optimization_profile_async", idx, stream)
            if not 0 <= idx < self.engine.num_optimization_profiles:
                return False
            self.profile = idx
            return True

        def set_input_shape(self, name, shape):
            rec("set_input_shape", name, tuple(shape))
            lo, _, hi = self.engine.plan["profiles"][self.profile][name]
            if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
                return False
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, ptr):
            rec("set_tensor_address", name)
            self.addr[name] = ptr

        def _outputs(self, feeds):
            outs = self.engine.session().run(None, feeds)
            return dict(zip([o.name for o in self.engine.session().get_outputs()], outs))

        def get_tensor_shape(self, name):
            if name in self.engine.plan["inputs"]:
                return self.shapes[name]
            key = tuple(sorted(self.shapes.items()))
            if key not in self._shape_cache:
                zeros = {n: np.zeros(s, np.float32) for n, s in self.shapes.items()}
                self._shape_cache[key] = {k: v.shape for k, v in self._outputs(zeros).items()}
            return self._shape_cache[key][name]

        def execute_async_v3(self, stream):
            rec("execute_async_v3", stream)
            feeds = {n: m.cuda.read(self.addr[n], self.shapes[n], np.float32) for n in self.engine.plan["inputs"]}
            for n, v in self._outputs(feeds).items():
                m.cuda.write(self.addr[n], v.astype(np.float32))
            return True

    class Runtime:
        def __init__(self, logger):
            rec("Runtime")
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, data):
            rec("deserialize_cuda_engine", len(data))
            data = bytes(data)
            if not data.startswith(b"FAKETRT"):
                return None
            plan = json.loads(data[len(b"FAKETRT"):])
            if plan["version"] != m.__version__:
                return None  # the real runtime refuses a plan of another version
            if plan["plugins"] and not (m.loaded_libraries or (plan["serialized_plugins"]
                                                               and self.engine_host_code_allowed)):
                return None  # plugin creators not registered
            return Engine(plan)

    for name, obj in dict(Logger=Logger, NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag,
                          MemoryPoolType=MemoryPoolType, TensorIOMode=TensorIOMode, DataType=DataType,
                          BuilderFlag=BuilderFlag, nptype=nptype, get_plugin_registry=get_plugin_registry,
                          OnnxParser=OnnxParser, Builder=Builder, Runtime=Runtime).items():
        setattr(m, name, obj)
    return m


def call_names(trt) -> list[str]:
    return [c[0] for c in trt.calls]


# ------------------------------------------------------------------------------------ fake cudart
def make_fake_cudart(devices: int = 1, name: bytes = b"NVIDIA A100-SXM4-80GB", cc=(8, 0), fail: set[str] = frozenset()):
    """A stand-in for ``cuda.bindings.runtime``: every call returns ``(err, *values)``."""
    rt = types.SimpleNamespace(calls=[])

    class Err(int):
        pass

    rt.cudaError_t = types.SimpleNamespace(cudaSuccess=Err(0), cudaErrorNoDevice=Err(100),
                                           cudaErrorMemoryAllocation=Err(2))
    rt.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice="H2D", cudaMemcpyDeviceToHost="D2H")
    ok = rt.cudaError_t.cudaSuccess

    def call(fn_name, *values, err=None):
        rt.calls.append(fn_name)
        if fn_name in fail:
            return (err or rt.cudaError_t.cudaErrorMemoryAllocation, *([None] * len(values)))
        return (ok, *values)

    class Stream(int):
        pass

    rt.cudaGetDeviceCount = lambda: (rt.cudaError_t.cudaErrorNoDevice, 0) if devices < 0 else call(
        "cudaGetDeviceCount", devices)
    rt.cudaSetDevice = lambda d: call("cudaSetDevice")
    rt.cudaGetDeviceProperties = lambda d: call("cudaGetDeviceProperties", types.SimpleNamespace(
        name=name + b"\0\0\0", major=cc[0], minor=cc[1]))
    rt.cudaMalloc = lambda n: call("cudaMalloc", 0xABC000)
    rt.cudaFree = lambda p: call("cudaFree")
    rt.cudaStreamCreate = lambda: call("cudaStreamCreate", Stream(0x5150))
    rt.cudaMemcpyAsync = lambda dst, src, n, kind, s: call(f"cudaMemcpyAsync:{kind}")
    rt.cudaStreamSynchronize = lambda s: call("cudaStreamSynchronize")
    rt.cudaGetErrorString = lambda e: (ok, b"fake error %d" % int(e))
    return rt


# ------------------------------------------------------------------------------------ synthetic export
def _vi(name, dims):
    import onnx

    return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims)


def _model(nodes, inputs, outputs, inits, plugin: bool = False):
    import onnx

    g = onnx.helper.make_graph(nodes, "g", inputs, outputs, inits)
    opsets = [onnx.helper.make_opsetid("", 18)] + ([onnx.helper.make_opsetid("hiwin", 1)] if plugin else [])
    model = onnx.helper.make_model(g, opset_imports=opsets)
    model.ir_version = 9
    return model


def synthetic_graphs(channels: int = 8, queries: int = 4, width: int = 6, plugin_jbu: bool = False, seed: int = 0):
    """Small vit / jbu / hiwin graphs with the exported graphs' I/O contract (names, ranks, axes)."""
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    C, Q, D = channels, queries, width
    t = lambda a, n: numpy_helper.from_array(np.asarray(a), n)  # noqa: E731
    vit = _model([helper.make_node("AveragePool", ["pixel_values"], ["pooled"], kernel_shape=[14, 14], strides=[14, 14]),
                  helper.make_node("Conv", ["pooled", "w"], ["features"])],
                 [_vi("pixel_values", ["batch", 3, "14h", "14w"])], [_vi("features", ["batch", C, "h", "w"])],
                 [t(rng.standard_normal((C, 3, 1, 1)).astype(np.float32), "w")])
    jnodes = [helper.make_node("ReduceMean", ["pixel_values", "ax"], ["g"], keepdims=1),
              helper.make_node("Resize", ["features", "", "s2"], ["r2"], mode="nearest"),
              helper.make_node("Resize", ["features", "", "s4"], ["r4"], mode="nearest"),
              helper.make_node("Add", ["r2", "g"], ["feat2x"]), helper.make_node("Add", ["r4", "g"], ["feat4x"])]
    if plugin_jbu:  # dangling plugin node: the build sees the op, the fake executor drops it
        jnodes.append(helper.make_node("HiwinJbuConv", ["features", "pixel_values"], ["unused"], domain="hiwin"))
    jbu = _model(jnodes, [_vi("features", ["batch", C, "h", "w"]), _vi("pixel_values", ["batch", 3, "14h", "14w"])],
                 [_vi("feat2x", ["batch", C, "2h", "2w"]), _vi("feat4x", ["batch", C, "4h", "4w"])],
                 [t(np.array([1, 2, 3], np.int64), "ax"), t(np.array([1, 1, 2, 2], np.float32), "s2"),
                  t(np.array([1, 1, 4, 4], np.float32), "s4")], plugin=plugin_jbu)
    hnodes = [helper.make_node("ReduceMean", [f"feat{k}x", "ax"], [f"m{k}"], keepdims=0) for k in (1, 2, 4)]
    hnodes += [helper.make_node("Add", ["m1", "m2"], ["m12"]), helper.make_node("Add", ["m12", "m4"], ["m"]),
               helper.make_node("MatMul", ["m", "w"], ["flat"]), helper.make_node("Reshape", ["flat", "shape"], ["tokens"])]
    hiwin = _model(hnodes, [_vi("feat1x", ["batch", C, "h", "w"]), _vi("feat2x", ["batch", C, "2h", "2w"]),
                            _vi("feat4x", ["batch", C, "4h", "4w"])], [_vi("tokens", ["batch", Q, D])],
                   [t(np.array([2, 3], np.int64), "ax"), t(rng.standard_normal((C, Q * D)).astype(np.float32), "w"),
                    t(np.array([0, Q, D], np.int64), "shape")])
    for mdl in (vit, jbu, hiwin):
        onnx.checker.check_model(mdl)
    return {"vit": vit, "jbu": jbu, "hiwin": hiwin}


_AXES = {"vit": ({"pixel_values": {"0": "batch", "2": "14h", "3": "14w"}}, {"features": {"0": "batch", "2": "h", "3": "w"}}),
         "jbu": ({"features": {"0": "batch", "2": "h", "3": "w"}, "pixel_values": {"0": "batch", "2": "14h", "3": "14w"}},
                 {"feat2x": {"0": "batch", "2": "2h", "3": "2w"}, "feat4x": {"0": "batch", "2": "4h", "3": "4w"}}),
         "hiwin": ({"feat1x": {"0": "batch", "2": "h", "3": "w"}, "feat2x": {"0": "batch", "2": "2h", "3": "2w"},
                    "feat4x": {"0": "batch", "2": "4h", "3": "4w"}}, {"tokens": {"0": "batch"}})}

BUNDLE_GRIDS = ((24, 24), (18, 24), (16, 36))


def write_synthetic_export(out: Path, *, precisions=("fp32",), plugin_jbu: bool = False, bundles=BUNDLE_GRIDS,
                           channels: int = 8, faithful: bool = False) -> Path:
    """An export directory (manifest version 2) with the synthetic vision graphs, their Polygraphy
    bundles (references from ONNX Runtime) and no language graphs. ``faithful``: one projector graph
    per sampling-grid bucket (``hiwin_{oh}x{ow}``) instead of the any-grid ``hiwin`` (no bundles)."""
    import onnx
    import onnxruntime as ort

    from hiwin_runtime.buckets import HIWIN_BUCKETS, bucket_rule
    from hiwin_runtime.config import HiwinConfig
    from hiwin_runtime.manifest import sha256

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models = synthetic_graphs(channels, plugin_jbu=plugin_jbu)
    graphs = {}
    from hiwin_runtime.graph_id import GraphId

    units = [(fam, None) for fam in ("vit", "jbu")] + (
        [("hiwin", b) for b in HIWIN_BUCKETS] if faithful else [("hiwin", None)])
    for prec in precisions:
        for fam, bucket in units:
            mdl = models[fam]
            name = GraphId(fam, bucket, prec).name
            f = out / f"{name}.onnx"
            onnx.save_model(mdl, str(f))
            ins, outs = _AXES[fam]

            def io(vs, axes):
                return [{"name": v.name, "dtype": "float32",
                         "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
                         "dynamic_axes": axes[v.name]} for v in vs]

            entry = {"file": f.name, "sha256": sha256(f), "kind": "vision", "family": fam,
                     "bucket": list(bucket) if bucket else None,
                     "precision": prec, "inputs": io(mdl.graph.input, ins), "outputs": io(mdl.graph.output, outs)}
            if plugin_jbu:
                entry["plugins"] = sorted({n.op_type for n in mdl.graph.node if n.op_type in PLUGIN_OPS})
            graphs[name] = entry
    manifest = {"manifest_version": 2, "opset": 18, "flavour": "tensorrt" if plugin_jbu else "onnx",
                "shape_ranges": {"batch": [1, 64], "patches_per_side": [2, 288], "patch_size": 14},
                "buckets": {"family": "hiwin", "rule": bucket_rule(),
                            "graphs": {f"{oh}x{ow}": f"hiwin_{oh}x{ow}" if faithful else "hiwin"
                                       for oh, ow in HIWIN_BUCKETS}},
                "config": HiwinConfig().to_dict(), "graphs": graphs, "weights": {}, "bundles": {}}
    rng = np.random.default_rng(1)
    sessions = {fam: ort.InferenceSession(_strip_plugins(mdl).SerializeToString(), providers=["CPUExecutionProvider"])
                for fam, mdl in models.items()}
    C = channels
    bundles = () if faithful else bundles
    if bundles:
        from polygraphy.comparator import RunResults
        from polygraphy.comparator.struct import IterationResult
        from polygraphy.json import save_json
    for h, w in bundles:
        px = rng.standard_normal((1, 3, 14 * h, 14 * w)).astype(np.float32)
        (f1,) = sessions["vit"].run(None, {"pixel_values": px})
        f2, f4 = sessions["jbu"].run(None, {"features": f1, "pixel_values": px})
        calls = {"vit": {"pixel_values": px}, "jbu": {"features": f1, "pixel_values": px},
                 "hiwin": {"feat1x": f1, "feat2x": f2, "feat4x": f4}}
        assert f1.shape == (1, C, h, w)
        for fam, feeds in calls.items():
            s = sessions[fam]
            outs = dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))
            d = out / "bundles" / fam / f"{h}x{w}"
            d.mkdir(parents=True)
            save_json([feeds], str(d / "inputs.json"))
            rr = RunResults()
            rr.append(("reference", [IterationResult(outs, runner_name="reference")]))
            rr.save(str(d / "reference_outputs.json"))
            rel = d.relative_to(out)
            atol = " ".join(f"{k}:{1e-4 * float(np.abs(v).max()):.6g}" for k, v in outs.items())
            common = (f"--load-inputs {rel}/inputs.json --load-outputs {rel}/reference_outputs.json "
                      f"--check-error-stat max --rtol 0 --atol {atol}")
            shapes = " ".join(f"{k}:[{','.join(map(str, v.shape))}]" for k, v in feeds.items())
            (d / "bundle.json").write_text(json.dumps({
                "graph": f"{fam}.onnx", "inputs": {k: list(v.shape) for k, v in feeds.items()},
                "outputs": {k: list(v.shape) for k, v in outs.items()},
                "onnxrt_command": f"polygraphy run {fam}.onnx --onnxrt {common}",
                "trt_command": f"polygraphy run {fam}.onnx --trt --trt-min-shapes {shapes} --trt-opt-shapes {shapes} "
                               f"--trt-max-shapes {shapes} {common}"}))
            manifest["bundles"].setdefault(fam, []).append(str(rel))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


class DeviceMemory:
    """The real CUDA layer (:class:`hiwin_runtime.trt.CudaRuntime`) plus the ``read`` / ``write`` the
    fake TensorRT's contexts use, so the fake engines run on real device buffers."""

    def __init__(self):
        from hiwin_runtime.trt import CudaRuntime

        self.rt = CudaRuntime()
        self.calls: list[tuple] = []
        self._s = self.rt.stream()

    def __getattr__(self, name):
        return getattr(self.rt, name)

    def read(self, ptr: int, shape, dtype) -> np.ndarray:
        self.rt._call("cudaDeviceSynchronize", self.rt.rt.cudaDeviceSynchronize())  # the runner's copies first
        out = np.empty(shape, dtype)
        self.rt.d2h(out, ptr, self._s)
        self.rt.sync(self._s)
        return out

    def write(self, ptr: int, array: np.ndarray) -> None:
        self.rt.h2d(ptr, np.ascontiguousarray(array), self._s)
        self.rt.sync(self._s)


# ------------------------------------------------------------------------------------ synthetic Q/DQ graphs
QDQ_TENSORS = {"vit": ("pooled", "w"), "jbu": ("g",), "hiwin": ("m", "w")}  # activations / weights quantised


def qdq_model(model, tensors, feeds: list[dict], mode: str = "int8"):
    """``model`` with a QuantizeLinear -> DequantizeLinear pair on each of ``tensors`` (activations or
    initializers; per-tensor, symmetric, scale = max|x| / qmax over runs on ``feeds``), the form of
    ModelOpt's explicit quantisation: int8 or fp8 (Float8E4M3FN, opset 19)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    acts = [t for t in tensors if t not in inits]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in acts)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    amax = {t: max(float(np.abs(v).max()) for v in vs) for t, vs in zip(
        [o.name for o in sess.get_outputs()], zip(*(sess.run(None, f) for f in feeds)))}
    amax.update({t: float(np.abs(v).max()) for t, v in inits.items()})
    qmax, zp_type = (127.0, onnx.TensorProto.INT8) if mode == "int8" else (448.0, onnx.TensorProto.FLOAT8E4M3FN)
    nodes = []
    for t in tensors:
        scale = np.float32(max(amax[t], 1e-8) / qmax)
        model.graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{t}_scale"),
                                        helper.make_tensor(f"{t}_zp", zp_type, [], [0])])
        for n in model.graph.node:
            n.input[:] = [f"{t}_dq" if i == t else i for i in n.input]
        nodes += [helper.make_node("QuantizeLinear", [t, f"{t}_scale", f"{t}_zp"], [f"{t}_q"],
                                   name=f"{t}_QuantizeLinear"),
                  helper.make_node("DequantizeLinear", [f"{t}_q", f"{t}_scale", f"{t}_zp"], [f"{t}_dq"],
                                   name=f"{t}_DequantizeLinear")]
    pending, known = list(model.graph.node) + nodes, set(inits) | {i.name for i in model.graph.input} | {""}
    known |= {i.name for i in model.graph.initializer}
    out = []
    while pending:  # topological order
        ready = [n for n in pending if all(i in known for i in n.input)]
        assert ready, "cycle"
        for n in ready:
            out.append(n)
            known.update(n.output)
        pending = [n for n in pending if n not in ready]
    del model.graph.node[:]
    model.graph.node.extend(out)
    if mode == "fp8":
        del model.opset_import[:]
        model.opset_import.extend([helper.make_opsetid("", 19)])
    onnx.checker.check_model(model)
    return model


def add_qdq_graphs(export: Path, mode: str = "int8", provenance: dict | None = None) -> Path:
    """Add ``<family>.int8trt`` / ``.fp8trt`` Q/DQ graphs (:func:`qdq_model`) to a synthetic export, listed
    in its manifest with a provenance entry shaped like ``hiwin-export quantize --backend modelopt``'s."""
    import onnx

    from hiwin_runtime.manifest import sha256

    export = Path(export)
    precision = {"int8": "int8trt", "fp8": "fp8trt"}[mode]
    mf = json.loads((export / "manifest.json").read_text())
    models = synthetic_graphs(mf["graphs"]["vit"]["outputs"][0]["shape"][1])
    import onnxruntime as ort

    # calibration: fresh random crops through the fp32 chain (each graph sees what the one before gives it)
    rng = np.random.default_rng(5)
    sess = {f: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
            for f, m in models.items()}
    feeds = {"vit": [], "jbu": [], "hiwin": []}
    for h, w in ((24, 24), (12, 40), (40, 12), (16, 32)):
        px = rng.standard_normal((1, 3, 14 * h, 14 * w)).astype(np.float32)
        (f1,) = sess["vit"].run(None, {"pixel_values": px})
        f2, f4 = sess["jbu"].run(None, {"features": f1, "pixel_values": px})
        feeds["vit"].append({"pixel_values": px})
        feeds["jbu"].append({"features": f1, "pixel_values": px})
        feeds["hiwin"].append({"feat1x": f1, "feat2x": f2, "feat4x": f4})
    for fam in ("vit", "jbu", "hiwin"):
        q = qdq_model(models[fam], QDQ_TENSORS[fam], feeds[fam], mode)
        f = export / f"{fam}.{precision}.onnx"
        onnx.save_model(q, str(f))
        entry = dict(mf["graphs"][fam])
        entry.update(file=f.name, sha256=sha256(f), precision=precision, provenance={
            "backend": "modelopt", "mode": mode, "method": f"modelopt.onnx.quantization.quantize, mode {mode}, "
            "calibration max", "calibration_sha256": f"synthetic-{fam}", "calibration_samples": 1,
            "qdq_pairs": len(QDQ_TENSORS[fam]), "high_precision_dtype": "fp32", "policy": {"x": "not recorded"},
            **(provenance or {})})
        mf["graphs"][f"{fam}.{precision}"] = entry
    (export / "manifest.json").write_text(json.dumps(mf, indent=1))
    return export
