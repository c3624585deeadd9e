"""Language-model export and the runtime pipeline: decoder parity, ONNX-vs-PyTorch token equality,
sampling, streaming, concurrency, bad inputs, the ``run`` CLI."""

import json
import shutil
import threading

import numpy as np
import onnx
import pytest
import torch

from conftest import random_image
from hiwin_export.manifest import ExportDir, ExportError
from hiwin_export.parity import Harness, OnnxRunner, error_stats
from hiwin_export.runtime import GenerationConfig, Pipeline, RequestError, sample_next
from hiwin_model.image import ImageError

QUESTION = "What is in the image?"
# aspect ratios 1:4 ... 4:1 and a small image: grids 4x1, 3x2, 2x2, 1x1 (overview only) ...
SIZES = [(1344, 336), (1008, 672), (800, 800), (672, 1008), (336, 1344), (500, 300), (90, 60)]


@pytest.fixture(scope="module")
def ort_pipe(exported):
    return Pipeline.from_export(exported)


@pytest.fixture(scope="module")
def torch_pipe(tiny_model):
    return Pipeline.from_model(tiny_model)


# ----------------------------------------------------------------------------- decoder export
def test_decoder_graph_io_follows_the_genai_layout(exported):
    mf = json.loads((exported / "manifest.json").read_text())
    g, lang = mf["graphs"]["llm"], mf["language"]
    n = lang["num_layers"]
    past = [f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    assert [i["name"] for i in g["inputs"]] == ["inputs_embeds", "attention_mask", "position_ids", *past]
    assert [o["name"] for o in g["outputs"]] == ["logits", *[p.replace("past_key_values", "present") for p in past]]
    ins = {i["name"]: i for i in g["inputs"]}
    assert ins["inputs_embeds"]["shape"][2] == lang["hidden_size"] == 128
    assert ins["attention_mask"]["dtype"] == ins["position_ids"]["dtype"] == "int64"
    assert ins["past_key_values.0.key"]["shape"][1::2] == [lang["num_kv_heads"], lang["head_dim"]]
    assert ins["past_key_values.0.key"]["dynamic_axes"] == {"0": "batch", "2": "past"}
    assert mf["graphs"]["embed"]["outputs"][0]["name"] == "inputs_embeds"
    assert lang["token_ids"] == {"bos": 1, "eos": 2, "newline": 201, "comma": 14}
    assert lang["context_length"] == 4096 and lang["template"] == "vicuna_v1"
    assert mf["files"] and all(f.startswith("tokenizer/") for f in mf["files"])
    for name in ("llm", "llm.fp16"):  # standard ops only, no custom domain
        m = onnx.load(str(exported / f"{name}.onnx"), load_external_data=False)
        assert {o.domain for o in m.opset_import} <= {"", "ai.onnx"}
    p32, p16 = mf["parity"]["fp32"], mf["parity"]["fp16"]
    assert p32["llm"]["ok"] and p32["llm"]["worst_max_rel"] <= 1e-4 and p32["embed"]["worst_max_abs"] == 0
    assert p16["llm"]["ok"] and p16["llm"]["min_cosine"] >= 0.999


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_decoder_parity_prefill_and_decode(tiny_model, exported, precision):
    h = Harness(tiny_model, exported, precision=precision)
    h.language_cases(batch=3)
    cases = {r.case for r in h.records if r.graph == "llm"}
    assert any("past 0," in c for c in cases) and any("past 14, seq 1" in c for c in cases)
    h.assert_ok()
    if precision == "fp32":
        assert max(r.max_rel for r in h.records) < 1e-5


def test_decoder_parity_catches_other_weights(exported):
    from hiwin_model.tiny import build_tiny_model

    h = Harness(build_tiny_model(seed=3), exported, check_source=False)  # the numbers must catch it too
    h.language_cases(graphs=("llm",))
    with pytest.raises(AssertionError, match="fail max_rel"):
        h.assert_ok()


def test_decoder_feeds_are_checked(exported):
    runner = OnnxRunner(ExportDir(exported))
    lang = runner.export.manifest["language"]
    past = {f"past_key_values.{i}.{kv}": np.zeros((1, 4, 3, 32), np.float32)
            for i in range(lang["num_layers"]) for kv in ("key", "value")}
    feeds = {"inputs_embeds": np.zeros((1, 2, 128), np.float32), "attention_mask": np.ones((1, 5), np.int64),
             "position_ids": np.array([[3, 4]], np.int64), **past}
    assert runner.run("llm", feeds)["logits"].shape == (1, 2, 384)
    with pytest.raises(ExportError, match=r"attention_mask covers 4 positions, past \+ seq is 3 \+ 2"):
        runner.run("llm", {**feeds, "attention_mask": np.ones((1, 4), np.int64)})
    with pytest.raises(ExportError, match="must be int64"):
        runner.run("llm", {**feeds, "position_ids": feeds["position_ids"].astype(np.int32)})
    with pytest.raises(ExportError, match="axis 2 must be 128"):
        runner.run("llm", {**feeds, "inputs_embeds": np.zeros((1, 2, 64), np.float32)})
    with pytest.raises(ExportError, match="missing"):
        runner.run("llm", {k: v for k, v in feeds.items() if k != "past_key_values.1.value"})
    with pytest.raises(ExportError, match=r"token ids must be in \[0, 384\)"):
        runner.run("embed", {"input_ids": np.array([[1, 384]], np.int64)})


# ----------------------------------------------------------------------------- token equality
def _reference_logits(model, image, question, ids):
    """Teacher-forced logits of the reference for the prompt followed by ``ids``."""
    with torch.no_grad():
        prompt = model.processor.prompt(question)
        embeds = model.embed_prompt(prompt, model.encode_image(image))
        tail = model.llm.get_input_embeddings()(torch.tensor(ids[:-1] if ids else [], dtype=torch.long))
        full = torch.cat([embeds, tail[None]], dim=1)
        logits = model.llm(inputs_embeds=full).logits[0]
    L = embeds.shape[1]
    return logits[L - 1:L - 1 + len(ids)].numpy()


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_greedy_tokens_equal_the_reference(tiny_model, ort_pipe, torch_pipe, size):
    img = random_image(*size, seed=sum(size))
    ref = tiny_model.generate_ids(img, QUESTION, max_new_tokens=12)
    ans = ort_pipe.generate(img, QUESTION, max_new_tokens=12, keep_logits=True)
    assert ans.token_ids == ref
    assert torch_pipe.generate(img, QUESTION, max_new_tokens=12).token_ids == ref
    got = np.stack(ans.logits[:len(ref)])
    _, max_rel, cos = error_stats(_reference_logits(tiny_model, img, QUESTION, ref), got)
    assert max_rel <= 1e-4 and cos > 0.999999, (max_rel, cos)
    from hiwin_model.layout import num_image_tokens

    plan = tiny_model.processor.prepare_image(img).plan
    assert ans.visual_tokens == num_image_tokens(plan.grid)


def test_visual_tokens_match_the_reference(tiny_model, ort_pipe):
    img = random_image(1024, 768, seed=4)
    with torch.no_grad():
        ref = tiny_model.encode_image(img).numpy()
    _, max_rel, _ = error_stats(ref, ort_pipe.encode_image(img))
    assert max_rel <= 1e-4


def test_sampling_is_seeded_and_backend_independent(ort_pipe, torch_pipe):
    img = random_image(700, 500, seed=1)
    kw = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.95)
    a = ort_pipe.generate(img, QUESTION, seed=7, **kw)
    assert ort_pipe.generate(img, QUESTION, seed=7, **kw).token_ids == a.token_ids
    assert torch_pipe.generate(img, QUESTION, seed=7, **kw).token_ids == a.token_ids
    others = {tuple(ort_pipe.generate(img, QUESTION, seed=s, **kw).token_ids) for s in range(8, 12)}
    assert len(others | {tuple(a.token_ids)}) > 1  # the seed matters
    greedy = ort_pipe.generate(img, QUESTION, max_new_tokens=16).token_ids
    assert ort_pipe.generate(img, QUESTION, max_new_tokens=16, do_sample=True, top_p=1e-9, seed=3).token_ids == greedy


