"""The Checkpointer: when a run saves, how, and how it loads again (torchtitan's CheckpointManager).

The trainer only says where it stands (`TrainState`) and asks; each part of the run saves and restores its own
state: the engine (DeepSpeed's files), the trainer's state (their client state), the model EMA (its per-rank
files), the training stream (its position, `state_dict()`/`load_state_dict()`), the model's description
(antismooth.json). A save runs on every rank (DeepSpeed needs all of them):

    due?  ->  prepare (weights finite, room for it on every node, the stream's position)
          ->  write (this rank's files, flushed)
          ->  finish (every rank's outcome gathered -> commit: `latest`, prune; or abandon on every rank)

`finish` is the one place that decides, after every rank wrote or failed, whether the checkpoint becomes `latest`:
a full disk or an I/O error on one node stops every rank with the same sentence (NeMo's and PyTorch DCP's
commit-after-all-succeeded), instead of one rank exiting while the others wait in the barrier.
"""
from __future__ import annotations

import errno
import logging
import shutil
import socket
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..distributed import DistEnv, all_gather_object, all_reduce_tensor, collective_device
from ..engine import TrainingStopped, TrainState
from ..models.description import ModelDescription
from .files import checkpoint_tag
from .resume import choose_resume_tag, load_for_resume
from .run_folder import RunFolder

NO_ROOM_BYTES = 1 << 20   # what a folder with less free space than this holds no more of a checkpoint

__all__ = ["Checkpointer"]

_logger = logging.getLogger(__name__)


