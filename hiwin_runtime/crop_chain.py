"""The crop chain: an image's prepared crops -> laid-out visual tokens, written once.

    crops (slices row-major, then the overview)
      -> grouped by shape -> ViT (batched per group, ``vision_batch`` at a time)
      -> JBU 2x/4x and the crop's projector bucket (``upsample_batch`` crops at a time)
      -> tokens put back in crop order -> token layout (one gather, :mod:`.layout`)

Every consumer plugs in its three stage runners (:class:`Stages`): the PyTorch reference
(``hiwin_model``), ONNX Runtime (:mod:`.pipeline`), parity and bundles (recording wrappers),
the benchmarks (timing wrappers) and, later, TensorRT engines and calibration readers. The chain
is array-agnostic: :class:`ArrayOps` supplies ``stack``/``concat``/``take`` (numpy here, torch in
``hiwin_model``), so autograd and devices pass through untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .arrays import NUMPY_OPS, Array, ArrayOps
from .buckets import sampling_grid
from .layout import layout_tokens


@dataclass(frozen=True)
class Stages:
    """The three stage runners of the vision path.

    * ``vit(pixels (B, 3, 14h, 14w)) -> features (B, Cv, h, w)``
    * ``jbu(features, pixels) -> (feat2x (B, Cv, 2h, 2w), feat4x (B, Cv, 4h, 4w))``
    * ``projector(bucket (oh, ow), feat1x, feat2x, feat4x) -> tokens (B, Q, C)``
    """

    vit: Callable[[Array], Array]
    jbu: Callable[[Array, Array], tuple[Array, Array]]
    projector: Callable[[tuple[int, int], Array, Array, Array], Array]


# Input and output names of each stage: the exported graphs' I/O contract.
STAGE_IO = {
    "vit": (("pixel_values",), ("features",)),
    "jbu": (("features", "pixel_values"), ("feat2x", "feat4x")),
    "hiwin": (("feat1x", "feat2x", "feat4x"), ("tokens",)),
}


def stage_args(family: str, args: tuple) -> tuple[tuple[int, int] | None, tuple]:
    """(bucket, data inputs) of a stage call: the projector takes its bucket first."""
    return (args[0], args[1:]) if family == "hiwin" else (None, args)


def wrap_stages(stages: Stages, around: Callable[[str, Callable], Callable]) -> Stages:
    """``around(family, fn) -> fn'`` applied to each stage (timers, FLOP counters, recorders)."""
    return Stages(around("vit", stages.vit), around("jbu", stages.jbu), around("hiwin", stages.projector))


@dataclass
class StageCall:
    family: str  # vit, jbu or hiwin
    bucket: tuple[int, int] | None  # the projector's (oh, ow)
    inputs: dict[str, Array]  # by graph input name
    outputs: dict[str, Array]  # by graph output name


class Recorder:
    """Keeps every stage call of a chain with named inputs and outputs: parity compares each graph
    on exactly what the reference fed its stage; bundles and calibration readers save them."""

    def __init__(self):
        self.calls: list[StageCall] = []

    def wrap(self, stages: Stages) -> Stages:
        def around(family: str, fn: Callable) -> Callable:
            def call(*args):
                bucket, data = stage_args(family, args)
                out = fn(*args)
                names_in, names_out = STAGE_IO[family]
                outs = out if isinstance(out, tuple) else (out,)
                self.calls.append(StageCall(family, bucket, dict(zip(names_in, data)), dict(zip(names_out, outs))))
                return out
            return call
        return wrap_stages(stages, around)


@dataclass(frozen=True)
class BatchPolicy:
    """How many crops run together. ``vision_batch``: ViT batch within a shape group (None: the
    whole group). ``upsample_batch``: JBU + projector batch (None: the ViT batch). The default,
    one crop at a time after the ViT, is the reference's: the 2x/4x activations dominate memory at
    real dimensions (a whole-group batch was OOM-killed at 24 GiB)."""

    vision_batch: int | None = None
    upsample_batch: int | None = 1

    def __post_init__(self):
        for name in ("vision_batch", "upsample_batch"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {v!r}")


def shape_groups(crops: Sequence[Array]) -> dict[tuple[int, int], list[int]]:
    """Crop indices grouped by (H, W), in first-appearance order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, c in enumerate(crops):
        groups.setdefault(tuple(int(s) for s in c.shape[-2:]), []).append(i)
    return groups


def _chunks(n: int, size: int | None):
    step = n if size is None else size
    for i in range(0, n, step):
        yield slice(i, min(i + step, n))


class CropChain:
    def __init__(self, stages: Stages, *, patch_size: int, ops: ArrayOps = NUMPY_OPS,
                 policy: BatchPolicy = BatchPolicy(),
                 bucket_for: Callable[[int, int], tuple[int, int]] | None = None):
        self.stages, self.patch_size, self.ops, self.policy = stages, patch_size, ops, policy
        # (w, h) patches -> (oh, ow); default: the reference rule (a runtime passes the manifest's)
        self.bucket_for = bucket_for or sampling_grid

    def bucket(self, height_px: int, width_px: int) -> tuple[int, int]:
        p = self.patch_size
        return self.bucket_for(width_px // p, height_px // p)

    def encode_group(self, pixels: Array) -> Array:
        """(B, 3, H, W) crops of one shape -> (B, Q, C) tokens."""
        bucket = self.bucket(int(pixels.shape[-2]), int(pixels.shape[-1]))
        out = []
        for v in _chunks(int(pixels.shape[0]), self.policy.vision_batch):
            x = pixels[v]
            f1 = self.stages.vit(x)
            for u in _chunks(int(x.shape[0]), self.policy.upsample_batch):
                f2, f4 = self.stages.jbu(f1[u], x[u])
                out.append(self.stages.projector(bucket, f1[u], f2, f4))
        return out[0] if len(out) == 1 else self.ops.concat(out)

    def encode_crops(self, crops: Sequence[Array]) -> Array:
        """Crops of any shapes -> (N, Q, C) tokens in crop order (one ViT batch per shape)."""
        tokens: list[Array | None] = [None] * len(crops)
        for idx in shape_groups(crops).values():
            group = self.encode_group(self.ops.stack([crops[i] for i in idx]))
            for j, i in enumerate(idx):
                tokens[i] = group[j]
        return self.ops.stack(tokens)

    def encode(self, crops: Sequence[Array], grid: tuple[int, int] | None, newline: Array, comma: Array) -> Array:
        """An image's crops -> (T, C) visual tokens in the released layout."""
        return layout_tokens(self.encode_crops(crops), grid, newline, comma, self.ops)
