"""Object storage through fsspec: where an image is and its id, reading bytes safely, writing
files whole, fetching checkpoints. Listing what a job labels is :mod:`pro2sam.inputs`.

Local paths and any fsspec URI (``s3://``, ``gs://``, ``az://``, ...) work alike. S3 follows the
usual conventions (AWS_* environment variables, profiles, ``AWS_ENDPOINT_URL`` for S3-compatible
stores); connection timeouts are kept short so an unreachable endpoint fails fast with a clear
message instead of hanging.

Where an image is (:func:`canonical_uri`) decides its id (:func:`image_id_for`): a local path is
resolved (``file://`` stripped, ``.``/``..``/``//`` collapsed, symbolic links followed), so one file
reached by two spellings is one image. Object-store keys are kept as listed: ``a//b`` and ``a/b``
are two keys there.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "StorageError",
    "ReadError",
    "InputError",
    "filesystem",
    "is_remote",
    "join_uri",
    "exists",
    "list_files",
    "canonical_uri",
    "location_contains",
    "image_id_for",
    "IMAGE_ID_LENGTH",
    "id_keys",
    "sorted_positions",
    "SeenIds",
    "read_bytes",
    "read_file",
    "read_range",
    "sha256_file",
    "staged_file",
    "write_bytes_atomic",
    "new_file_mode",
    "new_folder_mode",
    "make_folder",
    "fetch_to_local",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_READ_TIMEOUT_S",
]

# Short timeouts and bounded retries: a dead endpoint must end the job, not stall it.
_S3_CONFIG = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}}
_PROTOCOL_ALIASES = {"s3a": "s3", "s3n": "s3", "gcs": "gs", "local": "file"}

# Per-image read limits: larger files and slower reads become error rows, never a stalled job.
DEFAULT_MAX_BYTES = 256 * 2**20
DEFAULT_READ_TIMEOUT_S = 120.0
_READ_CHUNK = 4 * 2**20


class StorageError(RuntimeError):
    """Storage could not be reached or a path does not exist."""


class ReadError(StorageError):
    """One object could not be read now (missing, permission, outage): worth retrying later."""


class _ChangedWhileRead(ReadError):
    """The file changed while it was read (a writer is at work): the bytes are no one version of it."""


class InputError(ValueError):
    """One input can never be read as an image file as it is (not a regular file, too large)."""


def _protocol(uri: str) -> str:
    protocol = uri.split("://", 1)[0].lower() if "://" in uri else "file"
    return _PROTOCOL_ALIASES.get(protocol, protocol)


def is_remote(uri: str) -> bool:
    """True for URIs with a scheme other than ``file``."""
    return _protocol(uri) != "file"


def _local_path(uri: str) -> str:
    """A local location as a plain path: ``file://`` and fsspec's ``local://`` stripped (either
    followed by a path: ``file:///a`` is ``/a``, ``local://a`` is ``a`` under the working folder)."""
    scheme, sep, rest = uri.partition("://")
    return rest if sep and _PROTOCOL_ALIASES.get(scheme.lower(), scheme.lower()) == "file" else uri


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path within it (for a local ``uri`` the path
    :func:`canonical_uri` starts from, however it is spelt)."""
    protocol = _protocol(uri)
    if protocol == "file":
        uri = os.path.abspath(_local_path(uri))
    options: dict = {}
    if protocol == "s3":
        options["config_kwargs"] = _S3_CONFIG
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
        options["skip_instance_cache"] = True
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def join_uri(base: str, *names: str) -> str:
    """``base`` joined with relative ``names``, in order (keeps the scheme of remote URIs)."""
    if is_remote(base):
        for name in names:
            base = base.rstrip("/") + "/" + name.lstrip("/")
        return base
    return str(Path(_local_path(base)).joinpath(*names))


def canonical_uri(uri: str) -> str:
    """The one spelling of a location that ids and comparisons use.

    Local: an absolute path, ``file://`` (or ``local://``) stripped, symbolic links resolved and
    ``.``, ``..``, ``//`` collapsed (``os.path.realpath``). Remote: the scheme's common name (``s3a://`` -> ``s3://``)
    and the key as given, without a trailing ``/``.
    """
    if is_remote(uri):
        rest = uri.split("://", 1)[1]
        return f"{_protocol(uri)}://{rest.rstrip('/') or rest}"
    return os.path.realpath(_local_path(uri))


def location_contains(outer: str, inner: str) -> bool:
    """True if ``inner`` is ``outer`` or lies under it (both canonicalised first)."""
    a, b = canonical_uri(outer), canonical_uri(inner)
    if _protocol(a) != _protocol(b):
        return False
    return _under(b, a)


def _under(inner: str, outer: str) -> bool:
    """True if the canonical location ``inner`` is the canonical ``outer`` or lies under it."""
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


IMAGE_ID_LENGTH = 20  # hex digits of an image id


def image_id_for(uri: str) -> str:
    """A stable image id: 20 hex digits of the SHA-1 of :func:`canonical_uri`."""
    return hashlib.sha1(canonical_uri(uri).encode("utf-8", "surrogateescape")).hexdigest()[:IMAGE_ID_LENGTH]


def _describe(uri: str, error: BaseException) -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    where = f" (endpoint {endpoint})" if endpoint and uri.startswith("s3") else ""
    return f"cannot access {uri}{where}: {type(error).__name__}: {error}"


def id_keys(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Image ids as a numpy array of fixed-width byte strings, the compact form in which millions
    of them are sorted and looked up: 20 bytes each for the ids of :func:`image_id_for` (other
    ids, as in tables of other origins, are padded to the longest).

    Raises:
        ValueError: a null id.
    """
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if ids.null_count:
        raise ValueError("an image id is null")
    raw = ids.cast(pa.binary())
    lengths = pc.min_max(pc.binary_length(raw)).as_py()
    if lengths["min"] == lengths["max"] == IMAGE_ID_LENGTH:
        fixed = raw.cast(pa.binary(IMAGE_ID_LENGTH))
        data = fixed.buffers()[1]
        return np.frombuffer(data, dtype=f"S{IMAGE_ID_LENGTH}", count=len(fixed), offset=fixed.offset * IMAGE_ID_LENGTH)
    return np.array(raw.to_pylist(), dtype=f"S{max(1, lengths['max'] or 0)}")


