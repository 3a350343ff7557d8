"""tools/export.py and tools/eval.py on real DeepSpeed checkpoints and real shards.

The checkpoints are the training tests' runs (conftest.py `zero_runs`: real pretrain.py runs of a
24-block AttnScale ViT, trained full-batch on 16 real JPEGs under ZeRO-1/2/3 on 1 and on 2 ranks,
plus a ZeRO-0 run and bf16 ZeRO-2/3 runs; two DeepSpeed launches for the whole suite), each with
the live engine's logits on tests/jobs/train_plan.py's probe images. An export must reproduce those
logits through plain timm, load with strict=True, and fail on damaged or incomplete checkpoints
with one sentence and no file left behind. Evaluation must give the same figures from shards, from
an ImageFolder, on one process or two, as a direct loop, and map data holding a subset of the
model's classes to its outputs by name.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform

import antismooth  # noqa: F401  (registers the zoo)
from antismooth.cli import eval as eval_tool
from antismooth.cli import export as export_tool
from antismooth.data.pipeline import reduce_eval_metrics
from antismooth.data.shards import ShardOptions, build
from antismooth.evaluate import EvalData, evaluate, match_classes
from antismooth.checkpoint import read_model_meta, write_model_meta
from antismooth.export import create_model_from_weights, read_export_meta, save_weights
from antismooth.models import read_checkpoint
from conftest import TINY_MODEL, TrainedRun
from jobs.train_plan import probe_images  # the batch each run's probe logits were taken on
from launch import FULL_BATCH_SIZE, free_port

REPO = Path(__file__).resolve().parents[1]

IMG_SIZE = int(TINY_MODEL[TINY_MODEL.index("--input-size") + 1])
LAST_TAG = "step00000006"  # the 6-step runs' last checkpoint; --keep 3 leaves steps 4, 5 and 6
KEPT_TAGS = ["step00000004", "step00000005", "step00000006"]


def _export(capsys, *argv: str) -> tuple[int, str]:
    """Run tools/export.py in-process; (exit status, what it printed to stderr)."""
    status = export_tool.main([str(a) for a in argv])
    return status, capsys.readouterr().err


def _live(run: TrainedRun) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe images (fp32) and the live engine's fp32 logits on them."""
    return probe_images(IMG_SIZE), torch.load(run.probe, weights_only=True)


def _latest(run: TrainedRun) -> str:
    return (run.output / "checkpoints" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def wnids(sample_images) -> list[str]:
    """tiny_shards' classes: the first 16 class folders of the sample images, in label order."""
    return sorted(p.name for p in (sample_images / "train").iterdir())[:FULL_BATCH_SIZE]


# --- exports reproduce the live model -------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_export_reproduces_the_live_engine(zero_runs, wnids, tmp_path, capsys, stage, world):
    run = zero_runs[stage, world]
    assert _latest(run) == LAST_TAG
    out = tmp_path / "model.safetensors"
    status, err = _export(capsys, run.output, "--out", out)  # the run folder itself; the tag is `latest`'s
    assert status == 0, err
    meta = read_export_meta(out)
    assert meta["model"] == "attnscale_tiny_24" and meta["tag"] == LAST_TAG and meta["world_size"] == world
    assert meta["zero_stage"] == stage and meta["classes"] == wnids

    model, _ = create_model_from_weights(out)  # strict=True, from the file's own description
    images, live = _live(run)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), live, rtol=1e-5, atol=1e-5)
        untrained = timm.create_model(meta["model"], **meta["model_kwargs"]).eval()
        assert not torch.allclose(untrained(images), live, atol=1e-3)  # the check above is not vacuous


