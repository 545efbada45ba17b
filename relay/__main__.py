"""``python -m relay``: the same command line as the ``relay`` console script (relay.cli)."""

from __future__ import annotations

import sys

from relay.cli import main

if __name__ == "__main__":
    sys.exit(main())
