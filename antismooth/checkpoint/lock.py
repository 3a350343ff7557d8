"""One training writes into a run folder at a time: `run.lock`, taken by rank 0 before anything is written.

Taken atomically on any filesystem the nodes share, NFS included: the holder's record is written to a file of its
own, then hard-linked to `run.lock` (link() fails when the name exists, and a link is atomic on NFS, where
O_EXCL was not always). The record says who holds it (host, pid, SLURM job id and restart count, since when); a
thread refreshes its mtime every LEASE_REFRESH seconds, so a lock whose holder died on another host is known stale
once it was not refreshed for LEASE_EXPIRY seconds. Stale at once: a dead pid on this host, or an earlier start of
this very SLURM job (a requeued job keeps its id and counts SLURM_RESTART_COUNT up; SLURM killed the old
allocation's processes before it starts the job again), or of this torchrun run (its agents stop every worker
before they restart them, TORCHELASTIC_RESTART_COUNT + 1). A stale lock is taken over with a log line; a live one
refuses the start with one sentence naming its holder. Released on every exit but a killed process.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Optional

from ..settings import ConfigError

__all__ = ["RunLock", "LockHolder", "LOCK_FILE", "LEASE_REFRESH", "LEASE_EXPIRY"]

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
LEASE_REFRESH = 10.0    # s between the holder's refreshes of the lock's mtime
LEASE_EXPIRY = 120.0    # s without a refresh after which any host may take the lock over (NFS attribute caches
                        # and clock skew between nodes stay well inside it)


@dataclass(frozen=True)
class LockHolder:
    """What run.lock says of the training that holds it."""
    host: str
    pid: int
    started: str                      # ISO 8601, UTC
    job: Optional[str] = None         # SLURM_JOB_ID
    restart: int = 0                  # SLURM_RESTART_COUNT
    token: str = ""                   # unique per start: which taker wrote this lock
    elastic: Optional[str] = None     # TORCHELASTIC_RUN_ID (torchrun's --rdzv-id), when set to one
    elastic_restart: int = 0          # TORCHELASTIC_RESTART_COUNT

    @classmethod
    def of_this_process(cls, environ: Mapping[str, str] = os.environ) -> "LockHolder":
        job = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID") or None
        elastic = environ.get("TORCHELASTIC_RUN_ID")
        return cls(host=socket.gethostname(), pid=os.getpid(),
                   started=datetime.now(timezone.utc).isoformat(timespec="seconds"), job=job,
                   restart=_count(environ, "SLURM_RESTART_COUNT"), token=uuid.uuid4().hex,
                   elastic=elastic if elastic not in (None, "", "none") else None,   # "none": torchrun's default id
                   elastic_restart=_count(environ, "TORCHELASTIC_RESTART_COUNT"))

    def describe(self) -> str:
        job = f", SLURM job {self.job}" + (f" (restart {self.restart})" if self.restart else "") if self.job else ""
        return f"pid {self.pid} on {self.host}{job}, since {self.started}"


def _count(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ.get(name) or 0)
    except ValueError:
        return 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True   # another user's live process
    return True


class RunLock:
    """run.lock in a run folder, held by this process (rank 0) until `release`."""

    def __init__(self, folder: Path, holder: LockHolder) -> None:
        self.folder = folder
        self.path = folder / LOCK_FILE
        self.holder = holder
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.created = False      # the folder did not exist before this start
        self.taken_over: Optional[str] = None   # the log line when a stale lock was taken over (start-up logs it)

    # --- taking it

    @classmethod
    def take(cls, folder: str | Path, holder: Optional[LockHolder] = None) -> "RunLock":
        """The lock of `folder` (created if missing), or ConfigError naming the live holder and the fix."""
        lock = cls(Path(folder), holder or LockHolder.of_this_process())
        lock.created = not lock.folder.exists()
        lock.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):   # a takeover that loses a race with another taker looks again
            if lock._link():
                lock._start_refreshing()
                return lock
            found, age = lock._read()
            reason = lock._stale_reason(found, age)
            if reason is None:
                raise ConfigError(lock._refusal(found))
            if lock._remove_stale(found):
                lock.taken_over = (f"took over the stale lock of {lock.folder}, held by "
                                   f"{found.describe() if found else 'an unreadable record'}: {reason}.")
        found, _ = lock._read()
        raise ConfigError(lock._refusal(found))

    def _link(self) -> bool:
        """Create run.lock holding this process's record, atomically; False when it exists."""
        own = self.folder / f".{LOCK_FILE}.{self.holder.token}"
        record = json.dumps(asdict(self.holder)) + "\n"
        own.write_text(record)
        try:
            os.link(own, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):   # a filesystem without hard links
                return self._create_exclusive(record)
            # NFS may report a link that did happen as failed (a lost reply to a retried request): the count says.
            return own.stat().st_nlink == 2
        finally:
            own.unlink(missing_ok=True)

    def _create_exclusive(self, record: str) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(record)
        return True

    def _read(self) -> tuple[Optional[LockHolder], float]:
        """The holder run.lock names (None when unreadable) and seconds since it was last refreshed (inf: no lock)."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None, float("inf")
        try:
            raw = json.loads(self.path.read_text())
            return LockHolder(**{k: raw[k] for k in ("host", "pid", "started", "job", "restart", "token")},
                              **{k: raw[k] for k in ("elastic", "elastic_restart") if k in raw}), age
        except FileNotFoundError:
            return None, float("inf")
        except (OSError, ValueError, KeyError, TypeError):
            return None, age

    def _stale_reason(self, found: Optional[LockHolder], age: float) -> Optional[str]:
        """Why the lock's holder no longer runs, or None when it may."""
        me = self.holder
        if age == float("inf"):
            return "released meanwhile"
        if found is not None and found.host == me.host and not _pid_alive(found.pid):
            return f"its holder, pid {found.pid} on this host, is dead"
        if found is not None and found.job and found.job == me.job and found.restart < me.restart:
            return f"SLURM job {me.job} was requeued: restart {me.restart} replaces restart {found.restart}"
        if found is not None and found.elastic and found.elastic == me.elastic and \
                found.elastic_restart < me.elastic_restart:
            return (f"torchrun restarted the workers of run {me.elastic}: restart {me.elastic_restart} replaces "
                    f"restart {found.elastic_restart}")
        if age > LEASE_EXPIRY:
            return f"not refreshed for {age:.0f} s"
        return None

    def _remove_stale(self, found: Optional[LockHolder]) -> bool:
        """Move the stale lock aside and delete it; put it back if it is not the one judged stale (another taker
        replaced it meanwhile). True when the stale one is gone."""
        aside = self.folder / f".{LOCK_FILE}.stale.{self.holder.token}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            moved = json.loads(aside.read_text()).get("token")
        except (OSError, ValueError, AttributeError):
            moved = None
        if found is not None and moved != found.token:
            try:
                os.link(aside, self.path)   # a live lock taken meanwhile: back where it was
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def _refusal(self, found: Optional[LockHolder]) -> str:
        who = found.describe() if found else "a process whose record cannot be read"
        return (f"--output {self.folder} is in use by another training ({who}): wait for it to finish or stop it, "
                f"or train into another --output; if that training is gone, delete {self.path} (a lock its holder "
                f"no longer refreshes is taken over after {LEASE_EXPIRY:.0f} s).")

    # --- holding it

    def _start_refreshing(self) -> None:
        self._thread = threading.Thread(target=self._refresh, name="run-lock-lease", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(LEASE_REFRESH):
            found, _ = self._read()
            if found is None or found.token != self.holder.token:
                # Taken over (this process stalled past the lease, or someone deleted the lock): say so, loudly.
                log.error("%s is no longer this training's: %s; another training may now write into %s.", self.path,
                          f"taken over by {found.describe()}" if found else "it was removed", self.folder)
                return
            try:
                os.utime(self.path)
            except OSError as err:   # the folder is gone or unreachable: the run's own writes will say so
                log.warning("could not refresh %s (%s)", self.path, err)

    def holds(self) -> bool:
        found, _ = self._read()
        return found is not None and found.token == self.holder.token

    def release(self) -> None:
        """Stop refreshing and delete run.lock, if it is still this process's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.holds():
            self.path.unlink(missing_ok=True)

    def remove_folder_if_unused(self) -> None:
        """A start refused after this lock was taken leaves nothing behind: the folder, if this start created it and
        no checkpoint was saved in it (what is there is start-up's log.txt and this lock)."""
        checkpoints = self.folder / "checkpoints"
        if self.created and not (checkpoints.is_dir() and any(checkpoints.iterdir())):
            self.release()
            shutil.rmtree(self.folder, ignore_errors=True)
