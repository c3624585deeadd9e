"""Visual token layout of the released 7B (docs/model.md §5) on torch tensors.

The order itself is :func:`hiwin_runtime.layout.layout_indices` (one gather shared by every
backend); this module applies it to tensors, keeping autograd (training) and the device.
"""

from __future__ import annotations

from torch import Tensor

from hiwin_runtime.layout import layout_indices, layout_tokens, num_image_tokens

from .arrays import TORCH_OPS

__all__ = ["layout_image_tokens", "layout_indices", "num_image_tokens"]


def layout_image_tokens(crops: Tensor, grid: tuple[int, int] | None, newline: Tensor, comma: Tensor) -> Tensor:
    """crops (n+1, Q, C): slices row-major then the overview -> (T, C) token sequence."""
    return layout_tokens(crops, grid, newline.to(crops.dtype), comma.to(crops.dtype), TORCH_OPS)
