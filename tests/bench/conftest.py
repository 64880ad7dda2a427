"""bench/ is a folder of the repository, not an installed package: make it importable
under plain `pytest` too (`python -m pytest` already has the repository root on the path)."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
