"""Precision passes over exported fp32 graphs, in one place: today the strongly typed fp16 variant
(``<name>.fp16.onnx``: fp16 compute, :data:`FP16_KEEP_FP32` ops and all shape-derived arithmetic in
fp32, explicit casts, fp32 I/O, as TensorRT 11's strong typing requires; in the tensorrt flavour the
JBU plugin nodes take fp16 data and fp32 parameters, :data:`FP16_PLUGIN_DATA_INPUTS`). int8/fp8 Q/DQ graphs are
built by :mod:`hiwin_export.quantize` (ONNX Runtime and NVIDIA ModelOpt).

Why our own fp16 pass and not ModelOpt's AutoCast everywhere (``hiwin-export fp16-compare`` measures
both on the same parity sweep; tiny model, docs/quantization.md):

* **projector** (``hiwin``): AutoCast puts the shape-derived RoI window / pooling arithmetic (465 nodes)
  in fp16 and fails parity (visual-token cosine 0.9975, max rel 0.26, bound 0.999); ours keeps it fp32
  (:func:`_shape_derived_nodes`) and passes (max rel 8.7e-4). Ours.
* **ViT**: both pass; ours is closer (max rel 6.4e-4 vs 1.1e-3) with fewer fp32 compute nodes (7 vs 15). Ours.
* **JBU**: AutoCast is at least as good (max rel 7.4e-4 vs 1.0e-3, 10 fp32 compute nodes vs 102, 92 Casts vs
  282, both strongly typed): use it (``hiwin-export fp16-compare --apply jbu``). It needs real inputs for
  its range check (it cannot run our dynamic-shape graphs on its own random data) and cannot convert the
  tensorrt flavour's plugin nodes, so the export itself keeps this pass, which needs neither.
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
    "HiwinRoiAlign": "the RoiAlign plugin (tensorrt flavour), for RoiAlign's reasons (its boxes have X's type)",
}
# TensorRT plugin nodes (tensorrt flavour) that take their float data tensors in fp16 inside the fp16 graphs:
# op type -> positions of the data inputs; the output is fp16 too and every other (parameter) input stays
# fp32, as the plugin requires. The plugin computes in fp32 whatever its I/O type (engines/plugins), so
# fp16 I/O rounds only what the fp16 graph rounds anyway (its producers and consumers are fp16 ops) and
# halves the plugin's memory traffic; casting the data to fp32 around it would add two passes over the
# largest tensors of the JBU.
FP16_PLUGIN_DATA_INPUTS = {"HiwinJbuConv": (0, 1, 2)}


def fp16_variant(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The strongly typed fp16 variant of an fp32 graph (loaded with its weights). Plugin nodes:
    :data:`FP16_PLUGIN_DATA_INPUTS` get fp16 data and fp32 parameters (blocked during the conversion so
    that their parameters stay fp32, then :func:`_plugin_data_fp16`); ``HiwinRoiAlign`` stays fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    f16 = convert_float_to_float16(proto, keep_io_types=True,
                                   op_block_list=sorted(set(FP16_KEEP_FP32) | set(FP16_PLUGIN_DATA_INPUTS)),
                                   node_block_list=_shape_derived_nodes(proto.graph))
    _plugin_data_fp16(f16.graph)
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


def _cast_to(n: onnx.NodeProto):
    return onnx.helper.get_attribute_value(n.attribute[0]) if n.op_type == "Cast" else None


def _plugin_data_fp16(graph: onnx.GraphProto) -> int:
    """Give the :data:`FP16_PLUGIN_DATA_INPUTS` plugin nodes their data in fp16.

    The converter keeps a blocked node fp32 by casting its fp16 inputs up (``x -> Cast(fp32)``) and its
    output down (``-> Cast(fp16)``). Here the data inputs take the fp16 ``x`` directly and the node writes
    the fp16 value its down-cast wrote (a consumer that needs fp32, such as a graph output, reads it through
    one Cast). Parameter inputs keep their fp32 tensors. A node whose data inputs are not all such up-casts
    of fp16 values stays fp32 (still valid: the plugins take fp32 I/O too). Returns the nodes changed."""
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    fp32_weights = {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT}
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    changed, added = 0, []
    for node in list(graph.node):
        data = FP16_PLUGIN_DATA_INPUTS.get(node.op_type)
        if data is None or not node.domain:
            continue
        ups = [producer.get(node.input[i]) for i in data]
        if not all(u is not None and _cast_to(u) == TensorProto.FLOAT and types.get(u.input[0]) == TensorProto.FLOAT16
                   for u in ups):
            continue
        for i, u in zip(data, ups):
            node.input[i] = u.input[0]
        for i in range(len(node.input)):  # parameters: the fp32 initializer itself, not a no-op Cast of it
            u = producer.get(node.input[i])
            if i not in data and u is not None and _cast_to(u) == TensorProto.FLOAT and u.input[0] in fp32_weights:
                node.input[i] = u.input[0]
        out = node.output[0]
        consumers = [n for n in graph.node if out in n.input]
        down = [n for n in consumers if _cast_to(n) == TensorProto.FLOAT16]
        f16 = down[0].output[0] if down else out + "_fp16"
        for extra in down[1:]:  # more than one down-cast of the same value: all read the first
            for n in graph.node:
                for k, x in enumerate(n.input):
                    if x == extra.output[0]:
                        n.input[k] = f16
        node.output[0] = f16
        for n in down:
            graph.node.remove(n)
        if out in outputs or any(n not in down for n in consumers):  # fp32 readers of the old output
            added.append(onnx.helper.make_node("Cast", [f16], [out], to=TensorProto.FLOAT, name=f"{out}_fp16_to_fp32"))
        changed += 1
    graph.node.extend(added)
    _drop_unused_casts(graph)
    return changed


def _drop_unused_casts(graph: onnx.GraphProto) -> None:
    """Remove Cast nodes whose output nobody reads (repeatedly: chains of them)."""
    while True:
        used = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type == "Cast" and n.output[0] not in used]
        if not dead:
            return
        for n in dead:
            graph.node.remove(n)


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
