"""GTFormer training: the recipe's pieces, and the Ray Train job (learns, exports, resumes)."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pro2sam.datasets import open_dataset
from pro2sam.gtformer import create_gtformer, load_gtformer
from pro2sam.train.gtformer import (
    LabeledImageDataset,
    TrainConfig,
    dataset_hash,
    eval_transform,
    make_lr_scheduler_for,
    train_transform,
)
from pro2sam.train.schedule import lr_at_step, make_optimizer, param_groups

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"red_disc": (230, 40, 40), "green_square": (40, 220, 40), "blue_triangle": (50, 60, 240)}

# A set-up that learns within a few steps: constant lr 1e-3, no warm-up, 2 workers x 4 images.
TINY = dict(preset="gtformer_test_tiny", batch_size=8, lr=1e-3, warmup_epochs=0, schedule="constant", loader_workers=0)


def write_shapes_manifest(folder: Path, per_class: int = 12, size: int = 64, seed: int = 0) -> Path:
    """PNG scenes of one shape each (class = shape and colour) on a dark noisy background and a
    manifest.csv (uri relative to it, label = class name)."""
    rng = np.random.default_rng(seed)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = ["uri,label"]
    for name, colour in SHAPES.items():
        for i in range(per_class):
            image = Image.fromarray(rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8))
            draw = ImageDraw.Draw(image)
            r = size * rng.uniform(0.2, 0.3)
            cx, cy = (size * rng.uniform(0.35, 0.65) for _ in range(2))
            if name == "red_disc":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
            elif name == "green_square":
                draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
            image.save(images / f"{name}_{i:02d}.png")
            lines.append(f"images/{name}_{i:02d}.png,{name}")
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.fixture(scope="module")
def shapes_manifest(tmp_path_factory):
    return write_shapes_manifest(tmp_path_factory.mktemp("shapes"))


# ---------------------------------------------------------------- recipe pieces (no Ray)


def test_warmup_is_linear_then_cosine_decays_to_min_lr():
    kw = dict(lr=1e-3, total_steps=50, warmup_steps=10, schedule="cosine", min_lr=1e-5)
    assert lr_at_step(0, **kw) == pytest.approx(1e-4)
    assert lr_at_step(4, **kw) == pytest.approx(5e-4)
    assert lr_at_step(9, **kw) == pytest.approx(1e-3)
    assert lr_at_step(10, **kw) == pytest.approx(1e-3)
    assert lr_at_step(30, **kw) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert lr_at_step(50, **kw) == pytest.approx(1e-5)
    # a quarter of the way through the decay: min + (max - min) * (1 + cos(pi / 4)) / 2
    assert lr_at_step(20, **kw) == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi / 4)) / 2)
    decay = [lr_at_step(s, **kw) for s in range(10, 51)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_constant_schedule_keeps_lr_after_warmup():
    kw = dict(lr=2e-4, total_steps=40, warmup_steps=4, schedule="constant")
    assert lr_at_step(1, **kw) == pytest.approx(1e-4)
    assert [lr_at_step(s, **kw) for s in (4, 20, 39)] == pytest.approx([2e-4] * 3)
    assert lr_at_step(0, lr=2e-4, total_steps=40, warmup_steps=0, schedule="constant") == pytest.approx(2e-4)


def test_scheduler_sets_the_scheduled_lr_on_every_step():
    model = torch.nn.Linear(2, 2)
    cfg = TrainConfig(preset="gtformer_test_tiny", epochs=3, lr=1e-3, min_lr=0.0, warmup_epochs=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    scheduler = make_lr_scheduler_for(optimizer, cfg, steps_per_epoch=4)
    seen = []
    for _ in range(12):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [lr_at_step(s, lr=1e-3, total_steps=12, warmup_steps=4, min_lr=0.0) for s in range(12)]
    assert seen == pytest.approx(expected)
    assert seen[3] == pytest.approx(1e-3) and seen[11] < seen[4]


def test_area_loss_is_batch_by_default_and_a_typo_is_refused():
    assert TrainConfig().area_loss == "batch"  # the authors'
    with pytest.raises(ValueError, match="area_loss must be one of"):
        TrainConfig(area_loss="pixel")


def test_biases_and_1d_params_are_not_decayed():
    model = create_gtformer("gtformer_test_tiny", num_classes=3)
    decayed, not_decayed = param_groups(model, 0.05)
    assert decayed["weight_decay"] == 0.05 and not_decayed["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    plain_names = {names[id(p)] for p in not_decayed["params"]}
    assert all(p.ndim >= 2 for p in decayed["params"])
    assert {n for n, p in model.named_parameters() if p.ndim == 1} <= plain_names
    assert {"pos_embed", "cls_token", "global_pos_embed"} <= plain_names
    assert "head.weight" in decayed_names and "blocks.0.attn.qkv.weight" in decayed_names
    assert len(decayed_names) + len(plain_names) == len(list(model.parameters()))
    cfg = TrainConfig(preset="gtformer_test_tiny", weight_decay=0.05)
    assert [g["weight_decay"] for g in make_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay).param_groups] == [0.05, 0.0]


def test_transforms_give_224_normalised_images(shapes_manifest):
    data = open_dataset(str(shapes_manifest))
    train = LabeledImageDataset.from_wsol(data, train_transform())
    image, label = train[0]
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32 and label.dtype == torch.int64
    assert image.min() < -1.5 and image.max() > 1.5  # ImageNet-normalised
    evaluated, _ = LabeledImageDataset.from_wsol(data, eval_transform())[0]
    assert torch.equal(evaluated, LabeledImageDataset.from_wsol(data, eval_transform())[0][0])


def test_dataset_hash_ignores_order_and_sees_labels(shapes_manifest):
    data = open_dataset(str(shapes_manifest))
    shuffled = type(data)(data.name, data.split, data.class_names, list(reversed(data.samples)))
    assert dataset_hash(shuffled) == dataset_hash(data)
    relabelled = list(data.samples)
    relabelled[0] = type(relabelled[0])(**{**relabelled[0].__dict__, "label": (relabelled[0].label + 1) % 3})
    assert dataset_hash(type(data)(data.name, data.split, data.class_names, relabelled)) != dataset_hash(data)


# ---------------------------------------------------------------- the Ray Train job


def test_job_refuses_checkpoints_of_another_set_up(shapes_manifest, tmp_path):
    from pro2sam.pipeline.train_job import RUN_MARKER, TrainJobConfig, run_train_job

    run_dir = tmp_path / "out" / "ray_train" / "gtformer"
    run_dir.mkdir(parents=True)
    (run_dir / RUN_MARKER).write_text(json.dumps({"fingerprint": {"lr": 0.5}}))
    with pytest.raises(ValueError, match="different training set-up"):
        run_train_job(TrainJobConfig(data=str(shapes_manifest), output=str(tmp_path / "out"), train=TrainConfig(epochs=1, **TINY)))
    with pytest.raises(ValueError, match="divide by num_workers"):
        run_train_job(
            TrainJobConfig(data=str(shapes_manifest), output=str(tmp_path / "out"), train=TrainConfig(epochs=1, **TINY), num_workers=3)
        )


@pytest.mark.timeout(300)
def test_training_lowers_the_loss_and_exports_a_loadable_gtformer(ray_local, shapes_manifest, tiny_checkpoints, tmp_path):
    from pro2sam import Pro2SAM
    from pro2sam.pipeline.train_job import TrainJobConfig, run_train_job

    cfg = TrainConfig(epochs=2, seed=0, area_loss="image", **TINY)
    export = run_train_job(
        TrainJobConfig(data=str(shapes_manifest), output=str(tmp_path / "out"), train=cfg, eval_data=str(shapes_manifest))
    )

    assert Path(export) == tmp_path / "out" / "gtformer"
    model, config = load_gtformer(export)
    assert config["class_names"] == sorted(SHAPES)
    extra = config["extra"]
    assert extra["training_data_sha256"] == dataset_hash(open_dataset(str(shapes_manifest)))
    assert extra["train_config"] == cfg.to_dict()
    history = extra["history"]
    assert [h["epoch"] for h in history] == [1, 2] and extra["start_epoch"] == 1
    assert {"uptime_before", "uptime_after", "job_wall_seconds", "cpus"} <= set(extra["machine"])
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert history[1]["val_loss"] < history[0]["val_loss"]
    assert all(h["lr"] == pytest.approx(1e-3) and h["images"] == 36 for h in history)

    _, sam_path = tiny_checkpoints
    pro2sam = Pro2SAM.from_checkpoints(export, sam="tiny", sam_checkpoint=sam_path, device="cpu")
    assert pro2sam.class_names == sorted(SHAPES)


def _latest_epoch(run_dir: Path) -> int:
    from pro2sam.pipeline.train_job import latest_checkpoint
    from pro2sam.train.gtformer import read_training_meta

    checkpoint = latest_checkpoint(str(run_dir))
    return 0 if checkpoint is None else read_training_meta(checkpoint.path)["epoch"]


def _kill_session(proc: subprocess.Popen, ray_tmp: str) -> None:
    """SIGKILL the job's process group, then any process of its Ray still alive (by PID)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    for _ in range(50):
        leftovers = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if ray_tmp.encode() in (entry / "cmdline").read_bytes():
                        leftovers.append(int(entry.name))
                except OSError:
                    pass
        if not leftovers:
            break
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    # The killed Ray leaves its address behind; a later ray.init must not try to join it.
    Path(ray_tmp, "ray", "ray_current_cluster").unlink(missing_ok=True)


