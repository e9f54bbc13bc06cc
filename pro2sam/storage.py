"""Object storage through fsspec: where an image is, listing inputs, reading bytes safely,
writing files whole, fetching checkpoints.

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
import io
import os
import posixpath
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

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
    "INPUT_SCHEMA",
    "list_inputs",
    "read_bytes",
    "read_file",
    "sha256_file",
    "staged_file",
    "write_bytes_atomic",
    "fetch_to_local",
    "MANIFEST_SUFFIXES",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_READ_TIMEOUT_S",
]

# Short timeouts and bounded retries: a dead endpoint must end the job, not stall it.
_S3_CONFIG = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}}
MANIFEST_SUFFIXES = (".csv", ".parquet")
_PROTOCOL_ALIASES = {"s3a": "s3", "s3n": "s3", "gcs": "gs", "local": "file"}

# Per-image read limits: larger files and slower reads become error rows, never a stalled job.
DEFAULT_MAX_BYTES = 256 * 2**20
DEFAULT_READ_TIMEOUT_S = 120.0
_READ_CHUNK = 4 * 2**20


class StorageError(RuntimeError):
    """Storage could not be reached or a path does not exist."""


class ReadError(StorageError):
    """One object could not be read now (missing, permission, outage): worth retrying later."""


class InputError(ValueError):
    """One input can never be read as an image file as it is (not a regular file, too large)."""


def _protocol(uri: str) -> str:
    protocol = uri.split("://", 1)[0].lower() if "://" in uri else "file"
    return _PROTOCOL_ALIASES.get(protocol, protocol)


def is_remote(uri: str) -> bool:
    """True for URIs with a scheme other than ``file``."""
    return _protocol(uri) != "file"


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path within it."""
    protocol = _protocol(uri)
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
    return str(Path(base).joinpath(*names))


def canonical_uri(uri: str) -> str:
    """The one spelling of a location that ids and comparisons use.

    Local: an absolute path, ``file://`` stripped, symbolic links resolved and ``.``, ``..``, ``//``
    collapsed (``os.path.realpath``). Remote: the scheme's common name (``s3a://`` -> ``s3://``)
    and the key as given, without a trailing ``/``.
    """
    if is_remote(uri):
        rest = uri.split("://", 1)[1]
        return f"{_protocol(uri)}://{rest.rstrip('/') or rest}"
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return os.path.realpath(uri)


def location_contains(outer: str, inner: str) -> bool:
    """True if ``inner`` is ``outer`` or lies under it (both canonicalised first)."""
    a, b = canonical_uri(outer), canonical_uri(inner)
    if _protocol(a) != _protocol(b):
        return False
    return b == a or b.startswith(a.rstrip("/") + "/")


def image_id_for(uri: str) -> str:
    """A stable image id: 20 hex digits of the SHA-1 of :func:`canonical_uri`."""
    return hashlib.sha1(canonical_uri(uri).encode("utf-8", "surrogateescape")).hexdigest()[:20]


def _describe(uri: str, error: BaseException) -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    where = f" (endpoint {endpoint})" if endpoint and uri.startswith("s3") else ""
    return f"cannot access {uri}{where}: {type(error).__name__}: {error}"


# ---------------------------------------------------------------- listing inputs

INPUT_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("source_fingerprint", pa.string()),  # size and mtime or ETag, when listing knows it
        pa.field("input_error", pa.string()),  # why this input cannot be read at all (it becomes an error row)
    ]
)


@dataclass(frozen=True)
class _Entry:
    uri: str
    fingerprint: str | None = None
    error: str | None = None
    label: str | None = None


