"""The PyTorch reference as a :class:`hiwin_runtime.pipeline.Backend` (``Pipeline.from_model``)."""

from __future__ import annotations

import numpy as np
import torch

from hiwin_runtime.layout import layout_tokens
from hiwin_runtime.pipeline import Backend


def load_model(path, *, dtype: str = "fp32", device: str = "cpu"):
    from .model import HiwinForCausalLM

    return HiwinForCausalLM.from_pretrained(path, dtype=dtype, device=device)


class TorchBackend(Backend):
    """:class:`~hiwin_model.model.HiwinForCausalLM` in any dtype/device; its vision path is the
    model's own crop chain (:meth:`~hiwin_model.model.HiwinForCausalLM.encode_prepared`)."""

    name = "torch"

    def __init__(self, model):
        self.model = model.eval()
        self.hidden_size = model.llm.config.hidden_size

    @torch.no_grad()
    def encode_visual(self, prepared, newline, comma):
        crops = self.model.encode_prepared(prepared).float().cpu().numpy()
        return layout_tokens(crops, prepared.grid, newline, comma)

    @torch.no_grad()
    def embed(self, ids):
        t = torch.as_tensor(ids, dtype=torch.long, device=self.model.device)
        return self.model.llm.get_input_embeddings()(t).float().cpu().numpy()

    def empty_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.llm.config)

    @torch.no_grad()
    def forward(self, embeds, cache, past):
        m = self.model
        S = embeds.shape[1]
        x = torch.from_numpy(np.ascontiguousarray(embeds)).to(device=m.device, dtype=m.dtype)
        mask = torch.ones(1, past + S, dtype=torch.long, device=m.device)
        pos = torch.arange(past, past + S, device=m.device)[None]
        out = m.llm(inputs_embeds=x, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                    logits_to_keep=1)
        return out.logits[0, -1].float().cpu().numpy(), out.cache
