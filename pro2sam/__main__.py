"""``python -m pro2sam ...`` is the ``pro2sam`` command."""

import sys

from pro2sam.apps.cli import main

sys.exit(main())
