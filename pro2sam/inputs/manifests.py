"""Manifests: a ``.csv`` or ``.parquet`` file (the suffix in any case, :func:`manifest_format`)
with one row per image (or per box of an image), naming it in a ``uri`` column. The labeling
job's input (:func:`read_manifest_entries`: ``uri`` and an optional ``label``) and the data sets'
manifests (:func:`pro2sam.datasets.read_manifest`: boxes, masks, sizes) are read by one reader,
:func:`read_manifest_rows`, under these rules:

- **Where:** a local path or any fsspec URI. CSV is read as a stream of blocks, Parquet a batch
  at a time; a row is never held longer than its block.
- **CSV:** UTF-8 (a byte-order mark is dropped), a header line naming the columns, ``,``
  between cells, ``"`` quoting (a quoted cell may hold ``,`` and line breaks). Every cell is
  text: ``001`` or ``1e3`` stay what was written. Empty lines are skipped (before the header
  too). A row with more or fewer cells than the header is an error (named by its line).
- **Parquet:** cells keep the file's types; the schema's key-value metadata is handed on.
- **Columns:** only the columns asked for are read; a manifest without a required one (an empty
  file has none) is refused, whether or not it has rows. A header with no rows is a manifest of
  no rows. The ``uri`` column must hold text (in Parquet: strings).
- **Empty cells:** text is read without the whitespace around it; a null, a NaN, or text that is
  then empty is an empty cell, given as None, in every column. An empty ``uri`` is an error.
- **Relative URIs** (:func:`resolve_manifest_uri`): a URI with a scheme or an absolute path is
  taken as written, any other is relative to the manifest's folder (for a remote manifest, the
  URI up to its last ``/``); either way it is then spelt as :func:`~pro2sam.storage.canonical_uri`
  spells it (local: absolute, ``.``/``..`` and links resolved; remote: the key as written).
- **Where a row is** (:func:`manifest_place`): CSV rows by the line of the file they start on
  (from 1, as an editor numbers them: the header, empty lines and line breaks inside quotes
  count), Parquet rows by their row number (from 1). Errors are :class:`ManifestError` naming the manifest and, where one row is at
  fault, its line or row; Arrow's own parse errors are named with the manifest.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from ..storage import StorageError, _describe, _local_path, _under, canonical_uri, filesystem, is_remote, join_uri
from .base import LIST_BATCH_ROWS, Entry

__all__ = [
    "MANIFEST_SUFFIXES",
    "ManifestBlock",
    "ManifestError",
    "manifest_format",
    "manifest_place",
    "is_manifest",
    "read_manifest_entries",
    "read_manifest_rows",
    "resolve_manifest_uri",
]

MANIFEST_SUFFIXES = (".csv", ".parquet")
_CSV_BLOCK_BYTES = 4 * 2**20


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


class ManifestError(ValueError):
    """A malformed manifest. ``str()`` is ``manifest SOURCE line N: REASON`` (``row N`` in
    Parquet; ``manifest SOURCE: REASON`` when no one row is at fault).

    Attributes:
        source: the manifest as it was named.
        reason: what is wrong, without the place.
        place: ``("line", n)`` or ``("row", n)`` (:func:`manifest_place`), or None.
    """

    def __init__(self, source: str, reason: str, place: tuple[str, int] | None = None) -> None:
        where = f"manifest {source} {place[0]} {place[1]}" if place else f"manifest {source}"
        super().__init__(f"{where}: {reason}")
        self.source, self.reason, self.place = source, reason, place


@dataclass(frozen=True)
class ManifestBlock:
    """Consecutive rows of a manifest, as :func:`read_manifest_rows` reads them.

    Attributes:
        first_row: the index (from 0, over the whole manifest) of the block's first row.
        columns: each asked-for column the manifest has -> one value per row: ``str`` for CSV,
            the Parquet value (``str``, ``int``, ``float``...) otherwise; None for an empty cell.
        types: each of those columns -> its Arrow type in the file (CSV: string).
        metadata: the Parquet schema's key-value metadata (``{}`` for CSV).
    """

    first_row: int
    columns: dict[str, list]
    types: dict[str, pa.DataType]
    metadata: dict[bytes, bytes]

    @property
    def num_rows(self) -> int:
        return len(next(iter(self.columns.values()), ()))


def read_manifest_rows(source: str, columns: Sequence[str], *, required: Sequence[str] = ("uri",)) -> Iterator[ManifestBlock]:
    """The rows of the manifest ``source`` (a local path or fsspec URI, CSV or Parquet by
    :func:`manifest_format`), a block at a time, with the ``columns`` asked for that it has; the
    module's rules. At least one block comes (with no rows for a manifest of none), so that its
    columns and metadata are known.

    Raises:
        ManifestError: a column of ``required`` missing, a ``uri`` column that is not text, an
            empty ``uri`` (with its place), a file that does not parse (Arrow's reason).
        FileNotFoundError: no file ``source``.
    """
    fs, path = filesystem(source)
    fmt = manifest_format(path) or manifest_format(source)
    try:
        with fs.open(path, "rb") as f:
            yield from (_csv_blocks if fmt == "csv" else _parquet_blocks)(f, source, list(columns), required)
    except pa.ArrowException as e:  # Arrow's parse errors name neither the file nor, mostly, the line
        raise ManifestError(source, str(e)) from None


def _require(header: list[str], required: Sequence[str], source: str) -> None:
    for name in required:
        if name not in header:
            raise ManifestError(source, f"no {name!r} column (columns: {header})")


def _csv_blocks(f, source: str, columns: list[str], required: Sequence[str]) -> Iterator[ManifestBlock]:
    parse = pa_csv.ParseOptions(newlines_in_values=True)
    try:
        try:
            header = pa_csv.open_csv(f, parse_options=parse).schema.names
        except pa.ArrowInvalid as e:
            if "empty" not in str(e).lower():
                raise
            header = []
        f.seek(0)
        _require(header, required, source)
        present = [c for c in columns if c in header]
        batches = pa_csv.open_csv(
            f,
            read_options=pa_csv.ReadOptions(block_size=_CSV_BLOCK_BYTES),
            parse_options=parse,
            convert_options=pa_csv.ConvertOptions(
                column_types={c: pa.string() for c in present}, include_columns=present,
                strings_can_be_null=True, null_values=[""],
            ),
        )  # fmt: skip
        yield from _blocks(batches, present, {c: pa.string() for c in present}, {}, source)
    except pa.ArrowInvalid as e:  # with line breaks allowed in quotes, Arrow cannot say which line
        place = _ragged_place(source) if "columns" in str(e) else None
        raise ManifestError(source, str(e), place) from None


def _parquet_blocks(f, source: str, columns: list[str], required: Sequence[str]) -> Iterator[ManifestBlock]:
    pf = pq.ParquetFile(f)
    schema = pf.schema_arrow
    _require(schema.names, required, source)
    present = [c for c in columns if c in schema.names]
    types = {c: schema.field(c).type for c in present}
    if "uri" in types and not (pa.types.is_string(types["uri"]) or pa.types.is_large_string(types["uri"])):
        raise ManifestError(source, f"column 'uri' must hold strings, not {types['uri']}")
    yield from _blocks(pf.iter_batches(batch_size=LIST_BATCH_ROWS, columns=present), present, types, dict(schema.metadata or {}), source)


def _blocks(batches, present: list[str], types: dict, metadata: dict, source: str) -> Iterator[ManifestBlock]:
    row = 0
    for batch in batches:
        columns = {c: [_cell(v) for v in batch.column(c).to_pylist()] for c in present}
        empty = columns["uri"].index(None) if None in columns.get("uri", ()) else None
        if empty is not None:  # the rows before it are read, as a stream would have them
            yield ManifestBlock(row, {c: values[:empty] for c, values in columns.items()}, types, metadata)
            raise ManifestError(source, "empty uri", manifest_place(source, row + empty))
        block = ManifestBlock(row, columns, types, metadata)
        if block.num_rows:
            yield block
            row += block.num_rows
    if not row:
        yield ManifestBlock(0, {c: [] for c in present}, types, metadata)


def _cell(value):
    """A cell by the empty-cell rule: text without surrounding whitespace; None for a null, a NaN
    or text that is then empty."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def manifest_place(source: str, row: int) -> tuple[str, int]:
    """Where the manifest's row ``row`` (from 0, as :attr:`ManifestBlock.first_row` counts) is:
    ``("line", n)`` in a CSV file (the line it starts on, from 1: the header, empty lines and
    line breaks inside quotes count), ``("row", n)`` in a Parquet file (from 1).

    A CSV file is read again up to that row (errors are rare; a stream of blocks does not keep
    line numbers)."""
    if manifest_format(source) != "csv":
        return ("row", row + 1)
    for index, (line, _) in enumerate(_csv_records(source), start=-1):  # the header is record -1
        if index == row:
            return ("line", line)
    return ("line", row + 2)


def _csv_records(source: str) -> Iterator[tuple[int, list[str]]]:
    """The CSV file's records, header first, as (the line each starts on, its cells); empty
    lines skipped, as Arrow skips them."""
    fs, path = filesystem(source)
    with fs.open(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="") as text:
        reader = csv.reader(text)
        end = 0  # the line the last record ended on
        for cells in reader:
            start, end = end + 1, reader.line_num
            if cells:
                yield start, cells


def _ragged_place(source: str) -> tuple[str, int] | None:
    """Where the first CSV record with more or fewer cells than the header is (None if none is)."""
    records = _csv_records(source)
    header = next(records, (0, []))[1]
    return next((("line", line) for line, cells in records if len(cells) != len(header)), None)


def resolve_manifest_uri(written: str, manifest: str) -> str:
    """The location a manifest's cell ``written`` names (one of the module's rules): a URI with a
    scheme or an absolute path as written, anything else relative to the folder of ``manifest``;
    then :func:`~pro2sam.storage.canonical_uri`."""
    if "://" not in written and not os.path.isabs(written):
        base = manifest.rsplit("/", 1)[0] if is_remote(manifest) else os.path.dirname(os.path.abspath(_local_path(manifest)))
        written = join_uri(base, written)
    return canonical_uri(written)


def read_manifest_entries(source: str, excluded: str | None) -> Iterator[Entry]:
    """The labeling job's inputs from the manifest ``source``: its ``uri`` (resolved) and optional
    ``label`` (text; Parquet integers as their digits), a block at a time; a row under the
    canonical location ``excluded`` (the job's output) is refused.

    Raises:
        ManifestError: (a ``ValueError``) the module's rules, a ``label`` column that holds
            neither strings nor integers, a row under ``excluded``; with the manifest's name and,
            where one row is at fault, its line or row.
    """
    for block in read_manifest_rows(source, ("uri", "label")):
        if "label" in block.types:
            _check_label_type(block.types["label"], source)
        labels = block.columns.get("label") or [None] * block.num_rows
        for i, (written, label) in enumerate(zip(block.columns["uri"], labels)):
            uri = resolve_manifest_uri(written, source)
            if excluded and _under(uri, excluded):
                raise ManifestError(
                    source,
                    f"{uri} lies in the output folder {excluded}, whose files are never labeled: move the images "
                    "out of it or choose another output",
                    manifest_place(source, block.first_row + i),
                )
            yield Entry(uri, label=None if label is None else str(label))


def _check_label_type(t: pa.DataType, source: str) -> None:
    """A job's ``label`` column holds text (strings, dictionary-encoded or not) or integers."""
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
            or pa.types.is_integer(t) or pa.types.is_dictionary(t)):  # fmt: skip
        raise ManifestError(source, f"column 'label' must hold strings (or integers), not {t}")


def _manifest_labels(batch: pa.RecordBatch, source: str) -> list[str | None]:
    """The ``label`` column of a Parquet batch as text (a table of images' labels follow the job's
    label type rule), None without one."""
    if "label" not in batch.schema.names:
        return [None] * batch.num_rows
    column = batch.column("label")
    _check_label_type(column.type, source)
    return [None if v is None else str(v) for v in column.to_pylist()]
