"""What every data-set reader shares: the sample and data-set types, the errors, the metadata
line and number parsers, and :func:`open_dataset`, the one-string way in.

Conventions, the same for every layout:

- ``label`` is a 0-based class index into ``class_names`` (CUB's 1-based ids are shifted).
- ``boxes`` are ``(K, 4)`` float64 ``(x0, y0, x1, y1)`` in ORIGINAL image pixels, as annotated
  (CUB's ``x, y, w, h`` becomes ``x, y, x + w, y + h``; ILSVRC's XML/CSV corners are kept as they
  are), i.e. the evaluation's convention, ``x1``/``y1`` one past the last object pixel (as
  wsolevaluation; :func:`pro2sam.metrics.inclusive_to_eval_boxes` brings predicted inclusive
  boxes to it); several boxes per image are allowed and an image counts as localised if any of
  them is matched. :func:`pro2sam.metrics.scale_boxes_to_frame` brings them to the 224
  evaluation frame.
  ``None`` means the layout has no boxes for that image (e.g. ILSVRC train, OpenImages).
- ``width``/``height`` are the stored image size in pixels (no EXIF rotation applied), when the
  layout gives them or ``check_files`` read them from the image headers.
- Masks (OpenImages, CUB ``segmentations/``) are PNG URIs: the GT foreground is the union of
  ``mask_uris``; ``ignore_uri`` marks pixels left out of PxAP.

Roots and files are read through :mod:`pro2sam.storage`, so every root may be a local path or a
URI (``s3://bucket/CUB_200_2011``). Malformed metadata raises :class:`DatasetError` naming the file
and the 1-based line number.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ..inputs import manifest_format
from ..storage import filesystem, is_remote, join_uri, list_files, read_bytes

__all__ = ["DatasetError", "Sample", "WSOLDataset", "MANIFEST_COLUMNS", "open_dataset"]

# A box may reach the image size (CUB's x + w, ILSVRC's xmax = width) and one pixel past it
# (1-based annotations); anything further is an annotation error.
BOX_SLACK_PX = 1.0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_HEADER_THREADS = 16
MANIFEST_META_KEY = b"pro2sam.dataset"

# Columns of :meth:`WSOLDataset.to_manifest` (and what :func:`read_manifest` understands).
MANIFEST_COLUMNS = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("image_id", pa.string()),
        pa.field("label_index", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("x0", pa.float64()),
        pa.field("y0", pa.float64()),
        pa.field("x1", pa.float64()),
        pa.field("y1", pa.float64()),
        pa.field("mask_uri", pa.string()),
        pa.field("ignore_uri", pa.string()),
    ]
)


class DatasetError(ValueError):
    """Malformed or inconsistent data-set metadata; the message names the file and the line (a
    text file: ``FILE:LINE: REASON``) or row (a Parquet file: ``FILE row ROW: REASON``), where
    known. ``reason`` is the message without them."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None, row: int | None = None) -> None:
        where = f"{file}:{line}: " if file and line else f"{file} row {row}: " if file and row else f"{file}: " if file else ""
        super().__init__(where + message)
        self.reason = message
        self.file = file
        self.line = line
        self.row = row


@dataclass(frozen=True)
class Sample:
    """One image of a WSOL data set.

    Attributes:
        image_id: stable id from the layout (CUB's numeric id, the path relative to the root).
        uri: local path or fsspec URI of the image.
        label: 0-based class index.
        boxes: (K, 4) float64 ``(x0, y0, x1, y1)`` in original image pixels, or None if unknown.
        mask_uri: the GT mask PNG (first instance) if any.
        ignore_uri: PNG of pixels ignored by PxAP, if any.
        width, height: stored image size in pixels, if known.
        mask_uris: every instance mask PNG; the GT foreground is their union (``mask_uri`` is the
            first of them).
    """

    image_id: str
    uri: str
    label: int
    boxes: np.ndarray | None
    mask_uri: str | None = None
    ignore_uri: str | None = None
    width: int | None = None
    height: int | None = None
    mask_uris: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.mask_uri and not self.mask_uris:
            object.__setattr__(self, "mask_uris", (self.mask_uri,))
        elif self.mask_uris and not self.mask_uri:
            object.__setattr__(self, "mask_uri", self.mask_uris[0])

    @property
    def size(self) -> tuple[int, int] | None:
        """(width, height) in pixels, or None if unknown."""
        return (self.width, self.height) if self.width and self.height else None


