"""Finding a checkpoint to export, and checking that every rank's files are there."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .files import LATEST_FILE, CheckpointError
from .latest import read_latest
from .meta import saved_description
from .rank_files import holds_model_states, require_every_rank
from .run_folder import RunFolder
from .tags import list_tags


@dataclass(frozen=True)
class CheckpointRef:
    """One complete DeepSpeed checkpoint: save_dir, tag, ZeRO stage (None: 1 or 2) and data-parallel world size."""
    checkpoint_dir: Path
    tag: str
    stage: Optional[int]
    world_size: int

    @property
    def tag_dir(self) -> Path:
        return self.checkpoint_dir / self.tag

    @property
    def run_folder(self) -> Optional[RunFolder]:
        """The run folder the checkpoint belongs to, None for a save_dir outside one."""
        return RunFolder(self.checkpoint_dir.parent) if self.checkpoint_dir.name == "checkpoints" else None


def _tags_sentence(checkpoint_dir: Path) -> str:
    tags = list_tags(checkpoint_dir)
    return f"the tags there are {', '.join(tags)}" if tags else "it holds no checkpoint tags"


def _find_save_dir(path: Path, tag: Optional[str]) -> tuple[Path, Optional[str]]:
    """Accept a run folder (its checkpoints/), a save_dir, or a tag folder itself."""
    if not path.exists():
        raise CheckpointError(f"no checkpoint folder at {path}: give a run folder (runs/<run>), its checkpoints/ "
                              "folder, or one tag folder inside it.")
    if (path / "checkpoints").is_dir() and not (path / LATEST_FILE).exists() and not holds_model_states(path):
        path = path / "checkpoints"
    if holds_model_states(path):
        if tag is not None and tag != path.name:
            raise CheckpointError(f"{path} is itself the tag folder {path.name}, but --tag {tag} was given; "
                                  "drop --tag or point at the checkpoints/ folder.")
        return path.parent, path.name
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint folder: give the run folder or its checkpoints/.")
    return path, tag


def _step_of(checkpoint_dir: Path, tag: str) -> Optional[int]:
    description = saved_description(checkpoint_dir / tag)
    return description.step if description is not None and isinstance(description.step, int) else None


def resolve_checkpoint(path: str | Path, tag: Optional[str] = None) -> CheckpointRef:
    """Find the checkpoint to export (default: the one `latest` names) and check every rank's files are there."""
    checkpoint_dir, tag = _find_save_dir(Path(path), tag)
    latest = read_latest(checkpoint_dir)
    if latest is None and not list_tags(checkpoint_dir) and not (tag and (checkpoint_dir / tag).is_dir()):
        raise CheckpointError(
            f"{checkpoint_dir} holds no checkpoint (no '{LATEST_FILE}' file, no step* tag folders): give the --output "
            "folder of a pretrain.py run that saved one, its checkpoints/ folder, or a tag folder inside it.")
    if tag is None:
        if latest is None:
            raise CheckpointError(
                f"{checkpoint_dir} has no '{LATEST_FILE}' file naming a complete checkpoint, so no save finished "
                f"there; {_tags_sentence(checkpoint_dir)}: pass --tag to pick one, or point at the checkpoints/ "
                "folder of a run that saved.")
        tag = latest
    tag_dir = checkpoint_dir / tag
    if not tag_dir.is_dir():
        raise CheckpointError(f"there is no checkpoint {tag!r} in {checkpoint_dir}; {_tags_sentence(checkpoint_dir)}.")
    if latest is not None and tag != latest:
        step, latest_step = _step_of(checkpoint_dir, tag), _step_of(checkpoint_dir, latest)
        if step is not None and latest_step is not None and step > latest_step:
            raise CheckpointError(
                f"{tag} is newer than the checkpoint '{LATEST_FILE}' names ({latest}): its save did not finish "
                f"(DeepSpeed names a tag in '{LATEST_FILE}' only once every rank wrote it); export {latest}, or "
                "wait until training has saved it.")
    if not holds_model_states(tag_dir):
        raise CheckpointError(f"{tag_dir} holds no DeepSpeed model states (*_model_states.pt): it is not a "
                              f"DeepSpeed checkpoint, or its save did not finish; {_tags_sentence(checkpoint_dir)}.")
    stage, world = require_every_rank(tag_dir)
    return CheckpointRef(checkpoint_dir, tag, stage, world)
