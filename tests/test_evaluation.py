"""Evaluation: hand-computed numbers on constructed cases, held-out thresholds, the job end to end.

The constructed cases live directly in the 224x224 evaluation frame: images are 224x224 (so GT
boxes are not rescaled) and the coarse maps are 224x224 (upsampling is the identity), with

    A = rows/cols 20..119 at 0.5 (quantised 127),  B = rows/cols 60..79 at 1.0 (quantised 255).

Every box scored is in wsolevaluation's convention, x1/y1 one past the last pixel: GT_A =
(20, 20, 120, 120) and GT_B = (60, 60, 80, 80). Cut at tau the map keeps pixels above
int(tau * 255): for tau <= 0.49 (cut <= 124) that is A (which contains B), whose contour box is
(20, 20, 120, 120) (OpenCV's x + w); for tau >= 0.50 (cut 127) it is B, box (60, 60, 80, 80).
Pro2SAM's rows hold inclusive boxes, (60, 60, 79, 79) for B, which the evaluation reads as
(60, 60, 80, 80). IoU adds 1 to each side (wsolevaluation), so:

    box A vs GT_A: 1      box A vs GT_B: 21*21 / 101*101 = 0.043
    box B vs GT_B: 1      box B vs GT_A: 21*21 / 101*101 = 0.043
"""

import json

import numpy as np
import pytest
from PIL import Image

from pro2sam.datasets import Sample, WSOLDataset
from helpers import tiny_labeling, wsol_tree

from pro2sam.evaluation import (
    _iou_by_cut,
    choose_thresholds,
    evaluate_predictions,
    evaluate_with_heldout,
)
from pro2sam.confidence import ConfidenceModel
from pro2sam.labels import error_row
from pro2sam.output import LabelsOutput
from pro2sam.metrics import mask_iou
from pro2sam.report import report_json, report_markdown
from pro2sam.rle import encode_mask

GT_A = [20, 20, 120, 120]
GT_B = [60, 60, 80, 80]
BOX_B = [60, 60, 79, 79]  # B's tight box in the labels table's inclusive convention


def _region(lo: int, hi: int) -> np.ndarray:
    m = np.zeros((224, 224), dtype=bool)
    m[lo : hi + 1, lo : hi + 1] = True
    return m


A, B = _region(20, 119), _region(60, 79)
MAP_AB = np.where(B, 1.0, np.where(A, 0.5, 0.0)).astype(np.float32)


def _sample(i: int, label: int, boxes=None, mask_uri=None) -> Sample:
    return Sample(f"img{i}", f"/toy/img{i}.png", label, None if boxes is None else np.array(boxes, float),
                  mask_uri=mask_uri, width=224, height=224)  # fmt: skip


def _row(i: int, topk, box=BOX_B, mask=B, coarse=MAP_AB) -> dict:
    return {
        "image_id": f"id{i}", "uri": f"/toy/img{i}.png", "width": 224, "height": 224, "label": None,
        "topk_classes": list(topk), "box_xyxy": list(box), "mask_rle": encode_mask(mask),
        "coarse_map": coarse.ravel().tolist(), "status": "ok", "error": None,
    }  # fmt: skip


def _error(i: int) -> dict:
    return error_row(f"id{i}", f"/toy/img{i}.png", None, "decode failed", kind="image", run_id="r")


def _box_case():
    """Held-out: two images whose GT is A (best tau 0.0). Test: GT B, B, A and an error row."""
    heldout = WSOLDataset("toy", "val", ["c0", "c1", "c2"], [_sample(10, 0, [GT_A]), _sample(11, 1, [GT_A])])
    heldout_rows = [_row(10, [0, 1]), _row(11, [1, 0])]
    test = WSOLDataset(
        "toy", "test", ["c0", "c1", "c2"],
        [_sample(0, 0, [GT_B]), _sample(1, 1, [GT_B]), _sample(2, 0, [GT_A]), _sample(3, 2, [GT_B])],
    )  # fmt: skip
    test_rows = [_row(0, [0, 1]), _row(1, [2, 1]), _row(2, [0, 2]), _error(3)]
    return heldout, heldout_rows, test, test_rows


