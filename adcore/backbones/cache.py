"""Where adcore keeps converted weights and other derived files."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "ADCORE_CACHE"


def cache_dir() -> Path:
    """Returns ``$ADCORE_CACHE`` if set, else ``~/.cache/adcore`` (not created here)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "adcore"
