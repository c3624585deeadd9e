"""The fast projector (keys absorbed, values aggregated, one separable RoI) against the faithful one,
which stays the oracle: every sampling grid, odd and tiny maps, real pages 1:4 ... 4:1, gradients."""

from __future__ import annotations

import pytest
import torch

from hiwin_model.projector import HiwinProjector, roi_matrices, separable_roi, window_boxes
from hiwin_model.roi_align import roi_align
from hiwin_runtime.buckets import HIWIN_BUCKETS, sampling_grid

# (H, W) maps: every bucket by aspect ratio, the 2-patch minimum, thin maps under 12 px whose
# windows sample beyond the edge, odd sizes
MAPS = ((24, 24), (19, 29), (29, 19), (16, 32), (32, 16), (18, 24), (24, 18), (2, 2), (2, 9), (9, 2),
        (7, 40), (3, 5), (11, 13), (25, 23))


def _rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("grid_hw", HIWIN_BUCKETS)
def test_separable_roi_equals_roi_align(grid_hw):
    g = torch.Generator().manual_seed(0)
    for H, W in MAPS + ((96, 96), (57, 87)):
        f = torch.randn(2, H, W, 6, generator=g)
        ay, ax = roi_matrices(H, W, grid_hw)
        boxes, idx = window_boxes(H, W).repeat(2, 1), torch.arange(2).repeat_interleave(144)
        ref = roi_align(f.permute(0, 3, 1, 2), boxes, grid_hw, batch_idx=idx)
        ref = ref.flatten(2).transpose(1, 2).reshape(2, 144, -1, 6)
        assert _rel(ref, separable_roi(f, ay, ax)) < 1e-5, (H, W)


@pytest.fixture(scope="module")
def projector():
    torch.manual_seed(0)
    p = HiwinProjector(128, 32, 4).eval()
    with torch.no_grad():  # trained level embeddings are far from zero: make them count
        for lv in ("1x", "2x", "4x"):
            getattr(p, f"feature_{lv}_embedding").normal_(0, 0.5)
    return p


def _both(p, levels, grid_hw=None):
    p.impl = "faithful"
    ref = p(levels, grid_hw)
    p.impl = "fast"
    try:
        return ref, p(levels, grid_hw)
    finally:
        p.impl = "faithful"


@pytest.mark.parametrize("grid_hw", HIWIN_BUCKETS)
def test_fast_equals_faithful_on_every_grid(projector, grid_hw):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for H, W in MAPS:
            levels = [torch.randn(2, 32, s * H, s * W, generator=g) for s in (1, 2, 4)]
            ref, fast = _both(projector, levels, grid_hw)
            assert _rel(ref, fast) <= 1e-4, (H, W)
            cos = torch.nn.functional.cosine_similarity(ref.double().flatten(), fast.double().flatten(), dim=0)
            assert cos > 0.9999999


def test_the_check_can_fail(projector):
    """Negative control: other weights (one query set changed) fail the same bound."""
    g = torch.Generator().manual_seed(2)
    levels = [torch.randn(1, 32, s * 5, s * 7, generator=g) for s in (1, 2, 4)]
    with torch.no_grad():
        ref, _ = _both(projector, levels)
        saved = projector.query_2.clone()
        projector.query_2.add_(0.05 * torch.randn(projector.query_2.shape, generator=g))  # (a constant shift would vanish in ln_q)
        try:
            _, fast = _both(projector, levels)
        finally:
            projector.query_2.copy_(saved)
    assert _rel(ref, fast) > 1e-3


def test_fast_gradients_equal_faithful(projector):
    g = torch.Generator().manual_seed(3)
    levels = [torch.randn(2, 32, s * 6, s * 9, generator=g) for s in (1, 2, 4)]
    grads = []
    for impl in ("faithful", "fast"):
        projector.impl = impl
        projector.zero_grad(set_to_none=True)
        x = [t.clone().requires_grad_(True) for t in levels]
        (projector(x) ** 2).sum().backward()
        grads.append({**{n: p.grad.clone() for n, p in projector.named_parameters() if p.grad is not None},
                      **{f"level{i}": t.grad for i, t in enumerate(x)}})
    projector.impl = "faithful"
    projector.zero_grad(set_to_none=True)
    # b_k cancels in the softmax: its true gradient is zero, and the fast form never touches it
    assert set(grads[0]) - set(grads[1]) <= {"attn.in_proj_bias"}
    for name, gf in grads[1].items():
        ga = grads[0][name]
        assert float((ga - gf).abs().max()) <= 1e-4 * float(ga.abs().max()) + 1e-7, name


