"""Image slicing lives in the torch-free :mod:`hiwin_runtime.slicing` (plan + apply, docs/model.md §1);
re-exported here, with :func:`normalize` returning a torch tensor."""

from __future__ import annotations

import torch
from PIL import Image

from hiwin_runtime import slicing as _slicing
from hiwin_runtime.slicing import (MIN_CROP_PATCHES, P_DEFAULT, S_DEFAULT, SlicedImage, SlicePlan, apply_plan,
                                   best_resize, choose_grid, ensure_divide, plan_slices, pre_resize, refine_size,
                                   separator_kinds, slice_image)

from .config import CLIP_MEAN, CLIP_STD

__all__ = ["MIN_CROP_PATCHES", "P_DEFAULT", "S_DEFAULT", "SlicedImage", "SlicePlan", "apply_plan", "best_resize",
           "choose_grid", "ensure_divide", "normalize", "plan_slices", "pre_resize", "refine_size",
           "separator_kinds", "slice_image"]


def normalize(image: Image.Image, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 tensor: x/255, then (x - mean) / std per channel."""
    return torch.from_numpy(_slicing.normalize(image, mean, std))
