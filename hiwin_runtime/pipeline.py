"""Image + question -> answer, from an export directory (ONNX Runtime, no torch) or the PyTorch reference.

    from hiwin_runtime import Pipeline

    pipe = Pipeline.from_export("hiwin-onnx")                  # ONNX Runtime (CUDA EP if present)
    answer = pipe.generate("photo.jpg", "What is on the sign?", on_text=print)
    for delta in pipe.stream("photo.jpg", "Describe it.", max_new_tokens=64): ...

One generation loop, two :class:`Backend` s: :class:`OrtBackend` runs the exported graphs (the
vision graphs through the one :class:`~hiwin_runtime.crop_chain.CropChain`; ``embed``; ``llm`` with
KV cache); ``hiwin_model.backend.TorchBackend`` runs the reference. Decoding, slicing and
normalisation (:class:`HiwinProcessor`), the token layout and the prompt templates are the
reference's own code, which is torch-free.

A :class:`Pipeline` is safe to share between threads: requests run concurrently (ONNX Runtime
sessions and PyTorch inference are re-entrant; tokenizer calls are serialised), at most
``max_concurrency`` at once, so memory stays bounded by that many KV caches and activations.
A bad request raises a clear error (:class:`RequestError`, :class:`~hiwin_runtime.image.ImageError`)
and leaves the pipeline usable.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator

import numpy as np

from .crop_chain import BatchPolicy, CropChain
from .image import ImageSource
from .layout import num_image_tokens
from .manifest import ExportDir, ExportError
from .processor import HiwinProcessor, PreparedImage, TextDeltas


class RequestError(ValueError):
    """A request the pipeline refuses (empty prompt, too long, bad generation settings)."""


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    max_slices: int | None = None
    template: str | None = None  # None: the export's template (vicuna_v1)
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens

    def validate(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise RequestError(f"max_new_tokens must be an int, got {self.max_new_tokens!r}")
        if self.max_new_tokens <= 0:
            raise RequestError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise RequestError(f"sampling needs temperature > 0 and 0 < top_p <= 1 "
                               f"(got temperature={self.temperature}, top_p={self.top_p})")
        if self.max_slices is not None and self.max_slices < 1:
            raise RequestError(f"max_slices must be >= 1, got {self.max_slices}")


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" or "length"
    visual_tokens: int
    prompt_tokens: int  # visual included
    timings: dict[str, float] = field(default_factory=dict)  # vision_s, prefill_s, ttft_s, decode_s
    logits: list[np.ndarray] | None = None  # per generated token, when asked for

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.token_ids) + (self.finish_reason == "eos") - 1  # tokens after the first
        return n / self.timings["decode_s"] if n > 0 and self.timings.get("decode_s") else float("nan")


# ---------------------------------------------------------------------------------------- backends
class Backend:
    """What the generation loop needs from an engine; caches are opaque to the loop."""

    name = "backend"
    hidden_size: int

    def encode_visual(self, prepared: PreparedImage, newline: np.ndarray, comma: np.ndarray) -> np.ndarray:
        """An image's prepared crops -> (T, C) float32 visual tokens in the released layout, with
        the LLM's own separator embeddings (through a :class:`CropChain`)."""
        raise NotImplementedError

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """(L,) int64 token ids -> (L, C) float32 embeddings."""
        raise NotImplementedError

    def empty_cache(self) -> Any:
        raise NotImplementedError

    def forward(self, embeds: np.ndarray, cache: Any, past: int) -> tuple[np.ndarray, Any]:
        """(1, S, C) embeddings after ``past`` cached positions -> (last position's logits, cache)."""
        raise NotImplementedError

    def prefill(self, pre: list[int], visual: np.ndarray, post: list[int],
                max_new_tokens: int | None = None) -> tuple[np.ndarray, Any]:
        """The prompt as (token ids before ``<image>``, visual embeddings (T, C), ids after): the
        form both LLM contracts start from. Embedding-input backends (ONNX, PyTorch) splice the
        embeddings; a prompt-table backend (TensorRT-LLM, Edge-LLM) would send
        :func:`prompt_table_ids` and ``visual`` instead. ``max_new_tokens``: the request's limit, for
        a backend that sizes its KV cache up front (GenAI); the others grow theirs."""
        parts = [self.embed(np.array(pre, np.int64)) if pre else None, visual,
                 self.embed(np.array(post, np.int64)) if post else None]
        embeds = np.concatenate([p for p in parts if p is not None]).astype(np.float32)
        return self.forward(embeds[None], self.empty_cache(), 0)

    def step(self, token: int, cache: Any, past: int) -> tuple[np.ndarray, Any]:
        """One generated token after ``past`` positions -> (its successor's logits, cache)."""
        return self.forward(self.embed(np.array([token], np.int64))[None], cache, past)


