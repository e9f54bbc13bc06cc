"""WSOL data sets: one reader interface over CUB-200-2011, ILSVRC, wsolevaluation metadata and manifests.

Every reader returns a :class:`WSOLDataset`: class names in class-index order and one
:class:`Sample` per image. Conventions, the same for every layout:

- ``label`` is a 0-based class index into ``class_names`` (CUB's 1-based ids are shifted).
- ``boxes`` are ``(K, 4)`` float64 ``(x0, y0, x1, y1)`` in ORIGINAL image pixels, as annotated
  (CUB's ``x, y, w, h`` becomes ``x, y, x + w, y + h``; ILSVRC's XML/CSV corners are kept as they
  are); several boxes per image are allowed and an image counts as localised if any of them is
  matched. :func:`pro2sam.metrics.scale_boxes_to_frame` brings them to the 224 evaluation frame.
  ``None`` means the layout has no boxes for that image (e.g. ILSVRC train, OpenImages).
- ``width``/``height`` are the stored image size in pixels (no EXIF rotation applied), when the
  layout gives them or ``check_files`` read them from the image headers.
- Masks (OpenImages, CUB ``segmentations/``) are PNG URIs: the GT foreground is the union of
  ``mask_uris``; ``ignore_uri`` marks pixels left out of PxAP.

Roots and files are read through fsspec, so every root may be a local path or a URI
(``s3://bucket/CUB_200_2011``). Malformed metadata raises :class:`DatasetError` naming the file and
the 1-based line number.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from .storage import filesystem, is_remote, join_uri

__all__ = [
    "DatasetError",
    "Sample",
    "WSOLDataset",
    "MANIFEST_COLUMNS",
    "read_cub",
    "read_ilsvrc",
    "read_wsol_metadata",
    "read_manifest",
    "open_dataset",
]

# A box may reach the image size (CUB's x + w, ILSVRC's xmax = width) and one pixel past it
# (1-based annotations); anything further is an annotation error.
BOX_SLACK_PX = 1.0
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_HEADER_THREADS = 16
_MANIFEST_META_KEY = b"pro2sam.dataset"
# Class counts of wsolevaluation's data sets, by metadata folder name (metadata/CUB, metadata/ILSVRC, ...).
_WSOL_NUM_CLASSES = {"cub": 200, "ilsvrc": 1000, "openimages": 100}

# Columns of :meth:`WSOLDataset.to_manifest` (and what :func:`read_manifest` understands).
MANIFEST_COLUMNS = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("image_id", pa.string()),
        pa.field("label_index", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("x0", pa.float64()),
        pa.field("y0", pa.float64()),
        pa.field("x1", pa.float64()),
        pa.field("y1", pa.float64()),
        pa.field("mask_uri", pa.string()),
        pa.field("ignore_uri", pa.string()),
    ]
)


class DatasetError(ValueError):
    """Malformed or inconsistent data-set metadata; the message names the file and line."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None) -> None:
        where = f"{file}:{line}: " if file and line else f"{file}: " if file else ""
        super().__init__(where + message)
        self.file = file
        self.line = line


@dataclass(frozen=True)
class Sample:
    """One image of a WSOL data set.

    Attributes:
        image_id: stable id from the layout (CUB's numeric id, the path relative to the root).
        uri: local path or fsspec URI of the image.
        label: 0-based class index.
        boxes: (K, 4) float64 ``(x0, y0, x1, y1)`` in original image pixels, or None if unknown.
        mask_uri: the GT mask PNG (first instance) if any.
        ignore_uri: PNG of pixels ignored by PxAP, if any.
        width, height: stored image size in pixels, if known.
        mask_uris: every instance mask PNG; the GT foreground is their union (``mask_uri`` is the
            first of them).
    """

    image_id: str
    uri: str
    label: int
    boxes: np.ndarray | None
    mask_uri: str | None = None
    ignore_uri: str | None = None
    width: int | None = None
    height: int | None = None
    mask_uris: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.mask_uri and not self.mask_uris:
            object.__setattr__(self, "mask_uris", (self.mask_uri,))
        elif self.mask_uris and not self.mask_uri:
            object.__setattr__(self, "mask_uri", self.mask_uris[0])

    @property
    def size(self) -> tuple[int, int] | None:
        """(width, height) in pixels, or None if unknown."""
        return (self.width, self.height) if self.width and self.height else None


