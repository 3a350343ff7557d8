"""The contract every command keeps with its user, written once (docs/commands.md).

Anything a user can get wrong (a path, a number, an output that exists, a flag) is checked before any work is
done and reported as one sentence naming the value and the fix: `error: <sentence>` on stderr, exit status 2, no
traceback, nothing written. Ctrl-C is one line and exit status 130. The error is antismooth.settings.ConfigError
(pretrain.py's), raised by the checks below or by any library code that finds a user's mistake; `entry_point`
turns it into the line and the status, and `ArgumentParser` makes argparse's own complaints the same one line.
Standard library only.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

from antismooth.settings import ArgumentParser, ConfigError  # noqa: F401  (ArgumentParser: the commands')

__all__ = ["ConfigError", "USAGE_EXIT", "INTERRUPTED_EXIT", "ArgumentParser", "entry_point", "fail",
           "readable_file", "readable_folder", "readable_path", "writable_folder", "writable_file", "output_folder",
           "at_least", "in_range"]

USAGE_EXIT = 2          # a mistake the user can fix, as argparse and pretrain.py
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports Ctrl-C

Number = TypeVar("Number", int, float)


def fail(sentence: str) -> None:
    """Report a user's mistake: the one sentence, naming the value and the fix."""
    raise ConfigError(sentence)


def entry_point(interrupted: str = "interrupted.", user_errors: tuple[type[BaseException], ...] = (),
                speaks: Callable[[], bool] = lambda: True):
    """Decorator of a command's `main(argv) -> int`: a ConfigError (or one of `user_errors`, the library's own
    exceptions that name the user's mistake) becomes `error: <sentence>` on stderr and exit status 2, Ctrl-C the
    line `interrupted` and 130. Anything else is a defect and keeps its traceback. `speaks`: whether this process
    prints the line (a command launched as many processes says it once, from rank 0; each exits 2 or 130)."""
    caught = (ConfigError, *user_errors)

    def wrap(main: Callable[[Optional[list[str]]], int]) -> Callable[[Optional[list[str]]], int]:
        @functools.wraps(main)
        def command(argv: Optional[list[str]] = None) -> int:
            try:
                return main(argv)
            except caught as err:
                if speaks():
                    print(f"error: {one_line(err)}", file=sys.stderr)
                return USAGE_EXIT
            except KeyboardInterrupt:
                if speaks():
                    print(interrupted, file=sys.stderr)
                return INTERRUPTED_EXIT
        return command
    return wrap


def one_line(err: BaseException) -> str:
    """The error's message on one line (a library's message may hold newlines)."""
    return " ".join(str(err).split())


# --- paths read --------------------------------------------------------------------------------------------------

def readable_path(path: str | os.PathLike, flag: str, fix: str) -> Path:
    """A file or folder the command reads: it exists and may be read. `fix` says what to pass instead."""
    p = Path(path)
    if not p.exists():
        fail(f"{flag} {p} does not exist: {fix}.")
    if not os.access(p, os.R_OK) or p.is_dir() and not os.access(p, os.X_OK):
        fail(f"{flag} {p} cannot be read (no permission): ask its owner for read access, or {fix}.")
    return p


def readable_file(path: str | os.PathLike, flag: str, fix: str) -> Path:
    """A file the command reads: it exists, is a file (not a folder) and may be read."""
    p = readable_path(path, flag, fix)
    if p.is_dir():
        fail(f"{flag} {p} is a folder, not a file: {fix}.")
    return p


def readable_folder(path: str | os.PathLike, flag: str, fix: str) -> Path:
    """A folder the command reads: it exists, is a folder (not a file) and may be listed and read."""
    p = readable_path(path, flag, fix)
    if not p.is_dir():
        fail(f"{flag} {p} is a file, not a folder: {fix}.")
    return p


# --- paths written -----------------------------------------------------------------------------------------------

def _nearest_existing(p: Path) -> Path:
    """p itself or its closest ancestor that exists (what creating p needs to be able to write in)."""
    p = Path(os.path.abspath(p))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _creatable(p: Path, flag: str) -> None:
    """p does not exist yet and can be created: its closest existing ancestor is a folder this user may write."""
    base = _nearest_existing(p.parent)
    if not base.is_dir():
        fail(f"{flag} {p} cannot be created: {base} is a file, not a folder; choose another path.")
    if not os.access(base, os.W_OK | os.X_OK):
        fail(f"{flag} {p} cannot be created: no permission to write in {base}; choose a folder you can write to.")


def writable_folder(path: str | os.PathLike, flag: str) -> Path:
    """An output folder: a folder this user may write in, or a path where one can be created (nothing is
    created here: a refusal further on leaves nothing behind)."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            fail(f"{flag} {p} is a file, not a folder: give a folder path (or move the file away).")
        if not os.access(p, os.W_OK | os.X_OK):
            fail(f"{flag} {p} cannot be written (no permission): choose a folder you can write to.")
    else:
        _creatable(p, flag)
    return p


def output_folder(path: str | os.PathLike, flag: str, overwrite: bool, holds: Sequence[str] = ()) -> Path:
    """An output folder whose files the command writes (`holds`: their names): writable, and holding none of them
    unless `overwrite` (the flag that allows it is --overwrite)."""
    p = writable_folder(path, flag)
    existing = [name for name in holds if (p / name).exists()]
    if existing and not overwrite:
        fail(f"{flag} {p} already holds {existing[0]}: pass --overwrite to replace it, or choose another folder.")
    return p


def writable_file(path: str | os.PathLike, flag: str, overwrite: bool) -> Path:
    """An output file: not a folder, absent unless `overwrite` (--overwrite), and creatable or replaceable."""
    p = Path(path)
    if p.is_dir():
        fail(f"{flag} {p} is a folder: give a file path.")
    if p.exists():
        if not overwrite:
            fail(f"{flag} {p} already exists: pass --overwrite to replace it, or choose another path.")
        if not os.access(p.parent, os.W_OK | os.X_OK):
            fail(f"{flag} {p} cannot be replaced: no permission to write in {p.parent}; choose another path.")
    else:
        _creatable(p, flag)
    return p


# --- numbers -----------------------------------------------------------------------------------------------------

def in_range(value: Optional[Number], flag: str, low: Optional[Number] = None, high: Optional[Number] = None,
             what: str = "") -> Optional[Number]:
    """A number given by a flag lies in [low, high] (either bound optional; None passes: the flag's default).
    `what` says what the value means, for the sentence."""
    if value is None:
        return value
    if low is not None and value < low or high is not None and value > high:
        bounds = (f"between {low} and {high}" if low is not None and high is not None
                  else f"at least {low}" if low is not None else f"at most {high}")
        fail(f"{flag} must be {bounds}{f' ({what})' if what else ''}, got {value}.")
    return value


def at_least(value: Optional[Number], flag: str, low: Number, what: str = "") -> Optional[Number]:
    """A count or size given by a flag is at least `low` (1 for a batch, a worker count's 0...)."""
    return in_range(value, flag, low=low, what=what)
