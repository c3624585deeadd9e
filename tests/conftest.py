"""Shared fixtures: a tiny checkpoint in the official layout, written once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from hiwin_model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from hiwin_model.model import HiwinForCausalLM

    return HiwinForCausalLM.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def exported(tiny_model, tmp_path_factory):
    """Every graph of the tiny model (vision + language, fp32 + fp16), with bundles and quick parity."""
    from hiwin_export.export import export_model

    out = tmp_path_factory.mktemp("export") / "tiny-onnx"
    export_model(tiny_model, out)
    return out


def random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth random content (a few blobs) so resizes and JBU see real structure."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, h // 40), max(2, w // 40), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    noise = rng.integers(-20, 21, size=(h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8))


OFFICIAL_KEYS = Path(__file__).with_name("data") / "official_keys.tsv"


def official_keys() -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, group) of the released multimodal keys at real dims (docs/model.md §6)."""
    out = {}
    for line in OFFICIAL_KEYS.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape, group = line.split("\t")
        out[key] = (tuple(int(x) for x in shape.strip("[]").split(",") if x.strip()), group)
    return out


def official_shapes(prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: s for k, (s, _) in official_keys().items() if k.startswith(prefix)
            and not k.startswith(prefix + "upsampler.")}
