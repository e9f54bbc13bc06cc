"""Evaluation metrics of weakly supervised object localization (METHOD.md §4).

Box metrics follow ``clovaai/wsolevaluation`` (Choe et al., CVPR 2020) exactly, so numbers compare
with the literature:

- One box convention for GT and predicted boxes alike, wsolevaluation's: ``(x0, y0, x1, y1)``
  integer pixel coordinates with ``x1``, ``y1`` **one past** the last pixel (CUB's ``x + w``,
  ILSVRC's ``xmax``, OpenCV's ``x + w``). A box of inclusive pixel indices (the labels table's
  ``box_xyxy``, a mask's tight box) is converted first (:func:`inclusive_to_eval_boxes`).
- IoU is nevertheless wsolevaluation's *inclusive* one (+1 on widths and heights: a box is
  scored as covering ``x1 - x0 + 1`` columns); it is applied to both boxes alike.
- Boxes drawn from a score map use wsolevaluation's convention ``(x, y, x + w, y + h)`` of the
  OpenCV bounding rectangle, with ``x1``/``y1`` clipped to ``W - 1``/``H - 1``: one pixel wider and
  taller than the thresholded blob unless the blob touches the right/bottom border. A map with no
  foreground gives the box ``[0, 0, 0, 0]``.
- Frame: score maps, masks and GT boxes are in the evaluation frame, the image plain-resized to
  224x224 (:func:`scale_boxes_to_frame` brings GT boxes there).

All accuracies and PxAP are reported in percent (0-100), as wsolevaluation prints them.
Accumulators keep counts or histograms, never maps, and can be merged across workers.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

__all__ = [
    "EVAL_FRAME",
    "IOU_THRESHOLDS",
    "LOC_IOU_THRESHOLD",
    "LocalizationAccumulator",
    "MaxBoxAccEvaluator",
    "PxAPEvaluator",
    "box_iou_inclusive",
    "boxes_from_score_map",
    "cam_thresholds",
    "inclusive_to_eval_boxes",
    "localization_accuracy",
    "mask_iou",
    "quantize_score_map",
    "scale_boxes_to_frame",
]

# (width, height) of the evaluation frame: images plain-resized, no crop.
EVAL_FRAME = (224, 224)
# IoU thresholds of MaxBoxAccV2, in percent (wsolevaluation's `iou_threshold_list`).
IOU_THRESHOLDS = (30, 50, 70)
# IoU a box needs for Top-1 / Top-5 / GT-known Loc.
LOC_IOU_THRESHOLD = 0.5


def cam_thresholds(cam_curve_interval: float = 0.01) -> np.ndarray:
    """Score-map thresholds tau, ``np.arange(0, 1, cam_curve_interval)`` as wsolevaluation builds them.

    The float rounding of ``arange`` (e.g. 0.5700000000000001) is kept on purpose: it decides the
    integer cut ``int(tau * max)`` and the PxAP histogram edges.

    Returns:
        float64 array (T,), ascending, starting at 0.
    """
    if not 0 < cam_curve_interval < 1:
        raise ValueError(f"cam_curve_interval must be in (0, 1), got {cam_curve_interval}")
    return np.arange(0, 1, cam_curve_interval)


def _check_score_map(score_map: np.ndarray) -> np.ndarray:
    """A (H, W) score map in [0, 1] as float64 (wsolevaluation evaluates float64 maps)."""
    score_map = np.asarray(score_map)
    if score_map.ndim != 2:
        raise ValueError(f"score map must be 2-D (H, W), got shape {score_map.shape}")
    if not np.issubdtype(score_map.dtype, np.floating):
        raise TypeError(f"score map must be a float array, got {score_map.dtype}")
    score_map = score_map.astype(np.float64, copy=False)
    if np.isnan(score_map).any():
        raise ValueError("score map contains NaN")
    if score_map.min(initial=0.0) < 0 or score_map.max(initial=0.0) > 1:
        raise ValueError(
            f"score map must lie in [0, 1] (min-max normalise it first); got [{score_map.min()}, {score_map.max()}]"
        )
    return score_map


def _as_boxes(boxes: np.ndarray, name: str) -> np.ndarray:
    boxes = np.asarray(boxes)
    if boxes.ndim == 1 and boxes.shape[0] == 4:
        boxes = boxes[None]
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must have shape (N, 4), got {boxes.shape}")
    if np.issubdtype(boxes.dtype, np.integer):
        boxes = boxes.astype(np.int64)
    if (boxes < 0).any():
        raise ValueError(f"{name} has negative coordinates")
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        raise ValueError(f"{name} must be (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0")
    return boxes


def inclusive_to_eval_boxes(boxes: np.ndarray) -> np.ndarray:
    """Boxes of inclusive pixel indices in the evaluation's convention: ``x1``, ``y1`` one past the
    last pixel, i.e. ``(x0, y0, x1 + 1, y1 + 1)``, as GT boxes are (CUB ``x + w``, ILSVRC ``xmax``).

    Args:
        boxes: (N, 4) ``(x0, y0, x1, y1)``, ``x1``/``y1`` the last covered column/row (a single
            box of shape (4,) is accepted), e.g. the labels table's ``box_xyxy``.

    Returns:
        (N, 4), same dtype and frame.
    """
    boxes = _as_boxes(boxes, "boxes").copy()
    boxes[:, 2:] += 1
    return boxes


def box_iou_inclusive(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Pairwise IoU with the inclusive-pixel convention (+1 on widths and heights), as
    wsolevaluation computes it on boxes of its one-past-the-end convention.

    Args:
        boxes_a: (N, 4) ``(x0, y0, x1, y1)``, non-negative, integer pixel coordinates (a single
            box of shape (4,) is accepted).
        boxes_b: (M, 4), same convention and frame.

    Returns:
        float64 (N, M). Pairs whose union is not positive get 0, as in wsolevaluation.
    """
    a = _as_boxes(boxes_a, "boxes_a")[:, None, :]
    b = _as_boxes(boxes_b, "boxes_b")[None, :, :]
    inter_w = np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
    inter_h = np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1)
    intersection = inter_w * inter_h
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    union = area_a + area_b - intersection
    return np.where(union > 0, intersection / np.where(union > 0, union, 1), 0.0).astype(np.float64)


