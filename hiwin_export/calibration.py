"""Calibration data for the quantised vision graphs: images -> per-graph calibration tensors.

The recipe (``calibration/recipe.json`` is a copy of :data:`DEFAULT_RECIPE`; ``calibration/README.md``)
names the images: photographs bundled with scikit-image (the optional ``calib`` extra) and pages
generated here (documents, charts, scenes) at many aspect ratios, each with its own seed, split into
a **calibration** part and a **held-out** part that calibration never sees (the accuracy report runs
on it). A folder of images (``--data DIR``) is split the same way by a hash of each file's bytes.

:func:`build_calibration` sends the calibration images through the one crop chain
(:class:`~hiwin_runtime.crop_chain.CropChain`, the runtime's slicing and normalisation) on the
export's **fp32** graphs with a :class:`~hiwin_runtime.crop_chain.Recorder`, so each graph gets the
inputs it sees in service: the ViT the normalised crops, the JBU the fp32 ViT's features, the projector
the fp32 JBU's maps, crop shape by crop shape. The tensors are streamed, image by image, into one
uncompressed ``<family>.npz`` per graph (``{index:05d}.{input}`` keys), so memory holds one image's
stage calls at a time; ``calibration.json`` records the recipe, the images (split, size, pixel
hash), every sample's shape bucket, the content hash of each graph's tensors (names, shapes, bytes,
in order) and the sha256 of the fp32 graphs they were taken from. :class:`CalibrationSet` reads it
back, checks every file's sha256 and that the export's fp32 graphs are the ones it was recorded on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from hiwin_runtime.crop_chain import BatchPolicy, CropChain, Recorder
from hiwin_runtime.graph_id import GraphId
from hiwin_runtime.manifest import ExportDir, ExportError, sha256

log = logging.getLogger("hiwin_export")

FAMILIES = ("vit", "jbu", "hiwin")
INDEX = "calibration.json"
FORMAT_VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
KINDS = ("document", "chart", "scene")

# The default recipe. Sizes are (width, height); none is a size of parity's generated pages
# (hiwin_export.parity.IMAGE_SIZES), and the held-out pages share no (size, seed) with calibration.
DEFAULT_RECIPE = {
    "version": 1,
    "max_slices": 9,
    "sets": {
        "photos": {  # scikit-image's bundled photographs (the `calib` extra): natural images
            "source": "skimage",
            "calibration": ["astronaut", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
                            "coins", "text", "colorwheel"],
            "held_out": ["coffee", "camera", "page"],
        },
        "documents": {  # text pages: lines of characters, headings, rules, a table
            "source": "synthetic", "kind": "document",
            "calibration": [[850, 1100, 11], [1100, 850, 12], [600, 1400, 13], [1500, 500, 14], [700, 520, 15]],
            "held_out": [[820, 1160, 101], [1240, 640, 102]],
        },
        "charts": {  # bar and line charts with axes, ticks and labels
            "source": "synthetic", "kind": "chart",
            "calibration": [[960, 540, 21], [540, 960, 22], [1280, 420, 23], [640, 640, 24]],
            "held_out": [[900, 600, 201], [450, 1300, 202]],
        },
        "scenes": {  # coloured shapes with clutter (the training pages' style)
            "source": "synthetic", "kind": "scene",
            "calibration": [[1000, 660, 31], [660, 1000, 32], [1200, 400, 33], [400, 1200, 34], [700, 700, 35],
                            [2000, 300, 36]],
            "held_out": [[1500, 700, 301], [300, 1800, 302]],
        },
    },
    "folder": {"held_out_fraction": 0.2},  # --data DIR: files whose bytes hash into this fraction are held out
}
SPLITS = ("calibration", "held_out")


class CalibrationError(ValueError):
    pass


# ------------------------------------------------------------------------------------------ images
def draw_document(width: int, height: int, seed: int) -> Image.Image:
    """A text page: a heading, paragraphs of random words, a rule and a small table."""
    rng = random.Random(seed)
    img = Image.new("RGB", (width, height), (252, 252, 248))
    d = ImageDraw.Draw(img)
    margin = max(8, width // 16)
    y = margin
    d.rectangle([margin, y, margin + rng.randint(width // 4, width // 2), y + 18], fill=(30, 30, 90))
    y += 36
    letters = "abcdefghijklmnopqrstuvwxyz"
    while y < height - margin - 12:
        if rng.random() < 0.08:  # a rule or a table
            d.line([(margin, y + 6), (width - margin, y + 6)], fill=(120, 120, 120), width=2)
            if rng.random() < 0.5 and y + 80 < height - margin:
                cols, rows = rng.randint(2, 5), rng.randint(2, 4)
                cw, rh = (width - 2 * margin) // cols, 18
                for r in range(rows + 1):
                    d.line([(margin, y + 14 + r * rh), (margin + cols * cw, y + 14 + r * rh)], fill=(90, 90, 90))
                for c in range(cols + 1):
                    d.line([(margin + c * cw, y + 14), (margin + c * cw, y + 14 + rows * rh)], fill=(90, 90, 90))
                for r in range(rows):
                    for c in range(cols):
                        d.text((margin + c * cw + 3, y + 16 + r * rh), str(rng.randint(0, 9999)), fill=(0, 0, 0))
                y += 14 + rows * rh
            y += 20
            continue
        x = margin
        while x < width - margin - 30:
            word = "".join(rng.choice(letters) for _ in range(rng.randint(1, 9)))
            d.text((x, y), word, fill=(rng.randint(0, 60),) * 3)
            x += 6 * len(word) + 6
        y += 14 + (8 if rng.random() < 0.15 else 0)
    return img


def draw_chart(width: int, height: int, seed: int) -> Image.Image:
    """A bar or line chart with axes, ticks, grid lines and labels."""
    rng = random.Random(seed)
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    l, r, t, b = width // 10, width - width // 20, height // 10, height - height // 8
    d.text((l, max(2, t // 3)), f"figure {seed}: series", fill=(0, 0, 0))
    for k in range(6):
        yy = b - (b - t) * k // 5
        d.line([(l, yy), (r, yy)], fill=(225, 225, 225))
        d.text((max(2, l - 28), yy - 5), str(k * 20), fill=(40, 40, 40))
    d.line([(l, t), (l, b), (r, b)], fill=(0, 0, 0), width=2)
    n = rng.randint(4, 12)
    step = (r - l) / n
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    if rng.random() < 0.5:
        for i in range(n):
            v = rng.random()
            d.rectangle([l + i * step + step * 0.15, b - v * (b - t), l + (i + 0.85) * step, b],
                        fill=palette[i % len(palette)])
            d.text((l + i * step + 2, b + 4), f"c{i}", fill=(0, 0, 0))
    else:
        for s in range(rng.randint(1, 3)):
            pts = [(l + i * step + step / 2, b - rng.random() * (b - t)) for i in range(n)]
            d.line(pts, fill=palette[s], width=3)
            for p in pts:
                d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=palette[s])
    return img


def draw_page(kind: str, width: int, height: int, seed: int) -> Image.Image:
    from hiwin_model.synthetic import COLOURS, SHAPES, draw_scene

    if kind == "document":
        return draw_document(width, height, seed)
    if kind == "chart":
        return draw_chart(width, height, seed)
    if kind == "scene":
        rng = random.Random(seed)
        return draw_scene(width, height, rng.choice(SHAPES), rng.choice(sorted(COLOURS)), f"scene {seed}", seed=seed)
    raise CalibrationError(f"unknown synthetic kind {kind!r} (known: {', '.join(KINDS)})")


def skimage_photo(name: str) -> Image.Image:
    try:
        import skimage.data
    except ImportError as e:
        raise CalibrationError("the photographs set needs scikit-image: pip install 'hiwin[calib]'") from e
    fn = getattr(skimage.data, name, None)
    if fn is None:
        raise CalibrationError(f"scikit-image has no bundled image {name!r}")
    a = np.asarray(fn())
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(a[..., :3].astype(np.uint8)), "RGB")


@dataclass(frozen=True)
class ImageSpec:
    """One image of a recipe: where it comes from, its split, and how to make it."""

    name: str
    split: str
    source: str  # skimage | synthetic | file
    args: tuple = ()

    def load(self) -> Image.Image:
        if self.source == "skimage":
            return skimage_photo(self.args[0])
        if self.source == "synthetic":
            kind, w, h, seed = self.args
            return draw_page(kind, w, h, seed)
        from hiwin_runtime.image import load_image

        return load_image(self.args[0])


def load_recipe(path: str | os.PathLike | None = None) -> dict:
    if path is None:
        return json.loads(json.dumps(DEFAULT_RECIPE))
    try:
        recipe = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CalibrationError(f"{path}: cannot read the recipe ({e})") from e
    if recipe.get("version") != 1 or not isinstance(recipe.get("sets"), dict):
        raise CalibrationError(f"{path}: not a version-1 calibration recipe (needs 'version': 1 and 'sets')")
    return recipe


def recipe_images(recipe: dict, split: str) -> list[ImageSpec]:
    """The images of one split of a recipe, in recipe order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out = []
    for set_name, s in recipe["sets"].items():
        for item in s.get(split, []):
            if s["source"] == "skimage":
                out.append(ImageSpec(f"{set_name}/{item}", split, "skimage", (item,)))
            elif s["source"] == "synthetic":
                w, h, seed = (int(v) for v in item)
                out.append(ImageSpec(f"{set_name}/{s['kind']}-{w}x{h}-s{seed}", split, "synthetic", (s["kind"], w, h, seed)))
            else:
                raise CalibrationError(f"set {set_name!r}: unknown source {s['source']!r} (skimage or synthetic)")
    return out