def prompt_table_ids(pre: list[int], num_visual: int, post: list[int], vocab_size: int) -> list[int]:
    """The prompt-table form of a prompt (TensorRT-LLM's classic multimodal contract, TensorRT
    Edge-LLM): the visual rows become fake ids ``vocab_size .. vocab_size + T - 1``."""
    return [*pre, *range(vocab_size, vocab_size + num_visual), *post]


class OrtBackend(Backend):
    """The exported graphs on ONNX Runtime; ``precision="fp16"`` uses the ``*.fp16`` graphs;
    ``"int8"`` (or ``"int8trt"``, ``"fp8trt"``) the quantised vision graphs with the fp32 LLM."""

    name = "onnxruntime"

    def __init__(self, export: ExportDir, *, precision: str = "fp32", providers: list[str] | None = None,
                 threads: int | None = None, max_vision_batch: int = 8, max_upsample_batch: int = 1,
                 vision_stages=None):
        from .graph_id import GraphId
        from .ort import OnnxRunner, default_providers

        from .graph_id import QUANTIZED

        if precision not in ("fp32", "fp16", *QUANTIZED):
            raise ValueError(f"precision must be one of fp32, fp16, {', '.join(QUANTIZED)}, got {precision!r}")
        lang = export.manifest.get("language")
        if lang is None:
            raise ExportError(f"{export.path}: no language model in this export (a vision-only export; "
                              "re-export with the full model)")
        self.export, self.lang = export, lang
        # quantised precisions are vision graphs only (hiwin-export quantize): the LLM stays fp32
        lang_precision = "fp32" if precision in QUANTIZED else precision
        self.embed_graph = GraphId(lang["embed_graph"], None, lang_precision)
        self.decoder_graph = GraphId(lang["decoder_graph"], None, lang_precision)
        for g in (GraphId("vit", None, precision), GraphId("jbu", None, precision), self.embed_graph,
                  self.decoder_graph):
            export.graph_path(g)  # a clear error for a missing graph, before any request
        self.runner = OnnxRunner(export, providers=providers or default_providers(), threads=threads)
        self.hidden_size = lang["hidden_size"]
        if vision_stages is not None:  # another engine for the vision graphs (TensorRT: Pipeline.from_export(engines=))
            self.name = "onnxruntime (vision: tensorrt)"
        self.chain = CropChain(vision_stages or self.runner.vision_stages(precision),
                               patch_size=export.manifest["shape_ranges"]["patch_size"],
                               policy=BatchPolicy(max_vision_batch, max_upsample_batch),
                               bucket_for=export.bucket_for)
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(lang["num_layers"]) for kv in ("key", "value")]

    def encode_visual(self, prepared, newline, comma):
        return self.chain.encode(prepared.crops, prepared.grid, newline, comma)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        out = self.runner.run(self.embed_graph, {"input_ids": ids.astype(np.int64)[None]})
        return out["inputs_embeds"][0]

    def empty_cache(self) -> dict[str, np.ndarray]:
        shape = (1, self.lang["num_kv_heads"], 0, self.lang["head_dim"])
        return {n: np.zeros(shape, np.float32) for n in self.past_names}

    def forward(self, embeds, cache, past):
        S = embeds.shape[1]
        feeds = {"inputs_embeds": np.ascontiguousarray(embeds, dtype=np.float32),
                 "attention_mask": np.ones((1, past + S), np.int64),
                 "position_ids": np.arange(past, past + S, dtype=np.int64)[None], **cache}
        out = self.runner.run(self.decoder_graph, feeds)
        new = {n: out["present" + n[len("past_key_values"):]] for n in self.past_names}
        return out["logits"][0, -1], new


# ---------------------------------------------------------------------------------------- sampling
def sample_next(logits: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator | None) -> int:
    """Greedy argmax, or temperature + nucleus (top-p) sampling with the request's own generator.

    Top-p keeps the smallest set of most likely tokens whose probability reaches ``top_p`` (the
    token that crosses the threshold included), like transformers' ``TopPLogitsWarper``."""
    if not cfg.do_sample:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / cfg.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if cfg.top_p < 1:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[:int(np.searchsorted(cum, cfg.top_p)) + 1]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    assert rng is not None
    return int(rng.choice(p.size, p=p))


