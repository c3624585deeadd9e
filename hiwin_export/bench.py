"""``hiwin-export bench``: the vision path at real dimensions, PyTorch eager vs ONNX Runtime (CPU, fp32);
with ``--e2e tiny real-width``, the whole pipeline (time to first token, decode tokens/s) instead.

Random weights (seeded, identical in both backends) at the released sizes: CLIP ViT-L/14-336 (23
blocks), the 1024-channel JBU stack, the 4096-wide projector. Each backend runs in its own child
process so its peak RSS is its own. Per image: median wall time over repeats of each graph and of
the whole path (ViT batched per crop shape; JBU and projector per crop, as the reference does).

With ``--int4-kernel``, ONNX Runtime's int4 ``MatMulNBits`` kernel alone on the GenAI int4
decoder's weight matrices, against the memory bandwidth (:mod:`hiwin_export.int4_kernel`).

The same run measures the machine's fp32 GEMM rate (``torch.mm``) and counts each graph's FLOPs
(``torch.utils.flop_counter``: matmuls, convolutions, attention), so every time can be read against
its FLOP floor = FLOPs / GEMM rate.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hiwin_runtime.bench import Report, peak_rss_mib, timed_stages, write_json
from hiwin_runtime.arrays import NUMPY_OPS
from hiwin_runtime.crop_chain import BatchPolicy, CropChain

log = logging.getLogger("hiwin_export")
GRAPHS = ("vit", "jbu", "hiwin")
BACKENDS = ("torch", "torch-fast", "ort")


def _config(tiny: bool):
    from hiwin_model.config import HiwinConfig

    if tiny:
        from hiwin_model.tiny import tiny_config

        return tiny_config()
    return HiwinConfig()


def vision_model(config, seed: int = 0):
    """The vision path with seeded random weights (identical in every process)."""
    from hiwin_model.model import HiwinVision

    torch.manual_seed(seed)
    return HiwinVision(config).eval()


def bench_crops(width: int, height: int, max_slices: int) -> list:
    """A generated page of this size, sliced and normalised like the reference (numpy crops)."""
    from hiwin_model.synthetic import draw_scene
    from hiwin_runtime.slicing import apply_plan, normalize, plan_slices

    plan = plan_slices((width, height), max_slices)
    return [normalize(c) for c in apply_plan(draw_scene(width, height, "circle", "blue", "bench"), plan).crops]


def gemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def flop_counter(flops: dict):
    """``around`` for :func:`timed_stages`: adds each call's FLOPs (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    def around(family, fn):
        def call(*args):
            counter = FlopCounterMode(display=False)
            with counter:
                out = fn(*args)
            flops[family] = flops.get(family, 0) + counter.get_total_flops()
            return out
        return call
    return around


