"""``python -m pbe``: the same as the ``pbe`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    status = main()
    # CPython (3.8+) ends a `python -m` run by killing itself with SIGINT, whatever the exit status, when a
    # KeyboardInterrupt once escaped code run from source text (exec/eval: dataclasses and namedtuples are made so),
    # even though it was caught later: a Ctrl-C or SIGTERM that lands while a module is being imported. `main` caught
    # it and returns 130; running source text that does not raise clears CPython's mark, so 130 is the exit status.
    exec("pass")
    sys.exit(status)
