"""The demo task: a small generated visual question-answering set a tiny model can learn on a CPU.

Two kinds of image, at several aspect ratios (so some are sliced 2x1 or 1x2 and some are the
overview alone, docs/model.md section 1):

* **scenes**: one to three large shapes (square, circle, triangle; each shape and each colour at
  most once), side by side in random order, with light clutter;
* **documents**: a page with one rendered word (six words) in one of the four colours, ruled lines
  and a margin, at a random place.

Questions are templated and answers are one word (16 answers in all):

==========  ==========================================  ===========================
kind        question                                    answer
==========  ==========================================  ===========================
colour      What colour is the {shape}?                 red / green / blue / yellow
shape       What shape is {colour}?                     square / circle / triangle
count       How many shapes are there?                  one / two / three
left        What shape is on the left?                  a shape (two or more shapes)
right       What shape is on the right?                 a shape (two or more shapes)
word        What word is written?                       cat / sun / book / tree / fish / moon
ink         What colour is the text?                    a colour
==========  ==========================================  ===========================

Everything is a pure function of a seed (Python ``random.Random``, Pillow drawing with Pillow's
built-in font), so the train split (seed 0) and the held-out split (seed 1) are different images
and are the same on every machine with the same Pillow. :func:`split_hash` fingerprints a split
(images + questions) for the model card. Training data: :func:`write_split` writes LLaVA-format
JSON (one conversation of several turns per image, in random order) plus the PNGs; evaluation
reads :func:`heldout` (one question per image).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger("hiwin.demo")

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (225, 190, 20)}
SHAPES = ("square", "circle", "triangle")
WORDS = ("cat", "sun", "book", "tree", "fish", "moon")
COUNTS = ("one", "two", "three")
ANSWERS = tuple(COLOURS) + SHAPES + COUNTS + WORDS

QUESTIONS = {
    "colour": "What colour is the {shape}?",
    "shape": "What shape is {colour}?",
    "count": "How many shapes are there?",
    "left": "What shape is on the left?",
    "right": "What shape is on the right?",
    "word": "What word is written?",
    "ink": "What colour is the text?",
}

# (width, height): unsliced (336x336) and sliced 2x1 / 1x2 (three crops each) at max_slices 7.
SCENE_SIZES = ((336, 336), (504, 252), (252, 504), (448, 336), (336, 448))
DOC_SIZES = ((336, 336), (476, 280), (280, 476))
DOC_FRACTION = 0.4
TRAIN_SEED, HELDOUT_SEED = 0, 1
HELDOUT_SIZE = 400  # questions in the held-out set (hiwin-export eval)


@dataclass(frozen=True)
class Item:
    """One generated image and its questions [(kind, question, answer)]."""

    index: int
    size: tuple[int, int]
    kind: str  # "scene" | "doc"
    spec: tuple  # scene: ((shape, colour), ...) left to right; doc: (word, colour)
    qa: tuple[tuple[str, str, str], ...]
    seed: int

    def image(self) -> Image.Image:
        if self.kind == "scene":
            return draw_scene(self.size, self.spec, self.seed)
        return draw_document(self.size, *self.spec, self.seed)


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _clutter(d: ImageDraw.ImageDraw, w: int, h: int, rng: random.Random, n: int = 4) -> None:
    for _ in range(n):
        g = rng.randrange(185, 225)
        d.line([(rng.randrange(w), rng.randrange(h)), (rng.randrange(w), rng.randrange(h))], fill=(g, g, g), width=1)


def draw_scene(size: tuple[int, int], objects, seed: int) -> Image.Image:
    """Shapes in equal columns, left to right as listed, each jittered in size and place."""
    rng = random.Random(seed)
    w, h = size
    bg = tuple(rng.randrange(238, 256) for _ in range(3))
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    _clutter(d, w, h, rng)
    slot = w / len(objects)
    for i, (shape, colour) in enumerate(objects):
        s = int(min(slot, h) * rng.uniform(0.7, 0.92))
        cx = int(slot * (i + 0.5) + rng.uniform(-0.15, 0.15) * (slot - s))
        cy = int(h / 2 + rng.uniform(-0.5, 0.5) * (h - s) * 0.8)
        box = [cx - s // 2, cy - s // 2, cx + s // 2, cy + s // 2]
        fill = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in COLOURS[colour])
        if shape == "square":
            d.rectangle(box, fill=fill)
        elif shape == "circle":
            d.ellipse(box, fill=fill)
        else:
            d.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return img


def draw_document(size: tuple[int, int], word: str, colour: str, seed: int) -> Image.Image:
    """A ruled page with one word in large type, placed at random."""
    img, _ = _document(size, word, colour, seed)
    return img


def letter_edges(size: tuple[int, int], word: str, colour: str, seed: int) -> list[float]:
    """x of the boundaries between the letters of :func:`draw_document`'s word (its advance
    positions, in image pixels): letter ``k`` covers the ink between edge ``k - 1`` and edge ``k``."""
    img, (font, x, _) = _document(size, word, colour, seed)
    d = ImageDraw.Draw(img)
    return [float(x + d.textlength(word[:k], font=font)) for k in range(1, len(word))]


def _document(size, word, colour, seed):
    rng = random.Random(seed)
    w, h = size
    img = Image.new("RGB", (w, h), (250, 250, 244))
    d = ImageDraw.Draw(img)
    for y in range(rng.randrange(20, 40), h, rng.randrange(28, 40)):
        d.line([(0, y), (w, y)], fill=(205, 215, 230), width=1)
    mx = rng.randrange(20, 40)
    d.line([(mx, 0), (mx, h)], fill=(230, 170, 170), width=1)
    size = rng.randrange(min(w, h) // 3, min(w, h) // 2)
    while True:  # as large as fits: the word spans 60-90 % of the page width
        font = _font(size)
        x0, y0, x1, y1 = d.textbbox((0, 0), word, font=font)
        tw, th = x1 - x0, y1 - y0
        if tw <= 0.9 * (w - mx) or size <= 12:
            break
        size -= 4
    x = rng.randrange(mx + 2, max(mx + 3, w - tw - 4)) - x0
    y = rng.randrange(4, max(5, h - th - 4)) - y0
    d.text((x, y), word, fill=COLOURS[colour], font=font)
    return img, (font, x, y)


def make_item(index: int, split_seed: int) -> Item:
    """Image ``index`` of the split seeded by ``split_seed``, with every question that applies."""
    seed = (split_seed * 1_000_003 + index * 7919) & 0x7FFFFFFF
    rng = random.Random(seed)
    if rng.random() < DOC_FRACTION:
        size = rng.choice(DOC_SIZES)
        word, colour = rng.choice(WORDS), rng.choice(list(COLOURS))
        qa = (("word", QUESTIONS["word"], word), ("ink", QUESTIONS["ink"], colour))
        return Item(index, size, "doc", (word, colour), qa, seed)
    size = rng.choice(SCENE_SIZES)
    n = rng.randint(1, 3)
    shapes = rng.sample(SHAPES, n)
    colours = rng.sample(list(COLOURS), n)
    objects = tuple(zip(shapes, colours))
    qa = []
    sh, co = rng.choice(objects)
    qa.append(("colour", QUESTIONS["colour"].format(shape=sh), co))
    sh, co = rng.choice(objects)
    qa.append(("shape", QUESTIONS["shape"].format(colour=co), sh))
    qa.append(("count", QUESTIONS["count"], COUNTS[n - 1]))
    if n >= 2:
        qa.append(("left", QUESTIONS["left"], objects[0][0]))
        qa.append(("right", QUESTIONS["right"], objects[-1][0]))
    return Item(index, size, "scene", objects, tuple(qa), seed)


def items(n: int, split_seed: int) -> list[Item]:
    return [make_item(i, split_seed) for i in range(n)]


def heldout(n: int = 400, seed: int = HELDOUT_SEED) -> list[tuple[Item, str, str, str]]:
    """Held-out questions: one per image, the kind drawn uniformly from the image's kinds.
    Returns [(item, kind, question, answer)]."""
    out = []
    for it in items(n, seed):
        kind, q, a = random.Random(it.seed + 1).choice(it.qa)
        out.append((it, kind, q, a))
    return out


def demo_model_dir() -> Path:
    """The embedded trained demo model (package data, official layout; card in ``CARD.md``)."""
    d = Path(__file__).parent / "demo"
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d}: the embedded demo model is missing (train it: hiwin train demo)")
    return d


def load_demo_model(**kw):
    from .model import HiwinForCausalLM

    return HiwinForCausalLM.from_pretrained(demo_model_dir(), **kw)


def demo_question(index: int = 0) -> tuple[Image.Image, str, str]:
    """The main job's default input: held-out image ``index`` (never trained on), a question about
    it and the expected answer."""
    it, _, q, a = heldout(index + 1)[index]
    return it.image(), q, a


# ------------------------------------------------------------------------------ scoring
def heldout_questions(limit: int | None = None):
    n = HELDOUT_SIZE if limit is None else limit
    if n < 1:
        raise ValueError(f"limit must be >= 1, got {n}")
    return heldout(n)


def questions_sha256(questions) -> str:
    h = hashlib.sha256()
    for it, kind, q, a in questions:
        h.update(json.dumps([it.index, it.seed, list(it.size), kind, q, a]).encode())
    return h.hexdigest()


def score(pipe, questions, *, max_new_tokens: int = 8, label: str = "") -> dict:
    """Greedy answers to every question; exact-match accuracy overall and per question kind."""
    by_kind: dict[str, list[int]] = {}
    wrong, answers = [], []
    correct = 0
    t0 = time.perf_counter()
    for i, (it, kind, q, expected) in enumerate(questions):
        ans = pipe.generate(it.image(), q, max_new_tokens=max_new_tokens).text.strip()
        answers.append(ans)
        ok = ans == expected
        correct += ok
        k = by_kind.setdefault(kind, [0, 0])
        k[0] += ok
        k[1] += 1
        if not ok and len(wrong) < 20:
            wrong.append({"index": it.index, "size": list(it.size), "question": q, "expected": expected,
                          "answer": ans})
        if (i + 1) % 50 == 0 or i + 1 == len(questions):
            log.info("%s: %d/%d, accuracy so far %.1f%%", label, i + 1, len(questions), 100 * correct / (i + 1))
    n = len(questions)
    return {"n": n, "correct": correct, "accuracy": correct / n, "answers": answers,
            "by_kind": {k: {"correct": c, "n": m, "accuracy": c / m} for k, (c, m) in sorted(by_kind.items())},
            "wrong": wrong, "seconds": round(time.perf_counter() - t0, 1)}



def split_hash(n: int, split_seed: int) -> str:
    """sha256 over the split's PNG bytes and question/answer text (fingerprint for the card)."""
    import io

    h = hashlib.sha256()
    for it in items(n, split_seed):
        buf = io.BytesIO()
        it.image().save(buf, format="PNG")
        h.update(buf.getvalue())
        h.update(json.dumps(it.qa).encode())
    return h.hexdigest()


