"""One run's settings: the sections of pretrain.py's flags (TrainConfig: model, schedule, data stream,
augmentation, output, EMA, mode), the DeepSpeed JSON beside them, and what is derived from both (global batch,
steps, peak learning rate), each validated once, at start.

Engine settings (micro batch, accumulation, ZeRO stage, precision, clipping, activation
checkpointing, optimizer type and its betas/eps/weight decay) live only in the DeepSpeed JSON;
model, data, augmentation, schedule and output settings only here. Where the two could
disagree (a learning rate or scheduler in the JSON), start-up stops with one clear sentence.
The parser and the recipe files are made from these fields (antismooth.settings).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from timm.utils import ParseKwargs

from .data.settings import AugmentConfig, StreamConfig
from .report import parse_targets
from .settings import BatchLayout, ConfigError, check_choices, flat_values, from_flat, section, setting

__all__ = ["TrainConfig", "ModelSettings", "ScheduleSettings", "OutputSettings", "EmaSettings", "StopSettings",
           "HangSettings", "ModeSettings",
           "DeepSpeedSettings", "Derived", "HeldBatch", "ConfigError", "derive", "check_optimizer_build"]

# DeiT's learning-rate rule: the base lr is for a global batch of 512 (Touvron et al. 2021, Sec. 6).
LR_REFERENCE_BATCH = 512
# DeepSpeed's own activation-checkpointing features that need DeepSpeed's checkpoint function and
# model parallelism; antismooth checkpoints whole transformer blocks with torch.utils.checkpoint
# instead (and honours `cpu_checkpointing` itself: segment inputs kept in host memory).
UNSUPPORTED_ACTIVATION_KEYS = ("partition_activations", "contiguous_memory_optimization")
# Settings that change the pixels the model trains on, each with what a run that did not record it had (runs older
# than reduced-size decode decoded in full): a resume that changes one is told so.
INPUT_SETTINGS = {"reduced_decode": False}


# --- the run's settings, by concern: each a section of TrainConfig, each field's flag, default and help once -----

@dataclass
class ModelSettings:
    """What is trained: the architecture, its regularisation and the weights it starts from."""
    name: str = setting("attnscale_small_24", flag="--model", dest="model",
                        help="a registered name, e.g. attnscale_small_24, featscale_cait_S24_224")
    kwargs: dict[str, Any] = setting({}, flag="--model-kwargs", dest="model_kwargs", nargs="*", action=ParseKwargs,
                                     metavar="KEY=VALUE",
                                     help="extra timm.create_model arguments, e.g. patch_size=4 embed_dim=64 num_heads=4")
    input_size: Optional[int] = setting(None, flag="--input-size", type=int, help="image size (default: the model's)")
    drop: float = setting(0.0, flag="--drop", help="dropout rate")
    drop_path: float = setting(0.1, flag="--drop-path", help="stochastic depth rate")
    finetune: Optional[str] = setting(None, flag="--finetune", type=str,
                                      help="start from plain weights (.pth/.safetensors)")
    compile: bool = setting(False, flag="--compile", action="store_true",
                            help="torch.compile each transformer block (one graph for all blocks of a shape; not "
                                 "with ZeRO-3)")

    def __post_init__(self) -> None:
        _check([(0 <= self.drop < 1, f"--drop must be in [0, 1), got {self.drop}."),
                (0 <= self.drop_path < 1, f"--drop-path must be in [0, 1), got {self.drop_path}.")])


@dataclass
class ScheduleSettings:
    """How long and how fast: DeiT's warmup and cosine schedule per optimizer step, and when a run stops."""
    epochs: int = setting(300, flag="--epochs", help="epochs of the training split")
    lr: float = setting(5e-4, flag="--lr", help="base lr for a global batch of 512, scaled linearly")
    min_lr: float = setting(1e-5, flag="--min-lr", help="the lr the cosine ends at")
    warmup_lr: float = setting(1e-6, flag="--warmup-lr", help="the lr the linear warmup starts from")
    warmup_epochs: float = setting(5.0, flag="--warmup-epochs", help="epochs of linear warmup to the peak lr")
    max_steps: Optional[int] = setting(None, flag="--max-steps", type=int,
                                       help="stop after this many optimizer steps (the schedule still spans --epochs)")
    skip_nonfinite: int = setting(0, flag="--skip-nonfinite",
                                  help="steps with a non-finite loss or gradients to skip (no update) before stopping")

    def __post_init__(self) -> None:
        _check([(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}."),
                (self.lr > 0, f"--lr must be positive, got {self.lr}."),
                (self.min_lr >= 0, f"--min-lr must be 0 or more, got {self.min_lr}."),
                (self.warmup_lr >= 0, f"--warmup-lr must be 0 or more, got {self.warmup_lr}."),
                (self.warmup_epochs >= 0, f"--warmup-epochs must be 0 or more, got {self.warmup_epochs}."),
                (self.max_steps is None or self.max_steps >= 1, f"--max-steps must be at least 1, got {self.max_steps}."),
                (self.skip_nonfinite >= 0, f"--skip-nonfinite must be 0 or more, got {self.skip_nonfinite}.")])


