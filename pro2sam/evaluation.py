"""Evaluation of GTFormer-only and Pro2SAM on a WSOL split (METHOD.md §4); no Ray here.

Inputs are a :class:`~pro2sam.datasets.WSOLDataset` (the ground truth) and the rows of the labels
table (:data:`pro2sam.labels.LABEL_SCHEMA`), joined on the image ``uri``.

Frame: everything is scored in the 224x224 evaluation frame, the image plain-resized (no crop).
GT boxes (original pixels of the annotation) and Pro2SAM's ``box_xyxy`` (original pixels of the
decoded image) are scaled there with :func:`~pro2sam.metrics.scale_boxes_to_frame` (truncated to
int); masks are resized with nearest neighbour; GT masks are ``> 0.5`` of the PNG's grey level and
the ignore region excludes GT foreground, as in ``clovaai/wsolevaluation``.

The two methods:

- **GTFormer** (coarse map only): the row's ``coarse_map`` is min-max normalised and upsampled
  bilinearly to 224x224 (:func:`~pro2sam.matching.upsample_coarse_map`). Its one box per image
  (Top-1 / Top-5 / GT-known Loc) is that of the largest contour of the map cut at
  ``cam_threshold`` (wsolevaluation's quantisation and box convention); its mask is the same cut.
  MaxBoxAccV2 and PxAP use the map itself.
- **Pro2SAM**: the row's ``box_xyxy`` and ``mask_rle``; no threshold. Its MaxBoxAccV2 is the mean
  over delta in {30, 50, 70} of the accuracy of its one box (there is no tau to maximise over);
  its PxAP scores the binary mask as the score map, i.e. one operating point.

Thresholds (GTFormer's ``cam_threshold``, the MaxBoxAcc tau of each IoU delta) are chosen on a
held-out split by :func:`choose_thresholds` and applied to the test split
(:func:`evaluate_with_heldout`); numbers with thresholds tuned on test itself are reported only
beside them, under ``test_tuned``. Rows with ``status == 'error'`` and images without a row count
as wrong for every metric. Accuracies, PxAP and mIoU are percentages. :mod:`pro2sam.report` writes
the result as Markdown, JSON and overlay PNGs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import pyarrow as pa

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
    mask_iou,
    quantize_score_map,
    scale_boxes_to_frame,
)
from .rle import decode_mask
from .storage import read_bytes

__all__ = [
    "METHODS",
    "DEFAULT_CAM_CURVE_INTERVAL",
    "Thresholds",
    "index_rows",
    "load_gt_mask",
    "gtformer_score_map",
    "evaluate_predictions",
    "choose_thresholds",
    "evaluate_with_heldout",
]

METHODS = ("GTFormer", "Pro2SAM")
# The tau grid most WSOL papers use (wsolevaluation's training-time default).
DEFAULT_CAM_CURVE_INTERVAL = 0.01
_FRAME_W, _FRAME_H = EVAL_FRAME


@dataclass(frozen=True)
class Thresholds:
    """Thresholds chosen on one split, to be applied to another.

    Attributes:
        cam_threshold: tau of GTFormer's box and mask (fraction of the map's peak).
        maxboxacc_taus: IoU delta (percent) -> tau of GTFormer's MaxBoxAcc at that delta
            (empty when the split has no boxes).
        chosen_on: ``"<dataset>:<split>"`` the thresholds were chosen on.
        selected_by: ``"gt_known_loc"`` (largest-contour box accuracy at IoU 0.5) or ``"mIoU"``
            (splits with masks but no boxes).
    """

    cam_threshold: float
    maxboxacc_taus: dict[int, float]
    chosen_on: str
    selected_by: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["maxboxacc_taus"] = {str(k): v for k, v in self.maxboxacc_taus.items()}
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


# ---------------------------------------------------------------- one split


class _Split:
    """Counts of one split; one pass over the images fills every curve."""

    def __init__(self, taus: np.ndarray, cam_threshold: float | None, interval: float) -> None:
        self.taus = taus
        self.cam_threshold = cam_threshold
        t = len(taus)
        self.num_images = self.num_box = self.num_mask = 0
        self.num_error = self.num_missing = 0
        self.top1_cls = self.top5_cls = 0
        # GTFormer, largest-contour box at every tau: counts of GT-known / Top-1 / Top-5 Loc
        self.v1 = {k: np.zeros(t, dtype=np.int64) for k in ("gt_known_loc", "top1_loc", "top5_loc")}
        self.v1_at = LocalizationAccumulator()
        self.gtf_v2 = MaxBoxAccEvaluator(cam_curve_interval=interval)
        self.gtf_pxap = PxAPEvaluator(cam_curve_interval=interval)
        self.gtf_iou_sum = np.zeros(t)
        self.gtf_iou_n = np.zeros(t, dtype=np.int64)
        self.gtf_iou_at: list[float] = []
        self.p2s_loc = LocalizationAccumulator()
        self.p2s_box_correct = np.zeros(len(IOU_THRESHOLDS), dtype=np.int64)  # its one box, per delta
        self.p2s_pxap = PxAPEvaluator(cam_curve_interval=interval)
        self.p2s_iou: list[float] = []
        self.images: list[dict] = []

    def add(self, sample: Sample, row: Mapping | None) -> None:
        self.num_images += 1
        ok = row is not None and row.get("status") == STATUS_OK
        record: dict = {"image_id": sample.image_id, "uri": sample.uri, "label": sample.label}
        record["status"] = "missing" if row is None else row.get("status")
        self.images.append(record)
        if row is None:
            self.num_missing += 1
        elif not ok:
            self.num_error += 1
            record["error"] = row.get("error")
        has_boxes = sample.boxes is not None and len(sample.boxes) > 0
        size = sample.size or ((row["width"], row["height"]) if ok else None)
        gt_boxes = scale_boxes_to_frame(sample.boxes, size) if has_boxes and size else None
        gt_mask = load_gt_mask(sample)
        self.num_box += has_boxes
        self.num_mask += gt_mask is not None
        if not ok:
            self._add_wrong(has_boxes, gt_mask)
            return

        topk = np.asarray(row["topk_classes"] or [-1]).reshape(-1)[:5]
        top1, top5 = bool(topk[0] == sample.label), bool((topk == sample.label).any())
        self.top1_cls += top1
        self.top5_cls += top5
        record.update(top1=top1, top5=top5, topk_classes=[int(c) for c in topk])
        score = gtformer_score_map(row)
        quantized = quantize_score_map(score)
        peak = float(quantized.max())
        p2s_mask = _pro2sam_mask(row)
        p2s_score = p2s_mask.astype(np.float64)
        p2s_box = scale_boxes_to_frame(np.asarray(row["box_xyxy"], dtype=np.float64), (row["width"], row["height"]))[0]
        record["pro2sam_box_224"] = p2s_box.tolist()
        record["pro2sam_box_xyxy"] = [int(v) for v in row["box_xyxy"]]

        if has_boxes:
            record["gt_boxes_224"] = gt_boxes.tolist()
            extra = [self.cam_threshold] if self.cam_threshold is not None else []
            boxes = boxes_from_score_map(score, list(self.taus) + extra, multi_contour=False)
            iou = box_iou_inclusive(np.concatenate(boxes), gt_boxes).max(axis=1)
            correct = iou[: len(self.taus)] >= LOC_IOU_THRESHOLD
            self.v1["gt_known_loc"] += correct
            self.v1["top1_loc"] += correct & top1
            self.v1["top5_loc"] += correct & top5
            if self.cam_threshold is not None:
                self.v1_at.accumulate(topk, sample.label, boxes[-1][0], gt_boxes)
                record["gtformer_box_224"] = boxes[-1][0].tolist()
                record["gtformer_iou"] = float(iou[-1])
            self.gtf_v2.accumulate(score, gt_boxes)
            record["pro2sam_iou"] = self.p2s_loc.accumulate(topk, sample.label, p2s_box, gt_boxes)
            self.p2s_box_correct += [record["pro2sam_iou"] >= d / 100 for d in IOU_THRESHOLDS]
        if gt_mask is not None:
            mask, ignore = gt_mask
            self.gtf_pxap.accumulate(score, mask, ignore)
            self.p2s_pxap.accumulate(p2s_score, mask, ignore)
            by_cut = _iou_by_cut(quantized, mask, ignore)
            per_tau = by_cut[[_cut(t, peak) for t in self.taus]]
            defined = ~np.isnan(per_tau)
            self.gtf_iou_sum[defined] += per_tau[defined]
            self.gtf_iou_n += defined
            if self.cam_threshold is not None:
                self.gtf_iou_at.append(float(by_cut[_cut(self.cam_threshold, peak)]))
            record["pro2sam_mask_iou"] = mask_iou(p2s_mask, mask, ignore)
            self.p2s_iou.append(record["pro2sam_mask_iou"])

    def _add_wrong(self, has_boxes: bool, gt_mask) -> None:
        """An image without a prediction: in every denominator, in no numerator."""
        if has_boxes:
            for acc in (self.v1_at, self.p2s_loc):
                acc.num_images += 1
            self.gtf_v2.num_images += 1
        if gt_mask is not None:
            mask, ignore = gt_mask
            nothing = np.zeros(mask.shape, dtype=np.float64)
            for evaluator in (self.gtf_pxap, self.p2s_pxap):
                evaluator.accumulate(nothing, mask, ignore)
            iou_nothing = mask_iou(np.zeros_like(mask), mask, ignore)
            if not math.isnan(iou_nothing):
                self.gtf_iou_n += 1
                self.gtf_iou_at.append(iou_nothing)
                self.p2s_iou.append(iou_nothing)

    # ---------------------------------------------------------------- results

    def result(self, dataset: WSOLDataset, maxboxacc_taus: Mapping[int, float] | None) -> dict:
        n = self.num_images
        pct = (lambda c, d: 100.0 * c / d if d else None)
        cls = {"top1_cls": pct(self.top1_cls, n), "top5_cls": pct(self.top5_cls, n)}
        gtf: dict = dict(cls)
        p2s: dict = dict(cls)
        curves: dict = {"taus": [float(t) for t in self.taus]}
        if self.num_box:
            for key in ("top1_loc", "top5_loc", "gt_known_loc"):
                curves[f"GTFormer_{key}"] = (100.0 * self.v1[key] / self.num_box).tolist()
            if self.cam_threshold is not None:
                gtf.update({k: v for k, v in self.v1_at.compute().items() if k.endswith("_loc")})
            gtf.update(_maxboxacc(self.gtf_v2, maxboxacc_taus, self.taus))
            curves["GTFormer_box_acc"] = {
                str(d): row.tolist() for d, row in zip(self.gtf_v2.iou_thresholds, self.gtf_v2.accuracy_per_threshold())
            }
            p2s.update({k: v for k, v in self.p2s_loc.compute().items() if k.endswith("_loc")})
            for d, correct in zip(IOU_THRESHOLDS, self.p2s_box_correct):
                p2s[f"MaxBoxAcc@{d}"] = 100.0 * float(correct) / self.num_box
            p2s["MaxBoxAccV2"] = float(np.mean([p2s[f"MaxBoxAcc@{d}"] for d in IOU_THRESHOLDS]))
        if self.num_mask:
            gtf["PxAP"] = self.gtf_pxap.compute()["PxAP"]
            p2s["PxAP"] = self.p2s_pxap.compute()["PxAP"]
            with np.errstate(invalid="ignore", divide="ignore"):
                curves["GTFormer_mIoU"] = np.where(
                    self.gtf_iou_n > 0, 100.0 * self.gtf_iou_sum / np.maximum(self.gtf_iou_n, 1), np.nan
                ).tolist()
            if self.cam_threshold is not None:
                gtf["mIoU"] = _nanmean_pct(self.gtf_iou_at)
            p2s["mIoU"] = _nanmean_pct(self.p2s_iou)
        return {
            "dataset": dataset.name,
            "split": dataset.split,
            "num_images": n,
            "num_with_boxes": self.num_box,
            "num_with_masks": self.num_mask,
            "num_error_rows": self.num_error,
            "num_missing_rows": self.num_missing,
            "cam_threshold": self.cam_threshold,
            "maxboxacc_taus": {str(k): float(v) for k, v in (maxboxacc_taus or {}).items()} or None,
            "GTFormer": gtf,
            "Pro2SAM": p2s,
            "curves": curves,
            "images": self.images,
        }


def _nanmean_pct(values: Sequence[float]) -> float | None:
    values = [v for v in values if not math.isnan(v)]
    return 100.0 * float(np.mean(values)) if values else None


def _maxboxacc(evaluator: MaxBoxAccEvaluator, taus: Mapping[int, float] | None, grid: np.ndarray) -> dict:
    """MaxBoxAcc at the given taus per delta (None: at the split's own best tau, i.e. tuned)."""
    tuned = evaluator.compute()
    accuracy = evaluator.accuracy_per_threshold()
    out = {}
    for i, delta in enumerate(evaluator.iou_thresholds):
        if taus is None:
            out[f"MaxBoxAcc@{delta}"] = tuned[f"MaxBoxAcc@{delta}"]
        else:
            out[f"MaxBoxAcc@{delta}"] = float(accuracy[i, _tau_index(grid, taus[delta], f"tau@{delta}")])
    out["MaxBoxAccV2"] = float(np.mean([out[f"MaxBoxAcc@{d}"] for d in IOU_THRESHOLDS]))
    out["MaxBoxAccV2_self_tuned"] = tuned["MaxBoxAccV2"]
    out["best_tau"] = {str(d): tuned[f"best_tau@{d}"] for d in evaluator.iou_thresholds}
    return out


def evaluate_predictions(
    dataset: WSOLDataset,
    rows: pa.Table | Iterable[Mapping],
    *,
    cam_threshold: float | None = None,
    maxboxacc_taus: Mapping[int, float] | None = None,
    cam_curve_interval: float = DEFAULT_CAM_CURVE_INTERVAL,
) -> dict:
    """Score the labels-table rows of one split against its ground truth.

    Args:
        dataset: the split's ground truth; every sample is scored (no row: wrong).
        rows: labels-table rows (a table or dicts), joined on ``uri``; rows of other images are
            ignored.
        cam_threshold: GTFormer's box/mask threshold (None: only the per-tau curves, e.g. on the
            held-out split before choosing it).
        maxboxacc_taus: IoU delta -> tau for GTFormer's MaxBoxAcc; taus on the grid of
            ``cam_curve_interval``. None: each delta at this split's own best tau (self-tuned).
        cam_curve_interval: step of the tau grid.

    Returns:
        A JSON-ready dict: counts; ``GTFormer`` and ``Pro2SAM`` metrics (percent): ``top1_cls``,
        ``top5_cls``, ``top1_loc``, ``top5_loc``, ``gt_known_loc``, ``MaxBoxAcc@30/50/70``,
        ``MaxBoxAccV2`` (at ``maxboxacc_taus``), ``MaxBoxAccV2_self_tuned``, ``best_tau``, and
        with GT masks ``PxAP`` and ``mIoU``; box metrics need boxes, Loc metrics of GTFormer a
        ``cam_threshold``. ``curves``: GTFormer's Loc, box accuracy and mIoU at every tau.
        ``images``: one record per sample (status, IoUs, boxes in the 224 frame).
    """
    taus = cam_thresholds(cam_curve_interval)
    by_uri = index_rows(rows)
    split = _Split(taus, cam_threshold, cam_curve_interval)
    for sample in dataset.samples:
        split.add(sample, by_uri.get(sample.uri))
    return split.result(dataset, maxboxacc_taus)


def choose_thresholds(heldout: Mapping) -> Thresholds:
    """GTFormer's thresholds from a held-out result of :func:`evaluate_predictions`.

    ``cam_threshold`` is the first tau of best GT-known Loc (largest-contour box, IoU 0.5); the
    MaxBoxAcc tau of each delta is the first tau of best box accuracy there. A split with masks and
    no boxes picks ``cam_threshold`` by mIoU.

    Raises:
        ValueError: the held-out split has neither boxes nor masks.
    """
    curves = heldout["curves"]
    taus = np.asarray(curves["taus"])
    where = f"{heldout['dataset']}:{heldout['split']}"
    if "GTFormer_gt_known_loc" in curves:
        cam = float(taus[int(np.argmax(curves["GTFormer_gt_known_loc"]))])
        per_delta = {int(d): float(taus[int(np.argmax(acc))]) for d, acc in curves["GTFormer_box_acc"].items()}
        return Thresholds(cam, per_delta, where, "gt_known_loc")
    if "GTFormer_mIoU" in curves:
        miou = np.nan_to_num(np.asarray(curves["GTFormer_mIoU"], dtype=np.float64), nan=-1.0)
        return Thresholds(float(taus[int(np.argmax(miou))]), {}, where, "mIoU")
    raise ValueError(f"held-out split {where} has neither boxes nor masks to choose thresholds on")


def _strip(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("images",)}


def _at_tau(result: Mapping, tau: float) -> dict:
    """GTFormer's numbers at grid threshold ``tau``, read off the curves (no second pass)."""
    curves = result["curves"]
    i = _tau_index(np.asarray(curves["taus"]), tau, "cam_threshold")
    out = {k: result["GTFormer"].get(k) for k in ("top1_cls", "top5_cls", "PxAP")}
    for key in ("top1_loc", "top5_loc", "gt_known_loc", "mIoU"):
        if f"GTFormer_{key}" in curves:
            out[key] = curves[f"GTFormer_{key}"][i]
    if "MaxBoxAccV2_self_tuned" in result["GTFormer"]:
        out["MaxBoxAccV2"] = result["GTFormer"]["MaxBoxAccV2_self_tuned"]
    return {k: v for k, v in out.items() if v is not None}


def evaluate_with_heldout(
    heldout: WSOLDataset,
    heldout_rows: pa.Table | Iterable[Mapping],
    test: WSOLDataset,
    test_rows: pa.Table | Iterable[Mapping],
    *,
    cam_curve_interval: float = DEFAULT_CAM_CURVE_INTERVAL,
) -> dict:
    """The report: thresholds chosen on ``heldout``, applied to ``test``; test-tuned numbers beside.

    Returns:
        A JSON-ready dict: ``thresholds`` (:meth:`Thresholds.to_dict`, with ``chosen_on``),
        ``results`` (test at the held-out thresholds: ``GTFormer``, ``Pro2SAM``), ``test_tuned``
        (GTFormer with thresholds chosen on test itself, for comparison only), ``heldout`` and
        ``test`` (split counts and curves), ``settings``, and ``images`` (test per-image records).
    """
    held = evaluate_predictions(heldout, heldout_rows, cam_curve_interval=cam_curve_interval)
    thresholds = choose_thresholds(held)
    taus = thresholds.maxboxacc_taus or None
    test_result = evaluate_predictions(
        test, test_rows, cam_threshold=thresholds.cam_threshold, maxboxacc_taus=taus, cam_curve_interval=cam_curve_interval
    )
    if taus is None and "MaxBoxAccV2" in test_result["GTFormer"]:
        # held-out had no boxes to choose taus on: a MaxBoxAcc here would be tuned on test
        for key in ["MaxBoxAccV2"] + [f"MaxBoxAcc@{d}" for d in IOU_THRESHOLDS]:
            test_result["GTFormer"][key] = None
    tuned = None
    if test_result["num_with_boxes"] or test_result["num_with_masks"]:
        tuned_thresholds = choose_thresholds(test_result)
        tuned = {"thresholds": tuned_thresholds.to_dict(), "GTFormer": _at_tau(test_result, tuned_thresholds.cam_threshold)}
    return {
        "dataset": test.name,
        "test_split": test.split,
        "heldout_split": heldout.split,
        "thresholds": thresholds.to_dict(),
        "results": {m: test_result[m] for m in METHODS},
        "test_tuned": tuned,
        "heldout": _strip(held),
        "test": {k: v for k, v in _strip(test_result).items() if k not in METHODS},
        "settings": {
            "frame": list(EVAL_FRAME),
            "cam_curve_interval": cam_curve_interval,
            "loc_iou_threshold": LOC_IOU_THRESHOLD,
            "maxboxacc_iou_thresholds": list(IOU_THRESHOLDS),
            "gtformer_box": "largest contour of the upsampled coarse map cut at cam_threshold",
            "pro2sam_maxboxacc": "mean over IoU 30/50/70 of the accuracy of its one box (box_xyxy)",
            "pro2sam_pxap": "the binary mask as score map (one operating point)",
            "errors": "error rows and images without a row count as wrong",
        },
        "images": test_result["images"],
    }
