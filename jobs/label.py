"""Entry point for `ray job submit -- python jobs/label.py --input ... --output ...`.

Same options as `pro2sam label`; on a cluster it joins the cluster Ray job submission set up.
"""

import sys

from pro2sam.pipeline.label_job import main

if __name__ == "__main__":
    sys.exit(main())
