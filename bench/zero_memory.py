"""Per-rank memory of the model and optimizer state under ZeRO-1, -2 and -3 at world size 1 and 2.

Each figure comes from a real DeepSpeed engine (deepspeed.initialize with a config dict, as pretrain.py
builds it), measured on every rank at two points: after one training step (forward, backward, AdamW
step: weights, Adam's state and what DeepSpeed keeps), and after the next step's backward (the
gradients alive too, which ZeRO-1/2 free after each step). What is measured:
  - live tensors: the bytes of every tensor alive in the process, found by walking gc.get_objects()
    (parameters, ZeRO-3's param.ds_tensor partitions, DeepSpeed's flat buffers, gradients, Adam's
    state) and deduplicated by storage: the sum of unique untyped_storage().nbytes(). Exact and
    allocator-free; on CUDA torch.cuda.memory_allocated() is shown beside it.
  - RSS Δ (CPU): resident memory after the step minus before the model was built, the heap trimmed
    both times. Pages of a torch.empty buffer that were never written are not resident, so RSS can
    stay below the live-tensor bytes.
  - peak in a step: the allocator's peak during a third step (CUDA's max_memory_allocated; on CPU
    the running sum of the c10 allocations the profiler records) plus what was held when it began:
    includes that step's activations (batch --batch, no activation checkpointing) and DeepSpeed's
    gradient buckets, which ZeRO-1/2 allocate at reduce_bucket_size for each backward and free after.
All are taken relative to the same process before the engine was built, so imports, the process
group and earlier runs' leftovers do not count. The theoretical figure is Ψ parameters × bytes of
weights, gradients and Adam's m and v, partitioned as each stage does (ZeRO paper, Rajbhandari et
al. 2020, Fig. 1): ZeRO-1 w + g + (m + v)/N, ZeRO-2 w + (g + m + v)/N, ZeRO-3 (w + g + m + v)/N.

Two engine configurations: `project` is ds_configs/zero{1,2,3}.json as pretrain.py would use it
(on CPU: fp32 instead of bf16, torch's AdamW instead of the fused_adam build), `buckets` the same with
reduce_bucket_size (and ZeRO-2's allgather_bucket_size) at BUCKETS_ELEMENTS instead, because
DeepSpeed preallocates its gradient bucket(s) at that size per rank whatever the model's size.

One launch per world size, looping over configurations and stages inside (a launch costs ~20-40 s):

    python bench/zero_memory.py                                        # CPU, attnscale_small_24
    python bench/zero_memory.py --device cuda --model attnscale_base_24
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = (1, 2, 3)
WORLDS = (1, 2)
VARIANTS = ("project", "buckets")
BUCKETS_ELEMENTS = 5_000_000          # 20 MB of fp32 gradients per bucket
MIB = 2**20
TARGET_ZERO3_RATIO = 0.55             # the issue: ZeRO-3 per rank at 2 ranks <= 0.55x of 1 rank
# Every tensor of 64 KiB or more gets its own mapping, returned to the system when freed, so RSS
# follows what is alive rather than what glibc's heap keeps cached.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}


# --- worker: one process of a launch ------------------------------------------------------------------

def engine_config(stage: int, variant: str, batch: int, cuda: bool) -> dict:
    """ds_configs/zero{stage}.json for deepspeed.initialize, adapted to the device, the variant and the batch."""
    from antismooth.config import DeepSpeedSettings

    raw = json.loads((REPO / "ds_configs" / f"zero{stage}.json").read_text())
    raw.update(train_micro_batch_size_per_gpu=batch, gradient_accumulation_steps=1)
    raw.pop("train_batch_size", None)
    raw["optimizer"]["params"]["torch_adam"] = True      # torch's AdamW: no fused_adam JIT build
    if not cuda:
        raw["bf16"] = {"enabled": False}                   # CPU: fp32, as the tests train
    if variant == "buckets":
        zero = raw["zero_optimization"]
        zero["reduce_bucket_size"] = BUCKETS_ELEMENTS
        if stage in (1, 2):
            zero["allgather_bucket_size"] = BUCKETS_ELEMENTS
    world = int(os.environ.get("WORLD_SIZE", 1))
    return DeepSpeedSettings.from_dict(raw, world).for_deepspeed()


def rss_bytes() -> int:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("No VmRSS in /proc/self/status.")


def breakdown(engine, live: dict[int, int], before: dict[int, int]) -> dict[str, int]:
    """The new live bytes split by what holds them: weights, fp32 master copy, gradients, Adam state, other."""
    import torch

    optimizer = engine.optimizer
    groups: dict[str, list] = {"weights": [], "fp32 master": [], "gradients": [], "Adam m, v": []}
    for p in engine.module.parameters():
        groups["weights"] += [p.data, getattr(p, "ds_tensor", None)]
        groups["gradients"] += [p.grad, getattr(p, "grad_accum", None)]
    for name in ("bit16_groups_flat", "fp16_partitioned_groups_flat"):
        groups["weights"] += list(getattr(optimizer, name, None) or [])
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        masters = list(getattr(optimizer, name, None) or [])
        groups["fp32 master"] += masters
        groups["gradients"] += [m.grad for m in masters if isinstance(m, torch.Tensor)]
    averaged = getattr(optimizer, "averaged_gradients", None) or {}
    for value in averaged.values():
        groups["gradients"] += list(value) if isinstance(value, (list, tuple)) else [value]
    groups["gradients"].append(getattr(optimizer, "grad_partitions_flat_buffer", None))
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        groups["Adam m, v"] += [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]

    new = {ptr: n for ptr, n in live.items() if ptr not in before}
    result, claimed = {}, set()
    for name, tensors in groups.items():
        ptrs = {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)} & new.keys()
        ptrs -= claimed
        claimed |= ptrs
        result[name] = sum(new[p] for p in ptrs)
    result["other (buckets, …)"] = sum(n for p, n in new.items() if p not in claimed)
    return result


def step_peak(step, cuda: bool) -> int:
    """The allocator's peak during one training step above what was allocated when it began."""
    from antismooth.memory import allocator_peak

    return allocator_peak(step, cuda)


