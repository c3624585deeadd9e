"""Tiny LLaVA-UHD v2 checkpoints with the real structure, built locally (no hub access).

Same slicing (336 px, 14 px patches, 24x24 position grid), same 1x/2x/4x JBU stack and Hiwin
projector with 144 queries, same key layout and config keys as the released 7B; only widths and
depths are small, and the tokenizer is a byte-level BPE trained on an embedded corpus. Tests use
these, and ``hiwin make-tiny`` writes one for the README's main job.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import HiwinConfig
from .conversation import VICUNA_SYSTEM

_CORPUS = [
    VICUNA_SYSTEM,
    "USER: ASSISTANT: What is in the image? Describe the picture in detail.",
    "The image shows a red square, a blue circle, a green triangle and some text on a white page.",
    "There is a cat, a dog, a person, a car, a tree and a house. The sky is blue, the grass is green.",
    "How many objects are there? What colour is the largest shape? Read the text in the document.",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10. Yes. No. Left, right, top, bottom, centre.\n",
]

TINY_CONFIG = dict(
    architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama",
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-5,
    rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.02, attention_bias=False,
    mm_projector_type="adapt_spatial_resampler", feature_mode="featup_muti_res", feature_scale_mask=7,
    mm_hidden_size=32, mm_vision_select_layer=-2, mm_vision_tower="openai/clip-vit-large-patch14-336",
    tokenizer_model_max_length=4096, tokenizer_padding_side="right",
    hiwin_projector_num_heads=4,
    hiwin_vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, image_size=336, patch_size=14,
                             hidden_act="quick_gelu", layer_norm_eps=1e-5),
)


def build_tokenizer(vocab_size: int = 384):
    """Byte-level BPE with Llama's special ids (<unk>=0, <s>=1, </s>=2); BOS added by default."""
    return _bpe_tokenizer(_CORPUS, vocab_size)


def _bpe_tokenizer(corpus: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<unk>", model_max_length=4096)


def tiny_config(**overrides) -> HiwinConfig:
    d = dict(TINY_CONFIG)
    d.update(overrides)
    return HiwinConfig.from_dict(d)


def build_tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised tiny model with its tokenizer attached (in memory)."""
    from .model import HiwinForCausalLM
    from .processor import HiwinProcessor

    tok = build_tokenizer()
    cfg = tiny_config(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=0, **overrides)
    torch.manual_seed(seed)
    model = HiwinForCausalLM(cfg, dtype=dtype)
    _randomise_jbu(model, seed)
    model.processor = HiwinProcessor(tok, cfg.slicing)
    return model.eval()


def _randomise_jbu(model, seed: int) -> None:
    """Move the JBU scalars off their init values so tests exercise them (like trained weights)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in (model.jbu.up1, model.jbu.up2):
            layer.range_temp.fill_(float(torch.empty(1).uniform_(-0.5, 0.5, generator=g)))
            layer.sigma_spatial.fill_(float(torch.empty(1).uniform_(0.7, 1.3, generator=g)))
        for i in range(1, 4):
            emb = getattr(model.projector, f"feature_{['1x', '2x', '4x'][i - 1]}_embedding")
            emb.normal_(0, 0.02, generator=g)


def write_tiny_checkpoint(path: str | os.PathLike, seed: int = 0, *, overwrite: bool = False,
                          max_shard_bytes: int = 1 << 20) -> Path:
    """Write a tiny checkpoint directory in the official layout (sharded to exercise the index)."""
    model = build_tiny_model(seed)
    return model.save_pretrained(path, overwrite=overwrite, max_shard_bytes=max_shard_bytes)
