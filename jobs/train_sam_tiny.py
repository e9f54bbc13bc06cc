"""Entry point for training SAM-tiny on synthetic scenes (stands in for the official SAM weights).

    python jobs/train_sam_tiny.py --output models/sam_tiny.pth --steps 4000 --batch-size 16 --num-workers 8

Writes the state dict (loadable by ``build_sam("tiny", path, verify=False)``) and a JSON record
beside it with this exact command and the seed. See :mod:`pro2sam.sam_training`.
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
