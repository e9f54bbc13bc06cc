"""The images a job labels: sources of inputs behind one interface, record batches of
:data:`INPUT_SCHEMA` (one row per image: its id, location, label, fingerprint, and why it cannot
be read where the listing already knows).

Sources: loose files and prefixes (:mod:`.files`), manifests of URIs (:mod:`.manifests`),
WebDataset tar shards (:mod:`.webdataset`) and Parquet tables of image bytes
(:mod:`.parquet_images`). What an input is (:func:`iter_inputs`) is decided by what is there, not
by its name alone:

- a name with braces (``s3://b/shards/{000000..000009}.tar``) is a list of shards;
- a folder (prefix) is listed, and each file found is what it is by the rules below (a ``.tar``
  file a shard, a ``.parquet`` table of images its rows, any other file one image);
- a file whose name ends in ``.tar`` (in any case) is a shard: each of its samples is an image;
- a ``.parquet`` file whose ``image`` column holds bytes or ``{bytes, path}`` structs is a table
  of images, each row an image; any other ``.csv`` or ``.parquet`` file (in any case,
  :func:`manifest_format`) is a manifest;
- any other file is one image.
"""

from __future__ import annotations

import collections
import itertools
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import fsspec
import pyarrow as pa

from ..storage import SeenIds, StorageError, _describe, _under, canonical_uri, filesystem, image_id_for, is_remote
from .base import INPUT_SCHEMA, LIST_BATCH_ROWS, Entry
from .files import list_local, list_remote, local_entry, remote_entry, with_fingerprints
from .manifests import MANIFEST_SUFFIXES, manifest_format, read_manifest_entries
from .manifests import is_manifest as _named_manifest
from .parquet_images import image_rows, is_image_table
from .webdataset import DEFAULT_SHARD_LABEL, expand_braces, is_shard_name, shard_entries

__all__ = [
    "INPUT_SCHEMA",
    "LIST_BATCH_ROWS",
    "MANIFEST_SUFFIXES",
    "iter_inputs",
    "list_inputs",
    "DEFAULT_SHARD_LABEL",
    "manifest_format",
    "is_manifest",
    "is_image_table",
]


def iter_inputs(
    source: str,
    *,
    exclude_prefix: str | None = None,
    batch_rows: int = LIST_BATCH_ROWS,
    fingerprints: bool = False,
    shard_label: str | None = DEFAULT_SHARD_LABEL,
) -> Iterator[pa.RecordBatch]:
    """The images a job labels, as record batches of :data:`INPUT_SCHEMA` (one row per image, at
    most ``batch_rows`` rows each), produced as the listing goes.

    Args:
        source: a prefix (folder) listed recursively, hidden files skipped; or a manifest, a
            ``.csv`` or ``.parquet`` file (the suffix in any case) with a ``uri`` column and an
            optional ``label`` column, both read as text, read by the rules of
            :mod:`.manifests` (relative URIs are relative to the manifest); or a WebDataset shard ``.tar``, a brace pattern of shards,
            a Parquet table of images (the module's rules). Any other file is one image.
        exclude_prefix: a prefix whose files are never inputs (the job's own output folder): a
            folder listing skips them, a manifest that names one is refused.
        batch_rows: rows per batch.
        fingerprints: give every row a ``source_fingerprint``, as a folder listing does: for the
            rows of a manifest that is a ``stat`` per local file and a HEAD request per object
            (32 at a time), so ask only when they are compared (``--relabel-changed``). A file
            that cannot be looked up (missing, permission) is listed without one; its read says why.
            A shard's samples and a table's rows carry the shard's or the table's.
        shard_label: the member of a shard's sample its label is read from
            (:func:`.webdataset.shard_entries`).

    The source is checked when this is called; the batches come as it is read: an S3 prefix a
    page of 1,000 keys at a time (other object stores are listed whole by fsspec's ``find``), a
    manifest a block at a time, a local folder one directory entry at a time (depth first, in
    directory order). Besides the batch being built, the listing holds 20 bytes per image met so
    far (its id, to list an image reached twice once: a link, a repeated manifest line).

    A shard is read as a stream of tar headers (its bytes pass through, none is held;
    :data:`SHARDS_AHEAD` shards at once); a table of images by its label and path columns, a row
    group at a time.

    Local folders: symbolic links to files are followed (the id is the target's), linked folders
    are not entered; a FIFO, device, broken link or link loop, or a name that is not UTF-8, is
    listed with an ``input_error`` so that it becomes an error row instead of stalling or aborting
    the job.

    Raises:
        StorageError: the source cannot be reached or does not exist (also while iterating).
        ValueError: a malformed manifest (:class:`.manifests.ManifestError`: no ``uri`` column,
            an empty or non-string URI, a row that does not parse, a URI under ``exclude_prefix``;
            each naming the manifest, and the line or row where one is at fault), possibly while
            iterating.
    """
    excluded = canonical_uri(exclude_prefix) if exclude_prefix else None
    try:
        fs, path = filesystem(source)
        if "{" in source and "}" in source and not fs.exists(path):
            entries = _expand(_brace_entries(source, expand_braces(source)), excluded, shard_label)
        elif manifest_format(path) and fs.isfile(path) and not (manifest_format(path) == "parquet" and is_image_table(source)):
            entries = read_manifest_entries(source, excluded)
        elif fs.isdir(path):
            listed = list_remote(fs, path) if is_remote(source) else list_local(canonical_uri(source))
            entries = _expand(listed, excluded, shard_label)
        elif is_remote(source) and fs.isfile(path):
            entries = _expand(iter([remote_entry(fs, path)]), excluded, shard_label)
        elif not is_remote(source) and os.path.exists(path):  # a file, FIFO or device: one row
            entries = _expand(iter([local_entry(canonical_uri(source))]), excluded, shard_label)
        else:
            raise StorageError(f"input {source} does not exist (neither a folder, a manifest .csv/.parquet nor a file)")
    except (StorageError, ValueError):
        raise
    except Exception as e:  # botocore/aiohttp/OS errors: say where, not how deep
        raise StorageError(_describe(source, e)) from None
    return _input_batches(entries, excluded, batch_rows, source, fingerprints)


