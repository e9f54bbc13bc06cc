"""One matching threshold below (or beyond) the tuning grid, with everything else shipped.

    pro2sam synthetic --output /tmp/val --num-train 0 --num-val 200 --num-test 0 --seed 0
    OMP_NUM_THREADS=1 python benchmarks/bench_beyond_grid.py --data wsol:/tmp/val:/tmp/val:val
    # container-to-object's support contrast past 1 (and with no contrast asked), object regime
    OMP_NUM_THREADS=1 python benchmarks/bench_beyond_grid.py --data wsol:/tmp/oval:/tmp/oval:val \
        --regime object --field support_contrast --values 0.8 1 1.25 1.5 2 inf

Measures only (choose on val, never on test): the shipped GTFormer, SAM and settings of
``--regime``; SAM runs once per image with the settings' candidates, and only one ``MatchConfig``
field changes (``--field``: part-to-object's ``containment`` by default, ``agreement``, or
container-to-object's ``object_mass`` / ``support_contrast``; the settings' rule stays on). Prints
GT-known Loc, single-box BoxAccV2, mIoU and part held (the chosen mask holds at least half of the
class part) per value.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quality import gtformer_outputs, label_with_settings, part_held  # noqa: E402

from pro2sam.report import BOX_ACCURACY  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a wsol:META:DATA:SPLIT spec of a synthetic split (val)")
    p.add_argument("--regime", default="part", help="whose shipped models and settings (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the data set's seed (for part held; default %(default)s)")
    p.add_argument("--field", default="containment", choices=["containment", "agreement", "object_mass", "support_contrast"],
                   help="the MatchConfig field that changes (default %(default)s)")
    p.add_argument("--values", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.15, 0.2, 0.3])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from pro2sam import shipped
    from pro2sam.datasets import open_dataset
    from pro2sam.evaluation import evaluate_predictions
    from pro2sam.model import Pro2SAM
    from pro2sam.tuning import load_settings

    torch.set_num_threads(args.threads)
    tuned = load_settings(str(shipped.settings_file(args.regime)))
    model = Pro2SAM.from_checkpoints(
        shipped.gtformer_dir(args.regime), sam=shipped.SAM_VARIANT, sam_checkpoint=shipped.sam_checkpoint(args.regime)
    )
    split = open_dataset(args.data)
    outputs = gtformer_outputs(model, [split])
    matchings = {v: replace(tuned.match_config(), **{args.field: v}) for v in args.values}
    rows, seconds = label_with_settings(model, outputs, split.samples, tuned.candidate_config(shipped.SAM_VARIANT), matchings)
    print(f"{args.regime} regime, {len(split.samples)} images of {args.data}; shipped settings but {args.field}; {seconds:.2f} s/image")
    for v, r in rows.items():
        res = evaluate_predictions(split, r, methods=("Pro2SAM",)).results["Pro2SAM"]
        held = part_held(r, args.seed, split.split, args.regime)
        print(f"{args.field} {v:g}: GT-known Loc {res['gt_known_loc']:.1f}, BoxAccV2 {res[BOX_ACCURACY['Pro2SAM']]:.2f}, "
              f"mIoU {res['mIoU']:.1f}, part held {held:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
