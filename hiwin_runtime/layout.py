"""Visual token layout of the released 7B (docs/model.md §5), as indices.

Without slices: the overview's tokens. With a (cols x rows) grid: the slices' g x g token maps
stitched into one (rows*g) x (cols*g) map, the LLM's "\\n" embedding after every row of that map,
ONE separator (the first slice's separator: "," when cols > 1, "\\n" when cols == 1), then the
overview's tokens. Count = rows*g*(cols*g + 1) + 1 + g*g.

:func:`layout_indices` says which row goes where: an index into the table
``[crop tokens flattened (N*Q rows), newline, comma]``. Every backend (numpy, torch, C++) lays
tokens out by one gather with these indices.
"""

from __future__ import annotations

import math

import numpy as np

from .arrays import NUMPY_OPS, Array, ArrayOps


def num_image_tokens(grid: tuple[int, int] | None, queries: int = 144) -> int:
    if grid is None:
        return queries
    g = math.isqrt(queries)
    cols, rows = grid
    return rows * g * (cols * g + 1) + 1 + queries


def layout_indices(grid: tuple[int, int] | None, num_crops: int, queries: int = 144) -> np.ndarray:
    """(T,) int64 rows of ``[crops (num_crops*queries rows: slices row-major, then the overview),
    newline, comma]`` in the released order."""
    g = math.isqrt(queries)
    if g * g != queries:
        raise ValueError(f"crops carry {queries} tokens each, not a square grid")
    if grid is None:
        if num_crops != 1:
            raise ValueError(f"no slice grid but {num_crops} crops (expected the overview alone)")
        return np.arange(queries, dtype=np.int64)
    cols, rows = grid
    if num_crops != cols * rows + 1:
        raise ValueError(f"grid {cols}x{rows} needs {cols * rows + 1} crops, got {num_crops}")
    newline, comma = num_crops * queries, num_crops * queries + 1
    # slice s = r*cols + c, its token (i, j) is row s*Q + i*g + j; map row R = r*g + i, column c*g + j
    r, i, c, j = np.meshgrid(np.arange(rows), np.arange(g), np.arange(cols), np.arange(g), indexing="ij")
    stitched = ((r * cols + c) * queries + i * g + j).reshape(rows * g, cols * g)
    body = np.concatenate([stitched, np.full((rows * g, 1), newline)], axis=1).reshape(-1)
    overview = np.arange((num_crops - 1) * queries, num_crops * queries)
    sep = comma if cols > 1 else newline
    return np.concatenate([body, [sep], overview]).astype(np.int64)


def layout_tokens(crops: Array, grid: tuple[int, int] | None, newline: Array, comma: Array,
                  ops: ArrayOps = NUMPY_OPS) -> Array:
    """crops (N, Q, C) -> (T, C) token sequence; separators must have the crops' dtype."""
    n, q, c = (int(s) for s in crops.shape)
    table = ops.concat([crops.reshape(n * q, c), newline.reshape(1, c), comma.reshape(1, c)])
    return ops.take(table, layout_indices(grid, n, q))