def list_inputs(source: str, *, exclude_prefix: str | None = None) -> pa.Table:
    """The images a job labels, as a table of :data:`INPUT_SCHEMA`, one row per image.

    Args:
        source: a prefix (folder) listed recursively, hidden files skipped; or a manifest, a
            ``.csv`` or ``.parquet`` file with a ``uri`` column and an optional ``label`` column,
            both read as strings. Relative manifest URIs are taken relative to the manifest.
        exclude_prefix: a prefix whose files are never inputs (the job's own output folder).

    Local folders: symbolic links to files are followed (the id is the target's), linked folders
    are not entered; a FIFO, device or broken link, or a name that is not UTF-8, is listed with an
    ``input_error`` so that it becomes an error row instead of stalling or aborting the job.

    Raises:
        StorageError: the source cannot be reached or does not exist.
        ValueError: a malformed manifest (no ``uri`` column, a null or non-string URI, with its
            file and line).
    """
    try:
        fs, path = filesystem(source)
        if fs.isfile(path) and path.endswith(MANIFEST_SUFFIXES):
            entries = _read_manifest(fs, path, source)
        elif not fs.isdir(path):
            raise StorageError(f"input {source} does not exist (neither a folder nor a manifest .csv/.parquet)")
        elif is_remote(source):
            entries = _list_remote(fs, path)
        else:
            entries = _list_local(canonical_uri(source))
        excluded = canonical_uri(exclude_prefix) if exclude_prefix else None
        table = _entries_table(entries, excluded)
    except (StorageError, ValueError):
        raise
    except Exception as e:  # botocore/aiohttp/OS errors: say where, not how deep
        raise StorageError(_describe(source, e)) from None
    return table


def _entries_table(entries: Iterator[_Entry], excluded: str | None) -> pa.Table:
    ids, uris, labels, prints, errors = [], [], [], [], []
    seen: set[str] = set()
    for e in entries:
        if excluded and (e.uri == excluded or e.uri.startswith(excluded.rstrip("/") + "/")):
            continue
        image_id = image_id_for(e.uri)
        if image_id in seen:  # the same image listed twice (a link, a repeated manifest line)
            continue
        seen.add(image_id)
        ids.append(image_id)
        uris.append(e.uri)
        labels.append(e.label)
        prints.append(e.fingerprint)
        errors.append(e.error)
    return pa.table([ids, uris, labels, prints, errors], schema=INPUT_SCHEMA)


def _printable(path: str) -> tuple[str, str | None]:
    """``path`` as a valid UTF-8 string, and an error if its name was not UTF-8 on disk."""
    try:
        path.encode("utf-8")
        return path, None
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        return shown, f"the file name is not valid UTF-8 ({shown}); rename the file to label it"


def _list_local(root: str) -> Iterator[_Entry]:
    stack = [root]
    found: list[_Entry] = []
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                children = sorted(it, key=lambda d: d.name)
        except PermissionError as e:
            raise StorageError(f"cannot list {folder}: {e}") from None
        for child in children:
            if child.name.startswith("."):
                continue
            if child.is_dir(follow_symlinks=False):
                stack.append(child.path)
                continue
            if child.is_symlink() and child.is_dir(follow_symlinks=True):
                continue  # linked folders are not entered (no cycles, no surprises)
            found.append(_local_entry(child))
    found.sort(key=lambda e: e.uri)
    yield from found


def _local_entry(child: os.DirEntry) -> _Entry:
    shown, name_error = _printable(child.path)
    if name_error:
        return _Entry(shown, error=name_error)
    try:
        st = child.stat(follow_symlinks=True)
    except FileNotFoundError:
        return _Entry(shown, error=f"broken symbolic link: {shown} -> {os.readlink(child.path)}")
    except OSError as e:
        return _Entry(shown, error=f"cannot stat {shown}: {e}")
    target, target_error = _printable(os.path.realpath(child.path))
    if target_error:
        return _Entry(shown, error=target_error)
    if not stat.S_ISREG(st.st_mode):
        return _Entry(target, error=f"not a regular file ({_file_kind(st.st_mode)}): {shown}")
    return _Entry(target, fingerprint=f"size={st.st_size} mtime_ns={st.st_mtime_ns}")


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):  # fmt: skip
        if test(mode):
            return name
    return "not a file"