@pytest.mark.parametrize("config", ["zero2-bf16", "zero3-bf16"])
def test_bf16_training_exports_its_fp32_masters_in_any_dtype(zero_runs, tmp_path, capsys, config):
    run = zero_runs[config, 2]
    tag = _latest(run)
    fp32, bf16 = tmp_path / "fp32.safetensors", tmp_path / "bf16.safetensors"
    assert _export(capsys, run.output / "checkpoints", "--out", fp32)[0] == 0
    assert _export(capsys, run.output / "checkpoints", "--tag", tag, "--out", bf16, "--dtype", "bf16")[0] == 0
    full, half = read_checkpoint(fp32), read_checkpoint(bf16)
    assert {t.dtype for t in full.values()} == {torch.float32} and {t.dtype for t in half.values()} == {torch.bfloat16}
    assert all(torch.equal(full[k].bfloat16(), half[k]) for k in full)
    assert not all(torch.equal(full[k], half[k].float()) for k in full)  # the masters are finer than bf16
    assert read_export_meta(fp32)["tag"] == read_export_meta(bf16)["tag"] == tag
    assert read_export_meta(bf16)["dtype"] == "bf16" and bf16.stat().st_size < 0.55 * fp32.stat().st_size

    # The engine trained with bf16 copies of these masters: the bf16 export is exactly those weights.
    model, meta = create_model_from_weights(bf16)
    images, live = _live(run)
    with torch.no_grad():
        logits = model.to(torch.bfloat16).eval()(images.bfloat16()).float()
        torch.testing.assert_close(logits, live, rtol=0, atol=2e-2)  # a few bf16 ulps: CPU kernels by thread count
        untrained = timm.create_model(meta.model, **meta.model_kwargs).to(torch.bfloat16).eval()
        assert not torch.allclose(untrained(images.bfloat16()).float(), live, rtol=0, atol=2e-2)  # not vacuous


def test_pth_export_with_sidecar_loads_in_timm_and_with_weights_only(zero_runs, tmp_path, capsys):
    run = zero_runs[3, 2]
    pth, st = tmp_path / "as24.pth", tmp_path / "as24.safetensors"
    assert _export(capsys, run.output, "--out", pth)[0] == 0
    assert _export(capsys, run.output, "--out", st)[0] == 0
    assert read_export_meta(pth) == read_export_meta(st) and (tmp_path / "as24.pth.json").is_file()
    state_dict = torch.load(pth, weights_only=True)
    assert not any(k.startswith("module.") for k in state_dict)
    images, live = _live(run)
    meta = read_export_meta(pth)
    for path in (pth, st):  # timm's own loader (strict=True) takes both
        model = timm.create_model(meta["model"], checkpoint_path=str(path), **meta["model_kwargs"]).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(images), live, rtol=1e-5, atol=1e-5)


def test_timm_format_export_loads_with_timm_local_dir(zero_runs, wnids, tmp_path, capsys):
    """--format timm on a real ZeRO-3, 2-rank run: timm's local-dir: loader rebuilds the live model, and the card
    reports the run's derived numbers from its run.json."""
    run = zero_runs[3, 2]
    out = tmp_path / "as24"
    status, err = _export(capsys, run.output, "--out", out, "--format", "timm")
    assert status == 0, err
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    images, live = _live(run)
    with torch.no_grad():
        torch.testing.assert_close(model(images), live, rtol=1e-5, atol=1e-5)
    assert model.pretrained_cfg["label_names"] == wnids and model.num_classes == len(wnids)
    assert tuple(timm.data.resolve_model_data_config(model)["input_size"]) == (3, IMG_SIZE, IMG_SIZE)
    derived = json.loads((run.output / "run.json").read_text())["derived"]
    card = (out / "README.md").read_text()
    assert f"global_batch: {derived['global_batch']}" in card and f"tag: {LAST_TAG}" in card
    assert read_export_meta(out)["zero_stage"] == 3
    status, err = _export(capsys, run.output, "--out", out, "--format", "timm")  # the folder exists now
    assert status == 2 and "already exists and is not empty: pass --overwrite" in err


def test_run_folder_files_are_readable_as_the_umask_allows(zero_runs):
    """Training's files (checkpoints, log.txt, run.json, tensorboard) get the read bits the umask of the launch
    (this process's) leaves, like any file the user writes: others on a shared machine can read them."""
    umask = os.umask(0)
    os.umask(umask)
    root = zero_runs[2, 2].output
    files = [p for p in root.rglob("*") if p.is_file()]
    assert any(p.name.endswith("_optim_states.pt") for p in files) and (root / "run.json") in files
    assert {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) & 0o444 for p in files} == \
        {str(p.relative_to(root)): 0o444 & ~umask for p in files}


# --- failures: one sentence, exit 2, nothing left behind --------------------------------------------------