def test_top_p_keeps_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    cfg = GenerationConfig(do_sample=True, top_p=0.75)
    rng = np.random.default_rng(0)
    seen = {sample_next(logits, cfg, rng) for _ in range(400)}
    assert seen == {0, 1}  # 0.5 < 0.75, 0.5 + 0.3 crosses it: tokens 0 and 1 only
    assert sample_next(logits, GenerationConfig(), None) == 0


# ----------------------------------------------------------------------------- streaming
def _forcing(pipe, target: list[int], events: list | None = None):
    """Make ``pipe``'s backend emit ``target`` then EOS (real forward passes, logits overridden)."""
    real = pipe.backend.forward
    step = [0]

    def forward(embeds, cache, past):
        logits, cache = real(embeds, cache, past)
        logits = np.full_like(logits, -10.0)
        nxt = target[step[0]] if step[0] < len(target) else pipe.processor.ids.eos
        logits[nxt] = 10.0
        step[0] += 1
        if events is not None:
            events.append("forward")
        return logits, cache

    pipe.backend.forward = forward


def test_streaming_delivers_the_answer_piece_by_piece(exported):
    pipe = Pipeline.from_export(exported)
    text = "The image shows a red square, a blue circle and a green triangle."
    target = pipe.processor.encode_text(text)
    events: list = []
    _forcing(pipe, target, events)
    chunks: list[str] = []

    def on_text(t):
        chunks.append(t)
        events.append("text")

    ans = pipe.generate(random_image(640, 480, seed=2), QUESTION, max_new_tokens=64, on_text=on_text)
    assert ans.token_ids == target and ans.finish_reason == "eos" and ans.text == text
    assert len(chunks) > 5 and "".join(chunks) == text
    assert events.index("text") < len(events) - 1 - events[::-1].index("forward")  # text before the last step
    # the generator form yields the same pieces and returns the Answer
    _forcing(pipe, target)
    it = pipe.stream(random_image(640, 480, seed=2), QUESTION, max_new_tokens=64)
    pieces = []
    with pytest.raises(StopIteration) as stop:
        while True:
            pieces.append(next(it))
    assert pieces == chunks and stop.value.value.token_ids == target


