"""Training start-up: what `deepspeed pretrain.py ...` (and `antismooth-train`) does.

The checks that run before any process group (every ConfigError), building the model, the engine, the scheduler,
the resume, the EMA and the stream, and the three modes (eval-only, throughput, train). pretrain.py is its front end.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import timm
import torch
import torch.nn as nn

import antismooth  # noqa: F401  (registers the model zoo with timm)
from antismooth import settings
from antismooth.config import ConfigError, DeepSpeedSettings, Derived, TrainConfig, check_optimizer_build, derive
from antismooth.checkpoint import Checkpointer, RunFolder, processes
from antismooth.checkpoint.lock import RunLock
from antismooth.cli.usage import INTERRUPTED_EXIT, readable_file, writable_folder
from antismooth.data.pipeline import AugmentConfig, ShardSource, build_train_stream, train_transform
from antismooth.data.settings import DEFAULT_WORKERS
from antismooth.distributed import (DistEnv, broadcast_object, check_port_free, check_shared_folder, detect_launch,
                                   init_distributed, leave, log_world, usable_cpus)
from antismooth.ema import ShardedEma
from antismooth.engine import (TrainingStopped, TrainState, apply_activation_checkpointing, build_scheduler,
                               compile_blocks, describe_optimizer, param_groups, restore_functional_linear)
from antismooth.models import WeightsMismatchError, load_for_finetuning, load_weights, structure
from antismooth.models.checks import check_model, check_model_name
from antismooth.models.description import ModelDescription
from antismooth.report import check_targets_installed
from antismooth.throughput import loader_batches, log_peak_memory, measure_throughput, random_batches
from antismooth.interrupt import (EXIT_SAVED_RESUBMIT, RunInterrupted, StopRequests,
                                  end_early_signal_notes, signals_end_the_rendezvous)
from antismooth.train import Trainer, evaluate_split
from antismooth.watchdog import (DIST_ERRORS, PEER_LOST_EXIT, PeerLost, Watchdog, group_timeout,
                                 is_distributed_failure)

# The logger keeps pretrain.py's name: the start-up lines read "pretrain: ..." (bench/gpu_check.sh greps them).
log = logging.getLogger("pretrain")
# DeepSpeed 0.19.8's ZeRO calls a torch.distributed function that torch 2.14 deprecates, once per rank and run.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)

USAGE = """Train an AttnScale/FeatScale ViT or CaiT on WebDataset shards with a DeepSpeed ZeRO engine.

    deepspeed pretrain.py --deepspeed_config ds_configs/zero2.json \\
        --model attnscale_small_24 --data shards/imagenet --output runs/as24

Also runs under `torchrun` and as plain `python pretrain.py ...` (one process). Starting the
same command again resumes from the newest complete checkpoint in --output, sample-exactly.
Engine settings live in the DeepSpeed JSON; everything else is a flag (DeiT's defaults).
"""


def build_parser() -> argparse.ArgumentParser:
    """pretrain.py's flags, made from TrainConfig's fields (antismooth.settings.build_parser), and the two flags
    DeepSpeed's launcher adds."""
    p = settings.build_parser(TrainConfig, USAGE)
    p.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)  # DeepSpeed's own flag, implied
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by launchers
    return p


def flags_markdown() -> str:
    """docs/training.md's table of the flags: python -c 'from antismooth.startup import flags_markdown as f; print(f())'"""
    return settings.flags_markdown(TrainConfig)


def parse_config(argv: Optional[list[str]]) -> TrainConfig:
    """The run's settings: a recipe's (--config), then the command line's."""
    return settings.parse(TrainConfig, build_parser(), argv)


# --- start-up ------------------------------------------------------------------------------------------

def check_same_classes(train_manifest: Optional[Path], val_manifest: Optional[Path], train: Optional[ShardSource],
                       val: Optional[ShardSource]) -> None:
    """Validation labels must index the training split's class list (shards built before the builder numbered
    every split by train/'s classes may not)."""
    if train is None or val is None:
        return
    if val.classes != train.classes:
        raise ConfigError(f"{val_manifest} numbers its labels by another class list than {train_manifest} "
                          f"({len(val.classes)} classes there, {len(train.classes)} here): rebuild the shards with "
                          "tools/build_shards.py, which labels every split by train/'s classes.")


