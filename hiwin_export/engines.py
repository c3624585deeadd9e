"""TensorRT engine sets from an export directory: build, trtexec script, index, verification.

    hiwin-export engines --export hiwin-onnx --out engines-h100 --target h100 [--precision fp16]
    hiwin-export engines --export hiwin-onnx --out engines-orin --target orin --emit-trtexec build-orin.sh
    hiwin-export verify-engines --export hiwin-onnx --engines engines-h100 [--mode polygraphy]

One engine per vision graph of the chosen precision (``vit``, ``jbu`` and the projector: the fast
export's projector is the single any-grid graph ``hiwin.onnx``, so the set holds one engine and one
copy of the projector weights; a faithful export has one graph, hence one engine and one weight
copy, per sampling-grid bucket). Every network is strongly typed (the fp16 graphs carry their own
casts, the int8trt / fp8trt graphs ModelOpt's Q/DQ nodes; no precision builder flags, which TensorRT 11
removed). Quantised sets are built from an onnx-flavour export's ``*.int8trt`` / ``*.fp8trt`` graphs
(``hiwin-export quantize --backend modelopt``; a plugin-flavour export has none, since calibration runs
on ONNX Runtime), fp8 only for targets with FP8 tensor cores (h100), and their provenance goes into
``engines.json``. Each engine gets the optimisation
profiles of :mod:`hiwin_export.profiles` (every crop the slicer makes, plus the bundles' grids), a
batch range (ViT: up to ``max_slices + 1`` crops of one shape; JBU and projector: the runtime's
up-sampling batch, 1 by default; the runtime splits larger batches), the workspace limit, the
builder optimisation level, a shared timing cache and, for plugin-flavour exports, the plugin
library (``engines/plugins`` -> ``libhiwin_plugins.so``), which is copied into the set.

The set is written to a temporary directory and renamed into place, with ``engines.json``
(:data:`hiwin_runtime.trt.ENGINES_JSON`): TensorRT version, GPU name and compute capability, target,
profiles, sha256 of every engine, source graph, weights file and the plugin library, and the build
options. :class:`hiwin_runtime.trt.TrtRunner` reads it back and refuses a set built by another
TensorRT version or for another compute capability.

``--emit-trtexec`` needs no TensorRT: it writes a shell script with the CMake commands that build the
plugin library on the target and the exact ``trtexec`` command per engine (the same profiles, in
the same order), followed by ``hiwin-export engines --index`` (which checks the engines with
TensorRT and writes ``engines.json``) and ``hiwin-export verify-engines``.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hiwin_runtime.graph_id import GraphId
from hiwin_runtime.manifest import ExportDir, ExportError, sha256
from hiwin_runtime.trt import (ENGINES_FORMAT, ENGINES_JSON, EngineError, TrtRunner, choose_profile, load_tensorrt,
                               plugin_registry, read_engine_set, trt_major)

from .profiles import DEFAULT_NUM_PROFILES, BatchRange, GridProfile, input_shapes, profile_plan

log = logging.getLogger("hiwin_export")

PLUGIN_OPS = ("HiwinRoiAlign", "HiwinJbuConv")  # op types served by libhiwin_plugins.so (engines/plugins)
PLUGIN_LIB_NAME = "libhiwin_plugins.so"
# Precisions an engine set can be built from. fp16: the export's cast graphs; int8trt / fp8trt: ModelOpt's
# Q/DQ graphs (hiwin-export quantize --backend modelopt), built as explicitly quantised, strongly typed
# networks (the Q/DQ nodes carry the precision: no INT8 / FP8 builder flag, no calibrator).
ENGINE_PRECISIONS = ("fp32", "fp16", "int8trt", "fp8trt")
QDQ_MODES = {"int8trt": "int8", "fp8trt": "fp8"}  # engine precision -> ModelOpt quantize_mode
FP8_MIN_SM = (8, 9)  # FP8 tensor cores: Ada (sm_89) and Hopper (sm_90); not A100 (sm_80) nor Orin (sm_87)


class BuildError(RuntimeError):
    """An engine set could not be built (parser or builder failure, wrong GPU, missing plugin library)."""


@dataclass(frozen=True)
class Target:
    name: str
    gpu: str
    compute_capability: tuple[int, int]
    arch: str  # the target's CPU architecture (plugin library build)
    trt_major: int  # the TensorRT major the emitted script is written for by default
    workspace_gib: int
    trt_include: str  # where the target's TensorRT headers / libraries usually are
    trt_lib: str

    @property
    def sm(self) -> str:
        return f"{self.compute_capability[0]}{self.compute_capability[1]}"

    @property
    def has_fp8(self) -> bool:
        return tuple(self.compute_capability) >= FP8_MIN_SM


TARGETS = {
    "a100": Target("a100", "NVIDIA A100", (8, 0), "x86_64", 10, 8, "/usr/include/x86_64-linux-gnu",
                   "/usr/lib/x86_64-linux-gnu"),
    "h100": Target("h100", "NVIDIA H100", (9, 0), "x86_64", 10, 8, "/usr/include/x86_64-linux-gnu",
                   "/usr/lib/x86_64-linux-gnu"),
    # Jetson Orin: JetPack 6 ships TensorRT 10.3 (TensorRT 11 has no JetPack release); memory is
    # shared with the CPU, so a smaller workspace.
    "orin": Target("orin", "NVIDIA Jetson Orin", (8, 7), "aarch64", 10, 2, "/usr/include/aarch64-linux-gnu",
                   "/usr/lib/aarch64-linux-gnu"),
}


@dataclass
class EngineOptions:
    target: str = "h100"
    precision: str = "fp32"
    plugin_lib: str | None = None
    workspace_gib: float | None = None  # None: the target's default
    opt_level: int = 3  # TensorRT's default builder optimisation level
    timing_cache: str | None = None
    num_profiles: int = DEFAULT_NUM_PROFILES
    max_slices: int = 9
    vision_batch: int | None = None  # None: max_slices + 1 (slices + an overview of the same shape)
    vision_opt_batch: int = 6  # the 3x2 slices of a typical 3:2 / 4:3 photo
    upsample_batch: int = 1  # the runtime's default (BatchPolicy.upsample_batch)
    serialize_plugins: bool = False  # embed the plugin library in the engines (runtime needs host code allowed)
    trt_major: int | None = None  # emitted scripts only: None = the target's

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r} (known: {', '.join(TARGETS)})")
        if self.precision == "int8":
            raise ValueError("precision int8 is ONNX Runtime's CPU placement (uint8 asymmetric activations, which "
                             "TensorRT's int8 does not take); TensorRT engines use int8trt (hiwin-export quantize "
                             "--backend modelopt --mode int8)")
        if self.precision not in ENGINE_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(ENGINE_PRECISIONS)}, got {self.precision!r}")
        t = TARGETS[self.target]
        if self.precision == "fp8trt" and not t.has_fp8:
            raise ValueError(f"precision fp8trt: target {t.name} ({t.gpu}, sm_{t.sm}) has no FP8 tensor cores (FP8 "
                             f"needs sm_{FP8_MIN_SM[0]}{FP8_MIN_SM[1]}+: Ada / Hopper, e.g. h100); build --precision "
                             f"int8trt for {t.name}")
        if not 0 <= self.opt_level <= 5:
            raise ValueError(f"--opt-level must be in 0..5, got {self.opt_level}")
        if self.workspace_gib is not None and self.workspace_gib <= 0:
            raise ValueError(f"--workspace-gib must be > 0, got {self.workspace_gib}")
        if self.trt_major not in (None, 10, 11):
            raise ValueError(f"TensorRT major must be 10 or 11, got {self.trt_major}")
        if self.target == "orin" and self.trt_major == 11:
            raise ValueError("Jetson Orin runs TensorRT 10.3 (JetPack 6); TensorRT 11 has no JetPack release")

    @property
    def tgt(self) -> Target:
        return TARGETS[self.target]

    @property
    def workspace(self) -> float:
        return self.workspace_gib if self.workspace_gib is not None else self.tgt.workspace_gib

    def batch(self, family: str) -> BatchRange:
        if family == "vit":
            top = self.vision_batch or self.max_slices + 1
            return BatchRange(1, min(self.vision_opt_batch, top), top)
        return BatchRange(1, 1, self.upsample_batch)

    def to_json(self) -> dict:
        d = asdict(self)
        d["workspace_gib"] = self.workspace
        return d


# ------------------------------------------------------------------------------------ the plan
@dataclass
class EnginePlan:
    graph: GraphId
    file: str  # engine file name in the set
    source: Path
    entry: dict  # the manifest's graph entry
    profiles: list[GridProfile]
    batch: BatchRange
    shapes: list[dict[str, tuple[list[int], list[int], list[int]]]]  # per profile: input -> (min, opt, max)
    plugin_ops: list[str] = field(default_factory=list)


def _quantize_hint(export: ExportDir, precision: str) -> str:
    return (f"hiwin-export quantize --export {export.path} --backend modelopt --mode {QDQ_MODES[precision]} "
            "--families vit,jbu,hiwin")


def vision_graphs(export: ExportDir, precision: str) -> list[GraphId]:
    gids = [g for g in export.graph_ids() if g.is_vision and g.precision == precision]
    if not gids and precision in QDQ_MODES:
        if export.flavour != "onnx":
            # ModelOpt calibrates on ONNX Runtime, which cannot run the plugin nodes: quantised graphs exist for
            # onnx-flavour exports only, and TensorRT builds those with its own ops (no plugin library).
            raise ExportError(f"{export.path}: a {export.flavour!r}-flavour export has no {precision} graphs "
                              "(quantisation calibrates on ONNX Runtime, which cannot run the plugin nodes): quantise "
                              "the onnx-flavour export of the same model and build its engines from it (TensorRT "
                              "builds its JBU and projector with its own ops, no plugin library)")
        raise ExportError(f"{export.path}: no {precision} vision graphs; make them first: "
                          f"{_quantize_hint(export, precision)}")
    if not gids:
        raise ExportError(f"{export.path}: no {precision} vision graphs (exported with --no-fp16?)")
    fams = {g.family for g in gids}
    missing = [f for f in ("vit", "jbu", "hiwin") if f not in fams]
    if missing:
        hint = f" ({_quantize_hint(export, precision)})" if precision in QDQ_MODES else ""
        raise ExportError(f"{export.path}: the {precision} vision path needs {', '.join(missing)} as well{hint}")
    if precision in QDQ_MODES:
        for g in gids:
            prov = export.graphs[g.name].get("provenance") or {}
            if prov.get("backend") != "modelopt" or prov.get("mode") != QDQ_MODES[precision]:
                raise ExportError(f"{export.path}: {g.file} is not a ModelOpt {QDQ_MODES[precision]} Q/DQ graph "
                                  f"(provenance backend {prov.get('backend')!r}, mode {prov.get('mode')!r}); "
                                  f"re-make it: {_quantize_hint(export, precision)}")
    return gids


def plugin_ops(onnx_path: Path) -> list[str]:
    """The plugin op types (:data:`PLUGIN_OPS`) a graph uses, subgraphs and functions included."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    found = set()

    def walk(nodes):
        for n in nodes:
            if n.op_type in PLUGIN_OPS:
                found.add(n.op_type)
            for a in n.attribute:
                if a.g is not None:
                    walk(a.g.node)
                for g in a.graphs:
                    walk(g.node)

    walk(model.graph.node)
    for f in model.functions:
        walk(f.node)
    return sorted(found)


