"""Golden data for the C/C++ runtime (engines/runtime), written by the Python reference.

:func:`write_images` writes >= 200 test images (real photos from scikit-image re-encoded in every
PNG/JPEG form the reference accepts, documents, extreme and random sizes, EXIF orientations);
:func:`write_golden` runs ``hiwin_runtime`` on them and writes ``golden.txt`` (line format read by
``engines/runtime/tests/runtime_tests.cpp``) and ``manifest.json`` (the export's header as
``hiwin_export`` writes it: version, config, bucket rule). Hashes are :func:`hash64` of the raw bytes.
"""

from __future__ import annotations

import io
import json
import math
import random
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from hiwin_runtime.buckets import apply_bucket_rule, bucket_rule
from hiwin_runtime.image import ImageError, load_image
from hiwin_runtime.layout import layout_indices
from hiwin_runtime.pipeline import prompt_table_ids
from hiwin_runtime.slicing import apply_plan, normalize, plan_slices
from hiwin_runtime.slicing import pre_resize as py_pre_resize

K1, K2, K3 = 0x9E3779B97F4A7C15, 0xD1B54A32D192ED03, 0x94D049BB133111EB
M64 = (1 << 64) - 1


def hash64(a) -> int:
    """n*K3 + sum_i b[i] * ((i*K1 + K2) | 1) mod 2^64 over the bytes of ``a`` (C order)."""
    b = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    h = (b.size * K3) & M64
    step = 1 << 20
    with np.errstate(over="ignore"):
        for s in range(0, b.size, step):
            idx = np.arange(s, min(s + step, b.size), dtype=np.uint64)
            w = (idx * np.uint64(K1) + np.uint64(K2)) | np.uint64(1)
            h = (h + int((b[s:s + step].astype(np.uint64) * w).sum(dtype=np.uint64))) & M64
    return h


# --------------------------------------------------------------------------------- image writers
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_raw_png(path: Path, samples: np.ndarray, bit_depth: int, color_type: int, *, plte: bytes | None = None,
                  trns: bytes | None = None, exif: bytes | None = None) -> None:
    """A PNG Pillow cannot write (2/4-bit grey, 16-bit RGB/RGBA/LA): samples (H, W, C) of bit_depth."""
    h, w = samples.shape[:2]
    c = samples.shape[2] if samples.ndim == 3 else 1
    rows = []
    for y in range(h):
        row = samples[y].reshape(-1)
        if bit_depth == 16:
            raw = row.astype(">u2").tobytes()
        elif bit_depth == 8:
            raw = row.astype(np.uint8).tobytes()
        else:
            per = 8 // bit_depth
            vals = list(row.astype(int)) + [0] * ((-len(row)) % per)
            raw = bytes(sum(v << (8 - bit_depth * (k + 1)) for k, v in enumerate(vals[i:i + per]))
                        for i in range(0, len(vals), per))
        rows.append(b"\0" + raw)
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    out = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
    if plte is not None:
        out += _png_chunk(b"PLTE", plte)
    if trns is not None:
        out += _png_chunk(b"tRNS", trns)
    if exif is not None:
        out += _png_chunk(b"eXIf", exif)
    out += _png_chunk(b"IDAT", zlib.compress(b"".join(rows), 6)) + _png_chunk(b"IEND", b"")
    del c
    path.write_bytes(out)