def check_data_not_a_file(data: str) -> None:
    """--data names the folder of the manifests; checked once, before find_manifest looks in it for each split."""
    if Path(data).is_file():
        raise ConfigError(f"--data {data} is a file: point --data at the --out folder of tools/build_shards.py.")


def find_manifest(data: str, split: str, required: bool) -> Optional[Path]:
    """The split's manifest in the --data folder (check_data_not_a_file has refused a file), None when there is
    none and it is not required."""
    path = Path(data) / f"{split}.json"
    if path.is_file():
        return path
    if required:
        if not Path(data).is_dir():
            raise ConfigError(f"--data {data} does not exist: build shards first with "
                              f"`python tools/build_shards.py --src IMAGEFOLDER --out {data}`.")
        raise ConfigError(f"--data {data} has no {split}.json manifest: point --data at the --out folder of "
                          "tools/build_shards.py.")
    return None


def setup_logging(run: RunFolder, rank: int) -> None:
    """Rank 0 logs to the console and to log.txt; other ranks only warnings."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_antismooth", False):
            root.removeHandler(handler)
            handler.close()
    if rank != 0:
        root.setLevel(logging.WARNING)
        return
    run.root.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(run.log_file)):
        handler.setFormatter(fmt)
        handler._antismooth = True
        root.addHandler(handler)
    root.setLevel(logging.INFO)


# --- model ---------------------------------------------------------------------------------------------

def model_args(config: TrainConfig, num_classes: int) -> dict[str, Any]:
    """The timm.create_model arguments that define the architecture (what an export needs to rebuild it)."""
    args = dict(config.model.kwargs, num_classes=num_classes)
    if config.model.input_size:
        args["img_size"] = config.model.input_size
    return args


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    return timm.create_model(config.model.name, drop_rate=config.model.drop, drop_path_rate=config.model.drop_path,
                             **model_args(config, num_classes))


def model_description(config: TrainConfig, model: nn.Module, classes: list[str],
                      augment: AugmentConfig) -> ModelDescription:
    """What travels with every checkpoint and export: enough to rebuild the model and its eval transform."""
    img_size = structure.input_size(model)
    kwargs = dict(model_args(config, len(classes)), img_size=img_size[0])
    return ModelDescription(model=config.model.name, model_kwargs=kwargs, classes=classes,
                            data_config={"input_size": [3, *img_size], "mean": list(augment.mean),
                                         "std": list(augment.std), "crop_pct": augment.eval_crop_pct,
                                         "interpolation": augment.interpolation})


def augment_config(config: TrainConfig, input_size: int) -> AugmentConfig:
    """The augmentation section at the model's image size."""
    return dataclasses.replace(config.augment, input_size=input_size)


def decode_refusal(config: TrainConfig) -> Optional[str]:
    """Why the device path (--decode gpu) cannot apply this run's augmentation recipe, or None when it can (the
    recipe's ops decide, not the image size)."""
    from antismooth.data.decode import check_gpu_recipe

    try:
        check_gpu_recipe(train_transform(augment_config(config, 224)))
    except ValueError as err:
        return str(err)
    return None


def check_augmentation(config: TrainConfig) -> None:
    """The training transform builds: timm asserts on an --aa policy it does not know (in the loader workers, after
    the process group, were it not built here first)."""
    try:
        train_transform(augment_config(config, 224))
    except (AssertionError, ValueError, KeyError) as err:
        raise ConfigError(f"--aa {config.augment.auto_augment}: {str(err).strip() or type(err).__name__}; give a timm "
                          "policy such as rand-m9-mstd0.5-inc1 (RandAugment) or original (AutoAugment), or none.") from None


