"""Training start-up: what `deepspeed pretrain.py ...` (and `antismooth-train`) does.

The checks that run before any process group (every ConfigError), building the model, the engine, the scheduler,
the resume, the EMA and the stream, and the three modes (eval-only, throughput, train). pretrain.py is its front end.
"""
from __future__ import annotations

import argparse
import difflib
import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import timm
import torch
import torch.nn as nn
from timm.utils import ParseKwargs

import antismooth  # noqa: F401  (registers the model zoo with timm)
from antismooth.config import ConfigError, DeepSpeedSettings, Derived, TrainConfig, check_optimizer_build, derive
from antismooth.checkpoint import RunFolder, choose_resume_tag, processes, resume
from antismooth.data.pipeline import AugmentConfig, ShardSource, StreamConfig, build_train_stream, train_transform
from antismooth.distributed import DistEnv, check_shared_folder, detect_launch, init_distributed, leave, log_world
from antismooth.ema import ShardedEma
from antismooth.engine import (TrainingStopped, TrainState, apply_activation_checkpointing, build_scheduler,
                               compile_blocks, describe_optimizer, param_groups)
from antismooth.models import WeightsMismatchError, load_for_finetuning, load_weights, structure
from antismooth.throughput import loader_batches, log_peak_memory, measure_throughput, random_batches
from antismooth.train import Trainer, evaluate_split

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
    d = TrainConfig()
    p = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", required=True,
                   help="DeepSpeed JSON (ds_configs/): batch, ZeRO stage, precision, optimizer, checkpointing")
    p.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)  # DeepSpeed's own flag, implied
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by launchers
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model, help="a registered name, e.g. attnscale_small_24, featscale_cait_S24_224")
    g.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                   help="extra timm.create_model arguments, e.g. patch_size=4 embed_dim=64 num_heads=4")
    g.add_argument("--input-size", type=int, default=None, help="image size (default: the model's)")
    g.add_argument("--drop", type=float, default=d.drop, help="dropout rate")
    g.add_argument("--drop-path", type=float, default=d.drop_path, help="stochastic depth rate")
    g.add_argument("--finetune", default=None, help="start from plain weights (.pth/.safetensors)")
    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--lr", type=float, default=d.lr, help="base lr for a global batch of 512, scaled linearly")
    g.add_argument("--min-lr", type=float, default=d.min_lr)
    g.add_argument("--warmup-lr", type=float, default=d.warmup_lr)
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block (one graph for all blocks of a shape; not with ZeRO-3)")
    g = p.add_argument_group("data and augmentation")
    g.add_argument("--data", default=d.data, help="folder with train.json (and val.json) from tools/build_shards.py")
    g.add_argument("--workers", type=int, default=d.workers, help="loader workers per process")
    g.add_argument("--decode", default=d.decode, choices=["cpu", "gpu", "auto"],
                   help="where JPEGs are decoded and augmented: the loader workers (cpu), the device (gpu: nvJPEG and "
                        "per-sample augmentation on the GPU, the workers only read bytes), auto: gpu on CUDA "
                        "(default: %(default)s; docs/decode.md)")
    g.add_argument("--reduced-decode", action=argparse.BooleanOptionalAction, default=d.reduced_decode,
                   help="CPU workers decode JPEGs at 1/2-1/8 scale where the crop still has the output's pixels: "
                        "faster on large photographs, but training then sees other pixels than evaluation, which "
                        "costs accuracy (docs/decode.md; default: off)")
    g.add_argument("--stream-mode", default=d.stream_mode, choices=["exact", "resampled"])
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--no-aug", action="store_true", help="resize and centre crop only, as timm's --no-aug")
    g.add_argument("--color-jitter", type=float, default=d.color_jitter)
    g.add_argument("--aa", default=d.aa, help="RandAugment policy, 'none' for off")
    g.add_argument("--reprob", type=float, default=d.reprob)
    g.add_argument("--mixup", type=float, default=d.mixup)
    g.add_argument("--cutmix", type=float, default=d.cutmix)
    g.add_argument("--smoothing", type=float, default=d.smoothing)
    g.add_argument("--crop-pct", type=float, default=d.crop_pct, help="evaluation centre-crop fraction (timm)")
    g.add_argument("--repeated-aug", type=int, default=d.repeated_aug, help="copies per image (1: off)")
    g = p.add_argument_group("output")
    g.add_argument("--output", default=d.output, help="run folder: checkpoints, TensorBoard, run.json, log.txt")
    g.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (and each epoch)")
    g.add_argument("--keep", type=int, default=d.keep, help="checkpoints to keep")
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument("--spectral-every", type=int, default=d.spectral_every,
                   help="log spectral diagnostics every N steps (0: off)")
    g.add_argument("--no-eval", dest="eval_every_epoch", action="store_false", help="skip the per-epoch evaluation")
    g.add_argument("--eval-only", action="store_true", help="evaluate --finetune weights on val and exit")
    g.add_argument("--throughput", nargs="?", const="random", default=None, choices=["random", "loader"],
                   help="measure training images/s and exit: on random data (the model alone; the default), or "
                        "'loader': on the real input path (--decode, augmentation, Mixup/CutMix) from --data")
    g.add_argument("--skip-nonfinite", type=int, default=d.skip_nonfinite,
                   help="steps with a non-finite loss or gradients to skip (no update) before stopping (default 0)")
    g = p.add_argument_group("model EMA (DeiT's)")
    g.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=d.model_ema,
                   help="keep an exponential moving average of the weights, evaluated and saved beside them")
    g.add_argument("--model-ema-decay", type=float, default=d.model_ema_decay)
    g.add_argument("--model-ema-warmup", action="store_true", help="timm's EMA warmup: a smaller decay early on")
    return p


