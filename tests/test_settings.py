"""One source of truth for a run's settings (antismooth.settings, antismooth.config): the parser made from the
sections' fields, recipe files (--config) under the command line, run.json's flat record, each value checked once,
and the paper's recipes against the official README's commands."""
from __future__ import annotations

import json
import logging
import re
import shlex
from pathlib import Path

import pytest
import torch

from antismooth.config import DeepSpeedSettings, TrainConfig
from antismooth.data.settings import DEFAULT_WORKERS
from antismooth.distributed import DistEnv, usable_cpus
from antismooth.startup import build_parser, main, parse_config, with_workers_resolved

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.toml"))

# pretrain.py's flags before the settings were sections (issue 30): the names users type stay these.
FLAGS = {"--deepspeed_config", "--deepspeed-config", "--model", "--model-kwargs", "--input-size", "--drop",
         "--drop-path", "--finetune", "--epochs", "--lr", "--min-lr", "--warmup-lr", "--warmup-epochs", "--max-steps", "--compile",
         "--data", "--workers", "--decode", "--reduced-decode", "--no-reduced-decode", "--stream-mode", "--seed",
         "--no-aug", "--color-jitter", "--aa", "--reprob", "--mixup", "--cutmix", "--smoothing", "--crop-pct",
         "--repeated-aug", "--output", "--save-every", "--keep", "--log-every", "--spectral-every", "--no-eval",
         "--eval-only", "--throughput", "--skip-nonfinite", "--exit-signal", "--exit-after", "--model-ema",
         "--no-model-ema", "--model-ema-decay", "--model-ema-warmup", "--dist-timeout", "--step-timeout"}
# run.json's "flags" keys: the model card (antismooth.hub) and bench/depth_study.py read them.
RUN_JSON_KEYS = {"model", "data", "output", "deepspeed_config", "model_kwargs", "input_size", "drop", "drop_path",
                 "epochs", "lr", "min_lr", "warmup_lr", "warmup_epochs", "no_aug", "color_jitter", "aa", "reprob",
                 "mixup", "cutmix", "smoothing", "repeated_aug", "crop_pct", "stream_mode", "workers", "decode",
                 "reduced_decode", "seed", "save_every", "keep", "eval_every_epoch", "log_every", "spectral_every",
                 "finetune", "eval_only", "throughput", "max_steps", "compile", "skip_nonfinite", "exit_signal",
                 "exit_after", "model_ema", "model_ema_decay", "model_ema_warmup", "dist_timeout", "step_timeout"}


def _options() -> dict[str, object]:
    return {o: a for a in build_parser()._actions for o in a.option_strings if a.help != "==SUPPRESS=="}


def test_the_flags_keep_their_names_and_every_flag_has_help():
    options = _options()
    assert FLAGS | {"-h", "--help", "--config", "--report-to"} >= set(options) >= FLAGS
    assert [o for o, action in options.items() if not action.help] == []


def test_run_json_keeps_its_keys_and_reads_back_into_the_same_settings():
    config = parse_config(["--deepspeed_config", "x.json", "--model-kwargs", "patch_size=8", "--aa", "none",
                           "--no-eval", "--throughput", "--epochs", "7"])
    flags = config.to_dict()
    assert set(flags) - {"report_to"} == RUN_JSON_KEYS
    assert flags["model_kwargs"] == {"patch_size": 8} and flags["aa"] is None and flags["eval_every_epoch"] is False
    assert flags["throughput"] == "random" and flags["epochs"] == 7
    assert TrainConfig.from_flags(**json.loads(json.dumps(flags))) == config


def test_the_sections_are_what_the_stream_and_the_augmentation_take():
    config = parse_config(["--deepspeed_config", "x.json", "--workers", "3", "--stream-mode", "resampled",
                           "--mixup", "0.5", "--crop-pct", "0.9"])
    assert (config.stream.num_workers, config.stream.mode) == (3, "resampled")
    assert (config.augment.mixup, config.augment.eval_crop_pct) == (0.5, 0.9)


def test_workers_given_are_kept_and_the_default_is_capped_to_the_cpus(caplog):
    """--workers 8 is what the user asked for, even though 8 is the default's number: only a --workers left out is
    capped to the CPUs this process may use (StreamConfig.with_workers), each said in its own line."""
    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0, device=torch.device("cpu"))
    cpus = usable_cpus()
    caplog.set_level(logging.INFO, logger="pretrain")   # start-up's logger
    given = {}
    for workers in (None, 8, cpus + 1):
        argv = ["--deepspeed_config", "x.json", *(["--workers", str(workers)] if workers is not None else [])]
        config = parse_config(argv)
        assert config.stream.num_workers == workers   # what was given, None when left out
        given[workers] = with_workers_resolved(config, env).stream.num_workers
    assert given == {None: min(DEFAULT_WORKERS, cpus), 8: 8, cpus + 1: cpus + 1}
    lines = [r.getMessage() for r in caplog.records]
    assert sum("(the default) is more than" in line for line in lines) == (cpus < DEFAULT_WORKERS), lines
    assert f"--workers {cpus + 1}, as given, is more than the {cpus} CPU(s) this process may use: kept." in lines


