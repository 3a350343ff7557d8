"""The training loop: steps, logging, checkpoints, evaluation and the stops that keep a run safe.

antismooth.startup parses the flags, builds the model, the engine and the stream, and hands them to `Trainer`;
what a restart needs lives in `TrainState` (antismooth.engine), saved with every checkpoint by the
`Checkpointer` (antismooth.checkpoint), which decides when a save is due and performs it. A subclass observes or
extends the run through the override points (`after_resume`, `before_train`, `on_batch`, `after_step`), each a no-op
here; `antismooth.startup.run(config, make_trainer=...)` builds it instead of Trainer.
"""
from __future__ import annotations

import itertools
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from .config import DeepSpeedSettings, Derived, TrainConfig
from .data.decode import DecodeStats
from .data.device import DeviceBatches, pin_memory_for, to_device
from .data.pipeline import AugmentConfig, ShardSource, build_eval_stream, reduce_eval_metrics, seed_for
from .distributed import DistEnv, all_reduce, all_reduce_tensor
from .ema import ShardedEma
from .checkpoint import Checkpointer, RunFolder
from .checkpoint.files import checkpoint_tag
from . import watchdog
from .engine import TrainingStopped, TrainState
from .interrupt import EXIT_SAVED_RESUBMIT, RunInterrupted, StopRequests
from .evaluate import evaluate
from .report import Reporter
from .models.weights import ANTI_OVERSMOOTHING_PARAMS
from .spectral import measure, paper_parameters, write_spectral

__all__ = ["Trainer", "evaluate_split", "criterion_for", "seed_step", "technique_param_stats", "StepTimer"]

log = logging.getLogger(__name__)

SPECTRAL_PROBE_IMAGES = 16


def criterion_for(augment: AugmentConfig, mixup_on: bool) -> nn.Module:
    """DeiT's choice: soft-target CE under Mixup/CutMix, else label smoothing, else plain CE."""
    if mixup_on:
        return SoftTargetCrossEntropy()
    if augment.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=augment.smoothing)
    return nn.CrossEntropyLoss()


def seed_step(seed: int, step: int, micro: int, rank: int) -> None:
    """Seed drop path, dropout and Mixup per micro-step, so a resumed run draws exactly what it would have."""
    s = seed_for("train-step", seed, step, micro, rank)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


# --- the run -------------------------------------------------------------------------------------------

def evaluate_split(model_or_engine, source: ShardSource, batch_size: int, env: DistEnv, augment: AugmentConfig,
                   workers: int, dtype: Optional[torch.dtype], zero_stage: int = 0) -> dict[str, float]:
    """Top-1/top-5/loss over the validation shards, every sample exactly once across ranks.

    Under ZeRO-3 each forward is a collective: every rank runs as many as the rank with the most batches.
    """
    stream = build_eval_stream(source, batch_size, env.rank, env.world_size, num_workers=workers,
                               augment=augment)
    batches = stream.loader(pin_memory_for(env.device))
    forwards = int(all_reduce([len(batches)], op="max")[0]) if zero_stage == 3 else None
    counts = evaluate(model_or_engine, batches, env.device, None if dtype == torch.float32 else dtype, forwards,
                      mean=augment.mean, std=augment.std)
    return reduce_eval_metrics(**counts)


