"""How good can the chosen mask be with the shipped SAM? The best candidate of each image, by its truth.

    OMP_NUM_THREADS=1 python benchmarks/bench_mask_bound.py --split test --images 500

Trains nothing and chooses nothing. For each scene of the synthetic world (seed
``pro2sam.shipped.SYNTHETIC_SEED``, ``--regime``) the shipped models give candidates under the
shipped settings of the regime (``--settings``, default ``shipped``), and this reports, against
the scene's own masks:

- **chosen**: what the settings' matching picks (the coarse-map fallback where nothing is
  chosen), as ``pro2sam label`` stores it: mask IoU with the object, GT-known (box IoU >= 0.5),
  part held (the mask holds at least half of the class part's pixels);
- **oracle**: the candidate with the best mask IoU with the object (the fallback's mask where
  there is no candidate): the ceiling of any rule that picks one candidate, in mIoU;
- how often some candidate holds the object (mask IoU >= 0.7), holds the part, and how often
  the candidates that hold the object leave the part out.

A matching rule cannot lift the mIoU above the oracle's; where the oracle is below a target the
candidates (SAM, its filters, its training) must change, not matching.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", choices=["val", "test"], default="val")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--regime", default="part")
    p.add_argument("--settings", default="shipped", help="settings file (default: the shipped one of --regime)")
    p.add_argument("--output", type=Path, help="write the numbers as JSON here")
    args = p.parse_args(argv)

    import torch

    from pro2sam import shipped
    from pro2sam.candidates import CandidateConfig
    from pro2sam.matching import MatchConfig, boxed_mask
    from pro2sam.metrics import box_iou_inclusive
    from pro2sam.model import Pro2SAM
    from pro2sam.synthetic import make_scene
    from pro2sam.tuning import load_settings

    torch.set_num_threads(1)
    settings = load_settings(str(shipped.settings_file(args.regime)) if args.settings == "shipped" else args.settings)
    model = Pro2SAM.from_checkpoints(
        shipped.gtformer_dir(args.regime), sam=shipped.SAM_VARIANT, sam_checkpoint=shipped.sam_checkpoint(args.regime)
    ).with_settings(
        candidates=CandidateConfig.for_variant(shipped.SAM_VARIANT, **settings.candidates),
        matching=MatchConfig(**settings.matching),
    )
    chosen_iou, chosen_hit, chosen_held, oracle_iou = [], [], [], []
    has_object, has_part, object_without_part = [], [], []
    start = time.perf_counter()
    for i in range(args.images):
        scene = make_scene(shipped.SYNTHETIC_SEED, args.split, i, regime=args.regime)
        obj, part = scene.object_mask, scene.part_mask
        probs, maps = model.classify([scene.image])
        found = model.generator.generate(scene.image, coarse_map=maps[0])
        result = model.choose(scene.image, probs[0], maps[0], found)

        def iou(mask: np.ndarray) -> float:
            return float((mask & obj).sum() / (mask | obj).sum())

        def holds_part(mask: np.ndarray) -> bool:
            return bool((mask & part).sum() >= 0.5 * part.sum())

        chosen_iou.append(iou(result.mask))
        chosen_hit.append(box_iou_inclusive(result.box_xyxy, scene.box_xyxy)[0, 0] >= 0.5)
        chosen_held.append(holds_part(result.mask))
        boxed = [boxed_mask(found.full_resolution_mask(j)) for j in range(len(found))]
        masks = [b[0] for b in boxed if b is not None]  # a mask can vanish at full resolution
        ious = [iou(m) for m in masks]
        oracle_iou.append(max(ious) if ious else chosen_iou[-1])
        objects = [m for m, v in zip(masks, ious) if v >= 0.7]
        has_object.append(bool(objects))
        has_part.append(any(holds_part(m) for m in masks))
        object_without_part.append(bool(objects) and not any(holds_part(m) for m in objects))
    pct = lambda v: round(100.0 * float(np.mean(v)), 1)  # noqa: E731
    numbers = {
        "split": args.split,
        "images": args.images,
        "regime": args.regime,
        "settings": settings.source,
        "chosen_mIoU": pct(chosen_iou),
        "chosen_gt_known_loc": pct(chosen_hit),
        "chosen_part_held": pct(chosen_held),
        "oracle_mIoU": pct(oracle_iou),
        "some_candidate_is_the_object": pct(has_object),
        "some_candidate_holds_the_part": pct(has_part),
        "object_candidates_all_leave_the_part_out": pct(object_without_part),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(numbers, indent=1))
    if args.output:
        args.output.write_text(json.dumps(numbers, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
