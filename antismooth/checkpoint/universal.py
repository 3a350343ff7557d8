"""Universal checkpoints: a resume on another number of processes."""
from __future__ import annotations

import argparse
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import PARTIAL_SUFFIX, UNIVERSAL_SUFFIX, flush_tree, fsync_folder

# A ZeRO checkpoint holds each data-parallel rank's slice of the fp32 weights and the optimizer moments, so
# only the world size that wrote it can load it as it is. DeepSpeed's converter
# (`deepspeed.checkpoint.ds_to_universal`) joins every parameter's slices into whole tensors
# (`<tag>_universal/zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt`), and an engine with `load_universal` on cuts
# from them whatever slice its own rank holds, at any world size and any ZeRO stage 1-3. The step, the client
# state and DeepSpeed's counters travel in the copied model states files. The conversion writes into
# `<tag>_universal.partial`, renamed into place only when complete and flushed, so a crash during it leaves
# the checkpoint untouched and the next attempt starts over; a finished conversion is reused.


@dataclass(frozen=True)
class Conversion:
    folder: Path          # the universal checkpoint: load it as tag `folder.name` of `folder.parent`
    seconds: float        # 0 when an earlier conversion was reused
    reused: bool


def universal_folder(checkpoints: Path, tag: str) -> Path:
    return checkpoints / f"{tag}{UNIVERSAL_SUFFIX}"


def convert_to_universal(checkpoints: str | Path, tag: str, workers: int = 1) -> Conversion:
    """Checkpoint `tag` of `checkpoints` as a universal checkpoint beside it (reused when already made).

    `workers` > 1 lets DeepSpeed extract and merge the slices in that many processes (it shows a progress
    bar per phase either way). Checkpoints saved without `universal_checkpoint_info` in their client state
    (before antismooth saved it) convert too: the converter injects the missing entry.
    """
    from deepspeed.checkpoint import ds_to_universal

    checkpoints = Path(checkpoints)
    final = universal_folder(checkpoints, tag)
    if final.is_dir():
        return Conversion(final, 0.0, reused=True)
    source = checkpoints / tag
    if not source.is_dir():
        raise FileNotFoundError(f"No checkpoint {tag} in {checkpoints}: name one of its step* folders.")
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    shutil.rmtree(partial, ignore_errors=True)   # what a conversion that was stopped left behind
    start = time.perf_counter()
    args = argparse.Namespace(input_folder=str(source), output_folder=str(partial), num_extract_workers=workers,
                              num_merge_workers=max(1, workers // 2), keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    ds_to_universal.main(args)
    # The converter names its output in `latest_universal`: the partial folder, which is about to be renamed.
    (checkpoints / "latest_universal").unlink(missing_ok=True)
    flush_tree(partial)
    os.replace(partial, final)
    fsync_folder(checkpoints)
    return Conversion(final, time.perf_counter() - start, reused=False)


def load_checkpoint(engine, checkpoints: Path, tag: str, universal: bool) -> tuple[object, dict]:
    """`engine.load_checkpoint` of `tag`, from a universal checkpoint when `universal`. DeepSpeed reads its
    `load_universal` switch at load time only; it is on for this load and off again after it, because left
    on, later ZeRO-3 saves write rank 0's model states only (DeepSpeed#7546). The optimizer's parameter groups
    keep their own settings (weight decay per group) whatever the universal loading writes into them."""
    config = engine._config   # the engine's parsed JSON; the switch has no public setter
    settings = [{k: v for k, v in group.items() if k != "params"} for group in engine.optimizer.param_groups]
    config.load_universal_checkpoint = universal
    try:
        loaded = engine.load_checkpoint(str(checkpoints), tag)
    finally:
        config.load_universal_checkpoint = False
    if universal:
        _repair_universal_load(engine.optimizer, settings)
    return loaded


def _repair_universal_load(optimizer, settings: list[dict]) -> None:
    """Undo what DeepSpeed 0.19.8's ZeRO-3 universal loading gets wrong (stage3.py, _load_universal_checkpoint):
    it gives every parameter group the first group's settings, so weight decay 0 for all (timm's no-decay group
    comes first); and one `step` tensor to every group's Adam state, which torch's Adam increments in place once
    per group, so the bias correction runs ahead. The groups keep the settings they were built with (the
    learning rate is the schedule's business: pretrain sets it from the step) and each state its own step."""
    for group, own in zip(optimizer.param_groups, settings, strict=True):
        group.update(own)
    inner = getattr(optimizer, "optimizer", optimizer)   # the torch optimizer inside DeepSpeed's ZeRO wrapper
    for state in inner.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()
