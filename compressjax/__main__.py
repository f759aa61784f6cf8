"""``python -m compressjax demo``: the same as the ``compressjax`` console script."""

import sys

from compressjax.cli import main

sys.exit(main())