# ---------------------------------------------------------------------------------------- pipeline
class Pipeline:
    def __init__(self, backend: Backend, processor: HiwinProcessor, *, context_length: int,
                 template: str = "vicuna_v1", max_concurrency: int = 4, queries: int = 144):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.backend, self.processor, self.queries = backend, processor, queries
        self.context_length, self.template = context_length, template
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._tok_lock = threading.Lock()
        self._separators: tuple[np.ndarray, np.ndarray] | None = None

    # -------------------------------------------------------------- construction
    @classmethod
    def from_export(cls, path: str | os.PathLike, *, precision: str = "fp32", providers: list[str] | None = None,
                    threads: int | None = None, max_concurrency: int = 4, max_vision_batch: int = 8,
                    max_upsample_batch: int = 1, verify: bool = True, engines: str | os.PathLike | None = None,
                    vision: str | None = None, language: str = "auto",
                    genai: str | os.PathLike | None = None,
                    trtllm: str | os.PathLike | None = None, trtllm_kwargs: dict | None = None) -> "Pipeline":
        """ONNX Runtime on an export directory (``hiwin-export export``); files are sha256-checked.

        ``engines``: a TensorRT engine set of this export (``hiwin-export engines``) runs the vision
        graphs instead (``vision="tensorrt"``, implied by ``engines``); the LLM stays on ONNX Runtime.
        Its vision precision is the one the engines were built from.

        ``language="genai"``: the LLM runs on ONNX Runtime GenAI from ``genai``, a directory built by
        ``hiwin-export genai`` (docs/genai.md; :class:`~hiwin_runtime.genai.GenAIBackend`), by default
        the export's own ``genai/`` (``hiwin-export export --genai``).

        ``language="onnxruntime"``: the export's ``llm`` graph with this runtime's own generation loop.

        ``language="auto"`` (default): ``genai`` when ``genai`` is given or the export holds a GenAI
        directory (its manifest says so), else ``onnxruntime``. An export with a GenAI directory on a
        machine without ``onnxruntime-genai`` is refused with the way out, not run on the other loop.

        ``language="trtllm"``: the LLM runs on TensorRT-LLM's LLM API from ``trtllm``, a directory built
        by ``hiwin-export trtllm`` (docs/trtllm.md; :class:`~hiwin_runtime.trtllm.TrtLlmBackend`, which
        takes ``trtllm_kwargs``)."""
        from .config import HiwinConfig
        from .tokenizer import FileTokenizer

        path = Path(path)
        if not path.is_dir():
            raise ExportError(f"{path}: export directory not found")
        export = ExportDir(path, verify=verify)
        vision = vision or ("tensorrt" if engines is not None else "onnxruntime")
        if vision not in ("onnxruntime", "tensorrt"):
            raise ValueError(f"vision must be onnxruntime or tensorrt, got {vision!r}")
        if vision == "tensorrt" and engines is None:
            raise ValueError("vision='tensorrt' needs engines= (an engine set from `hiwin-export engines`)")
        if language not in ("auto", "onnxruntime", "genai", "trtllm"):
            raise ValueError(f"language must be auto, onnxruntime, genai or trtllm, got {language!r}")
        own_genai = export.manifest.get("language", {}).get("genai")
        if language == "auto":
            language = ("trtllm" if trtllm is not None else
                        "genai" if genai is not None or own_genai else "onnxruntime")
            if language == "genai" and genai is None:
                from .genai import GenAIUnavailable, import_genai

                try:
                    import_genai()
                except GenAIUnavailable as e:
                    raise GenAIUnavailable(
                        f"{path}: this export's language half runs on ONNX Runtime GenAI ({own_genai['dir']}/, "
                        f"{own_genai['precision']}): pip install onnxruntime-genai, or pass "
                        "language='onnxruntime' (hiwin-run --language onnx) for the export's llm graph") from e
        if language == "genai" and genai is None:
            if not own_genai:
                raise ValueError("language='genai' needs genai= (a directory from `hiwin-export genai`) or an "
                                 "export built with `hiwin-export export --genai`")
            genai = path / own_genai["dir"]
        if language == "trtllm" and trtllm is None:
            raise ValueError("language='trtllm' needs trtllm= (a directory from `hiwin-export trtllm`)")
        stages = None
        if vision == "tensorrt":
            from .trt import TrtRunner

            from .graph_id import QUANTIZED

            # the engines' precision is in engines.json; a quantised precision asked for must be the set's
            stages = TrtRunner(engines, export=export).vision_stages(precision if precision in QUANTIZED else None)
        backend = OrtBackend(export, precision=precision, providers=providers, threads=threads,
                             max_vision_batch=max_vision_batch, max_upsample_batch=max_upsample_batch,
                             vision_stages=stages)
        lang = export.manifest["language"]
        if language == "genai":
            from .genai import GenAIBackend

            backend = GenAIBackend(genai, backend, language=lang, verify=verify, threads=threads)
        elif language == "trtllm":
            from .trtllm import TrtLlmBackend

            backend = TrtLlmBackend(trtllm, backend, language=lang, verify=verify, max_batch_size=max_concurrency,
                                    **(trtllm_kwargs or {}))
        tok_file = path / lang["tokenizer"] / "tokenizer.json"
        if not tok_file.is_file():
            raise ExportError(f"{path}: tokenizer missing ({tok_file.relative_to(path)})")
        tok = FileTokenizer(tok_file.parent)
        config = HiwinConfig.from_dict(export.manifest["config"])
        processor = HiwinProcessor(tok, config.slicing)
        want = lang.get("token_ids")
        have = {"bos": processor.ids.bos, "eos": processor.ids.eos, "newline": processor.ids.newline,
                "comma": processor.ids.comma}
        if want and want != have:
            raise ExportError(f"{path}: tokenizer ids {have} differ from the manifest's {want}")
        return cls(backend, processor, context_length=lang["context_length"], template=lang["template"],
                   max_concurrency=max_concurrency, queries=config.projector.num_queries)

    @classmethod
    def from_model(cls, model, *, max_concurrency: int = 4) -> "Pipeline":
        """The PyTorch reference backend on a loaded :class:`HiwinForCausalLM` (tokenizer attached).
        The one place the runtime reaches into ``hiwin_model`` (installed with ``hiwin[model]``)."""
        from hiwin_model.backend import TorchBackend

        return cls(TorchBackend(model), model._processor(), context_length=model.context_length,
                   max_concurrency=max_concurrency, queries=model.config.projector.num_queries)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: str = "fp32", device: str = "cpu",
                        max_concurrency: int = 4) -> "Pipeline":
        """The PyTorch reference on an HF model directory (``hiwin[model]``)."""
        from hiwin_model.backend import load_model

        return cls.from_model(load_model(path, dtype=dtype, device=device), max_concurrency=max_concurrency)

    @classmethod
    def load(cls, path: str | os.PathLike, *, backend: str = "auto", **kw) -> "Pipeline":
        """``auto``: an export directory (``manifest.json``) runs on ONNX Runtime, an HF model
        directory (``config.json``) on PyTorch."""
        path = Path(path)
        if backend == "auto":
            if (path / "manifest.json").is_file():
                backend = "onnxruntime"
            elif (path / "config.json").is_file():
                backend = "torch"
            else:
                raise ExportError(f"{path}: neither an export directory (manifest.json) nor an HF model "
                                  "directory (config.json)" if path.is_dir() else f"{path}: directory not found")
        if backend == "onnxruntime":
            return cls.from_export(path, **kw)
        if backend == "torch":
            return cls.from_pretrained(path, **kw)
        raise ValueError(f"unknown backend {backend!r} (auto, onnxruntime, torch)")

    # -------------------------------------------------------------- steps
    def _tokenizer_call(self, fn: Callable, *args):
        with self._tok_lock:  # fast tokenizers may refuse concurrent use ("Already borrowed")
            return fn(*args)

    def separators(self) -> tuple[np.ndarray, np.ndarray]:
        """The LLM's own "\\n" and "," embeddings, which the layout puts between visual tokens."""
        if self._separators is None:
            ids = self.processor.ids
            e = self.backend.embed(np.array([ids.newline, ids.comma], np.int64)).astype(np.float32)
            self._separators = (e[0], e[1])
        return self._separators

    def encode_image(self, image: ImageSource, *, max_slices: int | None = None) -> np.ndarray:
        """Image -> (T, C) visual tokens in the released layout."""
        return self.encode_prepared(self.processor.prepare_image(image, max_slices=max_slices))

    def encode_prepared(self, prepared: PreparedImage) -> np.ndarray:
        return self.backend.encode_visual(prepared, *self.separators())

    def tokenize(self, question: str, template: str | None = None) -> tuple[list[int], list[int]]:
        """Prompt token ids before and after ``<image>`` for ``question`` in the template."""
        _check_question(question)
        try:
            prompt = self.processor.prompt(question, template or self.template)
        except ValueError as e:
            raise RequestError(str(e)) from None
        return self._tokenizer_call(self.processor.tokenize_around_image, prompt)

    # -------------------------------------------------------------- generation
    def stream(self, image: ImageSource, question: str, *, keep_logits: bool = False,
               **settings) -> Generator[str, None, Answer]:
        """Text deltas of the answer as they are decoded; the generator returns the :class:`Answer`
        (``StopIteration.value``, or use :meth:`generate`). Settings are checked here, at once."""
        try:
            cfg = GenerationConfig(**settings)
        except TypeError as e:
            raise RequestError(f"unknown generation setting: {e}") from None
        cfg.validate()
        _check_question(question)
        return self._run(image, question, cfg, keep_logits)

    def _run(self, image: ImageSource, question: str, cfg: GenerationConfig,
             keep_logits: bool) -> Generator[str, None, Answer]:
        with self._slots:
            t0 = time.perf_counter()
            prepared = self.processor.prepare_image(image, max_slices=cfg.max_slices)
            pre, post = self.tokenize(question, cfg.template)
            n_visual = num_image_tokens(prepared.grid, self.queries)
            L = len(pre) + n_visual + len(post)
            if L + cfg.max_new_tokens > self.context_length:  # refused before any graph runs
                raise RequestError(f"prompt of {L} tokens (of which {n_visual} visual) plus "
                                   f"max_new_tokens={cfg.max_new_tokens} exceeds the context of "
                                   f"{self.context_length} tokens")
            visual = self.encode_prepared(prepared)
            t_vis = time.perf_counter()
            rng = np.random.default_rng(cfg.seed) if cfg.do_sample else None
            eos = self.processor.ids.eos
            deltas = TextDeltas(self.processor.text)
            ids: list[int] = []
            kept: list[np.ndarray] = []
            finish = "length"
            if getattr(self.backend, "generates_tokens", False):  # the runtime runs the loop (TensorRT-LLM)
                if keep_logits:
                    raise RequestError(f"keep_logits is not available on {self.backend.name}")
                t_first = None
                gen = self.backend.generate_tokens(pre, visual, post, cfg)
                try:
                    while True:
                        try:
                            tok = next(gen)
                        except StopIteration as stop:
                            finish = stop.value or finish
                            break
                        if t_first is None:
                            t_first = time.perf_counter()
                        ids.append(tok)
                        delta = self._tokenizer_call(deltas.push, tok)
                        if delta:
                            yield delta
                finally:  # a stream closed early stops the runtime's request too
                    gen.close()
                t_end = time.perf_counter()
                t_first = t_first or t_end
            else:
                t_first, t_end, finish = yield from self._loop(pre, visual, post, L, cfg, rng, eos, deltas, ids,
                                                               kept, keep_logits)
            rest = self._tokenizer_call(deltas.flush)
            if rest:
                yield rest
        text = self._tokenizer_call(self.processor.decode, ids).strip()
        return Answer(text=text, token_ids=ids, finish_reason=finish, visual_tokens=int(visual.shape[0]),
                      prompt_tokens=int(L), logits=kept if keep_logits else None,
                      timings={"vision_s": t_vis - t0, "prefill_s": t_first - t_vis, "ttft_s": t_first - t0,
                               "decode_s": t_end - t_first})

    def _loop(self, pre, visual, post, L, cfg, rng, eos, deltas, ids, kept, keep_logits):
        """Our own generation loop over the backend's logits: yields text deltas, returns
        (first-token time, end time, finish reason)."""
        logits, cache = self.backend.prefill(pre, visual, post, max_new_tokens=cfg.max_new_tokens)
        t_first = time.perf_counter()
        finish = "length"
        for step in range(cfg.max_new_tokens):
            if keep_logits:
                kept.append(logits)
            tok = sample_next(logits, cfg, rng)
            if tok == eos and not cfg.ignore_eos:
                finish = "eos"
                break
            ids.append(tok)
            delta = self._tokenizer_call(deltas.push, tok)
            if delta:
                yield delta
            if step + 1 == cfg.max_new_tokens:
                break
            logits, cache = self.backend.step(tok, cache, L + step)
        return t_first, time.perf_counter(), finish

    def generate(self, image: ImageSource, question: str, *, on_text: Callable[[str], None] | None = None,
                 keep_logits: bool = False, **settings) -> Answer:
        """The whole answer; ``on_text`` receives each text delta as it is decoded."""
        it = self.stream(image, question, keep_logits=keep_logits, **settings)
        while True:
            try:
                delta = next(it)
            except StopIteration as stop:
                return stop.value
            if on_text is not None:
                on_text(delta)


def _check_question(question) -> None:
    if not isinstance(question, str):
        raise RequestError(f"the question must be a str, got {type(question).__name__}")
    if not question.strip():
        raise RequestError("the question is empty")
