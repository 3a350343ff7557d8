"""How fast a run trains: images/s of full training steps on random data (the model alone) or on the real input
path (`pretrain.py --throughput [random|loader]`), with model TFLOP/s and MFU."""
from __future__ import annotations

import itertools
import logging
import time
from typing import Iterator, Optional

import torch
import torch.nn as nn

from antismooth.config import DeepSpeedSettings
from antismooth.distributed import DistEnv, barrier

log = logging.getLogger("pretrain")

THROUGHPUT_WARMUP_STEPS = 3
THROUGHPUT_STEPS = 10


def log_peak_memory(env: DistEnv) -> None:
    """What the run took at its peak on this GPU, beside the planner's start-up figure (tools/plan.py)."""
    if env.device.type == "cuda" and env.rank == 0:
        log.info("peak GPU memory allocated %.3f GiB (torch.cuda.max_memory_allocated, rank 0)",
                 torch.cuda.max_memory_allocated(env.device) / 2**30)


def random_batches(ds: DeepSpeedSettings, img_size, num_classes: int, device: torch.device,
                   dtype: torch.dtype) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One random micro batch, again and again: what the model alone can do."""
    images = torch.randn(ds.micro_batch, 3, *img_size, device=device, dtype=dtype)
    targets = torch.randint(0, num_classes, (ds.micro_batch,), device=device)
    return itertools.repeat((images, targets))


def loader_batches(stream, device: torch.device, dtype: torch.dtype) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training input path, epoch after epoch, as the training loop takes it: the stream's batches on the device
    (decoded there on the GPU path), random erasing, Mixup/CutMix."""
    from antismooth.data.device import DeviceBatches, pin_memory_for

    erase = stream.random_erasing(device)
    for epoch in itertools.count():
        for images, targets, _ in DeviceBatches(stream.loader(epoch, pin_memory=pin_memory_for(device)), device,
                                                stream.augment.mean, stream.augment.std):
            images = erase(images) if erase is not None else images
            if stream.mixup is not None:
                images, targets = stream.mixup(images, targets)
            yield images.to(dtype), targets


def measure_throughput(engine, env: DistEnv, ds: DeepSpeedSettings, dtype: torch.dtype,
                       batches: Iterator[tuple[torch.Tensor, torch.Tensor]], input_path: Optional[str] = None) -> Optional[str]:
    """Images/s of full training steps (forward, backward, optimizer) on `batches`: random data measures the model,
    the loader's the whole input path with it (`input_path`: its --decode). The first warm-up forward is also counted
    (antismooth.flops): model TFLOP/s, and MFU on a GPU of known peak. Returns the one line to show, on rank 0
    (None on the others)."""
    import contextlib

    from antismooth.flops import TRAINING_FLOPS_PER_FORWARD, flop_counter, mfu, peak_tflops

    counter = flop_counter()
    steps = (THROUGHPUT_WARMUP_STEPS + THROUGHPUT_STEPS) * ds.grad_accum
    for i, (images, targets) in enumerate(itertools.islice(batches, steps)):
        if i == THROUGHPUT_WARMUP_STEPS * ds.grad_accum:
            _sync(env)
            start = time.perf_counter()
        # Counted in a real step (its backward follows, outside the counter): a forward alone would leave
        # ZeRO-3's gathered parameters waiting for a backward that never comes.
        with counter if i == 0 else contextlib.nullcontext():
            logits = engine(images)
        # Hard labels or Mixup's soft targets: cross-entropy takes either.
        engine.backward(nn.functional.cross_entropy(logits.float(), targets))
        engine.step()
    _sync(env)
    elapsed = time.perf_counter() - start
    per_rank = THROUGHPUT_STEPS * ds.grad_accum * ds.micro_batch / elapsed
    flops_per_image = TRAINING_FLOPS_PER_FORWARD * counter.get_total_flops() / ds.micro_batch
    if env.rank != 0:
        return None
    source = f"the real input path, --decode {input_path}" if input_path else "random data"
    line = (f"throughput: {per_rank * env.world_size:.1f} img/s ({per_rank:.1f} per process, "
            f"{elapsed / THROUGHPUT_STEPS * 1000:.0f} ms per step of {ds.micro_batch * ds.grad_accum * env.world_size}); "
            f"{per_rank * flops_per_image / 1e12:.3g} model TFLOP/s per process ({flops_per_image / 1e9:.3g} GFLOP "
            f"per image, 3 × forward); on {source}")
    name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else None
    peak = peak_tflops(name) if name else None
    if peak and dtype in (torch.bfloat16, torch.float16):  # the table holds 16-bit tensor-core peaks
        line += f"; MFU {100 * mfu(per_rank, flops_per_image, peak):.1f} % of {name}'s {peak:.0f} TFLOP/s dense bf16"
    return line


def _sync(env: DistEnv) -> None:
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    barrier()