def quantize_score_map(score_map: np.ndarray) -> np.ndarray:
    """wsolevaluation's uint8 image of a score map: ``(score_map * 255)`` truncated, not rounded.

    Args:
        score_map: (H, W) float in [0, 1]; computed in float64 whatever the input dtype.

    Returns:
        uint8 (H, W).
    """
    return (_check_score_map(score_map) * 255).astype(np.uint8)


def _contour_boxes(binary: np.ndarray, multi_contour: bool) -> np.ndarray:
    height, width = binary.shape
    contours, _ = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    if len(contours) == 0:
        return np.zeros((1, 4), dtype=np.int64)
    if not multi_contour:
        # wsolevaluation's MaxBoxAcc (v1): the largest contour only, the first one on ties.
        contours = [contours[int(np.argmax([cv2.contourArea(c) for c in contours]))]]
    rects = np.array([cv2.boundingRect(c) for c in contours], dtype=np.int64)  # x, y, w, h
    x0, y0 = rects[:, 0], rects[:, 1]
    x1 = np.minimum(x0 + rects[:, 2], width - 1)
    y1 = np.minimum(y0 + rects[:, 3], height - 1)
    return np.stack([x0, y0, x1, y1], axis=1)


def boxes_from_score_map(
    score_map: np.ndarray, thresholds: Sequence[float] | np.ndarray, *, multi_contour: bool = True
) -> list[np.ndarray]:
    """Boxes of a score map at each threshold, as wsolevaluation's ``compute_bboxes_from_scoremaps``.

    The map is quantised to uint8 (:func:`quantize_score_map`); at threshold tau a pixel is
    foreground when its uint8 value is *strictly above* ``int(tau * max)`` (OpenCV's
    THRESH_BINARY), so pixels equal to the cut are background and an all-zero map is empty at
    every tau. Each contour OpenCV finds (RETR_TREE, so holes count too) gives one box
    ``(x, y, x + w, y + h)`` with ``x1 <= W - 1`` and ``y1 <= H - 1``.

    Args:
        score_map: (H, W) float in [0, 1], in the evaluation frame.
        thresholds: T values of tau in [0, 1), usually :func:`cam_thresholds`.
        multi_contour: keep every contour (MaxBoxAccV2, default) or only the largest by contour
            area (the original MaxBoxAcc).

    Returns:
        T int64 arrays of shape (n_t, 4), ``(x0, y0, x1, y1)``; ``[[0, 0, 0, 0]]`` where the
        thresholded map is empty.
    """
    image = quantize_score_map(score_map)
    peak = float(image.max())
    boxes_by_cut: dict[int, np.ndarray] = {}  # taus often share a cut: int(tau*max) has <= 256 values
    out = []
    for tau in thresholds:
        cut = int(float(tau) * peak)
        if cut not in boxes_by_cut:
            binary = np.where(image > cut, np.uint8(255), np.uint8(0))
            boxes_by_cut[cut] = _contour_boxes(binary, multi_contour)
        out.append(boxes_by_cut[cut])
    return out


