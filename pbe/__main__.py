"""``python -m pbe``: the same as the ``pbe`` command."""

import sys

from .cli import main

sys.exit(main())