def sorted_positions(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """For each of ``keys``, its index in the sorted array ``sorted_keys``, or -1 (binary search)."""
    if not len(sorted_keys):
        return np.full(len(keys), -1, np.int64)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return np.where(sorted_keys[at] == keys, at, -1)


class SeenIds:
    """The image ids met so far, 20 bytes each: sorted runs of :func:`id_keys`, merged as they
    grow (a log-structured set: O(log n) runs, each id re-sorted O(log n) times)."""

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(run) for run in self._runs)

    def first_seen(self, ids: pa.Array) -> np.ndarray:
        """A mask over ``ids``: True where the id was not met before (in earlier calls or earlier
        in ``ids``); those ids are remembered."""
        keys = id_keys(ids)
        new = np.zeros(len(keys), bool)
        new[np.unique(keys, return_index=True)[1]] = True
        for run in self._runs:
            new &= sorted_positions(run, keys) < 0
        self._runs.append(np.sort(keys[new]))
        while len(self._runs) > 1 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
            last = self._runs.pop()
            self._runs[-1] = np.sort(np.concatenate([self._runs[-1], last]), kind="stable")
        return new


def _local_fingerprint(st: os.stat_result) -> str:
    """What tells one version of a local file from another: its size and mtime."""
    return f"size={st.st_size} mtime_ns={st.st_mtime_ns}"


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):  # fmt: skip
        if test(mode):
            return name
    return "not a file"


def _remote_fingerprint(info: dict) -> str | None:
    """What tells one version of an object from another: its size and ETag (from a listing or
    a HEAD alike)."""
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    size = info.get("size")
    if etag is None and size is None:
        return None
    return f"size={size} etag={str(etag).strip(chr(34))}" if etag else f"size={size}"


