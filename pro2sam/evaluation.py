"""Evaluation of GTFormer-only and Pro2SAM on a WSOL split (METHOD.md §4); no Ray here.

Inputs are a :class:`~pro2sam.datasets.WSOLDataset` (the ground truth) and the rows of the labels
table (:data:`pro2sam.labels.LABEL_SCHEMA`), joined on the image ``uri``.

Frame: everything is scored in the 224x224 evaluation frame, the image plain-resized (no crop).
GT boxes (original pixels of the annotation) and Pro2SAM's ``box_xyxy`` (original pixels of the
decoded image) are scaled there with :func:`~pro2sam.metrics.scale_boxes_to_frame` (truncated to
int); masks are resized with nearest neighbour; GT masks are ``> 0.5`` of the PNG's grey level and
the ignore region excludes GT foreground, as in ``clovaai/wsolevaluation``.

Box convention: one for every box scored, the GT's and wsolevaluation's (``x1``, ``y1`` one past
the last pixel). The labels table's ``box_xyxy`` holds inclusive pixel indices, so it is converted
(:func:`~pro2sam.metrics.inclusive_to_eval_boxes`) in original pixels, before the scaling; boxes
drawn from GTFormer's map are in that convention already. IoU is wsolevaluation's (+1 on sides).

The two methods:

- **GTFormer** (coarse map only): the row's ``coarse_map`` is min-max normalised and upsampled
  bilinearly to 224x224 (:func:`~pro2sam.matching.upsample_coarse_map`). Its one box per image
  (Top-1 / Top-5 / GT-known Loc) is that of the largest contour of the map cut at
  ``cam_threshold`` (wsolevaluation's quantisation and box convention); its mask is the same cut.
  ``MaxBoxAccV2`` is wsolevaluation's: per IoU delta in {30, 50, 70} the best box accuracy over
  tau *on the split scored* (one tau for the whole split), averaged over delta; the metric is
  threshold-free by design. ``BoxAccV2@heldout_tau`` is the same mean at the taus chosen on the
  held-out split instead. PxAP uses the map itself.
- **Pro2SAM**: the row's ``box_xyxy`` and ``mask_rle``; no threshold. It gives one box per image,
  so it has no MaxBoxAccV2; ``BoxAccV2_single_box`` is the mean over delta in {30, 50, 70} of the
  accuracy of that box. Its PxAP scores the binary mask as the score map, i.e. one operating point.
  ``fallback_rate`` is the share of images whose box came from the coarse-map fallback.

Classes: Top-1 / Top-5 Cls and Loc use the rows' ``topk_classes`` (GTFormer's), or, where given,
the top-k classes of a separate classifier (the paper's Table 1 takes EfficientNet-B7's); the box
is GTFormer's or Pro2SAM's either way, so GT-known Loc does not depend on it.

Thresholds (GTFormer's ``cam_threshold``, the box-accuracy tau of each IoU delta) are chosen on a
held-out split by :func:`choose_thresholds` and applied to the test split
(:func:`evaluate_with_heldout`); numbers with thresholds tuned on test itself are reported only
beside them, under ``test_tuned``. Rows with ``status == 'error'`` and images without a row count
as wrong for every metric. Accuracies, PxAP, mIoU and rates are percentages.

One pass over a split hands each image to one scorer per method (:class:`GTFormerScorer`,
:class:`Pro2SAMScorer`, as wsolevaluation keeps one evaluator per kind of output); the results are
typed (:class:`SplitResult`, :class:`EvaluationReport`) and ``to_json()`` gives ``report.json``'s
layout. :mod:`pro2sam.report` writes the result as Markdown, JSON and overlay PNGs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import pyarrow as pa

from .confidence import calibrate, score_confidence
from .datasets import Sample, WSOLDataset
from .labels import STATUS_OK
from .matching import upsample_coarse_map
from .metrics import (
    EVAL_FRAME,
    IOU_THRESHOLDS,
    LOC_IOU_THRESHOLD,
    LocalizationAccumulator,
    MaxBoxAccEvaluator,
    PxAPEvaluator,
    box_iou_inclusive,
    boxes_from_score_map,
    cam_thresholds,
    inclusive_to_eval_boxes,
    mask_iou,
    quantize_score_map,
    scale_boxes_to_frame,
)
from .rle import decode_mask
from .storage import read_bytes

__all__ = [
    "METHODS",
    "FALLBACK_SOURCE",
    "GTFORMER_CLASSES",
    "DEFAULT_CAM_CURVE_INTERVAL",
    "Thresholds",
    "IMAGE_RECORD_FIELDS",
    "GTFormerScorer",
    "Pro2SAMScorer",
    "SplitResult",
    "TestTuned",
    "EvaluationReport",
    "index_rows",
    "load_gt_mask",
    "gtformer_score_map",
    "evaluate_predictions",
    "choose_thresholds",
    "evaluate_with_heldout",
]

METHODS = ("GTFormer", "Pro2SAM")
# The row's box_source of an image whose box came from GTFormer's map (no SAM candidate survived).
FALLBACK_SOURCE = "coarse_fallback"
# Where the class scores come from when no separate classifier is given.
GTFORMER_CLASSES = "GTFormer (the labels' topk_classes)"
# The tau grid most WSOL papers use (wsolevaluation's training-time default).
DEFAULT_CAM_CURVE_INTERVAL = 0.01
_FRAME_W, _FRAME_H = EVAL_FRAME


@dataclass(frozen=True)
class Thresholds:
    """Thresholds chosen on one split, to be applied to another.

    Attributes:
        cam_threshold: tau of GTFormer's box and mask (fraction of the map's peak).
        boxacc_taus: IoU delta (percent) -> tau of GTFormer's ``BoxAcc@{delta}@heldout_tau``: the
            tau of best box accuracy at that delta on this split (empty when it has no boxes).
        chosen_on: ``"<dataset>:<split>"`` the thresholds were chosen on.
        selected_by: ``"gt_known_loc"`` (largest-contour box accuracy at IoU 0.5) or ``"mIoU"``
            (splits with masks but no boxes).
    """

    cam_threshold: float
    boxacc_taus: dict[int, float]
    chosen_on: str
    selected_by: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["boxacc_taus"] = {str(k): v for k, v in self.boxacc_taus.items()}
        return d


# ---------------------------------------------------------------- inputs


def index_rows(rows: pa.Table | Iterable[Mapping]) -> dict[str, dict]:
    """Label-table rows keyed by ``uri``; where an image has several rows an ``ok`` one wins."""
    if isinstance(rows, pa.Table):
        rows = rows.to_pylist()
    out: dict[str, dict] = {}
    for row in rows:
        uri = row["uri"]
        if uri not in out or (out[uri].get("status") != STATUS_OK and row.get("status") == STATUS_OK):
            out[uri] = dict(row)
    return out


def _load_png_in_frame(uri: str) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(read_bytes(uri), np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError(f"cannot decode mask {uri}")
    return cv2.resize(image.astype(np.float32), EVAL_FRAME, interpolation=cv2.INTER_NEAREST)


def load_gt_mask(sample: Sample) -> tuple[np.ndarray, np.ndarray | None] | None:
    """GT foreground and ignore region of a sample in the 224 frame, or None without masks.

    As wsolevaluation's ``get_mask``: each PNG read as grey, resized nearest to 224x224, ``> 0.5``;
    the foreground is the union of the instance masks; the ignore region is the ignore PNG minus
    the foreground.

    Returns:
        (mask, ignore): (224, 224) bool each; ignore is None when the sample has none.
    """
    if not sample.mask_uris:
        return None
    mask = np.zeros((_FRAME_H, _FRAME_W), dtype=bool)
    for uri in sample.mask_uris:
        mask |= _load_png_in_frame(uri) > 0.5
    ignore = None
    if sample.ignore_uri:
        ignore = (_load_png_in_frame(sample.ignore_uri) > 0.5) & ~mask
    return mask, ignore


def gtformer_score_map(row: Mapping) -> np.ndarray:
    """The row's coarse map in the 224 frame: min-max normalised, bilinear, float64 in [0, 1].

    Args:
        row: a labels-table row; ``coarse_map`` is row-major with side ``sqrt(len)``.

    Returns:
        (224, 224) float64.
    """
    flat = np.asarray(row["coarse_map"], dtype=np.float32)
    side = math.isqrt(flat.size)
    if side * side != flat.size or side == 0:
        raise ValueError(f"coarse_map of {flat.size} values is not a square map")
    score = upsample_coarse_map(flat.reshape(side, side), (_FRAME_H, _FRAME_W))
    return np.clip(score.astype(np.float64), 0.0, 1.0)


def _pro2sam_mask(row: Mapping) -> np.ndarray:
    """The row's mask resized (nearest) to the 224 frame, (224, 224) bool."""
    mask = decode_mask(row["mask_rle"]).astype(np.uint8)
    return cv2.resize(mask, EVAL_FRAME, interpolation=cv2.INTER_NEAREST).astype(bool)


