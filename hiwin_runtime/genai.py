"""The language half on ONNX Runtime GenAI (``onnxruntime-genai``): its optimised Llama decoder
(GroupQueryAttention with a shared KV buffer; fp32, fp16 or int4 MatMulNBits weights) behind the
same :class:`~hiwin_runtime.pipeline.Backend` interface as :class:`~hiwin_runtime.pipeline.OrtBackend`.

A GenAI directory (``hiwin-export genai``, docs/genai.md) is a GenAI *vision-language* model of the
``phi3v`` kind, whose three parts GenAI runs in order on the prompt:

* ``vision.onnx``: an identity: ``pixel_values`` [1, T, C], here the visual rows our own vision graphs
  computed (through the crop chain, in the released layout, separators included) -> ``image_features``
  [T, C];
* ``embedding.onnx``: ``input_ids`` + ``image_features`` -> ``inputs_embeds``: token rows from the
  LLM's embedding table, and at every placeholder id (:data:`PLACEHOLDER`, negative like Phi-3-vision's)
  the next visual row, in order;
* ``model.onnx``: the GenAI model builder's Llama decoder (``exclude_embeds``: it reads ``inputs_embeds``).

The vision half stays on the export's graphs (:class:`OrtBackend`'s crop chain). The generation loop
stays the :class:`Pipeline`'s: GenAI computes the logits (prefill through ``set_inputs``, each
step through ``append_tokens``) and :func:`~hiwin_runtime.pipeline.sample_next` picks the token,
so greedy and seeded sampling are exactly the other backends' rules. No torch; ``onnxruntime_genai``
is imported when a backend is built.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .manifest import LanguageDir
from .ort import share_cpu_arena
from .pipeline import Backend

FACTS = "hiwin_genai.json"
GENAI_SUBDIR = "genai"  # where `hiwin-export export --genai` puts the directory inside an export
PLACEHOLDER = -1  # the id of a visual position in GenAI's input_ids (Phi-3-vision's convention: -image_number)


class GenAIUnavailable(ImportError):
    """onnxruntime-genai is not installed."""


def import_genai():
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        raise GenAIUnavailable("onnxruntime-genai is not installed (pip install onnxruntime-genai, "
                               "or pip install 'hiwin[genai]')") from e
    return og


def genai_prompt_ids(pre: list[int], num_visual: int, post: list[int]) -> list[int]:
    """The prompt as GenAI's embedding model reads it: the visual rows become :data:`PLACEHOLDER` ids."""
    return [*pre, *([PLACEHOLDER] * num_visual), *post]


