"""``hiwin train demo``: the recipe that trains the embedded demo model (docs/demo.md).

The three stages of docs/model.md §7 in order, on the generated task of :mod:`hiwin_model.demo_task`,
from a random initialisation of the demo configuration, each stage in its own sub-directory of
``OUT`` and skipped when already complete (so an interrupted run is resumed by running the same
command again; stage 2 also saves every ``save_every`` steps and resumes from its last save):

1. ``OUT/data``: the train split (seed 0): PNGs, ``pretrain.json`` (captions), ``sft.json``
   (every question of an image as one multi-turn conversation).
2. ``OUT/init``: the untrained demo model (seeded), official layout.
   ``OUT/tower`` (demo-only; ``tower_steps``, 0 turns it off): the CLIP tower alone,
   CLIP-initialised, on per-patch targets (colour, object kind, letter) of freshly generated images
   (:func:`.demo_aux.train_tower`); the stages below start from it, and train the tower at
   ``later_tower_lr`` only, so that they keep what it learnt.
3. ``OUT/stage0``: JBU pre-training (CLIP frozen: at this point a random CLIP, so this stage only
   gives the JBU a start; the up-sampler keeps training nowhere else, as in the release), then the
   JBU is loaded into the model, written to ``OUT/stage0/model``.
4. ``OUT/stage1``: the projector alone, overview only, ``plain`` template, on captions.
5. ``OUT/vision`` (demo-only): CLIP + projector + the JBU's ``fixup_proj`` on the per-window
   attribute loss of :mod:`.demo_aux` alone, overview only (a vision warm-up that makes the visual
   tokens depend on the image; the loss's linear head is kept beside the model, never in it).
6. ``OUT/stage2``: LLM + projector + CLIP + the JBU's ``fixup_proj`` on the questions, with slices
   (max 7), ``vicuna_v1`` template, plus the attribute loss (``aux_weight``): where the task is learnt.

The learning rates are those of a from-scratch model (1e-3), not the released fine-tuning ones.
Stage 2 trains with ``projector_impl="fast"`` (the same function, fewer FLOPs; the saved weights
are the same parameters). Seeds are fixed (``seed``); the data are pure functions of their seeds.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("hiwin.train")


@dataclass
class DemoRecipe:
    n_train: int = 4000
    seed: int = 0
    stage0_steps: int = 15
    stage0_batch: int = 2
    stage0_res: int = 168
    stage1_steps: int = 60
    stage1_batch: int = 4
    stage1_lr: float = 1e-3
    # demo-only tower pre-training (per-patch targets, fresh images), train/demo_aux.py: what lifts the
    # shapes and the words (docs/demo.md "How it got there"); 0: off
    tower_steps: int = 4800
    tower_batch: int = 8  # crops per process per step
    tower_lr: float = 1e-3
    # the tower's lr in the vision warm-up and stage 2 (None: theirs, 3e-3 / 1e-3; at 3e-3 / 2e-3 they undid
    # the tower stage)
    later_tower_lr: float | None = 1e-4
    vision_steps: int = 300  # demo-only vision warm-up (attribute loss, overview only), train/demo_aux.py
    vision_batch: int = 4
    vision_lr: float = 3e-3
    aux_weight: float = 1.0  # the attribute loss added to stage 2's language loss (0: none)
    stage2_steps: int = 2000
    stage2_batch: int = 2
    stage2_lr: float = 1e-3
    stage2_warmup: float = 0.05
    weight_decay: float = 0.0
    max_slices: int = 7
    save_every: int = 50
    log_every: int = 10


def _done(d: Path) -> bool:
    return (d / "DONE").is_file()


def _mark(d: Path, info: dict) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "DONE").write_text(json.dumps(info, indent=1) + "\n")


def _barrier(d) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def train_demo(out: str | Path, recipe: DemoRecipe = DemoRecipe(), device: str | None = None) -> Path:
    """Run (or resume) the whole recipe; returns the stage-2 model directory."""

    from .. import demo_task as task
    from ..model import HiwinForCausalLM
    from .llm_stages import StageArgs, train_stage
    from .stage0 import CKPT_NAME, Stage0Args, train_stage0

    from .common import setup_distributed
    import torch

    from ..config import HiwinConfig
    from .demo_aux import HEAD_FILE, WindowAttributeHead, train_tower, train_vision_warmup

    d = setup_distributed(device)  # under torchrun: every stage runs data-parallel
    out = Path(out)
    r = recipe
    times: dict[str, float] = {}
    prev = out / "recipe.json"
    if prev.is_file() and json.loads(prev.read_text()) != asdict(r):
        raise ValueError(f"{out}: holds a run of another recipe ({prev}); use a new directory")
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        prev.write_text(json.dumps(asdict(r), indent=1) + "\n")

    data = out / "data"
    if d.main and not _done(data):
        t = time.perf_counter()
        log.info("demo: writing %d training images (seed %d) to %s", r.n_train, task.TRAIN_SEED, data)
        task.write_split(data, r.n_train, task.TRAIN_SEED)
        _mark(data, {"n": r.n_train, "seed": task.TRAIN_SEED})
        times["data"] = time.perf_counter() - t

    init = out / "init"
    if d.main and not _done(init):
        task.build_demo_model(r.seed).save_pretrained(init, overwrite=True)
        _mark(init, {"seed": r.seed})
    _barrier(d)

    base = init
    if r.tower_steps:
        base = out / "tower"
        if not _done(base):
            t = time.perf_counter()
            train_tower(init, base, steps=r.tower_steps, batch_size=r.tower_batch, lr=r.tower_lr, seed=r.seed,
                        max_slices=r.max_slices, log_every=r.log_every, device=device)
            _barrier(d)
            if d.main:
                _mark(base, {"steps": r.tower_steps})
            _barrier(d)
            times["tower"] = time.perf_counter() - t

    s0 = out / "stage0"
    if not _done(s0):
        t = time.perf_counter()
        train_stage0(Stage0Args(model=str(base), images=str(data / "images"), output=str(s0), steps=r.stage0_steps,
                                batch_size=r.stage0_batch, res=r.stage0_res, seed=r.seed, resume=True,
                                log_every=r.log_every, device=device))
        if d.main:
            model = HiwinForCausalLM.from_pretrained(base)
            model.load_jbu_checkpoint(s0 / CKPT_NAME)
            model.save_pretrained(s0 / "model", overwrite=True)
            _mark(s0, {"steps": r.stage0_steps})
        _barrier(d)
        times["stage0"] = time.perf_counter() - t

    s1 = out / "stage1"
    if not _done(s1):
        t = time.perf_counter()
        train_stage(StageArgs(stage=1, model=str(s0 / "model"), data=str(data / "pretrain.json"),
                              image_folder=str(data / "images"), output=str(s1), steps=r.stage1_steps,
                              batch_size=r.stage1_batch, lr=r.stage1_lr, seed=r.seed, resume=True,
                              log_every=r.log_every, device=device, projector_impl="fast"))
        _barrier(d)
        if d.main:
            _mark(s1, {"steps": r.stage1_steps})
        _barrier(d)
        times["stage1"] = time.perf_counter() - t

    vis = out / "vision"
    if r.vision_steps and not _done(vis):
        t = time.perf_counter()
        train_vision_warmup(s0 / "model", data / "sft.json", data / "images", vis, steps=r.vision_steps,
                            batch_size=r.vision_batch, lr=r.vision_lr, seed=r.seed,
                            projector_weights=str(s1 / "mm_projector.bin"), log_every=r.log_every, device=device,
                            tower_lr=r.later_tower_lr)
        _barrier(d)
        if d.main:
            _mark(vis, {"steps": r.vision_steps})
        _barrier(d)
        times["vision"] = time.perf_counter() - t

    s2 = out / "stage2"
    if not _done(s2):
        t = time.perf_counter()
        src = dict(model=str(vis)) if r.vision_steps else dict(model=str(s0 / "model"),
                                                               projector_weights=str(s1 / "mm_projector.bin"))
        aux = None
        if r.aux_weight:
            torch.manual_seed(r.seed)
            aux = WindowAttributeHead(HiwinConfig.from_pretrained(src["model"]).projector.dim, r.aux_weight)
            if (vis / HEAD_FILE).is_file() and r.vision_steps:  # continue with the warm-up's head
                aux.load_state_dict(torch.load(vis / HEAD_FILE, map_location="cpu", weights_only=True))
        train_stage(StageArgs(stage=2, **src, data=str(data / "sft.json"),
                              image_folder=str(data / "images"), output=str(s2), steps=r.stage2_steps,
                              batch_size=r.stage2_batch, lr=r.stage2_lr, warmup_ratio=r.stage2_warmup,
                              weight_decay=r.weight_decay, max_slices=r.max_slices, seed=r.seed, resume=True,
                              log_every=r.log_every, save_every=r.save_every, device=device,
                              projector_impl="fast", aux=aux, vision_tower_lr=r.later_tower_lr))
        _barrier(d)
        if d.main:
            _mark(s2, {"steps": r.stage2_steps})
        times["stage2"] = time.perf_counter() - t
    if times and d.main:
        log.info("demo: stage wall times this run (s): %s", {k: round(v, 1) for k, v in times.items()})
        tf = out / "times.json"
        old = json.loads(tf.read_text()) if tf.is_file() else []
        tf.write_text(json.dumps(old + [{**times, "world_size": d.world}], indent=1) + "\n")
    final = out / "final"
    if d.main and not (final / "card.json").is_file():
        finalize(out, r)
    _barrier(d)
    return final


MODEL_FILES = ("config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json", "tokenizer.json",
               "tokenizer_config.json")


def finalize(out: Path, r: DemoRecipe, *, heldout: int | None = None) -> Path:
    """``OUT/final``: the stage-2 weights (no optimizer state) + ``card.json`` / ``CARD.md`` with
    the recipe, seeds, data hashes, wall times and the held-out accuracy on PyTorch."""
    import shutil

    from hiwin_runtime.pipeline import Pipeline

    from .. import demo_task as task

    src, final = out / "stage2", out / "final"
    tmp = out / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f in MODEL_FILES:
        shutil.copy2(src / f, tmp / f)
    log.info("demo: scoring the trained model on the held-out set (PyTorch) ...")
    questions = task.heldout_questions(heldout)
    row = task.score(Pipeline.from_pretrained(tmp), questions, label="torch fp32")
    tf = out / "times.json"
    card = {
        "model": "hiwin demo (tiny LLaVA-UHD v2 structure, official key layout)",
        "recipe": asdict(r), "command": "hiwin train demo --output OUT (stages 0 -> 1 -> 2, docs/demo.md)",
        "train_split": {"seed": task.TRAIN_SEED, "images": r.n_train, "sha256": task.split_hash(r.n_train, task.TRAIN_SEED)},
        "heldout": {"seed": task.HELDOUT_SEED, "questions": len(questions),
                    "questions_sha256": task.questions_sha256(questions)},
        "accuracy_torch_fp32": row["accuracy"], "accuracy_by_kind": {k: v["accuracy"] for k, v in row["by_kind"].items()},
        "wall_times_s": json.loads(tf.read_text()) if tf.is_file() else [],
        "sha256": {f: _sha256(tmp / f) for f in MODEL_FILES},
    }
    (tmp / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    (tmp / "CARD.md").write_text(card_markdown(card))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    log.info("demo: %s (held-out accuracy %.1f%% on PyTorch)", final, 100 * row["accuracy"])
    return final


def _sha256(p: Path) -> str:
    import hashlib

    return hashlib.sha256(p.read_bytes()).hexdigest()


def card_markdown(card: dict) -> str:
    r = card["recipe"]
    kinds = ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(card["accuracy_by_kind"].items()))
    tower = (f"tower pre-training {r['tower_steps']} steps x {r['tower_batch']} crops per process (lr {r['tower_lr']}), "
             if r.get("tower_steps") else "")
    later = f"; the tower at lr {r['later_tower_lr']} here and in the warm-up" if r.get("later_tower_lr") is not None else ""
    return f"""# hiwin demo model

