"""Entry point for `ray job submit -- python jobs/evaluate.py --test ... --heldout ... --output ...`.

Same options as `pro2sam evaluate`; on a cluster it joins the cluster Ray job submission set up.
"""

import sys

from pro2sam.pipeline.evaluate_job import main

if __name__ == "__main__":
    sys.exit(main())
