"""``python -m datasets``, run from the molscale checkout: the command line of molscale.datasets.cli."""

import importlib.util
import os
import sys
import types

if importlib.util.find_spec("molscale") is None:  # a checkout without `pip install -e .`: serve it from here
    sys.modules["molscale"] = types.ModuleType("molscale")
    sys.modules["molscale"].__path__ = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

from molscale.datasets.cli import main  # noqa: E402

sys.exit(main())
