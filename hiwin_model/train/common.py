"""Shared training machinery: data files, sequence building, the loop, DDP, checkpoints.

Multi-GPU runs go through ``torchrun`` (``torch.distributed``: DDP here, FSDP2 in
:mod:`.distributed`); a single process needs no launcher. Checkpoints are written atomically:
model weights in the official layout, plus ``trainer_state.pt`` (optimizer, scheduler, step, RNG)
read back with ``weights_only=True``.

Reproducibility (see :func:`deterministic_mode`): every stage seeds its RNGs from ``seed``, so two
runs see the same data order, initialisation, dropout masks and jitters. Whether they also compute
the same bits depends on the kernels: by default the loop runs with all intra-op threads, and
multithreaded CPU kernels (MKL/OpenMP GEMMs and reductions) need not add in the same order from one
run to the next when the machine is loaded, so losses may differ in the last ulp. With
``LoopConfig(deterministic=True)`` (``StageArgs`` / ``Stage0Args`` ``deterministic=True``) the loop
runs under :func:`deterministic_mode`, and on CPU a single-process run is bitwise reproducible: the
same arguments, data, torch build and CPU give the same losses and weights however loaded the
machine is, and a stage 1 / stage 2 run resumed from ``trainer_state.pt`` continues bit for bit as
the uninterrupted run (``tests/test_training.py::test_stage1_resume_is_exact``). Stage 0 is
reproducible from scratch, but its checkpoint (the official layout) holds no RNG state, so a
resumed stage 0 draws other jitters than the uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..conversation import IMAGE_PLACEHOLDER

log = logging.getLogger("hiwin.train")
IGNORE = -100


# ---------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # setup_distributed created the process group: finish_distributed ends it

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    owns = world > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    dev = torch.device(device, int(os.environ.get("LOCAL_RANK", "0"))) if device == "cuda" else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return Dist(rank, world, dev, owns)


def finish_distributed(d: Dist) -> None:
    """After a successful run: wait for every rank (rank 0 may still be writing the output), then end
    the process group :func:`setup_distributed` created. A rank that exits with its gloo group alive
    can abort in the interpreter's teardown (gloo threads still holding tensors), which torchrun
    reports as a failed run."""
    if d.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_ddp(module: nn.Module, d: Dist) -> nn.Module:
    if d.world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    # gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets instead of beside
    # them (saves 4 bytes per trainable parameter; the same numbers).
    return DistributedDataParallel(module, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                                   find_unused_parameters=True, gradient_as_bucket_view=True)


# ---------------------------------------------------------------------------- data
def read_json_list(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: data file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: invalid JSON ({e})") from e
    if not isinstance(data, list) or not data:
        raise ValueError(f"{p}: expected a non-empty JSON list of samples")
    for i, s in enumerate(data):
        if "image" not in s or "conversations" not in s:
            raise ValueError(f"{p}: sample {i} lacks 'image' or 'conversations'")
    return data


def conversation_turns(sample: dict) -> list[tuple[str, str]]:
    """LLaVA ``conversations`` ([{from: human|gpt, value}]) -> [(user, assistant)]."""
    conv = sample["conversations"]
    if len(conv) < 2 or len(conv) % 2:
        raise ValueError(f"sample {sample.get('id', '?')}: conversations must alternate human/gpt")
    turns = []
    for h, g in zip(conv[::2], conv[1::2]):
        if h.get("from") != "human" or g.get("from") != "gpt":
            raise ValueError(f"sample {sample.get('id', '?')}: expected human then gpt turns")
        turns.append((h["value"], g["value"]))
    if sum(u.count(IMAGE_PLACEHOLDER) for u, _ in turns) != 1:
        raise ValueError(f"sample {sample.get('id', '?')}: exactly one {IMAGE_PLACEHOLDER} is required")
    return turns


def sequence_pieces(proc, segments: list[tuple[str, bool]]) -> list[tuple[list[int] | None, bool]]:
    """Rendered segments -> the sequence's pieces in order: (token ids, supervised), BOS first, and
    ``(None, False)`` where the image's visual tokens go."""
    pieces: list[tuple[list[int] | None, bool]] = []
    if proc.ids.bos is not None:
        pieces.append(([proc.ids.bos], False))
    for text, supervised in segments:
        if IMAGE_PLACEHOLDER in text:
            before, after = text.split(IMAGE_PLACEHOLDER)
            if before:
                pieces.append((proc.encode_text(before), supervised))
            pieces.append((None, False))
            if after:
                pieces.append((proc.encode_text(after), supervised))
        elif text:
            pieces.append((proc.encode_text(text), supervised))
    return pieces


