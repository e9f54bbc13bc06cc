"""WSOL metrics on inputs small enough to check by hand (wsolevaluation conventions)."""

import numpy as np
import pytest

from pro2sam.metrics import (
    LocalizationAccumulator,
    MaxBoxAccEvaluator,
    PxAPEvaluator,
    box_iou_inclusive,
    boxes_from_score_map,
    cam_thresholds,
    inclusive_to_eval_boxes,
    localization_accuracy,
    mask_iou,
    quantize_score_map,
    scale_boxes_to_frame,
)


def paint(shape, *regions):
    """Float map of zeros with inclusive rectangles (x0, y0, x1, y1, value) painted in order."""
    m = np.zeros(shape, dtype=np.float64)
    for x0, y0, x1, y1, value in regions:
        m[y0 : y1 + 1, x0 : x1 + 1] = value
    return m


def box_set(boxes):
    return sorted(map(tuple, np.asarray(boxes).tolist()))


# --- inclusive IoU -----------------------------------------------------------------------------


def test_iou_of_identical_boxes_is_one():
    assert box_iou_inclusive([[2, 3, 5, 7]], [[2, 3, 5, 7]])[0, 0] == 1.0


def test_iou_of_disjoint_boxes_is_zero():
    assert box_iou_inclusive([[0, 0, 2, 2]], [[3, 0, 5, 2]])[0, 0] == 0.0


def test_iou_counts_pixels_inclusively():
    # [0,0,1,1] is 2x2 = 4 px, [1,1,2,2] is 4 px, they share pixel (1,1): 1 / (4 + 4 - 1)
    assert box_iou_inclusive([[0, 0, 1, 1]], [[1, 1, 2, 2]])[0, 0] == pytest.approx(1 / 7)
    # a one-pixel box has area 1, not 0
    assert box_iou_inclusive([[4, 4, 4, 4]], [[4, 4, 4, 4]])[0, 0] == 1.0


def test_iou_is_pairwise_n_by_m():
    iou = box_iou_inclusive([[0, 0, 3, 3], [0, 0, 1, 3]], [[0, 0, 3, 3], [10, 10, 11, 11], [0, 0, 0, 0]])
    # second row: [0,0,1,3] is 8 px inside the 16 px box -> 0.5; [0,0,0,0] is 1 px inside it -> 1/8
    np.testing.assert_allclose(iou, [[1, 0, 1 / 16], [0.5, 0, 1 / 8]])


# --- boxes from score maps ---------------------------------------------------------------------


def test_quantisation_truncates_instead_of_rounding():
    assert quantize_score_map(np.array([[0.5, 0.999, 1.0, 0.0039]])).tolist() == [[127, 254, 255, 0]]


def test_pixels_equal_to_the_cut_are_background():
    # blob A = 1.0 (uint8 255), blob B = 0.5 (uint8 127). At tau 0.5 the cut is int(0.5*255) = 127:
    # B's pixels equal the cut and are dropped. At tau 0.49 the cut is int(124.95) = 124: B is kept.
    m = paint((6, 8), (1, 1, 3, 2, 1.0), (5, 4, 6, 4, 0.5))
    at_half, at_049 = boxes_from_score_map(m, [0.5, 0.49])
    # boxes are (x, y, x + w, y + h): A covers columns 1..3 and rows 1..2 -> [1, 1, 4, 3]
    assert box_set(at_half) == [(1, 1, 4, 3)]
    assert box_set(at_049) == [(1, 1, 4, 3), (5, 4, 7, 5)]


def test_box_is_clipped_at_the_right_and_bottom_border():
    # blob on columns 6..7, row 5 of an 8x6 map: (x + w, y + h) = (8, 6) -> clipped to (7, 5)
    m = paint((6, 8), (6, 5, 7, 5, 1.0))
    assert box_set(boxes_from_score_map(m, [0.0])[0]) == [(6, 5, 7, 5)]


def test_inclusive_box_becomes_one_past_the_last_pixel():
    # columns 2..5 and rows 3..7 of an object: x1, y1 become 6 and 8 (CUB's x + w with w = 4)
    assert inclusive_to_eval_boxes(np.array([2, 3, 5, 7])).tolist() == [[2, 3, 6, 8]]
    assert inclusive_to_eval_boxes(np.array([[0, 0, 0, 0], [1, 1, 2, 2]])).tolist() == [[0, 0, 1, 1], [1, 1, 3, 3]]


