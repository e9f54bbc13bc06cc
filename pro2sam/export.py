"""Export the labels table to COCO (one JSON), YOLO (one .txt per image + ``data.yaml``) or
Label Studio (one JSON of tasks with pre-annotations, :mod:`pro2sam.label_studio`).

The labels table may be far larger than memory: it is read one Parquet record batch at a time
(:func:`pro2sam.reading.iter_label_batches`, without the ``coarse_map`` column), and every output
is written as rows arrive. The COCO JSON is streamed: ``images`` go straight to the file, ``annotations`` to a local
spool file appended after them, ``categories`` (known only at the end) last; JSON objects are
unordered, so ``pycocotools.coco.COCO`` loads it as usual.

Conventions:

- ``box_xyxy`` holds inclusive pixel indices, so a COCO box is ``[x0, y0, x1 - x0 + 1, y1 - y0 + 1]``
  (the same box ``pycocotools.mask.toBbox`` gives for a mask that fills it) and a YOLO box spans
  ``[x0, x1 + 1)`` in continuous pixel coordinates.
- A category is the top-1 GTFormer class (``category_id`` = class index, as in the checkpoint) or,
  with ``category="label"``, the image-level label of the manifest.
- A COCO annotation's ``score`` is the row's ``confidence`` where the table has one, else its
  ``match_score`` (0.0 for the coarse-map fallback, which has none), ``score_is`` says which;
  ``match_score``, ``class_score``, ``pred_iou``, ``stability_score`` and ``box_source`` are kept
  beside it.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .labels import LABEL_SCHEMA, STATUS_OK
from .reading import DEFAULT_BATCH_SIZE, iter_label_batches
from .rle import decode_mask
from .storage import filesystem, is_remote, make_folder, new_folder_mode, staged_file

__all__ = [
    "EXPORT_COLUMNS",
    "DEFAULT_BATCH_SIZE",
    "LabelFilter",
    "ExportSummary",
    "Categories",
    "kept_rows",
    "row_score",
    "export_coco",
    "export_yolo",
    "yolo_box",
    "yolo_polygon",
]

log = logging.getLogger("pro2sam.export")

# Everything an export needs; coarse_map (196+ floats a row) is never read.
EXPORT_COLUMNS = [name for name in LABEL_SCHEMA.names if name not in ("coarse_map",)]
CATEGORY_SOURCES = ("top1", "label")
YOLO_TASKS = ("detect", "segment")


@dataclass(frozen=True)
class LabelFilter:
    """Which rows an export keeps.

    Attributes:
        status: keep rows with this status; None keeps all (error rows become images without
            annotations). Default ``"ok"``.
        min_match_score: keep rows with ``match_score >= min_match_score``; rows without a match
            score (the coarse-map fallback) are dropped when it is set.
        min_confidence: keep rows with ``confidence >= min_confidence``; rows without one
            (error rows, tables labeled without a calibration) are dropped when it is set.
        classes: keep rows whose top-1 class is one of these, given as class indices or names.
        image_ids: keep only these images (``image_id`` values), a selection made elsewhere
            (``pro2sam export --where`` selects them with SQL); None keeps all.
    """

    status: str | None = STATUS_OK
    min_match_score: float | None = None
    min_confidence: float | None = None
    classes: Sequence[int | str] | None = None
    image_ids: Sequence[str] | pa.Array | None = None

    def keeps(self, row: dict) -> bool:
        """Whether a row passes every condition but ``image_ids`` (which :func:`kept_rows` applies
        to whole batches)."""
        if self.status is not None and row["status"] != self.status:
            return False
        for key, least in (("match_score", self.min_match_score), ("confidence", self.min_confidence)):
            if least is not None and (row.get(key) is None or row[key] < least):
                return False
        if self.classes is not None:
            top1 = _top1(row)
            if top1 is None or (top1[0] not in self.classes and top1[1] not in self.classes):
                return False
        return True


@dataclass
class ExportSummary:
    """What an export wrote; ``filtered`` rows were read but left out by the filters,
    ``unlisted`` rows left out because the format cannot name their image (a YOLO ``images.txt``
    holds one URI a line, so not a URI with a line break)."""

    output: str
    images: int = 0
    annotations: int = 0
    filtered: int = 0
    categories: dict[int, str] = field(default_factory=dict)
    unlisted: int = 0

    def __str__(self) -> str:
        unlisted = f", {self.unlisted} left out: their URI holds a line break" if self.unlisted else ""
        return (
            f"{self.images} images, {self.annotations} annotations, {len(self.categories)} categories "
            f"({self.filtered} rows filtered out{unlisted}) -> {self.output}"
        )


def kept_rows(
    input: str, filters: LabelFilter, summary: ExportSummary, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> Iterator[dict]:
    """The rows of the labels table at ``input`` that ``filters`` keeps, as dicts, read one record
    batch at a time without ``coarse_map``; every row left out is counted in ``summary.filtered``."""
    ids = None if filters.image_ids is None else pa.array(filters.image_ids, pa.string())
    for batch in iter_label_batches(input, EXPORT_COLUMNS, batch_size=batch_size):
        if ids is not None:
            chosen = batch.filter(pc.is_in(batch.column("image_id"), value_set=ids))
            summary.filtered += batch.num_rows - chosen.num_rows
            batch = chosen
        for row in batch.to_pylist():
            if filters.keeps(row):
                yield row
            else:
                summary.filtered += 1


def _top1(row: dict) -> tuple[int, str | None] | None:
    classes = row.get("topk_classes")
    if not classes:
        return None
    names = row.get("topk_names") or [None]
    return int(classes[0]), names[0]


class Categories:
    """Category ids and names, fixed by ``class_names`` where given, otherwise learnt from rows."""

    def __init__(self, source: str, class_names: Sequence[str] | None):
        if source not in CATEGORY_SOURCES:
            raise ValueError(f"category source must be one of {CATEGORY_SOURCES}, not {source!r}")
        self.source = source
        self.class_names = list(class_names) if class_names else None
        self.names: dict[int, str] = dict(enumerate(self.class_names)) if self.class_names else {}
        self._label_ids = {n: i for i, n in self.names.items()}

    def of(self, row: dict) -> int | None:
        """The category id of a row, or None if it has none (no class, no manifest label)."""
        if self.source == "label":
            label = row.get("label")
            if label is None:
                return None
            if label not in self._label_ids:
                self._label_ids[label] = len(self._label_ids)
                self.names[self._label_ids[label]] = label
            return self._label_ids[label]
        top1 = _top1(row)
        if top1 is None:
            return None
        class_id, name = top1
        if class_id not in self.names:
            self.names[class_id] = name if name is not None else str(class_id)
        return class_id

    def contiguous(self) -> dict[int, str]:
        """``names`` with every id from 0 to the largest present (YOLO needs them all)."""
        if not self.names:
            return {}
        return {i: self.names.get(i, str(i)) for i in range(max(self.names) + 1)}


def row_score(row: dict) -> float:
    """One score per row for tools that take one: ``confidence``, else ``match_score``, else 0."""
    for key in ("confidence", "match_score"):
        if row.get(key) is not None:
            return float(row[key])
    return 0.0


def _coco_box(box_xyxy: Sequence[int]) -> list[int]:
    x0, y0, x1, y1 = (int(v) for v in box_xyxy)
    return [x0, y0, x1 - x0 + 1, y1 - y0 + 1]


# ---------------------------------------------------------------- COCO


def export_coco(
    input: str,
    output: str,
    *,
    filters: LabelFilter = LabelFilter(),
    class_names: Sequence[str] | None = None,
    category: str = "top1",
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> ExportSummary:
    """Write the labels table at ``input`` as one COCO JSON file at ``output`` (local or URI).

    ``images``: ``id`` (1, 2, ...), ``file_name`` (the image URI), ``width``, ``height``,
    ``pro2sam_image_id``. ``annotations``: one per kept ok row: ``bbox`` [x, y, w, h] (pixels),
    ``segmentation`` as compressed RLE ``{size: [h, w], counts}``, ``area`` (mask pixels),
    ``iscrowd`` 0, ``category_id``, ``score`` and the other scores. ``categories``: every class
    of ``class_names`` if given, else those seen.

    Args:
        filters: which rows to keep.
        class_names: names of the class indices (e.g. :func:`pro2sam.gtformer.gtformer_class_names`); without
            them, names come from the table's ``topk_names``.
        category: ``"top1"`` (GTFormer's top-1 class) or ``"label"`` (the manifest's label).
        batch_size: rows per Parquet record batch read.
    """
    categories = Categories(category, class_names)
    summary = ExportSummary(output)
    with staged_file(output) as staged, open(staged, "w", encoding="utf-8") as out, \
            tempfile.TemporaryFile("w+", encoding="utf-8") as spool:  # fmt: skip
        out.write('{"info": {"description": "pro2sam labels", "source": %s},\n"images": [' % json.dumps(input))
        for row in kept_rows(input, filters, summary, batch_size=batch_size):
            category_id = categories.of(row) if row["status"] == STATUS_OK else None
            if row["status"] == STATUS_OK and category_id is None:
                summary.filtered += 1  # an ok row without the chosen category (no manifest label)
                continue
            summary.images += 1
            image = {
                "id": summary.images,
                "file_name": row["uri"],
                "width": row["width"],
                "height": row["height"],
                "pro2sam_image_id": row["image_id"],
            }
            out.write((",\n" if summary.images > 1 else "\n") + json.dumps(image))
            if category_id is None or row["box_xyxy"] is None or row["mask_rle"] is None:
                continue
            summary.annotations += 1
            rle = row["mask_rle"]
            top1 = _top1(row)
            annotation = {
                "id": summary.annotations,
                "image_id": summary.images,
                "category_id": category_id,
                "bbox": _coco_box(row["box_xyxy"]),
                "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"]},
                "area": int(row["mask_area"]),
                "iscrowd": 0,
                "score": row_score(row),
                # no "confidence" key: FiftyOne's importer makes score the confidence and would
                # take a second one as a clash
                "score_is": "confidence" if row.get("confidence") is not None else "match_score",
                "class_score": row["topk_scores"][0] if row["topk_scores"] else None,
                "top1_class": top1[0] if top1 else None,
                "match_score": row["match_score"],
                "pred_iou": row["pred_iou"],
                "stability_score": row["stability_score"],
                "box_source": row["box_source"],
            }
            spool.write((",\n" if summary.annotations > 1 else "\n") + json.dumps(annotation))
        out.write('\n],\n"annotations": [')
        spool.seek(0)
        while chunk := spool.read(1 << 20):
            out.write(chunk)
        summary.categories = dict(sorted(categories.names.items()))
        cats = [{"id": i, "name": n, "supercategory": "object"} for i, n in summary.categories.items()]
        out.write('\n],\n"categories": ' + json.dumps(cats) + "}\n")
    return summary


# ---------------------------------------------------------------- YOLO


def yolo_box(box_xyxy: Sequence[int], width: int, height: int) -> tuple[float, float, float, float]:
    """Inclusive pixel box -> YOLO ``(cx, cy, w, h)`` normalised by the image size."""
    x0, y0, x1, y1 = (int(v) for v in box_xyxy)
    return ((x0 + x1 + 1) / 2 / width, (y0 + y1 + 1) / 2 / height, (x1 - x0 + 1) / width, (y1 - y0 + 1) / height)


def yolo_polygon(mask: np.ndarray) -> np.ndarray | None:
    """(H, W) bool mask -> (N, 2) float polygon (x, y), normalised, through every piece of the mask.

    A YOLO segmentation line holds one polygon per object, and the stored mask may have several
    pieces (components; ``box_xyxy`` is the box of them all): each piece's outer contour is joined
    to the largest one by a zero-width bridge between their closest vertices, walked there and
    back, as Ultralytics' COCO converter joins an object's segments (``merge_multi_segment``).
    Points are pixel centres (index + 0.5), so the polygon lies inside the mask's box. None for an
    empty mask.
    """
    h, w = mask.shape
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    contours = sorted(contours, key=lambda c: (cv2.contourArea(c), len(c)), reverse=True)
    points = _join_pieces([_piece_outline(c.reshape(-1, 2).astype(np.float64) + 0.5) for c in contours])
    points[:, 0] /= w
    points[:, 1] /= h
    return np.clip(points, 0.0, 1.0)


def _piece_outline(points: np.ndarray) -> np.ndarray:
    """A piece's contour (pixel centres) as a polygon: a 1- or 2-pixel sliver gets its pixel
    corners so that it has an area."""
    if len(points) >= 3:
        return points
    xs, ys = points[:, 0], points[:, 1]
    left, right, top, bottom = xs.min() - 0.5, xs.max() + 0.5, ys.min() - 0.5, ys.max() + 0.5
    return np.array([[left, top], [right, top], [right, bottom], [left, bottom]])


def _join_pieces(pieces: list[np.ndarray]) -> np.ndarray:
    """One (N, 2) polygon through every piece: walking the first, at its vertex closest to each
    other piece it goes over to that piece, around it and back."""
    trunk = pieces[0]
    detours: dict[int, list[np.ndarray]] = {}
    for piece in pieces[1:]:
        distances = ((trunk[:, None, :] - piece[None, :, :]) ** 2).sum(-1)
        i, j = np.unravel_index(int(np.argmin(distances)), distances.shape)
        loop = np.roll(piece, -j, axis=0)
        detours.setdefault(int(i), []).append(np.concatenate([loop, loop[:1]]))
    walk = []
    for i, vertex in enumerate(trunk):
        walk.append(vertex[None])
        for loop in detours.get(i, []):
            walk += [loop, vertex[None]]
    return np.concatenate(walk)


def _label_file_name(uri: str, image_id: str, used: set[str]) -> str:
    stem = posixpath.splitext(posixpath.basename(uri.rstrip("/")))[0] or image_id
    name = stem if stem not in used else f"{stem}_{image_id}"
    used.add(name)
    return name + ".txt"


def export_yolo(
    input: str,
    output: str,
    *,
    task: str = "detect",
    filters: LabelFilter = LabelFilter(),
    class_names: Sequence[str] | None = None,
    category: str = "top1",
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> ExportSummary:
    """Write the labels table at ``input`` as YOLO labels under the folder ``output``.

    Layout: ``labels/<image stem>.txt`` (``_<image_id>`` appended when two images share a stem),
    one line per object: ``class cx cy w h`` (``task="detect"``) or ``class x1 y1 x2 y2 ...``
    (``task="segment"``, one polygon through every piece of the mask, :func:`yolo_polygon`), all
    normalised to [0, 1]; ``images.txt``, the image URIs in the order of the label files, one a
    line (an image whose URI holds a line break is left out with a warning naming it, and counted
    in ``summary.unlisted``); ``data.yaml`` with ``path``, ``train``/``val`` (``images.txt``),
    ``nc`` and ``names``. Images are not copied: trainers that pair ``images/`` with ``labels/``
    need the images placed beside ``labels/``.
    """
    if task not in YOLO_TASKS:
        raise ValueError(f"YOLO task must be one of {YOLO_TASKS}, not {task!r}")
    categories = Categories(category, class_names)
    summary = ExportSummary(output)
    with _staged_folder(output) as root:
        _write_yolo(input, root, summary, categories, task=task, filters=filters, batch_size=batch_size)
    return summary


def _write_yolo(
    input: str, root: str, summary: ExportSummary, categories: Categories, *, task: str, filters: LabelFilter, batch_size: int
) -> None:
    import yaml

    labels_dir = os.path.join(root, "labels")
    os.makedirs(labels_dir, exist_ok=True)
    used: set[str] = set()
    with open(os.path.join(root, "images.txt"), "w") as images_txt:
        for row in kept_rows(input, filters, summary, batch_size=batch_size):
            if row["status"] != STATUS_OK or row["box_xyxy"] is None:
                summary.filtered += 1
                continue
            if row["uri"].splitlines() != [row["uri"]]:  # one line of images.txt would become two
                log.warning("YOLO export: left out %r: its URI holds a line break, which images.txt cannot list", row["uri"])
                summary.unlisted += 1
                continue
            class_id = categories.of(row)
            if class_id is None:
                summary.filtered += 1
                continue
            width, height = int(row["width"]), int(row["height"])
            if task == "detect":
                values = yolo_box(row["box_xyxy"], width, height)
            else:
                polygon = yolo_polygon(decode_mask(row["mask_rle"]))
                if polygon is None:
                    summary.filtered += 1
                    continue
                values = polygon.ravel()
            line = f"{class_id} " + " ".join(f"{v:.6f}" for v in values) + "\n"
            with open(os.path.join(labels_dir, _label_file_name(row["uri"], row["image_id"], used)), "w") as f:
                f.write(line)
            images_txt.write(row["uri"] + "\n")
            summary.images += 1
            summary.annotations += 1
    summary.categories = categories.contiguous()
    data = {
        "path": summary.output,
        "train": "images.txt",
        "val": "images.txt",
        "nc": len(summary.categories),
        "names": summary.categories,
        "task": task,
    }
    with open(os.path.join(root, "data.yaml"), "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)


# ---------------------------------------------------------------- publishing an export whole


def _is_yolo_export(path: str) -> bool:
    return all(os.path.exists(os.path.join(path, n)) for n in ("data.yaml", "images.txt", "labels"))


@contextmanager
def _staged_folder(output: str) -> Iterator[str]:
    """A local folder to write an export folder to; it becomes ``output`` only when the block ends
    without an error. An existing ``output`` must be empty or an earlier YOLO export (replaced
    whole); anything else is refused before any work."""
    fs, path = filesystem(output)
    if is_remote(output):
        if fs.exists(path) and fs.ls(path):
            raise FileExistsError(f"--output {output} exists and is not empty; choose a new prefix")
        with tempfile.TemporaryDirectory(prefix="pro2sam-export-") as folder:
            yield folder
            fs.put(folder.rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)
        return
    path = os.path.abspath(path)
    if os.path.exists(path) and not (os.path.isdir(path) and (not os.listdir(path) or _is_yolo_export(path))):
        raise FileExistsError(
            f"--output {output} exists and is not an earlier YOLO export (data.yaml, images.txt, labels/); "
            "choose a new folder"
        )
    parent = os.path.dirname(path)
    make_folder(parent, output)
    staged = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        os.chmod(staged, new_folder_mode())  # mkdtemp's 0o700 would hide the export from others
        yield staged
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".old", dir=parent)
            os.rename(path, os.path.join(old, "export"))
            os.rename(staged, path)
            shutil.rmtree(old)
        else:
            os.rename(staged, path)
    finally:
        if os.path.exists(staged):
            shutil.rmtree(staged)
