"""The labels table: one row per input image, the one Parquet schema of the labeling job.

:data:`LABEL_SCHEMA` is the single source of truth; every column carries its description in the
field metadata (``pro2sam schema`` prints it), and rows are built only by :func:`ok_row` and
:func:`error_row`.
"""

from __future__ import annotations

import math

import pyarrow as pa

from .rle import encode_mask

__all__ = [
    "LABEL_SCHEMA",
    "STATUS_OK",
    "STATUS_ERROR",
    "ERROR_KINDS",
    "RETRIED_ERROR_KINDS",
    "result_columns",
    "ok_row",
    "json_record",
    "error_row",
    "rows_to_table",
    "describe_schema",
]

STATUS_OK = "ok"
STATUS_ERROR = "error"

# Why an image could not be labeled; a rerun labels the kinds in RETRIED_ERROR_KINDS again (the
# cause may have passed), the others only with --retry-errors.
ERROR_KINDS = {
    "read": "storage could not give the bytes now (missing, permission denied, outage, timeout, a file caught being written)",
    "input": "the input is not a file we read (not a regular file, over the size limit, a non-UTF-8 name)",
    "image": "the bytes are not an image we can label (empty, corrupt, truncated, too many pixels, degenerate size)",
    "model": "the models failed on this image",
}
RETRIED_ERROR_KINDS = ("read",)


def _field(name: str, type_: pa.DataType, doc: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"description": doc})


LABEL_SCHEMA = pa.schema(
    [
        _field("image_id", pa.string(), "stable id: 20 hex digits of SHA-1(uri), uri in its canonical form", nullable=False),
        _field("uri", pa.string(), "where the image was read from: a resolved local path or an object URI", nullable=False),
        _field("source_fingerprint", pa.string(), "size and mtime (local) or size and ETag (object) of the file labeled"),
        _field("width", pa.int32(), "image width in pixels, after EXIF orientation"),
        _field("height", pa.int32(), "image height in pixels, after EXIF orientation"),
        _field("label", pa.string(), "image-level label given in the manifest, if any"),
        _field("topk_classes", pa.list_(pa.int32()), "GTFormer's top-k class indices, most probable first"),
        _field("topk_names", pa.list_(pa.string()), "names of topk_classes (from the GTFormer checkpoint)"),
        _field("topk_scores", pa.list_(pa.float32()), "softmax probabilities of topk_classes"),
        _field(
            "box_xyxy",
            pa.list_(pa.int32(), 4),
            "x0, y0, x1, y1: inclusive pixel indices in the original image; the tight box of mask_rle's pixels",
        ),
        _field("box_source", pa.string(), "'sam' (a SAM candidate) or 'coarse_fallback' (GTFormer map)"),
        _field(
            "mask_rle",
            pa.struct([pa.field("size", pa.list_(pa.int32(), 2)), pa.field("counts", pa.string())]),
            "chosen mask as COCO compressed RLE: size [height, width], counts (pycocotools); components under the "
            "minimum area are left out of it, as of box_xyxy",
        ),
        _field("mask_area", pa.int64(), "foreground pixels of the mask"),
        _field("match_score", pa.float32(), "similarity of the mask to the coarse map (null for the fallback)"),
        _field("pred_iou", pa.float32(), "SAM's predicted IoU of the mask (null for the fallback)"),
        _field("stability_score", pa.float32(), "SAM's stability score of the mask (null for the fallback)"),
        _field("num_candidates", pa.int32(), "SAM candidates left after filtering"),
        _field(
            "confidence",
            pa.float32(),
            "probability in [0, 1] that the box is right (IoU >= 0.5), from the calibration of pro2sam evaluate "
            "(null when labeled without one, and for error rows)",
        ),
        _field(
            "coarse_map",
            pa.list_(pa.float32()),
            "GTFormer coarse foreground map M_b, row-major, side sqrt(len) (14x14 for 224 input), whole image",
        ),
        _field("status", pa.string(), "'ok' or 'error'", nullable=False),
        _field("error", pa.string(), "why the image could not be labeled (null when ok)"),
        _field("error_kind", pa.string(), "'read', 'input', 'image' or 'model' (null when ok); 'read' is retried by a rerun"),
        _field("gtformer_sha256", pa.string(), "SHA-256 of the GTFormer weights file"),
        _field("sam_model", pa.string(), "SAM variant and SHA-256 of its checkpoint"),
        _field(
            "settings_sha256",
            pa.string(),
            "SHA-256 of the settings file of pro2sam tune the row was labeled with (--settings; null without one)",
        ),
        _field("run_id", pa.string(), "id of the job run that wrote the row", nullable=False),
    ]
)