def _texture(w: int, h: int, rng: np.random.Generator, channels: int = 3) -> np.ndarray:
    """Smooth gradients + blobs + fine noise (edges and flat areas for the resampler)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for _ in range(channels):
        fx, fy = rng.uniform(0.5, 6, 2)
        ph = rng.uniform(0, 6.3)
        base = 127 + 100 * np.sin(2 * np.pi * (fx * x / max(w, 1) + fy * y / max(h, 1)) + ph)
        base += rng.normal(0, 25, (h, w))
        out.append(np.clip(base, 0, 255))
    a = np.stack(out, -1).astype(np.uint8)
    return a if channels > 1 else a[..., 0]


def _document(w: int, h: int, rng: random.Random, colour: bool) -> Image.Image:
    img = Image.new("RGB" if colour else "L", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    words = "the quick brown fox jumps over a lazy dog 0123456789 invoice total due receipt".split()
    line_h = 14
    for top in range(8, h - line_h, line_h + rng.randint(0, 6)):
        text = " ".join(rng.choice(words) for _ in range(max(1, w // 40)))
        fill = (rng.randint(0, 80), rng.randint(0, 80), rng.randint(0, 160)) if colour else rng.randint(0, 60)
        d.text((6 + rng.randint(0, 10), top), text, fill=fill, font=font)
        if rng.random() < 0.1:
            d.line([(5, top + line_h - 1), (w - 5, top + line_h - 1)], fill=fill, width=1)
    return img


def _exif(orientation: int) -> bytes:
    ex = Image.Exif()
    ex[0x0112] = orientation
    return ex.tobytes()


def write_images(root: Path, *, seed: int = 0) -> list[tuple[Path, int, int]]:
    """Test images as (path, max_slices, pre_resize)."""
    from skimage import data as skd

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    prng = random.Random(seed)
    cases: list[tuple[Path, int, int]] = []

    def add(p, ms=9, pre=0):
        cases.append((Path(p), ms, pre))

    skdir = Path(skd.__file__).parent
    photos = sorted(list(skdir.glob("*.png")) + list(skdir.glob("*.jpg")))
    for p in photos:  # as shipped (RGB, RGBA, L, 1-bit-ish PNGs, baseline JPEGs)
        add(p)
    rgb_src = [np.asarray(Image.open(skdir / n).convert("RGB")) for n in
               ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png")]
    # JPEG variants: quality x subsampling x progressive, grey, CMYK
    k = 0
    for q in (40, 75, 95):
        for sub in (0, 1, 2):
            for prog in (False, True):
                src = rgb_src[k % len(rgb_src)]
                k += 1
                h0, w0 = src.shape[:2]
                cw, ch = prng.randint(w0 // 2, w0), prng.randint(h0 // 2, h0)
                im = Image.fromarray(src[:ch, :cw])
                p = root / f"jpeg_q{q}_s{sub}_p{int(prog)}_{cw}x{ch}.jpg"
                im.save(p, quality=q, subsampling=sub, progressive=prog)
                add(p, ms=prng.choice((9, 9, 7, 4)))
    for i, src in enumerate(rgb_src):
        p = root / f"grey_{i}.jpg"
        Image.fromarray(src).convert("L").save(p, quality=85)
        add(p)
        p = root / f"cmyk_{i}.jpg"
        Image.fromarray(src).convert("CMYK").save(p, quality=90)
        add(p)
    # PNG modes Pillow writes
    logo = Image.open(skdir / "logo.png")
    for i, src in enumerate(rgb_src[:3]):
        base = Image.fromarray(src)
        for mode in ("RGB", "L", "1", "P", "RGBA", "LA"):
            im = base.convert(mode)
            if mode in ("RGBA", "LA"):
                a = _texture(im.width, im.height, rng, 1)
                a[: im.height // 4] = 0  # fully transparent band
                a[-im.height // 4:] = 255
                im.putalpha(Image.fromarray(a))
            p = root / f"png_{mode}_{i}.png"
            im.save(p)
            add(p)
        pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        p = root / f"png_P_trns_bytes_{i}.png"
        pal.save(p, transparency=bytes(range(0, 256, 16)))
        add(p)
        p = root / f"png_P_trns_index_{i}.png"
        pal.save(p, transparency=3)
        add(p)
        p = root / f"png_P4bit_{i}.png"
        pal.save(p, bits=4)
        add(p)
        g16 = (np.asarray(base.convert("L"), np.uint16) * 257 + rng.integers(0, 257, base.size[::-1])).astype(np.uint16)
        p = root / f"png_I16_{i}.png"
        Image.fromarray(g16).save(p)
        add(p)
        for bits in (2, 4):
            g = (np.asarray(base.convert("L")) >> (8 - bits)).astype(np.uint8)
            p = root / f"png_grey{bits}bit_{i}.png"
            write_raw_png(p, g, bits, 0)
            add(p)
        s16 = np.asarray(base, np.uint16) * 257 + rng.integers(0, 257, src.shape).astype(np.uint16)
        p = root / f"png_RGB16_{i}.png"
        write_raw_png(p, s16, 16, 2)
        add(p)
        a16 = np.concatenate([s16, rng.integers(0, 65536, src.shape[:2] + (1,))], -1).astype(np.uint16)
        p = root / f"png_RGBA16_{i}.png"
        write_raw_png(p, a16, 16, 6)
        add(p)
        p = root / f"png_LA16_{i}.png"
        write_raw_png(p, a16[..., [0, 3]], 16, 4)
        add(p)
    for mode in ("P", "LA", "L"):
        p = root / f"logo_{mode}.png"
        logo.convert(mode).save(p)
        add(p)
    # EXIF orientation 1..8, JPEG and PNG
    src = Image.fromarray(rgb_src[1][:300, :500])
    for o in range(1, 9):
        p = root / f"exif_{o}.jpg"
        src.save(p, quality=90, exif=_exif(o))
        add(p)
        p = root / f"exif_{o}.png"
        src.save(p, exif=_exif(o))
        add(p)
    # documents
    docs = [(850, 1100, True), (1700, 2200, False), (1240, 1754, True), (400, 2400, False), (3000, 300, True),
            (2480, 600, False), (612, 792, True), (1100, 850, False)]
    for i, (w, h, colour) in enumerate(docs):
        doc = _document(w, h, prng, colour)
        p = root / f"doc_{i}_{w}x{h}.png"
        doc.save(p)
        add(p, ms=prng.choice((9, 7)))
        p = root / f"doc_{i}_{w}x{h}.jpg"
        doc.save(p, quality=80)
        add(p)
    # extreme and boundary sizes (many are refused by the reference: the C++ must refuse them too)
    sizes = [(1, 1), (1, 5000), (5000, 1), (2, 3000), (27, 27), (28, 28), (29, 29), (13, 400), (28, 2000),
             (30, 3000), (2000, 28), (56, 5000), (5000, 56), (335, 336), (336, 336), (337, 336), (672, 336),
             (1008, 336), (336, 1344), (100, 100), (3, 7), (4000, 60), (60, 4000), (1, 336), (400, 28), (28, 600)]
    for w, h in sizes:
        p = root / f"size_{w}x{h}.png"
        Image.fromarray(_texture(w, h, rng)).save(p)
        add(p, ms=prng.choice((9, 9, 1, 16)))
    # random sizes and content, PNG or JPEG, some with pre_resize
    for i in range(70):
        w = int(math.exp(rng.uniform(math.log(20), math.log(2600))))
        h = int(math.exp(rng.uniform(math.log(20), math.log(2600))))
        arr = _texture(w, h, rng)
        im = Image.fromarray(arr)
        if i % 5 == 0:
            im = im.filter(ImageFilter.GaussianBlur(2))
        if i % 2:
            p = root / f"rand_{i}_{w}x{h}.jpg"
            im.save(p, quality=int(rng.integers(50, 96)))
        else:
            p = root / f"rand_{i}_{w}x{h}.png"
            im.save(p)
        add(p, ms=int(rng.choice([9, 9, 9, 7, 4, 2, 12])), pre=1024 if i % 7 == 3 else 0)
    return cases


def write_golden(out: Path, cases: list[tuple[Path, int, int]], *, seed: int = 0, n_sizes: int = 10_000,
                 queries: int = 144, vocab_size: int = 32000) -> dict:
    """golden.txt + manifest.json in ``out``; returns counts."""
    from hiwin_model.tiny import tiny_config

    out.mkdir(parents=True, exist_ok=True)
    rule = bucket_rule()
    manifest = {"manifest_version": 2, "flavour": "onnx", "shape_ranges": {"batch": [1, 8], "patches_per_side": [2, 64],
                                                                           "patch_size": 14},
                "buckets": {"family": "hiwin", "rule": rule}, "config": tiny_config().to_dict(),
                "language": {"vocab_size": vocab_size}, "graphs": {}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    rng = random.Random(seed)
    import PIL

    lines: list[str] = [f"PILLOW {int(PIL.__version__.split('.')[0])}"]
    counts = {"images": 0, "decoded": 0, "errors": 0, "crops": 0, "sizes": 0}
    from hiwin_runtime.crop_chain import CropChain

    chain = CropChain(fake_stages(), patch_size=14, bucket_for=lambda w, h: apply_bucket_rule(rule, w, h))
    for path, ms, pre in cases:
        counts["images"] += 1
        lines.append(f"CASE {ms} {pre} {path}")
        try:
            raw = Image.open(path)
            mode = raw.mode
            img = load_image(path)
        except ImageError:
            lines.append("ERR image")
            counts["errors"] += 1
            continue
        counts["decoded"] += 1
        lines.append(f"DECODED {mode} {img.width} {img.height} {hash64(np.asarray(img))}")
        if pre:
            img = py_pre_resize(img, pre)
        try:
            plan = plan_slices(img.size, ms)
        except ImageError:
            lines.append("ERR geometry")
            counts["errors"] += 1
            continue
        lines.append("PLAN " + _plan_str(plan))
        crops = apply_plan(img, plan).crops
        norm = [normalize(c) for c in crops]
        groups: dict = {}
        for i, a in enumerate(norm):
            groups.setdefault(a.shape[-2:], len(groups))
        boxes = list(plan.boxes) + [(0, 0) + tuple(plan.overview_size)]
        for i, (c, a) in enumerate(zip(crops, norm)):
            w, h = c.size
            oh, ow = apply_bucket_rule(rule, w // 14, h // 14)
            lines.append(f"CROP {i} {w} {h} {boxes[i][0]} {boxes[i][1]} {oh} {ow} {groups[a.shape[-2:]]} "
                         f"{hash64(np.asarray(c))} {hash64(a)}")
            counts["crops"] += 1
        lay = layout_indices(plan.grid, len(crops), queries)
        lines.append(f"LAYOUT {lay.size} {hash64(lay.astype(np.int64))}")
        tok = chain.encode(norm, plan.grid, NEWLINE, COMMA)
        lines.append(f"ENC {tok.size} {hash64(np.ascontiguousarray(tok, np.float32))}")
    # plans of random sizes (log-uniform, with extremes and max_slices variety)
    for i in range(n_sizes):
        if i % 10 == 0:
            w, h = rng.randint(1, 60), rng.randint(1, 20000)
            if rng.random() < 0.5:
                w, h = h, w
        else:
            w = int(math.exp(rng.uniform(0, math.log(30000))))
            h = int(math.exp(rng.uniform(0, math.log(30000))))
        ms = rng.choice((9, 9, 9, 7, 1, 2, 3, 4, 5, 6, 8, 10, 16, 25))
        try:
            s = _plan_str(plan_slices((w, h), ms))
        except ImageError:
            s = "ERR geometry"
        lines.append(f"P {w} {h} {ms} {s}")
        counts["sizes"] += 1
    for q in (144, 64, 4, 1):
        for cols in range(0, 8):
            for rows in range(0, 8):
                if (cols == 0) != (rows == 0):
                    continue
                nc = cols * rows + 1
                grid = (cols, rows) if cols else None
                lay = layout_indices(grid, nc, q)
                lines.append(f"L {cols} {rows} {nc} {q} {lay.size} {hash64(lay.astype(np.int64))}")
    for _ in range(60):
        pre = [rng.randint(0, 31999) for _ in range(rng.randint(0, 40))]
        post = [rng.randint(0, 31999) for _ in range(rng.randint(0, 40))]
        nvis = rng.choice((144, 1033, 2893, rng.randint(1, 3000)))
        vocab = rng.choice((32000, 32064, 128256))
        ids = np.array(prompt_table_ids(pre, nvis, post, vocab), np.int64)
        lines.append(f"T {vocab} {len(pre)} {' '.join(map(str, pre))} {nvis} {len(post)} {' '.join(map(str, post))} "
                     f"{ids.size} {hash64(ids)}")
    for w in range(1, 41):
        for h in range(1, 41):
            oh, ow = apply_bucket_rule(rule, w, h)
            lines.append(f"B {w} {h} {oh} {ow}")
    (out / "golden.txt").write_text("\n".join(lines) + "\n")
    return counts


# Test-double vision stages (the same float32 arithmetic as runtime_tests.cpp's fake_*): the crop
# chain (shape groups, batches, buckets, token placement, layout gather) is checked bit for bit.
NEWLINE = np.array([1.5, -2.25, 3.0], np.float32)
COMMA = np.array([-0.5, 0.75, -1.0], np.float32)


def fake_stages():
    from hiwin_runtime.crop_chain import Stages

    def vit(px):
        return np.ascontiguousarray(px[:, :2, ::14, ::14])

    def jbu(f, px):
        f2 = f.repeat(2, axis=2).repeat(2, axis=3)
        f4 = f.repeat(4, axis=2).repeat(4, axis=3) + px[:, :2, :1, :1]
        return f2, f4

    def projector(bucket, f1, f2, f4):
        oh, ow = bucket
        b, _, h, w = f1.shape
        k = np.arange(144)
        c = np.arange(3)
        a = f1[:, (c % 2)[None, :], ((k // w) % h)[:, None], (k % w)[:, None]]  # (B, 144, 3)
        b2 = f2[:, 0, 2 * h - 1, 2 * w - 1][:, None, None]
        b4 = f4[:, 1, 0, 4 * w - 1][:, None, None]
        return (a + b2 * np.float32(oh) + b4 * np.float32(ow)).astype(np.float32)

    return Stages(vit, jbu, projector)


def _plan_str(plan) -> str:
    cols, rows = plan.grid or (0, 0)
    rw, rh = plan.refined_size or (0, 0)
    sw, sh = (plan.boxes[0][2], plan.boxes[0][3]) if plan.boxes else (0, 0)
    w, h = plan.image_size
    return f"{w} {h} {plan.overview_size[0]} {plan.overview_size[1]} {cols} {rows} {rw} {rh} {sw} {sh} {len(plan.boxes) + 1}"


def write_robustness(out: Path, good: list[Path], *, seed: int = 0, n_sizes: int = 300) -> Path:
    """Bad files (empty, garbage, truncated JPEG/PNG at several points, huge declared dimensions,
    broken CRC) and random sizes for the sanitizer build; returns the list file."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []

    def bad(name: str, data: bytes):
        p = out / name
        p.write_bytes(data)
        lines.append(f"BAD {p}")

    arr = _texture(120, 90, np.random.default_rng(seed))
    jb, pb = io.BytesIO(), io.BytesIO()
    Image.fromarray(arr).save(jb, "JPEG", quality=90)
    Image.fromarray(arr).save(pb, "PNG")
    jpg, png = jb.getvalue(), pb.getvalue()
    pj = io.BytesIO()
    Image.fromarray(arr).save(pj, "JPEG", quality=90, progressive=True)
    bad("empty.jpg", b"")
    bad("garbage.bin", bytes(rng.randrange(256) for _ in range(1000)))
    bad("text.png", b"hello, not an image\n" * 10)
    bad("gif.gif", b"GIF89a" + b"\0" * 50)
    for frac in (0.02, 0.1, 0.3, 0.6, 0.95):
        bad(f"trunc_{int(frac * 100)}.jpg", jpg[:int(len(jpg) * frac)])
        bad(f"trunc_prog_{int(frac * 100)}.jpg", pj.getvalue()[:int(len(pj.getvalue()) * frac)])
        bad(f"trunc_{int(frac * 100)}.png", png[:int(len(png) * frac)])
    bad("sig_only.png", png[:8])
    bad("soi_only.jpg", jpg[:2])
    # huge declared dimensions: PNG IHDR and JPEG SOF patched, data unchanged
    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    bad("huge.png", png[:8] + _png_chunk(b"IHDR", ihdr) + png[33:])
    ihdr0 = struct.pack(">IIBBBBB", 0, 10, 8, 2, 0, 0, 0)
    bad("zero_width.png", png[:8] + _png_chunk(b"IHDR", ihdr0) + png[33:])
    sof = jpg.find(b"\xff\xc0")
    bad("huge.jpg", jpg[:sof + 5] + struct.pack(">HH", 60000, 60000) + jpg[sof + 9:])
    bad("zero.jpg", jpg[:sof + 5] + struct.pack(">HH", 0, 0) + jpg[sof + 9:])
    crc = bytearray(png)
    crc[30] ^= 0xFF  # IHDR CRC
    bad("bad_crc.png", bytes(crc))
    idat = png.find(b"IDAT")
    broken = bytearray(png)
    for i in range(idat + 10, min(idat + 60, len(png) - 20)):
        broken[i] = rng.randrange(256)
    bad("bad_zlib.png", bytes(broken))
    for p in good:
        lines.append(f"GOOD {p}")
    extremes = [(1, 1), (1, 5000), (5000, 1), (2, 2), (27, 28), (28, 28), (28, 5000), (5000, 28), (1, 100000),
                (100000, 1), (3000, 3000), (14, 14), (29, 1000)]
    for w, h in extremes:
        lines.append(f"SIZE {w} {h} {rng.randrange(1 << 30)}")
    while len([x for x in lines if x.startswith("SIZE")]) < n_sizes:
        w = int(math.exp(rng.uniform(0, math.log(3000))))
        h = int(math.exp(rng.uniform(0, math.log(3000))))
        if w * h > 1_200_000:  # keeps the ASan run short
            continue
        lines.append(f"SIZE {w} {h} {rng.randrange(1 << 30)}")
    f = out / "robust.txt"
    f.write_text("\n".join(lines) + "\n")
    return f
