"""A separate classifier for the class scores: timm models and GTFormer exports, alone and in the
evaluation job (``pro2sam evaluate --classifier``).

The timm classifier of these tests is ``test_efficientnet`` (timm's 0.36 M-parameter EfficientNet)
with its head's weights zeroed: its logits are then its head's bias, whatever the image, so its
ranking of the classes is known by hand and differs from GTFormer's.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import tiny_labeling, wsol_tree
from pro2sam.checkpoints import CheckpointError
from pro2sam.classifier import Classifier, ClassifierConfig

NUM_CLASSES = 8


def save_ranking_classifier(path, ranking, arch="test_efficientnet"):
    """A timm classifier whose logits are 3, 2.5, 2, ... for the classes of ``ranking`` (in that
    order) and -10 for the others, saved as safetensors; returns its logits."""
    import timm
    from safetensors.torch import save_file

    model = timm.create_model(arch, pretrained=False, num_classes=NUM_CLASSES)
    head = model.get_classifier()
    logits = torch.full((NUM_CLASSES,), -10.0)
    logits[list(ranking)] = 3.0 - 0.5 * torch.arange(len(ranking), dtype=torch.float32)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(logits)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return logits.tolist()


def _images(n=2):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(40 + 9 * i, 50, 3), dtype=np.uint8) for i in range(n)]


def test_timm_classifier_ranks_classes_by_its_logits(tmp_path):
    logits = save_ranking_classifier(tmp_path / "c.safetensors", [6, 2, 7])
    classifier = Classifier.load(ClassifierConfig(model="test_efficientnet", checkpoint=str(tmp_path / "c.safetensors"), top_k=3))
    classes, scores = classifier.topk(_images())
    assert classes.tolist() == [[6, 2, 7], [6, 2, 7]]
    # softmax of the logits, computed here: exp(3) / sum, exp(2.5) / sum, exp(2) / sum
    total = sum(math.exp(v) for v in logits)
    np.testing.assert_allclose(scores[0], [math.exp(3) / total, math.exp(2.5) / total, math.exp(2) / total], rtol=1e-5)
    # its head has 8 classes, not the architecture's default 1000: read from the checkpoint
    assert classifier.description["num_classes"] == NUM_CLASSES and classifier.description["kind"] == "timm"
    assert classifier.description["preprocessing"]["input_size"] == [3, 160, 160]  # the model's own config


def test_gtformer_export_as_classifier_gives_pro2sam_s_own_probabilities(tiny_checkpoints):
    from pro2sam.model import Pro2SAM

    gtformer, sam_path = tiny_checkpoints
    images = _images(3)
    probs, _ = Pro2SAM.from_checkpoints(gtformer, sam="tiny", sam_checkpoint=sam_path, device="cpu").classify(images)
    classifier = Classifier.load(ClassifierConfig(model="gtformer", checkpoint=str(gtformer)), device="cpu")
    classes, scores = classifier.topk(images)
    assert classes.shape == (3, 3)  # top 5 of 3 classes
    np.testing.assert_allclose(scores, np.take_along_axis(probs, classes, axis=1), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_checkpoint_holding_pickled_code_is_refused(tmp_path):
    import timm

    torch.save(timm.create_model("test_efficientnet", pretrained=False), tmp_path / "whole_model.pth")
    with pytest.raises(CheckpointError, match="pickled"):
        Classifier.load(ClassifierConfig(model="test_efficientnet", checkpoint=str(tmp_path / "whole_model.pth")))


def test_weights_of_another_architecture_are_refused(tmp_path):
    save_ranking_classifier(tmp_path / "resnet.safetensors", [0], arch="test_resnet")
    with pytest.raises(CheckpointError, match="does not fit timm's test_efficientnet"):
        Classifier.load(ClassifierConfig(model="test_efficientnet", checkpoint=str(tmp_path / "resnet.safetensors")))


def test_unknown_timm_name_and_missing_checkpoint_are_bad_options(tmp_path):
    with pytest.raises(ValueError, match="not a timm model"):
        Classifier.load(ClassifierConfig(model="no_such_net", checkpoint=str(tmp_path / "x.safetensors")))
    with pytest.raises(ValueError, match="--classifier-checkpoint is required"):
        ClassifierConfig(model="test_efficientnet", checkpoint="").validate()


# ---------------------------------------------------------------- the evaluation job


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_checkpoints, ray_local):
    """(tree, output folder, report) of an evaluation with GTFormer's own classes."""
    from pro2sam.pipeline.evaluate_job import run_evaluate_job
    from pro2sam.pipeline.settings import EvaluateJobConfig

    root = tmp_path_factory.mktemp("classifier_job")
    meta, data = wsol_tree(root)
    cfg = EvaluateJobConfig(
        test=f"wsol:{meta}:{data}:test", heldout=f"wsol:{meta}:{data}:val", output=str(root / "eval"),
        labeling=tiny_labeling(tiny_checkpoints, batch_size=4), overlays=0,
    )  # fmt: skip
    return cfg, run_evaluate_job(cfg)