@pytest.fixture
def broken(zero_runs, tmp_path) -> Path:
    """A private copy of the 2-rank ZeRO-3 run's checkpoints/ (steps 4, 5 and 6; `latest`: 6) to damage."""
    checkpoints = Path(shutil.copytree(zero_runs[3, 2].output / "checkpoints", tmp_path / "checkpoints"))
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == KEPT_TAGS
    assert (checkpoints / "latest").read_text() == LAST_TAG
    return checkpoints


def _listing(folder: Path) -> set[Path] | None:
    return set(folder.iterdir()) if folder.is_dir() else None


def _assert_fails_cleanly(capsys, args: list, out: Path, *phrases: str) -> None:
    before = _listing(out.parent)
    status, err = _export(capsys, *args, "--out", out)
    assert status == 2
    assert err.startswith("error: ") and "Traceback" not in err
    for phrase in phrases:
        assert phrase in err, err
    assert _listing(out.parent) == before  # no output, no temporary, not even its folder


def test_missing_rank_file(broken, tmp_path, capsys):
    (broken / LAST_TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    _assert_fails_cleanly(capsys, [broken], tmp_path / "out" / "x.safetensors", "lacks the files of rank(s) 1",
                          "copy all ranks' files")


def test_no_latest_lists_the_tags(broken, tmp_path, capsys):
    (broken / "latest").unlink()
    _assert_fails_cleanly(capsys, [broken], tmp_path / "x.safetensors", "no 'latest' file",
                          f"the tags there are {', '.join(KEPT_TAGS)}", "--tag")


def test_unknown_tag_lists_the_tags(broken, tmp_path, capsys):
    _assert_fails_cleanly(capsys, [broken, "--tag", "step99999999"], tmp_path / "x.pth",
                          "no checkpoint 'step99999999'", f"the tags there are {', '.join(KEPT_TAGS)}")


def test_tag_newer_than_latest_is_refused(broken, tmp_path, capsys):
    newer = broken / "step00000009"
    shutil.copytree(broken / LAST_TAG, newer)
    meta = read_model_meta(newer)
    write_model_meta(newer, dict(meta, step=9))
    _assert_fails_cleanly(capsys, [broken, "--tag", newer.name], tmp_path / "x.safetensors",
                          "newer than the checkpoint 'latest' names", f"export {LAST_TAG}")


def test_stage0_checkpoint(zero_runs, tmp_path, capsys):
    run = zero_runs["zero0", 1]
    assert any((run.output / "checkpoints" / _latest(run)).glob("*_model_states.pt"))  # a real, complete save
    _assert_fails_cleanly(capsys, [run.output], tmp_path / "x.safetensors", "stage-0", "ZeRO stage 1-3")


def test_damaged_partition(broken, tmp_path, capsys):
    optim = broken / LAST_TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 2])
    _assert_fails_cleanly(capsys, [broken], tmp_path / "x.safetensors", "could not consolidate",
                          "export another tag")


def test_no_such_folder(tmp_path, capsys):
    _assert_fails_cleanly(capsys, [tmp_path / "runs" / "nope"], tmp_path / "x.safetensors",
                          "does not exist: give a run folder")


def test_existing_output_needs_overwrite(zero_runs, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"precious")
    _assert_fails_cleanly(capsys, [zero_runs[2, 1].output], out, "already exists", "--overwrite")
    assert out.read_bytes() == b"precious"
    assert _export(capsys, zero_runs[2, 1].output, "--out", out, "--overwrite")[0] == 0
    assert read_export_meta(out)["model"] == "attnscale_tiny_24"


# --- evaluation ---------------------------------------------------------------------------------------

EVAL_KWARGS = dict(num_classes=103, img_size=32, patch_size=8, embed_dim=64, num_heads=4)
DATA_CONFIG = {"input_size": [3, 32, 32], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
               "crop_pct": 0.875, "interpolation": "bicubic"}