@pytest.mark.parametrize("size", [(1344, 336), (1008, 672), (800, 800), (672, 1008), (336, 1344), (90, 60)])
def test_fast_model_tokens_equal_faithful(tiny_model, size):
    from conftest import random_image

    prepared = tiny_model.processor.prepare_image(random_image(*size, seed=size[0]))
    p = tiny_model.projector
    with torch.no_grad():
        ref = tiny_model.encode_prepared(prepared)
        p.impl = "fast"
        try:
            fast = tiny_model.encode_prepared(prepared)
        finally:
            p.impl = "faithful"
    assert _rel(ref, fast) <= 1e-4
    assert {sampling_grid(c.shape[2] // 14, c.shape[1] // 14) for c in prepared.crops}  # crops ran


def test_fast_form_counts_fewer_flops_at_width():
    """The saving grows with the width C (the skipped K/V projections cost C^2 per RoI sample; the
    separable RoI costs C per map pixel): at the tiny test width the fast form even counts more,
    at C = 1024 it halves the count, at the released 4096 it is 1.9x (docs/model.md §4.9)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    p = HiwinProjector(1024, 64, 8).eval()
    levels = [torch.randn(1, 64, s * 24, s * 24) for s in (1, 2, 4)]
    flops = {}
    for impl in ("faithful", "fast"):
        c = FlopCounterMode(display=False)
        with c, torch.no_grad():
            p(levels, impl=impl)
        flops[impl] = c.get_total_flops()
    assert flops["fast"] < 0.55 * flops["faithful"]


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="unknown projector implementation"):
        HiwinProjector(128, 32, 4, impl="turbo")


# ------------------------------------------------------------------ any-grid form (one exported graph)
def test_grid_from_shape_equals_the_released_rule_exhaustively():
    """The integer-comparison rule inside the exported graph picks what the float64 log rule picks,
    for every map up to 300 x 300 (crops reach 256 patches per side)."""
    from hiwin_model.projector import grid_from_shape

    bad = [(h, w) for h in range(1, 301) for w in range(1, 301)
           if tuple(int(t) for t in grid_from_shape(h, w)) != sampling_grid(w, h)]
    assert bad == []


@pytest.mark.parametrize("grid_hw", HIWIN_BUCKETS)
def test_any_grid_equals_faithful_on_every_grid(projector, grid_hw):
    g = torch.Generator().manual_seed(4)
    maps = [m for m in MAPS if sampling_grid(m[1], m[0]) == grid_hw]
    assert maps, grid_hw  # MAPS covers every bucket
    with torch.no_grad():
        for H, W in maps:
            levels = [torch.randn(2, 32, s * H, s * W, generator=g) for s in (1, 2, 4)]
            ref = projector(levels, impl="faithful")
            out = projector.forward_any_grid(levels)
            assert _rel(ref, out) <= 1e-4, (H, W)


def test_padded_roi_rows_beyond_the_grid_are_zero():
    from hiwin_model.projector import PADDED_GRID, grid_from_shape

    oh, ow = grid_from_shape(19, 29)
    assert (int(oh), int(ow)) == (2, 3)
    ay, ax = roi_matrices(19, 29, (oh, ow))
    assert ay.shape == (12 * PADDED_GRID[0], 19) and ax.shape == (12 * PADDED_GRID[1], 29)
    ref_y, ref_x = roi_matrices(19, 29, (2, 3))
    ay, ax = ay.reshape(12, PADDED_GRID[0], 19), ax.reshape(12, PADDED_GRID[1], 29)
    assert torch.equal(ay[:, :2].reshape(-1, 19), ref_y) and torch.equal(ax[:, :3].reshape(-1, 29), ref_x)
    assert not ay[:, 2:].any() and not ax[:, 3:].any()