def parse_config(argv: Optional[list[str]]) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    args.pop("deepspeed"), args.pop("local_rank")
    if args["aa"] in ("none", "None", ""):
        args["aa"] = None
    return TrainConfig(**args)


# --- start-up ------------------------------------------------------------------------------------------

def check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else " See the model zoo in the README."
        raise ConfigError(f"Unknown model {name!r}.{hint}")


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


def find_manifest(data: str, split: str, required: bool) -> Optional[Path]:
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
    args = dict(config.model_kwargs, num_classes=num_classes)
    if config.input_size:
        args["img_size"] = config.input_size
    return args


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    return timm.create_model(config.model, drop_rate=config.drop, drop_path_rate=config.drop_path,
                             **model_args(config, num_classes))


def model_meta(config: TrainConfig, model: nn.Module, classes: list[str], augment: AugmentConfig) -> dict[str, Any]:
    """What travels with every checkpoint and export: enough to rebuild the model and its eval transform."""
    img_size = structure.input_size(model)
    kwargs = dict(model_args(config, len(classes)), img_size=img_size[0])
    return {"model": config.model, "model_kwargs": kwargs, "classes": classes,
            "data_config": {"input_size": [3, *img_size], "mean": list(augment.mean), "std": list(augment.std),
                            "crop_pct": augment.eval_crop_pct, "interpolation": augment.interpolation}}


def augment_config(config: TrainConfig, input_size: int) -> AugmentConfig:
    return AugmentConfig(input_size=input_size, no_aug=config.no_aug, color_jitter=config.color_jitter,
                         auto_augment=config.aa, reprob=config.reprob, mixup=config.mixup, cutmix=config.cutmix,
                         smoothing=config.smoothing, repeated_aug=config.repeated_aug, eval_crop_pct=config.crop_pct,
                         reduced_decode=config.reduced_decode)


def decode_refusal(config: TrainConfig) -> Optional[str]:
    """Why the device path (--decode gpu) cannot apply this run's augmentation recipe, or None when it can (the
    recipe's ops decide, not the image size)."""
    from antismooth.data.decode import check_gpu_recipe

    try:
        check_gpu_recipe(train_transform(augment_config(config, 224)))
    except ValueError as err:
        return str(err)
    return None


def choose_decode(config: TrainConfig, device: torch.device) -> str:
    """Where this run decodes and augments: --decode, auto resolved (gpu on CUDA where the recipe is one the device
    path applies, else cpu)."""
    from antismooth.data.decode import resolve_decode

    decode = resolve_decode(config.decode, device)
    refusal = decode_refusal(config) if decode == "gpu" else None
    if refusal:   # only auto gets here: an explicit gpu was refused at start-up
        log.info("decoding on the CPU workers: %s", refusal)
        return "cpu"
    if decode == "gpu" and device.type != "cuda":
        log.warning("--decode gpu without a GPU: the device path (decode and augmentation on the batch) runs on the "
                    "CPU, slower than --decode cpu; meant for testing it.")
    return decode


def main(argv: Optional[list[str]] = None) -> int:
    try:
        run(parse_config(argv))
        return 0
    except (ConfigError, WeightsMismatchError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"error: {err}", file=sys.stderr)
        return 3


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
    ema: Optional[ShardedEma]
    dtype: torch.dtype
    num_params: int


TrainerFactory = Callable[..., Trainer]