@pytest.fixture(scope="module")
def classifier(sample_images, tmp_path_factory) -> tuple[Path, dict, tuple[torch.Tensor, torch.Tensor]]:
    """A 103-class model that gets every third sample image right (its head fitted by least squares on
    those images' features), saved with its description; its figures from a direct loop over the files
    (timm's float transform, normalised in place: independent of our uint8 path), and the images as
    uint8 (the loaders' form) with their labels."""
    root = sample_images / "train"
    classes = sorted(p.name for p in root.iterdir())
    files = [Image.open(next((root / c).iterdir())).convert("RGB") for c in classes]
    transforms = [create_transform(DATA_CONFIG["input_size"], is_training=False, crop_pct=DATA_CONFIG["crop_pct"],
                                   interpolation=DATA_CONFIG["interpolation"], mean=DATA_CONFIG["mean"],
                                   std=DATA_CONFIG["std"], use_prefetcher=uint8) for uint8 in (False, True)]
    images = torch.stack([transforms[0](f) for f in files])
    pixels = torch.stack([transforms[1](f) for f in files])
    labels = torch.arange(len(classes))
    torch.manual_seed(0)
    model = timm.create_model("attnscale_tiny_24", **EVAL_KWARGS).eval()
    with torch.no_grad():
        features = model.forward_head(model.forward_features(images), pre_logits=True).double()
        fit = labels % 3 == 0
        design = torch.cat([features[fit], torch.ones(int(fit.sum()), 1, dtype=torch.float64)], dim=1)
        solution = torch.linalg.lstsq(design, 10.0 * torch.eye(len(classes), dtype=torch.float64)[labels[fit]]).solution
        model.head.weight.copy_(solution[:-1].T)
        model.head.bias.copy_(solution[-1])
        logits = model(images)
    top5 = logits.topk(5, dim=-1).indices
    direct = {"top1": 100 * (top5[:, 0] == labels).float().mean().item(),
              "top5": 100 * (top5 == labels[:, None]).any(-1).float().mean().item(),
              "loss": torch.nn.functional.cross_entropy(logits, labels).item(), "count": len(classes)}
    assert 30 < direct["top1"] < 40  # the fitted third, give or take: figures that can disagree
    path = tmp_path_factory.mktemp("classifier") / "as24.safetensors"
    save_weights(model.state_dict(), path, {"model": "attnscale_tiny_24", "model_kwargs": EVAL_KWARGS,
                                            "classes": classes, "data_config": DATA_CONFIG})
    return path, direct, (pixels, labels)


def _eval(tmp_path, capsys, *argv) -> dict:
    out = tmp_path / "eval.json"
    assert eval_tool.main([*map(str, argv), "--json", str(out)]) == 0, capsys.readouterr().err
    return json.loads(out.read_text())


def _same_figures(a: dict, b: dict) -> None:
    assert a["count"] == b["count"]
    assert a["top1"] == pytest.approx(b["top1"]) and a["top5"] == pytest.approx(b["top5"])
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_eval_on_shards_and_imagefolder_match_a_direct_loop(classifier, sample_shards, sample_images, tmp_path,
                                                            capsys):
    weights, direct, _ = classifier
    shards = _eval(tmp_path, capsys, "--weights", weights, "--data", sample_shards.parent, "--split", "train",
                   "--workers", "2", "--batch-size", "16")
    _same_figures(shards, direct)
    folder = _eval(tmp_path, capsys, "--weights", weights, "--data", sample_images, "--split", "train",
                   "--workers", "0", "--batch-size", "16")
    _same_figures(folder, direct)
    assert folder["images_per_s"] > 0 and "top-1 33.98 %" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("source", ["shards", "imagefolder"])
def test_eval_on_two_processes_counts_every_image_once(classifier, sample_shards, sample_images, tmp_path, source):
    weights, direct, _ = classifier
    data = sample_shards if source == "shards" else sample_images  # the manifest itself / an ImageFolder root
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "tools" / "eval.py"), "--weights", str(weights), "--data", str(data), "--split", "train",
           "--workers", "1", "--batch-size", "8", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["world_size"] == 2
    _same_figures(figures, direct)