def test_numbers_on_a_constructed_case():
    _, _, test, rows = _box_case()
    r = evaluate_predictions(test, rows, cam_threshold=0.5, boxacc_taus={30: 0.0, 50: 0.5, 70: 0.5})
    gtf, p2s = r.results["GTFormer"], r.results["Pro2SAM"]
    # classes: img0 top-1; img1 in top-5 only; img2 top-1; img3 is an error row (wrong) -> 2/4, 3/4
    assert (p2s["top1_cls"], p2s["top5_cls"]) == (50.0, 75.0)
    # GTFormer at tau 0.5 boxes B: img0 1 (top-1), img1 1 (top-5 only), img2 0.043, img3 error
    assert (gtf["top1_loc"], gtf["top5_loc"], gtf["gt_known_loc"]) == (25.0, 50.0, 50.0)
    # tau 0.0 boxes A: only img2 is right (1/4); tau 0.5 boxes B: img0 and img1 (2/4), at every delta.
    # MaxBoxAccV2 is the best tau of this split per delta: 50; at the given taus: (25 + 50 + 50) / 3
    assert (gtf["MaxBoxAcc@30"], gtf["MaxBoxAcc@50"], gtf["MaxBoxAcc@70"], gtf["MaxBoxAccV2"]) == (50.0,) * 4
    assert gtf["best_tau"] == {"30": 0.5, "50": 0.5, "70": 0.5}
    assert (gtf["BoxAcc@30@heldout_tau"], gtf["BoxAcc@50@heldout_tau"]) == (25.0, 50.0)
    assert gtf["BoxAccV2@heldout_tau"] == pytest.approx(125 / 3)
    # Pro2SAM box (60,60,79,79) inclusive = (60,60,80,80): IoU 1, 1, 0.043 with GT_A, error ->
    # Top-1 1/4, Top-5 2/4, GT-known 2/4; right at IoU 30, 50 and 70 for img0 and img1 -> 50
    assert (p2s["top1_loc"], p2s["top5_loc"], p2s["gt_known_loc"]) == (25.0, 50.0, 50.0)
    assert p2s["BoxAccV2_single_box"] == 50.0 and "MaxBoxAccV2" not in p2s
    assert [rec.get("pro2sam_iou") for rec in r.images] == [1.0, 1.0, pytest.approx(441 / 10201), None]
    assert (r.num_images, r.num_error_rows, r.num_missing_rows) == (4, 1, 0)


def test_scoring_pro2sam_alone_gives_the_same_pro2sam_numbers():
    # pro2sam tune scores many settings with methods=("Pro2SAM",): the same code, GTFormer's part left out
    _, _, test, rows = _box_case()
    both = evaluate_predictions(test, rows, cam_threshold=0.5)
    alone = evaluate_predictions(test, rows, cam_threshold=0.5, methods=("Pro2SAM",))
    assert alone.results["Pro2SAM"] == both.results["Pro2SAM"] and alone.results["GTFormer"] == {k: both.results["GTFormer"][k] for k in ("top1_cls", "top5_cls")}
    assert [r.get("pro2sam_iou") for r in alone.images] == [r.get("pro2sam_iou") for r in both.images]


def test_image_without_a_row_counts_as_wrong():
    _, _, test, rows = _box_case()
    r = evaluate_predictions(test, rows[:1], cam_threshold=0.5)  # only img0 has a row
    assert r.num_missing_rows == 3
    assert r.results["Pro2SAM"]["gt_known_loc"] == 25.0 and r.results["GTFormer"]["gt_known_loc"] == 25.0