def test_a_converted_mask_box_equals_the_box_wsolevaluation_draws_around_it():
    # a blob on columns 1..3, rows 1..2 (inclusive box (1, 1, 3, 2)), away from the border:
    # OpenCV's (x, y, x + w, y + h) is (1, 1, 4, 3), the same box once converted
    m = paint((6, 8), (1, 1, 3, 2, 1.0))
    (drawn,) = boxes_from_score_map(m, [0.0])
    assert box_set(drawn) == box_set(inclusive_to_eval_boxes(np.array([1, 1, 3, 2]))) == [(1, 1, 4, 3)]


def test_a_hole_gives_its_own_box_with_retr_tree():
    # ring on rows/cols 1..5 of a 7x7 map with a one-pixel hole at (3, 3): the outer contour and
    # the hole's border (the ring pixels around it, columns/rows 2..4) each give a box
    m = paint((7, 7), (1, 1, 5, 5, 1.0), (3, 3, 3, 3, 0.0))
    assert box_set(boxes_from_score_map(m, [0.3])[0]) == [(1, 1, 6, 6), (2, 2, 5, 5)]


def test_single_contour_mode_keeps_the_largest_contour():
    m = paint((10, 10), (0, 0, 3, 3, 1.0), (7, 7, 8, 8, 1.0))
    assert box_set(boxes_from_score_map(m, [0.0], multi_contour=False)[0]) == [(0, 0, 4, 4)]


def test_all_zero_map_gives_the_zero_box_at_every_threshold():
    boxes = boxes_from_score_map(np.zeros((5, 5)), [0.0, 0.5, 0.9])
    assert [b.tolist() for b in boxes] == [[[0, 0, 0, 0]]] * 3


def test_constant_map_gives_the_whole_frame_at_every_threshold():
    # every pixel equals the max (uint8 76) and int(tau * 76) < 76 for tau < 1
    boxes = boxes_from_score_map(np.full((4, 6), 0.3), cam_thresholds(0.01))
    assert len(boxes) == 100
    assert all(b.tolist() == [[0, 0, 5, 3]] for b in boxes)


def test_score_map_outside_unit_interval_is_rejected():
    with pytest.raises(ValueError):
        boxes_from_score_map(np.full((3, 3), 1.5), [0.0])


# --- MaxBoxAcc ---------------------------------------------------------------------------------
# Four 10x10 maps, evaluated at tau in {0, .25, .5, .75} (cam_curve_interval=0.25). With the
# map max at uint8 255, the cuts are 0, 63, 127, 191, so a 0.3 level (uint8 76) survives at
# tau 0 and .25, a 0.6 level (153) up to .5, a 1.0 level (255) at every tau.


def nested_map():
    # 0.3 on cols/rows 1..6, 0.6 on 2..5, 1.0 on 3..4 -> boxes [1,1,7,7], [1,1,7,7], [2,2,6,6], [3,3,5,5]
    # GT [2,2,6,6] (25 px): IoU 25/49, 25/49, 1, 9/25 = .51, .51, 1, .36
    return paint((10, 10), (1, 1, 6, 6, 0.3), (2, 2, 5, 5, 0.6), (3, 3, 4, 4, 1.0)), [[2, 2, 6, 6]]


def halo_map():
    # 0.3 on 0..8, 1.0 on 3..5 -> boxes [0,0,9,9] (x+w = 9 fits), [0,0,9,9], [3,3,6,6], [3,3,6,6]
    # GT [0,0,9,9] (100 px): IoU 1, 1, 16/100, 16/100
    return paint((10, 10), (0, 0, 8, 8, 0.3), (3, 3, 5, 5, 1.0)), [[0, 0, 9, 9]]


def two_blob_map():
    # big blob 1.0 on 0..3 -> [0,0,4,4]; small blob 0.6 on 7..8 -> [7,7,9,9] up to tau .5.
    # GT 1 [6,0,9,2] touches neither; GT 2 [7,7,9,9] is the small blob: IoU 1, 1, 1, 0
    return paint((10, 10), (0, 0, 3, 3, 1.0), (7, 7, 8, 8, 0.6)), [[6, 0, 9, 2], [7, 7, 9, 9]]


def empty_map():
    # no foreground: box [0,0,0,0] at every tau, IoU 0 against [2,2,5,5]
    return np.zeros((10, 10)), [[2, 2, 5, 5]]