def test_eval_says_what_does_not_match(classifier, zero_runs, sample_shards, tmp_path, capsys):
    weights, _, _ = classifier
    plain = tmp_path / "plain.pth"  # like an official checkpoint: no description
    save_weights(read_checkpoint(weights), plain)
    assert read_export_meta(plain) is None
    base = ["--data", str(sample_shards), "--workers", "0"]
    assert eval_tool.main(["--weights", str(plain), *base]) == 2
    assert "does not say which model" in capsys.readouterr().err
    assert eval_tool.main(["--weights", str(plain), "--model", "attnscale_small_12", *base]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: The checkpoint does not match model attnscale_small_12") and "Traceback" not in err
    assert "shape mismatch" in err and "unexpected (" in err and "blocks.12." in err  # 24 blocks into 12

    exported = tmp_path / "sixteen.safetensors"  # the DeepSpeed run's 16-class model on 103-class data
    assert _export(capsys, zero_runs[2, 1].output, "--out", exported)[0] == 0
    assert eval_tool.main(["--weights", str(exported), *base]) == 2
    assert "has 87 class(es) the model was not trained on" in capsys.readouterr().err


def _folders(root: Path, source: Path, classes: list[str], filled: list[str]) -> Path:
    """An ImageFolder at root with a folder per class of `classes`, those of `filled` holding source's images."""
    for wnid in classes:
        (root / wnid).mkdir(parents=True)
    for wnid in filled:
        shutil.copytree(source / wnid, root / wnid, dirs_exist_ok=True)
    return root


def test_eval_maps_a_subset_of_the_model_classes_by_name(classifier, sample_images, tmp_path, capsys):
    weights, _, (images, labels) = classifier
    classes = read_export_meta(weights)["classes"]
    fifth = classes[::5]  # 21 classes, 7 of them among the ones the model gets right
    source = sample_images / "train"
    full = _folders(tmp_path / "full", source, classes, fifth)  # all 103 folders, only the fifth filled
    subset = _folders(tmp_path / "subset", source, fifth, fifth)  # labels 0..20 here mean classes 0, 5, ..., 100
    args = ["--weights", weights, "--workers", "0", "--batch-size", "8"]
    on_full = _eval(tmp_path, capsys, *args, "--data", full)
    on_subset = _eval(tmp_path, capsys, *args, "--data", subset)
    _same_figures(on_subset, on_full)

    model, _ = create_model_from_weights(weights)
    direct = reduce_eval_metrics(**evaluate(model, [(images[::5], labels[::5])], "cpu"))
    _same_figures(on_subset, direct)
    unmapped = reduce_eval_metrics(**evaluate(model, [(images[::5], torch.arange(len(fifth)))], "cpu"))
    assert direct["count"] == 21 and direct["top1"] > 30 > unmapped["top1"]  # the mapping is what makes it right

    # Shards of a training split holding only those classes number them 0..20 too: the stream is remapped alike.
    _folders(tmp_path / "src" / "train", source, fifth, fifth)
    build(str(tmp_path / "src"), str(tmp_path / "shards"), ShardOptions(max_count=8), splits=("train",))
    _same_figures(_eval(tmp_path, capsys, *args, "--data", tmp_path / "shards", "--split", "train"), direct)

    shutil.copytree(source / classes[0], subset / "n99999999")  # a class the model never saw
    assert eval_tool.main([*map(str, args), "--data", str(subset)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "has 1 class(es) the model was not trained on (n99999999)" in err
    assert "leave those class folders out" in err and err.count("\n") == 1


def test_weights_without_class_names_take_labels_as_they_are(classifier, caplog):
    weights, _, _ = classifier
    model, _ = create_model_from_weights(weights)  # 103 outputs
    data = EvalData("imagefolder", Path("data"), tuple(f"c{i}" for i in range(21)))
    with caplog.at_level(logging.WARNING, logger="antismooth.evaluate"):
        assert match_classes(model, None, data) == data
    assert "103 outputs and data has 21 classes" in caplog.text
    assert "export the weights with their classes" in caplog.text
    with pytest.raises(ValueError, match="the model has 103 outputs but data has 110 classes; pass --num-classes"):
        match_classes(model, None, EvalData("imagefolder", Path("data"), tuple(f"c{i}" for i in range(110))))


def test_evaluate_sums_counts_over_batches_and_restores_train_mode(classifier):
    weights, direct, (pixels, labels) = classifier
    model, _ = create_model_from_weights(weights)
    model.train()
    batches = [(pixels[:40], labels[:40]), (pixels[40:], labels[40:])]
    stats = dict(mean=DATA_CONFIG["mean"], std=DATA_CONFIG["std"])
    counts = evaluate(model, batches, "cpu", **stats)
    assert model.training and counts["count"] == 103
    _same_figures(reduce_eval_metrics(**counts), direct)  # no process group: this process's figures
    autocast = reduce_eval_metrics(**evaluate(model, batches, "cpu", dtype=torch.bfloat16, **stats))
    assert model.training and autocast["top1"] == pytest.approx(direct["top1"], abs=100 * 3 / 103)