def _iou_by_cut(quantized: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None) -> np.ndarray:
    """Mask IoU of ``quantized > c`` against ``gt`` for every cut c in 0..255 (NaN for empty unions)."""
    scored = np.ones_like(gt) if ignore is None else ~ignore
    fg = np.bincount(quantized[gt & scored], minlength=256)
    bg = np.bincount(quantized[~gt & scored], minlength=256)
    tp = fg.sum() - np.cumsum(fg)  # pixels above cut c
    fp = bg.sum() - np.cumsum(bg)
    union = fg.sum() + fp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def _cut(tau: float, peak: float) -> int:
    return int(float(tau) * peak)


def _tau_index(taus: np.ndarray, tau: float, what: str) -> int:
    i = int(np.argmin(np.abs(taus - tau)))
    if not math.isclose(float(taus[i]), float(tau), abs_tol=1e-9):
        raise ValueError(f"{what} {tau} is not on the tau grid (step {taus[1] - taus[0]:g})")
    return i


# ---------------------------------------------------------------- one image


# The per-image record of a split (``images`` of :class:`SplitResult`), in its field order (the
# scorers fill it in their own order); an image has the fields that apply to it (no row: no
# classes or boxes; no GT boxes: no IoU).
IMAGE_RECORD_FIELDS = (
    "image_id", "uri", "label", "status", "error",
    "top1", "top5", "topk_classes", "gtformer_topk_classes",
    "pro2sam_box_224", "pro2sam_box_xyxy", "gt_boxes_224",
    "gtformer_box_224", "gtformer_iou", "pro2sam_iou", "pro2sam_mask_iou",
)  # fmt: skip


