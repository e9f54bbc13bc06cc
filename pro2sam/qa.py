"""The QA report of a labels table (``pro2sam report``): one self-contained HTML page with plots,
and the same numbers as JSON.

What it holds: counts (images, ok, error, coarse-map fallback, with a confidence); the
distribution of each score (:data:`DISTRIBUTIONS`: confidence, match score, SAM's predicted IoU and
stability, the mask's share of the image) as a histogram and its summary; per top-1 class the
count, the fallback share and the median of each score; error messages grouped (the image's
location and numbers taken out of the message); and the most doubtful rows with their overlays
(lowest ``confidence``, or lowest ``match_score`` with the fallback first where the table has no
confidence).

The table is read one record batch at a time (:func:`pro2sam.reading.iter_label_batches`, without
``coarse_map``) and folded into state of a fixed size: histograms of fixed bins per score and per
class (so medians and percentiles are read off the bins, to within a bin's width), exact counts,
sums, minima and maxima, at most :data:`MAX_ERROR_GROUPS` error groups and a bounded heap of the
most doubtful rows. A million rows never need a million rows in memory.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import time
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .export import EXPORT_COLUMNS
from .gallery import DEFAULT_THUMB_SIZE, FIGURE_STYLE, figures_html
from .labels import STATUS_ERROR, STATUS_OK
from .reading import DEFAULT_BATCH_SIZE, iter_label_batches
from .storage import write_bytes_atomic

__all__ = [
    "DISTRIBUTIONS",
    "DEFAULT_DOUBTFUL",
    "MAX_ERROR_GROUPS",
    "Histogram",
    "QASummary",
    "summarise_labels",
    "qa_html",
    "write_qa_report",
]

# score -> (title, lowest, highest bin edge); values outside go to the end bins.
DISTRIBUTIONS = {
    "confidence": ("confidence (P(box right))", 0.0, 1.0),
    "match_score": ("match score (mask vs coarse map)", 0.0, 1.0),
    "pred_iou": ("SAM predicted IoU (its own estimate)", 0.0, 1.1),
    "stability_score": ("SAM stability score", 0.0, 1.0),
    "mask_area_fraction": ("mask area / image area", 0.0, 1.0),
}
_BINS = 100  # per score over the whole table: medians to within 1 % of the range
_CLASS_BINS = 50  # per score and class
DEFAULT_DOUBTFUL = 24
MAX_ERROR_GROUPS = 1000
_FALLBACK = "coarse_fallback"
_NO_CLASS = "(no class)"


class Histogram:
    """Counts of values in fixed bins over ``[low, high]``, with exact count, sum, min and max.

    Args:
        low, high: the outer bin edges; values outside are counted in the end bins.
        bins: number of equal bins.
    """

    def __init__(self, low: float, high: float, bins: int = _BINS) -> None:
        self.edges = np.linspace(low, high, bins + 1)
        self.counts = np.zeros(bins, dtype=np.int64)
        self.n, self.total = 0, 0.0
        self.min, self.max = math.inf, -math.inf

    def add(self, values: np.ndarray) -> None:
        """Count the finite values of a float array (NaN: no value, skipped)."""
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if not len(values):
            return
        index = np.clip(np.searchsorted(self.edges, values, side="right") - 1, 0, len(self.counts) - 1)
        self.counts += np.bincount(index, minlength=len(self.counts))
        self.n += len(values)
        self.total += float(values.sum())
        self.min, self.max = min(self.min, float(values.min())), max(self.max, float(values.max()))

    def quantile(self, q: float) -> float | None:
        """The q-quantile, interpolated linearly inside its bin (exact to within a bin's width)."""
        if not self.n:
            return None
        target = q * self.n
        cumulative = np.cumsum(self.counts)
        i = int(np.searchsorted(cumulative, target, side="left"))
        i = min(i, len(self.counts) - 1)
        before = cumulative[i - 1] if i else 0
        inside = (target - before) / self.counts[i] if self.counts[i] else 0.0
        value = self.edges[i] + inside * (self.edges[i + 1] - self.edges[i])
        return float(min(max(value, self.min), self.max))

    def summary(self) -> dict:
        if not self.n:
            return {"count": 0}
        return {
            "count": self.n,
            "mean": self.total / self.n,
            "min": self.min,
            "p10": self.quantile(0.1),
            "median": self.quantile(0.5),
            "p90": self.quantile(0.9),
            "max": self.max,
        }

    def to_dict(self) -> dict:
        return {**self.summary(), "bin_edges": self.edges.tolist(), "bin_counts": self.counts.tolist()}


class _Doubtful:
    """The ``size`` rows of lowest key seen (ties: lowest image id), as dicts; at most ``2 * size``
    rows are held."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._kept: list[tuple[float, str, dict]] = []

    def offer(self, batch: pa.RecordBatch, keys: np.ndarray) -> None:
        """Consider the rows of ``batch`` with a finite key (NaN: not a candidate)."""
        usable = np.flatnonzero(np.isfinite(keys))
        if not self.size or not len(usable):
            return
        if len(usable) > self.size:
            usable = usable[np.argpartition(keys[usable], self.size - 1)[: self.size]]
        for i, row in zip(usable, batch.take(pa.array(usable, pa.int64())).to_pylist()):
            self._kept.append((float(keys[i]), row["image_id"], row))
        self._kept.sort(key=lambda entry: entry[:2])
        del self._kept[self.size :]

    def rows(self) -> list[dict]:
        return [row for _, _, row in self._kept]


def _floats(batch: pa.RecordBatch, name: str) -> np.ndarray:
    return np.asarray(batch.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)


def _message_pattern(message: str, uri: str) -> str:
    """An error message with the image's location and the numbers taken out, so that one cause
    on many images is one group."""
    for part in (uri, uri.rsplit("/", 1)[-1]):
        if part:
            message = message.replace(part, "<image>")
    return re.sub(r"\d+(\.\d+)?", "#", message)


class QASummary:
    """The state a pass over the table folds into; :meth:`to_dict` gives the JSON numbers."""

    def __init__(self, source: str, doubtful: int = DEFAULT_DOUBTFUL) -> None:
        self.source = source
        self.counts = {"images": 0, "ok": 0, "error": 0, "coarse_fallback": 0, "with_confidence": 0}
        self.error_kinds: dict[str, int] = {}
        self.distributions = {k: Histogram(lo, hi) for k, (_, lo, hi) in DISTRIBUTIONS.items()}
        self.classes: dict[str, dict] = {}
        self.errors: dict[tuple[str, str], dict] = {}
        self.other_errors = 0
        self.by_confidence = _Doubtful(doubtful)
        self.by_match = _Doubtful(doubtful)

    def add(self, batch: pa.RecordBatch) -> None:
        status = batch.column("status")
        ok = np.asarray(pc.equal(status, STATUS_OK).to_numpy(zero_copy_only=False), dtype=bool)
        error = np.asarray(pc.equal(status, STATUS_ERROR).to_numpy(zero_copy_only=False), dtype=bool)
        fallback = np.asarray(pc.fill_null(pc.equal(batch.column("box_source"), _FALLBACK), False).to_numpy(zero_copy_only=False), dtype=bool)
        fallback &= ok
        scores = {k: _floats(batch, k) for k in ("confidence", "match_score", "pred_iou", "stability_score")}
        with np.errstate(invalid="ignore", divide="ignore"):
            scores["mask_area_fraction"] = _floats(batch, "mask_area") / (_floats(batch, "width") * _floats(batch, "height"))
        for values in scores.values():
            values[~ok] = np.nan
        self.counts["images"] += batch.num_rows
        self.counts["ok"] += int(ok.sum())
        self.counts["error"] += int(error.sum())
        self.counts["coarse_fallback"] += int(fallback.sum())
        self.counts["with_confidence"] += int(np.isfinite(scores["confidence"]).sum())
        for name, histogram in self.distributions.items():
            histogram.add(scores[name])
        self._add_classes(batch, ok, fallback, scores)
        self._add_errors(batch, error)
        self.by_confidence.offer(batch, scores["confidence"])
        match = np.where(ok & np.isnan(scores["match_score"]), -1.0, scores["match_score"])  # fallback first
        self.by_match.offer(batch, match)

    def _add_classes(self, batch: pa.RecordBatch, ok: np.ndarray, fallback: np.ndarray, scores: dict) -> None:
        names = np.array([(n[0] if n else None) or _NO_CLASS for n in batch.column("topk_names").to_pylist()], dtype=object)
        for name in np.unique(names[ok]) if ok.any() else []:
            rows = ok & (names == name)
            entry = self.classes.get(name)
            if entry is None:
                entry = self.classes[name] = {
                    "count": 0, "coarse_fallback": 0,
                    "scores": {k: Histogram(lo, hi, _CLASS_BINS) for k, (_, lo, hi) in DISTRIBUTIONS.items()},
                }  # fmt: skip
            entry["count"] += int(rows.sum())
            entry["coarse_fallback"] += int((rows & fallback).sum())
            for key, histogram in entry["scores"].items():
                histogram.add(scores[key][rows])

    def _add_errors(self, batch: pa.RecordBatch, error: np.ndarray) -> None:
        if not error.any():
            return
        picked = batch.filter(pa.array(error)).select(["uri", "error", "error_kind"]).to_pylist()
        for row in picked:
            kind = row["error_kind"] or "unknown"
            self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
            key = (kind, _message_pattern(row["error"] or "", row["uri"]))
            group = self.errors.get(key)
            if group is None:
                if len(self.errors) >= MAX_ERROR_GROUPS:
                    self.other_errors += 1
                    continue
                group = self.errors[key] = {"kind": kind, "pattern": key[1], "count": 0, "example": row["error"], "example_uri": row["uri"]}
            group["count"] += 1

    def doubtful_rows(self) -> tuple[str, list[dict]]:
        """(the score they were chosen by, the rows, most doubtful first)."""
        if self.counts["with_confidence"]:
            return "confidence", self.by_confidence.rows()
        return "match_score", self.by_match.rows()

    def to_dict(self) -> dict:
        order, doubtful = self.doubtful_rows()
        ok = self.counts["ok"]
        classes = []
        for name, entry in sorted(self.classes.items(), key=lambda kv: (-kv[1]["count"], kv[0])):
            medians = {k: h.quantile(0.5) for k, h in entry["scores"].items()}
            classes.append({
                "name": name, "count": entry["count"], "share": entry["count"] / ok if ok else None,
                "coarse_fallback": entry["coarse_fallback"], "median": medians,
            })  # fmt: skip
        groups = sorted(self.errors.values(), key=lambda g: (-g["count"], g["kind"], g["pattern"]))
        return {
            "source": self.source,
            "counts": dict(self.counts),
            "rates": {
                "error": self.counts["error"] / self.counts["images"] if self.counts["images"] else None,
                "coarse_fallback": self.counts["coarse_fallback"] / ok if ok else None,
            },
            "error_kinds": dict(sorted(self.error_kinds.items())),
            "distributions": {k: h.to_dict() for k, h in self.distributions.items()},
            "classes": classes,
            "errors": {"groups": groups, "other": self.other_errors},
            "doubtful": {
                "ordered_by": order,
                "rows": [
                    {k: r.get(k) for k in ("image_id", "uri", "status", "confidence", "match_score", "pred_iou",
                                           "stability_score", "box_source", "topk_names")}
                    for r in doubtful
                ],  # fmt: skip
            },
            "settings": {
                "percentiles": f"read off {_BINS} equal bins per score ({_CLASS_BINS} per class), to within a bin",
                "doubtful": "lowest confidence; without one, lowest match score with the coarse-map fallback first",
            },
        }


def summarise_labels(
    input: str, *, doubtful: int = DEFAULT_DOUBTFUL, batch_size: int = DEFAULT_BATCH_SIZE
) -> QASummary:
    """One pass over the labels table at ``input`` (a Parquet file or output folder, local or
    URI), one record batch at a time."""
    summary = QASummary(input, doubtful)
    for batch in iter_label_batches(input, EXPORT_COLUMNS, batch_size=batch_size):
        summary.add(batch)
    return summary


# ---------------------------------------------------------------- the page


def _png_img(png: bytes, alt: str, css: str = "plot") -> str:
    return f'<img class="{css}" alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence], css: str) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(_num(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


_STYLE = FIGURE_STYLE + """
h1{margin:.2em 0}h2{margin-top:1.4em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#eee}
td:first-child,th:first-child{text-align:left}
img.plot{max-width:100%;background:#fff;border:1px solid #ddd}
#doubtful{display:flex;flex-wrap:wrap;gap:12px}
.note{color:#555;font-size:13px}
"""

_CLASS_CHART_LIMIT = 30


def qa_html(data: Mapping, doubtful_rows: list[dict], *, thumb_size: int = DEFAULT_THUMB_SIZE, threads: int = 8) -> str:
    """The page of :meth:`QASummary.to_dict` ``data``; ``doubtful_rows`` (with their masks) get
    overlay thumbnails (:func:`pro2sam.gallery.figures_html`)."""
    from .plots import class_counts_png, histograms_png

    e = html.escape
    c = data["counts"]
    counts = _table(
        ["images", "ok", "error", "coarse-map fallback", "with a confidence"],
        [[c["images"], c["ok"], c["error"], c["coarse_fallback"], c["with_confidence"]]],
        "counts",
    )
    kinds = ", ".join(f"{k}: {v:,}" for k, v in data["error_kinds"].items()) or "none"
    dists = data["distributions"]
    shown = {DISTRIBUTIONS[k][0]: (d["bin_edges"], d["bin_counts"]) for k, d in dists.items() if d["count"]}
    plots = _png_img(histograms_png(shown), "histograms of the scores") if shown else '<p class="note">no ok row: nothing to plot</p>'
    summary_rows = [
        [DISTRIBUTIONS[k][0], d["count"], d.get("mean"), d.get("min"), d.get("p10"), d.get("median"), d.get("p90"), d.get("max")]
        for k, d in dists.items()
    ]
    classes = data["classes"]
    class_rows = [
        [k["name"], k["count"], k["share"], k["coarse_fallback"], *(k["median"][s] for s in DISTRIBUTIONS)] for k in classes
    ]
    chart = ""
    if classes:
        top = classes[:_CLASS_CHART_LIMIT]
        title = "images per top-1 class" + (f" (the {len(top)} largest of {len(classes)})" if len(classes) > len(top) else "")
        chart = _png_img(class_counts_png([k["name"] for k in top], [k["count"] for k in top], title=title), title)
    groups = data["errors"]["groups"]
    error_rows = [[g["count"], g["kind"], g["pattern"], g["example_uri"]] for g in groups]
    other = data["errors"]["other"]
    order = data["doubtful"]["ordered_by"]
    figures = figures_html(doubtful_rows, thumb_size=thumb_size, threads=threads)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>pro2sam QA report: {e(data['source'])}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<header><h1>pro2sam QA report</h1><p class=\"note\">{e(data['source'])}; written "
        f"{e(time.strftime('%Y-%m-%d %H:%M:%S'))}</p></header>",
        '<section id="counts"><h2>Counts</h2>', counts,
        f'<p class="note">error kinds: {e(kinds)}. Fallback: no SAM candidate survived matching, the box is '
        "GTFormer's coarse map's (no match score, predicted IoU or stability).</p></section>",
        '<section id="distributions"><h2>Distributions (ok rows)</h2>', plots,
        _table(["score", "count", "mean", "min", "p10", "median", "p90", "max"], summary_rows, "distributions"),
        f'<p class="note">{e(data["settings"]["percentiles"])}. "Predicted IoU" is SAM\'s own estimate of its mask, not '
        "an IoU with any ground truth.</p></section>",
        '<section id="classes"><h2>Per top-1 class</h2>', chart,
        _table(["class", "images", "share", "fallback", *(f"median {DISTRIBUTIONS[s][0].split(' (')[0]}" for s in DISTRIBUTIONS)],
               class_rows, "classes"),  # fmt: skip
        "</section>",
        '<section id="errors"><h2>Errors, grouped</h2>',
        _table(["images", "kind", "message (image and numbers taken out)", "example"], error_rows, "errors")
        if error_rows else '<p class="note">no error rows</p>',
        f'<p class="note">{other:,} more error rows in groups past the first {MAX_ERROR_GROUPS}.</p>' if other else "",
        "</section>",
        f'<section><h2>The {len(doubtful_rows)} most doubtful rows (lowest {e(order.replace("_", " "))})</h2>',
        '<p class="note">Review them with <code>pro2sam show --order-by '
        f'{e(order)} --ascending --where "status = \'ok\'"</code>.</p>',
        '<div id="doubtful">', *figures, "</div></section>",
        "</body></html>",
    ])  # fmt: skip


def write_qa_report(
    input: str,
    output: str,
    *,
    json_output: str | None = None,
    doubtful: int = DEFAULT_DOUBTFUL,
    thumb_size: int = DEFAULT_THUMB_SIZE,
    threads: int = 8,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict:
    """Write the QA report of the labels table at ``input``: the page to ``output`` and its
    numbers to ``json_output`` (default: ``output`` with ``.json`` for ``.html``), each whole,
    local or URI. Returns the numbers."""
    summary = summarise_labels(input, doubtful=doubtful, batch_size=batch_size)
    data = summary.to_dict()
    _, rows = summary.doubtful_rows()
    page = qa_html(data, rows, thumb_size=thumb_size, threads=threads)
    json_output = json_output or (output[: -len(".html")] if output.endswith(".html") else output) + ".json"
    write_bytes_atomic(output, page.encode("utf-8"))
    write_bytes_atomic(json_output, (json.dumps(data, indent=2) + "\n").encode())
    return data
