"""WebDataset tar shards: one input per sample, its image read from the shard by byte range.

A shard is a tar file; its members are grouped into samples as webdataset groups them: the key
of a member is its path up to the first dot of its base name (``train/s042.seg.png`` has key
``train/s042`` and extension ``seg.png``), consecutive members with one key are one sample. The
sample's image is its member with an image extension (:data:`IMAGE_EXTENSIONS`, the first found
in that order); its label, when asked, the text of another member (``cls``, ``txt``) or a field of
its JSON (``json:FIELD``).

A sample is at ``<canonical shard location>#<key>`` (``s3://b/shards/000001.tar#s042``), which
gives its id as a file's location gives a file's (:func:`pro2sam.storage.image_id_for`).

Listing reads each shard's tar headers as a stream: the shard's bytes pass through (a tar has no
index) but none is held beyond the labels being read. The image is read later, in the read stage,
by its byte offset and size (:func:`read_members`, neighbouring members in one request), so a
shard is never held whole.

What cannot be read becomes an input with an ``input_error`` (an error row), never an exception: a
sample without an image member, a sample the shard ends inside (a truncated shard), and the rest
of a shard whose tar headers stop making sense (``<shard>#@<byte offset>``: truncated, corrupt, or
not a tar at all).
"""

from __future__ import annotations

import itertools
import json
import re
import tarfile
from collections.abc import Iterator, Sequence

from ..storage import ReadError, StorageError, _describe, filesystem, read_range
from .base import Entry

__all__ = [
    "IMAGE_EXTENSIONS",
    "SHARD_SUFFIX",
    "DEFAULT_SHARD_LABEL",
    "is_shard_name",
    "expand_braces",
    "sample_key",
    "shard_entries",
    "read_members",
]

SHARD_SUFFIX = ".tar"
# Extensions of an image member, in the order one is chosen when a sample has several.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp", "gif", "ppm", "pgm", "pbm", "pnm")
# The member a sample's label is read from unless told otherwise: webdataset's class label.
DEFAULT_SHARD_LABEL = "cls"
# A label member larger than this is not read (a label is a word, not a document).
_MAX_LABEL_BYTES = 1 << 20
# Neighbouring members of a shard are read in one request when the gap between them is at most
# this, and one request reads at most _MAX_SPAN bytes.
_MAX_GAP = 1 << 20
_MAX_SPAN = 64 << 20

_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext
_BRACE = re.compile(r"\{([^{}]*)\}")


def is_shard_name(uri: str) -> bool:
    """True if the name of ``uri`` ends in ``.tar`` (in any case)."""
    return uri.lower().endswith(SHARD_SUFFIX)


def expand_braces(pattern: str) -> list[str]:
    """The names a brace pattern stands for, in order, as webdataset (``braceexpand``) spells
    them: ``{000000..000009}`` is a range zero-padded to the width of its first bound, ``{a,b}``
    a list; several braces multiply. A name without braces is itself.

    Raises:
        ValueError: a range whose bounds are not integers.
    """
    parts = _BRACE.split(pattern)  # text, brace, text, brace, ..., text
    choices: list[list[str]] = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            choices.append([part])
        elif ".." in part:
            first, _, last = part.partition("..")
            if not (first.strip().isdigit() and last.strip().isdigit()):
                raise ValueError(f"brace range {{{part}}} in {pattern}: its bounds must be integers")
            lo, hi, width = int(first), int(last), len(first.strip())
            step = 1 if hi >= lo else -1
            choices.append([str(n).zfill(width) for n in range(lo, hi + step, step)])
        else:
            choices.append(part.split(","))
    return ["".join(names) for names in itertools.product(*choices)]


