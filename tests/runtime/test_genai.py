"""The LLM as a plain Llama directory, and the language half on ONNX Runtime GenAI (docs/genai.md):
the Llama directory loads in transformers with equal logits; the GenAI embedding graph splices the
visual rows; GenAI fp32 greedy and seeded sampling give the reference's tokens for several aspect
ratios; int4 / fp16 token agreement is reported; streaming and bad inputs behave like the ORT pipeline."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from conftest import random_image
from hiwin_runtime.pipeline import Pipeline, RequestError

QUESTION = "What is in the image?"
# seven aspect ratios, 1:4 to 4:1: grids 3x2, 1x4, 2x2, overview + 2x1, 4x1, 2x3, and a wide 8:3 page
SIZES = [(1008, 672), (336, 1344), (800, 800), (500, 300), (1344, 336), (672, 1008), (1600, 600)]


# ----------------------------------------------------------------------------- part 1: Llama directory
@pytest.fixture(scope="module")
def llama_dir(tiny_model, tmp_path_factory):
    from hiwin_export.llama_dir import write_llama_dir

    return write_llama_dir(tiny_model, tmp_path_factory.mktemp("llama") / "tiny-llama")


def test_llama_dir_is_a_standard_llama_checkpoint(tiny_model, llama_dir):
    from safetensors import safe_open
    from transformers import AutoTokenizer, LlamaForCausalLM

    conf = json.loads((llama_dir / "config.json").read_text())
    assert conf["model_type"] == "llama" and conf["architectures"] == ["LlamaForCausalLM"]
    assert not any(k.startswith("mm_") or k.startswith("hiwin") for k in conf)
    gen = json.loads((llama_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    keys = set()
    for f in llama_dir.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            keys |= set(h.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" in keys
    assert "model.layers.0.self_attn.q_proj.weight" in keys and "model.norm.weight" in keys
    assert all(k.startswith(("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head.")) for k in keys)

    llm = LlamaForCausalLM.from_pretrained(str(llama_dir)).eval()
    ids = torch.randint(0, tiny_model.llm.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = tiny_model.llm(input_ids=ids).logits, llm(input_ids=ids).logits
    assert torch.equal(want, got)

    tok = AutoTokenizer.from_pretrained(str(llama_dir))
    ref = tiny_model.processor.tokenizer
    for text in ("USER: What is in the image? ASSISTANT:", "1, 2, 3.\nThe sky is blue.", "ünïcødé ✓"):
        assert tok(text)["input_ids"] == ref(text)["input_ids"]
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_llama_dir_cli_and_atomic_overwrite(tmp_path, capsys):
    from hiwin_export.cli import main

    out = tmp_path / "llama"
    assert main(["llama-dir", "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert main(["llama-dir", "--out", str(out)]) == 2  # exists: refused, untouched
    assert "exists" in capsys.readouterr().err
    assert main(["llama-dir", "--out", str(out), "--overwrite"]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


# ----------------------------------------------------------------------------- GenAI embedding graph
def test_embedding_graph_splices_visual_rows_at_the_placeholders():
    import onnxruntime as ort

    from hiwin_export.genai import embedding_graph, vision_graph

    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 8)).astype(np.float32)
    feats = rng.standard_normal((5, 8)).astype(np.float32)
    ids = np.array([[1, 7, -1, -1, -1, -1, -1, 9, 3]], np.int64)
    s = ort.InferenceSession(embedding_graph(table).SerializeToString(), providers=["CPUExecutionProvider"])
    out = s.run(None, {"input_ids": ids, "image_features": feats})[0]
    want = np.concatenate([table[[1, 7]], feats, table[[9, 3]]])[None]
    assert np.array_equal(out, want)
    # decoding: no visual rows, an empty feature tensor
    out = s.run(None, {"input_ids": np.array([[4]], np.int64), "image_features": np.zeros((0, 8), np.float32)})[0]
    assert np.array_equal(out, table[[4]][None])
    v = ort.InferenceSession(vision_graph(8).SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.array_equal(v.run(None, {"pixel_values": feats[None]})[0], feats)


# ----------------------------------------------------------------------------- part 2: GenAI backend
@pytest.fixture(scope="module")
def og():
    return pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed "
                               "(pip install onnxruntime-genai; the GenAI backend tests need it)")


@pytest.fixture(scope="module")
def light_export(tiny_model, tmp_path_factory):
    """Vision + language graphs, fp32 only, no bundles or parity (the full export has its own tests)."""
    from hiwin_export.export import export_model

    out = tmp_path_factory.mktemp("genai-export") / "tiny-onnx"
    export_model(tiny_model, out, bundles=False, parity=None, precisions=("fp32",))
    return out


def _build(og, llama_dir, light_export, out, precision):
    from hiwin_export.cli import main

    assert main(["genai", "--llama", str(llama_dir), "--export", str(light_export), "--out", str(out),
                 "--precision", precision]) == 0
    return out


@pytest.fixture(scope="module")
def genai_fp32(og, llama_dir, light_export, tmp_path_factory):
    return _build(og, llama_dir, light_export, tmp_path_factory.mktemp("genai") / "fp32", "fp32")


@pytest.fixture(scope="module")
def ort_pipe(light_export):
    return Pipeline.from_export(light_export)


@pytest.fixture(scope="module")
def genai_pipe(light_export, genai_fp32):
    return Pipeline.from_export(light_export, language="genai", genai=genai_fp32)


def test_genai_directory(genai_fp32):
    cfg = json.loads((genai_fp32 / "genai_config.json").read_text())
    m = cfg["model"]
    assert m["type"] == "phi3v" and m["vocab_size"] == 384 and m["eos_token_id"] == 2
    assert m["vision"]["filename"] == "vision.onnx" and m["embedding"]["filename"] == "embedding.onnx"
    assert "inputs_embeds" in m["decoder"]["inputs"] and "input_ids" not in m["decoder"]["inputs"]
    facts = json.loads((genai_fp32 / "hiwin_genai.json").read_text())
    assert facts["precision"] == "fp32" and facts["placeholder_id"] == -1
    assert {"model.onnx", "embedding.onnx", "embedding.onnx.data", "vision.onnx", "genai_config.json",
            "tokenizer.json"} <= set(facts["files"])
    # the embedding table is external data (memory-mapped by ONNX Runtime: only the rows read become resident)
    import onnx
    from onnx import TensorProto

    emb = onnx.load(str(genai_fp32 / "embedding.onnx"), load_external_data=False)
    (table,) = [t for t in emb.graph.initializer if t.name == "embed_tokens.weight"]
    assert table.data_location == TensorProto.EXTERNAL
    assert {e.key: e.value for e in table.external_data}["location"] == "embedding.onnx.data"
    assert (genai_fp32 / "embedding.onnx").stat().st_size < 4096
    # the LM head pruned to the last position at prefill (the logits' first axis is the builder's
    # "num_logits", not the prompt's length)
    dec = onnx.load(str(genai_fp32 / "model.onnx"), load_external_data=False)
    (logits,) = [o for o in dec.graph.output if o.name == "logits"]
    assert [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim][1] in (1, "num_logits")


def test_genai_session_overlay(genai_pipe):
    from hiwin_runtime.genai import physical_cores, session_overlay

    assert physical_cores() >= 1
    o = session_overlay(3)["model"]
    assert o["decoder"]["session_options"] == {"intra_op_num_threads": 3, "session.use_env_allocators": "1"}
    for part in ("embedding", "vision"):
        assert o[part]["session_options"]["intra_op_num_threads"] == 1
        assert o[part]["session_options"]["session.intra_op.allow_spinning"] == "0"
        assert o[part]["session_options"]["session.use_env_allocators"] == "1"  # the process's shared CPU arena
    assert session_overlay(None)["model"]["decoder"]["session_options"]["intra_op_num_threads"] == physical_cores()
    with pytest.raises(ValueError, match="threads must be >= 1"):
        session_overlay(-2)
    # the backend applied it (GenAI accepted the overlay: the model loaded and answers, see the tests above)
    assert genai_pipe.backend.session_options == session_overlay(None)


def test_genai_kv_buffer_sized_per_request(genai_pipe):
    b = genai_pipe.backend
    assert b.request_length(500, None) == b.max_length
    assert b.request_length(500, 32) == 533
    assert b.request_length(b.max_length - 10, 64) == b.max_length
    # a request generates its max_new_tokens within that buffer (GenAI refuses tokens beyond max_length)
    a = genai_pipe.generate(random_image(500, 300, seed=3), "Describe.", max_new_tokens=12, ignore_eos=True)
    assert len(a.token_ids) == 12 and a.finish_reason == "length"


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_genai_greedy_tokens_equal_the_reference(tiny_model, ort_pipe, genai_pipe, size):
    img = random_image(*size, seed=sum(size))
    ref = tiny_model.generate_ids(img, QUESTION, max_new_tokens=12)
    ans = genai_pipe.generate(img, QUESTION, max_new_tokens=12, keep_logits=True)
    assert ans.token_ids == ref
    ort = ort_pipe.generate(img, QUESTION, max_new_tokens=12, keep_logits=True)
    assert ort.token_ids == ref and ans.visual_tokens == ort.visual_tokens
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ans.logits, ort.logits))
    assert diff < 1e-3, diff


def test_genai_sampling_is_the_pipelines_seeded_sampler(ort_pipe, genai_pipe):
    img = random_image(700, 500, seed=1)
    kw = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.95)
    for seed in (7, 8):
        assert genai_pipe.generate(img, QUESTION, seed=seed, **kw).token_ids == \
            ort_pipe.generate(img, QUESTION, seed=seed, **kw).token_ids


def test_genai_streams_and_survives_bad_requests(ort_pipe, genai_pipe, tmp_path):
    img = random_image(640, 480, seed=5)
    it = genai_pipe.stream(img, QUESTION, max_new_tokens=10, ignore_eos=True)
    deltas = []
    while True:
        try:
            deltas.append(next(it))
        except StopIteration as stop:
            ans = stop.value
            break
    assert len(ans.token_ids) == 10 and "".join(deltas).strip() == ans.text
    for kw, match in ((dict(question=""), "the question is empty"),
                      (dict(max_new_tokens=4000), "exceeds the context of 4096 tokens"),
                      (dict(do_sample=True, temperature=0.0), "temperature > 0"),
                      (dict(beams=2), "unknown generation setting")):
        q = kw.pop("question", QUESTION)
        with pytest.raises(RequestError, match=match):
            genai_pipe.generate(img, q, **{"max_new_tokens": 4} | kw)
    assert genai_pipe.generate(img, QUESTION, max_new_tokens=6).token_ids == \
        ort_pipe.generate(img, QUESTION, max_new_tokens=6).token_ids


def test_genai_directory_errors(light_export, genai_fp32, tmp_path):
    import shutil

    from hiwin_runtime.manifest import ExportError

    with pytest.raises(ValueError, match="needs genai="):
        Pipeline.from_export(light_export, language="genai")
    with pytest.raises(ValueError, match="language must be"):
        Pipeline.from_export(light_export, language="tensorrt-llm")
    with pytest.raises(ExportError, match="GenAI directory not found"):
        Pipeline.from_export(light_export, language="genai", genai=tmp_path / "nope")
    bad = tmp_path / "bad"
    shutil.copytree(genai_fp32, bad)
    with open(bad / "embedding.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ExportError, match="modified: embedding.onnx"):
        Pipeline.from_export(light_export, language="genai", genai=bad)


def test_genai_int4_fp16_agreement_and_speed(og, tiny_model, llama_dir, light_export, ort_pipe, genai_pipe,
                                             tmp_path_factory, record_property):
    """Token agreement of the int4 / fp16 GenAI models with the fp32 reference (reported, not asserted
    equal), and decode speed of the GenAI and ORT loops on the tiny model."""
    imgs = [random_image(*s, seed=sum(s)) for s in SIZES[:1]]
    ref = [tiny_model.generate_ids(i, QUESTION, max_new_tokens=16) for i in imgs]
    from concurrent.futures import ThreadPoolExecutor

    from hiwin_export.genai import build_genai

    report = {}
    precisions = ("int4", "fp16")
    outs = [tmp_path_factory.mktemp("genai") / p for p in precisions]
    with ThreadPoolExecutor(2) as ex:  # the builder runs as a subprocess: both at once
        facts = list(ex.map(lambda op: build_genai(op[0], llama_dir=llama_dir, precision=op[1]),
                            zip(outs, precisions)))
    assert facts[0]["int4_block_size"] == 32 and "int4_block_size" not in facts[1]  # read from the graph
    # `bench --int4-kernel` times exactly the int4 decoder's weight matrices, in its order
    import onnx

    from hiwin_export.int4_kernel import decoder_shapes

    cfg = json.loads((llama_dir / "config.json").read_text())
    dec = onnx.load(str(outs[0] / "model.onnx"), load_external_data=False)
    built = [(a["K"], a["N"]) for a in ({x.name: x.i for x in n.attribute} for n in dec.graph.node
                                         if n.op_type == "MatMulNBits")]
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    assert built == decoder_shapes(cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"],
                                   cfg["num_hidden_layers"], cfg["num_key_value_heads"] * head_dim)
    for precision, out in zip(precisions, outs):
        pipe = Pipeline.from_export(light_export, language="genai", genai=out)
        same = total = 0
        for img, r in zip(imgs, ref):
            got = pipe.generate(img, QUESTION, max_new_tokens=16).token_ids
            n = next((k for k, (a, b) in enumerate(zip(got, r)) if a != b), min(len(got), len(r)))
            same, total = same + n, total + len(r)
        report[precision] = f"{same}/{total} tokens agree before the first difference"
    for name, pipe in (("genai fp32", genai_pipe), ("onnxruntime fp32", ort_pipe)):
        pipe.generate(imgs[0], QUESTION, max_new_tokens=4, ignore_eos=True)  # warm
        t0 = time.perf_counter()
        a = pipe.generate(imgs[0], QUESTION, max_new_tokens=48, ignore_eos=True)
        report[name] = f"{a.decode_tokens_per_s:.0f} decode tok/s, prefill {a.timings['prefill_s'] * 1e3:.1f} ms " \
                       f"({time.perf_counter() - t0:.2f} s total)"
    for k, v in report.items():
        record_property(k, v)
        print(f"{k}: {v}")
    assert all("agree" in report[p] for p in ("int4", "fp16"))


def test_genai_backend_needs_no_torch(light_export, genai_fp32, genai_pipe, tmp_path):
    import subprocess
    import sys
    import textwrap

    from test_torch_free import BLOCKER

    img = tmp_path / "page.png"
    random_image(600, 400, seed=2).save(img)
    want = genai_pipe.generate(str(img), QUESTION, max_new_tokens=8).token_ids
    script = tmp_path / "run.py"
    script.write_text(BLOCKER + textwrap.dedent(f"""
        import json
        from hiwin_runtime.pipeline import Pipeline
        pipe = Pipeline.from_export({str(light_export)!r}, language="genai", genai={str(genai_fp32)!r})
        print(json.dumps(pipe.generate({str(img)!r}, {QUESTION!r}, max_new_tokens=8).token_ids))
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == want


