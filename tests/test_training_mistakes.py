"""Every training-side mistake a new user makes (issue 34): pretrain.py's and tools/plan.py's flags, table-driven.

Each case: the argv, words the sentence must hold → exit status 2, one `error:` line on stderr, no traceback, and
no run folder left. In-process through the commands' main (the checks run before any process group); one case end
to end in a real process.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FULL_BATCH, TINY_MODEL
from launch import REPO, clean_env, ds_config
from antismooth import startup
from antismooth.cli import plan

TINY_KWARGS = ["--model-kwargs", "patch_size=8", "embed_dim=64", "num_heads=4"]

# (case, extra flags after a good tiny run's, words of the sentence). Later flags win over TINY_MODEL's.
PRETRAIN_CASES = [
    ("heads_do_not_divide_width", ["--model-kwargs", "patch_size=8", "embed_dim=64", "num_heads=3"],
     "embed_dim=64 num_heads=3 and --input-size 32 cannot be built: dim should be divisible by num_heads"),
    ("argument_the_model_lacks", ["--model-kwargs", "patch_size=8", "embed_dim=64", "num_heads=4", "heads=2"],
     "unexpected keyword argument 'heads'"),
    ("unknown_model", ["--model", "attnscale_smal_24"], "Unknown model 'attnscale_smal_24'. Did you mean attnscale_small_24"),
    ("input_not_multiple_of_patch", ["--input-size", "36"],
     "--input-size 36 is not a multiple of attnscale_tiny_24's patch size 8: the last 4 rows and columns"),
    ("input_size_zero", ["--input-size", "0"], "--input-size must be a positive number of pixels, got 0"),
    ("output_is_a_file", ["--output", "{file}"], "is a file, not a folder"),
    ("output_inside_a_file", ["--output", "{file}/run"], "cannot be created"),
    ("negative_workers", ["--workers", "-1"], "--workers must be 0 or more, got -1"),
    ("zero_epochs", ["--epochs", "0"], "--epochs must be at least 1, got 0"),
    ("zero_lr", ["--lr", "0"], "--lr must be positive"),
    ("negative_min_lr", ["--min-lr=-1e-5"], "--min-lr must be 0 or more"),
    ("drop_path_above_one", ["--drop-path", "1.5"], "--drop-path must be in [0, 1), got 1.5"),
    ("zero_save_every", ["--save-every", "0"], "--save-every must be at least 1 step"),
    ("zero_keep", ["--keep", "0"], "--keep must keep at least 1 checkpoint"),
    ("negative_spectral_every", ["--spectral-every", "-1"], "--spectral-every must be 0 (off) or more"),
    ("ema_decay_above_one", ["--model-ema-decay", "1.5"], "--model-ema-decay must be in [0, 1)"),
    ("unknown_exit_signal", ["--exit-signal", "SIGFOO"], "SIGFOO"),
    ("zero_exit_after", ["--exit-after", "0"], "--exit-after must be a positive number of minutes"),
    ("zero_dist_timeout", ["--dist-timeout", "0"], "--dist-timeout must be a positive number of seconds"),
    ("reprob_above_one", ["--reprob", "2"], "--reprob is a probability, in [0, 1], got 2"),
    ("negative_mixup", ["--mixup", "-0.8"], "--mixup must be 0 (off) or more"),
    ("smoothing_one", ["--smoothing", "1"], "--smoothing must be in [0, 1), got 1"),
    ("unknown_stream_mode", ["--stream-mode", "shuffled"], "--stream-mode must be one of exact, resampled"),
    ("missing_recipe", ["--config", "{tmp}/nope.toml"], "does not exist: pass one of recipes/*.toml"),
    ("missing_data", ["--data", "{tmp}/nowhere"], "does not exist: build shards first"),
    ("data_is_a_file", ["--data", "{file}"], "is a file: point --data at the --out folder"),
    ("deepspeed_config_is_a_folder", ["--deepspeed_config", "{tmp}"], "is a folder: pass one of its .json files"),
    ("finetune_is_a_folder", ["--finetune", "{tmp}"], "--finetune {tmp} is a folder, not a file"),
    ("exit_signal_cannot_be_caught", ["--exit-signal", "SIGKILL"], "SIGKILL cannot ask a run to save"),
    ("unknown_augment_policy", ["--aa", "autoaugment"], "--aa autoaugment: Unknown AA policy autoaugment"),
    ("unknown_flag", ["--epoks", "3"], "unrecognized arguments: --epoks 3: see `"),
    ("not_a_number", ["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
]


@pytest.fixture
def good_argv(tiny_shards: Path, tmp_path: Path) -> list[str]:
    return ["--deepspeed_config", str(ds_config(tmp_path / "zero1.json", 1)), "--data", str(tiny_shards),
            "--output", str(tmp_path / "run"), *TINY_MODEL, *[f for f in FULL_BATCH if f != "--no-aug"],
            "--max-steps", "1"]   # augmented (a bad --aa counts), and one step should a case ever be accepted


def _one_error_line(err: str, words: str) -> None:
    err = err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert words in err, err


@pytest.mark.parametrize("case,extra,words", PRETRAIN_CASES, ids=[c[0] for c in PRETRAIN_CASES])
def test_a_pretrain_mistake_is_one_sentence_and_leaves_nothing(case, extra, words, good_argv, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me\n")
    extra = [e.format(file=a_file, tmp=tmp_path) for e in extra]
    assert startup.main(good_argv + extra) == 2
    _one_error_line(capsys.readouterr().err, words.format(tmp=tmp_path))
    assert not (tmp_path / "run").exists() and a_file.read_text() == "keep me\n"


PLAN = ["--model", "attnscale_tiny_12", "--deepspeed_config", "ds_configs/zero2.json"]
PLAN_CASES = [
    ("zero_gpus", ["--gpus", "0"], "--gpus must be at least 1 (data-parallel ranks), got 0"),
    ("zero_micro_batch", ["--micro-batch", "64", "0"], "--micro-batch must be at least 1"),
    ("input_not_multiple_of_patch", ["--input-size", "40"], "is not a multiple of attnscale_tiny_12's patch size 16"),
    ("heads_do_not_divide_width", ["--model-kwargs", "num_heads=5"], "dim should be divisible by num_heads"),
    ("unknown_model", ["--model", "attnscale_tiny_13"], "Unknown model 'attnscale_tiny_13'. Did you mean attnscale_tiny_"),
    ("mfu_as_percent", ["--mfu", "40"], "--mfu is a fraction of the peak, in (0, 1]"),
    ("zero_gpu_memory", ["--gpu-memory", "0"], "--gpu-memory must be a positive number of GiB"),
    ("zero_peak_tflops", ["--peak-tflops", "0"], "--peak-tflops must be positive"),
    ("missing_config", ["--deepspeed_config", "ds_configs/zero5.json"], "ds_configs/zero5.json does not exist"),
    ("json_is_a_folder", ["--json", "{tmp}"], "is a folder: give a file path"),
    ("unknown_flag", ["--gpux", "8"], "unrecognized arguments: --gpux 8"),
]


@pytest.mark.parametrize("case,extra,words", PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_a_plan_mistake_is_one_sentence(case, extra, words, tmp_path, capsys):
    assert plan.main(PLAN + [e.format(tmp=tmp_path) for e in extra]) == 2
    captured = capsys.readouterr()
    _one_error_line(captured.err, words)
    assert captured.out == ""


def test_end_to_end_a_model_kwargs_mistake_is_one_line(good_argv, tmp_path):
    """As a user sees it: a real process, its whole stderr (timm's AssertionError once ended in a traceback and a
    run folder holding only log.txt)."""
    done = subprocess.run([sys.executable, "pretrain.py", *good_argv, "--model-kwargs", "embed_dim=64", "num_heads=3"],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    _one_error_line(done.stderr, "dim should be divisible by num_heads")
    assert not (tmp_path / "run").exists()