A tiny model with the LLaVA-UHD v2 structure (slicing, CLIP-style tower, JBU 2x/4x, Hiwin projector,
Llama; official checkpoint key names), trained from scratch by this repository on the generated task
of `hiwin_model/demo_task.py` (docs/demo.md). It is a demonstration that the training stages, the
reference and the deployed graphs agree on a task, not a general model: it only knows the task's
sixteen answers.

- Recipe: `{card["command"]}`; seed {r["seed"]}; {tower}stage 0 {r["stage0_steps"]} steps, stage 1
  {r["stage1_steps"]} steps, vision warm-up {r["vision_steps"]} steps, stage 2 {r["stage2_steps"]} steps x batch
  {r["stage2_batch"]} per process (lr {r["stage2_lr"]}, cosine, warmup {r["stage2_warmup"]}{later}), max
  {r["max_slices"]} slices.
- Train split: seed {card["train_split"]["seed"]}, {card["train_split"]["images"]} images, sha256
  `{card["train_split"]["sha256"]}`.
- Held-out split: seed {card["heldout"]["seed"]}, {card["heldout"]["questions"]} questions, sha256
  `{card["heldout"]["questions_sha256"]}`.
- Held-out exact-answer accuracy, PyTorch fp32: **{100 * card["accuracy_torch_fp32"]:.1f}%** ({kinds}).
- Wall times (s, per run of the command): {card["wall_times_s"]}.

`card.json` holds the same facts and the sha256 of every file.
"""