def _brace_entries(pattern: str, names: list[str]) -> Iterator[Entry]:
    """The shards ``names`` of a brace pattern, as a listing meets them; the first must exist (a
    pattern that names nothing is a typo: checked now), a later missing one is one error input."""
    fs, first = filesystem(names[0])
    if not fs.isfile(first):
        raise StorageError(f"input {pattern}: its first shard {names[0]} does not exist")
    return _shard_entries_named(names)


def _shard_entries_named(names: list[str]) -> Iterator[Entry]:
    for name in names:
        if not is_remote(name):
            yield local_entry(canonical_uri(name))
            continue
        fs, path = filesystem(name)
        try:
            yield remote_entry(fs, path)
        except FileNotFoundError:
            yield Entry(canonical_uri(name), error=f"not found: {name}")


# Shards read at once while a listing goes: their headers stream through the driver in threads,
# the samples come out in listing order (a shard's samples are held until its turn: small, ~100
# bytes each).
SHARDS_AHEAD = 8


def _expand(entries: Iterator[Entry], excluded: str | None, shard_label: str | None) -> Iterator[Entry]:
    """A listing's files, each what it is: a shard's samples, a table of images' rows, else itself;
    up to :data:`SHARDS_AHEAD` shards are read at once, in order."""
    pending: collections.deque[Future | list[Entry]] = collections.deque()

    def ready() -> Iterator[Entry]:
        while pending and (len(pending) > SHARDS_AHEAD or not isinstance(pending[0], Future) or pending[0].done()):
            first = pending.popleft()
            yield from first.result() if isinstance(first, Future) else first

    with ThreadPoolExecutor(max_workers=SHARDS_AHEAD) as pool:
        try:
            for entry in entries:
                if entry.error is not None or (excluded and _under(entry.uri, excluded)):
                    pending.append([entry])
                elif is_shard_name(entry.uri):
                    pending.append(pool.submit(lambda e=entry: list(shard_entries(e, label=shard_label))))
                elif manifest_format(entry.uri) == "parquet" and is_image_table(entry.uri):
                    while pending:  # a table's rows stream in order, after what came before
                        first = pending.popleft()
                        yield from first.result() if isinstance(first, Future) else first
                    yield from image_rows(entry)
                else:
                    pending.append([entry])
                yield from ready()
            while pending:
                first = pending.popleft()
                yield from first.result() if isinstance(first, Future) else first
        finally:
            for waiting in pending:
                if isinstance(waiting, Future):
                    waiting.cancel()


def list_inputs(
    source: str, *, exclude_prefix: str | None = None, fingerprints: bool = False, shard_label: str | None = DEFAULT_SHARD_LABEL
) -> pa.Table:
    """:func:`iter_inputs` as one table (for inputs that fit in memory)."""
    batches = iter_inputs(source, exclude_prefix=exclude_prefix, fingerprints=fingerprints, shard_label=shard_label)
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
                pa.array([e.container_kind for e in chunk], pa.string()),
                pa.array([e.container for e in chunk], pa.string()),
                pa.array([e.member_offset for e in chunk], pa.int64()),
                pa.array([e.member_size for e in chunk], pa.int64()),
            ]
            batch = pa.record_batch(columns, schema=INPUT_SCHEMA).filter(pa.array(seen.first_seen(ids)))
            if batch.num_rows:
                yield batch
    except (StorageError, ValueError):
        raise
    except Exception as e:
        raise StorageError(_describe(source, e)) from None



def is_manifest(uri: str) -> bool:
    """True if ``uri`` is a manifest: a file (not a folder: a folder named ``x.csv`` is a folder)
    whose name :func:`manifest_format` recognises and that is not a table of images.

    Raises:
        StorageError: the storage cannot be reached.
    """
    return _named_manifest(uri) and not is_image_table(uri)
