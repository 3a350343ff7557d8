"""The model description beside each checkpoint: `antismooth.json`."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

from .files import META_FILE, REQUIRED_META, CheckpointError


def write_model_meta(tag_dir: str | Path, meta: Mapping[str, Any]) -> Path:
    """Write `antismooth.json` into a tag folder (created if needed) atomically; any rank may call it."""
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"the model description lacks {', '.join(missing)}: an export could not rebuild the "
                         "model without them.")
    tag_dir = Path(tag_dir)
    tag_dir.mkdir(parents=True, exist_ok=True)
    path = tag_dir / META_FILE
    tmp = tag_dir / f".{META_FILE}.{os.getpid()}.tmp"  # one name per process: ranks never share a temporary
    tmp.write_text(json.dumps(dict(meta), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_model_meta(tag_dir: str | Path) -> Optional[dict[str, Any]]:
    """The `antismooth.json` of a tag folder, or None when there is none."""
    path = Path(tag_dir) / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); rewrite it (see antismooth.checkpoint."
                              "write_model_meta) or delete it and pass --model to tools/eval.py.") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; rewrite it with "
                              "antismooth.checkpoint.write_model_meta.")
    return meta


def saved_meta(tag_dir: str | Path) -> dict[str, Any]:
    """A tag folder's antismooth.json, {} when it is missing or unreadable (for callers that fall back)."""
    try:
        return read_model_meta(tag_dir) or {}
    except (CheckpointError, OSError):
        return {}


def recorded_world_size(meta: Mapping[str, Any]) -> Optional[int]:
    """The world size an antismooth.json records, None when it records none."""
    try:
        return int(meta.get("world_size", 0)) or None
    except (TypeError, ValueError):
        return None
