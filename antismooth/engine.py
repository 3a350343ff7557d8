"""DeepSpeed glue: parameter groups, the learning-rate schedule, activation checkpointing as a
policy applied to a built model, the trainer state, and the run folder's checkpoints.

Nothing here parses flags or prints; pretrain.py wires these pieces together.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from timm.models import checkpoint_seq
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler

from .config import Derived, HeldBatch, TrainConfig
from .export import CheckpointError, read_model_meta

__all__ = ["param_groups", "build_scheduler", "apply_activation_checkpointing", "CheckpointedBlocks",
           "TrainState", "RunFolder", "checkpoint_tag", "TrainingStopped"]

_logger = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run cannot go on safely (it diverged, a checkpoint could not be written); the message says which
    checkpoint is kept and what to do."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """timm's split: no weight decay for 1-D parameters (norms, biases, AttnScale λ, FeatScale s_d/s_h)
    and for the model's `no_weight_decay()` names (position embedding, class token)."""
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, derived: Derived) -> CosineLRScheduler:
    """DeiT's schedule per optimizer step: linear warmup from warmup_lr, then cosine to min_lr.

    The peak lr is written into the groups first; the scheduler is stateless given the step
    (`step_update(global_step)`), so a resumed run needs only the step count.
    """
    for group in optimizer.param_groups:
        group["lr"] = derived.peak_lr
        group.pop("initial_lr", None)
    # warmup_prefix: the cosine starts at the peak when warmup ends (timm's default lets it start at step 0
    # under the warmup, so a short run never reaches the peak lr it logs).
    # timm warns "Cosine annealing scheduler will have no effect" when the cosine is a single step (a run no
    # longer than its warmup); pretrain's start-up summary says what that means for the run instead.
    timm_logger = logging.getLogger("timm.scheduler.cosine_lr")
    level = timm_logger.level
    timm_logger.setLevel(logging.ERROR)
    try:
        scheduler = CosineLRScheduler(optimizer, t_initial=max(1, derived.total_steps - derived.warmup_steps),
                                      lr_min=config.min_lr, warmup_t=derived.warmup_steps,
                                      warmup_lr_init=config.warmup_lr, warmup_prefix=True, t_in_epochs=False)
    finally:
        timm_logger.setLevel(level)
    scheduler.step_update(0)
    return scheduler


class CheckpointedBlocks(nn.Sequential):
    """The model's transformer blocks, recomputed in backward in segments of `every` blocks.

    Same children under the same names as the nn.Sequential it replaces, so state_dict keys are
    unchanged (`blocks.3.attn.qkv.weight`) and checkpoints and exports stay plain. Only a segment's
    input is kept per segment; non-reentrant checkpointing restores the RNG state (drop path) on
    recompute, and works with ZeRO-3's gathered parameters.
    """

    def __init__(self, blocks: nn.Sequential, every: int, offload: bool = False) -> None:
        super().__init__(*blocks)
        self.every = every
        self.offload = offload

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        if not self.offload:
            return checkpoint_seq(self, x, every=self.every, use_reentrant=False)
        # The segment inputs are the only tensors kept through the saved-tensor hooks here (what a
        # segment saves inside is the checkpoint's own business), so this moves exactly them to host
        # memory: the device then holds no per-block activations, whatever the depth.
        with torch.autograd.graph.save_on_cpu(pin_memory=x.is_cuda):
            return checkpoint_seq(self, x, every=self.every, use_reentrant=False)


def apply_activation_checkpointing(model: nn.Module, blocks_per_checkpoint: int, offload: bool = False) -> nn.Module:
    """Checkpoint `model.blocks` (ViT blocks, CaiT's self-attention stage) every `blocks_per_checkpoint` blocks,
    keeping the segment inputs in host memory with `offload` (DeepSpeed's `cpu_checkpointing`)."""
    if blocks_per_checkpoint <= 0:
        return model
    if not isinstance(getattr(model, "blocks", None), nn.Sequential):
        raise ValueError(f"{type(model).__name__} has no `blocks` sequence to checkpoint: turn "
                         "activation_checkpointing off in the DeepSpeed config.")
    model.blocks = CheckpointedBlocks(model.blocks, blocks_per_checkpoint, offload)
    return model


