"""``python -m deformcp``: the self-check; ``python -m deformcp bench``: the comparison with the peers."""

import sys


def _main(argv):
    if argv[:1] == ["bench"]:
        from .comparison.cli import main

        return main(argv[1:])
    from .selfcheck import main

    return main(argv)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