class MaxBoxAccEvaluator:
    """MaxBoxAcc / MaxBoxAccV2 over a data set (wsolevaluation's ``BoxEvaluator``).

    An image is correct at threshold tau and IoU delta when its best box at tau reaches IoU delta
    against *any* of its GT boxes. MaxBoxAcc(delta) is the best accuracy over tau, with one tau
    for the whole data set (not per image). MaxBoxAccV2 is the mean of MaxBoxAcc at 30, 50 and 70.

    Keyword args:
        cam_curve_interval: step of the tau grid ``arange(0, 1, step)``. wsolevaluation's
            ``evaluate_wsol`` defaults to 0.001, its training code and most papers use 0.01.
        iou_thresholds: deltas in percent.
        multi_contour_eval: every contour's box is a candidate (V2) or only the largest (V1).
    """

    def __init__(
        self,
        *,
        cam_curve_interval: float = 0.01,
        iou_thresholds: Sequence[int] = IOU_THRESHOLDS,
        multi_contour_eval: bool = True,
    ) -> None:
        self.cam_curve_interval = cam_curve_interval
        self.thresholds = cam_thresholds(cam_curve_interval)
        self.iou_thresholds = tuple(int(d) for d in iou_thresholds)
        if not self.iou_thresholds or any(not 0 < d <= 100 for d in self.iou_thresholds):
            raise ValueError(f"iou_thresholds must be percentages in (0, 100], got {iou_thresholds}")
        self.multi_contour_eval = multi_contour_eval
        # num_correct[i, t]: images correct at iou_thresholds[i] and thresholds[t]
        self.num_correct = np.zeros((len(self.iou_thresholds), len(self.thresholds)), dtype=np.int64)
        self.num_images = 0

    def accumulate(self, score_map: np.ndarray, gt_boxes: np.ndarray) -> None:
        """Add one image.

        Args:
            score_map: (H, W) float in [0, 1], evaluation frame.
            gt_boxes: (K, 4) int ``(x0, y0, x1, y1)``, same frame and convention, K >= 1.
        """
        gt_boxes = _as_boxes(gt_boxes, "gt_boxes")
        if len(gt_boxes) == 0:
            raise ValueError("an image needs at least one GT box")
        boxes_per_tau = boxes_from_score_map(score_map, self.thresholds, multi_contour=self.multi_contour_eval)
        best_iou_per_box = box_iou_inclusive(np.concatenate(boxes_per_tau), gt_boxes).max(axis=1)
        starts = np.cumsum([0] + [len(b) for b in boxes_per_tau[:-1]])
        best_iou = np.maximum.reduceat(best_iou_per_box, starts)  # (T,); every tau has >= 1 box
        for i, delta in enumerate(self.iou_thresholds):
            self.num_correct[i] += best_iou >= delta / 100
        self.num_images += 1

    def merge(self, other: MaxBoxAccEvaluator) -> None:
        """Add the counts of an evaluator with the same settings (e.g. another worker's shard)."""
        if (other.iou_thresholds, other.multi_contour_eval) != (self.iou_thresholds, self.multi_contour_eval) or (
            not np.array_equal(other.thresholds, self.thresholds)
        ):
            raise ValueError("cannot merge evaluators with different settings")
        self.num_correct += other.num_correct
        self.num_images += other.num_images

    def accuracy_per_threshold(self) -> np.ndarray:
        """float64 (len(iou_thresholds), T): box accuracy in percent at each delta and tau."""
        if self.num_images == 0:
            raise RuntimeError("no image accumulated")
        return self.num_correct * 100.0 / self.num_images

    def compute(self) -> dict[str, float]:
        """Returns:
        ``MaxBoxAcc@{delta}`` (percent) and ``best_tau@{delta}`` (the first tau reaching it) for
        each delta; ``MaxBoxAccV2`` (mean of MaxBoxAcc@30/50/70) when all three are evaluated;
        ``num_images``.
        """
        accuracy = self.accuracy_per_threshold()
        result: dict[str, float] = {}
        for i, delta in enumerate(self.iou_thresholds):
            best = int(np.argmax(accuracy[i]))
            result[f"MaxBoxAcc@{delta}"] = float(accuracy[i, best])
            result[f"best_tau@{delta}"] = float(self.thresholds[best])
        if set(IOU_THRESHOLDS) <= set(self.iou_thresholds):
            result["MaxBoxAccV2"] = float(np.mean([result[f"MaxBoxAcc@{d}"] for d in IOU_THRESHOLDS]))
        result["num_images"] = self.num_images
        return result


