"""Export specs of the language side: the token-embedding table and the Llama decoder with KV cache.

| graph | inputs | outputs |
|---|---|---|
| ``embed.onnx`` | ``input_ids`` int64 [batch, seq] | ``inputs_embeds`` f32 [batch, seq, C] |
| ``llm.onnx`` | ``inputs_embeds`` f32 [batch, seq, C], ``attention_mask`` int64 [batch, past + seq], ``position_ids`` int64 [batch, seq], ``past_key_values.{i}.key`` / ``.value`` f32 [batch, kv_heads, past, head_dim] | ``logits`` f32 [batch, seq, vocab], ``present.{i}.key`` / ``.value`` f32 [batch, kv_heads, past + seq, head_dim] |

The names and layout are the ones ONNX Runtime GenAI's ``decoder`` (``inputs_embeds`` variant) and
TensorRT Edge-LLM read; prefill feeds an empty past (``past = 0``), decoding feeds the previous
step's presents back. The decoder is transformers' own ``LlamaForCausalLM`` (the reference's
``model.llm``) traced by ``torch.onnx.export(dynamo=True)``: a thin wrapper only turns the flat
past tensors into a ``DynamicCache`` and the cache back into flat presents.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hiwin_runtime.graph_id import GraphId

from .graphs import MAX_BATCH, GraphSpec

DUMMY_BATCH, DUMMY_SEQ, DUMMY_PAST = 2, 5, 3  # sizes > 1 so torch.export keeps every axis dynamic


class EmbedTokens(nn.Module):
    def __init__(self, llm: nn.Module):
        super().__init__()
        self.embed = llm.get_input_embeddings()

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.embed(input_ids)


class DecoderWithPast(nn.Module):
    """``LlamaForCausalLM`` with flat KV tensors in and out (ONNX GenAI naming)."""

    def __init__(self, llm: nn.Module):
        super().__init__()
        self.llm = llm
        self.num_layers = llm.config.num_hidden_layers

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor,
                past: list[Tensor]) -> tuple[Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.llm.config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                       cache=cache, use_cache=True)
        presents: list[Tensor] = []
        for layer in out.cache.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def kv_shape(llm_config) -> tuple[int, int]:
    """(kv_heads, head_dim) of a Llama config."""
    heads = llm_config.num_attention_heads
    head_dim = getattr(llm_config, "head_dim", None) or llm_config.hidden_size // heads
    return getattr(llm_config, "num_key_value_heads", None) or heads, head_dim


def past_names(num_layers: int, prefix: str = "past_key_values") -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def language_specs(model) -> list[GraphSpec]:
    """The embed and decoder specs of ``model`` (empty for a vision-only model)."""
    llm = getattr(model, "llm", None)
    if llm is None:
        return []
    cfg = llm.config
    n = cfg.num_hidden_layers
    ctx = model.context_length
    heads, head_dim = kv_shape(cfg)
    past_in, present = past_names(n), past_names(n, "present")

    def decoder_dummy(m):
        B, S, P = DUMMY_BATCH, DUMMY_SEQ, DUMMY_PAST
        return (torch.randn(B, S, cfg.hidden_size), torch.ones(B, P + S, dtype=torch.long),
                torch.arange(P, P + S).expand(B, S).contiguous(),
                [torch.randn(B, heads, P, head_dim) for _ in range(2 * n)])

    def decoder_shapes():
        B = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        S = torch.export.Dim("seq", min=1, max=ctx)
        P = torch.export.Dim("past", min=1, max=ctx)  # the graph also runs with past = 0 (tested)
        T = torch.export.Dim("total", min=1, max=ctx)
        return {"inputs_embeds": {0: B, 1: S}, "attention_mask": {0: B, 1: T}, "position_ids": {0: B, 1: S},
                "past": [{0: B, 2: P} for _ in range(2 * n)]}

    def embed_shapes():
        return {"input_ids": {0: torch.export.Dim("batch", min=1, max=MAX_BATCH),
                              1: torch.export.Dim("seq", min=1, max=ctx)}}

    seq_axes = {0: "batch", 1: "seq"}
    embed = GraphSpec(GraphId("embed"), lambda m: EmbedTokens(m.llm), ("input_ids",), ("inputs_embeds",),
                      {"input_ids": seq_axes},
                      lambda m: (torch.randint(0, cfg.vocab_size, (DUMMY_BATCH, DUMMY_SEQ)),),
                      kind="language", export_shapes=embed_shapes, output_axes={"inputs_embeds": seq_axes})
    decoder = GraphSpec(
        GraphId("llm"), lambda m: DecoderWithPast(m.llm), ("inputs_embeds", "attention_mask", "position_ids", *past_in),
        ("logits", *present),
        {"inputs_embeds": seq_axes, "attention_mask": {0: "batch", 1: "total"}, "position_ids": seq_axes,
         **{p: {0: "batch", 2: "past"} for p in past_in}},
        decoder_dummy, kind="language", export_shapes=decoder_shapes,
        output_axes={"logits": seq_axes, **{p: {0: "batch", 2: "total"} for p in present}})
    return [embed, decoder]


def language_manifest(model) -> dict:
    """What a runtime needs besides the graphs: sizes, context, token ids, the prompt template."""
    cfg = model.llm.config
    heads, head_dim = kv_shape(cfg)
    ids = model.processor.ids if model.processor is not None else None
    return {
        "embed_graph": "embed", "decoder_graph": "llm",
        "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size, "num_layers": cfg.num_hidden_layers,
        "num_kv_heads": heads, "head_dim": head_dim, "context_length": model.context_length,
        "past_inputs": "past_key_values.{i}.key / past_key_values.{i}.value",
        "present_outputs": "present.{i}.key / present.{i}.value",
        "template": "vicuna_v1", "tokenizer": "tokenizer",
        "token_ids": None if ids is None else {"bos": ids.bos, "eos": ids.eos, "newline": ids.newline,
                                               "comma": ids.comma},
    }