def measure_stage(model_name: str, stage: int, variant: str, batch: int, device_type: str) -> dict:
    """Build the engine, run one training step, and measure what it holds on this rank."""
    import deepspeed
    import timm
    import torch
    import torch.nn.functional as F

    from antismooth.engine import param_groups
    from antismooth.memory import live_tensor_storages
    from antismooth.models import structure

    cuda = device_type == "cuda"
    config = engine_config(stage, variant, batch, cuda)
    held_before: list = []
    live_before = live_tensor_storages(device_type, held_before)
    rss_before = None if cuda else rss_bytes()
    cuda_before = torch.cuda.memory_allocated() if cuda else None

    torch.manual_seed(0)
    model = timm.create_model(model_name)
    num_params = sum(p.numel() for p in model.parameters())
    threshold = config["zero_optimization"].get("stage3_param_persistence_threshold", 100_000)
    persistent = sum(p.numel() for p in model.parameters() if p.numel() < threshold)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.05), config=config)
    del model
    dtype = torch.bfloat16 if config.get("bf16", {}).get("enabled") else torch.float32
    x = torch.randn(batch, 3, *structure.input_size(engine.module), device=engine.device, dtype=dtype)
    y = torch.randint(0, engine.module.num_classes, (batch,), device=engine.device)
    def forward_backward() -> None:
        engine.backward(F.cross_entropy(engine(x).float(), y))

    def held() -> dict:
        live = live_tensor_storages(device_type)
        return {"live_bytes": sum(n for p, n in live.items() if p not in live_before),
                "breakdown": breakdown(engine, live, live_before),
                "rss_bytes": None if cuda else rss_bytes() - rss_before,
                "cuda_allocated_bytes": torch.cuda.memory_allocated() - cuda_before if cuda else None}

    start = time.perf_counter()
    forward_backward()
    engine.step()
    if cuda:
        torch.cuda.synchronize()
    step_seconds = time.perf_counter() - start
    after_step = held()
    forward_backward()   # the second step's gradients: alive until its optimizer step
    with_grads = held()
    engine.step()
    peak = step_peak(lambda: (forward_backward(), engine.step()), cuda) + after_step["live_bytes"]
    x = y = None   # the closures hold them: assigning (not del) frees them and keeps the names bound
    result = {
        "stage": stage, "variant": variant, "rank": int(os.environ.get("RANK", 0)),
        "world": int(os.environ.get("WORLD_SIZE", 1)), "num_params": num_params, "persistent_params": persistent,
        "weight_bytes": torch.finfo(dtype).bits // 8, "step_seconds": step_seconds,
        "live_before_bytes": sum(live_before.values()), "after_step": after_step, "with_grads": with_grads,
        "step_peak_bytes": peak,
        "config": config["zero_optimization"],
    }
    engine.destroy()
    engine = None
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    import antismooth  # noqa: F401  (registers the model zoo)
    from antismooth.distributed import init_distributed

    cuda = args.device.startswith("cuda")
    init_distributed(device_type="cuda" if cuda else "cpu")  # as pretrain.py joins: NCCL on the GPU, else gloo
    results = []
    # DeepSpeed 0.19.8's ZeRO-3 engine stays alive after destroy() (its state, ~20 bytes per parameter
    # here, is never freed in-process), so the ZeRO-3 runs come last; every figure counts only the
    # storages that are new to its own run.
    for stage in sorted(args.stages):
        for variant in args.variants:
            results.append(measure_stage(args.model, stage, variant, args.batch, "cuda" if cuda else "cpu"))
            dist.barrier()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, results)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps([r for rank in everyone for r in rank], indent=1))
    dist.barrier()


