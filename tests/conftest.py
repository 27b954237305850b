import os
import sys

# Tests import their shared helpers (cases.py, ...) as top-level modules.
sys.path.insert(0, os.path.dirname(__file__))