@dataclass
class Trainer:
    """The training loop: steps, logging, checkpoints, evaluation. What a restart needs lives in `state` alone.

    Override points, called where their names say and empty here (a subclass need not call super()):
    `after_resume(tag)`, `before_train()`, `on_batch(images, targets, positions)`, `after_step()`."""
    config: TrainConfig
    ds: DeepSpeedSettings
    derived: Derived
    env: DistEnv
    engine: Any                      # deepspeed.DeepSpeedEngine
    scheduler: Any                   # timm CosineLRScheduler, stepped per optimizer step
    stream: Any                      # antismooth.data.pipeline.TrainStream
    state: TrainState
    run_folder: RunFolder
    checkpointer: Checkpointer       # when and how to save (it holds the model's description, saved with each)
    dtype: torch.dtype
    val_source: Optional[ShardSource]  # the validation shards (None: no val.json), resolved once at start-up
    augment: AugmentConfig
    ema: Optional[ShardedEma] = None  # DeiT's model EMA (--model-ema), updated after every optimizer step
    stop: Optional[StopRequests] = None  # SIGTERM, --exit-signal, --exit-after: save and exit at a step boundary

    def __post_init__(self) -> None:
        self.criterion = criterion_for(self.augment, self.stream.mixup is not None)
        self.writer = self._writer() if self.env.rank == 0 else None
        self.pending = PendingLosses(self.engine.skipped_steps)   # the steps' losses not yet read back
        self.nonfinite_steps = 0
        self.probe = self._probe_images() if self.config.output.spectral_every else None
        self.decode_stats = DecodeStats()  # --decode gpu: where this rank's images were decoded

    def _probe_images(self) -> torch.Tensor:
        """A fixed batch for the spectral diagnostics: the first validation (else training) images, eval transform."""
        source = self.val_source or self.stream.source
        stream = build_eval_stream(source, SPECTRAL_PROBE_IMAGES, 0, 1, num_workers=0, augment=self.augment)
        images, *_ = next(iter(stream.loader()))
        return to_device(images, self.env.device, self.augment.mean, self.augment.std).to(self.dtype)

    def _writer(self) -> Reporter:
        """TensorBoard, and W&B with --report-to tensorboard,wandb, whose config is the run's resolved settings."""
        settings = {"flags": self.config.to_dict(), "deepspeed": self.ds.raw, "derived": self.derived.to_dict(),
                    "model": self.checkpointer.description.to_dict()}
        return Reporter(self.run_folder.root, self.run_folder.tensorboard, self.config.output.report_targets, settings)

    # --- override points ------------------------------------------------------------------------------------------

    def after_resume(self, tag: str) -> None:
        """Start-up has loaded checkpoint `tag` into the engine, `state` and the EMA; no step has run since."""

    def before_train(self) -> None:
        """`train()` is about to take its first step of this process (a fresh run's or a resumed one's)."""

    def on_batch(self, images: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor) -> None:
        """Each micro batch as the loop takes it, on the device, before random erasing and Mixup: `targets` are the
        hard labels, `positions` each sample's position in the epoch (`state.epoch`)."""

    def after_step(self) -> None:
        """After each optimizer step (`state.global_step` counts it), once it is logged and checked, before a save
        that falls due on it."""

    # --- the loop ---------------------------------------------------------------------------------------------------

    def stop_step(self) -> int:
        total = self.derived.total_steps
        return min(total, self.config.schedule.max_steps) if self.config.schedule.max_steps else total

    def train(self) -> None:
        state = self.state
        self.before_train()
        self.engine.train()
        self.timer = StepTimer(self.stop_step() - state.global_step)
        while state.epoch < self.config.schedule.epochs and state.global_step < self.stop_step():
            self.train_epoch()
            if not self.epoch_complete():
                break  # stopped mid-epoch by --max-steps
            state.epoch += 1
            state.samples_in_epoch = 0
            state.data = {}
            self.save()
            if self.config.output.eval_every_epoch and self.val_source is not None:
                self.evaluate()
        if not self.checkpointer.saved_now():
            self.save()
        if self.stop is not None:
            self.stop.settle()
        if self.writer:
            self.writer.close()
        if self.stream.config.decode == "gpu":
            log.info("input on rank %d: %s", self.env.rank, self.decode_stats)
        log.info("done: step %d, epoch %d, %d samples seen", state.global_step, state.epoch, state.samples_seen)

    def train_epoch(self) -> None:
        state, derived, engine = self.state, self.derived, self.engine
        steps_left = derived.steps_per_epoch - state.samples_in_epoch // derived.global_batch
        # The stream goes on from where it stands (its position is its own: saved and restored with checkpoints).
        loader = self.stream.epoch_loader(state.epoch, state.samples_in_epoch,
                                          pin_memory=pin_memory_for(self.env.device))
        batches = DeviceBatches(loader, self.env.device, self.augment.mean, self.augment.std, self.decode_stats)
        erase = self.stream.random_erasing(self.env.device)
        losses = []
        for i, (images, targets, positions) in enumerate(itertools.islice(batches, steps_left * self.ds.grad_accum)):
            self.on_batch(images, targets, positions)
            self.stream.record(positions)
            micro = i % self.ds.grad_accum
            seed_step(self.config.stream.seed, state.global_step, micro, self.env.rank)
            # Random erasing runs here, not in the workers: its noise lives in normalised space, which uint8
            # cannot hold. Drawn from the micro-step's seeded RNG like Mixup, it is sample-exact on resume.
            if erase is not None:
                images = erase(images)
            if self.stream.mixup is not None:
                images, targets = self.stream.mixup(images, targets)
            loss = self.criterion(engine(images.to(self.dtype)).float(), targets)
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach())
            if micro + 1 < self.ds.grad_accum:
                continue
            state.global_step += 1
            state.samples_in_epoch += derived.global_batch
            state.samples_seen += derived.global_batch
            state.corrupt_skipped = self.stream.corrupt_skipped
            self.scheduler.step_update(state.global_step)
            if self.ema is not None:
                self.ema.update(state.global_step)
            # The loss stays on the device; it is read back, and checked, at log steps and before every save.
            self.pending.add(state.global_step, torch.stack(losses).mean(), engine.skipped_steps)
            losses = []
            self.finish_step()
            self.after_step()
            if state.global_step >= self.stop_step():
                return
            if self.save_due():
                self.save()
            self.stop_if_requested()

    def stop_if_requested(self) -> None:
        """At a step boundary: when any rank was signalled (or the --exit-after deadline passed) by the previous
        boundary, every rank saves this step and the run ends with EXIT_SAVED_RESUBMIT."""
        if self.stop is None:
            return
        decided = self.stop.at_step_boundary()
        if not decided:
            return
        if not self.checkpointer.saved_now():
            self.save()
        self.stop.settle()
        if self.writer:
            self.writer.close()
        if self.env.rank == 0:
            self.run_folder.ask_to_be_resubmitted(self.state.global_step)
        raise RunInterrupted(
            f"Stopped at step {self.state.global_step} on {self.stop.reason(decided)}, after saving checkpoint "
            f"{checkpoint_tag(self.state.global_step)} in {self.run_folder.checkpoints}: run the same command to resume "
            f"(exit code {EXIT_SAVED_RESUBMIT}: saved, resubmit me).")

    def epoch_complete(self) -> bool:
        return self.state.samples_in_epoch // self.derived.global_batch >= self.derived.steps_per_epoch

    def save_due(self) -> bool:
        """A mid-epoch checkpoint now (the Checkpointer decides; the epoch's end saves anyway)."""
        return self.checkpointer.due(self.epoch_complete())

    def finish_step(self) -> None:
        """After each optimizer step: the losses read back and checked at log steps and before any save (epoch
        ends and the last step included), the log and the spectral diagnostics when due."""
        self.timer.tick()
        watchdog.after_first_step()   # the start-up's long timeout gives way to the steady-state one
        step = self.state.global_step
        log_now = step % self.config.output.log_every == 0 or step >= self.stop_step()
        if log_now or self.save_due() or self.epoch_complete():
            loss_value = self.check_pending()
            if log_now:
                self.log_step(loss_value)
        self.log_spectral()

    def log_step(self, loss_value: float) -> None:
        state = self.state
        technique = technique_param_stats(self.engine.module, self.ds.zero_stage)
        if self.env.rank != 0:
            return
        lr = self.engine.optimizer.param_groups[0]["lr"]
        img_s = self.timer.rate(self.derived.global_batch)
        grad_norm = self.engine.get_global_grad_norm()
        log.info("step %d/%d | epoch %d | loss %.4f | lr %.3g | %.1f img/s | ETA %s", state.global_step,
                 self.stop_step(), state.epoch, loss_value, lr, img_s, self.timer.eta())
        scalars = {"train/loss": loss_value, "train/lr": lr, "train/img_per_s": img_s,
                   "train/img_per_s_per_gpu": img_s / self.env.world_size, "train/samples_seen": state.samples_seen,
                   "train/epoch": state.epoch + state.samples_in_epoch / max(1, self.derived.num_samples),
                   "train/corrupt_skipped": state.corrupt_skipped, **technique}
        if grad_norm is not None:
            scalars["train/grad_norm"] = float(grad_norm)
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, state.global_step)

    def log_spectral(self) -> None:
        """Per-block HC share, ΔLog amplitude and patch uniformity on the probe batch (issue: oversmoothing).
        Under ZeRO-3 the forward gathers parameters collectively, so every rank measures."""
        every = self.config.output.spectral_every
        if not every or self.state.global_step % every or (self.ds.zero_stage < 3 and self.env.rank != 0):
            return
        report = measure(self.engine.module, self.probe)
        if self.writer:
            write_spectral(self.writer, report, self.state.global_step)

    def check_pending(self) -> float:
        """Read back the losses of the steps since the last check (one collective) and check each; the last
        step's loss, the mean over ranks."""
        loss = math.nan
        for step, loss, dropped in self.pending.read(self.env.world_size):
            self.check_finite(step, loss, dropped)
        return loss

    def check_finite(self, step: int, loss: float, dropped: int) -> None:
        """Stop a diverged run before it saves anything: a non-finite loss on any rank, or an update DeepSpeed
        dropped for non-finite gradients (under fp16 the loss scaler drops overflows by design: left alone).
        With --skip-nonfinite N, up to N such steps go by without an update instead. Checked at the log step
        after it (and before any save), so a run may take up to --log-every steps past the bad one first."""
        loss_bad = not math.isfinite(loss)
        if not loss_bad and (dropped == 0 or self.ds.dtype == "float16"):
            return
        self.nonfinite_steps += 1
        what = "the loss" if loss_bad else "the gradient norm"
        if dropped and self.nonfinite_steps <= self.config.schedule.skip_nonfinite:
            log.warning("step %d: %s is not finite; the update was skipped (%d of --skip-nonfinite %d).",
                        step, what, self.nonfinite_steps, self.config.schedule.skip_nonfinite)
            return
        kept = self.run_folder.latest_tag()
        how = (f"its newest checkpoint, {kept} in {self.run_folder.checkpoints}, holds finite weights: lower --lr or "
               "lengthen --warmup-epochs and run the same command to resume from it (or from an older one, by writing "
               "its tag into `latest`)" if kept else
               "it had saved no checkpoint yet: lower --lr or lengthen --warmup-epochs and run the same command again")
        raise TrainingStopped(f"Step {step}: {what} is not finite, so the run stopped without saving; {how}, or let "
                              "such steps pass without an update with --skip-nonfinite N.")

    def save(self) -> None:
        """A checkpoint of this step (antismooth.checkpoint.Checkpointer: every rank writes, then `latest`); the
        losses not yet read back are checked first, so a diverged step stops the run before anything is saved."""
        self.check_pending()
        self.checkpointer.save()

    def evaluate(self) -> None:
        """The model on the validation split, and its EMA beside it (DeiT's `Accuracy of the EMA`)."""
        self._evaluate("eval", "")
        if self.ema is not None:
            self.ema.swap()      # the model holds the EMA ...
            try:
                self._evaluate("eval_ema", "EMA ")
            finally:
                self.ema.swap()  # ... and its own weights again

    def _evaluate(self, prefix: str, label: str) -> None:
        metrics = evaluate_split(self.engine, self.val_source, self.derived.micro_batch, self.env, self.augment,
                                 self.config.stream.num_workers, self.dtype, self.ds.zero_stage)
        if self.env.rank == 0:
            log.info("eval %sepoch %d: top-1 %.2f %% | top-5 %.2f %% | loss %.4f | %d images", label, self.state.epoch,
                     metrics["top1"], metrics["top5"], metrics["loss"], metrics["count"])
            for key in ("top1", "top5", "loss"):
                self.writer.add_scalar(f"{prefix}/{key}", metrics[key], self.state.global_step)
            # A record for the model card and other readers: the log line above is for people and may change.
            self.run_folder.append_eval({"epoch": self.state.epoch, "step": self.state.global_step, "ema": bool(label),
                                         "top1": metrics["top1"], "top5": metrics["top5"], "loss": metrics["loss"],
                                         "images": int(metrics["count"])})