@dataclass
class _Image:
    """One image of a split as every scorer sees it: its ground truth in the 224 frame and the
    classes it is scored with.

    Attributes:
        label: GT class.
        has_boxes: the sample has GT boxes (an image without a row counts in the box denominators).
        boxes: (K, 4) GT boxes in the 224 frame, wsolevaluation's convention; None without boxes
            or, for an image without a row, without a known size.
        mask: (224, 224) bool GT foreground; None without masks. ``ignore`` likewise (or None).
        topk: (<=5,) classes scored (a separate classifier's where given), best first.
        own_topk: (<=5,) GTFormer's classes from the row (the same as ``topk`` without classifier).
        top1, top5: ``topk`` has the label first / among the five.
    """

    label: int
    has_boxes: bool
    boxes: np.ndarray | None
    mask: np.ndarray | None
    ignore: np.ndarray | None
    topk: np.ndarray | None = None
    own_topk: np.ndarray | None = None
    top1: bool = False
    top5: bool = False


# ---------------------------------------------------------------- one scorer per method


def _add_without_prediction(image: _Image, box_accumulators: tuple, pxap: PxAPEvaluator) -> float | None:
    """Count an image without a prediction, as every scorer does: in the denominators of
    ``box_accumulators`` (those not None) where it has boxes, and with an all-zero score map in
    ``pxap`` where it has a mask.

    Returns:
        The mask IoU of predicting nothing, for the scorer's per-image IoUs; None without a
        mask or where that IoU is undefined (an empty GT mask).
    """
    if image.has_boxes:
        for acc in box_accumulators:
            if acc is not None:
                acc.num_images += 1
    if image.mask is None:
        return None
    pxap.accumulate(np.zeros(image.mask.shape, dtype=np.float64), image.mask, image.ignore)
    iou_nothing = mask_iou(np.zeros_like(image.mask), image.mask, image.ignore)
    return None if math.isnan(iou_nothing) else iou_nothing


class GTFormerScorer:
    """GTFormer's numbers on one split, from the rows' coarse maps: its largest-contour box and its
    mask at every tau of the grid (the curves), and at ``cam_threshold`` where given.

    Args:
        taus: (T,) the tau grid (:func:`~pro2sam.metrics.cam_thresholds`).
        cam_threshold: tau of the box and mask scored as the method's own (None: curves only).
        interval: step of ``taus``.
        own_classes: also count Top-1 / Top-5 Loc with the rows' own classes (a separate
            classifier gives ``_Image.topk``).
    """

    name = "GTFormer"

    def __init__(self, taus: np.ndarray, cam_threshold: float | None, interval: float, own_classes: bool) -> None:
        self.taus, self.cam_threshold = taus, cam_threshold
        t = len(taus)
        # largest-contour box at every tau: counts of GT-known / Top-1 / Top-5 Loc
        self.loc_by_tau = {k: np.zeros(t, dtype=np.int64) for k in ("gt_known_loc", "top1_loc", "top5_loc")}
        self.loc = LocalizationAccumulator()  # at cam_threshold
        self.own_loc = LocalizationAccumulator() if own_classes else None
        self.box_acc = MaxBoxAccEvaluator(cam_curve_interval=interval)
        self.pxap = PxAPEvaluator(cam_curve_interval=interval)
        self.iou_sum = np.zeros(t)
        self.iou_n = np.zeros(t, dtype=np.int64)
        self.iou_at: list[float] = []  # mask IoU at cam_threshold, per image

    def add(self, image: _Image, row: Mapping, record: dict) -> None:
        """Score one ok row; write its box and IoU at ``cam_threshold`` into ``record``."""
        score = gtformer_score_map(row)
        quantized = quantize_score_map(score)
        peak = float(quantized.max())
        if image.boxes is not None:
            extra = [self.cam_threshold] if self.cam_threshold is not None else []
            boxes = boxes_from_score_map(score, list(self.taus) + extra, multi_contour=False)
            iou = box_iou_inclusive(np.concatenate(boxes), image.boxes).max(axis=1)
            correct = iou[: len(self.taus)] >= LOC_IOU_THRESHOLD
            self.loc_by_tau["gt_known_loc"] += correct
            self.loc_by_tau["top1_loc"] += correct & image.top1
            self.loc_by_tau["top5_loc"] += correct & image.top5
            if self.cam_threshold is not None:
                self.loc.accumulate(image.topk, image.label, boxes[-1][0], image.boxes)
                if self.own_loc is not None:
                    self.own_loc.accumulate(image.own_topk, image.label, boxes[-1][0], image.boxes)
                record["gtformer_box_224"] = boxes[-1][0].tolist()
                record["gtformer_iou"] = float(iou[-1])
            self.box_acc.accumulate(score, image.boxes)
        if image.mask is not None:
            self.pxap.accumulate(score, image.mask, image.ignore)
            by_cut = _iou_by_cut(quantized, image.mask, image.ignore)
            per_tau = by_cut[[_cut(t, peak) for t in self.taus]]
            defined = ~np.isnan(per_tau)
            self.iou_sum[defined] += per_tau[defined]
            self.iou_n += defined
            if self.cam_threshold is not None:
                self.iou_at.append(float(by_cut[_cut(self.cam_threshold, peak)]))

    def add_wrong(self, image: _Image) -> None:
        """An image without a prediction: in every denominator, in no numerator."""
        iou_nothing = _add_without_prediction(image, (self.loc, self.own_loc, self.box_acc), self.pxap)
        if iou_nothing is not None:
            self.iou_n += 1
            self.iou_at.append(iou_nothing)

    def scores(self, counts: _Counts, boxacc_taus: Mapping[int, float] | None) -> dict:
        """The method's numbers (percent), after the classification ones of ``counts``."""
        out = counts.class_scores()
        if counts.num_with_boxes:
            if self.cam_threshold is not None:
                out.update({k: v for k, v in self.loc.compute().items() if k.endswith("_loc")})
            out.update(_box_accuracy(self.box_acc, boxacc_taus, self.taus))
        if counts.num_with_masks:
            out["PxAP"] = self.pxap.compute()["PxAP"]
            if self.cam_threshold is not None:
                out["mIoU"] = _nanmean_pct(self.iou_at)
        return out

    def curves(self, counts: _Counts) -> dict:
        """``GTFormer_<metric>`` -> the metric (percent) at every tau of the grid."""
        curves: dict = {}
        if counts.num_with_boxes:
            for key in ("top1_loc", "top5_loc", "gt_known_loc"):
                curves[f"GTFormer_{key}"] = (100.0 * self.loc_by_tau[key] / counts.num_with_boxes).tolist()
            accuracy = self.box_acc.accuracy_per_threshold()
            curves["GTFormer_box_acc"] = {str(d): row.tolist() for d, row in zip(self.box_acc.iou_thresholds, accuracy)}
        if counts.num_with_masks:
            with np.errstate(invalid="ignore", divide="ignore"):
                curves["GTFormer_mIoU"] = np.where(
                    self.iou_n > 0, 100.0 * self.iou_sum / np.maximum(self.iou_n, 1), np.nan
                ).tolist()
        return curves

    def own_class_scores(self, counts: _Counts) -> dict:
        """The class-dependent numbers with GTFormer's own classes (needs ``cam_threshold``)."""
        own = self.own_loc
        if self.cam_threshold is None or not (counts.num_with_boxes and own is not None and own.num_images):
            return {}
        return {k: v for k, v in self.own_loc.compute().items() if k in _CLASS_KEYS}