def folder_images(folder: str | os.PathLike, split: str, held_out_fraction: float = 0.2) -> list[ImageSpec]:
    """The images of a folder (recursively, sorted) in one split: a file is held out when the
    sha256 of its bytes, read as a number in [0, 1), is below ``held_out_fraction``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"{folder}: not a directory")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    out = []
    for p in files:
        u = int(hashlib.sha256(p.read_bytes()).hexdigest()[:15], 16) / 16 ** 15
        s = "held_out" if u < held_out_fraction else "calibration"
        if s == split:
            out.append(ImageSpec(str(p.relative_to(folder)), s, "file", (str(p),)))
    return out


def select_images(split: str, *, data: str | os.PathLike | None = None, recipe: dict | None = None) -> list[ImageSpec]:
    recipe = recipe or load_recipe()
    if data is not None:
        return folder_images(data, split, recipe.get("folder", {}).get("held_out_fraction", 0.2))
    return recipe_images(recipe, split)


def held_out_images(*, data=None, recipe: dict | None = None) -> list[Image.Image]:
    """The held-out split as PIL images (the accuracy report's inputs)."""
    return [s.load() for s in select_images("held_out", data=data, recipe=recipe)]


# ------------------------------------------------------------------------------------------ writing
class _NpzStream:
    """An uncompressed ``.npz`` written one array at a time (what ``np.savez`` writes, without
    holding every array), with the content hash of everything written."""

    def __init__(self, path: Path):
        self.zf = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self.hash = hashlib.sha256()
        self.count = 0

    def add(self, feeds: dict[str, np.ndarray]) -> None:
        for k in sorted(feeds):
            a = np.ascontiguousarray(feeds[k], dtype=np.float32)
            self.hash.update(k.encode() + str(a.shape).encode() + a.tobytes())
            with self.zf.open(f"{self.count:05d}.{k}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, a, allow_pickle=False)
        self.count += 1

    def close(self) -> None:
        self.zf.close()


def data_hash(feeds) -> str:
    """Content hash of one graph's calibration samples (names, shapes, bytes, in order): the same
    number :class:`_NpzStream` records while writing."""
    h = hashlib.sha256()
    for f in feeds:
        for k in sorted(f):
            a = np.ascontiguousarray(f[k], dtype=np.float32)
            h.update(k.encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()


def _sample_bucket(call, patch: int) -> list[int]:
    """The shape bucket of a stage call: the crop's (h, w) patch grid (ViT, JBU) or the projector's (oh, ow)."""
    if call.family == "hiwin":
        return list(call.bucket)
    x = call.inputs["pixel_values"]
    return [int(x.shape[-2]) // patch, int(x.shape[-1]) // patch]


def build_calibration(export_dir: str | os.PathLike, out_dir: str | os.PathLike, *, data=None,
                      recipe: dict | None = None, families=FAMILIES, max_slices: int | None = None,
                      images: list | None = None, overwrite: bool = False) -> dict:
    """Write the calibration tensors of ``families`` into ``out_dir`` (temp dir, then rename);
    returns the index. ``images``: PIL images instead of a recipe or folder (tests, the API)."""
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        raise ValueError(f"unknown graph family {bad} for calibration (known: {', '.join(FAMILIES)})")
    export = ExportDir(export_dir)
    if export.flavour != "onnx":
        raise ExportError(f"{export.path}: calibration runs the fp32 graphs on ONNX Runtime; this is a "
                          f"{export.flavour!r}-flavour export (calibrate on the onnx-flavour export of the same model)")
    need = sorted({"vit", *families} | ({"jbu"} if "hiwin" in families else set()))
    missing = [f for f in need if GraphId(f) not in set(export.graph_ids())]
    if missing:
        raise ExportError(f"{export.path}: no fp32 graph for {missing} (calibration runs the fp32 graphs; "
                          "the projector must be the any-grid graph `hiwin`)")
    recipe = recipe or load_recipe()
    if images is not None:
        specs = [None] * len(images)
        if not images:
            raise CalibrationError("calibration needs at least one image")
    else:
        specs = select_images("calibration", data=data, recipe=recipe)
        if not specs:
            raise CalibrationError("the calibration split is empty")
    max_slices = max_slices or recipe.get("max_slices", 9)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CalibrationError(f"{out}: exists (pass overwrite=True / --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)

    from hiwin_runtime.config import HiwinConfig
    from hiwin_runtime.image import load_image
    from hiwin_runtime.ort import OnnxRunner
    from hiwin_runtime.slicing import apply_plan, normalize, plan_slices

    runner = OnnxRunner(export)
    s = HiwinConfig.from_dict(export.manifest["config"]).slicing
    patch = export.manifest["shape_ranges"]["patch_size"]
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        streams = {f: _NpzStream(tmp / f"{f}.npz") for f in families}
        buckets: dict[str, list] = {f: [] for f in families}
        listed = []
        for i, spec in enumerate(specs):
            img = load_image(images[i] if spec is None else spec.load())
            plan = plan_slices(img.size, max_slices, scale_resolution=s.scale_resolution, patch_size=s.patch_size)
            crops = [normalize(c, s.mean, s.std) for c in apply_plan(img, plan).crops]
            recorder = Recorder()
            chain = CropChain(recorder.wrap(runner.vision_stages("fp32")), patch_size=patch, policy=BatchPolicy(1, 1),
                              bucket_for=export.bucket_for)
            chain.encode_crops(crops)
            for call in recorder.calls:
                if call.family in streams:
                    streams[call.family].add(call.inputs)
                    buckets[call.family].append(_sample_bucket(call, patch))
            name = spec.name if spec is not None else f"image-{i:04d}"
            listed.append({"name": name, "size": list(img.size), "crops": len(crops),
                           "pixels_sha256": hashlib.sha256(img.tobytes()).hexdigest()})
            log.info("calibration %d/%d: %s (%dx%d, %d crops)", i + 1, len(specs), name, img.size[0], img.size[1],
                     len(crops))
        graphs = {}
        for f, st in streams.items():
            st.close()
            graphs[f] = {"file": f"{f}.npz", "samples": st.count, "content_sha256": st.hash.hexdigest(),
                         "file_sha256": sha256(tmp / f"{f}.npz"), "buckets": buckets[f]}
        index = {"format": FORMAT_VERSION, "source": str(data) if data is not None else ("images" if images else "recipe"),
                 "recipe": recipe, "max_slices": max_slices, "images": listed, "graphs": graphs,
                 "fp32_graphs": {g: export.graphs[g]["sha256"] for g in need}}
        (tmp / INDEX).write_text(json.dumps(index, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


# ------------------------------------------------------------------------------------------ reading
class CalibrationSet:
    """A calibration directory read back: files sha256-checked, samples loaded one at a time."""

    def __init__(self, path: str | os.PathLike, *, verify: bool = True):
        self.path = Path(path)
        f = self.path / INDEX
        if not f.is_file():
            raise CalibrationError(f"{self.path}: no {INDEX} (not a calibration directory; `hiwin-export calibrate`)")
        self.index = json.loads(f.read_text())
        if self.index.get("format") != FORMAT_VERSION:
            raise CalibrationError(f"{f}: format {self.index.get('format')}, this version reads {FORMAT_VERSION}")
        if verify:
            bad = [g["file"] for g in self.index["graphs"].values()
                   if not (self.path / g["file"]).is_file() or sha256(self.path / g["file"]) != g["file_sha256"]]
            if bad:
                raise CalibrationError(f"{self.path}: {', '.join(bad)} missing or modified (sha256 mismatch)")

    @property
    def families(self) -> list[str]:
        return list(self.index["graphs"])

    def check_export(self, export: ExportDir, families) -> None:
        """The export's fp32 graphs are the ones the tensors were recorded on."""
        missing = [f for f in families if f not in self.index["graphs"]]
        if missing:
            raise CalibrationError(f"{self.path}: no calibration tensors for {missing} (has {self.families})")
        changed = [g for g, h in self.index["fp32_graphs"].items()
                   if g in export.graphs and export.graphs[g]["sha256"] != h]
        if changed:
            raise CalibrationError(f"{self.path}: recorded on other fp32 graphs than {export.path} ({', '.join(changed)} "
                                   "differ); calibrate again on this export")

    def samples(self, family: str) -> int:
        return self.index["graphs"][family]["samples"]

    def content_sha256(self, family: str) -> str:
        return self.index["graphs"][family]["content_sha256"]

    def feeds(self, family: str) -> Iterator[dict[str, np.ndarray]]:
        """The samples of one graph in order, one feeds dict at a time."""
        with np.load(self.path / self.index["graphs"][family]["file"], allow_pickle=False) as z:
            by: dict[int, list[str]] = {}
            for k in z.files:
                by.setdefault(int(k.split(".", 1)[0]), []).append(k)
            for i in sorted(by):
                yield {k.split(".", 1)[1]: z[k] for k in by[i]}

    def reader(self, family: str) -> "Reader":
        return Reader(self, family)


class Reader:
    """ONNX Runtime ``CalibrationDataReader`` over one graph's samples (read lazily, rewindable)."""

    def __init__(self, cs: CalibrationSet, family: str):
        self.cs, self.family = cs, family
        self.rewind()

    def get_next(self):
        nxt = next(self._it, None)
        if nxt is not None:
            self.n += 1
            if self.n % 10 == 0 or self.n == self.cs.samples(self.family):
                log.info("  %s calibration sample %d/%d", self.family, self.n, self.cs.samples(self.family))
        return nxt

    def get_first(self):
        """The first sample without advancing (ModelOpt's reader protocol: a shape probe run)."""
        return next(self.cs.feeds(self.family))

    def rewind(self):
        self._it, self.n = self.cs.feeds(self.family), 0

    def __iter__(self):
        return self.cs.feeds(self.family)

    def __len__(self):
        return self.cs.samples(self.family)
