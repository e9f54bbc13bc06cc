"""Turning whatever a user hands us into an RGB uint8 array, or a clear error.

Boxes and masks are computed in the frame of the array these functions return, which is the
image as a viewer shows it: EXIF orientation is applied first.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

__all__ = ["ImageDecodeError", "DEFAULT_MAX_PIXELS", "decode_image", "to_rgb_array"]

# Larger images are refused before decoding (a decompression bomb would exhaust memory).
DEFAULT_MAX_PIXELS = 64_000_000


class ImageDecodeError(ValueError):
    """The bytes are not an image we can label (empty, truncated, not an image, too large)."""


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to (H, W, 3) uint8 RGB, EXIF orientation applied.

    Grayscale, palette, RGBA (alpha dropped, not composited), CMYK and 16-bit images are
    converted; 16-bit values are scaled to 8 bits rather than clipped.

    Raises:
        ImageDecodeError: empty, truncated or corrupt data, a non-image, or more than
            ``max_pixels`` pixels.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # max_pixels (below) is the guard: Pillow's lower warning threshold must not refuse an
            # image the caller allowed. Pillow's hard limit (DecompressionBombError) still applies.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{max_pixels} (decompression-bomb guard; raise max_pixels to allow it)"
                )
            image.load()  # decode now so that truncation is caught here
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image is over the limit of Pillow's decompression-bomb guard: {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(f"not an image file (unrecognised format, {len(data)} bytes)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(f"truncated or corrupt image ({len(data)} bytes): {e}") from None
    return to_rgb_array(image)


def to_rgb_array(image: Image.Image | np.ndarray | str | os.PathLike) -> np.ndarray:
    """Any supported image to (H, W, 3) uint8 RGB.

    Args:
        image: a PIL image (EXIF orientation applied), a path to an image file, or an array:
            (H, W) or (H, W, 1) gray, (H, W, 3) RGB or (H, W, 4) RGBA; uint8, or 16-bit integers
            (scaled down), or floats in [0, 1].
    """
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return decode_image(f.read())
    if isinstance(image, Image.Image):
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(image, dtype=np.float64)
            top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
            image = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
        return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array, got shape {arr.shape}")
    if arr.dtype == np.uint16 or (arr.dtype.kind in "iu" and arr.dtype.itemsize > 1):
        arr = np.clip(arr.astype(np.float64) / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif arr.dtype.kind == "f":
        arr = np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    arr = arr.astype(np.uint8, copy=False)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])
