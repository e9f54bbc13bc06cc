"""Object storage through fsspec: listing inputs, reading bytes, fetching checkpoints.

Local paths and any fsspec URI (``s3://``, ``gs://``, ``az://``, ...) work alike. S3 follows the
usual conventions (AWS_* environment variables, profiles, ``AWS_ENDPOINT_URL`` for S3-compatible
stores); connection timeouts are kept short so an unreachable endpoint fails fast with a clear
message instead of hanging.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import shutil
import tempfile
import time
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

__all__ = [
    "StorageError",
    "filesystem",
    "is_remote",
    "join_uri",
    "image_id_for",
    "list_inputs",
    "read_bytes",
    "fetch_to_local",
]

# Short timeouts and bounded retries: a dead endpoint must end the job, not stall it.
_S3_CONFIG = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}}
_MANIFEST_SUFFIXES = (".csv", ".parquet")


class StorageError(RuntimeError):
    """Storage could not be reached or a path does not exist."""


def is_remote(uri: str) -> bool:
    """True for URIs with a scheme other than ``file``."""
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    return protocol not in ("file", "local")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path within it."""
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    options: dict = {}
    if protocol in ("s3", "s3a"):
        options["config_kwargs"] = _S3_CONFIG
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
        options["skip_instance_cache"] = True
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def join_uri(base: str, name: str) -> str:
    """``base`` joined with a relative ``name`` (keeps the scheme of remote URIs)."""
    if is_remote(base):
        return base.rstrip("/") + "/" + name.lstrip("/")
    return str(Path(base) / name)


def _describe(uri: str, error: BaseException) -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    where = f" (endpoint {endpoint})" if endpoint and uri.startswith("s3") else ""
    return f"cannot access {uri}{where}: {type(error).__name__}: {error}"


def image_id_for(uri: str) -> str:
    """A stable image id derived from the URI: 20 hex digits of its SHA-1."""
    return hashlib.sha1(uri.encode("utf-8")).hexdigest()[:20]


def _qualify(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    if not is_remote(like):
        return path
    return fs.unstrip_protocol(path)


def list_inputs(source: str, *, exclude_prefix: str | None = None) -> pa.Table:
    """The images a job labels, as a table of ``image_id``, ``uri``, ``label`` (string or null).

    Args:
        source: a prefix (folder) listed recursively, hidden files skipped; or a manifest, a
            ``.csv`` or ``.parquet`` file with a ``uri`` column and an optional ``label`` column.
            Relative manifest URIs are taken relative to the manifest's folder.
        exclude_prefix: a prefix whose files are never inputs (the job's own output folder).

    Raises:
        StorageError: the source cannot be reached or does not exist.
        ValueError: a manifest without a ``uri`` column.
    """
    try:
        fs, path = filesystem(source)
        if fs.isfile(path) and path.endswith(_MANIFEST_SUFFIXES):
            return _read_manifest(fs, path, source)
        if not fs.isdir(path):
            raise StorageError(f"input {source} does not exist (neither a folder nor a manifest .csv/.parquet)")
        excluded = None
        if exclude_prefix:
            ex_fs, ex_path = filesystem(exclude_prefix)
            excluded = ex_path.rstrip("/") + "/"
        files = sorted(
            p
            for p in fs.find(path)
            if not posixpath.basename(p).startswith(".") and not (excluded and (p + "/").startswith(excluded))
        )
    except (StorageError, ValueError):
        raise
    except Exception as e:  # botocore/aiohttp/OS errors: say where, not how deep
        raise StorageError(_describe(source, e)) from None
    uris = [_qualify(fs, p, source) for p in files]
    return pa.table(
        {
            "image_id": pa.array([image_id_for(u) for u in uris], pa.string()),
            "uri": pa.array(uris, pa.string()),
            "label": pa.nulls(len(uris), pa.string()),
        }
    )


def _read_manifest(fs: fsspec.AbstractFileSystem, path: str, source: str) -> pa.Table:
    with fs.open(path, "rb") as f:
        data = f.read()
    if path.endswith(".csv"):
        table = pa_csv.read_csv(io.BytesIO(data), convert_options=pa_csv.ConvertOptions(strings_can_be_null=True))
    else:
        table = pq.read_table(io.BytesIO(data))
    if "uri" not in table.column_names:
        raise ValueError(f"manifest {source} has no 'uri' column (columns: {table.column_names})")
    base = source.rsplit("/", 1)[0] if is_remote(source) else str(Path(path).parent)
    uris = []
    for u in table.column("uri").to_pylist():
        u = str(u)
        if "://" not in u and not os.path.isabs(u):
            u = join_uri(base, u)
        uris.append(u)
    labels = (
        pa.array([None if v is None else str(v) for v in table.column("label").to_pylist()], pa.string())
        if "label" in table.column_names
        else pa.nulls(len(uris), pa.string())
    )
    ids = [image_id_for(u) for u in uris]
    seen: set[str] = set()
    keep = [i for i, image_id in enumerate(ids) if not (image_id in seen or seen.add(image_id))]
    out = pa.table({"image_id": pa.array(ids, pa.string()), "uri": pa.array(uris, pa.string()), "label": labels})
    return out.take(keep) if len(keep) != len(ids) else out


def read_bytes(uri: str, *, attempts: int = 3, backoff_s: float = 0.5) -> bytes:
    """The bytes of one object, retrying transient errors; FileNotFoundError is not retried."""
    for attempt in range(attempts):
        try:
            fs, path = filesystem(uri)
            with fs.open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise
        except Exception as e:
            if attempt == attempts - 1:
                raise StorageError(_describe(uri, e)) from None
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


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
