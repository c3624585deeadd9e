"""The vision path of one training micro-batch, with the same FSDP2 unit calls on every rank.

Why (FSDP2, :mod:`.distributed`): a sharded unit all-gathers its parameters when its forward is
called, and in backward gathers them again and reduce-scatters its gradients once per call. The
collectives of all units go through one process group, so they pair up between ranks by their
order: every rank must issue **the same sequence of unit calls** in a step, or one rank's
all-gather of a CLIP block meets another rank's all-gather of the projector (a hang, or a silent
corruption when the sizes happen to match). The vision path is where this is not free: the CLIP
tower runs once per crop *shape* of an image (the overview, and 0-2 slice shapes), the JBU and
the projector once per crop, and these numbers differ from image to image, hence between ranks.

What :func:`encode_micro_batch` does about it, for the images of one micro-batch:

1. every CLIP call first (one per shape group, images in order, groups in first-appearance order),
   then the JBU and the projector crop by crop (same order). The calls on real crops are exactly
   the reference's (:meth:`~hiwin_model.model.HiwinVision.encode_prepared`: the ViT batched per
   shape group, JBU and projector one crop at a time), only grouped differently, so the tokens are
   bit for bit the reference's (tested), and the JBU's dropout masks are drawn in the same order;
2. with ``balance=True`` (FSDP2 over several ranks) the ranks agree on the largest number of CLIP
   calls and of crops (:func:`max_over_ranks`: one all-reduce of two integers per micro-batch), and
   a rank short of either pads the difference with calls on a dummy 2x2-patch crop (the smallest
   the JBU accepts) **after** its real calls of the same kind: CLIP on the dummy crop, then JBU +
   projector on a dummy feature map cut from its last CLIP output. The RNG state is restored around
   the padding, so the padding never changes the dropout masks of anything that follows;
3. the dummy outputs enter the loss through :class:`ZeroSink`: a node whose value is exactly 0
   (the loss keeps its bits) and whose backward hands exact zeros to every dummy output, so the
   padding calls take part in backward like real ones (same pre-backward all-gathers, same
   reduce-scatters) and add nothing to any gradient.

The invariant the FSDP2 units rely on (:func:`.distributed.shard_blocks`): **in every micro-batch,
every rank calls each unit the same number of times, in the same order, on inputs with the same
``requires_grad``, and every call's output reaches the loss.** On one device the autograd engine
runs backward nodes in decreasing creation order (always the latest-created ready node first), so
the backward hooks of the units then fire in the same order on every rank too. Per unit:

* CLIP encoder blocks: one call each per CLIP call: equal after step 2;
* projector: one call per crop: equal after step 2 (the dummy's input comes out of a CLIP call
  and the JBU, so it requires gradients exactly when a real crop's does);
* token embeddings: one call per micro-batch (the loss module embeds all token ids of the
  micro-batch at once, the layout's separators included);
* Llama layers, final norm + LM head: one call per micro-batch (one LLM forward);
* the JBU (1 M parameters at the released width) is not a unit of its own: it stays in the
  root unit, gathered once per step, so its call count does not matter.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from hiwin_runtime.crop_chain import shape_groups

DUMMY_PATCHES = 2  # side of the padding crop in patches: the JBU's 2x map must exceed its reflect padding (3)


def call_counts(crops_per_image: Sequence[Sequence]) -> tuple[int, int]:
    """(CLIP calls, crops) the images of a micro-batch need: one CLIP call per shape group of each image."""
    return (sum(len(shape_groups(c)) for c in crops_per_image), sum(len(c) for c in crops_per_image))


def max_over_ranks(counts: tuple[int, ...], device: torch.device) -> tuple[int, ...]:
    """Element-wise maximum of ``counts`` over the default process group (one all-reduce)."""
    t = torch.tensor(counts, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(int(v) for v in t.tolist())


class ZeroSink(torch.autograd.Function):
    """``ZeroSink.apply(*xs)`` -> a 0-d tensor equal to 0; backward gives every input an exact zero
    gradient (not ``x * 0``, which a non-finite ``x`` would turn into NaN), so whatever produced the
    inputs runs its backward."""

    @staticmethod
    def forward(ctx, *xs: Tensor) -> Tensor:
        ctx.meta = [(x.shape, x.dtype, x.device) for x in xs]
        return torch.zeros((), dtype=torch.float32, device=xs[0].device)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return tuple(torch.zeros(s, dtype=dt, device=dev) for s, dt, dev in ctx.meta)


def zero_term(outputs: list[Tensor]) -> Tensor | None:
    """A 0-d zero connected to every output that requires gradients (None if none does)."""
    live = [t for t in outputs if t.requires_grad]
    return ZeroSink.apply(*live) if live else None


def encode_micro_batch(model, crops_per_image: Sequence[Sequence], *, balance: bool = False,
                       pad_to: tuple[int, int] | None = None,
                       dtype: torch.dtype | None = None) -> tuple[list[Tensor], Tensor | None]:
    """Crops of each image of a micro-batch -> ((n_i + 1, Q, C) tokens per image in crop order, zero term).

    ``balance``: agree with the other ranks on the call counts (:func:`max_over_ranks`) and pad
    (module docstring). ``pad_to`` = (CLIP calls, crops) pads to given counts without
    communicating (what ``balance`` does once it knows the maxima; tests use it). ``dtype``: the
    pixels' dtype (default the model's; FSDP2 with bf16 compute passes bf16). The zero term is
    None without padding, else a 0-d zero to add to the loss."""
    if not crops_per_image or any(len(c) == 0 for c in crops_per_image):
        raise ValueError("every image of a micro-batch needs at least one crop (its overview)")
    chain = model.crop_chain(stages=model.stages(dtype=dtype))
    stages, ops = chain.stages, chain.ops
    groups = [(img, idx) for img, crops in enumerate(crops_per_image) for idx in shape_groups(crops).values()]
    need = call_counts(crops_per_image)
    if balance and pad_to is None:
        pad_to = max_over_ranks(need, model.device)
    extra_vit, extra_crops = (0, 0) if pad_to is None else (pad_to[0] - need[0], pad_to[1] - need[1])
    if extra_vit < 0 or extra_crops < 0:
        raise ValueError(f"cannot pad {need} (CLIP calls, crops) down to {pad_to}")

    # 1. Every CLIP call: one per shape group.
    pixels, feats = [], []
    for img, idx in groups:
        x = ops.stack([crops_per_image[img][i] for i in idx])
        pixels.append(x)
        feats.append(stages.vit(x))
    dummies: list[Tensor] = []
    side = DUMMY_PATCHES * model.config.vision.patch_size
    dummy_px = torch.zeros(1, 3, side, side, dtype=dtype or model.dtype, device=model.device)
    with _rng_kept(model.device, enabled=extra_vit > 0):
        for _ in range(extra_vit):
            dummies.append(stages.vit(dummy_px))
    # 2. JBU + projector, crop by crop, in group order (the reference's order of JBU dropout draws).
    tokens: list[list[Tensor | None]] = [[None] * len(c) for c in crops_per_image]
    for (img, idx), x, f1 in zip(groups, pixels, feats):
        bucket = chain.bucket(int(x.shape[-2]), int(x.shape[-1]))
        for j, i in enumerate(idx):
            f2, f4 = stages.jbu(f1[j:j + 1], x[j:j + 1])
            tokens[img][i] = stages.projector(bucket, f1[j:j + 1], f2, f4)[0]
    if extra_crops:
        last = dummies[-1] if dummies else feats[-1]
        f1 = last[:1, :, :1, :1].expand(-1, -1, DUMMY_PATCHES, DUMMY_PATCHES)
        bucket = chain.bucket(side, side)
        with _rng_kept(model.device):
            for _ in range(extra_crops):
                f2, f4 = stages.jbu(f1, dummy_px)
                dummies.append(stages.projector(bucket, f1, f2, f4))
    return [ops.stack(t) for t in tokens], zero_term(dummies) if dummies else None


class _rng_kept:
    """Restore the torch RNG state (CPU, and the model's CUDA device) on exit."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.device, self.enabled = device, enabled

    def __enter__(self):
        if self.enabled:
            self.cpu = torch.get_rng_state()
            self.cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    def __exit__(self, *exc):
        if self.enabled:
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
