"""The plugins' CPU launchers (engines/plugins, through hiwin_export.plugin_lib) against the PyTorch
reference: hiwin_model.roi_align.roi_align and JBULayer.forward.

Precision rules checked here:
* fp32 I/O: max |out - ref| <= 1e-5 * max |ref| (both accumulate in fp32; only summation order differs).
* fp16 I/O: the reference runs in fp32 on the fp16-rounded inputs, so the only extra error is the final
  rounding of the output to fp16 (<= 2^-11 relative, half an ulp): elementwise
  |out - ref| <= 2^-11 |ref| + 1e-5 max |ref| (fp32 noise) + 2^-24 (fp16 subnormal spacing / 2), and
  cosine(out, ref) >= 0.9999.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from hiwin_export import plugin_lib
from hiwin_model.jbu import JBULayer
from hiwin_model.roi_align import roi_align as torch_roi_align


@pytest.fixture(scope="module", autouse=True)
def cpu_library():
    try:
        return plugin_lib.load_cpu_library()
    except plugin_lib.PluginBuildError as e:
        pytest.skip(f"plugin CPU library unavailable: {e}")


def _check_fp32(out: np.ndarray, ref: np.ndarray) -> None:
    assert out.shape == ref.shape and out.dtype == np.float32
    assert np.isfinite(out).all()
    scale = max(float(np.abs(ref).max(initial=0.0)), 1e-30)
    err = float(np.abs(out.astype(np.float64) - ref).max(initial=0.0))
    assert err <= 1e-5 * scale, f"max abs err {err:.3g} > 1e-5 * {scale:.3g}"


def _check_fp16(out: np.ndarray, ref: np.ndarray) -> None:
    assert out.shape == ref.shape and out.dtype == np.float16
    o = out.astype(np.float64)
    r = ref.astype(np.float64)
    assert np.isfinite(o).all()
    scale = float(np.abs(r).max(initial=0.0))
    bound = 2.0 ** -11 * np.abs(r) + 1e-5 * scale + 2.0 ** -24
    excess = np.abs(o - r) - bound
    where = np.unravel_index(excess.argmax(), excess.shape)
    assert (excess <= 0).all(), f"fp16 error over the bound by {excess.max():.3g} at {where}"
    if scale > 0:
        cos = float((o * r).sum() / (np.linalg.norm(o) * np.linalg.norm(r)))
        assert cos >= 0.9999, cos


def _rounded(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).astype(np.float32)


# ----------------------------------------------------------------------------------- RoI-align
def _ref_roi_align(x, rois, bidx, out_hw, sr, scale, aligned) -> np.ndarray:
    return torch_roi_align(torch.from_numpy(np.asarray(x, np.float32)), torch.from_numpy(np.asarray(rois, np.float32)),
                           out_hw, batch_idx=torch.from_numpy(bidx.astype(np.int64)), spatial_scale=scale,
                           sampling_ratio=sr, aligned=aligned).numpy()


def _random_boxes(rng, n, H, W, spread=3.0):
    x1 = rng.uniform(-spread, W + spread, n)
    y1 = rng.uniform(-spread, H + spread, n)
    x2 = x1 + rng.uniform(0.0, W / 1.5, n)
    y2 = y1 + rng.uniform(0.0, H / 1.5, n)
    return np.stack([x1, y1, x2, y2], 1).astype(np.float32)


def _border_boxes(H, W):
    """Beyond the map, straddling it, thin (< 1 px), at the edges, zero-size and inverted boxes."""
    return np.array([
        [W + 2.5, H + 2.0, W + 6.0, H + 5.0],   # fully outside (bottom right)
        [-8.0, -7.0, -2.5, -1.5],               # fully outside (top left)
        [-2.0, -1.5, 3.0, 2.5],                 # straddles the top-left corner
        [W - 2.0, H - 3.0, W + 2.0, H + 1.0],   # straddles the bottom-right corner
        [1.2, 2.1, 1.5, 2.35],                  # thinner than a pixel both ways
        [0.0, 3.0, W, 3.4],                     # full width, thin height
        [W - 1.0, 0.0, W, H],                   # last column
        [0.0, H - 1.0, W, H],                   # last row
        [0.0, 0.0, W, H],                       # the whole map
        [2.0, 2.0, 2.0, 2.0],                   # zero size: empty bins when aligned
        [4.0, 3.0, 1.0, 1.0],                   # inverted
        [-1.0, -1.0, 0.0, 0.0],                 # the -1 boundary of the sample rule
        [W - 0.5, H - 0.5, W + 1.0, H + 1.0],   # the H/W boundary of the sample rule
    ], dtype=np.float32)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sr", [0, 2])
@pytest.mark.parametrize("out_hw,scale", [((3, 3), 1.0), ((2, 4), 0.5)])
def test_roi_align_random_fp32(aligned, sr, out_hw, scale):
    rng = np.random.default_rng(hash((aligned, sr, out_hw, scale)) % 2**32)
    N, C, H, W = 2, 3, 11, 13
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    rois = _random_boxes(rng, 24, H / scale, W / scale)
    bidx = rng.integers(0, N, 24).astype(np.int64)
    out = plugin_lib.roi_align(x, rois, bidx, out_hw, sr, scale, aligned)
    _check_fp32(out, _ref_roi_align(x, rois, bidx, out_hw, sr, scale, aligned))


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sr", [0, 2])
def test_roi_align_border_and_degenerate_fp32(aligned, sr):
    N, C, H, W = 2, 2, 7, 9
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    rois = _border_boxes(H, W)
    bidx = (np.arange(len(rois)) % N).astype(np.int32)  # int32 indices are accepted too
    for out_hw in [(3, 3), (1, 1), (4, 2)]:
        out = plugin_lib.roi_align(x, rois, bidx, out_hw, sr, 1.0, aligned)
        ref = _ref_roi_align(x, rois, bidx, out_hw, sr, 1.0, aligned)
        _check_fp32(out, ref)
        assert not out[:2].any()  # boxes fully outside the map: every sample is zero
    if aligned and sr == 0:
        # the zero-size box has 0 samples per bin: 0, never 0/0
        out = plugin_lib.roi_align(x, rois[9:10], bidx[9:10], (3, 3), 0, 1.0, True)
        assert np.array_equal(out, np.zeros_like(out))


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 2, 1, 5), (3, 1, 6, 1), (1, 5, 2, 3)])
def test_roi_align_odd_shapes_fp32(shape):
    rng = np.random.default_rng(sum(shape))
    N, C, H, W = shape
    x = rng.standard_normal(shape).astype(np.float32)
    rois = np.concatenate([_random_boxes(rng, 6, H, W, spread=1.0), _border_boxes(H, W)])
    bidx = rng.integers(0, N, len(rois))
    for aligned in (True, False):
        for sr in (0, 2, 3):
            out = plugin_lib.roi_align(x, rois, bidx, (2, 3), sr, 1.0, aligned)
            _check_fp32(out, _ref_roi_align(x, rois, bidx, (2, 3), sr, 1.0, aligned))


def test_roi_align_projector_windows_fp32():
    """The projector's use: uniform windows over the map, adaptive sampling, aligned=False."""
    from hiwin_model.projector import window_boxes

    rng = np.random.default_rng(3)
    N, C, H, W = 2, 4, 24, 36
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    boxes = window_boxes(H, W, 12).numpy()
    rois = np.tile(boxes, (N, 1))
    bidx = np.repeat(np.arange(N), len(boxes))
    out = plugin_lib.roi_align(x, rois, bidx, (2, 3), -1, 1.0, False)
    _check_fp32(out, _ref_roi_align(x, rois, bidx, (2, 3), -1, 1.0, False))


