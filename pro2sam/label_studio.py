"""Export the labels table as Label Studio tasks with pre-annotations (``predictions``).

One task per image: ``data`` holds the image's location (mapped to one Label Studio can open,
:class:`ImageLocations`), the image id and our scores; ``predictions`` holds one prediction with a
rectangle (``rectanglelabels``, percent of the image, from ``box_xyxy``) and a brush mask
(``brushlabels`` in Label Studio's own RLE, encoded by Label Studio's ``brush`` module, not COCO
RLE), both with the class name, and the prediction's ``score`` (``confidence``, else
``match_score``). The file is one JSON list of tasks, written whole and streamed (a task at a
time); beside it, ``<name>.label_config.xml`` is a labeling config whose tag names
(:data:`TAG_NAMES`) the tasks use, with every class as a label.

Label Studio's brush RLE is the encoder of ``label_studio_sdk.converter.brush`` (the same module
ships in ``label-studio-converter``, which is what we install: the SDK's pins would downgrade
OpenCV and NumPy): the mask repeated over four RGBA channels, run-length coded in its own bit
format.
"""

from __future__ import annotations

import json
import os
import posixpath
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

import numpy as np

from .export import DEFAULT_BATCH_SIZE, ExportSummary, LabelFilter, Categories, kept_rows, row_score
from .labels import STATUS_OK
from .rle import decode_mask
from .storage import is_remote, staged_file

__all__ = ["TAG_NAMES", "LOCAL_FILES_URL", "ImageLocations", "brush_module", "brush_rle", "export_label_studio"]

# from_name / to_name of the results; the labeling config written beside the tasks uses them.
TAG_NAMES = {"image": "image", "box": "box", "mask": "mask"}
# How Label Studio serves local files (LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and
# LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=<root>): the path relative to the root, URL-quoted. It
# answers 404 until a project has a "Local files" storage on a sub-folder of the root holding the
# file (README; scripts/check_label_studio.py).
LOCAL_FILES_URL = "/data/local-files/?d="
# Scores kept in each task's data, for Label Studio's filters and columns.
_SCORES = ("confidence", "match_score", "pred_iou", "stability_score", "class_score")


def brush_module():
    """Label Studio's ``brush`` module: the SDK's where it is installed, else the converter's."""
    try:
        from label_studio_sdk.converter import brush
    except ImportError:
        try:
            from label_studio_converter import brush
        except ImportError:
            raise ImportError(
                "the Label Studio export needs Label Studio's brush encoder: pip install label-studio-converter"
            ) from None
    return brush


def brush_rle(mask: np.ndarray) -> list[int]:
    """(H, W) bool mask -> Label Studio brush RLE (a list of byte values), by Label Studio's encoder."""
    return brush_module().mask2rle(np.asarray(mask, dtype=np.uint8) * 255)


@dataclass(frozen=True)
class ImageLocations:
    """Where Label Studio finds the images: an image URI of the labels table -> the task's URL.

    Attributes:
        prefixes: ``(from, to)`` pairs, tried in order: a URI that starts with ``from`` gets
            ``to`` instead (``s3://bucket/images/`` -> ``https://cdn.example.com/images/``).
        local_files_root: local paths under this folder become Label Studio local-files URLs
            (:data:`LOCAL_FILES_URL` + the path relative to it); start Label Studio with
            ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true`` and
            ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` set to it.

    URIs no rule matches stay as they are: ``s3://``, ``gs://`` and ``azure-blob://`` URIs are
    what Label Studio opens once the project has a cloud source storage on that bucket.
    """

    prefixes: tuple[tuple[str, str], ...] = ()
    local_files_root: str | None = None

    @classmethod
    def parse(cls, maps: Sequence[str] = (), local_files_root: str | None = None) -> ImageLocations:
        """From ``FROM=TO`` strings (``--map-uri``) and a local-files root."""
        pairs = []
        for text in maps:
            old, sep, new = text.partition("=")
            if not sep or not old:
                raise ValueError(f"--map-uri {text!r}: expected FROM=TO, e.g. s3://bucket/=https://bucket.example.com/")
            pairs.append((old, new))
        root = os.path.abspath(local_files_root) if local_files_root else None
        return cls(tuple(pairs), root)

    def __call__(self, uri: str) -> str:
        for old, new in self.prefixes:
            if uri.startswith(old):
                return new + uri[len(old):]
        if self.local_files_root and not is_remote(uri):
            path = os.path.abspath(uri)
            if path == self.local_files_root or path.startswith(self.local_files_root.rstrip(os.sep) + os.sep):
                relative = os.path.relpath(path, self.local_files_root).replace(os.sep, "/")
                return LOCAL_FILES_URL + urllib.parse.quote(relative, safe="/")
        return uri


