"""The language half of a :class:`~hiwin_model.model.HiwinForCausalLM` as a plain Hugging Face Llama
directory: what every Llama tool reads (transformers, the ONNX Runtime GenAI model builder,
llama.cpp's converter, TensorRT-LLM's checkpoint converter, vLLM ...).

    out/config.json              model_type "llama", architectures ["LlamaForCausalLM"]
    out/generation_config.json   bos / eos / pad ids, greedy by default
    out/model*.safetensors       standard Llama key names (model.embed_tokens.weight, model.layers.N...., lm_head.weight)
    out/tokenizer*.json, ...     the model's own tokenizer (AutoTokenizer loads it)
    out/hiwin_llama.json         where it came from (hidden size, vocabulary, context, token ids)

The weights are ``model.llm``'s own tensors written by transformers' ``save_pretrained`` (the keys the
released checkpoint stores under ``model.`` / ``lm_head.`` minus the multimodal ones): the directory
is the released LLM, loadable with ``LlamaForCausalLM.from_pretrained``. Written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hiwin_model.checkpoint import atomic_directory

MARKER = "hiwin_llama.json"


def llama_facts(model) -> dict:
    """The facts a runtime of the Llama directory needs about the multimodal model around it."""
    from .language import kv_shape

    cfg = model.llm.config
    heads, head_dim = kv_shape(cfg)
    ids = model.processor.ids if model.processor is not None else None
    return {
        "source": "hiwin", "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
        "num_layers": cfg.num_hidden_layers, "num_kv_heads": heads, "head_dim": head_dim,
        "context_length": model.context_length, "template": "vicuna_v1",
        "token_ids": None if ids is None else {"bos": ids.bos, "eos": ids.eos, "newline": ids.newline,
                                               "comma": ids.comma},
    }


def write_llama_dir(model, out_dir: str | os.PathLike, *, overwrite: bool = False,
                    max_shard_size: str | int = "5GB") -> Path:
    """Write ``model.llm`` (and the tokenizer) as a standard HF Llama directory at ``out_dir``."""
    from transformers import GenerationConfig

    llm = getattr(model, "llm", None)
    if llm is None:
        raise ValueError("the model has no language model (a vision-only model)")
    facts = llama_facts(model)

    def write(tmp: Path) -> None:
        cfg = llm.config
        cfg.architectures = ["LlamaForCausalLM"]  # (model_type is LlamaConfig's own "llama")
        # the LLM's context is the released tokenizer_model_max_length
        ids = facts["token_ids"] or {}
        gen = GenerationConfig(bos_token_id=ids.get("bos", cfg.bos_token_id),
                               eos_token_id=ids.get("eos", cfg.eos_token_id),
                               pad_token_id=cfg.pad_token_id if cfg.pad_token_id is not None else ids.get("eos"),
                               do_sample=False, max_length=facts["context_length"])
        saved, llm.generation_config = llm.generation_config, gen
        try:
            llm.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        finally:
            llm.generation_config = saved
        conf = json.loads((tmp / "config.json").read_text())
        if conf.get("model_type") != "llama" or conf.get("architectures") != ["LlamaForCausalLM"]:
            raise RuntimeError(f"unexpected Llama config written: model_type={conf.get('model_type')!r}, "
                               f"architectures={conf.get('architectures')!r}")
        if model.processor is not None:
            model.processor.tokenizer.save_pretrained(str(tmp))
        (tmp / MARKER).write_text(json.dumps(facts, indent=2, sort_keys=True))

    return atomic_directory(Path(out_dir), write, overwrite=overwrite)


def read_llama_facts(path: str | os.PathLike) -> dict:
    p = Path(path) / MARKER
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no {MARKER} (not written by write_llama_dir)")
    return json.loads(p.read_text())
