"""Files others read whole (manifests, reports, figures): written under a temporary name and renamed into place.

Standard library only, so every room can use it. `latest` has its own writer (antismooth.checkpoint.latest), which
also flushes to the disk.
"""
from __future__ import annotations

import os

__all__ = ["write_atomic"]


def write_atomic(path: str, data: bytes) -> None:
    """Write a small file under a temporary name and rename it, so readers never see half of it."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
