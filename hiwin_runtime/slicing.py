"""LLaVA-UHD v2 image slicing (docs/model.md §1), as plan + apply; numpy and Pillow only.

:func:`plan_slices` is a pure function of the image size that returns plain data (overview size,
grid, refined size, slice boxes); :func:`apply_plan` performs the PIL resizes and crops. The
arithmetic reproduces ``llava/slice_process.py`` of the released code, truncations included.
All resizes use PIL ``BICUBIC`` (which antialiases when shrinking) for bit-exactness.
:func:`normalize` returns numpy; ``hiwin_model.slicing.normalize`` is the same as a torch tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .config import CLIP_MEAN, CLIP_STD
from .image import ImageError

S_DEFAULT = 336
P_DEFAULT = 14
# The JBU reflect-pads its 2x level by 3 pixels, so every crop needs >= 2 patches per side.
MIN_CROP_PATCHES = 2


def ensure_divide(length: float, p: int) -> int:
    return max(math.floor(length / p) * p, p)


def best_resize(size: tuple[float, float], s: int, p: int, allow_upscale: bool) -> tuple[int, int]:
    w, h = size
    if w * h > s * s or allow_upscale:
        r = w / h
        h = int(s / math.sqrt(r))
        w = int(h * r)  # uses the already truncated h, as the released code does
    return ensure_divide(w, p), ensure_divide(h, p)


def refine_size(size: tuple[int, int], grid: tuple[int, int], s: int, p: int) -> tuple[int, int]:
    gx, gy = grid
    rw, rh = ensure_divide(size[0], gx), ensure_divide(size[1], gy)
    bw, bh = best_resize((rw / gx, rh / gy), s, p, allow_upscale=True)
    return bw * gx, bh * gy


def choose_grid(size: tuple[int, int], s: int, max_slices: int) -> tuple[int, int] | None:
    """Slice grid (cols, rows), or ``None`` when the image is encoded as the overview alone."""
    w, h = size
    log_ratio = math.log(w / h)
    multiple = min(math.ceil(w * h / (s * s)), max_slices)
    if multiple <= 1:
        return None
    best, best_err = (1, 1), float("inf")
    for n in (multiple - 1, multiple, multiple + 1):
        if n == 1 or n > max_slices:
            continue
        for m in range(1, n + 1):
            if n % m == 0:
                err = abs(log_ratio - math.log(m / (n // m)))
                if err < best_err:  # strict: the first minimum wins
                    best, best_err = (m, n // m), err
    return best


@dataclass(frozen=True)
class SlicePlan:
    image_size: tuple[int, int]
    overview_size: tuple[int, int]
    grid: tuple[int, int] | None  # (cols, rows)
    refined_size: tuple[int, int] | None = None
    boxes: tuple[tuple[int, int, int, int], ...] = ()  # (left, top, right, bottom), row-major

    @property
    def num_slices(self) -> int:
        return len(self.boxes)

    @property
    def crop_sizes(self) -> list[tuple[int, int]]:
        """(width, height) of each crop in encoding order: slices row-major, then the overview."""
        return [(b[2] - b[0], b[3] - b[1]) for b in self.boxes] + [self.overview_size]

    def to_json(self) -> dict:
        return {"image_size": list(self.image_size), "overview_size": list(self.overview_size),
                "grid": list(self.grid) if self.grid else None,
                "refined_size": list(self.refined_size) if self.refined_size else None,
                "boxes": [list(b) for b in self.boxes]}


def plan_slices(size: tuple[int, int], max_slices: int = 9, *, scale_resolution: int = S_DEFAULT,
                patch_size: int = P_DEFAULT) -> SlicePlan:
    w, h = size
    if w < 1 or h < 1:
        raise ImageError(f"image has no pixels ({w}x{h})")
    if max_slices < 1:
        raise ValueError(f"max_slices must be >= 1, got {max_slices}")
    s, p = scale_resolution, patch_size
    grid = choose_grid(size, s, max_slices)
    if grid is None:
        plan = SlicePlan(tuple(size), best_resize(size, s, p, allow_upscale=True), None)
    else:
        overview = best_resize(size, s, p, allow_upscale=False)
        rw, rh = refine_size(size, grid, s, p)
        sx, sy = int(rw / grid[0]), int(rh / grid[1])
        boxes = tuple((c * sx, r * sy, (c + 1) * sx, (r + 1) * sy)
                      for r in range(grid[1]) for c in range(grid[0]))
        plan = SlicePlan(tuple(size), overview, grid, (rw, rh), boxes)
    _check_crops(plan, p)
    return plan


def _check_crops(plan: SlicePlan, p: int) -> None:
    for cw, ch in plan.crop_sizes:
        if min(cw, ch) < MIN_CROP_PATCHES * p:
            raise ImageError(
                f"image of {plan.image_size[0]}x{plan.image_size[1]} has an aspect ratio too extreme "
                f"for LLaVA-UHD v2: it yields a {cw}x{ch} px crop, and the JBU up-sampler needs at "
                f"least {MIN_CROP_PATCHES * p} px per side. Crop or pad the image first.")


@dataclass
class SlicedImage:
    overview: Image.Image
    slices: list[Image.Image] = field(default_factory=list)
    grid: tuple[int, int] | None = None
    plan: SlicePlan | None = None

    @property
    def crops(self) -> list[Image.Image]:
        """Encoding order of the released model: slices row-major, then the overview."""
        return [*self.slices, self.overview]


def apply_plan(image: Image.Image, plan: SlicePlan) -> SlicedImage:
    if image.size != plan.image_size:
        raise ValueError(f"plan is for {plan.image_size}, image is {image.size}")
    overview = image.resize(plan.overview_size, Image.Resampling.BICUBIC)
    slices: list[Image.Image] = []
    if plan.grid is not None:
        refined = image.resize(plan.refined_size, Image.Resampling.BICUBIC)
        slices = [refined.crop(b) for b in plan.boxes]
    return SlicedImage(overview, slices, plan.grid, plan)


def slice_image(image: Image.Image, max_slices: int = 9, *, scale_resolution: int = S_DEFAULT,
                patch_size: int = P_DEFAULT) -> SlicedImage:
    """Slice an RGB image the way the released model does (overview + row-major slices)."""
    plan = plan_slices(image.size, max_slices, scale_resolution=scale_resolution, patch_size=patch_size)
    return apply_plan(image, plan)


def pre_resize(image: Image.Image, long_side: int = 1024) -> Image.Image:
    """The authors' optional evaluation pre-resize: long side up to ``long_side``, upscale only."""
    w, h = image.size
    if w > h:
        nw, nh = long_side, int((long_side / w) * h)
    else:
        nh, nw = long_side, int((long_side / h) * w)
    if nw > w:
        return image.resize((nw, nh), Image.Resampling.BICUBIC)
    return image


def separator_kinds(grid: tuple[int, int] | None) -> list[str]:
    """Per-slice separators ("," inside a row, "\\n" at a row's end), row-major."""
    if grid is None:
        return []
    cols, rows = grid
    return ["," if c != cols - 1 else "\n" for _ in range(rows) for c in range(cols)]


def normalize(image: Image.Image, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """RGB PIL image -> (3, H, W) float32: x/255, then (x - mean) / std per channel."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32) * np.float32(1 / 255)
    a = (a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1))
