"""The labels table on storage: which files are the job's, writing them whole, one writer at a
time, and what a rerun still has to do.

Layout of an output prefix ``OUT`` (a local folder or an object-store prefix)::

    OUT/part-<run_id>-<n>.parquet   label files (LABEL_SCHEMA), each written whole
    OUT/_pro2sam_lease.json         held while a run writes: one writer per output
    OUT/.part-*.tmp                 a local label file being written (removed by the next run)

What the job may touch: a *label file* is a Parquet file directly under ``OUT`` whose schema has
the labels table's key columns (``image_id``, ``uri``, ``status``, ``run_id``); the job reads,
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
import socket
import threading
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

LEASE_NAME = "_pro2sam_lease.json"
# A Parquet file directly under the output with these columns is a label file.
KEY_COLUMNS = ("image_id", "uri", "status", "run_id")
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


class OutputBusy(StorageError):
    """Another run holds the output's lease."""


class LeaseLost(StorageError):
    """This run's lease was taken over (``--force``) or could not be renewed in time."""


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
                names = pf.schema_arrow.names
                if not all(c in names for c in KEY_COLUMNS):
                    return None
                present = [c for c in columns if c in names] if columns else None
                table = pf.read(columns=present)
        except (pa.ArrowInvalid, OSError) as e:
            raise StorageError(
                f"{self._uri_of(path)} is not a readable Parquet file "
                f"({type(e).__name__}: {e}); move it out of the output folder, then run again"
            ) from None
        for c in columns or ():
            if c not in table.column_names:
                table = table.append_column(c, pa.nulls(len(table), LABEL_SCHEMA.field(c).type))
        return table.select(list(columns)) if columns else table

    def scan(self, columns: tuple[str, ...] = _SCAN_COLUMNS) -> pa.Table:
        """``columns`` of every label file, read concurrently, plus ``_file`` (its path,
        dictionary-encoded) and ``_row`` (the row's index in it). Other Parquet files are skipped
        with a warning. On object storage each file costs three range requests."""
        paths = self.parquet_paths()
        with ThreadPoolExecutor(max_workers=min(_SCAN_THREADS, max(1, len(paths)))) as pool:
            tables = list(pool.map(lambda p: self._read(p, columns), paths))
        out = []
        for path, table in zip(paths, tables):
            if table is None:
                log.warning("%s is not a label file (no %s columns): left as it is", path, "/".join(KEY_COLUMNS))
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
            offset = 0
            dropped = pa.array(drops.get(path, []), pa.int64())
            with self._open(path, columns) as f:
                pf = pq.ParquetFile(f)
                present = [c for c in columns if c in pf.schema_arrow.names] if columns is not None else None
                for batch in pf.iter_batches(batch_size=batch_size, columns=present):
                    n = batch.num_rows
                    if len(dropped):
                        index = pa.array(range(offset, offset + n), pa.int64())
                        batch = batch.filter(pc.invert(pc.is_in(index, value_set=dropped)))
                    offset += n
                    for c in columns or ():
                        if c not in batch.schema.names:
                            batch = batch.append_column(c, pa.nulls(batch.num_rows, LABEL_SCHEMA.field(c).type))
                    yield batch.select(list(columns)) if columns is not None else batch

    def read_table(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The labels table (``columns`` of it), one row per image, as :meth:`iter_batches`."""
        batches = list(self.iter_batches(columns))
        if batches:
            return pa.Table.from_batches(batches)
        names = list(columns) if columns is not None else LABEL_SCHEMA.names
        return pa.table({c: pa.array([], LABEL_SCHEMA.field(c).type) for c in names})

    def label_files(self) -> list[str]:
        """Paths of the label files (read concurrently, footers only)."""
        paths = self.parquet_paths()

        def is_label_file(path: str) -> bool:
            with self._open(path) as f:  # pyarrow reads the footer alone
                return all(c in pq.ParquetFile(f).schema_arrow.names for c in KEY_COLUMNS)

        with ThreadPoolExecutor(max_workers=min(_SCAN_THREADS, max(1, len(paths)))) as pool:
            return [p for p, ok in zip(paths, pool.map(is_label_file, paths)) if ok]

    def commit(self, table: pa.Table, name: str) -> str:
        """Write ``table`` as the label file ``name``, whole; return its URI."""
        if not _PART_NAME.match(name):
            raise ValueError(f"not a label file name: {name!r}")
        uri = self.file_uri(name)
        write_bytes_atomic(uri, _parquet_bytes(table))
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
                write_bytes_atomic(self._uri_of(path), _parquet_bytes(kept.cast(_schema_like(kept))))
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


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


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
        """The rows of ``inputs`` (of :data:`~pro2sam.storage.INPUT_SCHEMA`, each image once over
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
        inputs: :func:`pro2sam.storage.list_inputs` of the input.
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


# ---------------------------------------------------------------- one writer per output


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WriterLease:
    """The output's lease: held by one run at a time, renewed by a heartbeat.

    The lease is a small JSON object ``OUT/_pro2sam_lease.json`` (run id, host, pid, expiry),
    created exclusively (local link, S3 ``If-None-Match``). Another run finds it and:

    - takes it over when it has expired, or when its holder is a process of this host that is
      gone (a killed run);
    - refuses at once when its holder is a live process of this host;
    - otherwise (a holder on another host: a driver pod that died?) waits up to one ``ttl_s``
      for it to expire, and refuses if the holder renews it meanwhile.

    ``force`` takes the lease whatever holds it; the run it is taken from stops at its next
    commit (:class:`LeaseLost`).
    """

    def __init__(self, output: LabelsOutput, run_id: str, *, ttl_s: float = 60.0, force: bool = False) -> None:
        if ttl_s <= 0:
            raise ValueError("the lease's ttl_s must be > 0")
        self.output = output
        self.uri = output.file_uri(LEASE_NAME)
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.force = force
        self._expires = 0.0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _payload(self) -> bytes:
        self._expires = time.time() + self.ttl_s
        return json.dumps(
            {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(), "expires": self._expires}
        ).encode()

    def _holder(self) -> dict | None:
        try:
            with self.output.fs.open(filesystem(self.uri)[1], "rb") as f:
                holder = json.loads(f.read())
            return holder if isinstance(holder, dict) else {}
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # not ours to make sense of: treated as expired

    def _remove_if(self, holder: dict) -> None:
        if self._holder() == holder:
            try:
                self.output.fs.rm(filesystem(self.uri)[1])
            except FileNotFoundError:
                pass

    def acquire(self) -> None:
        """Take the lease (see the class) and start renewing it.

        Raises:
            OutputBusy: another run holds it.
            StorageError: the output cannot be written.
        """
        seen_expires = None
        deadline = time.monotonic() + self.ttl_s + 5
        while True:
            try:
                write_bytes_atomic(self.uri, self._payload(), exclusive=not self.force)
                break
            except FileExistsError:
                pass
            except OSError as e:
                raise StorageError(f"cannot write to the output {self.output.uri}: {type(e).__name__}: {e}") from None
            holder = self._holder()
            if holder is None:
                continue
            who = (
                f"run {holder.get('run_id')} (host {holder.get('host')}, pid {holder.get('pid')})"
                if holder else "an unreadable lease"
            )  # fmt: skip
            expires = holder.get("expires")
            stale = not isinstance(expires, (int, float)) or expires < time.time()
            if not stale and holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
                if not _pid_alive(holder["pid"]):
                    stale = True
                else:
                    raise OutputBusy(self._busy(who))
            if stale:
                log.warning("taking over the output's lease from %s, which is gone", who)
                self._remove_if(holder)
                continue
            if seen_expires is not None and expires > seen_expires:
                raise OutputBusy(self._busy(who))
            if time.monotonic() > deadline:
                raise OutputBusy(self._busy(who))
            if seen_expires is None:
                log.warning(
                    "the output %s is leased by %s until %s; waiting for it to expire (or be renewed)",
                    self.output.uri, who, time.strftime("%H:%M:%S", time.localtime(expires)),
                )  # fmt: skip
            seen_expires = expires
            time.sleep(min(2.0, max(0.1, expires - time.time() + 0.1)))
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="pro2sam-lease", daemon=True)
        self._thread.start()

    def _busy(self, who: str) -> str:
        return (
            f"the output {self.output.uri} is being written by {who}; two runs on one output would "
            "label images twice. Wait for it to finish, or pass --force if that run is dead"
        )

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                holder = self._holder()
                if not holder or holder.get("run_id") != self.run_id:
                    self._lost = f"the output's lease was taken over by {holder and holder.get('run_id')}"
                    return
                write_bytes_atomic(self.uri, self._payload())
            except Exception as e:  # an outage: keep trying until the lease expires
                log.warning("could not renew the output's lease: %s: %s", type(e).__name__, e)

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this run still holds the lease."""
        if self._lost:
            raise LeaseLost(f"{self._lost}; this run stops (its committed rows stay)")
        if time.time() > self._expires:
            raise LeaseLost("the output's lease could not be renewed in time; this run stops (its committed rows stay)")

    def release(self) -> None:
        """Stop renewing and remove the lease if this run still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        try:
            holder = self._holder()
            if holder and holder.get("run_id") == self.run_id:
                self.output.fs.rm(filesystem(self.uri)[1])
        except Exception as e:
            log.warning("could not remove the output's lease %s: %s", self.uri, e)

    def __enter__(self) -> WriterLease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------- writing label files


class LabelWriter:
    """Collects labeled rows and commits them as label files of bounded size.

    A file is committed when it reaches ``rows_per_file`` rows or ``bytes_per_file`` bytes (in
    memory, before compression), or when ``commit_seconds`` have passed since its first row, and
    by :meth:`commit` at the end of a run or when it is interrupted. Rows not yet committed are
    lost by a kill; the next run labels them.
    """

    def __init__(
        self,
        output: LabelsOutput,
        run_id: str,
        *,
        lease: WriterLease | None = None,
        rows_per_file: int = 10_000,
        bytes_per_file: int = 128 * 2**20,
        commit_seconds: float = 300.0,
    ) -> None:
        self.output, self.run_id, self.lease = output, run_id, lease
        self.rows_per_file, self.bytes_per_file, self.commit_seconds = rows_per_file, bytes_per_file, commit_seconds
        self._pending: list[pa.Table] = []
        self._pending_rows = self._pending_bytes = 0
        self._since = 0.0
        self.files: list[str] = []
        self.ok = self.error = 0

    def add(self, table: pa.Table) -> None:
        if not len(table):
            return
        if not self._pending:
            self._since = time.monotonic()
        self._pending.append(table)
        self._pending_rows += len(table)
        self._pending_bytes += table.nbytes
        if (
            self._pending_rows >= self.rows_per_file
            or self._pending_bytes >= self.bytes_per_file
            or time.monotonic() - self._since >= self.commit_seconds
        ):
            self.commit()

    def commit(self) -> None:
        """Write the pending rows as one label file (nothing if there are none)."""
        if not self._pending:
            return
        if self.lease is not None:
            self.lease.check()
        table = pa.concat_tables(self._pending).cast(LABEL_SCHEMA)
        name = f"part-{self.run_id}-{len(self.files):05d}.parquet"
        self.files.append(self.output.commit(table, name))
        statuses = table.column("status")
        self.ok += pc.sum(pc.equal(statuses, STATUS_OK)).as_py() or 0
        self.error += pc.sum(pc.equal(statuses, STATUS_ERROR)).as_py() or 0
        self._pending, self._pending_rows, self._pending_bytes = [], 0, 0
        log.info("committed %s (%d rows)", name, len(table))

    @property
    def pending_rows(self) -> int:
        return self._pending_rows