@pytest.mark.parametrize("argv,message", [
    (["--stream-mode", "random"], "--stream-mode must be one of exact, resampled, got 'random'."),
    (["--decode", "npu"], "--decode must be one of cpu, gpu, auto, got 'npu'."),
    (["--throughput", "disk"], "--throughput must be one of random, loader, got 'disk'."),
    (["--epochs", "0"], "--epochs must be at least 1, got 0."),
    (["--crop-pct", "1.5"], "--crop-pct must be in (0, 1], got 1.5."),
    (["--eval-only"], "--eval-only evaluates given weights: add --finetune PATH."),
])
def test_a_bad_value_stops_in_one_sentence_from_the_one_check(argv, message, capsys):
    assert main(["--deepspeed_config", "x.json", *argv]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


def _recipe(tmp_path: Path, text: str) -> str:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return str(path)


def test_a_recipe_sets_settings_and_the_command_line_overrides_it(tmp_path):
    recipe = _recipe(tmp_path, 'deepspeed_config = "ds.json"\nmodel = "vit_tiny_12"\nepochs = 5\nlr = 1\n'
                               'model_ema = false\nmodel_kwargs = {patch_size = 8}\neval_every_epoch = false\n')
    config = parse_config(["--config", recipe, "--epochs", "9"])
    assert (config.deepspeed_config, config.model.name, config.schedule.epochs) == ("ds.json", "vit_tiny_12", 9)
    assert config.schedule.lr == 1.0 and isinstance(config.schedule.lr, float)
    assert config.ema.enabled is False and config.model.kwargs == {"patch_size": 8}
    assert config.output.eval_every_epoch is False
    assert parse_config(["--config", recipe, "--model-ema"]).ema.enabled is True


@pytest.mark.parametrize("text,message", [
    ("drop_pth = 0.2\n", "Unknown setting 'drop_pth': did you mean 'drop_path'?"),
    ('epochs = "ten"\n', "epochs = 'ten' should be a whole number."),
    ("model_ema = 1\n", "model_ema = 1 should be true or false."),
    ("epochs = [\n", "is not valid TOML"),
])
def test_a_bad_recipe_stops_in_one_sentence(text, message, tmp_path, capsys):
    assert main(["--config", _recipe(tmp_path, text)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err


# --- the paper's recipes against the official README's commands ----------------------------------------------

# The official main.py's flags that a recipe does not hold, and why.
OFFICIAL_ELSEWHERE = {"--auto_reload": "a run always resumes from its --output",
                      "--data-path": "--data on the command line", "--data-set": "ImageNet shards are --data",
                      "--resume": "--finetune PATH on the command line (fine-tuning from CaiT weights)",
                      "--decay-epochs": "only timm's step schedules read it; the schedule is cosine"}
OFFICIAL_TO_FLAGS = {"--model": "model", "--drop": "drop", "--input-size": "input_size", "--epochs": "epochs",
                     "--lr": "lr", "--min-lr": "min_lr", "--warmup-epochs": "warmup_epochs"}
# The official main.py's defaults that are not antismooth's (DeiT's): the rest are the same.
OFFICIAL_DEFAULTS = {"epochs": 500, "--weight-decay": 0.05}


def _official_command(recipe: Path) -> tuple[int, dict[str, str]]:
    """(processes, {flag: value}) of the official command quoted in the recipe's header."""
    line = re.search(r"^#\s+official: (.*)$", recipe.read_text(), flags=re.M).group(1)
    words = shlex.split(line.replace("</", "<"))
    processes = int(next(w.split("=")[1] for w in words if w.startswith("--nproc_per_node=")))
    args = words[words.index("main.py") + 1:]
    flags, i = {}, 0
    while i < len(args):
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            flags[args[i]], i = args[i + 1], i + 2
        else:
            flags[args[i]], i = "", i + 1
    return processes, flags


def test_the_paper_recipes_are_shipped():
    assert {r.stem for r in RECIPES} >= {"attnscale_small_12", "attnscale_small_24", "featscale_small_12",
                                         "featscale_small_24", "attnscale_cait_S24_224", "featscale_cait_S24_224"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.stem)
def test_each_recipe_reproduces_the_official_readme_command(recipe):
    processes, official = _official_command(recipe)
    config = parse_config(["--config", str(recipe)])
    flags = config.to_dict()
    expected = dict(TrainConfig().to_dict(), epochs=OFFICIAL_DEFAULTS["epochs"])
    for flag, value in official.items():
        if flag in OFFICIAL_TO_FLAGS:
            key = OFFICIAL_TO_FLAGS[flag]
            expected[key] = type(expected[key] if expected[key] is not None else 0)(value) if key != "model" else value
        else:
            assert flag in OFFICIAL_ELSEWHERE or flag in ("--batch-size", "--weight-decay", "--output_dir"), flag
    expected["output"] = "runs/" + Path(official["--output_dir"]).name
    expected["deepspeed_config"] = flags["deepspeed_config"]
    assert flags == expected
    # The engine's part, from the recipe's DeepSpeed JSON at any world size: the official global batch and decay.
    raw = json.loads((REPO / config.deepspeed_config).read_text())
    for world in (1, processes):
        ds = DeepSpeedSettings.from_dict(raw, world)
        assert ds.micro_batch * ds.grad_accum * world == int(official["--batch-size"]) * processes
    weight_decay = float(official.get("--weight-decay", OFFICIAL_DEFAULTS["--weight-decay"]))
    assert DeepSpeedSettings.from_dict(raw, 1).weight_decay == weight_decay


def test_a_recipe_with_a_missing_file_names_the_fix(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist: pass one of recipes/*.toml to --config." in capsys.readouterr().err



def test_the_flags_table_of_docs_training_md_is_the_parsers():
    from antismooth.startup import flags_markdown

    text = (REPO / "docs" / "training.md").read_text()
    table = re.search(r"<!-- flags: [^\n]*-->\n(.*?)<!-- /flags -->", text, flags=re.S).group(1)
    assert table == flags_markdown(), ("docs/training.md's flags table is not the parser's: regenerate it with "
                                       "python -c 'from antismooth.startup import flags_markdown as f; print(f())'")
    assert {f for f in FLAGS if not f.startswith("--no-")} <= set(re.findall(r"`(--[a-z_-]+)`", table))
