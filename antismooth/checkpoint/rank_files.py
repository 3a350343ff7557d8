"""The rank files of a tag folder: which rank wrote which DeepSpeed file, which ranks' files are there, and
whether they read back. One reading of the file names, for the resume's damage check and the export's check."""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .files import (OPTIM_FILE_PATTERN, RANK_FILE_PATTERN, ZERO3_MODEL_FILE_PATTERN, ZERO12_MODEL_FILE,
                    CheckpointError)

__all__ = ["RankFiles", "holds_model_states", "files_of_rank", "saved_world_size", "damaged_files",
           "require_every_rank"]


@dataclass(frozen=True)
class RankFiles:
    """Which ranks' DeepSpeed files a tag folder holds, read from its file names."""
    optim: frozenset[int]          # ZeRO optimizer partitions: zero_pp_rank_{r}_mp_rank_00_optim_states.pt
    zero3_models: frozenset[int]   # ZeRO-3's per-rank model states: zero_pp_rank_{r}_mp_rank_00_model_states.pt
    zero12_model: bool             # ZeRO 0-2's one model states file: mp_rank_00_model_states.pt

    @classmethod
    def of(cls, tag_dir: str | Path) -> "RankFiles":
        names = [p.name for p in Path(tag_dir).iterdir() if p.is_file()]
        return cls(optim=frozenset(int(m.group(1)) for n in names if (m := OPTIM_FILE_PATTERN.match(n))),
                   zero3_models=frozenset(int(m.group(1)) for n in names if (m := ZERO3_MODEL_FILE_PATTERN.match(n))),
                   zero12_model=ZERO12_MODEL_FILE in names)

    @property
    def has_model_states(self) -> bool:
        return bool(self.zero3_models) or self.zero12_model

    def missing_of(self, rank: int) -> list[str]:
        """The DeepSpeed files of rank `rank` that are not there (the optimizer's name shown with …)."""
        lost = [] if rank in self.optim else [f"zero_pp_rank_{rank}_…_optim_states.pt"]
        if self.zero3_models and rank not in self.zero3_models:
            lost.append(f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        return lost

    def missing_ranks(self, world_size: int) -> list[int]:
        return [rank for rank in range(world_size) if self.missing_of(rank)]


def holds_model_states(folder: Path) -> bool:
    """A DeepSpeed tag folder: it holds model states (any ZeRO stage)."""
    return folder.is_dir() and any(folder.glob("*_model_states.pt"))


def files_of_rank(tag_dir: str | Path, rank: int) -> list[Path]:
    """The files of a tag folder that rank `rank` reads and writes: its own ZeRO shards and EMA file; rank 0 also
    every file no rank owns (model states, antismooth.json)."""
    files = []
    for path in sorted(Path(tag_dir).iterdir()):
        owner = RANK_FILE_PATTERN.search(path.name)
        if path.is_file() and (int(owner.group(1)) == rank if owner else rank == 0):
            files.append(path)
    return files


def saved_world_size(tag_dir: str | Path, recorded: Optional[int] = None) -> Optional[int]:
    """How many processes wrote a tag folder: from its ZeRO optimizer shards and the world size its antismooth.json
    `recorded` (so a lost shard does not shrink it); None without ZeRO shards (ZeRO-0 loads at any world size)."""
    ranks = RankFiles.of(tag_dir).optim
    if not ranks:
        return None
    return max(max(ranks) + 1, recorded or 0)


def _reads_back(path: Path) -> bool:
    """A torch.save zip archive checked to the last CRC, or a JSON file that parses; other files are not read."""
    try:
        if path.suffix == ".pt":
            with zipfile.ZipFile(path) as archive:
                return archive.testzip() is None
        if path.suffix == ".json":
            json.loads(path.read_text())
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return False
    return True


def damaged_files(tag_dir: str | Path, rank: int, world_size: int, saved: Optional[int]) -> list[str]:
    """The files of a tag folder saved by `saved` processes that rank `rank` of `world_size` checks and that
    cannot be read back (a truncated or corrupted archive, unreadable JSON) or are missing; [] when all are sound.
    Each rank checks the files of the saving ranks it stands for (saving rank % world_size == rank: its own, at the
    same world size); rank 0 also the shared ones."""
    owners = [r for r in range(saved or 0) if r % world_size == rank]
    files = [p for owner in owners for p in files_of_rank(tag_dir, owner) if RANK_FILE_PATTERN.search(p.name)]
    if rank == 0:
        files += [p for p in files_of_rank(tag_dir, 0) if not RANK_FILE_PATTERN.search(p.name)]
    damaged = [path.name for path in files if not _reads_back(path)]
    present = RankFiles.of(tag_dir)
    for owner in owners:
        damaged += [f"{name} (missing)" for name in present.missing_of(owner)]
    return damaged


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


def require_every_rank(tag_dir: Path) -> tuple[Optional[int], int]:
    """(ZeRO stage, world size) of a tag folder with model states whose every rank's files are present, else
    CheckpointError. The stage is None for a stage-1/2 checkpoint whose config DeepSpeed did not record (a JSON
    path)."""
    present = RankFiles.of(tag_dir)
    if not present.optim:
        raise CheckpointError(
            f"{tag_dir} holds no ZeRO optimizer partitions (*_optim_states.pt): it is a ZeRO stage-0 checkpoint "
            "(or one saved without optimizer state), which DeepSpeed's zero_to_fp32 cannot consolidate; train "
            "with a ZeRO stage 1-3 config (ds_configs/zero1.json, zero2.json, zero3.json).")
    model_file = tag_dir / (f"zero_pp_rank_{min(present.zero3_models)}_mp_rank_00_model_states.pt"
                            if present.zero3_models else ZERO12_MODEL_FILE)
    world, stage = _recorded_layout(model_file)
    world = world or max(present.optim | present.zero3_models) + 1
    stage = 3 if present.zero3_models else stage  # stage 1 and 2 checkpoints are laid out alike
    missing = present.missing_ranks(world)
    if missing:
        raise CheckpointError(
            f"{tag_dir} was saved by {world} ranks but lacks the files of rank(s) "
            f"{', '.join(str(r) for r in missing)}: every rank writes its own partition, so copy all "
            "ranks' files of this tag into that one folder (multi-node runs without shared storage keep them on "
            "each node), or export another tag.")
    return stage, world
