"""Parity harness: every exported graph vs the PyTorch reference, structure first, then numbers.

Cases: fresh random inputs at patch grids covering every projector bucket and the range extremes,
and real preprocessed images over a sweep of aspect ratios (1:4 ... 4:1 and extremes, 1 to 9
slices), where each graph is fed the *reference* outputs of the previous stage (so an error is
attributed to one graph), plus the end-to-end ONNX vision path (ViT -> JBU -> projector bucket ->
token layout) against the reference's visual token sequence.

Statistics per output: max |ref - onnx|, that divided by max |ref| ("max rel"), and cosine
similarity. A bound exceeded is an error (:class:`ParityError`), never a warning.

Executors: ``"onnxruntime"`` (:class:`~hiwin_runtime.ort.OnnxRunner`) or ``"reference"``
(:class:`~hiwin_export.plugin_graphs.ReferenceRunner`: ``onnx.reference.ReferenceEvaluator``, TensorRT
plugin nodes on the plugins' CPU launchers). A ``tensorrt``-flavour export can only use the reference
executor, which is the default for it; it is slow on large maps, so its quick check uses
:data:`REFERENCE_QUICK_GRIDS` and :data:`REFERENCE_QUICK_IMAGES`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from hiwin_model.projector import ORACLE
from hiwin_runtime.crop_chain import BatchPolicy, CropChain, Recorder
from hiwin_runtime.graph_id import GraphId
from hiwin_runtime.manifest import ExportDir
from hiwin_runtime.ort import OnnxRunner

from .plugin_graphs import ReferenceRunner

log = logging.getLogger("hiwin_export")

FP32_MAX_REL = 1e-4
FP16_MIN_COSINE = 0.999
INT8_MIN_COSINE = 0.99  # int8 (QDQ) graphs: per graph and for the visual tokens
FP8_MIN_COSINE = 0.995
# int8: ONNX Runtime QDQ; int8trt / fp8trt: ModelOpt Q/DQ for TensorRT (evaluated on ONNX Runtime's CPU kernels)
MIN_COSINE = {"fp16": FP16_MIN_COSINE, "int8": INT8_MIN_COSINE, "int8trt": INT8_MIN_COSINE, "fp8trt": FP8_MIN_COSINE}
QUANTIZED = ("int8", "int8trt", "fp8trt")
# (h, w) patch grids: every projector bucket, the 2-patch minimum, long thin crops.
RANDOM_GRIDS = ((24, 24), (19, 29), (29, 19), (16, 32), (32, 16), (18, 24), (24, 18), (2, 2), (2, 9), (40, 7))
# Full images: aspect ratios 1:4 ... 4:1 and extremes, slice counts 1..9 (max_slices 9).
IMAGE_SIZES = ((1344, 336), (1008, 336), (1008, 672), (1024, 768), (800, 800), (768, 1024), (672, 1008),
               (336, 1008), (336, 1344), (2400, 240), (240, 2400), (500, 300), (336, 336), (90, 60))
# Quick parity on the reference executor (node by node in numpy): every projector bucket at its smallest
# crop ((2, 2) is also the 2-patch minimum), two odd shapes, and one page cut into 2 slices + overview.
REFERENCE_QUICK_GRIDS = ((2, 2), (2, 3), (3, 2), (2, 4), (4, 2), (3, 4), (4, 3), (5, 7), (9, 2))
REFERENCE_QUICK_IMAGES = ((500, 300),)
EXECUTORS = ("onnxruntime", "reference")


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


class Harness:
    """fp32 graphs must stay within max rel <= 1e-4 of the reference; fp16 graphs (``<name>.fp16``)
    within cosine >= 0.999, int8 graphs (``<name>.int8``) within cosine >= 0.99 (their max rel is
    reported too). ``executor``: ``"onnxruntime"`` or
    ``"reference"`` (default: the one the export's flavour allows, ``"reference"`` for ``tensorrt``)."""

    def __init__(self, model, export_dir: str | os.PathLike, *, precision: str = "fp32", seed: int = 0,
                 executor: str | None = None, check_source: bool = True):
        if precision not in ("fp32", *MIN_COSINE):
            raise ValueError(f"precision must be one of fp32, {', '.join(MIN_COSINE)}, got {precision!r}")
        self.model = model.eval()
        self.export = ExportDir(export_dir)
        want = self.export.manifest.get("source", {}).get("weights_sha256")
        if check_source and want is not None:
            from .manifest import weights_sha256

            got = weights_sha256(self.model)
            if got != want:
                raise ParityError(
                    f"{export_dir}: the export was made from other weights than the model given (weights sha256 "
                    f"{want[:16]}... in its manifest, {got[:16]}... for this model): parity would compare two "
                    "different models; pass the checkpoint the export was made from (hiwin-export parity --model)")
        executor = executor or ("reference" if self.export.flavour == "tensorrt" else "onnxruntime")
        if executor not in EXECUTORS:
            raise ValueError(f"unknown executor {executor!r} (known: {', '.join(EXECUTORS)})")
        # (ONNX Runtime refuses a tensorrt-flavour directory with an ExportError that says what to do)
        self.runner = OnnxRunner(self.export) if executor == "onnxruntime" else ReferenceRunner(self.export)
        self.executor = executor
        self.precision, self.seed = precision, seed
        self.suffix = "" if precision == "fp32" else f".{precision}"
        self.criterion = f"max_rel<={FP32_MAX_REL:g}" if precision == "fp32" else f"cosine>={MIN_COSINE[precision]:g}"
        self.records: list[Record] = []
        self.agreement: list[dict] = []  # token_agreement()

    def _ok(self, max_rel: float, cosine: float, finite: bool) -> bool:
        good = max_rel <= FP32_MAX_REL if self.precision == "fp32" else cosine >= MIN_COSINE[self.precision]
        return bool(good and finite)

    def _graph(self, graph: GraphId | str) -> GraphId:
        """The graph at this harness's precision (a clear error if the directory lacks it)."""
        gid = (graph if isinstance(graph, GraphId) else GraphId.parse(graph)).at(self.precision)
        self.export.graph_path(gid)
        return gid

    # ------------------------------------------------------------------ comparisons
    def _compare(self, graph: GraphId | str, case: str, feeds: dict[str, np.ndarray], ref: dict[str, torch.Tensor]):
        gid = self._graph(graph)
        out = self.runner.run(gid, feeds)
        if set(out) != set(ref):
            raise ParityError(f"{gid}: outputs {sorted(out)} != reference {sorted(ref)}")
        for name, r in ref.items():
            r = r.detach().float().numpy()
            if out[name].shape != r.shape:
                raise ParityError(f"{gid} [{case}]: {name} has shape {out[name].shape}, reference {r.shape}")
            if out[name].dtype != np.float32:
                raise ParityError(f"{gid} [{case}]: {name} is {out[name].dtype}, expected float32")
            self._record(gid.base, case, name, r, out[name])
        return out

    def _record(self, graph: str, case: str, output: str, ref: np.ndarray, out: np.ndarray) -> None:
        a, rel, cos = error_stats(ref, out)
        self.records.append(Record(graph, case, output, list(ref.shape), a, rel, cos, self.criterion,
                                   self._ok(rel, cos, bool(np.isfinite(out).all()))))

    def _reference_chain(self, recorder: Recorder, policy: BatchPolicy = BatchPolicy(None, None)) -> CropChain:
        return self.model.crop_chain(policy, stages=recorder.wrap(self.model.stages(ORACLE)))

    def _check_calls(self, recorder: Recorder, tag: str) -> None:
        """Each recorded reference stage call against its graph, on the very same inputs."""
        p = self.model.config.vision.patch_size
        for call in recorder.calls:
            x = call.inputs[next(iter(call.inputs))]
            h, w = x.shape[-2:] if call.family != "vit" else (x.shape[-2] // p, x.shape[-1] // p)
            feeds = {n: t.detach().float().contiguous().numpy() for n, t in call.inputs.items()}
            self._compare(self.export.stage_graph(call.family, call.bucket), f"{tag}, crops {h}x{w} patches x{x.shape[0]}",
                          feeds, call.outputs)

    # ------------------------------------------------------------------ cases
    def random_cases(self, grids=RANDOM_GRIDS, batch: int = 2) -> None:
        """Random inputs for the ViT, the JBU and every projector bucket the grids select."""
        buckets = sorted({self.export.hiwin_graph_for(h, w) for h, w in grids})
        for gid in [GraphId("vit"), GraphId("jbu"), *buckets]:
            self.graph_cases(gid, grids, batch)

    def graph_cases(self, graph: GraphId | str, grids=RANDOM_GRIDS, batch: int = 2) -> None:
        """Random cases for one graph (a bucket's projector graph: the grids that select that bucket;
        the any-grid projector graph: every grid), each through the reference stage and the graph."""
        gid = graph if isinstance(graph, GraphId) else GraphId.parse(graph)
        g = torch.Generator().manual_seed(self.seed)
        c = self.model.config.vision
        recorder = Recorder()
        ref = recorder.wrap(self.model.stages(ORACLE))
        for h, w in grids:
            bucket = self.export.bucket_for(w, h)
            if gid.bucket is not None and bucket != gid.bucket:
                continue
            pix = torch.randn(batch, 3, c.patch_size * h, c.patch_size * w, generator=g)
            feats = [torch.randn(batch, c.hidden_size, s * h, s * w, generator=g) for s in (1, 2, 4)]
            with torch.no_grad():
                if gid.family == "vit":
                    ref.vit(pix)
                elif gid.family == "jbu":
                    ref.jbu(feats[0], pix)
                else:
                    ref.projector(bucket, *feats)
        self._check_calls(recorder, f"random, batch {batch}")

    def image_cases(self, images, max_slices: int = 9) -> None:
        """Real pages (the caller's images: files, or generated pages over :data:`IMAGE_SIZES`):
        every stage call of the reference chain checked on its own inputs, then the whole ONNX chain
        (each graph fed the previous graph's outputs) against the reference tokens."""
        m = self.model
        nl, comma = (t.detach() for t in m.separator_embeddings())
        onnx_chain = CropChain(self.runner.vision_stages(self.precision), patch_size=m.config.vision.patch_size,
                               policy=BatchPolicy(None, None), bucket_for=self.export.bucket_for)
        for img in images:
            prepared = m.processor.prepare_image(img, max_slices=max_slices)
            tag = f"image {img.size[0]}x{img.size[1]} grid {prepared.grid}"
            recorder = Recorder()
            with torch.no_grad():
                ref_tokens = self._reference_chain(recorder).encode(prepared.crops, prepared.grid, nl, comma)
            self._check_calls(recorder, tag)
            onnx_tokens = onnx_chain.encode(prepared.crops, prepared.grid, nl.float().numpy(), comma.float().numpy())
            self._record("vision-path", tag, "visual_tokens", ref_tokens.float().numpy(), onnx_tokens)

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
                self._compare(GraphId("embed"), f"random ids, batch {batch}, seq {seq}", {"input_ids": ids.numpy()}, ref)
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
            self._compare(GraphId("llm"), f"{step}, batch {batch}, past {P}, seq {seq}", feeds, ref)
            past = list(outs[1:])

    def token_agreement(self, images, *, question: str = "Describe the image in detail.", max_new_tokens: int = 16,
                        max_slices: int = 9) -> list[dict]:
        """Greedy answers through the exported fp32 LLM, once from the fp32 vision graphs and once from
        this harness's precision: per image, the agreeing prefix and the fraction of equal positions
        (reported, not bounded: the visual-token bounds decide). Needs an export with the language graphs."""
        from hiwin_runtime.pipeline import Pipeline

        if "language" not in self.export.manifest:
            raise ParityError(f"{self.export.path}: token agreement needs the language graphs (a full export)")
        ref = Pipeline.from_export(self.export.path, precision="fp32", verify=False, language="onnxruntime")
        test = Pipeline.from_export(self.export.path, precision=self.precision, verify=False, language="onnxruntime")
        for img in images:
            kw = dict(max_new_tokens=max_new_tokens, max_slices=max_slices, ignore_eos=True)
            a, b = ref.generate(img, question, **kw).token_ids, test.generate(img, question, **kw).token_ids
            prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            n = max(len(a), len(b), 1)
            self.agreement.append({"case": f"image {img.size[0]}x{img.size[1]}", "tokens": n, "agreeing_prefix": prefix,
                                   "agreement": sum(x == y for x, y in zip(a, b)) / n, "fp32": a, self.precision: b})
        return self.agreement

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

    def write_report(self, out_dir: str | os.PathLike | None = None, *, json_path=None, md_path=None,
                     extra: dict | None = None) -> tuple[Path, Path]:
        """``parity<.precision>.json`` / ``.md`` in ``out_dir``, or the given paths."""
        if out_dir is None and (json_path is None or md_path is None):
            raise ValueError("write_report needs out_dir or both json_path and md_path")
        report = {"precision": self.precision, "criterion": self.criterion, "executor": self.executor,
                  "flavour": self.export.flavour, "summary": self.summary(),
                  "records": [asdict(r) for r in self.records], **(extra or {})}
        if self.agreement:
            report["token_agreement"] = self.agreement
        jp = Path(json_path) if json_path else Path(out_dir) / f"parity{self.suffix}.json"
        mp = Path(md_path) if md_path else Path(out_dir) / f"parity{self.suffix}.md"
        for p in (jp, mp):
            p.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(jp, json.dumps(report, indent=1))
        _atomic_write(mp, self.markdown())
        return jp, mp

    def markdown(self) -> str:
        lines = [f"| graph ({self.precision}, {self.executor}) | cases | worst max abs | worst max rel | min cosine "
                 "| criterion | ok |",
                 "|---|---|---|---|---|---|---|"]
        for g, s in self.summary().items():
            lines.append(f"| {g} | {s['cases']} | {s['worst_max_abs']:.3e} | {s['worst_max_rel']:.3e} | "
                         f"{s['min_cosine']:.9f} | {s['criterion']} | {'yes' if s['ok'] else 'NO'} |")
        if self.agreement:
            lines += ["", f"| greedy tokens (fp32 LLM; fp32 vs {self.precision} vision) | tokens | agreeing prefix "
                      "| equal positions |", "|---|---|---|---|"]
            lines += [f"| {a['case']} | {a['tokens']} | {a['agreeing_prefix']} | {a['agreement']:.3f} |"
                      for a in self.agreement]
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
