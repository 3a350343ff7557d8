"""The names of the run folder's files, and the helpers that flush them to the disk."""
from __future__ import annotations

import os
import re
from pathlib import Path

META_FILE = "antismooth.json"          # beside DeepSpeed's files in every tag folder
LATEST_FILE = "latest"                 # DeepSpeed's name for the newest complete tag
EVAL_FILE = "eval.jsonl"               # in the run folder: one JSON record per evaluation
# In the run folder, written by rank 0 beside exiting with 75 ("saved, resubmit me"): cluster/common.sh requeues on it
# (torchrun reports a worker's 75 as its own 1; srun returns its tasks' highest status).
RESUBMIT_FILE = "resubmit"
EMA_FILE = "ema_rank{rank}.pt"         # antismooth.ema's per-rank average, in the tag folder
UNIVERSAL_SUFFIX = "_universal"        # DeepSpeed's own naming for a converted tag
PARTIAL_SUFFIX = ".partial"            # a conversion still being written
CLIENT_STATE_KEY = "antismooth"        # the trainer's state inside DeepSpeed's client_state
UNIVERSAL_CHECKPOINT_INFO = "universal_checkpoint_info"  # deepspeed.checkpoint.constants' key, without importing it

TAG_PATTERN = re.compile(r"step\d{8}")
UNIVERSAL_PATTERN = re.compile(r"step\d{8}_universal(\.partial)?")
# DeepSpeed's per-rank optimizer shard: zero_pp_rank_{dp}_mp_rank_{mp}_optim_states.pt (bf16_ prefixed under bf16).
OPTIM_FILE_PATTERN = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
ZERO3_MODEL_FILE_PATTERN = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
ZERO12_MODEL_FILE = "mp_rank_00_model_states.pt"
# Any file of one rank's: its ZeRO shards (ZeRO-3 also its model states) and its EMA file.
RANK_FILE_PATTERN = re.compile(r"(?:zero_pp_rank_|ema_rank)(\d+)[_.]")
EMA_FILE_PATTERN = re.compile(r"ema_rank(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used; the message names the problem and the fix."""


def checkpoint_tag(global_step: int) -> str:
    return f"step{global_step:08d}"


def ema_file(tag_dir: str | Path, rank: int) -> Path:
    return Path(tag_dir) / EMA_FILE.format(rank=rank)


def ema_files(tag_dir: str | Path) -> list[Path]:
    """The EMA files of a checkpoint, by rank; [] for a run without --model-ema."""
    files = [p for p in Path(tag_dir).iterdir() if EMA_FILE_PATTERN.search(p.name)]
    return sorted(files, key=lambda p: int(EMA_FILE_PATTERN.search(p.name).group(1)))


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (new names, renames) to the disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flush_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, so a rename names only what the disk holds."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_folder(Path(root))
