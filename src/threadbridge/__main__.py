"""``python -m threadbridge demo``: watch the ladder stop four kinds of blocking work."""

from __future__ import annotations

import sys

from ._demo import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
