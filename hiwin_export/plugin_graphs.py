"""The ``tensorrt`` flavour of the exported graphs: TensorRT plugin nodes, and running them without TensorRT.

``export_model(..., flavour="tensorrt")`` writes the vision graphs with the native plugins of
``engines/plugins`` in place of the subgraphs they fuse:

| graph | plugin nodes | from |
|---|---|---|
| ``jbu`` | 2 x ``HiwinJbuConv`` (one per JBU layer: range kernel, spatial kernel, normalisation, fixup MLP, reflect padding and the 49 taps) | the custom op ``hiwin::jbu_conv`` (``JBULayer.forward(..., conv="plugin")``) |
| ``hiwin_{oh}x{ow}`` (``projector_impl="faithful"``) | 6 x ``HiwinRoiAlign`` (keys and values of three levels), one for one in place of ONNX ``RoiAlign`` | the custom op ``hiwin::roi_align`` |
| ``vit``, ``hiwin`` (fast, any grid) | none: no op there needs a plugin (the fast projector's RoI-align is two MatMuls) | |

Both custom ops are translated by ``torch.onnx.export``'s ``custom_translation_table``
(:mod:`.onnx_export`), so the plugin nodes come from the traced ops themselves, whatever the graph
around them looks like: no pattern matching on the exported graph.

A plugin node is what the TensorRT ONNX parser's plugin fallback resolves (engines/plugins/README.md):
``op_type`` = the plugin name, the creator's fields as attributes (exactly :data:`PLUGIN_FIELDS`, with
the types the creators declare: ints, ``spatial_scale`` a float, strings), plus ``plugin_version`` "1"
and ``plugin_namespace`` "" (the registry key the parser looks up; the plugins are registered in the
default namespace). The node domain is :data:`PLUGIN_DOMAIN` ("hiwin"), declared in the model's
``opset_import`` (version 1): onnx.checker rejects an unknown op in the default domain but accepts one
in a declared custom domain, and the parser finds the creator by name, version and namespace (it
would try the domain as the namespace only if that lookup failed).

Without TensorRT the plugin graphs run on ``onnx.reference.ReferenceEvaluator`` with the plugin nodes
as :class:`~onnx.reference.op_run.OpRun` subclasses (:data:`REFERENCE_OPS`) that call the plugins' own
CPU launchers (:mod:`.plugin_lib`, the per-element maths the CUDA kernels share):
:class:`ReferenceRunner` has :class:`~hiwin_runtime.ort.OnnxRunner`'s interface, and the parity harness
uses it as its ``"reference"`` executor (``Harness(..., executor="reference")``, forced for this flavour).
One liberty with the ONNX reference implementations: ``MatMul``, ``Gemm`` and ``Conv`` with fp16 inputs
accumulate in fp32 and round their output to fp16 once, as TensorRT does (and because numpy's fp16
matrix products are element loops, far too slow at real widths).
"""

from __future__ import annotations

import threading
from functools import lru_cache

import numpy as np
import onnx
from onnx.reference.op_run import OpRun

from hiwin_runtime.crop_chain import Stages
from hiwin_runtime.graph_id import GraphId
from hiwin_runtime.manifest import FLAVOURS, ExportDir  # noqa: F401  (re-exported)
from hiwin_runtime.ort import graph_stages

PLUGIN_DOMAIN = "hiwin"  # node domain of the plugin nodes, in opset_import with version 1
PLUGIN_DOMAIN_VERSION = 1
PLUGIN_VERSION = "1"  # engines/plugins/common/pluginBase.h kPLUGIN_VERSION
PLUGIN_NAMESPACE = ""  # kPLUGIN_NAMESPACE: the default namespace
JBU_CONV, ROI_ALIGN = "HiwinJbuConv", "HiwinRoiAlign"
PLUGIN_OPS = (JBU_CONV, ROI_ALIGN)
# The creators' fields (getFieldNames), i.e. the node attributes besides plugin_version / plugin_namespace.
PLUGIN_FIELDS = {
    JBU_CONV: ("radius",),
    ROI_ALIGN: ("output_height", "output_width", "sampling_ratio", "spatial_scale", "mode",
                "coordinate_transformation_mode"),
}
PLUGIN_INPUTS = {
    JBU_CONV: ("hr", "q", "guidance", "range_temp", "sigma_spatial", "w1", "b1", "w2", "b2"),
    ROI_ALIGN: ("X", "rois", "batch_indices"),
}
REGISTRY_ATTRIBUTES = ("plugin_version", "plugin_namespace")


