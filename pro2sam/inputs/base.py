"""What a source of inputs yields: record batches of :data:`INPUT_SCHEMA`, one row per image."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

__all__ = ["INPUT_SCHEMA", "LIST_BATCH_ROWS", "Entry"]

INPUT_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("source_fingerprint", pa.string()),  # size and mtime or ETag, when listing knows it
        pa.field("input_error", pa.string()),  # why this input cannot be read at all (it becomes an error row)
        # Where the bytes are when the image is not a file of its own (null for a loose file):
        # 'tar' (a WebDataset shard's member) or 'parquet' (a row of a Parquet table of images),
        pa.field("container_kind", pa.string()),
        # the canonical location of that shard or Parquet file,
        pa.field("container", pa.string()),
        # tar: the byte offset of the member's data in the shard; parquet: the row's index in the file,
        pa.field("member_offset", pa.int64()),
        # tar: the member's size in bytes; parquet: null.
        pa.field("member_size", pa.int64()),
    ]
)


@dataclass(frozen=True)
class Entry:
    uri: str
    fingerprint: str | None = None
    error: str | None = None
    label: str | None = None
    container_kind: str | None = None
    container: str | None = None
    member_offset: int | None = None
    member_size: int | None = None


# Rows per record batch of a listing: what the driver holds of the listing at a time.
LIST_BATCH_ROWS = 65_536