def test_streamed_text_of_a_real_run_is_the_answer(ort_pipe):
    chunks: list[str] = []
    ans = ort_pipe.generate(random_image(640, 480, seed=2), QUESTION, max_new_tokens=24, on_text=chunks.append)
    assert "".join(chunks).strip() == ans.text and ans.timings["ttft_s"] > 0
    assert ans.finish_reason in ("eos", "length") and len(ans.token_ids) <= 24


def test_max_new_tokens_caps_the_answer(exported):
    pipe = Pipeline.from_export(exported)
    _forcing(pipe, list(range(10, 40)))
    ans = pipe.generate(random_image(336, 336), QUESTION, max_new_tokens=7)
    assert ans.token_ids == list(range(10, 17)) and ans.finish_reason == "length"


def test_stops_at_eos(tiny_model):
    """A model whose most likely token is EOS from the first step on: no tokens, finish 'eos'."""
    pipe = Pipeline.from_model(tiny_model)
    _forcing(pipe, [])
    ans = pipe.generate(random_image(336, 336), QUESTION, max_new_tokens=5)
    assert ans.token_ids == [] and ans.text == "" and ans.finish_reason == "eos"


# ----------------------------------------------------------------------------- concurrency
def test_concurrent_requests_match_serial_runs(exported):
    """8 requests at once on one pipeline (max_concurrency 3): the serial answers."""
    from concurrent.futures import ThreadPoolExecutor

    pipe = Pipeline.from_export(exported, max_concurrency=3)
    reqs = [(random_image(*SIZES[i % len(SIZES)], seed=i), f"{QUESTION} ({i})") for i in range(8)]
    serial = [pipe.generate(img, q, max_new_tokens=10).token_ids for img, q in reqs]
    active, peak = [0], [0]
    cond = threading.Condition()
    real = pipe.backend.forward

    def counting(embeds, cache, past):
        with cond:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            cond.notify_all()
            if peak[0] < 2:  # until two requests were seen in the LLM together, give one the chance
                cond.wait_for(lambda: active[0] >= 2, timeout=10)  # (a serialising pipeline times out)
        try:
            return real(embeds, cache, past)
        finally:
            with cond:
                active[0] -= 1

    pipe.backend.forward = counting
    with ThreadPoolExecutor(8) as pool:
        def round_() -> list:
            return list(pool.map(lambda r: pipe.generate(*r, max_new_tokens=10).token_ids, reqs))

        assert round_() == serial
        assert 1 < peak[0] <= 3  # concurrent, within max_concurrency