@dataclass
class WSOLDataset:
    """A split of a WSOL data set: ``class_names[sample.label]`` names each sample's class."""

    name: str
    split: str
    class_names: list[str]
    samples: list[Sample]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def has_boxes(self) -> bool:
        return any(s.boxes is not None and len(s.boxes) for s in self.samples)

    @property
    def has_masks(self) -> bool:
        return any(s.mask_uris for s in self.samples)

    def by_uri(self) -> dict[str, Sample]:
        """Samples keyed by image URI (how the labels table is joined with the ground truth)."""
        return {s.uri: s for s in self.samples}

    def to_manifest(self) -> pa.Table:
        """The split as a manifest for the labeling job (:data:`MANIFEST_COLUMNS`).

        One row per box (and per instance mask; at least one row per image): ``uri``, ``label``
        (the class NAME), ``image_id``, ``label_index``, ``width``, ``height``, ``x0..y1``
        (original pixels, null without boxes), ``mask_uri``, ``ignore_uri``. The labeling job keeps
        the first row of each URI; :func:`read_manifest` regroups the rows into samples. The class
        list, data-set name and split travel in the schema metadata (kept by Parquet, not CSV).
        """
        columns: dict[str, list] = {f.name: [] for f in MANIFEST_COLUMNS}
        for s in self.samples:
            boxes = [] if s.boxes is None else [tuple(float(v) for v in b) for b in s.boxes]
            masks = list(s.mask_uris)
            for i in range(max(1, len(boxes), len(masks))):
                box = boxes[i] if i < len(boxes) else (None,) * 4
                columns["uri"].append(s.uri)
                columns["label"].append(self.class_names[s.label])
                columns["image_id"].append(s.image_id)
                columns["label_index"].append(s.label)
                columns["width"].append(s.width)
                columns["height"].append(s.height)
                for name, v in zip(("x0", "y0", "x1", "y1"), box):
                    columns[name].append(v)
                columns["mask_uri"].append(masks[i] if i < len(masks) else None)
                columns["ignore_uri"].append(s.ignore_uri)
        meta = {_MANIFEST_META_KEY: json.dumps({"name": self.name, "split": self.split, "class_names": self.class_names})}
        return pa.Table.from_pydict(columns, schema=MANIFEST_COLUMNS.with_metadata(meta))


# ---------------------------------------------------------------- helpers


def _root(uri: str) -> str:
    uri = os.fspath(uri)
    return uri.rstrip("/") if is_remote(uri) else os.path.abspath(uri)


def _join(base: str, *names: str) -> str:
    for name in names:
        base = join_uri(base, name)
    return base


def _fs_path(uri: str) -> str:
    fs, path = filesystem(uri)
    return fs._strip_protocol(path)


def _exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def _read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DatasetError("file not found", file=uri) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"not UTF-8 text: {e}", file=uri) from None


def _lines(uri: str, sep: str | None, fields: int | Sequence[int]) -> Iterable[tuple[int, list[str]]]:
    """(1-based line number, fields) of each non-blank line; a wrong field count is an error."""
    allowed = (fields,) if isinstance(fields, int) else tuple(fields)
    for n, line in enumerate(_read_text(uri).splitlines(), start=1):
        if not line.strip():
            continue
        parts = [p.strip() for p in (line.split(sep) if sep else line.split(None, max(allowed) - 1))]
        if len(parts) not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise DatasetError(f"expected {want} fields, got {len(parts)}: {line!r}", file=uri, line=n)
        yield n, parts


