"""COCO instances JSON: a team's own boxed images as a held-out split (``coco:FILE.json``).

``images[].file_name`` is relative to ``images_root`` (default: the JSON's folder) unless it is
absolute or a URI; ``annotations[].bbox`` is ``[x, y, width, height]`` in original pixels, so the
box is ``(x, y, x + width, y + height)``, one past the last pixel (the evaluation's convention).
Several annotations of one image are several boxes (an image counts as right if its box matches
any of them). The image's class is the category of its largest annotation, its index the
category's position in ``categories`` sorted by id. Images without an annotation are kept, with
no box; crowd annotations (``iscrowd``) are boxes too.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections import defaultdict

from ..storage import is_remote, join_uri
from .common import DatasetError, Sample, WSOLDataset, boxes_array, check_box, read_data

__all__ = ["read_coco"]


def _folder(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if is_remote(uri) else os.path.dirname(uri)


def read_coco(uri: str, *, images_root: str | None = None) -> WSOLDataset:
    """A COCO instances JSON (local or URI) as a :class:`WSOLDataset` with boxes.

    Raises:
        DatasetError: unreadable or not JSON, no ``images`` / ``annotations`` / ``categories``, an
            annotation of an unknown image or category, a malformed or out-of-image ``bbox``.
    """
    source = os.fspath(uri)
    if not is_remote(source):
        source = os.path.abspath(source)
    try:
        data = json.loads(read_data(source))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"not a COCO JSON file: {e}", file=source) from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise DatasetError("not a COCO instances file: it needs 'images', 'annotations' and 'categories' lists", file=source)
    root = images_root if images_root is not None else _folder(source)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(categories)}
    names = [str(c.get("name", c["id"])) for c in categories]
    images = {}
    for image in data["images"]:
        try:
            images[image["id"]] = image
        except (KeyError, TypeError):
            raise DatasetError(f"an image without an id: {image!r}", file=source) from None
    boxes, label_area = defaultdict(list), {}
    for a in data["annotations"]:
        image = images.get(a.get("image_id"))
        if image is None:
            raise DatasetError(f"annotation {a.get('id')!r} names an unknown image {a.get('image_id')!r}", file=source)
        if a.get("category_id") not in index:
            raise DatasetError(f"annotation {a.get('id')!r} names an unknown category {a.get('category_id')!r}", file=source)
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise DatasetError(f"annotation {a.get('id')!r}: bbox must be [x, y, width, height], not {bbox!r}", file=source)
        x, y, w, h = (float(v) for v in bbox)
        box = (x, y, x + w, y + h)
        size = (image["width"], image["height"]) if image.get("width") and image.get("height") else None
        check_box(box, size, source, None)
        boxes[image["id"]].append(box)
        area = w * h
        if image["id"] not in label_area or area > label_area[image["id"]][1]:
            label_area[image["id"]] = (index[a["category_id"]], area)
    samples = []
    for image_id, image in images.items():
        name = str(image.get("file_name") or "")
        if not name:
            raise DatasetError(f"image {image_id!r} has no file_name", file=source)
        location = name if "://" in name or os.path.isabs(name) else join_uri(root, name)
        samples.append(Sample(
            image_id=str(image_id), uri=location, label=label_area.get(image_id, (0, 0))[0],
            boxes=boxes_array(boxes.get(image_id)), width=image.get("width"), height=image.get("height"),
        ))  # fmt: skip
    name = posixpath.splitext(posixpath.basename(source))[0]
    return WSOLDataset(name, "coco", names, samples)
