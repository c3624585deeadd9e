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

import os
from typing import Any

import numpy as np

from .manifest import LanguageDir
from .pipeline import Backend

FACTS = "hiwin_genai.json"
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


class GenAIDir(LanguageDir):
    """A GenAI directory written by ``hiwin-export genai``: ``hiwin_genai.json`` + sha256-checked files."""

    FACTS, KIND, COMMAND = FACTS, "GenAI", "hiwin-export genai"


class GenAIBackend(Backend):
    """The LLM on ONNX Runtime GenAI; the vision half (and the separator embeddings) on ``vision``,
    an :class:`~hiwin_runtime.pipeline.OrtBackend` of the export. ``providers``: GenAI provider names
    (``[]`` or None: as in genai_config.json, CPU for a CPU build); ``max_length``: the GenAI
    generator's length limit (its KV buffer), default the context length."""

    name = "onnxruntime-genai"

    def __init__(self, genai_dir: str | os.PathLike | GenAIDir, vision: Backend, *, language: dict | None = None,
                 verify: bool = True, providers: list[str] | None = None, max_length: int | None = None):
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
        config = og.Config(str(self.dir.path))
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

    def prefill(self, pre: list[int], visual: np.ndarray, post: list[int]):
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length, do_sample=False)
        gen = og.Generator(self.model, params)
        ids = genai_prompt_ids(pre, int(visual.shape[0]), post)
        inputs = og.NamedTensors()
        inputs["input_ids"] = np.array([ids], np.int32)
        inputs["pixel_values"] = np.ascontiguousarray(visual, dtype=np.float32)[None]
        inputs["num_image_tokens"] = np.array([visual.shape[0]], np.int64)
        gen.set_inputs(inputs)
        return self._logits(gen), gen

    def step(self, token: int, cache, past: int):
        cache.append_tokens(np.array([[token]], np.int32))
        return self._logits(cache), cache

    def _logits(self, gen) -> np.ndarray:
        return np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1, self.vocab_size)[-1]