def _int(value: str, uri: str, line: int, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DatasetError(f"{what} is not an integer: {value!r}", file=uri, line=line) from None


def _float(value: str, uri: str, line: int, what: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise DatasetError(f"{what} is not a number: {value!r}", file=uri, line=line) from None
    if not np.isfinite(v):
        raise DatasetError(f"{what} is not finite: {value!r}", file=uri, line=line)
    return v


def _check_box(box: Sequence[float], size: tuple[int, int] | None, uri: str, line: int | None) -> None:
    x0, y0, x1, y1 = box
    if x1 < x0 or y1 < y0:
        raise DatasetError(f"box {list(box)} has x1 < x0 or y1 < y0", file=uri, line=line)
    if x0 < 0 or y0 < 0:
        raise DatasetError(f"box {list(box)} lies outside the image (negative coordinate)", file=uri, line=line)
    if size is not None:
        w, h = size
        if x1 > w + BOX_SLACK_PX or y1 > h + BOX_SLACK_PX:
            raise DatasetError(f"box {list(box)} lies outside the {w}x{h} image", file=uri, line=line)


def _list_files(root: str) -> set[str]:
    """Every file under ``root``, as filesystem paths (for membership tests)."""
    fs, path = filesystem(root)
    if not fs.exists(path):
        return set()
    return {fs._strip_protocol(p) for p in fs.find(path)}


def _image_size(uri: str) -> tuple[int, int]:
    from PIL import Image

    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        with Image.open(f) as image:  # reads the header only
            return image.size


def _image_sizes(uris: Sequence[str]) -> list[tuple[int, int] | None]:
    def size(uri: str) -> tuple[int, int] | None:
        try:
            return _image_size(uri)
        except Exception:
            return None

    with ThreadPoolExecutor(max_workers=_HEADER_THREADS) as pool:
        return list(pool.map(size, uris))


def _require_image(uri: str, files: set[str] | None, meta: str, line: int | None) -> None:
    if files is not None and _fs_path(uri) not in files:
        raise DatasetError(f"image not found: {uri}", file=meta, line=line)


# ---------------------------------------------------------------- CUB-200-2011


def read_cub(root: str, split: str = "train", *, check_files: bool = True) -> WSOLDataset:
    """CUB-200-2011 in its released layout.

    ``root`` holds ``images/``, ``images.txt`` (``id path``), ``image_class_labels.txt`` (``id
    class_id``, 1-based), ``train_test_split.txt`` (``id is_train``), ``bounding_boxes.txt`` (``id
    x y width height`` in pixels, becoming ``x, y, x + width, y + height``) and ``classes.txt``
    (``class_id name``); ``segmentations/<path>.png`` (soft masks) are used when present.

    Args:
        split: ``"train"`` (5,994 images) or ``"test"`` (5,794).
        check_files: check every image exists and read its size from the header, so that boxes
            outside the image are caught (one header read per image).

    Raises:
        DatasetError: a malformed or inconsistent metadata line (file and line named), a missing
            image, a box outside its image.
    """
    if split not in ("train", "test"):
        raise ValueError(f"CUB split must be 'train' or 'test', got {split!r}")
    root = _root(root)
    f_classes = _join(root, "classes.txt")
    f_images = _join(root, "images.txt")
    f_labels = _join(root, "image_class_labels.txt")
    f_split = _join(root, "train_test_split.txt")
    f_boxes = _join(root, "bounding_boxes.txt")

    class_ids: dict[int, int] = {}
    class_names: list[str] = []
    for n, (cid, name) in _lines(f_classes, None, 2):
        class_ids[_int(cid, f_classes, n, "class id")] = len(class_names)
        class_names.append(name)
    if sorted(class_ids) != list(range(1, len(class_ids) + 1)):
        raise DatasetError("class ids must be 1..N in order", file=f_classes)

    paths: dict[str, tuple[str, int]] = {}
    for n, (iid, path) in _lines(f_images, None, 2):
        paths[iid] = (path, n)
    labels: dict[str, int] = {}
    for n, (iid, cid) in _lines(f_labels, None, 2):
        c = _int(cid, f_labels, n, "class id")
        if c not in class_ids:
            raise DatasetError(f"unknown class id {c} (classes.txt has 1..{len(class_ids)})", file=f_labels, line=n)
        if iid not in paths:
            raise DatasetError(f"image id {iid} is not in images.txt", file=f_labels, line=n)
        labels[iid] = class_ids[c]
    in_split: dict[str, bool] = {}
    for n, (iid, flag) in _lines(f_split, None, 2):
        if flag not in ("0", "1"):
            raise DatasetError(f"is_train must be 0 or 1, got {flag!r}", file=f_split, line=n)
        if iid not in paths:
            raise DatasetError(f"image id {iid} is not in images.txt", file=f_split, line=n)
        in_split[iid] = (flag == "1") == (split == "train")
    boxes: dict[str, list[tuple[tuple[float, ...], int]]] = {}
    if _exists(f_boxes):
        for n, (iid, *xywh) in _lines(f_boxes, None, 5):
            if iid not in paths:
                raise DatasetError(f"image id {iid} is not in images.txt", file=f_boxes, line=n)
            x, y, w, h = (_float(v, f_boxes, n, "box coordinate") for v in xywh)
            if w < 0 or h < 0:
                raise DatasetError(f"box has negative width or height: {xywh}", file=f_boxes, line=n)
            boxes.setdefault(iid, []).append(((x, y, x + w, y + h), n))

    for iid, (_, n) in paths.items():
        if iid not in labels:
            raise DatasetError(f"image id {iid} has no class in {f_labels}", file=f_images, line=n)
        if iid not in in_split:
            raise DatasetError(f"image id {iid} has no split in {f_split}", file=f_images, line=n)
    ids = sorted((iid for iid in paths if in_split[iid]), key=lambda i: (len(i), i))
    uris = [_join(root, "images", paths[iid][0]) for iid in ids]
    segmentations = _join(root, "segmentations")
    seg_files = _list_files(segmentations)
    sizes: list[tuple[int, int] | None] = [None] * len(ids)
    if check_files:
        files = _list_files(_join(root, "images"))
        for iid, uri in zip(ids, uris):
            _require_image(uri, files, f_images, paths[iid][1])
        sizes = _image_sizes(uris)
        for iid, uri, size in zip(ids, uris, sizes):
            if size is None:
                raise DatasetError(f"image is not readable: {uri}", file=f_images, line=paths[iid][1])

    samples = []
    for iid, uri, size in zip(ids, uris, sizes):
        for box, n in boxes.get(iid, []):
            _check_box(box, size, f_boxes, n)
        seg = _join(segmentations, posixpath.splitext(paths[iid][0])[0] + ".png")
        samples.append(
            Sample(
                image_id=iid,
                uri=uri,
                label=labels[iid],
                boxes=np.array([b for b, _ in boxes[iid]], dtype=np.float64) if iid in boxes else None,
                mask_uri=seg if _fs_path(seg) in seg_files else None,
                width=size[0] if size else None,
                height=size[1] if size else None,
            )
        )
    return WSOLDataset("cub", split, class_names, samples)


# ---------------------------------------------------------------- ILSVRC


def _ilsvrc_dirs(root: str) -> tuple[str, list[str]]:
    """The folder holding train/ and val/ (the root or Kaggle's Data/CLS-LOC) and the XML folders."""
    data = root
    for candidate in (_join(root, "Data", "CLS-LOC"), _join(root, "ILSVRC", "Data", "CLS-LOC")):
        if _exists(candidate):
            data = candidate
            break
    annotation_dirs = [
        _join(root, "Annotations", "CLS-LOC"),
        _join(root, "ILSVRC", "Annotations", "CLS-LOC"),
        _join(root, "annotations"),
        _join(root, "Annotations"),
        data,
    ]
    return data, annotation_dirs


def _synset_names(root: str) -> tuple[list[str], dict[str, str]]:
    """wnids in file order and their display names (first synonym) from LOC_synset_mapping.txt."""
    for uri in (_join(root, "LOC_synset_mapping.txt"), _join(root, "ILSVRC", "LOC_synset_mapping.txt")):
        if _exists(uri):
            order, names = [], {}
            for n, parts in _lines(uri, None, (1, 2)):
                wnid = parts[0]
                order.append(wnid)
                names[wnid] = parts[1].split(",")[0].strip() if len(parts) > 1 else wnid
            return order, names
    return [], {}


def _parse_xml(uri: str, text: str) -> tuple[list[tuple[str, tuple[float, ...]]], tuple[int, int] | None]:
    try:
        tree = ET.fromstring(text)
    except ET.ParseError as e:
        raise DatasetError(f"unparsable XML: {e}", file=uri, line=getattr(e, "position", (None,))[0]) from None
    size = None
    if tree.find("size") is not None:
        w, h = tree.findtext("size/width"), tree.findtext("size/height")
        if w and h:
            size = (_int(w, uri, 1, "size/width"), _int(h, uri, 1, "size/height"))
    objects = []
    for obj in tree.iter("object"):
        wnid = (obj.findtext("name") or "").strip()
        values = [obj.findtext(f"bndbox/{k}") for k in ("xmin", "ymin", "xmax", "ymax")]
        if any(v is None for v in values):
            raise DatasetError(f"object {wnid!r} has no complete bndbox", file=uri)
        objects.append((wnid, tuple(_float(v, uri, 1, "bndbox coordinate") for v in values)))
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
    root = _root(root)
    data, annotation_dirs = _ilsvrc_dirs(root)
    fs, train_path = filesystem(_join(data, "train"))
    synset_order, display = _synset_names(root)
    if fs.exists(train_path):
        wnids = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(train_path, detail=False) if fs.isdir(p))
    else:
        wnids = sorted(synset_order)
    if not wnids:
        raise DatasetError(f"no class folders in {_join(data, 'train')} and no LOC_synset_mapping.txt in {root}")
    class_index = {w: i for i, w in enumerate(wnids)}
    class_names = [display.get(w, w) for w in wnids]
    if split == "train":
        samples = []
        for wnid in wnids:
            folder = _join(data, "train", wnid)
            fs_, path = filesystem(folder)
            for p in sorted(fs_.find(path)):
                name = posixpath.basename(p)
                if name.startswith(".") or not name.lower().endswith(_IMAGE_SUFFIXES):
                    continue
                uri = fs_.unstrip_protocol(p) if is_remote(folder) else p
                rel = posixpath.relpath(fs_._strip_protocol(p), _fs_path(data))
                samples.append(Sample(image_id=rel, uri=uri, label=class_index[wnid], boxes=None))
        return WSOLDataset("ilsvrc", split, class_names, samples)
    return _read_ilsvrc_val(root, data, annotation_dirs, class_index, class_names, check_files)


def _read_ilsvrc_val(root, data, annotation_dirs, class_index, class_names, check_files) -> WSOLDataset:
    val = _join(data, "val")
    fs, val_path = filesystem(val)
    val_fs_path = fs._strip_protocol(val_path)
    images: dict[str, tuple[str, str | None]] = {}  # stem -> (uri, wnid from folder)
    for p in sorted(fs.find(val_path)):
        name = posixpath.basename(p)
        if name.startswith(".") or not name.lower().endswith(_IMAGE_SUFFIXES):
            continue
        rel = posixpath.relpath(fs._strip_protocol(p), val_fs_path)
        folder_wnid = rel.split("/")[0] if "/" in rel else None
        images[posixpath.splitext(name)[0]] = (_join(val, rel), folder_wnid)
    if not images:
        raise DatasetError(f"no images in {val}")

    labels: dict[str, int] = {}
    boxes: dict[str, list[tuple[float, ...]]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    where: dict[str, tuple[str, int | None]] = {}  # stem -> (annotation file, line) for box errors

    candidates = (_join(root, "LOC_val_solution.csv"), _join(root, "ILSVRC", "LOC_val_solution.csv"))
    solution = next((u for u in candidates if _exists(u)), None)
    if solution is not None:
        reader = csv.reader(io.StringIO(_read_text(solution)))
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
                wnid = tokens[g]
                if wnid not in class_index:
                    raise DatasetError(f"unknown class {wnid!r}", file=solution, line=n)
                labels.setdefault(stem, class_index[wnid])
                box = tuple(_float(v, solution, n, "box coordinate") for v in tokens[g + 1 : g + 5])
                boxes.setdefault(stem, []).append(box)
            where[stem] = (solution, n)
    else:
        xml_files: dict[str, str] = {}
        for folder in annotation_dirs:
            candidate = _join(folder, "val")
            fs_x, path_x = filesystem(candidate)
            if not fs_x.exists(path_x):
                continue
            for p in fs_x.find(path_x):
                if p.endswith(".xml"):
                    stem = posixpath.splitext(posixpath.basename(p))[0]
                    xml_files.setdefault(stem, fs_x.unstrip_protocol(p) if is_remote(candidate) else p)
            if xml_files:
                break
        for stem, uri in sorted(xml_files.items()):
            if stem not in images:
                raise DatasetError(f"annotation for a missing image: no {stem}.* in {val}", file=uri)
            objects, size = _parse_xml(uri, _read_text(uri))
            for wnid, box in objects:
                if wnid not in class_index:
                    raise DatasetError(f"unknown class {wnid!r}", file=uri)
                labels.setdefault(stem, class_index[wnid])
                boxes.setdefault(stem, []).append(box)
            if size:
                sizes[stem] = size
            where[stem] = (uri, None)

    stems = sorted(images)
    for stem in stems:
        folder_wnid = images[stem][1]
        if folder_wnid is not None:
            if folder_wnid not in class_index:
                raise DatasetError(f"unknown class folder {folder_wnid!r} in {val}")
            labels[stem] = class_index[folder_wnid]  # the folder is the image-level label
        if stem not in labels:
            raise DatasetError(f"val image {images[stem][0]} has no label (no XML, CSV row or class folder)")
    if check_files:
        missing = [s for s in stems if s in boxes and s not in sizes]
        for stem, size in zip(missing, _image_sizes([images[s][0] for s in missing])):
            if size is None:
                raise DatasetError(f"image is not readable: {images[stem][0]}", file=where[stem][0], line=where[stem][1])
            sizes[stem] = size
    samples = []
    for stem in stems:
        uri = images[stem][0]
        for box in boxes.get(stem, []):
            _check_box(box, sizes.get(stem), *where[stem])
        size = sizes.get(stem)
        samples.append(
            Sample(
                image_id=posixpath.relpath(_fs_path(uri), _fs_path(data)),
                uri=uri,
                label=labels[stem],
                boxes=np.array(boxes[stem], dtype=np.float64) if stem in boxes else None,
                width=size[0] if size else None,
                height=size[1] if size else None,
            )
        )
    return WSOLDataset("ilsvrc", "val", class_names, samples)


# ---------------------------------------------------------------- wsolevaluation metadata


def _class_names_file(*folders: str) -> list[str] | None:
    for folder in folders:
        uri = _join(folder, "class_names.txt")
        if _exists(uri):
            return [parts[0] for _, parts in _lines(uri, "\n", 1)]
    return None


def read_wsol_metadata(
    metadata_root: str, data_root: str, split: str, *, class_names: Sequence[str] | None = None, check_files: bool = True
) -> WSOLDataset:
    """A split in ``clovaai/wsolevaluation``'s metadata layout.

    ``metadata_root/<split>/`` (or ``metadata_root`` itself if it holds the files) contains
    ``image_ids.txt`` (one image path per line, relative to ``data_root``), ``class_labels.txt``
    (``path,label``, 0-based), ``image_sizes.txt`` (``path,width,height``), and optionally
    ``localization.txt``: ``path,x0,y0,x1,y1`` (one line per box, original pixels) or, for
    OpenImages, ``path,mask_png,ignore_png`` (one line per instance mask, paths relative to
    ``data_root``, ``ignore_png`` may be empty). Class names come from ``class_names`` or an
    optional ``class_names.txt`` (one per line, index order) in the split or metadata folder, else
    they are the indices as strings, as many as the largest label + 1 or, for a metadata folder
    named CUB / ILSVRC / OpenImages, 200 / 1000 / 100 (so that all splits agree).

    Args:
        split: folder name, e.g. ``train``, ``train-fullsup``, ``val``, ``test``.
        check_files: check that every image exists under ``data_root``.

    Raises:
        DatasetError: malformed lines, paths not in ``image_ids.txt``, labels out of range, boxes
            outside ``image_sizes.txt``, missing images.
    """
    metadata_root, data_root = _root(metadata_root), _root(data_root)
    folder = _join(metadata_root, split)
    if not _exists(_join(folder, "image_ids.txt")) and _exists(_join(metadata_root, "image_ids.txt")):
        folder = metadata_root
    f_ids, f_labels = _join(folder, "image_ids.txt"), _join(folder, "class_labels.txt")
    f_sizes, f_loc = _join(folder, "image_sizes.txt"), _join(folder, "localization.txt")

    order: list[str] = []
    line_of: dict[str, int] = {}
    for n, (path,) in _lines(f_ids, "\n", 1):
        if path in line_of:
            raise DatasetError(f"duplicate image {path!r} (first on line {line_of[path]})", file=f_ids, line=n)
        order.append(path)
        line_of[path] = n

    def known(path: str, uri: str, n: int) -> str:
        if path not in line_of:
            raise DatasetError(f"image {path!r} is not in image_ids.txt", file=uri, line=n)
        return path

    labels = {known(p, f_labels, n): _int(c, f_labels, n, "class label") for n, (p, c) in _lines(f_labels, ",", 2)}
    names = list(class_names) if class_names is not None else _class_names_file(folder, metadata_root)
    if names is None:
        # every split of a data set must agree on the class count, even one missing the last class
        expected = _WSOL_NUM_CLASSES.get(posixpath.basename(metadata_root.rstrip("/")).lower(), 0)
        names = [str(i) for i in range(max(max(labels.values(), default=-1) + 1, expected))]
    for n, (p, c) in _lines(f_labels, ",", 2):
        if not 0 <= labels[p] < len(names):
            raise DatasetError(f"unknown class {labels[p]} (classes 0..{len(names) - 1})", file=f_labels, line=n)
    sizes: dict[str, tuple[int, int]] = {}
    if _exists(f_sizes):
        for n, (p, w, h) in _lines(f_sizes, ",", 3):
            sizes[known(p, f_sizes, n)] = (_int(w, f_sizes, n, "width"), _int(h, f_sizes, n, "height"))
    boxes: dict[str, list[tuple[float, ...]]] = {}
    masks: dict[str, list[str]] = {}
    ignores: dict[str, str] = {}
    if _exists(f_loc):
        for n, parts in _lines(f_loc, ",", (2, 3, 5)):
            p = known(parts[0], f_loc, n)
            if len(parts) == 5:
                box = tuple(_float(v, f_loc, n, "box coordinate") for v in parts[1:])
                _check_box(box, sizes.get(p), f_loc, n)
                boxes.setdefault(p, []).append(box)
            else:
                if not parts[1]:
                    raise DatasetError("empty mask path", file=f_loc, line=n)
                masks.setdefault(p, []).append(_join(data_root, parts[1]))
                if len(parts) == 3 and parts[2]:
                    ignores[p] = _join(data_root, parts[2])

    files = None
    if check_files:  # list only the folder the split lives in (ILSVRC's val/, not its 1.2M train images)
        relative = order + [m[len(data_root) + 1 :] for ms in masks.values() for m in ms] + [
            i[len(data_root) + 1 :] for i in ignores.values()
        ]
        common = posixpath.commonpath([posixpath.dirname(r) for r in relative]) if relative else ""
        files = _list_files(_join(data_root, common) if common else data_root)
    samples = []
    for path in order:
        n = line_of[path]
        if path not in labels:
            raise DatasetError(f"image {path!r} has no line in class_labels.txt", file=f_ids, line=n)
        uri = _join(data_root, path)
        _require_image(uri, files, f_ids, n)
        for m in masks.get(path, []) + ([ignores[path]] if path in ignores else []):
            if files is not None and _fs_path(m) not in files:
                raise DatasetError(f"mask not found: {m}", file=f_loc)
        size = sizes.get(path)
        samples.append(
            Sample(
                image_id=path,
                uri=uri,
                label=labels[path],
                boxes=np.array(boxes[path], dtype=np.float64) if path in boxes else None,
                ignore_uri=ignores.get(path),
                width=size[0] if size else None,
                height=size[1] if size else None,
                mask_uris=tuple(masks.get(path, ())),
            )
        )
    name = posixpath.basename(metadata_root.rstrip("/")).lower() or "wsol"
    return WSOLDataset(name, split, names, samples)


# ---------------------------------------------------------------- manifests


def read_manifest(uri: str, *, class_names: Sequence[str] | None = None) -> WSOLDataset:
    """A manifest ``.csv`` or ``.parquet`` on any fsspec URI (e.g. from :meth:`WSOLDataset.to_manifest`).

    Columns: ``uri`` (relative URIs are relative to the manifest's folder), ``label`` (class name
    or integer index), optional ``x0, y0, x1, y1`` (original pixels; several rows with the same
    ``uri`` give several boxes; null or empty for no box), optional ``image_id`` (default: the
    ``uri`` as written), ``width``, ``height``, ``mask_uri``, ``ignore_uri``, ``label_index``.

    Class order: ``class_names`` if given; else the list stored by :meth:`WSOLDataset.to_manifest`
    in the Parquet metadata; else from ``label_index``; else integer labels are their own index
    and names are sorted.

    Raises:
        DatasetError: unreadable file, no ``uri``/``label`` column, an unknown class name, an
            unparsable number, a box outside ``width``/``height``, conflicting labels for one
            image. Line numbers count the CSV header as line 1 (Parquet: data row + 1).
    """
    import pyarrow.parquet as pq

    source = os.fspath(uri)
    if not is_remote(source):
        source = os.path.abspath(source)
    fs, path = filesystem(source)
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DatasetError("manifest not found", file=source) from None
    meta: dict = {}
    try:
        if path.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(data))
            raw = (table.schema.metadata or {}).get(_MANIFEST_META_KEY)
            meta = json.loads(raw) if raw else {}
            rows = table.to_pylist()
            first_line = 2
        else:
            reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
            rows = list(reader)
            first_line = 2
    except (pa.ArrowInvalid, UnicodeDecodeError, csv.Error, OSError) as e:
        raise DatasetError(f"unreadable manifest: {e}", file=source) from None
    columns = set(rows[0]) if rows else set()
    for required in ("uri", "label"):
        if rows and required not in columns:
            raise DatasetError(f"manifest has no {required!r} column (columns: {sorted(columns)})", file=source)
    base = source.rsplit("/", 1)[0] if is_remote(source) else os.path.dirname(path)

    def empty(v) -> bool:
        return v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, float) and np.isnan(v))

    def as_int(v, n, what) -> int | None:
        if empty(v):
            return None
        if isinstance(v, (int, np.integer)):
            return int(v)
        if isinstance(v, float) and v.is_integer():
            return int(v)
        return _int(str(v).strip(), source, n, what)

    # class order
    names = list(class_names) if class_names is not None else meta.get("class_names")
    raw_labels = [r.get("label") for r in rows]

    def is_index(v) -> bool:
        return isinstance(v, (int, np.integer)) or (isinstance(v, str) and v.strip().lstrip("-").isdigit())

    if names is None:
        if "label_index" in columns:
            pairs = {}
            for i, r in enumerate(rows):
                idx = as_int(r.get("label_index"), i + first_line, "label_index")
                if idx is not None and not empty(r.get("label")):
                    pairs[idx] = str(r["label"]).strip()
            names = [pairs.get(i, str(i)) for i in range(max(pairs, default=-1) + 1)]
        elif raw_labels and all(is_index(v) for v in raw_labels if not empty(v)):
            names = [str(i) for i in range(max((int(v) for v in raw_labels if not empty(v)), default=-1) + 1)]
        else:
            names = sorted({str(v).strip() for v in raw_labels if not empty(v)})
    index_of = {name: i for i, name in enumerate(names)}

    grouped: dict[str, dict] = {}
    for i, r in enumerate(rows):
        n = i + first_line
        if empty(r.get("uri")):
            raise DatasetError("empty uri", file=source, line=n)
        u = str(r["uri"]).strip()
        full = u if "://" in u or os.path.isabs(u) else join_uri(base, u)
        v = r.get("label")
        if empty(v):
            raise DatasetError(f"image {u!r} has no label", file=source, line=n)
        if str(v).strip() in index_of:
            label = index_of[str(v).strip()]
        elif is_index(v):
            label = int(v)
        else:
            raise DatasetError(f"unknown class {v!r}", file=source, line=n)
        if not 0 <= label < len(names):
            raise DatasetError(f"class index {label} out of range 0..{len(names) - 1}", file=source, line=n)
        g = grouped.setdefault(
            full,
            {"line": n, "image_id": u, "label": label, "boxes": [], "masks": [], "ignore": None, "w": None, "h": None},
        )
        if g["label"] != label:
            raise DatasetError(f"image {u!r} has label {v!r} here but another on line {g['line']}", file=source, line=n)
        if not empty(r.get("image_id")):
            g["image_id"] = str(r["image_id"])
        w, h = as_int(r.get("width"), n, "width"), as_int(r.get("height"), n, "height")
        g["w"], g["h"] = w or g["w"], h or g["h"]
        coords = [r.get(k) for k in ("x0", "y0", "x1", "y1")]
        if not all(empty(c) for c in coords):
            if any(empty(c) for c in coords):
                raise DatasetError(f"incomplete box {coords}", file=source, line=n)
            box = tuple(_float(str(c), source, n, "box coordinate") for c in coords)
            _check_box(box, (g["w"], g["h"]) if g["w"] and g["h"] else None, source, n)
            g["boxes"].append(box)
        for key, target in (("mask_uri", "masks"), ("ignore_uri", "ignore")):
            m = r.get(key)
            if not empty(m):
                m = str(m).strip()
                m = m if "://" in m or os.path.isabs(m) else join_uri(base, m)
                if target == "masks":
                    g["masks"].append(m)
                else:
                    g["ignore"] = m
    samples = [
        Sample(
            image_id=g["image_id"],
            uri=full,
            label=g["label"],
            boxes=np.array(g["boxes"], dtype=np.float64) if g["boxes"] else None,
            ignore_uri=g["ignore"],
            width=g["w"],
            height=g["h"],
            mask_uris=tuple(g["masks"]),
        )
        for full, g in grouped.items()
    ]
    name = meta.get("name") or posixpath.splitext(posixpath.basename(path))[0]
    return WSOLDataset(name, meta.get("split") or "manifest", list(names), samples)