def test_evaluate_job_takes_top1_from_the_classifier_and_keeps_the_boxes(baseline, tmp_path):
    from dataclasses import replace

    from pro2sam.pipeline.evaluate_job import run_evaluate_job

    cfg, base = baseline
    records = base.images  # test images t0, t1, t2 with labels 0, 1, 2
    # a class GTFormer does not put first on t0, ranked first for every image; label-less classes after it
    c = (records[0]["topk_classes"][0] + 1) % 3
    d = (c + 1) % 3
    path = tmp_path / "classifier.safetensors"
    save_ranking_classifier(path, [c, 5, 6, d, 7])  # top 5: c, 5, 6, d, 7 -> holds labels c and d
    classifier = ClassifierConfig(model="test_efficientnet", checkpoint=str(path), batch_size=2)
    # the same output folder: the labels are resumed, not relabeled, so the boxes are the same rows
    report = run_evaluate_job(replace(cfg, classifier=classifier))

    box_right = {r["label"]: r["pro2sam_iou"] >= 0.5 for r in records}
    gtf_box_right = {r["label"]: r["gtformer_iou"] >= 0.5 for r in records}
    p2s, gtf = report.results["Pro2SAM"], report.results["GTFormer"]
    assert [r["topk_classes"] for r in report.images] == [[c, 5, 6, d, 7]] * 3
    assert p2s["top1_cls"] == pytest.approx(100 / 3) and p2s["top5_cls"] == pytest.approx(200 / 3)
    assert p2s["top1_loc"] == pytest.approx(100 * box_right[c] / 3)
    assert p2s["top5_loc"] == pytest.approx(100 * (box_right[c] + box_right[d]) / 3)
    assert gtf["top1_loc"] == pytest.approx(100 * gtf_box_right[c] / 3)
    for method in ("GTFormer", "Pro2SAM"):
        assert report.results[method]["gt_known_loc"] == base.results[method]["gt_known_loc"]
        # GTFormer's own classes give the numbers of the run without a classifier
        own = report.results_with_gtformer_classes[method]
        assert own == {k: base.results[method][k] for k in own}
    saved = json.loads((Path(cfg.output) / "report.json").read_text())
    assert saved["settings"]["classifier"]["model"] == "test_efficientnet"
    assert saved["classes_from"].startswith("timm test_efficientnet")
    md = (Path(cfg.output) / "report.md").read_text()
    assert "from timm test_efficientnet" in md and "With GTFormer's own classes instead" in md


def test_cli_evaluate_refuses_a_classifier_checkpoint_without_a_classifier(tmp_path, capsys):
    from pro2sam.apps.cli import main

    argv = ["evaluate", "--test", "wsol:a:b:test", "--heldout", "wsol:a:b:val", "--output", str(tmp_path / "o"),
            "--gtformer", str(tmp_path), "--classifier-checkpoint", "w.safetensors"]  # fmt: skip
    assert main(argv) == 2
    assert "--classifier-checkpoint needs --classifier" in capsys.readouterr().err
