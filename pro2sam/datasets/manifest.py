"""Manifests: a ``.csv`` or ``.parquet`` table with one row per box (or mask) of each image.

What is a manifest, by name, is :func:`pro2sam.inputs.manifest_format` (the suffix in any case),
the rule the labeling job's input follows too."""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ..inputs import manifest_format
from ..storage import is_remote, join_uri
from .common import (
    MANIFEST_META_KEY,
    DatasetError,
    Sample,
    WSOLDataset,
    boxes_array,
    check_box,
    parse_float,
    parse_int,
    read_data,
)

__all__ = ["read_manifest"]

# Line numbers count the CSV header as line 1 (Parquet: data row + 1).
_FIRST_LINE = 2
_BOX_COLUMNS = ("x0", "y0", "x1", "y1")


def read_manifest(uri: str, *, class_names: Sequence[str] | None = None) -> WSOLDataset:
    """A manifest ``.csv`` or ``.parquet`` (any case) on any fsspec URI (e.g. from :meth:`WSOLDataset.to_manifest`).

    Columns: ``uri`` (relative URIs are relative to the manifest's folder), ``label`` (class name
    or integer index), optional ``x0, y0, x1, y1`` (original pixels; several rows with the same
    ``uri`` give several boxes; null or empty for no box), optional ``image_id`` (default: the
    ``uri`` as written), ``width``, ``height``, ``mask_uri``, ``ignore_uri``, ``label_index``.

    Class order: ``class_names`` if given; else the list stored by :meth:`WSOLDataset.to_manifest`
    in the Parquet metadata; else from ``label_index``; else integer labels are their own index
    and names are sorted.

    Raises:
        DatasetError: unreadable file, no ``uri``/``label`` column, an unknown class name, an
            unparsable number, a box outside ``width``/``height``, conflicting labels for one
            image. Line numbers count the CSV header as line 1 (Parquet: data row + 1).
    """
    source = os.fspath(uri)
    if not is_remote(source):
        source = os.path.abspath(source)
    rows, meta = _read_rows(source)
    _require_columns(rows, source)
    names = list(class_names) if class_names is not None else meta.get("class_names")
    if names is None:
        names = _class_names_from_rows(rows, source)
    images = _Images(names, source)
    for i, row in enumerate(rows):
        images.add_row(row, i + _FIRST_LINE)
    name = meta.get("name") or posixpath.splitext(posixpath.basename(source))[0]
    return WSOLDataset(name, meta.get("split") or "manifest", list(names), images.samples())


def _read_rows(source: str) -> tuple[list[dict], dict]:
    """The manifest's rows as dicts, and the metadata :meth:`WSOLDataset.to_manifest` stored (or {})."""
    import pyarrow.parquet as pq

    data = read_data(source, missing="manifest not found")
    try:
        if manifest_format(source) == "parquet":
            table = pq.read_table(io.BytesIO(data))
            raw = (table.schema.metadata or {}).get(MANIFEST_META_KEY)
            return table.to_pylist(), json.loads(raw) if raw else {}
        return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig")))), {}
    except (pa.ArrowInvalid, UnicodeDecodeError, csv.Error, OSError) as e:
        raise DatasetError(f"unreadable manifest: {e}", file=source) from None


def _require_columns(rows: list[dict], source: str) -> None:
    columns = set(rows[0]) if rows else set()
    for required in ("uri", "label"):
        if rows and required not in columns:
            raise DatasetError(f"manifest has no {required!r} column (columns: {sorted(columns)})", file=source)


def _is_empty(value) -> bool:
    """Null, blank text or NaN: a cell with nothing in it (CSV gives '', Parquet None or NaN)."""
    return value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, float) and np.isnan(value))


def _is_index(value) -> bool:
    return isinstance(value, (int, np.integer)) or (isinstance(value, str) and value.strip().lstrip("-").isdigit())


def _cell_int(value, source: str, line: int, what: str) -> int | None:
    """An integer cell (text, int or integral float), None when empty."""
    if _is_empty(value):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return parse_int(str(value).strip(), source, line, what)