class Pro2SAMScorer:
    """Pro2SAM's numbers on one split, from the rows' ``box_xyxy`` and ``mask_rle`` (no threshold).

    Args:
        own_classes: also count Top-1 / Top-5 Loc with the rows' own (GTFormer's) classes.
    """

    name = "Pro2SAM"

    def __init__(self, interval: float, own_classes: bool) -> None:
        self.loc = LocalizationAccumulator()
        self.own_loc = LocalizationAccumulator() if own_classes else None
        self.box_correct = np.zeros(len(IOU_THRESHOLDS), dtype=np.int64)  # its one box, per delta
        self.pxap = PxAPEvaluator(cam_curve_interval=interval)
        self.iou: list[float] = []  # mask IoU per image
        self.num_fallback = 0

    def add(self, image: _Image, row: Mapping, record: dict) -> None:
        """Score one ok row; write its box in the 224 frame and its IoUs into ``record``."""
        self.num_fallback += row.get("box_source") == FALLBACK_SOURCE
        mask = _pro2sam_mask(row)
        box = inclusive_to_eval_boxes(np.asarray(row["box_xyxy"]))  # in original pixels, then scaled
        box = scale_boxes_to_frame(box, (row["width"], row["height"]))[0]
        record["pro2sam_box_224"] = box.tolist()
        record["pro2sam_box_xyxy"] = [int(v) for v in row["box_xyxy"]]
        if image.boxes is not None:
            record["pro2sam_iou"] = self.loc.accumulate(image.topk, image.label, box, image.boxes)
            if self.own_loc is not None:
                self.own_loc.accumulate(image.own_topk, image.label, box, image.boxes)
            self.box_correct += [record["pro2sam_iou"] >= d / 100 for d in IOU_THRESHOLDS]
        if image.mask is not None:
            self.pxap.accumulate(mask.astype(np.float64), image.mask, image.ignore)
            record["pro2sam_mask_iou"] = mask_iou(mask, image.mask, image.ignore)
            self.iou.append(record["pro2sam_mask_iou"])

    def add_wrong(self, image: _Image) -> None:
        """An image without a prediction: in every denominator, in no numerator."""
        iou_nothing = _add_without_prediction(image, (self.loc, self.own_loc), self.pxap)
        if iou_nothing is not None:
            self.iou.append(iou_nothing)

    def scores(self, counts: _Counts, boxacc_taus: Mapping[int, float] | None = None) -> dict:
        """The method's numbers (percent), after the classification ones of ``counts``."""
        out = dict(counts.class_scores(), fallback_rate=_pct(self.num_fallback, counts.num_images))
        if counts.num_with_boxes:
            out.update({k: v for k, v in self.loc.compute().items() if k.endswith("_loc")})
            for d, correct in zip(IOU_THRESHOLDS, self.box_correct):
                out[f"BoxAcc@{d}_single_box"] = 100.0 * float(correct) / counts.num_with_boxes
            out["BoxAccV2_single_box"] = float(np.mean([out[f"BoxAcc@{d}_single_box"] for d in IOU_THRESHOLDS]))
        if counts.num_with_masks:
            out["PxAP"] = self.pxap.compute()["PxAP"]
            out["mIoU"] = _nanmean_pct(self.iou)
        return out

    def curves(self, counts: _Counts) -> dict:
        return {}  # one box and mask per image: nothing to sweep

    def own_class_scores(self, counts: _Counts) -> dict:
        """The class-dependent numbers with GTFormer's own classes."""
        if not (counts.num_with_boxes and self.own_loc is not None and self.own_loc.num_images):
            return {}
        return {k: v for k, v in self.own_loc.compute().items() if k in _CLASS_KEYS}


