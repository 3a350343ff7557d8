"""Imported by the loader workers' forkserver alone (pipeline.FORKSERVER_PRELOAD), never by a training process: the
server then dies with the process that started it. A training process killed outright (out of memory, SIGKILL)
would otherwise leave the server and its workers behind for good: torch's worker watchdog looks for a change of
parent, and a forkserver worker's parent is the server. With the server gone, the workers are reparented, see it,
and exit. (The signal follows the thread that started the server: the thread that made the first loader.)"""
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1   # linux/prctl.h

if sys.platform.startswith("linux"):
    _parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != _parent:   # the starter died before the signal was armed
        os._exit(0)