def _class_names_from_rows(rows: list[dict], source: str) -> list[str]:
    """Class order without a given list: from ``label_index``, else integer labels are their own
    index, else the sorted label names."""
    if rows and "label_index" in rows[0]:
        named = {}
        for i, row in enumerate(rows):
            index = _cell_int(row.get("label_index"), source, i + _FIRST_LINE, "label_index")
            if index is not None and not _is_empty(row.get("label")):
                named[index] = str(row["label"]).strip()
        return [named.get(i, str(i)) for i in range(max(named, default=-1) + 1)]
    labels = [row.get("label") for row in rows if not _is_empty(row.get("label"))]
    if rows and all(_is_index(v) for v in labels):
        return [str(i) for i in range(max((int(v) for v in labels), default=-1) + 1)]
    return sorted({str(v).strip() for v in labels})


def _resolve(written: str, base: str) -> str:
    """A URI as written in the manifest: absolute or with a scheme as it is, else below ``base``."""
    return written if "://" in written or os.path.isabs(written) else join_uri(base, written)


@dataclass
class _Image:
    """The rows of one image URI, merged."""

    line: int  # its first row
    image_id: str
    label: int
    boxes: list[tuple[float, ...]] = field(default_factory=list)
    masks: list[str] = field(default_factory=list)
    ignore: str | None = None
    width: int | None = None
    height: int | None = None

    @property
    def size(self) -> tuple[int, int] | None:
        return (self.width, self.height) if self.width and self.height else None

    def sample(self, uri: str) -> Sample:
        return Sample(
            image_id=self.image_id,
            uri=uri,
            label=self.label,
            boxes=boxes_array(self.boxes),
            ignore_uri=self.ignore,
            width=self.width,
            height=self.height,
            mask_uris=tuple(self.masks),
        )


class _Images:
    """The manifest's rows merged into one :class:`_Image` per resolved URI, in first-row order."""

    def __init__(self, names: Sequence[str], source: str) -> None:
        self.names = names
        self.index_of = {name: i for i, name in enumerate(names)}
        self.source = source
        self.base = source.rsplit("/", 1)[0] if is_remote(source) else os.path.dirname(source)
        self.by_uri: dict[str, _Image] = {}

    def add_row(self, row: Mapping, line: int) -> None:
        """Merge one row into the image of its URI (a new image on its first row)."""
        source = self.source
        if _is_empty(row.get("uri")):
            raise DatasetError("empty uri", file=source, line=line)
        written = str(row["uri"]).strip()
        label = self._label(row.get("label"), written, line)
        image = self.by_uri.setdefault(_resolve(written, self.base), _Image(line=line, image_id=written, label=label))
        if image.label != label:
            raise DatasetError(
                f"image {written!r} has label {row.get('label')!r} here but another on line {image.line}",
                file=source,
                line=line,
            )
        if not _is_empty(row.get("image_id")):
            image.image_id = str(row["image_id"])
        width, height = _cell_int(row.get("width"), source, line, "width"), _cell_int(row.get("height"), source, line, "height")
        image.width, image.height = width or image.width, height or image.height
        box = _row_box(row, image.size, source, line)
        if box is not None:
            image.boxes.append(box)
        if not _is_empty(row.get("mask_uri")):
            image.masks.append(_resolve(str(row["mask_uri"]).strip(), self.base))
        if not _is_empty(row.get("ignore_uri")):
            image.ignore = _resolve(str(row["ignore_uri"]).strip(), self.base)

    def _label(self, value, written: str, line: int) -> int:
        """The class index of a ``label`` cell: a known class name, else an integer index."""
        if _is_empty(value):
            raise DatasetError(f"image {written!r} has no label", file=self.source, line=line)
        if str(value).strip() in self.index_of:
            label = self.index_of[str(value).strip()]
        elif _is_index(value):
            label = int(value)
        else:
            raise DatasetError(f"unknown class {value!r}", file=self.source, line=line)
        if not 0 <= label < len(self.names):
            raise DatasetError(f"class index {label} out of range 0..{len(self.names) - 1}", file=self.source, line=line)
        return label

    def samples(self) -> list[Sample]:
        return [image.sample(uri) for uri, image in self.by_uri.items()]


def _row_box(row: Mapping, size: tuple[int, int] | None, source: str, line: int) -> tuple[float, ...] | None:
    """The row's box (x0, y0, x1, y1), None when all four cells are empty."""
    coords = [row.get(k) for k in _BOX_COLUMNS]
    if all(_is_empty(c) for c in coords):
        return None
    if any(_is_empty(c) for c in coords):
        raise DatasetError(f"incomplete box {coords}", file=source, line=line)
    box = tuple(parse_float(str(c), source, line, "box coordinate") for c in coords)
    check_box(box, size, source, line)
    return box
