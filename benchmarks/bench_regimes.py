"""Both regimes of the synthetic world side by side, in one run (issue 20 item 5).

    OMP_NUM_THREADS=1 python benchmarks/bench_regimes.py --workdir /tmp/pro2sam-regimes --threads 1

Trains nothing and chooses nothing: it scores what the package ships, in each regime of the
synthetic world (:data:`pro2sam.synthetic.REGIMES`; seed ``pro2sam.shipped.SYNTHETIC_SEED``, whose
``val`` and ``test`` splits no model saw), with the GTFormer shipped for the regime and the shipped
SAM, at 16x16 grid points (the grid the shipped SAM's filters and settings were chosen at):

- **GTFormer-only**: the coarse map's box and mask, its CAM threshold chosen on ``val``;
- **authors' rule**: Pro2SAM with plain IoU matching (METHOD.md §3's reference) at the SAM
  variant's own filters;
- **package defaults**: ``CandidateConfig.for_variant(...)`` and ``MatchConfig()``, what
  ``pro2sam label`` does without ``--settings`` (METHOD.md §3: must not lose more than 1 point of
  GT-known Loc to the authors' rule in any regime);
- **tuned**: the settings ``pro2sam tune`` chose on the regime's ``val`` split
  (``--settings shipped`` for the part regime, ``pro2sam/shipped/settings_synthetic_object.json``
  for the object regime; what ``pro2sam demo --regime R`` uses).

On ``test`` (percent): Top-1 Loc, GT-known Loc, box accuracy (GTFormer: MaxBoxAccV2, the max over
tau on test, and BoxAccV2 at the tau chosen on val; Pro2SAM: its single box, BoxAccV2 at IoU
30/50/70), mask mIoU, "part held" (share of images whose mask holds at least half of the class
part's pixels), the fallback rate, and images gained / lost against the authors' rule. Each
method's ``val`` rows are labeled too: the report's thresholds and confidence are fitted there.
Writes ``regimes.json`` and ``regimes.md`` under ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quality import _fmt, _gained_lost, gtformer_outputs, label_with_settings, part_held  # noqa: E402

GRID = 16


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, required=True, help="data sets, results")
    p.add_argument("--num-val", type=int, default=200, help="held-out images per regime (thresholds, calibration)")
    p.add_argument("--num-test", type=int, default=500, help="test images per regime (the numbers reported)")
    p.add_argument("--regimes", nargs="+", default=["part", "object"], help="regimes to run (default: %(default)s)")
    p.add_argument("--seed", type=int, help="data seed (default: the shipped models' seed; another for a seed used for no choice)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--sam-checkpoint", help="weights of the 'synthetic' SAM variant (default: the SAM shipped for each regime)")
    p.add_argument("--settings", nargs="+", default=[], metavar="REGIME=FILE",
                   help="the tuned settings of a regime (default: the package's shipped settings of each regime)")
    args = p.parse_args(argv)
    settings_files = {}
    for item in args.settings:
        regime, sep, file = item.partition("=")
        if not sep or not file:
            p.error(f"--settings {item!r}: expected REGIME=FILE")
        settings_files[regime] = file

    import torch

    from pro2sam import shipped
    from pro2sam.candidates import CandidateConfig
    from pro2sam.datasets import open_dataset
    from pro2sam.evaluation import evaluate_predictions, evaluate_with_heldout
    from pro2sam.matching import MatchConfig
    from pro2sam.model import Pro2SAM
    from pro2sam.report import BOX_ACCURACY
    from pro2sam.synthetic import write_wsol_dataset
    from pro2sam.tuning import load_settings

    if args.threads:
        torch.set_num_threads(args.threads)
    seed = shipped.SYNTHETIC_SEED if args.seed is None else args.seed
    record: dict = {
        "command": " ".join(["python", *sys.argv]),
        "platform": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "seed": seed,
        "grid": GRID,
        "regimes": {},
    }
    lines = [
        f"Synthetic world, seed {seed}, {args.num_test} test images per regime ({args.num_val} val images for the "
        f"thresholds and calibration), grid {GRID}x{GRID}, "
        f"{'SAM ' + args.sam_checkpoint if args.sam_checkpoint else 'the SAM shipped for each regime'} and each regime's shipped GTFormer.",
        "",
    ]
    for regime in args.regimes:
        start = time.perf_counter()
        data = write_wsol_dataset(
            args.workdir / regime / "data", num_train=0, num_val=args.num_val, num_test=args.num_test, seed=seed, regime=regime
        )
        heldout, test = open_dataset(data.spec("val")), open_dataset(data.spec("test"))
        sam_checkpoint = args.sam_checkpoint or shipped.sam_checkpoint(regime)
        settings_file = settings_files.get(regime) or str(shipped.settings_file(regime))
        model = Pro2SAM.from_checkpoints(shipped.gtformer_dir(regime), sam=shipped.SAM_VARIANT, sam_checkpoint=sam_checkpoint)
        tuned = load_settings(settings_file)
        variant_candidates = CandidateConfig.for_variant(shipped.SAM_VARIANT, points_per_side=GRID)
        methods = {
            "authors' rule": (variant_candidates, MatchConfig(part_to_object=False)),
            "package defaults": (variant_candidates, MatchConfig()),
            "tuned": (
                CandidateConfig.for_variant(shipped.SAM_VARIANT, **{**tuned.candidates, "points_per_side": GRID}),
                MatchConfig(**tuned.matching),
            ),
        }

        outputs = gtformer_outputs(model, (heldout, test))
        # SAM once per image and candidate setting; each method's matching on those candidates.
        by_candidates: dict[CandidateConfig, dict[str, MatchConfig]] = {}
        for name, (cands, match) in methods.items():
            by_candidates.setdefault(cands, {})[name] = match
        rows: dict[str, dict[str, list[dict]]] = {name: {} for name in methods}
        for cands, matchings in by_candidates.items():
            for split_name, split in (("val", heldout), ("test", test)):
                labelled, _ = label_with_settings(model, outputs, split.samples, cands, matchings)
                for name, split_rows in labelled.items():
                    rows[name][split_name] = split_rows

        reports = {name: evaluate_with_heldout(heldout, r["val"], test, r["test"]) for name, r in rows.items()}
        gt = reports["authors' rule"].results["GTFormer"]
        authors_images = evaluate_predictions(test, rows["authors' rule"]["test"]).images
        cam_threshold = reports["authors' rule"].thresholds.cam_threshold
        table = [{
            "method": f"GTFormer-only (CAM threshold {cam_threshold:.2f}, chosen on val)",
            "top1_loc": gt.get("top1_loc"), "gt_known_loc": gt.get("gt_known_loc"), "MaxBoxAccV2": gt.get("MaxBoxAccV2"),
            "box_accuracy": gt.get(BOX_ACCURACY["GTFormer"]), "mIoU": gt.get("mIoU"), "part_held": None,
            "fallback_rate": None, "gained": None, "lost": None,
        }]  # fmt: skip
        for name, report in reports.items():
            pro = report.results["Pro2SAM"]
            vs_authors = _gained_lost(authors_images, report.images)  # GT-known: box IoU >= 0.5
            cands, match = methods[name]
            table.append({
                "method": f"Pro2SAM, {name}",
                "settings": {"pred_iou_thresh": cands.pred_iou_thresh, "stability_score_thresh": cands.stability_score_thresh,
                             "prune_with_coarse_map": cands.prune_with_coarse_map, "part_to_object": match.part_to_object,
                             "agreement": match.agreement, "containment": match.containment,
                             "container_to_object": match.container_to_object, "object_mass": match.object_mass,
                             "support_contrast": match.support_contrast, "fallback_threshold": match.fallback_threshold},
                "top1_loc": pro.get("top1_loc"), "gt_known_loc": pro.get("gt_known_loc"), "MaxBoxAccV2": None,
                "box_accuracy": pro.get(BOX_ACCURACY["Pro2SAM"]), "mIoU": pro.get("mIoU"),
                "part_held": part_held(rows[name]["test"], seed, "test", regime),
                "fallback_rate": pro.get("fallback_rate"), **vs_authors,
            })  # fmt: skip
        seconds = time.perf_counter() - start
        record["regimes"][regime] = {"table": table, "seconds": seconds, "tuned_settings": settings_file,
                                     "sam_checkpoint": str(sam_checkpoint)}
        lines += [
            f"**{regime} regime** ({seconds:.0f} s)",
            "",
            "| method | Top-1 Loc | GT-known Loc | MaxBoxAccV2 | BoxAccV2 (GTFormer: at val's tau; Pro2SAM: its box) "
            "| mIoU | part held | fallback | vs authors' rule |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in table:
            vs = "-" if r["gained"] is None else f"+{r['gained']} / -{r['lost']}"
            fallback = "-" if r["fallback_rate"] is None else f"{r['fallback_rate']:.1f} %"
            lines.append(
                f"| {r['method']} | {_fmt(r['top1_loc'])} | {_fmt(r['gt_known_loc'])} | {_fmt(r['MaxBoxAccV2'])} | "
                f"{_fmt(r['box_accuracy'])} | {_fmt(r['mIoU'])} | {_fmt(r['part_held'])} | {fallback} | {vs} |"
            )
        lines.append("")
        print("\n".join(lines[-len(table) - 6 :]), flush=True)

    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "regimes.md").write_text("\n".join(lines) + "\n")
    (args.workdir / "regimes.json").write_text(json.dumps(record, indent=2, default=float) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
