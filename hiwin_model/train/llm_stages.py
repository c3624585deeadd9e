"""Stages 1 and 2 of LLaVA-UHD v2 training (docs/model.md §7).

* Stage 1: only the Hiwin projector trains (the JBU stays frozen); the overview alone (no
  slices); ``plain`` template; LLaVA-Pretrain-style JSON; AdamW, cosine schedule with 3 % warmup;
  writes ``mm_projector.bin`` (official ``model.mm_projector.*`` keys).
* Stage 2: LLM + projector + CLIP + the JBU stack's ``fixup_proj`` train; slices (max 7);
  ``vicuna_v1`` template, loss on the assistant's answers only; writes a full HF directory.

Both resume from ``trainer_state.pt`` in the output directory (``--resume``). With
``deterministic=True`` (CPU, one process) a resumed run continues bit for bit as the uninterrupted
run would have; see :mod:`.common` for the exact guarantee.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import official_state_dict
from ..conversation import get_template
from ..model import HiwinForCausalLM, parse_dtype
from .common import (LoopConfig, build_sequence, conversation_turns, cosine_with_warmup, load_trainer_state,
                     pad_batch, read_json_list, run_loop, sample_stream, atomic_torch_save, setup_distributed,
                     trainer_state, wrap_ddp)

log = logging.getLogger("hiwin.train")


@dataclass
class StageArgs:
    stage: int
    model: str
    data: str
    image_folder: str
    output: str
    steps: int | None = None  # default: one epoch
    batch_size: int = 1
    lr: float | None = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_length: int = 4096
    max_slices: int = 7
    projector_weights: str | None = None
    dtype: str = "fp32"
    seed: int = 0
    resume: bool = False
    log_every: int = 10
    save_every: int = 0
    device: str | None = None
    deterministic: bool = False  # bitwise-reproducible loop on CPU (train.common.deterministic_mode)
    projector_impl: str = "faithful"  # "fast": same maths, fewer FLOPs (docs/model.md §4.9); same weights


def trainable_parameters(model: HiwinForCausalLM, stage: int) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze what the stage trains (the sin-cos table never trains)."""
    for p in model.parameters():
        p.requires_grad_(False)
    if stage == 1:
        modules: list[nn.Module] = [model.projector]
    elif stage == 2:
        modules = [model.llm, model.projector, model.vision_tower, model.jbu.fixup_proj]
    else:
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(True)
    model.projector.pos_embed.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


class _LossModule(nn.Module):
    """forward(samples) -> mean token loss; the unit DDP wraps."""

    def __init__(self, model: HiwinForCausalLM, stage: int, image_folder: Path, max_slices: int, max_length: int):
        super().__init__()
        self.model = model
        self.stage, self.folder = stage, image_folder
        self.max_slices = 1 if stage == 1 else max_slices  # stage 1: overview only
        self.max_length = max_length
        self.template = get_template("plain" if stage == 1 else "vicuna_v1")

    def sequence(self, sample: dict):
        m = self.model
        prepared = m.processor.prepare_image(self.folder / sample["image"], max_slices=self.max_slices)
        visual = m.layout(prepared, m.encode_prepared(prepared))
        turns = conversation_turns(sample)
        if self.stage == 1:
            turns = [("<image>", turns[0][1])]
        eos = m.processor.tokenizer.eos_token or "</s>"
        return build_sequence(m, self.template.segments(list(turns), eos), visual, self.max_length)

    def forward(self, samples: list[dict]) -> torch.Tensor:
        embeds, mask, labels = pad_batch([self.sequence(s) for s in samples])
        return self.model.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss


def train_stage(args: StageArgs) -> list[float]:
    d = setup_distributed(args.device)
    torch.manual_seed(args.seed + d.rank)
    out = Path(args.output)
    state_file = out / "trainer_state.pt"
    resuming = args.resume and state_file.is_file()
    src = out if (resuming and args.stage == 2) else Path(args.model)
    model = HiwinForCausalLM.from_pretrained(src, dtype=parse_dtype(args.dtype), device=d.device,
                                             projector_impl=args.projector_impl)
    if resuming and args.stage == 1:
        model.load_projector_weights(out / "mm_projector.bin")
    elif args.projector_weights:
        model.load_projector_weights(args.projector_weights)
    params = trainable_parameters(model, args.stage)
    model.train() if args.stage == 2 else model.eval()
    data = read_json_list(args.data)
    steps = args.steps or max(1, -(-len(data) // (args.batch_size * d.world)))
    lr = args.lr if args.lr is not None else (1e-3 if args.stage == 1 else 2e-5)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    sched = cosine_with_warmup(opt, steps, args.warmup_ratio)
    start = load_trainer_state(state_file, opt, sched) if resuming else 0
    if d.main:
        log.info("stage %d: %d samples, %d steps from %d, %.1fM trainable parameters", args.stage, len(data),
                 steps, start, sum(p.numel() for p in params) / 1e6)
    loss_module = wrap_ddp(_LossModule(model, args.stage, Path(args.image_folder), args.max_slices,
                                       args.max_length), d)
    batches = sample_stream(len(data), d, args.seed, start, args.batch_size)

    def step_fn(step: int) -> float:
        loss = loss_module([data[i] for i in next(batches)])
        loss.backward()
        return float(loss.detach())

    def save(step: int) -> None:
        if not d.main:
            return
        out.mkdir(parents=True, exist_ok=True)
        if args.stage == 1:
            sd = {k: v for k, v in official_state_dict(model).items() if k.startswith("model.mm_projector.")}
            atomic_torch_save(sd, out / "mm_projector.bin")
            atomic_torch_save(trainer_state(step, opt, sched), state_file)
        else:
            model.save_pretrained(out, overwrite=True, extra=lambda tmp: atomic_torch_save(
                trainer_state(step, opt, sched), tmp / "trainer_state.pt"))
        log.info("saved step %d to %s", step, out)

    return run_loop(step_fn, params, opt, sched, LoopConfig(steps, args.log_every, args.save_every,
                                                            deterministic=args.deterministic), start, save, d)
