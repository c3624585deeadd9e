"""Image and text pre-processing shared by the reference model, training and every runtime.

:class:`HiwinProcessor` turns an image into normalised crops (numpy, slicing plan included) and a
prompt into token ids around the ``<image>`` position. Separator ids ("\\n", ",") are resolved from
the tokenizer once, so non-Llama tokenizers work (Llama gives 13 and 29892). The tokenizer is a
transformers tokenizer or a :class:`~hiwin_runtime.tokenizer.TextTokenizer` (no transformers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import SliceConfig
from .conversation import IMAGE_PLACEHOLDER, get_template
from .crop_chain import shape_groups
from .image import ImageSource, load_image
from .slicing import SlicePlan, apply_plan, normalize, plan_slices
from .slicing import pre_resize as _pre_resize
from .tokenizer import TextTokenizer, as_text_tokenizer


@dataclass(frozen=True)
class TokenIds:
    bos: int | None
    eos: int
    newline: int
    comma: int

    def to_json(self) -> dict:
        return {"bos": self.bos, "eos": self.eos, "newline": self.newline, "comma": self.comma}


def separator_id(tokenizer, text: str) -> int:
    """Id of ``text`` as it appears after a word ("a,"), the form the released model used."""
    tok = as_text_tokenizer(tokenizer)
    ids = tok.encode("a" + text)
    if not ids or tok.decode(ids[-1:]) != text:
        raise ValueError(f"tokenizer has no single token for {text!r} (got ids {ids})")
    return int(ids[-1])


def resolve_token_ids(tokenizer) -> TokenIds:
    tok = as_text_tokenizer(tokenizer)
    if tok.eos_id is None:
        raise ValueError("tokenizer defines no eos token")
    return TokenIds(bos=tok.bos_id, eos=int(tok.eos_id), newline=separator_id(tok, "\n"),
                    comma=separator_id(tok, ","))


@dataclass
class PreparedImage:
    plan: SlicePlan
    crops: list[np.ndarray]  # (3, H, W) float32 each: slices row-major, then the overview

    @property
    def grid(self):
        return self.plan.grid

    def shape_groups(self) -> dict[tuple[int, int], list[int]]:
        """Crop indices grouped by (H, W), so each group runs as one batch."""
        return shape_groups(self.crops)


class HiwinProcessor:
    def __init__(self, tokenizer, slicing: SliceConfig | None = None, *, pre_resize: int | None = None):
        self.tokenizer = tokenizer  # as given (the reference saves it with the model)
        self.text: TextTokenizer = as_text_tokenizer(tokenizer)
        self.slicing = slicing or SliceConfig()
        self.pre_resize = pre_resize
        self.ids = resolve_token_ids(self.text)

    def prepare_image(self, image: ImageSource, *, max_slices: int | None = None) -> PreparedImage:
        img = load_image(image)
        if self.pre_resize:
            img = _pre_resize(img, self.pre_resize)
        s = self.slicing
        plan = plan_slices(img.size, max_slices or s.max_slices, scale_resolution=s.scale_resolution,
                           patch_size=s.patch_size)
        sliced = apply_plan(img, plan)
        return PreparedImage(plan, [normalize(c, s.mean, s.std) for c in sliced.crops])

    def tokenize_around_image(self, prompt: str) -> tuple[list[int], list[int]]:
        """Ids before and after the single ``<image>`` of ``prompt``; BOS only at the very start.

        Like the released ``tokenizer_image_token``, each chunk is tokenized separately.
        """
        if prompt.count(IMAGE_PLACEHOLDER) != 1:
            raise ValueError(f"prompt must contain exactly one {IMAGE_PLACEHOLDER}, "
                             f"found {prompt.count(IMAGE_PLACEHOLDER)}")
        before, after = prompt.split(IMAGE_PLACEHOLDER)
        pre = self.text.encode(before) if before else []
        post = self.text.encode(after) if after else []
        if self.ids.bos is not None:
            pre = [self.ids.bos] + pre
        return list(pre), list(post)

    def prompt(self, question: str, template: str = "vicuna_v1") -> str:
        if not isinstance(question, str):
            raise TypeError(f"question must be a str, got {type(question).__name__}")
        if template != "plain" and not question.strip():
            raise ValueError("the question is empty")
        return get_template(template).prompt(question, eos=self.text.eos_token or "</s>")

    def encode_text(self, text: str) -> list[int]:
        return self.text.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.text.decode(ids)


class TextDeltas:
    """Token ids in, newly decoded text out: the answer decoded as a whole each time (so merges
    across tokens are right), holding back an incomplete multi-byte character."""

    def __init__(self, tokenizer):
        self.tok = as_text_tokenizer(tokenizer)
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # incomplete multi-byte character: wait for more tokens
            return ""
        delta = text[len(self.text):] if text.startswith(self.text) else ""
        self.text = text
        return delta

    def flush(self) -> str:
        """At the end of the answer: whatever was held back (an incomplete character stays as
        U+FFFD, as in the decoded answer)."""
        text = self.tok.decode(self.ids)
        delta = text[len(self.text):] if text.startswith(self.text) else ""
        self.text = text
        return delta
