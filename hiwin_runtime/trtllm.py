"""The language half on TensorRT-LLM's LLM API (PyTorch backend; A100 / H100), behind the same
:class:`~hiwin_runtime.pipeline.Backend` interface as the ONNX Runtime and GenAI backends (docs/trtllm.md).

A TensorRT-LLM directory (``hiwin-export trtllm``) is a Hugging Face Llama checkpoint (fp16, or a
ModelOpt fp8 / int4-AWQ checkpoint with ``hf_quant_config.json``) whose ``config.json`` names the
architecture :data:`ARCHITECTURE`: TensorRT-LLM's own Llama with one addition, registered by
:mod:`hiwin_runtime.trtllm_model` — an input processor that takes our visual rows as precomputed
multimodal embeddings. The request is the classic prompt-table contract:

* ``prompt_token_ids``: the prompt with the visual rows as fake ids ``vocab_size .. vocab_size + T - 1``
  (:func:`~hiwin_runtime.pipeline.prompt_table_ids`), carried in ``mm_processor_kwargs``;
* ``multi_modal_embeddings = {"image": [rows]}``: the visual rows [T, hidden] (float32, exactly the rows
  our vision graphs computed; TensorRT-LLM casts them to the model dtype where it splices them in).

The vision half stays on the export's graphs (like :class:`~hiwin_runtime.genai.GenAIBackend`). Unlike
the other backends, TensorRT-LLM runs the generation loop itself (in-flight batching, its sampler):
the backend turns our :class:`~hiwin_runtime.pipeline.GenerationConfig` into ``SamplingParams`` and
streams the tokens back (:meth:`TrtLlmBackend.generate_tokens`). Greedy decoding is the same rule as
ours (argmax); seeded sampling uses TensorRT-LLM's own random numbers, so its tokens differ from our
sampler's for the same seed.

No torch here: ``tensorrt_llm`` (and with it torch) is imported when a backend is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .manifest import ExportError, LanguageDir
from .pipeline import Backend, GenerationConfig, RequestError, prompt_table_ids

FACTS = "hiwin_trtllm.json"
ARCHITECTURE = "HiwinLlamaForCausalLM"  # config.json architectures[0]; registered by hiwin_runtime.trtllm_model
IDS_KEY = "hiwin_prompt_table_ids"  # the prompt-table ids, in the request's mm_processor_kwargs
PRECISIONS = ("fp16", "fp8", "int4_awq")


class TrtLlmUnavailable(ImportError):
    """TensorRT-LLM is not installed (or has no GPU to run on)."""


def import_trtllm():
    try:
        import tensorrt_llm
    except ImportError as e:
        raise TrtLlmUnavailable("TensorRT-LLM is not installed (pip install tensorrt-llm on a Linux x86-64 "
                                "or aarch64 machine with an NVIDIA GPU; see docs/trtllm.md)") from e
    return tensorrt_llm


# ------------------------------------------------------------------------------------ the request
def build_request(pre: list[int], visual: np.ndarray, post: list[int], *, vocab_size: int,
                  hidden_size: int) -> dict:
    """The LLM API request for a prompt (token ids before ``<image>``, visual rows [T, hidden], ids
    after): ``prompt`` (a label; the ids travel in ``mm_processor_kwargs``), the visual rows as
    ``multi_modal_embeddings["image"]`` and the prompt-table ids. Checked here, before any GPU work."""
    visual = np.asarray(visual)
    if visual.ndim != 2 or visual.shape[1] != hidden_size:
        raise RequestError(f"visual rows must be [T, {hidden_size}], got shape {tuple(visual.shape)}")
    if visual.shape[0] == 0:
        raise RequestError("no visual rows (an image gives at least one)")
    if not np.isfinite(visual).all():
        raise RequestError("visual rows contain NaN or infinity")
    for part in (pre, post):
        bad = [t for t in part if not (0 <= int(t) < vocab_size)]
        if bad:
            raise RequestError(f"token ids out of the vocabulary [0, {vocab_size}): {bad[:5]}")
    ids = prompt_table_ids([int(t) for t in pre], int(visual.shape[0]), [int(t) for t in post], vocab_size)
    rows = np.ascontiguousarray(visual, dtype=np.float32)
    return {"prompt": f"<hiwin: {len(pre)} text + {rows.shape[0]} visual + {len(post)} text tokens>",
            "multi_modal_embeddings": {"image": [rows]},
            "mm_processor_kwargs": {IDS_KEY: ids}}


def attach_rows(request: dict, *, vocab_size: int, hidden_size: int) -> tuple[list[int], np.ndarray]:
    """What the registered input processor does with a request (``attach_multimodal_embeddings``):
    the prompt-table ids and the visual rows, checked against each other. Torch-free: the processor
    in :mod:`hiwin_runtime.trtllm_model` and the tests' fake TensorRT-LLM both call it."""
    ids = (request.get("mm_processor_kwargs") or {}).get(IDS_KEY)
    if ids is None:
        raise ValueError(f"the request has no mm_processor_kwargs[{IDS_KEY!r}] (build it with "
                         "hiwin_runtime.trtllm.build_request)")
    emb = request.get("multi_modal_embeddings") or {}
    images = emb.get("image")
    if not images or len(images) != 1:
        raise ValueError("multi_modal_embeddings['image'] must hold exactly one [T, hidden] array")
    rows = images[0]
    shape = tuple(rows.shape)
    if len(shape) != 2 or shape[1] != hidden_size:
        raise ValueError(f"visual rows must be [T, {hidden_size}], got {shape}")
    ids = [int(t) for t in ids]
    table = [t for t in ids if t >= vocab_size]
    if table != list(range(vocab_size, vocab_size + shape[0])):
        raise ValueError(f"the prompt's table ids ({len(table)} ids >= {vocab_size}) do not index the "
                         f"{shape[0]} visual rows in order")
    if any(t < 0 for t in ids):
        raise ValueError("negative token ids in the prompt")
    return ids, rows