def assemble_sequence(pieces: list[tuple[list[int] | None, bool]], embedded: list[Tensor], visual: Tensor,
                      max_length: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """:func:`sequence_pieces` + the embeddings of its token pieces (in order) + visual tokens ->
    (embeds (L, C), labels (L,)), truncated to ``max_length``."""
    parts: list[Tensor] = []
    labels: list[Tensor] = []
    it = iter(embedded)
    dev = visual.device
    for ids, supervised in pieces:
        if ids is None:
            parts.append(visual.to(dtype))
            labels.append(torch.full((visual.shape[0],), IGNORE, dtype=torch.long, device=dev))
        else:
            parts.append(next(it))
            t = torch.tensor(ids, dtype=torch.long, device=dev)
            labels.append(t if supervised else torch.full_like(t, IGNORE))
    return torch.cat(parts)[:max_length], torch.cat(labels)[:max_length]


def embed_pieces(model, id_lists: list[list[int]]) -> list[Tensor]:
    """Token embeddings of several id lists with ONE call of the embedding module (a sharded FSDP2
    unit must run the same number of times on every rank), split back per list."""
    if not id_lists:
        return []
    emb = model.llm.get_input_embeddings()
    flat = torch.tensor([i for ids in id_lists for i in ids], dtype=torch.long, device=model.device)
    return list(emb(flat).split([len(ids) for ids in id_lists]))


def build_sequence(model, segments: list[tuple[str, bool]], visual: Tensor, max_length: int) -> tuple[Tensor, Tensor]:
    """Rendered segments + visual tokens -> (embeds (L, C), labels (L,)), BOS first, truncated."""
    pieces = sequence_pieces(model.processor, segments)
    embedded = embed_pieces(model, [ids for ids, _ in pieces if ids is not None])
    return assemble_sequence(pieces, embedded, visual, max_length, model.dtype)


def pad_batch(seqs: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad (embeds, labels) pairs -> inputs_embeds (B, L, C), attention_mask, labels."""
    L = max(e.shape[0] for e, _ in seqs)
    C = seqs[0][0].shape[1]
    emb = seqs[0][0].new_zeros(len(seqs), L, C)
    lab = torch.full((len(seqs), L), IGNORE, dtype=torch.long, device=emb.device)
    mask = torch.zeros(len(seqs), L, dtype=torch.long, device=emb.device)
    for i, (e, lab_i) in enumerate(seqs):
        emb[i, :e.shape[0]] = e
        lab[i, :lab_i.shape[0]] = lab_i
        mask[i, :e.shape[0]] = 1
    return emb, mask, lab


def sample_stream(n: int, d: Dist, seed: int, start_step: int, per_step: int) -> Iterator[list[int]]:
    """Endless shuffled index batches, sharded over ranks, resumable at ``start_step``."""
    epoch, pos, step = 0, 0, 0
    order: list[int] = []
    while True:
        batch = []
        while len(batch) < per_step:
            if pos >= len(order):
                order = list(range(n))
                random.Random(seed + epoch).shuffle(order)
                order = order[d.rank::d.world] or order
                epoch, pos = epoch + 1, 0
            batch.append(order[pos])
            pos += 1
        if step >= start_step:
            yield batch
        step += 1


def global_batches(n: int, seed: int, start_step: int, per_step: int) -> Iterator[list[int]]:
    """Endless global batches of ``per_step`` sample indices (the same on every rank), epochs
    shuffled with ``seed + epoch``, resumable at ``start_step``: the data position is the step."""
    epoch, pos, step = 0, 0, 0
    order: list[int] = []
    while True:
        batch = []
        while len(batch) < per_step:
            if pos >= len(order):
                order = list(range(n))
                random.Random(seed + epoch).shuffle(order)
                epoch, pos = epoch + 1, 0
            batch.append(order[pos])
            pos += 1
        if step >= start_step:
            yield batch
        step += 1


def micro_batches(global_batch: list[int], d: Dist, accum: int, batch_size: int) -> list[list[int]]:
    """This rank's ``accum`` micro-batches of a global batch of ``world * accum * batch_size`` indices.

    Micro-batch ``k`` of rank ``r`` is slice ``k * world + r``: one process with ``accum * world``
    accumulation steps runs the same micro-batches, in the same order, as ``world`` ranks do together,
    so the two compute the same mean of micro-batch losses and the same gradients (up to the order
    of the floating-point additions)."""
    if len(global_batch) != d.world * accum * batch_size:
        raise ValueError(f"global batch of {len(global_batch)} != world {d.world} x accum {accum} x batch {batch_size}")
    return [global_batch[(k * d.world + d.rank) * batch_size:(k * d.world + d.rank + 1) * batch_size]
            for k in range(accum)]


def micro_batch_seed(seed: int, step: int, micro: int) -> int:
    """The RNG seed of global micro-batch ``micro`` of ``step``: the same whoever runs it."""
    return ((seed * 1_000_003 + step) * 65_537 + micro) % (1 << 63)


# ---------------------------------------------------------------------------- schedule
def cosine_with_warmup(opt: torch.optim.Optimizer, steps: int, warmup_ratio: float):
    warm = max(1, int(round(steps * warmup_ratio))) if warmup_ratio > 0 else 0

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        prog = (step - warm) / max(1, steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


# ---------------------------------------------------------------------------- determinism
@contextmanager
def deterministic_mode(enabled: bool = True, threads: int = 1) -> Iterator[None]:
    """Run the body with bitwise-reproducible kernels; the previous settings come back on exit.

    Inside: ``torch.use_deterministic_algorithms(True)`` (an op without a deterministic
    implementation raises instead of running; ``torch.empty`` memory is filled, so a kernel that
    read uninitialised memory could not hide), ``threads`` intra-op CPU threads (default 1: every
    CPU kernel, MKL GEMMs included, adds in one fixed order whatever the machine's load), and cuDNN
    deterministic with benchmarking off. What this guarantees: on CPU, the same computation on the
    same inputs gives the same bits, within a process and between processes, for one torch build
    on one CPU type (not across torch versions or instruction sets). On CUDA it removes the known
    sources of run-to-run differences but needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` in the
    environment before start, and ops with no deterministic CUDA kernel raise. RNG seeding is the
    caller's (the stages seed from ``seed``). ``enabled=False`` changes nothing.
    """
    if not enabled:
        yield
        return
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        n, det, warn_only, cudnn_det, cudnn_bench = saved
        torch.set_num_threads(n)
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_det, cudnn_bench


# ---------------------------------------------------------------------------- loop
@dataclass
class LoopConfig:
    steps: int
    log_every: int = 10
    save_every: int = 0  # 0: only at the end
    grad_clip: float = 1.0
    deterministic: bool = False  # run the loop under deterministic_mode(): bitwise reproducible on CPU


def run_loop(step_fn: Callable[[int], float], params: list[nn.Parameter], opt, sched, cfg: LoopConfig,
             start_step: int, save: Callable[[int], None], d: Dist) -> list[float]:
    """Call ``step_fn(step)`` (forward + backward, returns the loss), clip, step; log and save.

    With ``cfg.deterministic`` the whole loop (forward, backward, optimizer, saves) runs under
    :func:`deterministic_mode` (one CPU thread, deterministic algorithms), restored on return: a
    run, or a run resumed from its last save, then reproduces the losses and weights bit for bit on
    CPU (see the module docstring for what is and is not covered).
    """
    with deterministic_mode(cfg.deterministic):
        losses: list[float] = []
        t0 = time.perf_counter()
        for step in range(start_step, cfg.steps):
            opt.zero_grad(set_to_none=True)
            loss = step_fn(step)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            if sched is not None:
                sched.step()
            losses.append(loss)
            done = step + 1
            if d.main and (done % cfg.log_every == 0 or done == cfg.steps):
                rate = (done - start_step) / (time.perf_counter() - t0)
                log.info("step %d/%d  loss %.4f  lr %.2e  %.2f it/s", done, cfg.steps, loss,
                         opt.param_groups[0]["lr"], rate)
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                save(done)
        save(cfg.steps)
    return losses


def trainer_state(step: int, opt, sched) -> dict:
    return {"step": torch.tensor(step), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict() if sched is not None else {},
            "torch_rng": torch.get_rng_state()}


def load_trainer_state(path: Path, opt, sched) -> int:
    st = torch.load(path, map_location="cpu", weights_only=True)
    opt.load_state_dict(st["optimizer"])
    if sched is not None and st.get("scheduler"):
        sched.load_state_dict(st["scheduler"])
    torch.set_rng_state(st["torch_rng"])
    return int(st["step"])


def atomic_torch_save(obj, out: Path) -> None:
    """torch.save to a temp file, then rename: a crash never leaves a half-written file."""
    tmp = out.with_name(out.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, out)
