"""Measure the per-rank memory peak of real DeepSpeed training steps, for tests/test_plan.py to compare with
antismooth.plan's prediction. Several configurations in one launch (a launch costs ~20-40 s here).

    deepspeed --num_gpus 2 tests/jobs/measure_memory.py jobs.json out.json    (or: python ... with RANK etc. set)

jobs.json is a list of {"name", "model", "model_kwargs", "input_size", "ds": raw DeepSpeed JSON}. Each is built
as pretrain.py builds it (activation checkpointing applied to the model, param_groups, deepspeed.initialize with
DeepSpeedSettings.for_deepspeed()), trained one warm-up step, then measured (bench/zero_memory.py's counts):
  held: live tensor bytes after the step that were not alive before the engine was built;
  peak: held + the allocator's peak during the next full step (forward, backward, optimizer step).
ZeRO-3 jobs should come last: DeepSpeed 0.19.8's ZeRO-3 engine is never freed in-process; every figure counts
only what is new to its own job, so leftovers only cost host memory.
"""
from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import deepspeed
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F

import antismooth  # noqa: F401  (registers the model zoo)
from antismooth.config import DeepSpeedSettings
from antismooth.distributed import init_distributed
from antismooth.engine import apply_activation_checkpointing, param_groups
from antismooth.memory import allocator_peak, live_tensor_storages
from antismooth.models import structure


def measure(job: dict, world: int) -> dict:
    """One configuration: build, one warm-up step, then held bytes and the peak of the next step on this rank."""
    ds = DeepSpeedSettings.from_dict(job["ds"], world)
    held_before: list = []
    before = live_tensor_storages("cpu", held_before)
    torch.manual_seed(0)
    kwargs = dict(job.get("model_kwargs") or {})
    if job.get("input_size"):
        kwargs["img_size"] = job["input_size"]
    model = timm.create_model(job["model"], drop_path_rate=0.0, **kwargs)
    apply_activation_checkpointing(model, ds.blocks_per_checkpoint, ds.offload_checkpoints)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, ds.weight_decay),
                                      config=ds.for_deepspeed())
    del model
    dtype = getattr(torch, ds.dtype)
    x = torch.randn(ds.micro_batch, 3, *structure.input_size(engine.module), dtype=dtype)
    y = torch.randint(0, engine.module.num_classes, (ds.micro_batch,))

    def step() -> None:
        engine.backward(F.cross_entropy(engine(x).float(), y))
        engine.step()

    step()
    held = sum(n for p, n in live_tensor_storages("cpu").items() if p not in before)
    peak = allocator_peak(step) + held
    engine.destroy()
    engine = None   # step() holds it: assigning (not del) frees it and keeps the name bound
    del held_before
    gc.collect()
    return {"name": job["name"], "rank": dist.get_rank(), "world": world, "held_bytes": held, "peak_bytes": peak}


def main(jobs_path: str, out_path: str) -> None:
    init_distributed(device_type="cpu")  # as pretrain.py joins; also shares the cores between the ranks
    world = dist.get_world_size()
    results = []
    for job in json.loads(Path(jobs_path).read_text()):
        results.append(measure(job, world))
        dist.barrier()
    everyone = [None] * world
    dist.all_gather_object(everyone, results)
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps([r for rank in everyone for r in rank], indent=1))
    dist.barrier()


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local")])
