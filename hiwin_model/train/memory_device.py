"""Device memory of a stage-2 step at the released widths, measured with the CUDA caching allocator.

``python -m hiwin_model.train.memory measure-cuda --llm-layers 32 --modes lora``
    builds the model at the released widths (CLIP ViT-L/14-336, the JBU stack, the Hiwin projector,
    Llama 4096 hidden / 11008 MLP / 32 000 vocabulary) with ``--llm-layers`` decoder layers (32 is
    Vicuna-7B), random weights initialised directly on the device (meta-device build, ``to_empty``,
    ``normal_`` per tensor: nothing is materialised on the CPU), and runs ``--steps`` stage-2 training
    steps on one generated 1008x672 page (the real slicing: 6 slices + the overview, ~1000 visual
    tokens) with a two-turn conversation, through the ``_LossModule`` the training uses. Modes, each
    in its own subprocess (clean peaks, nothing shared):

    * ``lora``: the single-GPU LoRA recipe (``--dtype bf16 --lora-r R --activation-checkpointing``):
      bf16 frozen base, adapters on every Llama projection, the projector and the JBU's
      ``fixup_proj`` training with fp32 weights under bf16 autocast, per-block activation
      checkpointing, AdamW;
    * ``full-bf16``: every stage-2 trainable (LLM, CLIP, projector, fixup) through FSDP2 on a 1-rank
      process group (``--strategy fsdp --dtype bf16``): fp32 master weights, bf16 compute, fp32
      gradient reduction, checkpointing; what one rank holds at world size 1. Skipped (recorded, not
      run) when the plan's state alone exceeds the device.

    Per mode: parameter bytes (trainable / frozen), gradients, AdamW state, allocated / reserved
    bytes after initialisation and at the peak of the steps, the sequence length, step times, and
    the plan's prediction (docs/training.md, :func:`.memory.plan_rows` arithmetic on the counts of the
    model actually built) with the ratio measured / predicted.

``--device cpu --width tiny`` runs the same code on the CPU (peaks are then the process's peak
RSS, which includes the interpreter); the tests use it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .memory import _local_bytes

GIB = 1 << 30
MIB = 1 << 20
MODES = ("lora", "full-bf16")
PAGE = (1008, 672)


# ---------------------------------------------------------------------------- data
def write_page(root: Path) -> Path:
    """One generated page and a two-turn stage-2 conversation (``sft.json``) under ``root``."""
    from ..synthetic import draw_scene

    (root / "images").mkdir(parents=True, exist_ok=True)
    draw_scene(*PAGE, "circle", "blue", "A generated page for the memory measurement", seed=3).save(
        root / "images" / "page.png")
    answer = ("The page shows a large blue circle near the centre, a few thin grey lines crossing the white "
              "background and one line of black text in the top left corner. ") * 2
    sample = {"id": "0", "image": "page.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the page in detail."}, {"from": "gpt", "value": answer},
        {"from": "human", "value": "What colour is the shape?"}, {"from": "gpt", "value": "It is blue."}]}
    (root / "sft.json").write_text(json.dumps([sample], indent=1))
    return root


# ---------------------------------------------------------------------------- counts and prediction
def lora_adapter_count(llm: dict, r: int) -> int:
    """Parameters of rank-``r`` adapters on q, k, v, o, gate, up, down of every Llama layer: r (in + out)."""
    h, inter, layers = llm["hidden_size"], llm["intermediate_size"], llm["num_hidden_layers"]
    kv = llm.get("num_key_value_heads", llm["num_attention_heads"]) * (h // llm["num_attention_heads"])
    per_layer = (h + h) + (h + kv) + (h + kv) + (h + h) + 3 * (h + inter)
    return layers * r * per_layer


def llm_activation_bytes_per_token(llm: dict) -> int:
    """The plan's per-token activation estimate with per-block checkpointing (docs/training.md): the
    saved layer inputs (layers x hidden x 2 B), one layer recomputed (~(10 hidden + 3 MLP) x 2 B) and
    the logits (vocab x (2 + 4 + 4) B: bf16, the loss's fp32 copy, its gradient)."""
    h, inter = llm["hidden_size"], llm["intermediate_size"]
    return llm["num_hidden_layers"] * h * 2 + (10 * h + 3 * inter) * 2 + llm["vocab_size"] * 10


def _unit_counts(model) -> dict[str, int]:
    """Parameter counts of the FSDP2 units (distributed.unit_sizes)."""
    from .distributed import unit_sizes

    return unit_sizes(model)


def gathered_unit_bytes(units: dict[str, int]) -> int:
    """The plan's bytes of gathered FSDP2 units at the worst moment of backward (the world size does
    not enter): the root unit's bf16 weights, bf16 gradients and fp32 reduce-scatter input (2 + 2 +
    4 B per parameter: gathered for the whole step), plus 10 B per parameter of the largest unit:
    its bf16 weights and gradients (2 + 2), the fp32 reduce-scatter input FSDP2 keeps of the unit
    reduced before it (4: it is released at the next reduction) and the next unit prefetched (2)."""
    largest = max(units[k] for k in ("head", "vision_block", "projector", "embed", "layer"))
    return 8 * units["root"] + 10 * largest


def predict(mode: str, n_trainable: int, n_frozen: int, units: dict[str, int], llm: dict, tokens: int) -> dict:
    """The plan's arithmetic (memory.plan_rows) on the counts of the model built, world size 1."""
    if mode == "lora":  # bf16 frozen base; fp32 weights + fp32 grads + AdamW (8 B) per trained parameter
        state, gathered = 2 * n_frozen + 16 * n_trainable, 0
        arith = "2 B x frozen + 16 B x trained"
    else:  # FSDP2 state (fp32 master + grads + AdamW; frozen: fp32 master only) + the gathered units
        state = 4 * n_frozen + 16 * n_trainable
        gathered = gathered_unit_bytes(units)
        arith = "16 B x trained + 4 B x frozen (1 rank) + root unit x 8 B + largest unit x 10 B"
    act = llm_activation_bytes_per_token(llm) * tokens
    return {"state_bytes": state, "gathered_bytes": gathered, "llm_activation_bytes": act,
            "peak_bytes": state + gathered + act, "arithmetic": arith + " + LLM activations per token "
            "(vision path not included)"}


# ---------------------------------------------------------------------------- one mode (subprocess)
_tensor_bytes = _local_bytes  # parameter / gradient / state bytes held locally (DTensor shards)


@dataclasses.dataclass
class _Mem:
    """Allocated / reserved bytes: the CUDA caching allocator, or on the CPU the process RSS."""
    device: object

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)

    def now(self) -> dict:
        import torch

        from .memory import peak_rss_mib

        self.sync()
        if self.cuda:
            return {"allocated": torch.cuda.memory_allocated(self.device),
                    "reserved": torch.cuda.memory_reserved(self.device),
                    "max_allocated": torch.cuda.max_memory_allocated(self.device),
                    "max_reserved": torch.cuda.max_memory_reserved(self.device)}
        rss = int(peak_rss_mib() * MIB)
        return {"allocated": None, "reserved": None, "max_allocated": rss, "max_reserved": rss}

    def reset_peak(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)


