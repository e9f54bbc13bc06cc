"""The jobs' read and decode stages (Ray Data tasks): storage bytes -> RGB arrays.

They import neither torch nor the models, so the many small tasks that run them start fast; a
failure becomes the row's ``error`` and ``error_kind``, never an exception.
:func:`decoded_images` chains them over a table of inputs, the same way for label, evaluate and
tune, ahead of each job's actors.

A file caught being written is retried by the next run (``error_kind`` ``read``), not kept as a
bad image: one that changed while it was read (:func:`~pro2sam.storage.read_file`), and one that
does not decode after it changed since it was listed (its fingerprint then differs from the
listing's). A file that is stably empty or corrupt is an ``image`` error.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from ..images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from ..inputs.parquet_images import read_rows
from ..inputs.webdataset import read_members
from ..storage import DEFAULT_MAX_BYTES, DEFAULT_READ_TIMEOUT_S, InputError, StorageError, read_file

if TYPE_CHECKING:
    from .settings import ReadLimits

__all__ = ["decoded_images", "read_images", "decode_images", "text_or_none", "NO_IMAGE", "BATCHES_PER_BLOCK"]

# Model batches per block handed to Ray Data: a block is one actor task, the unit results stream
# back in and a killed actor redoes; small enough to spread over actors, large enough to batch.
BATCHES_PER_BLOCK = 4
# Rows per read task of a WebDataset shard's samples or a Parquet table's rows: neighbouring
# members come in one range request, and a row group (Hugging Face exports hold 100 images each)
# is read about once.
MEMBER_READ_ROWS = 256
# CPUs of one read task: reads wait on storage, not on a core.
_READ_CPUS = 0.25

# The image of a row whose bytes could not be read or decoded.
NO_IMAGE = np.zeros((1, 1, 3), dtype=np.uint8)

# (bytes, error, error kind, fingerprint, changed since listed) of one row's read
_Fetched = tuple[bytes, str, "str | None", "str | None", bool]


def decoded_images(ray, inputs: pa.Table, limits: ReadLimits, *, batch_size: int, block_rows: int | None = None):
    """The Ray Data chain read -> decode over ``inputs``, ready for a job's actors.

    Args:
        ray: the initialised ``ray`` module.
        inputs: one row per image, the columns of :data:`~pro2sam.inputs.INPUT_SCHEMA` the read
            stage uses (``uri``, ``input_error``, ``source_fingerprint``; ``container_kind``,
            ``container``, ``member_offset``, ``member_size`` for images held in a shard or table).
        limits: the per-image read limits (:class:`~pro2sam.pipeline.settings.ReadLimits`).
        batch_size: images per model batch of the actors that follow.
        block_rows: rows per block (one actor task); default ``BATCHES_PER_BLOCK`` model batches.

    Returns:
        A ``ray.data.Dataset`` of the inputs' columns plus ``image`` ((H, W, 3) uint8 RGB, or
        :data:`NO_IMAGE`), ``error`` and ``error_kind``.
    """
    rows = block_rows or BATCHES_PER_BLOCK * batch_size
    ds = ray.data.from_arrow([inputs.slice(i, rows) for i in range(0, len(inputs), rows)])
    # The rows of one shard or table of images are read together: more of them per read task.
    held = "container_kind" in inputs.column_names and inputs.column("container_kind").null_count < len(inputs)
    ds = ds.map_batches(
        read_images,
        batch_format="numpy",
        batch_size=MEMBER_READ_ROWS if held else batch_size,
        num_cpus=_READ_CPUS,
        fn_kwargs={"max_bytes": limits.max_bytes, "timeout_s": limits.read_timeout_s},
    )
    return ds.map_batches(
        decode_images, batch_format="numpy", batch_size=batch_size, fn_kwargs={"max_pixels": limits.max_pixels}
    )


def read_images(
    batch: dict[str, np.ndarray],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    threads: int = 8,
) -> dict[str, np.ndarray]:
    """I/O stage: add the encoded bytes of each image; a failed read fills ``error`` and ``error_kind``.

    A loose file is read whole; the members of one WebDataset shard, and the rows of one Parquet
    table of images, in the batch are read together (``container``, ``member_offset``,
    ``member_size`` of :data:`~pro2sam.inputs.INPUT_SCHEMA`).

    ``source_fingerprint`` becomes that of the bytes read (the listing's when the read failed),
    and ``changed_since_listed`` says where it differs from the listing's."""
    uris = list(batch["uri"])
    n = len(uris)
    kinds = batch.get("container_kind", np.full(n, None, object))

    def listed(i: int) -> tuple[str | None, str | None]:
        error, fingerprint = batch["input_error"][i], batch["source_fingerprint"][i]
        return (error if isinstance(error, str) and error else None), (fingerprint if isinstance(fingerprint, str) else None)

    def fetch(i: int) -> list[tuple[int, _Fetched]]:
        listed_error, fingerprint = listed(i)
        if listed_error:
            return [(i, (b"", listed_error, "input", fingerprint, False))]
        try:
            data, read_fingerprint = read_file(uris[i], max_bytes=max_bytes, timeout_s=timeout_s)
            changed = None not in (fingerprint, read_fingerprint) and fingerprint != read_fingerprint
            return [(i, (data, "", None, read_fingerprint or fingerprint, changed))]
        except FileNotFoundError:
            return [(i, (b"", f"not found: {uris[i]}", "read", fingerprint, False))]
        except InputError as e:
            return [(i, (b"", str(e), "input", fingerprint, False))]
        except StorageError as e:
            return [(i, (b"", f"read failed: {e}", "read", fingerprint, False))]

    def fetch_members(kind: str, container: str, rows: list[int]) -> list[tuple[int, _Fetched]]:
        """The rows of one shard or table of images, read together (their fingerprint: the
        container's, as listed)."""
        out = []
        try:
            if kind == "tar":
                sizes = [int(batch["member_size"][i]) for i in rows]
                small = [i for i, size in zip(rows, sizes) if size <= max_bytes]
                out += [(i, (b"", f"member is {size} bytes, over the limit of {max_bytes} bytes per image: {uris[i]}",
                             "input", listed(i)[1], False)) for i, size in zip(rows, sizes) if size > max_bytes]  # fmt: skip
                offsets = [int(batch["member_offset"][i]) for i in small]
                datas = read_members(container, offsets, [int(batch["member_size"][i]) for i in small], timeout_s=timeout_s)
                return out + [(i, (data, "", None, listed(i)[1], False)) for i, data in zip(small, datas)]
            datas = read_rows(container, [int(batch["member_offset"][i]) for i in rows])
            for i, data in zip(rows, datas):
                if data is None:
                    out.append((i, (b"", f"no image bytes in {uris[i]} (a null image)", "input", listed(i)[1], False)))
                elif len(data) > max_bytes:
                    out.append((i, (b"", f"image is {len(data)} bytes, over the limit of {max_bytes} bytes per image: {uris[i]}",
                                    "input", listed(i)[1], False)))  # fmt: skip
                else:
                    out.append((i, (data, "", None, listed(i)[1], False)))
            return out
        except FileNotFoundError:
            return [(i, (b"", f"not found: {container} (holding {uris[i]})", "read", listed(i)[1], False)) for i in rows]
        except (StorageError, IndexError) as e:
            return [(i, (b"", f"read failed: {e}", "read", listed(i)[1], False)) for i in rows]

    tasks, groups = [], {}
    for i in range(n):
        kind = kinds[i]
        if isinstance(kind, str) and kind and listed(i)[0] is None:
            groups.setdefault((kind, str(batch["container"][i])), []).append(i)
        else:
            tasks.append(lambda i=i: fetch(i))
    tasks += [lambda k=k, rows=rows: fetch_members(*k, rows) for k, rows in groups.items()]
    fetched: list[_Fetched | None] = [None] * n
    with ThreadPoolExecutor(max_workers=min(threads, max(1, len(tasks)))) as pool:
        for results in pool.map(lambda task: task(), tasks):
            for i, result in results:
                fetched[i] = result
    batch["data"] = _object_array([d for d, _, _, _, _ in fetched])
    batch["error"] = _object_array([e for _, e, _, _, _ in fetched])
    batch["error_kind"] = _object_array([k for _, _, k, _, _ in fetched])
    batch["source_fingerprint"] = _object_array([f for _, _, _, f, _ in fetched])
    batch["changed_since_listed"] = np.array([c for _, _, _, _, c in fetched], dtype=bool)
    return batch


def decode_images(batch: dict[str, np.ndarray], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, np.ndarray]:
    """CPU stage: bytes -> (H, W, 3) uint8 RGB with EXIF orientation applied, or an error (kind
    ``read`` for a file that changed since it was listed: it may have been read half written)."""
    images, errors, kinds = [], [], []
    changed = batch.get("changed_since_listed", np.zeros(len(batch["data"]), bool))
    for data, error, kind, changed_since_listed in zip(batch["data"], batch["error"], batch["error_kind"], changed):
        if error:
            images.append(NO_IMAGE)
            errors.append(error)
            kinds.append(kind)
            continue
        try:
            images.append(decode_image(data, max_pixels=max_pixels))
            errors.append("")
            kinds.append(None)
        except ImageDecodeError as e:
            images.append(NO_IMAGE)
            if changed_since_listed:
                errors.append(f"{e}; the file changed after it was listed (still being written?): a rerun reads it again")
                kinds.append("read")
            else:
                errors.append(str(e))
                kinds.append("image")
    out = {k: v for k, v in batch.items() if k not in ("data", "changed_since_listed")}
    out["image"] = _object_array(images)
    out["error"] = _object_array(errors)
    out["error_kind"] = _object_array(kinds)
    return out


def text_or_none(value) -> str | None:
    """Ray hands an all-null string column over as float NaN: normalise to str or None."""
    return value if isinstance(value, str) else None


def _object_array(items: list) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr
