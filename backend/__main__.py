"""``python -m backend``: run one regional backend (see ``backend.server``)."""

from __future__ import annotations

import sys

from backend.server import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