def _percent_box(box_xyxy: Sequence[int], width: int, height: int) -> dict:
    """Inclusive pixel box -> Label Studio's rectangle value (percent of the image size)."""
    x0, y0, x1, y1 = (int(v) for v in box_xyxy)
    return {
        "x": 100.0 * x0 / width,
        "y": 100.0 * y0 / height,
        "width": 100.0 * (x1 - x0 + 1) / width,
        "height": 100.0 * (y1 - y0 + 1) / height,
        "rotation": 0,
    }


def _task(row: dict, categories: Categories, image_url: ImageLocations, model_version: str) -> dict | None:
    """The task of one row, or None when the row has no category (no class, no manifest label)."""
    class_score = row["topk_scores"][0] if row.get("topk_scores") else None
    data = {
        TAG_NAMES["image"]: image_url(row["uri"]),
        "uri": row["uri"],
        "image_id": row["image_id"],
        "status": row["status"],
        "box_source": row.get("box_source"),
        **{k: (class_score if k == "class_score" else row.get(k)) for k in _SCORES},
    }
    if row["status"] != STATUS_OK:
        data["error"] = row.get("error")
        return {"data": data}
    category_id = categories.of(row)
    if category_id is None:
        return None
    name = categories.names[category_id]
    data["class"] = name
    if row["box_xyxy"] is None or row["mask_rle"] is None:
        return {"data": data}
    width, height = int(row["width"]), int(row["height"])
    common = {"to_name": TAG_NAMES["image"], "original_width": width, "original_height": height, "image_rotation": 0}
    score = row_score(row)
    result = [
        {
            "id": f"{row['image_id'][:10]}-box",
            "type": "rectanglelabels",
            "from_name": TAG_NAMES["box"],
            **common,
            "value": {**_percent_box(row["box_xyxy"], width, height), "rectanglelabels": [name]},
            "score": score,
        },
        {
            "id": f"{row['image_id'][:10]}-mask",
            "type": "brushlabels",
            "from_name": TAG_NAMES["mask"],
            **common,
            "value": {"format": "rle", "rle": brush_rle(decode_mask(row["mask_rle"])), "brushlabels": [name]},
            "score": score,
        },
    ]
    return {"data": data, "predictions": [{"model_version": model_version, "score": score, "result": result}]}


def label_config_xml(class_names: Sequence[str]) -> str:
    """A Label Studio labeling config for the exported tasks: the image, rectangles and brushes
    with one label per class."""
    labels = "".join(f'\n    <Label value="{escape(str(n), quote=True)}"/>' for n in class_names)
    t = TAG_NAMES
    return (
        "<View>\n"
        f'  <Image name="{t["image"]}" value="${t["image"]}" zoom="true"/>\n'
        f'  <RectangleLabels name="{t["box"]}" toName="{t["image"]}">{labels}\n  </RectangleLabels>\n'
        f'  <BrushLabels name="{t["mask"]}" toName="{t["image"]}">{labels}\n  </BrushLabels>\n'
        "</View>\n"
    )


def config_path(output: str) -> str:
    """Where the labeling config goes beside the tasks file: ``tasks.json`` -> ``tasks.label_config.xml``."""
    root, _ = posixpath.splitext(output)
    return root + ".label_config.xml"


def export_label_studio(
    input: str,
    output: str,
    *,
    filters: LabelFilter = LabelFilter(),
    class_names: Sequence[str] | None = None,
    category: str = "top1",
    image_url: ImageLocations = ImageLocations(),
    model_version: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> ExportSummary:
    """Write the labels table at ``input`` as a Label Studio tasks file at ``output`` (local or
    URI, written whole) and its labeling config beside it (:func:`config_path`).

    Args:
        filters, class_names, category, batch_size: as :func:`pro2sam.export.export_coco`; error
            rows kept by ``filters`` (``status=None``) become tasks without predictions.
        image_url: how image URIs become URLs Label Studio opens.
        model_version: the predictions' ``model_version`` (default: ``pro2sam`` and the first 12
            hex digits of each row's GTFormer and SAM checkpoints).
    """
    categories = Categories(category, class_names)
    summary = ExportSummary(output)
    with staged_file(output) as staged, open(staged, "w", encoding="utf-8") as out:
        out.write("[")
        for row in kept_rows(input, filters, summary, batch_size=batch_size):
            version = model_version or _model_version(row)
            task = _task(row, categories, image_url, version)
            if task is None:
                summary.filtered += 1
                continue
            out.write((",\n" if summary.images else "\n") + json.dumps(task))
            summary.images += 1
            summary.annotations += bool(task.get("predictions"))
        out.write("\n]\n")
    summary.categories = dict(sorted(categories.names.items()))
    with staged_file(config_path(output)) as staged, open(staged, "w", encoding="utf-8") as out:
        out.write(label_config_xml(list(summary.categories.values())))
    return summary


def _model_version(row: dict) -> str:
    sam = row.get("sam_model") or ""
    variant, _, digest = sam.partition(":")
    return f"pro2sam gtformer:{(row.get('gtformer_sha256') or '')[:12]} sam:{variant}:{digest[:12]}"
