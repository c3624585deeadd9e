"""`hiwin-export bench --e2e` additions: decoder weight bytes as stored (the bandwidth floor's numerator),
the floor columns, and the greedy-agreement report (synthetic inputs; the real run is a benchmark)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def test_onnx_weight_bytes_counts_stored_bytes_without_the_embedding_table(tmp_path):
    from hiwin_export.bench import onnx_weight_bytes

    w = np.ones((64, 32), np.float32)            # 8192 bytes, external
    q = np.ones((32, 4, 16), np.uint8)            # 2048 bytes, packed int4-like, inline
    s = np.ones((32, 4), np.float16)              # 256 bytes, inline
    e = np.ones((100, 32), np.float32)            # the embedding table: not read per token
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(q, "q"), numpy_helper.from_array(s, "s"),
         numpy_helper.from_array(e, "model.embed_tokens.weight")])
    m = helper.make_model(g)
    path = tmp_path / "m.onnx"
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
                    size_threshold=4096)
    loaded = onnx.load(str(path), load_external_data=False)
    assert {t.name for t in loaded.graph.initializer if t.data_location == TensorProto.EXTERNAL} >= {"w"}
    assert onnx_weight_bytes(path) == 8192 + 2048 + 256


def test_kv_bytes_per_position_from_the_decoder_inputs(tmp_path):
    """The KV read of a decoding step: every layer's past keys and values, at their stored type, per
    cached position; averaged over the steps of a decode."""
    import pytest

    from hiwin_export.bench import mean_kv_read_bytes, onnx_kv_bytes_per_position

    def graph(dtype, heads=4, head_dim=8, layers=3, static=True):
        ins = [helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", dtype,
                                             ["batch", heads if static else "h", "past", head_dim])
               for i in range(layers) for kv in ("key", "value")]
        ins.append(helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch", "seq", 16]))
        g = helper.make_graph([helper.make_node("Identity", ["inputs_embeds"], ["y"])], "g", ins,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 16])])
        path = tmp_path / f"d{dtype}{static}.onnx"
        onnx.save_model(helper.make_model(g), str(path))
        return path

    assert onnx_kv_bytes_per_position(graph(TensorProto.FLOAT)) == 3 * 2 * 4 * 8 * 4
    assert onnx_kv_bytes_per_position(graph(TensorProto.FLOAT16)) == 3 * 2 * 4 * 8 * 2
    with pytest.raises(ValueError, match="static heads"):
        onnx_kv_bytes_per_position(graph(TensorProto.FLOAT, static=False))
    # the GenAI builder's decoder: head-dim axis symbolic ("kv_cache_dim"), its size in genai_config.json
    symbolic = graph(TensorProto.FLOAT, head_dim="kv_cache_dim")
    assert onnx_kv_bytes_per_position(symbolic, head_dim=8) == 3 * 2 * 4 * 8 * 4
    with pytest.raises(ValueError, match="static heads"):
        onnx_kv_bytes_per_position(symbolic)
    # steps 1..T-1 attend over P+1..P+T-1 positions: mean P + T/2
    assert mean_kv_read_bytes(100, 20, 9) == 100 * sum(20 + k for k in range(1, 9)) / 8
    assert mean_kv_read_bytes(100, 20, 1) == 0.0


def test_floor_columns_and_agreement_report(tmp_path):
    from hiwin_export.bench import format_agreement, format_e2e, memory_bandwidth_gbs
    from hiwin_runtime.bench import Report

    bw = memory_bandwidth_gbs(mib=64, repeats=2)
    assert 0.1 < bw < 10_000  # GB/s, a plausible machine

    def side(tokens, agree, wb, rate):
        return {"weight_bytes": wb, "peak_rss_mib": 100.0, "images": {"10x10": dict(
            prompt_tokens=20, visual_tokens=12, new_tokens=len(tokens), token_ids=tokens, vision_s=0.1,
            prefill_s=0.2, ttft_s=0.3, decode_tok_s=rate, agree_token_ids=agree)}}

    ref = list(range(8))
    res = {"torch": side(ref, ref, 4e9, 5.0), "ort": side(ref, ref, 4e9, 6.0),
           "genai-fp32": side(ref, ref, 4e9, 7.0), "genai-int4": side(ref, ref[:3] + [99, 3, 4, 98, 7], 5e8, 30.0)}
    rep = format_e2e("tiny", res, bandwidth_gbs=20.0)
    int4 = next(r for r in rep.rows if r["backend"].startswith("ORT + GenAI int4"))
    assert int4["floor_tok_s"] == 40.0 and int4["of_floor"] == 0.75 and int4["weight_mib"] == round(5e8 / 2**20, 1)
    fp32 = next(r for r in rep.rows if r["backend"] == "ONNX Runtime")
    assert fp32["floor_tok_s"] == 5.0 and fp32["of_floor"] == 1.2
    assert int4["of_floor_kv"] is None and int4["kv_mib"] is None  # workers that did not report the KV size
    # with the KV cache: 1e6 bytes per position, prompt 20, 8 new tokens -> 24e6 bytes per step on average
    res["genai-int4"]["kv_bytes_per_position"] = 1e6
    int4 = next(r for r in format_e2e("tiny", res, bandwidth_gbs=20.0).rows if r["backend"].startswith("ORT + GenAI int4"))
    assert int4["kv_mib"] == round(24e6 / 2**20, 1) and int4["of_floor_kv"] == round(30.0 * (5e8 + 24e6) / 20e9, 2)

    rng = np.random.default_rng(0)
    base = rng.standard_normal(50)
    for b, v in (("torch", base), ("ort", base), ("genai-fp32", base), ("genai-int4", -base)):
        np.save(tmp_path / f"{b}-10x10.npy", v.astype(np.float32))
    agree = format_agreement("tiny", res, tmp_path, Report("a", []))
    rows = {(r["backend"], r["reference"]): r for r in agree.rows}
    assert rows[("genai-int4", "genai-fp32")]["lead"] == "3 of 8"
    assert rows[("genai-int4", "genai-fp32")]["matches"] == "4 of 8"  # positions 0, 1, 2 and 7
    assert rows[("genai-int4", "genai-fp32")]["cosine"] == "-1.000000"
    assert rows[("genai-fp32", "torch")]["lead"] == "8 of 8" and rows[("genai-fp32", "torch")]["cosine"] == "1.000000"
    assert ("genai-fp16", "genai-fp32") not in rows  # not run: no row


def test_rounds_merge_medians_and_same_round_ratios():
    """`--rounds N`: timings are medians over rounds; decode ÷ floor uses each round's own bandwidth and
    decode ÷ ORT loop pairs rates of the same round (a fast-memory round lifts both sides)."""
    from hiwin_export.bench import format_e2e, merge_rounds

    def worker(rate, bw, tokens=(1, 2, 3)):
        return {"weight_bytes": 1e9, "kv_bytes_per_position": 1e7, "peak_rss_mib": 100.0 + rate, "bandwidth_gbs": bw,
                "images": {"10x10": dict(
            prompt_tokens=20, visual_tokens=12, new_tokens=3, token_ids=list(tokens), vision_s=0.1,
            prefill_s=rate / 10, ttft_s=0.3, decode_tok_s=rate)}}

    # round 2 is a fast-memory phase: both backends speed up, the ratio stays 1.5
    rounds = {"torch": [worker(5, 40), worker(5, 60), worker(5, 40)],
              "ort": [worker(10, 40), worker(20, 80), worker(12, 40)],
              "genai-fp32": [worker(15, 40), worker(30, 80), worker(18, 40)]}
    res = merge_rounds(rounds)
    g = res["genai-fp32"]["images"]["10x10"]
    assert g["decode_tok_s"] == 18 and g["decode_rounds"] == [15, 30, 18]
    assert g["vs_ort"] == 1.5
    assert g["floor_tok_s"] == 40.0 and g["of_floor"] == 0.375  # rates 15/40, 30/80, 18/40
    # with the KV read (1e7 bytes x (20 + 3/2) positions = 2.15e8 bytes a step): each round's own bandwidth
    assert g["kv_read_bytes"] == 2.15e8 and abs(g["of_floor_kv"] - 0.375 * 1.215) < 1e-12
    assert res["genai-fp32"]["peak_rss_mib"] == 130.0  # the largest of the rounds
    rows = {r["backend"]: r for r in format_e2e("tiny", res, bandwidth_gbs=999.0).rows}
    assert rows["ORT + GenAI fp32 (language)"]["vs_ort"] == 1.5
    assert rows["ORT + GenAI fp32 (language)"]["floor_tok_s"] == 40.0  # the rounds' own, not the run's 999
    assert rows["ONNX Runtime"]["vs_ort"] == 1.0
    assert rows["ORT + GenAI fp32 (language)"]["decode_rounds"] == "15.0 / 30.0 / 18.0"


def test_int4_kernel_bench_rows_and_byte_count(tmp_path):
    """`bench --int4-kernel` at toy sizes: a row per block x accuracy level, the weight bytes equal to
    what the graph stores, the ratios against the bandwidth given; bad block sizes / levels refused.
    (The graph's shapes are checked against a real GenAI int4 decoder in tests/runtime/test_genai.py.)"""
    import pytest

    pytest.importorskip("onnxruntime")
    from hiwin_export.int4_kernel import decoder_shapes, matmulnbits_graph, packed_bytes, run_int4_kernel

    shapes = decoder_shapes(64, 96, 50, 2)
    assert shapes == [(64, 192), (64, 64), (64, 96), (64, 96), (96, 64)] * 2 + [(64, 50)]
    for block in (32, 128):  # K=96 at block 128: one partial block per row, stored padded
        model, widths = matmulnbits_graph(shapes, block, 4)
        assert widths == [64, 96]
        stored = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
        assert stored == sum(packed_bytes(K, N, block) for K, N in shapes)
    rep = run_int4_kernel(hidden=64, intermediate=96, vocab=50, layers=2, blocks=(32, 128), levels=(4, 1),
                          threads=1, repeats=2, cached_repeats=2, bandwidth=lambda: 10.0)
    assert [(r["block"], r["level"]) for r in rep.rows] == [(32, "4 (int8)"), (32, "1 (fp32)"),
                                                          (128, "4 (int8)"), (128, "1 (fp32)")]
    for r in rep.rows:
        assert r["mb"] == round(sum(packed_bytes(K, N, r["block"]) for K, N in shapes) / 1e6, 1)
        assert r["bw"] == 10.0 and r["gbs"] > 0 and r["cached_gbs"] > 0
        assert abs(r["ratio"] - r["gbs"] / 10.0) <= 0.011 and abs(r["cached_ratio"] - r["cached_gbs"] / 10.0) <= 0.011
    assert "÷ stream" in rep.markdown()
    with pytest.raises(ValueError, match="block size must be one of"):
        run_int4_kernel(blocks=(48,))
    with pytest.raises(ValueError, match="accuracy level must be one of"):
        run_int4_kernel(levels=(7,))