class PxAPEvaluator:
    """PxAP: area under the pixel precision-recall curve (wsolevaluation's ``MaskEvaluator``).

    Scores of GT-foreground and GT-background pixels are histogrammed on the tau grid with right
    edges ``[t_1, ..., 1 - step, 1, 2, 3]`` (a score of exactly 1.0 falls in ``[1, 2)``). Sweeping
    the cut from high to low gives TP and FP counts; PxAP = sum over cuts of
    precision x (increase of recall), skipping cuts with no positive prediction. Raw float scores
    are used (no uint8 quantisation).

    Keyword args:
        cam_curve_interval: step of the tau grid, as in :class:`MaxBoxAccEvaluator`.
    """

    def __init__(self, *, cam_curve_interval: float = 0.01) -> None:
        self.cam_curve_interval = cam_curve_interval
        self.thresholds = cam_thresholds(cam_curve_interval)
        self.bin_edges = np.append(self.thresholds, [1.0, 2.0, 3.0])
        self.foreground_hist = np.zeros(len(self.bin_edges) - 1, dtype=np.int64)
        self.background_hist = np.zeros(len(self.bin_edges) - 1, dtype=np.int64)

    def accumulate(self, score_map: np.ndarray, gt_mask: np.ndarray, ignore_mask: np.ndarray | None = None) -> None:
        """Add one image.

        Args:
            score_map: (H, W) float in [0, 1], evaluation frame.
            gt_mask: (H, W) bool, GT foreground (union of instances).
            ignore_mask: (H, W) bool or None. Background pixels inside it are left out; as in
                wsolevaluation (ignore = ignore region minus foreground), GT-foreground pixels are
                always scored.
        """
        score_map = _check_score_map(score_map)
        gt_mask = np.asarray(gt_mask, dtype=bool)
        if gt_mask.shape != score_map.shape:
            raise ValueError(f"gt_mask shape {gt_mask.shape} differs from score map shape {score_map.shape}")
        background = ~gt_mask
        if ignore_mask is not None:
            ignore_mask = np.asarray(ignore_mask, dtype=bool)
            if ignore_mask.shape != score_map.shape:
                raise ValueError(f"ignore_mask shape {ignore_mask.shape} differs from score map {score_map.shape}")
            background &= ~ignore_mask
        self.foreground_hist += np.histogram(score_map[gt_mask], bins=self.bin_edges)[0]
        self.background_hist += np.histogram(score_map[background], bins=self.bin_edges)[0]

    def merge(self, other: PxAPEvaluator) -> None:
        """Add the histograms of an evaluator with the same tau grid."""
        if not np.array_equal(other.bin_edges, self.bin_edges):
            raise ValueError("cannot merge evaluators with different tau grids")
        self.foreground_hist += other.foreground_hist
        self.background_hist += other.background_hist

    def precision_recall(self) -> tuple[np.ndarray, np.ndarray]:
        """Precision and recall, float64 (T + 2,), cuts from highest (>= 2, empty) to lowest (>= 0).

        Precision is set to 0 where no pixel is predicted positive; recall cannot rise there, so
        those cuts add nothing to PxAP (wsolevaluation masks them out).
        """
        tp = self.foreground_hist[::-1].cumsum()
        fp = self.background_hist[::-1].cumsum()
        num_foreground = self.foreground_hist.sum()
        if num_foreground == 0:
            raise RuntimeError("no GT-foreground pixel accumulated")
        predicted = tp + fp
        precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
        recall = tp / num_foreground
        return precision, recall

    def compute(self) -> dict[str, float]:
        """Returns: ``PxAP`` in percent."""
        precision, recall = self.precision_recall()
        return {"PxAP": float((precision[1:] * np.diff(recall)).sum() * 100)}


