"""Every command keeps the contract of antismooth/cli/usage.py (docs/commands.md) on the mistakes a new user makes.

One table: each (command, arguments, words the sentence must hold) runs the command's main(argv) in-process and
must end with exit status 2, exactly one line on stderr starting "error:", no traceback, and nothing written: the
whole scratch folder (the inputs, an existing output that must survive, the fresh paths the outputs would take)
is the same file for file, byte for byte, before and after. Two real processes prove the entry points print no
traceback end to end. Then the files written for others: exports and reports honour the umask.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import antismooth  # noqa: F401  (registers the zoo)
from antismooth.atomic import write_atomic
from antismooth.cli import analyze, build_shards, eval as eval_tool, export, reshard, usage
from antismooth.export import save_weights
from antismooth.hub import save_timm_folder
from conftest import SAMPLE_IMAGES
from launch import clean_env

REPO = Path(__file__).resolve().parents[1]
TINY = dict(num_classes=103, img_size=32, patch_size=8, embed_dim=64, num_heads=4, depth=1)


def _load_demo():
    """tools/demo.py is a script, not a package module."""
    spec = importlib.util.spec_from_file_location("demo", REPO / "tools" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = _load_demo()
COMMANDS = {"build_shards": build_shards.main, "export": export.main, "eval": eval_tool.main,
            "analyze": analyze.main, "reshard": reshard.main, "demo": demo.main}


@pytest.fixture(scope="module")
def world(tmp_path_factory, sample_shards) -> dict[str, str]:
    """The scratch folder every case works in, as {placeholder: path}: inputs of every wrong kind, a weights file
    with its description, a run folder with no checkpoint, an output that exists (it must survive), and paths
    that do not exist (no case may create them)."""
    root = tmp_path_factory.mktemp("mistakes")
    (root / "afile").write_text("not a folder")
    (root / "empty").mkdir()
    (root / "run" / "checkpoints").mkdir(parents=True)
    (root / "run2" / "checkpoints").mkdir(parents=True)
    (root / "run2" / "checkpoints" / "latest").write_text("step00000004")
    (root / "precious.safetensors").write_bytes(b"the user's own file")
    (root / "junk.safetensors").write_bytes(b"not safetensors")
    (root / "report").mkdir()
    (root / "report" / "report.json").write_text('{"an earlier": "report"}')
    (root / "mine").mkdir()
    (root / "mine" / "thesis.tex").write_text("years of work")
    torch.manual_seed(0)
    model = timm.create_model("attnscale_tiny_24", **TINY)
    classes = sorted(p.name for p in (SAMPLE_IMAGES / "train").iterdir())
    save_weights(model.state_dict(), root / "w.safetensors",
                 {"model": "attnscale_tiny_24", "model_kwargs": TINY, "classes": classes})
    torch.save(model.state_dict(), root / "bare.pth")
    return {"root": str(root), "afile": str(root / "afile"), "empty": str(root / "empty"), "run": str(root / "run"),
            "run2": str(root / "run2"), "precious": str(root / "precious.safetensors"),
            "junk": str(root / "junk.safetensors"), "report": str(root / "report"), "mine": str(root / "mine"),
            "weights": str(root / "w.safetensors"), "bare": str(root / "bare.pth"),
            "missing": str(root / "missing"), "new": str(root / "new"),
            "shards": str(sample_shards.parent),   # train.json only: no val split
            "images": str(SAMPLE_IMAGES)}


W = ["--weights", "{weights}"]
X = "{new}/x.safetensors"
DEMO_FOLDERS = ["--work", "{new}/work", "--shards", "{new}/shards"]

# (command, argv, words the one sentence must hold)
CASES = [
    # build_shards
    ("build_shards", [], "--src is required"),
    ("build_shards", ["--src", "{missing}", "--out", "{new}"], "--src {missing} does not exist"),
    ("build_shards", ["--src", "{afile}", "--out", "{new}"], "is a file, not a folder"),
    ("build_shards", ["--src", "{empty}", "--out", "{new}"], "holds none of the split folders"),
    ("build_shards", ["--src", "{images}", "--out", "{afile}"], "--out {afile} is a file, not a folder"),
    ("build_shards", ["--src", "{images}", "--out", "{afile}/shards"], "{afile} is a file, not a folder"),
    ("build_shards", ["--src", "{images}", "--out", "{new}", "--max-count", "0"], "--max-count must be at least 1"),
    ("build_shards", ["--src", "{images}", "--out", "{new}", "--max-size-mb", "0"], "positive number of megabytes"),
    ("build_shards", ["--src", "{images}", "--out", "{new}", "--quality", "101"], "between 1 and 100"),
    ("build_shards", ["--src", "{images}", "--out", "{new}", "--workers", "0"], "--workers must be at least 1"),
    ("build_shards", ["--src", "{images}", "--out", "{new}", "--names", "{missing}"], "--names"),
    ("build_shards", ["--src", "{images}", "--out", "{new}", "--splits", ","], "names no split"),
    ("build_shards", ["--src", "{images}", "--out", "{new}", "--max-count", "many"], "invalid int value"),
    ("build_shards", ["--verify", "--out", "{missing}"], "does not exist"),
    ("build_shards", ["--src", "{empty}", "--out", "{empty}/shards"], "is inside --src"),
    # export
    ("export", ["--out", X], "required: checkpoint"),
    ("export", ["{missing}", "--out", X], "does not exist"),
    ("export", ["{afile}", "--out", X], "is a file, not a checkpoint folder"),
    ("export", ["{empty}", "--out", X], "holds no checkpoint"),
    ("export", ["{run}", "--out", X], "holds no checkpoint"),
    ("export", ["{run}", "--out", "{new}/x.bin"], "*.safetensors"),
    ("export", ["{run}", "--out", "{precious}"], "already exists: pass --overwrite"),
    ("export", ["{run}", "--out", "{empty}"], "is a folder"),
    ("export", ["{run}", "--out", "{afile}/x.safetensors"], "{afile} is a file, not a folder"),
    ("export", ["{run}", "--out", X, "--push-to-hub", "org/x"], "add --format timm"),
    ("export", ["{run}", "--out", "{afile}", "--format", "timm"], "is a file, not a folder"),
    ("export", ["{run}", "--out", X, "--dtype", "fp8"], "invalid choice"),
    # eval
    ("eval", ["--data", "{shards}"], "required: --weights"),
    ("eval", ["--weights", "{missing}", "--data", "{shards}"], "--weights {missing} does not exist"),
    ("eval", [*W, "--data", "{missing}"], "--data {missing} does not exist"),
    ("eval", [*W, "--data", "{shards}", "--split", "train", "--batch-size", "0"], "--batch-size must be at least 1"),
    ("eval", [*W, "--data", "{shards}", "--split", "train", "--workers", "-1"], "--workers must be at least 0"),
    ("eval", [*W, "--data", "{shards}", "--split", "train", "--json", "{empty}"], "--json {empty} is a folder"),
    ("eval", [*W, "--data", "{shards}", "--split", "train", "--device", "tpu"], "pass cpu or cuda"),
    ("eval", [*W, "--data", "{shards}"], "has no val split"),
    ("eval", ["--weights", "{junk}", "--data", "{shards}", "--split", "train"], "not a readable .safetensors"),
    ("eval", ["--weights", "{shards}/train.json", "--data", "{shards}"], "is a shard manifest, not weights"),
    ("eval", [*W, "--data", "{shards}", "--split", "train", "--model", "vit_tiny_patch16_224"], "drop --model"),
    ("eval", [*W, "--data", "{shards}", "--model", "attnscale_smal_12"], "Did you mean"),
    # analyze
    ("analyze", ["--data", "{shards}"], "give --weights"),
    ("analyze", [*W, "--data", "{missing}", "--out", "{new}"], "--data {missing} does not exist"),
    ("analyze", [*W, "--data", "{shards}", "--out", "{afile}"], "--out {afile} is a file"),
    ("analyze", [*W, "--data", "{shards}", "--out", "{new}", "--batch-size", "0"], "--batch-size must be at least 1"),
    ("analyze", [*W, "--data", "{shards}", "--out", "{new}", "--num-images", "0"], "--num-images must be at least"),
    ("analyze", [*W, "--data", "{shards}", "--out", "{new}", "--device", "tpu"], "is not a device"),
    ("analyze", [*W, "--data", "{shards}", "--out", "{report}"], "already holds report.json"),
    ("analyze", ["--weights", "{bare}", "--data", "{shards}", "--out", "{new}"], "pass --model NAME"),
    ("analyze", ["--model", "attnscale_tiny_24", "--model-kwargs", "depth=x", "--data", "{shards}", "--out", "{new}"],
     "cannot be built"),
    ("analyze", ["--model", "attnscale_tiny_2", "--data", "{shards}", "--out", "{new}"], "Did you mean"),
    ("analyze", ["--weights", "{shards}/train-000000.tar", "--data", "{shards}", "--out", "{new}"], "is a shard, not"),
    # reshard
    ("reshard", ["{missing}"], "does not exist"),
    ("reshard", ["{afile}"], "is a file, not a folder"),
    ("reshard", ["{empty}"], "has no complete checkpoint"),
    ("reshard", ["{run}", "--tag", "step00000009"], "has no checkpoint step00000009"),
    ("reshard", ["{run}", "--workers", "0"], "--workers must be at least 1"),
    ("reshard", ["{run2}/checkpoints"], "give the run folder above it"),
    # demo
    ("demo", ["--epochs", "0", *DEMO_FOLDERS], "--epochs must be at least 1"),
    ("demo", ["--lr", "0", *DEMO_FOLDERS], "--lr must be a positive"),
    ("demo", ["--processes", "0", *DEMO_FOLDERS], "--processes must be at least 1"),
    ("demo", ["--gpus", "0", *DEMO_FOLDERS], "drop --gpus"),
    ("demo", ["--deepspeed-config", "ds_configs/nope.json", *DEMO_FOLDERS], "does not exist"),
    ("demo", ["--work", "{mine}", "--shards", "{new}/shards"], "not a folder the demo made"),
    ("demo", ["--work", "{new}/work", "--shards", "{mine}"], "not a folder the demo made"),
    ("demo", ["--work", "{afile}", "--shards", "{new}/shards"], "is a file"),
    ("demo", ["--work", "{new}/a", "--shards", "{new}/a"], "same folder"),
    ("demo", [*DEMO_FOLDERS, "--eval-json", "{afile}/eval.json"], "{afile} is a file, not a folder"),
]


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for a folder)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def _case_id(case) -> str:
    command, argv, _ = case
    return f"{command} {' '.join(argv)}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_a_mistake_is_one_sentence_exit_2_and_nothing_written(case, world, capsys):
    command, argv, words = case
    root = Path(world["root"])
    before = _snapshot(root)
    try:
        status = COMMANDS[command]([a.format(**world) for a in argv])
    except SystemExit as exit_:   # a command that still let argparse exit would land here
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert words.format(**world) in err, err
    assert _snapshot(root) == before   # no output, no temporary, not even an empty folder


def test_the_table_covers_every_command_many_times():
    counts = {command: sum(c[0] == command for c in CASES) for command in COMMANDS}
    assert len(CASES) >= 40 and min(counts.values()) >= 6, counts


@pytest.mark.parametrize("argv, words", [
    (["tools/eval.py", "--weights", "{weights}", "--data", "{shards}", "--batch-size", "0"], "--batch-size"),
    (["tools/demo.py", "--gpus", "0"], "drop --gpus"),
], ids=["eval", "demo"])
def test_the_entry_points_print_one_line_and_no_traceback(argv, words, world):
    """As a user runs them: a real process, the front end in tools/, its exit status and its whole stderr."""
    proc = subprocess.run([sys.executable, *[a.format(**world) for a in argv]], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert words in proc.stderr and proc.stdout == ""


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere: no permission to refuse")
def test_an_output_folder_without_permission_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(usage.ConfigError, match="no permission to write in"):
        usage.writable_folder(locked / "shards", "--out")
    with pytest.raises(usage.ConfigError, match="cannot be written \\(no permission\\)"):
        usage.writable_folder(locked, "--out")


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    @usage.entry_point(interrupted="interrupted: nothing was written.")
    def command(argv):
        raise KeyboardInterrupt

    assert command([]) == 130
    assert capsys.readouterr().err == "interrupted: nothing was written.\n"


# --- files for others: what the user writes honours the umask ---------------------------------------------------

@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_exports_honour_the_umask(umask, tmp_path):
    """safetensors writes its files 0600: others on a shared machine could not read an export."""
    model = timm.create_model("attnscale_tiny_24", **TINY)
    meta = {"model": "attnscale_tiny_24", "model_kwargs": TINY}
    for name in ("w.safetensors", "w.pth"):
        save_weights(model.state_dict(), tmp_path / name, meta)
    save_timm_folder(model, meta, tmp_path / "timm", {})
    files = [tmp_path / "w.safetensors", tmp_path / "w.pth", tmp_path / "w.pth.json",
             *(p for p in (tmp_path / "timm").iterdir())]
    assert {p.name: _mode(p) for p in files} == {p.name: 0o666 & ~umask for p in files}
    assert _mode(tmp_path / "timm") == 0o777 & ~umask
    assert json.loads((tmp_path / "timm" / "config.json").read_text())["architecture"] == "attnscale_tiny_24"


def test_reports_are_written_whole_with_the_umask_mode(umask, world, tmp_path, capsys):
    """analyze's figures and reports and eval's --json go through antismooth.atomic.write_atomic (a temporary renamed
    into place, so a Ctrl-C never leaves half a file): each file has the mode a new file gets under the umask, also
    over an earlier file and a temporary a killed writer left (both 0600), and no temporary stays."""
    out = tmp_path / "report"
    out.mkdir()
    for name in ("report.csv", "report.csv.tmp"):
        (out / name).write_text("from an earlier, killed run")
        os.chmod(out / name, 0o600)
    assert analyze.main(["--weights", world["weights"], "--data", world["shards"], "--num-images", "2",
                         "--out", str(out), "--device", "cpu", "--overwrite"]) == 0
    figures = tmp_path / "eval" / "eval.json"
    assert eval_tool.main(["--weights", world["weights"], "--data", world["shards"], "--split", "train",
                           "--workers", "0", "--batch-size", "64", "--device", "cpu", "--json", str(figures)]) == 0
    capsys.readouterr()
    written = [*out.iterdir(), figures]
    assert {"report.csv", "report.json", "hc_share.png"} <= {p.name for p in written}
    assert {p.name: _mode(p) for p in written} == {p.name: 0o666 & ~umask for p in written}
    assert not [p for p in written if p.name.endswith(".tmp")]
    assert (out / "report.csv").read_text().startswith("model,measurement,block,value\n")
    assert json.loads(figures.read_text())["count"] == 103


def test_an_atomic_write_that_fails_leaves_no_temporary(tmp_path):
    """The rename onto a folder fails: the folder stays as it was and the temporary is removed."""
    target = tmp_path / "report.json"
    (target / "inside").mkdir(parents=True)
    with pytest.raises(IsADirectoryError):
        write_atomic(target, b"{}")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["inside", "report.json"]


# --- a missing validation split is said once, with what happens instead ------------------------------------------

def test_a_missing_val_split_is_said_once_by_build_and_analyze(world, tmp_path, capsys):
    src = tmp_path / "imagefolder"
    for class_dir in sorted((SAMPLE_IMAGES / "train").iterdir())[:3]:
        shutil.copytree(class_dir, src / "train" / class_dir.name)
    assert build_shards.main(["--src", str(src), "--out", str(tmp_path / "shards"), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "has no val/ folder" in err and "without evaluating" in err, err
    assert not (tmp_path / "shards" / "val.json").exists() and (tmp_path / "shards" / "train.json").is_file()

    out = tmp_path / "report"
    assert analyze.main(["--weights", world["weights"], "--data", str(tmp_path / "shards"), "--num-images", "2",
                         "--out", str(out), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "measuring the training images" in err, err
    assert json.loads((out / "report.json").read_text())["data"] == str(tmp_path / "shards" / "train.json")


def test_the_test_images_carry_a_val_split_of_training_classes():
    """The README's first try (build_shards --src tests/data/images) finds a validation split."""
    val = sorted(p.name for p in (SAMPLE_IMAGES / "val").iterdir())
    train = {p.name for p in (SAMPLE_IMAGES / "train").iterdir()}
    assert len(val) == 11 and set(val) <= train
    assert all(len(list((SAMPLE_IMAGES / "val" / c).iterdir())) == 1 for c in val)
