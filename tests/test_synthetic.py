"""The synthetic WSOL world: scenes, their ground truth, and the data set on disk."""

import math

import cv2
import numpy as np
import pytest
from PIL import Image

from pro2sam.datasets import open_dataset, read_wsol_metadata
from pro2sam.evaluation import evaluate_predictions, load_gt_mask
from pro2sam.rle import encode_mask
from pro2sam.synthetic import (
    SYNTHETIC_CLASSES,
    make_scene,
    part_pattern,
    scene_label,
    write_wsol_dataset,
)

SMALL = (96, 128)  # image sides for fast tests


@pytest.fixture(scope="module")
def scenes():
    return [make_scene(3, "test", i, size_range=SMALL) for i in range(20)]


def _class_coloured(image: np.ndarray) -> np.ndarray:
    """(H, W) bool: saturated pixels, not too dark (the colours only class parts have, in either
    of their two tones)."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    return (hsv[..., 1] > 0.6 * 255) & (hsv[..., 2] > 0.25 * 255)


def _erode(mask: np.ndarray, px: int) -> np.ndarray:
    return cv2.erode(mask.astype(np.uint8), np.ones((2 * px + 1, 2 * px + 1), np.uint8)).astype(bool)


def test_same_seed_stream_and_index_give_the_same_scene():
    a, b = make_scene(5, "train", 7, size_range=SMALL), make_scene(5, "train", 7, size_range=SMALL)
    assert np.array_equal(a.image, b.image)
    assert a.label == b.label and a.box_xyxy == b.box_xyxy
    assert np.array_equal(a.object_mask, b.object_mask) and np.array_equal(a.part_mask, b.part_mask)
    assert np.array_equal(a.distractor_masks, b.distractor_masks)


def test_other_seed_or_stream_gives_another_scene():
    base = make_scene(5, "train", 7, size_range=SMALL).image
    for other in (make_scene(6, "train", 7, size_range=SMALL), make_scene(5, "sam", 7, size_range=SMALL)):
        assert other.image.shape != base.shape or not np.array_equal(other.image, base)


def test_scene_arrays_have_the_documented_types(scenes):
    for s in scenes:
        h, w = s.image.shape[:2]
        assert s.image.dtype == np.uint8 and s.image.shape == (h, w, 3)
        assert SMALL[0] <= w <= SMALL[1] and SMALL[0] <= h <= SMALL[1]
        assert s.object_mask.shape == s.part_mask.shape == (h, w) and s.object_mask.dtype == bool
        assert s.distractor_masks.dtype == bool and s.distractor_masks.shape[1:] == (h, w)
        assert 0 <= s.label < len(SYNTHETIC_CLASSES)


def test_box_is_the_tight_inclusive_box_of_the_object_mask(scenes):
    for s in scenes:
        ys, xs = np.nonzero(s.object_mask)
        assert s.box_xyxy == (xs.min(), ys.min(), xs.max(), ys.max())


def test_class_part_is_small_and_attached_to_the_body(scenes):
    for s in scenes:
        assert not (s.part_mask & ~s.object_mask).any()
        assert 0 < s.part_mask.sum() < 0.15 * s.object_mask.sum()
        touching = cv2.dilate(s.part_mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        assert (touching & s.body_mask).any()


def test_class_part_carries_the_class_colour(scenes):
    for s in scenes:
        inner = _erode(s.part_mask, 2)
        if inner.sum() >= 10:  # its colour, or the accent of its pattern: never more than half
            assert _class_coloured(s.image)[inner].mean() > 0.2


def test_class_part_carries_its_kinds_pattern_in_its_accent_colour():
    # Full-size scenes: patterns of 5-7 px need parts larger than the small test images give.
    part_hue = {"red": 0.0, "blue": 0.62}
    # kind -> accent as (hue or None for white/black, value low/high); written out, not read from the code
    accents = {"triangle": (None, "high"), "square": (None, "low"), "star": (0.14, None), "cross": (0.33, None)}

    def hue_distance(h, target):
        d = np.abs(h - target) % 1.0
        return np.minimum(d, 1.0 - d)

    checked = set()
    for i in range(40):
        s = make_scene(0, "val", i)
        inner = _erode(s.part_mask, 2)
        if inner.sum() < 60:
            continue
        colour, kind = s.class_name.split("_")
        hsv = cv2.cvtColor(s.image, cv2.COLOR_RGB2HSV)[inner].astype(np.float64) / [180, 255, 255]
        base = (hue_distance(hsv[:, 0], part_hue[colour]) < 0.05) & (hsv[:, 1] > 0.6)
        if kind == "disc":  # solid: the part's colour throughout
            assert base.mean() > 0.9, (i, kind)
        else:
            hue, value = accents[kind]
            if hue is None:
                accent = ((hsv[:, 1] < 0.35) & (hsv[:, 2] > 0.75)) if value == "high" else (hsv[:, 2] < 0.4)
            else:
                accent = (hue_distance(hsv[:, 0], hue) < 0.08) & (hsv[:, 1] > 0.4)
            assert 0.2 < base.mean() < 0.9 and 0.05 < accent.mean() < 0.8, (i, kind, base.mean(), accent.mean())
        checked.add(kind)
    assert checked == {"disc", "triangle", "square", "star", "cross"}


@pytest.mark.parametrize(
    "kind, share",
    [("solid", 0.0), ("stripes", 0.5), ("checker", 0.5), ("rings", 0.5), ("dots", math.pi * 0.36**2),
     ("grid", 1 - 0.7**2), ("zigzag", 0.5)],
)  # fmt: skip
def test_part_patterns_cover_their_geometric_share_of_the_part(kind, share):
    pattern = part_pattern(np.random.default_rng(0), kind, (300, 300), (150.0, 150.0))
    assert pattern.shape == (300, 300) and set(np.unique(pattern)) <= {0.0, 1.0}
    assert pattern.mean() == pytest.approx(share, abs=0.03)


def test_distractors_are_apart_from_the_target_and_carry_no_class_part(scenes):
    assert sum(len(s.distractor_masks) for s in scenes) > 0
    for s in scenes:
        assert len(s.distractor_masks) <= 3
        coloured = _class_coloured(s.image)
        for d in s.distractor_masks:
            assert d.any() and not (d & s.object_mask).any()
            assert coloured[_erode(d, 2)].mean() < 0.005
        # nothing but the part is class-coloured
        assert coloured[_erode(~s.part_mask, 3)].mean() < 0.005


def test_labels_cycle_through_every_class_in_each_block():
    n = len(SYNTHETIC_CLASSES)
    for block in range(3):
        labels = [scene_label(0, "train", block * n + i) for i in range(n)]
        assert sorted(labels) == list(range(n))
    assert sorted(scene_label(0, "val", i, num_classes=3) for i in range(3)) == [0, 1, 2]


def test_written_dataset_is_read_back_by_the_wsolevaluation_reader(tmp_path):
    out = write_wsol_dataset(tmp_path / "synth", num_train=4, num_val=2, num_test=3, image_size=SMALL, seed=11)
    train = read_wsol_metadata(out.root, out.root, "train")
    val = open_dataset(out.spec("val"))
    test = open_dataset(out.spec("test"))
    assert (len(train), len(val), len(test)) == (4, 2, 3)
    assert train.class_names == val.class_names == list(SYNTHETIC_CLASSES)
    assert not train.has_boxes and not train.has_masks
    assert val.has_boxes and val.has_masks and test.has_boxes and test.has_masks
    for i, sample in enumerate(test.samples):
        scene = make_scene(11, "test", i, size_range=SMALL)
        assert sample.label == scene.label
        assert (sample.width, sample.height) == scene.size
        ys, xs = np.nonzero(scene.object_mask)  # GT written one past the last object pixel
        np.testing.assert_array_equal(sample.boxes, [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]])
        assert np.array_equal(np.asarray(Image.open(sample.mask_uri)) > 127, scene.object_mask)
        mask, ignore = load_gt_mask(sample)  # as the evaluation reads it: 224 frame, nearest
        expected = cv2.resize(scene.object_mask.astype(np.uint8), (224, 224), interpolation=cv2.INTER_NEAREST)
        assert np.array_equal(mask, expected.astype(bool)) and ignore is None
        assert sample.ignore_uri is None
        with Image.open(sample.uri) as image:
            assert image.mode == "RGB" and image.size == scene.size
    assert [s.label for s in train.samples] == [make_scene(11, "train", i, size_range=SMALL).label for i in range(4)]


def test_fewer_classes_write_fewer_class_names(tmp_path):
    out = write_wsol_dataset(tmp_path / "s", num_train=3, num_val=0, num_test=1, image_size=SMALL, num_classes=3)
    train = open_dataset(out.spec("train"))
    assert train.class_names == list(SYNTHETIC_CLASSES[:3])
    assert sorted(s.label for s in train.samples) == [0, 1, 2]


def test_cli_writes_the_dataset(tmp_path, capsys):
    from pro2sam.apps.cli import main

    argv = ["synthetic", "--output", str(tmp_path / "d"), "--num-train", "2", "--num-val", "1", "--num-test", "1",
            "--min-size", "96", "--max-size", "112", "--seed", "4"]  # fmt: skip
    assert main(argv) == 0
    assert f"wsol:{tmp_path / 'd'}:{tmp_path / 'd'}:test" in capsys.readouterr().out
    assert len(open_dataset(f"wsol:{tmp_path / 'd'}:{tmp_path / 'd'}:val")) == 1


def test_the_true_mask_scores_iou_one_against_the_written_ground_truth(tmp_path):
    # Pro2SAM's rows carry inclusive boxes, the written GT is one past the end: the evaluation
    # must bring them together, so predicting each object exactly scores IoU 1 on every image.
    out = write_wsol_dataset(tmp_path / "synth", num_train=0, num_val=0, num_test=4, image_size=SMALL, seed=5)
    test = open_dataset(out.spec("test"))
    rows = []
    for i, sample in enumerate(test.samples):
        mask = make_scene(5, "test", i, size_range=SMALL).object_mask
        ys, xs = np.nonzero(mask)
        rows.append({
            "uri": sample.uri, "status": "ok", "width": mask.shape[1], "height": mask.shape[0],
            "topk_classes": [sample.label], "box_xyxy": [xs.min(), ys.min(), xs.max(), ys.max()],
            "mask_rle": encode_mask(mask), "coarse_map": np.full(196, 0.5, np.float32).tolist(),
        })  # fmt: skip
    r = evaluate_predictions(test, rows)
    assert [rec["pro2sam_iou"] for rec in r.images] == [1.0] * 4
    assert r.results["Pro2SAM"]["BoxAccV2_single_box"] == 100.0


# ---------------------------------------------------------------- regimes

# sha256 of image + object, part and distractor masks of four scenes (seed 0, default sizes), as
# the generator wrote them before the object regime existed (main at c63b892).
PART_REGIME_SCENE_SHA256 = {
    ("train", 0): "525da383e1882b6ef95fd17db01fa11fcaa70bd6a01e40a8f3856884d42cd6c5",
    ("val", 3): "774724fd2a36280afe24ade3742696f4fa4f782afa1a06b298aacbf9e5ac6f0e",
    ("test", 1): "37b9067357d5ed94d405219701cf5e99cf5d3c5c064689a534ef45fe210e62bf",
    ("sam", 5): "bcd90d937c7bd4cdd58298b9a886216d049e601ce93b6c019cfdfaf86a94bdd1",
}


def _scene_sha256(s) -> str:
    import hashlib

    arrays = (s.image, s.object_mask, s.part_mask, s.distractor_masks)
    return hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest()


@pytest.fixture(scope="module")
def object_scenes():
    return [make_scene(3, "test", i, size_range=SMALL, regime="object") for i in range(20)]


def test_part_regime_is_the_default_and_its_scenes_are_unchanged():
    for (stream, index), digest in PART_REGIME_SCENE_SHA256.items():
        default, part = make_scene(0, stream, index), make_scene(0, stream, index, regime="part")
        assert _scene_sha256(default) == _scene_sha256(part) == digest
        assert not part.support_mask.any()


def test_object_regime_is_deterministic_by_seed_and_apart_from_the_part_regime():
    a, b = (make_scene(5, "train", 7, size_range=SMALL, regime="object") for _ in range(2))
    assert _scene_sha256(a) == _scene_sha256(b) and np.array_equal(a.support_mask, b.support_mask)
    other = make_scene(6, "train", 7, size_range=SMALL, regime="object")
    assert other.image.shape != a.image.shape or not np.array_equal(other.image, a.image)
    part = make_scene(5, "train", 7, size_range=SMALL)
    assert part.label == a.label  # a seed's labels are shared, its scenes are not
    assert part.image.shape != a.image.shape or not np.array_equal(part.image, a.image)


def test_unknown_regime_is_refused():
    with pytest.raises(ValueError, match="regime"):
        make_scene(0, "test", 0, regime="plumage")


def test_object_regime_ground_truth_is_the_object_not_its_support(object_scenes):
    for s in object_scenes:
        ys, xs = np.nonzero(s.object_mask)
        assert s.box_xyxy == (xs.min(), ys.min(), xs.max(), ys.max())
        assert not (s.part_mask & ~s.object_mask).any() and s.part_mask.any()
        assert s.support_mask.any() and not (s.support_mask & s.object_mask).any()
        assert not (s.distractor_masks & (s.object_mask | s.support_mask)).any()


def test_object_regime_support_touches_the_object_and_reaches_beyond_its_box(object_scenes):
    for s in object_scenes:
        near = cv2.dilate(s.object_mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        assert (near & s.support_mask).any()
        x0, y0, x1, y1 = s.box_xyxy
        outside_box = s.support_mask.copy()
        outside_box[y0 : y1 + 1, x0 : x1 + 1] = False
        assert outside_box.sum() > 0.2 * s.object_mask.sum()


def _mean_rgb(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return image[_erode(mask, 1)].astype(np.float64).mean(0)


def _red_and_blue_shares(image: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Shares of ``mask``'s pixels (eroded by 1) whose red, or blue, channel exceeds both others by 50."""
    rgb = image[_erode(mask, 1)].astype(np.int32)
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    return float((r - np.maximum(g, b) > 50).mean()), float((b - np.maximum(r, g) > 50).mean())


