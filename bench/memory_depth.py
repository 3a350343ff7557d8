"""Activation memory and step time of ViT-S at depth 12, 24 and 48, with per-block activation checkpointing off and on.

One training step is forward, backward and an AdamW step of attnscale_small_{12,24,48} at 224 px.
"Activation memory" is the peak memory during the step minus the memory held before it, measured
after a warm-up step, so weights, gradients (zeroed in place, not freed) and Adam's state already
exist and are not counted. Checkpointing is antismooth.engine.apply_activation_checkpointing(model, 1),
what pretrain.py applies for `"activation_checkpointing": {"blocks_per_checkpoint": 1}`.

Memory, per configuration, in a fresh subprocess of its own (so its peak is its own):
  - activation MiB, the allocator peak (exact, on both devices): CUDA's max_memory_allocated above
    memory_allocated; on CPU the running sum of every c10 CPU allocation and free as the profiler
    records them (profile_memory=True). No allocator cache, no fragmentation.
  - peak RSS (CPU only): VmHWM - VmRSS of one step, the high-water mark reset just before it
    (`echo 5 > /proc/self/clear_refs`). glibc's heap would keep and re-fault freed blocks, so this
    process runs with a fixed mmap threshold (MEMORY_ENV); RSS then agrees with the allocator count.
  - kept for backward: the bytes autograd holds at the end of the forward, by storage: tensors packed
    by saved-tensor hooks (parameters excluded) plus the blocks' inputs. Non-reentrant checkpointing
    keeps a segment's input for its recompute and nothing else of it. Depending on the torch version
    that input is a saved tensor (2.14: a SavedTensor the hooks see) or a reference in a closure
    (early non-reentrant versions), so the inputs are also counted by forward pre-hooks on the
    blocks, and the table says how many of them the hooks saw.

Step time: the median of the timed steps of all rounds, in other processes (glibc defaults, as in
training), the configurations interleaved round by round (order reversed every other round); each
ratio is against the unchecked step at the same depth measured in the same run.

With --offload a third setting runs: checkpointing with the block inputs kept in host memory
(apply_activation_checkpointing(model, 1, offload=True)); it lowers device memory on CUDA only.

    python bench/memory_depth.py                             # CPU, batch 4, float32
    python bench/memory_depth.py --device cuda --offload     # batch 64, bf16 autocast
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEPTHS = (12, 24, 48)
MODES = ("off", "on")             # activation checkpointing; "offload" (--offload) also keeps block inputs on the host
MIB = 2**20
# glibc keeps freed blocks below its mmap threshold (which it raises at run time, up to 32 MiB) in the
# heap and reuses them imperfectly: so a step's RSS grew by ~2x the bytes it allocated (depth 12, AC on,
# 85 vs 42 MiB). A fixed 64 KiB threshold, set before the process allocates, gives every tensor of
# that size or more its own mapping, returned to the system when freed: RSS then follows live tensors.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
# The targets.
TARGET_DEPTH_RATIO = 1.2      # AC on: activation memory at depth 48 <= 1.2x that at depth 12
TARGET_TIME_RATIO = 1.35      # AC on: step time <= 1.35x the unchecked step


def measure(depth: int, ac: str, batch: int, steps: int, device: str, dtype: str, drop_path: float,
            threads: int, memory: bool) -> dict:
    """Build attnscale_small_{depth} and warm up one step; then time `steps` steps, or (memory) measure one
    step with RSS and saved-tensor counts and one under the profiler (CPU) or the allocator's stats (CUDA)."""
    import timm
    import torch
    import torch.nn.functional as F

    import antismooth  # noqa: F401  (registers the model zoo)
    from antismooth.engine import apply_activation_checkpointing, param_groups
    from antismooth.models import structure

    cuda = device.startswith("cuda")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model(f"attnscale_small_{depth}", drop_path_rate=drop_path).to(device).train()
    if ac != "off":
        apply_activation_checkpointing(model, 1, **({"offload": True} if ac == "offload" else {}))
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
    size = structure.input_size(model)
    x = torch.randn(batch, 3, *size, device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype),
                              enabled=dtype != "float32")
    marks: list[tuple[str, int, int]] = []   # GPU: (phase, allocated, peak since the previous boundary)
    phase_hooks: list = []                    # called with the name of each phase that ends

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def end_of(phase: str) -> None:
        if cuda:
            sync()
            marks.append((phase, torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()))
            torch.cuda.reset_peak_memory_stats()
        for hook in phase_hooks:
            hook(phase)

    def step() -> None:
        with torch.profiler.record_function("phase:forward"):
            with autocast:
                loss = F.cross_entropy(model(x), y)
        end_of("forward")
        with torch.profiler.record_function("phase:backward"):
            loss.backward()
            del loss
        end_of("backward")
        with torch.profiler.record_function("phase:optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)  # the gradients stay allocated: not activation memory
        end_of("optimizer")

    step()  # warm-up: gradients and Adam's state now exist
    sync()
    if not memory:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        return {"times": times}

    result = {}
    result.update(kept_for_backward(model, x, phase_hooks, _rss_step(step) if not cuda else step))

    gc.collect()
    if cuda:
        marks.clear()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        result.update(before_bytes=before, forward_end_bytes=marks[0][1] - before,
                      phase_peak_bytes={phase: peak - before for phase, _, peak in marks})
    else:
        result.update(_profiled_step(step))
    result["activation_bytes"] = max(result["phase_peak_bytes"].values())
    result["peak_phase"] = max(result["phase_peak_bytes"], key=result["phase_peak_bytes"].get)
    return result


def kept_for_backward(model, x, phase_hooks: list, run_step) -> dict:
    """Run one step with saved-tensor hooks and block pre-hooks: the bytes held for backward at the end of the
    forward that the step allocated (parameters and the input batch x excluded).

    run_step returns the step's peak RSS on CPU (None on GPU)."""
    import torch

    from antismooth.models import structure

    params = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    saved: dict[int, int] = {}
    inputs: dict[int, int] = {}
    forward = [True]

    def pack(t: torch.Tensor) -> torch.Tensor:
        # Backward's recompute saves under checkpoint's own hooks, not these; the flag is for certainty.
        if forward[0]:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                saved[storage.data_ptr()] = storage.nbytes()
        return t

    def pre_hook(module, args) -> None:
        if forward[0]:  # not the recompute in backward
            storage = args[0].untyped_storage()
            inputs[storage.data_ptr()] = storage.nbytes()

    def end_of(phase: str) -> None:
        if phase == "forward":
            forward[0] = False

    handles = [block.register_forward_pre_hook(pre_hook) for block in structure.blocks(model)]
    phase_hooks.append(end_of)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            rss = run_step()
    finally:
        for handle in handles:
            handle.remove()
        phase_hooks.remove(end_of)
    union = {**saved, **inputs}
    return {"kept_bytes": sum(union.values()), "input_bytes": sum(inputs.values()), "inputs": len(inputs),
            "inputs_seen_by_hooks": sum(1 for ptr in inputs if ptr in saved),
            "block_input_bytes": max(inputs.values()) if inputs else 0,
            "rss_bytes": rss}


def _rss_step(step):
    """A function that runs one step and returns its peak RSS above the RSS before it (VmHWM reset just
    before the step, the heap trimmed first so the allocator's cached free memory is not counted as held)."""
    return lambda: _peak_rss_of(step)


def _peak_rss_of(step) -> int:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _proc_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    if _proc_status("VmHWM") > before + 4 * MIB:
        raise RuntimeError("Writing 5 to /proc/self/clear_refs did not reset VmHWM: peak RSS cannot be measured.")
    step()
    return _proc_status("VmHWM") - before


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _profiled_step(step) -> dict:
    """One CPU step under the profiler: the running sum of every allocation and free, per phase."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()

    def walk(events):
        for event in events:
            yield event
            yield from walk(event.children)

    events = list(walk(prof.profiler.kineto_results.experimental_event_tree()))
    allocations = sorted((e.start_time_ns, e.extra_fields.alloc_size) for e in events
                         if e.tag == _EventType.Allocation and str(e.extra_fields.device) == "cpu")
    bounds = sorted((e.start_time_ns, e.name.split(":", 1)[1]) for e in events
                    if e.tag == _EventType.TorchOp and e.name.startswith("phase:"))
    if [name for _, name in bounds] != ["forward", "backward", "optimizer"]:
        raise RuntimeError(f"Profiler phases not found in order: {bounds}")
    phase_peak = {name: 0 for _, name in bounds}
    forward_end = 0
    total, i = 0, 0
    for t, size in allocations:
        while i + 1 < len(bounds) and t >= bounds[i + 1][0]:
            i += 1
            if bounds[i][1] == "backward":
                forward_end = total
        total += size
        phase_peak[bounds[i][1]] = max(phase_peak[bounds[i][1]], total)
    return {"phase_peak_bytes": phase_peak, "forward_end_bytes": forward_end, "alloc_events": len(allocations)}


def _run_in_subprocess(depth: int, ac: str, memory: bool, args: argparse.Namespace) -> dict:
    job = json.dumps(dict(depth=depth, ac=ac, batch=args.batch, steps=args.steps, device=args.device,
                          dtype=args.dtype, drop_path=args.drop_path, threads=args.threads, memory=memory))
    env = dict(os.environ, **(MEMORY_ENV if memory else {}))
    out = subprocess.run([sys.executable, __file__, "--child", job], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"depth {depth}, AC {ac} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, help="per step (default: 4 on CPU, 64 on CUDA)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="autocast dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth (pretrain.py's default)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration and round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds (median across them)")
    parser.add_argument("--offload", action="store_true",
                        help="also AC with the block inputs in host memory (apply_activation_checkpointing's offload; "
                             "meaningful on CUDA only)")
    parser.add_argument("--threads", type=int,
                        help="torch threads per process (default on CPU: 1; 0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.batch = args.batch or (64 if cuda else 4)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    # On a CPU shared with other busy processes, OpenMP's 2 threads spin at barriers against them: a
    # ViT-S/12 step took 4x longer with 2 threads than with 1 here, and varied more. One thread is steadier.
    args.threads = (0 if cuda else 1) if args.threads is None else args.threads
    args.modes = MODES + (("offload",) if args.offload else ())

    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return 0

    start = time.perf_counter()
    # Memory first, once per configuration (the allocator counts are exact, the same in any round), in
    # processes with MEMORY_ENV; then the timing rounds, with glibc's defaults as in training.
    memory = {}
    configs = [(depth, ac) for depth in DEPTHS for ac in args.modes]
    for depth, ac in configs:
        memory[(depth, ac)] = _run_in_subprocess(depth, ac, True, args)
        _progress(f"memory: depth {depth} AC {ac} "
                  f"{memory[(depth, ac)]['activation_bytes'] / MIB:.1f} MiB", start)
    times: dict[tuple[int, str], list[float]] = {config: [] for config in configs}
    for r in range(args.rounds):
        for depth, ac in (configs if r % 2 == 0 else configs[::-1]):
            times[(depth, ac)] += _run_in_subprocess(depth, ac, False, args)["times"]
            _progress(f"round {r + 1}/{args.rounds}: depth {depth} AC {ac} "
                      f"{times[(depth, ac)][-1] * 1e3:.0f} ms", start)
    rows = {config: dict(memory[config], seconds=statistics.median(times[config]), times=times[config])
            for config in configs}
    _print_report(rows, args, time.perf_counter() - start)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        figures = {f"{d}/{ac}": row for (d, ac), row in rows.items()}
        args.json.write_text(json.dumps({"args": vars(args), **figures}, indent=2, default=str) + "\n")
    return 0


def _progress(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:4.0f} s] {message}", file=sys.stderr, flush=True)


def _fmt_ratio(value: float, target: float) -> str:
    return f"{value:.2f}× ({'met' if value <= target else 'NOT met'}, target ≤ {target}×)"


def _print_report(rows: dict, args: argparse.Namespace, seconds: float) -> None:
    cpu = not args.device.startswith("cuda")
    print(f"\nattnscale_small_{{12,24,48}} @224, batch {args.batch}, {args.device}, {args.dtype}, drop path "
          f"{args.drop_path}: forward + backward + AdamW step; {args.rounds} rounds × {args.steps} timed steps; "
          f"{seconds:.0f} s in all\n")
    head = "| depth | AC | step ms | × unchecked | activation MiB | × depth 12 |"
    rule = "|---:|---|---:|---:|---:|---:|"
    if cpu:
        head += " peak RSS MiB | × depth 12 |"
        rule += "---:|---:|"
    head += " kept for backward MiB | of it block inputs MiB | inputs seen by hooks |"
    rule += "---:|---:|---:|"
    print(head)
    print(rule)
    for depth, ac in rows:
        r, off, d12 = rows[(depth, ac)], rows[(depth, "off")], rows[(DEPTHS[0], ac)]
        line = (f"| {depth} | {ac} | {r['seconds'] * 1e3:.0f} | {r['seconds'] / off['seconds']:.2f} | "
                f"{r['activation_bytes'] / MIB:.1f} | {r['activation_bytes'] / d12['activation_bytes']:.2f} |")
        if cpu:
            line += f" {r['rss_bytes'] / MIB:.1f} | {r['rss_bytes'] / d12['rss_bytes']:.2f} |"
        line += (f" {r['kept_bytes'] / MIB:.1f} | {r['input_bytes'] / MIB:.1f} | "
                 f"{r['inputs_seen_by_hooks']:.0f}/{r['inputs']:.0f} |")
        print(line)
    print("\nactivation MiB: exact allocator peak of the step above the memory held before it "
          f"({'c10 CPU allocator events from the profiler' if cpu else 'torch.cuda.max_memory_allocated'}); "
          f"the peak fell in the {', '.join(sorted({r['peak_phase'] for r in rows.values()}))}.")
    worst = max(abs(r["kept_bytes"] - r["forward_end_bytes"]) / r["forward_end_bytes"] for r in rows.values())
    print("kept for backward (saved-tensor hooks ∪ block inputs, by storage) against the allocator's live bytes at "
          f"the end of the forward: within {worst:.1%} in every configuration.")

    deep, shallow = DEPTHS[-1], DEPTHS[0]
    on48, on12 = rows[(deep, "on")], rows[(shallow, "on")]
    print("\nTargets:")
    print(f"- AC on, activation memory depth {deep} / depth {shallow}: "
          + _fmt_ratio(on48["activation_bytes"] / on12["activation_bytes"], TARGET_DEPTH_RATIO)
          + (f"; by peak RSS {on48['rss_bytes'] / on12['rss_bytes']:.2f}×" if cpu else ""))
    for depth in DEPTHS:
        print(f"- AC on, step time / unchecked step at depth {depth}: "
              + _fmt_ratio(rows[(depth, "on")]["seconds"] / rows[(depth, "off")]["seconds"], TARGET_TIME_RATIO))
    if "offload" in args.modes:
        off48, off12 = rows[(deep, "offload")], rows[(shallow, "offload")]
        print(f"- AC on with block inputs offloaded, activation memory depth {deep} / depth {shallow}: "
              + _fmt_ratio(off48["activation_bytes"] / off12["activation_bytes"], TARGET_DEPTH_RATIO)
              + f"; step time / unchecked step at depth {deep}: "
              + _fmt_ratio(off48["seconds"] / rows[(deep, "off")]["seconds"], TARGET_TIME_RATIO)
              + ("" if not cpu else " (on CPU the host is the device: offloading cannot lower this memory)"))

    # What grows with depth under per-block checkpointing: one stored input per block.
    measured = "offload" in args.modes
    print("\nAC on, where the activation memory goes (at the peak every block input is still stored):")
    print("| depth | activation MiB | stored block inputs MiB | share | rest: one-block recompute working set "
          "+ stem/head MiB | expected with inputs offloaded to host MiB |" + (" measured with offload MiB |" if measured else ""))
    print("|---:|---:|---:|---:|---:|---:|" + ("---:|" if measured else ""))
    offload = {}
    for depth in DEPTHS:
        r = rows[(depth, "on")]
        stored = r["input_bytes"]
        rest = r["activation_bytes"] - stored
        # Offloaded, a block's input comes back to the device only for its own recompute: one stays resident.
        offload[depth] = rest + r["block_input_bytes"]
        print(f"| {depth} | {r['activation_bytes'] / MIB:.1f} | {stored / MIB:.1f} | {stored / r['activation_bytes']:.0%} "
              f"| {rest / MIB:.1f} | {offload[depth] / MIB:.1f} |"
              + (f" {rows[(depth, 'offload')]['activation_bytes'] / MIB:.1f} |" if measured else ""))
    per_block = on12["block_input_bytes"]
    print(f"\nOne block input is {per_block / MIB:.2f} MiB (batch {args.batch} × 197 tokens × 384 × "
          f"{per_block / (args.batch * 197 * 384):.0f} bytes); the stored inputs grow by that per block, the rest "
          f"stays {on12['activation_bytes'] / MIB - on12['input_bytes'] / MIB:.1f} → "
          f"{on48['activation_bytes'] / MIB - on48['input_bytes'] / MIB:.1f} MiB from depth {shallow} to {deep}.")
    print(f"With the block inputs offloaded to host memory (DeepSpeed's cpu_checkpointing idea), depth {deep} / "
          f"depth {shallow} would be {offload[deep] / offload[shallow]:.2f}× "
          f"(target ≤ {TARGET_DEPTH_RATIO}×), at the cost of copying {on48['input_bytes'] / MIB:.0f} MiB to the host "
          f"and back per step at depth {deep}.")


if __name__ == "__main__":
    sys.exit(main())
