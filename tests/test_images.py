"""Image decoding: every supported kind becomes RGB uint8; bad bytes give a clear error."""

import io

import numpy as np
import pytest
from PIL import Image

from pro2sam.images import ImageDecodeError, decode_image, to_rgb_array


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture
def rgb():
    arr = np.zeros((20, 30, 3), dtype=np.uint8)
    arr[5:10, 2:8] = (255, 255, 255)
    return arr


def test_rgb_png_decodes_unchanged(rgb):
    assert np.array_equal(decode_image(encode(Image.fromarray(rgb))), rgb)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_other_modes_become_rgb_uint8(rgb, mode):
    if mode == "I;16":
        image = Image.fromarray((rgb[:, :, 0].astype(np.uint16) * 257))
    else:
        image = Image.fromarray(rgb).convert(mode)
    out = decode_image(encode(image, "TIFF" if mode == "CMYK" else "PNG"))
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    assert out[7, 4].max() > 200 and out[0, 0].max() < 30  # the white patch stays bright, the rest dark


def test_exif_orientation_is_applied(rgb):
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    out = decode_image(encode(image, "JPEG", exif=exif, quality=95))
    assert out.shape == (30, 20, 3)


def test_empty_bytes_are_reported():
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"")


def test_non_image_bytes_are_reported():
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode_image(b"this is a text file, not a picture\n" * 10)


def test_truncated_image_is_reported(rgb):
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
        decode_image(data[: len(data) // 3])


def test_oversized_image_is_refused_before_decoding():
    data = encode(Image.new("L", (3000, 3000)))
    with pytest.raises(ImageDecodeError, match="over the limit"):
        decode_image(data, max_pixels=1_000_000)


def test_arrays_of_other_layouts_become_rgb():
    gray = np.full((4, 5), 7, dtype=np.uint8)
    assert to_rgb_array(gray).shape == (4, 5, 3)
    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    assert to_rgb_array(rgba).shape == (4, 5, 3)
    assert to_rgb_array(np.ones((4, 5, 3), dtype=np.float32))[0, 0, 0] == 255
    with pytest.raises(ValueError, match="expected an"):
        to_rgb_array(np.zeros((2, 3, 4, 5)))