# ---------------------------------------------------------------- one way in


def open_dataset(spec: str, *, check_files: bool = True) -> WSOLDataset:
    """A data set from a one-string spec (command lines, job configs).

    ``cub:ROOT:SPLIT``, ``ilsvrc:ROOT:SPLIT``, ``wsol:METADATA_ROOT:DATA_ROOT:SPLIT``, or the path
    or URI of a manifest ``.csv``/``.parquet``. Roots may be URIs (``cub:s3://bucket/CUB:test``):
    the split is the last ``:`` field and scheme separators (``://``) are kept together.
    """
    kind, _, rest = spec.partition(":")
    if kind in ("cub", "ilsvrc", "wsol") and rest:
        parts = _split_spec(rest)
        want = 3 if kind == "wsol" else 2
        if len(parts) != want:
            form = "wsol:METADATA_ROOT:DATA_ROOT:SPLIT" if kind == "wsol" else f"{kind}:ROOT:SPLIT"
            raise ValueError(f"data-set spec {spec!r} must look like {form}")
        if kind == "cub":
            return read_cub(parts[0], parts[1], check_files=check_files)
        if kind == "ilsvrc":
            return read_ilsvrc(parts[0], parts[1], check_files=check_files)
        return read_wsol_metadata(parts[0], parts[1], parts[2], check_files=check_files)
    if spec.endswith((".csv", ".parquet")):
        return read_manifest(spec)
    raise ValueError(
        f"unknown data-set spec {spec!r}: use cub:ROOT:SPLIT, ilsvrc:ROOT:SPLIT, "
        "wsol:METADATA_ROOT:DATA_ROOT:SPLIT or a manifest .csv/.parquet"
    )


def _split_spec(rest: str) -> list[str]:
    """Split on ':' but keep ``scheme://`` URIs whole."""
    raw = rest.split(":")
    parts: list[str] = []
    for piece in raw:
        if parts and piece.startswith("//") and "/" not in parts[-1] and parts[-1]:
            parts[-1] = parts[-1] + ":" + piece
        else:
            parts.append(piece)
    return parts