def _bundle_grids(export: ExportDir, gid: GraphId) -> list[tuple[int, int]]:
    out = []
    for d in (export.manifest.get("bundles") or {}).get(gid.at("fp32").name, []):
        h, w = Path(d).name.split("x")
        out.append((int(h), int(w)))
    return out


def engine_plans(export: ExportDir, opts: EngineOptions) -> tuple[list[EnginePlan], dict]:
    """What to build: one plan per vision graph, with its profiles, batch range and input shapes;
    and the coverage summary written to ``engines.json``."""
    from hiwin_runtime.config import HiwinConfig

    sl = HiwinConfig.from_dict(export.manifest["config"]).slicing
    rng = tuple(export.manifest["shape_ranges"]["patches_per_side"])
    plans, coverage = [], {}
    for gid in vision_graphs(export, opts.precision):
        extra = _bundle_grids(export, gid)
        grids = None
        if gid.bucket is not None:  # faithful export: this graph serves one sampling-grid bucket only
            from .profiles import reachable_grids

            grids = {g for g in reachable_grids(sl.scale_resolution, sl.patch_size)
                     if export.bucket_for(g[1], g[0]) == tuple(gid.bucket)}
        pp = profile_plan(scale_resolution=sl.scale_resolution, patch_size=sl.patch_size, patch_range=rng,
                          extra=extra, grids=grids, num_profiles=opts.num_profiles)
        if not pp.profiles:
            raise BuildError(f"{gid.name}: no crop the slicer makes reaches this graph (nothing to build it for)")
        entry = export.graphs[gid.name]
        batch = opts.batch(gid.family)
        shapes = [input_shapes(entry, p, batch) for p in pp.profiles]
        # the tensorrt flavour lists its plugin ops in the manifest; otherwise look into the graph
        ops = entry["plugins"] if "plugins" in entry else plugin_ops(export.graph_path(gid))
        plans.append(EnginePlan(gid, f"{gid.name}.plan", export.graph_path(gid), entry, pp.profiles, batch, shapes,
                                sorted(ops)))
        coverage[gid.name] = pp.to_json()
    return plans, coverage