class PendingLosses:
    """Each optimizer step's loss, kept on the device until read back: `.item()` and a collective per step would
    stop the host until the GPU catches up, every step. Read in one all-reduce for all the steps since the last."""

    def __init__(self, skipped_steps: int) -> None:
        self.skipped = skipped_steps             # DeepSpeed's count of updates it dropped, when last read
        self.steps: list[tuple[int, int]] = []   # (step, updates DeepSpeed dropped in it): host counts, no sync
        self.losses: list[torch.Tensor] = []     # this rank's mean loss of each step, on the device

    def add(self, step: int, loss: torch.Tensor, skipped_steps: int) -> None:
        self.steps.append((step, skipped_steps - self.skipped))
        self.skipped = skipped_steps
        self.losses.append(loss.float())

    def read(self, world_size: int) -> list[tuple[int, float, int]]:
        """(step, loss averaged over ranks, updates dropped) of every pending step, oldest first; a non-finite
        loss on any rank makes the mean non-finite."""
        if not self.steps:
            return []
        sums = all_reduce_tensor(torch.stack(self.losses).double()).tolist()
        read = [(step, total / world_size, dropped) for (step, dropped), total in zip(self.steps, sums, strict=True)]
        self.steps, self.losses = [], []
        return read


# TensorBoard tags of antismooth.spectral.paper_parameters' per-block curves.
TECHNIQUE_TAGS = {"attnscale_lambda": "attnscale/lambda_abs_mean", "featscale_s_d": "featscale/s_dc_mean",
                  "featscale_s_h": "featscale/s_hc_mean"}


