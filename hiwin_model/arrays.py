"""Torch implementation of the shared code's array operations (:class:`hiwin_runtime.arrays.ArrayOps`)."""

from __future__ import annotations

import numpy as np
import torch

from hiwin_runtime.arrays import ArrayOps


def _stack(xs):
    return torch.stack([x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x)) for x in xs])


def _take(table: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    return table[torch.from_numpy(idx).to(table.device)]


TORCH_OPS = ArrayOps(stack=_stack, concat=torch.cat, take=_take)
