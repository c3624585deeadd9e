"""Synthetic images and training data, so every command runs offline on a fresh machine: the pages
parity and the benchmarks encode (many aspect ratios), the main job's demo page, and the small
LLaVA-format data sets the training stages read. Pillow only (no torch)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 40),
           "purple": (140, 60, 180), "black": (20, 20, 20)}
SHAPES = ("square", "circle", "triangle")


def draw_scene(width: int, height: int, shape: str, colour: str, text: str = "", seed: int = 0) -> Image.Image:
    """A white page with one large coloured shape, some clutter and a line of text."""
    rng = random.Random(seed)
    img = Image.new("RGB", (width, height), (250, 250, 245))
    d = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = rng.randrange(width), rng.randrange(height)
        d.line([(x, y), (rng.randrange(width), rng.randrange(height))], fill=(200, 200, 200), width=2)
    s = min(width, height) // 2
    cx, cy = width // 2 + rng.randint(-s // 4, s // 4), height // 2 + rng.randint(-s // 4, s // 4)
    box = [cx - s // 2, cy - s // 2, cx + s // 2, cy + s // 2]
    fill = COLOURS[colour]
    if shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "circle":
        d.ellipse(box, fill=fill)
    else:
        d.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    if text:
        d.text((10, 10), text, fill=(0, 0, 0))
    return img


def parity_pages(sizes) -> list[Image.Image]:
    """One page per (width, height), labelled with its size, for parity sweeps."""
    return [draw_scene(w, h, "circle", "red", f"{w}x{h}", seed=i) for i, (w, h) in enumerate(sizes)]


def bundle_crops(grids, patch_size: int = 14) -> list[Image.Image]:
    """One crop-sized page per (h, w) patch grid, for the Polygraphy bundles."""
    return [draw_scene(patch_size * w, patch_size * h, ("circle", "square", "triangle")[i % 3], "green", f"bundle {h}x{w}", seed=i)
            for i, (h, w) in enumerate(grids)]


def demo_image() -> Image.Image:
    """The main job's default input: a 1024x768 scene (3x2 slices + overview, 1033 tokens at max 7)."""
    return draw_scene(1024, 768, "circle", "blue", "LLaVA-UHD v2 demo page: a blue circle", seed=1)


def write_training_data(out: str | Path, n: int = 12, seed: int = 0) -> Path:
    """``images/`` + ``pretrain.json`` (stage 1 captions) + ``sft.json`` (stage 2 Q&A), LLaVA format."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pre, sft = [], []
    sizes = [(336, 336), (500, 300), (300, 500), (640, 360), (420, 560), (700, 350)]
    for i in range(n):
        shape, colour = SHAPES[i % len(SHAPES)], list(COLOURS)[i % len(COLOURS)]
        w, h = sizes[i % len(sizes)]
        name = f"{i:04d}.png"
        draw_scene(w, h, shape, colour, seed=rng.randrange(1 << 30)).save(out / "images" / name)
        caption = f"A {colour} {shape} on a white page."
        pre.append({"id": str(i), "image": name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": caption}]})
        sft.append({"id": str(i), "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat shape is in the image?"}, {"from": "gpt", "value": f"A {shape}."},
            {"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": f"It is {colour}."}]})
    (out / "pretrain.json").write_text(json.dumps(pre, indent=1))
    (out / "sft.json").write_text(json.dumps(sft, indent=1))
    return out