def _projector_note(plans: list[EnginePlan]) -> dict:
    proj = [p.graph.name for p in plans if p.graph.family == "hiwin"]
    if len(proj) == 1 and plans and all(p.graph.bucket is None for p in plans if p.graph.family == "hiwin"):
        note = ("the export's fast projector is one any-grid graph (hiwin.onnx): one engine, one copy of the "
                "projector weights for every crop")
    else:
        note = (f"faithful export: one projector graph per sampling-grid bucket, so {len(proj)} engines and "
                f"{len(proj)} copies of the projector weights")
    return {"engines": proj, "weight_copies": len(proj), "note": note}


def _plugin_info(plans: list[EnginePlan], opts: EngineOptions) -> dict:
    ops = sorted({o for p in plans for o in p.plugin_ops})
    if not ops:
        return {"required": False, "ops": []}
    if not opts.plugin_lib:
        raise BuildError(f"the graphs use the plugin ops {', '.join(ops)}: pass --plugin-lib "
                         f"path/to/{PLUGIN_LIB_NAME} (built from engines/plugins, see docs/tensorrt.md)")
    lib = Path(opts.plugin_lib)
    if not lib.is_file():
        raise BuildError(f"--plugin-lib {lib}: no such file")
    return {"required": True, "ops": ops, "library": str(lib.resolve()), "sha256": sha256(lib),
            "bundled": f"plugins/{lib.name}", "serialized": bool(opts.serialize_plugins)}