def _list_remote(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[_Entry]:
    for name, info in sorted(fs.find(path, detail=True).items()):
        if posixpath.basename(name).startswith(".") or info.get("type", "file") != "file":
            continue
        yield _Entry(canonical_uri(fs.unstrip_protocol(name)), fingerprint=_remote_fingerprint(info))


def _remote_fingerprint(info: dict) -> str | None:
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    size = info.get("size")
    if etag is None and size is None:
        return None
    return f"size={size} etag={str(etag).strip(chr(34))}" if etag else f"size={size}"


def _read_manifest(fs: fsspec.AbstractFileSystem, path: str, source: str) -> Iterator[_Entry]:
    with fs.open(path, "rb") as f:
        data = f.read()
    if path.endswith(".csv"):
        header = pa_csv.open_csv(io.BytesIO(data)).schema.names if data.strip() else []
        table = pa_csv.read_csv(
            io.BytesIO(data),
            # Every column as text: labels like 001 or 1e3 stay what the user wrote.
            convert_options=pa_csv.ConvertOptions(
                column_types={c: pa.string() for c in header}, strings_can_be_null=True, null_values=[""]
            ),
        )
        where = lambda i: f"manifest {source} line {i + 2}"  # noqa: E731 (line 1 is the header)
    else:
        table = pq.read_table(io.BytesIO(data))
        where = lambda i: f"manifest {source} row {i + 1}"  # noqa: E731
    if "uri" not in table.column_names:
        raise ValueError(f"manifest {source} has no 'uri' column (columns: {table.column_names})")
    uri_type = table.schema.field("uri").type
    if not (pa.types.is_string(uri_type) or pa.types.is_large_string(uri_type)):
        raise ValueError(f"manifest {source}: column 'uri' must hold strings, not {uri_type}")
    labels = _manifest_labels(table, source)
    base = source.rsplit("/", 1)[0] if is_remote(source) else str(Path(path).parent)
    for i, u in enumerate(table.column("uri").to_pylist()):
        if u is None or not u.strip():
            raise ValueError(f"{where(i)}: empty uri")
        if "://" not in u and not os.path.isabs(u):
            u = join_uri(base, u)
        yield _Entry(canonical_uri(u), label=labels[i])


def _manifest_labels(table: pa.Table, source: str) -> list[str | None]:
    if "label" not in table.column_names:
        return [None] * len(table)
    column = table.column("label")
    t = column.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t):
        return column.to_pylist()
    if pa.types.is_integer(t) or pa.types.is_dictionary(t):
        return [None if v is None else str(v) for v in column.to_pylist()]
    raise ValueError(f"manifest {source}: column 'label' must hold strings (or integers), not {t}")


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

    Args:
        max_bytes: refuse larger files (:class:`InputError`) before reading them.
        timeout_s: give up on a read that takes longer (:class:`ReadError`).

    Raises:
        FileNotFoundError: no such file or object (not retried).
        InputError: not a regular file (a FIFO, a device), or over ``max_bytes``.
        ReadError: storage failed ``attempts`` times, or the read took over ``timeout_s``.
    """
    for attempt in range(attempts):
        try:
            if not is_remote(uri):
                return _read_local(canonical_uri(uri), max_bytes, timeout_s)
            fs, path = filesystem(uri)
            with fs.open(path, "rb") as f:
                size = getattr(f, "size", None)
                if max_bytes is not None and size is not None and size > max_bytes:
                    raise InputError(_too_large(uri, size, max_bytes))
                data = _read_chunks(f, uri, max_bytes, timeout_s)
                details = getattr(f, "details", None)
                return data, _remote_fingerprint(details) if isinstance(details, dict) else None
        except (FileNotFoundError, InputError):
            raise
        except PermissionError as e:
            raise ReadError(f"permission denied: {uri}: {e}") from None
        except Exception as e:
            if attempt == attempts - 1 or isinstance(e, ReadError):
                raise ReadError(_describe(uri, e)) from None
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


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
        return _read_chunks(f, path, max_bytes, timeout_s), f"size={st.st_size} mtime_ns={st.st_mtime_ns}"


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
    os.makedirs(folder, exist_ok=True)
    fd, staged = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
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
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        try:
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
