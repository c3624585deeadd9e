"""The language half on TensorRT-LLM (docs/trtllm.md), up to the import boundary.

``hiwin-export trtllm`` really runs here (ModelOpt PTQ on the CPU, unified HF checkpoint): the fp8 and
int4-AWQ checkpoints are read back, dequantized and compared with the source and with ModelOpt's own
fake-quantized model. TensorRT-LLM itself cannot be installed here: a fake ``tensorrt_llm`` (below)
records the LLM constructor and every request, applies our registered input processor exactly where
the LLM API does (``attach_multimodal_embeddings``), splices the rows with TensorRT-LLM's documented
rule (ids >= vocab size take the visual rows in order) and decodes with the export's ONNX decoder: so
the request, the prompt table and the splice are tested end to end against the ONNX Runtime pipeline.
None of this tests TensorRT-LLM; the last test runs the real thing where it and a GPU exist."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from conftest import random_image
from hiwin_runtime.pipeline import GenerationConfig, Pipeline, RequestError, prompt_table_ids

QUESTION = "What is in the image?"


# ----------------------------------------------------------------------------------- fake TensorRT-LLM
class FakeTrtLlm:
    """Installs fake ``tensorrt_llm`` modules; ``calls`` records constructors and requests."""

    def __init__(self, export_dir):
        self.export_dir = export_dir
        self.calls: list[tuple] = []
        self.auto_models: dict = {}
        self.input_processors: dict = {}
        self.fused: list = []

    def modules(self) -> dict:
        fake = self
        import torch

        root = types.ModuleType("tensorrt_llm")
        root.__version__ = "0.0-fake"

        class SamplingParams:
            def __init__(self, **kw):
                fake.calls.append(("SamplingParams", kw))
                self.__dict__.update(kw)

        class KvCacheConfig:
            def __init__(self, **kw):
                self.kw = kw

        class Output:
            def __init__(self, ids, reason):
                self.outputs = [types.SimpleNamespace(token_ids=list(ids), finish_reason=reason)]

        class Result:  # GenerationResult: iterable while streaming, finished, abort()
            def __init__(self, it):
                self.it, self.finished = it, False

            def __iter__(self):
                return self

            def __next__(self):
                try:
                    out = next(self.it)
                except StopIteration:
                    self.finished = True
                    raise
                self.finished = out.outputs[0].finish_reason is not None
                return out

            def abort(self):
                fake.calls.append(("abort",))

        class LLM:
            def __init__(self, **kw):
                fake.calls.append(("LLM", kw))
                self.kw = kw
                conf = json.loads((__import__("pathlib").Path(kw["model"]) / "config.json").read_text())
                arch = conf["architectures"][0]
                self.model_cls = fake.auto_models[arch]  # like TensorRT-LLM: unknown architecture -> KeyError
                self.processor = fake.input_processors[self.model_cls](kw["model"], types.SimpleNamespace(
                    vocab_size=conf["vocab_size"], hidden_size=conf["hidden_size"]), None)
                from hiwin_runtime.manifest import ExportDir
                from hiwin_runtime.pipeline import OrtBackend

                self.ort = OrtBackend(ExportDir(fake.export_dir))
                self.vocab = conf["vocab_size"]

            def generate_async(self, inputs, sampling_params=None, streaming=False):
                fake.calls.append(("generate_async", inputs, sampling_params, streaming))
                # the LLM API: a prompt with multi_modal_embeddings goes through the input processor
                ids, extra = self.processor.attach_multimodal_embeddings(
                    inputs, inputs["multi_modal_embeddings"], sampling_params)
                rows = extra["multimodal_data"]["multimodal_embedding"]
                fake.fused.append((list(ids), rows))
                from hiwin_runtime.trtllm import splice

                emb = splice(ids, rows.numpy(), self.ort.embed, self.vocab)
                return Result(self._decode(emb, sampling_params))

            def _decode(self, emb, sp):
                logits, cache = self.ort.forward(emb[None], self.ort.empty_cache(), 0)
                past, out = emb.shape[0], []
                rng = np.random.default_rng(getattr(sp, "seed", 0))
                for _ in range(sp.max_tokens):
                    if sp.top_k == 1:
                        tok = int(np.argmax(logits))
                    else:  # some sampler (not ours): only the plumbing is tested
                        p = np.exp((logits - logits.max()) / sp.temperature)
                        tok = int(rng.choice(p.size, p=p / p.sum()))
                    out.append(tok)
                    if tok == sp.end_id and not sp.ignore_eos:
                        yield Output(out, "stop")
                        return
                    yield Output(out, None)
                    logits, cache = self.ort.forward(self.ort.embed(np.array([tok]))[None], cache, past)
                    past += 1
                yield Output(out, "length")

        root.LLM, root.SamplingParams = LLM, SamplingParams
        llmapi = types.ModuleType("tensorrt_llm.llmapi")
        llmapi.KvCacheConfig = KvCacheConfig
        inputs = types.ModuleType("tensorrt_llm.inputs")

        class InputProcessor:
            pass

        def register_input_processor(cls, **kw):
            def deco(model_cls):
                fake.input_processors[model_cls] = cls
                fake.calls.append(("register_input_processor", cls.__name__, kw))
                return model_cls
            return deco

        inputs.InputProcessor, inputs.register_input_processor = InputProcessor, register_input_processor
        ml = types.ModuleType("tensorrt_llm._torch.models.modeling_llama")

        class LlamaForCausalLM:
            def __init__(self, table):
                self.model = types.SimpleNamespace(embed_tokens=torch.nn.Embedding.from_pretrained(table))

            def forward(self, attn_metadata, input_ids=None, position_ids=None, inputs_embeds=None,
                        return_context_logits=False):
                return ("llama.forward", input_ids, inputs_embeds)

        ml.LlamaForCausalLM = LlamaForCausalLM
        mu = types.ModuleType("tensorrt_llm._torch.models.modeling_multimodal_utils")

        def fuse_input_embeds(embedding, input_ids, mm_embeds):  # the documented rule, in torch
            mm = torch.cat(mm_embeds)
            is_mm = input_ids >= embedding.num_embeddings
            out = torch.empty(input_ids.shape[0], mm.shape[1])
            out[~is_mm] = embedding(input_ids[~is_mm])
            out[is_mm] = mm.to(out.dtype)
            return None, out

        mu.fuse_input_embeds = fuse_input_embeds
        mut = types.ModuleType("tensorrt_llm._torch.models.modeling_utils")

        def register_auto_model(name):
            def deco(cls):
                fake.auto_models[name] = cls
                return cls
            return deco

        mut.register_auto_model = register_auto_model
        pkgs = {n: types.ModuleType(n) for n in ("tensorrt_llm._torch", "tensorrt_llm._torch.models")}
        return {"tensorrt_llm": root, "tensorrt_llm.llmapi": llmapi, "tensorrt_llm.inputs": inputs, **pkgs,
                "tensorrt_llm._torch.models.modeling_llama": ml,
                "tensorrt_llm._torch.models.modeling_multimodal_utils": mu,
                "tensorrt_llm._torch.models.modeling_utils": mut}


@pytest.fixture
def fake_trtllm(monkeypatch, light_export):
    import hiwin_runtime.trtllm_model as tm

    fake = FakeTrtLlm(light_export)
    for name, mod in fake.modules().items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(tm, "_registered", False)  # register with this fake
    return fake


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def light_export(exported):
    return exported  # the session's export of the tiny model (shared with the other runtime tests)


@pytest.fixture(scope="module")
def trtllm_fp16(tiny_model, tmp_path_factory):
    from hiwin_export.trtllm import build_trtllm

    out = tmp_path_factory.mktemp("trtllm") / "fp16"
    build_trtllm(out, model=tiny_model, precision="fp16", check=False)
    return out


@pytest.fixture(scope="module")
def ort_pipe(light_export):
    return Pipeline.from_export(light_export)


# ----------------------------------------------------------------------------------- the request
def test_request_holds_the_prompt_table_and_the_exact_rows():
    from hiwin_runtime.trtllm import IDS_KEY, attach_rows, build_request

    rng = np.random.default_rng(0)
    visual = rng.standard_normal((7, 16)).astype(np.float32)
    req = build_request([1, 5, 9], visual, [4, 2], vocab_size=50, hidden_size=16)
    ids = req["mm_processor_kwargs"][IDS_KEY]
    assert ids == [1, 5, 9, 50, 51, 52, 53, 54, 55, 56, 4, 2] == prompt_table_ids([1, 5, 9], 7, [4, 2], 50)
    (rows,) = req["multi_modal_embeddings"]["image"]
    assert rows.dtype == np.float32 and rows.shape == (7, 16) and np.array_equal(rows, visual)
    assert isinstance(req["prompt"], str)
    assert attach_rows(req, vocab_size=50, hidden_size=16)[0] == ids
    # float64 rows are converted, not refused; the values stay
    assert np.array_equal(build_request([1], visual.astype(np.float64), [], vocab_size=50,
                                        hidden_size=16)["multi_modal_embeddings"]["image"][0], visual)
    for kw, match in ((dict(visual=visual[:, :8]), r"\[T, 16\]"), (dict(visual=visual[:0]), "no visual rows"),
                      (dict(visual=np.full((2, 16), np.nan, np.float32)), "NaN"),
                      (dict(pre=[1, 50]), "out of the vocabulary"), (dict(post=[-3]), "out of the vocabulary")):
        args = dict(pre=[1], visual=visual, post=[2]) | kw
        with pytest.raises(RequestError, match=match):
            build_request(args["pre"], args["visual"], args["post"], vocab_size=50, hidden_size=16)
    with pytest.raises(ValueError, match="mm_processor_kwargs"):
        attach_rows({"multi_modal_embeddings": {"image": [visual]}}, vocab_size=50, hidden_size=16)
    bad = dict(req, mm_processor_kwargs={IDS_KEY: ids[:-4] + [2]})  # 6 table ids for 7 rows
    with pytest.raises(ValueError, match="do not index the 7 visual rows"):
        attach_rows(bad, vocab_size=50, hidden_size=16)
    with pytest.raises(ValueError, match="exactly one"):
        attach_rows(dict(req, multi_modal_embeddings={"image": [visual, visual]}), vocab_size=50, hidden_size=16)


def test_splice_is_the_embedding_backends_prompt():
    from hiwin_runtime.trtllm import splice

    rng = np.random.default_rng(1)
    table, rows = rng.standard_normal((50, 8)).astype(np.float32), rng.standard_normal((3, 8)).astype(np.float32)
    ids = prompt_table_ids([1, 7], 3, [9], 50)
    out = splice(ids, rows, lambda i: table[i], 50)
    assert np.array_equal(out, np.concatenate([table[[1, 7]], rows, table[[9]]]))


def test_sampling_params_mapping():
    from hiwin_runtime.trtllm import sampling_kwargs

    g = sampling_kwargs(GenerationConfig(max_new_tokens=9), eos=2)
    assert g == dict(max_tokens=9, end_id=2, pad_id=2, ignore_eos=False, detokenize=False,
                     add_special_tokens=False, top_k=1)
    s = sampling_kwargs(GenerationConfig(max_new_tokens=5, do_sample=True, temperature=0.7, top_p=0.9, seed=3,
                                         ignore_eos=True), eos=2)
    assert (s["temperature"], s["top_p"], s["top_k"], s["seed"], s["ignore_eos"]) == (0.7, 0.9, 0, 3, True)
    assert "seed" not in sampling_kwargs(GenerationConfig(do_sample=True), eos=2)


# ----------------------------------------------------------------------------------- the backend (fake LLM API)
def test_backend_greedy_equals_the_onnx_pipeline(fake_trtllm, light_export, trtllm_fp16, ort_pipe):
    pipe = Pipeline.from_export(light_export, language="trtllm", trtllm=trtllm_fp16, max_concurrency=2)
    assert pipe.backend.name.startswith("tensorrt-llm 0.0-fake (fp16")
    (_, kw), = [c for c in fake_trtllm.calls if c[0] == "LLM"]
    assert kw["model"] == str(trtllm_fp16) and kw["max_seq_len"] == 4096 and kw["max_batch_size"] == 2
    assert kw["enable_chunked_prefill"] is False and kw["kv_cache_config"].kw["enable_block_reuse"] is False
    assert [c[1] for c in fake_trtllm.calls if c[0] == "register_input_processor"] == ["HiwinInputProcessor"]
    for size in ((1008, 672), (336, 1344), (500, 300)):
        img = random_image(*size, seed=sum(size))
        ans = pipe.generate(img, QUESTION, max_new_tokens=10)
        ref = ort_pipe.generate(img, QUESTION, max_new_tokens=10)
        assert ans.token_ids == ref.token_ids and ans.text == ref.text and ans.finish_reason == ref.finish_reason
        # the table the processor handed on is exactly the ONNX pipeline's visual tokens
        ids, rows = fake_trtllm.fused[-1]
        visual = ort_pipe.encode_image(img)
        assert np.array_equal(rows.numpy(), visual) and ans.visual_tokens == visual.shape[0]
        pre, post = ort_pipe.tokenize(QUESTION)
        assert ids == prompt_table_ids(pre, visual.shape[0], post, 384)
    _, req, sp, streaming = [c for c in fake_trtllm.calls if c[0] == "generate_async"][-1]
    assert streaming is True and sp.top_k == 1 and sp.max_tokens == 10 and sp.end_id == 2


def test_backend_streams_samples_and_refuses_bad_requests(fake_trtllm, light_export, trtllm_fp16):
    pipe = Pipeline.from_export(light_export, language="trtllm", trtllm=trtllm_fp16)
    img = random_image(640, 480, seed=5)
    it = pipe.stream(img, QUESTION, max_new_tokens=8, ignore_eos=True)
    deltas = []
    while True:
        try:
            deltas.append(next(it))
        except StopIteration as stop:
            ans = stop.value
            break
    assert len(ans.token_ids) == 8 and ans.finish_reason == "length" and "".join(deltas).strip() == ans.text
    assert ans.timings["ttft_s"] >= ans.timings["vision_s"] > 0
    a = pipe.generate(img, QUESTION, max_new_tokens=6, do_sample=True, temperature=0.8, top_p=0.9, seed=11)
    sp = [c for c in fake_trtllm.calls if c[0] == "SamplingParams"][-1][1]
    assert (sp["temperature"], sp["top_p"], sp["top_k"], sp["seed"]) == (0.8, 0.9, 0, 11) and len(a.token_ids) <= 6
    with pytest.raises(RequestError, match="keep_logits"):
        pipe.generate(img, QUESTION, max_new_tokens=2, keep_logits=True)
    with pytest.raises(RequestError, match="exceeds the context"):
        pipe.generate(img, QUESTION, max_new_tokens=4000)
    assert len(pipe.generate(img, QUESTION, max_new_tokens=3, ignore_eos=True).token_ids) == 3  # still usable
    assert ("abort",) not in fake_trtllm.calls
    it = pipe.stream(img, QUESTION, max_new_tokens=50, ignore_eos=True)
    next(it)
    it.close()  # the client went away: the TensorRT-LLM request is aborted
    assert fake_trtllm.calls[-1] == ("abort",)


def test_hiwin_run_language_flags(fake_trtllm, light_export, trtllm_fp16, tmp_path, capsys):
    from hiwin_runtime.cli import main

    img = tmp_path / "page.png"
    random_image(500, 300, seed=2).save(img)
    base = ["--model", str(light_export), "--image", str(img), "--max-new-tokens", "4"]
    assert main(base + ["--language", "trtllm", "--trtllm", str(trtllm_fp16)]) == 0
    err = capsys.readouterr().err
    assert "[tensorrt-llm 0.0-fake (fp16" in err and "new tokens" in err
    for extra, match in ((["--language", "trtllm"], "--language trtllm needs --trtllm DIR"),
                         (["--language", "genai"], "needs genai="),  # and the export holds no genai/
                         (["--language", "onnx", "--genai", str(tmp_path)], "need --language genai / trtllm"),
                         (["--language", "genai", "--trtllm", str(tmp_path)], "--language genai does not take --trtllm")):
        assert main(base + extra) == 2
        assert match in capsys.readouterr().err


def test_registered_model_splices_the_rows(fake_trtllm):
    import torch

    from hiwin_runtime import trtllm_model

    trtllm_model.register()
    cls = fake_trtllm.auto_models["HiwinLlamaForCausalLM"]
    table = torch.randn(20, 4)
    m = cls(table)
    rows = torch.randn(3, 4)
    params = [types.SimpleNamespace(multimodal_data={"multimodal_embedding": rows})]
    ids = torch.tensor(prompt_table_ids([1, 2], 3, [5], 20))
    tag, out_ids, emb = m.forward(types.SimpleNamespace(num_contexts=1), input_ids=ids, multimodal_params=params)
    assert out_ids is None and torch.equal(emb, torch.cat([table[[1, 2]], rows, table[[5]]]))
    tag, out_ids, emb = m.forward(types.SimpleNamespace(num_contexts=0), input_ids=torch.tensor([7]))
    assert torch.equal(out_ids, torch.tensor([7])) and emb is None  # decoding steps: plain ids


def test_directory_and_import_errors(light_export, trtllm_fp16, tmp_path, monkeypatch):
    import shutil

    from hiwin_runtime.manifest import ExportError
    from hiwin_runtime.trtllm import TrtLlmDir, TrtLlmUnavailable

    with pytest.raises(ValueError, match="needs trtllm="):
        Pipeline.from_export(light_export, language="trtllm")
    with pytest.raises(ExportError, match="TensorRT-LLM directory not found"):
        Pipeline.from_export(light_export, language="trtllm", trtllm=tmp_path / "nope")
    bad = tmp_path / "bad"
    shutil.copytree(trtllm_fp16, bad)
    with open(bad / "model.safetensors", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ExportError, match="modified: model.safetensors"):
        TrtLlmDir(bad)
    facts = json.loads((trtllm_fp16 / "hiwin_trtllm.json").read_text())
    with pytest.raises(ExportError, match="hidden_size 128 vs 64"):
        TrtLlmDir(trtllm_fp16).check_matches({"hidden_size": 64}, "x")
    assert facts["architecture"] == "HiwinLlamaForCausalLM" and facts["precision"] == "fp16"
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # not installed
    with pytest.raises(TrtLlmUnavailable, match="TensorRT-LLM is not installed"):
        Pipeline.from_export(light_export, language="trtllm", trtllm=trtllm_fp16)


# ----------------------------------------------------------------------------------- the checkpoints
def test_fp16_checkpoint(trtllm_fp16, tiny_model):
    import torch
    from safetensors.torch import load_file

    conf = json.loads((trtllm_fp16 / "config.json").read_text())
    assert conf["architectures"] == ["HiwinLlamaForCausalLM"] and conf["model_type"] == "llama"
    assert not (trtllm_fp16 / "hf_quant_config.json").exists()
    w = load_file(str(trtllm_fp16 / "model.safetensors"))
    ref = tiny_model.llm.state_dict()
    assert w["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float16
    assert torch.equal(w["lm_head.weight"], ref["lm_head.weight"].half())
    assert (trtllm_fp16 / "tokenizer.json").is_file()


@pytest.mark.slow
def test_fp8_and_int4_awq_checkpoints(tiny_model, tiny_dir, tmp_path):
    """ModelOpt on the CPU: the written checkpoints carry the algorithm TensorRT-LLM reads, fp8 weights
    dequantize to the source weights, and the int4 checkpoint (packed, grouped, AWQ-scaled) computes
    what ModelOpt's own fake-quantized model computes."""
    pytest.importorskip("modelopt.torch.quantization", reason="needs NVIDIA ModelOpt (pip install 'hiwin[trtllm]')")
    import torch
    from safetensors.torch import load_file

    from hiwin_export.cli import main
    from hiwin_export.trtllm import dequantized_state_dict

    ref = {k: v.float() for k, v in tiny_model.llm.state_dict().items()}
    assert main(["trtllm", "--model", str(tiny_dir), "--out", str(tmp_path / "fp8"), "--precision", "fp8"]) == 0
    d = tmp_path / "fp8"
    q = json.loads((d / "hf_quant_config.json").read_text())["quantization"]
    assert q["quant_algo"] == "FP8" and set(q["exclude_modules"]) == {"lm_head", "model.embed_tokens"}
    facts = json.loads((d / "hiwin_trtllm.json").read_text())
    r = facts["recipe"]
    assert r["config"].endswith("FP8_DEFAULT_CFG") and r["calibration"]["visual_prompts"] == 4
    assert r["check"]["cosine_min"] >= 0.99, r["check"]
    w = load_file(str(d / "model.safetensors"))
    assert w["model.layers.1.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    deq = dequantized_state_dict(d)
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        err = (deq[k] - ref[k]).abs().max() / ref[k].abs().max()
        assert err <= 2 ** -4, (k, float(err))  # e4m3: 3 mantissa bits

    # int4-AWQ through the functions the CLI uses, keeping ModelOpt's fake-quant model to compare
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import LlamaForCausalLM

    from hiwin_export.llama_dir import write_llama_dir
    from hiwin_export.trtllm import calibration_set, quantize
    from hiwin_model.synthetic import parity_pages

    src = write_llama_dir(tiny_model, tmp_path / "llama")
    samples = calibration_set(tiny_model, parity_pages(((700, 500), (500, 700))))
    llm = quantize(LlamaForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval(), "int4_awq", samples)
    x = torch.from_numpy(samples[0])[None]
    # the export first re-smooths layers that share an input (one pre_quant_scale, folded into their
    # RMSNorm) and re-quantizes them, in place: the fake-quant model after that step is what it writes
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    requantize_resmooth_fused_llm_layers(llm)
    with torch.no_grad():
        want = llm(inputs_embeds=x).logits[0, -1].double()
    export_hf_checkpoint(llm, dtype=torch.float32, export_dir=str(tmp_path / "int4"))
    q = json.loads((tmp_path / "int4" / "hf_quant_config.json").read_text())["quantization"]
    assert q["quant_algo"] == "W4A16_AWQ" and q["group_size"] == 128
    got_model = LlamaForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    got_model.load_state_dict(dequantized_state_dict(tmp_path / "int4"), strict=False)
    with torch.no_grad():
        got = got_model(inputs_embeds=x).logits[0, -1].double()
        src_logits = tiny_model.llm(inputs_embeds=x).logits[0, -1].double()
    cos = float(want @ got / (want.norm() * got.norm()))
    assert cos >= 0.9999, cos  # our reading of the packed checkpoint = ModelOpt's quantized model
    assert float(want @ src_logits / (want.norm() * src_logits.norm())) < cos  # and int4 did change it


# ----------------------------------------------------------------------------------- the real thing
def test_real_tensorrt_llm(light_export, trtllm_fp16, ort_pipe):
    pytest.importorskip("tensorrt_llm", reason="needs TensorRT-LLM and a GPU (pip install tensorrt-llm)")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs TensorRT-LLM and a GPU (no CUDA device)")
    pipe = Pipeline.from_export(light_export, language="trtllm", trtllm=trtllm_fp16)
    img = random_image(1008, 672, seed=3)
    ans = pipe.generate(img, QUESTION, max_new_tokens=12)
    ref = ort_pipe.generate(img, QUESTION, max_new_tokens=12)
    n = next((i for i, (a, b) in enumerate(zip(ans.token_ids, ref.token_ids)) if a != b), len(ref.token_ids))
    assert n >= 4, (ans.token_ids, ref.token_ids)  # fp16 vs fp32: the first tokens agree
