"""LLaVA-UHD v2 reference model: image + question -> answer (arXiv 2412.13871, released
``old-vicuna-7b`` code; docs/model.md describes what it computes).

Stages are seams: slicing (:mod:`.slicing`) -> CLIP layer -2 (:mod:`.vision`) -> JBU 2x/4x
(:mod:`.jbu`) -> Hiwin projector (:mod:`.projector`) -> token layout (:mod:`.layout`) -> Llama.
The constructor builds modules only; weights load in :meth:`HiwinForCausalLM.from_pretrained`
(built on the meta device, tensors assigned once, so a 7B model needs no second copy).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from hiwin_runtime.crop_chain import BatchPolicy, CropChain, Stages

from .arrays import TORCH_OPS
from .checkpoint import (CheckpointError, _torch_load, atomic_directory, ignored_reason, load_into,
                         official_state_dict, read_official, save_sharded, to_official, to_ours)
from .config import HiwinConfig, llama_config
from .image import ImageSource
from .jbu import JBUStack
from .layout import layout_image_tokens
from .processor import HiwinProcessor, PreparedImage, TextDeltas
from .projector import HiwinProjector
from .vision import VisionTower

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(d: str | torch.dtype) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    try:
        return DTYPES[d]
    except KeyError:
        raise ValueError(f"unknown dtype {d!r} (use one of {sorted(DTYPES)})") from None


class HiwinVision(nn.Module):
    """The vision path alone (CLIP tower, JBU stack, projector): images -> visual tokens.

    :class:`HiwinForCausalLM` adds the LLM; exporting or benchmarking the vision graphs needs only
    this. Its crops run through the one :class:`~hiwin_runtime.crop_chain.CropChain`.
    ``projector_impl``: ``"faithful"`` (the released order of operations, the parity oracle) or
    ``"fast"`` (the same maths with 1.6-1.9x fewer FLOPs, :class:`~hiwin_model.projector.HiwinProjector`).
    """

    def __init__(self, config: HiwinConfig, *, dtype: torch.dtype = torch.float32, device=None,
                 attn_implementation: str = "sdpa", projector_impl: str = "faithful"):
        super().__init__()
        self.config = config
        kw = dict(device=device, dtype=dtype)
        self.vision_tower = VisionTower(config.vision, attn_implementation=attn_implementation, **kw)
        j = config.jbu
        self.jbu = JBUStack(j.dim, j.key_dim, j.radius, j.fixup_scale, **kw)
        p = config.projector
        self.projector = HiwinProjector(p.dim, p.vision_dim, p.num_heads, p.grid, p.eps, impl=projector_impl, **kw)

    @property
    def dtype(self) -> torch.dtype:
        return self.projector.proj.dtype

    @property
    def device(self) -> torch.device:
        return self.projector.proj.device

    def stages(self, projector_impl: str | None = None, jbu_conv: str = "taps",
               dtype: torch.dtype | None = None) -> Stages:
        """ViT, JBU and projector as crop-chain stages (inputs moved to the model's device and to
        ``dtype``, default the model's: FSDP2 training passes its compute dtype, the parameters being
        sharded fp32 masters outside their unit's call); ``projector_impl`` overrides the projector's
        own form (parity pins ``"faithful"``), ``"any-grid"`` runs the form of the exported graph
        (:meth:`HiwinProjector.forward_any_grid`); ``jbu_conv`` picks the JBU's adaptive convolution
        (``"taps"``, the reference, ``"tiled"`` or ``"plugin"``, :data:`hiwin_model.jbu.CONV_IMPLS`)."""
        def vit(pixels: Tensor) -> Tensor:
            return self.vision_tower(torch.as_tensor(pixels).to(device=self.device, dtype=dtype or self.dtype))

        def jbu(f1: Tensor, pixels: Tensor) -> tuple[Tensor, Tensor]:
            px = torch.as_tensor(pixels).to(device=self.device, dtype=dtype or self.dtype)
            return self.jbu(f1, px, conv=jbu_conv)

        def projector(bucket: tuple[int, int], f1: Tensor, f2: Tensor, f4: Tensor) -> Tensor:
            if projector_impl == "any-grid":
                return self.projector.forward_any_grid([f1, f2, f4])
            return self.projector([f1, f2, f4], grid_hw=bucket, impl=projector_impl)

        return Stages(vit, jbu, projector)

    def crop_chain(self, policy: BatchPolicy = BatchPolicy(), stages: Stages | None = None) -> CropChain:
        """The one crop chain over this model's stages (or over wrappers of them: parity, benchmarks).
        Default policy: the ViT batched per crop shape, JBU and projector crop by crop, which bounds
        memory at real dimensions."""
        return CropChain(stages or self.stages(), patch_size=self.config.vision.patch_size, ops=TORCH_OPS,
                         policy=policy)

    def encode_crops(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) normalised crops of one shape -> (B, 144, C) visual tokens."""
        return self.crop_chain(BatchPolicy(None, None)).encode_group(pixels)

    def encode_prepared(self, prepared: PreparedImage) -> Tensor:
        """All crops of one image -> (n+1, 144, C) in crop order."""
        return self.crop_chain().encode_crops(prepared.crops)


class HiwinForCausalLM(HiwinVision):
    def __init__(self, config: HiwinConfig, *, dtype: torch.dtype = torch.float32, device=None,
                 attn_implementation: str = "sdpa", projector_impl: str = "faithful"):
        super().__init__(config, dtype=dtype, device=device, attn_implementation=attn_implementation,
                         projector_impl=projector_impl)
        from transformers import LlamaForCausalLM

        llama = llama_config(config)
        llama._attn_implementation = attn_implementation
        self.llm = LlamaForCausalLM(llama).to(device=device, dtype=dtype)
        self.processor: HiwinProcessor | None = None

    @property
    def context_length(self) -> int:
        """Tokens the LLM attends over (prompt + answer): the released ``tokenizer_model_max_length``."""
        return int(self.config.raw.get("tokenizer_model_max_length", self.llm.config.max_position_embeddings))

    # ------------------------------------------------------------------ vision path
    def separator_embeddings(self) -> tuple[Tensor, Tensor]:
        ids = self._processor().ids
        emb = self.llm.get_input_embeddings()
        t = torch.tensor([ids.newline, ids.comma], device=self.device)
        nl, comma = emb(t)
        return nl, comma

    @torch.no_grad()
    def encode_image(self, image: ImageSource, *, max_slices: int | None = None) -> Tensor:
        """Image -> (T, C) visual token embeddings in the released layout."""
        prepared = self._processor().prepare_image(image, max_slices=max_slices)
        return self.layout(prepared, self.encode_prepared(prepared))

    def layout(self, prepared: PreparedImage, crops: Tensor) -> Tensor:
        nl, comma = self.separator_embeddings()
        return layout_image_tokens(crops, prepared.grid, nl, comma)

    # ------------------------------------------------------------------ language side
    def embed_prompt(self, prompt: str, visual: Tensor) -> Tensor:
        """(1, L, C) input embeddings: tokens before <image>, visual tokens, tokens after."""
        pre, post = self._processor().tokenize_around_image(prompt)
        emb = self.llm.get_input_embeddings()
        dev = self.device
        parts = [emb(torch.tensor(pre, dtype=torch.long, device=dev)), visual.to(self.dtype),
                 emb(torch.tensor(post, dtype=torch.long, device=dev))]
        return torch.cat(parts, dim=0)[None]

    @torch.no_grad()
    def generate(self, image: ImageSource, question: str, *, template: str = "vicuna_v1",
                 max_new_tokens: int = 256, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None, max_slices: int | None = None,
                 on_text: Callable[[str], None] | None = None) -> str:
        """Answer ``question`` about ``image``; ``on_text`` receives the answer as it streams."""
        ids = self.generate_ids(image, question, template=template, max_new_tokens=max_new_tokens,
                                do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed,
                                max_slices=max_slices, on_text=on_text)
        return self._processor().tokenizer.decode(ids, skip_special_tokens=True).strip()

    @torch.no_grad()
    def generate_ids(self, image: ImageSource, question: str, *, template: str = "vicuna_v1",
                     max_new_tokens: int = 256, do_sample: bool = False, temperature: float = 1.0,
                     top_p: float = 1.0, seed: int | None = None, max_slices: int | None = None,
                     on_text: Callable[[str], None] | None = None) -> list[int]:
        """The answer's token ids (without the final EOS), by transformers' ``generate``."""
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
        if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1 "
                             f"(got {temperature}, {top_p})")
        proc = self._processor()
        prompt = proc.prompt(question, template)
        visual = self.encode_image(image, max_slices=max_slices)
        embeds = self.embed_prompt(prompt, visual)
        limit = self.context_length
        if embeds.shape[1] + max_new_tokens > limit:
            raise ValueError(f"prompt of {embeds.shape[1]} tokens (of which {visual.shape[0]} visual) plus "
                             f"max_new_tokens={max_new_tokens} exceeds the context of {limit} tokens")
        kw = dict(max_new_tokens=max_new_tokens, eos_token_id=proc.ids.eos, pad_token_id=proc.ids.eos)
        if do_sample:
            kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
            if seed is not None:
                torch.manual_seed(seed)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        streamer = _TextStreamer(proc.tokenizer, on_text) if on_text else None
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=mask, streamer=streamer, **kw)
        ids = out[0].tolist()
        if ids and ids[-1] == proc.ids.eos:
            ids = ids[:-1]
        return ids

    def _processor(self) -> HiwinProcessor:
        if self.processor is None:
            raise RuntimeError("no tokenizer attached: load with from_pretrained() or set .processor")
        return self.processor

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: str | torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", mm_vision_tower: str | None = None,
                        max_slices: int | None = None, pre_resize: int | None = None,
                        attn_implementation: str = "sdpa", load_tokenizer: bool = True,
                        projector_impl: str = "faithful") -> "HiwinForCausalLM":
        """Load a released (or our) HF directory: config.json + safetensors shards + tokenizer."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: model directory not found")
        dtype = parse_dtype(dtype)
        config = HiwinConfig.from_pretrained(path, mm_vision_tower=mm_vision_tower, max_slices=max_slices)
        with torch.device("meta"):
            model = cls(config, dtype=dtype, attn_implementation=attn_implementation, projector_impl=projector_impl)
        ignored = load_into(model, read_official(path), rename=to_ours, source=str(path), dtype=dtype,
                            device=device, ignore=lambda k: ignored_reason(k, config.vision.layers_built))
        if ignored:
            log.info("skipped %d unused checkpoint keys (%s)", len(ignored), sorted(set(ignored.values())))
        model._materialize_buffers(torch.device(device))
        if load_tokenizer:
            tok = _load_tokenizer(path)
            model.processor = HiwinProcessor(tok, config.slicing, pre_resize=pre_resize)
        return model.eval()

    def _materialize_buffers(self, device: torch.device) -> None:
        """Recreate the non-persistent buffers left on the meta device by a meta build."""
        emb = self.vision_tower.vision_model.embeddings
        if emb.position_ids.is_meta:
            emb.register_buffer("position_ids", torch.arange(emb.num_positions, device=device)[None],
                                persistent=False)
        rot = self.llm.model.rotary_emb
        if any(b.is_meta for b in rot.buffers()):
            self.llm.model.rotary_emb = type(rot)(self.llm.config).to(device)
        left = [n for n, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        if left:
            raise CheckpointError(f"tensors left uninitialised after loading: {left}")

    def load_projector_weights(self, path: str | os.PathLike) -> None:
        """Stage-1 ``mm_projector.bin`` (keys ``model.mm_projector.*``, JBU keys optional)."""
        sd = _torch_load(Path(path))
        entries = [(k, (lambda v=v: v), tuple(v.shape)) for k, v in sd.items()]
        prefixes = ("projector.", "jbu.") if any(k.startswith("model.mm_projector.upsampler.upsampler.")
                                                 for k in sd) else ("projector.",)
        load_into(self, entries, rename=to_ours, ignore=ignored_reason, expected_prefix=prefixes,
                  source=str(path), dtype=self.dtype, device=self.device)

    def load_jbu_checkpoint(self, path: str | os.PathLike) -> None:
        """Stage-0 Lightning ``.ckpt`` whose ``state_dict`` has ``upsampler.*`` (others skipped)."""
        obj = _torch_load(Path(path))
        sd = obj.get("state_dict", obj)
        entries = [(k, (lambda v=v: v), tuple(v.shape)) for k, v in sd.items()]
        load_into(self, entries, rename=lambda k: "jbu." + k[len("upsampler."):] if k.startswith("upsampler.") else None,
                  ignore=_stage0_ignored, expected_prefix="jbu.", source=str(path), dtype=self.dtype,
                  device=self.device)

    def save_pretrained(self, path: str | os.PathLike, *, overwrite: bool = False,
                        max_shard_bytes: int = 4 << 30, extra: Callable[[Path], None] | None = None,
                        state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write config.json, safetensors shards + index (official key names) and the tokenizer,
        atomically (a temp directory renamed into place); ``extra(tmpdir)`` adds more files.
        ``state_dict`` (our key names) replaces the module's own tensors, e.g. the full weights a
        sharded (FSDP) training run gathered onto one rank."""
        def write(tmp: Path) -> None:
            cfg = self.config.to_dict()
            dtype = self.dtype if state_dict is None else state_dict["projector.proj"].dtype
            cfg["torch_dtype"] = str(dtype).replace("torch.", "")
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
            if state_dict is None:
                save_sharded(official_state_dict(self), tmp, max_shard_bytes)
            else:
                save_sharded({to_official(k): v for k, v in state_dict.items()}, tmp, max_shard_bytes)
            if self.processor is not None:
                self.processor.tokenizer.save_pretrained(str(tmp))
            if extra is not None:
                extra(tmp)
        return atomic_directory(Path(path), write, overwrite=overwrite)


def _load_tokenizer(path: Path):
    """AutoTokenizer on the model directory; its config's model_type `llava_llama` is unknown to
    transformers, which only matters for the (harmless) warning silenced here."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(path))
    finally:
        hf_logging.set_verbosity(level)


def _stage0_ignored(key: str) -> str | None:
    if key.startswith(("model.", "downsampler", "scale_net")):
        return "stage-0 training module (featurizer, down-samplers, uncertainty net)"
    return None


class _TextStreamer:
    """transformers streamer that hands decoded text deltas to a callback."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        self.deltas, self.on_text = TextDeltas(tokenizer), on_text
        self.started = False

    def put(self, value: Tensor) -> None:
        if not self.started:  # generate() first reports the prompt ids (empty with inputs_embeds)
            self.started = True
            return
        for v in value.reshape(-1).tolist():
            delta = self.deltas.push(v)
            if delta:
                self.on_text(delta)

    def end(self) -> None:
        delta = self.deltas.flush()
        if delta:
            self.on_text(delta)