@dataclass
class WSOLDataset:
    """A split of a WSOL data set: ``class_names[sample.label]`` names each sample's class."""

    name: str
    split: str
    class_names: list[str]
    samples: list[Sample]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def has_boxes(self) -> bool:
        return any(s.boxes is not None and len(s.boxes) for s in self.samples)

    @property
    def has_masks(self) -> bool:
        return any(s.mask_uris for s in self.samples)

    def by_uri(self) -> dict[str, Sample]:
        """Samples keyed by image URI (how the labels table is joined with the ground truth)."""
        return {s.uri: s for s in self.samples}

    def to_manifest(self) -> pa.Table:
        """The split as a manifest for the labeling job (:data:`MANIFEST_COLUMNS`).

        One row per box (and per instance mask; at least one row per image): ``uri``, ``label``
        (the class NAME), ``image_id``, ``label_index``, ``width``, ``height``, ``x0..y1``
        (original pixels, null without boxes), ``mask_uri``, ``ignore_uri``. The labeling job keeps
        the first row of each URI; :func:`read_manifest` regroups the rows into samples. The class
        list, data-set name and split travel in the schema metadata (kept by Parquet, not CSV).
        """
        columns: dict[str, list] = {f.name: [] for f in MANIFEST_COLUMNS}
        for s in self.samples:
            boxes = [] if s.boxes is None else [tuple(float(v) for v in b) for b in s.boxes]
            masks = list(s.mask_uris)
            for i in range(max(1, len(boxes), len(masks))):
                box = boxes[i] if i < len(boxes) else (None,) * 4
                columns["uri"].append(s.uri)
                columns["label"].append(self.class_names[s.label])
                columns["image_id"].append(s.image_id)
                columns["label_index"].append(s.label)
                columns["width"].append(s.width)
                columns["height"].append(s.height)
                for name, v in zip(("x0", "y0", "x1", "y1"), box):
                    columns[name].append(v)
                columns["mask_uri"].append(masks[i] if i < len(masks) else None)
                columns["ignore_uri"].append(s.ignore_uri)
        meta = {MANIFEST_META_KEY: json.dumps({"name": self.name, "split": self.split, "class_names": self.class_names})}
        return pa.Table.from_pydict(columns, schema=MANIFEST_COLUMNS.with_metadata(meta))


# ---------------------------------------------------------------- helpers of the readers


def dataset_root(uri: str) -> str:
    """A root as the readers join it: local paths made absolute, remote URIs without a trailing ``/``."""
    uri = os.fspath(uri)
    return uri.rstrip("/") if is_remote(uri) else os.path.abspath(uri)


def read_data(uri: str, *, missing: str = "file not found") -> bytes:
    """A metadata file's bytes; a missing file is a :class:`DatasetError` saying ``missing``."""
    try:
        return read_bytes(uri)
    except FileNotFoundError:
        raise DatasetError(missing, file=uri) from None


def read_text(uri: str) -> str:
    """A metadata file as text (UTF-8, BOM dropped)."""
    data = read_data(uri)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"not UTF-8 text: {e}", file=uri) from None


def read_lines(uri: str, sep: str | None, fields: int | Sequence[int]) -> Iterable[tuple[int, list[str]]]:
    """(1-based line number, fields) of each non-blank line; a wrong field count is an error."""
    allowed = (fields,) if isinstance(fields, int) else tuple(fields)
    for n, line in enumerate(read_text(uri).splitlines(), start=1):
        if not line.strip():
            continue
        parts = [p.strip() for p in (line.split(sep) if sep else line.split(None, max(allowed) - 1))]
        if len(parts) not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise DatasetError(f"expected {want} fields, got {len(parts)}: {line!r}", file=uri, line=n)
        yield n, parts


