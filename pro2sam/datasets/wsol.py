"""``clovaai/wsolevaluation``'s metadata layout (CUB, ILSVRC and OpenImages splits)."""

from __future__ import annotations

import posixpath
from collections.abc import Sequence

from ..storage import exists, join_uri
from .common import (
    DatasetError,
    Sample,
    WSOLDataset,
    boxes_array,
    check_box,
    dataset_root,
    file_set,
    parse_float,
    parse_int,
    read_lines,
    require_image,
)

__all__ = ["read_wsol_metadata"]

# Class counts of wsolevaluation's data sets, by metadata folder name (metadata/CUB, metadata/ILSVRC, ...).
_WSOL_NUM_CLASSES = {"cub": 200, "ilsvrc": 1000, "openimages": 100}


def _class_names_file(*folders: str) -> list[str] | None:
    for folder in folders:
        uri = join_uri(folder, "class_names.txt")
        if exists(uri):
            return [parts[0] for _, parts in read_lines(uri, "\n", 1)]
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
    metadata_root, data_root = dataset_root(metadata_root), dataset_root(data_root)
    folder = join_uri(metadata_root, split)
    if not exists(join_uri(folder, "image_ids.txt")) and exists(join_uri(metadata_root, "image_ids.txt")):
        folder = metadata_root
    f_ids, f_labels = join_uri(folder, "image_ids.txt"), join_uri(folder, "class_labels.txt")
    f_sizes, f_loc = join_uri(folder, "image_sizes.txt"), join_uri(folder, "localization.txt")

    order: list[str] = []
    line_of: dict[str, int] = {}
    for n, (path,) in read_lines(f_ids, "\n", 1):
        if path in line_of:
            raise DatasetError(f"duplicate image {path!r} (first on line {line_of[path]})", file=f_ids, line=n)
        order.append(path)
        line_of[path] = n

    def known(path: str, uri: str, n: int) -> str:
        if path not in line_of:
            raise DatasetError(f"image {path!r} is not in image_ids.txt", file=uri, line=n)
        return path

    labels = {known(p, f_labels, n): parse_int(c, f_labels, n, "class label") for n, (p, c) in read_lines(f_labels, ",", 2)}
    names = list(class_names) if class_names is not None else _class_names_file(folder, metadata_root)
    if names is None:
        # every split of a data set must agree on the class count, even one missing the last class
        expected = _WSOL_NUM_CLASSES.get(posixpath.basename(metadata_root.rstrip("/")).lower(), 0)
        names = [str(i) for i in range(max(max(labels.values(), default=-1) + 1, expected))]
    for n, (p, c) in read_lines(f_labels, ",", 2):
        if not 0 <= labels[p] < len(names):
            raise DatasetError(f"unknown class {labels[p]} (classes 0..{len(names) - 1})", file=f_labels, line=n)
    sizes: dict[str, tuple[int, int]] = {}
    if exists(f_sizes):
        for n, (p, w, h) in read_lines(f_sizes, ",", 3):
            sizes[known(p, f_sizes, n)] = (parse_int(w, f_sizes, n, "width"), parse_int(h, f_sizes, n, "height"))
    boxes: dict[str, list[tuple[float, ...]]] = {}
    masks: dict[str, list[str]] = {}
    ignores: dict[str, str] = {}
    if exists(f_loc):
        for n, parts in read_lines(f_loc, ",", (2, 3, 5)):
            p = known(parts[0], f_loc, n)
            if len(parts) == 5:
                box = tuple(parse_float(v, f_loc, n, "box coordinate") for v in parts[1:])
                check_box(box, sizes.get(p), f_loc, n)
                boxes.setdefault(p, []).append(box)
            else:
                if not parts[1]:
                    raise DatasetError("empty mask path", file=f_loc, line=n)
                masks.setdefault(p, []).append(join_uri(data_root, parts[1]))
                if len(parts) == 3 and parts[2]:
                    ignores[p] = join_uri(data_root, parts[2])

    files = None
    if check_files:  # list only the folder the split lives in (ILSVRC's val/, not its 1.2M train images)
        relative = order + [m[len(data_root) + 1 :] for ms in masks.values() for m in ms] + [
            i[len(data_root) + 1 :] for i in ignores.values()
        ]
        common = posixpath.commonpath([posixpath.dirname(r) for r in relative]) if relative else ""
        files = file_set(join_uri(data_root, common) if common else data_root)
    samples = []
    for path in order:
        n = line_of[path]
        if path not in labels:
            raise DatasetError(f"image {path!r} has no line in class_labels.txt", file=f_ids, line=n)
        uri = join_uri(data_root, path)
        require_image(uri, files, f_ids, n)
        for m in masks.get(path, []) + ([ignores[path]] if path in ignores else []):
            if files is not None and m not in files:
                raise DatasetError(f"mask not found: {m}", file=f_loc)
        size = sizes.get(path)
        samples.append(
            Sample(
                image_id=path,
                uri=uri,
                label=labels[path],
                boxes=boxes_array(boxes.get(path)),
                ignore_uri=ignores.get(path),
                width=size[0] if size else None,
                height=size[1] if size else None,
                mask_uris=tuple(masks.get(path, ())),
            )
        )
    name = posixpath.basename(metadata_root.rstrip("/")).lower() or "wsol"
    return WSOLDataset(name, split, names, samples)
