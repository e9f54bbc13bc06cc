"""The evaluation report as files: a Markdown table in the paper's layout, JSON, per-image JSONL,
and overlay PNGs of the best and worst test images.

The input is the :class:`~pro2sam.evaluation.EvaluationReport` of
:func:`pro2sam.evaluation.evaluate_with_heldout`; nothing here scores.
"""

from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Mapping

import numpy as np

from .datasets import Sample
from .evaluation import METHODS, EvaluationReport
from .images import decode_image
from .metrics import EVAL_FRAME
from .storage import read_bytes
from .visualize import encode_image, render_overlay

__all__ = [
    "SUMMARY_METRICS",
    "BOX_ACCURACY",
    "report_markdown",
    "report_json",
    "image_records_jsonl",
    "select_overlay_cases",
    "overlay_png",
    "overlay_name",
]

# The numbers a user sees first for both methods (``pro2sam demo``, ``bench_quality.py``), in
# table order: report key -> column title, percent. A method without the number shows "-":
# Pro2SAM has no score map for MaxBoxAccV2, GTFormer-only no fallback.
SUMMARY_METRICS = {
    "top1_cls": "Top-1 Cls",
    "top1_loc": "Top-1 Loc",
    "top5_loc": "Top-5 Loc",
    "gt_known_loc": "GT-known Loc",
    "MaxBoxAccV2": "MaxBoxAccV2",
    "mIoU": "mIoU",
    "fallback_rate": "fallback",
}
# Each method's box accuracy with no threshold taken from the split scored (the BoxAccV2 column).
BOX_ACCURACY = {"GTFormer": "BoxAccV2@heldout_tau", "Pro2SAM": "BoxAccV2_single_box"}

_FRAME_W, _FRAME_H = EVAL_FRAME
_MIN_OVERLAY_SIDE = 256  # small images are enlarged so that their boxes stay legible


