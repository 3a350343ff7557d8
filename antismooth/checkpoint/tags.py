"""The tag folders of a save_dir: the one listing that resume, pruning and export share."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .files import TAG_PATTERN
from .latest import read_latest
from .rank_files import holds_model_states

__all__ = ["list_tags", "complete_tags", "is_step_tag"]


def is_step_tag(name: str) -> bool:
    """A tag antismooth names (`step00001000`), not a conversion (`_universal`) or a folder set aside (`.damaged`)."""
    return TAG_PATTERN.fullmatch(name) is not None


def list_tags(checkpoints: str | Path) -> list[str]:
    """Every tag folder of a save_dir, sorted by name: antismooth's step folders (complete or not), and any other
    folder holding DeepSpeed model states (a checkpoint another program saved, a universal conversion)."""
    checkpoints = Path(checkpoints)
    if not checkpoints.is_dir():
        return []
    return sorted(p.name for p in checkpoints.iterdir()
                  if p.is_dir() and (is_step_tag(p.name) or holds_model_states(p)))


def complete_tags(checkpoints: str | Path, latest: Optional[str] = None) -> list[str]:
    """antismooth's checkpoints up to the one `latest` names (default: read here), oldest first: the tags `latest`
    named when they were saved, and any older one a failed save left; [] without `latest`."""
    latest = read_latest(checkpoints) if latest is None else latest
    if latest is None:
        return []
    return [tag for tag in list_tags(checkpoints) if is_step_tag(tag) and tag <= latest]