@dataclass
class TrainState:
    """Where training stands, saved as DeepSpeed's client_state so a restart continues sample-exactly."""
    epoch: int = 0
    samples_in_epoch: int = 0        # global samples of this epoch consumed (a multiple of the global batch)
    global_step: int = 0             # optimizer steps
    samples_seen: int = 0
    corrupt_skipped: int = 0
    # The epoch's data position (antismooth.data.pipeline.EpochPosition.state_dict()): which copies of which
    # samples were trained on, independent of the world size; {} at an epoch's start.
    data: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if hasattr(self, key):
                setattr(self, key, value)


# DeepSpeed's per-rank optimizer shard: zero_pp_rank_{rank}_mp_rank_00_optim_states.pt (bf16_ prefixed under bf16).
_ZERO_SHARD = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")
# Any file of one rank's (ZeRO-3 also writes zero_pp_rank_{rank}_mp_rank_00_model_states.pt; antismooth.ema
# ema_rank{rank}.pt).
_RANK_FILE = re.compile(r"(?:zero_pp_rank_|ema_rank)(\d+)[_.]")
_TAG = re.compile(r"step\d{8}")
_UNIVERSAL = re.compile(r"step\d{8}_universal(\.partial)?")   # antismooth.reshard's conversions


def checkpoint_tag(global_step: int) -> str:
    return f"step{global_step:08d}"


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (new names, renames) to the disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RunFolder:
    """The `--output` folder: checkpoints/ (DeepSpeed), tensorboard/, run.json, log.txt.

    The newest complete checkpoint is the one the `latest` file names (DeepSpeed's format, so
    DeepSpeed's loader and zero_to_fp32 read it too). DeepSpeed 0.19.8's rank 0 writes `latest` as
    soon as its *own* files are written, before the barrier that waits for the other ranks, and
    not atomically: a rank dying mid-write could leave `latest` naming a half-written checkpoint.
    So checkpoints are saved with save_latest=False and `commit()` writes `latest` here, after
    save_checkpoint's closing barrier, by an atomic rename.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.tensorboard = self.root / "tensorboard"
        self.run_json = self.root / "run.json"
        self.log_file = self.root / "log.txt"

    def latest_tag(self) -> Optional[str]:
        """The tag of the newest complete checkpoint, or None when there is none."""
        latest = self.checkpoints / "latest"
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        if not tag or not (self.checkpoints / tag).is_dir():
            _logger.warning("%s names no checkpoint folder (%r): starting from scratch.", latest, tag)
            return None
        return tag

    def complete_tags(self) -> list[str]:
        """Every complete checkpoint, oldest first: the tags `latest` named when they were saved."""
        latest = self.latest_tag()
        if latest is None:
            return []
        return sorted(p.name for p in self.checkpoints.iterdir()
                      if p.is_dir() and _TAG.fullmatch(p.name) and p.name <= latest)

    def commit(self, tag: str) -> None:
        """Name `tag` the newest complete checkpoint: call on rank 0 after every rank's files are on disk.

        Written to a temporary file, flushed to the disk, renamed over `latest`, and the rename itself
        flushed (the folder's fsync), so neither a crash nor a power loss leaves `latest` half-written
        or naming files the disk never received.
        """
        tmp = self.checkpoints / "latest.tmp"
        with open(tmp, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.checkpoints / "latest")
        fsync_folder(self.checkpoints)

    def sync_files(self, tag: str, rank: int) -> None:
        """Flush the files this rank wrote for checkpoint `tag` (rank 0: also the shared ones) to the disk."""
        folder = self.checkpoints / tag
        for path in self.rank_files(tag, rank):
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if rank == 0:
            fsync_folder(folder)
            fsync_folder(self.checkpoints)

    def rank_files(self, tag: str, rank: int) -> list[Path]:
        """The files of checkpoint `tag` that rank `rank` reads and writes: its own ZeRO shards; rank 0
        also every file no rank owns (model states, antismooth.json)."""
        files = []
        for path in sorted((self.checkpoints / tag).iterdir()):
            owner = _RANK_FILE.search(path.name)
            if path.is_file() and (int(owner.group(1)) == rank if owner else rank == 0):
                files.append(path)
        return files

    def damaged_files(self, tag: str, rank: int, world_size: Optional[int] = None) -> list[str]:
        """The files of checkpoint `tag` that rank `rank` of `world_size` checks and that cannot be read back: a
        truncated or corrupted zip archive (torch.save's format, checked to the last CRC), unreadable JSON, or
        a missing ZeRO shard; [] when all are sound. Each rank checks the files of the saving ranks it stands
        for (saving rank % world_size == rank: its own, at the same world size); rank 0 also the shared ones."""
        saved = self.saved_world_size(tag)
        world_size = world_size or saved or 1
        owners = [r for r in range(saved or 0) if r % world_size == rank]
        files = [p for owner in owners for p in self.rank_files(tag, owner) if _RANK_FILE.search(p.name)]
        if rank == 0:
            files += [p for p in self.rank_files(tag, 0) if not _RANK_FILE.search(p.name)]
        damaged = []
        for path in files:
            try:
                if path.suffix == ".pt":
                    with zipfile.ZipFile(path) as archive:
                        if archive.testzip() is not None:
                            raise zipfile.BadZipFile("CRC mismatch")
                elif path.suffix == ".json":
                    json.loads(path.read_text())
            except (OSError, ValueError, zipfile.BadZipFile, EOFError):
                damaged.append(path.name)
        for owner in owners:
            if not any(_ZERO_SHARD.search(p.name) for p in self.rank_files(tag, owner)):
                damaged.append(f"zero_pp_rank_{owner}_…_optim_states.pt (missing)")
        return damaged

    def set_aside(self, tag: str) -> Path:
        """Rename a damaged checkpoint out of the way (never deleted: its files may still be worth a look)."""
        target = self.checkpoints / f"{tag}.damaged"
        suffix = 1
        while target.exists():
            target, suffix = self.checkpoints / f"{tag}.damaged-{suffix}", suffix + 1
        os.replace(self.checkpoints / tag, target)
        return target

    def saved_world_size(self, tag: str) -> Optional[int]:
        """How many processes wrote checkpoint `tag`: from its ZeRO optimizer shards and its antismooth.json (so a
        lost shard does not shrink it); None without ZeRO shards (ZeRO-0 checkpoints load at any world size)."""
        ranks = {int(m.group(1)) for p in (self.checkpoints / tag).iterdir() if (m := _ZERO_SHARD.search(p.name))}
        if not ranks:
            return None
        try:
            said = int(self._meta(tag).get("world_size", 0))
        except (TypeError, ValueError):
            said = 0
        return max(max(ranks) + 1, said)

    def _meta(self, tag: str) -> dict[str, Any]:
        """Checkpoint `tag`'s antismooth.json ({} when it is missing or unreadable: the caller falls back)."""
        try:
            return read_model_meta(self.checkpoints / tag) or {}
        except (CheckpointError, OSError):
            return {}

    def saved_batch(self) -> Optional[HeldBatch]:
        """The batch the newest checkpoint was trained with (from its antismooth.json, else from run.json for
        checkpoints saved before it said), None without a checkpoint."""
        tag = self.latest_tag()
        if tag is None:
            return None
        try:
            from_run_json = json.loads(self.run_json.read_text()).get("derived", {})
        except (OSError, ValueError, AttributeError):
            from_run_json = {}
        for saved in (self._meta(tag), from_run_json):
            if {"global_batch", "micro_batch", "world_size"} <= saved.keys():
                return HeldBatch(int(saved["global_batch"]), int(saved["micro_batch"]), int(saved["world_size"]))
        return None

    def write_run_json(self, content: dict[str, Any]) -> None:
        """The resolved configuration, rewritten atomically at each start (a resume may change the world size)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.run_json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(content, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, self.run_json)

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest `keep` complete checkpoints, any incomplete one older than `latest`, and
        the universal conversions (antismooth.reshard) of checkpoints older than `latest`: a newer checkpoint
        at the new world size makes them redundant, and they can be made again."""
        latest = self.latest_tag()
        if latest is None:
            return []
        tags = sorted(p.name for p in self.checkpoints.iterdir()
                      if p.is_dir() and _TAG.fullmatch(p.name) and p.name <= latest)
        doomed = tags[:-keep]
        for tag in doomed:
            shutil.rmtree(self.checkpoints / tag, ignore_errors=True)
        for converted in self.checkpoints.iterdir():
            if _UNIVERSAL.fullmatch(converted.name) and converted.name.split("_")[0] < latest:
                shutil.rmtree(converted, ignore_errors=True)
        return doomed