def _fmt(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def report_markdown(report: EvaluationReport) -> str:
    """The report as a Markdown table in the layout of the paper's Table 1, with a note on where
    each number's threshold and classes came from."""
    results = report.results
    with_masks = any("PxAP" in results[m] for m in METHODS)
    columns = {"top1_loc": "Top-1 Loc", "top5_loc": "Top-5 Loc", "gt_known_loc": "GT-known Loc",
               "MaxBoxAccV2": "MaxBoxAccV2", "BoxAccV2": "BoxAccV2 ‡"}  # fmt: skip
    if with_masks:
        columns.update(PxAP="PxAP", mIoU="mIoU")
    test_split, t = report.test_split, report.thresholds
    lines = [
        f"**{report.dataset}**, split `{test_split}`: "
        f"{report.test.num_images} images ({report.test.num_error_rows} error rows, "
        f"{report.test.num_missing_rows} without a row, counted wrong).",
        "",
        "| Method | " + " | ".join(columns.values()) + " |",
        "|" + "---|" * (len(columns) + 1),
    ]
    names = {"GTFormer": "GTFormer (coarse map)", "Pro2SAM": "Pro2SAM"}
    for m in METHODS:
        values = {**results[m], "BoxAccV2": results[m].get(BOX_ACCURACY[m])}
        lines.append("| " + " | ".join([names[m]] + [_fmt(values.get(k)) for k in columns]) + " |")
    tuned = report.test_tuned
    if tuned:
        row = [f"{names['GTFormer']}, test-tuned †"] + [_fmt(tuned.gtformer.get(k)) for k in columns]
        lines.append("| " + " | ".join(row) + " |")
    best = results["GTFormer"].get("best_tau") or {}
    best_taus = ", ".join(f"{v:.2f} at IoU {k}%" for k, v in best.items())
    taus = ", ".join(f"{v:.2f} at IoU {k}%" for k, v in t.boxacc_taus.items())
    notes = [
        f"Thresholds chosen on the held-out split `{t.chosen_on}` (by {t.selected_by}) and applied to "
        f"`{test_split}`: GTFormer's cam threshold {t.cam_threshold:.2f} (its box and mask: Loc, mIoU). "
        "Pro2SAM's box and mask need no threshold.",
        f"MaxBoxAccV2 (wsolevaluation's): per IoU 30/50/70 the best box accuracy over tau on `{test_split}` itself, "
        f"one tau for the whole split (the metric is threshold-free by design; taus {best_taus or 'none'}), "
        "mean over IoU; Pro2SAM has no score map to sweep (-).",
        "‡ BoxAccV2: mean over IoU 30/50/70 of box accuracy with no threshold taken from the test split: "
        + (f"GTFormer's map at the taus chosen on `{t.chosen_on}` ({taus}); " if taus
           else f"GTFormer: none (`{t.chosen_on}` has no boxes to choose taus on); ")
        + "Pro2SAM's one box per image.",
        f"Classes (Top-1 / Top-5 Loc and Cls) from {report.classes_from}: Top-1 / Top-5 Cls "
        f"{_fmt(results['Pro2SAM'].get('top1_cls'))} / {_fmt(results['Pro2SAM'].get('top5_cls'))}.",
    ]  # fmt: skip
    own = report.results_with_gtformer_classes or {}
    if own:
        locs = [f"{names[m]} Top-1 / Top-5 Loc {_fmt(own[m].get('top1_loc'))} / {_fmt(own[m].get('top5_loc'))}"
                for m in METHODS if m in own]  # fmt: skip
        cls = next(iter(own.values()))
        notes.append(
            f"With GTFormer's own classes instead: {'; '.join(locs)} (Top-1 / Top-5 Cls "
            f"{_fmt(cls.get('top1_cls'))} / {_fmt(cls.get('top5_cls'))})."
        )
    notes.append(
        f"Pro2SAM's box came from the coarse-map fallback (no SAM candidate survived) for "
        f"{_fmt(results['Pro2SAM'].get('fallback_rate'))}% of the images."
    )
    confidence = report.confidence
    if confidence:
        test, fitted_on = confidence["test"], confidence["calibration"]["fitted_on"]
        shares = " / ".join(test["risk_coverage"])
        auroc = "-" if test["auroc"] is None else f"{test['auroc']:.3f}"
        notes.append(
            f"Confidence (P(box IoU >= 0.5), fitted on `{fitted_on}`, `confidence.json`): AUROC {auroc} on "
            f"`{test_split}`; GT-known Loc of the most confident {shares} % of the images: "
            + " / ".join(_fmt(v) for v in test["risk_coverage"].values()) + " (`risk_coverage.png`)."
        )
    if tuned:
        notes.append(
            f"† test-tuned: thresholds chosen on `{test_split}` itself (cam threshold "
            f"{tuned.thresholds.cam_threshold:.2f}), shown only for comparison; not a valid result."
        )
    return "\n".join([*lines, "", *(f"- {n}" for n in notes)]) + "\n"


def select_overlay_cases(report: EvaluationReport, count: int) -> list[tuple[str, dict]]:
    """The best and worst test images by Pro2SAM's IoU (box IoU, else mask IoU), ok rows only.

    Returns:
        up to ``count`` pairs ``("best" | "worst", image record)``, best first.
    """
    def score(r: dict) -> float | None:
        v = r.get("pro2sam_iou", r.get("pro2sam_mask_iou"))
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    scored = sorted((r for r in report.images if score(r) is not None), key=lambda r: -score(r))
    n_best = min((count + 1) // 2, len(scored))
    best = scored[:n_best]
    worst = [r for r in scored[::-1] if r not in best][: count - n_best]
    return [("best", r) for r in best] + [("worst", r) for r in worst]



def overlay_png(record: Mapping, sample: Sample, row: Mapping) -> bytes:
    """PNG of one test image: Pro2SAM's mask and box (gold), the GT boxes (green) and GTFormer's box
    (cyan), in original pixels; small images enlarged to at least 256 px, a caption with the IoU.

    Args:
        record: the image's record in ``report.images``.
        sample: its ground truth.
        row: its labels-table row.
    """
    image = decode_image(read_bytes(sample.uri))
    h, w = image.shape[:2]
    gtformer_box = None
    if record.get("gtformer_box_224"):
        x0, y0, x1, y1 = record["gtformer_box_224"]
        gtformer_box = [x0 * w / _FRAME_W, y0 * h / _FRAME_H, x1 * w / _FRAME_W, y1 * h / _FRAME_H]
    iou = record.get("pro2sam_iou", record.get("pro2sam_mask_iou"))
    caption = f"{sample.image_id}  IoU {iou:.2f}" if iou is not None else sample.image_id
    picture = render_overlay(
        image,
        row,
        thumb_size=None,
        min_size=_MIN_OVERLAY_SIDE,
        gt_boxes=sample.boxes,
        gtformer_box=gtformer_box,
        caption=caption,
    )
    return encode_image(picture, "png")


def overlay_name(kind: str, rank: int, image_id: str) -> str:
    """A file name for an overlay: ``best_00_<image id with / replaced>.png``."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in posixpath.splitext(image_id)[0])
    return f"{kind}_{rank:02d}_{safe[-80:]}.png"


def report_json(report: EvaluationReport) -> str:
    """The report as JSON (NaN written as null), per-image records left out."""
    return json.dumps(_clean(report.to_json(images=False)), indent=2)


def image_records_jsonl(report: EvaluationReport) -> str:
    """The per-image records of the test split, one JSON line each (NaN written as null)."""
    return "".join(json.dumps(_clean(r)) + "\n" for r in report.images)


def _clean(value):
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        return _clean(value.item())
    return value