def _shape_str(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


# ------------------------------------------------------------------------------------ build
def network_flags(trt) -> int:
    """Strongly typed: TensorRT 10 needs the creation flag; TensorRT 11 is always strongly typed
    (the flag is deprecated and ignored there, EXPLICIT_BATCH is gone)."""
    if trt_major(trt.__version__) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _device(cuda):
    if cuda is None:
        from hiwin_runtime.trt import CudaRuntime

        cuda = CudaRuntime()
    return cuda.device()


def _check_target(device, opts: EngineOptions) -> None:
    t = opts.tgt
    if tuple(device.compute_capability) != t.compute_capability:
        raise BuildError(f"this GPU is {device.name} ({device.sm}); target {t.name} ({t.gpu}) needs sm_{t.sm}: build "
                         f"the engines on the target (or emit the trtexec script with --emit-trtexec and run it there)")


def build_engines(export_dir: str | os.PathLike, out_dir: str | os.PathLike, opts: EngineOptions, *,
                  overwrite: bool = False, trt: Any = None, cuda: Any = None) -> dict:
    """Build the engine set of ``export_dir`` into ``out_dir`` (atomically); returns ``engines.json``.
    ``trt`` / ``cuda``: test doubles of the ``tensorrt`` module and of :class:`~hiwin_runtime.trt.CudaApi`."""
    from hiwin_model.checkpoint import atomic_directory

    export = ExportDir(export_dir)
    plans, coverage = engine_plans(export, opts)
    plugins = _plugin_info(plans, opts)
    trt = load_tensorrt(trt)
    device = _device(cuda)
    _check_target(device, opts)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if plugins["required"] and plugin_registry(trt, builder).load_library(plugins["library"]) is None:
        raise BuildError(f"TensorRT could not load the plugin library {plugins['library']}")
    cache_path = Path(opts.timing_cache) if opts.timing_cache else None
    cache = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    info = _header(export, opts, trt, device, plugins, coverage, plans, builder="python")

    def write(tmp: Path) -> None:
        nonlocal cache
        for plan in plans:
            t0 = time.perf_counter()
            log.info("building %s (%d profiles) ...", plan.file, len(plan.profiles))
            data, cache = _build_one(trt, builder, logger, plan, opts, cache, plugins)
            (tmp / plan.file).write_bytes(data)
            _check_engine(trt, logger, tmp / plan.file, plan)
            info["engines"][plan.graph.name] = _engine_entry(export, plan, tmp / plan.file)
            log.info("%s built in %.1f s", plan.file, time.perf_counter() - t0)
        if plugins["required"]:
            (tmp / "plugins").mkdir()
            shutil.copy2(plugins["library"], tmp / plugins["bundled"])
        (tmp / ENGINES_JSON).write_text(json.dumps(info, indent=1, sort_keys=True))

    atomic_directory(Path(out_dir), write, overwrite=overwrite)
    if cache_path is not None and cache:
        tmpc = cache_path.with_name(f".{cache_path.name}.{os.getpid()}")
        tmpc.write_bytes(cache)
        os.replace(tmpc, cache_path)
    return info


def _build_one(trt, builder, logger, plan: EnginePlan, opts: EngineOptions, cache: bytes, plugins: dict):
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(plan.source)):  # resolves the external weights next to the graph
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"{plan.source.name}: the ONNX parser failed: {errors or 'no error reported'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace * (1 << 30)))
    config.builder_optimization_level = opts.opt_level
    timing = config.create_timing_cache(cache)
    if not config.set_timing_cache(timing, False):  # from another GPU / TensorRT version: start afresh
        log.warning("timing cache %s does not match this GPU / TensorRT: starting a new one", opts.timing_cache)
        config.set_timing_cache(config.create_timing_cache(b""), False)
    for shapes in plan.shapes:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    if plugins.get("serialized"):
        config.plugins_to_serialize = [plugins["library"]]
    data = builder.build_serialized_network(network, config)
    if data is None:
        raise BuildError(f"{plan.source.name}: TensorRT could not build the engine (see its log above)")
    return bytes(data), bytes(config.get_timing_cache().serialize())


def _check_engine(trt, logger, path: Path, plan: EnginePlan) -> None:
    """The engine deserializes, with the planned profiles (count and input shapes)."""
    engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise BuildError(f"{path.name}: TensorRT cannot deserialize the engine it built")
    if engine.num_optimization_profiles != len(plan.shapes):
        raise BuildError(f"{path.name}: {engine.num_optimization_profiles} optimisation profiles, planned "
                         f"{len(plan.shapes)} (an engine from another build?)")
    for i, shapes in enumerate(plan.shapes):
        for name, want in shapes.items():
            got = [[int(d) for d in s] for s in engine.get_tensor_profile_shape(name, i)]
            if got != [list(s) for s in want]:
                raise BuildError(f"{path.name}: profile {i} of {name!r} is {got}, planned {[list(s) for s in want]}")


