"""Train a model (by default a tiny 24-block AttnScale ViT) a few steps under several ZeRO configs and
save a checkpoint each, on random data, without pretrain.py: bench/export_memory.py's job, which makes
real-size checkpoints with it. (The tests train through pretrain.py instead: tests/jobs/train_plan.py,
conftest.py's `zero_runs`.)

    python tests/jobs/make_checkpoints.py --out DIR                         # world size 1
    deepspeed --num_gpus 2 tests/jobs/make_checkpoints.py --out DIR         # world size 2
    python tests/jobs/make_checkpoints.py --out DIR --model attnscale_base_24 --model-kwargs '{"img_size": 64}'

One launch loops over the configs in the same processes (a launch costs tens of seconds on CPU).
Each config gets a run folder DIR/<config>/ laid out as pretrain.py's: checkpoints/<tag>/ with
antismooth.json beside DeepSpeed's files, and `latest` written by rank 0 after every rank saved.
Rank 0 also records the engine's own logits on a fixed input (DIR/<config>/logits.pt): under
ZeRO-3 the engine's forward gathers the partitioned weights, so these are the live model's outputs.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path

import torch

MODEL = "attnscale_tiny_24"
MODEL_KWARGS = dict(num_classes=10, img_size=32, patch_size=8, embed_dim=64, num_heads=4)
CONFIGS = {  # name: (ZeRO stage, bf16)
    "zero0": (0, False), "zero1": (1, False), "zero2": (2, False), "zero3": (3, False),
    "zero2-bf16": (2, True), "zero3-bf16": (3, True),
}
MICRO_BATCH = 4


def ds_config(stage: int, bf16: bool) -> dict:
    return {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.05, "torch_adam": True}},
            "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}, "steps_per_print": 10**9}


def train_and_save(name: str, out: Path, model_name: str, model_kwargs: dict, steps: int) -> None:
    import deepspeed
    import timm
    import torch.distributed as dist

    from antismooth.checkpoint import write_model_meta
    from antismooth.models import structure

    stage, bf16 = CONFIGS[name]
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = timm.create_model(model_name, **model_kwargs)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config(stage, bf16))
    dtype = torch.bfloat16 if bf16 else torch.float32
    size, num_classes = structure.input_size(model), model.num_classes
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        images = torch.randn(MICRO_BATCH, 3, *size, generator=gen).to(dtype)
        labels = torch.randint(0, num_classes, (MICRO_BATCH,), generator=gen)
        loss = torch.nn.functional.cross_entropy(engine(images).float(), labels)
        engine.backward(loss)
        engine.step()

    run = out / name
    save_dir = run / "checkpoints"
    tag = f"step{steps:08d}"
    if rank == 0:
        data_config = {"input_size": [3, *size], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                       "crop_pct": 0.875, "interpolation": "bicubic"}
        write_model_meta(save_dir / tag, {"model": model_name, "model_kwargs": model_kwargs, "data_config": data_config,
                                          "classes": [f"n{i:08d}" for i in range(num_classes)],
                                          "step": steps, "epoch": 0})
    engine.save_checkpoint(str(save_dir), tag=tag, save_latest=False)  # ends in a barrier
    if rank == 0:
        (save_dir / "latest.tmp").write_text(tag)
        os.replace(save_dir / "latest.tmp", save_dir / "latest")

    probe = torch.randn(4, 3, *size, generator=torch.Generator().manual_seed(7))
    engine.eval()
    with torch.no_grad():
        logits = engine(probe.to(dtype)).float()
    if rank == 0:
        torch.save({"input": probe, "logits": logits}, run / "logits.pt")
        (run / "job.json").write_text(json.dumps({"stage": stage, "bf16": bf16, "world_size": world, "tag": tag}))
    del engine, model
    gc.collect()
    dist.barrier()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--model", default=MODEL)
    p.add_argument("--model-kwargs", type=json.loads, default=MODEL_KWARGS)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = p.parse_args()
    import antismooth  # noqa: F401  (registers the model zoo with timm)
    from antismooth.distributed import init_distributed

    init_distributed()  # as pretrain.py joins (plain `python`: a world of one)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.configs.split(","):
        train_and_save(name, args.out, args.model, args.model_kwargs, args.steps)


if __name__ == "__main__":
    main()
