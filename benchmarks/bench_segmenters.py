"""Two or more promptable segmenters through our fast path, side by side on the same images.

Answers issue 21's CPU question, "is SAM 2.1 (tiny or small) at 32x32 faster per image than SAM
vit_b with our fast path?", in one process: the segmenters take turns on each image (after one
untimed warm-up image each), so load on a shared machine falls on all of them alike.

    OMP_NUM_THREADS=1 python benchmarks/bench_segmenters.py --sams vit_b sam2.1_hiera_tiny \
        --images 2 --threads 1 --points-per-side 32

Each segmenter runs as ``bench_speed.py``'s flow (c): ``GridCandidateGenerator`` in fast mode,
every grid point decoded (no pruning), then matching against a planted coarse map. Random weights
unless ``--checkpoint VARIANT=FILE`` (official files are checked by SHA-256): a random SAM v1
decoder is made coherent as ``bench_speed.py`` does, and the filters are off by default, so every
mask of every prompt is upscaled (the heavy end: with trained weights and their filters, only the
masks above the predicted-IoU threshold are). The images are ``bench_speed.py``'s generated scenes
(480x640, 512x512, ...): SAM v1 decodes only the embedding cells over the image (its input keeps
the aspect ratio, padded), SAM 2 all of them (its input is the image resized to a square).

Prints per segmenter: seconds per image (embed / decode / filter / match), decode ms per prompt,
and each one's time against the first's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_speed import IMAGE_SIZES, STAGES, Clock, describe_machine, make_scene, planted_coarse_map, run_ours  # noqa: E402

from pro2sam.candidates import CandidateConfig, GridCandidateGenerator  # noqa: E402
from pro2sam.matching import MatchConfig  # noqa: E402
from pro2sam.sam import SAM_VARIANTS, _make_random_masks_coherent, build_sam, is_sam2  # noqa: E402


def build(variant: str, checkpoint: str | None, device: torch.device) -> torch.nn.Module:
    """The model as our generator runs it (``build_sam``'s inference model: SDPA attention)."""
    sam = build_sam(variant, checkpoint, device=device, seed=0).requires_grad_(False)
    if checkpoint is None and not is_sam2(variant) and variant != "tiny":
        _make_random_masks_coherent(sam)  # as bench_speed.py does: masks follow image content
    return sam


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sams", nargs="+", required=True, choices=sorted(SAM_VARIANTS), help="segmenters; the first is the baseline")
    p.add_argument("--checkpoint", nargs="*", default=[], metavar="VARIANT=FILE", help="weights (default: random)")
    p.add_argument("--images", type=int, default=2, help="timed images (default %(default)s), after one warm-up")
    p.add_argument("--points-per-side", type=int, default=32)
    p.add_argument("--pred-iou-thresh", type=float, default=0.0, help="default 0: every mask upscaled")
    p.add_argument("--stability-score-thresh", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if len(set(args.sams)) != len(args.sams):
        p.error("--sams: each segmenter once")
    checkpoints = {}
    for item in args.checkpoint:
        variant, sep, file = item.partition("=")
        if not sep or variant not in args.sams:
            p.error(f"--checkpoint {item!r}: expected VARIANT=FILE with VARIANT among --sams")
        checkpoints[variant] = file
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = Clock(device)
    config = CandidateConfig(points_per_side=args.points_per_side, prune_with_coarse_map=False, mode="fast",
                             pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_score_thresh)  # fmt: skip
    generators = {v: GridCandidateGenerator(build(v, checkpoints.get(v), device), config) for v in args.sams}
    match_config = MatchConfig()
    scenes = [make_scene(*IMAGE_SIZES[i % len(IMAGE_SIZES)], seed=i) for i in range(args.images + 1)]
    print(describe_machine(device))
    print(f"{args.images} timed image(s) {[s[0].shape[:2] for s in scenes[1:]]} after one warm-up; grid "
          f"{args.points_per_side}x{args.points_per_side}, filters {args.pred_iou_thresh} / {args.stability_score_thresh}, "
          f"weights: " + ", ".join(f"{v} {checkpoints.get(v, 'random')}" for v in args.sams))
    totals = {v: {"total": 0.0, "prompts": 0, **dict.fromkeys(STAGES, 0.0)} for v in args.sams}
    for i, (image, mask) in enumerate(scenes):
        coarse = planted_coarse_map(mask)
        for variant, generator in generators.items():
            out = run_ours(generator, image, coarse, match_config, clock)
            print(f"  image {i}{' (warm-up)' if i == 0 else ''} {variant}: {out['total']:.1f} s "
                  f"(embed {out['times']['embed']:.1f}, decode {out['times']['decode']:.1f}), {out['candidates']} candidates",
                  flush=True)  # fmt: skip
            if i == 0:
                continue
            totals[variant]["total"] += out["total"]
            totals[variant]["prompts"] += out["prompts"]
            for k in STAGES:
                totals[variant][k] += out["times"][k]
    base = args.sams[0]
    print(f"\n| segmenter | s/image | embed | decode | filter | match | ms/prompt (decode) | vs {base} |")
    print("|---|---|---|---|---|---|---|---|")
    report = {}
    for variant, t in totals.items():
        n = args.images
        per = {k: t[k] / n for k in ("total", *STAGES)}
        per["decode_ms_per_prompt"] = 1000 * t["decode"] / max(1, t["prompts"])
        per["vs_base"] = totals[base]["total"] / t["total"]
        report[variant] = per
        print(f"| {variant} | {per['total']:.1f} | {per['embed']:.1f} | {per['decode']:.1f} | {per['filter']:.1f} | "
              f"{per['match']:.2f} | {per['decode_ms_per_prompt']:.1f} | {per['vs_base']:.2f}x |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
