"""Train a small SAM on synthetic scenes, class-agnostically (stands in for the official SAM weights).

No Ray: one process, its DataLoader workers generate the scenes. The shipped SAM
(``pro2sam/shipped/sam_synthetic.pth``, 18 minutes on 2 CPU cores) came from these options:

    python scripts/train_sam_synthetic.py --variant synthetic --output pro2sam/shipped/sam_synthetic.pth \
        --steps 700 --batch-size 16 --prompts-per-image 4 --lr 1.5e-3 --loss-size 128 \
        --scene-pool 2000 --num-workers 0 --seed 0 --log-every 25 --checkpoint-every 100

Writes the state dict (loadable by ``build_sam(VARIANT, path)``) and a JSON record beside it
with this exact command and the seed. See :mod:`pro2sam.train.sam`.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from pro2sam.sam import SAM_VARIANTS, SamVariant
from pro2sam.synthetic import REGIMES
from pro2sam.train.sam import SamTrainConfig, train_sam


def build_parser() -> argparse.ArgumentParser:
    d = SamTrainConfig()
    p = argparse.ArgumentParser(description="Train a small SAM class-agnostically on synthetic scenes.")
    p.add_argument("--output", required=True, help="weights file, .pth or .safetensors (a .json record goes beside it)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step (default %(default)s)")
    p.add_argument("--prompts-per-image", type=int, default=d.prompts_per_image)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=None, help="default min(250, steps // 10)")
    p.add_argument("--min-size", type=int, default=d.size_range[0], help="smallest scene side, px")
    p.add_argument("--max-size", type=int, default=d.size_range[1], help="largest scene side, px")
    p.add_argument("--scene-pool", type=int, default=None, help="reuse the first N scenes (default: fresh scenes)")
    p.add_argument("--num-workers", type=int, default=d.num_workers, help="scene-generating DataLoader workers")
    p.add_argument("--eval-scenes", type=int, default=d.eval_scenes)
    p.add_argument("--loss-size", type=int, default=None, help="side of the loss frame (default: the input side, as SAM)")
    p.add_argument("--variant", default=d.variant, choices=sorted(k for k, v in SAM_VARIANTS.items() if isinstance(v, SamVariant)), help="SAM architecture (default %(default)s)")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--regimes", nargs="+", choices=REGIMES, default=list(d.regimes),
                   help="synthetic regimes the scenes are drawn from, in turn (default %(default)s)")  # fmt: skip
    p.add_argument("--init", default=None, help="start from these weights of the same variant (fine-tuning; default: from scratch)")
    p.add_argument("--device", default=None, help="default cuda if available")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = ["python", *(sys.argv if argv is None else [__file__, *argv])]
    record = train_sam(
        args.output,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        command=shlex.join(command),
        checkpoint_every=args.checkpoint_every,
        prompts_per_image=args.prompts_per_image,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        size_range=(args.min_size, args.max_size),
        scene_pool=args.scene_pool,
        num_workers=args.num_workers,
        eval_scenes=args.eval_scenes,
        log_every=args.log_every,
        loss_size=args.loss_size,
        variant=args.variant,
        regimes=tuple(args.regimes),
        init_from=args.init,
    )
    held_out = record.get("held_out")
    if held_out:
        print(f"held-out: best-of-3 IoU {held_out['best_iou']:.3f}, top-ranked IoU {held_out['top_iou']:.3f}")
    print(f"-> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
