"""A small end-to-end run that needs no downloads: tiny random-weight models, generated images.

It writes real checkpoint files and loads them through the same code as official weights, so it
checks an install from end to end. With random weights the chosen masks mean nothing; the
candidate thresholds are lowered so that random SAM outputs survive filtering and the SAM path
(not only the coarse-map fallback) runs.
"""

from __future__ import annotations

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
    from .sam import build_sam

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    gtformer = create_gtformer("gtformer_test_tiny", num_classes=len(EXAMPLE_CLASSES))
    gt_dir = folder / "gtformer_test_tiny"
    save_gtformer(gtformer, gt_dir, class_names=EXAMPLE_CLASSES)
    sam_path = folder / "sam_tiny.pth"
    torch.save(build_sam("tiny").state_dict(), sam_path)
    return gt_dir, sam_path


def run_example(workdir: Path, *, points_per_side: int = 16) -> list[dict]:
    """Make models and images under ``workdir``, run the labeling job on a local Ray, print a summary.

    Returns the rows of the labels table as dicts.
    """
    import pyarrow.parquet as pq

    from .pipeline.label_job import LabelJobConfig, run_label_job

    gt_dir, sam_path = make_tiny_checkpoints(workdir / "models")
    images = workdir / "images"
    make_example_images(images)
    (images / "not_an_image.jpg").write_bytes(b"this file is text, not a JPEG")
    output = workdir / "labels"
    summary = run_label_job(
        LabelJobConfig(
            input=str(images),
            output=str(output),
            gtformer=str(gt_dir),
            sam="tiny",
            sam_checkpoint=str(sam_path),
            points_per_side=points_per_side,
            pred_iou_thresh=0.0,
            stability_score_thresh=0.0,
            overwrite=True,
        )
    )
    rows = pq.read_table(output).to_pylist()
    print()
    print("pro2sam example: tiny RANDOM-weight models, so the boxes are not meaningful; this checks that")
    print("the labeling job (Ray Data, checkpoint loading, SAM grid decoding, matching, Parquet) runs end to end.")
    for r in sorted(rows, key=lambda r: r["uri"]):
        name = Path(r["uri"]).name
        if r["status"] == "ok":
            print(f"  {name:28s} {r['width']}x{r['height']}  box={r['box_xyxy']}  source={r['box_source']}  top1={r['topk_names'][0]}")
        else:
            print(f"  {name:28s} error: {r['error']}")
    print(summary)
    return rows
