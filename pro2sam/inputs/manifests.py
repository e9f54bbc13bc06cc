"""Manifests: a ``.csv`` or ``.parquet`` file (the suffix in any case) with a ``uri`` column and
an optional ``label`` column, read a block at a time; the naming rule of manifests
(:func:`manifest_format`) for the labeling job's input and :func:`pro2sam.datasets.read_manifest`
alike."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from ..storage import StorageError, _describe, _under, canonical_uri, filesystem, is_remote, join_uri
from .base import LIST_BATCH_ROWS, Entry

__all__ = ["MANIFEST_SUFFIXES", "manifest_format", "is_manifest", "read_manifest_entries"]

MANIFEST_SUFFIXES = (".csv", ".parquet")


def manifest_format(uri: str) -> str | None:
    """``"csv"`` or ``"parquet"`` when the name of ``uri`` ends in a manifest suffix (in any case:
    ``LIST.CSV`` is a CSV manifest), else None. The naming rule of manifests, for the labeling
    job's input and :func:`pro2sam.datasets.read_manifest` alike."""
    lowered = uri.lower()
    return next((suffix[1:] for suffix in MANIFEST_SUFFIXES if lowered.endswith(suffix)), None)


def is_manifest(uri: str) -> bool:
    """True if ``uri`` is a manifest: a file (not a folder: a folder named ``x.csv`` is a folder)
    whose name :func:`manifest_format` recognises.

    Raises:
        StorageError: the storage cannot be reached.
    """
    if not manifest_format(uri):
        return False
    try:
        fs, path = filesystem(uri)
        return fs.isfile(path)
    except Exception as e:
        raise StorageError(_describe(uri, e)) from None


def read_manifest_entries(fs: fsspec.AbstractFileSystem, path: str, source: str, excluded: str | None) -> Iterator[Entry]:
    """The manifest's rows, read a block at a time (a CSV block or a Parquet batch); a row under
    ``excluded`` is refused."""
    try:
        yield from _manifest_rows(fs, path, source, excluded)
    except pa.ArrowException as e:  # Arrow's parse errors name neither the file nor, mostly, the line
        raise ValueError(f"manifest {source}: {e}") from None


def _manifest_rows(fs: fsspec.AbstractFileSystem, path: str, source: str, excluded: str | None) -> Iterator[Entry]:
    base = source.rsplit("/", 1)[0] if is_remote(source) else str(Path(path).parent)
    csv = manifest_format(path) == "csv"
    with fs.open(path, "rb") as f:
        if csv:
            try:
                header = pa_csv.open_csv(f).schema.names
            except pa.ArrowInvalid as e:
                if "empty" not in str(e).lower():
                    raise
                header = []
            f.seek(0)
        else:
            pf = pq.ParquetFile(f)
            header = pf.schema_arrow.names
        if "uri" not in header:
            raise ValueError(f"manifest {source} has no 'uri' column (columns: {header})")
        if not csv:
            uri_type = pf.schema_arrow.field("uri").type
            if not (pa.types.is_string(uri_type) or pa.types.is_large_string(uri_type)):
                raise ValueError(f"manifest {source}: column 'uri' must hold strings, not {uri_type}")
        columns = [c for c in ("uri", "label") if c in header]
        if csv:
            # Every column as text: labels like 001 or 1e3 stay what the user wrote.
            batches = pa_csv.open_csv(
                f,
                read_options=pa_csv.ReadOptions(block_size=4 * 2**20),
                convert_options=pa_csv.ConvertOptions(
                    column_types={c: pa.string() for c in columns}, include_columns=columns,
                    strings_can_be_null=True, null_values=[""],
                ),
            )  # fmt: skip
            where = lambda i: f"manifest {source} line {i + 2}"  # noqa: E731 (line 1 is the header)
        else:
            batches = pf.iter_batches(batch_size=LIST_BATCH_ROWS, columns=columns)
            where = lambda i: f"manifest {source} row {i + 1}"  # noqa: E731
        row = 0
        for batch in batches:
            for u, label in zip(batch.column("uri").to_pylist(), _manifest_labels(batch, source)):
                if u is None or not u.strip():
                    raise ValueError(f"{where(row)}: empty uri")
                if "://" not in u and not os.path.isabs(u):
                    u = join_uri(base, u)
                uri = canonical_uri(u)
                if excluded and _under(uri, excluded):
                    raise ValueError(
                        f"{where(row)}: {uri} lies in the output folder {excluded}, whose files are never "
                        "labeled: move the images out of it or choose another output"
                    )
                yield Entry(uri, label=label)
                row += 1


def _manifest_labels(batch: pa.RecordBatch, source: str) -> list[str | None]:
    if "label" not in batch.schema.names:
        return [None] * batch.num_rows
    column = batch.column("label")
    t = column.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t):
        return column.to_pylist()
    if pa.types.is_integer(t) or pa.types.is_dictionary(t):
        return [None if v is None else str(v) for v in column.to_pylist()]
    raise ValueError(f"manifest {source}: column 'label' must hold strings (or integers), not {t}")


