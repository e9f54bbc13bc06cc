"""Entry point for training a small SAM on synthetic scenes (stands in for the official SAM weights).

The shipped SAM (``pro2sam/models/sam_synthetic.pth``, 18 minutes on 2 CPU cores) came from:

    python jobs/train_sam_tiny.py --variant synthetic --output pro2sam/models/sam_synthetic.pth \
        --steps 700 --batch-size 16 --prompts-per-image 4 --lr 1.5e-3 --loss-size 128 \
        --scene-pool 2000 --num-workers 0 --seed 0 --log-every 25 --checkpoint-every 100

Writes the state dict (loadable by ``build_sam(VARIANT, path)``) and a JSON record beside it
with this exact command and the seed. On a GPU or with more cores, ``--num-workers`` generates
scenes in parallel. See :mod:`pro2sam.sam_training`.
"""

import argparse
import sys

from pro2sam.sam_training import add_sam_training_arguments, run_sam_training


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train SAM-tiny class-agnostically on synthetic scenes.")
    add_sam_training_arguments(parser)
    args = parser.parse_args(argv)
    return run_sam_training(args, argv=sys.argv if argv is None else [__file__, *argv])


if __name__ == "__main__":
    sys.exit(main())
