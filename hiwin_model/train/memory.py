"""Training memory: the per-GPU plan for the released sizes, and a measurement of per-rank peak RSS.

``python -m hiwin_model.train.memory plan``
    prints the bytes-per-parameter arithmetic of docs/training.md for the released model (7.2 B
    parameters: Vicuna-7B 6.74 B, CLIP ViT-L 0.29 B to layer -2, projector 0.17 B, JBU 1 M).

``python -m hiwin_model.train.memory measure [--width real|half|quarter|tiny] [--llm-layers 2] [--malloc mmap|glibc]``
    runs stage-2 training steps (one generated page, overview only, AdamW) in separate processes
    and prints each rank's peak RSS (``ru_maxrss``) and the bytes it holds in parameters, gradients
    and optimizer state (``half`` / ``quarter``: every width and the vocabulary halved / quartered,
    about 1/4 / 1/16 of the parameters, to calibrate on a small machine; ``--malloc``: see
    :func:`measure`), for

    * ``fsdp``: FSDP2 on 2 gloo ranks (``torchrun``), bf16 compute, fp32 master weights, fp32
      gradient reduction, activation checkpointing (the ``--strategy fsdp --dtype bf16`` recipe);
    * ``ddp``: DistributedDataParallel in fp32, as ``--strategy ddp --dtype fp32`` runs it
      (gradients as views of DDP's buckets), **measured on one rank of a 1-rank process group**. A
      DDP rank holds a full replica (weights, gradients, AdamW state) whatever the world size, so
      one rank's footprint is the per-rank footprint of any DDP run; measuring it alone keeps the
      measurement within one machine's RAM (2 real-width DDP ranks would need 2 x ~19 GB).

    Each mode runs in its own processes, one after the other, so the two never share the RAM.
    Random weights (initialised shard by shard: no rank materialises the full FSDP model).

``python -m hiwin_model.train.memory measure-cuda --llm-layers 32 [--modes lora,full-bf16]``
    allocator peaks of stage-2 steps on one GPU at the released widths (:mod:`.memory_device`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

GIB = 1 << 30


# ---------------------------------------------------------------------------- plan
@dataclasses.dataclass(frozen=True)
class Sizes:
    llm: float = 6.738e9  # Vicuna-7B (embeddings + 32 layers + LM head)
    clip: float = 0.291e9  # CLIP ViT-L/14-336, the 23 blocks up to layer -2
    projector: float = 0.167e9
    jbu: float = 0.001e9

    @property
    def total(self) -> float:
        return self.llm + self.clip + self.projector + self.jbu


ROOT = 2.26e6  # the FSDP2 root unit at the released width: CLIP patch/position embeddings, pre-norm, JBU stack
LLAMA_LAYER = 0.2024e9  # one Vicuna-7B decoder layer: the largest FSDP2 unit


def plan_rows(s: Sizes = Sizes(), world: int = 8, lora_r: int = 128) -> list[tuple[str, str, float]]:
    """(mode, arithmetic, GiB per GPU before activations) for stage 2 at the released size."""
    n = s.total
    # LoRA r on q,k,v,o (4096x4096) and gate,up,down (4096x11008): r * (in + out) per linear, 32 layers
    lora = 32 * lora_r * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    trained_lora = lora + s.projector + s.jbu
    rows = [
        ("DDP fp32 (--strategy ddp)", f"16 B x {n / 1e9:.2f} B (4 weights + 4 grads + 8 AdamW)", 16 * n),
        (f"FSDP2 bf16 on {world} GPUs, state", f"16 B x {n / 1e9:.2f} B / {world} (fp32 master + fp32 grads + AdamW, "
                                              "all sharded)", 16 * n / world),
        (f"FSDP2 bf16 on {world} GPUs, + gathered units",
         f"+ root unit (CLIP patch embeddings, JBU: {ROOT / 1e6:.1f} M) x 8 B (bf16 weights + bf16 grads + fp32 "
         "reduce input, the whole step) + 10 B x the largest unit (a Llama layer, 0.2 B: its weights and grads, "
         "the previous unit's fp32 reduce input, the next unit prefetched)",
         16 * n / world + 8 * ROOT + 10 * LLAMA_LAYER),
        (f"LoRA r={lora_r}, 1 GPU, bf16 base", f"2 B x {n / 1e9:.2f} B frozen + 16 B x {trained_lora / 1e6:.0f} M "
                                               "trained (adapters, projector, fixup)", 2 * n + 16 * trained_lora),
    ]
    return [(m, a, b / GIB) for m, a, b in rows]


def print_plan(world: int = 8, lora_r: int = 128) -> None:
    print(f"stage 2 at the released size ({Sizes().total / 1e9:.2f} B parameters), GiB per GPU before activations")
    for mode, arith, gib in plan_rows(world=world, lora_r=lora_r):
        print(f"  {mode:45s} {gib:7.1f} GiB   {arith}")


# ---------------------------------------------------------------------------- measurement (one rank)
def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


SCALED = {"half": 2, "quarter": 4}  # widths and vocabulary divided by this: ~1/4 and ~1/16 of the parameters
WIDTHS = ("real", "half", "quarter", "tiny")


def _config(width: str, llm_layers: int):
    from ..config import HiwinConfig
    from ..tiny import TINY_CONFIG, build_tokenizer

    tok = build_tokenizer()
    if width == "real":
        c = HiwinConfig()
        c = dataclasses.replace(c, llm={**c.llm, "num_hidden_layers": llm_layers})
    elif width in SCALED:  # every width and the vocabulary divided, depths kept
        k = SCALED[width]
        d = dict(TINY_CONFIG, hidden_size=4096 // k, intermediate_size=11008 // k, num_attention_heads=32 // k,
                 num_key_value_heads=32 // k, num_hidden_layers=llm_layers, vocab_size=32000 // k,
                 mm_hidden_size=1024 // k, hiwin_projector_num_heads=32 // k,
                 hiwin_vision_config=dict(hidden_size=1024 // k, intermediate_size=4096 // k, num_hidden_layers=24,
                                          num_attention_heads=16 // k, image_size=336, patch_size=14,
                                          hidden_act="quick_gelu", layer_norm_eps=1e-5))
        c = HiwinConfig.from_dict(d)
    else:
        d = dict(TINY_CONFIG, num_hidden_layers=llm_layers, vocab_size=len(tok))
        c = HiwinConfig.from_dict(d)
    return c, tok


def _local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def worker(mode: str, width: str, llm_layers: int, data: str, steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from ..model import HiwinForCausalLM
    from ..processor import HiwinProcessor
    from .common import read_json_list, setup_distributed
    from .distributed import apply_fsdp, init_meta_buffers
    from .llm_stages import _LossModule, trainable_parameters

    torch.manual_seed(0)
    d = setup_distributed("cpu")
    if not dist.is_initialized():  # DDP on one rank still needs its (1-rank) process group
        dist.init_process_group("gloo")
    rss_imports = peak_rss_mib()
    config, tok = _config(width, llm_layers)
    with torch.device("meta"):
        model = HiwinForCausalLM(config, dtype=torch.float32)
    model.processor = HiwinProcessor(tok, config.slicing)
    trainable_parameters(model, 2)
    root = _LossModule(model, 2, Path(data) / "images", max_slices=1, max_length=512)
    if mode == "fsdp":
        apply_fsdp(root, model, compute_dtype=torch.bfloat16, activation_checkpointing=True)
        root.balance = True
        root.compute_dtype = torch.bfloat16
    root.to_empty(device="cpu")
    from torch.distributed.tensor import DTensor

    with torch.no_grad():  # random weights, each rank initialising only what it holds
        for p in model.parameters():
            (p.to_local() if isinstance(p, DTensor) else p).normal_(0, 0.02)
    init_meta_buffers(model)
    if mode == "fsdp":
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 0:
                    p.data = p.data.to(torch.bfloat16)
        loss_module = root
    else:
        from torch.nn.parallel import DistributedDataParallel

        loss_module = DistributedDataParallel(root, find_unused_parameters=True,  # as common.wrap_ddp
                                              gradient_as_bucket_view=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    rss_weights = peak_rss_mib()
    samples = read_json_list(Path(data) / "sft.json")
    for step in range(steps):
        opt.zero_grad(set_to_none=False)
        loss = loss_module([samples[step % len(samples)]])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    rec = {"mode": mode, "rank": d.rank, "world": d.world, "width": width, "llm_layers": llm_layers,
           "params": sum(p.numel() for p in model.parameters()),
           "param_bytes": _local_bytes(model.parameters()), "grad_bytes": _local_bytes(p.grad for p in params),
           "optim_bytes": _local_bytes(state), "rss_imports_mib": rss_imports, "rss_after_init_mib": rss_weights,
           "peak_rss_mib": peak_rss_mib(), "loss": float(loss.detach()),
           "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default")}
    Path(out).with_name(f"{Path(out).name}.{mode}.rank{d.rank}.json").write_text(json.dumps(rec))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


MMAP_THRESHOLD = 128 << 10  # bytes; glibc's initial value, here fixed (see measure)


def measure(width: str, llm_layers: int, steps: int, port: int, malloc: str = "mmap") -> list[dict]:
    """Run both modes (each in its own processes, one after the other) and return the per-rank records.

    ``malloc="mmap"`` (default) starts the workers with glibc's mmap threshold fixed at 128 KiB
    (``MALLOC_MMAP_THRESHOLD_``): every allocation from 128 KiB up is its own mapping, returned to
    the system when freed, so the peak RSS follows the peak of live memory. By default glibc raises
    the threshold to the size of the largest block freed so far (up to 32 MiB) and keeps freed
    blocks below it in its heaps, which adds retained-but-free memory to the RSS of both modes
    (more to FSDP2, whose shards and gathered units are many medium-sized blocks); ``"glibc"``
    measures with that default."""
    from ..synthetic import write_training_data

    if malloc not in ("mmap", "glibc"):
        raise ValueError(f"malloc must be 'mmap' or 'glibc', got {malloc!r}")

    recs = []
    with tempfile.TemporaryDirectory(prefix="hiwin-mem-") as tmp:
        data = write_training_data(Path(tmp) / "data", n=2)
        out = Path(tmp) / "result"
        for mode, ranks in (("fsdp", 2), ("ddp", 1)):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr",
                   "127.0.0.1", "--master-port", str(port), "-m", "hiwin_model.train.memory", "worker", "--mode", mode,
                   "--width", width, "--llm-layers", str(llm_layers), "--data", str(data), "--steps", str(steps),
                   "--out", str(out)]
            print(f"running {mode} on {ranks} rank(s) ...", file=sys.stderr, flush=True)
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            env.pop("MALLOC_MMAP_THRESHOLD_", None)
            if malloc == "mmap":
                env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
            subprocess.run(cmd, check=True, env=env)
            for r in range(ranks):
                recs.append(json.loads(out.with_name(f"{out.name}.{mode}.rank{r}.json").read_text()))
    return recs


def print_measurement(recs: list[dict]) -> None:
    import torch

    r0 = recs[0]
    print(f"stage-2 step, {r0['width']} width, {r0['llm_layers']} Llama layers, {r0['params'] / 1e6:.1f} M parameters; "
          f"torch {torch.__version__}, CPU, gloo; one generated page (overview only), AdamW; "
          f"glibc mmap threshold: {r0.get('malloc_mmap_threshold', 'glibc default')}")
    print(f"{'mode':34s} {'rank':>4s} {'params MiB':>10s} {'grads MiB':>10s} {'AdamW MiB':>10s} "
          f"{'RSS imports':>11s} {'peak RSS MiB':>12s} {'rest MiB':>8s}")
    label = {"fsdp": "FSDP2 bf16+ckpt, 2 ranks", "ddp": "DDP fp32 (1 rank of a 1-rank group)"}
    for r in recs:
        state = (r["param_bytes"] + r["grad_bytes"] + r["optim_bytes"]) / 2**20
        print(f"{label[r['mode']]:34s} {r['rank']:4d} {r['param_bytes'] / 2**20:10.0f} {r['grad_bytes'] / 2**20:10.0f} "
              f"{r['optim_bytes'] / 2**20:10.0f} {r['rss_imports_mib']:11.0f} {r['peak_rss_mib']:12.0f} "
              f"{r['peak_rss_mib'] - state:8.0f}")
    print("rest = peak RSS - (params + grads + AdamW): interpreter and libraries, gathered FSDP2 units, "
          "activations")
    fsdp = max(r["peak_rss_mib"] for r in recs if r["mode"] == "fsdp")
    ddp = max(r["peak_rss_mib"] for r in recs if r["mode"] == "ddp")
    print(f"peak RSS per rank, FSDP2 / DDP: {fsdp:.0f} / {ddp:.0f} MiB = {fsdp / ddp:.2f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hiwin_model.train.memory", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan", help="bytes-per-parameter arithmetic for the released size")
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--lora-r", type=int, default=128)
    m = sub.add_parser("measure", help="per-rank peak RSS of one stage-2 step: FSDP2 (2 ranks) vs DDP")
    m.add_argument("--width", choices=WIDTHS, default="tiny",
                   help="half / quarter: every width and the vocabulary halved / quartered (~1/4 / ~1/16 of the "
                        "parameters), to calibrate on a small machine")
    m.add_argument("--llm-layers", type=int, default=2)
    m.add_argument("--steps", type=int, default=2)
    m.add_argument("--port", type=int, default=29533)
    m.add_argument("--json", help="also write the per-rank records here")
    m.add_argument("--malloc", choices=["mmap", "glibc"], default="mmap",
                   help="mmap (default): glibc's mmap threshold fixed at 128 KiB, so freed tensors leave the RSS; "
                        "glibc: its default dynamic threshold (freed blocks up to 32 MiB stay in the heap)")
    c = sub.add_parser("measure-cuda", help="device memory of stage-2 steps at the released widths "
                       "(hiwin_model.train.memory_device): LoRA and full bf16, each in its own process")
    c.add_argument("--llm-layers", type=int, default=32, help="Llama decoder layers (32: the full 7B)")
    c.add_argument("--lora-r", type=int, default=128)
    c.add_argument("--modes", default="lora,full-bf16", help="comma-separated: lora, full-bf16")
    c.add_argument("--width", choices=["real", "tiny"], default="real")
    c.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    c.add_argument("--steps", type=int, default=2)
    c.add_argument("--json", help="also write the per-mode records here")
    dw = sub.add_parser("device-worker", help=argparse.SUPPRESS)
    dw.add_argument("--mode", required=True)
    dw.add_argument("--width", choices=WIDTHS, required=True)
    dw.add_argument("--llm-layers", type=int, required=True)
    dw.add_argument("--lora-r", type=int, required=True)
    dw.add_argument("--device", required=True)
    dw.add_argument("--data", required=True)
    dw.add_argument("--steps", type=int, required=True)
    dw.add_argument("--out", required=True)
    w = sub.add_parser("worker", help=argparse.SUPPRESS)
    w.add_argument("--mode", choices=["fsdp", "ddp"], required=True)
    w.add_argument("--width", choices=WIDTHS, required=True)
    w.add_argument("--llm-layers", type=int, required=True)
    w.add_argument("--data", required=True)
    w.add_argument("--steps", type=int, required=True)
    w.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if a.cmd == "plan":
        print_plan(a.world, a.lora_r)
    elif a.cmd == "measure":
        recs = measure(a.width, a.llm_layers, a.steps, a.port, a.malloc)
        print_measurement(recs)
        if a.json:
            Path(a.json).write_text(json.dumps(recs, indent=1))
    elif a.cmd == "measure-cuda":
        from . import memory_device

        modes = [m.strip() for m in a.modes.split(",") if m.strip()]
        bad = sorted(set(modes) - set(memory_device.MODES))
        if bad or not modes:
            ap.error(f"--modes: unknown {bad or modes}; choose from {', '.join(memory_device.MODES)}")
        if a.llm_layers < 1 or a.steps < 1:
            ap.error("--llm-layers and --steps must be >= 1")
        recs = memory_device.measure(modes, a.width, a.llm_layers, a.lora_r, a.device, a.steps)
        memory_device.print_table(recs)
        if a.json:
            tmp = Path(a.json).with_name(Path(a.json).name + ".tmp")
            tmp.write_text(json.dumps(recs, indent=1))
            os.replace(tmp, a.json)
        return 1 if any("error" in r for r in recs) else 0
    elif a.cmd == "device-worker":
        from .memory_device import worker as device_worker

        device_worker(a.mode, a.width, a.llm_layers, a.lora_r, a.device, a.data, a.steps, a.out)
    else:
        worker(a.mode, a.width, a.llm_layers, a.data, a.steps, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