def test_e2e_benchmark_rows_for_genai(light_export, genai_fp32):
    """`hiwin-export bench --e2e ... --genai fp32` workers: the GenAI language half gives the ORT loop's
    tokens; the agreement column says where tokens first differ."""
    import shutil

    from hiwin_export.bench import _agreement, e2e_worker

    shutil.copytree(genai_fp32, light_export.parent / "genai-fp32", dirs_exist_ok=True)  # where the bench puts it
    ort = e2e_worker("ort", str(light_export), "tiny", 2, [(500, 300)], 6, 1)
    gen = e2e_worker("genai-fp32", str(light_export), "tiny", 2, [(500, 300)], 6, 1)
    a, b = ort["images"]["500x300"], gen["images"]["500x300"]
    assert b["token_ids"] == a["token_ids"] and len(b["token_ids"]) == 6 and b["ttft_s"] > 0
    assert _agreement(b["token_ids"], a["token_ids"]) == "yes"
    assert _agreement([1, 2, 9], [1, 2, 3]) == "NO (first 2 of 3)"


@pytest.mark.parametrize("command", ["genai", "trtllm"])
def test_language_exports_refuse_model_and_llama_together(command, tmp_path, capsys):
    from hiwin_export.cli import main

    out = tmp_path / "out"
    assert main([command, "--model", str(tmp_path / "m"), "--llama", str(tmp_path / "l"), "--out", str(out)]) == 2
    assert f"{command}: give --model or --llama, not both" in capsys.readouterr().err
    assert not out.exists()


