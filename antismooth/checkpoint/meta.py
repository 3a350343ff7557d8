"""`antismooth.json` beside each checkpoint: the model's description (antismooth.models.description), its one
writer and its readers (the file as it is; typed, failing in one sentence; typed, None when unreadable)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

from ..models.description import ModelDescription
from .files import META_FILE, CheckpointError


def write_model_meta(tag_dir: str | Path, meta: ModelDescription | Mapping[str, Any]) -> Path:
    """Write `antismooth.json` into a tag folder (created if needed) atomically; any rank may call it."""
    meta = ModelDescription.of(meta).to_dict()   # a description without its model is refused here, in one sentence
    tag_dir = Path(tag_dir)
    tag_dir.mkdir(parents=True, exist_ok=True)
    path = tag_dir / META_FILE
    tmp = tag_dir / f".{META_FILE}.{os.getpid()}.tmp"  # one name per process: ranks never share a temporary
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
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


def read_description(tag_dir: str | Path) -> Optional[ModelDescription]:
    """The description in a tag folder's `antismooth.json`, None without one; CheckpointError when unusable."""
    meta = read_model_meta(tag_dir)
    if meta is None:
        return None
    try:
        return ModelDescription.from_dict(meta, Path(tag_dir) / META_FILE)
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def saved_description(tag_dir: str | Path) -> Optional[ModelDescription]:
    """The description in a tag folder, None when it is missing or unreadable (for callers that fall back)."""
    try:
        return read_description(tag_dir)
    except (CheckpointError, OSError):
        return None
