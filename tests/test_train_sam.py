"""Training a small SAM on synthetic scenes: prompts, SAM's multimask loss, the run and its files."""

import json

import pytest
import torch
from segment_anything.utils.transforms import ResizeLongestSide
from torch.utils.data import default_collate

from pro2sam.sam import SAM_VARIANTS, build_sam, sam_from_variant
from pro2sam.train.sam import (
    PromptedScenes,
    SamTrainConfig,
    predict_prompted,
    sam_losses,
    train_sam,
    train_step,
)
from pro2sam.train.schedule import lr_at_step, make_optimizer
from pro2sam.synthetic import make_scene

S = SAM_VARIANTS["tiny"].image_size
SMALL = (96, 128)


def test_every_prompt_lies_inside_its_target_mask():
    data = PromptedScenes(seed=0, length=3, image_size=S, prompts_per_image=5, size_range=SMALL)
    for i in range(len(data)):
        item = data[i]
        assert item["image"].shape == (3, S, S) and item["masks"].shape == (5, S, S)
        assert item["points"].shape == (5, 1, 2) and (item["labels"] == 1).all()
        for mask, (x, y) in zip(item["masks"], item["points"][:, 0]):
            assert mask[int(y), int(x)]


def test_padding_is_zero_in_image_and_targets():
    data = PromptedScenes(seed=1, length=4, image_size=S, prompts_per_image=2, size_range=SMALL)
    for i in range(len(data)):
        h, w = make_scene(1, "sam", i, size_range=SMALL).object_mask.shape
        new_h, new_w = ResizeLongestSide.get_preprocess_shape(h, w, S)
        item = data[i]
        assert max(new_h, new_w) == S
        assert not item["image"][:, new_h:].any() and not item["image"][:, :, new_w:].any()
        assert not item["masks"][:, new_h:].any() and not item["masks"][:, :, new_w:].any()
        assert item["masks"][:, :new_h, :new_w].any((1, 2)).all()


def test_items_are_a_function_of_seed_and_index():
    a = PromptedScenes(seed=2, length=2, image_size=S, prompts_per_image=3, size_range=SMALL)[1]
    b = PromptedScenes(seed=2, length=2, image_size=S, prompts_per_image=3, size_range=SMALL)[1]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_scene_pool_generates_each_scene_once_and_keeps_it():
    data = PromptedScenes(seed=3, length=6, image_size=S, prompts_per_image=2, size_range=SMALL, scene_pool=2)
    assert [data.scene_index(i) for i in range(6)] == [0, 1, 0, 1, 0, 1]
    first = data.scene(1)
    assert data.scene(1) is first
    assert (first.image == make_scene(3, "sam", 1, size_range=SMALL).image).all()
    # prompts are drawn anew on each visit of a pooled scene
    assert not torch.equal(data[1]["points"], data[3]["points"])


def test_loss_frame_size_area_averages_the_targets():
    target = torch.zeros(1, 8, 8, dtype=torch.bool)
    target[:, 2:6, 2:6] = True  # 2x2 downsampling keeps it exact: rows/columns 1..2 of 4
    logits = torch.randn(1, 3, 4, 4)
    iou_pred = torch.full((1, 3), 0.5)
    small = torch.zeros(1, 4, 4, dtype=torch.bool)
    small[:, 1:3, 1:3] = True
    in_frame = sam_losses(logits, iou_pred, target, size=4)
    direct = sam_losses(logits, iou_pred, small)
    assert all(torch.allclose(in_frame[k], direct[k]) for k in in_frame)


def test_only_the_best_of_three_masks_gets_mask_gradient():
    target = torch.zeros(1, 8, 8, dtype=torch.bool)
    target[:, 2:6, 2:6] = True
    logits = torch.full((1, 3, 8, 8), -5.0)
    logits[0, 1] = torch.where(target[0], 5.0, -5.0)  # output 1 is right
    logits.requires_grad_(True)
    iou_pred = torch.full((1, 3), 0.5)
    sam_losses(logits, iou_pred, target)["loss"].backward()
    grad = logits.grad.abs().sum((-2, -1))[0]
    assert grad[1] > 0 and grad[0] == 0 and grad[2] == 0


def test_iou_head_regresses_the_actual_iou_of_every_output():
    target = torch.zeros(1, 4, 4, dtype=torch.bool)
    target[:, :2, :] = True  # 8 pixels
    logits = torch.full((1, 3, 4, 4), -5.0)
    logits[0, 0, :2, :] = 5.0  # IoU 1
    logits[0, 1, :1, :] = 5.0  # IoU 0.5
    logits[0, 2, :, :] = 5.0  # IoU 0.5
    exact = sam_losses(logits, torch.tensor([[1.0, 0.5, 0.5]]), target)
    assert float(exact["iou_mse"]) == pytest.approx(0.0, abs=1e-9)
    off = sam_losses(logits, torch.tensor([[1.0, 0.5, 0.8]]), target)
    assert float(off["iou_mse"]) == pytest.approx(0.3**2 / 3)
    assert float(off["best_iou"]) == pytest.approx(1.0)


