"""timm's own folder format (antismooth.hub): written with timm's save_for_hf, loaded by timm's local-dir: source,
read by tools/eval.py and tools/analyze.py, with a model card from the run folder's run.json and eval.jsonl.

The DeepSpeed path (tools/export.py --format timm on a real ZeRO checkpoint) is tested in test_export.py;
here the weights are a fresh model's, so the folder's round trip is checked without launching DeepSpeed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.data import resolve_data_config, resolve_model_data_config

import antismooth  # noqa: F401  (registers the zoo)
from antismooth.checkpoint import RunFolder
from antismooth.cli import analyze as analyze_tool
from antismooth.cli import eval as eval_tool
from antismooth.cli import export as export_tool
from antismooth.evaluate import build_eval_model, model_data_config
from antismooth.export import read_export_meta, save_weights
from antismooth.hub import model_card, run_summary, save_timm_folder


KWARGS = dict(num_classes=103, img_size=32, patch_size=8, embed_dim=64, num_heads=4)
# Deliberately not timm's defaults for the model: the folder must carry these, not the registry's cfg.
DATA_CONFIG = {"input_size": [3, 32, 32], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "crop_pct": 0.9,
               "interpolation": "bilinear"}
RUN_JSON = {"flags": {"epochs": 6, "lr": 0.05, "data": "shards/imagenet"},
            "deepspeed": {"zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW", "params": {"weight_decay": 0.05}}},
            "derived": {"world_size": 2, "micro_batch": 8, "grad_accum": 1, "global_batch": 16, "num_samples": 16,
                        "steps_per_epoch": 1, "total_steps": 6, "warmup_steps": 0, "peak_lr": 0.0015625}}
# What pretrain.py's evaluations record (antismooth.checkpoint.RunFolder.append_eval): the model's, then its EMA's.
EVALS = [{"epoch": 4, "step": 4, "ema": False, "top1": 12.5, "top5": 50.0, "loss": 2.7, "images": 16},
         {"epoch": 5, "step": 5, "ema": False, "top1": 25.0, "top5": 62.5, "loss": 2.5, "images": 16},
         {"epoch": 5, "step": 5, "ema": True, "top1": 31.25, "top5": 68.75, "loss": 2.4, "images": 16}]


@pytest.fixture(scope="module")
def exported(sample_images, tmp_path_factory) -> tuple[Path, Path, torch.nn.Module, dict]:
    """A 103-class AttnScale model (λ set away from 0, so they must load) as a timm folder and as a file."""
    classes = sorted(p.name for p in (sample_images / "train").iterdir())
    torch.manual_seed(0)
    model = timm.create_model("attnscale_tiny_24", **KWARGS).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("attn.lamb"):
                param.uniform_(-0.5, 0.5)
    meta = {"model": "attnscale_tiny_24", "model_kwargs": KWARGS, "classes": classes, "data_config": DATA_CONFIG,
            "tag": "step00000006", "step": 6, "zero_stage": 3, "world_size": 2, "dtype": "fp32"}
    root = tmp_path_factory.mktemp("hub")
    run = root / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps(RUN_JSON))
    for record in EVALS:
        RunFolder(run).append_eval(record)
    num_params = sum(p.numel() for p in model.parameters())
    card = model_card("as24", meta, num_params, run_summary(run))
    folder = save_timm_folder(model, meta, root / "as24", card)
    file = save_weights(model.state_dict(), root / "as24.safetensors", meta)
    return folder, file, model, meta


def test_timm_loads_the_folder_with_its_arguments_classes_and_transform(exported):
    folder, _, model, meta = exported
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "attnscale_tiny_24" and config["num_classes"] == 103
    assert {k: v for k, v in config["model_args"].items() if k in KWARGS} == {**KWARGS, "img_size": [32, 32]}
    assert config["label_names"] == meta["classes"] and config["antismooth"]["tag"] == "step00000006"

    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()  # timm's own loader, strict
    random = timm.create_model(f"local-dir:{folder}").eval()  # pretrained=False: timm's architecture only
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)
        assert not torch.allclose(random(images), model(images), atol=1e-3)  # the check above is not vacuous
    for resolved in (resolve_model_data_config(loaded), resolve_data_config(model=loaded)):
        assert tuple(resolved["input_size"]) == (3, 32, 32) and resolved["interpolation"] == "bilinear"
        assert list(resolved["mean"]) == DATA_CONFIG["mean"] and list(resolved["std"]) == DATA_CONFIG["std"]
        assert resolved["crop_pct"] == 0.9


def test_the_folder_reads_like_an_exported_file(exported):
    folder, file, model, _ = exported
    from_folder, from_file = read_export_meta(folder), read_export_meta(file)
    for key in ("model", "classes", "tag", "step", "zero_stage"):
        assert from_folder[key] == from_file[key]
    assert from_folder["data_config"] == DATA_CONFIG
    net, meta = build_eval_model(folder)
    assert model_data_config(net, meta) == model_data_config(net, from_file)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(images), model(images), rtol=0, atol=0)


def test_model_card_names_the_model_paper_run_and_eval(exported):
    card = (exported[0] / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: timm" in card and "# Model card for as24" in card
    assert "attnscale_tiny_24" in card and "Anti-Oversmoothing in Deep Vision Transformers" in card
    assert "ICLR 2022" in card and "@inproceedings{wang2022antioversmoothing" in card
    assert "global_batch: 16" in card and "total_steps: 6" in card and "zero_stage: 3" in card
    assert "top-1 (%): 25.0" in card and "epoch: 5" in card  # the last evaluation of the model's own weights
    assert "weight_decay: 0.05" in card and "31.25" not in card  # from the DeepSpeed JSON; not the EMA's figure
    assert 'timm.create_model("local-dir:as24", pretrained=True)' in card


def test_eval_and_analyze_accept_the_folder(exported, sample_shards, tmp_path, capsys):
    folder, file, _, _ = exported
    figures = {}
    for weights in (folder, file):
        out = tmp_path / f"{weights.name}.json"
        status = eval_tool.main(["--weights", str(weights), "--data", str(sample_shards.parent), "--split", "train",
                                 "--workers", "0", "--batch-size", "64", "--json", str(out)])
        assert status == 0, capsys.readouterr().err
        figures[weights] = json.loads(out.read_text())
    assert figures[folder]["count"] == figures[file]["count"] == 103
    assert figures[folder]["loss"] == pytest.approx(figures[file]["loss"], rel=1e-6)
    assert figures[folder]["top1"] == figures[file]["top1"]

    report = tmp_path / "report"
    assert analyze_tool.main(["--weights", str(folder), "--data", str(sample_shards), "--num-images", "4",
                              "--out", str(report), "--device", "cpu"]) == 0, capsys.readouterr().err
    payload = json.loads((report / "report.json").read_text())
    assert payload["models"]["as24"]["model"] == "attnscale_tiny_24"


def test_existing_folder_needs_overwrite(exported, tmp_path):
    folder, _, model, meta = exported
    target = tmp_path / "taken"
    target.mkdir()
    (target / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="already exists and is not empty: pass --overwrite"):
        save_timm_folder(model, meta, target, {})
    assert (target / "precious.txt").read_text() == "keep"
    save_timm_folder(model, meta, target, {}, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert not list(tmp_path.glob(".taken.*"))  # no temporary left


def test_push_to_hub_needs_the_timm_format(capsys):
    assert export_tool.main(["runs/x", "--out", "x.safetensors", "--push-to-hub", "org/x"]) == 2
    assert "--push-to-hub uploads timm's folder format: add --format timm" in capsys.readouterr().err


def test_push_to_an_unreachable_hub_says_so_in_one_sentence(exported, tmp_path):
    """A hub endpoint nothing listens on (huggingface_hub reads HF_ENDPOINT at import: a fresh process)."""
    folder, _, _, meta = exported
    code = ("import sys, timm, antismooth; from antismooth.hub import push_to_hub, HubError\n"
            f"model = timm.create_model('local-dir:{folder}', pretrained=True)\n"
            "try:\n"
            f"    push_to_hub(model, {meta!r}, 'org/as24', {{}}, '{folder}')\n"
            "except HubError as e:\n"
            "    print(e); sys.exit(2)\n")
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_TOKEN="hf_not_a_token", HF_HUB_ETAG_TIMEOUT="2",
               HF_HUB_DOWNLOAD_TIMEOUT="2", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = proc.stdout.strip()
    assert message.startswith("could not upload to the Hugging Face Hub repo org/as24 (")
    assert f"huggingface-cli upload org/as24 {folder}" in message and "\n" not in message