# --- driver: the launches and the tables -------------------------------------------------------------


def launch(world: int, args: argparse.Namespace, out: Path) -> float:
    """Run the worker on `world` processes: the deepspeed launcher for 2+, plain python with the env for 1."""
    from antismooth.distributed import free_port

    worker_args = [str(Path(__file__).resolve()), "--worker", "--out", str(out), "--model", args.model,
                   "--device", args.device, "--batch", str(args.batch), "--stages", *map(str, args.stages),
                   "--variants", *args.variants]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(WORKER_ENV, PYTHONUNBUFFERED="1")
    if world == 1:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()))
        cmd = [sys.executable, *worker_args]
    else:
        cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(world),
               "--master_port", str(free_port()), *worker_args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        raise SystemExit(f"world {world} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return time.perf_counter() - start


def theory_bytes(r: dict, master: bool = False) -> float:
    """Ψ × (weights + gradients + Adam m + v), partitioned as the stage does; m and v in fp32. With
    master, also the fp32 master copy that DeepSpeed partitions with the optimizer state (it keeps one
    even when the weights are fp32)."""
    psi, n, w = r["num_params"], r["world"], r["weight_bytes"]
    weights, grads, state = w * psi, w * psi, (12 if master else 8) * psi
    partitioned = {1: weights + grads + state / n, 2: weights + (grads + state) / n, 3: (weights + grads + state) / n}
    return partitioned[r["stage"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="attnscale_small_24")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1,
                        help="images per rank and step (only the step time and the step peak depend on it)")
    parser.add_argument("--stages", type=int, nargs="+", default=list(STAGES))
    parser.add_argument("--worlds", type=int, nargs="+", default=list(WORLDS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the launcher's
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    start = time.perf_counter()
    rows, launches = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            out = Path(tmp) / f"world{world}.json"
            launches[world] = launch(world, args, out)
            print(f"world {world}: {launches[world]:.0f} s", file=sys.stderr, flush=True)
            rows += json.loads(out.read_text())
    report(rows, args, launches, time.perf_counter() - start)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args), "launch_seconds": launches, "rows": rows},
                                        indent=2, default=str) + "\n")
    return 0


