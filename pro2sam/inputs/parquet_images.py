"""Parquet tables of images: one input per row, the image's encoded bytes in the row.

A table of images is a ``.parquet`` file with an ``image`` column of bytes, or of
``{bytes, path}`` structs as Hugging Face ``datasets`` exports it (``Image()`` features), and an
optional ``label`` column (text, or integers such as a ``ClassLabel``'s, written as text). A
``.parquet`` file without such a column is a manifest of URIs (:mod:`.manifests`).

A row is at ``<canonical file location>#row=<index>`` (its index in the file, from 0), followed by
``&path=<path>`` when the row's struct has a path: ``s3://b/images.parquet#row=12&path=cat.jpg``;
that location gives its id as a file's gives a file's.

Listing reads the small columns only (the label and the paths), a row group at a time; the bytes
are read in the read stage (:func:`read_rows`), by row group, for the rows of a batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..storage import StorageError, _describe, filesystem
from .base import Entry
from .manifests import _manifest_labels

__all__ = ["IMAGE_COLUMN", "LABEL_COLUMN", "is_image_table", "image_rows", "read_rows"]

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"


def _image_type(schema: pa.Schema) -> str | None:
    """``"binary"`` or ``"struct"`` for the kind of ``image`` column of a table of images, else None."""
    if IMAGE_COLUMN not in schema.names:
        return None
    t = schema.field(IMAGE_COLUMN).type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "binary"
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        inner = t.field("bytes").type
        if pa.types.is_binary(inner) or pa.types.is_large_binary(inner):
            return "struct"
    return None


def is_image_table(uri: str) -> bool:
    """True if ``uri`` is a Parquet file whose ``image`` column holds bytes or ``{bytes, path}``
    structs (its footer is read). A file that is not Parquet is not a table of images.

    Raises:
        StorageError: the storage cannot be reached.
    """
    fs, path = filesystem(uri)
    try:
        with fs.open(path, "rb") as f:
            return _image_type(pq.ParquetFile(f).schema_arrow) is not None
    except (pa.ArrowInvalid, ValueError):
        return False
    except FileNotFoundError:
        return False
    except Exception as e:
        raise StorageError(_describe(uri, e)) from None


def image_rows(table: Entry) -> Iterator[Entry]:
    """The rows of one table of images (``table.uri`` canonical) as inputs, in file order; each
    carries the file's fingerprint.

    Raises:
        StorageError: the file cannot be reached.
        ValueError: a ``label`` column that is neither text nor integers (naming the file).
    """
    if table.error is not None:
        yield Entry(f"{table.uri}#row=0", error=table.error, fingerprint=table.fingerprint)
        return
    fs, path = filesystem(table.uri)
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            kind = _image_type(pf.schema_arrow)
            columns = [f"{IMAGE_COLUMN}.path"] if kind == "struct" and pf.schema_arrow.field(IMAGE_COLUMN).type.get_field_index("path") >= 0 else []
            if LABEL_COLUMN in pf.schema_arrow.names:
                columns.append(LABEL_COLUMN)
            row = 0
            for group in range(pf.num_row_groups):
                n = pf.metadata.row_group(group).num_rows
                if columns:
                    batch = pa.Table.from_batches(list(pf.iter_batches(row_groups=[group], columns=columns)))
                    batch = batch.combine_chunks().to_batches()[0] if batch.num_rows else None
                else:
                    batch = None
                paths = _paths(batch, n)
                labels = _manifest_labels(batch, table.uri) if batch is not None else [None] * n
                for i in range(n):
                    location = f"{table.uri}#row={row}" + (f"&path={paths[i]}" if paths[i] else "")
                    yield Entry(location, label=labels[i], fingerprint=table.fingerprint,
                                container_kind="parquet", container=table.uri, member_offset=row)  # fmt: skip
                    row += 1
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, FileNotFoundError):
            yield Entry(f"{table.uri}#row=0", error=f"not found: {table.uri}")
            return
        raise StorageError(_describe(table.uri, e)) from None


def _paths(batch: pa.RecordBatch | None, n: int) -> list[str | None]:
    if batch is None or IMAGE_COLUMN not in batch.schema.names:
        return [None] * n
    return pc.struct_field(batch.column(IMAGE_COLUMN), "path").to_pylist()


def read_rows(uri: str, rows: Sequence[int]) -> list[bytes | None]:
    """The image bytes of ``rows`` (indices in the file) of a table of images, None for a null
    image; each row group that holds one of them is read once, its ``image`` column only.

    Raises:
        FileNotFoundError: the file is gone.
        IndexError: a row past the end of the file (it changed since it was listed).
        StorageError: the file cannot be read.
    """
    fs, path = filesystem(uri)
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            kind = _image_type(pf.schema_arrow)
            if kind is None:
                raise StorageError(f"{uri} has no longer an image column of bytes")
            starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
            out: list[bytes | None] = [None] * len(rows)
            groups: dict[int, list[int]] = {}
            for i, row in enumerate(rows):
                if not 0 <= row < starts[-1]:
                    raise IndexError(f"{uri} has {starts[-1]} rows, no row {row}: it changed since it was listed")
                groups.setdefault(int(np.searchsorted(starts, row, side="right") - 1), []).append(i)
            for group, members in groups.items():
                column = pf.read_row_group(group, columns=[IMAGE_COLUMN]).column(IMAGE_COLUMN).combine_chunks()
                if kind == "struct":
                    column = pc.struct_field(column, "bytes")  # a null struct is a null image
                for i in members:
                    out[i] = column[int(rows[i] - starts[group])].as_py()
            return out
    except (FileNotFoundError, IndexError, StorageError):
        raise
    except Exception as e:
        raise StorageError(_describe(uri, e)) from None