def test_thresholds_are_chosen_on_heldout_and_applied_to_test():
    heldout, heldout_rows, test, test_rows = _box_case()
    report = evaluate_with_heldout(heldout, heldout_rows, test, test_rows)
    # held-out GT is A: every tau <= 0.49 boxes A (IoU 0.98), so the first best tau is 0.0
    t = report.thresholds
    assert t.chosen_on == "toy:val" and t.cam_threshold == 0.0
    assert t.boxacc_taus == {30: 0.0, 50: 0.0, 70: 0.0}
    # applied to test, tau 0.0 boxes A: only img2 (GT A, top-1) is right -> 25 / 25 / 25, BoxAccV2 25;
    # MaxBoxAccV2 takes its tau from test itself (wsolevaluation's definition): 0.5, boxes B, 50
    gtf = report.results["GTFormer"]
    assert (gtf["top1_loc"], gtf["top5_loc"], gtf["gt_known_loc"], gtf["BoxAccV2@heldout_tau"]) == (25.0,) * 4
    assert gtf["MaxBoxAccV2"] == 50.0 and "MaxBoxAccV2_self_tuned" not in gtf
    # test itself would prefer tau 0.5 (boxes B): shown beside, labelled test-tuned
    tuned = report.test_tuned
    assert tuned.thresholds.cam_threshold == 0.5 and tuned.thresholds.chosen_on == "toy:test"
    assert tuned.gtformer["gt_known_loc"] == 50.0
    # Pro2SAM has no threshold: the same numbers either way
    assert report.results["Pro2SAM"]["gt_known_loc"] == 50.0
    assert report.classes_from.startswith("GTFormer") and report.results_with_gtformer_classes is None
    md = report_markdown(report)
    assert "| Method | Top-1 Loc | Top-5 Loc | GT-known Loc | MaxBoxAccV2 | BoxAccV2 ‡ |" in md
    assert "| GTFormer (coarse map) | 25.0 | 25.0 | 25.0 | 50.0 | 25.0 |" in md
    assert "| Pro2SAM | 25.0 | 50.0 | 50.0 | - | 50.0 |" in md
    assert "| GTFormer (coarse map), test-tuned † | 25.0 | 50.0 | 50.0 | - | - |" in md
    assert "chosen on the held-out split `toy:val`" in md and "PxAP" not in md
    assert "best box accuracy over tau on `test` itself" in md and "taus chosen on `toy:val`" in md


def test_inclusive_box_of_the_labels_is_read_one_past_the_end_before_scaling():
    # A 448x448 image whose object covers pixels 40..239: GT (40, 40, 240, 240) one past the end,
    # the labels' inclusive box (40, 40, 239, 239). Both land on (20, 20, 120, 120) at 224: IoU 1.
    # (Scaled as they are, (20, 20, 119, 119) against the GT would give 100*100 / 101*101 = 0.980.)
    sample = Sample("big", "/toy/big.png", 0, np.array([[40.0, 40, 240, 240]]), width=448, height=448)
    row = dict(_row(0, [0], box=[40, 40, 239, 239]), uri="/toy/big.png", width=448, height=448)
    row["mask_rle"] = encode_mask(np.kron(B, np.ones((2, 2), bool)))
    r = evaluate_predictions(WSOLDataset("toy", "test", ["c0"], [sample]), [row], cam_threshold=0.5)
    (record,) = r.images
    assert record["gt_boxes_224"] == [[20, 20, 120, 120]] and record["pro2sam_box_224"] == [20, 20, 120, 120]
    assert record["pro2sam_iou"] == 1.0 and record["pro2sam_box_xyxy"] == [40, 40, 239, 239]