def test_object_regime_class_colour_is_read_from_the_body_alone(object_scenes):
    # the body without its part: red classes have red pixels and no blue ones, blue classes the reverse
    for s in object_scenes:
        red, blue = _red_and_blue_shares(s.image, s.body_mask)
        own, other = (red, blue) if s.class_name.startswith("red") else (blue, red)
        assert own > 0.3 and other < 0.05, (s.class_name, red, blue)


def test_object_regime_body_carries_the_class_kind_accent():
    # the kinds of one colour differ on the body alone: the share of pixels near the kind's accent
    from pro2sam.synthetic import ACCENT_COLOURS, PART_KINDS

    for i in range(10):
        s = make_scene(1, "val", i, regime="object")
        pixels = s.image[_erode(s.body_mask, 1)].astype(np.float64)
        kind = s.class_name.split("_", 1)[1]
        shares = {
            accent: float((np.linalg.norm(pixels - np.array(rgb), axis=1) < 60).mean())
            for accent, rgb in ACCENT_COLOURS.items()
        }
        own = PART_KINDS[kind][1]
        if own is None:
            assert max(shares.values()) < 0.1, (s.class_name, shares)
        else:
            assert shares[own] > 0.15 and shares[own] == max(shares.values()), (s.class_name, shares)


def test_object_regime_data_set_records_its_regime(tmp_path):
    import json

    data = write_wsol_dataset(tmp_path, num_train=2, num_val=2, num_test=0, image_size=SMALL, seed=4, regime="object")
    assert json.loads((tmp_path / "synthetic.json").read_text())["regime"] == "object"
    samples = open_dataset(data.spec("val")).samples
    assert len(samples) == 2
    scene = make_scene(4, "val", 0, size_range=SMALL, regime="object")
    x0, y0, x1, y1 = scene.box_xyxy
    line = (tmp_path / "val" / "localization.txt").read_text().splitlines()[0]
    assert line.endswith(f",{x0},{y0},{x1 + 1},{y1 + 1}")
    mask = np.asarray(Image.open(tmp_path / "masks" / "val" / "000000.png")) > 0
    assert np.array_equal(mask, scene.object_mask)


def test_cli_writes_an_object_regime_dataset(tmp_path):
    import json

    from pro2sam.apps.cli import main

    argv = ["synthetic", "--output", str(tmp_path / "d"), "--num-train", "1", "--num-val", "1", "--num-test", "0",
            "--min-size", "96", "--max-size", "112", "--seed", "4", "--regime", "object"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((tmp_path / "d" / "synthetic.json").read_text())["regime"] == "object"
    written = np.asarray(Image.open(tmp_path / "d" / "masks" / "val" / "000000.png")) > 0
    assert np.array_equal(written, make_scene(4, "val", 0, size_range=(96, 112), regime="object").object_mask)


def test_demo_takes_the_regime_and_defaults_to_the_part_regime():
    from pro2sam.apps.cli import build_parser

    assert build_parser().parse_args(["demo"]).regime == "part"
    assert build_parser().parse_args(["demo", "--regime", "object"]).regime == "object"
