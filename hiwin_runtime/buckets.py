"""The projector's RoI sampling grid ("bucket") of a crop, as code and as data (docs/model.md §4).

The released projector RoI-aligns every feature level over a 12x12 window partition, sampling each
window on an (oh, ow) grid chosen from the crop's aspect ratio: the candidate (w, h) minimising
``|ln(W/H) - ln(w/h)|`` with strict ``<`` (the first minimum wins), in the released order. In the
exported graphs the grid is an attribute of ONNX ``RoiAlign``, so there is one projector graph per
grid; every consumer must choose it exactly as the reference does. :func:`bucket_rule` is the same
rule as plain data for ``manifest.json``, so a C++ or TensorRT consumer implements it from the
manifest alone; :func:`apply_bucket_rule` is the interpreter of that data (tested equal).
"""

from __future__ import annotations

import math

# (w, h) sampling-grid candidates of the released code, in its order.
GRID_CANDIDATES = ((4, 2), (3, 2), (4, 3), (3, 3), (2, 4), (2, 3), (3, 4))
# The projector buckets as (oh, ow), one exported graph each.
HIWIN_BUCKETS = tuple((h, w) for w, h in GRID_CANDIDATES)
RULE_KIND = "argmin_abs_log_aspect"


def sampling_grid(width: int, height: int) -> tuple[int, int]:
    """(oh, ow) RoI-align output size for a feature map of this aspect ratio (strict argmin)."""
    log_r = math.log(width / height)
    best, best_err = (3, 3), float("inf")
    for w, h in GRID_CANDIDATES:
        err = abs(log_r - math.log(w / h))
        if err < best_err:
            best, best_err = (h, w), err
    return best


def bucket_rule() -> dict:
    """The rule as data (written to ``manifest.json["buckets"]["rule"]``)."""
    return {
        "kind": RULE_KIND,
        "input": "the crop's feature map (W, H) = (width, height) in patches",
        "candidates_wh": [list(c) for c in GRID_CANDIDATES],
        "error": "abs(log(W / H) - log(w / h)) in float64",
        "select": "strict argmin in candidate order (the first minimum wins)",
        "output": "(oh, ow) = (h, w) of the selected candidate",
    }


def apply_bucket_rule(rule: dict, width: int, height: int) -> tuple[int, int]:
    """Evaluate a manifest's rule; refuses a rule kind this runtime does not know."""
    if rule.get("kind") != RULE_KIND:
        raise ValueError(f"unknown bucket rule {rule.get('kind')!r} (this runtime knows {RULE_KIND!r})")
    log_r = math.log(width / height)
    best, best_err = None, float("inf")
    for w, h in rule["candidates_wh"]:
        err = abs(log_r - math.log(w / h))
        if err < best_err:
            best, best_err = (int(h), int(w)), err
    if best is None:
        raise ValueError("bucket rule has no candidates")
    return best