# ----------------------------------------------------------------------------- building plugin nodes
@lru_cache(maxsize=None)
def plugin_schema(op: str) -> onnx.defs.OpSchema:
    """An (unregistered) ONNX schema of a plugin node: what onnxscript's tracer needs to record it."""
    S = onnx.defs.OpSchema
    A = S.AttrType
    data = ["tensor(float)", "tensor(float16)"]
    if op == JBU_CONV:
        inputs = [S.FormalParameter(n, "T") for n in PLUGIN_INPUTS[op][:3]]
        inputs += [S.FormalParameter(n, "tensor(float)") for n in PLUGIN_INPUTS[op][3:]]  # parameters: fp32
        types = [("T", data, "hr, q, guidance and the output")]
        attrs = [S.Attribute("radius", A.INT, "kernel radius r: (2r+1)^2 taps")]
    elif op == ROI_ALIGN:
        inputs = [S.FormalParameter("X", "T"), S.FormalParameter("rois", "T"),
                  S.FormalParameter("batch_indices", "I")]
        types = [("T", data, "X, rois and the output"), ("I", ["tensor(int64)", "tensor(int32)"], "batch indices")]
        attrs = [S.Attribute(n, A.INT, "") for n in ("output_height", "output_width", "sampling_ratio")]
        attrs += [S.Attribute("spatial_scale", A.FLOAT, ""), S.Attribute("mode", A.STRING, ""),
                  S.Attribute("coordinate_transformation_mode", A.STRING, "")]
    else:
        raise ValueError(f"unknown plugin op {op!r} (known: {', '.join(PLUGIN_OPS)})")
    attrs += [S.Attribute(n, A.STRING, "TensorRT plugin registry key") for n in REGISTRY_ATTRIBUTES]
    return S(op, PLUGIN_DOMAIN, PLUGIN_DOMAIN_VERSION, f"TensorRT plugin {op} (engines/plugins)",
             inputs=inputs, outputs=[S.FormalParameter("Y", "T")], type_constraints=types, attributes=attrs)


def plugin_op(op: str):
    """The plugin node as an onnxscript op, for ``custom_translation_table`` functions; call it with the
    inputs positionally and the creator fields as keywords (the registry attributes are added)."""
    from onnxscript import values

    opset = values.Opset(PLUGIN_DOMAIN, PLUGIN_DOMAIN_VERSION)
    recorded = values.Op(opset, op, plugin_schema(op))

    def call(*inputs, **fields):
        unknown = set(fields) - set(PLUGIN_FIELDS[op])
        if unknown:
            raise ValueError(f"{op}: {sorted(unknown)} are not fields of the plugin creator {PLUGIN_FIELDS[op]}")
        return recorded(*inputs, **fields, plugin_version=PLUGIN_VERSION, plugin_namespace=PLUGIN_NAMESPACE)
    return call


# ----------------------------------------------------------------------------- reading plugin graphs
def plugin_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    return [n for n in graph.node if n.domain == PLUGIN_DOMAIN and n.op_type in PLUGIN_OPS]


def plugin_ops(proto: onnx.ModelProto) -> list[str]:
    """The plugin ops a graph holds, sorted (the manifest's per-graph ``plugins``)."""
    return sorted({n.op_type for n in plugin_nodes(proto.graph)})


def node_attributes(node: onnx.NodeProto) -> dict:
    """Attributes as Python values, strings decoded."""
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


# ----------------------------------------------------------------------------- running them without TensorRT
def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class _PluginRun(OpRun):
    """A plugin node on the ReferenceEvaluator: checks the registry key and the fields like the parser
    and the creator would (an unknown field is an error here, not a warning), then runs the CPU launcher."""

    op_domain = PLUGIN_DOMAIN

    def _fields(self, attrs: dict) -> dict:
        op = type(self).__name__
        version, namespace = _text(attrs.pop("plugin_version", "1")), _text(attrs.pop("plugin_namespace", ""))
        if (version, namespace) != (PLUGIN_VERSION, PLUGIN_NAMESPACE):
            raise ValueError(f"{op}: no plugin creator for version {version!r}, namespace {namespace!r} "
                             f"(the library registers version {PLUGIN_VERSION!r}, namespace {PLUGIN_NAMESPACE!r})")
        unknown = set(attrs) - set(PLUGIN_FIELDS[op])
        if unknown:
            raise ValueError(f"{op}: unknown attributes {sorted(unknown)} (the creator's fields: {PLUGIN_FIELDS[op]})")
        return attrs