def _header(export: ExportDir, opts: EngineOptions, trt, device, plugins: dict, coverage: dict, plans, *,
            builder: str) -> dict:
    return {
        "format": ENGINES_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "target": opts.target, "precision": opts.precision,
        "tensorrt": {"version": trt.__version__, "major": trt_major(trt.__version__), "strongly_typed": True},
        "gpu": device.to_json(),
        "export": {"path": str(export.path.resolve()), "manifest_sha256": sha256(export.path / "manifest.json")},
        "build": {**opts.to_json(), "builder": builder},
        "plugins": plugins, "coverage": coverage, "projector": _projector_note(plans),
        "quantization": _quantization(opts, plans), "engines": {},
    }


# what engines.json keeps of a quantised graph's manifest provenance (the policy text stays in the manifest)
PROVENANCE_KEYS = ("backend", "mode", "method", "calibration_sha256", "calibration_samples", "qdq_pairs",
                   "nodes_excluded", "nodes_excluded_extra", "high_precision_dtype", "modelopt", "onnxruntime", "onnx")


def _provenance(plan: EnginePlan) -> dict | None:
    prov = plan.entry.get("provenance")
    return None if prov is None else {k: prov[k] for k in PROVENANCE_KEYS if k in prov}


def _quantization(opts: EngineOptions, plans: list[EnginePlan]) -> dict | None:
    """None for fp32 / fp16 sets; for int8trt / fp8trt: how the engines are quantised and from what."""
    if opts.precision not in QDQ_MODES:
        return None
    return {"precision": opts.precision, "mode": QDQ_MODES[opts.precision],
            "scheme": "explicit: ModelOpt Q/DQ nodes in the ONNX graphs, strongly typed network, no INT8/FP8 "
                      "builder flag and no calibrator",
            "graphs": {p.graph.name: _provenance(p) for p in plans}}


def _engine_entry(export: ExportDir, plan: EnginePlan, path: Path) -> dict:
    wf = plan.graph.weights_file
    weights = {wf: export.manifest["weights"][wf]["sha256"]} if wf in export.manifest.get("weights", {}) else {}
    return {"file": plan.file, "sha256": sha256(path), "bytes": path.stat().st_size,
            "source": {"graph": plan.graph.name, "file": plan.entry["file"], "sha256": plan.entry["sha256"],
                       "weights": weights},
            "inputs": [{"name": i["name"], "dynamic_axes": i["dynamic_axes"]} for i in plan.entry["inputs"]],
            "outputs": [o["name"] for o in plan.entry["outputs"]],
            "profiles": [p.to_json() for p in plan.profiles], "batch": plan.batch.to_json(),
            "shapes": [{n: [list(s) for s in v] for n, v in sh.items()} for sh in plan.shapes],
            "plugin_ops": plan.plugin_ops, "precision": plan.graph.precision, "provenance": _provenance(plan)}


# ------------------------------------------------------------------------------------ index
def index_engines(export_dir: str | os.PathLike, engines_dir: str | os.PathLike, opts: EngineOptions, *,
                  trt: Any = None, cuda: Any = None) -> dict:
    """Write ``engines.json`` for engines built by the emitted trtexec script (same plan, same
    options): each engine is deserialized and its profiles checked against the plan first."""
    export = ExportDir(export_dir)
    out = Path(engines_dir)
    plans, coverage = engine_plans(export, opts)
    plugins = _plugin_info(plans, opts)
    trt = load_tensorrt(trt)
    device = _device(cuda)
    _check_target(device, opts)
    logger = trt.Logger(trt.Logger.WARNING)
    if plugins["required"] and not plugins["serialized"]:
        if plugin_registry(trt).load_library(plugins["library"]) is None:
            raise BuildError(f"TensorRT could not load the plugin library {plugins['library']}")
    info = _header(export, opts, trt, device, plugins, coverage, plans, builder="trtexec")
    for plan in plans:
        path = out / plan.file
        if not path.is_file():
            raise BuildError(f"{path}: missing (did every trtexec command of the script succeed?)")
        _check_engine(trt, logger, path, plan)
        info["engines"][plan.graph.name] = _engine_entry(export, plan, path)
    if plugins["required"]:
        (out / "plugins").mkdir(exist_ok=True)
        if Path(plugins["library"]).resolve() != (out / plugins["bundled"]).resolve():
            shutil.copy2(plugins["library"], out / plugins["bundled"])
    tmp = out / f".{ENGINES_JSON}.{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=1, sort_keys=True))
    os.replace(tmp, out / ENGINES_JSON)
    return info


