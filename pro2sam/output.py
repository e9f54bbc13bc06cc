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

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .labels import LABEL_SCHEMA, RETRIED_ERROR_KINDS, STATUS_ERROR, STATUS_OK
from .storage import StorageError, filesystem, is_remote, join_uri, write_bytes_atomic

__all__ = [
    "LEASE_NAME",
    "KEY_COLUMNS",
    "OutputBusy",
    "LeaseLost",
    "LabelsOutput",
    "RerunPlan",
    "plan_rerun",
    "WriterLease",
    "LabelWriter",
]

log = logging.getLogger("pro2sam.output")

LEASE_NAME = "_pro2sam_lease.json"
# A Parquet file directly under the output with these columns is a label file.
KEY_COLUMNS = ("image_id", "uri", "status", "run_id")
# What a rerun reads of each label file to decide what is done.
_SCAN_COLUMNS = ("image_id", "status", "error_kind", "source_fingerprint", "run_id")
_PART_NAME = re.compile(r"^part-[A-Za-z0-9_.-]+\.parquet$")
_TEMP_NAME = re.compile(r"^\.part-.*\.tmp$")
_SCAN_THREADS = 32


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
            if not self.fs.exists(self.path):
                return {}
            if self.fs.isfile(self.path):
                raise StorageError(f"output {self.uri} is a file, not a folder or prefix")
            return {e["name"].rstrip("/"): e for e in self.fs.ls(self.path, detail=True)}
        except StorageError:
            raise
        except Exception as e:
            raise StorageError(f"cannot list the output {self.uri}: {type(e).__name__}: {e}") from None

    def parquet_paths(self) -> list[str]:
        """Paths of the ``*.parquet`` files directly under the output, sorted."""
        return sorted(
            p for p, e in self._entries().items()
            if e.get("type") == "file" and p.endswith(".parquet") and not posixpath.basename(p).startswith(".")
        )  # fmt: skip

    def _open(self, path: str):
        return self.fs.open(path, "rb")

    def _read(self, path: str, columns: tuple[str, ...] | None) -> pa.Table | None:
        """The given columns of one file (missing ones as nulls), or None if it is not a label file."""
        try:
            with self._open(path) as f:
                pf = pq.ParquetFile(f)
                names = pf.schema_arrow.names
                if not all(c in names for c in KEY_COLUMNS):
                    return None
                present = [c for c in columns if c in names] if columns else None
                table = pf.read(columns=present)
        except (pa.ArrowInvalid, OSError) as e:
            raise StorageError(
                f"{self.fs.unstrip_protocol(path) if self.remote else path} is not a readable Parquet file "
                f"({type(e).__name__}: {e}); move it out of the output folder, then run again"
            ) from None
        for c in columns or ():
            if c not in table.column_names:
                table = table.append_column(c, pa.nulls(len(table), LABEL_SCHEMA.field(c).type))
        return table.select(list(columns)) if columns else table

    def scan(self, columns: tuple[str, ...] = _SCAN_COLUMNS) -> pa.Table:
        """``columns`` of every label file, read concurrently, plus ``_file`` (its path) and
        ``_row`` (the row's index in it). Other Parquet files are skipped with a warning."""
        paths = self.parquet_paths()
        with ThreadPoolExecutor(max_workers=min(_SCAN_THREADS, max(1, len(paths)))) as pool:
            tables = list(pool.map(lambda p: self._read(p, columns), paths))
        out = []
        for path, table in zip(paths, tables):
            if table is None:
                log.warning("%s is not a label file (no %s columns): left as it is", path, "/".join(KEY_COLUMNS))
                continue
            n = len(table)
            table = table.append_column("_file", pa.array([path] * n, pa.string()))
            out.append(table.append_column("_row", pa.array(range(n), pa.int64())))
        if not out:
            empty = {c: pa.array([], LABEL_SCHEMA.field(c).type) for c in columns}
            return pa.table({**empty, "_file": pa.array([], pa.string()), "_row": pa.array([], pa.int64())})
        return pa.concat_tables(out)

    def iter_batches(self, columns: Sequence[str] | None = None, *, batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
        """The labels table, one record batch (<= ``batch_size`` rows) at a time, one row per
        image: should an image have two rows (left by an interrupted rewrite or an older
        version's concurrent runs), its ok row, else its first row, is the one read."""
        done = self.scan(("image_id", "status"))
        _, drop = _one_row_per_image(done.column("image_id").to_pylist(), done.column("status").to_pylist())
        drops = _by_file(done, drop)
        files = list(dict.fromkeys(done.column("_file").to_pylist()))
        for path in files:
            offset = 0
            dropped = pa.array(drops.get(path, []), pa.int64())
            with self._open(path) as f:
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
            with self._open(path) as f:
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


def plan_rerun(
    done: pa.Table | None,
    inputs: pa.Table,
    *,
    retry_errors: bool = False,
    relabel_changed: bool = False,
) -> RerunPlan:
    """Decide what to label and which rows to drop.

    Args:
        done: :meth:`LabelsOutput.scan` of the output; None: nothing is done (``--overwrite``).
        inputs: :func:`pro2sam.storage.list_inputs` of the input.
        retry_errors: relabel every error row of a listed input; by default only errors of the
            kinds in :data:`~pro2sam.labels.RETRIED_ERROR_KINDS` (read failures) are relabeled.
        relabel_changed: relabel rows whose ``source_fingerprint`` differs from the listing's.
    """
    if done is None:
        return RerunPlan(todo=inputs)
    ids = done.column("image_id").to_pylist()
    status = done.column("status").to_pylist()
    kinds = done.column("error_kind").to_pylist()
    prints = done.column("source_fingerprint").to_pylist()
    kept, drop = _one_row_per_image(ids, status)
    duplicates = len(drop)

    listed = dict(zip(inputs.column("image_id").to_pylist(), inputs.column("source_fingerprint").to_pylist()))
    retried = changed = 0
    for image_id, i in kept.items():
        if image_id not in listed:
            continue
        if status[i] == STATUS_ERROR and (retry_errors or kinds[i] in RETRIED_ERROR_KINDS):
            drop.add(i)
            retried += 1
        elif relabel_changed and listed[image_id] is not None and prints[i] != listed[image_id]:
            drop.add(i)
            changed += 1

    labeled = pa.array([image_id for image_id, i in kept.items() if i not in drop], pa.string())
    todo = inputs.filter(pc.invert(pc.is_in(inputs.column("image_id"), value_set=labeled)))
    return RerunPlan(
        todo=todo,
        drops=_by_file(done, drop),
        skipped=len(inputs) - len(todo),
        retried=retried,
        changed=changed,
        duplicates=duplicates,
    )


def _one_row_per_image(ids: list[str], status: list[str]) -> tuple[dict[str, int], set[int]]:
    """The row kept for each image (the first ok row, else the first row) and the others."""
    kept: dict[str, int] = {}
    drop: set[int] = set()
    for i, image_id in enumerate(ids):
        j = kept.get(image_id)
        if j is None:
            kept[image_id] = i
        elif status[i] == STATUS_OK and status[j] != STATUS_OK:
            kept[image_id] = i
            drop.add(j)
        else:
            drop.add(i)
    return kept, drop


def _by_file(done: pa.Table, indices: set[int]) -> dict[str, list[int]]:
    files, rows = done.column("_file").to_pylist(), done.column("_row").to_pylist()
    out: dict[str, list[int]] = defaultdict(list)
    for i in sorted(indices):
        out[files[i]].append(rows[i])
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