def test_roi_align_no_rois():
    x = np.ones((1, 3, 4, 4), np.float32)
    out = plugin_lib.roi_align(x, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), (2, 2))
    assert out.shape == (0, 3, 2, 2)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sr", [0, 2])
def test_roi_align_fp16(aligned, sr):
    rng = np.random.default_rng(7)
    N, C, H, W = 2, 3, 10, 12
    x16 = rng.standard_normal((N, C, H, W)).astype(np.float16)
    rois16 = np.concatenate([_random_boxes(rng, 16, H, W), _border_boxes(H, W)]).astype(np.float16)
    bidx = rng.integers(0, N, len(rois16))
    out = plugin_lib.roi_align(x16, rois16, bidx, (3, 3), sr, 1.0, aligned)
    ref = _ref_roi_align(x16.astype(np.float32), rois16.astype(np.float32), bidx, (3, 3), sr, 1.0, aligned)
    _check_fp16(out, ref)


def test_roi_align_errors():
    x = np.zeros((1, 2, 4, 4), np.float32)
    rois = np.zeros((1, 4), np.float32)
    b = np.zeros(1, np.int64)
    with pytest.raises(ValueError, match="x must be float32 or float16"):
        plugin_lib.roi_align(x.astype(np.float64), rois, b, (2, 2))
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        plugin_lib.roi_align(x[0], rois, b, (2, 2))
    with pytest.raises(ValueError, match=r"rois must be a \(R, 4\)"):
        plugin_lib.roi_align(x, np.zeros((1, 5), np.float32), b, (2, 2))
    with pytest.raises(ValueError, match="rois must have the dtype of x"):
        plugin_lib.roi_align(x, rois.astype(np.float16), b, (2, 2))
    with pytest.raises(ValueError, match="batch_indices must be an int32 or int64"):
        plugin_lib.roi_align(x, rois, b.astype(np.float32), (2, 2))
    with pytest.raises(ValueError, match="batch_indices must have shape"):
        plugin_lib.roi_align(x, rois, np.zeros(2, np.int64), (2, 2))
    with pytest.raises(ValueError, match="output_hw must be positive"):
        plugin_lib.roi_align(x, rois, b, (0, 2))
    with pytest.raises(ValueError, match=r"batch_indices\[0\] = 3 is out of range"):
        plugin_lib.roi_align(x, rois, b + 3, (2, 2))
    with pytest.raises(ValueError, match="spatial_scale must be finite"):
        plugin_lib.roi_align(x, rois, b, (2, 2), spatial_scale=float("nan"))


