"""Does SAM's grid emit the object alone, and the object with its support (a container)?

    python benchmarks/bench_regime_candidates.py --num-images 50 --regime object

Trains nothing, needs no GTFormer. For each synthetic scene of ``--regime`` (the ``val`` stream
of ``--seed``) the shipped SAM (:mod:`pro2sam.shipped`, or ``--sam-checkpoint``) prompted by the full grid (no pruning:
this measures SAM, not the coarse map) gives its kept candidates, at its shipped filter
thresholds and with the filters off. Each candidate's full-resolution mask is compared with the
scene's ground truth:

- **object**: some candidate has mask IoU >= ``--object-iou`` (0.7) with the object mask;
- **container**: some candidate holds >= ``--contain`` (0.9) of the object's pixels and is at
  least ``--growth`` (1.5) times the object's area: what an unbounded part-to-object climb takes;
- **object + support**: some container has IoU >= 0.5 with object | support (it is the object on
  its support, not the whole frame); object regime only.

Prints and writes (``--json``) the shares of images, percent, and the candidate counts.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-images", type=int, default=50)
    p.add_argument("--regime", default="object")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--points-per-side", type=int, default=16)
    p.add_argument("--object-iou", type=float, default=0.7)
    p.add_argument("--contain", type=float, default=0.9)
    p.add_argument("--growth", type=float, default=1.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the numbers here")
    p.add_argument("--sam-checkpoint", help="weights of the 'synthetic' SAM variant (default: the SAM shipped for --regime)")
    args = p.parse_args(argv)

    import torch

    from pro2sam import shipped
    from pro2sam.candidates import CandidateConfig, GridCandidateGenerator
    from pro2sam.sam import build_sam
    from pro2sam.synthetic import make_scene

    torch.set_num_threads(args.threads)
    checkpoint = args.sam_checkpoint or shipped.sam_checkpoint(args.regime)
    sam = build_sam(shipped.SAM_VARIANT, checkpoint, verify=not args.sam_checkpoint)
    settings = {
        "shipped filters": CandidateConfig.for_variant(shipped.SAM_VARIANT, points_per_side=args.points_per_side,
                                                       prune_with_coarse_map=False),  # fmt: skip
        "filters off": CandidateConfig(points_per_side=args.points_per_side, prune_with_coarse_map=False,
                                       pred_iou_thresh=0.0, stability_score_thresh=0.0),  # fmt: skip
    }
    generators = {name: GridCandidateGenerator(sam, config) for name, config in settings.items()}
    hits = {name: {"object": 0, "container": 0, "object_and_support": 0, "candidates": 0} for name in settings}
    start = time.perf_counter()
    for i in range(args.num_images):
        scene = make_scene(args.seed, "val", i, regime=args.regime)
        obj = scene.object_mask
        whole = obj | (scene.support_mask if scene.support_mask is not None else False)
        for name, generator in generators.items():
            found = generator.generate(scene.image)
            masks = [found.full_resolution_mask(k) for k in range(len(found))]
            containers = [m for m in masks if (m & obj).sum() >= args.contain * obj.sum() and m.sum() >= args.growth * obj.sum()]
            h = hits[name]
            h["candidates"] += len(masks)
            h["object"] += any(_iou(m, obj) >= args.object_iou for m in masks)
            h["container"] += bool(containers)
            h["object_and_support"] += any(_iou(m, whole) >= 0.5 for m in containers) and scene.support_mask.any()
    seconds = time.perf_counter() - start
    n = args.num_images
    out = {
        "regime": args.regime, "seed": args.seed, "sam_checkpoint": str(checkpoint), "images": n, "points_per_side": args.points_per_side,
        "object_iou": args.object_iou, "contain": args.contain, "growth": args.growth, "seconds": seconds,
        "results": {
            name: {"object_pct": 100 * h["object"] / n, "container_pct": 100 * h["container"] / n,
                   "object_and_support_pct": 100 * h["object_and_support"] / n,
                   "candidates_per_image": h["candidates"] / n}
            for name, h in hits.items()
        },
    }  # fmt: skip
    for name, r in out["results"].items():
        print(
            f"{args.regime} regime, {name}: {n} images, {r['candidates_per_image']:.1f} candidates/image; "
            f"object (IoU >= {args.object_iou}) {r['object_pct']:.0f}%, container (holds >= {args.contain:.0%} of the "
            f"object, >= {args.growth}x its area) {r['container_pct']:.0f}%, object + support (container with IoU >= 0.5 "
            f"against object | support) {r['object_and_support_pct']:.0f}%"
        )
    print(f"{seconds:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
