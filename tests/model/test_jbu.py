"""JBU against an independent re-statement of the released FeatUp maths (unfold-based)."""

import pytest
import torch
import torch.nn.functional as F

from conftest import official_shapes
from hiwin_model.jbu import (JBULayer, JBUStack, adaptive_avg_pool, adaptive_conv, adaptive_conv_tiled,
                             adaptive_pool_matrix)


@pytest.mark.parametrize("n_in,n_out", [(14, 2), (28, 4), (42, 12), (84, 24), (7, 7), (10, 3), (5, 9)])
def test_pool_matrix_windows(n_in, n_out):
    m = adaptive_pool_matrix(n_in, n_out, dtype=torch.float64)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        want = torch.zeros(n_in, dtype=torch.float64)
        want[lo:hi] = 1.0 / (hi - lo)
        assert torch.equal(m[i], want)


@pytest.mark.parametrize("hw,out", [((28, 42), (4, 6)), ((336, 378), (96, 108)), ((84, 56), (24, 16)),
                                    ((70, 98), (20, 28))])
def test_adaptive_pool_equals_torch(hw, out):
    # 14 px per patch: 2x pooling is an exact 7x7 mean, 4x has factor 3.5 (overlapping windows)
    x = torch.randn(2, 3, *hw, dtype=torch.float64)
    torch.testing.assert_close(adaptive_avg_pool(x, out), F.adaptive_avg_pool2d(x, out), rtol=1e-12, atol=1e-12)
    x32 = x.float()
    torch.testing.assert_close(adaptive_avg_pool(x32, out), F.adaptive_avg_pool2d(x32, out), rtol=1e-5, atol=1e-6)


def _unfold_conv(hr_pad, kernel, d):
    B, C, Hp, Wp = hr_pad.shape
    H, W = Hp - d + 1, Wp - d + 1
    u = F.unfold(hr_pad, d).reshape(B, C, d * d, H, W)
    return torch.einsum("bcphw,bphw->bchw", u, kernel)


def test_adaptive_conv_equals_unfold():
    hr = torch.randn(2, 5, 16, 19, dtype=torch.float64)
    k = torch.randn(2, 49, 10, 13, dtype=torch.float64)
    torch.testing.assert_close(adaptive_conv(hr, k, 7), _unfold_conv(hr, k, 7), rtol=1e-6, atol=1e-6)


def test_adaptive_conv_backward_recomputes_taps():
    """With gradients wanted, adaptive_conv keeps only its inputs (no 49 fp32 tap copies) and its own
    backward recomputes the taps: fp32 forward and gradients equal autograd through the tap loop
    bit for bit; in bf16 the forward is equal and the map's gradient, accumulated in fp32 and
    rounded once, is closer to float64 than autograd's tap-by-tap bf16 accumulation."""
    from hiwin_model.jbu import _adaptive_conv_taps

    g = torch.Generator().manual_seed(3)
    base = [torch.randn(2, 5, 16, 14, generator=g), torch.randn(2, 49, 10, 8, generator=g),
            torch.randn(2, 5, 10, 8, generator=g)]
    truth = None
    for dt in (torch.float64, torch.float32, torch.bfloat16):
        hr, k = (t.to(dt).requires_grad_() for t in base[:2])
        grad = base[2].to(dt)
        loop = _adaptive_conv_taps(hr, k, 7)
        g_loop = torch.autograd.grad(loop, (hr, k), grad)
        out = adaptive_conv(hr, k, 7)
        assert out.grad_fn is not None and "AdaptiveConv" in type(out.grad_fn).__name__
        saved = [t for t in (out.grad_fn.saved_tensors or ())]
        assert len(saved) == 2 and all(s.dtype == dt for s in saved)
        g_new = torch.autograd.grad(out, (hr, k), grad)
        assert torch.equal(out, loop)
        if dt == torch.float64:
            truth = g_loop
        elif dt == torch.float32:
            assert all(torch.equal(a, b) for a, b in zip(g_new, g_loop))
        else:
            err = [float((a.double() - t).abs().max()) for a, t in zip(g_new, truth)]
            err_loop = [float((a.double() - t).abs().max()) for a, t in zip(g_loop, truth)]
            assert err[0] < err_loop[0] and err[1] <= err_loop[1], (err, err_loop)
    with torch.no_grad():  # no gradient wanted: the plain loop, no autograd node
        assert adaptive_conv(hr, k, 7).grad_fn is None


@pytest.mark.parametrize("h,w", [(1, 1), (4, 4), (8, 8), (9, 17), (17, 9), (33, 10), (16, 24)])
@pytest.mark.parametrize("d", [3, 7])
def test_tiled_conv_equals_unfold(h, w, d):
    """Whole and partial tiles, maps under one tile, both diameters (float64: only the summation
    order differs)."""
    g = torch.Generator().manual_seed(h * 100 + w)
    hr = torch.randn(2, 5, h + d - 1, w + d - 1, dtype=torch.float64, generator=g)
    k = torch.randn(2, d * d, h, w, dtype=torch.float64, generator=g)
    torch.testing.assert_close(adaptive_conv_tiled(hr, k, d), _unfold_conv(hr, k, d), rtol=1e-12, atol=1e-12)