def run(config: TrainConfig, make_trainer: TrainerFactory = Trainer):
    """Train (or evaluate, or measure); returns the DeepSpeed engine after training, else None.

    `make_trainer` builds the training loop from Trainer's fields (keyword arguments): a Trainer subclass that
    observes the run through its override points (Trainer.after_resume, on_batch, after_step, ...)."""
    checked = check_before_launch(config)
    env = init_distributed()
    run_folder = RunFolder(config.output)
    if not config.eval_only:
        check_shared_folder(run_folder.root)
    setup_logging(run_folder, env.rank)
    log_world(env)
    torch.manual_seed(config.seed)  # the same initial weights on every rank and at every world size
    model = build_model(config, len(checked.classes))
    augment = augment_config(config, structure.input_size(model)[0])
    meta = model_meta(config, model, checked.classes, augment)
    if config.eval_only:
        evaluate_only(config, checked, env, model, augment)
        return None

    built = build_engine(config, checked, env, model, run_folder)
    ds, derived = checked.ds, checked.derived
    if env.rank == 0:
        log_start(config, ds, derived, meta, run_folder, built.num_params, len(structure.blocks(model)),
                  built.resume_tag)
    if config.throughput == "random":
        measure_throughput(built.engine, env, ds, built.dtype, random_batches(
            ds, structure.input_size(model), len(checked.classes), env.device, built.dtype))
        return None
    stream, decode = build_stream(config, checked, env, augment)
    if config.throughput == "loader":
        measure_throughput(built.engine, env, ds, built.dtype, loader_batches(stream, env.device, built.dtype), decode)
        return None
    trainer = make_trainer(config=config, ds=ds, derived=derived, env=env, engine=built.engine,
                           scheduler=built.scheduler, stream=stream, state=built.state, run_folder=run_folder,
                           meta=meta, dtype=built.dtype, val_source=checked.val_source, augment=augment, ema=built.ema)
    if built.resume_tag is not None:
        trainer.after_resume(built.resume_tag)
    trainer.train()
    log_peak_memory(env)
    if config.compile:
        log_compiled_graphs(env)
    return built.engine


def check_before_launch(config: TrainConfig) -> Checked:
    """Everything a user can get wrong, checked before processes talk or models are built."""
    world_size = detect_launch().world_size
    held = None if config.eval_only else RunFolder(config.output).saved_batch()
    ds = DeepSpeedSettings.load(config.deepspeed_config, world_size, held)
    check_optimizer_build(ds.raw, config.deepspeed_config, torch.cuda.is_available())
    if config.decode == "gpu" and not config.eval_only and (refusal := decode_refusal(config)):
        raise ConfigError(refusal)
    if config.compile and ds.zero_stage == 3:
        raise ConfigError(f"--compile cannot run under ZeRO-3 ({config.deepspeed_config}): DeepSpeed gathers each "
                          "module's parameters in hooks that torch.compile must skip, so every compiled block would "
                          "break at each of them; train with ds_configs/zero2.json (or zero1.json), or drop --compile.")
    check_model_name(config.model)
    train_manifest = find_manifest(config.data, "train", required=not config.eval_only)
    val_manifest = find_manifest(config.data, "val", required=config.eval_only)
    train_source = ShardSource.resolve(train_manifest) if train_manifest else None
    val_source = ShardSource.resolve(val_manifest) if val_manifest else None
    classes = list((train_source or val_source).classes)
    check_same_classes(train_manifest, val_manifest, train_source, val_source)
    derived = derive(config, ds, world_size, train_source.num_samples) if train_source else None
    if config.finetune and not Path(config.finetune).is_file():
        raise ConfigError(f"--finetune {config.finetune} does not exist: give the path of a .pth or .safetensors file.")
    return Checked(world_size, ds, train_source, val_source, classes, derived)


def evaluate_only(config: TrainConfig, checked: Checked, env: DistEnv, model: nn.Module,
                  augment: AugmentConfig) -> None:
    """--eval-only: the --finetune weights on the validation split, one line on rank 0."""
    load_weights(model, config.finetune)
    metrics = evaluate_split(model.to(env.device), checked.val_source, checked.ds.micro_batch, env, augment,
                             config.workers, None)
    if env.rank == 0:
        print(f"eval {config.finetune}: top-1 {metrics['top1']:.2f} %  top-5 {metrics['top5']:.2f} %  "
              f"loss {metrics['loss']:.4f}  ({metrics['count']} images)")


