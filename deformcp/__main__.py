"""``python -m deformcp``: the self-check (:mod:`deformcp.selfcheck`)."""

import sys

from .selfcheck import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