@dataclass
class OutputSettings:
    """Where the run writes (checkpoints, logs, run.json) and how often."""
    folder: str = setting("runs/default", flag="--output", dest="output",
                          help="run folder: checkpoints, TensorBoard, run.json, log.txt")
    save_every: int = setting(1000, flag="--save-every", help="checkpoint every N steps (and each epoch)")
    keep: int = setting(3, flag="--keep", help="checkpoints to keep")
    log_every: int = setting(10, flag="--log-every", help="log the loss, lr and images/s every N steps")
    # bench/spectral_cost.py measures its share of training time (docs/benchmarks.md).
    spectral_every: int = setting(500, flag="--spectral-every", help="log spectral diagnostics every N steps (0: off)")
    eval_every_epoch: bool = setting(True, flag="--no-eval", dest="eval_every_epoch", action="store_false",
                                     help="skip the per-epoch evaluation")
    report_to: str = setting("tensorboard", flag="--report-to",
                             help="where the curves go: tensorboard (in the run folder), or tensorboard,wandb: Weights "
                                  "& Biases beside it (pip install 'antismooth[wandb]'; WANDB_MODE=offline without "
                                  "network), rank 0 only, the resolved settings as its config")

    def __post_init__(self) -> None:
        _check([(self.save_every >= 1, f"--save-every must be at least 1 step, got {self.save_every}."),
                (self.keep >= 1, f"--keep must keep at least 1 checkpoint, got {self.keep}."),
                (self.log_every >= 1, f"--log-every must be at least 1 step, got {self.log_every}."),
                (self.spectral_every >= 0, f"--spectral-every must be 0 (off) or more steps, got {self.spectral_every}.")])
        parse_targets(self.report_to)

    @property
    def report_targets(self) -> tuple[str, ...]:
        return parse_targets(self.report_to)


@dataclass
class EmaSettings:
    """DeiT's model EMA (on by default there): antismooth.ema keeps it on each rank's fp32 master fragments."""
    enabled: bool = setting(True, flag="--model-ema", dest="model_ema", action=argparse.BooleanOptionalAction,
                            help="keep an exponential moving average of the weights, evaluated and saved beside them")
    decay: float = setting(0.99996, flag="--model-ema-decay", dest="model_ema_decay",
                           help="the EMA's decay per optimizer step")
    warmup: bool = setting(False, flag="--model-ema-warmup", dest="model_ema_warmup", action="store_true",
                           help="timm's EMA warmup: a smaller decay early on (ModelEmaV3 use_warmup)")

    def __post_init__(self) -> None:
        _check([(0 <= self.decay < 1, f"--model-ema-decay must be in [0, 1), got {self.decay}.")])


@dataclass
class StopSettings:
    """Preemption and the time limit (antismooth.interrupt): every rank saves the same step, then the process exits
    with 75, "saved, resubmit me" (docs/reliability.md)."""
    exit_signal: str = setting("SIGUSR2", flag="--exit-signal",
                               help="the signal that, like SIGTERM, makes every rank save at the next step and exit "
                                    "with 75 (SLURM: --signal=B:USR2@LEAD, see cluster/)")
    exit_after: Optional[float] = setting(None, flag="--exit-after", type=float, metavar="MINUTES",
                                          help="save and exit with 75 this many minutes after start, for clusters "
                                               "that send no signal in time")

    def __post_init__(self) -> None:
        from .interrupt import signal_number

        import signal

        try:
            number = signal_number(self.exit_signal)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if number in (signal.SIGKILL, signal.SIGSTOP, signal.SIGINT):
            raise ConfigError(f"--exit-signal {self.exit_signal}: {number.name} cannot ask a run to save (a process "
                              "cannot catch SIGKILL or SIGSTOP, and SIGINT is Ctrl-C's): use SIGUSR2 or SIGUSR1.")
        _check([(self.exit_after is None or self.exit_after > 0,
                 f"--exit-after must be a positive number of minutes, got {self.exit_after}.")])


