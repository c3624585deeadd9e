"""Hiwin projector of LLaVA-UHD v2 (docs/model.md §4), the released ``AdaptSpatialResampler``.

Per crop and level L in (1x, 2x, 4x): project every position (Linear Cv->C, shared ``ln_kv``),
add the bicubic-resized sin-cos key positions and the level embedding to get keys (values are the
projected features), RoI-align keys and values over a uniform 12x12 float window partition with an
aspect-ratio-chosen sampling grid (oh, ow), and concatenate the levels' tokens per window. Four
learned query sets attend, each query only to its own window's 3*oh*ow tokens, through ONE shared
multi-head attention layer; ``ln_proj`` per set, then ``cat_proj``, ``ln_post`` and ``@ proj``.

The shared attention's key/value projections do not depend on the query set, so they are computed
once and reused by the four sets (the released code recomputes them; the maths is identical).

Two implementations of the same maths (``impl``):

* ``"faithful"`` (default): the released order of operations: keys = RoI(f + P + e), values = RoI(f),
  both projected by W_k / W_v at every RoI sample, scaled dot-product attention. Every test and
  every parity check compares against it.
* ``"fast"``: 1.6-1.9x fewer FLOPs at real width (counted per crop; docs/model.md §4.9), by four exact
  identities (docs/model.md §4.9): the keys are absorbed into the queries
  (``q_h . (W_k,h k + b_k,h) = (W_k,h^T q_h) . k + const``, the constant cancels in the softmax);
  values are aggregated before their projection (the attention weights sum to 1); RoI-align is
  linear, so ``RoI(f + P + e) = RoI(f) + RoI(P) + e * RoI(1)`` (``RoI(1)`` is 1 except at the border
  of maps under 12 pixels, where thin windows sample beyond the edge) and one RoI of f serves keys
  and values; and RoI-align over the uniform 12x12 windows is
  separable, ``RoI(F) = A_y F A_x^T`` with small shape-derived matrices (:func:`roi_matrices`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiwin_runtime.buckets import GRID_CANDIDATES, sampling_grid  # noqa: F401  (re-exported)

from .resample import bicubic_matrix
from .roi_align import roi_align

LEVELS = ("1x", "2x", "4x")
IMPLS = ("faithful", "fast")
ORACLE = "faithful"  # what parity compares every graph with, whatever form the model runs


def sincos_table(dim: int, grid: int) -> Tensor:
    """(grid*grid, dim) MAE 2-D sin-cos table; first half encodes the column, second the row.

    Computed in float32 numpy exactly like the released code, so it equals the stored table.
    """
    if dim % 4:
        raise ValueError(f"sin-cos table needs dim divisible by 4, got {dim}")

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(d // 2, dtype=np.float32)
        omega /= d / 2.0
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.arange(grid, dtype=np.float32)
    cols, rows = np.meshgrid(g, g)  # cols varies along the last axis: row-major token order
    table = np.concatenate([one_d(dim // 2, cols), one_d(dim // 2, rows)], axis=1)
    return torch.from_numpy(table.astype(np.float32))


def window_boxes_traced(height, width, grid: int = 12, device=None) -> Tensor:
    """:func:`window_boxes` for symbolic sizes (export): window edges ``(j * W) / grid`` from the
    integer product, one correctly rounded float32 division, so the graph derives its windows from
    its input shapes and reproduces the released float64-then-float32 boxes bit for bit (tested)."""
    j = torch.arange(grid + 1, device=device, dtype=torch.int64)
    xe = (j * width).to(torch.float32) / grid  # (grid + 1,) column edges
    ye = (j * height).to(torch.float32) / grid
    x1 = xe[:-1][None, :].expand(grid, grid)
    x2 = xe[1:][None, :].expand(grid, grid)
    y1 = ye[:-1][:, None].expand(grid, grid)
    y2 = ye[1:][:, None].expand(grid, grid)
    return torch.stack([x1, y1, x2, y2], dim=-1).reshape(grid * grid, 4)


def window_boxes(height: int, width: int, grid: int = 12) -> Tensor:
    """(grid*grid, 4) float32 windows (x1, y1, x2, y2), row-major, computed like the released code
    (crop extents derived through the same float expressions, then x2 = x1 + w)."""
    ratio = height * width / (grid * grid)
    ch = math.sqrt(ratio / (width / height))
    cw = ch * (width / height)
    rows, cols = int(round(height / ch)), int(round(width / cw))
    if rows * cols != grid * grid:
        raise ValueError(f"cannot partition a {height}x{width} map into {grid}x{grid} windows")
    boxes = [[j * cw, i * ch, j * cw + cw, i * ch + ch] for i in range(rows) for j in range(cols)]
    return torch.tensor(boxes, dtype=torch.float32)


class HiwinProjector(nn.Module):
    """levels [f1x (B,Cv,H,W), f2x (B,Cv,2H,2W), f4x (B,Cv,4H,4W)] -> (B, grid^2, dim).

    State-dict keys are the official ones under ``model.mm_projector.`` minus ``upsampler.*``
    (unused official keys -- ``query``, ``kv_proj.weight``, ``*_8x_*`` -- are not built).
    """

    def __init__(self, dim: int, vision_dim: int, num_heads: int, grid: int = 12, eps: float = 1e-6,
                 *, device=None, dtype=None, impl: str = "faithful"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if impl not in IMPLS:
            raise ValueError(f"unknown projector implementation {impl!r} (known: {', '.join(IMPLS)})")
        self.impl = impl
        kw = dict(device=device, dtype=dtype)
        self.dim, self.grid, self.num_heads = dim, grid, num_heads
        n = grid * grid
        self.pos_embed = nn.Parameter(sincos_table(dim, grid).to(**kw), requires_grad=False)
        for i in range(1, 5):
            self.register_parameter(f"query_{i}", nn.Parameter(torch.empty(n, dim, **kw)))
        for lv in LEVELS:
            setattr(self, f"features_{lv}_projector", nn.Linear(vision_dim, dim, **kw))
            self.register_parameter(f"feature_{lv}_embedding", nn.Parameter(torch.zeros(1, 1, dim, **kw)))
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True, **kw)
        for name in ("ln_q", "ln_kv", "ln_proj", "ln_post"):
            setattr(self, name, nn.LayerNorm(dim, eps=eps, **kw))
        self.cat_proj = nn.Linear(4 * dim, dim, **kw)
        self.proj = nn.Parameter(torch.empty(dim, dim, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialisation of the released code (trunc-normal 0.02 queries/linears)."""
        if self.proj.is_meta:
            return
        with torch.no_grad():
            for i in range(1, 5):
                nn.init.trunc_normal_(getattr(self, f"query_{i}"), std=0.02)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
            self.proj.copy_(self.dim ** -0.5 * torch.randn_like(self.proj))

    @property
    def queries(self) -> list[Tensor]:
        return [getattr(self, f"query_{i}") for i in range(1, 5)]

    # ---------------------------------------------------------------- keys and values
    def key_positions(self, height: int, width: int) -> Tensor:
        """(H, W, C) bicubic resize of the sin-cos table, computed in fp32 (released code)."""
        g = self.grid
        t = self.pos_embed.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
        t = F.interpolate(t, size=(height, width), mode="bicubic", align_corners=False)
        return t[0].permute(1, 2, 0).to(self.pos_embed.dtype)

    def level_tokens(self, feature: Tensor, level: str, grid_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """One level's windowed keys and values, each (B*grid^2, oh*ow, C)."""
        B, _, H, W = feature.shape
        f = getattr(self, f"features_{level}_projector")(feature.permute(0, 2, 3, 1))  # (B, H, W, C)
        f = self.ln_kv(f)
        key = f + self.key_positions(H, W) + getattr(self, f"feature_{level}_embedding")
        # Precision policy: boxes (float32, as released) are rounded to the model dtype (as the
        # shipped bf16 model does, docs/model.md §4.7; a no-op in fp32) and RoI-align runs in at least
        # fp32, then casts back.
        acc = torch.promote_types(f.dtype, torch.float32)
        if isinstance(H, int) and isinstance(W, int):  # eager: the released float64 arithmetic
            boxes = window_boxes(H, W, self.grid).to(f.device)
        else:  # symbolic shapes under export
            boxes = window_boxes_traced(H, W, self.grid, f.device)
        boxes = boxes.to(f.dtype).to(acc)
        n = boxes.shape[0]
        idx = torch.arange(B, device=f.device).repeat_interleave(n)
        boxes = boxes.repeat(B, 1)
        out = []
        for m in (key, f):
            r = roi_align(m.permute(0, 3, 1, 2).to(acc), boxes, grid_hw, batch_idx=idx,
                          spatial_scale=1.0, sampling_ratio=-1, aligned=False)
            out.append(r.to(f.dtype).flatten(2).transpose(1, 2))  # (B*n, oh*ow, C)
        return out[0], out[1]

    # ---------------------------------------------------------------- attention
    def _windowed_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q (N, C) one query per window, k/v (N, L, C) already projected -> (N, C)."""
        N, L, C = k.shape
        h, d = self.num_heads, C // self.num_heads
        qh = q.reshape(N, h, 1, d)
        kh = k.reshape(N, L, h, d).transpose(1, 2)
        vh = v.reshape(N, L, h, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(qh, kh, vh)  # (N, h, 1, d)
        return F.linear(o.reshape(N, C), self.attn.out_proj.weight, self.attn.out_proj.bias)

    def forward(self, levels: list[Tensor], grid_hw: tuple[int, int] | None = None, impl: str | None = None) -> Tensor:
        """``grid_hw`` pins the RoI sampling grid (export buckets); by default it is derived from
        the aspect ratio (:func:`sampling_grid`). ``impl`` overrides :attr:`impl` for this call."""
        if len(levels) != len(LEVELS):
            raise ValueError(f"expected {len(LEVELS)} feature levels (1x, 2x, 4x), got {len(levels)}")
        B, _, H, W = levels[0].shape
        for i, f in enumerate(levels):
            s = 2 ** i
            if f.shape[0] != B or f.shape[-2:] != (s * H, s * W):
                raise ValueError(f"level {LEVELS[i]} has shape {tuple(f.shape)}, expected "
                                 f"({B}, C, {s * H}, {s * W})")
        if grid_hw is None:
            grid_hw = sampling_grid(W, H)
        if (impl or self.impl) == "fast":
            return self._forward_fast(levels, grid_hw)
        kv = [self.level_tokens(f, lv, grid_hw) for f, lv in zip(levels, LEVELS)]
        keys = torch.cat([k for k, _ in kv], dim=1)  # (B*n, 3*oh*ow, C)
        values = torch.cat([v for _, v in kv], dim=1)
        wq, wk, wv = self.attn.in_proj_weight.chunk(3)
        bq, bk, bv = self.attn.in_proj_bias.chunk(3)
        k = F.linear(keys, wk, bk)
        v = F.linear(values, wv, bv)
        n = self.grid * self.grid
        outs = []
        for query in self.queries:
            q = self.ln_q(query) + self.pos_embed  # (n, C)
            q = F.linear(q, wq, bq).repeat(B, 1)  # (B*n, C)
            o = self._windowed_attention(q, k, v).reshape(B, n, -1)
            outs.append(self.ln_proj(o))
        x = self.ln_post(self.cat_proj(torch.cat(outs, dim=-1)))
        return x @ self.proj

    # ---------------------------------------------------------------- the fast form
    def forward_any_grid(self, levels: list[Tensor]) -> Tensor:
        """The fast form with the sampling grid chosen *inside* the computation from the maps'
        shape (:func:`grid_from_shape`), every level sampled on a padded 4x4 grid whose unused
        samples are masked out of the softmax: one function (one exported graph, one copy of the
        weights) for every bucket. Same result as ``forward(levels, impl="fast")``."""
        return self._forward_fast(levels, None)

    def _forward_fast(self, levels: list[Tensor], grid_hw: tuple[int, int] | None) -> Tensor:
        B, _, H, W = levels[0].shape
        mask = None
        if grid_hw is None:  # chosen from the shape, padded to PADDED_GRID and masked
            oh, ow = grid_from_shape(H, W, device=levels[0].device)
            grid_hw = (oh, ow)
            ph, pw = PADDED_GRID
            p = torch.arange(ph, device=oh.device)
            q = torch.arange(pw, device=oh.device)
            mask = ((p < oh)[:, None] & (q < ow)[None, :]).reshape(-1).repeat(len(LEVELS))  # (3*ph*pw,)
        keys, values = [], []
        for f, lv in zip(levels, LEVELS):
            k, v = self.level_tokens_fast(f, lv, grid_hw)
            keys.append(k)
            values.append(v)
        keys, values = torch.cat(keys, dim=2), torch.cat(values, dim=2)  # (B, n, 3*oh*ow, C)
        wq, wk, wv = self.attn.in_proj_weight.chunk(3)
        bq, _, bv = self.attn.in_proj_bias.chunk(3)  # b_k shifts every score of a query equally
        n, C = keys.shape[1], keys.shape[-1]
        h, d = self.num_heads, C // self.num_heads
        outs = []
        for query in self.queries:
            q = F.linear(self.ln_q(query) + self.pos_embed, wq, bq).reshape(n, h, d)
            # keys absorbed: (h, n, d) @ (h, d, C) -> per window (n, h, C)
            q_abs = torch.matmul(q.transpose(0, 1), wk.reshape(h, d, C)).transpose(0, 1) * d ** -0.5
            a = torch.matmul(q_abs, keys.transpose(-1, -2))  # (B, n, h, L)
            if mask is not None:  # padded samples (exactly zero keys) take no weight
                a = a.masked_fill(~mask, float("-inf"))
            a = a.softmax(dim=-1)
            agg = torch.matmul(a, values)  # (B, n, h, C): values aggregated, then projected per head
            # one (B*n, C) @ (C, d) GEMM per head, heads as the batch (no broadcast copies of W_v)
            o = torch.matmul(agg.permute(2, 0, 1, 3).reshape(h, -1, C), wv.reshape(h, d, C).transpose(1, 2))
            o = o.reshape(h, B, n, d).permute(1, 2, 0, 3) + bv.reshape(h, d)  # (B, n, h, d)
            o = F.linear(o.reshape(B, n, C), self.attn.out_proj.weight, self.attn.out_proj.bias)
            outs.append(self.ln_proj(o))
        x = self.ln_post(self.cat_proj(torch.cat(outs, dim=-1)))
        return x @ self.proj

    def level_tokens_fast(self, feature: Tensor, level: str, grid_hw: tuple) -> tuple[Tensor, Tensor]:
        """One level's windowed raw keys and values, (B, n, oh*ow, C) each: one separable RoI of the
        projected features, plus the RoI of the key positions (shape-only) and the level embedding.

        ``grid_hw`` is ``(oh, ow)`` as ints, or as int64 tensors (grid chosen from the shape): then
        every window holds :data:`PADDED_GRID` samples, those beyond (oh, ow) all zero."""
        B, _, H, W = feature.shape
        f = self.ln_kv(getattr(self, f"features_{level}_projector")(feature.permute(0, 2, 3, 1)))  # (B, H, W, C)
        acc = torch.promote_types(f.dtype, torch.float32)  # RoI accumulates in >= fp32, as the faithful path
        ay, ax = roi_matrices(H, W, grid_hw, self.grid, box_dtype=f.dtype, device=f.device)
        values = separable_roi(f.to(acc), ay, ax, self.grid)
        # RoI of the bicubic key positions without resizing them: RoI(M_h T M_w^T) = (A_y M_h) T (A_x M_w)^T,
        # T the grid x grid sin-cos table (M_h, M_w: F.interpolate's bicubic matrices, exact)
        g = self.grid
        mh = bicubic_matrix(g, H, dtype=acc, device=f.device)
        mw = bicubic_matrix(g, W, dtype=acc, device=f.device)
        table = self.pos_embed.to(acc).reshape(1, g, g, -1)
        pos = separable_roi(table, ay @ mh, ax @ mw, g)
        # RoI of the constant level embedding: e times each sample's total weight, which is 1 except
        # where a window thinner than one pixel (clamped to extent 1) samples beyond the map's edge
        mass = (ay.sum(1).reshape(self.grid, 1, -1, 1) * ax.sum(1).reshape(1, self.grid, 1, -1))
        mass = mass.reshape(1, self.grid * self.grid, -1, 1).to(acc)
        keys = values + pos + getattr(self, f"feature_{level}_embedding").to(acc) * mass
        return keys.to(f.dtype), values.to(f.dtype)


# Largest level map the exported graphs are built for (4x level of a 288-patch side): bounds the
# number of RoI samples per bin, a static size under tracing. Eager calls size it exactly.
EXPORT_MAX_SIDE = 1152


# Every window's sample grid in the any-grid form: the largest (oh, ow) of any bucket.
PADDED_GRID = (max(h for _, h in GRID_CANDIDATES), max(w for w, _ in GRID_CANDIDATES))
# Candidates sorted by aspect ratio w/h, and the boundaries between neighbours: ln(W/H) is nearer
# to ln(a2/b2) than to ln(a1/b1) iff W/H > sqrt(a1*a2 / (b1*b2)), i.e. W^2*b1*b2 > H^2*a1*a2 in
# integers. No boundary is rational (a1*a2/(b1*b2) is never a square), so integer sizes never tie
# and the strict-argmin order of the released rule never matters (tested against it exhaustively).
_BY_RATIO = sorted(GRID_CANDIDATES, key=lambda c: c[0] / c[1])
_BOUNDARIES = tuple((b1 * b2, a1 * a2) for (a1, b1), (a2, b2) in zip(_BY_RATIO, _BY_RATIO[1:]))


def grid_from_shape(height, width, device=None) -> tuple[Tensor, Tensor]:
    """(oh, ow) as int64 scalar tensors: :func:`sampling_grid` as integer comparisons on the map's
    shape, so an exported graph computes its bucket from its input shapes (works on symbolic sizes)."""
    one = torch.ones((), dtype=torch.int64, device=device)
    h, w = one * height, one * width
    h2, w2 = h * h, w * w  # (Mul, not Pow: integer Pow is not a TensorRT shape op)
    k = sum(((w2 * bb) > (h2 * aa)).to(torch.int64) for bb, aa in _BOUNDARIES)
    oh = torch.tensor([h for _, h in _BY_RATIO], dtype=torch.int64, device=device)[k]
    ow = torch.tensor([w for w, _ in _BY_RATIO], dtype=torch.int64, device=device)[k]
    return oh, ow


def roi_matrices(height, width, grid_hw: tuple, grid: int = 12, *,
                 box_dtype: torch.dtype = torch.float32, device=None) -> tuple[Tensor, Tensor]:
    """RoI-align over the uniform ``grid x grid`` windows as two matrices: ``A_y`` (grid*oh, H) and
    ``A_x`` (grid*ow, W), so that window (r, c), sample (p, q) of RoI(F) is ``A_y[r*oh+p] F A_x[c*ow+q]^T``.

    Windows in one row share their y-extent and windows in one column their x-extent, and each
    bilinear sample is a y-weight times an x-weight, so torchvision's average over samples factorises.
    Built from the same float32 boxes as the faithful path (rounded to ``box_dtype`` like the shipped
    model, docs/model.md §4.7) with torchvision's adaptive sampling (``aligned=False``,
    ``sampling_ratio=0``): per bin ``g = ceil(extent / pooled)`` samples at
    ``start + p*bin + (i + 0.5)*bin/g``; a sample outside ``[-1, size]`` weighs 0, others are
    clamped to ``[0, size - 1]`` and interpolated linearly. Works on symbolic sizes (export): the
    sample count is then padded to its bound for :data:`EXPORT_MAX_SIDE` and masked. With ``(oh, ow)``
    as tensors (:func:`grid_from_shape`) each window gets :data:`PADDED_GRID` rows/columns, the ones
    beyond (oh, ow) zero."""
    oh, ow = grid_hw
    eager = isinstance(height, int) and isinstance(width, int)
    boxes = window_boxes(height, width, grid) if eager else window_boxes_traced(height, width, grid, device)
    boxes = boxes.to(device).to(box_dtype).float()
    rows, cols = boxes[::grid], boxes[:grid]  # (grid, 4): one box per window row / column
    return (_roi_axis(rows[:, 1], rows[:, 3], oh, height, eager, PADDED_GRID[0]),
            _roi_axis(cols[:, 0], cols[:, 2], ow, width, eager, PADDED_GRID[1]))


def _roi_axis(start: Tensor, end: Tensor, pooled, size, eager: bool, padded: int) -> Tensor:
    """(len(start)*slots, size) weights of one axis (see :func:`roi_matrices`); ``slots`` is
    ``pooled`` when it is an int, ``padded`` when it is a tensor (rows beyond ``pooled`` zero)."""
    static = isinstance(pooled, int)
    slots = pooled if static else padded
    least = pooled if static else min(min(c) for c in GRID_CANDIDATES)  # fewest bins: most samples per bin
    pooled = pooled if static else pooled.to(start.dtype)
    extent = (end - start).clamp_min(1.0)
    bin_size = extent / pooled  # (R,)
    g = torch.ceil(extent / pooled)  # samples per bin, (R,)
    gmax = max(int(g.max()), 1) if eager else math.ceil((EXPORT_MAX_SIDE / start.shape[0] + 1) / least)
    p = torch.arange(slots, dtype=start.dtype, device=start.device)
    i = torch.arange(gmax, dtype=start.dtype, device=start.device)
    g3 = g[:, None, None]
    y = (start[:, None, None] + p[None, :, None] * bin_size[:, None, None]
         + (i[None, None, :] + 0.5) * bin_size[:, None, None] / g3.clamp_min(1))  # (R, slots, gmax)
    valid = (i[None, None, :] < g3) & (y >= -1.0) & (y <= size)
    if not static:
        valid = valid & (p < pooled)[None, :, None]
    y = y.clamp(min=0.0).clamp(max=size - 1)  # torchvision: below 0 -> 0, at/after the last pixel -> it
    pos = torch.arange(size, dtype=start.dtype, device=start.device)
    hat = (1.0 - (pos - y[..., None]).abs()).clamp_min(0.0)  # (R, pooled, gmax, size): linear interpolation
    w = (hat * (valid.to(start.dtype) / g3.clamp_min(1))[..., None]).sum(dim=2)  # (R, pooled, size)
    return w.reshape(-1, size)


def separable_roi(feature: Tensor, ay: Tensor, ax: Tensor, grid: int = 12) -> Tensor:
    """(B, H, W, C) -> (B, grid*grid, oh*ow, C): windows row-major, samples row-major. Two MatMuls."""
    B, H, W, C = feature.shape
    oh, ow = ay.shape[0] // grid, ax.shape[0] // grid
    t = torch.matmul(ay.to(feature.dtype), feature.reshape(B, H, W * C)).reshape(B, grid * oh, W, C)
    u = torch.matmul(ax.to(feature.dtype), t)  # (Q, W) @ (B, P, W, C) -> (B, P, Q, C)
    u = u.reshape(B, grid, oh, grid, ow, C).permute(0, 1, 3, 2, 4, 5)
    return u.reshape(B, grid * grid, oh * ow, C)
