"""The pretraining world (the offline world's ImageNet) and the backbone pretraining script."""

import colorsys
import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from pro2sam.gtformer import create_deit_backbone, create_gtformer
from pro2sam.synthetic import PART_COLOURS, PART_KINDS, PART_SHAPES, SYNTHETIC_CLASSES
from pro2sam.synthetic_pretrain import (
    PRETRAIN_ACCENTS,
    PRETRAIN_CLASSES,
    PRETRAIN_HUES,
    PRETRAIN_PATTERNS,
    PRETRAIN_SHAPES,
    PRETRAIN_TEXTURES,
    make_pretrain_arrays,
    make_pretrain_scene,
    pretrain_class_factors,
    pretrain_label,
)

REPO = Path(__file__).resolve().parents[1]
SIZE = 96  # scene side for fast tests


@pytest.fixture(scope="module")
def scenes():
    return [make_pretrain_scene(2, i, size=SIZE) for i in range(16)]


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 1.0
    return min(d, 1.0 - d)


def _saturated(image: np.ndarray) -> np.ndarray:
    """Saturated pixels, not too dark: either tone of a part."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    return (hsv[..., 1] > 0.6 * 255) & (hsv[..., 2] > 0.25 * 255)


def test_same_seed_and_index_give_the_same_scene_and_others_differ():
    a, b = make_pretrain_scene(1, 5, size=SIZE), make_pretrain_scene(1, 5, size=SIZE)
    assert np.array_equal(a.image, b.image) and a.label == b.label and np.array_equal(a.part_mask, b.part_mask)
    assert not np.array_equal(make_pretrain_scene(1, 6, size=SIZE).image, a.image)
    assert not np.array_equal(make_pretrain_scene(2, 5, size=SIZE).image, a.image)


def test_classes_are_hue_accent_texture_triples_none_of_them_the_target_worlds():
    names = [f"{h}_{a}_on_{t}" for h in PRETRAIN_HUES for a in PRETRAIN_ACCENTS for t in PRETRAIN_TEXTURES]
    assert list(PRETRAIN_CLASSES) == names and len(names) == 6 * 6 * 4
    for label, name in enumerate(names):
        h, a, t = pretrain_class_factors(label)
        assert name == f"{list(PRETRAIN_HUES)[h]}_{PRETRAIN_ACCENTS[a]}_on_{PRETRAIN_TEXTURES[t]}"
    assert {p for p, _ in PART_KINDS.values()} - {"solid"} <= set(PRETRAIN_PATTERNS)
    assert set(PART_SHAPES) <= set(PRETRAIN_SHAPES)
    assert not set(PRETRAIN_CLASSES) & set(SYNTHETIC_CLASSES)
    # no pretraining hue is within 0.05 of the HSV circle of the target world's part colours
    target_hues = [colorsys.rgb_to_hsv(*(np.array(rgb) / 255))[0] for rgb in PART_COLOURS.values()]
    assert min(_hue_distance(h, t) for h in PRETRAIN_HUES.values() for t in target_hues) > 0.05


def test_labels_cycle_through_every_class_in_each_block():
    n = len(PRETRAIN_CLASSES)
    for block in (0, 3):
        assert sorted(pretrain_label(0, block * n + i) for i in range(n)) == list(range(n))


def test_scene_masks_have_the_documented_layout(scenes):
    for s in scenes:
        assert s.image.shape == (SIZE, SIZE, 3) and s.image.dtype == np.uint8
        assert s.part_mask.any() and s.body_mask.any() and not (s.part_mask & s.body_mask).any()
        touching = cv2.dilate(s.part_mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        assert (touching & s.body_mask).any(), "the part is attached to its body"
        assert len(s.distractor_masks) <= 4
        for d in s.distractor_masks:
            assert d.any() and not (d & (s.part_mask | s.body_mask)).any()
    assert sum(len(s.distractor_masks) for s in scenes) > 0


def test_only_the_part_is_saturated_and_it_carries_the_class_hue(scenes):
    for s in scenes:
        inner = cv2.erode(s.part_mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        saturated = _saturated(s.image)
        outside = cv2.erode((~s.part_mask).astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
        assert saturated[outside].mean() < 0.005
        if inner.sum() < 5:
            continue
        hsv = cv2.cvtColor(s.image, cv2.COLOR_RGB2HSV)  # OpenCV hue: 0..180
        h, a, _ = pretrain_class_factors(s.label)
        class_hue = list(PRETRAIN_HUES.values())[h]
        in_hue = np.array([_hue_distance(v / 180, class_hue) < 0.05 for v in hsv[..., 0][inner]])
        # the part's own hue covers it (solid) or a fair share of it (the accent takes the rest)
        share = (in_hue & saturated[inner]).mean()
        assert share > 0.9 if PRETRAIN_ACCENTS[a] == "plain" else share > 0.25, (s.label, share)


def test_arrays_hold_the_scenes_in_order_for_any_worker_count():
    images, labels = make_pretrain_arrays(4, 5, first=3, size=64, chunk=2)
    again, _ = make_pretrain_arrays(4, 5, first=3, size=64, chunk=2, workers=2)
    assert images.shape == (5, 64, 64, 3) and labels.tolist() == [pretrain_label(4, i) for i in range(3, 8)]
    assert np.array_equal(images, again)
    assert np.array_equal(images[2], make_pretrain_scene(4, 5, size=64).image)


def test_deit_backbone_has_timm_deit_keys_and_shapes():
    ours = create_deit_backbone("gtformer_test_tiny", num_classes=7).state_dict()
    deit = timm.create_model("deit_tiny_patch16_224", embed_dim=48, depth=4, num_heads=3, num_classes=7).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in deit.items()}


def _load_script():
    spec = importlib.util.spec_from_file_location("pretrain_backbone", REPO / "scripts" / "pretrain_backbone.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pretraining_script_exports_a_deit_checkpoint_gtformer_loads(tmp_path):
    script = _load_script()
    out = tmp_path / "bb"
    code = script.main([
        "--output", str(out), "--preset", "gtformer_test_tiny", "--num-images", "24", "--num-val", "8",
        "--size", "64", "--epochs", "1", "--batch-size", "8", "--warmup-steps", "1", "--data-workers", "1",
        "--cache", str(tmp_path / "cache"),
    ])  # fmt: skip
    assert code == 0
    record = json.loads((out / "backbone.json").read_text())
    assert record["steps"] == 3 and len(record["history"]) >= 1
    assert {"uptime_before", "uptime_after", "train_wall_seconds", "sha256", "command"} <= set(record)
    state = load_file(out / "backbone.safetensors")
    assert state["pos_embed"].shape == (1, 1 + 14 * 14, 48)  # the 224 px embedding, though trained at 64 px
    assert state["head.weight"].shape == (len(PRETRAIN_CLASSES), 48)
    model = create_gtformer("gtformer_test_tiny", num_classes=3, backbone_checkpoint=out / "backbone.safetensors")
    for key in ("pos_embed", "cls_token", "blocks.3.mlp.fc2.weight", "norm.weight", "patch_embed.proj.weight"):
        torch.testing.assert_close(model.state_dict()[key], state[key], rtol=0, atol=0)
    assert (tmp_path / "cache").is_dir() and any((tmp_path / "cache").iterdir())
