"""Stopping on a signal or at a wall-clock deadline: every rank saves the same step, then the job exits with
EXIT_SAVED_RESUBMIT ("saved, resubmit me").

A signal handler only sets a flag (saving inside the handler hangs intermittently, and a rank that decides alone
deadlocks the others). At each step boundary the ranks combine their flags with one all-reduce (max) that is launched
at step k and read at step k+1: under NCCL it runs on the GPU behind step k, its result is copied to pinned host
memory, and reading it waits for step k's end only, while step k+1's work is already queued, so no step waits on the
host for the flag. A signal that arrives during a save or an evaluation is seen at the next step boundary.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from datetime import datetime
from multiprocessing import resource_tracker
from typing import Callable, Optional

import torch

from .distributed import all_reduce_async

__all__ = ["EXIT_SAVED_RESUBMIT", "RunInterrupted", "StopRequests", "IGNORED_SIGNALS_ENV", "signal_number",
           "signals_end_the_rendezvous"]

log = logging.getLogger(__name__)

# sysexits.h's EX_TEMPFAIL, "a temporary failure; the user is invited to retry": distinct from pretrain's 2 (a
# setting to fix) and 3 (the run stopped itself). cluster/*.sbatch requeue the job on it.
EXIT_SAVED_RESUBMIT = 75
# The loader workers' forkserver reads which signals to ignore from here (antismooth.data._forkserver).
IGNORED_SIGNALS_ENV = "ANTISMOOTH_IGNORED_SIGNALS"

# What pretrain.py notes while it starts (before StopRequests exists): SIGTERM and the default --exit-signal.
EARLY_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)

NOTHING, DEADLINE, SIGNAL = 0, 1, 2   # combined with max: a signal outranks the deadline in the message


class RunInterrupted(Exception):
    """Every rank saved the same step and stops, to be started again with the same command."""


def signal_number(name: str) -> signal.Signals:
    """'SIGUSR2', 'USR2' or '12' as a signal."""
    text = name.strip().upper()
    try:
        return signal.Signals(int(text)) if text.isdigit() else signal.Signals[text if text.startswith("SIG")
                                                                               else "SIG" + text]
    except (KeyError, ValueError):
        raise ValueError(f"--exit-signal {name!r} is not a signal name: use e.g. SIGUSR2 or SIGUSR1.") from None


def _early_notes(number: int) -> Optional[list]:
    """The signals pretrain.py's start-up handler noted for `number`'s slot; None when that handler is not installed."""
    return getattr(signal.getsignal(number), "received", None)


@contextlib.contextmanager
def signals_end_the_rendezvous(stop: Callable[[str], None]):
    """Until the ranks have met (torch's rendezvous), a SIGTERM or SIGUSR2 that pretrain.py's start-up notes took, or
    one arriving during the rendezvous, calls `stop(name)` at once, which ends the process: nothing was trained yet,
    so there is nothing to save, and no other rank waits in a collective for this one. (After the rendezvous a
    signal is the notes', then StopRequests': saved at the first step boundaries.)

    The rendezvous waits inside torch's store client (C++), where no Python signal handler runs: a rank whose peers
    never come (rank 0 refused to start, a node is gone) would otherwise ignore the launcher's SIGTERM and linger
    until its SIGKILL. CPython's C-level handler still writes each signal's number to the wakeup fd, so a thread
    that reads it can act. Where the notes are not installed (the default action ends the process anyway) or outside
    the main thread, this does nothing."""
    if threading.current_thread() is not threading.main_thread() or \
            all(_early_notes(number) is None for number in EARLY_SIGNALS):
        yield
        return
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    noted = [number for number in EARLY_SIGNALS if number in (_early_notes(number) or [])]
    if noted:   # before the wakeup fd: taken while importing, checking, taking the lock
        stop(signal.Signals(noted[0]).name)
    joined = threading.Event()
    watcher = threading.Thread(target=_stop_on_wakeup, args=(reader, joined, stop), name="antismooth-rendezvous-signals",
                               daemon=True)
    watcher.start()
    try:
        yield
    finally:
        joined.set()   # a signal from now on is the notes' (then StopRequests'): saved at the first step boundaries
        signal.set_wakeup_fd(previous)
        writer.close()   # the watcher's recv returns b"" and it ends
        watcher.join()
        reader.close()


def _stop_on_wakeup(reader: socket.socket, joined: threading.Event, stop: Callable[[str], None]) -> None:
    while (received := reader.recv(64)) and not joined.is_set():
        names = [signal.Signals(number).name for number in received if number in EARLY_SIGNALS]
        if names:
            stop(names[0])


def end_early_signal_notes() -> None:
    """For the modes that do not train (--eval-only, --throughput): pretrain.py's start-up handler gives way to the
    default action, and a signal it noted takes effect now."""
    for number in EARLY_SIGNALS:
        noted = _early_notes(number)
        if noted is not None:
            signal.signal(number, signal.SIG_DFL)
            if number in noted:
                signal.raise_signal(number)


class StopRequests:
    """This rank's flag (set by SIGTERM, the --exit-signal, or the --exit-after deadline) and its combination with
    the other ranks', read one step late."""

    def __init__(self, exit_signal: str = "SIGUSR2", exit_after_minutes: Optional[float] = None,
                 start: Optional[float] = None) -> None:
        self.signals = sorted({signal.SIGTERM, signal_number(exit_signal)})
        self.deadline = None if exit_after_minutes is None else (start or time.monotonic()) + 60 * exit_after_minutes
        self.received: Optional[str] = None   # the name of the first signal this rank received
        self.pending = None                   # (work, device tensor, host copy, event) of the combine in flight

    def install(self) -> None:
        """Handlers that only set the flag; the loader workers, forked later, ignore these signals."""
        if self.deadline is not None:   # the user's (and a test's) way to know when it happens
            log.info("--exit-after: the run saves and exits with %d at the first step boundary after %s",
                     EXIT_SAVED_RESUBMIT, self.deadline_wall_clock())
        if threading.current_thread() is not threading.main_thread():
            log.warning("training outside the main thread: signals keep their default action (only --exit-after "
                        "stops the run with a checkpoint).")
            return
        self._adopt_early_signals()
        for number in self.signals:   # the helper processes started now inherit "ignore" through their exec
            signal.signal(number, signal.SIG_IGN)
        resource_tracker.ensure_running()   # multiprocessing's: it ignores SIGTERM itself, not the --exit-signal
        for number in self.signals:
            signal.signal(number, self._on_signal)
        os.environ[IGNORED_SIGNALS_ENV] = ",".join(str(int(n)) for n in self.signals)

    def deadline_wall_clock(self) -> str:
        """The --exit-after deadline on this host's clock, to the second (rounded up)."""
        at = time.time() + (self.deadline - time.monotonic())
        return datetime.fromtimestamp(-(-at // 1)).strftime("%Y-%m-%d %H:%M:%S")

    def _adopt_early_signals(self) -> None:
        """What pretrain.py's start-up handler noted before this one existed: a signal of ours is this rank's flag; the
        others get their default action back."""
        for number in EARLY_SIGNALS:
            noted = _early_notes(number)
            if noted is None:
                continue
            if number in self.signals:
                if number in noted and self.received is None:
                    self.received = signal.Signals(number).name
            else:
                signal.signal(number, signal.SIG_DFL)

    def _on_signal(self, number: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(number).name

    def local(self) -> int:
        if self.received is not None:
            return SIGNAL
        return DEADLINE if self.deadline is not None and time.monotonic() >= self.deadline else NOTHING

    def at_step_boundary(self) -> int:
        """The combined request of the previous boundary (NOTHING on the first), and launch this boundary's."""
        decided = self._read()
        self._launch(self.local())
        return decided

    def _launch(self, value: int) -> None:
        flag, work = all_reduce_async(torch.tensor([value], dtype=torch.int32), op="max")
        host, event = flag, None
        if flag.device.type == "cuda":
            if work is not None:
                work.wait()   # orders the copy after the all-reduce on the GPU; the host does not wait
                work = None
            host = torch.empty_like(flag, device="cpu").pin_memory()
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self.pending = (work, flag, host, event)

    def _read(self) -> int:
        if self.pending is None:
            return NOTHING
        work, _flag, host, event = self.pending
        self.pending = None
        if work is not None:
            work.wait()
        if event is not None:
            event.synchronize()
        return int(host.item())

    def settle(self) -> None:
        """Finish the combine in flight, so that every rank has joined the same collectives before it leaves."""
        self._read()

    def reason(self, decided: int) -> str:
        if decided == DEADLINE:
            return "the --exit-after deadline"
        return self.received or "a signal to another rank"

