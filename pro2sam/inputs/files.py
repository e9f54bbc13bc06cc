"""Loose files: a local folder listed one directory entry at a time, an object-store prefix a
page of keys at a time, one file or object given as the input; and the fingerprints of files a
manifest names."""

from __future__ import annotations

import dataclasses
import errno
import os
import posixpath
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import fsspec
import fsspec.asyn

from ..storage import (
    StorageError,
    _file_kind,
    _local_fingerprint,
    _protocol,
    _remote_fingerprint,
    canonical_uri,
    filesystem,
    is_remote,
)
from .base import Entry

__all__ = ["list_local", "list_remote", "local_entry", "remote_entry", "with_fingerprints", "object_pages"]


def _printable(path: str) -> tuple[str, str | None]:
    """``path`` as a valid UTF-8 string, and an error if its name was not UTF-8 on disk."""
    try:
        path.encode("utf-8")
        return path, None
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        return shown, f"the file name is not valid UTF-8 ({shown}); rename the file to label it"


def list_local(root: str) -> Iterator[Entry]:
    # Depth first, one open directory per level: a folder of millions of files is never held.
    stack = [_scandir(root)]
    while stack:
        child = next(stack[-1], None)
        if child is None:
            stack.pop()
            continue
        if child.name.startswith("."):
            continue
        if child.is_dir(follow_symlinks=False):
            stack.append(_scandir(child.path))
            continue
        if _is_linked_folder(child):
            continue  # linked folders are not entered (no cycles, no surprises)
        yield local_entry(child.path)


def _is_linked_folder(child: os.DirEntry) -> bool:
    try:
        return child.is_symlink() and child.is_dir(follow_symlinks=True)
    except OSError:  # a link loop, or a target we may not stat: local_entry says which
        return False


def _scandir(folder: str) -> Iterator[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            yield from it
    except PermissionError as e:
        raise StorageError(f"cannot list {folder}: {e}") from None


def local_entry(path: str) -> Entry:
    """The entry of one local path met by a listing (or given as the input)."""
    shown, name_error = _printable(path)
    if name_error:
        return Entry(shown, error=name_error)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if not os.path.islink(path):  # removed since it was listed: its read says so
            return Entry(shown)
        return Entry(shown, error=f"broken symbolic link: {shown} -> {_link_target(path)}")
    except OSError as e:
        if e.errno == errno.ELOOP:
            return Entry(shown, error=f"symbolic link loop (too many levels of links): {shown} -> {_link_target(path)}")
        return Entry(shown, error=f"cannot stat {shown}: {e}")
    target, target_error = _printable(os.path.realpath(path))
    if target_error:
        return Entry(shown, error=target_error)
    if not stat.S_ISREG(st.st_mode):
        return Entry(target, error=f"not a regular file ({_file_kind(st.st_mode)}): {shown}")
    return Entry(target, fingerprint=_local_fingerprint(st))


def _link_target(path: str) -> str:
    try:
        return _printable(os.readlink(path))[0]
    except OSError:
        return "?"


def list_remote(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[Entry]:
    for page in object_pages(fs, path):
        for info in page:
            if posixpath.basename(info["name"]).startswith(".") or info.get("type", "file") != "file":
                continue
            yield Entry(canonical_uri(fs.unstrip_protocol(info["name"])), fingerprint=_remote_fingerprint(info))


def remote_entry(fs: fsspec.AbstractFileSystem, path: str) -> Entry:
    """The entry of one object given as the input."""
    return Entry(canonical_uri(fs.unstrip_protocol(path)), fingerprint=_remote_fingerprint(fs.info(path)))


def object_pages(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[list[dict]]:
    """The objects under ``path`` in key order, a page at a time, as fsspec info dicts.

    S3 (s3fs) is paged through ListObjectsV2, 1,000 keys a request, so that a prefix of millions
    of keys is never held whole; other stores are listed whole by fsspec's ``find``.
    """
    call_s3 = getattr(fs, "_call_s3", None)  # s3fs's one way to send a request, retries included
    if call_s3 is None:
        yield [info for _, info in sorted(fs.find(path, detail=True).items())]
        return
    bucket, _, key = path.strip("/").partition("/")
    request = {"Bucket": bucket, "Prefix": key + "/" if key else ""}
    while True:
        page = fsspec.asyn.sync(fs.loop, call_s3, "list_objects_v2", **request)
        yield [
            {"name": f"{bucket}/{o['Key']}", "size": o.get("Size"), "ETag": o.get("ETag"),
             "type": "directory" if o["Key"].endswith("/") else "file"}
            for o in page.get("Contents", [])
        ]  # fmt: skip
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


# HEAD requests in flight at once when a manifest's rows are fingerprinted.
_FINGERPRINT_THREADS = 32


def with_fingerprints(chunk: list[Entry], filesystems: dict[str, fsspec.AbstractFileSystem]) -> list[Entry]:
    """``chunk`` with the fingerprint looked up for each readable-looking entry that has none (a
    manifest's rows): the one a folder listing would give. ``filesystems`` caches one filesystem
    per protocol over the listing."""
    missing = [i for i, e in enumerate(chunk) if e.fingerprint is None and e.error is None]
    uris = [chunk[i].uri for i in missing]
    for uri in uris:
        if is_remote(uri) and _protocol(uri) not in filesystems:
            filesystems[_protocol(uri)] = filesystem(uri)[0]

    def lookup(uri: str) -> str | None:
        try:
            if not is_remote(uri):
                st = os.stat(uri)
                return _local_fingerprint(st) if stat.S_ISREG(st.st_mode) else None
            info = filesystems[_protocol(uri)].info(uri)
            return _remote_fingerprint(info) if info.get("type", "file") == "file" else None
        except OSError:  # missing, permission, a link loop: the read makes it an error row
            return None

    if any(_protocol(uri) in filesystems for uri in uris):
        with ThreadPoolExecutor(max_workers=_FINGERPRINT_THREADS) as pool:
            found = list(pool.map(lookup, uris))
    else:
        found = [lookup(uri) for uri in uris]
    chunk = list(chunk)
    for i, fingerprint in zip(missing, found):
        chunk[i] = dataclasses.replace(chunk[i], fingerprint=fingerprint)
    return chunk


