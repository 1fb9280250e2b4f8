"""``python -m lens_safety``: the same command line as ``lens-safety`` (see :mod:`lens_safety.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
