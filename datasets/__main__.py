"""``python -m datasets``, run from the molscale checkout: the command line of molscale.datasets.cli."""

import sys

try:
    from molscale.datasets.cli import main
except ModuleNotFoundError as err:
    if err.name != "molscale":
        raise
    print("error: molscale is not installed in this Python; run `make install` (or `pip install -e .`) "
          "in the checkout first.", file=sys.stderr)
    sys.exit(2)  # bad setup, found before any work (datasets/errors.py: EXIT_BAD_INPUT)

sys.exit(main())