def choose_decode(config: TrainConfig, device: torch.device) -> str:
    """Where this run decodes and augments: --decode, auto resolved (gpu on CUDA where the recipe is one the device
    path applies, else cpu)."""
    from antismooth.data.decode import resolve_decode

    decode = resolve_decode(config.stream.decode, device)
    refusal = decode_refusal(config) if decode == "gpu" else None
    if refusal:   # only auto gets here: an explicit gpu was refused at start-up
        log.info("decoding on the CPU workers: %s", refusal)
        return "cpu"
    if decode == "gpu" and device.type != "cuda":
        log.warning("--decode gpu without a GPU: the device path (decode and augmentation on the batch) runs on the "
                    "CPU, slower than --decode cpu; meant for testing it.")
    return decode


def main(argv: Optional[list[str]] = None, make_trainer: Callable[..., Trainer] = Trainer) -> int:
    """The command: its exit status (0, 2 a setting to fix, 3 the run stopped itself, 75 saved, resubmit me) and
    the one sentence on stderr, 130 on Ctrl-C; `make_trainer` as for run()."""
    config = None
    try:
        config = parse_config(argv)
        run(config, make_trainer)
        return 0
    except (ConfigError, WeightsMismatchError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except PeerLost as err:
        print(f"error: {err}", file=sys.stderr)
        return PEER_LOST_EXIT
    except TrainingStopped as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except RunInterrupted as err:
        print(str(err), file=sys.stderr)
        return EXIT_SAVED_RESUBMIT
    except KeyboardInterrupt:
        if _rank() == 0:   # under a launcher every rank gets the Ctrl-C: one line for the run
            print(interrupted_line(config), file=sys.stderr)
        return INTERRUPTED_EXIT


def _rank() -> int:
    try:
        return detect_launch().rank
    except ConfigError:
        return 0


def interrupted_line(config: Optional[TrainConfig]) -> str:
    """What Ctrl-C left: the checkpoints are whole (`latest` names only a checkpoint every rank finished)."""
    if config is None or config.mode.eval_only:
        return "interrupted."
    folder = RunFolder(config.output.folder)
    try:
        tag = folder.latest_tag()
    except OSError:
        tag = None
    if tag is None:
        return f"interrupted: no checkpoint was saved in {folder.root} yet; the same command starts the run afresh."
    return (f"interrupted: the checkpoints in {folder.checkpoints} are intact; the same command resumes from the "
            f"newest, {tag}.")


@dataclass(frozen=True)
class Checked:
    """What the checks before any process group found: the launch's size, the DeepSpeed settings, the data's
    splits read once (the training stream, every evaluation and the spectral probe take these) and the numbers
    derived from them."""
    world_size: int
    ds: DeepSpeedSettings
    train_source: Optional[ShardSource]
    val_source: Optional[ShardSource]
    classes: list[str]
    derived: Optional[Derived]      # None for --eval-only


@dataclass
class Built:
    """The engine and what goes with it, resumed when the run folder holds a checkpoint."""
    engine: Any                     # deepspeed.DeepSpeedEngine
    scheduler: Any
    state: TrainState
    resume_tag: Optional[str]
    resumed: str                    # what loading the checkpoint did (for the resume's log line)
    ema: Optional[ShardedEma]
    dtype: torch.dtype
    num_params: int


TrainerFactory = Callable[..., Trainer]


def run(config: TrainConfig, make_trainer: TrainerFactory = Trainer):
    """Train (or evaluate, or measure); returns the DeepSpeed engine after training, else None.

    `make_trainer` builds the training loop from Trainer's fields (keyword arguments): a Trainer subclass that
    observes the run through its override points (Trainer.after_resume, on_batch, after_step, ...)."""
    started = time.monotonic()   # --exit-after counts from here
    if config.mode.eval_only or config.mode.throughput:
        end_early_signal_notes()   # only a training saves on a signal
    checked = check_before_launch(config)
    launch = detect_launch()
    lock, refusal = take_run_lock(config, launch.rank)
    try:
        if refusal and launch.world_size == 1:
            raise ConfigError(refusal)
        with signals_end_the_rendezvous(lambda name: stop_before_any_step(config, launch.rank, lock, name)):
            env = init_distributed(timeout=group_timeout(config.hangs.dist_timeout).total_seconds())
        if launch.world_size > 1 and (refusal := broadcast_object(refusal)):
            raise ConfigError(refusal)   # rank 0's refusal, on every rank: all exit 2 with the same sentence
        run_folder = RunFolder(config.output.folder)
        with watched(config, env, run_folder):
            return run_joined(config, checked, env, run_folder, make_trainer, started, lock)
    except ConfigError:
        if lock is not None:
            lock.remove_folder_if_unused()
        raise
    finally:
        restore_functional_linear()   # what a ZeRO-3 engine replaced for the whole process, for the next run in it
        if lock is not None:
            lock.release()


def stop_before_any_step(config: TrainConfig, rank: int, lock: Optional[RunLock], signal_name: str) -> None:
    """A signal before the ranks have met (antismooth.interrupt.signals_end_the_rendezvous): exit 75 at once, as
    after a saved stop (nothing was trained since the newest checkpoint), with rank 0's `resubmit` marker and its
    run.lock released. Called from a thread while the main thread may be inside the rendezvous, hence os._exit."""
    run_folder = RunFolder(config.output.folder)
    print(f"Stopped on {signal_name} on rank {rank} while the run was starting, before any step; "
          f"{run_folder.newest_kept()}: run the same command to resume (exit code {EXIT_SAVED_RESUBMIT}: saved, "
          "resubmit me).", file=sys.stderr, flush=True)
    if lock is not None:   # rank 0's: the folder exists
        run_folder.ask_to_be_resubmitted(0)
        lock.release()
    os._exit(EXIT_SAVED_RESUBMIT)


def take_run_lock(config: TrainConfig, rank: int) -> tuple[Optional[RunLock], Optional[str]]:
    """Rank 0's lock on --output (antismooth.checkpoint.lock), before any process group: (the lock, None), or
    (None, the sentence naming the training that holds it). Other ranks and --eval-only (which writes no
    checkpoint) take none."""
    if rank != 0 or config.mode.eval_only:
        return None, None
    try:
        return RunLock.take(config.output.folder), None
    except ConfigError as err:
        return None, str(err)


@contextlib.contextmanager
def watched(config: TrainConfig, env: DistEnv, run_folder: RunFolder):
    """A collective that timed out or lost its peer ends the run with the sentence naming who stopped answering
    (antismooth.watchdog), on every rank that still runs."""
    watch = Watchdog.start(env.rank, env.world_size, config.hangs.dist_timeout, config.hangs.step_timeout)
    watch.keep_up_with(run_folder)
    try:
        yield watch
    except (TrainingStopped, ConfigError):
        raise
    except DIST_ERRORS as err:
        if not is_distributed_failure(err):
            raise
        raise PeerLost(watch.sentence(err)) from err
    finally:
        watch.stop()


def run_joined(config: TrainConfig, checked: "Checked", env: DistEnv, run_folder: RunFolder,
               make_trainer: TrainerFactory, started: float, lock: Optional[RunLock] = None):
    """`run` once this process joined the group (`started`: time.monotonic() at the run's start; `lock`: rank 0's
    on the run folder)."""
    checkpointer = Checkpointer(run_folder, env, save_every=config.output.save_every, keep=config.output.keep)
    if not config.mode.eval_only:
        check_shared_folder(run_folder.root)
    setup_logging(run_folder, env.rank)
    log_world(env)
    if lock is not None and lock.taken_over:
        log.warning("%s", lock.taken_over)
    config = with_workers_resolved(config, env)
    if env.rank == 0 and checked.val_source is None and not config.mode.throughput:
        log.info("no validation split: %s has no val.json, so the run evaluates nothing at epoch ends and the "
                 "spectral probe takes training images; build one with tools/build_shards.py from an image folder "
                 "holding val/.", config.stream.data)
    torch.manual_seed(config.stream.seed)  # the same initial weights on every rank and at every world size
    model = build_model(config, len(checked.classes))
    augment = augment_config(config, structure.input_size(model)[0])
    description = model_description(config, model, checked.classes, augment)
    if config.mode.eval_only:
        evaluate_only(config, checked, env, model, augment)
        return None

    built = build_engine(config, checked, env, model, checkpointer)
    ds, derived = checked.ds, checked.derived
    if env.rank == 0:
        log_start(config, ds, derived, description, run_folder, built.num_params, len(structure.blocks(model)),
                  built.resume_tag)
    if config.mode.throughput == "random":
        if built.resume_tag is not None:
            checkpointer.log_resumed(built.resume_tag, built.state, built.resumed)
        show_throughput(env, measure_throughput(built.engine, env, ds, built.dtype, random_batches(
            ds, structure.input_size(model), len(checked.classes), env.device, built.dtype)))
        return None
    stop = None
    if config.mode.throughput is None:   # before the first loader: its workers inherit what to ignore
        stop = StopRequests(config.stop.exit_signal, config.stop.exit_after, started)
        stop.install()
    stream, decode = build_stream(config, checked, env, augment)
    if built.resume_tag is not None:   # the stream restores its own position, then one line says what was loaded
        resumed = built.resumed + checkpointer.load_stream(stream, built.state, config.stream.num_workers)
        checkpointer.log_resumed(built.resume_tag, built.state, resumed)
    if config.mode.throughput == "loader":
        show_throughput(env, measure_throughput(built.engine, env, ds, built.dtype,
                                                loader_batches(stream, env.device, built.dtype), decode))
        return None
    checkpointer.attach(built.engine, built.state, stream, built.ema, description, derived.global_batch,
                        derived.micro_batch)
    trainer = make_trainer(config=config, ds=ds, derived=derived, env=env, engine=built.engine,
                           scheduler=built.scheduler, stream=stream, state=built.state, run_folder=run_folder,
                           checkpointer=checkpointer, dtype=built.dtype, val_source=checked.val_source,
                           augment=augment, ema=built.ema, stop=stop)
    if built.resume_tag is not None:
        trainer.after_resume(built.resume_tag)
    trainer.train()
    log_peak_memory(env)
    if config.model.compile:
        log_compiled_graphs(env)
    return built.engine


def with_workers_resolved(config: TrainConfig, env: DistEnv) -> TrainConfig:
    """--workers left out: the default (8) at most the CPUs this process may use (StreamConfig.with_workers), with
    one line when it was capped; a number the user gave (8 included) is kept as given, said when it is more."""
    cpus, given = usable_cpus(), config.stream.num_workers
    stream = config.stream.with_workers(cpus)
    if env.rank == 0 and given is None and stream.num_workers < DEFAULT_WORKERS:
        log.info("--workers %d (the default) is more than the %d CPU(s) this process may use: %d loader workers per "
                 "process (pass --workers to choose).", DEFAULT_WORKERS, cpus, stream.num_workers)
    elif env.rank == 0 and given is not None and given > cpus:
        log.info("--workers %d, as given, is more than the %d CPU(s) this process may use: kept.", given, cpus)
    return dataclasses.replace(config, stream=stream)


def show_throughput(env: DistEnv, line: Optional[str]) -> None:
    """--throughput's result: its line printed on rank 0, then the run's peak GPU memory logged."""
    if line:
        print(line)
    log_peak_memory(env)


def check_before_launch(config: TrainConfig) -> Checked:
    """Everything a user can get wrong, checked before processes talk or models are built."""
    check_targets_installed(config.output.report_targets)
    writable_folder(config.output.folder, "--output")
    launch = detect_launch()
    world_size = launch.world_size
    held = None if config.mode.eval_only else RunFolder(config.output.folder).saved_batch()
    ds = DeepSpeedSettings.load(config.deepspeed_config, world_size, held)
    check_optimizer_build(ds.raw, config.deepspeed_config, torch.cuda.is_available())
    if config.stream.decode == "gpu" and not config.mode.eval_only and (refusal := decode_refusal(config)):
        raise ConfigError(refusal)
    if config.model.compile and ds.zero_stage == 3:
        raise ConfigError(f"--compile cannot run under ZeRO-3 ({config.deepspeed_config}): DeepSpeed gathers each "
                          "module's parameters in hooks that torch.compile must skip, so every compiled block would "
                          "break at each of them; train with ds_configs/zero2.json (or zero1.json), or drop --compile.")
    check_model_name(config.model.name)
    check_data_not_a_file(config.stream.data)
    train_manifest = find_manifest(config.stream.data, "train", required=not config.mode.eval_only)
    val_manifest = find_manifest(config.stream.data, "val", required=config.mode.eval_only)
    train_source = ShardSource.resolve(train_manifest) if train_manifest else None
    val_source = ShardSource.resolve(val_manifest) if val_manifest else None
    classes = list((train_source or val_source).classes)
    check_same_classes(train_manifest, val_manifest, train_source, val_source)
    check_model(config.model.name, config.model.kwargs, config.model.input_size, num_classes=len(classes),
                drop_rate=config.model.drop, drop_path_rate=config.model.drop_path)
    derived = derive(config, ds, world_size, train_source.num_samples) if train_source else None
    if config.model.finetune:
        readable_file(config.model.finetune, "--finetune", "give the path of a .pth or .safetensors file")
    if not config.mode.eval_only:
        check_augmentation(config)
    check_port_free(launch)   # last: the closest to the moment rank 0 listens on it
    return Checked(world_size, ds, train_source, val_source, classes, derived)


def evaluate_only(config: TrainConfig, checked: Checked, env: DistEnv, model: nn.Module,
                  augment: AugmentConfig) -> None:
    """--eval-only: the --finetune weights on the validation split, one line on rank 0."""
    load_weights(model, config.model.finetune)
    metrics = evaluate_split(model.to(env.device), checked.val_source, checked.ds.micro_batch, env, augment,
                             config.stream.num_workers, None)
    if env.rank == 0:
        print(f"eval {config.model.finetune}: top-1 {metrics['top1']:.2f} %  top-5 {metrics['top5']:.2f} %  "
              f"loss {metrics['loss']:.4f}  ({metrics['count']} images)")


def build_engine(config: TrainConfig, checked: Checked, env: DistEnv, model: nn.Module,
                 checkpointer: Checkpointer) -> Built:
    """Fine-tuning weights (a fresh run), activation checkpointing, torch.compile, the DeepSpeed engine, the
    schedule, the resume from the newest complete checkpoint and the EMA."""
    ds = checked.ds
    resume_tag = checkpointer.resume_tag()
    if resume_tag is not None and env.rank == 0:
        for change in config.input_changes(checkpointer.run_folder.read_run_json().get("flags", {})):
            log.warning(change)
    if config.model.finetune and resume_tag is None:
        try:
            load_for_finetuning(model, config.model.finetune)
        except WeightsMismatchError:
            raise
        except ValueError as err:   # not a weights file, or a damaged one: every rank finds the same
            raise ConfigError(f"--finetune {config.model.finetune}: {err}") from None
    apply_activation_checkpointing(model, ds.blocks_per_checkpoint, ds.offload_checkpoints)
    if config.model.compile:
        compile_blocks(structure.blocks(model))
    num_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them

    import deepspeed
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, ds.weight_decay),
                                           config=ds.for_deepspeed())
    scheduler = build_scheduler(engine.optimizer, config, checked.derived)
    if env.rank == 0:
        log.info("optimizer: %s", describe_optimizer(engine))
    state, resumed = TrainState(), ""
    if resume_tag is not None:
        resumed = checkpointer.load(resume_tag, engine, state)
        # The learning rate of the next step from the step count, not from whatever the loaded optimizer groups
        # hold: DeepSpeed's ZeRO-3 universal loading does not restore them.
        scheduler.step_update(state.global_step)
    ema = build_ema(engine, env, config, checkpointer, resume_tag) if config.ema.enabled else None
    return Built(engine, scheduler, state, resume_tag, resumed, ema, getattr(torch, ds.dtype), num_params)


