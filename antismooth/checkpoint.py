"""The run folder, in one place: what `--output` holds, and how each part is named, written, checked and read.

    runs/<run>/
      run.json                    the resolved flags, DeepSpeed JSON and derived numbers (rewritten at each start)
      log.txt, tensorboard/       rank 0's log and curves
      eval.jsonl                  one record per evaluation (the model card reads these)
      checkpoints/                DeepSpeed's save_dir
        latest                    the newest complete tag: written here, atomically, after every rank's files
        step00001000/             one checkpoint: DeepSpeed's files (mp_rank_00_model_states.pt,
                                  zero_pp_rank_{r}_mp_rank_00_optim_states.pt, ...), antismooth.json (the
                                  model's description, step, batch), ema_rank{r}.pt (the model EMA)
        step00001000_universal/   DeepSpeed's universal checkpoint of it, for a resume at another world size
        step00000500.damaged/     a checkpoint that could not be read back, set aside (never deleted)

torchtitan's CheckpointManager is the model: the trainer decides when to save and what its state is; this
module owns the layout, the atomic `latest`, the damage check, the choice of the tag to resume, the
conversion for another world size and the load. The tag folders stay DeepSpeed's format, so DeepSpeed's
own loader, zero_to_fp32 and ds_to_universal read them too.

DeepSpeed's checkpoint files are pickles (zero_to_fp32 and load_checkpoint read them with
weights_only=False): resume and export only checkpoints you trust, your own runs.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .config import ConfigError, HeldBatch
from .data.pipeline import Deal, EpochPosition
from .distributed import DistEnv, all_gather_object, barrier, broadcast_object, usable_cpus

__all__ = ["META_FILE", "LATEST_FILE", "EVAL_FILE", "EMA_FILE", "UNIVERSAL_SUFFIX", "CheckpointError",
           "CheckpointRef", "Conversion", "Loaded", "RunFolder", "checkpoint_tag", "ema_file", "ema_files",
           "write_model_meta", "read_model_meta", "list_tags", "resolve_checkpoint", "universal_folder",
           "convert_to_universal", "load_checkpoint", "choose_resume_tag", "load_for_resume", "resume",
           "fsync_folder"]

_logger = logging.getLogger(__name__)

META_FILE = "antismooth.json"          # beside DeepSpeed's files in every tag folder
LATEST_FILE = "latest"                 # DeepSpeed's name for the newest complete tag
EVAL_FILE = "eval.jsonl"               # in the run folder: one JSON record per evaluation
EMA_FILE = "ema_rank{rank}.pt"         # antismooth.ema's per-rank average, in the tag folder
UNIVERSAL_SUFFIX = "_universal"        # DeepSpeed's own naming for a converted tag
PARTIAL_SUFFIX = ".partial"            # a conversion still being written
CLIENT_STATE_KEY = "antismooth"        # the trainer's state inside DeepSpeed's client_state
UNIVERSAL_CHECKPOINT_INFO = "universal_checkpoint_info"  # deepspeed.checkpoint.constants' key, without importing it
REQUIRED_META = ("model", "model_kwargs", "classes", "data_config")

_TAG = re.compile(r"step\d{8}")
_UNIVERSAL = re.compile(r"step\d{8}_universal(\.partial)?")
# DeepSpeed's per-rank optimizer shard: zero_pp_rank_{dp}_mp_rank_{mp}_optim_states.pt (bf16_ prefixed under bf16).
_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_ZERO3_MODEL_FILE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_ZERO12_MODEL_FILE = "mp_rank_00_model_states.pt"
# Any file of one rank's: its ZeRO shards (ZeRO-3 also its model states) and its EMA file.
_RANK_FILE = re.compile(r"(?:zero_pp_rank_|ema_rank)(\d+)[_.]")
_EMA_FILE = re.compile(r"ema_rank(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used; the message names the problem and the fix."""


def checkpoint_tag(global_step: int) -> str:
    return f"step{global_step:08d}"


def ema_file(tag_dir: str | Path, rank: int) -> Path:
    return Path(tag_dir) / EMA_FILE.format(rank=rank)


def ema_files(tag_dir: str | Path) -> list[Path]:
    """The EMA files of a checkpoint, by rank; [] for a run without --model-ema."""
    files = [p for p in Path(tag_dir).iterdir() if _EMA_FILE.search(p.name)]
    return sorted(files, key=lambda p: int(_EMA_FILE.search(p.name).group(1)))


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (new names, renames) to the disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flush_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, so a rename names only what the disk holds."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_folder(Path(root))


