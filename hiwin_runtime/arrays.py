"""The few array operations the shared code needs, so it runs on numpy and on torch alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

Array = Any  # numpy.ndarray or torch.Tensor


@dataclass(frozen=True)
class ArrayOps:
    stack: Callable[[Sequence[Array]], Array]
    concat: Callable[[Sequence[Array]], Array]  # along axis 0
    take: Callable[[Array, np.ndarray], Array]  # rows of a 2-D table by an int64 numpy index


NUMPY_OPS = ArrayOps(stack=lambda xs: np.ascontiguousarray(np.stack(xs)), concat=np.concatenate,
                     take=lambda table, idx: table[idx])