def evaluate(*images, **kwargs):
    evaluator = MaxBoxAccEvaluator(cam_curve_interval=0.25, **kwargs)
    for score_map, gt_boxes in images:
        evaluator.accumulate(score_map, np.array(gt_boxes))
    return evaluator


def test_max_box_acc_at_each_iou_threshold_on_a_hand_made_data_set():
    evaluator = evaluate(nested_map(), halo_map(), two_blob_map(), empty_map())
    # correct images per tau (0, .25, .5, .75):
    #   delta 30: nested 1 1 1 1, halo 1 1 0 0, two-blob 1 1 1 0, empty 0 -> 3 3 2 1 -> 75 %
    #   delta 50: nested 1 1 1 0, halo 1 1 0 0, two-blob 1 1 1 0         -> 3 3 2 0 -> 75 %
    #   delta 70: nested 0 0 1 0, halo 1 1 0 0, two-blob 1 1 1 0         -> 2 2 2 0 -> 50 %
    np.testing.assert_allclose(
        evaluator.accuracy_per_threshold(), [[75, 75, 50, 25], [75, 75, 50, 0], [50, 50, 50, 0]]
    )
    result = evaluator.compute()
    assert result["MaxBoxAcc@30"] == 75.0
    assert result["MaxBoxAcc@50"] == 75.0
    assert result["MaxBoxAcc@70"] == 50.0
    assert result["MaxBoxAccV2"] == pytest.approx((75 + 75 + 50) / 3)
    assert result["num_images"] == 4


def test_one_tau_serves_the_whole_data_set():
    # at delta 70 the nested map is right only at tau .5 and the halo map only at tau 0 and .25:
    # each image alone scores 100 %, together no single tau gets both -> 50 %, not 100 %
    assert evaluate(nested_map()).compute()["MaxBoxAcc@70"] == 100.0
    assert evaluate(halo_map()).compute()["MaxBoxAcc@70"] == 100.0
    assert evaluate(nested_map(), halo_map()).compute()["MaxBoxAcc@70"] == 50.0


def test_best_tau_is_reported_per_iou_threshold():
    result = evaluate(nested_map()).compute()
    assert result["best_tau@70"] == 0.5  # only tau .5 gives IoU >= .7
    assert result["best_tau@30"] == 0.0  # every tau works; the first is reported


def test_a_box_matching_the_second_gt_box_counts():
    result = evaluate(two_blob_map()).compute()
    assert result["MaxBoxAcc@70"] == 100.0
    score_map, gt_boxes = two_blob_map()
    assert evaluate((score_map, gt_boxes[:1])).compute()["MaxBoxAcc@30"] == 0.0


def test_single_contour_mode_misses_a_smaller_matching_blob():
    # the largest contour is the big blob, which matches neither GT box
    assert evaluate(two_blob_map(), multi_contour_eval=False).compute()["MaxBoxAcc@30"] == 0.0


def test_merged_evaluators_equal_one_evaluator():
    merged = evaluate(nested_map(), halo_map())
    merged.merge(evaluate(two_blob_map(), empty_map()))
    assert merged.compute() == evaluate(nested_map(), halo_map(), two_blob_map(), empty_map()).compute()


def test_default_tau_grid_is_arange_with_step_001():
    evaluator = MaxBoxAccEvaluator()
    np.testing.assert_array_equal(evaluator.thresholds, np.arange(0, 1, 0.01))
    assert evaluator.iou_thresholds == (30, 50, 70)


# --- PxAP --------------------------------------------------------------------------------------


def pxap(*images):
    evaluator = PxAPEvaluator()
    for image in images:
        evaluator.accumulate(*image)
    return evaluator.compute()["PxAP"]


def test_perfect_map_has_pxap_100():
    gt = paint((4, 4), (1, 1, 2, 2, 1.0)).astype(bool)
    assert pxap((gt.astype(np.float64), gt)) == pytest.approx(100.0)


def test_pxap_of_a_hand_computed_ranking():
    # foreground scores 1.0 and 0.5, background 0.75 and 0.0. Sweeping the cut down:
    # at 1.0: TP 1, FP 0 -> precision 1, recall 1/2; at 0.5: TP 2, FP 1 -> precision 2/3, recall 1.
    # PxAP = 1 * 1/2 + 2/3 * 1/2 = 5/6
    scores = np.array([[1.0, 0.5, 0.75, 0.0]])
    gt = np.array([[True, True, False, False]])
    assert pxap((scores, gt)) == pytest.approx(100 * 5 / 6)


