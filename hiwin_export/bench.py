"""``hiwin-export bench``: the vision path at real dimensions, PyTorch eager vs ONNX Runtime (CPU, fp32);
with ``--e2e tiny real-width``, the whole pipeline (time to first token, decode tokens/s) instead.

Random weights (seeded, identical in both backends) at the released sizes: CLIP ViT-L/14-336 (23
blocks), the 1024-channel JBU stack, the 4096-wide projector. Each backend runs in its own child
process so its peak RSS is its own. Per image: median wall time over repeats of each graph and of
the whole path (ViT batched per crop shape; JBU and projector per crop, as the reference does).

The same run measures the machine's fp32 GEMM rate (``torch.mm``) and counts each graph's FLOPs
(``torch.utils.flop_counter``: matmuls, convolutions, attention), so every time can be read against
its FLOP floor = FLOPs / GEMM rate.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("hiwin_export")
GRAPHS = ("vit", "jbu", "hiwin")


class VisionOnly(nn.Module):
    """The three exported stages of a model (no LLM), enough for export and benchmarking."""

    def __init__(self, config, seed: int = 0):
        super().__init__()
        from hiwin_model.jbu import JBUStack
        from hiwin_model.projector import HiwinProjector
        from hiwin_model.vision import VisionTower

        torch.manual_seed(seed)
        self.config = config
        self.vision_tower = VisionTower(config.vision)
        j, p = config.jbu, config.projector
        self.jbu = JBUStack(j.dim, j.key_dim, j.radius, j.fixup_scale)
        self.projector = HiwinProjector(p.dim, p.vision_dim, p.num_heads, p.grid, p.eps)
        self.eval()


def _real_config(tiny: bool):
    from hiwin_model.config import HiwinConfig

    if tiny:
        from hiwin_model.tiny import tiny_config

        return tiny_config()
    return HiwinConfig()


def _crops(width: int, height: int, max_slices: int):
    from hiwin_model.demo import draw_scene
    from hiwin_model.slicing import apply_plan, normalize, plan_slices

    plan = plan_slices((width, height), max_slices)
    crops = [normalize(c) for c in apply_plan(draw_scene(width, height, "circle", "blue", "bench"), plan).crops]
    groups: dict = {}
    for i, c in enumerate(crops):
        groups.setdefault(tuple(c.shape[-2:]), []).append(i)
    return [torch.stack([crops[i] for i in idx]) for idx in groups.values()]


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM; unlike ru_maxrss it does not carry over across fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def _torch_path(model, batches, times: dict, flops: dict | None = None) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    def timed(key, fn, *args):
        counter = FlopCounterMode(display=False) if flops is not None else None
        t = time.perf_counter()
        if counter is not None:
            with counter:
                out = fn(*args)
            flops[key] = flops.get(key, 0) + counter.get_total_flops()
        else:
            out = fn(*args)
        times[key] = times.get(key, 0.0) + time.perf_counter() - t
        return out

    with torch.no_grad():
        for pix in batches:
            f1 = timed("vit", model.vision_tower, pix)
            for j in range(pix.shape[0]):
                f2, f4 = timed("jbu", model.jbu, f1[j:j + 1], pix[j:j + 1])
                timed("hiwin", model.projector, [f1[j:j + 1], f2, f4])


def _ort_path(runner, export, batches, times: dict) -> None:
    def timed(key, graph, feeds):
        t = time.perf_counter()
        out = runner.run(graph, feeds)
        times[key] = times.get(key, 0.0) + time.perf_counter() - t
        return out

    p = export.manifest["shape_ranges"]["patch_size"]
    for pix in batches:
        x = pix.numpy()
        f1 = timed("vit", "vit", {"pixel_values": x})["features"]
        bucket = export.hiwin_graph_for(x.shape[2] // p, x.shape[3] // p)
        for j in range(x.shape[0]):
            o = timed("jbu", "jbu", {"features": f1[j:j + 1], "pixel_values": x[j:j + 1]})
            timed("hiwin", bucket, {"feat1x": f1[j:j + 1], "feat2x": o["feat2x"], "feat4x": o["feat4x"]})


def worker(backend: str, export_dir: str, sizes: list[tuple[int, int]], repeats: int, tiny: bool,
           max_slices: int) -> dict:
    """One backend in this process: {image: {graph: [seconds per repeat]}, flops, peak RSS}."""
    cfg = _real_config(tiny)
    result: dict = {"backend": backend, "images": {}, "flops": {}}
    if backend == "torch":
        model = VisionOnly(cfg)
    else:
        from .manifest import ExportDir
        from .parity import OnnxRunner

        export = ExportDir(export_dir)
        runner = OnnxRunner(export, threads=torch.get_num_threads())
    for w, h in sizes:
        batches = _crops(w, h, max_slices)
        key = f"{w}x{h}"
        runs = []
        for r in range(repeats + 1):  # the first run warms up (allocations, ORT session creation)
            times: dict = {}
            if backend == "torch":
                flops = {} if r == 0 else None
                _torch_path(model, batches, times, flops)
                if flops is not None:
                    result["flops"][key] = flops
            else:
                _ort_path(runner, export, batches, times)
            if r:
                runs.append(times)
        result["images"][key] = {g: [t[g] for t in runs] for g in GRAPHS}
        result["images"][key]["crops"] = sum(b.shape[0] for b in batches)
    result["peak_rss_mib"] = peak_rss_mib()
    result["weights_mib"] = (sum(p.numel() for p in model.parameters()) * 4 / 2**20
                             if backend == "torch" else None)
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


def run(a) -> str:
    if a.e2e:
        return run_e2e(a)
    with tempfile.TemporaryDirectory(prefix="hiwin-bench-") as tmp:
        export_dir = a.export
        if export_dir is None:
            from .export import export_model

            log.info("exporting the %s vision graphs (fp32, random weights) ...", "tiny" if a.tiny else "real-size")
            export_dir = str(Path(tmp) / "graphs")
            export_model(VisionOnly(_real_config(a.tiny)), export_dir, bundles=False, parity=None,
                          precisions=("fp32",))
        gemm = gemm_gflops()
        res = {b: _run_child(b, export_dir, a) for b in ("torch", "ort")}
    return format_table(res, gemm, a)


def format_table(res: dict, gemm: float, a) -> str:
    t, o = res["torch"], res["ort"]
    lines = [f"vision path, {'tiny' if a.tiny else 'real'} dimensions, random weights, fp32, CPU "
             f"({torch.get_num_threads()} threads); median of {a.repeats}; fp32 GEMM rate {gemm:.1f} GFLOP/s",
             "", "| image | stage | GFLOP | floor s | PyTorch s | ORT s | ORT/PyTorch | PyTorch/floor | ORT/floor |",
             "|---|---|---|---|---|---|---|---|---|"]
    for img in t["images"]:
        crops = t["images"][img]["crops"]
        tot = {"torch": 0.0, "ort": 0.0, "flops": 0}
        for g in GRAPHS:
            pt, ot = statistics.median(t["images"][img][g]), statistics.median(o["images"][img][g])
            fl = t["flops"][img].get(g, 0)
            tot["torch"] += pt
            tot["ort"] += ot
            tot["flops"] += fl
            floor = fl / (gemm * 1e9)
            lines.append(f"| {img} ({crops} crops) | {g} | {fl / 1e9:.1f} | {floor:.2f} | {pt:.2f} | {ot:.2f} | "
                         f"{ot / pt:.2f} | {pt / floor:.2f} | {ot / floor:.2f} |")
        floor = tot["flops"] / (gemm * 1e9)
        lines.append(f"| {img} ({crops} crops) | **whole path** | {tot['flops'] / 1e9:.1f} | {floor:.2f} | "
                     f"{tot['torch']:.2f} | {tot['ort']:.2f} | {tot['ort'] / tot['torch']:.2f} | "
                     f"{tot['torch'] / floor:.2f} | {tot['ort'] / floor:.2f} |")
    lines += ["", f"peak RSS: PyTorch {t['peak_rss_mib']:.0f} MiB, ONNX Runtime {o['peak_rss_mib']:.0f} MiB "
                  f"(fp32 weights {t['weights_mib']:.0f} MiB)"]
    return "\n".join(lines)


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


def e2e_worker(backend: str, path: str, kind: str, llm_layers: int, sizes: list[tuple[int, int]],
               new_tokens: int, repeats: int) -> dict:
    """One backend in this process: per image, median TTFT / vision / prefill and decode rate."""
    from hiwin_model.demo import draw_scene

    from .runtime import Pipeline

    if backend == "torch":
        pipe = Pipeline.from_model(e2e_model(kind, llm_layers))
    else:
        pipe = Pipeline.from_export(path, threads=torch.get_num_threads())
    out: dict = {"backend": backend, "images": {}}
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
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def run_e2e(a) -> str:
    lines = [f"end to end (image + question -> {a.new_tokens} new tokens, greedy, EOS ignored), random "
             f"weights, fp32, CPU ({torch.get_num_threads()} threads); median of {a.repeats}; real-width = "
             f"released widths, {a.llm_layers} of 32 Llama layers",
             "", "| config | image | prompt tokens (visual) | backend | vision s | prefill s | TTFT s | "
                 "decode tok/s | peak RSS MiB | same tokens as PyTorch |", "|---|---|---|---|---|---|---|---|---|---|"]
    for kind in a.e2e:
        with tempfile.TemporaryDirectory(prefix="hiwin-bench-e2e-") as tmp:
            log.info("exporting the %s model (fp32, random weights, no parity run) ...", kind)
            path = str(Path(tmp) / "export")
            # in a child process: the exporter's graph copies of the weights never return to the OS
            r = subprocess.run([sys.executable, "-m", "hiwin_export.bench", "--e2e-export", path, "--e2e", kind,
                                "--llm-layers", str(a.llm_layers)], stderr=subprocess.PIPE, text=True)
            if r.returncode:
                raise RuntimeError(f"export failed:\n{r.stderr[-4000:]}")
            res = {}
            for b in ("torch", "ort"):
                cmd = [sys.executable, "-m", "hiwin_export.bench", "--e2e-worker", b, "--export", path,
                       "--e2e", kind, "--llm-layers", str(a.llm_layers), "--new-tokens", str(a.new_tokens),
                       "--repeats", str(a.repeats), "--sizes", *a.sizes]
                log.info("running %s (%s) ...", b, kind)
                r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
                if r.returncode:
                    raise RuntimeError(f"{b} worker failed:\n{r.stderr[-4000:]}")
                res[b] = json.loads(r.stdout.strip().splitlines()[-1])
        lines += format_e2e(kind, res)
    return "\n".join(lines)


def format_e2e(kind: str, res: dict) -> list[str]:
    lines = []
    for img, t in res["torch"]["images"].items():
        for b, name in (("torch", "PyTorch"), ("ort", "ONNX Runtime")):
            r = res[b]["images"][img]
            same = "-" if b == "torch" else ("yes" if r["token_ids"] == t["token_ids"] else "NO")
            lines.append(f"| {kind} | {img} | {r['prompt_tokens']} ({r['visual_tokens']}) | {name} | "
                         f"{r['vision_s']:.2f} | {r['prefill_s']:.2f} | {r['ttft_s']:.2f} | "
                         f"{r['decode_tok_s']:.1f} | {res[b]['peak_rss_mib']:.0f} | {same} |")
    return lines


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hiwin-export bench", description=__doc__)
    add_args(ap)
    ap.add_argument("--worker", choices=["torch", "ort"], help=argparse.SUPPRESS)
    ap.add_argument("--e2e-worker", choices=["torch", "ort"], help=argparse.SUPPRESS)
    ap.add_argument("--e2e-export", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.e2e_export:
        from .export import export_model

        export_model(e2e_model(a.e2e[0], a.llm_layers), a.e2e_export, bundles=False, parity=None,
                     precisions=("fp32",))
        return 0
    if a.e2e_worker:
        sizes = [tuple(int(x) for x in s.split("x")) for s in a.sizes]
        print(json.dumps(e2e_worker(a.e2e_worker, a.export, a.e2e[0], a.llm_layers, sizes, a.new_tokens,
                                    a.repeats)))
        return 0
    if a.worker:
        sizes = [tuple(int(x) for x in s.split("x")) for s in a.sizes]
        print(json.dumps(worker(a.worker, a.export, sizes, a.repeats, a.tiny, a.max_slices)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for name in ("onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)
    print(run(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
