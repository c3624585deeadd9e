"""Training at real scale: the sharding strategy, FSDP2, sharded checkpoints and the final gather.

Strategies (``StageArgs.strategy`` / ``hiwin train --strategy``):

* ``ddp``: every rank holds the whole model, its gradients and the optimizer state
  (:func:`.common.wrap_ddp`); right for models that fit one device several times over.
* ``fsdp``: PyTorch's FSDP2 (:func:`torch.distributed.fsdp.fully_shard`). Each CLIP encoder
  block, the projector, the token embeddings and each Llama decoder layer is its own shard group
  (all-gathered just before it runs, freed right after; :func:`shard_blocks`), so is the final
  norm with the LM head; what is left (CLIP's patch embeddings, the JBU: a few million
  parameters) is the root group. Since a crop-dependent number of CLIP and projector calls would
  pair one rank's collectives with another's, the training pads every rank to the same calls
  (:mod:`.vision_batch`). Parameters,
  gradients and AdamW state are split over the ranks; the optimizer only ever sees the trainable
  shards. With ``compute_dtype=bf16`` the sharded parameters stay fp32 (the master weights the
  optimizer updates), are cast to bf16 when gathered, and gradients are reduced in fp32
  (:class:`~torch.distributed.fsdp.MixedPrecisionPolicy`). Activation checkpointing wraps each CLIP
  block, the JBU, the projector and each Llama layer (:func:`checkpoint_blocks`).
* ``auto``: ``fsdp`` when there are several ranks and a DDP replica (:func:`ddp_bytes_per_rank`)
  would take more than half of one device's memory, else ``ddp``.

Checkpoints of the sharded path (:class:`ShardedCheckpoint`) are ``torch.distributed.checkpoint``
directories: each rank writes its own shards of the trainable parameters and of the optimizer
state, so nothing is gathered to save; ``trainer.json`` holds the step and the scheduler, one
``rng-rank{r}.safetensors`` per rank the RNG state. The data position is the step: the sample
stream (:func:`.common.global_batches`) is a pure function of (seed, step). A directory becomes
visible (``latest`` points to it) only once every rank has finished writing.

The final model is gathered tensor by tensor (:func:`gather_full_state`): rank 0 receives one full
copy, on the CPU, and writes the official layout; no rank ever holds two.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .common import Dist

log = logging.getLogger("hiwin.train")

STRATEGIES = ("auto", "ddp", "fsdp")


# ---------------------------------------------------------------------------- strategy
def ddp_bytes_per_rank(n_params: int, n_trainable: int, param_bytes: int = 4) -> int:
    """What a DDP rank holds before activations: weights + fp32 gradients and AdamW moments of the
    trainable part (4 + 4 + 8 bytes per trainable fp32 parameter)."""
    return n_params * param_bytes + n_trainable * (param_bytes + 8)


def device_memory_bytes(device: torch.device, local_world: int) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return pages * size // max(1, local_world)  # the ranks of one host share its RAM


def choose_strategy(strategy: str, d: Dist, n_params: int, n_trainable: int) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy != "auto":
        return strategy
    if d.world == 1:
        return "ddp"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", d.world))
    need = ddp_bytes_per_rank(n_params, n_trainable)
    return "fsdp" if need > 0.5 * device_memory_bytes(d.device, local) else "ddp"


# ---------------------------------------------------------------------------- FSDP2
def checkpoint_blocks(model) -> list[nn.Module]:
    """The units of activation checkpointing: the CLIP encoder blocks, the JBU stack and the
    projector (both called per crop: their 2x / 4x maps are the largest activations of the vision
    path), and the Llama decoder layers. Each keeps only its inputs through the step and recomputes
    the rest in its backward (with the RNG state of its forward: the same dropout masks)."""
    return [*model.vision_tower.vision_model.encoder.layers, model.jbu, model.projector, *model.llm.model.layers]


def shard_blocks(model) -> list[nn.Module]:
    """The FSDP2 units below the root, each all-gathered just before each of its calls and
    resharded right after (in backward: gathered again, gradients reduce-scattered per call):

    * each CLIP encoder block (called once per CLIP call: once per crop shape group);
    * the projector (once per crop; a single unit because its attention weights and ``proj`` are
      used as tensors inside its forward, not through sub-module calls, and FSDP2 gathers a unit
      in a module's pre-forward hook);
    * the token embeddings (once per micro-batch: the loss module embeds all its ids at once);
    * each Llama decoder layer (once per micro-batch).

    Correct only because every rank makes the same sequence of calls to these units in each
    micro-batch, though images differ in crop shapes and counts: the training's vision path
    (:func:`.vision_batch.encode_micro_batch`, with ``balance``) pads the CLIP and crop calls to the
    ranks' maximum with zero-weighted dummy calls; its docstring states the invariant. What is left
    in the root unit: the CLIP patch / position embeddings and pre-layer-norm, and the JBU stack
    (2.3 M parameters at the released width), gathered for the whole step."""
    return [*model.vision_tower.vision_model.encoder.layers, model.projector, model.llm.model.embed_tokens,
            *model.llm.model.layers]


def unit_sizes(model) -> dict[str, int]:
    """Parameter counts of the FSDP2 units (:func:`shard_blocks`, the LM-head unit, the root) of a
    model: ``root`` (0-d parameters excluded: they stay outside FSDP), ``head``, and the largest
    ``vision_block``, ``projector``, ``embed`` and ``layer`` (Llama decoder layer)."""
    def n(m) -> int:
        return sum(p.numel() for p in m.parameters())

    clip = list(model.vision_tower.vision_model.encoder.layers)
    layers = list(model.llm.model.layers)
    units = {id(p) for m in shard_blocks(model) for p in m.parameters()}
    head = {id(p) for m in (model.llm.model.norm, model.llm.lm_head) for p in m.parameters()}
    return {"root": sum(p.numel() for p in model.parameters() if id(p) not in units | head and p.dim() > 0),
            "head": sum(p.numel() for p in model.parameters() if id(p) in head),
            "vision_block": max(map(n, clip), default=0), "projector": n(model.projector),
            "embed": n(model.llm.model.embed_tokens), "layer": max(map(n, layers), default=0),
            "vision_blocks": len(clip), "layers": len(layers)}


def _fsdp_comm_api():
    """FSDP2's collective interfaces (``set_custom_all_gather`` / ``set_custom_reduce_scatter`` take
    subclasses of these); None where this torch lacks them."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter
    except ImportError:
        return None
    return AllGather, ReduceScatter