# ---------------------------------------------------------------- reading and writing objects


def exists(uri: str) -> bool:
    """True if a file, object or folder is at ``uri``."""
    fs, path = filesystem(uri)
    return fs.exists(path)


def list_files(uri: str) -> list[str]:
    """Every file below the folder ``uri``, recursively, as sorted ``/``-separated names relative
    to it (``join_uri(uri, name)`` is the file's URI); hidden files included. Empty when nothing
    is there."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    root = path.rstrip("/")
    # slicing where it can, not relpath: ILSVRC's train folder holds 1.2M files
    names = (p[len(root) + 1 :] if p.startswith(root + "/") else posixpath.relpath(p, root) for p in fs.find(path))
    return sorted(name for name in names if name != ".")


def read_bytes(uri: str, **limits) -> bytes:
    """The bytes of one regular file or object (:func:`read_file` without the fingerprint)."""
    return read_file(uri, **limits)[0]


def read_file(
    uri: str,
    *,
    max_bytes: int | None = None,
    timeout_s: float | None = None,
    attempts: int = 3,
    backoff_s: float = 0.5,
) -> tuple[bytes, str | None]:
    """The bytes of one regular file or object, and its fingerprint (size and mtime or ETag).

    A file whose size or mtime changed while it was read (compared before and after; for an
    object, the size its HEAD gave against the bytes read) is read again after a pause, as a
    failed request is: a writer may be at work.

    Args:
        max_bytes: refuse larger files (:class:`InputError`) before reading them.
        timeout_s: give up on a read that takes longer (:class:`ReadError`).

    Raises:
        FileNotFoundError: no such file or object (not retried).
        InputError: not a regular file (a FIFO, a device), or over ``max_bytes``.
        ReadError: storage failed ``attempts`` times, the file changed during each of
            ``attempts`` reads, or the read took over ``timeout_s``.
    """

    def read() -> tuple[bytes, str | None]:
        if not is_remote(uri):
            return _read_local(canonical_uri(uri), max_bytes, timeout_s)
        fs, path = filesystem(uri)
        with fs.open(path, "rb") as f:
            size = getattr(f, "size", None)
            if max_bytes is not None and size is not None and size > max_bytes:
                raise InputError(_too_large(uri, size, max_bytes))
            data = _read_chunks(f, uri, max_bytes, timeout_s)
            if size is not None and len(data) != size:
                raise _ChangedWhileRead(f"{uri} changed while it was read: {size} bytes when opened, {len(data)} read")
            details = getattr(f, "details", None)
            return data, _remote_fingerprint(details) if isinstance(details, dict) else None

    return _retrying(read, uri, attempts, backoff_s)


def read_range(
    uri: str, start: int, end: int, *, timeout_s: float | None = None, attempts: int = 3, backoff_s: float = 0.5
) -> bytes:
    """Bytes ``start`` to ``end`` (exclusive) of a file or object, in one read (one range request
    for an object); fewer when the file is shorter.

    Raises:
        FileNotFoundError: no such file or object (not retried).
        ReadError: storage failed ``attempts`` times, or the read took over ``timeout_s``.
    """

    def read() -> bytes:
        if not is_remote(uri):
            with open(canonical_uri(uri), "rb") as f:
                f.seek(start)
                return _read_chunks(_Bounded(f, end - start), uri, None, timeout_s)
        fs, path = filesystem(uri)
        return fs.cat_file(path, start=start, end=end)

    return _retrying(read, uri, attempts, backoff_s)


def _retrying(read, uri: str, attempts: int, backoff_s: float):
    """``read()``'s result, tried up to ``attempts`` times with pauses of ``backoff_s``, twice
    as long each time: the one retry policy of :func:`read_file` and :func:`read_range`.

    A missing file and an input that can never be read (:class:`InputError`) end it at once, as
    does a denied permission or a :class:`ReadError` of ``read``'s own (a timeout), both raised
    as :class:`ReadError`; a file that changed while it was read is raised as it is after the
    last attempt; any other failure becomes a :class:`ReadError` naming ``uri`` and its endpoint.
    """
    for attempt in range(attempts):
        try:
            return read()
        except (FileNotFoundError, InputError):
            raise
        except _ChangedWhileRead:
            if attempt == attempts - 1:
                raise
            time.sleep(backoff_s * 2**attempt)
        except PermissionError as e:
            raise ReadError(f"permission denied: {uri}: {e}") from None
        except Exception as e:
            if attempt == attempts - 1 or isinstance(e, ReadError):
                raise ReadError(_describe(uri, e)) from None
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


class _Bounded:
    """A file read no further than ``left`` bytes."""

    def __init__(self, f, left: int) -> None:
        self.f, self.left = f, left

    def read(self, n: int) -> bytes:
        data = self.f.read(min(n, self.left)) if self.left > 0 else b""
        self.left -= len(data)
        return data


def _too_large(uri: str, size: int, max_bytes: int) -> str:
    return f"file is {size} bytes, over the limit of {max_bytes} bytes per image: {uri}"


def _read_local(path: str, max_bytes: int | None, timeout_s: float | None) -> tuple[bytes, str]:
    # O_NONBLOCK: opening a FIFO must not wait for a writer; regular files ignore it.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"not a regular file ({_file_kind(st.st_mode)}): {path}")
        if max_bytes is not None and st.st_size > max_bytes:
            raise InputError(_too_large(path, st.st_size, max_bytes))
        data = _read_chunks(f, path, max_bytes, timeout_s)
        after = os.fstat(fd)
        fingerprint = _local_fingerprint(st)
        if len(data) != st.st_size or _local_fingerprint(after) != fingerprint:
            raise _ChangedWhileRead(
                f"{path} changed while it was read (still being written?): {fingerprint} before, "
                f"{_local_fingerprint(after)} after, {len(data)} bytes read"
            )
        return data, fingerprint


def _read_chunks(f, uri: str, max_bytes: int | None, timeout_s: float | None) -> bytes:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    parts, total = [], 0
    while chunk := f.read(_READ_CHUNK):
        parts.append(chunk)
        total += len(chunk)
        if max_bytes is not None and total > max_bytes:  # the file grew while we read it
            raise InputError(_too_large(uri, total, max_bytes))
        if deadline is not None and time.monotonic() > deadline:
            raise ReadError(f"reading {uri} took over {timeout_s:g} s ({total} bytes read)")
    return b"".join(parts)


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a local file's bytes, read in chunks (official SAM files are 2.4 GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    """The process's umask (read from ``/proc`` where it can be: setting it to read it is not
    safe while other threads create files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode(replaced: str | None = None) -> int:
    """The mode a plain ``open(path, "w")`` gives: the mode of the file ``replaced`` if it exists
    (a rewrite keeps it), else ``0o666`` less the umask. Files staged under a temporary name
    (``mkstemp``: ``0o600``) get it before they take their place, so that a label file or report
    on a shared filesystem is as readable as any other file its user writes."""
    if replaced is not None:
        try:
            return stat.S_IMODE(os.stat(replaced).st_mode)
        except OSError:
            pass
    return 0o666 & ~_umask()