def test_learning_rate_warms_up_then_decays_to_zero():
    config = SamTrainConfig(steps=100, batch_size=1, lr=1e-3, warmup_steps=10)
    kw = dict(lr=config.lr, total_steps=config.steps, warmup_steps=config.warmup)
    assert lr_at_step(0, **kw) == pytest.approx(1e-4)
    assert lr_at_step(9, **kw) == pytest.approx(1e-3)
    assert lr_at_step(99, **kw) < 1e-5


def test_a_few_steps_on_a_fixed_batch_lower_its_loss():
    data = PromptedScenes(seed=0, length=1, image_size=S, prompts_per_image=2, size_range=SMALL)
    batch = default_collate([data[0]])
    torch.manual_seed(0)
    sam = sam_from_variant(SAM_VARIANTS["tiny"])
    optimizer = make_optimizer(sam, lr=2e-3, weight_decay=SamTrainConfig().weight_decay)

    def loss() -> float:
        with torch.no_grad():
            return float(sam_losses(*predict_prompted(sam, batch["image"], batch["points"], batch["labels"]), batch["masks"])["loss"])

    before = loss()
    for _ in range(15):
        train_step(sam, optimizer, batch, max_grad_norm=1.0)
    assert loss() < 0.8 * before


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_trained_weights_load_with_build_sam_and_record_the_run(tmp_path, suffix):
    out = tmp_path / f"sam_tiny{suffix}"
    record = train_sam(
        out, steps=2, batch_size=1, seed=3, prompts_per_image=2, size_range=SMALL, eval_scenes=1, log_every=1,
        command="python scripts/train_sam_synthetic.py --steps 2",
    )
    sam = build_sam("tiny", out, verify=False)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["command"] == "python scripts/train_sam_synthetic.py --steps 2" and saved["seed"] == 3
    assert saved["weights"] == out.name and saved["steps_done"] == 2 and len(saved["history"]) == 2
    assert 0.0 <= saved["held_out"]["best_iou"] <= 1.0
    random = build_sam("tiny", seed=0)
    assert any(not torch.equal(a, b) for a, b in zip(sam.state_dict().values(), random.state_dict().values()))


def test_training_script_records_its_command(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "train_sam_synthetic", Path(__file__).parents[1] / "scripts" / "train_sam_synthetic.py"
    )
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = tmp_path / "m.pth"
    argv = ["--output", str(out), "--steps", "1", "--batch-size", "1", "--prompts-per-image", "1",
            "--min-size", "96", "--max-size", "96", "--eval-scenes", "0", "--seed", "5"]
    assert job.main(argv) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["command"].endswith(" ".join(argv[2:])) and "train_sam_synthetic.py" in record["command"]
    assert record["seed"] == 5 and "held_out" not in record
    build_sam("tiny", out, verify=False)


def test_object_regime_scenes_add_the_object_with_its_support_as_a_target():
    from pro2sam.train.sam import prompt_targets

    scene = make_scene(0, "sam", 1, size_range=SMALL, regime="object")
    targets = prompt_targets(scene)
    assert any((t == (scene.object_mask | scene.support_mask)).all() for t in targets)
    part_scene = make_scene(0, "sam", 1, size_range=SMALL)
    assert len(prompt_targets(part_scene)) == 2 + sum(m.any() for m in part_scene.distractor_masks)


def test_regimes_take_turns_over_the_scene_indices():
    data = PromptedScenes(seed=0, length=4, image_size=S, prompts_per_image=2, size_range=SMALL, regimes=("part", "object"))
    assert not data.scene(0).support_mask.any() and data.scene(1).support_mask.any()
    assert (data.scene(1).image == make_scene(0, "sam", 1, size_range=SMALL, regime="object").image).all()
    with pytest.raises(ValueError, match="regimes"):
        SamTrainConfig(regimes=("plumage",))


def test_training_continues_from_given_weights_and_records_their_hash(tmp_path):
    from pro2sam.storage import sha256_file

    first = tmp_path / "first.pth"
    train_sam(first, steps=1, batch_size=1, seed=3, prompts_per_image=1, size_range=SMALL, eval_scenes=0, log_every=1)
    start = build_sam("tiny", first, verify=False).state_dict()
    # lr 0: the weights carried over must come out unchanged, so they were loaded (not re-drawn)
    record = train_sam(
        tmp_path / "second.pth", steps=1, batch_size=1, seed=9, prompts_per_image=1, size_range=SMALL,
        eval_scenes=0, log_every=1, lr=0.0, init_from=first,
    )
    after = build_sam("tiny", tmp_path / "second.pth", verify=False).state_dict()
    assert all(torch.equal(start[k], after[k]) for k in start)
    assert record["init_from"] == {"file": "first.pth", "sha256": sha256_file(first)}
    # the parent's record rides along, so the lineage is in the child's record
    assert record["init_record"] == json.loads(first.with_suffix(".json").read_text())
    scratch = build_sam("tiny", seed=9).state_dict()
    assert any(not torch.equal(scratch[k], after[k]) for k in scratch)


def test_continuing_from_weights_of_another_architecture_is_a_clear_error(tmp_path):
    other = tmp_path / "synthetic.pth"
    torch.save(build_sam("synthetic", seed=0).state_dict(), other)
    with pytest.raises(Exception, match="size mismatch|synthetic.pth|does not fit"):
        train_sam(tmp_path / "x.pth", steps=1, batch_size=1, seed=0, size_range=SMALL, eval_scenes=0, init_from=other)
