"""RoI-align with torchvision semantics, in plain PyTorch, as the custom op ``hiwin::roi_align``.

torchvision is not importable beside the CPU torch we ship against, and the export path needs one
op it can map to ONNX ``RoiAlign`` and to our TensorRT plugin, so the op is ours.

Semantics (torchvision ``roi_align``, CPU kernel): for box k = (x1, y1, x2, y2) on image
``batch_idx[k]``, ``offset = 0.5 if aligned else 0``; start = coord * spatial_scale - offset;
extent = end - start, clamped to >= 1 when not aligned; bins of extent / pooled; each bin averages
``gh x gw`` bilinear samples (gh = sampling_ratio if > 0 else ceil(extent_h / pooled_h)) at
``start + p * bin + (i + 0.5) * bin / g``. A sample with y < -1, y > H, x < -1 or x > W is zero;
otherwise coordinates are clamped to the map and the sample is bilinear. The divisor is
``max(gh * gw, 1)``.

Implementation: bilinear sampling and bin averaging are separable in y and x (the out-of-range
rule is an AND of a y and an x condition), so each bin is ``Ay[k, p, :] @ F[k] @ Ax[k, q, :]^T``
with small per-box interpolation matrices restricted to the rows/columns the box touches. Boxes
are processed in chunks to bound memory. Everything runs in the input's dtype; the model calls
it in fp32 (docs/model.md §4.5).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Bytes of gathered local patches per chunk of boxes.
_CHUNK_BYTES = 64 << 20


def _axis_weights(start: Tensor, extent: Tensor, pooled: int, grid: Tensor, gmax: int, size: int):
    """Per-box interpolation weights along one axis.

    Returns (first index, weights [K, pooled, L]) where column l stands for map index first+l,
    and L is the widest span any box touches. Weights already include the 1/grid average.
    """
    K = start.shape[0]
    dt = start.dtype
    bin_size = extent / pooled  # (K,)
    p = torch.arange(pooled, dtype=dt, device=start.device)
    i = torch.arange(gmax, dtype=dt, device=start.device)
    g = grid.to(dt).clamp_min(1)
    # y = start + p * bin + (i + .5) * bin / g      -> (K, pooled, gmax)
    y = (start[:, None, None] + p[None, :, None] * bin_size[:, None, None]
         + (i[None, None, :] + 0.5) * bin_size[:, None, None] / g[:, None, None])
    valid = (i[None, None, :] < grid[:, None, None]) & (y >= -1.0) & (y <= size)
    y = y.clamp_min(0)
    low = y.floor()
    at_end = low >= size - 1
    low = torch.where(at_end, torch.full_like(low, size - 1), low)
    y = torch.where(at_end, low, y)
    high = torch.where(at_end, low, low + 1)
    lw = y - low
    hw = 1 - lw
    scale = valid.to(dt) / g[:, None, None]
    first = torch.where(valid, low, torch.full_like(low, size)).amin(dim=(1, 2)).clamp(max=size - 1)
    last = torch.where(valid, high, torch.full_like(high, -1)).amax(dim=(1, 2))
    span = int((last - first).max().clamp_min(0).item()) + 1 if K else 1
    lo_rel = (low - first[:, None, None]).long().clamp(0, span - 1)
    hi_rel = (high - first[:, None, None]).long().clamp(0, span - 1)
    w = torch.zeros(K, pooled, span, dtype=dt, device=start.device)
    w.scatter_add_(2, lo_rel, hw * scale)
    w.scatter_add_(2, hi_rel, lw * scale)
    return first.long(), w


def roi_align_reference(input: Tensor, boxes: Tensor, batch_idx: Tensor, output_h: int, output_w: int,
                        spatial_scale: float = 1.0, sampling_ratio: int = -1,
                        aligned: bool = False) -> Tensor:
    """Eager implementation of :func:`roi_align` (the body of the custom op)."""
    N, C, H, W = input.shape
    K = boxes.shape[0]
    out = input.new_zeros(K, C, output_h, output_w)
    if K == 0:
        return out
    dt = input.dtype
    b = boxes.to(dt)
    off = 0.5 if aligned else 0.0
    x1, y1 = b[:, 0] * spatial_scale - off, b[:, 1] * spatial_scale - off
    x2, y2 = b[:, 2] * spatial_scale - off, b[:, 3] * spatial_scale - off
    rw, rh = x2 - x1, y2 - y1
    if not aligned:
        rw, rh = rw.clamp_min(1.0), rh.clamp_min(1.0)
    if sampling_ratio > 0:
        gh = torch.full((K,), sampling_ratio, dtype=torch.long, device=input.device)
        gw = gh
    else:
        gh = torch.ceil(rh / output_h).long().clamp_min(0)
        gw = torch.ceil(rw / output_w).long().clamp_min(0)
    gh_max, gw_max = max(int(gh.max()), 1), max(int(gw.max()), 1)
    fy, wy = _axis_weights(y1, rh, output_h, gh, gh_max, H)  # (K,), (K, oh, Ly)
    fx, wx = _axis_weights(x1, rw, output_w, gw, gw_max, W)  # (K,), (K, ow, Lx)
    Ly, Lx = wy.shape[2], wx.shape[2]
    # A box with gh*gw == 0 (zero-area aligned box) averages nothing: output 0, like torchvision.
    empty = (gh * gw) == 0
    ry = (fy[:, None] + torch.arange(Ly, device=input.device)).clamp(max=H - 1)  # (K, Ly)
    rx = (fx[:, None] + torch.arange(Lx, device=input.device)).clamp(max=W - 1)  # (K, Lx)
    # Clamped duplicate indices carry zero weight: mask them so nothing is counted twice.
    wy = wy * ((fy[:, None] + torch.arange(Ly, device=input.device)) <= H - 1)[:, None, :].to(dt)
    wx = wx * ((fx[:, None] + torch.arange(Lx, device=input.device)) <= W - 1)[:, None, :].to(dt)
    bidx = batch_idx.long()
    step = max(1, _CHUNK_BYTES // max(1, C * Ly * Lx * input.element_size()))
    for s in range(0, K, step):
        e = min(K, s + step)
        # (k, C, Ly, Lx) local patches
        patch = input[bidx[s:e, None, None], :, ry[s:e, :, None], rx[s:e, None, :]]  # (k, Ly, Lx, C)
        out[s:e] = torch.einsum("kpy,kqx,kyxc->kcpq", wy[s:e], wx[s:e], patch)
    if bool(empty.any()):
        out[empty] = 0
    return out


@torch.library.custom_op("hiwin::roi_align", mutates_args=())
def _roi_align_op(input: Tensor, boxes: Tensor, batch_idx: Tensor, output_h: int, output_w: int,
                  spatial_scale: float, sampling_ratio: int, aligned: bool) -> Tensor:
    return roi_align_reference(input, boxes, batch_idx, output_h, output_w, spatial_scale,
                               sampling_ratio, aligned)


@_roi_align_op.register_fake
def _(input, boxes, batch_idx, output_h, output_w, spatial_scale, sampling_ratio, aligned):
    return input.new_empty(boxes.shape[0], input.shape[1], output_h, output_w)


def _setup_context(ctx, inputs, output):
    # RoI-align is linear in its input: the backward needs the input's shape, not its values, so the
    # input is not kept (the projector feeds it fp32 copies of its largest maps).
    ctx.save_for_backward(inputs[1], inputs[2])
    ctx.input_meta = (inputs[0].shape, inputs[0].dtype, inputs[0].device)
    ctx.args = inputs[3:]


def _backward(ctx, grad):
    boxes, batch_idx = ctx.saved_tensors
    shape, dtype, device = ctx.input_meta
    with torch.enable_grad():
        x = torch.zeros((), dtype=dtype, device=device).expand(shape).requires_grad_(True)  # no storage
        y = roi_align_reference(x, boxes, batch_idx, *ctx.args)
        (gx,) = torch.autograd.grad(y, x, grad)
    return gx, None, None, None, None, None, None, None


_roi_align_op.register_autograd(_backward, setup_context=_setup_context)


def roi_align(input: Tensor, boxes: Tensor, output_size: tuple[int, int], *, batch_idx: Tensor | None = None,
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """torchvision-compatible RoI-align. ``boxes`` is (K, 4) with ``batch_idx`` (K,), or (K, 5)."""
    if input.dim() != 4:
        raise ValueError(f"roi_align input must be (N, C, H, W), got shape {tuple(input.shape)}")
    if boxes.dim() != 2 or boxes.shape[1] not in (4, 5):
        raise ValueError(f"roi_align boxes must be (K, 4) or (K, 5), got shape {tuple(boxes.shape)}")
    if boxes.shape[1] == 5:
        if batch_idx is not None:
            raise ValueError("give batch indices either as column 0 of (K, 5) boxes or as batch_idx")
        batch_idx, boxes = boxes[:, 0].long(), boxes[:, 1:]
    elif batch_idx is None:
        batch_idx = torch.zeros(boxes.shape[0], dtype=torch.long, device=boxes.device)
    oh, ow = output_size
    return _roi_align_op(input, boxes.to(input.dtype).contiguous(), batch_idx.long(), int(oh), int(ow),
                         float(spatial_scale), int(sampling_ratio), bool(aligned))
