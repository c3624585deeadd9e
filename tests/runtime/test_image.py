import io

import numpy as np
import pytest
from PIL import Image

from hiwin_model.image import ImageError, load_image, to_rgb

from conftest import random_image


def _png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_empty_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(p)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.png")


def test_corrupt_file(tmp_path):
    p = tmp_path / "corrupt.png"
    p.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ImageError, match="not a recognised image"):
        load_image(p)


def test_truncated_file(tmp_path):
    data = _png(random_image(200, 150), "JPEG", quality=90)
    p = tmp_path / "trunc.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(p)


def test_tiny_and_extreme_sizes_load():
    assert load_image(_png(Image.new("RGB", (1, 1), (10, 20, 30)))).size == (1, 1)
    assert load_image(_png(Image.new("RGB", (1, 5000)))).size == (1, 5000)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGB"])
def test_plain_modes_match_pil_convert(mode):
    src = random_image(64, 48).convert(mode)
    out = load_image(src)
    assert out.mode == "RGB" and out.size == (64, 48)
    assert np.array_equal(np.asarray(out), np.asarray(src.convert("RGB")))


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(mode):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    src = rgba.convert(mode)
    out = np.asarray(load_image(src))
    assert (out[4, 4] == 255).all()  # transparent -> background
    assert tuple(out[0, 0]) == ((255, 0, 0) if mode == "RGBA" else (76, 76, 76))
    dropped = np.asarray(load_image(src, alpha_background=None))
    assert (dropped[4, 4] == 0).all()  # the released behaviour: alpha dropped


def test_palette_with_transparency():
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.info["transparency"] = 0
    out = np.asarray(load_image(p))
    assert (out == 255).all()


def test_16bit_greyscale_is_scaled_not_clipped():
    a = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    img = Image.fromarray(a)  # mode I;16
    assert img.mode.startswith("I;16")
    out = np.asarray(to_rgb(img))
    assert out[0, :, 0].tolist() == [0, 100, 255]


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = load_image(_png(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 40)


def test_decompression_bomb_is_refused_before_decoding():
    data = _png(Image.new("L", (3000, 3000)))
    with pytest.raises(ImageError, match="decompression-bomb"):
        load_image(data, max_pixels=1000 * 1000)
    assert load_image(data, max_pixels=None).size == (3000, 3000)
