"""torch -> ONNX for one graph spec: ``torch.onnx.export(dynamo=True)`` with our op translations.

``hiwin::roi_align`` becomes standard ONNX ``RoiAlign`` (opset 18) with every attribute written:
``mode="avg"``, ``coordinate_transformation_mode="output_half_pixel"`` (torchvision
``aligned=False``), ``sampling_ratio=0`` (adaptive), ``spatial_scale=1``, fp32 inputs.
"""

from __future__ import annotations

import inspect

import onnx
import torch
from onnx import TensorProto

from .graphs import GraphSpec

OPSET = 18  # >= 17 for LayerNormalization, >= 16 for RoiAlign's coordinate_transformation_mode


def roi_align_to_onnx(input, boxes, batch_idx, output_h: int, output_w: int, spatial_scale: float,
                      sampling_ratio: int, aligned: bool):
    """onnxscript translation of ``hiwin::roi_align`` (torchvision semantics) to ``RoiAlign``."""
    from onnxscript import opset18 as op

    return op.RoiAlign(input, boxes, op.Cast(batch_idx, to=TensorProto.INT64), mode="avg",
                       output_height=output_h, output_width=output_w,
                       sampling_ratio=max(int(sampling_ratio), 0), spatial_scale=float(spatial_scale),
                       coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel")


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
                                 custom_translation_table={torch.ops.hiwin.roi_align.default: roi_align_to_onnx},
                                 verbose=False)
    return prog.model_proto
