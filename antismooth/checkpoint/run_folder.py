"""The `--output` folder: its files, and the checkpoints in it."""
from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional

from ..config import HeldBatch
from .files import (_OPTIM_FILE, _RANK_FILE, _TAG, _UNIVERSAL, CLIENT_STATE_KEY, EVAL_FILE, LATEST_FILE,
                    UNIVERSAL_CHECKPOINT_INFO, CheckpointError, fsync_folder)
from .meta import read_model_meta, write_model_meta

_logger = logging.getLogger(__name__)


class RunFolder:
    """The `--output` folder (layout in antismooth.checkpoint's docstring).

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
