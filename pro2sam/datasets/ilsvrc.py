"""ILSVRC-2012 (CLS-LOC): class folders, per-image XML or ``LOC_val_solution.csv`` boxes."""

from __future__ import annotations

import csv
import io
import posixpath
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from ..storage import exists, filesystem, join_uri, list_files
from .common import (
    IMAGE_SUFFIXES,
    DatasetError,
    Sample,
    WSOLDataset,
    boxes_array,
    check_box,
    dataset_root,
    image_sizes,
    parse_float,
    parse_int,
    read_lines,
    read_text,
)

__all__ = ["read_ilsvrc"]


def _ilsvrc_dirs(root: str) -> tuple[str, list[str]]:
    """The folder holding train/ and val/ (the root or Kaggle's Data/CLS-LOC) and the XML folders."""
    data = root
    for candidate in (join_uri(root, "Data", "CLS-LOC"), join_uri(root, "ILSVRC", "Data", "CLS-LOC")):
        if exists(candidate):
            data = candidate
            break
    annotation_dirs = [
        join_uri(root, "Annotations", "CLS-LOC"),
        join_uri(root, "ILSVRC", "Annotations", "CLS-LOC"),
        join_uri(root, "annotations"),
        join_uri(root, "Annotations"),
        data,
    ]
    return data, annotation_dirs


def _synset_names(root: str) -> tuple[list[str], dict[str, str]]:
    """wnids in file order and their display names (first synonym) from LOC_synset_mapping.txt."""
    for uri in (join_uri(root, "LOC_synset_mapping.txt"), join_uri(root, "ILSVRC", "LOC_synset_mapping.txt")):
        if exists(uri):
            order, names = [], {}
            for n, parts in read_lines(uri, None, (1, 2)):
                wnid = parts[0]
                order.append(wnid)
                names[wnid] = parts[1].split(",")[0].strip() if len(parts) > 1 else wnid
            return order, names
    return [], {}


def _image_files(folder: str) -> list[str]:
    """Names (relative to ``folder``, sorted) of the image files below it, hidden files skipped."""
    names = []
    for name in list_files(folder):
        base = posixpath.basename(name)
        if not base.startswith(".") and base.lower().endswith(IMAGE_SUFFIXES):
            names.append(name)
    return names


def _parse_xml(uri: str, text: str) -> tuple[list[tuple[str, tuple[float, ...]]], tuple[int, int] | None]:
    try:
        tree = ET.fromstring(text)
    except ET.ParseError as e:
        raise DatasetError(f"unparsable XML: {e}", file=uri, line=getattr(e, "position", (None,))[0]) from None
    size = None
    if tree.find("size") is not None:
        w, h = tree.findtext("size/width"), tree.findtext("size/height")
        if w and h:
            size = (parse_int(w, uri, 1, "size/width"), parse_int(h, uri, 1, "size/height"))
    objects = []
    for obj in tree.iter("object"):
        wnid = (obj.findtext("name") or "").strip()
        values = [obj.findtext(f"bndbox/{k}") for k in ("xmin", "ymin", "xmax", "ymax")]
        if any(v is None for v in values):
            raise DatasetError(f"object {wnid!r} has no complete bndbox", file=uri)
        objects.append((wnid, tuple(parse_float(v, uri, 1, "bndbox coordinate") for v in values)))
    return objects, size


def read_ilsvrc(root: str, split: str = "val", *, check_files: bool = True) -> WSOLDataset:
    """ILSVRC-2012 (CLS-LOC) from its class folders and box annotations.

    Layout (``root`` may also be Kaggle's, with ``Data/CLS-LOC/{train,val}`` and
    ``Annotations/CLS-LOC/val``):

    - ``train/<wnid>/*.JPEG``: the sorted wnids are the class order (1,000 classes); class names
      from ``LOC_synset_mapping.txt`` (``wnid name, synonyms``) when present, else the wnids.
    - ``val/``: images flat (``ILSVRC2012_val_00000001.JPEG``) or in ``<wnid>/`` folders; boxes and
      (for flat folders) labels from per-image XML (``<stem>.xml`` in ``val/``, in
      ``annotations/val/``, or ``Annotations/CLS-LOC/val/``) or from ``LOC_val_solution.csv``
      (``ImageId,PredictionString`` with ``wnid x0 y0 x1 y1`` repeated). Every box is kept.

    Train images have ``boxes=None``. Boxes are the annotated corners in original pixels.

    Args:
        split: ``"train"`` or ``"val"``.
        check_files: read val image sizes from the headers when no XML gives them, so that boxes
            outside the image are caught.

    Raises:
        DatasetError: unknown wnid, unparsable XML/CSV line, a val image without a label, a box
            outside its image, an annotation naming a missing image.
    """
    if split not in ("train", "val"):
        raise ValueError(f"ILSVRC split must be 'train' or 'val', got {split!r}")
    root = dataset_root(root)
    data, annotation_dirs = _ilsvrc_dirs(root)
    fs, train_path = filesystem(join_uri(data, "train"))
    synset_order, display = _synset_names(root)
    if fs.exists(train_path):
        wnids = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(train_path, detail=False) if fs.isdir(p))
    else:
        wnids = sorted(synset_order)
    if not wnids:
        raise DatasetError(f"no class folders in {join_uri(data, 'train')} and no LOC_synset_mapping.txt in {root}")
    class_index = {w: i for i, w in enumerate(wnids)}
    class_names = [display.get(w, w) for w in wnids]
    if split == "train":
        samples = []
        for wnid in wnids:
            folder = join_uri(data, "train", wnid)
            for name in _image_files(folder):
                image_id = posixpath.join("train", wnid, name)
                samples.append(Sample(image_id=image_id, uri=join_uri(folder, name), label=class_index[wnid], boxes=None))
        return WSOLDataset("ilsvrc", split, class_names, samples)
    return _read_ilsvrc_val(root, data, annotation_dirs, class_index, class_names, check_files)


