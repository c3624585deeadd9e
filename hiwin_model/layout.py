"""Visual token layout of the released 7B (MODEL.md §5).

Without slices: the overview's tokens. With a (cols x rows) grid: the slices' g x g token maps
stitched into one (rows*g) x (cols*g) map, the LLM's "\\n" embedding after every row of that map,
ONE separator (the first slice's separator: "," when cols > 1, "\\n" when cols == 1), then the
overview's tokens. Count = rows*g*(cols*g + 1) + 1 + g*g.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def num_image_tokens(grid: tuple[int, int] | None, queries: int = 144) -> int:
    if grid is None:
        return queries
    g = math.isqrt(queries)
    cols, rows = grid
    return rows * g * (cols * g + 1) + 1 + queries


def layout_image_tokens(crops: Tensor, grid: tuple[int, int] | None, newline: Tensor, comma: Tensor) -> Tensor:
    """crops (n+1, Q, C): slices row-major then the overview -> (T, C) token sequence."""
    n1, Q, C = crops.shape
    g = math.isqrt(Q)
    if g * g != Q:
        raise ValueError(f"crops carry {Q} tokens each, not a square grid")
    if grid is None:
        if n1 != 1:
            raise ValueError(f"no slice grid but {n1} crops (expected the overview alone)")
        return crops[0]
    cols, rows = grid
    if n1 != cols * rows + 1:
        raise ValueError(f"grid {cols}x{rows} needs {cols * rows + 1} crops, got {n1}")
    slices = crops[:-1].reshape(rows, cols, g, g, C)
    stitched = slices.permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, C)
    nl = newline.to(crops.dtype).reshape(1, 1, C).expand(rows * g, 1, C)
    body = torch.cat([stitched, nl], dim=1).reshape(-1, C)
    sep = (comma if cols > 1 else newline).to(crops.dtype).reshape(1, C)
    return torch.cat([body, sep, crops[-1]], dim=0)
