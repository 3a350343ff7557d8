"""Plan a run before launching it: per-rank memory of a model under a DeepSpeed config, and whether it fits.

    python tools/plan.py --model attnscale_base_48 --deepspeed_config ds_configs/zero2.json --gpus 64 \\
        --gpu-memory 80 [--input-size 384] [--micro-batch N] [--json FILE]

Several models, configs or micro batches print one table row per combination instead:

    python tools/plan.py --model attnscale_small_24 attnscale_base_48 --deepspeed_config ds_configs/zero{2,3}.json \\
        --gpus 64 --micro-batch 64 128 256

Model states by part (weights, gradients, Adam's m and v, the fp32 master copy) as the config's ZeRO stage and
offload partition them over --gpus ranks; DeepSpeed's buckets and ZeRO-3's gathered parameters; the activations
of one micro batch, measured once on this machine's CPU by a forward + backward of the model at 1 and 2 blocks
(antismooth/plan.py), with and without checkpointing. When the total exceeds --gpu-memory, configurations that
would fit are listed.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional

from timm.utils import ParseKwargs

from antismooth.atomic import write_atomic
from antismooth.cli.usage import ArgumentParser, at_least, entry_point, fail, writable_file
from antismooth.config import DeepSpeedSettings
from antismooth.models.checks import check_model
from antismooth.plan import (CPU_IMAGES_PER_CORE, GIB, MemoryPlan, StepTimePlan, alternatives,
                             plan_memory, plan_step_time)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, nargs="+")
    p.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, help="extra timm.create_model arguments")
    p.add_argument("--deepspeed_config", "--deepspeed-config", required=True, nargs="+")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel ranks (ZeRO partitions over them)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--input-size", type=int, help="image size (default: the model's)")
    p.add_argument("--micro-batch", type=int, nargs="+", default=[None],
                   help="images per GPU and micro step (default: the config's)")
    p.add_argument("--mfu", type=float, help="also estimate the step time at this model FLOPs utilisation (e.g. 0.4)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="dense bf16 TFLOP/s per GPU for --mfu (default: H100 SXM, 989)")
    p.add_argument("--decode", choices=sorted(CPU_IMAGES_PER_CORE), default="cpu",
                   help="the input path the loader workers serve (pretrain.py --decode): cpu, they decode and "
                        "augment; gpu, they only read bytes and draw parameters (default: %(default)s)")
    p.add_argument("--cpu-images-per-core", type=float, default=None,
                   help="images/s one loader worker (CPU core) delivers (default: the measured rate of --decode's "
                        f"path, {', '.join(f'{k} {v:g}' for k, v in CPU_IMAGES_PER_CORE.items())}; "
                        "docs/benchmarks.md)")
    p.add_argument("--json", type=Path, help="also write the plan (and the alternatives) here")
    return p


def gib(x: float) -> str:
    return f"{x / GIB:8.2f}"


def print_plan(plan: MemoryPlan) -> None:
    every = f"every {plan.checkpointing} block(s)" if plan.checkpointing else "off"
    print(f"{plan.model} ({plan.num_params / 1e6:.1f} M parameters), {plan.input_size} px, micro batch "
          f"{plan.micro_batch}, {plan.dtype}, ZeRO-{plan.zero_stage}{' + optimizer offload' if plan.offload_optimizer else ''}"
          f" over {plan.world_size} ranks, activation checkpointing {every}\n")
    print(f"per rank{'GiB':>43}")
    # ZeRO-3 keeps its gradient partition between steps; ZeRO-0/1/2 reduce the gradients into backward's buffers.
    held_gradients = "gradients held (ZeRO-3's partition)" if plan.zero_stage == 3 else \
        f"gradients held (none: ZeRO-{plan.zero_stage} in buffers)"
    rows = [("parameters", plan.parameters), (held_gradients, plan.gradients),
            ("optimizer moments (Adam m, v; fp32)", plan.optimizer_moments), ("fp32 master copy", plan.master_copy),
            ("model states", plan.model_states),
            ("ZeRO-3 reduce bucket (preallocated)", plan.reduce_bucket),
            ("held all along", plan.held),
            ("DeepSpeed buffers in backward", plan.buffers),
            ("activations of one micro batch", plan.activations),
            ("  of it growing with depth", plan.activations_per_block),
            ("  (without checkpointing", plan.activations_unchecked),
            ("  (checkpointing every block", plan.activations_checked),
            ("backward: activations + buffers", plan.backward),
            ("fp32 gradient partition (in the step)", plan.step_gradients),
            ("optimizer temporaries (foreach AdamW)", plan.step_temporaries),
            ("optimizer step: the two above", plan.step),
            ("planned peak: held + max(backward, step)", plan.total)]
    for name, value in rows:
        print(f"  {name:<43}{gib(value)}{')' if name.startswith('  (') else ''}")
    verdict = "fits" if plan.fits else "does NOT fit"
    print(f"\n{gib(plan.total).strip()} GiB of {plan.gpu_memory / GIB:.0f} GiB: {verdict}")


def print_alternatives(rows: list[tuple[str, MemoryPlan]]) -> None:
    if not rows:
        print("\nNo nearby configuration fits: more GPUs, a smaller micro batch or input size.")
        return
    print("\nconfigurations that would fit:\n")
    print("| change | ZeRO | micro batch | checkpointing | model states GiB | buffers GiB | activations GiB | peak GiB |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for name, p in rows:
        print(f"| {name} | {p.zero_stage}{' + offload' if p.offload_optimizer else ''} | {p.micro_batch} | "
              f"{'every ' + str(p.checkpointing) if p.checkpointing else 'off'} | {p.model_states / GIB:.2f} | "
              f"{p.buffers / GIB:.2f} | {p.activations / GIB:.2f} | {p.total / GIB:.2f} |")


def print_table(args: argparse.Namespace, memory: float) -> list[dict]:
    """One row per model × config × micro batch: the parts in GiB and the verdict."""
    print(f"per-rank GiB on {args.gpus} ranks, {args.gpu_memory:g} GiB per GPU\n")
    print("| model | config | ZeRO | micro batch | checkpointing | model states | buffers | activations | "
          "planned peak | fits |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---|")
    rows = []
    for model in args.model:
        for path in args.deepspeed_config:
            ds = DeepSpeedSettings.load(path, args.gpus)
            for batch in args.micro_batch:
                p = plan_memory(model, args.model_kwargs, ds, args.gpus, args.input_size, batch, memory, compare=False)
                print(f"| {model} | {Path(path).name} | {p.zero_stage} | {p.micro_batch} | "
                      f"{'every ' + str(p.checkpointing) if p.checkpointing else 'off'} | {p.model_states / GIB:.2f} | "
                      f"{(p.buffers + p.reduce_bucket) / GIB:.2f} | {p.activations / GIB:.2f} | {p.total / GIB:.2f} | "
                      f"{'yes' if p.fits else 'no'} |", flush=True)
                rows.append(dict(p.to_dict(), config=path))
    return rows


def check_args(args: argparse.Namespace) -> None:
    """Every number and name in range, every model buildable with --model-kwargs at --input-size, before any plan
    (each model is built on the meta device: free, whatever its depth)."""
    at_least(args.gpus, "--gpus", 1, "data-parallel ranks")
    if args.gpu_memory <= 0:
        fail(f"--gpu-memory must be a positive number of GiB, got {args.gpu_memory:g}.")
    for batch in args.micro_batch:
        at_least(batch, "--micro-batch", 1, "images per GPU and micro step")
    if args.mfu is not None and not 0 < args.mfu <= 1:
        fail(f"--mfu is a fraction of the peak, in (0, 1] (e.g. 0.4), got {args.mfu:g}.")
    if args.peak_tflops <= 0:
        fail(f"--peak-tflops must be positive, got {args.peak_tflops:g}.")
    if args.cpu_images_per_core is not None and args.cpu_images_per_core <= 0:
        fail(f"--cpu-images-per-core must be positive, got {args.cpu_images_per_core:g}.")
    for model in args.model:
        check_model(model, args.model_kwargs, args.input_size)
    if args.json:
        writable_file(args.json, "--json", overwrite=True)


@entry_point()
def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    check_args(args)
    memory = args.gpu_memory * GIB
    if len(args.model) * len(args.deepspeed_config) * len(args.micro_batch) > 1:
        result: dict = {"table": print_table(args, memory)}
    else:
        result = plan_one(args.model[0], args.deepspeed_config[0], args.micro_batch[0], args, memory)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.json, (json.dumps(result, indent=2) + "\n").encode())   # never half a file
    return 0


def plan_one(model: str, path: str, batch: Optional[int], args: argparse.Namespace, memory: float) -> dict:
    """The plan by part, the verdict, and when it does not fit the configurations that would."""
    ds = DeepSpeedSettings.load(path, args.gpus)
    plan = plan_memory(model, args.model_kwargs, ds, args.gpus, args.input_size, batch, memory)
    print_plan(plan)
    rows = [] if plan.fits else alternatives(model, args.model_kwargs, ds.raw, args.gpus, args.input_size, batch, memory)
    if not plan.fits:
        print_alternatives(rows)
    result = {"plan": plan.to_dict(), "alternatives": [dict(p.to_dict(), change=n) for n, p in rows]}
    if args.mfu:
        timing = plan_step_time(model, args.model_kwargs, ds, args.gpus, args.input_size, batch, args.mfu,
                                args.peak_tflops, args.cpu_images_per_core, args.decode)
        print_step_time(timing, args)
        result["step_time"] = timing.to_dict()
    return result


def print_step_time(t: StepTimePlan, args: argparse.Namespace) -> None:
    print(f"\nstep time at MFU {args.mfu:g} of {args.peak_tflops:g} TFLOP/s: {t.forward_flops_per_image / 1e9:.1f} GFLOP "
          f"forward per image, {t.train_flops_per_image / 1e9:.1f} GFLOP trained; {t.seconds_per_step * 1e3:.0f} ms per "
          f"step of {t.images_per_step_per_gpu} images per GPU = {t.images_per_second_per_gpu:.0f} images/s per GPU")
    if t.decode == "gpu":
        print(f"loader (--decode gpu): {t.loader_workers_per_gpu} workers (CPU cores) per GPU to read the bytes and draw "
              f"each sample's parameters at {t.images_per_core:g} images/s per core; decode and augmentation run on "
              "the GPU")
    else:
        print(f"loader (--decode cpu): {t.loader_workers_per_gpu} workers (CPU cores) per GPU to decode and augment at "
              f"{t.images_per_core:g} images/s per core")


if __name__ == "__main__":
    sys.exit(main())
