"""ONNX Runtime sessions for an export directory, and the vision stages on top of them."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from .crop_chain import STAGE_IO, Stages, stage_args
from .graph_id import GraphId
from .manifest import ExportDir, ExportError


def default_providers() -> list[str]:
    """CUDA execution provider where this ONNX Runtime has it, CPU otherwise (and as fallback)."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in avail else []) + ["CPUExecutionProvider"]


_ENV_ARENA_LOCK = threading.Lock()
_ENV_ARENA = False


def share_cpu_arena() -> None:
    """Register one CPU arena allocator in ONNX Runtime's process-wide environment (once).

    Sessions that opt in (``session.use_env_allocators``) then draw their activations from this one
    arena instead of one arena each: the vision stages run one after the other, so the process
    peaks at the largest stage instead of the sum of every session's own high-water mark (measured
    at real dims, ViT + JBU + projector over four crops: peak RSS 3515 -> 2948 MiB, same time)."""
    global _ENV_ARENA
    import onnxruntime as ort

    with _ENV_ARENA_LOCK:
        if _ENV_ARENA:
            return
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        try:
            ort.create_and_register_allocator(info, None)
        except Exception as e:  # registered earlier in this process by other code: that one is shared
            if "already" not in str(e).lower():
                raise
        _ENV_ARENA = True


def refuse_non_onnx_flavour(export: ExportDir) -> None:
    """A clear :class:`ExportError` for an export directory ONNX Runtime cannot run (its graphs hold
    TensorRT plugin nodes), naming the flavour, the plugin ops and what to do instead."""
    if export.flavour == "onnx":
        return
    ops = sorted({op for name in export.graphs for op in export.plugins(name)})
    raise ExportError(
        f"{export.path}: this is a {export.flavour!r}-flavour export: its graphs hold TensorRT plugin nodes "
        f"({', '.join(ops) or 'none listed'}) that ONNX Runtime cannot run. Build TensorRT engines from it (with the "
        "plugin library libhiwin_plugins.so, engines/plugins), or export the 'onnx' flavour for ONNX Runtime "
        "(hiwin-export export --flavour onnx)")


def graph_stages(runner: Any, precision: str = "fp32") -> Stages:
    """Crop-chain stages over the ``vit``, ``jbu`` and projector graphs of ``runner.export``, run by
    ``runner.run(graph, feeds) -> {output name: array}`` (ONNX Runtime here; the exporter's reference
    runner uses the same)."""
    def stage(family: str):
        names_in, names_out = STAGE_IO[family]

        def run(*args):
            bucket, data = stage_args(family, args)
            feeds = {n: np.ascontiguousarray(a) for n, a in zip(names_in, data)}
            out = runner.run(runner.export.stage_graph(family, bucket, precision), feeds)
            return out[names_out[0]] if len(names_out) == 1 else tuple(out[n] for n in names_out)
        return run

    return Stages(stage("vit"), stage("jbu"), stage("hiwin"))


class OnnxRunner:
    """One ONNX Runtime session per graph (created on first use, once even under racing threads);
    inputs are validated against the manifest before every run. A ``tensorrt``-flavour export
    (TensorRT plugin nodes) is refused (:func:`refuse_non_onnx_flavour`)."""

    def __init__(self, export: ExportDir, providers: list[str] | None = None, threads: int | None = None,
                 shared_arena: bool = True):
        import onnxruntime as ort

        refuse_non_onnx_flavour(export)
        self.export = export
        self.sessions: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.opts = ort.SessionOptions()
        # Shapes change from call to call (crop grids), so the memory-pattern planner cannot reuse
        # a plan: it is off. The CPU arena stays on (without it every large tensor is an mmap and
        # a page-fault storm). Measured at real dims, JBU on 336x336 + 266x406 crops, steady state:
        # pattern on 4179 MiB peak / 1.72 s per crop; off 2265 MiB / 1.50 s; arena off too 2580 MiB / 1.93 s.
        self.opts.enable_mem_pattern = False
        if shared_arena:  # one CPU arena for every session of the process (share_cpu_arena)
            share_cpu_arena()
            self.opts.add_session_config_entry("session.use_env_allocators", "1")
        if threads:
            self.opts.intra_op_num_threads = threads
        self.providers = providers or ["CPUExecutionProvider"]

    def session(self, graph: GraphId | str):
        import onnxruntime as ort

        name = str(graph)
        s = self.sessions.get(name)
        if s is None:
            with self._lock:
                s = self.sessions.get(name)
                if s is None:
                    s = ort.InferenceSession(str(self.export.graph_path(name)), self.opts, providers=self.providers)
                    if s.get_providers()[0] != self.providers[0]:  # ORT falls back silently; we do not
                        raise ExportError(f"{name}: {self.providers[0]} was requested but ONNX Runtime runs "
                                          f"{s.get_providers()} (provider unavailable or failed to load; "
                                          f"available here: {ort.get_available_providers()})")
                    self.sessions[name] = s
        return s

    def run(self, graph: GraphId | str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.export.check_feeds(graph, feeds)
        s = self.session(graph)
        return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))

    def vision_stages(self, precision: str = "fp32") -> Stages:
        """The exported ``vit``, ``jbu`` and projector graphs (``hiwin``, or ``hiwin_{oh}x{ow}`` per
        bucket) as crop-chain stages."""
        return graph_stages(self, precision)
