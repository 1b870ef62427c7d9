import os
import sys

# Tests import their model builders as `models`; keep the tests folder importable.
sys.path.insert(0, os.path.dirname(__file__))
