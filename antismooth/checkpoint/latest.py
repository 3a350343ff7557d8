"""`latest`: the file that names the newest complete checkpoint of a save_dir. Its one reader and its one writer.

DeepSpeed 0.19.8's rank 0 writes `latest` as soon as its *own* files are written, before the barrier that waits for
the other ranks, and not atomically: a rank dying mid-write could leave it naming a half-written checkpoint. So
checkpoints are saved with save_latest=False and `write_latest` names a tag only after every rank's files are on
the disk, by an atomic rename.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from .files import LATEST_FILE, fsync_folder

__all__ = ["read_latest", "write_latest"]

_logger = logging.getLogger(__name__)


def read_latest(checkpoints: str | Path) -> Optional[str]:
    """The tag `latest` names, None when there is no such file, it is empty, or its tag has no folder (said in
    the log: the caller goes on as without a checkpoint, or says what else there is)."""
    latest = Path(checkpoints) / LATEST_FILE
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not tag or not (latest.parent / tag).is_dir():
        _logger.warning("%s names no checkpoint folder (%r).", latest, tag)
        return None
    return tag


def write_latest(checkpoints: str | Path, tag: str) -> None:
    """Name `tag` the newest complete checkpoint; call on rank 0 after every rank's files are on the disk.

    Written to a temporary file, flushed to the disk, renamed over `latest`, and the rename itself flushed (the
    folder's fsync), so neither a crash nor a power loss leaves `latest` half-written or naming files the disk
    never received.
    """
    checkpoints = Path(checkpoints)
    tmp = checkpoints / f"{LATEST_FILE}.tmp"
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, checkpoints / LATEST_FILE)
    fsync_folder(checkpoints)
