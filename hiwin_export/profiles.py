"""TensorRT optimisation profiles that cover every crop the slicer can produce.

**Every crop is one function of one ratio.** Each crop of :func:`hiwin_runtime.slicing.plan_slices`
(the overview as well as every slice, for any ``max_slices``) is ``best_resize`` applied to a positive
ratio ``r`` (the image's ``w / h`` for the overview, ``(rw / gx) / (rh / gy)`` for a slice; whenever
the code resizes, the branch taken is the one that rescales to the area ``s x s``)::

    h1 = floor(s / sqrt(r));   w1 = floor(h1 * r);   crop = (ensure_divide(w1, p), ensure_divide(h1, p))

and a plan is refused (``ImageError``) when a side is below ``2p`` px (:data:`MIN_CROP_PATCHES`).
``max_slices`` only decides how many crops an image gets, never which shapes exist.

**The set is finite.** ``h1 = k`` exactly when ``s^2 / (k+1)^2 < r <= s^2 / k^2``, and then
``w1 = j`` ranges over ``floor(k s^2 / (k+1)^2) .. floor(s^2 / k)``. Both sides must be at least
``2p``, so ``k <= s^2 / (2p)`` (4032 px at s = 336, p = 14): sides are at most ``s^2 / (2p)`` px,
i.e. ``s^2 / (2p^2)`` patches (288), and a crop has at most ``(s / p)^2`` patches (576).
:func:`grid_candidates` walks every ``(k, j)`` in exact rational arithmetic, widening each range by
one step wherever a bound is an integer (where float rounding in the slicer could land on either
side), so it is a proven superset; :func:`reachable_grids` then finds, for each patch grid, an image
size that really produces it (the simplest fraction inside the ratio interval, checked by running
``plan_slices``). Every candidate has such a witness, so the enumeration is exact, not just a bound;
the tests also compare it with brute-force sweeps over image sizes.

**The exported range covers them all.** At ratios beyond about 1:116 the slicer makes crops of
2 x 257..288 patches; the graphs are exported (and checked) for 2..288 patches per side, so every
reachable grid is in range. :func:`profile_plan` reports grids outside a given ``patch_range`` as
``outside`` (no profile covers them, and ``ExportDir.check_feeds`` refuses them).

**Profiles.** The reachable grids lie along the hyperbola ``h * w ~ (s/p)^2``. Sorted by aspect
ratio, they are cut into a few contiguous groups (dynamic programming, minimising the total number of
``(h, w)`` pairs the profile boxes admit), and each group's bounding box is one profile: narrow
``[min, max]`` ranges, ``opt`` at the group's middle grid. :func:`choose_profile` picks, for a crop,
the smallest box that contains it (ties: the first), so the choice is deterministic even where boxes
overlap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache

from hiwin_runtime.slicing import MIN_CROP_PATCHES, P_DEFAULT, S_DEFAULT, ensure_divide, plan_slices
from hiwin_runtime.trt import choose_profile as _choose

__all__ = ["GridProfile", "BatchRange", "ProfilePlan", "grid_candidates", "reachable_grids", "plan_grid_profiles",
           "profile_plan", "choose_profile", "input_shapes", "DEFAULT_NUM_PROFILES"]

DEFAULT_NUM_PROFILES = 9


# ------------------------------------------------------------------------------------ enumeration
def _ratio_ranges(s: int, p: int):
    """Every (k, j) = (h1, w1) in px the resize can produce (exact rationals, widened at integral
    bounds), with its ratio interval ``(lo, hi)`` (``lo >= hi``: reachable only through rounding)."""
    ss = s * s
    lo_side = MIN_CROP_PATCHES * p
    for k in range(lo_side, ss // lo_side + 1):
        lo = Fraction(k * ss, (k + 1) ** 2)  # k * r over r in (s^2/(k+1)^2, s^2/k^2]
        j_lo = math.floor(lo) - (1 if lo.denominator == 1 else 0)
        j_hi = ss // k
        for j in range(max(j_lo, lo_side), j_hi + 1):
            r_lo = max(Fraction(ss, (k + 1) ** 2), Fraction(j, k))
            r_hi = min(Fraction(ss, k * k), Fraction(j + 1, k))
            yield k, j, r_lo, r_hi


def grid_candidates(scale_resolution: int = S_DEFAULT, patch_size: int = P_DEFAULT) -> set[tuple[int, int]]:
    """Proven superset of the (h, w) patch grids of every crop the slicer can produce."""
    p = patch_size
    return {(k // p, j // p) for k, j, _, _ in _ratio_ranges(scale_resolution, p)}


def _simplest_between(lo: Fraction, hi: Fraction) -> Fraction:
    """The fraction with the smallest denominator strictly inside (lo, hi), 0 <= lo < hi
    (continued fractions)."""
    fl = math.floor(lo)
    if fl + 1 < hi:
        return Fraction(fl + 1)
    if lo == fl:  # (fl, hi) with hi <= fl + 1: fl + 1/x with x > 1/(hi - fl)
        return fl + 1 / Fraction(math.floor(1 / (hi - fl)) + 1)
    return fl + 1 / _simplest_between(1 / (hi - fl), 1 / (lo - fl))


@lru_cache(maxsize=8)
def reachable_grids(scale_resolution: int = S_DEFAULT,
                    patch_size: int = P_DEFAULT) -> dict[tuple[int, int], tuple[int, int]]:
    """Every (h, w) patch grid the slicer produces, each with an image size (width, height) that
    yields it as its overview crop (checked with ``plan_slices``; ``max_slices=1``).

    Raises ``AssertionError`` if a candidate of :func:`grid_candidates` has no witness (the set
    would then only be an upper bound)."""
    s, p = scale_resolution, patch_size
    found: dict[tuple[int, int], tuple[int, int]] = {}
    pending: set[tuple[int, int]] = set()
    for k, j, r_lo, r_hi in _ratio_ranges(s, p):
        grid = (k // p, j // p)
        if grid in found:
            continue
        if r_lo < r_hi:
            r = _simplest_between(r_lo, r_hi)
        elif r_lo == r_hi:
            r = r_lo
        else:
            pending.add(grid)
            continue
        size = (r.numerator, r.denominator)
        plan = plan_slices(size, 1, scale_resolution=s, patch_size=p)
        want = (ensure_divide(j, p), ensure_divide(k, p))
        if plan.overview_size == want:
            found[grid] = size
            pending.discard(grid)
        else:
            pending.add(grid)
    pending -= set(found)
    assert not pending, f"grid candidates without a witness image: {sorted(pending)[:10]}"
    return dict(sorted(found.items()))


# ------------------------------------------------------------------------------------ profiles
@dataclass(frozen=True)
class GridProfile:
    """One optimisation profile in patches: inclusive ``(min, opt, max)`` per side."""

    name: str
    h: tuple[int, int, int]
    w: tuple[int, int, int]

    def contains(self, h: int, w: int) -> bool:
        return self.h[0] <= h <= self.h[2] and self.w[0] <= w <= self.w[2]

    @property
    def area(self) -> int:
        """(h, w) pairs the box admits."""
        return (self.h[2] - self.h[0] + 1) * (self.w[2] - self.w[0] + 1)

    def to_json(self) -> dict:
        return {"name": self.name, "h": list(self.h), "w": list(self.w)}

    @classmethod
    def from_json(cls, d: dict) -> "GridProfile":
        return cls(d["name"], tuple(d["h"]), tuple(d["w"]))


@dataclass(frozen=True)
class BatchRange:
    min: int = 1
    opt: int = 1
    max: int = 1

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"batch range must satisfy 1 <= min <= opt <= max, got {self}")

    def to_json(self) -> list[int]:
        return [self.min, self.opt, self.max]


def plan_grid_profiles(grids, num_profiles: int = DEFAULT_NUM_PROFILES, prefix: str = "p") -> list[GridProfile]:
    """Cut ``grids`` (sorted by aspect ratio w/h) into at most ``num_profiles`` contiguous groups
    minimising the summed box areas (exact dynamic programming; fewest groups on ties), one
    bounding-box profile per group, ordered from the tallest to the widest crops; ``opt`` is the
    group's middle grid."""
    import numpy as np

    pts = sorted({tuple(g) for g in grids}, key=lambda g: (g[1] / g[0], g[0]))
    n = len(pts)
    if n == 0:
        return []
    k = max(1, min(num_profiles, n))
    H = np.array([g[0] for g in pts], np.int64)
    W = np.array([g[1] for g in pts], np.int64)
    big = np.int64(1) << 40
    cost = np.full((n, n), big, np.int64)  # cost[i, j]: box area of pts[i..j], j >= i
    for i in range(n):
        hh, ww = H[i:], W[i:]
        cost[i, i:] = ((np.maximum.accumulate(hh) - np.minimum.accumulate(hh) + 1)
                       * (np.maximum.accumulate(ww) - np.minimum.accumulate(ww) + 1))
    lower = np.tril_indices(n, -1)
    best = [cost[0].copy()]  # best[L][j]: pts[0..j] in exactly L + 1 groups (>= big: impossible)
    starts = [np.zeros(n, np.int64)]  # where the last group starts
    for _ in range(1, k):
        prev = np.concatenate([[big], best[-1][:-1]])  # prev[i]: pts[0..i-1] done
        tot = prev[:, None] + cost
        tot[lower] = 2 * big
        arg = np.argmin(tot, axis=0)  # first minimum: deterministic
        best.append(tot[arg, np.arange(n)])
        starts.append(arg)
    level = int(np.argmin([b[-1] for b in best]))  # first minimum: the fewest groups
    groups = []
    j = n - 1
    while j >= 0:
        i = int(starts[level][j]) if level > 0 else 0
        groups.append(pts[i:j + 1])
        j, level = i - 1, level - 1
    groups.reverse()
    out = []
    for idx, g in enumerate(groups):
        hs, ws = [x[0] for x in g], [x[1] for x in g]
        opt = g[len(g) // 2]
        out.append(GridProfile(f"{prefix}{idx}", (min(hs), opt[0], max(hs)), (min(ws), opt[1], max(ws))))
    return out


@dataclass
class ProfilePlan:
    """Profiles for one engine set: the grids they cover, those left outside and why."""

    profiles: list[GridProfile]
    covered: list[tuple[int, int]]
    outside: list[tuple[int, int]] = field(default_factory=list)  # reachable, beyond the exported range
    extra: list[tuple[int, int]] = field(default_factory=list)  # e.g. the bundles' grids
    source: dict = field(default_factory=dict)

    def choose(self, h: int, w: int) -> int | None:
        return choose_profile(self.profiles, h, w)

    def to_json(self) -> dict:
        return {"profiles": [p.to_json() for p in self.profiles], "covered_grids": len(self.covered),
                "outside_exported_range": [list(g) for g in self.outside], "extra_grids": [list(g) for g in self.extra],
                "source": self.source}


def profile_plan(*, scale_resolution: int = S_DEFAULT, patch_size: int = P_DEFAULT, patch_range=(2, 288),
                 extra=(), grids=None, num_profiles: int = DEFAULT_NUM_PROFILES, prefix: str = "p") -> ProfilePlan:
    """Profiles covering every reachable grid within ``patch_range`` (inclusive, per side) plus
    ``extra`` grids (e.g. the Polygraphy bundles' shapes, so they can be verified on the engines).
    ``grids`` restricts the reachable set first (e.g. to one projector bucket's crops)."""
    lo, hi = patch_range
    reach = set(reachable_grids(scale_resolution, patch_size))
    if grids is not None:
        reach &= set(grids)
    inside = {g for g in reach if lo <= g[0] <= hi and lo <= g[1] <= hi}
    outside = sorted(reach - inside)
    extra = sorted({tuple(g) for g in extra if lo <= g[0] <= hi and lo <= g[1] <= hi} - inside)
    profiles = plan_grid_profiles(inside | set(extra), num_profiles, prefix)
    return ProfilePlan(profiles, sorted(inside), outside, extra,
                       {"scale_resolution": scale_resolution, "patch_size": patch_size, "patch_range": [lo, hi],
                        "method": "exact enumeration of best_resize over all ratios (hiwin_export.profiles)"})


def choose_profile(profiles, h: int, w: int) -> int | None:
    """Index of the profile serving an (h, w)-patch crop: the smallest box containing it (ties: the
    first), None when none does. The runtime applies the same function to ``engines.json``."""
    return _choose([p.to_json() if isinstance(p, GridProfile) else p for p in profiles], h, w)


# ------------------------------------------------------------------------------------ TensorRT shapes
def _dim(sym: str, grid: dict[str, int], batch: int) -> int:
    if sym == "batch":
        return batch
    mult = int(sym[:-1]) if sym[:-1] else 1
    return mult * grid[sym[-1]]


def input_shapes(graph_entry: dict, profile: GridProfile,
                 batch: BatchRange) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """min / opt / max shape of every input of a vision graph (its manifest entry) for one profile:
    static sizes from the manifest, dynamic ones from their symbols (``batch``, ``h``, ``2h``,
    ``14w`` ...)."""
    out = {}
    for spec in graph_entry["inputs"]:
        axes = {int(a): s for a, s in spec["dynamic_axes"].items()}
        shapes = []
        for which, b in ((0, batch.min), (1, batch.opt), (2, batch.max)):
            grid = {"h": profile.h[which], "w": profile.w[which]}
            shapes.append([_dim(axes[i], grid, b) if i in axes else int(d) for i, d in enumerate(spec["shape"])])
        out[spec["name"]] = tuple(shapes)
    return out