@dataclass
class HangSettings:
    """A frozen or dead rank ends the job in bounded time (antismooth.watchdog; docs/reliability.md)."""
    dist_timeout: float = setting(300.0, flag="--dist-timeout", metavar="SECONDS",
                                  help="how long a collective may wait during start-up, loading and the first step "
                                       "(compiling, warming up) before the run stops naming the ranks that did not "
                                       "answer")
    step_timeout: float = setting(100.0, flag="--step-timeout", metavar="SECONDS",
                                  help="how long a collective may wait after the first step")

    def __post_init__(self) -> None:
        _check([(self.dist_timeout > 0, f"--dist-timeout must be a positive number of seconds, got {self.dist_timeout}."),
                (self.step_timeout > 0, f"--step-timeout must be a positive number of seconds, got {self.step_timeout}.")])


@dataclass
class ModeSettings:
    """What the command does instead of training, if anything."""
    eval_only: bool = setting(False, flag="--eval-only", action="store_true",
                              help="evaluate --finetune weights on val and exit")
    throughput: Optional[str] = setting(
        None, flag="--throughput", nargs="?", const="random", choices=("random", "loader"), type=str,
        help="measure training images/s and exit: on random data (the model alone; the default), or 'loader': on "
             "the real input path (--decode, augmentation, Mixup/CutMix) from --data")

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass
class TrainConfig:
    """A run's settings, by section; defaults follow the DeiT recipe the paper trains with. Engine settings are
    the DeepSpeed JSON's. `from_flags` / `to_dict` read and write the flat {flag name: value} form of run.json."""
    deepspeed_config: str = setting("", flag="--deepspeed_config", aliases=("--deepspeed-config",),
                                    help="DeepSpeed JSON (ds_configs/): batch, ZeRO stage, precision, optimizer, "
                                         "checkpointing")
    model: ModelSettings = section(ModelSettings, "model")
    schedule: ScheduleSettings = section(ScheduleSettings, "schedule")
    stream: StreamConfig = section(StreamConfig, "data stream")
    augment: AugmentConfig = section(AugmentConfig, "augmentation")
    output: OutputSettings = section(OutputSettings, "output and checkpoints")
    ema: EmaSettings = section(EmaSettings, "model EMA (DeiT's)")
    stop: StopSettings = section(StopSettings, "preemption and time limits")
    hangs: HangSettings = section(HangSettings, "hangs and dead ranks")
    mode: ModeSettings = section(ModeSettings, "mode")

    def __post_init__(self) -> None:
        _check([(not self.mode.eval_only or self.model.finetune,
                 "--eval-only evaluates given weights: add --finetune PATH.")])

    @classmethod
    def from_flags(cls, **flags: Any) -> "TrainConfig":
        """From flag names and values (run.json's "flags", a recipe): TrainConfig.from_flags(epochs=10, lr=1e-3)."""
        return from_flat(cls, flags)

    def to_dict(self) -> dict[str, Any]:
        """{flag name: value}: what run.json records under "flags" (the model card and the depth study read it)."""
        return flat_values(self)

    def input_changes(self, recorded_flags: dict[str, Any]) -> list[str]:
        """One sentence per setting that changes what the model sees and differs from what the resumed run
        recorded in run.json's "flags"."""
        def flag(name: str, on: bool) -> str:
            return "--" + ("" if on else "no-") + name.replace("_", "-")

        changes, now = [], self.to_dict()
        for name, unrecorded in INPUT_SETTINGS.items():
            then = recorded_flags.get(name, unrecorded)
            if then != now[name]:
                changes.append(f"This run trained with {flag(name, then)} and resumes with {flag(name, now[name])}: "
                               f"its training images are resampled differently from here on; pass {flag(name, then)} "
                               "to keep them as they were.")
        return changes


