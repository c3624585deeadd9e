"""TensorRT-LLM (PyTorch backend) registration of :data:`~hiwin_runtime.trtllm.ARCHITECTURE`: TensorRT-LLM's
own Llama, plus precomputed visual rows spliced at the prompt-table ids (docs/trtllm.md).

Imported only where TensorRT-LLM (and torch, CUDA) exist, by :class:`~hiwin_runtime.trtllm.TrtLlmBackend`;
``register()`` can also be called by an application that drives ``tensorrt_llm.LLM`` itself.

* the input processor implements ``attach_multimodal_embeddings`` (how the LLM API takes a request with
  ``multi_modal_embeddings``): the prompt-table ids come from ``mm_processor_kwargs`` and are checked
  against the rows (:func:`~hiwin_runtime.trtllm.attach_rows`); the rows go on as the request's
  ``multimodal_data["multimodal_embedding"]``;
* the model's ``forward`` collects the context requests' rows and calls TensorRT-LLM's
  ``fuse_input_embeds``, which puts row ``i`` at the prompt's id ``vocab_size + i`` (ids >= vocab
  size are multimodal positions) and embeds the other ids with the LLM's table.

Written against TensorRT-LLM 1.x's ``tensorrt_llm/_torch/models`` sources (``modeling_llama``,
``modeling_multimodal_utils.fuse_input_embeds``, ``modeling_utils.register_auto_model``,
``tensorrt_llm.inputs.register_input_processor``); these are internal APIs that move between releases.
Not executed on this project's CI (no GPU): see docs/trtllm.md for what was checked and how.
"""

from __future__ import annotations

from .trtllm import ARCHITECTURE, attach_rows

_registered = False


def register() -> None:
    """Register :data:`ARCHITECTURE` and its input processor with TensorRT-LLM (idempotent)."""
    global _registered
    if _registered:
        return
    import torch
    from tensorrt_llm._torch.models.modeling_llama import LlamaForCausalLM
    from tensorrt_llm._torch.models.modeling_multimodal_utils import fuse_input_embeds
    from tensorrt_llm._torch.models.modeling_utils import register_auto_model
    from tensorrt_llm.inputs import InputProcessor, register_input_processor

    class HiwinInputProcessor(InputProcessor):
        def __init__(self, model_path, model_config, tokenizer, trust_remote_code: bool = False, **kw):
            self.tokenizer, self.model_config = tokenizer, model_config
            cfg = getattr(model_config, "text_config", model_config)
            self.vocab_size, self.hidden_size = int(cfg.vocab_size), int(cfg.hidden_size)

        def __call__(self, inputs, sampling_params):  # a text-only request
            return self.tokenizer.encode(inputs["prompt"], add_special_tokens=sampling_params.add_special_tokens), None

        def attach_multimodal_embeddings(self, inputs, multimodal_embedding, sampling_params):
            ids, rows = attach_rows({**inputs, "multi_modal_embeddings": multimodal_embedding},
                                    vocab_size=self.vocab_size, hidden_size=self.hidden_size)
            rows = rows if isinstance(rows, torch.Tensor) else torch.from_numpy(rows)
            return ids, {"multimodal_data": {"multimodal_embedding": rows}}

    @register_auto_model(ARCHITECTURE)
    @register_input_processor(HiwinInputProcessor, model_type="llama")
    class HiwinLlamaForCausalLM(LlamaForCausalLM):
        @torch.inference_mode()
        def forward(self, attn_metadata, input_ids=None, position_ids=None, inputs_embeds=None,
                    return_context_logits: bool = False, **kwargs):
            params = kwargs.get("multimodal_params") or []
            rows = []
            for p in params[:attn_metadata.num_contexts]:
                data = getattr(p, "multimodal_data", None) or {}
                if data.get("multimodal_embedding") is not None:
                    rows.append(data["multimodal_embedding"])
            if rows and input_ids is not None:
                input_ids, inputs_embeds = fuse_input_embeds(self.model.embed_tokens, input_ids, rows)
            return super().forward(attn_metadata, input_ids=input_ids, position_ids=position_ids,
                                   inputs_embeds=inputs_embeds, return_context_logits=return_context_logits)

    _registered = True
