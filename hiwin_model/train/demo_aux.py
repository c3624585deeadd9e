"""Demo-only training aid: a per-window attribute loss on the visual tokens (docs/demo.md).

Trained from scratch on a few thousand images, the demo model's visual tokens barely depend on the
image (most of the 144 windows of a crop are background, and the projector's LayerNorms and
positional queries dominate the rest), so a from-scratch LLM learns only the per-question prior. This
module gives the vision path (CLIP tower, JBU ``fixup_proj``, Hiwin projector) a direct signal: a
linear head reads every visual token of every crop and predicts what lies under its window, from
the generated image's own pixels and its spec (:mod:`hiwin_model.demo_task`):

* the colour under the window (background or one of the four colours),
* the kind of object it belongs to (background, square, circle, triangle, text),
* the letter, for text windows (none or one of the 15 letters of the six words): local enough
  for a tiny tower to learn (the whole word, asked of every window, is not), and one letter of
  each word is unique to it;
* the place of its shape in the scene (none, leftmost, rightmost, another: the middle one or the
  only one), on the overview only: a slice does not show where the rest of the scene is.

It is used twice by ``hiwin train demo``: alone in a short vision warm-up on the overview
(:func:`train_vision_warmup`, before stage 2), then added to the stage-2 language loss. The head is
NOT part of the model: it is never saved with the weights (stage 2 keeps it in its resumable trainer
state only), and the shipped checkpoint has exactly the released structure and key layout.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger("hiwin.train")

HEAD_FILE = "aux_head.pt"  # the warm-up's head, beside (never inside) the model it writes
def _letters() -> tuple[str, ...]:
    from .. import demo_task as task

    return tuple(sorted(set("".join(task.WORDS))))


LETTERS = _letters()
N_COLOUR, N_KIND, N_LETTER, N_PLACE = 5, 5, 1 + len(LETTERS), 4  # each with class 0 = background / none
KINDS = ("background", "square", "circle", "triangle", "text")
PLACES = ("none", "leftmost", "rightmost", "other")  # of a scene's shape, left to right (demo_task draws them so)
IGNORE = -100  # a target the loss skips (the place, on slices)
_MAX_DIST2 = 70.0 ** 2  # a pixel within this RGB distance of a task colour has that colour
_MIN_FRACTION = 0.04  # a window is labelled with its most frequent colour when it covers >= 4 %


def pixel_colours(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB in 0..255 -> (H, W) int: 0 background, 1..4 the task colours in order."""
    from .. import demo_task as task

    ref = np.array(list(task.COLOURS.values()), dtype=np.float32)
    d = ((rgb.astype(np.float32)[:, :, None, :] - ref[None, None]) ** 2).sum(-1)
    return np.where(d.min(-1) < _MAX_DIST2, d.argmin(-1) + 1, 0)


def window_targets(rgb: np.ndarray, attrs: dict, grid: int | tuple[int, int] = 12, image_x=None) -> np.ndarray:
    """(rows*cols, 4) int64 targets (colour, kind, letter, place) of a crop's windows, row-major like the
    projector's uniform window partition; ``grid`` is ``rows`` = ``cols`` or ``(rows, cols)`` (e.g.
    the tower's patch grid). ``image_x`` (W,): the image x of each crop column (for the letters of a
    document; default: the crop is the image)."""
    from .. import demo_task as task

    cls = pixel_colours(rgb)
    H, W = cls.shape
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    ys = np.linspace(0, H, rows + 1).round().astype(int)
    xs = np.linspace(0, W, cols + 1).round().astype(int)
    windows = [(slice(ys[i], ys[i + 1]), slice(xs[j], xs[j + 1])) for i in range(rows) for j in range(cols)]
    onehot = np.eye(N_COLOUR, dtype=np.float32)[cls]
    frac = np.stack([onehot[w].mean((0, 1)) for w in windows])
    colour = np.where(frac[:, 1:].max(1) >= _MIN_FRACTION, frac[:, 1:].argmax(1) + 1, 0)
    names = list(task.COLOURS)
    letter, place = np.zeros_like(colour), np.zeros_like(colour)
    if attrs["kind"] == "scene":
        objs = attrs["objects"]
        kind_of = {names.index(c) + 1: task.SHAPES.index(s) + 1 for s, c in objs}
        kind = np.array([kind_of.get(int(c), 0) for c in colour])
        place_of = {names.index(c) + 1: (PLACES.index("leftmost") if i == 0 and len(objs) > 1 else
                                         PLACES.index("rightmost") if i == len(objs) - 1 and len(objs) > 1 else
                                         PLACES.index("other")) for i, (_, c) in enumerate(objs)}
        place = np.array([place_of.get(int(c), 0) for c in colour])
    else:
        kind = np.where(colour > 0, KINDS.index("text"), 0)
        word = attrs["word"]
        x = np.arange(W) + 0.5 if image_x is None else np.asarray(image_x)
        col_letter = np.searchsorted(np.asarray(attrs["letter_edges"], dtype=np.float64), x)  # (W,) index in word
        ink = cls == names.index(attrs["colour"]) + 1
        per_pixel = np.where(ink, col_letter[None, :] + 1, 0)
        for n, w in enumerate(windows):
            if colour[n]:
                counts = np.bincount(per_pixel[w].reshape(-1), minlength=len(word) + 1)[1:]
                if counts.any():
                    letter[n] = LETTERS.index(word[int(counts.argmax())]) + 1
    return np.stack([colour, kind, letter, place], axis=1).astype(np.int64)


