"""Text tokenizers behind one small interface, so the runtime needs no transformers.

:class:`FileTokenizer` reads an HF tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``)
with the ``tokenizers`` library alone; :class:`HFTokenizer` wraps a transformers tokenizer (the
reference model's). Both give the same ids and text for what the pipeline does: encode prompt
chunks without special tokens, decode answers skipping special tokens (tested equal).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class TextTokenizer:
    """``encode`` (no special tokens), ``decode`` (skipping special tokens), bos/eos ids, eos text."""

    bos_id: int | None
    eos_id: int | None
    eos_token: str | None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError


class HFTokenizer(TextTokenizer):
    def __init__(self, tok):
        self.tok = tok
        self.bos_id, self.eos_id, self.eos_token = tok.bos_token_id, tok.eos_token_id, tok.eos_token

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


# transformers' ``clean_up_tokenization`` (applied only where the tokenizer config asks for it)
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class FileTokenizer(TextTokenizer):
    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer

        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json (an HF fast-tokenizer directory is required)")
        self.tok = Tokenizer.from_file(str(tj))
        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        smap = path / "special_tokens_map.json"
        if smap.is_file():
            cfg = {**json.loads(smap.read_text()), **cfg}
        self.bos_token, self.eos_token = _content(cfg.get("bos_token")), _content(cfg.get("eos_token"))
        self.bos_id = self._id(self.bos_token)
        self.eos_id = self._id(self.eos_token)
        self.clean_up = bool(cfg.get("clean_up_tokenization_spaces", False))

    def _id(self, token: str | None) -> int | None:
        if token is None:
            return None
        i = self.tok.token_to_id(token)
        if i is None:
            raise ValueError(f"special token {token!r} of tokenizer_config.json is not in the vocabulary")
        return i

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        text = self.tok.decode(list(ids), skip_special_tokens=True)
        if self.clean_up:
            for a, b in _CLEANUPS:
                text = text.replace(a, b)
        return text


def _content(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def as_text_tokenizer(tok) -> TextTokenizer:
    return tok if isinstance(tok, TextTokenizer) else HFTokenizer(tok)
