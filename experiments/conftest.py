"""The studies' tests share the package's test helpers (tests/testing_utils.py)."""

import os
import sys


sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