def technique_param_stats(model: nn.Module, zero_stage: int) -> dict[str, float]:
    """Per block: mean |λ| (AttnScale), mean s_d and s_h (FeatScale). Under ZeRO-3 the few parameters
    are gathered first, which every rank must join."""
    import deepspeed

    params = [p for n, p in model.named_parameters() if n.endswith(ANTI_OVERSMOOTHING_PARAMS)]
    with deepspeed.zero.GatheredParameters(params, enabled=zero_stage == 3):
        curves = paper_parameters(model)
    return {f"{TECHNIQUE_TAGS[name]}/block_{block:02d}": value
            for name, values in curves.items() for block, value in enumerate(values)}


class StepTimer:
    """Images/s over the last log interval and an ETA from the average step time so far."""

    def __init__(self, steps_to_go: int) -> None:
        self.steps_to_go = steps_to_go
        self.start = self.mark = time.perf_counter()
        self.done = self.since_mark = 0

    def tick(self) -> None:
        self.done += 1
        self.since_mark += 1

    def rate(self, batch: int) -> float:
        now = time.perf_counter()
        rate = self.since_mark * batch / max(now - self.mark, 1e-9)
        self.mark, self.since_mark = now, 0
        return rate

    def eta(self) -> str:
        per_step = (time.perf_counter() - self.start) / max(self.done, 1)
        seconds = int(per_step * max(self.steps_to_go - self.done, 0))
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