def crop_image_x(plan, index: int) -> np.ndarray:
    """Image x of every column of crop ``index`` (slices row-major, then the overview) of a slice plan."""
    W = plan.image_size[0]
    if index < plan.num_slices:
        left, _, right, _ = plan.boxes[index]
        return (np.arange(left, right) + 0.5) * W / plan.refined_size[0]
    return (np.arange(plan.overview_size[0]) + 0.5) * W / plan.overview_size[0]


def crop_rgb(crop: np.ndarray, mean, std) -> np.ndarray:
    """A prepared (normalised, (3, H, W)) crop back to (H, W, 3) RGB in 0..255."""
    x = crop * np.asarray(std, dtype=np.float32)[:, None, None] + np.asarray(mean, dtype=np.float32)[:, None, None]
    return (x.transpose(1, 2, 0) * 255.0).clip(0, 255)


class WindowAttributeHead(nn.Module):
    """Linear head on visual tokens -> colour / kind / letter / place logits; ``loss`` is the sum of the
    four cross-entropies, each averaged over every window of every crop (the place over the overview's
    windows only), times ``weight``."""

    def __init__(self, dim: int, weight: float = 1.0):
        super().__init__()
        self.weight = weight
        self.linear = nn.Linear(dim, N_COLOUR + N_KIND + N_LETTER + N_PLACE)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.linear(tokens)

    def targets(self, prepared, attrs: dict, mean, std, grid: int) -> Tensor:
        per_crop = []
        for i, c in enumerate(prepared.crops):
            t = window_targets(crop_rgb(c, mean, std), attrs, grid, crop_image_x(prepared.plan, i))
            if i < prepared.plan.num_slices:  # a slice: where its shape stands in the scene is not in it
                t[:, 3] = IGNORE
            per_crop.append(t)
        return torch.from_numpy(np.concatenate(per_crop))

    def loss(self, sample: dict, prepared, crop_tokens: Tensor, slicing) -> Tensor:
        """``crop_tokens`` (n, Q, C): the projector's output for ``prepared``'s crops, in crop order."""
        if "attributes" not in sample:
            raise ValueError(f"sample {sample.get('id', '?')}: no 'attributes' (write the data with "
                             "hiwin_model.demo_task.write_split)")
        grid = int(round(crop_tokens.shape[1] ** 0.5))
        t = self.targets(prepared, sample["attributes"], slicing.mean, slicing.std, grid).to(crop_tokens.device)
        o = self(crop_tokens.reshape(-1, crop_tokens.shape[-1]).float())
        a, b, c = N_COLOUR, N_COLOUR + N_KIND, N_COLOUR + N_KIND + N_LETTER
        return self.weight * (F.cross_entropy(o[:, :a], t[:, 0]) + F.cross_entropy(o[:, a:b], t[:, 1])
                              + F.cross_entropy(o[:, b:c], t[:, 2])
                              + F.cross_entropy(o[:, c:], t[:, 3], ignore_index=IGNORE))


