"""Stages 1 and 2 of LLaVA-UHD v2 training (docs/model.md §7).

* Stage 1: only the Hiwin projector trains (the JBU stays frozen); the overview alone (no
  slices); ``plain`` template; LLaVA-Pretrain-style JSON; AdamW, cosine schedule with 3 % warmup;
  writes ``mm_projector.bin`` (official ``model.mm_projector.*`` keys).
* Stage 2: LLM + projector + CLIP + the JBU stack's ``fixup_proj`` train; slices (max 7);
  ``vicuna_v1`` template, loss on the assistant's answers only; writes a full HF directory.

Strategies (docs/training.md): ``ddp`` (replicas; resumes from ``trainer_state.pt`` in the output
directory) and ``fsdp`` (FSDP2 sharding, :mod:`.distributed`; resumes from sharded checkpoints in
``<output>.checkpoints``); stage 2 can train LoRA adapters instead (:mod:`.lora`). Every strategy
reads the same global batches (``global_batches`` / ``micro_batches``: the data position is the
step) and seeds dropout per global micro-batch, so W ranks x A micro-batches compute what one
process with W x A accumulated micro-batches computes. With ``deterministic=True`` (CPU) a resumed
run continues bit for bit as the uninterrupted run would have (one process), and FSDP matches one
process up to the order of floating-point additions; see :mod:`.common` and docs/training.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import official_state_dict, to_official
from ..conversation import get_template
from ..layout import layout_image_tokens
from ..model import HiwinForCausalLM, parse_dtype
from .common import (Dist, LoopConfig, assemble_sequence, atomic_torch_save, conversation_turns, cosine_with_warmup,
                     embed_pieces, finish_distributed, global_batches, load_trainer_state, micro_batch_seed,
                     micro_batches, pad_batch, read_json_list, run_loop, sequence_pieces, setup_distributed,
                     trainer_state, wrap_ddp)
from .lora import LoraSpec

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
    projector_lr: float | None = None  # default: lr
    vision_tower_lr: float | None = None  # stage 2: the CLIP tower's own lr (LLaVA-NeXT's mm_vision_tower_lr); default: lr
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
    strategy: str = "auto"  # ddp | fsdp | auto (train.distributed.choose_strategy)
    grad_accum: int = 1  # micro-batches per optimizer step (global batch = world x accum x batch_size)
    activation_checkpointing: bool | None = None  # default: on with fsdp, off otherwise
    checkpoint_dir: str | None = None  # sharded checkpoints (fsdp, LoRA); default <output>.checkpoints
    keep_checkpoints: int = 2
    lora: LoraSpec | None = None  # stage 2 only: adapters instead of a full fine-tune
    loss_log: str | None = None  # JSON lines {step, loss, lr} written by rank 0
    tf32: bool = True  # on CUDA, as the released recipe
    projector_impl: str = "faithful"  # "fast": same maths, fewer FLOPs (docs/model.md §4.9); same weights
    # Stage 2, replicated strategy only: an auxiliary loss on the visual tokens (the demo recipe's
    # training aid, :class:`~.demo_aux.WindowAttributeHead`): ``aux.loss(sample, prepared, crop_tokens,
    # slicing)`` is added to the language loss, its parameters train with the stage and live in
    # ``trainer_state.pt`` only: never in the saved model.
    aux: nn.Module | None = None


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


def param_groups(params: list[nn.Parameter], own_lr: dict[nn.Module, float | None]) -> list[dict]:
    """AdamW groups: the parameters of each module with its own lr (``None``: the default lr) in a
    group of their own, the rest in the first group; empty groups are dropped."""
    groups, taken = [], set()
    for module, lr in own_lr.items():
        if lr is None:
            continue
        mine = {id(p) for p in module.parameters()} - taken
        groups.append({"params": [p for p in params if id(p) in mine], "lr": lr})
        taken |= mine
    rest = {"params": [p for p in params if id(p) not in taken]}
    return [g for g in [rest, *groups] if g["params"]]


class _LossModule(nn.Module):
    """forward(samples) -> mean token loss of one micro-batch; the unit DDP wraps and the FSDP2 root.

    The order of module calls is fixed (:mod:`.vision_batch` says why it matters to FSDP2): one call
    of the token embedding for every token id of the micro-batch (text and the layout's separators),
    then the vision path of all its images (:func:`.vision_batch.encode_micro_batch`), then the
    LLM. ``balance`` (set for FSDP2 on several ranks) pads the vision calls to the ranks' maximum."""

    balance: bool = False
    compute_dtype: torch.dtype | None = None  # FSDP2: the gathered parameters' dtype (default: the model's)

    def __init__(self, model: HiwinForCausalLM, stage: int, image_folder: Path, max_slices: int, max_length: int,
                 aux: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.aux = aux
        self.stage, self.folder = stage, image_folder
        self.max_slices = 1 if stage == 1 else max_slices  # stage 1: overview only
        self.max_length = max_length
        self.template = get_template("plain" if stage == 1 else "vicuna_v1")

    def pieces(self, sample: dict):
        turns = conversation_turns(sample)
        if self.stage == 1:
            turns = [("<image>", turns[0][1])]
        eos = self.model.processor.tokenizer.eos_token or "</s>"
        return sequence_pieces(self.model.processor, self.template.segments(list(turns), eos))

    autocast: torch.dtype | None = None  # LoRA on a bf16 base: fp32 trainables, bf16 compute

    def forward(self, samples: list[dict]) -> torch.Tensor:
        if self.autocast is not None:
            with torch.autocast(device_type=self.model.device.type, dtype=self.autocast):
                return self._loss(samples)
        return self._loss(samples)

    def _loss(self, samples: list[dict]) -> torch.Tensor:
        from .vision_batch import encode_micro_batch

        m = self.model
        prepared = [m.processor.prepare_image(self.folder / s["image"], max_slices=self.max_slices) for s in samples]
        pieces = [self.pieces(s) for s in samples]
        ids = m.processor.ids
        token_lists = [t for p in pieces for t, _ in p if t is not None]
        embedded = embed_pieces(m, token_lists + [[ids.newline, ids.comma]])
        nl, comma = embedded.pop()
        dtype = self.compute_dtype or m.dtype
        crops, zero = encode_micro_batch(m, [p.crops for p in prepared], dtype=dtype,
                                         balance=self.balance and dist.is_initialized() and dist.get_world_size() > 1)
        seqs = []
        for prep, piece, tokens in zip(prepared, pieces, crops):
            visual = layout_image_tokens(tokens, prep.grid, nl, comma)
            n = sum(t is not None for t, _ in piece)
            seqs.append(assemble_sequence(piece, embedded[:n], visual, self.max_length, dtype))
            del embedded[:n]
        embeds, mask, labels = pad_batch(seqs)
        loss = self.model.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False).loss
        if self.aux is not None:  # the demo's per-window attribute loss (demo_aux), on the same crop tokens
            loss = loss + torch.stack([self.aux.loss(s, prep, tokens, m.processor.slicing)
                                       for s, prep, tokens in zip(samples, prepared, crops)]).mean()
        return loss if zero is None else loss + zero.to(loss.dtype)


def _load_fsdp(args: StageArgs, d: Dist, compute_dtype: torch.dtype):
    """FSDP2: every rank builds the model on the meta device and shards it; rank 0 alone reads the
    checkpoint (full, fp32, on the CPU) and the shards are broadcast from it tensor by tensor."""
    from ..config import HiwinConfig
    from ..model import _load_tokenizer
    from ..processor import HiwinProcessor
    from .distributed import apply_fsdp, broadcast_into_sharded

    src = Path(args.model)
    full = None
    if d.main:
        base = HiwinForCausalLM.from_pretrained(src, dtype=torch.float32, device="cpu", load_tokenizer=False)
        if args.projector_weights:
            base.load_projector_weights(args.projector_weights)
        full = base.state_dict()
        del base
    config = HiwinConfig.from_pretrained(src)
    with torch.device("meta"):
        model = HiwinForCausalLM(config, dtype=torch.float32, projector_impl=args.projector_impl)
    model.processor = HiwinProcessor(_load_tokenizer(src), config.slicing)
    trainable_parameters(model, args.stage)  # requires_grad set before sharding: FSDP keeps it
    root = _LossModule(model, args.stage, Path(args.image_folder), args.max_slices, args.max_length)
    ac = True if args.activation_checkpointing is None else args.activation_checkpointing
    apply_fsdp(root, model, compute_dtype=compute_dtype, activation_checkpointing=ac)
    root.balance = True  # equal FSDP unit calls on every rank (vision_batch)
    root.compute_dtype = compute_dtype
    root.to_empty(device=d.device)
    broadcast_into_sharded(model, full)
    del full
    with torch.no_grad():  # the frozen 0-d JBU scalars stay outside FSDP: give them the compute dtype
        for p in model.parameters():
            if p.dim() == 0:
                p.data = p.data.to(compute_dtype)
    params = trainable_parameters(model, args.stage)
    return model, root, params


def _load_replicated(args: StageArgs, d: Dist, dtype: torch.dtype):
    model = HiwinForCausalLM.from_pretrained(args.model, dtype=dtype, device=d.device,
                                             projector_impl=args.projector_impl)
    if args.projector_weights:
        model.load_projector_weights(args.projector_weights)
    if args.lora is not None:
        from .lora import add_lora, lora_trainable

        add_lora(model, args.lora)
        model.to(d.device)
        params = lora_trainable(model)
        if dtype != torch.float32:  # the frozen base stays in bf16; what trains keeps fp32 weights
            with torch.no_grad():
                for p in params:
                    p.data = p.data.float()
    else:
        params = trainable_parameters(model, args.stage)
    if args.activation_checkpointing:
        from torch.distributed._composable import checkpoint

        from .distributed import checkpoint_blocks

        for b in checkpoint_blocks(model):
            checkpoint(b)
    root = _LossModule(model, args.stage, Path(args.image_folder), args.max_slices, args.max_length, args.aux)
    if args.aux is not None:
        args.aux.to(d.device)
        params = params + list(args.aux.parameters())
    if args.lora is not None and dtype != torch.float32:
        root.autocast = dtype
    return model, root, params


def train_stage(args: StageArgs) -> list[float]:
    import torch.distributed as dist

    from .distributed import choose_strategy

    if args.grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {args.grad_accum}")
    if args.lora is not None and args.stage != 2:
        raise ValueError("LoRA applies to stage 2 (stage 1 trains the projector only)")
    d = setup_distributed(args.device)
    if d.device.type == "cuda" and args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed + d.rank)
    data = read_json_list(args.data)
    dtype = parse_dtype(args.dtype)
    if args.lora is not None and args.strategy == "auto":
        strategy = "ddp"  # adapters are small: replicas (one GPU, or DDP over several)
    else:
        strategy = choose_strategy(args.strategy, d, *_param_counts(args))
    if strategy == "fsdp" and args.lora is not None:
        raise ValueError("LoRA runs with --strategy ddp (one GPU or replicated adapters), not fsdp")
    if args.aux is not None and (args.stage != 2 or strategy == "fsdp" or args.lora is not None):
        raise ValueError("an auxiliary loss is supported in stage 2 with the replicated strategy, without LoRA")
    own_group = strategy == "fsdp" and not dist.is_initialized()
    if own_group:  # FSDP on one process without torchrun: a 1-rank group of its own
        dist.init_process_group("nccl" if d.device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    try:
        losses = _train(args, d, data, dtype, strategy)
        finish_distributed(d)
        return losses
    finally:
        if own_group:
            dist.destroy_process_group()


def _train(args: StageArgs, d: Dist, data: list[dict], dtype: torch.dtype, strategy: str) -> list[float]:
    from .distributed import ShardedCheckpoint, gather_full_state

    out = Path(args.output)
    sharded = strategy == "fsdp" or args.lora is not None
    ckpt = ShardedCheckpoint(args.checkpoint_dir or f"{out}.checkpoints", d, args.keep_checkpoints) if sharded else None
    state_file = out / "trainer_state.pt"

    if strategy == "fsdp":
        model, root, params = _load_fsdp(args, d, dtype)
        loss_module = root
    else:
        resuming_old = not sharded and args.resume and state_file.is_file()
        if resuming_old:  # the replicated path restarts from its own last save
            args_src = StageArgs(**{**args.__dict__, "model": str(out) if args.stage == 2 else args.model,
                                    "projector_weights": str(out / "mm_projector.bin") if args.stage == 1
                                    else None})
        else:
            args_src = args
        model, root, params = _load_replicated(args_src, d, dtype)
        loss_module = wrap_ddp(root, d)
    model.train() if args.stage == 2 else model.eval()
    global_batch = d.world * args.grad_accum * args.batch_size
    steps = args.steps or max(1, -(-len(data) // global_batch))
    lr = args.lr if args.lr is not None else (1e-3 if args.stage == 1 else 2e-5)
    # LLaVA's LoRA recipe: 2e-4 for the adapters, 2e-5 for the projector; LLaVA-NeXT: a lower lr for the tower
    opt = torch.optim.AdamW(param_groups(params, {model.projector: args.projector_lr,
                                                  model.vision_tower: args.vision_tower_lr}),
                            lr=lr, weight_decay=args.weight_decay)
    sched = cosine_with_warmup(opt, steps, args.warmup_ratio)
    start = 0
    if args.resume and sharded:
        latest = ckpt.latest()
        if latest is not None:
            start = ckpt.load(latest, loss_module, opt, sched)
            if d.main:
                log.info("resumed from %s", latest)
    elif args.resume and state_file.is_file():
        start = load_trainer_state(state_file, opt, sched)
        if args.aux is not None:
            args.aux.load_state_dict(torch.load(state_file, map_location=d.device, weights_only=True)["aux"])
    if d.main:
        log.info("stage %d (%s%s, %d rank(s), accum %d): %d samples, %d steps from %d, %.1fM trainable parameters",
                 args.stage, strategy, " + LoRA" if args.lora else "", d.world, args.grad_accum, len(data), steps,
                 start, sum(p.numel() for p in params) / 1e6)  # DTensor.numel() is the global size
    batches = global_batches(len(data), args.seed, start, global_batch)

    def step_fn(step: int) -> float:
        total = torch.zeros((), dtype=torch.float64)
        for k, idx in enumerate(micro_batches(next(batches), d, args.grad_accum, args.batch_size)):
            # Dropout masks (the JBU fixup's, LoRA's) are a function of the data position, not of
            # the rank or of how the global batch is split: seeded per global micro-batch index.
            torch.manual_seed(micro_batch_seed(args.seed, step, k * d.world + d.rank))
            sync = k == args.grad_accum - 1 or strategy != "ddp" or d.world == 1
            with (contextlib.nullcontext() if sync else loss_module.no_sync()):
                loss = loss_module([data[i] for i in idx]) / args.grad_accum
                loss.backward()
            total += loss.detach().double().cpu()
        if d.world > 1:
            import torch.distributed as dist

            dist.all_reduce(total)
            total /= d.world
        value = float(total)
        if d.main and args.loss_log:
            with open(args.loss_log, "a") as f:
                f.write(json.dumps({"step": step + 1, "loss": value, "lr": opt.param_groups[0]["lr"]}) + "\n")
        return value

    def save_final(step: int) -> None:
        if args.lora is not None:
            from .lora import merge_lora

            merge_lora(model)
        if args.stage == 1:
            keep = (lambda k: k.startswith("projector."))
            sd = gather_full_state(model, d, keep, dtype)
            if d.main:
                out.mkdir(parents=True, exist_ok=True)
                atomic_torch_save({to_official(k): v for k, v in sd.items()}, out / "mm_projector.bin")
        else:
            sd = gather_full_state(model, d, dtype=dtype)
            if d.main:
                model.save_pretrained(out, overwrite=True, state_dict=sd)
        del sd

    def save(step: int) -> None:
        if sharded:
            if step < steps:
                ckpt.save(step, loss_module, opt, sched)
            else:
                save_final(step)
            if d.main:
                log.info("saved step %d to %s", step, ckpt.root if step < steps else out)
            return
        if not d.main:
            return
        out.mkdir(parents=True, exist_ok=True)
        if args.stage == 1:
            sd = {k: v for k, v in official_state_dict(model).items() if k.startswith("model.mm_projector.")}
            atomic_torch_save(sd, out / "mm_projector.bin")
            atomic_torch_save(trainer_state(step, opt, sched), state_file)
        else:
            state = trainer_state(step, opt, sched)
            if args.aux is not None:  # the auxiliary head resumes with the run, never ships with the model
                state["aux"] = args.aux.state_dict()
            model.save_pretrained(out, overwrite=True, extra=lambda tmp: atomic_torch_save(
                state, tmp / "trainer_state.pt"))
        log.info("saved step %d to %s", step, out)

    return run_loop(step_fn, params, opt, sched, LoopConfig(steps, args.log_every, args.save_every,
                                                            deterministic=args.deterministic), start, save, d)


def _param_counts(args: StageArgs) -> tuple[int, int]:
    """(all, trainable) parameter counts of the run, from the config alone (a meta-device build)."""
    from ..config import HiwinConfig

    with torch.device("meta"):
        m = HiwinForCausalLM(HiwinConfig.from_pretrained(Path(args.model)))
    trainable = trainable_parameters(m, args.stage)
    return sum(p.numel() for p in m.parameters()), sum(p.numel() for p in trainable)
