"""Masks as COCO run-length encoding (pycocotools), the form results are stored in."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

__all__ = ["encode_mask", "decode_mask"]


def encode_mask(mask: np.ndarray) -> dict:
    """(H, W) bool -> ``{"size": [H, W], "counts": str}``, COCO compressed RLE."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_mask(rle: dict) -> np.ndarray:
    """COCO RLE (``counts`` as str or bytes) -> (H, W) bool."""
    counts = rle["counts"]
    counts = counts.encode("ascii") if isinstance(counts, str) else counts
    return mask_utils.decode({"size": list(rle["size"]), "counts": counts}).astype(bool)