def write_split(out: str | Path, n: int, split_seed: int = TRAIN_SEED, *, captions: bool = True) -> Path:
    """``images/`` + ``sft.json`` (all questions of an image as one conversation, shuffled) and,
    with ``captions``, ``pretrain.json`` (stage 1: one caption per image), LLaVA format."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    sft, pre = [], []
    for it in items(n, split_seed):
        name = f"{it.index:05d}.png"
        path = out / "images" / name
        if not path.exists():
            it.image().save(path)
        qa = list(it.qa)
        random.Random(it.seed + 2).shuffle(qa)
        conv = []
        for j, (_, q, a) in enumerate(qa):
            conv.append({"from": "human", "value": ("<image>\n" + q) if j == 0 else q})
            conv.append({"from": "gpt", "value": a})
        # "attributes": what was drawn, for the demo recipe's auxiliary loss (train/demo_aux.py)
        sft.append({"id": str(it.index), "image": name, "conversations": conv, "attributes": attributes(it)})
        pre.append({"id": str(it.index), "image": name, "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption(it)}]})
    (out / "sft.json").write_text(json.dumps(sft))
    if captions:
        (out / "pretrain.json").write_text(json.dumps(pre))
    return out


def attributes(it: Item) -> dict:
    """What an image shows, as JSON: ``{"kind": "scene", "objects": [[shape, colour], ...]}`` (left
    to right) or ``{"kind": "doc", "word": ..., "colour": ..., "letter_edges": [x, ...]}``."""
    if it.kind == "scene":
        return {"kind": "scene", "objects": [list(o) for o in it.spec]}
    return {"kind": "doc", "word": it.spec[0], "colour": it.spec[1],
            "letter_edges": [round(e, 2) for e in letter_edges(it.size, *it.spec, it.seed)]}


def caption(it: Item) -> str:
    if it.kind == "doc":
        return f"the word {it.spec[0]} in {it.spec[1]}"
    return " and ".join(f"a {c} {s}" for s, c in it.spec)


def _corpus() -> list[str]:
    from .conversation import VICUNA_SYSTEM

    lines = [VICUNA_SYSTEM, "USER: <image>\n ASSISTANT:", "a, b, c.\n", "the word in and a"]
    for kind, q in QUESTIONS.items():
        for shape in SHAPES:
            for colour in COLOURS:
                lines.append(f"USER: {q.format(shape=shape, colour=colour)} ASSISTANT:")
    lines += [" " + a for a in ANSWERS] * 8
    return lines


def build_tokenizer(vocab_size: int = 512):
    """Byte-level BPE over the task's own text (system prompt, questions, answers), with Llama's
    special ids (<unk>=0, <s>=1, </s>=2); every answer is a single token after a space."""
    from .tiny import _bpe_tokenizer

    return _bpe_tokenizer(_corpus(), vocab_size)


# The demo model: the tiny configuration's structure (hiwin_model/tiny.py) with a deeper, wider
# vision MLP and 4 Llama layers (not 2); the same slicing, JBU, projector, layout and official key
# names as the 7B.
DEMO_OVERRIDES = dict(
    num_hidden_layers=4,
    hiwin_vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                             image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    hiwin_max_slices=7,
)


def build_demo_model(seed: int = 0):
    """The untrained demo model (random init, its tokenizer attached)."""
    import torch

    from .model import HiwinForCausalLM
    from .processor import HiwinProcessor
    from .tiny import tiny_config

    tok = build_tokenizer()
    cfg = tiny_config(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=0, **DEMO_OVERRIDES)
    torch.manual_seed(seed)
    model = HiwinForCausalLM(cfg)
    model.processor = HiwinProcessor(tok, cfg.slicing)
    return model.eval()
