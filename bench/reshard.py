"""Converting a ZeRO checkpoint for a resume at another world size: time and peak memory against its size.

For each ZeRO stage (2 and 3 by default), a real 2-process DeepSpeed engine (CPU, gloo, fp32, torch's AdamW)
of --model takes one training step (so Adam's moments exist) and saves a checkpoint as pretrain.py does.
Then, each in a fresh process:
  - baseline: read every file of the checkpoint with torch.load (the least any conversion must do);
  - conversion: antismooth.checkpoint.convert_to_universal (DeepSpeed's ds_to_universal), serial (--workers 1)
    and with --workers processes.
Reported: the checkpoint's and the universal checkpoint's size on disk, wall time, the ratio to the
baseline's time, and the peak resident memory (ru_maxrss: the larger of the process's and of its largest worker
process's), absolute and against the checkpoint's size.

    python bench/reshard.py                                # attnscale_base_24, ZeRO-2 and ZeRO-3
    python bench/reshard.py --model attnscale_small_24 --stages 2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from antismooth.distributed import free_port, usable_cpus

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


# --- a worker of the 2-process launch: one step, one checkpoint ----------------------------------------------

def make_checkpoint(model_name: str, stage: int, folder: str, img_size: int) -> None:
    import deepspeed
    import timm
    import torch

    import antismooth  # noqa: F401  (the model zoo)
    from antismooth.engine import param_groups

    from antismooth.distributed import init_distributed

    init_distributed(device_type="cpu")
    torch.manual_seed(0)
    model = timm.create_model(model_name, img_size=img_size)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.05, "torch_adam": True}},
              "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.05), config=config)
    images = torch.randn(1, 3, img_size, img_size)
    engine.backward(engine(images).float().logsumexp(-1).mean())
    engine.step()
    engine.save_checkpoint(folder, tag="step00000001", client_state={"universal_checkpoint_info": {}})


# --- measured in a fresh process each -----------------------------------------------------------------------

def _measure(code: str) -> dict:
    """Run `code` in a fresh Python; its wall time and the peak RSS of it and its children."""
    wrapper = f"""
import json, resource, sys, time
start = time.perf_counter()
{code}
seconds = time.perf_counter() - start
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print("RESULT " + json.dumps({{"seconds": seconds, "peak_kib": peak}}))
"""
    out = subprocess.run([sys.executable, "-c", wrapper], cwd=REPO, capture_output=True, text=True, check=True)
    line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def bench_stage(model: str, stage: int, img_size: int, workers: int, work: Path) -> list[dict]:
    checkpoints = work / f"zero{stage}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                __file__, "--worker", model, str(stage), str(checkpoints), str(img_size)]
    subprocess.run(launcher, cwd=REPO, env=env, check=True, capture_output=True)
    tag = checkpoints / "step00000001"
    rows = [{"what": "read every file (torch.load)", **_measure(
        f"import torch, pathlib\nfor f in sorted(pathlib.Path({str(tag)!r}).glob('*.pt')): "
        "torch.load(f, map_location='cpu', weights_only=False)")}]
    for count in dict.fromkeys((1, workers)):
        shutil.rmtree(checkpoints / "step00000001_universal", ignore_errors=True)
        rows.append({"what": f"convert, {count} worker{'s' if count > 1 else ''}", **_measure(
            "from antismooth.checkpoint import convert_to_universal\n"
            f"convert_to_universal({str(checkpoints)!r}, 'step00000001', workers={count})")})
    checkpoint_bytes, universal_bytes = _size(tag), _size(checkpoints / "step00000001_universal")
    for row in rows:
        row.update(stage=stage, checkpoint_bytes=checkpoint_bytes, universal_bytes=universal_bytes)
    shutil.rmtree(checkpoints)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="attnscale_base_24")
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--img-size", type=int, default=32, help="small images: the step is only there to fill Adam's state")
    p.add_argument("--workers", type=int, default=max(1, min(8, usable_cpus())))
    p.add_argument("--json", help="write the rows here too")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        for stage in args.stages:
            rows += bench_stage(args.model, stage, args.img_size, args.workers, Path(tmp))
    print(f"\n{args.model}, checkpoints of 2 processes, fp32 + Adam, this machine ({os.cpu_count()} CPUs)\n")
    print("| ZeRO | checkpoint GiB | universal GiB | step | seconds | × reading it | peak RSS GiB | peak / checkpoint |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    for stage in args.stages:
        mine = [r for r in rows if r["stage"] == stage]
        base = mine[0]["seconds"]
        for r in mine:
            peak = r["peak_kib"] * 1024
            print(f"| {stage} | {r['checkpoint_bytes'] / GIB:.2f} | {r['universal_bytes'] / GIB:.2f} | {r['what']} | "
                  f"{r['seconds']:.1f} | {r['seconds'] / base:.2f} | {peak / GIB:.2f} | {peak / r['checkpoint_bytes']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        argv = [a for a in sys.argv[sys.argv.index("--worker") + 1:] if not a.startswith("--local_rank")]
        make_checkpoint(argv[0], int(argv[1]), argv[2], int(argv[3]))
    else:
        main()