# ------------------------------------------------------------------------------------ trtexec script
def cmake_commands(opts: EngineOptions, source_var: str = "$HIWIN_SRC", build_var: str = "$PLUGIN_BUILD") -> list[str]:
    """Build ``libhiwin_plugins.so`` on the target (CUDA launchers for its SM + the TensorRT plugins)."""
    t = opts.tgt
    return [
        f'cmake -S "{source_var}/engines/plugins" -B "{build_var}" -DCMAKE_BUILD_TYPE=Release '
        f"-DHIWIN_BUILD_CPU=OFF -DHIWIN_BUILD_CUDA=ON -DHIWIN_BUILD_TRT=ON -DCMAKE_CUDA_ARCHITECTURES={t.sm} "
        f'-DTENSORRT_INCLUDE_DIRS="${{TENSORRT_INCLUDE_DIRS:-{t.trt_include}}}" '
        f'-DTENSORRT_LIB_DIR="${{TENSORRT_LIB_DIR:-{t.trt_lib}}}"',
        f'cmake --build "{build_var}" --target hiwin_plugins -j"$(nproc)"',
    ]


def trtexec_command(plan: EnginePlan, opts: EngineOptions, *, export_var: str = "$EXPORT", out_var: str = "$OUT",
                    plugin_var: str | None = None, cache_var: str | None = None) -> list[str]:
    """The trtexec arguments that build ``plan`` (one ``--profile=i`` block per profile, in order)."""
    major = opts.trt_major or opts.tgt.trt_major
    args = ["trtexec", f'--onnx="{export_var}/{plan.source.name}"', f'--saveEngine="{out_var}/{plan.file}"']
    if major < 11:
        args.append("--stronglyTyped")  # TensorRT 11: always strongly typed (and no --fp16/--int8/--best)
    for i, shapes in enumerate(plan.shapes):
        args.append(f"--profile={i}")
        for which, flag in ((0, "--minShapes"), (1, "--optShapes"), (2, "--maxShapes")):
            args.append(flag + "=" + ",".join(f"{n}:{_shape_str(s[which])}" for n, s in shapes.items()))
    args.append(f"--memPoolSize=workspace:{int(round(opts.workspace * 1024))}MiB")
    args.append(f"--builderOptimizationLevel={opts.opt_level}")
    if cache_var:
        args.append(f'--timingCacheFile="{cache_var}"')
    if plugin_var:
        args.append(f'--dynamicPlugins="{plugin_var}"')
        if opts.serialize_plugins:
            args.append(f'--setPluginsToSerialize="{plugin_var}"')
    args.append("--skipInference")
    return args


