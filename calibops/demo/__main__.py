"""``python -m calibops.demo`` runs the demo (same as ``python -m calibops demo``)."""

import sys

from ._cli import demo_main

sys.exit(demo_main())
