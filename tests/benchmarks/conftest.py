import sys
from pathlib import Path

# The harness lives beside the package in the source tree and is not installed: make it
# importable. Appended, so that an installed jax_sparsek still wins over the source tree's.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)