def emit_trtexec(export_dir: str | os.PathLike, out_dir: str | os.PathLike, opts: EngineOptions,
                 script: str | os.PathLike) -> str:
    """Write a bash script that builds the engine set on the target with trtexec (no TensorRT
    needed here); returns its text."""
    export = ExportDir(export_dir)
    plans, _ = engine_plans(export, opts)
    ops = sorted({o for p in plans for o in p.plugin_ops})
    t = opts.tgt
    major = opts.trt_major or t.trt_major
    src = Path(__file__).resolve().parents[1]
    idx_flags = [f"--target {t.name}", f"--precision {opts.precision}", f"--opt-level {opts.opt_level}",
                 f"--workspace-gib {opts.workspace:g}", f"--num-profiles {opts.num_profiles}",
                 f"--max-slices {opts.max_slices}", f"--upsample-batch {opts.upsample_batch}"]
    if opts.vision_batch:
        idx_flags.append(f"--vision-batch {opts.vision_batch}")
    if opts.serialize_plugins:
        idx_flags.append("--serialize-plugins")
    lines = [
        "#!/usr/bin/env bash",
        f"# TensorRT engine set for target {t.name} ({t.gpu}, sm_{t.sm}, {t.arch}), TensorRT {major}.x"
        + (" (JetPack 6: TensorRT 10.3)" if t.name == "orin" else ""),
        f"# generated by `hiwin-export engines --emit-trtexec` from {export.path.resolve()}",
        f"# {len(plans)} engines, {opts.precision} graphs, strongly typed; profiles cover every crop the slicer makes",
        *([f"# {opts.precision}: ModelOpt {QDQ_MODES[opts.precision]} Q/DQ graphs, explicitly quantised: the Q/DQ "
           "nodes set the precision (no --int8 / --fp8 / --best, no calibration cache)"]
          if opts.precision in QDQ_MODES else []),
        "# (hiwin_export/profiles.py). Run it on the target; override the paths with the variables below.",
        "set -euo pipefail",
        f'EXPORT="${{EXPORT:-{export.path.resolve()}}}"',
        f'ENGINES="${{ENGINES:-{Path(out_dir).resolve()}}}"',
        f'HIWIN_SRC="${{HIWIN_SRC:-{src}}}"',
        f'TIMING_CACHE="${{TIMING_CACHE:-{opts.timing_cache or "$ENGINES.timing.cache"}}}"',
        'OUT="$ENGINES.partial"',
        'rm -rf "$OUT" && mkdir -p "$OUT"',
        "",
        "# TensorRT version check (the script's flags are for this major)",
        "trt_banner=$(trtexec --help 2>&1 | grep -o 'TensorRT v[0-9]*' | head -n1 | tr -dc '0-9' || true)",
        f'if [ -n "$trt_banner" ] && [ "$((trt_banner / 10000))" != "{major}" ]; then',
        f'  echo "warning: trtexec is TensorRT $trt_banner, this script was written for TensorRT {major}.x" >&2',
        "fi",
    ]
    plugin_var = None
    if ops:
        plugin_var = "$PLUGIN_LIB"
        lines += ["", f"# 1. plugin library ({', '.join(ops)}) for sm_{t.sm} on {t.arch}",
                  'PLUGIN_BUILD="${PLUGIN_BUILD:-$HIWIN_SRC/build/plugins-' + t.name + '}"',
                  *cmake_commands(opts),
                  f'PLUGIN_LIB="${{PLUGIN_LIB:-$PLUGIN_BUILD/{PLUGIN_LIB_NAME}}}"']
    else:
        lines += ["", "# 1. plugin library: not needed (no plugin ops in these graphs)"]
    lines += ["", f"# 2. engines ({', '.join(p.file for p in plans)})"]
    for p in plans:
        cmd = trtexec_command(p, opts, plugin_var=plugin_var, cache_var="$TIMING_CACHE")
        lines.append(" \\\n    ".join(cmd))
    idx = " ".join(idx_flags) + (' --plugin-lib "$PLUGIN_LIB"' if ops else "")
    lines += ["", "# 3. engines.json (checks every engine's profiles with TensorRT), then put the set in place",
              f'hiwin-export engines --index --export "$EXPORT" --out "$OUT" {idx}',
              'if [ -e "$ENGINES" ]; then mv "$ENGINES" "$ENGINES.old.$$"; fi',
              'mv "$OUT" "$ENGINES" && rm -rf "$ENGINES.old.$$"',
              "", "# 4. parity bundles on the engines",
              'hiwin-export verify-engines --export "$EXPORT" --engines "$ENGINES"', ""]
    text = "\n".join(lines)
    script = Path(script)
    script.parent.mkdir(parents=True, exist_ok=True)
    tmp = script.with_name(f".{script.name}.{os.getpid()}")
    tmp.write_text(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, script)
    return text


# ------------------------------------------------------------------------------------ verification
@dataclass
class BundleResult:
    bundle: str
    engine: str
    passed: bool | None  # None: not run (reason in ``note``)
    outputs: dict = field(default_factory=dict)
    note: str = ""
    command: str = ""

    def line(self) -> str:
        status = {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]
        detail = ", ".join(f"{k}: max|d| {v['max_abs']:.3g} (atol {v['atol']:.3g}), cos {v['cosine']:.6f}"
                           for k, v in self.outputs.items())
        return f"{status}  {self.bundle} on {self.engine}" + (f"  {detail}" if detail else "") + (
            f"  ({self.note})" if self.note else "")


def _bundles(export: ExportDir) -> list[tuple[str, str]]:
    b = export.manifest.get("bundles") or {}
    if not b:
        raise ExportError(f"{export.path}: no Polygraphy bundles (exported with --no-bundles): nothing to verify")
    return [(g, d) for g in sorted(b) for d in b[g]]


def _atols(command: str) -> dict[str, float]:
    toks = shlex.split(command)
    i = toks.index("--atol")
    out = {}
    for t in toks[i + 1:]:
        if t.startswith("--"):
            break
        name, val = t.rsplit(":", 1)
        out[name] = float(val)
    return out


