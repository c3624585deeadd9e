"""torch -> ONNX for one graph spec: ``torch.onnx.export(dynamo=True)`` with our op translations.

Flavour ``"onnx"`` (standard ONNX): ``hiwin::roi_align`` becomes standard ONNX ``RoiAlign`` (opset 18)
with every attribute written: ``mode="avg"``, ``coordinate_transformation_mode="output_half_pixel"``
(torchvision ``aligned=False``), ``sampling_ratio=0`` (adaptive), ``spatial_scale=1``, fp32 inputs.

Flavour ``"tensorrt"`` (:mod:`.plugin_graphs`): ``hiwin::roi_align`` becomes the plugin node
``HiwinRoiAlign`` with the same inputs and attributes, and ``hiwin::jbu_conv`` (the JBU graph's layers,
``conv="plugin"``) the plugin node ``HiwinJbuConv``; both in domain ``hiwin`` with ``plugin_version`` and
``plugin_namespace``.
"""

from __future__ import annotations

import inspect

import onnx
import torch
from onnx import TensorProto

from .graphs import GraphSpec
from .plugin_graphs import FLAVOURS, JBU_CONV, PLUGIN_DOMAIN, PLUGIN_DOMAIN_VERSION, ROI_ALIGN, plugin_op

OPSET = 18  # >= 17 for LayerNormalization, >= 16 for RoiAlign's coordinate_transformation_mode


def _roi_align_attributes(output_h: int, output_w: int, spatial_scale: float, sampling_ratio: int,
                          aligned: bool) -> dict:
    """torchvision ``roi_align`` arguments as ONNX ``RoiAlign`` attributes (also the plugin's fields)."""
    return dict(mode="avg", output_height=int(output_h), output_width=int(output_w),
                sampling_ratio=max(int(sampling_ratio), 0), spatial_scale=float(spatial_scale),
                coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel")


def roi_align_to_onnx(input, boxes, batch_idx, output_h: int, output_w: int, spatial_scale: float,
                      sampling_ratio: int, aligned: bool):
    """onnxscript translation of ``hiwin::roi_align`` (torchvision semantics) to ``RoiAlign``."""
    from onnxscript import opset18 as op

    return op.RoiAlign(input, boxes, op.Cast(batch_idx, to=TensorProto.INT64),
                       **_roi_align_attributes(output_h, output_w, spatial_scale, sampling_ratio, aligned))


def roi_align_to_plugin(input, boxes, batch_idx, output_h: int, output_w: int, spatial_scale: float,
                        sampling_ratio: int, aligned: bool):
    """``hiwin::roi_align`` -> ``HiwinRoiAlign``: ``RoiAlign``'s inputs and attributes, one for one."""
    from onnxscript import opset18 as op

    return plugin_op(ROI_ALIGN)(input, boxes, op.Cast(batch_idx, to=TensorProto.INT64),
                                **_roi_align_attributes(output_h, output_w, spatial_scale, sampling_ratio, aligned))


def jbu_conv_to_plugin(hr, q, guidance, range_temp, sigma_spatial, w1, b1, w2, b2, radius: int):
    """``hiwin::jbu_conv`` -> ``HiwinJbuConv`` (the nine inputs in the plugin's order, attribute ``radius``)."""
    return plugin_op(JBU_CONV)(hr, q, guidance, range_temp, sigma_spatial, w1, b1, w2, b2, radius=int(radius))


def translation_table(flavour: str) -> dict:
    """``custom_translation_table`` of a flavour."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r} (known: {', '.join(FLAVOURS)})")
    if flavour == "onnx":
        return {torch.ops.hiwin.roi_align.default: roi_align_to_onnx}
    import hiwin_model.jbu  # noqa: F401  (registers hiwin::jbu_conv)

    return {torch.ops.hiwin.roi_align.default: roi_align_to_plugin,
            torch.ops.hiwin.jbu_conv.default: jbu_conv_to_plugin}


def export_graph(spec: GraphSpec, model) -> onnx.ModelProto:
    module = spec.module(model).eval()
    args = spec.dummy(model)
    shapes = spec.dynamic_shapes()
    if spec.export_shapes is not None:  # already keyed by forward() parameter
        dyn = shapes
    else:  # map our I/O names onto forward()'s
        params = list(inspect.signature(module.forward).parameters)
        dyn = {p: shapes[n] for p, n in zip(params, spec.inputs)}
    with torch.no_grad():
        prog = torch.onnx.export(module, args, None, dynamo=True, input_names=list(spec.inputs),
                                 output_names=list(spec.outputs), dynamic_shapes=dyn, opset_version=OPSET,
                                 custom_translation_table=translation_table(spec.flavour), verbose=False)
    proto = prog.model_proto
    if any(n.domain == PLUGIN_DOMAIN for n in proto.graph.node):  # (the exporter declares it; make sure)
        if PLUGIN_DOMAIN not in {o.domain for o in proto.opset_import}:
            proto.opset_import.append(onnx.helper.make_opsetid(PLUGIN_DOMAIN, PLUGIN_DOMAIN_VERSION))
    return proto
