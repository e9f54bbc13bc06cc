"""A small end-to-end run that needs no downloads: tiny random-weight models, generated images.

It writes real checkpoint files and loads them through the same code as official weights, so it
checks an install from end to end. With random weights the chosen masks mean nothing; the
candidate thresholds are lowered so that random SAM outputs survive filtering and the SAM path
(not only the coarse-map fallback) runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["make_example_images", "make_tiny_checkpoints", "run_example"]

EXAMPLE_CLASSES = ["disc", "square", "triangle"]


def make_example_images(folder: Path, count: int = 4, seed: int = 0) -> list[Path]:
    """Write ``count`` PNG scenes (one coloured shape on a noisy background) to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        w, h = int(rng.integers(160, 320)), int(rng.integers(160, 320))
        background = rng.integers(0, 80, size=(h, w, 3), dtype=np.uint8)
        image = Image.fromarray(background)
        draw = ImageDraw.Draw(image)
        cx, cy, r = w * rng.uniform(0.3, 0.7), h * rng.uniform(0.3, 0.7), min(w, h) * rng.uniform(0.15, 0.3)
        colour = tuple(int(c) for c in rng.integers(150, 256, size=3))
        shape = EXAMPLE_CLASSES[i % len(EXAMPLE_CLASSES)]
        if shape == "disc":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
        path = folder / f"example_{i:02d}_{shape}.png"
        image.save(path)
        paths.append(path)
    return paths


def make_tiny_checkpoints(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Save a random tiny GTFormer export and a random tiny SAM state dict; return their paths."""
    from .gtformer import create_gtformer, save_gtformer
    from .sam_candidates import build_sam

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    gtformer = create_gtformer("gtformer_test_tiny", num_classes=len(EXAMPLE_CLASSES))
    gt_dir = folder / "gtformer_test_tiny"
    save_gtformer(gtformer, gt_dir, class_names=EXAMPLE_CLASSES)
    sam_path = folder / "sam_tiny.pth"
    torch.save(build_sam("tiny").state_dict(), sam_path)
    return gt_dir, sam_path


def run_example(workdir: Path, *, points_per_side: int = 16) -> list[dict]:
    """Make models and images under ``workdir``, label the images, print and return the records."""
    from .cli import predict_files
    from .model import Pro2SAM
    from .sam_candidates import CandidateConfig

    gt_dir, sam_path = make_tiny_checkpoints(workdir / "models")
    paths = make_example_images(workdir / "images")
    model = Pro2SAM.from_checkpoints(
        gt_dir,
        sam="tiny",
        sam_checkpoint=sam_path,
        device="cpu",
        candidates=CandidateConfig(points_per_side=points_per_side, pred_iou_thresh=0.0, stability_score_thresh=0.0),
    )
    out_path = workdir / "results.jsonl"
    with open(out_path, "w") as out:
        ok, failed = predict_files(model, [str(p) for p in paths], out)
    records = [json.loads(line) for line in out_path.read_text().splitlines()]
    print("pro2sam example: tiny RANDOM-weight models, so the boxes are not meaningful;")
    print("this checks that loading, SAM grid decoding, matching and RLE output run end to end.")
    for r in records:
        print(
            f"  {Path(r['path']).name:28s} {r['width']}x{r['height']}  box={r['box_xyxy']}  "
            f"source={r['box_source']}  candidates={r['num_candidates']}  top1={r['topk_names'][0]}"
        )
    print(f"{ok} ok, {failed} error -> {out_path}")
    return records
