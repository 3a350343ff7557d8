"""DeiT's model EMA under ZeRO (antismooth/ema.py): each rank averages its own fp32 master fragments; the
checkpoint's per-rank files export whole at any world size. Rides on conftest's zero_runs launches: the runs of
conftest.EMA_RUNS keep one (decay 0.5, so that 6 steps move the average)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from timm.utils import ModelEmaV3

from antismooth.cli import export as export_tool
from conftest import EMA_DECAY
from test_train import scalar_tags


def export(run: Path, out: Path, *flags: str) -> dict[str, torch.Tensor]:
    assert export_tool.main([str(run), "--out", str(out), *flags]) == 0
    return load_file(out)


def reference_ema(history: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """timm's EMA rule on the weights a run recorded: the initial weights, then one lerp per optimizer step with
    ModelEmaV3's decay for that step."""
    schedule = ModelEmaV3(nn.Linear(1, 1, bias=False), decay=EMA_DECAY)
    average = {name: w.clone() for name, w in history[0].items()}
    for step, weights in enumerate(history[1:], start=1):
        decay = schedule.get_decay(step)
        for name, w in weights.items():
            average[name].lerp_(w, 1.0 - decay)
    return average


@pytest.fixture(scope="module")
def reference(zero_runs) -> dict[str, torch.Tensor]:
    history = torch.load(zero_runs[1, 1].output / "weights.pt")
    assert len(history) == 7   # the start and 6 steps
    return reference_ema(history)


def test_the_ema_equals_timms_rule_on_the_per_step_weights(zero_runs, reference, tmp_path):
    exported = export(zero_runs[1, 1].output, tmp_path / "ema.safetensors", "--ema")
    assert exported.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(exported[name], reference[name], rtol=0, atol=1e-6, msg=name)
    weights = export(zero_runs[1, 1].output, tmp_path / "weights.safetensors")
    assert max((weights[n] - exported[n]).abs().max() for n in reference) > 1e-4   # an average, not the weights


@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes_keep_the_same_ema_in_their_fragments(zero_runs, reference, stage, tmp_path):
    """Each of 2 ranks averages its own slice; the files join into the one-process run's average, as close as the
    two runs' weights are (up to 4e-5 apart here: the gradients are summed in another order)."""
    exported = export(zero_runs[stage, 2].output, tmp_path / "ema.safetensors", "--ema")
    for name in reference:
        torch.testing.assert_close(exported[name], reference[name], rtol=0, atol=1e-4, msg=name)


def test_the_ema_is_evaluated_beside_the_model(zero_runs):
    tags = scalar_tags(zero_runs[3, 2].output)
    assert {"eval_ema/top1", "eval_ema/top5", "eval_ema/loss"} <= set(tags)
    assert "eval EMA epoch 6: top-1" in zero_runs[3, 2].log


def test_a_checkpoint_without_an_ema_says_so(zero_runs, tmp_path, capsys):
    run = zero_runs[2, 1].output   # trained with --no-model-ema
    assert not list((run / "checkpoints").glob("step*/ema_rank*.pt"))
    assert export_tool.main([str(run), "--out", str(tmp_path / "x.safetensors"), "--ema"]) == 2
    err = capsys.readouterr().err
    assert "holds no model EMA (the run was trained with --no-model-ema): export the weights without --ema." in err
    assert not (tmp_path / "x.safetensors").exists()
