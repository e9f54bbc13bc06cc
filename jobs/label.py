"""Entry point for `ray job submit -- python jobs/label.py --input ... --output ...`.

The same options as `pro2sam label`; on a cluster it joins the Ray that job submission set up.
"""

import sys

from pro2sam.apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
