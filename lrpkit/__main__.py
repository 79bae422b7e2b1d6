"""``python -m lrpkit``: the same as the ``lrpkit`` command."""

import sys

from .cli import main

sys.exit(main())