class HiwinJbuConv(_PluginRun):
    def _run(self, *inputs, **attrs):
        from . import plugin_lib

        f = self._fields(dict(attrs))
        if len(inputs) != len(PLUGIN_INPUTS[JBU_CONV]):
            raise ValueError(f"{JBU_CONV}: {len(inputs)} inputs, expected {PLUGIN_INPUTS[JBU_CONV]}")
        params = inputs[3:]
        bad = [n for n, p in zip(PLUGIN_INPUTS[JBU_CONV][3:], params) if p.dtype != np.float32]
        if bad:  # the plugin's supportsFormatCombination accepts fp32 parameters only
            raise ValueError(f"{JBU_CONV}: parameter inputs {bad} must be float32")
        return (plugin_lib.jbu_conv(*inputs[:3], *params, radius=int(f.get("radius", 3))),)


class HiwinRoiAlign(_PluginRun):
    def _run(self, X, rois, batch_indices, **attrs):
        from . import plugin_lib

        f = self._fields(dict(attrs))
        mode = _text(f.get("mode", "avg"))
        ctm = _text(f.get("coordinate_transformation_mode", "half_pixel"))
        if mode != "avg":
            raise ValueError(f'{ROI_ALIGN}: mode {mode!r} is not supported (mode "avg" only)')
        if ctm not in ("half_pixel", "output_half_pixel"):
            raise ValueError(f"{ROI_ALIGN}: unknown coordinate_transformation_mode {ctm!r}")
        out = plugin_lib.roi_align(X, rois, batch_indices, (int(f.get("output_height", 1)), int(f.get("output_width", 1))),
                                   sampling_ratio=int(f.get("sampling_ratio", 0)),
                                   spatial_scale=float(f.get("spatial_scale", 1.0)), aligned=ctm == "half_pixel")
        return (out,)


def _fp32_accumulating(base: type[OpRun], name: str) -> type[OpRun]:
    """The standard op ``base`` computing fp16 inputs in fp32 and rounding its results to fp16 once.

    numpy has no fp16 BLAS: its fp16 matrix products are element loops, orders of magnitude slower than
    the fp32 ones (an fp16 projector graph would take minutes per crop at real width). TensorRT, the
    target of these graphs, accumulates fp16 GEMMs and convolutions in fp32 as well; ONNX does not say
    how they accumulate."""
    def _run(self, *inputs, **attrs):
        if not any(isinstance(x, np.ndarray) and x.dtype == np.float16 for x in inputs):
            return base._run(self, *inputs, **attrs)
        wide = [x.astype(np.float32) if isinstance(x, np.ndarray) and x.dtype == np.float16 else x for x in inputs]
        return tuple(y.astype(np.float16) if isinstance(y, np.ndarray) and y.dtype == np.float32 else y
                     for y in base._run(self, *wide, **attrs))

    return type(name, (base,), {"op_domain": "", "_run": _run,
                                "__doc__": f"{name} with fp32 accumulation of fp16 inputs (reference runner)."})


def _accumulating_ops() -> list[type[OpRun]]:
    from onnx.reference.ops.op_conv import Conv
    from onnx.reference.ops.op_gemm import Gemm_7
    from onnx.reference.ops.op_matmul import MatMul

    return [_fp32_accumulating(MatMul, "MatMul"), _fp32_accumulating(Gemm_7, "Gemm"),
            _fp32_accumulating(Conv, "Conv")]


# The plugin nodes, and the matrix products with fp16 inputs accumulated in fp32.
REFERENCE_OPS = [HiwinJbuConv, HiwinRoiAlign, *_accumulating_ops()]


def reference_evaluator(model: onnx.ModelProto | str):
    """``onnx.reference.ReferenceEvaluator`` of a graph (loaded with its external weights when a path),
    the plugin nodes run by the plugins' CPU launchers, fp16 matrix products accumulated in fp32."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(onnx.load(model) if isinstance(model, str) else model, new_ops=REFERENCE_OPS)


class ReferenceRunner:
    """:class:`~hiwin_runtime.ort.OnnxRunner`'s interface (``run``, ``vision_stages``) on
    ``ReferenceEvaluator``: standard ops in numpy, plugin nodes on the plugins' CPU launchers. It runs
    either flavour; node by node in Python, so it is for parity on small inputs, not for deployment.
    Inputs are validated against the manifest before every run, as ONNX Runtime's runner does."""

    def __init__(self, export: ExportDir):
        self.export = export
        self._evaluators: dict[str, object] = {}
        self._lock = threading.Lock()

    def evaluator(self, graph: GraphId | str):
        name = str(graph)
        with self._lock:
            ev = self._evaluators.get(name)
            if ev is None:
                ev = self._evaluators[name] = reference_evaluator(str(self.export.graph_path(name)))
        return ev

    def run(self, graph: GraphId | str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.export.check_feeds(graph, feeds)
        ev = self.evaluator(graph)
        return dict(zip(ev.output_names, ev.run(None, feeds)))

    def vision_stages(self, precision: str = "fp32") -> Stages:
        return graph_stages(self, precision)
