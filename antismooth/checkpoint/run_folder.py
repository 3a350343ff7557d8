"""The `--output` folder: its files, and the checkpoints in it."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

from ..config import HeldBatch
from ..distributed import barrier
from .files import CLIENT_STATE_KEY, EVAL_FILE, RESUBMIT_FILE, UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_PATTERN, fsync_folder
from .latest import read_latest, write_latest
from ..models.description import ModelDescription
from .meta import saved_description, write_model_meta
from .rank_files import damaged_files, files_of_rank, saved_world_size
from .tags import complete_tags, is_step_tag, list_tags


class RunFolder:
    """The `--output` folder (layout in antismooth.checkpoint's docstring).

    The newest complete checkpoint is the one the `latest` file names (antismooth.checkpoint.latest: why it is
    written there, after every rank's files, and not by DeepSpeed).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.tensorboard = self.root / "tensorboard"
        self.run_json = self.root / "run.json"
        self.log_file = self.root / "log.txt"
        self.eval_file = self.root / EVAL_FILE
        self.resubmit_file = self.root / RESUBMIT_FILE

    def tag_dir(self, tag: str) -> Path:
        return self.checkpoints / tag

    # --- which checkpoints there are

    def latest_tag(self) -> Optional[str]:
        """The tag of the newest complete checkpoint, or None when there is none."""
        return read_latest(self.checkpoints)

    def newest_kept(self) -> str:
        """How a sentence that stops the run names what it keeps: the newest complete checkpoint, or that there is
        none."""
        latest = self.latest_tag()
        return f"the newest checkpoint, {latest} in {self.checkpoints}, is intact" if latest else \
            "there is no checkpoint yet"

    def ask_to_be_resubmitted(self, step: int) -> None:
        """Rank 0, beside exiting with 75: the sign cluster/common.sh requeues the job on (checkpoint/files.py)."""
        self.resubmit_file.write_text(f"{step}\n")

    def complete_tags(self) -> list[str]:
        """Every complete checkpoint, oldest first: the tags `latest` named when they were saved."""
        return complete_tags(self.checkpoints)

    # --- writing one

    def write_checkpoint(self, engine, tag: str, rank: int, state: Mapping[str, Any],
                         meta: Optional[ModelDescription], ema=None) -> None:
        """This rank's files of checkpoint `tag`, flushed to the disk: the model's description (`meta`, rank 0),
        the EMA's file (`ema`), DeepSpeed's files with the trainer's `state` as client state. Every rank calls
        it; then, once every rank's outcome is gathered and none failed, rank 0 calls `commit(tag)`."""
        try:
            engine.save_checkpoint(str(self.checkpoints), tag=tag, save_latest=False,
                                   client_state={CLIENT_STATE_KEY: dict(state),
                                                 # lets DeepSpeed's ds_to_universal convert ZeRO-1/2 checkpoints for
                                                 # a resume at another world size (as its own tests save)
                                                 UNIVERSAL_CHECKPOINT_INFO: {}})
        except (OSError, RuntimeError):
            # DeepSpeed's save ends with a barrier, where the ranks that wrote their files now wait: meet them
            # there, so that every rank reaches the Checkpointer's gathering of outcomes together.
            barrier()
            raise
        # Ours after DeepSpeed's, which hold the only collectives: a failure here keeps the ranks in step.
        if rank == 0 and meta is not None:
            write_model_meta(self.tag_dir(tag), meta)
        if ema is not None:  # each rank's own fragments, before its files are flushed
            ema.save(self.tag_dir(tag))
        self.sync_files(tag, rank)

    def discard(self, tag: str) -> None:
        """Remove a checkpoint whose save failed (it was never `latest`)."""
        shutil.rmtree(self.tag_dir(tag), ignore_errors=True)

    def remove_uncommitted(self) -> list[str]:
        """Delete the step folders newer than `latest` (all of them without one): saves that some rank never
        finished, which `latest` never named and no resume may read. Returns their tags (rank 0 calls it)."""
        latest = self.latest_tag()
        doomed = [tag for tag in list_tags(self.checkpoints) if is_step_tag(tag) and (latest is None or tag > latest)]
        for tag in doomed:
            shutil.rmtree(self.tag_dir(tag), ignore_errors=True)
        return doomed

    def checkpoint_bytes(self, tag: Optional[str]) -> int:
        """What checkpoint `tag`'s files take on the disk (0 without a tag): what the next save needs free."""
        if tag is None or not self.tag_dir(tag).is_dir():
            return 0
        return sum(p.stat().st_size for p in self.tag_dir(tag).rglob("*") if p.is_file())

    def commit(self, tag: str) -> None:
        """Name `tag` the newest complete checkpoint: call on rank 0 after every rank's files are on disk."""
        write_latest(self.checkpoints, tag)

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
        doomed = complete_tags(self.checkpoints, latest)[:-keep]
        for tag in doomed:
            shutil.rmtree(self.checkpoints / tag, ignore_errors=True)
        for converted in self.checkpoints.iterdir():
            if UNIVERSAL_PATTERN.fullmatch(converted.name) and converted.name.split("_")[0] < latest:
                shutil.rmtree(converted, ignore_errors=True)
        return doomed

    # --- checking one

    def rank_files(self, tag: str, rank: int) -> list[Path]:
        """The files of checkpoint `tag` that rank `rank` reads and writes (rank_files.files_of_rank)."""
        return files_of_rank(self.tag_dir(tag), rank)

    def damaged_files(self, tag: str, rank: int, world_size: Optional[int] = None) -> list[str]:
        """The files of checkpoint `tag` that rank `rank` of `world_size` (default: the saving one) checks and that
        cannot be read back or are missing (rank_files.damaged_files); [] when all are sound."""
        saved = self.saved_world_size(tag)
        return damaged_files(self.tag_dir(tag), rank, world_size or saved or 1, saved)

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
        """How many processes wrote checkpoint `tag`; None without ZeRO shards (rank_files.saved_world_size)."""
        description = self.description(tag)
        return saved_world_size(self.tag_dir(tag), description.world_size if description else None)

    def description(self, tag: str) -> Optional[ModelDescription]:
        """Checkpoint `tag`'s model description (None when it is missing or unreadable: the caller falls back)."""
        return saved_description(self.tag_dir(tag))

    def saved_batch(self) -> Optional[HeldBatch]:
        """The batch the newest checkpoint was trained with (from its antismooth.json, else from run.json for
        checkpoints saved before it said), None without a checkpoint."""
        tag = self.latest_tag()
        if tag is None:
            return None
        description = self.description(tag)
        if description and None not in (description.global_batch, description.micro_batch, description.world_size):
            return HeldBatch(int(description.global_batch), int(description.micro_batch), int(description.world_size))
        derived = self.read_run_json().get("derived", {})
        if isinstance(derived, dict) and {"global_batch", "micro_batch", "world_size"} <= derived.keys():
            return HeldBatch(int(derived["global_batch"]), int(derived["micro_batch"]), int(derived["world_size"]))
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