def test_separate_classifier_classes_decide_top1_loc_and_leave_gt_known_alone():
    _, _, test, rows = _box_case()
    # GTFormer's rows: img0 [0, 1] (label 0), img1 [2, 1] (label 1), img2 [0, 2] (label 0).
    # The classifier: img0 [1, 0] (top-5 only), img1 [1] (top-1), img2 [2] (wrong), img3 error row.
    classes = {"/toy/img0.png": [1, 0], "/toy/img1.png": [1], "/toy/img2.png": [2], "/toy/img3.png": [2]}
    r = evaluate_predictions(test, rows, cam_threshold=0.5, classes=classes)
    gtf, p2s = r.results["GTFormer"], r.results["Pro2SAM"]
    # boxes right (IoU >= 0.5): GTFormer at 0.5 and Pro2SAM alike for img0 and img1 only
    assert (p2s["top1_cls"], p2s["top5_cls"]) == (25.0, 50.0)  # img1; img0 and img1
    assert (p2s["top1_loc"], p2s["top5_loc"], p2s["gt_known_loc"]) == (25.0, 50.0, 50.0)  # img1; img0, img1
    assert (gtf["top1_loc"], gtf["top5_loc"], gtf["gt_known_loc"]) == (25.0, 50.0, 50.0)
    # with GTFormer's own classes (img0 top-1, img1 top-5 only): Top-1 Loc 1/4 from img0 instead
    own = r.with_gtformer_classes
    assert own["Pro2SAM"] == {"top1_cls": 50.0, "top5_cls": 75.0, "top1_loc": 25.0, "top5_loc": 50.0}
    assert own["GTFormer"]["top1_loc"] == 25.0 and own["GTFormer"]["top5_loc"] == 50.0
    assert [rec.get("top1") for rec in r.images] == [False, True, False, None]
    assert r.images[0]["gtformer_topk_classes"] == [0, 1] and r.images[0]["topk_classes"] == [1, 0]
    # an image the classifier has no classes for has none right; its box still counts
    r = evaluate_predictions(test, rows, cam_threshold=0.5, classes={"/toy/img1.png": [1]})
    assert (r.results["Pro2SAM"]["top1_loc"], r.results["Pro2SAM"]["top5_loc"], r.results["Pro2SAM"]["gt_known_loc"]) == (25.0, 25.0, 50.0)


def test_report_names_the_classifier_and_keeps_gtformer_classes_beside():
    heldout, heldout_rows, test, test_rows = _box_case()
    classes = {"/toy/img0.png": [1, 0], "/toy/img1.png": [1], "/toy/img2.png": [2]}
    report = evaluate_with_heldout(heldout, heldout_rows, test, test_rows, test_classes=classes,
                                   classes_from="timm resnet (r.pth)")  # fmt: skip
    assert report.classes_from == "timm resnet (r.pth)"
    assert report.results_with_gtformer_classes["Pro2SAM"]["top1_cls"] == 50.0
    md = report_markdown(report)
    assert "Classes (Top-1 / Top-5 Loc and Cls) from timm resnet (r.pth): Top-1 / Top-5 Cls 25.0 / 50.0." in md
    assert "With GTFormer's own classes instead: " in md


def test_fallback_rate_is_the_share_of_images_boxed_by_the_coarse_map():
    _, _, test, rows = _box_case()
    rows = [dict(r, box_source="coarse_fallback" if i == 1 else "sam") for i, r in enumerate(rows[:3])] + rows[3:]
    r = evaluate_predictions(test, rows, cam_threshold=0.5)
    assert r.results["Pro2SAM"]["fallback_rate"] == 25.0  # img1 of four images (the error row is no fallback)
    assert "fallback_rate" not in r.results["GTFormer"]


def _mask_png(path, mask: np.ndarray) -> str:
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return str(path)