def physical_cores() -> int:
    """The physical cores this process may run on (hyper-threads counted once), from the kernel's CPU
    topology; the number of CPUs it may run on where the topology cannot be read."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    try:
        for c in cpus:
            t = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
            cores.add(((t / "physical_package_id").read_text().strip(), (t / "core_id").read_text().strip()))
    except OSError:
        return max(1, len(cpus))
    return max(1, len(cores))


# The embedding and vision parts are a Gather and a Reshape: one thread each, not spinning between calls
# (an idle ORT pool busy-waits for a while after each run, on the cores the decoder is about to use).
_SMALL_PART = {"intra_op_num_threads": 1, "session.intra_op.allow_spinning": "0",
               "session.inter_op.allow_spinning": "0"}


# Every part draws from the process's one CPU arena (hiwin_runtime.ort.share_cpu_arena), which the vision
# sessions use too: the prefill's activations reuse what the vision graphs freed instead of a second
# arena (measured at real width, 1008x672: resident after the request 5530 -> 5113 MiB, peak 5649 -> 5564)
_SHARED_ARENA = {"session.use_env_allocators": "1"}


def session_overlay(threads: int | None) -> dict:
    """What :class:`GenAIBackend` lays over ``genai_config.json``: the decoder's intra-op thread count
    (``threads``, default the physical cores), single-threaded embedding / vision parts, and every part
    on the process's shared CPU arena (``session.use_env_allocators``).

    The thread count is set explicitly because GenAI's own default ran the decoder on ONE thread on a
    2-core machine where ONNX Runtime's default is two (measured at real width: prefill 5.5 s -> 2.8 s,
    decode 13.5 -> 18.6 tokens/s, docs/genai.md); apps that read the directory directly set it in
    ``model.decoder.session_options.intra_op_num_threads``."""
    n = int(threads) if threads else physical_cores()
    if n < 1:
        raise ValueError(f"threads must be >= 1, not {threads}")
    return {"model": {"decoder": {"session_options": {"intra_op_num_threads": n, **_SHARED_ARENA}},
                      "embedding": {"session_options": {**_SMALL_PART, **_SHARED_ARENA}},
                      "vision": {"session_options": {**_SMALL_PART, **_SHARED_ARENA}}}}


class GenAIDir(LanguageDir):
    """A GenAI directory written by ``hiwin-export genai``: ``hiwin_genai.json`` + sha256-checked files."""

    FACTS, KIND, COMMAND = FACTS, "GenAI", "hiwin-export genai"


class GenAIBackend(Backend):
    """The LLM on ONNX Runtime GenAI; the vision half (and the separator embeddings) on ``vision``,
    an :class:`~hiwin_runtime.pipeline.OrtBackend` of the export. ``providers``: GenAI provider names
    (``[]`` or None: as in genai_config.json, CPU for a CPU build); ``max_length``: the GenAI
    generator's length limit (its KV buffer), default the context length; ``threads``: the decoder's
    intra-op threads (default: the physical cores, see :func:`session_overlay`)."""

    name = "onnxruntime-genai"

    def __init__(self, genai_dir: str | os.PathLike | GenAIDir, vision: Backend, *, language: dict | None = None,
                 verify: bool = True, providers: list[str] | None = None, max_length: int | None = None,
                 threads: int | None = None):
        og = import_genai()
        self.dir = genai_dir if isinstance(genai_dir, GenAIDir) else GenAIDir(genai_dir, verify=verify)
        if language is not None:
            self.dir.check_matches(language, "(its language manifest)")
        self.og, self.vision = og, vision
        self.hidden_size = self.dir.facts["hidden_size"]
        self.vocab_size = self.dir.facts["vocab_size"]
        self.max_length = int(max_length or self.dir.facts["context_length"])
        self.precision = self.dir.facts.get("precision", "fp32")
        self.name = f"onnxruntime-genai {og.__version__} ({self.precision}; vision: {vision.name})"
        share_cpu_arena()  # registered before GenAI's sessions are made (the overlay asks for it)
        config = og.Config(str(self.dir.path))
        self.session_options = session_overlay(threads)
        config.overlay(json.dumps(self.session_options))
        if providers:
            config.clear_providers()
            for p in providers:
                config.append_provider(p)
        self.model = og.Model(config)

    # vision half and separators: the export's graphs
    def encode_visual(self, prepared, newline, comma):
        return self.vision.encode_visual(prepared, newline, comma)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.vision.embed(ids)

    # language half: a GenAI generator per request is the cache
    def empty_cache(self) -> Any:
        raise NotImplementedError("GenAI keeps its KV cache inside a generator: use prefill / step")

    def forward(self, embeds, cache, past):
        raise NotImplementedError("GenAI reads token ids and visual rows, not embeddings: use prefill / step")

    def prefill(self, pre: list[int], visual: np.ndarray, post: list[int], max_new_tokens: int | None = None):
        og = self.og
        ids = genai_prompt_ids(pre, int(visual.shape[0]), post)
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.request_length(len(ids), max_new_tokens), do_sample=False)
        gen = og.Generator(self.model, params)
        inputs = og.NamedTensors()
        inputs["input_ids"] = np.array([ids], np.int32)
        inputs["pixel_values"] = np.ascontiguousarray(visual, dtype=np.float32)[None]
        inputs["num_image_tokens"] = np.array([visual.shape[0]], np.int64)
        gen.set_inputs(inputs)
        return self._logits(gen), gen

    def request_length(self, prompt: int, max_new_tokens: int | None) -> int:
        """The generator's ``max_length``: GenAI allocates its KV buffer (shared past / present) for
        that many positions when the generator is made, so a request gets what it can use (prompt +
        its new tokens), not the whole context (at 7B, fp32, 4096 positions: 4 GiB of KV per request)."""
        if max_new_tokens is None:
            return self.max_length
        return min(self.max_length, prompt + int(max_new_tokens) + 1)

    def step(self, token: int, cache, past: int):
        cache.append_tokens(np.array([[token]], np.int32))
        return self._logits(cache), cache

    def _logits(self, gen) -> np.ndarray:
        return np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1, self.vocab_size)[-1]
