"""Hiwin projector against an independent re-statement of the released forward pass."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import official_shapes
from hiwin_model import projector as projector_mod
from hiwin_model.projector import HiwinProjector, sampling_grid, sincos_table, window_boxes
from test_roi_align import brute_roi_align


def test_sincos_table_formula():
    C, g = 16, 12
    t = sincos_table(C, g).double()
    assert t.shape == (144, C)
    for idx in (0, 1, 13, 143):
        row, col = divmod(idx, g)
        for half, pos in ((0, col), (1, row)):
            for k in range(C // 4):
                w = 1.0 / 10000 ** (k / (C / 4))
                assert math.isclose(t[idx, half * C // 2 + k], math.sin(pos * w), abs_tol=1e-6)
                assert math.isclose(t[idx, half * C // 2 + C // 4 + k], math.cos(pos * w), abs_tol=1e-6)


@pytest.mark.parametrize("w,h,want", [(24, 24, (3, 3)), (48, 24, (2, 4)), (24, 48, (4, 2)), (30, 24, (3, 4)),
                                      (36, 24, (2, 3)), (24, 36, (3, 2)), (29, 19, (2, 3)), (25, 24, (3, 3))])
def test_sampling_grid(w, h, want):
    assert sampling_grid(w, h) == want


@pytest.mark.parametrize("h,w", [(24, 24), (19, 29), (96, 84), (2, 3)])
def test_windows_are_a_uniform_partition(h, w):
    b = window_boxes(h, w).double()
    j, i = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="xy")
    want = torch.stack([j * w / 12, i * h / 12, (j + 1) * w / 12, (i + 1) * h / 12], -1).reshape(-1, 4).double()
    torch.testing.assert_close(b, want, rtol=0, atol=1e-5)


def reference_projector(p: HiwinProjector, levels):
    """Released AdaptSpatialResampler.forward_with_muti_res / query_with_parallel_attn with the
    bf16 casts set to the model dtype; attention through nn.MultiheadAttention, 4 calls."""
    keys, values = [], []
    B = levels[0].shape[0]
    H0, W0 = levels[0].shape[-2:]
    oh, ow = (lambda r: min(((abs(math.log(r) - math.log(cw / ch)), (ch, cw)) for cw, ch in
                             [(4, 2), (3, 2), (4, 3), (3, 3), (2, 4), (2, 3), (3, 4)]), key=lambda t: t[0])[1])(W0 / H0)
    for feat, lv in zip(levels, ("1x", "2x", "4x")):
        f = getattr(p, f"features_{lv}_projector")(feat.permute(0, 2, 3, 1))
        H, W = f.shape[1:3]
        pos = F.interpolate(p.pos_embed.float().reshape(1, 12, 12, -1).permute(0, 3, 1, 2), size=(H, W),
                            mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(0, 2)
        f = p.ln_kv(f.reshape(B, H * W, -1))
        key = f + pos[None] + getattr(p, f"feature_{lv}_embedding")
        boxes = torch.tensor([[j * W / 12, i * H / 12, (j + 1) * W / 12, (i + 1) * H / 12]
                              for i in range(12) for j in range(12)], dtype=torch.float32).double()
        rois = torch.cat([torch.arange(B).repeat_interleave(144)[:, None].double(), boxes.repeat(B, 1)], 1)
        for m, out in ((key, keys), (f, values)):
            x = m.reshape(B, H, W, -1).permute(0, 3, 1, 2).double()
            r = brute_roi_align(x, rois, (oh, ow), 1.0, -1, False)
            out.append(r.flatten(-2).permute(0, 2, 1).to(m.dtype))
    keys, values = torch.cat(keys, 1), torch.cat(values, 1)
    outs = []
    for q in p.queries:
        query = (p.ln_q(q) + p.pos_embed).repeat(B, 1)[:, None]  # (B*144, 1, C)
        o, _ = p.attn(query, keys, values, need_weights=False)
        outs.append(p.ln_proj(o[:, 0].reshape(B, 144, -1)))
    return p.ln_post(p.cat_proj(torch.cat(outs, -1))) @ p.proj


@pytest.mark.parametrize("h,w,B", [(2, 3, 2), (5, 7, 1), (24, 24, 1), (6, 2, 1)])
def test_matches_released_forward(h, w, B):
    torch.manual_seed(h * 100 + w)
    p = HiwinProjector(32, 8, 4).double().eval()
    with torch.no_grad():
        for name in ("feature_1x_embedding", "feature_2x_embedding", "feature_4x_embedding"):
            getattr(p, name).normal_()
        for m in (p.ln_q, p.ln_kv, p.ln_proj, p.ln_post):
            m.weight.normal_(1, 0.1), m.bias.normal_(0, 0.1)
        p.attn.in_proj_bias.normal_(0, 0.1)
    levels = [torch.randn(B, 8, h * s, w * s, dtype=torch.float64) for s in (1, 2, 4)]
    with torch.no_grad():
        got = p(levels)
        want = reference_projector(p, levels)
    assert got.shape == (B, 144, 32)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_state_dict_matches_official_at_real_dims():
    with torch.device("meta"):
        p = HiwinProjector(4096, 1024, 32)
    official = official_shapes("model.mm_projector.")
    unused = {"query", "kv_proj.weight", "feature_8x_embedding", "features_8x_projector.weight",
              "features_8x_projector.bias"}
    ours = {k: tuple(v.shape) for k, v in p.state_dict().items()}
    assert ours == {k: v for k, v in official.items() if k not in unused}


def test_bf16_rounds_window_boxes_like_the_released_model(monkeypatch):
    seen = []
    real = projector_mod.roi_align

    def spy(x, boxes, *a, **kw):
        seen.append(boxes.clone())
        assert x.dtype == torch.float32  # RoI-align runs in fp32
        return real(x, boxes, *a, **kw)

    monkeypatch.setattr(projector_mod, "roi_align", spy)
    p = HiwinProjector(32, 8, 4).to(torch.bfloat16).eval()
    with torch.no_grad():
        p([torch.randn(1, 8, 49 * s // 7, 49 * s // 7, dtype=torch.bfloat16) for s in (1, 2, 4)])
    # levels are 7x7, 14x14, 28x28; on the 4x level 28/12 = 2.333 is not representable in bf16
    b4 = seen[-1]
    assert b4.dtype == torch.float32
    exact = window_boxes(28, 28)
    assert not torch.equal(b4[:144], exact)
    torch.testing.assert_close(b4[:144], exact.to(torch.bfloat16).float(), rtol=0, atol=0)
    seen.clear()
    p.float()(list(torch.randn(1, 8, 7 * s, 7 * s) for s in (1, 2, 4)))
    torch.testing.assert_close(seen[-1][:144], window_boxes(28, 28), rtol=0, atol=0)


def test_bad_levels():
    p = HiwinProjector(32, 8, 4)
    with pytest.raises(ValueError, match="expected 3 feature levels"):
        p([torch.randn(1, 8, 2, 2)])
    with pytest.raises(ValueError, match="level 4x"):
        p([torch.randn(1, 8, 2, 2), torch.randn(1, 8, 4, 4), torch.randn(1, 8, 9, 8)])


def test_traced_windows_are_bit_identical_to_the_released_boxes():
    import random

    from hiwin_model.projector import window_boxes_traced

    rng = random.Random(0)
    pairs = [(h, w) for h in range(2, 40) for w in range(2, 40)]
    pairs += [(rng.randint(2, 1024), rng.randint(2, 1024)) for _ in range(1500)]
    bad = [(h, w) for h, w in pairs if not torch.equal(window_boxes(h, w), window_boxes_traced(h, w))]
    assert bad == []