# --- the GenAI directory inside an export: the default language path --------------------------------

@pytest.fixture(scope="module")
def export_with_genai(og, tiny_dir, tmp_path_factory):
    """`hiwin-export export` with its defaults but no bundles / parity: the GenAI directory is built."""
    from hiwin_export.cli import main

    out = tmp_path_factory.mktemp("export-genai") / "tiny-onnx"
    assert main(["export", "--model", str(tiny_dir), "--out", str(out), "--no-bundles", "--parity", "none",
                 "--no-fp16"]) == 0
    return out


def test_export_holds_its_genai_directory_and_runs_it_by_default(export_with_genai, ort_pipe):
    mf = json.loads((export_with_genai / "manifest.json").read_text())
    assert mf["language"]["genai"] == {"dir": "genai", "precision": "fp32"}
    assert "genai/hiwin_genai.json" in mf["files"]
    default = Pipeline.from_export(export_with_genai)
    own_loop = Pipeline.from_export(export_with_genai, language="onnxruntime")
    assert default.backend.name.startswith("onnxruntime-genai") and own_loop.backend.name == ort_pipe.backend.name
    img = random_image(800, 800, seed=11)
    a = default.generate(img, "What is in the image?", max_new_tokens=10, ignore_eos=True)
    b = own_loop.generate(img, "What is in the image?", max_new_tokens=10, ignore_eos=True)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 10


