"""The ``pro2sam`` command: a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from .candidates import CandidateConfig

    defaults = CandidateConfig()
    p.add_argument("--gtformer", required=True, help="GTFormer export: directory with model.safetensors + config.json; "
                   "'shipped': the model in the package")  # fmt: skip
    p.add_argument("--sam", default="vit_h", help="SAM variant: vit_h, vit_l, vit_b, synthetic or tiny (default vit_h)")
    p.add_argument("--sam-checkpoint", help="SAM weights file (official sam_vit_*.pth, checked by SHA-256); "
                   "default for --sam synthetic: the shipped one")  # fmt: skip
    p.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of official SAM files")
    p.add_argument("--mode", choices=("fast", "exact"), default=defaults.mode, help="candidate path (default %(default)s)")
    p.add_argument("--points-per-side", type=int, default=defaults.points_per_side, help="grid is N x N (default %(default)s)")
    p.add_argument("--prune", action="store_true", help="drop grid points outside the dilated coarse foreground")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def _load_model(args: argparse.Namespace):
    from .candidates import CandidateConfig
    from .model import Pro2SAM
    from .shipped import resolve_model_options

    gtformer, sam, sam_checkpoint = resolve_model_options(args.gtformer, args.sam, args.sam_checkpoint)
    candidates = CandidateConfig.for_variant(
        sam, mode=args.mode, points_per_side=args.points_per_side, prune_with_coarse_map=args.prune
    )
    return Pro2SAM.from_checkpoints(
        gtformer,
        sam=sam,
        sam_checkpoint=sam_checkpoint,
        verify=not args.no_verify,
        device=args.device,
        candidates=candidates,
    )


def _finite(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def result_record(path: str, result) -> dict:
    """One image's result as a JSON-serialisable dict (mask as COCO RLE)."""
    from .rle import encode_mask

    h, w = result.image_size
    return {
        "path": path,
        "status": "ok",
        "error": None,
        "width": w,
        "height": h,
        "box_xyxy": list(result.box_xyxy),
        "box_source": result.box_source,
        "mask_rle": encode_mask(result.mask),
        "mask_area": int(result.mask.sum()),
        "topk_classes": result.topk_classes,
        "topk_names": result.topk_names,
        "topk_scores": result.topk_scores,
        "match_score": _finite(result.match_score),
        "pred_iou": _finite(result.pred_iou),
        "stability_score": _finite(result.stability_score),
        "num_candidates": result.num_candidates,
    }


def predict_files(model, paths: list[str], out) -> tuple[int, int]:
    """Run the model on image files, writing one JSON line per file; bad files become error lines."""
    from .images import ImageDecodeError, to_rgb_array

    ok = failed = 0
    for path in paths:
        try:
            image = to_rgb_array(path)
        except (ImageDecodeError, OSError) as e:
            out.write(json.dumps({"path": path, "status": "error", "error": str(e)}) + "\n")
            failed += 1
            continue
        (result,) = model.predict([image])
        out.write(json.dumps(result_record(path, result)) + "\n")
        out.flush()
        ok += 1
    return ok, failed


def cmd_predict(args: argparse.Namespace) -> int:
    model = _load_model(args)
    start = time.perf_counter()
    out = open(args.output, "w") if args.output != "-" else sys.stdout
    try:
        ok, failed = predict_files(model, args.images, out)
    finally:
        if out is not sys.stdout:
            out.close()
    seconds = time.perf_counter() - start
    print(f"{ok} ok, {failed} error, {seconds:.1f} s -> {args.output}", file=sys.stderr)
    return 0 if ok or not failed else 1


