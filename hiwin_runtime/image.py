"""Decoding user images into the RGB PIL images the slicer expects.

The released code does ``Image.open(f).convert('RGB')``. We keep that for ordinary RGB/L/P/CMYK
images and do better where it silently goes wrong (documented in the README):

* EXIF orientation is applied (``ImageOps.exif_transpose``), so a phone photo is upright;
* alpha (RGBA, LA, P with transparency) is composited onto ``alpha_background`` (white by
  default) instead of exposing whatever colour the transparent pixels happen to store;
  ``alpha_background=None`` drops alpha exactly like the original;
* 16-bit and 32-bit greyscale (``I;16*``, ``I``, ``F``) is scaled to 8 bits by its full range,
  where PIL's ``convert('RGB')`` would clip everything above 255 to white;
* empty, corrupt and truncated files and decompression bombs raise :class:`ImageError` naming
  the file and the problem.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = Union[str, os.PathLike, bytes, BinaryIO, Image.Image]
WHITE = (255, 255, 255)


class ImageError(ValueError):
    """An input image that cannot be decoded or used; the message names the problem."""


def _describe(src: ImageSource) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, bytes):
        return f"<{len(src)} bytes>"
    return f"<{type(src).__name__}>"


def load_image(src: ImageSource, *, max_pixels: int | None = Image.MAX_IMAGE_PIXELS,
               alpha_background: tuple[int, int, int] | None = WHITE) -> Image.Image:
    """Decode ``src`` (path, bytes, file object or PIL image) into an upright RGB image.

    ``max_pixels`` bounds width*height before any pixel is decoded (PIL's own limit by default);
    ``None`` disables the check for trusted, very large inputs.
    """
    name = _describe(src)
    if isinstance(src, Image.Image):
        img = src
    else:
        if isinstance(src, (str, os.PathLike)):
            p = Path(src)
            if not p.is_file():
                raise ImageError(f"{name}: no such file")
            if p.stat().st_size == 0:
                raise ImageError(f"{name}: the file is empty")
            fp: BinaryIO = open(p, "rb")
        elif isinstance(src, bytes):
            if not src:
                raise ImageError("image bytes are empty")
            fp = io.BytesIO(src)
        else:
            fp = src
        try:
            img = _open_checked(fp, name, max_pixels)
        finally:
            if isinstance(src, (str, os.PathLike)):
                fp.close()
    if max_pixels is not None and img.width * img.height > max_pixels:
        raise ImageError(f"{name}: {img.width}x{img.height} exceeds the decompression-bomb limit "
                         f"of {max_pixels} pixels (pass max_pixels=None for trusted inputs)")
    if img.width < 1 or img.height < 1:
        raise ImageError(f"{name}: image has no pixels ({img.width}x{img.height})")
    img = ImageOps.exif_transpose(img)
    return to_rgb(img, alpha_background=alpha_background)


def _open_checked(fp: BinaryIO, name: str, max_pixels: int | None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # PIL warns between 1x and 2x its limit and raises above; we decide ourselves.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                img = Image.open(fp)
                if max_pixels is not None and img.width * img.height > max_pixels:
                    raise ImageError(f"{name}: {img.width}x{img.height} exceeds the decompression-bomb "
                                     f"limit of {max_pixels} pixels (pass max_pixels=None for trusted inputs)")
                img.load()
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        raise ImageError(f"{name}: not a recognised image file") from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated / corrupt data
        raise ImageError(f"{name}: corrupt or truncated image ({e})") from e
    return img


def to_rgb(img: Image.Image, *, alpha_background: tuple[int, int, int] | None = WHITE) -> Image.Image:
    """Convert any PIL mode to RGB (see the module docstring for the rules)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            hi = 65535.0
        else:  # 32-bit int / float: use the data's own range
            lo, hi = float(a.min()), float(a.max())
            a = a - lo
            hi = max(hi - lo, 1.0)
        g = np.clip(np.rint(a * (255.0 / hi)), 0, 255).astype(np.uint8)
        return Image.fromarray(g).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        if alpha_background is None:
            return img.convert("RGB")
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, tuple(alpha_background) + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")