def _in_place_gloo_comms():
    """FSDP2 all-gather and reduce-scatter for gloo (CPU) without gloo's full-size temporaries.

    gloo's ``all_gather_into_tensor`` and ``reduce_scatter_tensor`` each allocate a scratch copy as
    large as the whole unit (measured: +191 MiB for a 191 MiB buffer), on top of FSDP2's own
    buffers: for a Llama layer at the released width, 0.4 GB per gather and 0.8 GB per reduction.
    These do the same per shard, in place in FSDP2's buffers: the gather broadcasts shard ``i``
    from rank ``i`` into slice ``i`` of the output, the reduction sums slice ``i`` of the input
    onto rank ``i`` (gloo ``reduce``; FSDP2 never reads its reduction input afterwards) and takes the
    mean (FSDP2's ``AVG`` for fp32 gradients) or the sum. Synchronous, like gloo on the CPU, so the
    reduction input's memory is released as soon as the reduction returns: FSDP2 keeps a reference
    to it until the next unit's reduction (so that a CUDA stream still reading it is never
    overwritten), which on the CPU would only hold a unit-sized fp32 buffer (0.8 GB for a Llama
    layer) through the next unit's backward."""
    api = _fsdp_comm_api()
    if api is None:
        return None
    AllGather, ReduceScatter = api

    class _Alloc:
        def allocate(self, size, *, dtype, device):
            return torch.empty(*size, dtype=dtype, device=device)

    class InPlaceAllGather(_Alloc, AllGather):
        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            world, rank = group.size(), group.rank()
            parts = output_tensor.view(world, -1)
            if parts[rank].data_ptr() != input_tensor.data_ptr():
                parts[rank].copy_(input_tensor.view(-1))
            for i in range(world):
                dist.broadcast(parts[i], src=dist.get_global_rank(group, i), group=group)
            return None

    class InPlaceReduceScatter(_Alloc, ReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            world, rank = group.size(), group.rank()
            if op not in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
                raise NotImplementedError(f"in-place gloo reduce-scatter supports SUM and AVG, not {op}")
            parts = input_tensor.view(world, -1)
            for i in range(world):
                dist.reduce(parts[i], dst=dist.get_global_rank(group, i), op=dist.ReduceOp.SUM, group=group)
            out = output_tensor.view(-1)
            out.copy_(parts[rank])
            if op == dist.ReduceOp.AVG:
                out.div_(world)
            input_tensor.untyped_storage().resize_(0)  # consumed (see above)
            return None

    return InPlaceAllGather(), InPlaceReduceScatter()


def use_in_place_gloo_comms(root: nn.Module) -> bool:
    """Give every FSDP2 module under ``root`` the in-place gloo collectives (:func:`_in_place_gloo_comms`)
    when the default process group is gloo with several ranks. Returns whether it did."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or dist.get_backend() != "gloo":
        return False
    from torch.distributed.fsdp import FSDPModule

    comms = _in_place_gloo_comms()
    if comms is None:
        log.warning("this torch has no FSDP2 custom collectives: gloo's all-gather / reduce-scatter keep their "
                    "full-size scratch copies (more memory per rank, same results)")
        return False
    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.set_custom_all_gather(comms[0])
            m.set_custom_reduce_scatter(comms[1])
            # No backward prefetch: gloo's collectives run synchronously here, so gathering the next
            # unit early overlaps nothing and only holds its weights longer. (An explicit prefetch
            # list replaces FSDP2's default; prefetching the unit itself, already gathered, is a no-op.)
            m.set_modules_to_backward_prefetch([m])
    return True


def apply_fsdp(root: nn.Module, model, *, compute_dtype: torch.dtype = torch.float32,
               activation_checkpointing: bool = True, reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model``'s blocks and then ``root`` (the module whose forward runs the whole step).

    The parameters must be fp32 (the master weights); ``compute_dtype`` bf16 casts them when they are
    gathered and reduces gradients in fp32. Checkpointing is applied to the same blocks first."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    bad = {p.dtype for p in model.parameters()} - {torch.float32}
    if bad:
        raise ValueError(f"FSDP master weights must be float32, the model holds {sorted(map(str, bad))}")
    mp = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                              reduce_dtype=torch.float32)
    # FSDP2 cannot shard 0-d tensors (the JBU's range temperature and spatial sigma): they stay whole
    # on every rank, outside FSDP, which is right only while they are frozen (no gradient reduction).
    scalars = {p for p in model.parameters() if p.dim() == 0}
    if any(p.requires_grad for p in scalars):
        raise ValueError("a trainable 0-d parameter cannot be sharded by FSDP2: "
                         f"{[n for n, p in model.named_parameters() if p.dim() == 0 and p.requires_grad]}")
    if activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for b in checkpoint_blocks(model):
            checkpoint(b)
    for b in shard_blocks(model):
        fully_shard(b, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # The final norm and the LM head run once per micro-batch too: one unit (not kept gathered
    # through the step as the root's parameters are). Not resharded after forward: backward needs
    # them right away.
    fully_shard([model.llm.model.norm, model.llm.lm_head], mp_policy=mp, reshard_after_forward=False)
    fully_shard(root, mp_policy=mp, reshard_after_forward=reshard_after_forward, ignored_params=scalars)
    use_in_place_gloo_comms(root)
    return root


def init_meta_buffers(model) -> None:
    """After ``to_empty``: recompute the non-persistent buffers (no checkpoint holds them)."""
    emb = model.vision_tower.vision_model.embeddings
    dev = emb.class_embedding.device
    emb.register_buffer("position_ids", torch.arange(emb.num_positions, device=dev)[None], persistent=False)
    rot = model.llm.model.rotary_emb
    model.llm.model.rotary_emb = type(rot)(model.llm.config).to(dev)


def broadcast_into_sharded(model, full: dict[str, Tensor] | None) -> None:
    """Fill a sharded (FSDP2) ``model`` from rank 0's full state dict, tensor by tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, full if full is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    init_meta_buffers(model)


def gather_full_state(module: nn.Module, d: Dist, keep: Callable[[str], bool] = lambda k: True,
                      dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Full tensors of ``module``'s state dict on rank 0 (CPU), gathered one tensor at a time.

    Every rank takes part in each gather; only rank 0 keeps the result, so the full model exists
    once, on rank 0, and each other rank holds at most one full tensor in flight. Other ranks get {}.
    """
    from torch.distributed.tensor import DTensor

    out: dict[str, Tensor] = {}
    for k, t in module.state_dict().items():
        if not keep(k):
            continue
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if d.main:
            full = full.detach().to("cpu")
            if dtype is not None and full.is_floating_point():
                full = full.to(dtype)
            out[k] = full
        del full
    return out


# ---------------------------------------------------------------------------- sharded checkpoints
class ShardedCheckpoint:
    """``<root>/step-000012/`` torch.distributed.checkpoint directories + ``<root>/latest``.

    Saved: the trainable parameters (frozen ones come back from the base model), the optimizer
    state, ``trainer.json`` (step, scheduler) and each rank's torch RNG state. ``keep`` old
    directories are kept (the rest deleted, after the new one is complete)."""

    def __init__(self, root: str | os.PathLike, d: Dist, keep: int = 2):
        self.root, self.d, self.keep = Path(root), d, keep

    def latest(self) -> Path | None:
        p = self.root / "latest"
        if not p.is_file():
            return None
        step_dir = self.root / p.read_text().strip()
        if not (step_dir / "trainer.json").is_file():
            raise FileNotFoundError(f"{p} names {step_dir}, which is not a complete checkpoint")
        return step_dir

    def _states(self, model: nn.Module, opt) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))

    def save(self, step: int, model: nn.Module, opt, sched) -> Path:
        import torch.distributed.checkpoint as dcp
        from safetensors.torch import save_file

        name = f"step-{step:06d}"
        final, tmp = self.root / name, self.root / f".{name}.tmp"
        if self.d.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier(self.d)
        msd, osd = self._states(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
        save_file({"torch": torch.get_rng_state()}, str(tmp / f"rng-rank{self.d.rank}.safetensors"))
        _barrier(self.d)
        if self.d.main:
            meta = {"step": step, "world": self.d.world,
                    "scheduler": sched.state_dict() if sched is not None else None}
            (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            latest_tmp = self.root / "latest.tmp"
            latest_tmp.write_text(name + "\n")
            os.replace(latest_tmp, self.root / "latest")
            for old in sorted(self.root.glob("step-*"))[:-self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        _barrier(self.d)
        return final

    def load(self, path: Path, model: nn.Module, opt, sched) -> int:
        import torch.distributed.checkpoint as dcp
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        meta = json.loads((path / "trainer.json").read_text())
        if meta["world"] != self.d.world:
            raise ValueError(f"{path}: saved with {meta['world']} ranks, resuming with {self.d.world}: the data "
                             "order and RNG streams would differ (resume with the same number of ranks)")
        msd, osd = self._states(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))
        if sched is not None and meta["scheduler"] is not None:
            sched.load_state_dict(meta["scheduler"])
        torch.set_rng_state(load_file(str(path / f"rng-rank{self.d.rank}.safetensors"))["torch"])
        return int(meta["step"])


def _barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()