# ----------------------------------------------------------------------------------- JBU
class _Const(nn.Module):
    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, _guidance):
        return self.value


def _jbu_layer(C: int, K: int, radius: int, seed: int) -> JBULayer:
    torch.manual_seed(seed)
    layer = JBULayer(C, K, radius).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # off the init values, like trained weights
        layer.range_temp.fill_(float(torch.empty(1).uniform_(-0.8, 1.2, generator=g)))
        layer.sigma_spatial.fill_(float(torch.empty(1).uniform_(0.6, 1.4, generator=g)))
        for m in layer.fixup_proj:
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(3.0)
                m.bias.normal_(0, 0.3, generator=g)
    return layer


def _ref_jbu(layer: JBULayer, hr: np.ndarray, q: np.ndarray, guidance: np.ndarray) -> np.ndarray:
    """JBULayer.forward with q given: range_proj swapped for a constant, and hr passed at the output size
    (the bicubic resize to the same size is an exact identity)."""
    saved = layer.range_proj
    try:
        layer.range_proj = _Const(torch.from_numpy(np.asarray(q, np.float32)))
        with torch.no_grad():
            return layer(torch.from_numpy(np.asarray(hr, np.float32)),
                         torch.from_numpy(np.asarray(guidance, np.float32))).numpy()
    finally:
        layer.range_proj = saved


def _params(layer: JBULayer) -> dict:
    c1, c2 = layer.fixup_proj[0], layer.fixup_proj[3]
    t = lambda v: v.detach().numpy()  # noqa: E731
    return dict(range_temp=t(layer.range_temp), sigma_spatial=t(layer.sigma_spatial), w1=t(c1.weight),
                b1=t(c1.bias), w2=t(c2.weight), b2=t(c2.bias), radius=layer.radius)


def _jbu_inputs(layer: JBULayer, B: int, C: int, H: int, W: int, seed: int):
    rng = np.random.default_rng(seed)
    hr = rng.standard_normal((B, C, H, W)).astype(np.float32)
    guidance = rng.standard_normal((B, 3, H, W)).astype(np.float32)
    with torch.no_grad():
        q = layer.range_proj(torch.from_numpy(guidance)).numpy()
    return hr, q, guidance


def test_reference_identity_resize():
    """The reference trick above: hr at the output size goes through forward unchanged."""
    layer = _jbu_layer(3, 4, 3, 0)
    hr, q, g = _jbu_inputs(layer, 1, 3, 6, 7, 0)
    with torch.no_grad():
        want = layer(torch.from_numpy(hr), torch.from_numpy(g)).numpy()
    assert np.array_equal(_ref_jbu(layer, hr, q, g), want)


@pytest.mark.parametrize("B,C,K,H,W,radius", [
    (2, 5, 4, 9, 10, 3),     # random
    (1, 3, 8, 4, 4, 3),      # H = W = r + 1: every tap reflects
    (1, 1, 1, 5, 17, 3),     # odd, thin
    (2, 2, 3, 7, 4, 3),      # W = r + 1 only
    (1, 4, 2, 6, 5, 1),      # radius 1
    (1, 2, 3, 3, 8, 2),      # radius 2, H = r + 1
    (1, 2, 2, 5, 6, 4),      # radius 4, H = r + 1
])
def test_jbu_fp32(B, C, K, H, W, radius):
    layer = _jbu_layer(C, K, radius, seed=B * 100 + H * 10 + W)
    hr, q, g = _jbu_inputs(layer, B, C, H, W, seed=H * W)
    out = plugin_lib.jbu_conv(hr, q, g, **_params(layer))
    _check_fp32(out, _ref_jbu(layer, hr, q, g))


