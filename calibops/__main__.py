"""``python -m calibops``: the command line (:mod:`calibops.cli`)."""

import sys

from calibops.cli import main

if __name__ == "__main__":
    sys.exit(main())
