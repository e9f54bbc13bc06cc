"""The labels table on storage: which files are the job's, writing them whole, one writer at a
time, and what a rerun still has to do.

Layout of an output prefix ``OUT`` (a local folder or an object-store prefix)::

    OUT/part-<run_id>-<n>.parquet   label files (LABEL_SCHEMA), each written whole
    OUT/_pro2sam_lease.json         held while a run writes: one writer per output (pro2sam.lease)
    OUT/.part-*.tmp                 a local label file being written (removed by the next run)

What the job may touch: a *label file* is a Parquet file directly under ``OUT`` named
``part-*.parquet`` whose footer holds the job's marker naming that file (:func:`is_label_file`):
columns alone never make one, so a user's own copy of the table in ``OUT`` is left alone. The job reads,
rewrites (to drop rows it relabels) and, with ``--overwrite``, deletes label files, its own
lease and its own temporary files, and nothing else: not other files under ``OUT``, not
sub-folders, not the folder itself.

A label file appears complete or not at all: a local one is written under a hidden temporary
name and renamed, an object is one PUT. A rewrite replaces a file the same way, so a reader sees
the old rows or the new ones, never a mixture.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import re
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec.parquet
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .labels import LABEL_SCHEMA, RETRIED_ERROR_KINDS, STATUS_ERROR, STATUS_OK
from .lease import LEASE_NAME, LeaseLost, OutputBusy, WriterLease
from .storage import (
    StorageError,
    filesystem,
    id_keys,
    is_remote,
    join_uri,
    sorted_positions,
    write_bytes_atomic,
)

__all__ = [
    "LEASE_NAME",
    "KEY_COLUMNS",
    "MARKER_KEY",
    "is_label_file",
    "check_label_columns",
    "with_label_types",
    "OutputBusy",
    "LeaseLost",
    "LabelsOutput",
    "RerunPlan",
    "RerunPlanner",
    "plan_rerun",
    "WriterLease",
    "LabelWriter",
]

log = logging.getLogger("pro2sam.output")

# The columns every label file has, and a rerun reads (with _SCAN_COLUMNS).
KEY_COLUMNS = ("image_id", "uri", "status", "run_id")
# The footer entry that marks a label file: {"label_file": <format>, "name": <its own file name>,
# "run_id": ...}. Only the job writes it; a copy of a label file under another name is not one.
MARKER_KEY = b"pro2sam"
_MARKER_FORMAT = 1
# What a rerun reads of each label file to decide what is done (RerunPlanner.columns).
_SCAN_COLUMNS = ("image_id", "status", "error_kind", "source_fingerprint")
_PART_NAME = re.compile(r"^part-[A-Za-z0-9_.-]+\.parquet$")
_TEMP_NAME = re.compile(r"^\.part-.*\.tmp$")
_SCAN_THREADS = 32
# Reading a few columns of a remote label file (fsspec.parquet), its size known from the listing
# (no HEAD): one request for its tail (the footer, and the small columns stored last: status,
# error_kind, ...), one for the first columns it needs (image_id ... source_fingerprint, less than
# a MiB apart), and one that fetches the footer again (fsspec's pyarrow engine does).
_FOOTER_SAMPLE_BYTES = 256 * 2**10
_RANGE_GAP_BYTES = 2**20


# ---------------------------------------------------------------- the output folder


class LabelsOutput:
    """The label files under one output prefix.

    Args:
        uri: the output prefix, local folder or fsspec URI.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.path = filesystem(uri)
        self.path = self.path.rstrip("/") or self.path
        self.remote = is_remote(uri)

    def file_uri(self, name: str) -> str:
        return join_uri(self.uri, name)

    def _entries(self) -> dict[str, dict]:
        """The output's direct children, by path, with details (nothing if it does not exist)."""
        try:
            entries = self.fs.ls(self.path, detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        except Exception as e:
            raise StorageError(f"cannot list the output {self.uri}: {type(e).__name__}: {e}") from None
        if len(entries) == 1 and entries[0]["name"].rstrip("/") == self.path and entries[0].get("type") == "file":
            raise StorageError(f"output {self.uri} is a file, not a folder or prefix")
        return {e["name"].rstrip("/"): e for e in entries}

    def parquet_paths(self) -> list[str]:
        """Paths of the ``*.parquet`` files directly under the output, sorted."""
        return sorted(
            p for p, e in self._entries().items()
            if e.get("type") == "file" and p.endswith(".parquet") and not posixpath.basename(p).startswith(".")
        )  # fmt: skip

    def _part_paths(self) -> list[str]:
        """The Parquet files named as label files (``part-*.parquet``); the others are named in a
        warning, never opened."""
        paths = self.parquet_paths()
        ours = [p for p in paths if _PART_NAME.match(posixpath.basename(p))]
        if len(ours) < len(paths):
            others = sorted(set(paths) - set(ours))
            shown = ", ".join(self._uri_of(p) for p in others[:5]) + (" ..." if len(others) > 5 else "")
            log.warning("not label files of this job, left as they are: %s", shown)
        return ours

    def _open(self, path: str, columns: Sequence[str] | None = None):
        """``path`` opened for reading; a remote file with ``columns`` fetches only the byte ranges
        those columns need, in three requests (see ``_FOOTER_SAMPLE_BYTES``)."""
        if not self.remote or columns is None:
            return self.fs.open(path, "rb")
        return fsspec.parquet.open_parquet_file(
            path, fs=self.fs, columns=list(columns), engine="pyarrow",
            footer_sample_size=_FOOTER_SAMPLE_BYTES, max_gap=_RANGE_GAP_BYTES,
        )  # fmt: skip

    def _read(self, path: str, columns: tuple[str, ...] | None) -> pa.Table | None:
        """The given columns of one file (missing ones as nulls), or None if it is not a label file."""
        try:
            with self._open(path, (*KEY_COLUMNS, *columns) if columns else None) as f:
                pf = pq.ParquetFile(f)
                if not is_label_file(posixpath.basename(path), pf):
                    return None
                check_label_columns(pf.schema_arrow, self._uri_of(path))
                names = pf.schema_arrow.names
                present = [c for c in columns if c in names] if columns else None
                table = with_label_types(pf.read(columns=present), self._uri_of(path))
        except (pa.ArrowInvalid, OSError) as e:
            raise self._unreadable(path, e) from None
        return with_label_columns(table, columns or None)

    def scan(self, columns: tuple[str, ...] = _SCAN_COLUMNS) -> pa.Table:
        """``columns`` of every label file, read concurrently, plus ``_file`` (its path,
        dictionary-encoded) and ``_row`` (the row's index in it). Other Parquet files are skipped
        with a warning. On object storage each file costs three range requests."""
        paths = self._part_paths()
        with ThreadPoolExecutor(max_workers=min(_SCAN_THREADS, max(1, len(paths)))) as pool:
            tables = list(pool.map(lambda p: self._read(p, columns), paths))
        out = []
        for path, table in zip(paths, tables):
            if table is None:
                log.warning("%s is not a label file of this job: left as it is", self._uri_of(path))
                continue
            n = len(table)
            where = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([path], pa.string()))
            table = table.append_column("_file", where)
            out.append(table.append_column("_row", pa.array(np.arange(n, dtype=np.int32))))
        if not out:
            empty = {c: pa.array([], LABEL_SCHEMA.field(c).type) for c in columns}
            return pa.table({**empty, "_file": pa.array([], pa.dictionary(pa.int32(), pa.string())), "_row": pa.array([], pa.int32())})
        return pa.concat_tables(out)

    def iter_batches(self, columns: Sequence[str] | None = None, *, batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
        """The labels table, one record batch (<= ``batch_size`` rows) at a time, one row per
        image: should an image have two rows (left by an interrupted rewrite or an older
        version's concurrent runs), its ok row, else its first row, is the one read."""
        done = self.scan(("image_id", "status"))
        drops = _by_file(done, np.flatnonzero(~_kept_rows(done)))
        files = list(dict.fromkeys(done.column("_file").to_pylist()))
        for path in files:
            dropped = pa.array(drops.get(path, []), pa.int64())
            yield from self._file_batches(path, columns, dropped, batch_size)

    def _file_batches(
        self, path: str, columns: Sequence[str] | None, dropped: pa.Array, batch_size: int
    ) -> Iterator[pa.RecordBatch]:
        """One label file's batches without the rows ``dropped``, in the labels table's types; a
        file that cannot be read whole is a :class:`StorageError` naming it."""
        uri, offset = self._uri_of(path), 0
        try:
            with self._open(path, columns) as f:
                pf = pq.ParquetFile(f)
                check_label_columns(pf.schema_arrow, uri)
                present = [c for c in columns if c in pf.schema_arrow.names] if columns is not None else None
                for batch in pf.iter_batches(batch_size=batch_size, columns=present):
                    n = batch.num_rows
                    if len(dropped):
                        index = pa.array(range(offset, offset + n), pa.int64())
                        batch = batch.filter(pc.invert(pc.is_in(index, value_set=dropped)))
                    offset += n
                    yield with_label_columns(with_label_types(batch, uri), columns)
        except (pa.ArrowInvalid, OSError) as e:
            raise self._unreadable(path, e) from None

    def _unreadable(self, path: str, error: Exception) -> StorageError:
        return StorageError(
            f"{self._uri_of(path)} is not a readable Parquet file ({type(error).__name__}: {_first_line(error)}); "
            "move it out of the output folder, then run again"
        )

    def read_table(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The labels table (``columns`` of it), one row per image, as :meth:`iter_batches`."""
        batches = list(self.iter_batches(columns))
        if batches:
            return pa.Table.from_batches(batches)
        names = list(columns) if columns is not None else LABEL_SCHEMA.names
        return pa.table({c: pa.array([], LABEL_SCHEMA.field(c).type) for c in names})

    def label_files(self) -> list[str]:
        """Paths of the label files (read concurrently, footers only)."""
        paths = self._part_paths()

        def ours(path: str) -> bool:
            try:
                with self._open(path) as f:  # pyarrow reads the footer alone
                    return is_label_file(posixpath.basename(path), pq.ParquetFile(f))
            except (pa.ArrowInvalid, OSError) as e:
                raise self._unreadable(path, e) from None

        with ThreadPoolExecutor(max_workers=min(_SCAN_THREADS, max(1, len(paths)))) as pool:
            return [p for p, ok in zip(paths, pool.map(ours, paths)) if ok]

    def commit(self, table: pa.Table, name: str) -> str:
        """Write ``table`` as the label file ``name``, whole; return its URI."""
        if not _PART_NAME.match(name):
            raise ValueError(f"not a label file name: {name!r}")
        uri = self.file_uri(name)
        write_bytes_atomic(uri, _parquet_bytes(table, name))
        return uri

    def drop_rows(self, drops: dict[str, list[int]]) -> int:
        """Rewrite each label file without the given rows (a file left empty is deleted).

        Returns the number of rows dropped.
        """
        dropped = 0
        for path, rows in sorted(drops.items()):
            table = self._read(path, None)
            if table is None:
                raise StorageError(f"{path} is no longer a label file; it was changed while the job ran")
            keep = pc.invert(pc.is_in(pa.array(range(len(table)), pa.int64()), value_set=pa.array(sorted(set(rows)), pa.int64())))
            kept = table.filter(keep)
            if len(kept):
                write_bytes_atomic(self._uri_of(path), _parquet_bytes(kept.cast(_schema_like(kept)), posixpath.basename(path)))
            else:
                self.fs.rm(path)
            dropped += len(table) - len(kept)
        return dropped

    def delete_label_files(self) -> int:
        """Delete every label file (``--overwrite``); return how many. Nothing else is touched."""
        files = self.label_files()
        for path in files:
            self.fs.rm(path)
        return len(files)

    def remove_temporaries(self) -> None:
        """Delete the hidden temporary files a killed run of this job left (local folders only)."""
        if self.remote or not os.path.isdir(self.path):
            return
        for name in os.listdir(self.path):
            if _TEMP_NAME.match(name):
                os.unlink(os.path.join(self.path, name))

    def _uri_of(self, path: str) -> str:
        return self.fs.unstrip_protocol(path) if self.remote else path


def _parquet_bytes(table: pa.Table, name: str) -> bytes:
    """The label file ``name`` holding ``table``, with the footer entry that marks it as one."""
    marker = json.dumps({"label_file": _MARKER_FORMAT, "name": name, "run_id": _run_id_of(name)}).encode()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), MARKER_KEY: marker})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def _run_id_of(name: str) -> str | None:
    m = re.match(r"^part-(.+)-\d+\.parquet$", name)
    return m.group(1) if m else None


def is_label_file(name: str, pf: pq.ParquetFile) -> bool:
    """Whether the Parquet file ``name`` (opened as ``pf``) is a label file this job wrote: its
    name is ``part-*.parquet`` and its footer has the job's marker naming this very file.

    Files of versions before the marker count when their name is the job's and their schema
    carries :data:`~pro2sam.labels.LABEL_SCHEMA`'s column descriptions, which the job's writer
    put there; a table copied out by a user (DuckDB, pandas) or under another name never does.
    """
    if not _PART_NAME.match(name):
        return False
    meta = pf.metadata.metadata or {}
    if MARKER_KEY in meta:
        try:
            marker = json.loads(meta[MARKER_KEY])
        except ValueError:
            return False
        return isinstance(marker, dict) and marker.get("name") == name
    schema = pf.schema_arrow
    return all(
        c in schema.names and schema.field(c).metadata == LABEL_SCHEMA.field(c).metadata
        for c in KEY_COLUMNS
    )  # fmt: skip


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_list_view(t)


def _same_kind(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Whether a column of type ``actual`` holds what :data:`LABEL_SCHEMA`'s ``expected`` does,
    in another width or encoding (``large_string``, ``int64``, ``double``, a dictionary, a
    ``large_list``: what older versions or other writers give), so that a cast keeps its values."""
    if actual == expected or pa.types.is_null(actual):
        return True
    if pa.types.is_dictionary(actual):
        return _same_kind(actual.value_type, expected)
    for kind in (_is_text, pa.types.is_integer, pa.types.is_floating):
        if kind(expected):
            return kind(actual)
    if _is_list(expected):
        return _is_list(actual) and _same_kind(actual.value_type, expected.value_type)
    if pa.types.is_struct(expected):
        return pa.types.is_struct(actual) and all(
            actual.get_field_index(f.name) >= 0 and _same_kind(actual.field(f.name).type, f.type) for f in expected
        )  # fmt: skip
    return False


def check_label_columns(schema: pa.Schema, where: str, *, required: Sequence[str] = ()) -> None:
    """Refuse a file whose columns are not the labels table's: a column named as one of
    :data:`LABEL_SCHEMA`'s but holding another kind of value, or a ``required`` column missing.

    Raises:
        ValueError: one line naming ``where`` (the file) and the column.
    """
    for name in required:
        if name not in schema.names:
            raise ValueError(f"{where} is not a labels table: it has no column {name!r} (pro2sam schema lists them)")
    for field_ in schema:
        if field_.name in LABEL_SCHEMA.names and not _same_kind(field_.type, LABEL_SCHEMA.field(field_.name).type):
            raise ValueError(
                f"{where} is not a labels table: its column {field_.name!r} holds {field_.type}, not "
                f"{LABEL_SCHEMA.field(field_.name).type} (pro2sam schema lists the columns)"
            )


def with_label_columns(data: pa.Table | pa.RecordBatch, columns: Sequence[str] | None) -> pa.Table | pa.RecordBatch:
    """``columns`` of ``data`` in this order, a column it lacks (a file of an older version) as
    nulls of :data:`LABEL_SCHEMA`'s field; None: ``data`` as it is."""
    if columns is None:
        return data
    for c in columns:
        if c not in data.schema.names:
            data = data.append_column(LABEL_SCHEMA.field(c), pa.nulls(data.num_rows, LABEL_SCHEMA.field(c).type))
    return data.select(list(columns))


def with_label_types(data: pa.Table | pa.RecordBatch, where: str) -> pa.Table | pa.RecordBatch:
    """``data`` with each of :data:`LABEL_SCHEMA`'s columns cast to its type and field (a file of an
    older version or another writer: ``large_string``, ``int64`` ...), so that tables read from
    files of several versions concatenate; other columns stay as they are.

    Raises:
        ValueError: a column of another kind (:func:`check_label_columns`) or whose values do not
            fit (a box that is not 4 numbers), naming ``where`` and the column.
    """
    check_label_columns(data.schema, where)
    if all(f.name not in LABEL_SCHEMA.names or f.type == LABEL_SCHEMA.field(f.name).type for f in data.schema):
        return data
    fields, columns = [], []
    for field_, column in zip(data.schema, data.columns):
        if field_.name in LABEL_SCHEMA.names:
            field_ = LABEL_SCHEMA.field(field_.name)
            try:
                column = column.cast(field_.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise ValueError(
                    f"{where}: column {field_.name!r} cannot be read as {field_.type}: {_first_line(e)}"
                ) from None
        fields.append(field_)
        columns.append(column)
    return type(data).from_arrays(columns, schema=pa.schema(fields, metadata=data.schema.metadata))


def _first_line(error: BaseException) -> str:
    """The first line of an error's message (Arrow's may run to several)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _schema_like(table: pa.Table) -> pa.Schema:
    """LABEL_SCHEMA when the table has its columns (files of this version), else its own."""
    return LABEL_SCHEMA if table.column_names == LABEL_SCHEMA.names else table.schema


# ---------------------------------------------------------------- what a rerun does


@dataclass
class RerunPlan:
    """What a run over ``inputs`` has to do, given what the output already holds.

    Attributes:
        todo: the inputs to label (rows of ``inputs``).
        drops: rows to remove from label files before labeling, by file path: duplicates of an
            image (a row kept per image) and rows to relabel.
        skipped: inputs already labeled and kept.
        retried: inputs whose error row is relabeled.
        changed: inputs whose file changed since they were labeled (``relabel_changed``).
        duplicates: extra rows of an image removed (left by an older version's concurrent runs).
    """

    todo: pa.Table
    drops: dict[str, list[int]] = field(default_factory=dict)
    skipped: int = 0
    retried: int = 0
    changed: int = 0
    duplicates: int = 0


class RerunPlanner:
    """What a run has to do, decided one batch of listed inputs at a time (the listing streams).

    Built from the output's key columns (:meth:`LabelsOutput.scan`): should an image have several
    rows, the one kept is its first ok row, else its first row, and the others are dropped
    (duplicates). Each listed input then is labeled unless its kept row is done: an ok row, or an
    error row not retried (see ``retry_errors``), of an unchanged file (see ``relabel_changed``);
    a row relabeled is dropped. The key columns are held once, compactly (per row: the id as
    20 bytes, status, error kind, file and row; the fingerprint only with ``relabel_changed``).

    Args:
        done: :meth:`LabelsOutput.scan` of the output; None: nothing is done (``--overwrite``).
        retry_errors: relabel every error row of a listed input; by default only errors of the
            kinds in :data:`~pro2sam.labels.RETRIED_ERROR_KINDS` (read failures) are relabeled.
        relabel_changed: relabel rows whose ``source_fingerprint`` differs from the listing's.

    Attributes:
        skipped, retried, changed, duplicates: counts so far, as in :class:`RerunPlan`.
    """

    @staticmethod
    def columns(*, relabel_changed: bool = False) -> tuple[str, ...]:
        """The columns of the output it needs (:meth:`LabelsOutput.scan`): the fingerprint only
        to relabel changed files."""
        return _SCAN_COLUMNS if relabel_changed else tuple(c for c in _SCAN_COLUMNS if c != "source_fingerprint")

    def __init__(self, done: pa.Table | None, *, retry_errors: bool = False, relabel_changed: bool = False) -> None:
        self.relabel_changed = relabel_changed
        self.skipped = self.retried = self.changed = self.duplicates = 0
        self._done = done
        self._drop: list[np.ndarray] = []
        if done is None or not len(done):
            self._keys = np.zeros(0, "S1")
            return
        kept = _kept_rows(done)
        self.duplicates = int((~kept).sum())
        self._drop.append(np.flatnonzero(~kept))
        rows = np.flatnonzero(kept)
        keys = id_keys(done.column("image_id").take(pa.array(rows)))
        order = np.argsort(keys, kind="stable")
        self._keys, self._rows = keys[order], rows[order]
        status, kinds = done.column("status"), done.column("error_kind")
        error = _column_np(pc.equal(status, STATUS_ERROR))
        retried_kind = _column_np(pc.is_in(kinds, value_set=pa.array(RETRIED_ERROR_KINDS, pa.string())))
        self._retry = error & (retry_errors | retried_kind)  # per done row

    def decide(self, inputs: pa.Table | pa.RecordBatch) -> pa.Table | pa.RecordBatch:
        """The rows of ``inputs`` (of :data:`~pro2sam.inputs.INPUT_SCHEMA`, each image once over
        all calls) still to label; counts the others and remembers the rows to drop."""
        if not len(self._keys) or not inputs.num_rows:
            return inputs
        at = sorted_positions(self._keys, id_keys(inputs.column("image_id")))
        hit = at >= 0
        row = np.where(hit, self._rows[at], -1)  # the input's kept row in the output, or -1
        retry = hit & self._retry[np.maximum(row, 0)]
        changed = np.zeros(len(at), bool)
        if self.relabel_changed:
            listed = inputs.column("source_fingerprint")
            labeled_with = self._done.column("source_fingerprint").take(pa.array(np.maximum(row, 0)))
            differs = pc.and_(pc.is_valid(listed), pc.fill_null(pc.not_equal(labeled_with, listed), True))
            changed = hit & ~retry & _column_np(differs)
        labeled = hit & ~retry & ~changed
        self.skipped += int(labeled.sum())
        self.retried += int(retry.sum())
        self.changed += int(changed.sum())
        self._drop.append(row[retry | changed])
        return inputs.filter(pa.array(~labeled))

    @property
    def nbytes(self) -> int:
        """Bytes of memory the planner holds (the output's key columns and their index)."""
        if self._done is None or not len(self._done):
            return 0
        return self._done.nbytes + self._keys.nbytes + self._rows.nbytes + self._retry.nbytes

    def drops(self) -> dict[str, list[int]]:
        """Rows to remove from label files before labeling, by file path: duplicates of an image
        and the rows of the images to relabel met so far."""
        if self._done is None or not self._drop:
            return {}
        return _by_file(self._done, np.concatenate(self._drop))


def plan_rerun(
    done: pa.Table | None,
    inputs: pa.Table,
    *,
    retry_errors: bool = False,
    relabel_changed: bool = False,
) -> RerunPlan:
    """Decide what to label and which rows to drop, for a listing held whole
    (:class:`RerunPlanner` over one batch).

    Args:
        done: :meth:`LabelsOutput.scan` of the output; None: nothing is done (``--overwrite``).
        inputs: :func:`pro2sam.inputs.list_inputs` of the input.
        retry_errors, relabel_changed: as in :class:`RerunPlanner`.
    """
    planner = RerunPlanner(done, retry_errors=retry_errors, relabel_changed=relabel_changed)
    todo = planner.decide(inputs)
    return RerunPlan(
        todo=todo,
        drops=planner.drops(),
        skipped=planner.skipped,
        retried=planner.retried,
        changed=planner.changed,
        duplicates=planner.duplicates,
    )


def _column_np(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean column as numpy, nulls as False."""
    return pc.fill_null(values, False).to_numpy(zero_copy_only=False).astype(bool, copy=False)


def _kept_rows(done: pa.Table) -> np.ndarray:
    """For each row of ``done``, whether it is the row kept for its image: its first ok row,
    else its first row (rows are ranked by position, ok rows ahead of all others)."""
    n = len(done)
    if not n:
        return np.zeros(0, bool)
    ok = _column_np(pc.equal(done.column("status"), STATUS_OK))
    rank = np.arange(n, dtype=np.int64) + np.where(ok, 0, n)
    best = pa.table({"image_id": done.column("image_id"), "rank": rank}).group_by("image_id").aggregate([("rank", "min")])
    kept = np.zeros(n, bool)
    kept[best.column("rank_min").to_numpy() % n] = True
    return kept


def _by_file(done: pa.Table, indices: np.ndarray) -> dict[str, list[int]]:
    if not len(indices):
        return {}
    where = done.select(["_file", "_row"]).take(pa.array(np.unique(indices)))
    out: dict[str, list[int]] = defaultdict(list)
    for path, row in zip(where.column("_file").to_pylist(), where.column("_row").to_pylist()):
        out[path].append(row)
    return dict(out)


# ---------------------------------------------------------------- writing label files


# A label file is committed at this many rows, or this long after its first row (LabelWriter; the
# labeling job's --rows-per-file and --commit-seconds).
ROWS_PER_FILE = 10_000
COMMIT_SECONDS = 300.0


class LabelWriter:
    """Collects labeled rows and commits them as label files of bounded size.

    A file is committed when it holds ``rows_per_file`` rows (exactly: a table that would
    overflow it is split), or ``bytes_per_file`` bytes (in memory, before compression), or when
    ``commit_seconds`` have passed since its first row, and by :meth:`commit` at the end of a run
    or when it is interrupted. Before each commit the lease is renewed (:meth:`WriterLease.check`),
    so a run whose lease was taken commits nothing more. A commit that storage refuses is tried
    again (``commit_attempts`` in all, backing off) under the same name, so a PUT that did land
    but whose answer was lost is not written twice. Rows not yet committed are lost by a kill;
    the next run labels them.
    """

    def __init__(
        self,
        output: LabelsOutput,
        run_id: str,
        *,
        lease: WriterLease | None = None,
        rows_per_file: int = ROWS_PER_FILE,
        bytes_per_file: int = 128 * 2**20,
        commit_seconds: float = COMMIT_SECONDS,
        commit_attempts: int = 5,
        backoff_s: float = 1.0,
    ) -> None:
        if rows_per_file < 1 or commit_attempts < 1:
            raise ValueError("rows_per_file and commit_attempts must be >= 1")
        self.output, self.run_id, self.lease = output, run_id, lease
        self.rows_per_file, self.bytes_per_file, self.commit_seconds = rows_per_file, bytes_per_file, commit_seconds
        self.commit_attempts, self.backoff_s = commit_attempts, backoff_s
        self._pending: list[pa.Table] = []
        self._pending_rows = self._pending_bytes = 0
        self._since = 0.0
        self.files: list[str] = []
        self.ok = self.error = 0

    def add(self, table: pa.Table) -> None:
        """Add labeled rows; commits the files they fill (may raise as :meth:`commit`)."""
        while len(table):
            if not self._pending:
                self._since = time.monotonic()
            room = self.rows_per_file - self._pending_rows
            piece, table = table.slice(0, room), table.slice(room)
            self._pending.append(piece)
            self._pending_rows += len(piece)
            self._pending_bytes += piece.nbytes
            if (
                self._pending_rows >= self.rows_per_file
                or self._pending_bytes >= self.bytes_per_file
                or time.monotonic() - self._since >= self.commit_seconds
            ):
                self.commit()

    def commit(self) -> None:
        """Write the pending rows as one label file (nothing if there are none).

        Raises:
            LeaseLost: this run no longer holds the output's lease; nothing was written.
            StorageError: storage refused the file ``commit_attempts`` times.
        """
        if not self._pending:
            return
        table = pa.concat_tables(self._pending).cast(LABEL_SCHEMA)
        name = f"part-{self.run_id}-{len(self.files):05d}.parquet"
        for attempt in range(self.commit_attempts):
            if self.lease is not None:
                self.lease.check()
            try:
                uri = self.output.commit(table, name)
                break
            except Exception as e:
                if attempt == self.commit_attempts - 1:
                    raise StorageError(
                        f"could not write {self.output.file_uri(name)} after {self.commit_attempts} tries: "
                        f"{type(e).__name__}: {e}"
                    ) from None
                log.warning("could not write %s (%s: %s); trying again", name, type(e).__name__, e)
                time.sleep(self.backoff_s * 2**attempt)
        self.files.append(uri)
        statuses = table.column("status")
        self.ok += pc.sum(pc.equal(statuses, STATUS_OK)).as_py() or 0
        self.error += pc.sum(pc.equal(statuses, STATUS_ERROR)).as_py() or 0
        self._pending, self._pending_rows, self._pending_bytes = [], 0, 0
        log.info("committed %s (%d rows)", name, len(table))

    @property
    def pending_rows(self) -> int:
        return self._pending_rows
