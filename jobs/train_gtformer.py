"""Entry point for `ray job submit -- python jobs/train_gtformer.py --data ... --output ...`.

Same options as `pro2sam train`; on a cluster it joins the cluster Ray job submission set up.
Started again with the same --output (and --storage-path / --run-name), it resumes from the
run's last checkpoint.
"""

import sys

from pro2sam.pipeline.train_job import main

if __name__ == "__main__":
    sys.exit(main())
