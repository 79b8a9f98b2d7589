"""Where the project is: runs/, recipes/ and the default data root are found from here."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
