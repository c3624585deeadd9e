"""``hiwin-export bench --int4-kernel``: how close ONNX Runtime's int4 ``MatMulNBits`` kernel comes to
this machine's memory bandwidth when it decodes one token (M = 1), per block size and accuracy level.

The GenAI int4 decoder spends most of a decoding step in ``MatMulNBits`` (the weight matrices) and
the rest mostly in ``GroupQueryAttention`` reading the KV cache. This bench takes the first part alone:
a graph holding exactly the decoder's ``MatMulNBits`` nodes (per layer: the fused q/k/v projection,
o, gate, up, down; then the LM head), random packed weights and fp32 scales as the GenAI builder
writes them (symmetric, no zero points), run at M = 1 on ``threads`` intra-op threads. It reports

* the bytes those weights occupy (packed nibbles + scales) and the time of one pass, as GB/s;
* the streaming-read bandwidth measured right after (:func:`~hiwin_export.bench.memory_bandwidth_gbs`),
  and the ratio: the fraction of the weight-bandwidth floor the kernel reaches on its own;
* the same kernel on one small matrix that stays in cache, re-run: its rate in weight bytes per second
  is the kernel's compute ceiling on these cores. When it is not far above the streaming bandwidth, the
  kernel is compute-bound as much as memory-bound, and a decode step cannot reach the floor however
  the rest of the step is arranged.

Random weights: a kernel's speed does not depend on the values.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from hiwin_runtime.bench import Report

ACCURACY_LEVELS = {0: "unset (fp32)", 1: "fp32", 2: "fp16", 3: "bf16", 4: "int8"}  # MatMulNBits compute type
CACHED_SHAPE = (1024, 4096)  # (N, K): 2.1 MB at 4 bits, inside this class of machine's L2 + L3


def decoder_shapes(hidden: int, intermediate: int, vocab: int, layers: int, kv_hidden: int | None = None) -> list:
    """(K, N) of every ``MatMulNBits`` in the GenAI builder's int4 Llama decoder (exclude_embeds)."""
    kv = hidden if kv_hidden is None else kv_hidden
    layer = [(hidden, hidden + 2 * kv), (hidden, hidden), (hidden, intermediate), (hidden, intermediate),
             (intermediate, hidden)]
    return layer * layers + [(hidden, vocab)]


def packed_bytes(K: int, N: int, block: int) -> int:
    """Bytes of one int4 weight matrix as MatMulNBits stores it: nibbles + one fp32 scale per block."""
    blocks = -(-K // block)
    return N * blocks * block // 2 + N * blocks * 4


def matmulnbits_graph(shapes: list[tuple[int, int]], block: int, level: int, seed: int = 0):
    """One graph: a ``MatMulNBits`` per (K, N), each reading the input of width K."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    widths = sorted({K for K, _ in shapes})
    nodes, inits, outs = [], [], []
    for i, (K, N) in enumerate(shapes):
        blocks = -(-K // block)
        inits += [numpy_helper.from_array(rng.integers(0, 256, (N, blocks, block // 2), dtype=np.uint8), f"w{i}"),
                  numpy_helper.from_array((rng.standard_normal(N * blocks) * 0.01).astype(np.float32), f"s{i}")]
        nodes.append(helper.make_node("MatMulNBits", [f"x{K}", f"w{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft",
                                      K=K, N=N, bits=4, block_size=block, accuracy_level=level))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, N]))
    graph = helper.make_graph(nodes, "int4_kernel", [helper.make_tensor_value_info(f"x{K}", TensorProto.FLOAT, [1, K])
                                                     for K in widths], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model, widths


def time_graph(model, widths: list[int], threads: int, repeats: int, work: Path) -> float:
    """Median seconds of one run of ``model`` on ONNX Runtime's CPU provider (after 3 warm-up runs)."""
    import onnx
    import onnxruntime as ort

    path = work / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="m.onnx.data")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    feeds = {f"x{K}": rng.standard_normal((1, K)).astype(np.float32) for K in widths}
    for _ in range(3):
        sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    del sess
    return statistics.median(times)