@pytest.mark.timeout(360)
def test_killed_training_resumes_from_its_last_checkpoint(ray_local, shapes_manifest, tmp_path):
    from pro2sam.pipeline.train_job import TrainJobConfig, run_train_job

    out = tmp_path / "out"
    cfg = TrainConfig(epochs=3, seed=0, **TINY)
    command = [
        sys.executable, str(REPO / "jobs" / "train_gtformer.py"), "--data", str(shapes_manifest),
        "--output", str(out), "--preset", cfg.preset, "--epochs", "3", "--batch-size", str(cfg.batch_size),
        "--lr", str(cfg.lr), "--warmup-epochs", "0", "--schedule", cfg.schedule, "--loader-workers", "0",
        "--num-workers", "2",
    ]  # fmt: skip
    # The job starts its own Ray. A private Ray temp dir (short: Ray's socket paths are
    # length-limited) keeps that Ray, and the address file it leaves behind when killed, apart
    # from any other Ray on the machine.
    ray_tmp = tempfile.mkdtemp(prefix="p2s", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    run_dir = out / "ray_train" / "gtformer"
    try:
        with open(tmp_path / "first.log", "wb") as log:
            first = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                deadline = time.monotonic() + 240
                while _latest_epoch(run_dir) < 1:
                    assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                    assert time.monotonic() < deadline, "no checkpoint within 240 s"
                    time.sleep(0.1)
            finally:
                _kill_session(first, ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert first.returncode == -signal.SIGKILL
    assert _latest_epoch(run_dir) >= 1
    assert not (out / "gtformer").exists()

    # Started again with the same output (here through the library, on the session's Ray).
    export = run_train_job(TrainJobConfig(data=str(shapes_manifest), output=str(out), train=cfg, num_workers=2))

    # The kill lands after epoch 1's checkpoint; epoch 2's may also have reached storage while
    # the process died (seen in CI), and then the run rightly resumes after epoch 2. Either way
    # it resumes, never restarts, and every epoch is trained exactly once.
    _, config = load_gtformer(export)
    start = config["extra"]["start_epoch"]
    assert start in (2, 3)
    assert [h["epoch"] for h in config["extra"]["history"]] == [1, 2, 3]
    assert [h["start_epoch"] for h in config["extra"]["history"]] == [1] * (start - 1) + [start] * (4 - start)
    assert _latest_epoch(run_dir) == 3