def vision_trainables(model) -> list[nn.Parameter]:
    """What the warm-up trains: the stage-2 vision set (CLIP tower, projector, JBU ``fixup_proj``)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for m in (model.vision_tower, model.projector, model.jbu.fixup_proj):
        for p in m.parameters():
            p.requires_grad_(True)
    model.projector.pos_embed.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def backward_rank_mean(loss: Tensor, d) -> float:
    """``loss.backward()``, then the loss averaged over the ranks (what the loop logs)."""
    loss.backward()
    value = loss.detach().double()
    if d.world > 1:
        import torch.distributed as dist

        dist.all_reduce(value)
        value /= d.world
    return float(value)


class _WarmupLoss(nn.Module):
    def __init__(self, model, head: WindowAttributeHead, folder: Path, max_slices: int):
        super().__init__()
        self.model, self.head, self.folder, self.max_slices = model, head, folder, max_slices

    def forward(self, samples: list[dict]) -> Tensor:
        m = self.model
        losses = []
        for s in samples:
            prepared = m.processor.prepare_image(self.folder / s["image"], max_slices=self.max_slices)
            losses.append(self.head.loss(s, prepared, m.encode_prepared(prepared), m.processor.slicing))
        return torch.stack(losses).mean()


def train_vision_warmup(model_dir: str | Path, data: str | Path, image_folder: str | Path, output: str | Path, *,
                        steps: int, batch_size: int, lr: float, warmup_ratio: float = 0.05, seed: int = 0,
                        max_slices: int = 1, projector_weights: str | None = None, log_every: int = 10,
                        device: str | None = None, projector_impl: str = "fast",
                        tower_lr: float | None = None) -> Path:
    """The vision path alone on the attribute loss (overview only by default); writes a full model
    directory to ``output`` and the head's weights beside it (:data:`HEAD_FILE`, not a model file).
    ``tower_lr``: the CLIP tower's own lr (default ``lr``). Data-parallel under torchrun, like the stages."""
    from ..model import HiwinForCausalLM
    from .common import (LoopConfig, atomic_torch_save, cosine_with_warmup, global_batches, micro_batch_seed, micro_batches,
                         read_json_list, run_loop, setup_distributed, wrap_ddp)
    from .llm_stages import param_groups

    d = setup_distributed(device)
    torch.manual_seed(seed)
    samples = read_json_list(data)
    model = HiwinForCausalLM.from_pretrained(model_dir, device=d.device, projector_impl=projector_impl)
    if projector_weights:
        model.load_projector_weights(projector_weights)
    params = vision_trainables(model)
    head = WindowAttributeHead(model.config.projector.dim).to(d.device)
    params += list(head.parameters())
    model.train()
    loss_module = wrap_ddp(_WarmupLoss(model, head, Path(image_folder), max_slices), d)
    opt = torch.optim.AdamW(param_groups(params, {model.vision_tower: tower_lr}), lr=lr, weight_decay=0.0)
    sched = cosine_with_warmup(opt, steps, warmup_ratio)
    batches = global_batches(len(samples), seed, 0, d.world * batch_size)
    if d.main:
        log.info("vision warm-up: %d steps x %d images, attribute loss, max %d slice(s)", steps,
                 d.world * batch_size, max_slices)

    def step_fn(step: int) -> float:
        (idx,) = micro_batches(next(batches), d, 1, batch_size)
        torch.manual_seed(micro_batch_seed(seed, step, d.rank))
        loss = loss_module([samples[i] for i in idx])
        return backward_rank_mean(loss, d)

    out = Path(output)

    def save(step: int) -> None:
        if d.main and step == steps:
            model.save_pretrained(out, overwrite=True, extra=lambda tmp: atomic_torch_save(
                {k: v.detach().cpu() for k, v in head.state_dict().items()}, tmp / HEAD_FILE))

    run_loop(step_fn, params, opt, sched, LoopConfig(steps, log_every), 0, save, d)
    return out


# ------------------------------------------------------------------------------ tower pre-training
TOWER_SPLIT_SEED = 2  # fresh images for the tower stage: not the train split (0), never the held-out one (1)


def init_clip_tower(tower) -> None:
    """CLIP's own initialisation of a from-scratch tower (PyTorch's defaults put the position
    embeddings at std 1, 50x CLIP's 0.02, where they drown the patch content): embeddings at std
    ``initializer_range`` (class embedding at width^-0.5), attention and MLP projections scaled by width
    and depth, biases zero."""
    C = tower.cfg.hidden_size
    layers = tower.vision_model.encoder.layers
    depth = (2 * len(layers)) ** -0.5
    e = tower.vision_model.embeddings
    with torch.no_grad():
        nn.init.normal_(e.class_embedding, std=C ** -0.5)
        nn.init.normal_(e.patch_embedding.weight, std=0.02)
        nn.init.normal_(e.position_embedding.weight, std=0.02)
        for layer in layers:
            a = layer.self_attn
            for proj, std in ((a.q_proj, C ** -0.5 * depth), (a.k_proj, C ** -0.5 * depth),
                              (a.v_proj, C ** -0.5 * depth), (a.out_proj, C ** -0.5),
                              (layer.mlp.fc1, (2 * C) ** -0.5), (layer.mlp.fc2, C ** -0.5 * depth)):
                nn.init.normal_(proj.weight, std=std)
                nn.init.zeros_(proj.bias)