def parse_int(value: str, uri: str, line: int, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DatasetError(f"{what} is not an integer: {value!r}", file=uri, line=line) from None


def parse_float(value: str, uri: str, line: int, what: str) -> float:
    """A finite float, or a :class:`DatasetError` naming ``what``, the file and the line."""
    try:
        v = float(value)
    except ValueError:
        raise DatasetError(f"{what} is not a number: {value!r}", file=uri, line=line) from None
    if not np.isfinite(v):
        raise DatasetError(f"{what} is not finite: {value!r}", file=uri, line=line)
    return v


def check_box(box: Sequence[float], size: tuple[int, int] | None, uri: str, line: int | None) -> None:
    """``box`` (x0, y0, x1, y1) must be ordered, non-negative and, with ``size`` (w, h), inside the image."""
    x0, y0, x1, y1 = box
    if x1 < x0 or y1 < y0:
        raise DatasetError(f"box {list(box)} has x1 < x0 or y1 < y0", file=uri, line=line)
    if x0 < 0 or y0 < 0:
        raise DatasetError(f"box {list(box)} lies outside the image (negative coordinate)", file=uri, line=line)
    if size is not None:
        w, h = size
        if x1 > w + BOX_SLACK_PX or y1 > h + BOX_SLACK_PX:
            raise DatasetError(f"box {list(box)} lies outside the {w}x{h} image", file=uri, line=line)


def file_set(folder: str) -> set[str]:
    """The URIs of every file below ``folder``, spelled as :func:`~pro2sam.storage.join_uri` spells
    them from ``folder`` (for membership tests: one listing instead of one request per file)."""
    return {join_uri(folder, name) for name in list_files(folder)}


def require_image(uri: str, files: set[str] | None, meta: str, line: int | None) -> None:
    """``uri`` must be in ``files`` (None: not checked); the error names the metadata line."""
    if files is not None and uri not in files:
        raise DatasetError(f"image not found: {uri}", file=meta, line=line)


def _image_size(uri: str) -> tuple[int, int]:
    from PIL import Image

    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        with Image.open(f) as image:  # reads the header only
            return image.size


def image_sizes(uris: Sequence[str]) -> list[tuple[int, int] | None]:
    """(width, height) of each image from its header, read in parallel; None where unreadable."""

    def size(uri: str) -> tuple[int, int] | None:
        try:
            return _image_size(uri)
        except Exception:
            return None

    with ThreadPoolExecutor(max_workers=_HEADER_THREADS) as pool:
        return list(pool.map(size, uris))


def boxes_array(boxes: Sequence[Sequence[float]] | None) -> np.ndarray | None:
    """(K, 4) float64 of a sample's boxes, or None where the layout gave none."""
    return np.array(boxes, dtype=np.float64) if boxes else None


# ---------------------------------------------------------------- one way in


def open_dataset(spec: str, *, check_files: bool = True, images_root: str | None = None) -> WSOLDataset:
    """A data set from a one-string spec (command lines, job configs).

    ``cub:ROOT:SPLIT``, ``ilsvrc:ROOT:SPLIT``, ``wsol:METADATA_ROOT:DATA_ROOT:SPLIT``,
    ``coco:FILE.json`` (COCO instances; images under ``images_root``, default the JSON's folder),
    or the path or URI of a manifest ``.csv``/``.parquet``. Roots may be URIs
    (``cub:s3://bucket/CUB:test``): the split is the last ``:`` field and scheme separators
    (``://``) are kept together.
    """
    from .coco import read_coco
    from .cub import read_cub
    from .ilsvrc import read_ilsvrc
    from .manifest import read_manifest
    from .wsol import read_wsol_metadata

    kind, _, rest = spec.partition(":")
    if kind == "coco" and rest:
        return read_coco(rest, images_root=images_root)
    if kind in ("cub", "ilsvrc", "wsol") and rest:
        parts = _split_spec(rest)
        want = 3 if kind == "wsol" else 2
        if len(parts) != want:
            form = "wsol:METADATA_ROOT:DATA_ROOT:SPLIT" if kind == "wsol" else f"{kind}:ROOT:SPLIT"
            raise ValueError(f"data-set spec {spec!r} must look like {form}")
        if kind == "cub":
            return read_cub(parts[0], parts[1], check_files=check_files)
        if kind == "ilsvrc":
            return read_ilsvrc(parts[0], parts[1], check_files=check_files)
        return read_wsol_metadata(parts[0], parts[1], parts[2], check_files=check_files)
    if manifest_format(spec):
        return read_manifest(spec)
    raise ValueError(
        f"unknown data-set spec {spec!r}: use cub:ROOT:SPLIT, ilsvrc:ROOT:SPLIT, "
        "wsol:METADATA_ROOT:DATA_ROOT:SPLIT, coco:FILE.json or a manifest .csv/.parquet"
    )


def _split_spec(rest: str) -> list[str]:
    """Split on ':' but keep ``scheme://`` URIs whole."""
    raw = rest.split(":")
    parts: list[str] = []
    for piece in raw:
        if parts and piece.startswith("//") and "/" not in parts[-1] and parts[-1]:
            parts[-1] = parts[-1] + ":" + piece
        else:
            parts.append(piece)
    return parts