def new_folder_mode() -> int:
    """The mode a plain ``os.mkdir`` gives: ``0o777`` less the umask (``mkdtemp`` gives ``0o700``)."""
    return 0o777 & ~_umask()


def make_folder(folder: str, uri: str) -> None:
    """``os.makedirs(folder, exist_ok=True)`` for writing ``uri``; a file in the way, or a folder
    that cannot be made, is one :class:`StorageError` naming it."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        blocking = folder
        while blocking and not os.path.lexists(blocking) and os.path.dirname(blocking) != blocking:
            blocking = os.path.dirname(blocking)
        if os.path.exists(blocking) and not os.path.isdir(blocking):
            raise StorageError(f"cannot write {uri}: {blocking} is a file, not a folder") from None
        raise StorageError(f"cannot write {uri}: the folder {folder} cannot be made: {type(e).__name__}: {e}") from None


@contextmanager
def staged_file(uri: str) -> Iterator[str]:
    """A local path to write ``uri``'s new content to; when the block ends without an error the
    content replaces ``uri`` whole, and when it fails ``uri`` is left as it was.

    Local files are staged under a hidden temporary name in the same folder and renamed; an
    object is staged in a local temporary folder and uploaded in one request (a multipart upload
    too is visible only once complete).
    """
    fs, path = filesystem(uri)
    if is_remote(uri):
        with tempfile.TemporaryDirectory(prefix="pro2sam-") as folder:
            staged = os.path.join(folder, posixpath.basename(path.rstrip("/")) or "file")
            yield staged
            fs.put_file(staged, path)
        return
    folder, name = os.path.split(os.path.abspath(path))
    if os.path.isdir(path):
        raise StorageError(f"cannot write {uri}: it is a folder, not a file")
    make_folder(folder, uri)
    fd, staged = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        os.chmod(staged, new_file_mode(path))
        yield staged
        os.replace(staged, path)
    finally:
        if os.path.exists(staged):
            os.unlink(staged)


def write_bytes_atomic(uri: str, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``uri`` whole: readers see the old content or the new one, never a part
    (:func:`staged_file`). With ``exclusive``, fail with :class:`FileExistsError` if ``uri``
    exists, atomically where the store supports it (local files, S3 ``If-None-Match``).
    """
    fs, path = filesystem(uri)
    if not exclusive:
        if is_remote(uri):
            fs.pipe_file(path, data)
            return
        with staged_file(uri) as staged, open(staged, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return
    if not is_remote(uri):
        folder, name = os.path.split(os.path.abspath(path))
        make_folder(folder, uri)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        try:
            os.fchmod(fd, new_file_mode())
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.link(tmp, path)  # fails if path exists: an atomic create
        finally:
            os.unlink(tmp)
        return
    try:
        fs.pipe_file(path, data, mode="create")
    except TypeError:  # a store without exclusive writes: check, then write
        if fs.exists(path):
            raise FileExistsError(uri) from None
        fs.pipe_file(path, data)
    except OSError as e:
        if "PreconditionFailed" in str(e) or "412" in str(e) or isinstance(e, FileExistsError):
            raise FileExistsError(uri) from None
        raise


def fetch_to_local(uri: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local path for a file or folder that may live in object storage.

    Local paths are returned as they are. Remote ones are copied once into ``cache_dir``
    (default ``$PRO2SAM_CACHE`` or ``~/.cache/pro2sam``), under a folder named after the URI,
    and moved into place only when complete, so concurrent actors never read a partial file.
    """
    uri = os.fspath(uri)
    if not is_remote(uri):
        return Path(uri)
    cache = Path(cache_dir or os.environ.get("PRO2SAM_CACHE") or Path.home() / ".cache" / "pro2sam")
    target = cache / hashlib.sha1(uri.encode()).hexdigest()[:16] / posixpath.basename(uri.rstrip("/"))
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fs, path = filesystem(uri)
        staging = Path(tempfile.mkdtemp(dir=target.parent))
        local = staging / target.name
        if fs.isdir(path):
            fs.get(path.rstrip("/") + "/", str(local), recursive=True)
        else:
            fs.get(path, str(local))
    except Exception as e:
        raise StorageError(_describe(uri, e)) from None
    try:
        os.replace(local, target)
    except OSError:  # another process finished first
        if not target.exists():
            raise
    shutil.rmtree(staging, ignore_errors=True)
    return target


# The listing moved to pro2sam.inputs; these names are still found here.
_MOVED_TO_INPUTS = ("INPUT_SCHEMA", "LIST_BATCH_ROWS", "MANIFEST_SUFFIXES", "iter_inputs", "list_inputs", "manifest_format", "is_manifest")


def __getattr__(name: str):
    if name in _MOVED_TO_INPUTS:
        from . import inputs

        return getattr(inputs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
