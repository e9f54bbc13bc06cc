"""Pro2SAM end to end on tiny models loaded from real checkpoint files."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY_CLASSES, body_piece_and_speck, choose_planted, write_scenes

from pro2sam import CandidateConfig, MatchConfig, Pro2SAM
from pro2sam.matching import mask_box

LOW_THRESHOLDS = dict(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_scenes(tmp_path_factory.mktemp("images"), 3)


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    gt_dir, sam_path = tiny_checkpoints
    return Pro2SAM.from_checkpoints(
        gt_dir, sam="tiny", sam_checkpoint=sam_path, device="cpu", candidates=CandidateConfig(**LOW_THRESHOLDS)
    )


def test_results_are_in_original_image_pixels(model, images):
    results = model.predict(images)
    assert len(results) == len(images)
    for path, r in zip(images, results):
        w, h = Image.open(path).size
        assert r.mask.shape == (h, w) and r.mask.dtype == bool
        x0, y0, x1, y1 = r.box_xyxy
        assert 0 <= x0 <= x1 < w and 0 <= y0 <= y1 < h
        assert r.coarse_map.shape == (14, 14)


def test_sam_results_carry_the_chosen_candidates_scores_and_box(model, images):
    results = model.predict(images)
    sam_results = [r for r in results if r.box_source == "sam"]
    assert sam_results, "with thresholds at 0 some SAM candidate must survive"
    for r in sam_results:
        assert 0.0 <= r.match_score <= 1.0
        assert not math.isnan(r.pred_iou) and not math.isnan(r.stability_score)
        assert r.num_candidates > 0
        assert r.box_xyxy == mask_box(r.mask)


def test_top_k_classes_come_with_names_and_sorted_scores(model, images):
    (r,) = model.predict(images[:1])
    assert len(r.topk_classes) == len(TINY_CLASSES)  # top_k=5 capped by 3 classes
    assert r.topk_names == [TINY_CLASSES[i] for i in r.topk_classes]
    assert r.topk_scores == sorted(r.topk_scores, reverse=True)
    assert sum(r.topk_scores) == pytest.approx(1.0, abs=1e-5)


def test_coarse_map_is_gtformers_own(model, images):
    (r,) = model.predict(images[:1])
    x = model.preprocess([np.asarray(Image.open(images[0]).convert("RGB"))])
    with torch.inference_mode():
        expected = model.gtformer(x).coarse_map[0].numpy()
    np.testing.assert_allclose(r.coarse_map, expected, atol=1e-6)


def test_labels_are_carried_and_must_match_the_images(model, images):
    results = model.predict(images[:2], labels=["a", "b"])
    assert [r.label for r in results] == ["a", "b"]
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        model.predict(images[:2], labels=["a"])


def test_no_surviving_candidate_falls_back_to_the_coarse_map(model, images):
    strict = model.with_settings(candidates=CandidateConfig(points_per_side=4, pred_iou_thresh=1.0, stability_score_thresh=1.0))
    (r,) = strict.predict(images[:1])
    assert r.box_source == "coarse_fallback"
    assert math.isnan(r.match_score) and math.isnan(r.pred_iou)
    assert r.num_candidates == 0
    assert r.mask.any()


def test_arrays_pil_images_and_paths_give_the_same_result(model, images):
    arr = np.asarray(Image.open(images[0]).convert("RGB"))
    by_path, by_pil, by_array = model.predict([images[0], Image.open(images[0]), arr])
    assert by_path.box_xyxy == by_pil.box_xyxy == by_array.box_xyxy


def test_exact_and_fast_paths_both_run_end_to_end(model, images):
    exact = model.with_settings(candidates=CandidateConfig(mode="exact", **LOW_THRESHOLDS))
    fast = model.with_settings(candidates=CandidateConfig(mode="fast", **LOW_THRESHOLDS))
    (re,), (rf,) = exact.predict(images[:1]), fast.predict(images[:1])
    assert re.mask.shape == rf.mask.shape
    assert re.box_source == rf.box_source == "sam"


def test_other_similarities_are_used_when_configured(model, images):
    dice = model.with_settings(matching=MatchConfig(similarity="dice"))
    (r,) = dice.predict(images[:1])
    assert r.box_source in ("sam", "coarse_fallback")


def test_a_batch_is_localised_as_each_image_alone(model, images):
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in images]
    probs, maps = model.classify(arrays)
    together = model.localize_batch(arrays, probs, maps, labels=["a", "b", "c"])
    for image, p, m, label, got in zip(arrays, probs, maps, "abc", together):
        alone = model.localize(image, p, m, label=label)
        assert (got.box_xyxy, got.box_source, got.label) == (alone.box_xyxy, alone.box_source, label)
        assert np.array_equal(got.mask, alone.mask)


def test_a_batch_with_an_image_sam_cannot_take_is_refused_before_any_work(model, images):
    from pro2sam.model import ImageShapeError

    good = np.asarray(Image.open(images[0]).convert("RGB"))
    sliver = np.zeros((1, 2000, 3), np.uint8)  # its short side would be under one SAM pixel
    probs, maps = model.classify([good, good])
    with pytest.raises(ImageShapeError, match="too elongated"):
        model.localize_batch([good, sliver], probs, maps)


def tight_box(mask):
    ys, xs = np.nonzero(mask)
    return (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))


def test_the_stored_mask_leaves_out_the_specks_its_box_leaves_out(model):
    body, piece, speck = body_piece_and_speck()
    r = choose_planted(model, [body | piece | speck])
    assert r.box_source == "sam"
    assert r.box_xyxy == (20, 60, 159, 159)  # the body and the piece; not the speck
    assert tight_box(r.mask) == r.box_xyxy
    assert np.array_equal(r.mask, body | piece)


def test_fast_path_chooses_the_exact_paths_mask_with_the_shipped_models_and_settings():
    """Part-to-object completion compares the candidates pixel by pixel, so a low-resolution cell
    more or less moved its climb across a containment threshold: with the shipped settings the
    fast path chose another mask than the exact path (and the reference flow) on 37 of 100 test
    scenes, among them scenes 0 and 3 below. Decided on full-resolution masks, it chooses theirs."""
    from dataclasses import replace

    from pro2sam import shipped
    from pro2sam.synthetic import make_scene
    from pro2sam.tuning import load_settings

    settings = load_settings("shipped")
    assert settings.match_config().part_to_object  # what this test is about
    fast = Pro2SAM.from_checkpoints(
        shipped.gtformer_dir(), sam=shipped.SAM_VARIANT, sam_checkpoint=shipped.sam_checkpoint(),
        candidates=settings.candidate_config(shipped.SAM_VARIANT), matching=settings.match_config(),
    )
    exact = fast.with_settings(candidates=replace(fast.candidate_config, mode="exact"))
    images = [make_scene(shipped.SYNTHETIC_SEED, "test", i).image for i in range(6)]
    probs, maps = fast.classify(images)
    for image, p, m in zip(images, probs, maps):
        a, b = fast.localize(image, p, m), exact.localize(image, p, m)
        assert a.box_source == b.box_source == "sam"
        assert a.box_xyxy == b.box_xyxy and (a.mask == b.mask).mean() > 0.999


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_the_absorbed_part_is_stored_with_the_mask_and_its_box_on_both_paths(model, mode):
    """Part absorption is off by default (the authors' rule); on, the stored mask and its box hold
    the lit part SAM split from the chosen body, decided alike on the exact path and on the fast
    path's full-resolution masks."""
    from test_matching import body_and_lit_part

    from pro2sam.candidates import Candidates

    coarse, full, ious = body_and_lit_part()
    n = len(full)
    common = dict(pred_ious=ious.astype(np.float32), stability_scores=np.full(n, 0.95, np.float32),
                  point_coords=np.zeros((n, 2)), multimask_index=np.zeros(n, np.int64),
                  boxes_xyxy=np.zeros((n, 4), np.int64), image_size=(224, 224), num_grid_points=n)  # fmt: skip
    if mode == "exact":
        candidates = Candidates(masks=full, mode="exact", **common)
    else:  # SAM's 56x56 grid; the upsampling of its logits to the image planted
        candidates = Candidates(masks=full[:, ::4, ::4], mode="fast", **common)
        candidates.full_resolution_mask = lambda i: full[i]
    image, probs = np.zeros((224, 224, 3), np.uint8), np.array([0.6, 0.3, 0.1], np.float32)
    plain = model.choose(image, probs, coarse, candidates)
    assert plain.box_xyxy == (64, 64, 127, 127) and np.array_equal(plain.mask, full[0])
    absorbing = model.with_settings(matching=MatchConfig(absorb_parts=True))
    r = absorbing.choose(image, probs, coarse, candidates)
    assert r.box_xyxy == (64, 62, 129, 127) and np.array_equal(r.mask, full[0] | full[1])
    assert tight_box(r.mask) == r.box_xyxy and r.box_source == "sam" and r.pred_iou == pytest.approx(0.9)
