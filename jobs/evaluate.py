"""Entry point for `ray job submit -- python jobs/evaluate.py --test ... --heldout ... --output ...`.

The same options as `pro2sam evaluate`; on a cluster it joins the Ray that job submission set up.
"""

import sys

from pro2sam.apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
