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
    ]
)


@dataclass(frozen=True)
class Entry:
    uri: str
    fingerprint: str | None = None
    error: str | None = None
    label: str | None = None


# Rows per record batch of a listing: what the driver holds of the listing at a time.
LIST_BATCH_ROWS = 65_536