def build_engine(config: TrainConfig, checked: Checked, env: DistEnv, model: nn.Module,
                 run_folder: RunFolder) -> Built:
    """Fine-tuning weights (a fresh run), activation checkpointing, torch.compile, the DeepSpeed engine, the
    schedule, the resume from the newest complete checkpoint and the EMA."""
    ds = checked.ds
    resume_tag = choose_resume_tag(run_folder, env)
    if resume_tag is not None and env.rank == 0:
        for change in config.input_changes(run_folder.read_run_json().get("flags", {})):
            log.warning(change)
    if config.finetune and resume_tag is None:
        load_for_finetuning(model, config.finetune)
    apply_activation_checkpointing(model, ds.blocks_per_checkpoint, ds.offload_checkpoints)
    if config.compile:
        compile_blocks(structure.blocks(model))
    num_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them

    import deepspeed
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, ds.weight_decay),
                                           config=ds.for_deepspeed())
    scheduler = build_scheduler(engine.optimizer, config, checked.derived)
    if env.rank == 0:
        log.info("optimizer: %s", describe_optimizer(engine))
    state = TrainState()
    if resume_tag is not None:
        resume(engine, run_folder, resume_tag, state, env, config.workers)
        # The learning rate of the next step from the step count, not from whatever the loaded optimizer groups
        # hold: DeepSpeed's ZeRO-3 universal loading does not restore them.
        scheduler.step_update(state.global_step)
    ema = build_ema(engine, env, config, run_folder, resume_tag) if config.model_ema else None
    return Built(engine, scheduler, state, resume_tag, ema, getattr(torch, ds.dtype), num_params)


def build_stream(config: TrainConfig, checked: Checked, env: DistEnv, augment: AugmentConfig):
    """This rank's training stream, and where it decodes (cpu or gpu, --decode auto resolved)."""
    decode = choose_decode(config, env.device)
    if env.rank == 0:
        log.info("input: JPEGs decoded and augmented %s", "on the device (the workers read bytes and draw each "
                 "sample's parameters)" if decode == "gpu" else "by the loader workers")
    stream = build_train_stream(checked.train_source,
                                StreamConfig(batch_size=checked.ds.micro_batch, mode=config.stream_mode,
                                             seed=config.seed, num_workers=config.workers, decode=decode),
                                env.rank, env.world_size, augment, global_batch=checked.derived.global_batch)
    return stream, decode


def log_compiled_graphs(env: DistEnv) -> None:
    """How many graphs torch.compile built in this process: one per block shape (a few more where a graph breaks
    or recompiles, which the count makes visible)."""
    from torch._dynamo.utils import counters

    if env.rank == 0:
        log.info("torch.compile built %d graph(s) in this process", counters["stats"]["unique_graphs"])


def build_ema(engine, env: DistEnv, config: TrainConfig, run_folder: RunFolder, resume_tag: Optional[str]) -> ShardedEma:
    """DeiT's model EMA on this rank's fp32 master fragments (after any load: they are views of what was loaded),
    resumed from the checkpoint's EMA files, which any world size can read."""
    ema = ShardedEma(engine, env.rank, config.model_ema_decay, config.model_ema_warmup)
    if resume_tag is None:
        return ema
    tag_dir = run_folder.tag_dir(resume_tag)
    try:
        ema.load(tag_dir)
    except (KeyError, OSError, RuntimeError) as err:
        # A checkpoint of a run without --model-ema (or with a rank's EMA file lost): the average starts again.
        log.warning("No model EMA could be read from %s (%s): the EMA starts again from the current weights.",
                    tag_dir, err)
    return ema


def log_start(config: TrainConfig, ds: DeepSpeedSettings, derived: Derived, meta: dict, run_folder: RunFolder,
              num_params: int, depth: int, resume_tag: Optional[str]) -> None:
    log.info("%s: %.1fM parameters, %d blocks, %s, ZeRO-%d, activation checkpointing %s", config.model,
             num_params / 1e6, depth, ds.dtype, ds.zero_stage,
             f"every {ds.blocks_per_checkpoint} block(s)" if ds.blocks_per_checkpoint else "off")
    log.info("global batch %d = %d per process × %d accumulation × %s; %d steps/epoch, %d steps, warmup %d, "
             "peak lr %.3g", derived.global_batch, derived.micro_batch, derived.grad_accum,
             processes(derived.world_size), derived.steps_per_epoch, derived.total_steps, derived.warmup_steps,
             derived.peak_lr)
    log_planned_peak(config.model, meta["model_kwargs"], ds, derived.world_size)
    if derived.warmup_steps >= derived.total_steps:
        log.warning("--warmup-epochs %g is as long as the whole run (--epochs %d): the learning rate only warms up and "
                    "never reaches its peak %.3g; lower --warmup-epochs or train longer.", config.warmup_epochs,
                    config.epochs, derived.peak_lr)
    run_folder.write_run_json({"flags": config.to_dict(), "deepspeed": ds.raw, "derived": derived.to_dict(),
                               "model": meta, "resumed_from": resume_tag})


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
    if status == 0:
        leave()
    return status