# ---------------------------------------------------------------- one split


@dataclass
class _Counts:
    """What a split holds, and the classification counts every method shares (the class scores
    are the same whichever box is scored)."""

    num_images: int = 0
    num_with_boxes: int = 0
    num_with_masks: int = 0
    num_error_rows: int = 0
    num_missing_rows: int = 0
    top1_cls: int = 0
    top5_cls: int = 0

    def class_scores(self) -> dict:
        return {"top1_cls": _pct(self.top1_cls, self.num_images), "top5_cls": _pct(self.top5_cls, self.num_images)}


class _Split:
    """One pass over a split's images, handing each to one scorer per method.

    ``classes`` (uri -> top-k classes of a separate classifier) replaces the rows' GTFormer
    classes in every class-dependent count; GTFormer's own are then counted too.
    """

    def __init__(
        self,
        taus: np.ndarray,
        cam_threshold: float | None,
        interval: float,
        classes: Mapping[str, Sequence[int]] | None,
        methods: Sequence[str] = METHODS,
    ) -> None:
        self.taus, self.cam_threshold, self.classes = taus, cam_threshold, classes
        own = classes is not None
        self.scorers: dict[str, GTFormerScorer | Pro2SAMScorer] = {}
        if "GTFormer" in methods:
            self.scorers["GTFormer"] = GTFormerScorer(taus, cam_threshold, interval, own)
        self.scorers["Pro2SAM"] = Pro2SAMScorer(interval, own)
        self.counts = _Counts()
        self.images: list[dict] = []

    def add(self, sample: Sample, row: Mapping | None) -> None:
        counts = self.counts
        counts.num_images += 1
        ok = row is not None and row.get("status") == STATUS_OK
        record: dict = {"image_id": sample.image_id, "uri": sample.uri, "label": sample.label}
        record["status"] = "missing" if row is None else row.get("status")
        if row is None:
            counts.num_missing_rows += 1
        elif not ok:
            counts.num_error_rows += 1
            record["error"] = row.get("error")
        has_boxes = sample.boxes is not None and len(sample.boxes) > 0
        size = sample.size or ((row["width"], row["height"]) if ok else None)
        gt_boxes = scale_boxes_to_frame(sample.boxes, size) if has_boxes and size else None
        gt_mask = load_gt_mask(sample)
        counts.num_with_boxes += has_boxes
        counts.num_with_masks += gt_mask is not None
        image = _Image(sample.label, has_boxes, gt_boxes, *(gt_mask or (None, None)))
        if not ok:
            for scorer in self.scorers.values():
                scorer.add_wrong(image)
        else:
            image.own_topk = _topk(row["topk_classes"])
            image.topk = image.own_topk if self.classes is None else _topk(self.classes.get(sample.uri))
            image.top1, image.top5 = bool(image.topk[0] == sample.label), bool((image.topk == sample.label).any())
            counts.top1_cls += image.top1
            counts.top5_cls += image.top5
            record.update(top1=image.top1, top5=image.top5, topk_classes=[int(c) for c in image.topk])
            if self.classes is not None:
                record["gtformer_topk_classes"] = [int(c) for c in image.own_topk]
            if has_boxes:
                record["gt_boxes_224"] = gt_boxes.tolist()
            for scorer in self.scorers.values():
                scorer.add(image, row, record)
        self.images.append({**{k: record[k] for k in IMAGE_RECORD_FIELDS if k in record}, **record})

    def result(self, dataset: WSOLDataset, boxacc_taus: Mapping[int, float] | None) -> SplitResult:
        counts = self.counts
        results = {m: counts.class_scores() for m in METHODS}  # a method not scored: its classes only
        curves: dict = {"taus": [float(t) for t in self.taus]}
        for name, scorer in self.scorers.items():
            results[name] = scorer.scores(counts, boxacc_taus)
            curves.update(scorer.curves(counts))
        own = None
        if self.classes is not None:
            own = {m: (self.scorers[m].own_class_scores(counts) if m in self.scorers else {}) for m in METHODS}
        return SplitResult(
            dataset=dataset.name,
            split=dataset.split,
            num_images=counts.num_images,
            num_with_boxes=counts.num_with_boxes,
            num_with_masks=counts.num_with_masks,
            num_error_rows=counts.num_error_rows,
            num_missing_rows=counts.num_missing_rows,
            cam_threshold=self.cam_threshold,
            boxacc_taus={str(k): float(v) for k, v in (boxacc_taus or {}).items()} or None,
            results=results,
            with_gtformer_classes=own,
            curves=curves,
            images=self.images,
        )


# ---------------------------------------------------------------- the typed results