def splice(ids: list[int], rows: np.ndarray, embed, vocab_size: int) -> np.ndarray:
    """[L, hidden] input embeddings: token rows from ``embed`` (ids -> rows), and at each id >=
    ``vocab_size`` the next visual row in order — the rule of TensorRT-LLM's ``fuse_input_embeds``
    for out-of-vocabulary ids (numpy; the tests' fake runs it)."""
    ids = np.asarray(ids, np.int64)
    is_table = ids >= vocab_size
    out = np.empty((ids.size, rows.shape[1]), np.float32)
    text = np.flatnonzero(~is_table)
    if text.size:
        out[text] = embed(ids[text])
    out[np.flatnonzero(is_table)] = rows[ids[is_table] - vocab_size]
    return out


def sampling_kwargs(cfg: GenerationConfig, *, eos: int) -> dict:
    """``SamplingParams`` keyword arguments for a request's settings: greedy is ``top_k=1`` (TensorRT-LLM's
    explicit greedy), sampling is temperature + top-p over the whole vocabulary (``top_k=0``) with the
    request's seed. We detokenize ourselves (``detokenize=False``) and the prompt is already tokenized."""
    kw: dict[str, Any] = dict(max_tokens=cfg.max_new_tokens, end_id=eos, pad_id=eos, ignore_eos=cfg.ignore_eos,
                              detokenize=False, add_special_tokens=False)
    if cfg.do_sample:
        kw.update(temperature=float(cfg.temperature), top_p=float(cfg.top_p), top_k=0)
        if cfg.seed is not None:
            kw["seed"] = int(cfg.seed)
    else:
        kw.update(top_k=1)
    return kw


# ------------------------------------------------------------------------------------ the directory
class TrtLlmDir(LanguageDir):
    """A directory written by ``hiwin-export trtllm``: ``hiwin_trtllm.json`` + sha256-checked files."""

    FACTS, KIND, COMMAND = FACTS, "TensorRT-LLM", "hiwin-export trtllm"

    def _check_facts(self, facts_file: Path) -> None:
        if self.facts.get("precision") not in PRECISIONS:
            raise ExportError(f"{facts_file}: unknown precision {self.facts.get('precision')!r}")


