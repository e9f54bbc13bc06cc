"""CUB-200-2011 in its released layout."""

from __future__ import annotations

import posixpath

from ..storage import exists, join_uri
from .common import (
    DatasetError,
    Sample,
    WSOLDataset,
    boxes_array,
    check_box,
    dataset_root,
    file_set,
    image_sizes,
    parse_float,
    parse_int,
    read_lines,
    require_image,
)

__all__ = ["read_cub"]


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
    root = dataset_root(root)
    f_classes = join_uri(root, "classes.txt")
    f_images = join_uri(root, "images.txt")
    f_labels = join_uri(root, "image_class_labels.txt")
    f_split = join_uri(root, "train_test_split.txt")
    f_boxes = join_uri(root, "bounding_boxes.txt")

    class_ids: dict[int, int] = {}
    class_names: list[str] = []
    for n, (cid, name) in read_lines(f_classes, None, 2):
        class_ids[parse_int(cid, f_classes, n, "class id")] = len(class_names)
        class_names.append(name)
    if sorted(class_ids) != list(range(1, len(class_ids) + 1)):
        raise DatasetError("class ids must be 1..N in order", file=f_classes)

    paths: dict[str, tuple[str, int]] = {}
    for n, (iid, path) in read_lines(f_images, None, 2):
        paths[iid] = (path, n)
    labels: dict[str, int] = {}
    for n, (iid, cid) in read_lines(f_labels, None, 2):
        c = parse_int(cid, f_labels, n, "class id")
        if c not in class_ids:
            raise DatasetError(f"unknown class id {c} (classes.txt has 1..{len(class_ids)})", file=f_labels, line=n)
        if iid not in paths:
            raise DatasetError(f"image id {iid} is not in images.txt", file=f_labels, line=n)
        labels[iid] = class_ids[c]
    in_split: dict[str, bool] = {}
    for n, (iid, flag) in read_lines(f_split, None, 2):
        if flag not in ("0", "1"):
            raise DatasetError(f"is_train must be 0 or 1, got {flag!r}", file=f_split, line=n)
        if iid not in paths:
            raise DatasetError(f"image id {iid} is not in images.txt", file=f_split, line=n)
        in_split[iid] = (flag == "1") == (split == "train")
    boxes: dict[str, list[tuple[tuple[float, ...], int]]] = {}
    if exists(f_boxes):
        for n, (iid, *xywh) in read_lines(f_boxes, None, 5):
            if iid not in paths:
                raise DatasetError(f"image id {iid} is not in images.txt", file=f_boxes, line=n)
            x, y, w, h = (parse_float(v, f_boxes, n, "box coordinate") for v in xywh)
            if w < 0 or h < 0:
                raise DatasetError(f"box has negative width or height: {xywh}", file=f_boxes, line=n)
            boxes.setdefault(iid, []).append(((x, y, x + w, y + h), n))

    for iid, (_, n) in paths.items():
        if iid not in labels:
            raise DatasetError(f"image id {iid} has no class in {f_labels}", file=f_images, line=n)
        if iid not in in_split:
            raise DatasetError(f"image id {iid} has no split in {f_split}", file=f_images, line=n)
    ids = sorted((iid for iid in paths if in_split[iid]), key=lambda i: (len(i), i))
    images = join_uri(root, "images")
    uris = [join_uri(images, paths[iid][0]) for iid in ids]
    segmentations = join_uri(root, "segmentations")
    seg_files = file_set(segmentations)
    sizes: list[tuple[int, int] | None] = [None] * len(ids)
    if check_files:
        files = file_set(images)
        for iid, uri in zip(ids, uris):
            require_image(uri, files, f_images, paths[iid][1])
        sizes = image_sizes(uris)
        for iid, uri, size in zip(ids, uris, sizes):
            if size is None:
                raise DatasetError(f"image is not readable: {uri}", file=f_images, line=paths[iid][1])

    samples = []
    for iid, uri, size in zip(ids, uris, sizes):
        for box, n in boxes.get(iid, []):
            check_box(box, size, f_boxes, n)
        seg = join_uri(segmentations, posixpath.splitext(paths[iid][0])[0] + ".png")
        samples.append(
            Sample(
                image_id=iid,
                uri=uri,
                label=labels[iid],
                boxes=boxes_array([b for b, _ in boxes.get(iid, [])]),
                mask_uri=seg if seg in seg_files else None,
                width=size[0] if size else None,
                height=size[1] if size else None,
            )
        )
    return WSOLDataset("cub", split, class_names, samples)