def verify_engines(export_dir: str | os.PathLike, engines_dir: str | os.PathLike, *, mode: str = "runner",
                   plugin_lib: str | None = None, trt: Any = None, cuda: Any = None,
                   polygraphy: str = "polygraphy", timeout: float = 1800) -> list[BundleResult]:
    """Run the export's parity bundles on the engines. ``runner``: through
    :class:`hiwin_runtime.trt.TrtRunner` (the runtime's own path; fp32 sets against the bundle's
    ``--atol``; fp16, int8trt and fp8trt sets against the bundle's fp32 reference with the cosine bounds
    of ``hiwin-export parity --precision``, :data:`hiwin_export.parity.MIN_COSINE`); ``polygraphy``:
    ``polygraphy run <engine> --trt`` with the bundle's inputs, reference and tolerances, on the profile the runtime would choose (fp32 sets)."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    if mode not in ("runner", "polygraphy"):
        raise ValueError(f"mode must be runner or polygraphy, got {mode!r}")
    from .parity import MIN_COSINE  # the bounds of `hiwin-export parity --precision` (fp16, int8trt, fp8trt)

    export = ExportDir(export_dir)
    info = read_engine_set(engines_dir)
    precision = info["precision"]
    if precision not in ("fp32", *MIN_COSINE):
        raise EngineError(f"{engines_dir}: engine set of precision {precision!r}: no bound to verify it against")
    if mode == "polygraphy" and precision != "fp32":
        raise ValueError(f"--mode polygraphy checks the bundles' fp32 tolerance; verify {precision} engine sets with "
                         f"--mode runner (cosine >= {MIN_COSINE[precision]:g} against the fp32 reference)")
    runner = None
    if mode == "runner":
        runner = TrtRunner(engines_dir, export=export, plugin_lib=plugin_lib, trt=trt, cuda=cuda)
    results = []
    try:
        for graph, d in _bundles(export):
            engine = GraphId.parse(graph).at(precision).name
            bdir = export.path / d
            bundle = json.loads((bdir / "bundle.json").read_text())
            if engine not in info["engines"]:
                results.append(BundleResult(d, engine, None, note="no engine for this graph in the set"))
                continue
            atol = _atols(bundle["trt_command"])
            if mode == "runner":
                feeds = {k: np.asarray(v) for k, v in load_json(str(bdir / "inputs.json"))[0].items()}
                ref = RunResults.load(str(bdir / "reference_outputs.json"))[0][1][0]
                out = runner.run(engine, feeds)
                res = BundleResult(d, engine, True)
                for name in ref.keys():
                    r, o = np.asarray(ref[name], np.float64), np.asarray(out[name], np.float64)
                    diff, cos = float("inf"), 0.0
                    if o.shape == r.shape:
                        diff = float(np.abs(o - r).max())
                        cos = float((o * r).sum() / max(np.linalg.norm(o) * np.linalg.norm(r), 1e-30))
                    ok = diff <= atol[name] if precision == "fp32" else cos >= MIN_COSINE[precision]
                    res.outputs[name] = {"max_abs": diff, "atol": atol[name], "cosine": cos, "passed": bool(ok),
                                         "bound": (f"max_abs<={atol[name]:.6g}" if precision == "fp32"
                                                   else f"cosine>={MIN_COSINE[precision]:g}")}
                    res.passed = res.passed and bool(ok)
                results.append(res)
            else:
                results.append(_polygraphy_bundle(export, Path(engines_dir), info, engine, d, bundle, atol,
                                                  plugin_lib, polygraphy, timeout))
    finally:
        if runner is not None:
            runner.close()
    return results


def polygraphy_command(engines_dir: Path, info: dict, engine: str, bundle_dir: str, bundle: dict,
                       atol: dict[str, float], plugin_lib: str | None = None, polygraphy: str = "polygraphy") -> str:
    """``polygraphy run`` of one bundle on an engine of the set, on the profile the runtime picks."""
    e = info["engines"][engine]
    first = next(i for i in e["inputs"] if i["name"] in bundle["inputs"])
    shape = bundle["inputs"][first["name"]]
    axes = {s[-1]: (int(a), int(s[:-1]) if s[:-1] else 1) for a, s in first["dynamic_axes"].items() if s != "batch"}
    h, w = shape[axes["h"][0]] // axes["h"][1], shape[axes["w"][0]] // axes["w"][1]
    idx = choose_profile(e["profiles"], h, w)
    if idx is None:
        raise EngineError(f"{engine}: no optimisation profile covers bundle {bundle_dir} ({h}x{w} patches)")
    parts = [polygraphy, "run", str((engines_dir / e["file"]).resolve()), "--model-type", "engine", "--trt",
             "--optimization-profile", str(idx),
             "--load-inputs", f"{bundle_dir}/inputs.json", "--load-outputs", f"{bundle_dir}/reference_outputs.json",
             "--check-error-stat", "max", "--rtol", "0", "--atol", *[f"{k}:{v:.6g}" for k, v in atol.items()]]
    plug = info.get("plugins") or {}
    if plug.get("required") and not plug.get("serialized"):
        parts += ["--plugins", str(Path(plugin_lib) if plugin_lib else (engines_dir / plug["bundled"]).resolve())]
    return " ".join(shlex.quote(p) for p in parts)


def _polygraphy_bundle(export, engines_dir: Path, info, engine, d, bundle, atol, plugin_lib, polygraphy,
                       timeout) -> BundleResult:
    cmd = polygraphy_command(engines_dir, info, engine, d, bundle, atol, plugin_lib, polygraphy)
    if shutil.which(polygraphy) is None:
        return BundleResult(d, engine, None, note=f"{polygraphy} not found", command=cmd)
    r = subprocess.run(shlex.split(cmd), cwd=export.path, capture_output=True, text=True, timeout=timeout)
    ok = r.returncode == 0 and "PASSED" in (r.stdout + r.stderr)
    tail = (r.stdout + r.stderr).strip().splitlines()[-1:]
    return BundleResult(d, engine, ok, note="" if ok else f"polygraphy exit {r.returncode}: {' '.join(tail)}",
                        command=cmd)
