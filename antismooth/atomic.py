"""Files others read whole (manifests, reports, figures): written under a temporary name and renamed into place.

Standard library only, so every room can use it. `latest` has its own writer (antismooth.checkpoint.latest), which
also flushes to the disk.
"""
from __future__ import annotations

import contextlib
import os

__all__ = ["write_atomic"]


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a small file under a temporary name and rename it, so readers never see half of it.

    The file gets the mode a new file gets under the umask (as exports do: antismooth.export.honour_umask), whatever
    an earlier file or a leftover temporary had, and no temporary is left behind by an exception (Ctrl-C included)."""
    tmp = f"{os.fspath(path)}.tmp"   # the name build_shards' resume recognises as a temporary and removes
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)   # one left by a killed writer keeps its own mode through open(): start a new file
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
