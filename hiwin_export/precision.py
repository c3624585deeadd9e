"""Precision passes over exported fp32 graphs, in one place: today the strongly typed fp16 variant
(``<name>.fp16.onnx``: fp16 compute, :data:`FP16_KEEP_FP32` ops and all shape-derived arithmetic in
fp32, explicit casts, fp32 I/O, as TensorRT 11's strong typing requires). int8/fp8 Q/DQ passes join
here as further functions of the same form: ``ModelProto -> ModelProto``.
"""

from __future__ import annotations

import logging

import onnx
from onnx import TensorProto

log = logging.getLogger("hiwin_export")

# The fp16 precision policy, in one place: ops that stay fp32 inside the fp16 graphs (explicit
# Cast nodes around them, so the graphs are strongly typed as TensorRT 11 requires).
FP16_KEEP_FP32 = {
    "LayerNormalization": "variance overflows/underflows in fp16 (CLIP, projector LayerNorms)",
    "Softmax": "attention and the JBU range kernel: fp32 accumulation",
    "ReduceSum": "JBU kernel normalisation and range logits",
    "ReduceMean": "statistics",
    "Exp": "JBU spatial/range temperature",
    "RoiAlign": "fp16 coordinates are coarse at large maps and the adaptive grid accumulates many samples",
    "Resize": "bicubic position-embedding interpolation (ViT and projector key positions)",
    "Pow": "RMSNorm squares: Llama activations reach 1e3, whose square overflows fp16",
}


def fp16_variant(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The strongly typed fp16 variant of an fp32 graph (loaded with its weights)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    f16 = convert_float_to_float16(proto, keep_io_types=True, op_block_list=sorted(FP16_KEEP_FP32),
                                   node_block_list=_shape_derived_nodes(proto.graph))
    _drop_fp16_round_trips(f16.graph)
    _toposort(f16.graph)  # the converter appends its I/O casts at the end
    del f16.graph.value_info[:]  # stale fp32 annotations; strict shape inference redoes them
    return f16


def _shape_derived_nodes(graph: onnx.GraphProto) -> list[str]:
    """Nodes whose values depend on input *shapes*, integer inputs and constants only, never on
    float input data: the RoI window boxes, the pooling and bicubic matrices, the key-position
    interpolation; in the decoder, the rotary cos/sin of ``position_ids`` and the attention mask.

    They stay fp32 in the fp16 graphs (TensorRT folds the shape-only ones per profile anyway):
    fp16 window edges move RoI samples across pixel borders, the same defect as the released
    model's bf16 box rounding (docs/model.md §4.7); fp16 positions are not even integers beyond 2048,
    and ONNX ``Range`` has no fp16 at all."""
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
    weights = {t.name for t in graph.initializer}
    # integer inputs that index a weight table (token ids -> embedding Gather) are data too
    lookups = {n.input[1] for n in graph.node if n.op_type == "Gather" and n.input[0] in weights}
    data = {i.name for i in graph.input if i.type.tensor_type.elem_type in floats or i.name in lookups}
    names = []
    for n in graph.node:  # topological order
        if n.op_type in ("Shape", "Size"):
            continue
        if any(i in data for i in n.input):
            data.update(n.output)
        else:
            names.append(n.name)
    return names


def _drop_fp16_round_trips(graph: onnx.GraphProto) -> int:
    """Remove ``x -> Cast(fp16) -> Cast(fp32)`` pairs the converter puts between two fp32 ops.

    The converter wraps each kept-fp32 op in casts, so a chain of fp32 ops (the RoI box arithmetic,
    LayerNorm followed by RoiAlign, ...) is rounded to fp16 between every two of its ops. Feeding
    the fp32 value straight through keeps the chain fp32, as the precision policy intends.
    """
    def cast_to(n):
        return onnx.helper.get_attribute_value(n.attribute[0]) if n.op_type == "Cast" else None

    producer = {o: n for n in graph.node for o in n.output}
    rename: dict[str, str] = {}
    for n in graph.node:
        if cast_to(n) == TensorProto.FLOAT:
            up = producer.get(n.input[0])
            if up is not None and cast_to(up) == TensorProto.FLOAT16:
                rename[n.output[0]] = up.input[0]
    if not rename:
        return 0
    outputs = {o.name for o in graph.output}
    for n in graph.node:
        for i, x in enumerate(n.input):
            if x in rename:
                n.input[i] = rename[x]
    keep = [n for n in graph.node if not (n.output and n.output[0] in rename and n.output[0] not in outputs)]
    used = {x for n in keep for x in n.input} | outputs
    keep = [n for n in keep if any(o in used for o in n.output) or not n.output]
    del graph.node[:]
    graph.node.extend(keep)
    return len(rename)


def _toposort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so every node follows the producers of its inputs (stable)."""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in known for i in n.input):
                ordered.append(n)
                known.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError(f"graph {graph.name!r} has a cycle or dangling inputs at {rest[0].name!r}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
