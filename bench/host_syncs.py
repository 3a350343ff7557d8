"""Step time of a real DeepSpeed engine when each step's loss is read back at once vs at log steps only.

The training loop (antismooth/train.py) keeps each optimizer step's loss on the device (`PendingLosses`) and
reads all pending ones back in one all-reduce at log steps and before saves. This bench times the same
steps of one engine with the read-back after every step (what the loop did before: `.item()` and an
all-reduce per step) and after every `--every` steps, interleaved round by round, as a ratio in one run.
On a CPU the device is the host, so no stall is expected there; on a GPU each read-back waits for the
queued kernels to finish.

    python bench/host_syncs.py                              # CPU, attnscale_tiny_24 at 32 px, one process
    python bench/host_syncs.py --device cuda --model attnscale_small_24 --img-size 224 --batch 64
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def build_engine(args: argparse.Namespace):
    import deepspeed
    import timm
    import torch

    import antismooth  # noqa: F401  (registers the zoo)
    from antismooth.distributed import init_distributed
    from antismooth.engine import param_groups

    env = init_distributed(device_type=args.device)
    torch.manual_seed(0)
    kwargs = dict(img_size=args.img_size, num_classes=10)
    if args.model == "attnscale_tiny_24":
        kwargs.update(patch_size=4, embed_dim=64, num_heads=4)
    model = timm.create_model(args.model, **kwargs)
    config = {"train_batch_size": args.batch, "zero_optimization": {"stage": 2},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.05, "torch_adam": True}},
              "steps_per_print": 10**9, **({"bf16": {"enabled": True}} if args.device == "cuda" else {})}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.05), config=config)
    return engine, env


def run(engine, env, args: argparse.Namespace, every: int) -> float:
    """Seconds per optimizer step over `args.steps` steps, reading the losses back every `every` steps."""
    import torch
    import torch.nn.functional as F

    from antismooth.train import PendingLosses

    device, dtype = env.device, torch.bfloat16 if env.device.type == "cuda" else torch.float32
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device, dtype=dtype)
    targets = torch.randint(0, 10, (args.batch,), device=device)
    pending = PendingLosses(engine.skipped_steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = F.cross_entropy(engine(images).float(), targets)
        engine.backward(loss)
        engine.step()
        pending.add(step, loss.detach(), engine.skipped_steps)
        if step % every == 0:
            pending.read(env.world_size)
    pending.read(env.world_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / args.steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="attnscale_tiny_24")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=30, help="steps per timing")
    p.add_argument("--every", type=int, default=10, help="the loop's read-back interval (pretrain's --log-every)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    engine, env = build_engine(args)
    run(engine, env, args, 1)   # warm-up: allocator, kernels, DeepSpeed's buckets
    times: dict[str, list[float]] = {"every step": [], f"every {args.every} steps": []}
    for _ in range(args.rounds):
        for name, every in (("every step", 1), (f"every {args.every} steps", args.every)):
            times[name].append(run(engine, env, args, every))
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["every step"]
    if env.rank == 0:
        print(f"{args.model}, {args.img_size} px, batch {args.batch}, {env.device}, median of {args.rounds} "
              f"interleaved rounds × {args.steps} steps\n")
        print("| loss read back | ms per step | × every step |\n|---|---:|---:|")
        for name, median in medians.items():
            print(f"| {name} | {1000 * median:.1f} | {median / base:.3f} |")
        if args.json:
            args.json.write_text(json.dumps({"config": vars(args) | {"json": str(args.json)},
                                             "ms_per_step": {k: 1000 * v for k, v in medians.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
