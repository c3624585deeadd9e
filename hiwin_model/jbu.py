"""JBU feature up-sampler of LLaVA-UHD v2 (docs/model.md §3).

Reproduces ``JBULearnedRange`` and the 4x ``JBUStack`` of the modified FeatUp copy in the
released code (``featup/upsamplers.py``, branch ``old-vicuna-7b``), with two changes that keep
the maths and drop the deployment problems:

* guidance pooling uses shape-derived averaging matrices, exact for non-integer factors such as
  3.5 (``adaptive_avg_pool2d`` semantics), so it exports to plain ONNX MatMuls;
* the "adaptive convolution" accumulates tap by tap instead of unfolding the up-sampled map 49x
  (the original needs a compiled CUDA op, and its unfold fallback needs GBs).

Computation is in the module's dtype; the adaptive convolution accumulates in fp32 (as the
released model does) and casts back: the one precision rule of this module.

Three forms of a layer's adaptive convolution (``JBULayer.forward(..., conv=...)``, :data:`CONV_IMPLS`):
``"taps"`` (the reference), ``"tiled"`` (what the ONNX graph computes) and ``"plugin"``: the kernel
computation and the convolution as ONE custom op, ``hiwin::jbu_conv`` (:func:`jbu_conv`), whose
inputs are exactly those of the TensorRT plugin ``HiwinJbuConv`` (engines/plugins/jbuConv); its eager
body is the reference maths below, and the TensorRT flavour of the export translates it into one
plugin node.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .resample import adaptive_avg_pool, adaptive_pool_matrix, bicubic_matrix, bicubic_resize  # noqa: F401  (re-exported)


def adaptive_conv(hr_padded: Tensor, kernel: Tensor, diameter: int) -> Tensor:
    """out[b,c,y,x] = sum_{i,j} kernel[b, i*d+j, y, x] * hr_padded[b, c, y+i, x+j].

    hr_padded: (B, C, H+d-1, W+d-1); kernel: (B, d*d, H, W). Accumulated in (at least) fp32, tap
    by tap, so
    peak memory is one output-sized buffer instead of a d*d-times unfold.

    When a gradient is wanted the same loop runs inside :class:`_AdaptiveConv`, whose backward
    recomputes each tap when it needs it: autograd through the loop would keep every tap, i.e. a
    d*d = 49-fold fp32 copy of the map in bf16 (1.8 GB per crop at the released width's 4x level).
    """
    if (torch.is_grad_enabled() and (hr_padded.requires_grad or kernel.requires_grad)
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()):
        return _AdaptiveConv.apply(hr_padded, kernel, diameter)
    return _adaptive_conv_taps(hr_padded, kernel, diameter)


def _adaptive_conv_taps(hr_padded: Tensor, kernel: Tensor, diameter: int) -> Tensor:
    B, C, Hp, Wp = hr_padded.shape
    H, W = Hp - diameter + 1, Wp - diameter + 1
    acc = torch.promote_types(hr_padded.dtype, torch.float32)  # at least fp32
    k = kernel.to(acc)
    out = torch.zeros(B, C, H, W, dtype=acc, device=hr_padded.device)
    for i in range(diameter):
        for j in range(diameter):
            tap = hr_padded[:, :, i:i + H, j:j + W].to(acc)
            out.addcmul_(tap, k[:, i * diameter + j: i * diameter + j + 1])
    return out.to(hr_padded.dtype)


class _AdaptiveConv(torch.autograd.Function):
    """:func:`adaptive_conv` with a tap-by-tap backward that saves only its two inputs.

    Gradients (in at least fp32, cast back to each input's dtype):
    ``d kernel[:, t] = sum_c g * tap_t`` and ``d hr_padded[window_t] += g * kernel[:, t]``, taps
    visited last to first, which is the order in which autograd would run the loop's backward,
    so in fp32 the gradients are those of autograd through the loop (tested); in bf16 the map's
    gradient is accumulated in fp32 and rounded once instead of after every tap."""

    @staticmethod
    def forward(ctx, hr_padded: Tensor, kernel: Tensor, diameter: int) -> Tensor:
        ctx.save_for_backward(hr_padded, kernel)
        ctx.diameter = diameter
        return _adaptive_conv_taps(hr_padded, kernel, diameter)

    @staticmethod
    def backward(ctx, grad: Tensor):
        hr_padded, kernel = ctx.saved_tensors
        d = ctx.diameter
        B, C, Hp, Wp = hr_padded.shape
        H, W = Hp - d + 1, Wp - d + 1
        acc = torch.promote_types(hr_padded.dtype, torch.float32)
        g = grad.to(acc)
        k = kernel.to(acc)
        need_hr, need_k = ctx.needs_input_grad[:2]
        d_hr = torch.zeros(B, C, Hp, Wp, dtype=acc, device=g.device) if need_hr else None
        d_k = torch.empty(B, d * d, H, W, dtype=acc, device=g.device) if need_k else None
        for t in reversed(range(d * d)):
            i, j = divmod(t, d)
            if need_k:
                d_k[:, t:t + 1] = (g * hr_padded[:, :, i:i + H, j:j + W].to(acc)).sum(1, keepdim=True)
            if need_hr:
                d_hr[:, :, i:i + H, j:j + W] += g * k[:, t:t + 1]
        return (d_hr.to(hr_padded.dtype) if need_hr else None, d_k.to(kernel.dtype) if need_k else None, None)


CONV_IMPLS = ("taps", "tiled", "plugin")
TILE = 8  # output rows and columns per tile of the tiled form


def adaptive_conv_tiled(hr_padded: Tensor, kernel: Tensor, diameter: int, tile: int = TILE) -> Tensor:
    """:func:`adaptive_conv` as one batched GEMM per output tile (the form the exported JBU graph
    computes: 2x faster than the tap loop in ONNX Runtime, where every tap would be a Slice, a Mul
    and an Add over (C, H, W)).

    The output is cut into ``tile x tile`` tiles; a tile reads the ``(tile + d - 1)^2`` input pixels
    around it. Per tile: ``out (tile^2, C) = A (tile^2, (tile+d-1)^2) @ X ((tile+d-1)^2, C)``, X the
    tile's input window (channels last, gathered once from the flattened padded map), A the tile's
    banded kernel, ``A[(y, x), (y + i, x + j)] = kernel[i*d + j, y, x]``, built from the kernel
    with two small constant one-hot tensors (no scatter). ((tile + d - 1) / d)^2 times the minimal
    multiply count, in a GEMM of K = (tile + d - 1)^2. Same precision rule as :func:`adaptive_conv`.
    Works on symbolic shapes (export)."""
    B, C, Hp, Wp = hr_padded.shape
    d = diameter
    H, W = Hp - d + 1, Wp - d + 1
    span = tile + d - 1
    acc = torch.promote_types(hr_padded.dtype, torch.float32)
    dev = hr_padded.device
    # Tiles are numbered t = ty * nw + tx, one flat axis, and every index below is tensor arithmetic:
    # no traced shape is ever split into tile counts, so export keeps every size symbolic. Tiles
    # beyond the map read clamped indices; their outputs are never gathered (inside the map no
    # index is ever clamped).
    nw = (W + tile - 1) // tile
    n = ((H + tile - 1) // tile) * nw
    t = torch.arange(n, device=dev)
    ty = t // nw
    ty, tx = ty * tile, (t - ty * nw) * tile  # tile origins (no remainder op: ONNX has no Mod by a shape)
    s_ = torch.arange(span, device=dev)
    r = (ty[:, None] + s_[None, :]).clamp(max=Hp - 1)  # (n, span)
    c = (tx[:, None] + s_[None, :]).clamp(max=Wp - 1)
    x = hr_padded.to(acc).permute(0, 2, 3, 1).reshape(B, Hp * Wp, C)  # channels last, flat
    windows = x[:, (r[:, :, None] * Wp + c[:, None, :]).reshape(-1, span * span)]  # (B, n, span^2, C)
    o_ = torch.arange(tile, device=dev)
    ky = (ty[:, None] + o_[None, :]).clamp(max=H - 1)  # (n, tile)
    kx = (tx[:, None] + o_[None, :]).clamp(max=W - 1)
    kidx = (ky[:, :, None] * W + kx[:, None, :]).reshape(-1, tile * tile)  # (n, tile^2)
    k = kernel.to(acc).reshape(B, d * d, H * W)[:, :, kidx]  # (B, d*d, n, tile^2)
    k = k.permute(0, 2, 3, 1).reshape(B, -1, tile, tile, d, d)  # (B, n, y, x, i, j)
    o, tt, s = (torch.arange(m, device=dev) for m in (tile, d, span))
    onehot = (s[None, None, :] == o[:, None, None] + tt[None, :, None]).to(acc)  # (tile, d, span): [s == o + t]
    band = torch.matmul(k, onehot)  # (B, n, y, x, i, span_x): tap j at column x + j
    band = torch.matmul(onehot.transpose(1, 2)[:, None], band)  # (B, n, y, x, span_y, span_x): i at row y + i
    out = torch.matmul(band.reshape(B, -1, tile * tile, span * span), windows)  # (B, n, tile^2, C)
    # pixel (y, x) is row (y % tile) * tile + x % tile of tile (y // tile) * nw + x // tile
    y, xx = torch.arange(H, device=dev), torch.arange(W, device=dev)
    qy, qx = y // tile, xx // tile
    pix = (qy[:, None] * nw + qx[None, :]) * (tile * tile) + (y - qy * tile)[:, None] * tile + (xx - qx * tile)[None, :]
    out = out.reshape(B, -1, C)[:, pix]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).to(hr_padded.dtype)


def spatial_kernel(sigma: Tensor, diameter: int) -> Tensor:
    """(1, d*d, 1, 1) Gaussian ``exp(-(x^2 + y^2) / (2 sigma^2))`` over the d x d grid linspace(-1, 1)
    ('ij' meshgrid, tap index d*i + j)."""
    r = torch.linspace(-1, 1, diameter, device=sigma.device, dtype=sigma.dtype)
    d2 = r[:, None].square() + r[None, :].square()  # (d, d)
    return torch.exp(-d2 / (2 * sigma ** 2)).reshape(1, -1, 1, 1)


def range_kernel(q: Tensor, range_temp: Tensor, radius: int) -> Tensor:
    """(B, d*d, H, W) softmax over taps of ``clamp(exp(range_temp), 1e-4, 1e4) * <q_neighbour, q_centre>``,
    neighbours of the reflect-padded key map ``q`` (B, K, H, W)."""
    H, W = q.shape[-2:]
    d = 2 * radius + 1
    qp = F.pad(q, [radius] * 4, mode="reflect")
    temp = range_temp.exp().clamp(1e-4, 1e4)
    logits = torch.stack([(qp[:, :, i:i + H, j:j + W] * q).sum(1) for i in range(d) for j in range(d)], dim=1)
    return F.softmax(temp * logits, dim=1)


def normalize_kernel(kernel: Tensor) -> Tensor:
    """``K / clamp(sum over taps, min=1e-7)``."""
    return kernel / kernel.sum(1, keepdim=True).clamp_min(1e-7)


def _as_conv1x1(w: Tensor) -> Tensor:
    return w if w.dim() == 4 else w.reshape(*w.shape, 1, 1)


def jbu_conv_reference(hr: Tensor, q: Tensor, guidance: Tensor, range_temp: Tensor, sigma_spatial: Tensor,
                       w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, radius: int) -> Tensor:
    """One JBU layer after its bicubic up-sampling, with the I/O of the ``HiwinJbuConv`` plugin: hr (B, C, H, W)
    the up-sampled source (not padded), q (B, K, H, W) = range_proj(guidance), guidance (B, 3, H, W), the
    scalar parameters (any single-element shape) and the fixup convolution's weights (1x1-conv or 2-D shapes).
    The maths of :meth:`JBULayer.forward` (``conv="taps"``, dropout as identity), step by step."""
    H, W = hr.shape[-2:]
    if min(H, W) <= radius:
        raise ValueError(f"JBU output {H}x{W} is too small for reflect padding by {radius}")
    d = 2 * radius + 1
    kernel = range_kernel(q, range_temp.reshape(()), radius) * spatial_kernel(sigma_spatial.reshape(()), d)
    kernel = normalize_kernel(kernel)
    hidden = F.gelu(F.conv2d(torch.cat([kernel, guidance], dim=1), _as_conv1x1(w1), b1))
    kernel = kernel + 0.1 * F.conv2d(hidden, _as_conv1x1(w2), b2)
    return adaptive_conv(F.pad(hr, [radius] * 4, mode="reflect"), kernel, d)


@torch.library.custom_op("hiwin::jbu_conv", mutates_args=())
def _jbu_conv_op(hr: Tensor, q: Tensor, guidance: Tensor, range_temp: Tensor, sigma_spatial: Tensor, w1: Tensor,
                 b1: Tensor, w2: Tensor, b2: Tensor, radius: int) -> Tensor:
    return jbu_conv_reference(hr, q, guidance, range_temp, sigma_spatial, w1, b1, w2, b2, radius)


@_jbu_conv_op.register_fake
def _(hr, q, guidance, range_temp, sigma_spatial, w1, b1, w2, b2, radius):
    return torch.empty_like(hr)


def _jbu_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:9])
    ctx.radius = inputs[9]


def _jbu_backward(ctx, grad):
    saved = ctx.saved_tensors
    with torch.enable_grad():
        xs = [t.detach().requires_grad_(t.is_floating_point()) for t in saved]
        y = jbu_conv_reference(*xs, ctx.radius)
        grads = torch.autograd.grad(y, xs, grad, allow_unused=True)
    return (*grads, None)


_jbu_conv_op.register_autograd(_jbu_backward, setup_context=_jbu_setup_context)


def jbu_conv(hr: Tensor, q: Tensor, guidance: Tensor, range_temp: Tensor, sigma_spatial: Tensor, w1: Tensor,
             b1: Tensor, w2: Tensor, b2: Tensor, radius: int) -> Tensor:
    """The custom op ``hiwin::jbu_conv``: :func:`jbu_conv_reference` eagerly; under export one node with the
    inputs and attribute of the TensorRT plugin ``HiwinJbuConv`` (``range_temp``/``sigma_spatial`` as (1,))."""
    return _jbu_conv_op(hr, q, guidance, range_temp.reshape(1), sigma_spatial.reshape(1), w1, b1, w2, b2, int(radius))


class JBULayer(nn.Module):
    """One learned-range joint bilateral up-sampling layer (FeatUp ``JBULearnedRange``), x2."""

    def __init__(self, feat_dim: int, key_dim: int = 32, radius: int = 3, guidance_dim: int = 3,
                 *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.radius = radius
        self.diameter = 2 * radius + 1
        taps = self.diameter ** 2
        self.range_temp = nn.Parameter(torch.tensor(0.0, **kw))
        self.sigma_spatial = nn.Parameter(torch.tensor(1.0, **kw))
        self.range_proj = nn.Sequential(
            nn.Conv2d(guidance_dim, key_dim, 1, **kw), nn.GELU(), nn.Dropout2d(0.1),
            nn.Conv2d(key_dim, key_dim, 1, **kw))
        self.fixup_proj = nn.Sequential(
            nn.Conv2d(guidance_dim + taps, taps, 1, **kw), nn.GELU(), nn.Dropout2d(0.1),
            nn.Conv2d(taps, taps, 1, **kw))

    def spatial_kernel(self) -> Tensor:
        """(1, d*d, 1, 1) Gaussian over the d x d grid linspace(-1, 1) ('ij' meshgrid)."""
        return spatial_kernel(self.sigma_spatial, self.diameter)

    def range_kernel(self, guidance: Tensor) -> Tensor:
        """(B, d*d, H, W) softmax over taps of temp * <q_neighbour, q_centre>."""
        return range_kernel(self.range_proj(guidance), self.range_temp, self.radius)

    def forward(self, source: Tensor, guidance: Tensor, conv: str = "taps") -> Tensor:
        """source (B, C, h, w), guidance (B, 3, H, W) at the output size -> (B, C, H, W). ``conv``:
        ``"taps"`` (:func:`adaptive_conv`, the reference), ``"tiled"`` (:func:`adaptive_conv_tiled`) or
        ``"plugin"`` (:func:`jbu_conv`: kernel and convolution as the one op the TensorRT plugin computes;
        inference only, the fixup's dropout being the identity there)."""
        if conv not in CONV_IMPLS:
            raise ValueError(f"unknown adaptive convolution {conv!r} (known: {', '.join(CONV_IMPLS)})")
        H, W = guidance.shape[-2:]
        if source.shape[0] != guidance.shape[0]:
            raise ValueError(f"batch mismatch: source {source.shape[0]} vs guidance {guidance.shape[0]}")
        if min(H, W) <= self.radius:
            raise ValueError(f"JBU output {H}x{W} is too small for reflect padding by {self.radius}")
        if conv == "plugin":
            if self.training:
                raise ValueError('conv="plugin" is the inference form (no fixup dropout): call .eval() first')
            first, last = self.fixup_proj[0], self.fixup_proj[3]
            return jbu_conv(bicubic_resize(source, (H, W)), self.range_proj(guidance), guidance, self.range_temp,
                            self.sigma_spatial, first.weight, first.bias, last.weight, last.bias, self.radius)
        kernel = self.range_kernel(guidance) * self.spatial_kernel()
        kernel = normalize_kernel(kernel)
        kernel = kernel + 0.1 * self.fixup_proj(torch.cat([kernel, guidance], dim=1))
        hr = bicubic_resize(source, (H, W))
        hr = F.pad(hr, [self.radius] * 4, mode="reflect")
        if conv == "tiled":
            return adaptive_conv_tiled(hr, kernel, self.diameter)
        return adaptive_conv(hr, kernel, self.diameter)


class JBUStack(nn.Module):
    """1x -> 2x -> 4x JBU stack; state-dict keys are the official ones under
    ``model.mm_projector.upsampler.upsampler.`` (``up1.*``, ``up2.*``, ``fixup_proj.1.*``)."""

    def __init__(self, dim: int, key_dim: int = 32, radius: int = 3, fixup_scale: float = 0.1,
                 *, device=None, dtype=None):
        super().__init__()
        self.fixup_scale = fixup_scale
        self.up1 = JBULayer(dim, key_dim, radius, device=device, dtype=dtype)
        self.up2 = JBULayer(dim, key_dim, radius, device=device, dtype=dtype)
        self.fixup_proj = nn.Sequential(nn.Dropout2d(0.2), nn.Conv2d(dim, dim, 1, device=device, dtype=dtype))

    @staticmethod
    def _up(layer: JBULayer, source: Tensor, image: Tensor, conv: str) -> Tensor:
        h, w = source.shape[-2:]
        return layer(source, adaptive_avg_pool(image, (2 * h, 2 * w)), conv)

    def forward_levels(self, features: Tensor, image: Tensor, *, detach_2x: bool = False, conv: str = "taps"):
        """(feat2x, feat4x). ``detach_2x`` trains the 4x stage on a detached 2x input (stage 0)."""
        f2 = self._up(self.up1, features, image, conv)
        s4 = self._up(self.up2, f2.detach() if detach_2x else f2, image, conv)
        return f2, s4 + self.fixup_scale * self.fixup_proj(s4)

    def forward(self, features: Tensor, image: Tensor, conv: str = "taps") -> tuple[Tensor, Tensor]:
        """features (B, C, h, w) and normalised image (B, 3, 14h, 14w) -> (feat2x, feat4x)."""
        if features.dim() != 4 or image.dim() != 4:
            raise ValueError("JBUStack expects features (B, C, h, w) and image (B, 3, H, W)")
        return self.forward_levels(features, image, conv=conv)
