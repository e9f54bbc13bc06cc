"""Manifests: a ``.csv`` or ``.parquet`` table with one row per box (or mask) of each image.

Read by the labeling job's reader, :func:`pro2sam.inputs.manifests.read_manifest_rows`, under its
rules (what a manifest is by name, CSV cells as text, empty cells, relative URIs, where a row is);
this module gives the rows their meaning as a data set."""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..inputs.manifests import ManifestError, manifest_place, read_manifest_rows, resolve_manifest_uri
from .common import (
    MANIFEST_META_KEY,
    DatasetError,
    Sample,
    WSOLDataset,
    boxes_array,
    check_box,
    parse_float,
    parse_int,
)

__all__ = ["read_manifest"]

_BOX_COLUMNS = ("x0", "y0", "x1", "y1")
_COLUMNS = ("uri", "label", "image_id", "label_index", "width", "height", *_BOX_COLUMNS, "mask_uri", "ignore_uri")


def read_manifest(uri: str, *, class_names: Sequence[str] | None = None) -> WSOLDataset:
    """A manifest ``.csv`` or ``.parquet`` (any case) on any fsspec URI (e.g. from :meth:`WSOLDataset.to_manifest`).

    Columns: ``uri`` (relative URIs are relative to the manifest's folder; every URI is spelt as
    :func:`~pro2sam.storage.canonical_uri` spells it, as the labeling job spells its rows'),
    ``label`` (class name or integer index), optional ``x0, y0, x1, y1`` (original pixels;
    several rows with the same ``uri`` give several boxes; all four empty for no box), optional
    ``image_id`` (default: the ``uri`` as written), ``width``, ``height``, ``mask_uri``,
    ``ignore_uri``, ``label_index``. How the file is read (cells as text, empty cells, relative
    URIs, line and row numbers) is :mod:`pro2sam.inputs.manifests`'s rules.

    Class order: ``class_names`` if given; else the list stored by :meth:`WSOLDataset.to_manifest`
    in the Parquet metadata; else from ``label_index``; else integer labels are their own index
    and names are sorted.

    Raises:
        DatasetError: a missing or unreadable file, no ``uri``/``label`` column (even without rows),
            an empty ``uri`` or ``label``, an unknown class name, an unparsable number, a box
            outside ``width``/``height``, conflicting labels for one image. The message names the
            line a CSV row starts on (``FILE:LINE: ...``) or the Parquet row (``FILE row N: ...``).
    """
    source = os.fspath(uri)
    if "://" not in source:
        source = os.path.abspath(source)
    rows, meta = _read_rows(source)
    names = list(class_names) if class_names is not None else meta.get("class_names")
    if names is None:
        names = _class_names_from_rows(rows, source)
    images = _Images(names, source)
    for i, row in enumerate(rows):
        images.add_row(row, i)
    name = meta.get("name") or posixpath.splitext(posixpath.basename(source))[0]
    return WSOLDataset(name, meta.get("split") or "manifest", list(names), images.samples())


def _read_rows(source: str) -> tuple[list[dict], dict]:
    """The manifest's rows as dicts of the columns it has, and the metadata
    :meth:`WSOLDataset.to_manifest` stored (or {})."""
    rows: list[dict] = []
    metadata: dict = {}
    try:
        for block in read_manifest_rows(source, _COLUMNS, required=("uri", "label")):
            metadata = block.metadata
            rows += [dict(zip(block.columns, values)) for values in zip(*block.columns.values())]
    except FileNotFoundError:
        raise DatasetError("manifest not found", file=source) from None
    except ManifestError as e:
        raise _error(e.reason, source, e.place) from None
    raw = metadata.get(MANIFEST_META_KEY)
    return rows, json.loads(raw) if raw else {}


def _error(reason: str, source: str, place: tuple[str, int] | None) -> DatasetError:
    """A :class:`DatasetError` at ``place`` (:func:`~pro2sam.inputs.manifests.manifest_place`)."""
    kind, number = place or (None, None)
    return DatasetError(reason, file=source, line=number if kind == "line" else None, row=number if kind == "row" else None)


