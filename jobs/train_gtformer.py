"""Entry point for `ray job submit -- python jobs/train_gtformer.py --data ... --output ...`.

The same options as `pro2sam train`; on a cluster it joins the Ray that job submission set up.
Started again with the same --output (and --storage-path / --run-name), it resumes from the run's
last checkpoint.
"""

import sys

from pro2sam.apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