@pytest.mark.parametrize("leak", [False, True], ids=["pipeline", "negative-control"])
def test_nothing_is_kept_per_request(exported, leak):
    """Memory is bounded by max_concurrency requests in flight: once 8 concurrent requests are
    answered, no KV cache or logits array of theirs is alive. A pipeline that keeps its caches
    (the negative control) is caught by the same check. (RSS itself is no test signal: ONNX
    Runtime's arena and glibc's per-thread arenas grow to a plateau; the README gives numbers.)"""
    import gc
    import weakref
    from concurrent.futures import ThreadPoolExecutor

    pipe = Pipeline.from_export(exported, max_concurrency=4)
    refs: list = []
    kept: list = []
    real = pipe.backend.forward

    def tracking(embeds, cache, past):
        logits, cache = real(embeds, cache, past)
        refs.extend(weakref.ref(a) for a in [logits, *cache.values()])
        if leak:
            kept.append(cache)
        return logits, cache

    pipe.backend.forward = tracking
    reqs = [(random_image(*SIZES[i % len(SIZES)], seed=i), f"{QUESTION} ({i})") for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda r: pipe.generate(*r, max_new_tokens=5), reqs))
    gc.collect()
    alive = sum(r() is not None for r in refs)
    assert len(refs) >= 8 * 5 and len(answers) == 8  # at least each prefill's logits + 2 layers x (k, v)
    if leak:
        assert alive >= 4 * 8  # the last cache of every request
    else:
        assert alive == 0


# ----------------------------------------------------------------------------- bad input
def test_bad_requests_are_clear_errors_and_the_pipeline_survives(ort_pipe, tmp_path):
    good = random_image(400, 300, seed=9)
    want = ort_pipe.generate(good, QUESTION, max_new_tokens=6).token_ids
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    cases = [
        (dict(image=corrupt), ImageError, "broken.png"),
        (dict(image=tmp_path / "missing.jpg"), ImageError, "missing.jpg"),
        (dict(question=""), RequestError, "the question is empty"),
        (dict(question="   "), RequestError, "the question is empty"),
        (dict(max_new_tokens=0), RequestError, "max_new_tokens must be > 0"),
        (dict(max_new_tokens=-3), RequestError, "max_new_tokens must be > 0"),
        (dict(max_new_tokens=4000), RequestError, "exceeds the context of 4096 tokens"),
        (dict(question="describe " * 3000), RequestError, "exceeds the context of 4096 tokens"),
        (dict(do_sample=True, temperature=0.0), RequestError, "temperature > 0"),
        (dict(template="chatml"), RequestError, "unknown template"),
        (dict(beams=4), RequestError, "unknown generation setting"),
    ]
    for overrides, exc, match in cases:
        kw = dict(image=good, question=QUESTION, max_new_tokens=6) | overrides
        with pytest.raises(exc, match=match):
            ort_pipe.generate(kw.pop("image"), kw.pop("question"), **kw)
        assert ort_pipe.generate(good, QUESTION, max_new_tokens=6).token_ids == want  # still usable


