"""Exact memory counts of a process: the tensors alive now, and the allocator's peak while a function runs.

Shared by the planner (antismooth/plan.py measures a model's activations with allocator_peak), the memory
benchmarks (bench/zero_memory.py) and the tests that check the planner against real DeepSpeed engines.
"""
from __future__ import annotations

import contextlib
import gc
import os
import re
import sys
import tempfile
from typing import Callable, Iterator, Optional

import torch

__all__ = ["live_tensor_storages", "allocator_peak", "allocation_timeline"]


def live_tensor_storages(device_type: str, hold: Optional[list] = None) -> dict[int, int]:
    """{storage pointer: bytes} of every tensor object alive on `device_type` (found by the garbage collector).

    With `hold`, the storages are also appended to it: held, none can be freed and its address reused by a
    new tensor, so "new since then" can be told by address alone."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type != device_type or obj.is_meta:
                continue
            storage = obj.untyped_storage()
        except Exception:  # noqa: BLE001  (half-built or exotic objects: not memory we can attribute)
            continue
        if storage.nbytes():
            storages[storage.data_ptr()] = storage.nbytes()
            if hold is not None:
                hold.append(storage)
    return storages


def allocator_peak(fn: Callable[[], object], cuda: bool = False) -> int:
    """The allocator's peak while `fn` runs above what was allocated when it began: CUDA's
    max_memory_allocated, or on CPU the running sum of the c10 allocations and frees the profiler records."""
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    total = peak = 0
    for size in allocation_timeline(fn):
        total += size
        peak = max(peak, total)
    return peak


def allocation_timeline(fn: Callable[[], object]) -> list[int]:
    """Every c10 CPU allocation (+bytes) and free (-bytes) while `fn` runs, in order, as the profiler records them."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _without_profiler_noise(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    stack, sizes = list(prof.profiler.kineto_results.experimental_event_tree()), []
    while stack:
        event = stack.pop()
        stack += event.children
        if event.tag == _EventType.Allocation and str(event.extra_fields.device) == "cpu":
            sizes.append((event.start_time_ns, event.extra_fields.alloc_size))
    return [size for _, size in sorted(sizes)]


# What the profiler's C++ side (kineto) writes to stderr on every CPU profile: its start/stop markers, and, on a
# machine without a CUDA driver, a failed device count (code 35: cudaErrorInsufficientDriver). Not errors.
_PROFILER_NOISE = re.compile(r"^(?:USDT|STAGE):.*SyncActivityProfilerHandler|gpuGetDeviceCount failed with code 35")


@contextlib.contextmanager
def _without_profiler_noise() -> Iterator[None]:
    """Capture the process's stderr (file descriptor 2, where C++ writes) while the profiler runs; pass on every
    line but kineto's noise. Python's own stderr output in between goes through the same descriptor, in order."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not _PROFILER_NOISE.search(line)]
            sys.stderr.write("".join(kept))