def build_stream(config: TrainConfig, checked: Checked, env: DistEnv, augment: AugmentConfig):
    """This rank's training stream, and where it decodes (cpu or gpu, --decode auto resolved)."""
    decode = choose_decode(config, env.device)
    if env.rank == 0:
        log.info("input: JPEGs decoded and augmented %s", "on the device (the workers read bytes and draw each "
                 "sample's parameters)" if decode == "gpu" else "by the loader workers")
    stream = build_train_stream(checked.train_source,
                                dataclasses.replace(config.stream, batch_size=checked.ds.micro_batch, decode=decode),
                                env.rank, env.world_size, augment, layout=checked.derived.layout)
    return stream, decode


def log_compiled_graphs(env: DistEnv) -> None:
    """How many graphs torch.compile built in this process: one per block shape (a few more where a graph breaks
    or recompiles, which the count makes visible)."""
    from torch._dynamo.utils import counters

    if env.rank == 0:
        log.info("torch.compile built %d graph(s) in this process", counters["stats"]["unique_graphs"])


def build_ema(engine, env: DistEnv, config: TrainConfig, checkpointer: Checkpointer,
              resume_tag: Optional[str]) -> ShardedEma:
    """DeiT's model EMA on this rank's fp32 master fragments (after any load: they are views of what was loaded),
    resumed from the checkpoint's EMA files, which any world size can read."""
    ema = ShardedEma(engine, env.rank, config.ema.decay, config.ema.warmup)
    if resume_tag is not None:
        checkpointer.load_ema(resume_tag, ema)
    return ema


