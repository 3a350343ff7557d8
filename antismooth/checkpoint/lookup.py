"""Finding a checkpoint to export, and checking that every rank's files are there."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .files import _OPTIM_FILE, _ZERO3_MODEL_FILE, _ZERO12_MODEL_FILE, LATEST_FILE, CheckpointError
from .meta import read_model_meta
from .run_folder import RunFolder


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


def _is_tag_dir(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*_model_states.pt"))


def list_tags(checkpoint_dir: str | Path) -> list[str]:
    """The tag folders of a save_dir (folders holding DeepSpeed model states), sorted by name."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    return sorted(p.name for p in checkpoint_dir.iterdir() if _is_tag_dir(p))


def _tags_sentence(checkpoint_dir: Path) -> str:
    tags = list_tags(checkpoint_dir)
    return f"the tags there are {', '.join(tags)}" if tags else "it holds no checkpoint tags"


def _find_save_dir(path: Path, tag: Optional[str]) -> tuple[Path, Optional[str]]:
    """Accept a run folder (its checkpoints/), a save_dir, or a tag folder itself."""
    if not path.exists():
        raise CheckpointError(f"no checkpoint folder at {path}: give a run folder (runs/<run>), its checkpoints/ "
                              "folder, or one tag folder inside it.")
    if (path / "checkpoints").is_dir() and not (path / LATEST_FILE).exists() and not _is_tag_dir(path):
        path = path / "checkpoints"
    if _is_tag_dir(path):
        if tag is not None and tag != path.name:
            raise CheckpointError(f"{path} is itself the tag folder {path.name}, but --tag {tag} was given; "
                                  "drop --tag or point at the checkpoints/ folder.")
        return path.parent, path.name
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint folder: give the run folder or its checkpoints/.")
    return path, tag


def _read_latest(checkpoint_dir: Path) -> Optional[str]:
    latest = checkpoint_dir / LATEST_FILE
    if not latest.is_file():
        return None
    return latest.read_text().strip() or None


def _step_of(checkpoint_dir: Path, tag: str) -> Optional[int]:
    try:
        meta = read_model_meta(checkpoint_dir / tag)
    except CheckpointError:
        return None
    step = (meta or {}).get("step")
    return step if isinstance(step, int) else None


def _recorded_layout(model_file: Path) -> tuple[Optional[int], Optional[int]]:
    """(world size, ZeRO stage) as DeepSpeed recorded them in a model-states file (memory-mapped, tensors
    unread); None for what it did not record (the stage is there only when the config was given as a dict)."""
    try:
        states = torch.load(model_file, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # an unreadable or unusual file: DeepSpeed's own checks will speak
        return None, None
    config = states.get("ds_config")
    stage = config.get("zero_optimization", {}).get("stage") if isinstance(config, dict) else None
    world = states.get("dp_world_size")
    return (int(world) if isinstance(world, int) else None), (int(stage) if isinstance(stage, int) else None)


def _check_rank_files(tag_dir: Path) -> tuple[Optional[int], int]:
    """(ZeRO stage, world size) of a tag folder whose every rank's files are present, else CheckpointError.
    The stage is None for a stage-1/2 checkpoint whose config DeepSpeed did not record (a JSON path)."""
    names = [p.name for p in tag_dir.iterdir() if p.is_file()]
    zero3_models = {int(m.group(1)) for n in names if (m := _ZERO3_MODEL_FILE.match(n))}
    optim = {int(m.group(1)) for n in names if (m := _OPTIM_FILE.match(n))}
    if not zero3_models and _ZERO12_MODEL_FILE not in names:
        raise CheckpointError(f"{tag_dir} holds no DeepSpeed model states (*_model_states.pt): it is not a "
                              f"DeepSpeed checkpoint, or its save did not finish; {_tags_sentence(tag_dir.parent)}.")
    if not optim:
        raise CheckpointError(
            f"{tag_dir} holds no ZeRO optimizer partitions (*_optim_states.pt): it is a ZeRO stage-0 checkpoint "
            "(or one saved without optimizer state), which DeepSpeed's zero_to_fp32 cannot consolidate; train "
            "with a ZeRO stage 1-3 config (ds_configs/zero1.json, zero2.json, zero3.json).")
    model_file = tag_dir / (f"zero_pp_rank_{min(zero3_models)}_mp_rank_00_model_states.pt" if zero3_models
                            else _ZERO12_MODEL_FILE)
    world, stage = _recorded_layout(model_file)
    world = world or max(optim | zero3_models) + 1
    stage = 3 if zero3_models else stage  # stage 1 and 2 checkpoints are laid out alike
    missing = sorted(set(range(world)) - optim) + (sorted(set(range(world)) - zero3_models) if zero3_models else [])
    if missing:
        raise CheckpointError(
            f"{tag_dir} was saved by {world} ranks but lacks the files of rank(s) "
            f"{', '.join(str(r) for r in sorted(set(missing)))}: every rank writes its own partition, so copy all "
            "ranks' files of this tag into that one folder (multi-node runs without shared storage keep them on "
            "each node), or export another tag.")
    return stage, world


def resolve_checkpoint(path: str | Path, tag: Optional[str] = None) -> CheckpointRef:
    """Find the checkpoint to export (default: the one `latest` names) and check every rank's files are there."""
    checkpoint_dir, tag = _find_save_dir(Path(path), tag)
    latest = _read_latest(checkpoint_dir)
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
    stage, world = _check_rank_files(tag_dir)
    return CheckpointRef(checkpoint_dir, tag, stage, world)