def test_jbu_extreme_temperature_fp32():
    """Clamped temperatures (exp(range_temp) outside [1e-4, 1e4]) and a sharp spatial kernel."""
    layer = _jbu_layer(3, 4, 3, 5)
    hr, q, g = _jbu_inputs(layer, 1, 3, 8, 8, 5)
    for rt, sigma in [(12.0, 0.3), (-12.0, 2.0), (3.0, 0.25)]:
        with torch.no_grad():
            layer.range_temp.fill_(rt)
            layer.sigma_spatial.fill_(sigma)
        out = plugin_lib.jbu_conv(hr, q, g, **_params(layer))
        _check_fp32(out, _ref_jbu(layer, hr, q, g))


@pytest.mark.parametrize("B,C,K,H,W,radius", [(2, 4, 4, 9, 10, 3), (1, 3, 5, 4, 4, 3), (1, 2, 3, 5, 7, 1)])
def test_jbu_fp16(B, C, K, H, W, radius):
    layer = _jbu_layer(C, K, radius, seed=7 + H)
    hr, q, g = _jbu_inputs(layer, B, C, H, W, seed=11 + W)
    hr16, q16, g16 = (a.astype(np.float16) for a in (hr, q, g))
    out = plugin_lib.jbu_conv(hr16, q16, g16, **_params(layer))
    ref = _ref_jbu(layer, hr16.astype(np.float32), q16.astype(np.float32), g16.astype(np.float32))
    _check_fp16(out, ref)


def test_jbu_errors():
    layer = _jbu_layer(2, 3, 3, 0)
    hr, q, g = _jbu_inputs(layer, 1, 2, 5, 5, 0)
    p = _params(layer)
    with pytest.raises(ValueError, match="H and W must be > radius 3"):
        plugin_lib.jbu_conv(hr[:, :, :3], q[:, :, :3], g[:, :, :3], **p)
    with pytest.raises(ValueError, match="q must have the dtype of hr"):
        plugin_lib.jbu_conv(hr, q.astype(np.float16), g, **p)
    with pytest.raises(ValueError, match=r"guidance must be \(1, 3, 5, 5\)"):
        plugin_lib.jbu_conv(hr, q, g[:, :2], **p)
    with pytest.raises(ValueError, match="q must be"):
        plugin_lib.jbu_conv(hr, q[:, :, :4], g, **p)
    with pytest.raises(ValueError, match=r"w1 must have shape \(49, 52\)"):
        plugin_lib.jbu_conv(hr, q, g, **{**p, "w1": np.zeros((49, 49), np.float32)})
    with pytest.raises(ValueError, match=r"radius must be an int in \[1, 4\]"):
        plugin_lib.jbu_conv(hr, q, g, **{**p, "radius": 5})
    with pytest.raises(ValueError, match="hr must be float32 or float16"):
        plugin_lib.jbu_conv(hr.astype(np.float64), q, g, **p)


# ----------------------------------------------------------------------------------- host half
def test_half_conversions_match_numpy():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    h = bits.view(np.float16)
    f = plugin_lib.half_to_float(h)
    want = h.astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(f), nan) and np.array_equal(f[~nan].view(np.uint32), want[~nan].view(np.uint32))

    # every half, the midpoints between neighbours (ties), +-1 ulp of fp32 around them, overflow, tiny
    finite = want[np.isfinite(want)].astype(np.float64)
    finite = np.unique(finite)
    mids = ((finite[:-1] + finite[1:]) / 2).astype(np.float32)
    probes = np.concatenate([finite.astype(np.float32), mids, np.nextafter(mids, np.float32(np.inf)),
                             np.nextafter(mids, np.float32(-np.inf)),
                             np.array([65504, 65519.996, 65520, 1e6, np.inf, -np.inf, np.nan, 2.0**-25,
                                       2.0**-25 * 1.0000001, 2.0**-26, 1e-30, 0.0, -0.0], np.float32),
                             np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 100])
    got = plugin_lib.float_to_half(probes)
    with np.errstate(over="ignore"):
        ref = probes.astype(np.float16)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint16), ref[~nan].view(np.uint16))


def test_plugin_lib_is_torch_free():
    code = "import sys, hiwin_export.plugin_lib; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_tools_are_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("HIWIN_CACHE_DIR", str(tmp_path))  # empty cache: forces a build
    monkeypatch.setattr(plugin_lib.shutil, "which", lambda name: None)
    with pytest.raises(plugin_lib.PluginBuildError, match="cmake was not found"):
        plugin_lib.build_cpu_library()
    monkeypatch.setattr(plugin_lib.shutil, "which", lambda name: "/usr/bin/cmake" if name == "cmake" else None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(plugin_lib.PluginBuildError, match="no C\\+\\+ compiler"):
        plugin_lib.build_cpu_library()
