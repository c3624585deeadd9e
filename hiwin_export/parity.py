"""Parity harness: every exported graph vs the PyTorch reference, structure first, then numbers.

Cases: fresh random inputs at patch grids covering every projector bucket and the range extremes,
and real preprocessed images over a sweep of aspect ratios (1:4 ... 4:1 and extremes, 1 to 9
slices), where each graph is fed the *reference* outputs of the previous stage (so an error is
attributed to one graph), plus the end-to-end ONNX vision path (ViT -> JBU -> projector bucket ->
token layout) against the reference's visual token sequence.

Statistics per output: max |ref - onnx|, that divided by max |ref| ("max rel"), and cosine
similarity. A bound exceeded is an error (:class:`ParityError`), never a warning.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hiwin_model.layout import layout_image_tokens
from hiwin_model.processor import stack_group

from .manifest import ExportDir, ExportError

log = logging.getLogger("hiwin_export")

FP32_MAX_REL = 1e-4
FP16_MIN_COSINE = 0.999
# (h, w) patch grids: every projector bucket, the 2-patch minimum, long thin crops.
RANDOM_GRIDS = ((24, 24), (19, 29), (29, 19), (16, 32), (32, 16), (18, 24), (24, 18), (2, 2), (2, 9), (40, 7))
# Full images: aspect ratios 1:4 ... 4:1 and extremes, slice counts 1..9 (max_slices 9).
IMAGE_SIZES = ((1344, 336), (1008, 336), (1008, 672), (1024, 768), (800, 800), (768, 1024), (672, 1008),
               (336, 1008), (336, 1344), (2400, 240), (240, 2400), (500, 300), (336, 336), (90, 60))


class ParityError(AssertionError):
    pass


@dataclass
class Record:
    graph: str
    case: str
    output: str
    shape: list
    max_abs: float
    max_rel: float
    cosine: float
    criterion: str
    ok: bool


def error_stats(ref: np.ndarray, out: np.ndarray) -> tuple[float, float, float]:
    r, o = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    max_abs = float(np.abs(r - o).max()) if r.size else 0.0
    scale = float(np.abs(r).max()) if r.size else 0.0
    denom = float(np.linalg.norm(r) * np.linalg.norm(o))
    cosine = float(r @ o / denom) if denom > 0 else float(max_abs == 0)
    return max_abs, max_abs / scale if scale > 0 else max_abs, cosine


class OnnxRunner:
    """ONNX Runtime sessions for an export directory (inputs validated against the manifest)."""

    def __init__(self, export: ExportDir, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.export = export
        self.sessions: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.opts = ort.SessionOptions()
        # Shapes change from call to call (crop grids), so the memory-pattern planner cannot reuse
        # a plan: it is off. The CPU arena stays on (without it every large tensor is an mmap and
        # a page-fault storm). Measured at real dims, JBU on 336x336 + 266x406 crops, steady state:
        # pattern on 4179 MiB peak / 1.72 s per crop; off 2265 MiB / 1.50 s; arena off too 2580 MiB / 1.93 s.
        self.opts.enable_mem_pattern = False
        if threads:
            self.opts.intra_op_num_threads = threads
        self.providers = providers or ["CPUExecutionProvider"]

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import onnxruntime as ort

        self.export.check_feeds(name, feeds)
        s = self.sessions.get(name)
        if s is None:
            with self._lock:  # one session per graph even when threads race to the first run
                s = self.sessions.get(name)
                if s is None:
                    s = ort.InferenceSession(str(self.export.graph_path(name)), self.opts, providers=self.providers)
                    if s.get_providers()[0] != self.providers[0]:  # ORT falls back silently; we do not
                        raise ExportError(f"{name}: {self.providers[0]} was requested but ONNX Runtime runs "
                                          f"{s.get_providers()} (provider unavailable or failed to load; "
                                          f"available here: {ort.get_available_providers()})")
                    self.sessions[name] = s
        return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


class Harness:
    """fp32 graphs must stay within max rel <= 1e-4 of the reference; fp16 graphs (``<name>.fp16``)
    within cosine >= 0.999 (their max rel is reported too)."""

    def __init__(self, model, export_dir: str | os.PathLike, *, precision: str = "fp32", seed: int = 0):
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"precision must be fp32 or fp16, got {precision!r}")
        self.model = model.eval()
        self.export = ExportDir(export_dir)
        self.runner = OnnxRunner(self.export)
        self.precision, self.seed = precision, seed
        self.suffix = "" if precision == "fp32" else ".fp16"
        self.criterion = f"max_rel<={FP32_MAX_REL:g}" if precision == "fp32" else f"cosine>={FP16_MIN_COSINE:g}"
        self.records: list[Record] = []

    def _ok(self, max_rel: float, cosine: float, finite: bool) -> bool:
        good = max_rel <= FP32_MAX_REL if self.precision == "fp32" else cosine >= FP16_MIN_COSINE
        return bool(good and finite)

    def _run(self, graph: str, feeds):
        return self.runner.run(graph + self.suffix, feeds)

    # ------------------------------------------------------------------ comparisons
    def _compare(self, graph: str, case: str, feeds: dict[str, np.ndarray], ref: dict[str, torch.Tensor]):
        out = self._run(graph, feeds)
        if set(out) != set(ref):
            raise ParityError(f"{graph}: outputs {sorted(out)} != reference {sorted(ref)}")
        for name, r in ref.items():
            r = r.detach().float().numpy()
            if out[name].shape != r.shape:
                raise ParityError(f"{graph} [{case}]: {name} has shape {out[name].shape}, reference {r.shape}")
            if out[name].dtype != np.float32:
                raise ParityError(f"{graph} [{case}]: {name} is {out[name].dtype}, expected float32")
            a, rel, cos = error_stats(r, out[name])
            self.records.append(Record(graph, case, name, list(r.shape), a, rel, cos, self.criterion,
                                       self._ok(rel, cos, bool(np.isfinite(out[name]).all()))))
        return out

    def _reference(self, graph: str, inputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        m = self.model
        with torch.no_grad():
            if graph == "vit":
                return {"features": m.vision_tower(inputs[0])}
            if graph == "jbu":
                f2, f4 = m.jbu(inputs[0], inputs[1])
                return {"feat2x": f2, "feat4x": f4}
            oh, ow = (int(x) for x in graph.split("_")[1].split("x"))
            return {"tokens": m.projector(inputs, grid_hw=(oh, ow))}

    def check_graph(self, graph: str, case: str, inputs: list[torch.Tensor]):
        self.export.graph_path(graph + self.suffix)  # a clear error if the directory lacks this graph
        names = [i["name"] for i in self.export.graphs[graph + self.suffix]["inputs"]]
        feeds = {n: t.detach().float().contiguous().numpy() for n, t in zip(names, inputs)}
        return self._compare(graph, case, feeds, self._reference(graph, inputs))

    # ------------------------------------------------------------------ cases
    def random_cases(self, grids=RANDOM_GRIDS, batch: int = 2) -> None:
        """Random inputs for the ViT, the JBU and every projector bucket the grids select."""
        buckets = sorted({self.export.hiwin_graph_for(h, w) for h, w in grids})
        for name in ["vit", "jbu", *buckets]:
            self.graph_cases(name, grids, batch)

    def graph_cases(self, graph: str, grids=RANDOM_GRIDS, batch: int = 2) -> None:
        """Random cases for one graph (projector buckets: the grids that select that bucket)."""
        g = torch.Generator().manual_seed(self.seed)
        c = self.model.config.vision
        for h, w in grids:
            if graph.startswith("hiwin_") and self.export.hiwin_graph_for(h, w) != graph:
                continue
            pix = torch.randn(batch, 3, c.patch_size * h, c.patch_size * w, generator=g)
            feats = [torch.randn(batch, c.hidden_size, s * h, s * w, generator=g) for s in (1, 2, 4)]
            inputs = {"vit": [pix], "jbu": [feats[0], pix]}.get(graph, feats)
            self.check_graph(graph, f"random {h}x{w} patches, batch {batch}", inputs)

    def image_cases(self, images=None, max_slices: int = 9) -> None:
        from hiwin_model.demo import draw_scene

        m = self.model
        images = images if images is not None else [draw_scene(w, h, "circle", "red", f"{w}x{h}", seed=i)
                                                    for i, (w, h) in enumerate(IMAGE_SIZES)]
        for img in images:
            prepared = m.processor.prepare_image(img, max_slices=max_slices)
            tag = f"image {img.size[0]}x{img.size[1]} grid {prepared.grid}"
            onnx_crops: list = [None] * len(prepared.crops)
            for idx in prepared.shape_groups().values():
                pix = stack_group(prepared.crops, idx)
                h, w = pix.shape[-2] // m.vision_tower.patch_size, pix.shape[-1] // m.vision_tower.patch_size
                case = f"{tag}, crops {h}x{w} patches x{len(idx)}"
                f1 = self.check_graph("vit", case, [pix])["features"]
                with torch.no_grad():
                    rf1 = m.vision_tower(pix)
                    rf2, rf4 = m.jbu(rf1, pix)
                self.check_graph("jbu", case, [rf1, pix])
                bucket = self.export.hiwin_graph_for(h, w)
                self.check_graph(bucket, case, [rf1, rf2, rf4])
                # end to end: each graph fed the previous ONNX outputs
                o2 = self._run("jbu", {"features": f1, "pixel_values": pix.numpy()})
                tok = self._run(bucket, {"feat1x": f1, "feat2x": o2["feat2x"], "feat4x": o2["feat4x"]})
                for j, i in enumerate(idx):
                    onnx_crops[i] = torch.from_numpy(tok["tokens"][j])
            nl, comma = m.separator_embeddings()
            with torch.no_grad():
                ref_tokens = m.layout(prepared, m.encode_prepared(prepared))
                onnx_tokens = layout_image_tokens(torch.stack(onnx_crops), prepared.grid, nl.detach(), comma.detach())
            a, rel, cos = error_stats(ref_tokens.numpy(), onnx_tokens.numpy())
            self.records.append(Record("vision-path", tag, "visual_tokens", list(ref_tokens.shape), a, rel, cos,
                                       self.criterion, self._ok(rel, cos, bool(torch.isfinite(onnx_tokens).all()))))

    def language_cases(self, graphs=("embed", "llm"), batch: int = 2) -> None:
        """The token-embedding graph on random ids; the decoder on prefill (empty past), chunked
        prefill and single-token decode steps, each past being the reference's own presents."""
        from .language import DecoderWithPast, past_names

        g = torch.Generator().manual_seed(self.seed)
        llm = self.model.llm
        cfg = llm.config
        if "embed" in graphs:
            for seq in (1, 9):
                ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
                with torch.no_grad():
                    ref = {"inputs_embeds": llm.get_input_embeddings()(ids)}
                self._compare("embed", f"random ids, batch {batch}, seq {seq}", {"input_ids": ids.numpy()}, ref)
        if "llm" not in graphs:
            return
        dec = DecoderWithPast(llm).eval()
        n = cfg.num_hidden_layers
        names = past_names(n)
        past: list[torch.Tensor] | None = None
        for step, seq in (("prefill", 7), ("chunked prefill", 6), ("decode", 1), ("decode", 1)):
            P = 0 if past is None else past[0].shape[2]
            emb = torch.randn(batch, seq, cfg.hidden_size, generator=g)
            mask = torch.ones(batch, P + seq, dtype=torch.long)
            pos = torch.arange(P, P + seq).expand(batch, seq).contiguous()
            if past is None:
                from .language import kv_shape

                heads, hd = kv_shape(cfg)
                past = [torch.zeros(batch, heads, 0, hd) for _ in range(2 * n)]
            with torch.no_grad():
                outs = dec(emb, mask, pos, past)
            ref = {"logits": outs[0], **{f"present.{k[len('past_key_values.'):]}": t for k, t in zip(names, outs[1:])}}
            feeds = {"inputs_embeds": emb.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy(),
                     **{k: t.numpy() for k, t in zip(names, past)}}
            self._compare("llm", f"{step}, batch {batch}, past {P}, seq {seq}", feeds, ref)
            past = list(outs[1:])

    # ------------------------------------------------------------------ report
    def summary(self) -> dict:
        out: dict = {}
        for r in self.records:
            s = out.setdefault(r.graph, {"cases": 0, "worst_max_rel": 0.0, "worst_max_abs": 0.0,
                                         "min_cosine": 1.0, "criterion": r.criterion, "ok": True})
            s["cases"] += 1
            s["worst_max_rel"] = max(s["worst_max_rel"], r.max_rel)
            s["worst_max_abs"] = max(s["worst_max_abs"], r.max_abs)
            s["min_cosine"] = min(s["min_cosine"], r.cosine)
            s["ok"] = s["ok"] and r.ok
        return out

    def write_report(self, out_dir: str | os.PathLike) -> tuple[Path, Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report = {"precision": self.precision, "criterion": self.criterion, "summary": self.summary(),
                  "records": [asdict(r) for r in self.records]}
        jp, mp = out / f"parity{self.suffix}.json", out / f"parity{self.suffix}.md"
        _atomic_write(jp, json.dumps(report, indent=1))
        _atomic_write(mp, self.markdown())
        return jp, mp

    def markdown(self) -> str:
        lines = [f"| graph ({self.precision}) | cases | worst max abs | worst max rel | min cosine | criterion | ok |",
                 "|---|---|---|---|---|---|---|"]
        for g, s in self.summary().items():
            lines.append(f"| {g} | {s['cases']} | {s['worst_max_abs']:.3e} | {s['worst_max_rel']:.3e} | "
                         f"{s['min_cosine']:.9f} | {s['criterion']} | {'yes' if s['ok'] else 'NO'} |")
        return "\n".join(lines) + "\n"

    def assert_ok(self) -> None:
        bad = [r for r in self.records if not r.ok]
        if bad:
            worst = max(bad, key=lambda r: r.max_rel)
            raise ParityError(f"{self.precision}: {len(bad)} of {len(self.records)} comparisons fail {self.criterion}; "
                              f"worst: {worst.graph} [{worst.case}] {worst.output}: max rel {worst.max_rel:.3e}, "
                              f"cosine {worst.cosine:.6f}")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
