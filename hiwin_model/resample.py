"""Resampling as shape-derived matrices (exact ``adaptive_avg_pool2d`` / ``F.interpolate`` bicubic
semantics): what the JBU, the projector's key positions and the ViT's position embeddings use, so the
exported graphs hold MatMuls instead of ``Resize`` (slow in ONNX Runtime for cubic mode, border rules
different in TensorRT) or pooling with non-integer factors (3.5x, not exportable)."""

from __future__ import annotations

import torch
from torch import Tensor


def adaptive_pool_matrix(n_in: int, n_out: int, *, dtype=torch.float32, device=None) -> Tensor:
    """(n_out, n_in) averaging matrix: row i averages [floor(i*In/Out), ceil((i+1)*In/Out))."""
    i = torch.arange(n_out, device=device)
    start = torch.div(i * n_in, n_out, rounding_mode="floor")
    end = torch.div((i + 1) * n_in + n_out - 1, n_out, rounding_mode="floor")
    j = torch.arange(n_in, device=device)
    inside = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])
    return (inside.to(dtype) / (end - start)[:, None].to(dtype))


def adaptive_avg_pool(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``F.adaptive_avg_pool2d`` as two MatMuls (exact window semantics, exportable)."""
    ph = adaptive_pool_matrix(x.shape[-2], size[0], dtype=x.dtype, device=x.device)
    pw = adaptive_pool_matrix(x.shape[-1], size[1], dtype=x.dtype, device=x.device)
    return ph @ x @ pw.transpose(0, 1)


def bicubic_matrix(n_in: int, n_out: int, *, dtype=torch.float32, device=None) -> Tensor:
    """(n_out, n_in) matrix of ``F.interpolate(mode="bicubic", align_corners=False)`` along one axis.

    Same maths as PyTorch's kernel: source x = (o + 0.5) * in/out - 0.5, cubic convolution with
    A = -0.75 on taps floor(x)-1 .. floor(x)+2, indices clamped to the border. Built from shapes
    with plain tensor ops, so the export is two MatMuls instead of a (slow) cubic ``Resize``.
    """
    a = -0.75
    # float64 when sizes are Python ints (eager); float32 for symbolic sizes (export: TensorRT has
    # no float64). The source coordinate is one rounding of the exact rational ((2o+1)in - out) / 2out.
    calc = torch.float64 if isinstance(n_in, int) and isinstance(n_out, int) else torch.float32
    o = torch.arange(n_out, device=device, dtype=torch.int64)
    x = ((2 * o + 1) * n_in - n_out).to(calc) / (2 * n_out)
    x0 = x.floor()
    t = (x - x0)[:, None]  # (out, 1)
    d = torch.cat([t + 1, t, 1 - t, 2 - t], dim=1)  # distances to the 4 taps
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    w = torch.where(d <= 1, near, far)  # (out, 4)
    idx = (x0[:, None] + torch.arange(-1, 3, device=device, dtype=calc)).clamp(0, n_in - 1)
    j = torch.arange(n_in, device=device, dtype=calc)
    m = ((idx[:, :, None] == j[None, None, :]).to(calc) * w[:, :, None]).sum(1)
    return m.to(dtype)


def bicubic_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``F.interpolate(x, size, mode="bicubic", align_corners=False)`` as two MatMuls."""
    mh = bicubic_matrix(x.shape[-2], size[0], dtype=x.dtype, device=x.device)
    mw = bicubic_matrix(x.shape[-1], size[1], dtype=x.dtype, device=x.device)
    return mh @ x @ mw.transpose(0, 1)