def test_pxap_and_miou_with_masks_and_heldout_selection_by_miou(tmp_path):
    # OpenImages-like: masks, no boxes. Held-out GT mask A (best cut keeps A: tau 0.0), test GT mask B.
    heldout = WSOLDataset("toy", "val", ["c0"], [_sample(10, 0, mask_uri=_mask_png(tmp_path / "a.png", A))])
    test = WSOLDataset("toy", "test", ["c0"], [_sample(0, 0, mask_uri=_mask_png(tmp_path / "b.png", B))])
    report = evaluate_with_heldout(heldout, [_row(10, [0])], test, [_row(0, [0], mask=A)])
    assert report.thresholds.selected_by == "mIoU" and report.thresholds.cam_threshold == 0.0
    gtf, p2s = report.results["GTFormer"], report.results["Pro2SAM"]
    # GTFormer: B holds the top scores, so every GT pixel is found before any false one: PxAP 100;
    # its mask at tau 0.0 is A: IoU |B| / |A| = 400 / 10000 = 4%
    assert gtf["PxAP"] == pytest.approx(100.0) and gtf["mIoU"] == pytest.approx(4.0)
    # Pro2SAM's binary mask A: one operating point, precision 400/10000 at recall 1 -> 4; IoU 4%
    assert p2s["PxAP"] == pytest.approx(4.0) and p2s["mIoU"] == pytest.approx(4.0)
    assert report.test_tuned.gtformer["mIoU"] == pytest.approx(100.0)  # tau 0.5 keeps B
    assert "| PxAP | mIoU |" in report_markdown(report)


def test_an_image_with_a_mask_and_no_prediction_counts_as_iou_zero_for_both_methods(tmp_path):
    # Two test images, GT mask B: img0's row predicts A (IoU |B| / |A| = 4%), img1 has an error row (IoU 0)
    b = _mask_png(tmp_path / "b.png", B)
    test = WSOLDataset("toy", "test", ["c0"], [_sample(0, 0, mask_uri=b), _sample(1, 0, mask_uri=b)])
    r = evaluate_predictions(test, [_row(0, [0], mask=A), _error(1)], cam_threshold=0.0)
    assert (r.num_images, r.num_with_masks, r.num_error_rows) == (2, 2, 1)
    assert r.results["Pro2SAM"]["mIoU"] == pytest.approx(2.0)
    assert r.results["GTFormer"]["mIoU"] == pytest.approx(2.0)  # its mask at tau 0.0 is A
    # its curve: tau 0.0 keeps A (4%), tau 0.5 keeps B (100%); the error row is 0 at every tau
    curve = dict(zip(r.curves["taus"], r.curves["GTFormer_mIoU"]))
    assert curve[0.0] == pytest.approx(2.0) and curve[0.5] == pytest.approx(50.0)


def test_miou_by_cut_matches_mask_iou():
    rng = np.random.default_rng(0)
    q = rng.integers(0, 256, size=(32, 32)).astype(np.uint8)
    gt, ignore = rng.random((32, 32)) > 0.6, rng.random((32, 32)) > 0.8
    by_cut = _iou_by_cut(q, gt, ignore)
    for cut in (0, 50, 127, 254):
        assert by_cut[cut] == pytest.approx(mask_iou(q > cut, gt, ignore))


def test_heldout_without_ground_truth_is_refused():
    split = WSOLDataset("toy", "val", ["c0"], [_sample(10, 0)])
    with pytest.raises(ValueError, match="neither boxes nor masks"):
        choose_thresholds(evaluate_predictions(split, [_row(10, [0])]))


# ---------------------------------------------------------------- end to end


