"""The confidence: its features, its fit on held-out boxes, AUROC and risk-coverage on hand-made
cases, its calibration file, and the labeling job giving new rows the column."""

import json
import math

import numpy as np
import pytest

from helpers import job_config, output_rows, write_scenes
from pro2sam.confidence import (
    CONFIDENCE_FEATURES,
    ConfidenceModel,
    auroc,
    calibrate,
    feature_matrix,
    risk_coverage,
    risk_coverage_curve,
    score_confidence,
)
from pro2sam.labels import LABEL_SCHEMA, error_row, rows_to_table
from pro2sam.output import LabelsOutput


def row(uri="a", *, match=0.5, pred_iou=0.9, stability=0.95, class_score=0.7, source="sam", area=200, size=(20, 20)):
    return {
        "uri": uri, "status": "ok", "match_score": match, "pred_iou": pred_iou, "stability_score": stability,
        "topk_scores": [class_score, 0.1], "box_source": source, "mask_area": area, "width": size[0], "height": size[1],
        "gtformer_sha256": "g", "sam_model": "s:1",
    }  # fmt: skip


def constant(bias: float) -> ConfidenceModel:
    n = len(CONFIDENCE_FEATURES)
    return ConfidenceModel(CONFIDENCE_FEATURES, (0.0,) * n, (1.0,) * n, (0.0,) * n, bias)


def test_features_are_the_scores_with_the_fallback_flag_and_the_mask_share():
    rows = [row(), row(match=None, pred_iou=None, stability=None, source="coarse_fallback", area=100)]
    rows.append(error_row("e", "e", None, "bad", kind="image", run_id="r"))
    x = feature_matrix(rows)
    assert x[0].tolist() == pytest.approx([0.5, 0.9, 0.95, 0.7, 0.0, 0.5])
    assert x[1].tolist() == pytest.approx([0.0, 0.0, 0.0, 0.7, 1.0, 0.25])  # no SAM scores: 0, flagged
    assert np.isnan(x[2]).all()  # an error row has no features


def test_auroc_counts_right_over_wrong_pairs_ties_half():
    # right: 0.9, 0.5; wrong: 0.5, 0.1 -> pairs (0.9>0.5, 0.9>0.1, 0.5=0.5, 0.5>0.1) = 3.5 / 4
    assert auroc([0.9, 0.5, 0.5, 0.1], [True, True, False, False]) == pytest.approx(0.875)
    assert auroc([0.1, 0.9], [True, False]) == 0.0
    assert auroc([float("nan"), 0.2], [False, True]) == 1.0  # no confidence ranks lowest
    assert auroc([0.3, 0.4], [True, True]) is None


def test_risk_coverage_is_the_accuracy_of_the_most_confident_share():
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, float("nan")]
    correct = [1, 1, 1, 1, 1, 0, 1, 0, 0, 0]
    assert risk_coverage(scores, correct) == {"50": 100.0, "80": 75.0, "90": pytest.approx(200 / 3), "100": 60.0}
    coverage, accuracy = risk_coverage_curve(scores, correct)
    assert coverage[0] == 0.1 and coverage[-1] == 1.0 and accuracy[5] == pytest.approx(500 / 6)


def test_fit_ranks_a_separable_split_perfectly_and_predicts_probabilities():
    # big masks are right, small ones wrong, whatever the other scores say
    rows = [row(str(i), area=a, match=m) for i, (a, m) in enumerate([(300, 0.2), (250, 0.9), (280, 0.4), (40, 0.8), (30, 0.3), (60, 0.6)])]
    correct = np.array([True, True, True, False, False, False])
    model = ConfidenceModel.fit(feature_matrix(rows), correct)
    p = model.predict(rows)
    assert ((p >= 0) & (p <= 1)).all()
    assert p[correct].min() > 0.5 > p[~correct].max()
    assert (model.num_images, model.num_correct) == (6, 3)


def test_fit_on_a_split_without_wrong_boxes_gives_the_smoothed_share():
    model = ConfidenceModel.fit(feature_matrix([row(), row()]), np.array([True, True]))
    assert model.weights == (0.0,) * len(CONFIDENCE_FEATURES)
    assert model.predict([row(area=1)])[0] == pytest.approx(3 / 4)  # (2 + 1) / (2 + 2)