def sample_key(member: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member's path as webdataset splits it (the extension in lower
    case), or None for a path without an extension."""
    match = _KEY.match(member)
    return (match.group(1), match.group(2).lower()) if match else None


def shard_entries(shard: Entry, *, label: str | None = DEFAULT_SHARD_LABEL) -> Iterator[Entry]:
    """The samples of one shard (``shard.uri`` canonical), as inputs in shard order.

    Args:
        shard: the shard as a listing met it (its fingerprint becomes each sample's; an error, as
            for a missing shard, becomes one error input for the shard).
        label: the member a sample's label is read from: an extension (``cls``, ``txt``), or
            ``json:FIELD`` for a field of the sample's ``.json``; None for no label.

    Raises:
        StorageError: the shard cannot be reached (an outage: the listing stops, as for a prefix).
    """
    if shard.error is not None:
        yield Entry(f"{shard.uri}#@0", error=shard.error, fingerprint=shard.fingerprint)
        return
    fs, path = filesystem(shard.uri)
    label_ext, _, label_field = (label or "").partition(":")
    offset = size = 0
    sample: _Sample | None = None
    try:
        with fs.open(path, "rb") as f:
            size = getattr(f, "size", None)
            if size is None:
                size = fs.size(path)
            stream = tarfile.open(fileobj=f, mode="r|")
            for info in stream:
                offset = stream.offset
                if not info.isfile():
                    continue
                split = sample_key(info.name)
                if split is None:
                    continue
                key, ext = split
                if sample is None or key != sample.key:
                    if sample is not None:
                        yield sample.entry(shard, size)
                    sample = _Sample(key)
                sample.members[ext] = (info.offset_data, info.size, info.name)
                if label_ext and ext == label_ext and info.size <= _MAX_LABEL_BYTES:
                    reader = stream.extractfile(info)
                    sample.label = _label_text(reader.read() if reader else b"", label_field)
    except (tarfile.TarError, EOFError) as e:
        if sample is not None:
            yield sample.entry(shard, size)
            sample = None
        yield Entry(
            f"{shard.uri}#@{offset}", fingerprint=shard.fingerprint,
            error=f"the shard {shard.uri} cannot be read from byte {offset} on (truncated, corrupt or not a tar): {e}",
        )  # fmt: skip
    except FileNotFoundError:
        yield Entry(f"{shard.uri}#@0", error=f"not found: {shard.uri}")
    except (StorageError, ValueError):
        raise
    except Exception as e:
        raise StorageError(_describe(shard.uri, e)) from None
    else:
        if sample is not None:
            yield sample.entry(shard, size)
        if size and stream.offset >= size:  # no end-of-archive blocks: cut at a member's boundary
            yield Entry(
                f"{shard.uri}#@{stream.offset}", fingerprint=shard.fingerprint,
                error=f"the shard {shard.uri} ends at byte {size} without tar's end-of-archive blocks: truncated",
            )  # fmt: skip


class _Sample:
    """The members of one sample met so far: extension -> (data offset, size, member name)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.members: dict[str, tuple[int, int, str]] = {}
        self.label: str | None = None

    def entry(self, shard: Entry, shard_size: int) -> Entry:
        uri = f"{shard.uri}#{self.key}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in self.members), None)
        if ext is None:
            found = ", ".join(sorted(self.members)) or "none"
            return Entry(uri, label=self.label, fingerprint=shard.fingerprint,
                         error=f"sample {self.key} of {shard.uri} has no image member (.{', .'.join(IMAGE_EXTENSIONS[:4])}, ...; it has: {found})")  # fmt: skip
        offset, size, name = self.members[ext]
        if offset + size > shard_size:
            return Entry(uri, label=self.label, fingerprint=shard.fingerprint,
                         error=f"the shard {shard.uri} ends inside {name} ({shard_size} bytes, the member ends at {offset + size}): truncated")  # fmt: skip
        return Entry(uri, label=self.label, fingerprint=shard.fingerprint,
                     container_kind="tar", container=shard.uri, member_offset=offset, member_size=size)  # fmt: skip


def _label_text(data: bytes, field: str) -> str | None:
    """A label member's text (stripped; None when empty), or ``field`` of its JSON."""
    text = data.decode("utf-8", "replace").strip()
    if not field:
        return text or None
    try:
        value = json.loads(text).get(field)
    except (ValueError, AttributeError):
        return None
    return None if value is None else str(value)


def read_members(
    shard: str, offsets: Sequence[int], sizes: Sequence[int], *, timeout_s: float | None = None
) -> list[bytes]:
    """The bytes of members of one shard, by data offset and size; neighbouring members (gaps up
    to 1 MiB, 64 MiB a request at most) come in one range request.

    Raises:
        FileNotFoundError: the shard is gone.
        ReadError: storage failed, or the shard is shorter than the members (it changed since it
            was listed).
    """
    order = sorted(range(len(offsets)), key=lambda i: offsets[i])
    out: list[bytes] = [b""] * len(offsets)
    span: list[int] = []

    def flush() -> None:
        start = offsets[span[0]]
        end = max(offsets[i] + sizes[i] for i in span)
        data = read_range(shard, start, end, timeout_s=timeout_s)
        if len(data) < end - start:
            raise ReadError(f"{shard} is {start + len(data)} bytes, shorter than when it was listed (a member ends at {end})")
        for i in span:
            out[i] = data[offsets[i] - start : offsets[i] - start + sizes[i]]

    for i in order:
        if span:
            end = max(offsets[j] + sizes[j] for j in span)
            if offsets[i] - end > _MAX_GAP or offsets[i] + sizes[i] - offsets[span[0]] > _MAX_SPAN:
                flush()
                span = []
        span.append(i)
    if span:
        flush()
    return out
