"""Imported by the loader workers' forkserver alone (pipeline.FORKSERVER_PRELOAD), never by a training process.

1. The server dies with the process that started it. A training process killed outright (out of memory, SIGKILL)
   would otherwise leave the server and its workers behind for good: torch's worker watchdog looks for a change of
   parent, and a forkserver worker's parent is the server. With the server gone, the workers are reparented, see
   it, and exit. (The signal follows the thread that started the server: the thread that made the first loader.)
2. The server, and so every worker, ignores the signals that tell the training process to save and stop
   (antismooth.interrupt): SLURM sends them to every process of the step, and a worker they ended would take the
   loader down before the training process reaches its next step boundary.
3. The server imports the main script, which CPython's own '__main__' preload never does before 3.13.8
   (pipeline._hand_main_to_server), so that each worker, a fork of the server, finds it imported."""
import ctypes
import json
import os
import signal
import sys
from multiprocessing import process, spawn

from antismooth.data.pipeline import FORKSERVER_MAIN_ENV

IGNORED_SIGNALS_ENV = "ANTISMOOTH_IGNORED_SIGNALS"   # antismooth.interrupt's (not imported: it loads the trainer's)

PR_SET_PDEATHSIG = 1   # linux/prctl.h

if sys.platform.startswith("linux"):
    _parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != _parent:   # the starter died before the signal was armed
        os._exit(0)


for _number in filter(None, os.environ.get(IGNORED_SIGNALS_ENV, "").split(",")):
    signal.signal(int(_number), signal.SIG_IGN)


def _import_main(data: dict) -> None:
    """What multiprocessing's own preload does where it works, with the worker's sys.path and argv."""
    if getattr(sys.modules["__main__"], "__file__", None) == data["init_main_from_path"]:
        return   # CPython's preload did it
    sys.path[:], sys.argv[:] = data["sys_path"], data["sys_argv"]
    process.current_process()._inheriting = True
    try:
        spawn.import_main_path(data["init_main_from_path"])
    except BaseException:   # noqa: BLE001  each worker then imports it itself, as before, and reports what fails
        pass
    finally:
        del process.current_process()._inheriting


if FORKSERVER_MAIN_ENV in os.environ:
    _import_main(json.loads(os.environ[FORKSERVER_MAIN_ENV]))