def test_evaluate_job_end_to_end(tmp_path, tiny_checkpoints, ray_local):
    from pro2sam.pipeline.evaluate_job import run_evaluate_job
    from pro2sam.pipeline.settings import EvaluateJobConfig

    meta, data = wsol_tree(tmp_path)
    out = tmp_path / "eval"
    cfg = EvaluateJobConfig(
        test=f"wsol:{meta}:{data}:test", heldout=f"wsol:{meta}:{data}:val", output=str(out),
        labeling=tiny_labeling(tiny_checkpoints, batch_size=4), overlays=2,
    )  # fmt: skip
    report = run_evaluate_job(cfg)
    saved = json.loads((out / "report.json").read_text())
    assert saved["thresholds"]["chosen_on"] == "meta:val" and saved["test"]["num_images"] == 3
    assert saved["heldout"]["num_images"] == 3 and saved["test"]["num_error_rows"] == 0
    box_accuracies = {"GTFormer": ("MaxBoxAccV2", "BoxAccV2@heldout_tau"), "Pro2SAM": ("BoxAccV2_single_box", "fallback_rate")}
    for method, keys in box_accuracies.items():
        for key in ("top1_loc", "top5_loc", "gt_known_loc", *keys):
            assert 0.0 <= saved["results"][method][key] <= 100.0
    md = (out / "report.md").read_text()
    assert "| Pro2SAM |" in md and "`meta:val`" in md
    assert len((out / "per_image.jsonl").read_text().splitlines()) == 3
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert len(overlays) == 2 and overlays == sorted(report.overlays)
    assert Image.open(out / "overlays" / overlays[0]).size == (256, 192)  # 64x48 enlarged x4
    # the confidence: fitted on val, scored on test, plotted, and in the labels table
    calibration = ConfidenceModel.load(str(out / "confidence.json"))
    assert calibration.fitted_on == "meta:val" and calibration.num_images == 3
    assert set(saved["confidence"]["test"]["risk_coverage"]) == {"50", "80", "90", "100"}
    assert Image.open(out / "risk_coverage.png").format == "PNG"
    labels = LabelsOutput(str(out / "labels")).read_table(["uri", "status", "confidence"]).to_pylist()
    assert len(labels) == 6 and all(0.0 <= r["confidence"] <= 1.0 for r in labels)
    assert "Confidence (P(box IoU >= 0.5), fitted on `meta:val`" in md
    # a second run resumes: nothing is labeled again, the numbers are the same
    again = run_evaluate_job(cfg)
    assert again.results == report.results


def test_report_json_keeps_its_layout():
    # report.json is read by users' scripts: its keys and their order are a format, written out here
    heldout, heldout_rows, test, test_rows = _box_case()
    saved = json.loads(report_json(evaluate_with_heldout(heldout, heldout_rows, test, test_rows)))
    assert list(saved) == ["dataset", "test_split", "heldout_split", "thresholds", "results",
                           "results_with_gtformer_classes", "classes_from", "test_tuned", "heldout", "test",
                           "settings", "confidence"]  # fmt: skip
    counts = ["dataset", "split", "num_images", "num_with_boxes", "num_with_masks", "num_error_rows",
              "num_missing_rows", "cam_threshold", "boxacc_taus"]  # fmt: skip
    assert list(saved["heldout"]) == [*counts, "GTFormer", "Pro2SAM", "with_gtformer_classes", "curves"]
    assert list(saved["test"]) == [*counts, "curves"]
    assert list(saved["test_tuned"]) == ["thresholds", "GTFormer"]
    assert list(saved["thresholds"]) == ["cam_threshold", "boxacc_taus", "chosen_on", "selected_by"]
    assert list(saved["results"]["Pro2SAM"]) == [
        "top1_cls", "top5_cls", "fallback_rate", "top1_loc", "top5_loc", "gt_known_loc",
        "BoxAcc@30_single_box", "BoxAcc@50_single_box", "BoxAcc@70_single_box", "BoxAccV2_single_box",
    ]  # fmt: skip
    assert list(saved["results"]["GTFormer"]) == [
        "top1_cls", "top5_cls", "top1_loc", "top5_loc", "gt_known_loc", "MaxBoxAcc@30", "MaxBoxAcc@50",
        "MaxBoxAcc@70", "MaxBoxAccV2", "best_tau", "BoxAcc@30@heldout_tau", "BoxAcc@50@heldout_tau",
        "BoxAcc@70@heldout_tau", "BoxAccV2@heldout_tau",
    ]  # fmt: skip
    assert list(saved["test"]["curves"]) == ["taus", "GTFormer_top1_loc", "GTFormer_top5_loc",
                                             "GTFormer_gt_known_loc", "GTFormer_box_acc"]  # fmt: skip