def test_calibration_file_round_trips_and_refuses_other_json(tmp_path):
    model = ConfidenceModel.fit(feature_matrix([row(area=300), row(area=20)]), np.array([True, False]), fitted_on="toy:val")
    path = tmp_path / "confidence.json"
    model.save(str(path))
    assert ConfidenceModel.load(str(path)) == model
    assert json.loads(path.read_text())["fitted_on"] == "toy:val"
    (tmp_path / "other.json").write_text(json.dumps({"weights": [1]}))
    with pytest.raises(ValueError, match="not a pro2sam confidence calibration"):
        ConfidenceModel.load(str(tmp_path / "other.json"))


def test_fill_sets_the_column_and_leaves_error_rows_null():
    table = rows_to_table([{**r, "image_id": "i", "run_id": "r"} for r in [row()]] + [error_row("e", "e", None, "x", kind="image", run_id="r")])
    filled = constant(math.log(3)).fill(table)  # sigmoid(log 3) = 0.75
    assert filled.schema == LABEL_SCHEMA
    assert filled.column("confidence").to_pylist() == [pytest.approx(0.75), None]
    older = table.drop_columns(["confidence"])  # a file written before the column existed
    assert constant(0.0).fill(older).column("confidence").to_pylist() == [0.5, None]


def test_calibrate_and_score_read_right_boxes_from_the_evaluation_records():
    rows = {u: row(u, area=a) for u, a in [("r1", 300), ("r2", 280), ("w1", 30), ("w2", 20)]}
    records = [{"uri": u, "status": "ok", "gt_boxes_224": [[0, 0, 9, 9]], "pro2sam_iou": iou}
               for u, iou in [("r1", 0.9), ("r2", 0.5), ("w1", 0.49), ("w2", 0.1)]]  # fmt: skip
    model = calibrate(records, rows, fitted_on="toy:val")
    assert (model.num_images, model.num_correct, model.model_ids) == (4, 2, ("g", "s:1"))
    test = records + [{"uri": "missing", "status": "missing"}]  # no row: least confident, wrong
    scored = score_confidence(model, test, rows)
    assert scored["num_images"] == 5 and scored["auroc"] == 1.0
    # the top 2 (round(2.5)), 4, 4 (round(4.5)) and 5 images: 2/2, 2/4, 2/4, 2/5 right
    assert scored["risk_coverage"] == {"50": 100.0, "80": 50.0, "90": 50.0, "100": 40.0}
    assert test[-1]["confidence"] is None and 0 <= test[0]["confidence"] <= 1


def test_label_job_gives_rows_the_calibrated_confidence(tmp_path, tiny_checkpoints, ray_local):
    from pro2sam.pipeline.label_job import run_label_job

    write_scenes(tmp_path / "images", 3)
    (tmp_path / "images" / "broken.png").write_bytes(b"not an image")
    calibration = tmp_path / "confidence.json"
    constant(math.log(3)).save(str(calibration))
    cfg = job_config(tiny_checkpoints, tmp_path / "images", tmp_path / "labels", batch_size=4)
    cfg.labeling.confidence_calibration = str(calibration)
    run_label_job(cfg)
    rows = output_rows(tmp_path / "labels")
    table = LabelsOutput(str(tmp_path / "labels")).read_table(["uri", "confidence"])
    confidence = dict(zip(table.column("uri").to_pylist(), table.column("confidence").to_pylist()))
    assert len(rows) == 4
    for r in rows:
        assert confidence[r["uri"]] == (pytest.approx(0.75) if r["status"] == "ok" else None)


def test_label_job_refuses_a_calibration_that_is_not_one_before_labeling(tmp_path, tiny_checkpoints):
    from pro2sam.pipeline.label_job import run_label_job

    write_scenes(tmp_path / "images", 1)
    (tmp_path / "bad.json").write_text("{}")
    cfg = job_config(tiny_checkpoints, tmp_path / "images", tmp_path / "labels")
    cfg.labeling.confidence_calibration = str(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="not a pro2sam confidence calibration"):
        run_label_job(cfg)
    assert not list((tmp_path / "labels").glob("*.parquet"))


def test_label_and_evaluate_take_the_calibration_option():
    from pro2sam.apps.cli import _labeling, build_parser

    for command in (["label", "--input", "in", "--output", "out"], ["evaluate", "--test", "t", "--heldout", "h", "--output", "o"]):
        args = build_parser().parse_args([*command, "--gtformer", "g", "--sam", "tiny", "--confidence-calibration", "s3://b/c.json"])
        assert _labeling(args).confidence_calibration == "s3://b/c.json"