@dataclass
class _ValAnnotations:
    """What the val annotations say, by image stem."""

    labels: dict[str, int] = field(default_factory=dict)
    boxes: dict[str, list[tuple[float, ...]]] = field(default_factory=dict)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    where: dict[str, tuple[str, int | None]] = field(default_factory=dict)  # (annotation file, line) for box errors

    def add(self, stem: str, label: int, box: tuple[float, ...]) -> None:
        """One annotated object: its class labels the image unless an earlier object did."""
        self.labels.setdefault(stem, label)
        self.boxes.setdefault(stem, []).append(box)


def _class_of(wnid: str, class_index: dict[str, int], uri: str, line: int | None) -> int:
    if wnid not in class_index:
        raise DatasetError(f"unknown class {wnid!r}", file=uri, line=line)
    return class_index[wnid]


def _solution_annotations(solution: str, images: dict, class_index: dict[str, int], val: str) -> _ValAnnotations:
    """Labels and boxes from Kaggle's ``LOC_val_solution.csv``."""
    found = _ValAnnotations()
    reader = csv.reader(io.StringIO(read_text(solution)))
    for n, row in enumerate(reader, start=1):
        if not row or (n == 1 and row[0].strip() == "ImageId"):
            continue
        if len(row) != 2:
            raise DatasetError(f"expected ImageId,PredictionString, got {row!r}", file=solution, line=n)
        stem, tokens = row[0].strip(), row[1].split()
        if len(tokens) % 5 or not tokens:
            raise DatasetError(
                f"PredictionString must be groups of 'wnid x0 y0 x1 y1', got {row[1]!r}", file=solution, line=n
            )
        if stem not in images:
            raise DatasetError(f"image not found: {stem} in {val}", file=solution, line=n)
        for g in range(0, len(tokens), 5):
            label = _class_of(tokens[g], class_index, solution, n)
            found.add(stem, label, tuple(parse_float(v, solution, n, "box coordinate") for v in tokens[g + 1 : g + 5]))
        found.where[stem] = (solution, n)
    return found


def _xml_annotations(annotation_dirs: list[str], images: dict, class_index: dict[str, int], val: str) -> _ValAnnotations:
    """Labels, boxes and sizes from per-image XML in the first annotation folder that has any."""
    found = _ValAnnotations()
    xml_files: dict[str, str] = {}
    for folder in annotation_dirs:
        candidate = join_uri(folder, "val")
        for name in list_files(candidate):
            if name.endswith(".xml"):
                stem = posixpath.splitext(posixpath.basename(name))[0]
                xml_files.setdefault(stem, join_uri(candidate, name))
        if xml_files:
            break
    for stem, uri in sorted(xml_files.items()):
        if stem not in images:
            raise DatasetError(f"annotation for a missing image: no {stem}.* in {val}", file=uri)
        objects, size = _parse_xml(uri, read_text(uri))
        for wnid, box in objects:
            found.add(stem, _class_of(wnid, class_index, uri, None), box)
        if size:
            found.sizes[stem] = size
        found.where[stem] = (uri, None)
    return found


def _read_ilsvrc_val(root, data, annotation_dirs, class_index, class_names, check_files) -> WSOLDataset:
    val = join_uri(data, "val")
    images: dict[str, tuple[str, str, str | None]] = {}  # stem -> (uri, name below val/, wnid from folder)
    for name in _image_files(val):
        folder_wnid = name.split("/")[0] if "/" in name else None
        images[posixpath.splitext(posixpath.basename(name))[0]] = (join_uri(val, name), name, folder_wnid)
    if not images:
        raise DatasetError(f"no images in {val}")

    candidates = (join_uri(root, "LOC_val_solution.csv"), join_uri(root, "ILSVRC", "LOC_val_solution.csv"))
    solution = next((u for u in candidates if exists(u)), None)
    if solution is not None:
        found = _solution_annotations(solution, images, class_index, val)
    else:
        found = _xml_annotations(annotation_dirs, images, class_index, val)
    labels, boxes, sizes, where = found.labels, found.boxes, found.sizes, found.where

    stems = sorted(images)
    for stem in stems:
        folder_wnid = images[stem][2]
        if folder_wnid is not None:
            if folder_wnid not in class_index:
                raise DatasetError(f"unknown class folder {folder_wnid!r} in {val}")
            labels[stem] = class_index[folder_wnid]  # the folder is the image-level label
        if stem not in labels:
            raise DatasetError(f"val image {images[stem][0]} has no label (no XML, CSV row or class folder)")
    if check_files:
        missing = [s for s in stems if s in boxes and s not in sizes]
        for stem, size in zip(missing, image_sizes([images[s][0] for s in missing])):
            if size is None:
                raise DatasetError(f"image is not readable: {images[stem][0]}", file=where[stem][0], line=where[stem][1])
            sizes[stem] = size
    samples = []
    for stem in stems:
        uri, name, _ = images[stem]
        for box in boxes.get(stem, []):
            check_box(box, sizes.get(stem), *where[stem])
        size = sizes.get(stem)
        samples.append(
            Sample(
                image_id=posixpath.join("val", name),
                uri=uri,
                label=labels[stem],
                boxes=boxes_array(boxes.get(stem)),
                width=size[0] if size else None,
                height=size[1] if size else None,
            )
        )
    return WSOLDataset("ilsvrc", "val", class_names, samples)
