"""CLIP ViT-L/14-336 vision tower (docs/model.md §2), built from ``transformers``' CLIP modules.

Only the blocks that layer -2 needs are built (23 of 24). Position embeddings are resized with
bicubic interpolation (``align_corners=False``) to the crop's patch grid, CLS position kept,
exactly as the released ``AdaptCLIPVisionEmbeddings``; at the native 24x24 grid the table is used
unchanged (the exported graph computes the same resize as two matrices, no ``Resize`` node). Parameter names are HF's (``vision_model.*``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import VisionConfig
from .resample import bicubic_matrix


def resize_position_embedding(table: Tensor, grid: int, h: int, w: int) -> Tensor:
    """(1 + grid^2, C) CLIP table -> (1 + h*w, C) for an h x w patch grid.

    Eager: ``F.interpolate`` (the released call). Symbolic sizes (export): the same resize as two
    shape-derived bicubic matrices, ``M_h T M_w^T`` (exact ``F.interpolate`` semantics), so the
    graph holds MatMuls instead of a cubic ``Resize`` (TensorRT's cubic border rule is not
    PyTorch's). At the native grid both are the identity."""
    cls, patches = table[:1], table[1:]
    C = patches.shape[-1]
    if not (isinstance(h, int) and isinstance(w, int)):
        mh = bicubic_matrix(grid, h, dtype=torch.float32, device=table.device)
        mw = bicubic_matrix(grid, w, dtype=torch.float32, device=table.device)
        p = torch.matmul(mh, patches.float().reshape(grid, grid * C)).reshape(h, grid, C)  # rows resized
        p = torch.matmul(mw, p).to(table.dtype)  # (w, grid) @ (h, grid, C) -> (h, w, C): columns resized
        return torch.cat([cls, p.reshape(h * w, C)], dim=0)
    if (h, w) == (grid, grid):
        return table
    p = patches.reshape(1, grid, grid, C).permute(0, 3, 1, 2)  # (1, C, grid, grid)
    p = F.interpolate(p, size=(h, w), mode="bicubic", align_corners=False)
    return torch.cat([cls, p.permute(0, 2, 3, 1).reshape(h * w, C)], dim=0)


class VisionTower(nn.Module):
    """pixels (B, 3, 14h, 14w) -> layer -2 patch features (B, C, h, w), CLS dropped."""

    def __init__(self, cfg: VisionConfig, *, attn_implementation: str = "sdpa", device=None, dtype=None):
        super().__init__()
        from transformers import CLIPVisionConfig
        from transformers.models.clip.modeling_clip import CLIPEncoderLayer

        self.cfg = cfg
        hf = CLIPVisionConfig(
            hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.layers_built, num_attention_heads=cfg.num_attention_heads,
            image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act=cfg.hidden_act,
            layer_norm_eps=cfg.layer_norm_eps, num_channels=3)
        hf._attn_implementation = attn_implementation
        kw = dict(device=device, dtype=dtype)
        C = cfg.hidden_size
        # Containers named like HF's CLIPVisionTransformer so state-dict keys are HF's
        # (`vision_model.embeddings.*`, `vision_model.pre_layrnorm.*`, `vision_model.encoder.layers.N.*`).
        # post_layernorm is not built: layer -2 features never pass through it.
        embeddings = nn.Module()
        embeddings.class_embedding = nn.Parameter(torch.randn(C, **kw) * C ** -0.5)
        embeddings.patch_embedding = nn.Conv2d(3, C, cfg.patch_size, cfg.patch_size, bias=False, **kw)
        embeddings.num_positions = cfg.grid ** 2 + 1
        embeddings.position_embedding = nn.Embedding(embeddings.num_positions, C, **kw)
        embeddings.register_buffer("position_ids", torch.arange(embeddings.num_positions, device=device)[None],
                                   persistent=False)
        encoder = nn.Module()
        encoder.layers = nn.ModuleList(CLIPEncoderLayer(hf).to(**kw) for _ in range(cfg.layers_built))
        self.vision_model = nn.Module()
        self.vision_model.embeddings = embeddings
        self.vision_model.pre_layrnorm = nn.LayerNorm(C, eps=cfg.layer_norm_eps, **kw)
        self.vision_model.encoder = encoder

    @property
    def patch_size(self) -> int:
        return self.cfg.patch_size

    def forward(self, pixels: Tensor) -> Tensor:
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"vision tower expects (B, 3, H, W) pixels, got {tuple(pixels.shape)}")
        H, W = pixels.shape[-2:]
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"crop {W}x{H} px: both sides must be multiples of {p}")
        vm = self.vision_model
        emb = vm.embeddings
        x = emb.patch_embedding(pixels.to(emb.patch_embedding.weight.dtype))  # (B, C, h, w)
        B, C, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([emb.class_embedding.expand(B, 1, -1).to(x.dtype), x], dim=1)
        x = x + resize_position_embedding(emb.position_embedding.weight, self.cfg.grid, h, w)
        x = vm.pre_layrnorm(x)
        for layer in vm.encoder.layers:
            x = _run_layer(layer, x)
        return x[:, 1:].transpose(1, 2).reshape(B, C, h, w)


def _run_layer(layer: nn.Module, x: Tensor) -> Tensor:
    out = layer(x, None, None) if _takes_causal_mask(layer) else layer(x, None)
    return out[0] if isinstance(out, tuple) else out


_CAUSAL_CACHE: dict[type, bool] = {}


def _takes_causal_mask(layer: nn.Module) -> bool:
    """transformers < 5 CLIPEncoderLayer takes (x, mask, causal_mask); 5.x takes (x, mask)."""
    t = type(layer)
    if t not in _CAUSAL_CACHE:
        import inspect

        _CAUSAL_CACHE[t] = "causal_attention_mask" in inspect.signature(t.forward).parameters
    return _CAUSAL_CACHE[t]