def _check(checks: list[tuple[Any, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


@dataclass(frozen=True)
class HeldBatch:
    """The batch a run's newest checkpoint was trained with: a resumed run keeps its global batch at any world
    size (and with it the steps per epoch, the schedule and the data position)."""
    global_batch: int
    micro_batch: int
    world_size: int


@dataclass(frozen=True)
class DeepSpeedSettings:
    """The parts of the DeepSpeed JSON that antismooth reads; the JSON itself goes to DeepSpeed untouched."""
    raw: dict[str, Any]
    micro_batch: int
    grad_accum: int
    zero_stage: int
    dtype: str                   # "float32", "bfloat16" or "float16"
    weight_decay: float
    blocks_per_checkpoint: int   # 0: activation checkpointing off
    offload_checkpoints: bool = False  # activation_checkpointing.cpu_checkpointing: block inputs in host memory

    @classmethod
    def load(cls, path: str | Path, world_size: int, held: Optional[HeldBatch] = None) -> "DeepSpeedSettings":
        path = Path(path)
        if not str(path):
            raise ConfigError("No DeepSpeed config: pass --deepspeed_config ds_configs/zero2.json (or another "
                              "file of ds_configs/).")
        if path.is_dir():
            raise ConfigError(f"DeepSpeed config {path} is a folder: pass one of its .json files (ds_configs/*.json).")
        if not path.is_file():
            raise ConfigError(f"DeepSpeed config {path} does not exist: pass one of ds_configs/*.json.")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"DeepSpeed config {path} is not valid JSON ({err}): fix the file.") from err
        return cls.from_dict(raw, world_size, str(path), held)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], world_size: int, name: str = "the DeepSpeed config",
                  held: Optional[HeldBatch] = None) -> "DeepSpeedSettings":
        optimizer = raw.get("optimizer") or {}
        params = optimizer.get("params") or {}
        if "lr" in params:
            raise ConfigError(f"{name} sets optimizer.params.lr, but the learning rate comes from --lr (scaled by "
                              "global batch / 512): remove lr from the JSON.")
        if "scheduler" in raw:
            raise ConfigError(f"{name} has a scheduler section, but pretrain.py schedules the learning rate "
                              "(--warmup-epochs, --min-lr): remove the scheduler section.")
        if not optimizer:
            raise ConfigError(f"{name} has no optimizer section: add one, e.g. "
                              '{"type": "AdamW", "params": {"betas": [0.9, 0.999], "weight_decay": 0.05}}.')
        micro, accum = cls._held_batch(raw, world_size, name, held) if held else cls._batch(raw, world_size, name)
        activation = raw.get("activation_checkpointing")
        blocks, offload = 0, False
        if activation is not None:
            bad = [k for k in UNSUPPORTED_ACTIVATION_KEYS if activation.get(k)]
            if bad:
                raise ConfigError(f"{name} turns on DeepSpeed's {', '.join(bad)}, which antismooth does not use "
                                  "(it checkpoints whole blocks with torch.utils.checkpoint): set it to false.")
            blocks = int(activation.get("blocks_per_checkpoint", 1))
            if blocks < 0:
                raise ConfigError(f"{name}: activation_checkpointing.blocks_per_checkpoint must be 0 (off) or more.")
            offload = bool(activation.get("cpu_checkpointing", False))
        dtype = ("bfloat16" if (raw.get("bf16") or {}).get("enabled")
                 else "float16" if (raw.get("fp16") or {}).get("enabled") else "float32")
        return cls(raw=raw, micro_batch=micro, grad_accum=accum,
                   zero_stage=int((raw.get("zero_optimization") or {}).get("stage", 0)),
                   dtype=dtype, weight_decay=float(params.get("weight_decay", 0.0)), blocks_per_checkpoint=blocks,
                   offload_checkpoints=offload)

    @staticmethod
    def _batch(raw: dict[str, Any], world_size: int, name: str) -> tuple[int, int]:
        """micro batch and accumulation from any two of DeepSpeed's three batch keys, checked as DeepSpeed would."""
        train = raw.get("train_batch_size")
        micro = raw.get("train_micro_batch_size_per_gpu")
        accum = raw.get("gradient_accumulation_steps")
        if micro is None and train is None:
            raise ConfigError(f"{name} sets no batch size: add train_micro_batch_size_per_gpu (per GPU) or "
                              "train_batch_size (global).")
        if micro is None:
            accum = accum or 1
            if train % (accum * world_size):
                raise ConfigError(f"train_batch_size {train} in {name} does not divide into {world_size} processes × "
                                  f"{accum} accumulation steps: make it a multiple of {accum * world_size}.")
            micro = train // (accum * world_size)
        elif accum is None:
            accum = 1 if train is None else train // (micro * world_size)
        if train is not None and train != micro * accum * world_size:
            raise ConfigError(f"train_batch_size {train} in {name} is not train_micro_batch_size_per_gpu {micro} × "
                              f"gradient_accumulation_steps {accum} × {world_size} processes = "
                              f"{micro * accum * world_size}: fix one of them (or drop train_batch_size).")
        if micro < 1 or accum < 1:
            raise ConfigError(f"{name}: the batch size per process and the accumulation steps must be at least 1.")
        return int(micro), int(accum)

    @staticmethod
    def _held_batch(raw: dict[str, Any], world_size: int, name: str, held: HeldBatch) -> tuple[int, int]:
        """A resumed run's micro batch and accumulation: its global batch held, the micro batch the JSON's (or
        what its train_batch_size and gradient_accumulation_steps leave), else the one it ran with; the
        accumulation whatever makes up the rest at this world size."""
        batch = held.global_batch
        train = raw.get("train_batch_size")
        if train is not None and train != batch:
            raise ConfigError(f"train_batch_size {train} in {name} is not the global batch {batch} this run was "
                              f"trained with: set it back to {batch} to resume (a resumed run keeps its global "
                              "batch, its schedule and its data position), or start a new --output with --finetune.")
        micro = raw.get("train_micro_batch_size_per_gpu")
        accum = raw.get("gradient_accumulation_steps")
        if micro is None and accum is not None and batch % (accum * world_size) == 0:
            micro = batch // (accum * world_size)   # the JSON fixes the accumulation: DeepSpeed's own rule
        # Otherwise the micro batch it ran with (its memory per GPU is known to fit), the accumulation following.
        micro = int(micro or held.micro_batch)
        if micro < 1:
            raise ConfigError(f"{name}: the batch size per process must be at least 1.")
        if batch % (micro * world_size) == 0:
            return micro, batch // (micro * world_size)
        raise ConfigError(f"{world_size} processes × {micro} per process (train_micro_batch_size_per_gpu) cannot make "
                          f"the global batch of {batch} this run was trained with: {_batch_alternatives(batch, micro, world_size)}.")

    def for_deepspeed(self) -> dict[str, Any]:
        """The JSON for deepspeed.initialize: the user's, less antismooth's own activation-checkpointing key."""
        raw = json.loads(json.dumps(self.raw))
        if "activation_checkpointing" in raw:
            raw["activation_checkpointing"].pop("blocks_per_checkpoint", None)
        if (raw.get("bf16") or {}).get("enabled"):
            # DeepSpeed skips an update whose gradients are not finite under fp32 and fp16, under bf16 only when
            # asked: without it a NaN gradient would reach the weights before the run could stop.
            raw["bf16"].setdefault("check_grad_overflow", True)
        raw["train_micro_batch_size_per_gpu"] = self.micro_batch
        raw["gradient_accumulation_steps"] = self.grad_accum
        raw.pop("train_batch_size", None)
        return raw


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _batch_alternatives(batch: int, micro: int, world_size: int) -> str:
    """What can make a held global batch: the world sizes that can with this micro batch, the micro batches
    that can at this world size."""
    options = []
    if batch % micro == 0:
        worlds = [str(w) for w in _divisors(batch // micro)]
        listed = f"{', '.join(worlds[:-1])} or {worlds[-1]} processes" if len(worlds) > 1 else "1 process"
        options.append(f"resume on {listed}")
    if batch % world_size == 0:
        fits = [m for m in _divisors(batch // world_size) if m <= micro]
        options.append(f"set train_micro_batch_size_per_gpu to {fits[-1]} (or another divisor of {batch // world_size}) "
                       f"to resume on {world_size}")
    return ", or ".join(options) or (f"set train_micro_batch_size_per_gpu to a divisor of {batch} and resume on a "
                                    "number of processes that divides the global batch by it")


@dataclass(frozen=True)
class Derived:
    """Numbers computed once from the flags, the JSON, the world size and the data; logged and stored."""
    world_size: int
    micro_batch: int
    grad_accum: int
    global_batch: int
    num_samples: int
    steps_per_epoch: int        # optimizer steps
    total_steps: int
    warmup_steps: int
    peak_lr: float

    @property
    def layout(self) -> BatchLayout:
        return BatchLayout(self.micro_batch, self.grad_accum, self.world_size, self.num_samples)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def derive(config: TrainConfig, ds: DeepSpeedSettings, world_size: int, num_samples: int) -> Derived:
    """Global batch and optimizer steps per epoch (antismooth.settings.BatchLayout), warmup and DeiT's scaled lr."""
    layout = BatchLayout(ds.micro_batch, ds.grad_accum, world_size, num_samples)
    schedule = config.schedule
    return Derived(world_size=world_size, micro_batch=ds.micro_batch, grad_accum=ds.grad_accum,
                   global_batch=layout.global_batch, num_samples=num_samples, steps_per_epoch=layout.steps_per_epoch,
                   total_steps=layout.steps_per_epoch * schedule.epochs,
                   warmup_steps=math.ceil(schedule.warmup_epochs * layout.steps_per_epoch),
                   peak_lr=schedule.lr * layout.global_batch / LR_REFERENCE_BATCH)


# --- what the optimizer needs on this machine ------------------------------------------------------------------

def _deepspeed_adam(raw: dict[str, Any], cuda: bool) -> Optional[tuple[str, str]]:
    """(DeepSpeed op, what compiles it) when the JSON selects one of DeepSpeed's own Adam ops, else None: without
    "torch_adam" DeepSpeed builds FusedAdam (or, with the optimizer offloaded, DeepSpeedCPUAdam) on first use,
    since its wheel ships no compiled ops (deepspeed/runtime/engine.py, get_optimizer_configuration)."""
    optimizer = raw.get("optimizer") or {}
    if str(optimizer.get("type", "")).lower() not in ("adam", "adamw") or (optimizer.get("params") or {}).get("torch_adam"):
        return None
    offload = ((raw.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device", "none")
    if offload in ("cpu", "nvme"):
        return "cpu_adam", "a C++ compiler"
    return ("fused_adam", "nvcc (the CUDA compiler)") if cuda else ("fused_adam", "a C++ compiler")


def _missing_tools(compiler: str) -> list[str]:
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available

    missing = [] if is_ninja_available() else ["ninja"]
    if compiler.startswith("nvcc"):
        nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
        if not (nvcc and os.access(nvcc, os.X_OK)) and not shutil.which("nvcc"):
            missing.append("nvcc")
    elif not shutil.which(os.environ.get("CXX", "c++")):
        missing.append(os.environ.get("CXX", "c++"))
    return missing


def check_optimizer_build(raw: dict[str, Any], name: str, cuda: bool) -> None:
    """Stop at start-up, in one sentence, when the JSON's optimizer is a DeepSpeed op that this machine cannot
    compile (it would crash at the first step, after the model and the process group were built)."""
    needs = _deepspeed_adam(raw, cuda)
    if needs is None:
        return
    op, compiler = needs
    from deepspeed.git_version_info import installed_ops  # ops compiled into the installed DeepSpeed (DS_BUILD_OPS=1)

    missing = [] if installed_ops.get(op) else _missing_tools(compiler)
    if missing:
        what = "DeepSpeedCPUAdam (the optimizer is offloaded to the CPU)" if op == "cpu_adam" else "FusedAdam"
        raise ConfigError(f"{name} selects DeepSpeed's {what}, which DeepSpeed compiles on first use with {compiler}, "
                          f"and {' and '.join(missing)} is not on this machine: install it, or set \"torch_adam\": true "
                          "(and \"fused\": true) in optimizer.params to use torch's own AdamW, as ds_configs/zero2.json "
                          "does.")