def run_int4_kernel(*, hidden: int = 4096, intermediate: int = 11008, vocab: int = 32000, layers: int = 2,
                    blocks: tuple[int, ...] = (32, 128), levels: tuple[int, ...] = (4, 1), threads: int | None = None,
                    repeats: int = 15, cached_repeats: int = 200, bandwidth=None) -> Report:
    """The table described in the module docstring. ``bandwidth``: a zero-argument callable giving
    GB/s (default :func:`~hiwin_export.bench.memory_bandwidth_gbs`, measured after each row's pass)."""
    import onnxruntime as ort

    from .bench import memory_bandwidth_gbs
    from .genai import INT4_BLOCK_SIZES

    for b in blocks:
        if b not in INT4_BLOCK_SIZES:
            raise ValueError(f"block size must be one of {', '.join(map(str, INT4_BLOCK_SIZES))}, got {b}")
    for lv in levels:
        if lv not in ACCURACY_LEVELS:
            raise ValueError(f"accuracy level must be one of {sorted(ACCURACY_LEVELS)}, got {lv}")
    if threads is None:
        from hiwin_runtime.genai import physical_cores

        threads = physical_cores()
    bandwidth = bandwidth or memory_bandwidth_gbs
    shapes = decoder_shapes(hidden, intermediate, vocab, layers)
    n_cached, k_cached = min(CACHED_SHAPE[0], vocab), min(CACHED_SHAPE[1], hidden)
    rep = Report(
        f"ONNX Runtime {ort.__version__} MatMulNBits (int4, M=1, {threads} threads): the int4 decoder's "
        f"{len(shapes)} weight matrices (hidden {hidden}, MLP {intermediate}, vocabulary {vocab}, {layers} layers) "
        f"vs the streaming-read bandwidth; in-cache: one {n_cached}x{k_cached} matrix re-run",
        [("block", "block"), ("level", "accuracy level"), ("mb", "weights MB"), ("ms", "pass ms"),
         ("gbs", "weights GB/s"), ("bw", "stream GB/s"), ("ratio", "÷ stream"), ("cached_gbs", "in-cache GB/s"),
         ("cached_ratio", "in-cache ÷ stream"), ("tok_s", "matmul-only tok/s")])
    with tempfile.TemporaryDirectory(prefix="hiwin-int4-kernel-") as tmp:
        for block in blocks:
            for level in levels:
                nbytes = sum(packed_bytes(K, N, block) for K, N in shapes)
                t = time_graph(*matmulnbits_graph(shapes, block, level), threads, repeats, Path(tmp))
                bw = float(bandwidth())
                small = [(k_cached, n_cached)]
                tc = time_graph(*matmulnbits_graph(small, block, level), threads, cached_repeats, Path(tmp))
                cached = packed_bytes(k_cached, n_cached, block) / tc / 1e9
                rep.add(block=block, level=f"{level} ({ACCURACY_LEVELS[level]})", mb=round(nbytes / 1e6, 1),
                        ms=round(t * 1e3, 2), gbs=round(nbytes / t / 1e9, 1), bw=round(bw, 1),
                        ratio=round(nbytes / t / 1e9 / bw, 2), cached_gbs=round(cached, 1),
                        cached_ratio=round(cached / bw, 2), tok_s=round(1 / t, 1))
    rep.notes.append("÷ stream: the fraction of the weight-bandwidth floor this kernel reaches by itself (a whole "
                     "decoding step adds the attention's KV-cache read and the small ops). in-cache ÷ stream near 1: "
                     "the kernel's arithmetic, not memory, sets the pace on these cores.")
    rep.meta.update(threads=threads, shapes=shapes, onnxruntime=ort.__version__)
    return rep