# ------------------------------------------------------------------------------------ the backend
class TrtLlmBackend(Backend):
    """The LLM on TensorRT-LLM (``tensorrt_llm.LLM``, PyTorch backend); the vision half (and the separator
    embeddings) on ``vision``, an :class:`~hiwin_runtime.pipeline.OrtBackend` of the export.

    ``llm_kwargs`` go to ``tensorrt_llm.LLM`` as they are (e.g. ``tensor_parallel_size``); the defaults:
    ``max_seq_len`` the context length, ``max_batch_size`` = ``max_batch_size``, KV-cache block reuse and
    chunked prefill off (the table ids ``vocab_size + i`` are the same for every image, so a reused
    prefix block would carry another image's rows)."""

    name = "tensorrt-llm"
    generates_tokens = True  # the Pipeline hands the loop to generate_tokens

    def __init__(self, trtllm_dir: str | os.PathLike | TrtLlmDir, vision: Backend, *, language: dict | None = None,
                 verify: bool = True, max_batch_size: int = 4, kv_cache_fraction: float = 0.85,
                 llm_kwargs: dict | None = None):
        self.dir = trtllm_dir if isinstance(trtllm_dir, TrtLlmDir) else TrtLlmDir(trtllm_dir, verify=verify)
        if language is not None:
            self.dir.check_matches(language, "(its language manifest)")
        if not 0 < kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {kv_cache_fraction}")
        tllm = import_trtllm()
        from . import trtllm_model  # registers ARCHITECTURE and its input processor with TensorRT-LLM

        trtllm_model.register()
        from tensorrt_llm.llmapi import KvCacheConfig

        f = self.dir.facts
        self.vision, self.tllm = vision, tllm
        self.hidden_size, self.vocab_size = f["hidden_size"], f["vocab_size"]
        self.eos = (f.get("token_ids") or {}).get("eos", 2)
        self.precision = f["precision"]
        kw = dict(model=str(self.dir.path), tokenizer=str(self.dir.path), dtype="auto",
                  max_seq_len=int(f["context_length"]), max_batch_size=int(max_batch_size),
                  enable_chunked_prefill=False,
                  kv_cache_config=KvCacheConfig(enable_block_reuse=False, free_gpu_memory_fraction=kv_cache_fraction))
        kw.update(llm_kwargs or {})
        self.llm_kwargs = kw
        self.llm = tllm.LLM(**kw)
        self.name = f"tensorrt-llm {getattr(tllm, '__version__', '?')} ({self.precision}; vision: {vision.name})"

    # vision half and separators: the export's graphs
    def encode_visual(self, prepared, newline, comma):
        return self.vision.encode_visual(prepared, newline, comma)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.vision.embed(ids)

    def empty_cache(self):
        raise NotImplementedError("TensorRT-LLM runs the generation loop itself: use generate_tokens")

    def forward(self, embeds, cache, past):
        raise NotImplementedError("TensorRT-LLM reads token ids and a prompt table, not embeddings: use generate_tokens")

    def prefill(self, pre, visual, post, max_new_tokens=None):
        raise NotImplementedError("TensorRT-LLM runs the generation loop itself: use generate_tokens")

    def request(self, pre: list[int], visual: np.ndarray, post: list[int]) -> dict:
        return build_request(pre, visual, post, vocab_size=self.vocab_size, hidden_size=self.hidden_size)

    def generate_tokens(self, pre: list[int], visual: np.ndarray, post: list[int],
                        cfg: GenerationConfig) -> Iterator[int]:
        """Stream the answer's token ids (no end token); the generator returns the finish reason."""
        from tensorrt_llm import SamplingParams

        req = self.request(pre, visual, post)
        params = SamplingParams(**sampling_kwargs(cfg, eos=self.eos))
        result = self.llm.generate_async(req, sampling_params=params, streaming=True)
        sent = 0
        out = None
        try:
            for out in result:
                toks = list(out.outputs[0].token_ids)
                for t in toks[sent:]:
                    if t == self.eos and not cfg.ignore_eos:
                        return "eos"
                    yield int(t)
                sent = len(toks)
        finally:  # the caller stopped early (closed the stream): free the request's slot and KV cache
            if not getattr(result, "finished", True) and hasattr(result, "abort"):
                result.abort()
        if out is None:
            raise RuntimeError("TensorRT-LLM returned no output for the request")
        reason = getattr(out.outputs[0], "finish_reason", None)
        return "eos" if reason == "stop" else "length"