@dataclass
class SplitResult:
    """The scores of one split (:func:`evaluate_predictions`).

    Attributes:
        dataset, split: the split scored.
        num_images, num_with_boxes, num_with_masks: images scored, and those with GT boxes / masks.
        num_error_rows, num_missing_rows: images with an error row / without a row (counted wrong).
        cam_threshold: GTFormer's tau for its box and mask (None: curves only).
        boxacc_taus: IoU delta (as a string) -> tau chosen on another split, or None.
        results: method (:data:`METHODS`) -> metric -> percent; the metric names are those of
            :func:`evaluate_predictions`. A method not scored has its classification numbers only.
        with_gtformer_classes: with a separate classifier, method -> the class-dependent numbers
            with GTFormer's own classes; else None.
        curves: ``taus`` and GTFormer's Loc, box accuracy and mIoU at every tau.
        images: one record per sample, fields as :data:`IMAGE_RECORD_FIELDS`.
    """

    dataset: str
    split: str
    num_images: int
    num_with_boxes: int
    num_with_masks: int
    num_error_rows: int
    num_missing_rows: int
    cam_threshold: float | None
    boxacc_taus: dict[str, float] | None
    results: dict[str, dict]
    with_gtformer_classes: dict[str, dict] | None
    curves: dict
    images: list[dict]

    def counts(self) -> dict:
        """The split's name and counts, as in JSON."""
        return {
            "dataset": self.dataset,
            "split": self.split,
            "num_images": self.num_images,
            "num_with_boxes": self.num_with_boxes,
            "num_with_masks": self.num_with_masks,
            "num_error_rows": self.num_error_rows,
            "num_missing_rows": self.num_missing_rows,
        }

    def to_json(self, *, images: bool = True, methods: bool = True) -> dict:
        """A JSON-ready dict: the counts, ``cam_threshold``, ``boxacc_taus``, one key per method
        (``methods``), ``with_gtformer_classes`` (``methods``), ``curves`` and ``images``."""
        out = dict(self.counts(), cam_threshold=self.cam_threshold, boxacc_taus=self.boxacc_taus)
        if methods:
            out.update({m: self.results[m] for m in METHODS}, with_gtformer_classes=self.with_gtformer_classes)
        out["curves"] = self.curves
        if images:
            out["images"] = self.images
        return out


@dataclass
class TestTuned:
    """GTFormer with thresholds chosen on the test split itself, for comparison only.

    Attributes:
        thresholds: those chosen on test.
        gtformer: GTFormer's numbers (percent) at them, read off the test curves.
    """

    __test__ = False  # not a pytest class

    thresholds: Thresholds
    gtformer: dict

    def to_json(self) -> dict:
        return {"thresholds": self.thresholds.to_dict(), "GTFormer": self.gtformer}


@dataclass
class EvaluationReport:
    """The report of :func:`evaluate_with_heldout`: thresholds chosen on ``heldout``, applied to ``test``.

    Attributes:
        dataset, test_split, heldout_split: what was scored.
        thresholds: chosen on the held-out split.
        heldout: the held-out split (its counts and curves are reported; its methods' numbers not).
        test: the test split at ``thresholds``; its ``results`` are the report's.
        classes_from: what gave the class scores (a separate classifier or :data:`GTFORMER_CLASSES`).
        test_tuned: GTFormer at thresholds chosen on test (None: test has no boxes or masks).
        settings: how every number was made (frame, grids, conventions); the evaluation job adds
            its own (specs, label job, model ids).
        confidence: the confidence calibrated on held-out and scored on test (None without boxes).
        overlays: the overlay PNGs written (set by the job after ``report.json``; None before).
    """

    dataset: str
    test_split: str
    heldout_split: str
    thresholds: Thresholds
    heldout: SplitResult
    test: SplitResult
    classes_from: str
    test_tuned: TestTuned | None
    settings: dict
    confidence: dict | None
    overlays: list[str] | None = None

    @property
    def results(self) -> dict[str, dict]:
        """Method -> its numbers on test (percent)."""
        return self.test.results

    @property
    def results_with_gtformer_classes(self) -> dict[str, dict] | None:
        return self.test.with_gtformer_classes

    @property
    def images(self) -> list[dict]:
        """The test split's per-image records."""
        return self.test.images

    def to_json(self, *, images: bool = True) -> dict:
        """The report as a JSON-ready dict (``report.json`` is this without ``images``)."""
        out = {
            "dataset": self.dataset,
            "test_split": self.test_split,
            "heldout_split": self.heldout_split,
            "thresholds": self.thresholds.to_dict(),
            "results": {m: self.results[m] for m in METHODS},
            "results_with_gtformer_classes": self.results_with_gtformer_classes,
            "classes_from": self.classes_from,
            "test_tuned": None if self.test_tuned is None else self.test_tuned.to_json(),
            "heldout": self.heldout.to_json(images=False),
            "test": self.test.to_json(images=False, methods=False),
            "settings": self.settings,
            "confidence": self.confidence,
        }
        if images:
            out["images"] = self.images
        if self.overlays is not None:
            out["overlays"] = self.overlays
        return out


# The numbers that depend on the class scores (the box alone decides the rest).
_CLASS_KEYS = ("top1_cls", "top5_cls", "top1_loc", "top5_loc")


def _pct(count: float, total: int) -> float | None:
    return 100.0 * count / total if total else None


def _topk(classes) -> np.ndarray:
    """The first five of a top-k list, best first; [-1] (no class right) when there is none."""
    topk = np.asarray(classes if classes is not None and len(classes) else [-1]).reshape(-1)
    return topk[:5]

def _nanmean_pct(values: Sequence[float]) -> float | None:
    values = [v for v in values if not math.isnan(v)]
    return 100.0 * float(np.mean(values)) if values else None