# ----------------------------------------------------------------------------------------------
# The model description beside each checkpoint


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


# ----------------------------------------------------------------------------------------------
# The run folder


class RunFolder:
    """The `--output` folder (layout in the module's docstring).

    The newest complete checkpoint is the one the `latest` file names (DeepSpeed's format). DeepSpeed
    0.19.8's rank 0 writes `latest` as soon as its *own* files are written, before the barrier that waits
    for the other ranks, and not atomically: a rank dying mid-write could leave `latest` naming a
    half-written checkpoint. So checkpoints are saved with save_latest=False and `commit()` writes
    `latest` here, after every rank's files are on the disk, by an atomic rename.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.tensorboard = self.root / "tensorboard"
        self.run_json = self.root / "run.json"
        self.log_file = self.root / "log.txt"
        self.eval_file = self.root / EVAL_FILE

    def tag_dir(self, tag: str) -> Path:
        return self.checkpoints / tag

    # --- which checkpoints there are

    def latest_tag(self) -> Optional[str]:
        """The tag of the newest complete checkpoint, or None when there is none."""
        latest = self.checkpoints / LATEST_FILE
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

    # --- writing one

    def write_checkpoint(self, engine, tag: str, rank: int, state: Mapping[str, Any],
                         meta: Optional[Mapping[str, Any]], ema=None) -> None:
        """This rank's files of checkpoint `tag`, flushed to the disk: the model's description (`meta`, rank 0),
        the EMA's file (`ema`), DeepSpeed's files with the trainer's `state` as client state. Every rank calls
        it; then, after a barrier, rank 0 calls `commit(tag)`."""
        if rank == 0 and meta is not None:
            write_model_meta(self.tag_dir(tag), meta)
        if ema is not None:  # each rank's own fragments, before its files are flushed
            ema.save(self.tag_dir(tag))
        engine.save_checkpoint(str(self.checkpoints), tag=tag, save_latest=False,
                               client_state={CLIENT_STATE_KEY: dict(state),
                                             # lets DeepSpeed's ds_to_universal convert ZeRO-1/2 checkpoints for a
                                             # resume at another world size (as its own tests save)
                                             UNIVERSAL_CHECKPOINT_INFO: {}})
        self.sync_files(tag, rank)

    def discard(self, tag: str) -> None:
        """Remove a checkpoint whose save failed (it was never `latest`)."""
        shutil.rmtree(self.tag_dir(tag), ignore_errors=True)

    def commit(self, tag: str) -> None:
        """Name `tag` the newest complete checkpoint: call on rank 0 after every rank's files are on disk.

        Written to a temporary file, flushed to the disk, renamed over `latest`, and the rename itself
        flushed (the folder's fsync), so neither a crash nor a power loss leaves `latest` half-written
        or naming files the disk never received.
        """
        tmp = self.checkpoints / f"{LATEST_FILE}.tmp"
        with open(tmp, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.checkpoints / LATEST_FILE)
        fsync_folder(self.checkpoints)

    def sync_files(self, tag: str, rank: int) -> None:
        """Flush the files this rank wrote for checkpoint `tag` (rank 0: also the shared ones) to the disk."""
        for path in self.rank_files(tag, rank):
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if rank == 0:
            fsync_folder(self.tag_dir(tag))
            fsync_folder(self.checkpoints)

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest `keep` complete checkpoints, any incomplete one older than `latest`, and
        the universal conversions of checkpoints older than `latest`: a newer checkpoint at the new world size
        makes them redundant, and they can be made again."""
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

    # --- checking one

    def rank_files(self, tag: str, rank: int) -> list[Path]:
        """The files of checkpoint `tag` that rank `rank` reads and writes: its own ZeRO shards and EMA file; rank
        0 also every file no rank owns (model states, antismooth.json)."""
        files = []
        for path in sorted(self.tag_dir(tag).iterdir()):
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
            if not any(_OPTIM_FILE.search(p.name) for p in self.rank_files(tag, owner)):
                damaged.append(f"zero_pp_rank_{owner}_…_optim_states.pt (missing)")
        return damaged

    def set_aside(self, tag: str) -> Path:
        """Rename a damaged checkpoint out of the way (never deleted: its files may still be worth a look)."""
        target = self.checkpoints / f"{tag}.damaged"
        suffix = 1
        while target.exists():
            target, suffix = self.checkpoints / f"{tag}.damaged-{suffix}", suffix + 1
        os.replace(self.tag_dir(tag), target)
        return target

    # --- what one says of itself

    def saved_world_size(self, tag: str) -> Optional[int]:
        """How many processes wrote checkpoint `tag`: from its ZeRO optimizer shards and its antismooth.json (so a
        lost shard does not shrink it); None without ZeRO shards (ZeRO-0 checkpoints load at any world size)."""
        ranks = {int(m.group(1)) for p in self.tag_dir(tag).iterdir() if (m := _OPTIM_FILE.search(p.name))}
        if not ranks:
            return None
        try:
            said = int(self.meta(tag).get("world_size", 0))
        except (TypeError, ValueError):
            said = 0
        return max(max(ranks) + 1, said)

    def meta(self, tag: str) -> dict[str, Any]:
        """Checkpoint `tag`'s antismooth.json ({} when it is missing or unreadable: the caller falls back)."""
        try:
            return read_model_meta(self.tag_dir(tag)) or {}
        except (CheckpointError, OSError):
            return {}

    def saved_batch(self) -> Optional[HeldBatch]:
        """The batch the newest checkpoint was trained with (from its antismooth.json, else from run.json for
        checkpoints saved before it said), None without a checkpoint."""
        tag = self.latest_tag()
        if tag is None:
            return None
        from_run_json = self.read_run_json().get("derived", {})
        for saved in (self.meta(tag), from_run_json if isinstance(from_run_json, dict) else {}):
            if {"global_batch", "micro_batch", "world_size"} <= saved.keys():
                return HeldBatch(int(saved["global_batch"]), int(saved["micro_batch"]), int(saved["world_size"]))
        return None

    # --- the run's own records

    def write_run_json(self, content: dict[str, Any]) -> None:
        """The resolved configuration, rewritten atomically at each start (a resume may change the world size)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.run_json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(content, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, self.run_json)

    def read_run_json(self) -> dict[str, Any]:
        """run.json, or {} when there is none or it cannot be read (a caller that needs it says so)."""
        try:
            content = json.loads(self.run_json.read_text())
        except (OSError, ValueError):
            return {}
        return content if isinstance(content, dict) else {}

    def append_eval(self, record: Mapping[str, Any]) -> None:
        """One evaluation's results as a line of eval.jsonl (rank 0), flushed: a record, not a log line to parse."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.eval_file, "a") as f:
            f.write(json.dumps(dict(record), sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def eval_records(self) -> list[dict[str, Any]]:
        """Every evaluation recorded, oldest first; a line cut short by a crash is skipped."""
        if not self.eval_file.is_file():
            return []
        records = []
        for line in self.eval_file.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records


# ----------------------------------------------------------------------------------------------
# Choosing the checkpoint to resume from, and loading it at any world size


def choose_resume_tag(run_folder: RunFolder, env: DistEnv) -> Optional[str]:
    """The newest complete checkpoint that every rank can read back, one decision for all ranks (a rank that
    chose alone could load while the others start fresh, and hang them). Newer damaged ones are renamed
    `<tag>.damaged`, never deleted, and `latest` names the one the run continues from."""
    tags = broadcast_object(run_folder.complete_tags() if env.rank == 0 else None)
    damaged: dict[str, list[str]] = {}
    for tag in reversed(tags):
        files = [name for names in all_gather_object(run_folder.damaged_files(tag, env.rank, env.world_size))
                 for name in names]
        if not files:
            break
        damaged[tag] = files
    else:
        if tags:
            listing = "; ".join(f"{bad}: " + ", ".join(files) for bad, files in damaged.items())
            raise ConfigError(f"No checkpoint in {run_folder.checkpoints} can be read back ({listing}): restore "
                              "them from a backup, or start a new --output (--finetune from an export of an older run).")
        return None
    if damaged and env.rank == 0:
        for bad, files in damaged.items():
            aside = run_folder.set_aside(bad)
            _logger.warning("Checkpoint %s cannot be read back (%s): moved to %s; going on from %s.", bad,
                            ", ".join(files), aside.name, tag)
        run_folder.commit(tag)
    barrier()
    return tag


@dataclass(frozen=True)
class Loaded:
    """A checkpoint loaded into an engine: the trainer state it saved, and how it was loaded (for the log)."""
    tag: str
    state: dict[str, Any]
    how: str              # "" at the world size that saved it, else "; saved by N processes, loaded on M ..."


def load_for_resume(engine, run_folder: RunFolder, tag: str, env: DistEnv) -> Loaded:
    """Load checkpoint `tag` into the engine: as it is when this world size saved it, else through DeepSpeed's
    universal checkpoint (made once, by rank 0, while the others wait)."""
    saved_world = run_folder.saved_world_size(tag)
    universal = saved_world is not None and saved_world != env.world_size
    load_tag, how = tag, ""
    if universal:
        conversion = _convert_on_rank_zero(run_folder, tag, env)
        load_tag = conversion.folder.name
        how = (f"; saved by {processes(saved_world)}, loaded on {env.world_size} through DeepSpeed's universal "
               f"checkpoint {conversion.folder.name} (" + ("reused" if conversion.reused else
                                                          f"converted in {conversion.seconds:.1f} s") + ")")
    load_path, client_state = load_checkpoint(engine, run_folder.checkpoints, load_tag, universal)
    if load_path is None:
        raise ConfigError(f"Checkpoint {run_folder.tag_dir(tag)} could not be loaded: move it away to "
                          "start from the previous one, or start a new --output.")
    return Loaded(tag, client_state[CLIENT_STATE_KEY], how)


def resume(engine, run_folder: RunFolder, tag: str, state, env: DistEnv, workers: int) -> None:
    """Load checkpoint `tag` into the engine and the trainer's `state` (engine.TrainState), and re-deal the epoch's
    data when the layout of ranks × loader workers changed. One line says what happened."""
    loaded = load_for_resume(engine, run_folder, tag, env)
    saved, how = loaded.state, loaded.how
    state.load_state_dict(saved)
    if "data" not in saved and state.samples_in_epoch:
        # Saved before checkpoints recorded the samples trained on: only the deal's layout is known.
        state.data = EpochPosition(Deal(saved.get("world_size", 1), saved.get("workers", 0))).state_dict()
    position = EpochPosition.from_state_dict(state.data)
    deal = position.deal_for(env.world_size, workers, state.samples_in_epoch)
    if position.deal is not None and deal is not position.deal:
        left = "the rest of its samples" if position.consumed is not None else \
            "its samples by count (this checkpoint predates the record of which were trained on: some may repeat)"
        how += (f"; epoch {state.epoch}'s data was dealt to {position.deal.world_size} × {position.deal.workers} "
                f"loader workers, now {left} to {env.world_size} × {workers}")
    _logger.info("Resumed from %s: epoch %d, step %d, %d samples into the epoch%s.", tag, state.epoch,
                 state.global_step, state.samples_in_epoch, how)


def processes(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"


def conversion_workers() -> int:
    """Processes for DeepSpeed's converter: the node's other ranks wait meanwhile, so half its CPUs (at most 8);
    1 (no process pool) on small machines."""
    return max(1, min(8, usable_cpus() // 2))


def _convert_on_rank_zero(run_folder: RunFolder, tag: str, env: DistEnv) -> Conversion:
    """Rank 0 converts checkpoint `tag` to a universal checkpoint (or finds it converted) while the others wait;
    a failure stops every rank with rank 0's reason."""
    result: Conversion | str = ""
    if env.rank == 0:
        try:
            result = convert_to_universal(run_folder.checkpoints, tag, workers=conversion_workers())
        except Exception as err:  # noqa: BLE001  (any converter failure: every rank must hear of it)
            result = f"{type(err).__name__}: {err}"
    result = broadcast_object(result)
    if isinstance(result, str):
        saved = processes(run_folder.saved_world_size(tag))
        raise ConfigError(f"Checkpoint {run_folder.tag_dir(tag)} could not be converted for a resume on "
                          f"{processes(env.world_size)} ({result}): resume on the {saved} that saved it, or convert "
                          "it by hand with tools/reshard.py to see DeepSpeed's full error.")
    return result


# ----------------------------------------------------------------------------------------------
# Universal checkpoints: a resume on another number of processes
#
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
    _flush_tree(partial)
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


# ----------------------------------------------------------------------------------------------
# Finding a checkpoint to export, and checking that every rank's files are there


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
