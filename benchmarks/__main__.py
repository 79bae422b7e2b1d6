"""``python -m benchmarks models|rules [...]``: the same as ``lrpkit bench models|rules [...]``."""

from __future__ import annotations

import sys

from lrpkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