def cmd_example(args: argparse.Namespace) -> int:
    from .example import run_example

    run_example(Path(args.workdir), points_per_side=args.points_per_side)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import logging

    from .demo import run_demo

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_demo(
        args.workdir,
        num_test=args.num_test,
        num_val=args.num_val,
        points_per_side=args.points_per_side,
        seed=args.seed,
        gtformer=args.gtformer,
        sam=args.sam,
        sam_checkpoint=args.sam_checkpoint,
        ray_address=args.ray_address,
        gallery_limit=args.gallery_limit,
    )
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from .labels import describe_schema

    print(describe_schema())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pro2sam", description="Pro2SAM: image-level labels to boxes and masks.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="label image files with a GTFormer + SAM pair, one JSON line per image")
    _add_model_args(p)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--output", "-o", default="-", help="JSON-lines output file (default stdout)")
    p.set_defaults(func=cmd_predict)

    from .pipeline.label_job import add_label_arguments, run_from_args

    p = sub.add_parser("label", help="the labeling job: images in object storage -> Parquet (Ray Data)")
    add_label_arguments(p)
    p.set_defaults(func=run_from_args)

    from .pipeline.train_job import add_train_arguments
    from .pipeline.train_job import run_from_args as run_train

    p = sub.add_parser("train", help="train GTFormer on image-level labels (Ray Train, DDP), export a checkpoint")
    add_train_arguments(p)
    p.set_defaults(func=run_train)

    from .pipeline.evaluate_job import add_evaluate_arguments
    from .pipeline.evaluate_job import run_from_args as run_evaluate

    p = sub.add_parser("evaluate", help="label a held-out and a test split (Ray Data), score GTFormer-only and Pro2SAM")
    add_evaluate_arguments(p)
    p.set_defaults(func=run_evaluate)

    from .export import add_export_arguments, run_export
    from .gallery import add_show_arguments, run_show

    p = sub.add_parser("export", help="labels table -> COCO JSON or YOLO labels")
    add_export_arguments(p)
    p.set_defaults(func=run_export)

    p = sub.add_parser("show", help="labels table -> self-contained HTML gallery of overlays")
    add_show_arguments(p)
    p.set_defaults(func=run_show)

    from .synthetic import add_synthetic_arguments, run_synthetic

    p = sub.add_parser("synthetic", help="write a synthetic WSOL data set (wsolevaluation layout), deterministic by seed")
    add_synthetic_arguments(p)
    p.set_defaults(func=run_synthetic)

    p = sub.add_parser("schema", help="print the labels table's Parquet schema")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser(
        "example",
        help="the labeling job on a local Ray over generated images with tiny random-weight models "
        "(checks the install end to end; the boxes are not meaningful)",
    )
    p.add_argument("--workdir", default="pro2sam-example", help="where checkpoints, images and results go")
    p.add_argument("--points-per-side", type=int, default=16)
    p.set_defaults(func=cmd_example)

    from . import demo
    from .shipped import SYNTHETIC_SEED

    p = sub.add_parser(
        "demo",
        help="offline end to end: the shipped models on generated synthetic scenes; labeling job on a local Ray, "
        "report of GTFormer-only vs Pro2SAM, HTML gallery with coarse maps",
    )
    p.add_argument("--workdir", default="pro2sam-demo", help="where the data, labels, report and demo.html go")
    p.add_argument("--num-test", type=int, default=demo.DEFAULT_NUM_TEST, help="test images (default %(default)s)")
    p.add_argument("--num-val", type=int, default=demo.DEFAULT_NUM_VAL, help="held-out images (default %(default)s)")
    p.add_argument(
        "--points-per-side", type=int, default=demo.DEFAULT_POINTS_PER_SIDE, help="SAM grid N x N (default %(default)s)"
    )
    p.add_argument("--seed", type=int, default=SYNTHETIC_SEED, help="synthetic data set seed (default %(default)s)")
    p.add_argument(
        "--gallery-limit", type=int, default=demo.DEFAULT_GALLERY_LIMIT, help="images in demo.html (default %(default)s)"
    )
    p.add_argument("--gtformer", help="GTFormer export folder (default: the shipped model)")
    p.add_argument("--sam", help="SAM variant (default: the shipped 'synthetic' SAM)")
    p.add_argument("--sam-checkpoint", help="SAM weights file (default: the shipped one, with the default --sam)")
    p.add_argument("--ray-address", help="Ray cluster address (default $RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .checkpoints import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"pro2sam: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