def _at_row(source: str, index: int, error: DatasetError) -> DatasetError:
    """``error`` (raised without a file) placed at the manifest's row ``index`` (from 0)."""
    return error if error.file else _error(error.reason, source, manifest_place(source, index))


def _is_index(value) -> bool:
    return isinstance(value, (int, np.integer)) or (isinstance(value, str) and value.lstrip("-").isdigit())


def _cell_int(value, what: str) -> int | None:
    """An integer cell (text, int or integral float), None when empty."""
    if value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return parse_int(str(value), None, None, what)


def _class_names_from_rows(rows: list[dict], source: str) -> list[str]:
    """Class order without a given list: from ``label_index``, else integer labels are their own
    index, else the sorted label names."""
    if rows and "label_index" in rows[0]:
        named = {}
        for i, row in enumerate(rows):
            try:
                index = _cell_int(row["label_index"], "label_index")
            except DatasetError as e:
                raise _at_row(source, i, e) from None
            if index is not None and row["label"] is not None:
                named[index] = str(row["label"])
        return [named.get(i, str(i)) for i in range(max(named, default=-1) + 1)]
    labels = [row["label"] for row in rows if row["label"] is not None]
    if rows and all(_is_index(v) for v in labels):
        return [str(i) for i in range(max((int(v) for v in labels), default=-1) + 1)]
    return sorted({str(v) for v in labels})


@dataclass
class _Image:
    """The rows of one image URI, merged."""

    row: int  # its first row (from 0)
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
        self.by_uri: dict[str, _Image] = {}

    def add_row(self, row: Mapping, index: int) -> None:
        """Merge the manifest's row ``index`` (from 0) into the image of its URI (a new image on
        its first row); an error names the row's line (CSV) or row (Parquet)."""
        try:
            self._add_row(row, index)
        except DatasetError as e:
            raise _at_row(self.source, index, e) from None

    def _add_row(self, row: Mapping, index: int) -> None:
        written = row["uri"]  # never empty: the reader refuses an empty uri
        label = self._label(row["label"], written)
        image = self.by_uri.setdefault(resolve_manifest_uri(written, self.source), _Image(row=index, image_id=written, label=label))
        if image.label != label:
            kind, number = manifest_place(self.source, image.row)
            raise DatasetError(f"image {written!r} has label {row['label']!r} here but another on {kind} {number}")
        if row.get("image_id") is not None:
            image.image_id = str(row["image_id"])
        width, height = _cell_int(row.get("width"), "width"), _cell_int(row.get("height"), "height")
        image.width, image.height = width or image.width, height or image.height
        box = _row_box(row, image.size)
        if box is not None:
            image.boxes.append(box)
        if row.get("mask_uri") is not None:
            image.masks.append(resolve_manifest_uri(str(row["mask_uri"]), self.source))
        if row.get("ignore_uri") is not None:
            image.ignore = resolve_manifest_uri(str(row["ignore_uri"]), self.source)

    def _label(self, value, written: str) -> int:
        """The class index of a ``label`` cell: a known class name, else an integer index."""
        if value is None:
            raise DatasetError(f"image {written!r} has no label")
        if str(value) in self.index_of:
            label = self.index_of[str(value)]
        elif _is_index(value):
            label = int(value)
        else:
            raise DatasetError(f"unknown class {value!r}")
        if not 0 <= label < len(self.names):
            raise DatasetError(f"class index {label} out of range 0..{len(self.names) - 1}")
        return label

    def samples(self) -> list[Sample]:
        return [image.sample(uri) for uri, image in self.by_uri.items()]


def _row_box(row: Mapping, size: tuple[int, int] | None) -> tuple[float, ...] | None:
    """The row's box (x0, y0, x1, y1), None when all four cells are empty."""
    coords = [row.get(k) for k in _BOX_COLUMNS]
    if all(c is None for c in coords):
        return None
    if any(c is None for c in coords):
        raise DatasetError(f"incomplete box {coords}")
    box = tuple(parse_float(str(c), None, None, "box coordinate") for c in coords)
    check_box(box, size, None, None)
    return box
