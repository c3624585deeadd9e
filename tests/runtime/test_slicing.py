import math

import numpy as np
import pytest
from PIL import Image

from hiwin_model.image import ImageError
from hiwin_model.layout import num_image_tokens
from hiwin_model.slicing import (apply_plan, best_resize, choose_grid, normalize, plan_slices, pre_resize,
                                 separator_kinds, slice_image)

from conftest import random_image

# docs/model.md §1 worked examples: (size, max_slices, overview, grid, slice size, LLM tokens)
WORKED = [
    ((1024, 768), 7, (378, 280), (3, 2), (308, 350), 1033),
    ((1024, 1024), 7, (336, 336), (3, 2), (266, 406), None),
    ((1024, 1024), 9, (336, 336), (3, 3), (336, 336), 1477),
    ((500, 300), 7, (420, 252), (2, 1), (294, 364), 445),
    ((336, 336), 7, (336, 336), None, None, 144),
]


@pytest.mark.parametrize("size,max_slices,overview,grid,slice_size,tokens", WORKED)
def test_worked_examples(size, max_slices, overview, grid, slice_size, tokens):
    plan = plan_slices(size, max_slices)
    assert plan.overview_size == overview
    assert plan.grid == grid
    if grid:
        assert {(b[2] - b[0], b[3] - b[1]) for b in plan.boxes} == {slice_size}
        assert len(plan.boxes) == grid[0] * grid[1]
    if tokens is not None:
        assert num_image_tokens(plan.grid) == tokens


def test_square_tie_is_decided_by_float64_rounding():
    # |ln(3/2)| is one ulp below |ln(2/3)|: the released code picks [3, 2] for a square image.
    assert abs(math.log(3 / 2)) < abs(math.log(2 / 3))
    assert choose_grid((1024, 1024), 336, 7) == (3, 2)


def test_best_resize_uses_truncated_height():
    # w = int(h * r) with h already truncated: 672x448 -> h=int(336/sqrt(1.5))=274, w=int(274*1.5)=411
    assert best_resize((672, 448), 336, 14, allow_upscale=False) == (406, 266)


def test_slices_row_major_and_bit_exact_with_pil():
    img = random_image(1024, 768, seed=1)
    s = slice_image(img, max_slices=7)
    plan = s.plan
    refined = img.resize(plan.refined_size, Image.Resampling.BICUBIC)
    cols, rows = s.grid
    sw, sh = s.slices[0].size
    for r in range(rows):
        for c in range(cols):
            want = refined.crop((c * sw, r * sh, (c + 1) * sw, (r + 1) * sh))
            assert np.array_equal(np.asarray(s.slices[r * cols + c]), np.asarray(want))
    assert np.array_equal(np.asarray(s.overview), np.asarray(img.resize((378, 280), Image.Resampling.BICUBIC)))
    assert s.crops[-1] is s.overview


@pytest.mark.parametrize("w,h", [(1, 1), (14, 14), (100, 30), (30, 100), (4000, 1000), (1000, 4000),
                                 (2000, 1500), (999, 1001), (3000, 3000), (337, 336), (5000, 40)])
@pytest.mark.parametrize("max_slices", [1, 7, 9])
def test_plan_invariants(w, h, max_slices):
    try:
        plan = plan_slices((w, h), max_slices)
    except ImageError as e:
        assert "aspect ratio too extreme" in str(e)
        return
    for cw, ch in plan.crop_sizes:
        assert cw % 14 == 0 and ch % 14 == 0 and cw >= 28 and ch >= 28
    assert plan.num_slices <= max_slices
    if plan.grid:
        assert plan.num_slices == plan.grid[0] * plan.grid[1] >= 2
        assert plan.refined_size == (plan.boxes[-1][2], plan.boxes[-1][3])


def test_separators_row_major():
    assert separator_kinds((3, 2)) == [",", ",", "\n", ",", ",", "\n"]
    assert separator_kinds((1, 2)) == ["\n", "\n"]
    assert separator_kinds(None) == []


def test_normalize_matches_formula():
    img = random_image(28, 42, seed=2)
    t = normalize(img)
    a = np.asarray(img, np.float64) / 255.0
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    want = ((a - mean) / std).transpose(2, 0, 1)
    assert t.shape == (3, 42, 28)
    np.testing.assert_allclose(t.numpy(), want, rtol=0, atol=2e-6)


def test_pre_resize_is_upscale_only():
    small = random_image(500, 300)
    assert pre_resize(small, 1024).size == (1024, 614)
    big = random_image(2000, 1000)
    assert pre_resize(big, 1024) is big
    tall = random_image(300, 500)
    assert pre_resize(tall, 1024).size == (614, 1024)


def test_extreme_aspect_ratio_is_a_clear_error():
    with pytest.raises(ImageError, match="aspect ratio too extreme"):
        plan_slices((1, 5000))
    with pytest.raises(ImageError, match="aspect ratio too extreme"):
        plan_slices((5000, 1))


def test_apply_plan_rejects_other_size():
    plan = plan_slices((500, 300))
    with pytest.raises(ValueError, match="plan is for"):
        apply_plan(random_image(300, 500), plan)
