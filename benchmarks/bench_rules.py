"""Which matching rule by default? The same SAM candidates matched against two coarse maps.

    OMP_NUM_THREADS=1 python benchmarks/bench_rules.py --split val --images 200
    OMP_NUM_THREADS=1 python benchmarks/bench_rules.py --split test --images 200

Trains nothing. For each scene of the synthetic world (seed ``pro2sam.shipped.SYNTHETIC_SEED``) the
shipped SAM's candidates (grid 16, the variant's filters, no grid pruning: the same candidates for
both maps) are matched against

- **the part map**: the shipped GTFormer's own coarse map, which lights the class part (the regime
  the synthetic world was built for: the part is the only class evidence);
- **the object map**: the object's own mask area-averaged to the 14x14 grid, a map that already
  covers the object (the regime of the paper's GTFormer on CUB, GTFormer-only 98.5 GT-known),

by the authors' plain IoU rule and by part-to-object completion at each agreement x containment of
``pro2sam tune``'s grid ``"full"``, and, for part-to-object, two bounds read from the map:
``support`` (a container qualifies only where the area it adds has map support: mean normalised
map over the added area minus that outside the container >= delta) and ``loose`` (climb only when
the best match's score is below tau). GT-known Loc (box IoU >= 0.5 with the object's box) and
mask IoU with the object, per rule and map. A rule that is the package's default must hold in both
regimes: lose at most 1 point to plain IoU on the object map and keep most of part-to-object's gain
on the part map.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F


def bounded(match_masks, kind: str, bound: float):
    """``match_masks`` whose part-to-object climb is bounded by the map (see the module's doc)."""
    from pro2sam.matching import Match

    def matched(coarse_map, candidate_masks, pred_ious, config):
        m = match_masks(coarse_map, candidate_masks, pred_ious, replace(config, part_to_object=False))
        if m.index is None or not config.part_to_object:
            return m
        if kind == "loose" and m.scores[m.index] >= bound:
            return m
        masks = np.asarray(candidate_masks, bool)
        cm = torch.as_tensor(np.asarray(coarse_map, np.float32))
        cm = (cm - cm.min()) / (cm.max() - cm.min()).clamp_min(1e-12)
        up = F.interpolate(cm[None, None], size=masks.shape[1:], mode="bilinear", align_corners=False)[0, 0].numpy().reshape(-1)
        keep = np.flatnonzero(m.rejected == "")
        flat = masks[keep].reshape(len(keep), -1)
        areas = flat.sum(1)
        chosen, floor = m.index, config.agreement * m.scores[m.index]
        while True:
            i = int(np.flatnonzero(keep == chosen)[0])
            inside = (flat & flat[i]).sum(1) / max(1, areas[i])
            container = (inside >= config.containment) & (areas >= config.min_growth * areas[i]) & (m.scores[keep] >= floor)
            if kind == "support":
                for j in np.flatnonzero(container):
                    added, outside = flat[j] & ~flat[i], ~flat[j]
                    gain = (up[added].mean() if added.any() else 0.0) - (up[outside].mean() if outside.any() else 0.0)
                    container[j] = gain >= bound
            if not container.any():
                return Match(chosen, float(m.scores[chosen]), m.scores, m.rejected, best_match=m.index)
            options = np.flatnonzero(container)
            chosen = int(keep[options[np.lexsort((areas[options], -m.scores[keep][options]))[0]]])

    return matched


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", choices=["val", "test"], default="val")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--output", type=Path, help="write the table as JSON here")
    args = p.parse_args(argv)

    from pro2sam import matching, shipped
    from pro2sam.candidates import CandidateConfig
    from pro2sam.matching import MatchConfig
    from pro2sam.metrics import box_iou_inclusive
    from pro2sam.model import Pro2SAM
    from pro2sam.synthetic import make_scene
    from pro2sam.tuning import GRIDS

    torch.set_num_threads(1)
    model = Pro2SAM.from_checkpoints(shipped.gtformer_dir(), sam=shipped.SAM_VARIANT, sam_checkpoint=shipped.sam_checkpoint())
    generator = model.with_settings(
        candidates=CandidateConfig.for_variant(shipped.SAM_VARIANT, points_per_side=16, prune_with_coarse_map=False)
    )
    rules: dict[str, tuple[MatchConfig, str | None, float]] = {"plain IoU": (MatchConfig(part_to_object=False), None, 0.0)}
    for a, c in GRIDS["full"].part_to_object:
        rules[f"part-to-object a={a:g} c={c:g}"] = (MatchConfig(part_to_object=True, agreement=a, containment=c), None, 0.0)
    for delta in (0.0, 0.02, 0.05, 0.1, 0.2):
        rules[f"support delta={delta:g}"] = (MatchConfig(part_to_object=True, containment=0.4), "support", delta)
    for tau in (0.3, 0.5, 0.7, 0.9):
        rules[f"loose tau={tau:g}"] = (MatchConfig(part_to_object=True, containment=0.4), "loose", tau)

    plain_match = matching.match_masks
    hits = {(r, m): [] for r in rules for m in ("part map", "object map")}
    mask_iou = {(r, m): [] for r in rules for m in ("part map", "object map")}
    start = time.perf_counter()
    try:
        for i in range(args.images):
            scene = make_scene(shipped.SYNTHETIC_SEED, args.split, i)
            probs, maps = model.classify([scene.image])
            object_map = cv2.resize(scene.object_mask.astype(np.float32), (14, 14), interpolation=cv2.INTER_AREA)
            for map_name, coarse in (("part map", maps[0]), ("object map", object_map)):
                found = generator.generator.generate(scene.image, coarse_map=coarse)
                for name, (config, kind, bound) in rules.items():
                    matching.match_masks = bounded(plain_match, kind, bound) if kind else plain_match
                    result = generator.with_settings(matching=config).choose(scene.image, probs[0], coarse, found)
                    hits[(name, map_name)].append(box_iou_inclusive(result.box_xyxy, scene.box_xyxy)[0, 0] >= 0.5)
                    inter = (result.mask & scene.object_mask).sum()
                    mask_iou[(name, map_name)].append(inter / (result.mask | scene.object_mask).sum())
    finally:
        matching.match_masks = plain_match
    table = [
        {
            "rule": name,
            "part_map_gt_known": 100 * float(np.mean(hits[(name, "part map")])),
            "object_map_gt_known": 100 * float(np.mean(hits[(name, "object map")])),
            "part_map_mIoU": 100 * float(np.mean(mask_iou[(name, "part map")])),
            "object_map_mIoU": 100 * float(np.mean(mask_iou[(name, "object map")])),
        }
        for name in rules
    ]
    print(f"{args.split}, {args.images} scenes of seed {shipped.SYNTHETIC_SEED}, {time.perf_counter() - start:.0f} s")
    print(f"{'rule':34s} {'part map':>9s} {'object map':>11s}   (GT-known Loc; mask mIoU)")
    for row in table:
        print(f"{row['rule']:34s} {row['part_map_gt_known']:9.1f} {row['object_map_gt_known']:11.1f}   "
              f"({row['part_map_mIoU']:.1f}; {row['object_map_mIoU']:.1f})")  # fmt: skip
    if args.output:
        args.output.write_text(json.dumps({"split": args.split, "images": args.images, "table": table}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
