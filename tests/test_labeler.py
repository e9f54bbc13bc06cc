"""The labeling actor on its own (no Ray): a batch through the models together, bad images isolated."""

import numpy as np
import pytest

from helpers import write_scenes
from PIL import Image

from pro2sam.candidates import CandidateConfig
from pro2sam.pipeline.label_job import Pro2SAMLabeler
from pro2sam.pipeline.settings import LabelingSettings

CANDIDATES = CandidateConfig(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)


def batch_of(images, errors):
    n = len(images)
    column = lambda items: np.array(items, dtype=object)  # noqa: E731
    return {
        "image_id": column([f"img{i}" for i in range(n)]),
        "uri": column([f"file:///img{i}.png" for i in range(n)]),
        "label": column([None] * n),
        "source_fingerprint": column([None] * n),
        "error": column(errors),
        "error_kind": column(["read" if e else None for e in errors]),
        "image": column(images),
    }


@pytest.fixture(scope="module")
def labeler(tiny_checkpoints):
    gt_dir, sam_path = tiny_checkpoints
    settings = LabelingSettings(gtformer=str(gt_dir), sam="tiny", sam_checkpoint=str(sam_path), candidates=CANDIDATES)
    return Pro2SAMLabeler(settings, run_id="test")


def test_a_batch_is_labeled_as_each_image_alone_and_bad_images_are_error_rows(labeler, tmp_path):
    good = [np.asarray(Image.open(p).convert("RGB")) for p in write_scenes(tmp_path, 2)]
    sliver = np.zeros((1, 2000, 3), np.uint8)  # too elongated for SAM: fails the batch, then alone
    unread = np.zeros((1, 1, 3), np.uint8)
    table = labeler(batch_of([good[0], sliver, unread, good[1]], ["", "", "not found", ""])).to_pylist()
    assert [r["status"] for r in table] == ["ok", "error", "error", "ok"]
    assert "too elongated" in table[1]["error"] and table[1]["error_kind"] == "image"
    assert table[2]["error_kind"] == "read"
    model = labeler.model
    probs, maps = model.classify(good)
    for row, image, p, m in zip((table[0], table[3]), good, probs, maps):
        assert tuple(row["box_xyxy"]) == model.localize(image, p, m).box_xyxy