def _nan_to_none(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def result_columns(result) -> dict:
    """The columns a :class:`pro2sam.model.Pro2SAMResult` fills (one serialiser for the labels
    table and the JSON records of ``pro2sam predict``): sizes, classes, box, mask as COCO RLE,
    scores, coarse map."""
    h, w = result.mask.shape
    return {
        "width": w,
        "height": h,
        "topk_classes": result.topk_classes,
        "topk_names": result.topk_names,
        "topk_scores": result.topk_scores,
        "box_xyxy": list(result.box_xyxy),
        "box_source": result.box_source,
        "mask_rle": encode_mask(result.mask),
        "mask_area": int(result.mask.sum()),
        "match_score": _nan_to_none(result.match_score),
        "pred_iou": _nan_to_none(result.pred_iou),
        "stability_score": _nan_to_none(result.stability_score),
        "num_candidates": result.num_candidates,
        "coarse_map": result.coarse_map.astype("float32").ravel().tolist(),
    }


def ok_row(
    image_id: str,
    uri: str,
    label: str | None,
    result,
    *,
    model_ids: dict[str, str],
    run_id: str,
    source_fingerprint: str | None = None,
    settings_sha256: str | None = None,
) -> dict:
    """A row for an image labeled by :meth:`pro2sam.Pro2SAM.localize`; ``settings_sha256`` names
    the settings file of ``pro2sam tune`` it was labeled with, if any."""
    return {
        "image_id": image_id,
        "uri": uri,
        "source_fingerprint": source_fingerprint,
        "label": label,
        **result_columns(result),
        "confidence": None,  # set by a calibration (pro2sam.confidence), not by the model
        "status": STATUS_OK,
        "error": None,
        "error_kind": None,
        "gtformer_sha256": model_ids.get("gtformer"),
        "sam_model": model_ids.get("sam"),
        "settings_sha256": settings_sha256,
        "run_id": run_id,
    }


def json_record(path: str, result) -> dict:
    """One image's result as a JSON-serialisable dict (``pro2sam predict``): the table's result
    columns without the coarse map."""
    columns = result_columns(result)
    del columns["coarse_map"]
    return {"path": path, "status": STATUS_OK, "error": None, **columns}


def error_row(
    image_id: str,
    uri: str,
    label: str | None,
    error: str,
    *,
    kind: str,
    run_id: str,
    model_ids: dict[str, str] | None = None,
    width: int | None = None,
    height: int | None = None,
    source_fingerprint: str | None = None,
    settings_sha256: str | None = None,
) -> dict:
    """A row for an image that could not be labeled; ``error`` says why, ``kind`` is one of
    :data:`ERROR_KINDS`."""
    if kind not in ERROR_KINDS:
        raise ValueError(f"unknown error kind {kind!r}; one of {sorted(ERROR_KINDS)}")
    row = {name: None for name in LABEL_SCHEMA.names}
    row.update(
        image_id=image_id,
        uri=uri,
        source_fingerprint=source_fingerprint,
        label=label,
        width=width,
        height=height,
        status=STATUS_ERROR,
        error=error,
        error_kind=kind,
        run_id=run_id,
        gtformer_sha256=(model_ids or {}).get("gtformer"),
        sam_model=(model_ids or {}).get("sam"),
        settings_sha256=settings_sha256,
    )
    return row


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Rows from :func:`ok_row` / :func:`error_row` as a table with :data:`LABEL_SCHEMA`."""
    return pa.Table.from_pylist(rows, schema=LABEL_SCHEMA)


def describe_schema() -> str:
    """The schema as a Markdown table (column, type, meaning)."""
    lines = ["| column | type | meaning |", "|---|---|---|"]
    for f in LABEL_SCHEMA:
        lines.append(f"| `{f.name}` | `{f.type}` | {f.metadata[b'description'].decode()} |")
    return "\n".join(lines)
