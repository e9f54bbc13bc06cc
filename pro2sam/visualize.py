"""Pictures of Pro2SAM's output: the overlay (mask tinted, boxes drawn) and the coarse map as a heat map.

One renderer serves the HTML gallery's thumbnails (:mod:`pro2sam.gallery`) and the evaluation
report's best/worst overlays (:mod:`pro2sam.report`). Colours: the mask magenta, Pro2SAM's box gold,
ground-truth boxes green, GTFormer's box cyan. Images are RGB ``uint8`` arrays throughout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import cv2
import numpy as np

from .rle import decode_mask

__all__ = [
    "DEFAULT_THUMB_SIZE",
    "MASK_RGB",
    "MASK_ALPHA",
    "BOX_RGB",
    "GT_BOX_RGB",
    "GTFORMER_BOX_RGB",
    "COARSE_ALPHA",
    "render_overlay",
    "render_coarse_map",
    "encode_image",
]

DEFAULT_THUMB_SIZE = 256
MASK_RGB = np.array([255, 64, 160], dtype=np.float32)  # magenta: visible on most photographs
MASK_ALPHA = 0.45
BOX_RGB = (255, 230, 0)  # Pro2SAM's box
GT_BOX_RGB = (0, 255, 0)
GTFORMER_BOX_RGB = (0, 200, 255)
COARSE_ALPHA = 0.6  # weight of the heat map over the dimmed image
_LINE_PX = 2
_CAPTION_SCALE = 0.4


def render_overlay(
    image: np.ndarray,
    row: Mapping,
    *,
    thumb_size: int | None = DEFAULT_THUMB_SIZE,
    min_size: int = 0,
    gt_boxes: np.ndarray | None = None,
    gtformer_box: Sequence[float] | None = None,
    caption: str = "",
) -> np.ndarray:
    """The row's mask tinted and its box drawn over the image, with the ground truth and GTFormer's
    box when given.

    Args:
        image: (H, W, 3) uint8 RGB, the frame of the row's ``box_xyxy`` and mask (EXIF applied).
        row: a labels-table row; its ``mask_rle`` ((H, W) mask) and ``box_xyxy`` (inclusive
            pixels) are drawn when present.
        thumb_size: a longer side above this is shrunk to it (area interpolation); None: never.
        min_size: a longer side below this is enlarged by the smallest integer factor that reaches
            it (nearest neighbour), so that boxes on small images stay legible; 0: never.
        gt_boxes: (K, 4) ``(x0, y0, x1, y1)`` ground-truth boxes in original pixels, drawn green.
        gtformer_box: GTFormer's box ``(x0, y0, x1, y1)`` in original pixels, drawn cyan.
        caption: text on a black band at the top left.

    Returns:
        (h, w, 3) uint8 RGB, ``(h, w)`` the image size scaled as above.
    """
    h, w = image.shape[:2]
    longest = max(h, w)
    if min_size and longest < min_size:
        scale: float = math.ceil(min_size / longest)
    else:
        scale = 1.0 if thumb_size is None else min(1.0, thumb_size / longest)
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    interpolation = cv2.INTER_NEAREST if scale > 1 else cv2.INTER_AREA
    picture = cv2.resize(image, (tw, th), interpolation=interpolation).astype(np.float32)
    if row.get("mask_rle"):
        mask = cv2.resize(decode_mask(row["mask_rle"]).astype(np.uint8), (tw, th), interpolation=cv2.INTER_NEAREST) > 0
        picture[mask] = (1 - MASK_ALPHA) * picture[mask] + MASK_ALPHA * MASK_RGB
    picture = np.ascontiguousarray(picture.round().clip(0, 255).astype(np.uint8))
    boxes = [(box, GT_BOX_RGB) for box in ([] if gt_boxes is None else gt_boxes)]
    boxes += [(gtformer_box, GTFORMER_BOX_RGB), (row.get("box_xyxy"), BOX_RGB)]  # Pro2SAM's on top
    for box, colour in boxes:
        if box is not None and len(box):
            _draw_box(picture, box, (tw / w, th / h), colour)
    if caption:
        _draw_caption(picture, caption)
    return picture


def _draw_box(picture: np.ndarray, box: Sequence[float], scale: tuple[float, float], colour: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    sx, sy = scale  # inclusive indices: the box covers [x0, x1 + 1) pixels
    top_left = (int(x0 * sx), int(y0 * sy))
    bottom_right = (max(int(x0 * sx), math.ceil((x1 + 1) * sx) - 1), max(int(y0 * sy), math.ceil((y1 + 1) * sy) - 1))
    cv2.rectangle(picture, top_left, bottom_right, colour, thickness=_LINE_PX)


def _draw_caption(picture: np.ndarray, caption: str) -> None:
    (width, height), baseline = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, _CAPTION_SCALE, 1)
    cv2.rectangle(picture, (0, 0), (width + 4, height + baseline + 4), (0, 0, 0), thickness=-1)
    cv2.putText(picture, caption, (2, height + 2), cv2.FONT_HERSHEY_SIMPLEX, _CAPTION_SCALE, (255, 255, 255), 1, cv2.LINE_AA)


def render_coarse_map(image: np.ndarray, coarse_map, size: tuple[int, int]) -> np.ndarray:
    """The coarse map as a heat map over the image, both resized to ``size`` = (width, height).

    Args:
        image: (H, W, 3) uint8 RGB, the image the map covers.
        coarse_map: the labels table's ``coarse_map``: S*S floats in [0, 1], row-major.
        size: (width, height) of the result, e.g. the overlay thumbnail's.

    Returns:
        (height, width, 3) uint8 RGB: JET colours of the bilinearly upsampled map, blended over a
        dimmed grey copy of the image.
    """
    values = np.asarray(coarse_map, dtype=np.float32)
    side = math.isqrt(values.size)
    if side == 0 or side * side != values.size:
        raise ValueError(f"coarse_map has {values.size} values, not a square number")
    heat = cv2.resize(values.reshape(side, side), size, interpolation=cv2.INTER_LINEAR)
    colours = cv2.applyColorMap((heat.clip(0, 1) * 255).round().astype(np.uint8), cv2.COLORMAP_JET)
    colours = cv2.cvtColor(colours, cv2.COLOR_BGR2RGB).astype(np.float32)
    grey = cv2.cvtColor(cv2.resize(image, size, interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)
    dimmed = np.repeat(grey[..., None].astype(np.float32) * 0.5, 3, axis=2)
    return ((1 - COARSE_ALPHA) * dimmed + COARSE_ALPHA * colours).round().clip(0, 255).astype(np.uint8)


def encode_image(rgb: np.ndarray, format: str = "png", *, jpeg_quality: int = 85) -> bytes:
    """The bytes of an (H, W, 3) uint8 RGB picture as a ``"png"`` or ``"jpeg"`` file."""
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if format == "jpeg" else []
    ok, encoded = cv2.imencode(f".{format}", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"{format.upper()} encoding failed")
    return encoded.tobytes()