def report(rows: list[dict], args: argparse.Namespace, launches: dict, seconds: float) -> None:
    cpu = not args.device.startswith("cuda")
    second = "rss_bytes" if cpu else "cuda_allocated_bytes"
    # Per configuration, the largest rank (partitions can differ by a few elements).
    per = {}
    for r in rows:
        key = (r["variant"], r["stage"], r["world"])
        if key not in per or r["with_grads"]["live_bytes"] > per[key]["with_grads"]["live_bytes"]:
            per[key] = r
    first = rows[0]
    print(f"\n{args.model}: Ψ = {first['num_params'] / 1e6:.2f} M parameters "
          f"({first['persistent_params'] / 1e6:.2f} M in tensors below ZeRO-3's persistence threshold), {args.device}, "
          f"{'fp32' if first['weight_bytes'] == 4 else 'bf16'} weights; per-rank memory of the largest rank; "
          f"launches {', '.join(f'world {w}: {s:.0f} s' for w, s in launches.items())}; {seconds:.0f} s in all")
    for variant in args.variants:
        title = {"project": "ds_configs/zero{1,2,3}.json as pretrain.py uses them",
                 "buckets": f"the same with reduce_bucket_size = {BUCKETS_ELEMENTS:.0e} elements"}[variant]
        print(f"\n{variant}: {title}\n")
        print("| stage | world | after step MiB | × world 1 same stage | × world 1 ZeRO-1 | with gradients MiB | "
              f"× world 1 same stage | {'RSS Δ' if cpu else 'memory_allocated'} MiB (with gradients) | "
              "theory MiB (w, g, m, v) | theory + fp32 master MiB | peak in a step MiB |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        z1 = per.get((variant, 1, 1))
        for stage in args.stages:
            w1 = per.get((variant, stage, 1))
            for world in args.worlds:
                r = per.get((variant, stage, world))
                if r is None:
                    continue
                a, g = r["after_step"]["live_bytes"], r["with_grads"]["live_bytes"]
                ratio = (lambda v, base: f"{v / base:.2f}" if base else "—")
                print(f"| ZeRO-{stage} | {world} | {a / MIB:.1f} | "
                      f"{ratio(a, w1 and w1['after_step']['live_bytes'])} | "
                      f"{ratio(a, z1 and z1['after_step']['live_bytes'])} | {g / MIB:.1f} | "
                      f"{ratio(g, w1 and w1['with_grads']['live_bytes'])} | {r['with_grads'][second] / MIB:.1f} | "
                      f"{theory_bytes(r) / MIB:.1f} | {theory_bytes(r, master=True) / MIB:.1f} | "
                      f"{r['step_peak_bytes'] / MIB:.1f} |")
        print(f"\npeak in a step: held before the step + the allocator's peak during forward, backward and "
              f"optimizer step (batch {args.batch} per rank, its activations included).")
        print("\nwhat the live bytes with gradients are (MiB):\n")
        names = list(first["with_grads"]["breakdown"])
        print("| stage | world | " + " | ".join(names) + " |")
        print("|---|---:|" + "---:|" * len(names))
        for stage in args.stages:
            for world in args.worlds:
                r = per.get((variant, stage, world))
                if r is not None:
                    print(f"| ZeRO-{stage} | {world} | "
                          + " | ".join(f"{r['with_grads']['breakdown'][n] / MIB:.1f}" for n in names) + " |")
        if (variant, 3, 1) in per and (variant, 3, 2) in per:
            one, two = per[(variant, 3, 1)], per[(variant, 3, 2)]
            print(f"\nTarget ({variant}): ZeRO-3 per rank, 2 ranks / 1 rank ≤ {TARGET_ZERO3_RATIO}×:")
            for point, label in (("after_step", "after the step"), ("with_grads", "with gradients")):
                ratio = two[point]["live_bytes"] / one[point]["live_bytes"]
                extra = f"; by {'RSS' if cpu else 'memory_allocated'} {two[point][second] / one[point][second]:.2f}×"
                print(f"- {label}: {ratio:.2f}× ({'met' if ratio <= TARGET_ZERO3_RATIO else 'NOT met'}){extra}")


if __name__ == "__main__":
    sys.exit(main())