def log_start(config: TrainConfig, ds: DeepSpeedSettings, derived: Derived, description: ModelDescription,
              run_folder: RunFolder,
              num_params: int, depth: int, resume_tag: Optional[str]) -> None:
    log.info("%s: %.1fM parameters, %d blocks, %s, ZeRO-%d, activation checkpointing %s", config.model.name,
             num_params / 1e6, depth, ds.dtype, ds.zero_stage,
             f"every {ds.blocks_per_checkpoint} block(s)" if ds.blocks_per_checkpoint else "off")
    log.info("global batch %d = %d per process × %d accumulation × %s; %d steps/epoch, %d steps, warmup %d, "
             "peak lr %.3g", derived.global_batch, derived.micro_batch, derived.grad_accum,
             processes(derived.world_size), derived.steps_per_epoch, derived.total_steps, derived.warmup_steps,
             derived.peak_lr)
    log_planned_peak(config.model.name, description.model_kwargs, ds, derived.world_size)
    if derived.warmup_steps >= derived.total_steps:
        log.warning("--warmup-epochs %g is as long as the whole run (--epochs %d): the learning rate only warms up and "
                    "never reaches its peak %.3g; lower --warmup-epochs or train longer.",
                    config.schedule.warmup_epochs, config.schedule.epochs, derived.peak_lr)
    run_folder.write_run_json({"flags": config.to_dict(), "deepspeed": ds.raw, "derived": derived.to_dict(),
                               "model": description.to_dict(), "resumed_from": resume_tag})