def test_export_genai_directory_is_pinned_by_the_manifest(export_with_genai, tmp_path):
    import shutil

    from hiwin_runtime.manifest import ExportError

    bad = tmp_path / "copy"
    shutil.copytree(export_with_genai, bad)
    facts = bad / "genai" / "hiwin_genai.json"
    facts.write_text(facts.read_text().replace('"fp32"', '"int4"'))
    with pytest.raises(ExportError, match="hiwin_genai.json"):
        Pipeline.from_export(bad)


def test_export_genai_refusals(tiny_model, tmp_path):
    from hiwin_export.export import export_model

    with pytest.raises(ValueError, match="genai must be one of"):
        export_model(tiny_model, tmp_path / "a", genai="int8")
    with pytest.raises(ValueError, match="needs the language graphs"):
        export_model(tiny_model, tmp_path / "b", graphs=["vit"], genai="fp32")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_default_language_without_genai_installed_is_refused_with_the_way_out(export_with_genai, monkeypatch):
    import hiwin_runtime.genai as g

    def missing():
        raise g.GenAIUnavailable("onnxruntime-genai is not installed")

    monkeypatch.setattr(g, "import_genai", missing)
    with pytest.raises(g.GenAIUnavailable, match=r"pass language='onnxruntime'"):
        Pipeline.from_export(export_with_genai)
    assert Pipeline.from_export(export_with_genai, language="onnxruntime").backend.name != "onnxruntime-genai"


