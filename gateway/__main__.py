"""``python -m gateway`` runs the ``geogate`` command."""

from __future__ import annotations

import sys

from gateway.cli import main

__all__: list[str] = []

sys.exit(main())
