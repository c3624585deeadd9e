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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


def adaptive_conv(hr_padded: Tensor, kernel: Tensor, diameter: int) -> Tensor:
    """out[b,c,y,x] = sum_{i,j} kernel[b, i*d+j, y, x] * hr_padded[b, c, y+i, x+j].

    hr_padded: (B, C, H+d-1, W+d-1); kernel: (B, d*d, H, W). Accumulated in (at least) fp32, tap
    by tap, so
    peak memory is one output-sized buffer instead of a d*d-times unfold.
    """
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
        r = torch.linspace(-1, 1, self.diameter, device=self.sigma_spatial.device,
                           dtype=self.sigma_spatial.dtype)
        d2 = r[:, None].square() + r[None, :].square()  # (d, d), tap index d*i + j
        return torch.exp(-d2 / (2 * self.sigma_spatial ** 2)).reshape(1, -1, 1, 1)

    def range_kernel(self, guidance: Tensor) -> Tensor:
        """(B, d*d, H, W) softmax over taps of temp * <q_neighbour, q_centre>."""
        q = self.range_proj(guidance)  # (B, K, H, W)
        H, W = q.shape[-2:]
        qp = F.pad(q, [self.radius] * 4, mode="reflect")
        temp = self.range_temp.exp().clamp(1e-4, 1e4)
        logits = torch.stack([(qp[:, :, i:i + H, j:j + W] * q).sum(1)
                              for i in range(self.diameter) for j in range(self.diameter)], dim=1)
        return F.softmax(temp * logits, dim=1)

    def forward(self, source: Tensor, guidance: Tensor) -> Tensor:
        """source (B, C, h, w), guidance (B, 3, H, W) at the output size -> (B, C, H, W)."""
        H, W = guidance.shape[-2:]
        if source.shape[0] != guidance.shape[0]:
            raise ValueError(f"batch mismatch: source {source.shape[0]} vs guidance {guidance.shape[0]}")
        if min(H, W) <= self.radius:
            raise ValueError(f"JBU output {H}x{W} is too small for reflect padding by {self.radius}")
        kernel = self.range_kernel(guidance) * self.spatial_kernel()
        kernel = kernel / kernel.sum(1, keepdim=True).clamp_min(1e-7)
        kernel = kernel + 0.1 * self.fixup_proj(torch.cat([kernel, guidance], dim=1))
        hr = bicubic_resize(source, (H, W))
        hr = F.pad(hr, [self.radius] * 4, mode="reflect")
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
    def _up(layer: JBULayer, source: Tensor, image: Tensor) -> Tensor:
        h, w = source.shape[-2:]
        return layer(source, adaptive_avg_pool(image, (2 * h, 2 * w)))

    def forward_levels(self, features: Tensor, image: Tensor, *, detach_2x: bool = False):
        """(feat2x, feat4x). ``detach_2x`` trains the 4x stage on a detached 2x input (stage 0)."""
        f2 = self._up(self.up1, features, image)
        s4 = self._up(self.up2, f2.detach() if detach_2x else f2, image)
        return f2, s4 + self.fixup_scale * self.fixup_proj(s4)

    def forward(self, features: Tensor, image: Tensor) -> tuple[Tensor, Tensor]:
        """features (B, C, h, w) and normalised image (B, 3, 14h, 14w) -> (feat2x, feat4x)."""
        if features.dim() != 4 or image.dim() != 4:
            raise ValueError("JBUStack expects features (B, C, h, w) and image (B, 3, H, W)")
        return self.forward_levels(features, image)