def test_hiwin_run_default_and_onnx_language_on_an_export_with_genai(export_with_genai, tmp_path, capsys):
    from hiwin_runtime.cli import main

    img = tmp_path / "page.png"
    random_image(500, 300, seed=4).save(img)
    base = ["--model", str(export_with_genai), "--image", str(img), "--max-new-tokens", "4"]
    assert main(base) == 0
    assert "onnxruntime-genai" in capsys.readouterr().err
    assert main(base + ["--language", "onnx"]) == 0
    assert "onnxruntime-genai" not in capsys.readouterr().err


def test_eval_scores_the_exports_own_genai_directory(export_with_genai):
    from hiwin_export.evaluate import targets

    ts = targets(str(export_with_genai))
    assert [(t.backend, t.precision) for t in ts] == [("onnx", "fp32"), ("genai", "fp32")]


def test_int4_block_size_reaches_the_builder_and_is_checked(llama_dir, monkeypatch, tmp_path):
    """`--int4-block-size` goes to the builder as its `block_size` option; a size the builder does not
    have, or a block size for another precision, is refused before anything is built."""
    pytest.importorskip("onnxruntime_genai", reason="needs onnxruntime-genai")
    from hiwin_export import genai

    seen = {}

    def fake_builder(src, out, precision, **kw):
        seen.update(precision=precision, **kw["extra_options"])
        raise genai.GenAIBuildError("stopped after the builder call (test)")

    monkeypatch.setattr(genai, "run_builder", fake_builder)
    with pytest.raises(genai.GenAIBuildError, match="stopped"):
        genai.build_genai(tmp_path / "g", llama_dir=llama_dir, precision="int4", int4_block_size=128)
    assert seen["precision"] == "int4" and seen["block_size"] == "128"
    assert not (tmp_path / "g").exists()  # nothing half-written
    with pytest.raises(ValueError, match="int4 only"):
        genai.build_genai(tmp_path / "g", llama_dir=llama_dir, precision="fp32", int4_block_size=128)
    with pytest.raises(ValueError, match="must be one of"):
        genai.build_genai(tmp_path / "g", llama_dir=llama_dir, precision="int4", int4_block_size=100)