@dataclass
class Checkpointer:
    """Saves and loads one run's checkpoints in `run_folder` (antismooth.checkpoint's layout).

    Built at start-up, before the engine, to choose the tag to resume and load it; `attach` then hands it what a
    checkpoint holds, after which the trainer asks `due()` and calls `save()`."""
    run_folder: RunFolder
    env: DistEnv
    save_every: int                     # optimizer steps between mid-epoch checkpoints
    keep: int                           # complete checkpoints kept (older ones pruned at each commit)
    engine: Any = None                  # deepspeed.DeepSpeedEngine
    state: Optional[TrainState] = None
    stream: Any = None                  # the training stream: state_dict() / load_state_dict()
    ema: Any = None                     # antismooth.ema.ShardedEma, or None without --model-ema
    description: Optional[ModelDescription] = None   # the model's, saved beside every checkpoint
    batch: dict[str, int] = field(default_factory=dict)   # global_batch, micro_batch: recorded with each save
    last_saved_step: int = -1
    _loaded: dict[str, Any] = field(default_factory=dict, repr=False)   # the trainer state the resume loaded

    def attach(self, engine, state: TrainState, stream, ema, description: ModelDescription,
               global_batch: int, micro_batch: int) -> None:
        """What every checkpoint holds, once it is all built."""
        self.engine, self.state, self.stream, self.ema, self.description = engine, state, stream, ema, description
        self.batch = {"global_batch": global_batch, "micro_batch": micro_batch}
        self.last_saved_step = state.global_step if state.global_step else -1

    # --- loading ------------------------------------------------------------------------------------------------

    def resume_tag(self) -> Optional[str]:
        """The newest checkpoint every rank can read back, one decision for all ranks (damaged newer ones set
        aside); None for a fresh run."""
        return choose_resume_tag(self.run_folder, self.env)

    def load(self, tag: str, engine, state: TrainState) -> str:
        """Checkpoint `tag` into the engine (through a universal checkpoint at another world size) and the trainer's
        `state`; what a resume at another world size did, for the log line (`load_stream` completes it)."""
        loaded = load_for_resume(engine, self.run_folder, tag, self.env)
        self._loaded = loaded.state
        state.load_state_dict(loaded.state)
        return loaded.how

    def load_ema(self, tag: str, ema) -> None:
        """The model EMA's files of checkpoint `tag` into `ema`, which any world size can read; a checkpoint without
        them (a run without --model-ema, or a rank's file lost) starts the average again, said in the log."""
        tag_dir = self.run_folder.tag_dir(tag)
        try:
            ema.load(tag_dir)
        except (KeyError, OSError, RuntimeError) as err:
            _logger.warning("No model EMA could be read from %s (%s): the EMA starts again from the current weights.",
                            tag_dir, err)

    def load_stream(self, stream, state: TrainState, workers: int) -> str:
        """The training stream's position as the loaded checkpoint saved it; what changes in how the rest of the
        epoch is dealt ('' when nothing does)."""
        if "data" not in self._loaded and state.samples_in_epoch:
            # Saved before checkpoints recorded the samples trained on: only the deal's layout is known.
            stream.load_layout(self._loaded.get("world_size", 1), self._loaded.get("workers", 0))
        else:
            stream.load_state_dict(state.data)
        note = stream.redeal_note(state.samples_in_epoch)
        return f"; epoch {state.epoch}'s {note}" if note else ""

    def log_resumed(self, tag: str, state: TrainState, how: str) -> None:
        """One line says what the resume did: where training stands, and what a change of layout did."""
        _logger.info("Resumed from %s: epoch %d, step %d, %d samples into the epoch%s.", tag, state.epoch,
                     state.global_step, state.samples_in_epoch, how)

    # --- when ---------------------------------------------------------------------------------------------------

    def due(self, epoch_complete: bool) -> bool:
        """A mid-epoch checkpoint now (the epoch's end saves anyway)."""
        return self.state.global_step % self.save_every == 0 and not epoch_complete

    def saved_now(self) -> bool:
        return self.last_saved_step == self.state.global_step

    # --- how ----------------------------------------------------------------------------------------------------

    def save(self) -> None:
        """A checkpoint of the current step on every rank, named `latest` once every rank's files are on the disk,
        old ones pruned. The caller has checked the losses since the last check (a diverged step saves nothing)."""
        tag = checkpoint_tag(self.state.global_step)
        self.check_parameters_finite(tag)
        self.check_free_space(tag)
        self.state.data = self.stream.state_dict() if self.state.samples_in_epoch else {}   # a collective
        self.finish(tag, self.write(tag))

    def write(self, tag: str) -> Optional[BaseException]:
        """This rank's files of checkpoint `tag`, flushed to the disk: the model's description with this step and
        batch (rank 0), the EMA's files, DeepSpeed's with the trainer state as client state. Returns what stopped
        the write (torch.save reports a full disk as a RuntimeError), None when all went to the disk."""
        description = self.description.replace(step=self.state.global_step, epoch=self.state.epoch,
                                               world_size=self.env.world_size, **self.batch)
        try:
            self.run_folder.write_checkpoint(self.engine, tag, self.env.rank, self.state.state_dict(), description,
                                             self.ema)
        except (OSError, RuntimeError) as err:
            return err
        return None

    def finish(self, tag: str, error: Optional[BaseException]) -> None:
        """After this rank wrote checkpoint `tag` (`error`: why it could not): commit it, or abandon it on every rank.

        The one place a save's outcome is decided: every rank's outcome is gathered (which also waits for every
        rank's files to be on the disk), and only when none failed does rank 0 name `tag` in `latest`."""
        failures = [f for f in all_gather_object(None if error is None else self.describe_failure(error, tag)) if f]
        if failures:
            self.abandon(tag, failures, error)
        self.last_saved_step = self.state.global_step
        if self.env.rank == 0:
            self.commit(tag)

    def commit(self, tag: str) -> None:
        """Rank 0, after every rank's files are on the disk: `latest` names `tag`, older checkpoints pruned."""
        self.run_folder.commit(tag)
        removed = self.run_folder.prune(self.keep)
        _logger.info("saved checkpoint %s%s", tag, f" (removed {', '.join(removed)})" if removed else "")

    def describe_failure(self, err: BaseException, tag: str) -> dict[str, Any]:
        """What one rank tells the others of its failed write: where, and why in a few words."""
        full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT) \
            or "write failed" in str(err) or "No space left" in str(err) or "quota" in str(err).lower() \
            or self.left_no_room(tag)
        reason = "the disk is full" if full else f"{type(err).__name__}: {err}".splitlines()[0][:200]
        return {"host": socket.gethostname(), "rank": self.env.rank, "reason": reason}

    def left_no_room(self, tag: str) -> bool:
        """Whether the failed write left the folder of checkpoint `tag` full: torch.save reports a short write on a
        full filesystem as "unexpected pos …", without ENOSPC (seen on a full tmpfs, tests/test_cluster.py)."""
        try:
            return shutil.disk_usage(self.run_folder.tag_dir(tag)).free < NO_ROOM_BYTES
        except OSError:
            return False

    def abandon(self, tag: str, failures: list[dict[str, Any]], err: Optional[BaseException]) -> None:
        """A checkpoint that some rank could not write: its partial folder removed (it was never `latest`), and every
        rank stopped with the same sentence naming the node, the folder, the room a checkpoint needs and the intact
        newest checkpoint."""
        latest = self.run_folder.latest_tag()
        if self.env.rank == 0:
            self.run_folder.discard(tag)
        first = failures[0]
        others = f" and {len(failures) - 1} other rank{'s' * (len(failures) > 2)}" if len(failures) > 1 else ""
        raise TrainingStopped(f"Checkpoint {tag} could not be written to {self.run_folder.checkpoints} on node "
                              f"{first['host']} (rank {first['rank']}{others}: {first['reason']}){self.needs(latest)}; "
                              f"{self.kept(latest)}: free space there (or lower --keep) and run the same command to "
                              "resume from it.") from err

    def check_free_space(self, tag: str) -> None:
        """Stop before writing when some node's disk cannot hold another checkpoint as large as the last one (the
        whole checkpoint: every rank's files land in the one shared folder).

        One gather: every rank sends its free space there, and rank 0 alone also the newest checkpoint and its size
        (a walk of the shared folder, once per save instead of once per rank)."""
        mine: dict[str, Any] = {"host": socket.gethostname(), "free": self.free_bytes()}
        if self.env.rank == 0:
            mine["latest"] = self.run_folder.latest_tag()
            mine["need"] = self.run_folder.checkpoint_bytes(mine["latest"])
        everyone = all_gather_object(mine)
        latest, need = everyone[0]["latest"], everyone[0]["need"]
        short = [s for s in everyone if need and s["free"] is not None and s["free"] < need]
        if short:
            host, free = short[0]["host"], short[0]["free"]
            raise TrainingStopped(f"Checkpoint {tag} was not written: {self.run_folder.checkpoints} on node {host} "
                                  f"has {_size(free)} free{self.needs(latest, need)}; {self.kept(latest)}: free space "
                                  "there (or lower --keep) and run the same command to resume from it.")

    def free_bytes(self) -> Optional[int]:
        """The free space of the checkpoints folder as this node sees it; None before the folder exists (no
        checkpoint yet, so none to compare with)."""
        try:
            return shutil.disk_usage(self.run_folder.checkpoints).free
        except FileNotFoundError:
            return None

    def needs(self, latest: Optional[str], size: Optional[int] = None) -> str:
        """`size`: the bytes of `latest` when the caller has them (else measured here)."""
        size = self.run_folder.checkpoint_bytes(latest) if size is None else size
        return f", and a checkpoint needs {_size(size)} there (the size of {latest})" if size else ""

    def kept(self, latest: Optional[str]) -> str:
        return f"{latest} is still the newest checkpoint, intact" if latest else "there is no checkpoint yet"

    def check_parameters_finite(self, tag: str) -> None:
        """Never save non-finite weights: each rank checks what it holds (its partition under ZeRO-3)."""
        held = [getattr(p, "ds_tensor", p) for p in self.engine.module.parameters()]
        device = collective_device()
        # One flag per tensor on the device, one read-back in all (not one sync per parameter).
        finite = torch.stack([torch.isfinite(t).all().to(device) for t in held if t.numel()]).all()
        if not bool(all_reduce_tensor(finite.to(torch.int32), op="min")):
            raise TrainingStopped(f"The weights at step {self.state.global_step} hold non-finite values, so "
                                  f"checkpoint {tag} was not saved; the newest checkpoint, {self.run_folder.latest_tag()} "
                                  f"in {self.run_folder.checkpoints}, holds finite weights: lower --lr and run the same "
                                  "command to resume from it.")



def _size(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count < 2**30 else f"{count / 2**30:.1f} GiB"
