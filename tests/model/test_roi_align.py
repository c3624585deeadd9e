"""hiwin::roi_align against a brute-force scalar port of torchvision's CPU roi_align kernel."""

import math

import numpy as np
import pytest
import torch

from hiwin_model.roi_align import roi_align


def _bilinear(f, y, x, H, W):
    if y < -1.0 or y > H or x < -1.0 or x > W:
        return torch.zeros(f.shape[0], dtype=f.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    yl, xl = int(y), int(x)
    if yl >= H - 1:
        yh = yl = H - 1
        y = float(yl)
    else:
        yh = yl + 1
    if xl >= W - 1:
        xh = xl = W - 1
        x = float(xl)
    else:
        xh = xl + 1
    ly, lx = y - yl, x - xl
    hy, hx = 1 - ly, 1 - lx
    return hy * hx * f[:, yl, xl] + hy * lx * f[:, yl, xh] + ly * hx * f[:, yh, xl] + ly * lx * f[:, yh, xh]


def brute_roi_align(inp, rois, out_hw, scale, sampling_ratio, aligned, T=np.float64):
    """rois (K, 5) = (batch, x1, y1, x2, y2); scalar loops, torchvision semantics, with the
    coordinate arithmetic done in ``T`` (torchvision does it in the input's dtype)."""
    N, C, H, W = inp.shape
    oh, ow = out_hw
    out = torch.zeros(rois.shape[0], C, oh, ow, dtype=inp.dtype)
    off = T(0.5 if aligned else 0.0)
    for k, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        f = inp[int(b)]
        sw, sh = T(x1) * T(scale) - off, T(y1) * T(scale) - off
        rw, rh = T(x2) * T(scale) - off - sw, T(y2) * T(scale) - off - sh
        if not aligned:
            rw, rh = max(rw, T(1.0)), max(rh, T(1.0))
        bh, bw = rh / T(oh), rw / T(ow)
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / T(oh))
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / T(ow))
        count = max(gh * gw, 1)
        for ph in range(oh):
            for pw in range(ow):
                acc = torch.zeros(C, dtype=inp.dtype)
                for iy in range(gh):
                    y = sh + T(ph) * bh + T(iy + 0.5) * bh / T(gh)
                    for ix in range(gw):
                        x = sw + T(pw) * bw + T(ix + 0.5) * bw / T(gw)
                        acc += _bilinear(f, float(y), float(x), H, W)
                out[k, :, ph, pw] = acc / count
    return out


def _random_rois(g, n, N, H, W):
    b = torch.randint(0, N, (n, 1), generator=g).double()
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([W + 4.0, H + 4.0]) - 2
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([W / 2.0, H / 2.0])
    return torch.cat([b, xy, xy + wh], dim=1)


SPECIAL = [  # (x1, y1, x2, y2): degenerate and border windows
    (0, 0, 0, 0), (3, 3, 3, 3), (5, 2, 4, 1),  # zero-size and inverted
    (0, 0, 16, 12), (-3, -3, 2, 2), (14, 10, 19, 15),  # whole map, across borders
    (15.5, 11.5, 16, 12), (-2, 5, -1.5, 6), (0.25, 0.75, 0.5, 11.9),  # slivers at/over edges
    (20, 20, 30, 30),  # fully outside
]


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
@pytest.mark.parametrize("out_hw", [(3, 3), (2, 4), (4, 3)])
def test_matches_bruteforce(aligned, sampling_ratio, out_hw):
    g = torch.Generator().manual_seed(hash((aligned, sampling_ratio, out_hw)) % 1000)
    N, C, H, W = 2, 5, 12, 16
    inp = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    special = torch.tensor([(k % N, *b) for k, b in enumerate(SPECIAL)], dtype=torch.float64)
    rois = torch.cat([_random_rois(g, 20, N, H, W), special])
    for scale in (1.0, 0.5):
        want = brute_roi_align(inp, rois, out_hw, scale, sampling_ratio, aligned)
        got = roi_align(inp, rois, out_hw, spatial_scale=scale, sampling_ratio=sampling_ratio, aligned=aligned)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert torch.isfinite(got).all()


def test_uniform_windows_fp32_and_box_index_forms():
    g = torch.Generator().manual_seed(3)
    inp = torch.randn(3, 7, 29, 41, generator=g)
    from hiwin_model.projector import window_boxes

    boxes = window_boxes(29, 41)
    idx = torch.arange(3).repeat_interleave(boxes.shape[0])
    got = roi_align(inp, boxes.repeat(3, 1), (2, 4), batch_idx=idx)
    rois = torch.cat([idx[:, None].float(), boxes.repeat(3, 1)], dim=1)
    # fp32 sample coordinates, as torchvision computes them for fp32 input; values in fp64
    want = brute_roi_align(inp.double(), rois.double(), (2, 4), 1.0, -1, False, T=np.float32)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(roi_align(inp, rois, (2, 4)), got, rtol=0, atol=0)


def test_gradient():
    g = torch.Generator().manual_seed(4)
    inp = torch.randn(1, 2, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[0.5, 0.2, 4.1, 5.3], [2.0, 1.0, 6.5, 5.5]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: roi_align(x, boxes, (2, 3)), (inp,))


def test_backward_keeps_no_copy_of_the_input():
    """RoI-align is linear: the op saves only boxes and indices (not the map, which the projector passes
    as an fp32 copy of its 4x features), and its gradient is autograd's through the eager maths bit
    for bit."""
    from hiwin_model.roi_align import roi_align_reference

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 23, 17, generator=g, requires_grad=True)
    boxes = torch.tensor([[0.0, 0.0, 10.5, 7.2], [3.0, 4.0, 17.0, 23.0], [1.2, 0.3, 5.0, 5.0]])
    idx = torch.tensor([0, 1, 1])
    y = roi_align(x, boxes, (3, 2), batch_idx=idx)
    assert all(t.numel() < x.numel() for t in y.grad_fn.saved_tensors)
    grad = torch.randn(y.shape, generator=g)
    (got,) = torch.autograd.grad(y, x, grad)
    (want,) = torch.autograd.grad(roi_align_reference(x, boxes, idx, 3, 2), x, grad)
    assert torch.equal(got, want)


def test_is_a_registered_custom_op_and_exports():
    assert hasattr(torch.ops.hiwin, "roi_align")

    class M(torch.nn.Module):
        def forward(self, x, boxes):
            return roi_align(x, boxes, (3, 3))

    ep = torch.export.export(M(), (torch.randn(1, 4, 10, 10), torch.tensor([[0.0, 0.0, 5.0, 5.0]])))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "hiwin.roi_align.default" in targets


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        roi_align(torch.randn(4, 10, 10), torch.zeros(1, 4), (2, 2))
    with pytest.raises(ValueError, match=r"\(K, 4\) or \(K, 5\)"):
        roi_align(torch.randn(1, 4, 10, 10), torch.zeros(1, 3), (2, 2))
