"""A self-contained HTML gallery of labeled images: mask tinted, box drawn, class and scores.

The pictures are drawn by :mod:`pro2sam.visualize`; this module builds the page from rows chosen
by the caller (``pro2sam show`` chooses them with DuckDB: :mod:`pro2sam.apps.query`). Each image
is read through :func:`pro2sam.storage.read_bytes`, decoded with EXIF orientation applied (the
frame ``box_xyxy`` and the mask are in) and embedded as a base64 JPEG thumbnail. The page needs
no network and no files besides itself.

Each row is one ``<figure class="overlay">`` with ``data-*`` attributes for its scores; buttons
sort the figures by a score (a small inline script), and ``gallery.html#sort=pred_iou`` (or
``#sort=pred_iou:asc``) opens the page sorted. With ``coarse_map=True`` each figure also shows the
row's GTFormer coarse map beside the overlay (``<img class="coarse-map">``, same size): its values
as they are in the table (0 blue, 1 red; not rescaled per image), upsampled bilinearly over the
whole image and blended over a dimmed grey copy of it.
"""

from __future__ import annotations

import base64
import html
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from .images import ImageDecodeError, decode_image
from .storage import StorageError, read_bytes, write_bytes_atomic
from .visualize import DEFAULT_THUMB_SIZE, encode_image, render_coarse_map, render_overlay

__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_THUMB_SIZE",
    "FIGURE_STYLE",
    "figures_html",
    "write_gallery",
]

DEFAULT_LIMIT = 100
# The scores a page sorts by: data attribute (and sort key) -> button text.
SORT_KEYS = {
    "confidence": "confidence",
    "match_score": "match score",
    "class_score": "class score",
    "pred_iou": "predicted IoU",
    "stability_score": "stability",
    "mask_area": "mask area",
}
_COARSE_TITLE = "GTFormer coarse map (0 blue, 1 red)"


def _jpeg_data_uri(rgb: np.ndarray) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(encode_image(rgb, "jpeg")).decode("ascii")


def _thumbnails(row: dict, thumb_size: int, coarse_map: bool) -> tuple[str | None, str | None, str | None]:
    """(overlay data URI, coarse-map data URI, problem): a URI is None where that picture could
    not be made (``problem`` says why) or, for the coarse map, was not asked for or is absent."""
    try:
        image = decode_image(read_bytes(row["uri"]))
        overlay = render_overlay(image, row, thumb_size=thumb_size)
    except FileNotFoundError:
        return None, None, f"image not found: {row['uri']}"
    except (StorageError, ImageDecodeError, ValueError, cv2.error) as e:
        return None, None, f"image not shown: {e}"
    if not (coarse_map and row.get("coarse_map")):
        return _jpeg_data_uri(overlay), None, None
    th, tw = overlay.shape[:2]
    try:
        return _jpeg_data_uri(overlay), _jpeg_data_uri(render_coarse_map(image, row["coarse_map"], (tw, th))), None
    except (ValueError, cv2.error) as e:
        return _jpeg_data_uri(overlay), None, f"coarse map not shown: {e}"


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _figure(row: dict, thumb: str | None, heat: str | None, problem: str | None) -> str:
    e = html.escape
    attrs = {f"data-{k.replace('_', '-')}": "" if row.get(k) is None else f"{row[k]:.6g}" for k in SORT_KEYS}
    attrs.update({"data-status": row["status"], "data-image-id": row["image_id"]})
    names, classes = row.get("topk_names") or [], row.get("topk_classes") or []
    class_name = names[0] if names and names[0] is not None else (str(classes[0]) if classes else "no class")
    lines = [
        f'<b class="class-name">{e(class_name)}</b>'
        + (f' <span class="class-id">#{classes[0]}</span>' if classes else "")
        + f' <span class="class-score">p={_fmt(row.get("class_score"))}</span>',
        f'match {_fmt(row.get("match_score"))} · predicted IoU {_fmt(row.get("pred_iou"))} · '
        f'stability {_fmt(row.get("stability_score"))} · {e(str(row.get("box_source") or row["status"]))}',
    ]
    if row.get("confidence") is not None:
        lines.insert(1, f'<span class="confidence">confidence {_fmt(row["confidence"])}</span>')
    if row.get("label") is not None:
        lines.append(f'label: {e(row["label"])}')
    if row.get("error"):
        lines.append(f'<span class="error">{e(row["error"])}</span>')
    if problem:
        lines.append(f'<span class="error">{e(problem)}</span>')
    if heat:
        lines.append(f'<span class="coarse-map-note">right: {e(_COARSE_TITLE)}</span>')
    lines.append(f'<span class="uri">{e(row["uri"])}</span>')
    body = f'<img src="{thumb}" alt="{e(class_name)}">' if thumb else '<div class="missing">no image</div>'
    if heat:
        body += f'<img class="coarse-map" src="{heat}" alt="{e(_COARSE_TITLE)}" title="{e(_COARSE_TITLE)}">'
    attr_text = " ".join(f'{k}="{e(v)}"' for k, v in attrs.items())
    return f'<figure class="overlay" {attr_text}>{body}<figcaption>{"<br>".join(lines)}</figcaption></figure>'