def scale_boxes_to_frame(
    boxes: np.ndarray, from_size: tuple[int, int], to_size: tuple[int, int] = EVAL_FRAME
) -> np.ndarray:
    """Map boxes to a plain-resized frame and truncate to int, as wsolevaluation's ``resize_bbox``.

    Each coordinate becomes ``int(x * new_w / w)`` (``y * new_h / h``), computed in float64 in that
    order; both corners are scaled alike (no +1 adjustment).

    Args:
        boxes: (N, 4) ``(x0, y0, x1, y1)`` in pixels of the original image (a (4,) box is accepted).
        from_size: (W, H) of the original image.
        to_size: (W, H) of the target frame, 224x224 by default.

    Returns:
        int64 (N, 4) in the target frame.
    """
    boxes = _as_boxes(boxes, "boxes").astype(np.float64)
    width, height = map(float, from_size)
    new_width, new_height = map(float, to_size)
    new_sizes = np.array([new_width, new_height, new_width, new_height])
    sizes = np.array([width, height, width, height])
    return np.trunc(boxes * new_sizes / sizes).astype(np.int64)


def mask_iou(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """IoU of two binary masks, pixels under ``ignore`` left out of both.

    Args:
        pred: (H, W) bool, predicted mask.
        gt: (H, W) bool, GT mask, same frame.
        ignore: (H, W) bool or None.

    Returns:
        |pred & gt| / |pred | gt| over the scored pixels; NaN when that union is empty (average
        per-image values with ``np.nanmean``).
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {pred.shape} differs from gt shape {gt.shape}")
    scored = np.ones_like(pred) if ignore is None else ~np.asarray(ignore, dtype=bool)
    if scored.shape != pred.shape:
        raise ValueError(f"ignore shape {scored.shape} differs from mask shape {pred.shape}")
    union = np.count_nonzero((pred | gt) & scored)
    if union == 0:
        return float("nan")
    return np.count_nonzero(pred & gt & scored) / union


class LocalizationAccumulator:
    """Top-1 / Top-5 / GT-known Loc and Top-1 / Top-5 classification accuracy, in percent.

    Per image: one predicted box, the predicted classes in order of score, the GT class and the
    GT boxes, both in the evaluation's convention. The box is correct when its (inclusive) IoU
    reaches 0.5 against any GT box.
    Top-1 Loc needs the top-1 class right too, Top-5 Loc the GT class among the first five,
    GT-known Loc ignores the class.

    Keyword args:
        iou_threshold: IoU a box needs (0.5).
    """

    def __init__(self, *, iou_threshold: float = LOC_IOU_THRESHOLD) -> None:
        self.iou_threshold = iou_threshold
        self.counts = {"top1_cls": 0, "top5_cls": 0, "top1_loc": 0, "top5_loc": 0, "gt_known_loc": 0}
        self.num_images = 0

    def accumulate(
        self, topk_classes: Sequence[int] | np.ndarray, gt_class: int, pred_box: np.ndarray, gt_boxes: np.ndarray
    ) -> float:
        """Add one image and return the best IoU of its box.

        Args:
            topk_classes: (k,) int class indices, best first (k >= 1; only the first 5 are used).
            gt_class: int.
            pred_box: (4,) int ``(x0, y0, x1, y1)``, evaluation frame and convention.
            gt_boxes: (K, 4) int, same convention and frame, K >= 1.
        """
        topk = np.asarray(topk_classes).reshape(-1)[:5]
        if topk.size == 0:
            raise ValueError("topk_classes is empty")
        iou = float(box_iou_inclusive(pred_box, gt_boxes).max(initial=0.0))
        box_correct = iou >= self.iou_threshold
        top1 = bool(topk[0] == gt_class)
        top5 = bool((topk == gt_class).any())
        self.counts["top1_cls"] += top1
        self.counts["top5_cls"] += top5
        self.counts["top1_loc"] += top1 and box_correct
        self.counts["top5_loc"] += top5 and box_correct
        self.counts["gt_known_loc"] += box_correct
        self.num_images += 1
        return iou

    def merge(self, other: LocalizationAccumulator) -> None:
        """Add the counts of another accumulator with the same IoU threshold."""
        if other.iou_threshold != self.iou_threshold:
            raise ValueError("cannot merge accumulators with different IoU thresholds")
        for key in self.counts:
            self.counts[key] += other.counts[key]
        self.num_images += other.num_images

    def compute(self) -> dict[str, float]:
        """Returns: ``top1_cls``, ``top5_cls``, ``top1_loc``, ``top5_loc``, ``gt_known_loc`` in percent,
        and ``num_images``."""
        if self.num_images == 0:
            raise RuntimeError("no image accumulated")
        result: dict[str, float] = {k: v * 100.0 / self.num_images for k, v in self.counts.items()}
        result["num_images"] = self.num_images
        return result


def localization_accuracy(
    topk_classes: np.ndarray,
    gt_classes: np.ndarray,
    pred_boxes: np.ndarray,
    gt_boxes: Sequence[np.ndarray],
    *,
    iou_threshold: float = LOC_IOU_THRESHOLD,
) -> dict[str, float]:
    """:class:`LocalizationAccumulator` over a whole data set at once.

    Args:
        topk_classes: (N, k) int, best first.
        gt_classes: (N,) int.
        pred_boxes: (N, 4) int ``(x0, y0, x1, y1)``, evaluation frame and convention.
        gt_boxes: N arrays of shape (K_i, 4), same frame.
        iou_threshold: IoU a box needs (0.5).

    Returns:
        as :meth:`LocalizationAccumulator.compute`.
    """
    if not len(topk_classes) == len(gt_classes) == len(pred_boxes) == len(gt_boxes):
        raise ValueError("topk_classes, gt_classes, pred_boxes and gt_boxes must have one entry per image")
    accumulator = LocalizationAccumulator(iou_threshold=iou_threshold)
    for topk, gt_class, pred_box, boxes in zip(topk_classes, gt_classes, pred_boxes, gt_boxes):
        accumulator.accumulate(topk, int(gt_class), pred_box, boxes)
    return accumulator.compute()