def _random_init(model) -> None:
    """Random weights, tensor by tensor on the tensor's own device (no CPU copy): matrices N(0, 0.02),
    norm weights and 0-d scalars (JBU temperature, sigma) 1, other vectors 0."""
    import torch
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for name, p in model.named_parameters():
            t = p.to_local() if isinstance(p, DTensor) else p
            if p.dim() >= 2:
                t.normal_(0, 0.02)
            elif p.dim() == 0 or name.endswith("weight") or "norm" in name:
                t.fill_(1.0)
            else:
                t.zero_()


def _write(out: str, rec: dict) -> None:
    tmp = Path(out).with_name(Path(out).name + ".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, out)


def worker(mode: str, width: str, llm_layers: int, lora_r: int, device: str, data: str, steps: int,
           out: str) -> None:
    import torch
    import torch.distributed as dist

    from hiwin_runtime.layout import layout_indices

    from ..processor import HiwinProcessor
    from .distributed import apply_fsdp, checkpoint_blocks, init_meta_buffers
    from .llm_stages import _LossModule, trainable_parameters
    from .lora import LoraSpec, add_lora, lora_trainable
    from .memory import _config

    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("measure-cuda: CUDA is not available (torch.cuda.is_available() is False); "
                             "use --device cpu for the CPU path")
        dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True  # as the recipe (--tf32, the default)
        torch.backends.cudnn.allow_tf32 = True
    mem = _Mem(dev)
    torch.manual_seed(0)
    config, tok = _config(width, llm_layers)
    from ..model import HiwinForCausalLM

    t0 = time.perf_counter()
    group = None
    if mode == "lora":
        with torch.device("meta"):
            model = HiwinForCausalLM(config, dtype=torch.bfloat16)
            add_lora(model, LoraSpec(r=lora_r, alpha=2.0 * lora_r))
        params = lora_trainable(model)
        with torch.no_grad():  # the frozen base stays bf16; what trains keeps fp32 weights
            for p in params:
                p.data = p.data.float()
        from torch.distributed._composable import checkpoint

        for b in checkpoint_blocks(model):
            checkpoint(b)
    elif mode == "full-bf16":
        with torch.device("meta"):
            model = HiwinForCausalLM(config, dtype=torch.float32)
        params = trainable_parameters(model, 2)
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    model.processor = HiwinProcessor(tok, config.slicing)
    n_trainable = sum(p.numel() for p in params)
    n_frozen = sum(p.numel() for p in model.parameters()) - n_trainable
    units = _unit_counts(model)
    if dev.type == "cuda":  # the plan's state alone would not fit: record, do not run
        need = predict(mode, n_trainable, n_frozen, units, _llm_dims(model), 0)["state_bytes"]
        total = torch.cuda.get_device_properties(dev).total_memory
        if need > total:
            _write(out, {"mode": mode, "width": width, "llm_layers": llm_layers, "skipped":
                         f"the plan's state alone is {need / GIB:.1f} GiB, the device has {total / GIB:.1f} GiB"})
            return
    root = _LossModule(model, 2, Path(data) / "images", max_slices=7, max_length=4096)
    if mode == "full-bf16":
        if not dist.is_initialized():  # FSDP2 at world size 1: a process group of its own
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                    world_size=1)
            group = True
        apply_fsdp(root, model, compute_dtype=torch.bfloat16, activation_checkpointing=True)
        root.balance = True
        root.compute_dtype = torch.bfloat16
    else:
        root.autocast = torch.bfloat16
    root.to_empty(device=dev)
    _random_init(model)
    init_meta_buffers(model)
    if mode == "full-bf16":
        with torch.no_grad():  # the frozen 0-d JBU scalars stay outside FSDP: the compute dtype
            for p in model.parameters():
                if p.dim() == 0:
                    p.data = p.data.to(torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]  # to_empty may have swapped the objects
    if sum(p.numel() for p in params) != n_trainable:
        raise RuntimeError(f"trainable parameters changed while placing the model: {n_trainable} -> "
                           f"{sum(p.numel() for p in params)}")
    model.train()
    mem.sync()
    init_s = time.perf_counter() - t0
    after_init = mem.now()

    from .common import read_json_list

    samples = read_json_list(Path(data) / "sft.json")
    seen: dict[str, int] = {}

    def count_tokens(_module, args, kwargs):
        seen["tokens"] = int(kwargs["inputs_embeds"].shape[1])

    hook = model.llm.register_forward_pre_hook(count_tokens, with_kwargs=True)
    prepared = model.processor.prepare_image(Path(data) / "images" / samples[0]["image"], max_slices=7)
    n_crops = len(prepared.crops)
    visual_tokens = len(layout_indices(prepared.grid, n_crops, config.projector.grid ** 2))
    opt = torch.optim.AdamW(params, lr=1e-5)
    mem.reset_peak()
    losses, times = [], []
    for step in range(steps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        loss = root([samples[0]])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        mem.sync()
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    hook.remove()
    peak = mem.now()
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    trainable_ids = {id(p) for p in params}
    rec = {
        "mode": mode, "width": width, "llm_layers": llm_layers, "lora_r": lora_r if mode == "lora" else None,
        "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if mem.cuda else "cpu",
        "device_total_bytes": torch.cuda.get_device_properties(dev).total_memory if mem.cuda else None,
        "torch": torch.__version__, "memory_source": "cuda-allocator" if mem.cuda else "peak-rss",
        "params": n_trainable + n_frozen, "trainable_params": n_trainable, "frozen_params": n_frozen,
        "lora_adapter_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n),
        "trainable_param_bytes": _tensor_bytes(p for p in model.parameters() if id(p) in trainable_ids),
        "frozen_param_bytes": _tensor_bytes(p for p in model.parameters() if id(p) not in trainable_ids),
        "grad_bytes": _tensor_bytes(p.grad for p in params), "optim_bytes": _tensor_bytes(state),
        "after_init": after_init, "after_steps": peak,
        "peak_allocated_bytes": peak["max_allocated"], "peak_reserved_bytes": peak["max_reserved"],
        "crops": n_crops, "visual_tokens": visual_tokens, "seq_tokens": seen.get("tokens"),
        "init_s": init_s, "step_s": times, "loss": losses, "units": units,
    }
    rec["state_bytes"] = rec["trainable_param_bytes"] + rec["frozen_param_bytes"] + rec["grad_bytes"] + \
        rec["optim_bytes"]
    rec["predicted"] = predict(mode, n_trainable, n_frozen, units, _llm_dims(model),
                               rec["seq_tokens"] or 0)
    rec["ratio_state"] = rec["state_bytes"] / rec["predicted"]["state_bytes"]
    rec["ratio_peak"] = rec["peak_allocated_bytes"] / rec["predicted"]["peak_bytes"]
    _write(out, rec)
    if group:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- driver
def _llm_dims(model) -> dict:
    c = model.llm.config
    return {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "vocab_size": c.vocab_size}


def measure(modes: list[str], width: str, llm_layers: int, lora_r: int, device: str, steps: int) -> list[dict]:
    """Each mode in its own subprocess; a mode that fails (out of memory, ...) is recorded with its error."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("measure-cuda: CUDA is not available (torch.cuda.is_available() is False); "
                             "use --device cpu --width tiny for the CPU path")
    recs = []
    with tempfile.TemporaryDirectory(prefix="hiwin-devmem-") as tmp:
        data = write_page(Path(tmp) / "data")
        for mode in modes:
            out = Path(tmp) / f"{mode}.json"
            cmd = [sys.executable, "-m", "hiwin_model.train.memory", "device-worker", "--mode", mode, "--width", width,
                   "--llm-layers", str(llm_layers), "--lora-r", str(lora_r), "--device", device, "--data", str(data),
                   "--steps", str(steps), "--out", str(out)]
            print(f"running {mode} ({width} width, {llm_layers} Llama layers, {device}) ...", file=sys.stderr,
                  flush=True)
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            r = subprocess.run(cmd, env=env, stderr=subprocess.PIPE, text=True)
            sys.stderr.write(r.stderr[-4000:] if r.returncode else "")
            if r.returncode != 0 or not out.is_file():
                recs.append({"mode": mode, "llm_layers": llm_layers, "width": width, "error":
                             f"exit {r.returncode}: " + (r.stderr.strip().splitlines() or ["(no output)"])[-1]})
                continue
            recs.append(json.loads(out.read_text()))
    return recs


def print_table(recs: list[dict]) -> None:
    ok = [r for r in recs if "error" not in r and "skipped" not in r]
    if ok:
        r0 = ok[0]
        src = "torch.cuda.max_memory_allocated/reserved" if r0["memory_source"] == "cuda-allocator" else \
            "peak RSS of the process (CPU)"
        print(f"stage-2 steps, {r0['width']} width, {r0['llm_layers']} Llama layers, {r0['device_name']}, "
              f"torch {r0['torch']}; one {PAGE[0]}x{PAGE[1]} page ({r0['crops']} crops, {r0['visual_tokens']} "
              f"visual tokens, {r0['seq_tokens']} tokens in the sequence), AdamW; peaks: {src}")
    unit, scale = ("GiB", GIB) if any(r.get("width") == "real" for r in recs) else ("MiB", MIB)
    print(f"{'mode':10s} {'params M':>9s} {'train M':>8s} {'trainW':>7s} {'frozenW':>7s} {'grads':>7s} {'AdamW':>7s} "
          f"{'init alloc':>10s} {'peak alloc':>10s} {'peak resv':>9s} {'pred peak':>9s} {'meas/pred':>9s} "
          f"{'state/pred':>10s} {'step s':>12s}   (sizes in {unit})")
    for r in recs:
        if "error" in r or "skipped" in r:
            print(f"{r['mode']:10s} {r.get('error') or 'skipped: ' + r['skipped']}")
            continue
        g = lambda b: f"{b / scale:.2f}" if b is not None else "-"  # noqa: E731
        print(f"{r['mode']:10s} {r['params'] / 1e6:9.1f} {r['trainable_params'] / 1e6:8.1f} "
              f"{g(r['trainable_param_bytes']):>7s} {g(r['frozen_param_bytes']):>7s} {g(r['grad_bytes']):>7s} "
              f"{g(r['optim_bytes']):>7s} {g(r['after_init']['allocated']):>10s} {g(r['peak_allocated_bytes']):>10s} "
              f"{g(r['peak_reserved_bytes']):>9s} {g(r['predicted']['peak_bytes']):>9s} {r['ratio_peak']:9.2f} "
              f"{r['ratio_state']:10.3f} {'/'.join(f'{t:.2f}' for t in r['step_s']):>12s}")
    for r in ok:
        p = r["predicted"]
        print(f"  {r['mode']}: predicted {p['state_bytes'] / scale:.2f} {unit} state + "
              f"{p['gathered_bytes'] / scale:.2f} gathered + {p['llm_activation_bytes'] / scale:.2f} LLM "
              f"activations ({p['arithmetic']}); "
              f"measured state {r['state_bytes'] / scale:.2f} {unit}, init {r['init_s']:.1f} s, loss "
              f"{', '.join(f'{x:.3f}' for x in r['loss'])}")
