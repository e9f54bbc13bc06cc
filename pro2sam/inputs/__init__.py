"""The images a job labels: sources of inputs behind one interface, record batches of
:data:`INPUT_SCHEMA` (one row per image: its id, location, label, fingerprint, and why it cannot
be read where the listing already knows).

What an input is (:func:`iter_inputs`) is decided by what is there, not by its name alone: a
folder (prefix) is listed (:mod:`.files`), a file whose name ends in ``.csv`` or ``.parquet`` (in
any case, :func:`manifest_format`) is a manifest (:mod:`.manifests`), any other file is one image.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import fsspec
import pyarrow as pa

from ..storage import SeenIds, StorageError, _describe, _under, canonical_uri, filesystem, image_id_for, is_remote
from .base import INPUT_SCHEMA, LIST_BATCH_ROWS, Entry
from .files import list_local, list_remote, local_entry, remote_entry, with_fingerprints
from .manifests import MANIFEST_SUFFIXES, is_manifest, manifest_format, read_manifest_entries

__all__ = [
    "INPUT_SCHEMA",
    "LIST_BATCH_ROWS",
    "MANIFEST_SUFFIXES",
    "iter_inputs",
    "list_inputs",
    "manifest_format",
    "is_manifest",
]


def iter_inputs(
    source: str,
    *,
    exclude_prefix: str | None = None,
    batch_rows: int = LIST_BATCH_ROWS,
    fingerprints: bool = False,
) -> Iterator[pa.RecordBatch]:
    """The images a job labels, as record batches of :data:`INPUT_SCHEMA` (one row per image, at
    most ``batch_rows`` rows each), produced as the listing goes.

    Args:
        source: a prefix (folder) listed recursively, hidden files skipped; or a manifest, a
            ``.csv`` or ``.parquet`` file (the suffix in any case) with a ``uri`` column and an
            optional ``label`` column, both read as strings; relative manifest URIs are taken
            relative to the manifest. Any other file is one image.
        exclude_prefix: a prefix whose files are never inputs (the job's own output folder): a
            folder listing skips them, a manifest that names one is refused.
        batch_rows: rows per batch.
        fingerprints: give every row a ``source_fingerprint``, as a folder listing does: for the
            rows of a manifest that is a ``stat`` per local file and a HEAD request per object
            (32 at a time), so ask only when they are compared (``--relabel-changed``). A file
            that cannot be looked up (missing, permission) is listed without one; its read says why.

    The source is checked when this is called; the batches come as it is read: an S3 prefix a
    page of 1,000 keys at a time (other object stores are listed whole by fsspec's ``find``), a
    manifest a block at a time, a local folder one directory entry at a time (depth first, in
    directory order). Besides the batch being built, the listing holds 20 bytes per image met so
    far (its id, to list an image reached twice once: a link, a repeated manifest line).

    Local folders: symbolic links to files are followed (the id is the target's), linked folders
    are not entered; a FIFO, device, broken link or link loop, or a name that is not UTF-8, is
    listed with an ``input_error`` so that it becomes an error row instead of stalling or aborting
    the job.

    Raises:
        StorageError: the source cannot be reached or does not exist (also while iterating).
        ValueError: a malformed manifest (no ``uri`` column, a null or non-string URI, a row that
            does not parse, a URI under ``exclude_prefix``; each naming the manifest, and the line
            where it is known), possibly while iterating.
    """
    excluded = canonical_uri(exclude_prefix) if exclude_prefix else None
    try:
        fs, path = filesystem(source)
        if manifest_format(path) and fs.isfile(path):
            entries = read_manifest_entries(fs, path, source, excluded)
        elif fs.isdir(path):
            entries = list_remote(fs, path) if is_remote(source) else list_local(canonical_uri(source))
        elif is_remote(source) and fs.isfile(path):
            entries = iter([remote_entry(fs, path)])
        elif not is_remote(source) and os.path.exists(path):  # a file, FIFO or device: one row
            entries = iter([local_entry(canonical_uri(source))])
        else:
            raise StorageError(f"input {source} does not exist (neither a folder, a manifest .csv/.parquet nor a file)")
    except (StorageError, ValueError):
        raise
    except Exception as e:  # botocore/aiohttp/OS errors: say where, not how deep
        raise StorageError(_describe(source, e)) from None
    return _input_batches(entries, excluded, batch_rows, source, fingerprints)


def list_inputs(source: str, *, exclude_prefix: str | None = None, fingerprints: bool = False) -> pa.Table:
    """:func:`iter_inputs` as one table (for inputs that fit in memory)."""
    batches = iter_inputs(source, exclude_prefix=exclude_prefix, fingerprints=fingerprints)
    return pa.Table.from_batches(list(batches), schema=INPUT_SCHEMA)


def _input_batches(
    entries: Iterator[Entry], excluded: str | None, batch_rows: int, source: str, fingerprints: bool
) -> Iterator[pa.RecordBatch]:
    seen = SeenIds()
    filesystems: dict[str, fsspec.AbstractFileSystem] = {}
    try:
        while chunk := list(itertools.islice(entries, batch_rows)):
            if excluded:
                chunk = [e for e in chunk if not _under(e.uri, excluded)]
            if fingerprints:
                chunk = with_fingerprints(chunk, filesystems)
            ids = pa.array([image_id_for(e.uri) for e in chunk], pa.string())
            columns = [
                ids,
                pa.array([e.uri for e in chunk], pa.string()),
                pa.array([e.label for e in chunk], pa.string()),
                pa.array([e.fingerprint for e in chunk], pa.string()),
                pa.array([e.error for e in chunk], pa.string()),
            ]
            batch = pa.record_batch(columns, schema=INPUT_SCHEMA).filter(pa.array(seen.first_seen(ids)))
            if batch.num_rows:
                yield batch
    except (StorageError, ValueError):
        raise
    except Exception as e:
        raise StorageError(_describe(source, e)) from None