def test_ignored_background_pixels_do_not_count():
    # a background pixel scoring 0.9 would come before 0.75: 1 * 1/2 + 2/4 * 1/2 = 3/4
    scores = np.array([[1.0, 0.5, 0.75, 0.0, 0.9]])
    gt = np.array([[True, True, False, False, False]])
    ignore = np.array([[False, False, False, False, True]])
    assert pxap((scores, gt)) == pytest.approx(75.0)
    assert pxap((scores, gt, ignore)) == pytest.approx(100 * 5 / 6)


def test_ignore_region_never_removes_foreground():
    # wsolevaluation's ignore mask is the ignore box minus the foreground
    scores = np.array([[1.0, 0.5, 0.75, 0.0]])
    gt = np.array([[True, True, False, False]])
    ignore_all = np.ones_like(gt)
    # with all background ignored, precision is 1 at every cut: PxAP 100, not an error
    assert pxap((scores, gt, ignore_all)) == pytest.approx(100.0)


def test_pxap_pools_pixels_over_images():
    # the hand-computed ranking split over two images gives the same curve
    first = (np.array([[1.0, 0.75]]), np.array([[True, False]]))
    second = (np.array([[0.5, 0.0]]), np.array([[True, False]]))
    assert pxap(first, second) == pytest.approx(100 * 5 / 6)


# --- Top-1 / Top-5 / GT-known Loc ------------------------------------------------------------


def test_localization_accuracies_on_a_hand_case():
    gt_box = [[0, 0, 9, 9]]
    good, bad = [0, 0, 9, 9], [0, 0, 2, 2]  # IoU 1 and 9/100
    result = localization_accuracy(
        topk_classes=np.array([[3, 1, 2, 4, 5], [1, 3, 2, 4, 5], [3, 1, 2, 4, 5], [7, 8, 9, 10, 11]]),
        gt_classes=np.array([3, 3, 3, 3]),
        pred_boxes=np.array([good, good, bad, [20, 20, 29, 29]]),
        # the fourth image's box matches its second GT box
        gt_boxes=[np.array(gt_box)] * 3 + [np.array([[0, 0, 9, 9], [20, 20, 29, 29]])],
    )
    # image:            1  2  3  4
    # top-1 class:      y  n  y  n  -> 50 %
    # top-5 class:      y  y  y  n  -> 75 %
    # box IoU >= .5:    y  y  n  y  -> GT-known 75 %
    # top-1 and box:    y  n  n  n  -> 25 %
    # top-5 and box:    y  y  n  n  -> 50 %
    assert result == {
        "top1_cls": 50.0,
        "top5_cls": 75.0,
        "top1_loc": 25.0,
        "top5_loc": 50.0,
        "gt_known_loc": 75.0,
        "num_images": 4,
    }


def test_iou_of_exactly_one_half_counts_as_localized():
    accumulator = LocalizationAccumulator()
    # [0,0,1,0] is 2 px inside the 4 px box [0,0,3,0]
    assert accumulator.accumulate([0], 0, np.array([0, 0, 1, 0]), np.array([[0, 0, 3, 0]])) == 0.5
    assert accumulator.compute()["gt_known_loc"] == 100.0


# --- frames and masks --------------------------------------------------------------------------


def test_gt_boxes_are_scaled_to_224_and_truncated():
    # 10*224/400 = 5.6, 20*224/300 = 14.93, 399*224/400 = 223.44, 299*224/300 = 223.25
    scaled = scale_boxes_to_frame(np.array([[10, 20, 399, 299]]), from_size=(400, 300))
    assert scaled.tolist() == [[5, 14, 223, 223]]
    assert scaled.dtype == np.int64


def test_mask_iou_excludes_ignored_pixels():
    pred = np.array([[1, 1, 0, 0]], dtype=bool)
    gt = np.array([[0, 1, 1, 0]], dtype=bool)
    assert mask_iou(pred, gt) == pytest.approx(1 / 3)
    assert mask_iou(pred, gt, ignore=np.array([[1, 0, 0, 0]], dtype=bool)) == pytest.approx(1 / 2)
    assert np.isnan(mask_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)))
