"""``python -m benchmarks.compare`` (from a clone of the repository): see :mod:`benchmarks.compare.cli`."""

import sys

from .cli import main

# Guarded: asv imports every module under benchmarks/ (this one too) when it looks for benchmarks.
if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