def tower_crops(item, processor, max_slices: int) -> list[tuple[Tensor, Tensor]]:
    """Every crop of a generated item with its per-patch targets at the tower's patch grid:
    [(pixels (3, H, W), targets (H/p * W/p, 3))]."""
    from .. import demo_task as task

    prepared = processor.prepare_image(item.image(), max_slices=max_slices)
    attrs, s, p = task.attributes(item), processor.slicing, processor.slicing.patch_size
    return [(torch.from_numpy(np.ascontiguousarray(c)),
             torch.from_numpy(window_targets(crop_rgb(c, s.mean, s.std), attrs, (c.shape[1] // p, c.shape[2] // p),
                                             crop_image_x(prepared.plan, i))))
            for i, c in enumerate(prepared.crops)]


def patch_losses(logits: Tensor, t: Tensor) -> Tensor:
    """Colour on every patch; object kind on coloured patches; letter on lettered patches (the
    rare classes are not drowned by the background)."""
    a, b, c = N_COLOUR, N_COLOUR + N_KIND, N_COLOUR + N_KIND + N_LETTER
    loss = F.cross_entropy(logits[:, :a], t[:, 0])
    obj, let = t[:, 0] > 0, t[:, 2] > 0
    if obj.any():
        loss = loss + F.cross_entropy(logits[obj, a:b], t[obj, 1])
    if let.any():
        loss = loss + F.cross_entropy(logits[let, b:c], t[let, 2])
    return loss


class _TowerLoss(nn.Module):
    def __init__(self, tower, head: nn.Linear):
        super().__init__()
        self.tower, self.head = tower, head

    def forward(self, crops: list[tuple[Tensor, Tensor]]) -> Tensor:
        groups: dict[tuple, list] = {}
        for x, t in crops:
            groups.setdefault(tuple(x.shape), []).append((x, t))
        total = 0.0
        for g in groups.values():  # one tower call per crop shape
            f = self.tower(torch.stack([x for x, _ in g]))  # (n, C, h, w)
            logits = self.head(f.flatten(2).transpose(1, 2).reshape(-1, f.shape[1]))
            total = total + patch_losses(logits, torch.cat([t for _, t in g])) * len(g) / len(crops)
        return total


def train_tower(model_dir: str | Path, output: str | Path, *, steps: int, batch_size: int, lr: float,
                warmup_ratio: float = 0.02, seed: int = 0, max_slices: int = 7, log_every: int = 10,
                device: str | None = None) -> Path:
    """Demo-only: the CLIP tower alone (CLIP-initialised) on per-patch targets (colour, object kind,
    letter) of freshly generated images (split seed :data:`TOWER_SPLIT_SEED`, no image seen twice),
    ``batch_size`` crops per process per step; writes the whole model with the trained tower to
    ``output``. The linear head is dropped. Data-parallel under torchrun; a stopped run restarts the
    stage (it is a few minutes)."""
    from .. import demo_task as task
    from ..model import HiwinForCausalLM
    from .common import LoopConfig, cosine_with_warmup, run_loop, setup_distributed, wrap_ddp

    d = setup_distributed(device)
    torch.manual_seed(seed)
    model = HiwinForCausalLM.from_pretrained(model_dir, device=d.device)
    tower = model.vision_tower
    init_clip_tower(tower)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in tower.parameters():
        p.requires_grad_(True)
    head = nn.Linear(tower.cfg.hidden_size, N_COLOUR + N_KIND + N_LETTER).to(d.device)
    params = list(tower.parameters()) + list(head.parameters())
    tower.train()
    loss_module = wrap_ddp(_TowerLoss(tower, head), d)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = cosine_with_warmup(opt, steps, warmup_ratio)
    pool: list = []
    nxt = [d.rank]  # this rank's items: rank, rank + world, ...
    if d.main:
        log.info("tower pre-training: %d steps x %d crops, fresh images (split seed %d), per-patch targets",
                 steps, d.world * batch_size, TOWER_SPLIT_SEED)

    def step_fn(step: int) -> float:
        crops = []
        while len(crops) < batch_size:
            if not pool:
                pool.extend(tower_crops(task.make_item(nxt[0], TOWER_SPLIT_SEED), model.processor, max_slices))
                nxt[0] += d.world
            crops.append(pool.pop(0))
        loss = loss_module([(x.to(d.device), t.to(d.device)) for x, t in crops])
        return backward_rank_mean(loss, d)

    out = Path(output)

    def save(step: int) -> None:
        if d.main and step == steps:
            model.save_pretrained(out, overwrite=True)

    run_loop(step_fn, params, opt, sched, LoopConfig(steps, log_every), 0, save, d)
    return out
