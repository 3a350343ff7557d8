"""--compile against eager: training-step time, and compile time against depth.

Each configuration runs in a fresh process with an empty inductor cache of its own (so the compile is
timed whole, not read back from an earlier run's cache), with activation checkpointing every block as the
shipped configs do, forward + backward of a batch (the optimizer is not compiled). The step times of one
model are taken in interleaved rounds, compiled beside eager, and reported as a ratio; the compile time
(the first step less an eager step) at depths 12, 24 and 48 as a ratio to depth 12.

    python bench/compile_step.py                                # CPU: tiny and small at 224 px, depths 12/24/48
    python bench/compile_step.py --device cuda --dtype bfloat16 --batch 64
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEP_MODELS = ("attnscale_tiny_24", "attnscale_small_24")
DEPTH_MODEL, DEPTHS = "attnscale_small", (12, 24, 48)


def measure(model_name: str, compiled: bool, img_size: int, batch: int, steps: int, device: str, dtype: str) -> dict:
    """One process: build, (compile,) time the first step and then `steps` steps."""
    import timm
    import torch
    import torch.nn.functional as F

    import antismooth  # noqa: F401  (registers the zoo)
    from antismooth.engine import apply_activation_checkpointing, compile_blocks
    from antismooth.models import structure

    torch.manual_seed(0)
    model = timm.create_model(model_name, img_size=img_size).to(device).train()
    apply_activation_checkpointing(model, 1)
    if compiled:
        compile_blocks(structure.blocks(model))
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype), enabled=dtype != "float32")

    def step() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    first = step()
    times = [step() for _ in range(steps)]
    graphs = 0
    if compiled:
        from torch._dynamo.utils import counters
        graphs = int(counters["stats"]["unique_graphs"])
    return {"first_s": first, "step_s": statistics.median(times), "graphs": graphs,
            "blocks": len(structure.blocks(model))}


def run_worker(spec: dict) -> dict:
    """`spec` measured in a fresh process with a fresh inductor cache."""
    with tempfile.TemporaryDirectory() as cache:
        # The repository first, without dropping a PYTHONPATH that brings packages (`pip install --target`).
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, PYTHONPATH=path)
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                              text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the step-time comparison")
    p.add_argument("--models", nargs="+", default=list(STEP_MODELS))
    p.add_argument("--depths", type=int, nargs="*", default=list(DEPTHS), help="compile time at these depths")
    p.add_argument("--json", type=Path)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(measure(**spec)))
        return 0

    common = dict(img_size=args.img_size, batch=args.batch, steps=args.steps, device=args.device, dtype=args.dtype)
    results: dict = {"config": {k: v for k, v in vars(args).items() if k not in ("worker", "json")}, "step": {},
                     "compile_vs_depth": {}}
    print(f"{args.device}, {args.dtype}, {args.img_size} px, batch {args.batch}, activation checkpointing every block; "
          f"fresh process and inductor cache per measurement\n")
    print("| model | eager ms | compiled ms | compiled ÷ eager | graphs compiled |\n|---|---:|---:|---:|---:|")
    for name in args.models:
        rounds = {False: [], True: []}
        for _ in range(args.rounds):
            for compiled in (False, True):
                rounds[compiled].append(run_worker(dict(common, model_name=name, compiled=compiled)))
        eager = statistics.median(r["step_s"] for r in rounds[False])
        comp = statistics.median(r["step_s"] for r in rounds[True])
        results["step"][name] = {"eager_ms": 1000 * eager, "compiled_ms": 1000 * comp, "ratio": comp / eager,
                                 "graphs": rounds[True][-1]["graphs"]}
        print(f"| {name} | {1000 * eager:.0f} | {1000 * comp:.0f} | {comp / eager:.3f} | {rounds[True][-1]['graphs']} |")
    if args.depths:
        print("\n| depth | first compiled step s | eager step s | compile s | × depth " f"{args.depths[0]} | graphs |")
        print("|---:|---:|---:|---:|---:|---:|")
        base = None
        for depth in args.depths:
            name = f"{DEPTH_MODEL}_{depth}"
            compiled = run_worker(dict(common, model_name=name, compiled=True, steps=1))
            eager = run_worker(dict(common, model_name=name, compiled=False, steps=1))
            seconds = compiled["first_s"] - eager["step_s"]
            base = base or seconds
            results["compile_vs_depth"][depth] = {"compile_s": seconds, "ratio": seconds / base,
                                                  "graphs": compiled["graphs"]}
            print(f"| {depth} | {compiled['first_s']:.1f} | {eager['step_s']:.1f} | {seconds:.1f} | {seconds / base:.2f} | "
                  f"{compiled['graphs']} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
