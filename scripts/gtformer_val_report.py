"""GTFormer alone on a held-out split of the synthetic world: classification and where its map lies.

    python scripts/gtformer_val_report.py --gtformer RUN/gtformer --data /work/quality_runs/data_seed0

For choosing a recipe on ``val`` (never ``test``): top-1 / top-5 accuracy; GT-known Loc of the
coarse map's largest-contour box (as :mod:`pro2sam.evaluation` scores GTFormer-only) at every
CAM threshold, the best one, and a two-fold estimate that does not score the images the threshold
was chosen on (choose on even images, score odd ones, and the reverse); MaxBoxAccV2 (max over tau
on the split scored); and, from the regenerated scenes, where the map's mass lies (target object,
its part, distractors, background) and how often its peak is on the target. Writes JSON with
``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gtformer", required=True, help="GTFormer export folder")
    p.add_argument("--data", type=Path, required=True, help="root of a `pro2sam synthetic` data set")
    p.add_argument("--split", default="val")
    p.add_argument("--num", type=int, default=0, help="first N images only (0: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="write the numbers here")
    args = p.parse_args(argv)

    from pro2sam.datasets import open_dataset
    from pro2sam.gtformer import load_gtformer
    from pro2sam.matching import upsample_coarse_map
    from pro2sam.metrics import box_iou_inclusive, boxes_from_score_map, cam_thresholds, scale_boxes_to_frame
    from pro2sam.synthetic import make_scene

    torch.set_num_threads(args.threads)
    info = json.loads((args.data / "synthetic.json").read_text())
    seed, size_range = info["seed"], tuple(info["image_size"])
    data = open_dataset(f"wsol:{args.data}:{args.data}:{args.split}")
    samples = data.samples[: args.num] if args.num else data.samples
    model, config = load_gtformer(args.gtformer)
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["std"]).view(1, 3, 1, 1)
    side = int(config["img_size"])

    taus = cam_thresholds(0.01)
    start = time.perf_counter()
    probs_all, maps_all = [], []
    for a in range(0, len(samples), 32):
        chunk = samples[a : a + 32]
        batch = np.stack([np.asarray(Image.open(s.uri).convert("RGB").resize((side, side), Image.BILINEAR)) for s in chunk])
        x = (torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255 - mean) / std
        with torch.inference_mode():
            out = model(x)
        probs_all.append(out.logits.softmax(-1).numpy())
        maps_all.append(out.coarse_map.numpy())
    probs, maps = np.concatenate(probs_all), np.concatenate(maps_all)
    seconds = time.perf_counter() - start

    labels = np.array([s.label for s in samples])
    top5 = np.argsort(-probs, 1)[:, :5]
    correct = np.zeros((len(samples), len(taus)), bool)
    mass = {"object": [], "part": [], "distractors": [], "background": []}
    peak_on = {"object": 0, "part": 0, "distractor": 0, "background": 0}
    raw_mean = []
    for i, s in enumerate(samples):
        score = np.clip(upsample_coarse_map(maps[i], (224, 224)).astype(np.float64), 0, 1)
        gt = scale_boxes_to_frame(s.boxes, s.size)
        boxes = boxes_from_score_map(score, taus, multi_contour=False)
        correct[i] = box_iou_inclusive(np.concatenate(boxes), gt).max(axis=1) >= 0.5
        scene = make_scene(seed, args.split, int(Path(s.uri).stem), size_range=size_range)
        assert scene.label == s.label, "data set and regenerated scene disagree (other generator version?)"

        def frame(m):
            return cv2.resize(m.astype(np.uint8), (224, 224), interpolation=cv2.INTER_NEAREST).astype(bool)

        obj, part = frame(scene.object_mask), frame(scene.part_mask)
        dis = frame(scene.distractor_masks.any(0)) if len(scene.distractor_masks) else np.zeros_like(obj)
        total = score.sum() + 1e-9
        mass["object"].append(score[obj].sum() / total)
        mass["part"].append(score[part].sum() / total)
        mass["distractors"].append(score[dis].sum() / total)
        mass["background"].append(score[~obj & ~dis].sum() / total)
        y, x = np.unravel_index(np.argmax(score), score.shape)
        peak_on["part" if part[y, x] else "object" if obj[y, x] else "distractor" if dis[y, x] else "background"] += 1
        raw_mean.append(float(maps[i].mean()))

    curve = correct.mean(0) * 100
    best = int(np.argmax(curve))
    even, odd = correct[0::2], correct[1::2]
    twofold = (odd[:, int(np.argmax(even.mean(0)))].sum() + even[:, int(np.argmax(odd.mean(0)))].sum()) / len(samples) * 100
    n = len(samples)
    result = {
        "gtformer": str(args.gtformer),
        "split": args.split,
        "images": n,
        "top1_cls": float((top5[:, 0] == labels).mean() * 100),
        "top5_cls": float((top5 == labels[:, None]).any(1).mean() * 100),
        "gt_known_loc_best": float(curve[best]),
        "best_cam_threshold": float(taus[best]),
        "gt_known_loc_twofold": float(twofold),
        "gt_known_loc_at": {f"{t:.2f}": float(curve[int(round(t / 0.01))]) for t in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)},
        "map_mass_pct": {k: float(np.mean(v) * 100) for k, v in mass.items()},
        "map_mostly_on_object_pct": float(np.mean(np.array(mass["object"]) > 0.5) * 100),
        "peak_on_pct": {k: v / n * 100 for k, v in peak_on.items()},
        "raw_map_mean": float(np.mean(raw_mean)),
        "confusion_top1_by_class": {
            str(c): float((top5[labels == c, 0] == c).mean() * 100) for c in sorted(set(labels.tolist()))
        },
        "seconds": seconds,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
