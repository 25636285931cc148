"""Where tokenmill keeps what is slow to compute and safe to reuse (tokenizers, calibration)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path | None:
    """$TOKENMILL_CACHE (default ~/.cache/tokenmill); None when set empty or there is no home folder."""
    root = os.environ.get("TOKENMILL_CACHE")
    if root is None:
        try:
            root = str(Path.home() / ".cache" / "tokenmill")
        except RuntimeError:  # no home folder to find: no cache
            return None
    return Path(root) if root else None
