"""A frozen or dead rank ends the job in bounded time, with one sentence naming the ranks that stopped answering.

Every rank bumps a counter in the rendezvous store from a thread every HEARTBEAT_SECONDS (the thread runs while
the main thread computes, saves or waits in a collective), and watches the next rank's counter (a ring: one read
per rank per beat, whatever the world size). A counter that stood still for the timeout (`--dist-timeout` until
this process's first optimizer step, which may compile and warm up; `--step-timeout` after, torchtitan's 300 s /
100 s) means that rank is frozen (SIGSTOP, a hung node) or dead: its watcher writes the sentence under an abort
key, which every rank's thread checks each beat, and every rank prints it and exits with PEER_LOST_EXIT at once;
no rank waits for its collective's own timeout. The newest checkpoint stays intact (`latest` names only
checkpoints every rank committed), so the same command resumes. Counters are compared on one node, never clocks
across nodes.

The process group's own timeout is set to the same two values (a collective that hangs while every rank is alive,
e.g. mismatched collectives, still ends), and a collective whose peer's socket closed raises at once: `sentence`
then names the ranks whose counters stand still.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

from .engine import TrainingStopped

__all__ = ["Watchdog", "PeerLost", "DIST_ERRORS", "PEER_LOST_EXIT", "is_distributed_failure", "after_first_step"]

_logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0
SILENT_AFTER_BEATS = 3          # beats a counter may stand still before its rank counts as not answering
KEY = "antismooth/{attempt}/heartbeat/{rank}"
ABORT_KEY = "antismooth/{attempt}/abort"
LEFT_KEY = "antismooth/{attempt}/left/{rank}"     # a rank whose run ended on its own: its silence is no fault
# The process group waits this much longer than the heartbeat: a rank that froze during a collective is then named
# by the heartbeat's sentence, not by gloo's or NCCL's own timeout racing it.
GROUP_TIMEOUT_GRACE_SECONDS = 10.0
PEER_LOST_EXIT = 4              # the exit status of a run that stopped because another rank stopped answering

DIST_ERRORS = (RuntimeError, dist.DistError)


class PeerLost(TrainingStopped):
    """A collective failed because some rank stopped answering; the message names it and what is kept."""


def is_distributed_failure(err: BaseException) -> bool:
    """A collective that timed out or lost its peer (torch wraps gloo's and NCCL's errors differently by
    version: the type where it says, the backend's words where it does not)."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(word in text for word in ("gloo", "Gloo", "NCCL"))


def group_timeout(heartbeat_timeout: float) -> timedelta:
    """The process group's timeout for a heartbeat timeout (--dist-timeout, --step-timeout)."""
    return timedelta(seconds=heartbeat_timeout + GROUP_TIMEOUT_GRACE_SECONDS)


def set_group_timeout(timeout: timedelta) -> None:
    """The default group's timeout for every later collective: torch.distributed.set_timeout, which torch 2.11 (the
    GPU machine's) has only under its older private name, _set_pg_timeout (deprecated since, same arguments)."""
    setter = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout
    setter(timeout)


class Watchdog:
    """This rank's heartbeat and the process group's two timeouts."""

    def __init__(self, rank: int, world_size: int, hosts: list[str], start_timeout: float, step_timeout: float):
        self.rank, self.world_size, self.hosts = rank, world_size, hosts
        self.start_timeout, self.step_timeout = start_timeout, step_timeout
        self.steady = False
        self.run_folder = None   # whose newest checkpoint the sentence names
        self._last_beat = time.monotonic()
        self.stopped_for: Optional[float] = None   # seconds this process itself did not run (SIGSTOP, a hung node)
        self._store = self._connect()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="antismooth-heartbeat", daemon=True)
        if self._store is not None:
            self._thread.start()

    @classmethod
    def start(cls, rank: int, world_size: int, start_timeout: float, step_timeout: float) -> "Watchdog":
        """Every rank, once the group is up: the hosts of every rank gathered (one collective), the beat started."""
        from .distributed import all_gather_object

        global _active
        hosts = all_gather_object(socket.gethostname())
        _active = cls(rank, world_size, hosts, start_timeout, step_timeout)
        return _active

    def _connect(self) -> Optional[dist.Store]:
        """A client of the rendezvous store of its own (the group's is not shared with a thread); None for one
        process, or where the launcher gave no store address."""
        if self.world_size < 2 or not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
            return None
        try:
            return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                 timeout=timedelta(seconds=HEARTBEAT_SECONDS * SILENT_AFTER_BEATS))
        except (RuntimeError, dist.DistError) as err:
            _logger.warning("No heartbeat: the rendezvous store at %s:%s could not be reached (%s); a hang will "
                            "still end at the timeout, without naming the rank.", os.environ["MASTER_ADDR"],
                            os.environ["MASTER_PORT"], err)
            return None

    def _key(self, rank: int) -> str:
        # torchrun keeps its store across restarts: each attempt its own keys
        return KEY.format(attempt=self._attempt(), rank=rank)

    def _abort_key(self) -> str:
        return ABORT_KEY.format(attempt=self._attempt())

    def _beat(self) -> None:
        """Bump this rank's counter, leave if another rank's watcher said so, watch the next rank."""
        watched = (self.rank + 1) % self.world_size
        last_count, last_change = -1, time.monotonic()
        store_silent_since: Optional[float] = None
        while not self._stop.wait(HEARTBEAT_SECONDS):
            now = time.monotonic()
            self._note_own_stop(now)
            try:
                self._store.add(self._key(self.rank), 1)
                if self._store.check([self._abort_key()]):
                    self._leave(self._store.get(self._abort_key()).decode())
                count = self._store.add(self._key(watched), 0)
                store_silent_since = None
            except (RuntimeError, dist.DistError):
                store_silent_since = store_silent_since or now
                if now - store_silent_since > self.timeout():
                    self._leave(self.own_stop_sentence() or self.store_lost_sentence())
                continue
            if count != last_count:
                last_count, last_change = count, now
            elif now - last_change > self.timeout() and not self._left(watched):
                sentence = self.silent_sentence([watched], f"its heartbeat stood still for {now - last_change:.0f} s")
                try:
                    self._store.set(self._abort_key(), sentence)
                except (RuntimeError, dist.DistError):
                    pass
                self._leave(sentence)

    def _note_own_stop(self, now: float) -> None:
        """A beat later than the timeout: this process itself did not run meanwhile (frozen, then woken: by slurmd
        before it kills the step, by a node that recovers), so the silence the others saw was its own."""
        if now - self._last_beat > self.timeout():
            self.stopped_for = now - self._last_beat
        self._last_beat = now

    def own_stop_sentence(self) -> Optional[str]:
        """What a rank that was itself frozen says once it runs again (the beat thread may not have run yet)."""
        if self._store is None:
            return None   # no beat, no clock to compare with
        late = time.monotonic() - self._last_beat
        stopped = self.stopped_for or (late if late > self.timeout() else None)
        if stopped is None:
            return None
        return (f"this process (rank {self.rank} on {self.hosts[self.rank]}) was itself stopped for {stopped:.0f} s "
                f"(SIGSTOP, a hung node), so the other ranks stopped without it; {self.kept}: check that node, then "
                "run the same command to resume.")

    def _left(self, rank: int) -> bool:
        try:
            return self._store.check([LEFT_KEY.format(attempt=self._attempt(), rank=rank)])
        except (RuntimeError, dist.DistError):
            return False

    @staticmethod
    def _attempt() -> str:
        return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")

    def timeout(self) -> float:
        return self.step_timeout if self.steady else self.start_timeout

    def _leave(self, sentence: str) -> None:
        """Every rank ends here once one rank stopped answering: the sentence, then the exit, from this thread
        (the main thread may be waiting in a collective that would never return)."""
        if not self._stop.is_set():
            print(f"error: {sentence}", file=sys.stderr, flush=True)
            logging.shutdown()
            os._exit(PEER_LOST_EXIT)

    def store_lost_sentence(self) -> str:
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        return (f"The rendezvous store at {where} (held by rank 0 on {self.hosts[0]}, or by its launcher) stopped "
                f"answering for {self.timeout():g} s, so rank {self.rank} on {self.hosts[self.rank]} stopped; "
                f"{self.kept}: check or replace that node, then run the same command to resume.")

    def silent_sentence(self, silent: list[int], how: str) -> str:
        who = ", ".join(f"rank {r} on {self.hosts[r]}" for r in silent)
        flag = "--step-timeout" if self.steady else "--dist-timeout"
        return (f"{who} stopped answering ({how}; {flag} {self.timeout():g} s), so every rank stopped; {self.kept}: "
                "check or replace that node, then run the same command to resume.")

    def keep_up_with(self, run_folder) -> None:
        """The run folder (antismooth.checkpoint.RunFolder) whose newest checkpoint the sentence names."""
        self.run_folder = run_folder

    @property
    def kept(self) -> str:
        return self.run_folder.newest_kept() if self.run_folder is not None else "there is no checkpoint yet"

    def stop(self) -> None:
        """The run ended here (finished, or stopped with its own sentence): the beat ends, and the watcher of this
        rank is told so, so that it does not take the silence for a hang."""
        global _active
        if self._store is not None and not self._stop.is_set():
            try:
                self._store.add(LEFT_KEY.format(attempt=self._attempt(), rank=self.rank), 1)
            except (RuntimeError, dist.DistError):
                pass
        self._stop.set()
        if _active is self:
            _active = None

    def after_first_step(self) -> None:
        """The start-up is over: from now on a rank (and a collective) waits `step_timeout` at most."""
        if self.steady or not dist.is_initialized():
            return
        set_group_timeout(group_timeout(self.step_timeout))
        self.steady = True

    # --- after a collective failed

    def counters(self) -> Optional[list[int]]:
        """Every rank's beat count; None when the store does not answer (its host, rank 0, is not answering)."""
        try:
            return [self._store.add(self._key(r), 0) for r in range(self.world_size)]
        except (RuntimeError, dist.DistError):
            return None

    def silent_ranks(self) -> list[int]:
        """The ranks whose heartbeat stood still for SILENT_AFTER_BEATS beats (this rank is answering)."""
        if self._store is None:
            return []
        before = self.counters()
        time.sleep(HEARTBEAT_SECONDS * SILENT_AFTER_BEATS)
        after = self.counters()
        if before is None or after is None:
            return [0]  # the store lives in rank 0's process (deepspeed, srun) or its launcher (torchrun)
        return [r for r in range(self.world_size) if r != self.rank and after[r] == before[r]]

    def sentence(self, err: BaseException) -> str:
        """What a rank whose collective failed says: the ranks whose heartbeat stands still, else the failure."""
        self.stop()
        if (own := self.own_stop_sentence()) is not None:
            return own
        silent = self.silent_ranks()
        first_line = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        if silent:
            return self.silent_sentence(silent, f"the collective failed with: {first_line}")
        return (f"A collective failed on rank {self.rank} on {self.hosts[self.rank]} ({first_line}), and every other "
                f"rank still answers its heartbeat; {self.kept}: check the network between the nodes, then run the "
                "same command to resume.")

_active: Optional[Watchdog] = None     # this process's, while a run is under way


def after_first_step() -> None:
    """Called by the trainer after each optimizer step: the first one switches to the steady-state timeout."""
    if _active is not None:
        _active.after_first_step()