def log_planned_peak(model: str, model_kwargs: dict[str, Any], ds: DeepSpeedSettings, world_size: int) -> None:
    """One line: antismooth.plan's per-rank peak for this run (tools/plan.py prints the parts). The planner is
    advice: whatever goes wrong in it is logged and training goes on."""
    try:
        from antismooth.plan import GIB, plan_memory

        plan = plan_memory(model, model_kwargs, ds, world_size, compare=False)
    except Exception as err:  # noqa: BLE001  (a planner bug must never stop a run)
        log.warning("Could not plan this run's memory (%s: %s); going on.", type(err).__name__, err)
        return
    log.info("planned peak per rank %.3f GiB = held %.3f + max(backward %.3f, optimizer step %.3f) "
             "(tools/plan.py for the parts)", plan.total / GIB, plan.held / GIB, plan.backward / GIB, plan.step / GIB)


def command(argv: Optional[list[str]] = None) -> int:
    """`pretrain.py` and `antismooth-train`: main(), then every rank leaves the process group together after a
    finished run (antismooth.distributed.leave)."""
    status = main(argv)
    if status in (0, EXIT_SAVED_RESUBMIT):   # every rank agreed to stop here
        leave()
    if status == INTERRUPTED_EXIT and _rank() != 0:
        # Ctrl-C reached every rank; rank 0, which hosts the rendezvous store, said the one line and is gone: an
        # interpreter teardown here would only print the store's connection errors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status