def test_bad_export_directories(exported, tmp_path):
    with pytest.raises(ExportError, match="export directory not found"):
        Pipeline.from_export(tmp_path / "nope")
    with pytest.raises(ExportError, match="no manifest.json"):
        Pipeline.from_export(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    (broken / "llm.onnx").unlink()
    with pytest.raises(ExportError, match="llm.onnx is missing"):
        Pipeline.from_export(broken)
    with pytest.raises(ExportError, match="no graph 'llm.fp16'"):  # unchecked directory, graph absent
        mf = json.loads((exported / "manifest.json").read_text())
        del mf["graphs"]["llm.fp16"]
        shutil.copytree(exported, tmp_path / "no16")
        (tmp_path / "no16" / "manifest.json").write_text(json.dumps(mf))
        Pipeline.from_export(tmp_path / "no16", precision="fp16")
    mf = json.loads((exported / "manifest.json").read_text())
    del mf["language"]
    (tmp_path / "no16" / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(ExportError, match="vision-only export"):
        Pipeline.from_export(tmp_path / "no16")
    with pytest.raises(ExportError, match="neither an export directory"):
        Pipeline.load(tmp_path)


# ----------------------------------------------------------------------------- CLI
def test_cli_run_streams_the_answer(exported, ort_pipe, tmp_path, capsys):
    from hiwin_export.cli import main

    img = random_image(900, 600, seed=5)
    path = tmp_path / "page.png"
    img.save(path)
    want = ort_pipe.generate(img, "Read the text.", max_new_tokens=8).text
    assert main(["run", "--model", str(exported), "--image", str(path), "--prompt", "Read the text.",
                 "--max-new-tokens", "8"]) == 0
    cap = capsys.readouterr()
    assert cap.out == f"question: Read the text.\nanswer: {want}\n" and "time to first token" in cap.err
    assert main(["run", "--model", str(exported), "--image", str(tmp_path / "none.png")]) == 2
    assert "none.png" in capsys.readouterr().err
    assert main(["run", "--model", str(tmp_path / "nope")]) == 2
    assert "directory not found" in capsys.readouterr().err
    assert main(["run", "--model", str(exported), "--image", str(path), "--max-new-tokens", "0"]) == 2
    assert "max_new_tokens must be > 0" in capsys.readouterr().err


def test_bench_end_to_end_rows(exported):
    """The end-to-end benchmark's workers and table (tiny; `hiwin-export bench --e2e` runs both)."""
    from hiwin_export.bench import e2e_worker, format_e2e

    res = {b: e2e_worker(b, str(exported), "tiny", 2, [(500, 300)], 6, 1) for b in ("torch", "ort")}
    r = res["ort"]["images"]["500x300"]
    assert r["new_tokens"] == 6 and r["ttft_s"] > 0 and r["decode_tok_s"] > 0  # EOS ignored: all 6 tokens
    assert r["visual_tokens"] == res["torch"]["images"]["500x300"]["visual_tokens"]
    # the KV size per position: read from llm.onnx's inputs and from the PyTorch config, the same fp32 cache
    assert res["ort"]["kv_bytes_per_position"] == res["torch"]["kv_bytes_per_position"] > 0
    rows = format_e2e("tiny", res).markdown().splitlines()[-2:]
    assert rows[1].startswith("| tiny | 500x300 |") and rows[1].endswith("| yes |")


def test_prompt_table_form_equals_the_spliced_embeddings(tiny_model, torch_pipe):
    """TensorRT-LLM / Edge-LLM's contract: fake ids vocab..vocab+T-1 index the visual rows appended
    to the embedding table; the result is exactly the prompt the embedding backends prefill."""
    from hiwin_export.runtime import prompt_table_ids

    img = random_image(700, 400, seed=8)
    visual = torch_pipe.encode_image(img)
    pre, post = torch_pipe.tokenize(QUESTION)
    vocab = tiny_model.llm.config.vocab_size
    ids = prompt_table_ids(pre, len(visual), post, vocab)
    assert len(ids) == len(pre) + len(visual) + len(post) and max(ids) == vocab + len(visual) - 1
    table = np.concatenate([tiny_model.llm.get_input_embeddings().weight.detach().numpy(), visual])
    spliced = np.concatenate([torch_pipe.backend.embed(np.array(pre)), visual, torch_pipe.backend.embed(np.array(post))])
    np.testing.assert_array_equal(table[ids], spliced)


def test_cli_run_without_arguments_is_the_main_job(exported, monkeypatch, capsys):
    """`hiwin-export run` alone: embedded demo model -> export into a temp dir -> answer a held-out
    demo question. (The export itself is replaced by a copy of this session's tiny export, same widths,
    which the export tests check: this checks the wiring and the output, so the answer is the tiny
    model's noise; tests/export/test_eval.py::test_main_job_answers_correctly runs the real export.)"""
    from hiwin_export import export as export_mod
    from hiwin_export.cli import main
    from hiwin_model.demo_task import demo_question

    calls = []

    def fake_export(model, out, **kw):
        calls.append((model.config.projector.dim, model.config.vision.num_hidden_layers, kw))
        shutil.copytree(exported, out)

    monkeypatch.setattr(export_mod, "export_model", fake_export)
    assert main(["run", "--max-new-tokens", "5"]) == 0
    cap = capsys.readouterr()
    assert calls == [(128, 4, {"bundles": False, "parity": "quick", "precisions": ("fp32",), "genai": "fp32"})]  # the demo model
    assert "457 visual + " in cap.err and "[onnxruntime]" in cap.err  # 252x504 page: 1x2 slices + overview
    _, question, expected = demo_question()
    lines = cap.out.splitlines()
    assert lines[0] == f"question: {question}" and lines[1].startswith("answer: ")
    assert lines[2].startswith(f"expected: {expected} (") and len(lines) == 3


def test_fp16_graphs_answer_like_the_reference(tiny_model, exported):
    """The strongly typed fp16 graphs through the same pipeline: logits within cosine 0.999 of the
    reference (teacher-forced on its greedy tokens) on two aspect ratios."""
    pipe = Pipeline.from_export(exported, precision="fp16")
    for size in [(1008, 672), (336, 1344)]:
        img = random_image(*size, seed=sum(size))
        ref = tiny_model.generate_ids(img, QUESTION, max_new_tokens=8)
        ans = pipe.generate(img, QUESTION, max_new_tokens=8, keep_logits=True)
        n = min(len(ref), len(ans.logits))
        first_diff = next((i for i, (x, y) in enumerate(zip(ref, ans.token_ids)) if x != y), n)
        got = np.stack(ans.logits[:first_diff + 1][:n])  # same prefix -> comparable logits
        _, _, cos = error_stats(_reference_logits(tiny_model, img, QUESTION, ref)[:len(got)], got)
        assert cos >= 0.999, (size, cos)


def test_no_silent_provider_fallback(exported):
    """ONNX Runtime quietly runs on the CPU when a requested provider is unavailable: refused."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("needs an ONNX Runtime without CUDA (this one has it; the fallback cannot happen)")
    runner = OnnxRunner(ExportDir(exported), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(ExportError, match="CUDAExecutionProvider was requested but ONNX Runtime runs"):
        runner.run("vit", {"pixel_values": np.zeros((1, 3, 28, 28), np.float32)})
    from hiwin_export.runtime import default_providers

    assert default_providers() == ["CPUExecutionProvider"]