def _box_accuracy(evaluator: MaxBoxAccEvaluator, taus: Mapping[int, float] | None, grid: np.ndarray) -> dict:
    """GTFormer's box accuracy over the split: wsolevaluation's MaxBoxAcc (best tau of this split,
    per delta) and, with ``taus`` (chosen on another split), the accuracy at those taus."""
    best = evaluator.compute()
    out = {f"MaxBoxAcc@{d}": best[f"MaxBoxAcc@{d}"] for d in evaluator.iou_thresholds}
    out["MaxBoxAccV2"] = best["MaxBoxAccV2"]
    out["best_tau"] = {str(d): best[f"best_tau@{d}"] for d in evaluator.iou_thresholds}
    if taus is not None:
        accuracy = evaluator.accuracy_per_threshold()
        for i, delta in enumerate(evaluator.iou_thresholds):
            at = _tau_index(grid, taus[delta], f"tau@{delta}")
            out[f"BoxAcc@{delta}@heldout_tau"] = float(accuracy[i, at])
        out["BoxAccV2@heldout_tau"] = float(np.mean([out[f"BoxAcc@{d}@heldout_tau"] for d in IOU_THRESHOLDS]))
    return out


def evaluate_predictions(
    dataset: WSOLDataset,
    rows: pa.Table | Iterable[Mapping],
    *,
    cam_threshold: float | None = None,
    boxacc_taus: Mapping[int, float] | None = None,
    cam_curve_interval: float = DEFAULT_CAM_CURVE_INTERVAL,
    classes: Mapping[str, Sequence[int]] | None = None,
    methods: Sequence[str] = METHODS,
) -> SplitResult:
    """Score the labels-table rows of one split against its ground truth.

    Args:
        dataset: the split's ground truth; every sample is scored (no row: wrong).
        rows: labels-table rows (a table or dicts), joined on ``uri``; rows of other images are
            ignored.
        cam_threshold: GTFormer's box/mask threshold (None: only the per-tau curves, e.g. on the
            held-out split before choosing it).
        boxacc_taus: IoU delta -> tau chosen on another split, for GTFormer's
            ``BoxAcc@{delta}@heldout_tau``; taus on the grid of ``cam_curve_interval``. None: no
            such numbers.
        cam_curve_interval: step of the tau grid.
        classes: uri -> top-k class indices (best first) of a separate classifier, used instead
            of the rows' ``topk_classes`` for every class-dependent number; an image it lacks
            has no class right. None: the rows' (GTFormer's).
        methods: the methods scored; ``("Pro2SAM",)`` leaves GTFormer's numbers out (``GTFormer``
            and its curves empty), which ``pro2sam tune`` does for each of its many settings.

    Returns:
        A :class:`SplitResult` (``to_json()`` for JSON): counts; ``results``, ``GTFormer`` and
        ``Pro2SAM``'s metrics (percent): ``top1_cls``,
        ``top5_cls``, ``top1_loc``, ``top5_loc``, ``gt_known_loc``; GTFormer's ``MaxBoxAcc@30/50/70``,
        ``MaxBoxAccV2`` and ``best_tau`` (max over tau on this split), with ``boxacc_taus`` also
        ``BoxAcc@30/50/70@heldout_tau`` and ``BoxAccV2@heldout_tau``; Pro2SAM's
        ``BoxAcc@30/50/70_single_box``, ``BoxAccV2_single_box`` and ``fallback_rate``; with GT masks
        ``PxAP`` and ``mIoU``. Box metrics need boxes, Loc metrics of GTFormer a
        ``cam_threshold``. ``with_gtformer_classes``: with ``classes``, method -> the
        class-dependent numbers with GTFormer's own classes (else None). ``curves``: GTFormer's
        Loc, box accuracy and mIoU at every tau. ``images``: one record per sample (status,
        classes, IoUs, boxes in the 224 frame and the evaluation's box convention).
    """
    taus = cam_thresholds(cam_curve_interval)
    by_uri = index_rows(rows)
    split = _Split(taus, cam_threshold, cam_curve_interval, classes, methods)
    for sample in dataset.samples:
        split.add(sample, by_uri.get(sample.uri))
    return split.result(dataset, boxacc_taus)


def choose_thresholds(heldout: SplitResult) -> Thresholds:
    """GTFormer's thresholds from a held-out result of :func:`evaluate_predictions`.

    ``cam_threshold`` is the first tau of best GT-known Loc (largest-contour box, IoU 0.5); the
    box-accuracy tau of each delta is the first tau of best box accuracy there. A split with masks
    and no boxes picks ``cam_threshold`` by mIoU.

    Raises:
        ValueError: the held-out split has neither boxes nor masks.
    """
    curves = heldout.curves
    taus = np.asarray(curves["taus"])
    where = f"{heldout.dataset}:{heldout.split}"
    if "GTFormer_gt_known_loc" in curves:
        cam = float(taus[int(np.argmax(curves["GTFormer_gt_known_loc"]))])
        per_delta = {int(d): float(taus[int(np.argmax(acc))]) for d, acc in curves["GTFormer_box_acc"].items()}
        return Thresholds(cam, per_delta, where, "gt_known_loc")
    if "GTFormer_mIoU" in curves:
        miou = np.nan_to_num(np.asarray(curves["GTFormer_mIoU"], dtype=np.float64), nan=-1.0)
        return Thresholds(float(taus[int(np.argmax(miou))]), {}, where, "mIoU")
    raise ValueError(f"held-out split {where} has neither boxes nor masks to choose thresholds on")