def worker(backend: str, export_dir: str, sizes: list[tuple[int, int]], repeats: int, tiny: bool,
           max_slices: int) -> dict:
    """One backend in this process: {image: {stage: [seconds per repeat]}, flops, peak RSS}. Every
    backend runs the same crop chain (ViT per shape group, JBU + projector per crop). ``torch`` is
    the faithful reference (the released order of operations), ``torch-fast`` the same weights with
    the fast projector, ``ort`` the exported graphs."""
    result: dict = {"backend": backend, "images": {}, "flops": {}}
    config = _config(tiny)
    if backend in ("torch", "torch-fast"):
        from hiwin_model.arrays import TORCH_OPS

        model = vision_model(config)
        model.projector.impl = "fast" if backend == "torch-fast" else "faithful"
        stages, ops, bucket_for = model.stages(), TORCH_OPS, None
        result["weights_mib"] = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    else:
        from hiwin_runtime.manifest import ExportDir
        from hiwin_runtime.ort import OnnxRunner

        export = ExportDir(export_dir)
        stages = OnnxRunner(export, threads=torch.get_num_threads()).vision_stages()
        result["projector_impl"] = next(g.get("projector_impl", "faithful") for g in export.graphs.values()
                                        if g.get("family") == "hiwin")
        ops, bucket_for = NUMPY_OPS, export.bucket_for
    for w, h in sizes:
        crops = bench_crops(w, h, max_slices)
        key = f"{w}x{h}"
        runs = []
        for r in range(repeats + 1):  # the first run warms up (allocations, ORT session creation)
            times: dict = {}
            flops: dict = {}
            around = flop_counter(flops) if backend != "ort" and r == 0 else None
            chain = CropChain(timed_stages(stages, times, around=around), patch_size=config.vision.patch_size,
                              ops=ops, policy=BatchPolicy(None, 1), bucket_for=bucket_for)
            with torch.no_grad():
                chain.encode_crops(crops)
            if around is not None:
                result["flops"][key] = flops
            if r:
                runs.append(times)
        result["images"][key] = {g: [t[g] for t in runs] for g in GRAPHS}
        result["images"][key]["crops"] = len(crops)
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def _run_child(backend: str, export_dir: str, a) -> dict:
    cmd = [sys.executable, "-m", "hiwin_export.bench", "--worker", backend, "--export", export_dir,
           "--repeats", str(a.repeats), "--max-slices", str(a.max_slices), "--sizes", *a.sizes]
    if a.tiny:
        cmd.append("--tiny")
    log.info("running %s ...", backend)
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if r.returncode:
        raise RuntimeError(f"{backend} worker failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(a) -> Report:
    if a.int4_kernel:
        from .int4_kernel import run_int4_kernel

        if a.tiny:  # the structure at toy sizes (a smoke test: the numbers mean nothing)
            return run_int4_kernel(hidden=256, intermediate=512, vocab=1000, layers=1, repeats=3, cached_repeats=3,
                                   bandwidth=lambda: memory_bandwidth_gbs(16, 3))
        return run_int4_kernel(layers=a.llm_layers)
    if a.e2e:
        return run_e2e(a)
    with tempfile.TemporaryDirectory(prefix="hiwin-bench-") as tmp:
        export_dir = a.export
        if export_dir is None:
            from .export import export_model

            log.info("exporting the %s vision graphs (fp32, random weights) ...", "tiny" if a.tiny else "real-size")
            export_dir = str(Path(tmp) / "graphs")
            export_model(vision_model(_config(a.tiny)), export_dir, bundles=False, parity=None,
                          precisions=("fp32",))
        gemm = gemm_gflops()
        res = {b: _run_child(b, export_dir, a) for b in BACKENDS}
    return format_table(res, gemm, a)


def format_table(res: dict, gemm: float, a) -> Report:
    """Per image and stage: FLOPs of both projector forms, seconds of the faithful reference, of
    the fast PyTorch form and of ONNX Runtime, and the ratios against each other and against the
    FLOP floor (FLOPs / the GEMM rate measured in the same run) of what each one computes."""
    t, f, o = res["torch"], res["torch-fast"], res["ort"]
    ort_form = o.get("projector_impl", "faithful")
    rep = Report(f"vision path, {'tiny' if a.tiny else 'real'} dimensions, random weights, fp32, CPU "
                 f"({torch.get_num_threads()} threads); median of {a.repeats}; fp32 GEMM rate {gemm:.1f} GFLOP/s; "
                 f"ONNX graphs compute the {ort_form} projector",
                 [("image", "image"), ("stage", "stage"), ("gflop", "GFLOP faithful"), ("gflop_fast", "GFLOP fast"),
                  ("ref_s", "PyTorch faithful s"), ("fast_s", "PyTorch fast s"), ("ort_s", "ORT s"),
                  ("ort_over_ref", "ORT/faithful"), ("ort_over_fast", "ORT/fast"),
                  ("fast_over_floor", "fast/floor"), ("ort_over_floor", "ORT/floor")],
                 meta={"gemm_gflops": gemm, "threads": torch.get_num_threads(), "repeats": a.repeats,
                       "ort_projector_impl": ort_form, "weights_mib": t["weights_mib"],
                       "peak_rss_mib": {b: res[b]["peak_rss_mib"] for b in res}})

    def row(img, stage, fl, fl_fast, rt, ft, ot):
        floor_fast, floor_ort = fl_fast / (gemm * 1e9), (fl_fast if ort_form == "fast" else fl) / (gemm * 1e9)
        rep.add(image=img, stage=stage, gflop=round(fl / 1e9, 1), gflop_fast=round(fl_fast / 1e9, 1), ref_s=rt,
                fast_s=ft, ort_s=ot, ort_over_ref=ot / rt, ort_over_fast=ot / ft,
                fast_over_floor=ft / floor_fast if floor_fast else None,
                ort_over_floor=ot / floor_ort if floor_ort else None)

    for img in t["images"]:
        label = f"{img} ({t['images'][img]['crops']} crops)"
        tot = [0, 0, 0.0, 0.0, 0.0]
        for g in GRAPHS:
            cols = [t["flops"][img].get(g, 0), f["flops"][img].get(g, 0),
                    *(statistics.median(r["images"][img][g]) for r in (t, f, o))]
            row(label, g, *cols)
            tot = [x + y for x, y in zip(tot, cols)]
        row(label, "**whole path**", *tot)
    rep.notes.append("peak RSS: " + ", ".join(f"{n} {res[b]['peak_rss_mib']:.0f} MiB" for b, n in
                                              (("torch", "PyTorch faithful"), ("torch-fast", "PyTorch fast"),
                                               ("ort", "ONNX Runtime"))) + f" (fp32 weights {t['weights_mib']:.0f} MiB)")
    return rep


# ---------------------------------------------------------------------------------- end to end
def e2e_model(kind: str, llm_layers: int = 2, seed: int = 0):
    """``tiny``: the tiny test model; ``real-width``: released widths everywhere (CLIP ViT-L/14-336,
    1024-channel JBU, 4096-wide projector and Llama, 11008 MLP, 32 heads, 32000 vocab) with
    ``llm_layers`` decoder layers instead of 32. Random weights, seeded (same in every process);
    the tiny byte-level tokenizer (ids beyond it decode to nothing)."""
    from hiwin_model.config import HiwinConfig
    from hiwin_model.model import HiwinForCausalLM
    from hiwin_model.processor import HiwinProcessor
    from hiwin_model.tiny import TINY_CONFIG, build_tiny_model, build_tokenizer

    if kind == "tiny":
        return build_tiny_model(seed)
    if kind != "real-width":
        raise ValueError(f"unknown configuration {kind!r} (tiny, real-width)")
    d = {k: v for k, v in TINY_CONFIG.items() if k not in ("hiwin_vision_config", "hiwin_projector_num_heads")}
    d.update(hidden_size=4096, intermediate_size=11008, num_hidden_layers=llm_layers, num_attention_heads=32,
             num_key_value_heads=32, mm_hidden_size=1024, vocab_size=32000, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)
    torch.manual_seed(seed)
    model = HiwinForCausalLM(HiwinConfig.from_dict(d)).eval()
    model.processor = HiwinProcessor(build_tokenizer(), model.config.slicing)
    return model


def onnx_weight_bytes(path: str | os.PathLike, *, skip=("embed_tokens", "cos_cache", "sin_cache")) -> int:
    """Bytes of a graph's initializers as stored (external data included; int4 ``MatMulNBits`` counts
    its packed weights, scales and zero points), without the embedding table: what one decoding step
    reads from memory at least (rotary cos/sin tables excluded too: one row per token)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in m.graph.initializer:
        if any(k in t.name for k in skip):
            continue
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next(e.value for e in t.external_data if e.key == "length"))
        elif t.raw_data:
            total += len(t.raw_data)
        else:
            import numpy as np
            from onnx import helper

            n = int(np.prod(t.dims)) if t.dims else 1
            total += n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return total


def decoder_weight_bytes(backend: str, path: str, pipe) -> int:
    """Weight bytes a decoding step reads: every decoder weight incl. lm_head at its stored precision
    (the embedding table excluded: one row per token)."""
    if backend == "torch":
        return sum(p.numel() * p.element_size() for n, p in pipe.backend.model.llm.named_parameters()
                   if "embed_tokens" not in n)
    if backend.startswith("genai"):
        d = Path(path).parent / backend
        cfg = json.loads((d / "genai_config.json").read_text())
        return onnx_weight_bytes(d / cfg["model"]["decoder"]["filename"])
    from hiwin_runtime.graph_id import GraphId

    export = pipe.backend.export
    return onnx_weight_bytes(export.graph_path(GraphId(export.manifest["language"]["decoder_graph"], None, "fp32")))


def onnx_kv_bytes_per_position(path: str | os.PathLike, head_dim: int | None = None) -> int:
    """Bytes the KV cache holds per position, from a decoder graph's ``past_key_values.*`` inputs
    (their static head axis, head-dim axis and element type): what a decoding step reads per cached
    position (our llm.onnx and the GenAI builder's decoder name them alike; the builder leaves the
    head-dim axis symbolic: pass ``head_dim`` from its genai_config.json)."""
    import numpy as np
    import onnx
    from onnx import helper

    m = onnx.load(str(path), load_external_data=False)
    total = 0
    for i in m.graph.input:
        if not i.name.startswith("past_key_values."):
            continue
        t = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if len(dims) == 4 and dims[3] is None:
            dims[3] = head_dim
        if len(dims) != 4 or dims[1] is None or dims[3] is None:
            raise ValueError(f"{path}: {i.name} is not [batch, kv_heads, past, head_dim] with static heads: {dims}")
        total += dims[1] * dims[3] * np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).itemsize
    if not total:
        raise ValueError(f"{path}: no past_key_values.* inputs")
    return total


def kv_bytes_per_position(backend: str, path: str, pipe) -> int:
    """KV-cache bytes per cached position of the backend's decoder (keys and values, every layer)."""
    if backend == "torch":
        c = pipe.backend.model.llm.config
        heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return 2 * c.num_hidden_layers * heads * head_dim * next(pipe.backend.model.llm.parameters()).element_size()
    if backend.startswith("genai"):
        d = Path(path).parent / backend
        cfg = json.loads((d / "genai_config.json").read_text())
        dec = cfg["model"]["decoder"]
        return onnx_kv_bytes_per_position(d / dec["filename"], head_dim=dec.get("head_size"))
    from hiwin_runtime.graph_id import GraphId

    export = pipe.backend.export
    return onnx_kv_bytes_per_position(export.graph_path(GraphId(export.manifest["language"]["decoder_graph"], None,
                                                                "fp32")))


def mean_kv_read_bytes(kv_per_position: int, prompt_tokens: int, new_tokens: int) -> float:
    """KV bytes one decoding step reads, averaged over the steps: the first new token comes from the
    prefill, step ``k`` (1 .. new_tokens - 1) attends over ``prompt_tokens + k`` positions."""
    if new_tokens < 2:
        return 0.0
    return kv_per_position * (prompt_tokens + new_tokens / 2)


def memory_bandwidth_samples(mib: int = 512, repeats: int = 9) -> list[float]:
    """Streaming read rates of this machine, GB/s: ``repeats`` sums over a float32 buffer far larger
    than any cache (torch, all its threads)."""
    a = torch.ones(mib * 2**20 // 4)
    a.sum()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        out.append(a.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return out


def memory_bandwidth_gbs(mib: int = 512, repeats: int = 9) -> float:
    """The median of :func:`memory_bandwidth_samples`. The median, not the best: on the shared
    virtual machines we measure on, single reads reach 1.5x the typical rate now and then (measured:
    eight reads 41-44 GB/s and one 72.5), which a decode loop does not see for long."""
    import statistics

    return statistics.median(memory_bandwidth_samples(mib, repeats))


def e2e_worker(backend: str, path: str, kind: str, llm_layers: int, sizes: list[tuple[int, int]],
               new_tokens: int, repeats: int, agree_tokens: int = 0, agree_dir: str | None = None) -> dict:
    """One backend in this process: per image, median TTFT / vision / prefill and decode rate; with
    ``agree_tokens``, one more greedy run of that many tokens whose token ids are returned and whose
    first logits (the prompt's last position) go to ``agree_dir/<backend>-<image>.npy``."""
    import numpy as np
    from hiwin_model.synthetic import draw_scene

    from hiwin_runtime.pipeline import Pipeline

    if backend == "torch":
        pipe = Pipeline.from_model(e2e_model(kind, llm_layers))
    elif backend.startswith("genai"):  # the language half on ONNX Runtime GenAI (genai-fp32, genai-int4)
        pipe = Pipeline.from_export(path, threads=torch.get_num_threads(), language="genai",
                                    genai=str(Path(path).parent / backend))
    else:
        pipe = Pipeline.from_export(path, threads=torch.get_num_threads(), language="onnxruntime")
    out: dict = {"backend": backend, "images": {}, "weight_bytes": decoder_weight_bytes(backend, path, pipe),
                 "kv_bytes_per_position": kv_bytes_per_position(backend, path, pipe)}
    for w, h in sizes:
        img = draw_scene(w, h, "square", "green", "bench")
        runs = []
        for r in range(repeats + 1):  # the first run warms up
            ans = pipe.generate(img, "What is in the image?", max_new_tokens=new_tokens, ignore_eos=True)
            if r:
                runs.append(ans)
        out["images"][f"{w}x{h}"] = {
            "prompt_tokens": runs[0].prompt_tokens, "visual_tokens": runs[0].visual_tokens,
            "new_tokens": len(runs[0].token_ids), "token_ids": runs[0].token_ids,
            **{k: statistics.median(a.timings[k] for a in runs) for k in ("vision_s", "prefill_s", "ttft_s")},
            "decode_tok_s": statistics.median(a.decode_tokens_per_s for a in runs)}
        if agree_tokens:
            ans = pipe.generate(img, "What is in the image?", max_new_tokens=agree_tokens, ignore_eos=True,
                                keep_logits=True)
            out["images"][f"{w}x{h}"]["agree_token_ids"] = ans.token_ids
            np.save(Path(agree_dir) / f"{backend}-{w}x{h}.npy", np.asarray(ans.logits[0], np.float32))
    out["peak_rss_mib"] = peak_rss_mib()
    # this worker's own floor: the bandwidth right after its timed runs (it drifts minute to minute)
    out["bandwidth_gbs"] = memory_bandwidth_gbs(repeats=5)
    return out


E2E_COLUMNS = [("config", "config"), ("image", "image"), ("prompt", "prompt tokens (visual)"),
               ("backend", "backend"), ("vision_s", "vision s"), ("prefill_s", "prefill s"), ("ttft_s", "TTFT s"),
               ("decode_tok_s", "decode tok/s"), ("weight_mib", "weights read/token MiB"),
               ("floor_tok_s", "bandwidth floor tok/s"), ("of_floor", "decode ÷ floor"),
               ("kv_mib", "KV read/token MiB (mean)"), ("of_floor_kv", "decode ÷ floor with KV"),
               ("vs_ort", "decode ÷ ORT loop (same round)"), ("decode_rounds", "decode tok/s per round"),
               ("peak_rss_mib", "peak RSS MiB"), ("same_tokens", "same tokens as PyTorch")]
AGREE_COLUMNS = [("config", "config"), ("image", "image"), ("backend", "backend"), ("reference", "reference"),
                 ("lead", "same tokens until the first divergence"), ("matches", "matching positions"),
                 ("cosine", "logits cosine (prompt's last position)")]
# (backend, reference) pairs of the agreement report
AGREE_PAIRS = (("ort", "torch"), ("genai-fp32", "torch"), ("genai-fp16", "genai-fp32"), ("genai-int4", "genai-fp32"))


def run_e2e(a) -> list[Report]:
    import statistics

    bw_samples = memory_bandwidth_samples()
    bw = statistics.median(bw_samples)
    rep = Report(f"end to end (image + question -> {a.new_tokens} new tokens, greedy, EOS ignored), random "
                 f"weights, fp32, CPU ({torch.get_num_threads()} threads); median of {a.repeats}; real-width = "
                 f"released widths, {a.llm_layers} of 32 Llama layers; memory bandwidth {bw:.1f} GB/s (streaming "
                 f"read, median of {len(bw_samples)} in the same run, {min(bw_samples):.0f}-{max(bw_samples):.0f}); floor = bandwidth / decoder weight bytes", E2E_COLUMNS,
                 meta={"threads": torch.get_num_threads(), "repeats": a.repeats, "new_tokens": a.new_tokens,
                       "bandwidth_gbs": bw, "bandwidth_samples_gbs": [round(x, 1) for x in bw_samples]})
    agree = Report(f"greedy agreement over {a.agree_tokens} new tokens (EOS ignored) and logits cosine at the "
                   f"prompt's last position", AGREE_COLUMNS, meta={"tokens": a.agree_tokens})
    rep.notes.append("weights read/token: every decoder weight incl. lm_head as stored (int4: packed weights + "
                     "scales + zero points), embedding table excluded. The floor counts weights only; 'floor with KV' "
                     "adds the KV cache a step reads (every layer's keys and values at their stored type, over the "
                     "prompt plus half the new tokens, the mean context of the decode steps)")
    if a.rounds > 1:
        rep.notes.append(f"{a.rounds} rounds, backends in alternation: timings are medians over rounds; the floor "
                         "and decode ÷ floor use the bandwidth each worker measured right after its own runs (median "
                         "over rounds); decode ÷ ORT loop is the median of the per-round ratios")
    for kind in a.e2e:
        with tempfile.TemporaryDirectory(prefix="hiwin-bench-e2e-") as tmp:
            agree_dir = Path(tmp) / "agree"
            agree_dir.mkdir()
            log.info("exporting the %s model (fp32, random weights, no parity run) ...", kind)
            path = str(Path(tmp) / "export")
            # in a child process: the exporter's graph copies of the weights never return to the OS
            block = ["--int4-block-size", str(a.int4_block_size)] if a.int4_block_size else []
            r = subprocess.run([sys.executable, "-m", "hiwin_export.bench", "--e2e-export", path, "--e2e", kind,
                                "--llm-layers", str(a.llm_layers), "--genai", *a.genai, *block],
                               stderr=subprocess.PIPE, text=True)
            if r.returncode:
                raise RuntimeError(f"export failed:\n{r.stderr[-4000:]}")
            backends = ("torch", "ort", *(f"genai-{p}" for p in a.genai))
            rounds: dict[str, list[dict]] = {b: [] for b in backends}
            for rnd in range(a.rounds):  # backends in alternation: every round sees the same machine phase
                for b in backends:
                    agree_n = a.agree_tokens if rnd == 0 else 0
                    cmd = [sys.executable, "-m", "hiwin_export.bench", "--e2e-worker", b, "--export", path,
                           "--e2e", kind, "--llm-layers", str(a.llm_layers), "--new-tokens", str(a.new_tokens),
                           "--repeats", str(a.repeats), "--sizes", *a.sizes, "--agree-tokens", str(agree_n),
                           "--agree-dir", str(agree_dir)]
                    log.info("running %s (%s), round %d of %d ...", b, kind, rnd + 1, a.rounds)
                    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
                    if r.returncode:
                        raise RuntimeError(f"{b} worker failed:\n{r.stderr[-4000:]}")
                    rounds[b].append(json.loads(r.stdout.strip().splitlines()[-1]))
            res = merge_rounds(rounds)
            if a.agree_tokens:
                format_agreement(kind, res, agree_dir, agree)
        format_e2e(kind, res, rep, bandwidth_gbs=bw)
    return [rep, agree] if a.agree_tokens else [rep]


def merge_rounds(rounds: dict[str, list[dict]]) -> dict:
    """Per backend, the worker results of every round -> one result: the first round's tokens (and
    agreement ids), the median of each timing over rounds, the rounds' decode rates and bandwidths
    (``decode_rounds`` / ``bandwidth_rounds``) and the median over rounds of decode ÷ that round's
    own floor (``of_floor``; needs ``bandwidth_gbs`` from each worker). With ``ort`` present, each
    row also gets ``vs_ort``: the median over rounds of its decode rate ÷ the ORT loop's in the same
    round (backends alternate, so a round's ratio is taken in one machine phase)."""
    out = {}
    for b, rs in rounds.items():
        first = rs[0]
        m = {**first, "images": {}, "peak_rss_mib": max(r["peak_rss_mib"] for r in rs)}
        for img, r0 in first["images"].items():
            per = [r["images"][img] for r in rs]
            row = {**r0, **{k: statistics.median(p[k] for p in per) for k in ("vision_s", "prefill_s", "ttft_s",
                                                                                  "decode_tok_s")}}
            row["decode_rounds"] = [round(p["decode_tok_s"], 2) for p in per]
            bws = [r.get("bandwidth_gbs") for r in rs]
            if first.get("weight_bytes") and all(bws):
                row["bandwidth_rounds"] = [round(x, 1) for x in bws]
                row["floor_tok_s"] = statistics.median(w * 1e9 / first["weight_bytes"] for w in bws)
                row["of_floor"] = statistics.median(p["decode_tok_s"] * first["weight_bytes"] / (w * 1e9)
                                                    for p, w in zip(per, bws))
                if first.get("kv_bytes_per_position"):
                    kv = mean_kv_read_bytes(first["kv_bytes_per_position"], r0["prompt_tokens"], r0["new_tokens"])
                    row["kv_read_bytes"] = kv
                    row["of_floor_kv"] = statistics.median(p["decode_tok_s"] * (first["weight_bytes"] + kv) / (w * 1e9)
                                                           for p, w in zip(per, bws))
            if "ort" in rounds:
                row["vs_ort"] = statistics.median(p["decode_tok_s"] / o["images"][img]["decode_tok_s"]
                                                  for p, o in zip(per, rounds["ort"]))
            m["images"][img] = row
        out[b] = m
    return out


def format_agreement(kind: str, res: dict, agree_dir: Path, rep: Report) -> Report:
    import numpy as np

    for img in res["torch"]["images"]:
        for b, ref in AGREE_PAIRS:
            if b not in res or ref not in res:
                continue
            got, want = res[b]["images"][img]["agree_token_ids"], res[ref]["images"][img]["agree_token_ids"]
            x = np.load(agree_dir / f"{b}-{img}.npy").astype(np.float64)
            y = np.load(agree_dir / f"{ref}-{img}.npy").astype(np.float64)
            lead = next((i for i, (p, q) in enumerate(zip(got, want)) if p != q), min(len(got), len(want)))
            rep.add(config=kind, image=img, backend=b, reference=ref, lead=f"{lead} of {len(want)}",
                    matches=f"{sum(p == q for p, q in zip(got, want))} of {len(want)}",
                    cosine=f"{float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))):.6f}")
    return rep


def format_e2e(kind: str, res: dict, rep: Report | None = None, *, bandwidth_gbs: float | None = None) -> Report:
    rep = rep or Report(f"end to end ({kind})", E2E_COLUMNS)
    for img, t in res["torch"]["images"].items():
        names = {"torch": "PyTorch", "ort": "ONNX Runtime", **{b: f"ORT + GenAI {b[6:]} (language)" for b in res
                                                                 if b.startswith("genai-")}}
        for b, name in names.items():
            if b not in res:
                continue
            r = res[b]["images"][img]
            same = "-" if b == "torch" else _agreement(r["token_ids"], t["token_ids"])
            wb = res[b].get("weight_bytes")
            floor = r.get("floor_tok_s") or (bandwidth_gbs * 1e9 / wb if (wb and bandwidth_gbs) else None)
            of_floor = r.get("of_floor", r["decode_tok_s"] / floor if floor else None)
            kvb = res[b].get("kv_bytes_per_position")
            kv = r.get("kv_read_bytes", mean_kv_read_bytes(kvb, r["prompt_tokens"], r["new_tokens"]) if kvb else None)
            of_floor_kv = r.get("of_floor_kv", r["decode_tok_s"] * (wb + kv) / (bandwidth_gbs * 1e9)
                                if (kv is not None and wb and bandwidth_gbs) else None)
            rep.add(config=kind, image=img, prompt=f"{r['prompt_tokens']} ({r['visual_tokens']})", backend=name,
                    vision_s=r["vision_s"], prefill_s=r["prefill_s"], ttft_s=r["ttft_s"],
                    decode_tok_s=round(r["decode_tok_s"], 1), weight_mib=round(wb / 2**20, 1) if wb else None,
                    floor_tok_s=round(floor, 1) if floor else None,
                    of_floor=round(of_floor, 2) if of_floor else None,
                    kv_mib=round(kv / 2**20, 1) if kv is not None else None,
                    of_floor_kv=round(of_floor_kv, 2) if of_floor_kv else None,
                    vs_ort=round(r["vs_ort"], 2) if "vs_ort" in r else None,
                    decode_rounds=" / ".join(f"{x:.1f}" for x in r["decode_rounds"]) if "decode_rounds" in r else None,
                    peak_rss_mib=round(res[b]["peak_rss_mib"]), same_tokens=same)
    return rep


def _agreement(tokens: list[int], ref: list[int]) -> str:
    """``yes`` when the greedy tokens equal the reference's, else how many lead before the first difference."""
    if tokens == ref:
        return "yes"
    n = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), min(len(tokens), len(ref)))
    return f"NO (first {n} of {len(ref)})"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--export", help="existing fp32 export directory (default: export random real-size graphs)")
    p.add_argument("--sizes", nargs="+", default=["1008x672", "336x336"], help="image sizes WxH")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-slices", type=int, default=9)
    p.add_argument("--tiny", action="store_true", help="tiny dimensions (smoke test)")
    p.add_argument("--e2e", nargs="+", choices=["tiny", "real-width"],
                   help="end-to-end rows instead (time to first token, decode tokens/s) for these configurations")
    p.add_argument("--llm-layers", type=int, default=2, help="Llama layers of the real-width configuration")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per end-to-end run")
    p.add_argument("--rounds", type=int, default=1,
                   help="with --e2e: run every backend this many times in alternation (torch, ort, genai..., "
                        "torch, ...); rows report medians over rounds, each decode rate against the floor and the "
                        "ORT loop of its own round")
    p.add_argument("--json", help="also write the report's rows as JSON to this file")
    p.add_argument("--genai", nargs="*", default=[], choices=["fp32", "fp16", "int4"],
                   help="with --e2e: also rows with the language half on ONNX Runtime GenAI at these precisions")
    p.add_argument("--int4-block-size", type=int, choices=[16, 32, 64, 128, 256],
                   help="with --genai int4: the MatMulNBits block size (default: the builder's 32)")
    p.add_argument("--int4-kernel", action="store_true",
                   help="instead: ONNX Runtime's int4 MatMulNBits kernel alone on the int4 decoder's weight matrices "
                        "(real width, --llm-layers), blocks 32 and 128, accuracy levels 4 and 1, against the "
                        "streaming-read bandwidth and its in-cache rate (docs/genai.md)")
    p.add_argument("--agree-tokens", type=int, default=64,
                   help="with --e2e: greedy tokens of the agreement report (0: no report)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hiwin-export bench", description=__doc__)
    add_args(ap)
    ap.add_argument("--worker", choices=list(BACKENDS), help=argparse.SUPPRESS)
    ap.add_argument("--e2e-worker", choices=["torch", "ort", "genai-fp32", "genai-fp16", "genai-int4"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--e2e-export", help=argparse.SUPPRESS)
    ap.add_argument("--agree-dir", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.e2e_export:
        from .export import export_model

        model = e2e_model(a.e2e[0], a.llm_layers)
        export_model(model, a.e2e_export, bundles=False, parity=None, precisions=("fp32",))
        for p in a.genai:  # next to the export: <dir>/../genai-<precision>
            from .genai import build_genai

            build_genai(Path(a.e2e_export).parent / f"genai-{p}", model=model, precision=p,
                        int4_block_size=a.int4_block_size if p == "int4" else None)
        return 0
    if a.e2e_worker:
        sizes = [tuple(int(x) for x in s.split("x")) for s in a.sizes]
        print(json.dumps(e2e_worker(a.e2e_worker, a.export, a.e2e[0], a.llm_layers, sizes, a.new_tokens,
                                    a.repeats, a.agree_tokens, a.agree_dir)))
        return 0
    if a.worker:
        sizes = [tuple(int(x) for x in s.split("x")) for s in a.sizes]
        print(json.dumps(worker(a.worker, a.export, sizes, a.repeats, a.tiny, a.max_slices)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for name in ("onnxscript", "onnx_ir", "onnxruntime.transformers.float16"):
        logging.getLogger(name).setLevel(logging.WARNING)
    report(a)
    return 0


def report(a) -> None:
    """Run, print the markdown table, and write ``--json`` if asked."""
    reps = run(a)
    reps = reps if isinstance(reps, list) else [reps]
    print("\n\n".join(r.markdown() for r in reps))
    if a.json:
        write_json(reps, a.json)


if __name__ == "__main__":
    sys.exit(main())