# The figures' look, shared with the QA report's doubtful rows (pro2sam.qa).
FIGURE_STYLE = """
body{font-family:system-ui,sans-serif;margin:1em;background:#fafafa;color:#222}
figure.overlay{margin:0;padding:6px;background:#fff;border:1px solid #ddd;border-radius:4px;width:260px}
figure.overlay[data-status=error]{border-color:#d33}
figure.overlay img{display:block;max-width:256px;max-height:256px}
.with-coarse-map figure.overlay{width:524px}
.with-coarse-map figure.overlay img{display:inline-block;vertical-align:top;margin-right:4px}
figcaption{font-size:12px;line-height:1.4;margin-top:4px;word-break:break-all}
.error{color:#c00}.uri{color:#777}
.missing{width:256px;height:96px;background:#eee;display:flex;align-items:center;justify-content:center;color:#999}
"""
_STYLE = FIGURE_STYLE + """
header p{color:#555;margin:.3em 0}
.sort button{margin-right:.3em}
.sort button.active{font-weight:bold}
#gallery{display:flex;flex-wrap:wrap;gap:12px}
"""

# Sorts the figures by a data attribute; rows without the score go last whatever the direction.
_SCRIPT = """
(function(){
  var gallery=document.getElementById('gallery');
  function sortBy(key,asc){
    var attr='data-'+key.replace(/_/g,'-');
    var figs=Array.prototype.slice.call(gallery.querySelectorAll('figure.overlay'));
    figs.sort(function(a,b){
      var va=a.getAttribute(attr),vb=b.getAttribute(attr);
      if(va===''&&vb==='')return 0; if(va==='')return 1; if(vb==='')return -1;
      return asc?parseFloat(va)-parseFloat(vb):parseFloat(vb)-parseFloat(va);
    });
    figs.forEach(function(f){gallery.appendChild(f);});
    document.querySelectorAll('.sort button').forEach(function(b){
      b.classList.toggle('active',b.dataset.key===key);
      if(b.dataset.key===key)b.dataset.asc=asc?'1':'';
    });
    gallery.setAttribute('data-sorted-by',key+(asc?':asc':':desc'));
  }
  document.querySelectorAll('.sort button').forEach(function(b){
    b.addEventListener('click',function(){sortBy(b.dataset.key,b.classList.contains('active')&&!b.dataset.asc);});
  });
  var m=/^#sort=(\\w+)(:asc)?$/.exec(location.hash);
  if(m)sortBy(m[1],!!m[2]);
})();
"""


def figures_html(
    rows: list[dict], *, thumb_size: int = DEFAULT_THUMB_SIZE, threads: int = 8, coarse_map: bool = False
) -> list[str]:
    """One ``<figure class="overlay">`` per row (a labels-table row as a dict), in order: the
    overlay thumbnail (:func:`pro2sam.visualize.render_overlay`, images read in ``threads``
    threads), the class and scores, and with ``coarse_map`` the coarse map beside. Sets each
    row's ``class_score`` where it lacks one."""
    for row in rows:
        row.setdefault("class_score", row["topk_scores"][0] if row.get("topk_scores") else None)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(rows)))) as pool:
        thumbs = list(pool.map(lambda r: _thumbnails(r, thumb_size, coarse_map), rows))
    return [_figure(row, thumb, heat, problem) for row, (thumb, heat, problem) in zip(rows, thumbs)]


def write_gallery(
    rows: list[dict],
    output: str,
    *,
    source: str,
    selection: str = "all rows",
    limit: int | None = None,
    thumb_size: int = DEFAULT_THUMB_SIZE,
    threads: int = 8,
    coarse_map: bool = False,
) -> int:
    """Write the gallery of ``rows`` (labels-table rows as dicts, in page order) to ``output``
    (local or URI, written whole); return the number of overlays. Images that cannot be read still
    get a figure, saying why. With ``coarse_map``, each row's GTFormer coarse map (its
    ``coarse_map`` column) is shown beside its overlay.

    Args:
        source: the labels table the rows came from, named in the page's title.
        selection: how the rows were chosen, for the page's header.
        limit: the most rows that could have been chosen, for the header.
    """
    e = html.escape
    buttons = "".join(f'<button type="button" data-key="{k}">{e(v)}</button>' for k, v in SORT_KEYS.items())
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>pro2sam gallery: {e(source)}</title>",
            f"<style>{_STYLE}</style></head><body>",
            f"<header><h1>pro2sam labels</h1><p>{e(source)}: {e(selection)}; "
            f'<span class="count">{len(rows)}</span>' + (f" of at most {int(limit)}" if limit else "") + " rows</p>",
            f'<p class="sort">Sort by: {buttons}</p></header>',
            '<main id="gallery" class="with-coarse-map">' if coarse_map else '<main id="gallery">',
            *figures_html(rows, thumb_size=thumb_size, threads=threads, coarse_map=coarse_map),
            "</main>",
            f"<script>{_SCRIPT}</script>",
            "</body></html>",
        ]
    )
    write_bytes_atomic(output, page.encode("utf-8"))
    return len(rows)