def test_tiled_stack_equals_taps_and_unknown_conv_is_refused():
    stack = _randomised(JBUStack(8), seed=2)
    f1, img = torch.randn(2, 8, 5, 3), torch.randn(2, 3, 70, 42)
    with torch.no_grad():
        for a, b in zip(stack(f1, img), stack(f1, img, conv="tiled")):
            assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())
    with pytest.raises(ValueError, match="unknown adaptive convolution"):
        stack(f1, img, conv="unfold")


def reference_jbu_layer(layer: JBULayer, source, guidance):
    """The released JBULearnedRange.forward with its bf16 casts set to fp32 (independent code)."""
    GB, GC, GH, GW = guidance.shape
    d, r = layer.diameter, layer.radius
    x, y = torch.meshgrid(torch.linspace(-1, 1, d, dtype=source.dtype), torch.linspace(-1, 1, d, dtype=source.dtype),
                          indexing="ij")
    spatial = torch.exp(-(x.square() + y.square()) / (2 * layer.sigma_spatial ** 2)).reshape(1, d * d, 1, 1)
    proj = layer.range_proj(guidance)
    padded = F.pad(proj, [r] * 4, mode="reflect")
    queries = F.unfold(padded, d).reshape(GB, proj.shape[1], d * d, GH, GW).permute(0, 1, 3, 4, 2)
    temp = layer.range_temp.exp().clamp_min(1e-4).clamp_max(1e4)
    rng = F.softmax(temp * torch.einsum("bchwp,bchw->bphw", queries, proj), dim=1)
    k = rng * spatial
    k = k / k.sum(1, keepdim=True).clamp(1e-7)
    k = k + 0.1 * layer.fixup_proj(torch.cat([k, guidance], dim=1))
    hr = F.interpolate(source, (GH, GW), mode="bicubic", align_corners=False)
    hr = F.pad(hr, [r] * 4, mode="reflect")
    return _unfold_conv(hr, k, d)


def _randomised(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3 + (1.0 if p.dim() == 0 else 0.0))
    return m.eval()


def test_layer_matches_released_maths():
    layer = _randomised(JBULayer(8).double())
    src = torch.randn(2, 8, 5, 7, dtype=torch.float64)
    guide = torch.randn(2, 3, 10, 14, dtype=torch.float64)
    torch.testing.assert_close(layer(src, guide), reference_jbu_layer(layer, src, guide), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("h,w", [(2, 2), (3, 5), (6, 4), (24, 24)])
def test_stack_matches_released_maths(h, w):
    stack = _randomised(JBUStack(8).double(), seed=1)
    f1 = torch.randn(1, 8, h, w, dtype=torch.float64)
    img = torch.randn(1, 3, 14 * h, 14 * w, dtype=torch.float64)
    f2, f4 = stack(f1, img)
    r2 = reference_jbu_layer(stack.up1, f1, F.adaptive_avg_pool2d(img, (2 * h, 2 * w)))
    s4 = reference_jbu_layer(stack.up2, r2, F.adaptive_avg_pool2d(img, (4 * h, 4 * w)))
    r4 = stack.fixup_proj(s4) * 0.1 + s4
    assert f2.shape == (1, 8, 2 * h, 2 * w) and f4.shape == (1, 8, 4 * h, 4 * w)
    torch.testing.assert_close(f2, r2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f4, r4, rtol=1e-10, atol=1e-10)


def test_state_dict_keys_are_official():
    keys = set(JBUStack(1024).state_dict())
    want = {f"{u}.{k}" for u in ("up1", "up2") for k in (
        "range_temp", "sigma_spatial", "range_proj.0.weight", "range_proj.0.bias", "range_proj.3.weight",
        "range_proj.3.bias", "fixup_proj.0.weight", "fixup_proj.0.bias", "fixup_proj.3.weight",
        "fixup_proj.3.bias")} | {"fixup_proj.1.weight", "fixup_proj.1.bias"}
    assert keys == want
    official = official_shapes("model.mm_projector.upsampler.upsampler.")
    assert {k: tuple(v.shape) for k, v in JBUStack(1024).state_dict().items()} == official


def test_too_small_is_a_clear_error():
    layer = JBULayer(4)
    with pytest.raises(ValueError, match="too small"):
        layer(torch.randn(1, 4, 1, 1), torch.randn(1, 3, 2, 2))


@pytest.mark.parametrize("hw,out", [((24, 24), (48, 48)), ((19, 29), (38, 58)), ((2, 5), (4, 10)),
                                    ((7, 3), (21, 12)), ((30, 20), (11, 9))])
def test_bicubic_matrices_equal_torch_interpolate(hw, out):
    from hiwin_model.jbu import bicubic_resize

    x = torch.randn(2, 5, *hw, dtype=torch.float64)
    want = F.interpolate(x, out, mode="bicubic", align_corners=False)
    torch.testing.assert_close(bicubic_resize(x, out), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bicubic_resize(x.float(), out), want.float(), rtol=1e-5, atol=2e-6)