def _at_tau(result: SplitResult, tau: float) -> dict:
    """GTFormer's numbers at grid threshold ``tau``, read off the curves (no second pass).

    MaxBoxAccV2 is left out: it takes no threshold from anywhere and is in the main results."""
    curves = result.curves
    i = _tau_index(np.asarray(curves["taus"]), tau, "cam_threshold")
    out = {k: result.results["GTFormer"].get(k) for k in ("top1_cls", "top5_cls", "PxAP")}
    for key in ("top1_loc", "top5_loc", "gt_known_loc", "mIoU"):
        if f"GTFormer_{key}" in curves:
            out[key] = curves[f"GTFormer_{key}"][i]
    return {k: v for k, v in out.items() if v is not None}


def evaluate_with_heldout(
    heldout: WSOLDataset,
    heldout_rows: pa.Table | Iterable[Mapping],
    test: WSOLDataset,
    test_rows: pa.Table | Iterable[Mapping],
    *,
    cam_curve_interval: float = DEFAULT_CAM_CURVE_INTERVAL,
    test_classes: Mapping[str, Sequence[int]] | None = None,
    classes_from: str | None = None,
) -> EvaluationReport:
    """The report: thresholds chosen on ``heldout``, applied to ``test``; test-tuned numbers beside.

    Args:
        test_classes: uri -> top-k classes of a separate classifier on the test images (see
            :func:`evaluate_predictions`); held-out choices never depend on classes.
        classes_from: what gave ``test_classes``, for the report (None: GTFormer).

    The rows' confidence (:mod:`pro2sam.confidence`) is calibrated on ``heldout`` too, where both
    splits have boxes, and scored on ``test``.

    Returns:
        An :class:`EvaluationReport`; its ``to_json()``: ``thresholds`` (:meth:`Thresholds.to_dict`, with ``chosen_on``),
        ``results`` (test at the held-out thresholds: ``GTFormer``, ``Pro2SAM``; GTFormer's
        ``MaxBoxAccV2`` is the max over tau on test itself, as wsolevaluation defines it),
        ``results_with_gtformer_classes`` (with ``test_classes``, else None), ``classes_from``,
        ``test_tuned`` (GTFormer with thresholds chosen on test itself, for comparison only),
        ``heldout`` and ``test`` (split counts and curves), ``settings``, ``confidence`` (None
        without boxes: ``calibration``, the :class:`~pro2sam.confidence.ConfidenceModel` fitted on
        held-out; ``heldout`` its in-sample AUROC and risk-coverage; ``test`` the same on test,
        with the whole ``curve``), and ``images`` (test per-image records, with ``confidence``).
    """
    if not isinstance(heldout_rows, pa.Table):
        heldout_rows = list(heldout_rows)
    if not isinstance(test_rows, pa.Table):
        test_rows = list(test_rows)
    held = evaluate_predictions(heldout, heldout_rows, cam_curve_interval=cam_curve_interval)
    thresholds = choose_thresholds(held)
    test_result = evaluate_predictions(
        test, test_rows, cam_threshold=thresholds.cam_threshold, boxacc_taus=thresholds.boxacc_taus or None,
        cam_curve_interval=cam_curve_interval, classes=test_classes,
    )  # fmt: skip
    tuned = None
    if test_result.num_with_boxes or test_result.num_with_masks:
        tuned_thresholds = choose_thresholds(test_result)
        tuned = TestTuned(tuned_thresholds, _at_tau(test_result, tuned_thresholds.cam_threshold))
    if test_classes is not None:
        classes_from = classes_from or "a separate classifier"
    confidence = None
    if held.num_with_boxes and test_result.num_with_boxes:
        model = calibrate(held.images, index_rows(heldout_rows), fitted_on=f"{heldout.name}:{heldout.split}")
        in_sample = score_confidence(model, held.images, index_rows(heldout_rows))
        confidence = {
            "calibration": model.to_dict(),
            "heldout": {k: v for k, v in in_sample.items() if k != "curve"},
            "test": score_confidence(model, test_result.images, index_rows(test_rows)),
        }
    return EvaluationReport(
        dataset=test.name,
        test_split=test.split,
        heldout_split=heldout.split,
        thresholds=thresholds,
        heldout=held,
        test=test_result,
        classes_from=classes_from or GTFORMER_CLASSES,
        test_tuned=tuned,
        settings={
            "frame": list(EVAL_FRAME),
            "cam_curve_interval": cam_curve_interval,
            "loc_iou_threshold": LOC_IOU_THRESHOLD,
            "boxacc_iou_thresholds": list(IOU_THRESHOLDS),
            "box_convention": "x0, y0, x1, y1 with x1, y1 one past the last pixel (wsolevaluation's, the GT's); "
            "labels' inclusive box_xyxy converted before IoU",
            "gtformer_box": "largest contour of the upsampled coarse map cut at cam_threshold",
            "gtformer_MaxBoxAccV2": "wsolevaluation's: per IoU 30/50/70 the best box accuracy over tau on the test "
            "split itself (one tau for the split), mean over IoU",
            "gtformer_BoxAccV2@heldout_tau": "mean over IoU 30/50/70 of box accuracy at the taus chosen on the held-out split",
            "pro2sam_BoxAccV2_single_box": "mean over IoU 30/50/70 of the accuracy of its one box (box_xyxy)",
            "pro2sam_pxap": "the binary mask as score map (one operating point)",
            "classes": "Top-1/Top-5 Cls and Loc use the class scores of classes_from; the box is the method's own",
            "errors": "error rows and images without a row count as wrong",
            "confidence": "P(box IoU >= 0.5) from match score, predicted IoU, stability, class score, fallback and "
            "mask area, logistic regression fitted on the held-out split; images without one rank last",
        },
        confidence=confidence,
    )
