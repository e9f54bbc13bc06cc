"""Reading a labels table: record batches, rows, a pandas DataFrame, a row's mask.

A labels table is a Parquet file or an output folder of label files (local or any fsspec URI,
:class:`pro2sam.output.LabelsOutput`), read one record batch at a time and one row per image, so
that nothing here holds more than a batch unless asked for a whole DataFrame.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .labels import LABEL_SCHEMA
from .output import KEY_COLUMNS, LabelsOutput, check_label_columns, with_label_columns, with_label_types
from .rle import decode_mask
from .storage import StorageError, filesystem, is_remote

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "parquet_files",
    "iter_label_batches",
    "iter_label_rows",
    "read_labels",
    "row_mask",
]

# Rows per Parquet record batch: bounds the memory of a pass over the table, whatever its size.
DEFAULT_BATCH_SIZE = 1024


def parquet_files(input: str) -> list[str]:
    """The Parquet files of a labels table: ``input`` itself if it is a file (its footer read to
    check that it is one), else the label files directly under the folder
    (:class:`pro2sam.output.LabelsOutput`), sorted, as URIs of the same kind as ``input``.

    Raises:
        FileNotFoundError: ``input`` does not exist or holds no label file.
        StorageError: the file ``input`` is not a readable Parquet file (cut short, not Parquet).
        ValueError: the file ``input`` is not a labels table (:func:`pro2sam.output.check_label_columns`).
    """
    fs, path = filesystem(input)
    if fs.isfile(path):
        with _labels_file(fs, path, input):
            return [input]
    if not fs.isdir(path):
        raise FileNotFoundError(f"labels input {input} does not exist")
    found = LabelsOutput(input).label_files()
    if not found:
        raise FileNotFoundError(f"no label files (.parquet with the labels table's columns) under {input}")
    return [fs.unstrip_protocol(p) if is_remote(input) else p for p in found]


def iter_label_batches(
    input: str, columns: Sequence[str] | None = None, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> Iterator[pa.RecordBatch]:
    """The labels table at ``input`` (a Parquet file or an output folder, local or URI), one
    record batch of at most ``batch_size`` rows at a time, one row per image
    (:meth:`pro2sam.output.LabelsOutput.iter_batches`).

    Args:
        columns: the columns to read, in this order; a column a file lacks (a file of an older
            version) comes as nulls. None: every column of each file.

    Raises:
        FileNotFoundError: ``input`` does not exist or holds no label file.
    """
    fs, path = filesystem(input)
    if fs.isfile(path):
        with _labels_file(fs, path, input) as pf:
            present = [c for c in columns if c in pf.schema_arrow.names] if columns is not None else None
            for batch in pf.iter_batches(batch_size=batch_size, columns=present):
                yield with_label_columns(with_label_types(batch, input), columns)
        return
    parquet_files(input)  # a clear error for a missing or empty folder
    yield from LabelsOutput(input).iter_batches(columns, batch_size=batch_size)


@contextmanager
def _labels_file(fs, path: str, input: str) -> Iterator[pq.ParquetFile]:
    """The labels file ``input`` given by name, opened: it need not be named or marked as a label
    file (a table copied out of an output is one), but it must be Parquet read whole, with the key
    columns, each column of the labels table's kind. Errors name the file."""
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            check_label_columns(pf.schema_arrow, input, required=KEY_COLUMNS)
            yield pf
    except (pa.ArrowInvalid, OSError) as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise StorageError(f"{input} is not a readable Parquet file ({type(e).__name__}: {first})") from None


def iter_label_rows(
    input: str, *, columns: Sequence[str] | None = None, batch_size: int = DEFAULT_BATCH_SIZE
) -> Iterator[dict]:
    """Rows of the labels table as dicts, from :func:`iter_label_batches`; at most one batch of
    rows is held in memory."""
    for batch in iter_label_batches(input, columns, batch_size=batch_size):
        yield from batch.to_pylist()


def read_labels(
    input: str,
    columns: Sequence[str] | None = None,
    filter: pc.Expression | list | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
):
    """The labels table as a pandas DataFrame, one row per image.

    Args:
        input: a labels Parquet file or output folder, local or URI (``s3://...``).
        columns: the columns to return (default: all of them). Leaving out ``coarse_map``
            (196 floats a row) saves most of the memory.
        filter: rows to keep, as a pyarrow expression (``pc.field("status") == "ok"``) or in
            ``pyarrow.parquet``'s list form (``[("match_score", ">", 0.5)]``); it may name columns
            not in ``columns``. Applied batch by batch, so only kept rows are ever held together.
        batch_size: rows per record batch read.

    Returns:
        A ``pandas.DataFrame``. ``mask_rle`` cells are dicts (decode one with :func:`row_mask`),
        list columns hold arrays, missing scores are NaN.
    """
    if isinstance(filter, list):
        filter = pq.filters_to_expression(filter)
    wanted = list(columns) if columns is not None else list(LABEL_SCHEMA.names)
    read = wanted + [c for c in _referenced(filter) if c not in wanted]
    kept = []
    for batch in iter_label_batches(input, read, batch_size=batch_size):
        table = pa.Table.from_batches([batch])
        if filter is not None:
            table = table.filter(filter)
        if table.num_rows:
            kept.append(table.select(wanted))
    schema = pa.schema([LABEL_SCHEMA.field(c) for c in wanted])
    table = pa.concat_tables(kept) if kept else schema.empty_table()
    return table.to_pandas()


def _referenced(expression: pc.Expression | None) -> list[str]:
    """Columns of the labels schema an expression may refer to: those named in its text (at
    worst a column more is read, e.g. ``error`` for a filter on ``error_kind``)."""
    if expression is None:
        return []
    text = str(expression)
    return [name for name in LABEL_SCHEMA.names if name in text]


def row_mask(row: Mapping) -> np.ndarray | None:
    """The mask of one labels-table row (a dict, or a pandas row of :func:`read_labels`) as an
    (H, W) bool array in original-image pixels, or None for a row without a mask (an error row).
    """
    rle = row["mask_rle"]
    if rle is None or (isinstance(rle, float) and np.isnan(rle)):
        return None
    return decode_mask(rle)
