"""Entry point for `ray job submit -- python jobs/tune.py --heldout ... --output settings.json ...`.

The same options as `pro2sam tune`; on a cluster it joins the Ray that job submission set up, and
its actors take the cluster's GPUs as the labeling job's do.
"""

import sys

from pro2sam.apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
