"""--compile (each transformer block torch.compiled in place, inductor's C++ backend here) against eager, on real
DeepSpeed engines: conftest's world-1 zero_runs launch trains the compiled runs (COMPILED_RUNS) beside the eager
runs they must match, full-batch on the same 16 real JPEGs.

Tolerance: compiled kernels fuse and reorder float sums, so losses may differ from eager's in the last bits; over
these 6 steps they agree to rel 1e-4 (fp32) as the ZeRO stages do among themselves, and bf16 to rel 2e-2.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from antismooth.export import create_model_from_weights
from conftest import COMPILED_RUNS
from jobs.train_plan import probe_images  # the batch each run's probe logits were taken on
from test_ema import export
from test_train import scalars


IMG_SIZE = 32


def _graph_counts(log: str) -> list[int]:
    """pretrain's "torch.compile built N graph(s)" after each compiled run of the launch (a running total)."""
    return [int(n) for n in re.findall(r"torch\.compile built (\d+) graph\(s\)", log)]


def test_a_compiled_zero2_run_trains_as_the_eager_one(zero_runs):
    eager, compiled = zero_runs[2, 1], zero_runs["zero2-compiled", 1]
    assert scalars(compiled.output, "train/loss") == pytest.approx(scalars(eager.output, "train/loss"), rel=1e-4)
    torch.testing.assert_close(torch.load(compiled.probe), torch.load(eager.probe), rtol=1e-3, atol=1e-4)
    assert json.loads((compiled.output / "run.json").read_text())["flags"]["compile"] is True


def test_the_runs_after_a_zero3_run_in_the_same_process_get_torchs_own_linear_back(zero_runs):
    """ZeRO-3 replaces torch.nn.functional.linear for the whole process (DeepSpeed's memory-efficient linear, which
    adds the bias in place: torch 2.11's compiler then zeroes compiled blocks' gradients, pytorch#180642); the
    compiled runs of this launch come after the ZeRO-3 one, which must leave torch's own behind."""
    assert (zero_runs[3, 1].output / "functional-linear.txt").read_text() == "torch._C._nn.linear"


def test_one_graph_serves_every_block_of_the_24(zero_runs):
    """Regional compile: the 24 blocks share the training graph (and the evaluation's); the spectral probe, run
    every 3 steps through forward hooks, stays eager instead of recompiling each block."""
    counts = _graph_counts(zero_runs["zero2-compiled", 1].log)
    assert len(counts) == len(COMPILED_RUNS)
    assert counts[0] <= 2, f"the first compiled run built {counts[0]} graphs for 24 blocks of one shape"


def test_an_eager_run_resumed_with_compile_ends_as_the_uninterrupted_one(zero_runs):
    """3 steps eager (ZeRO-1, with the model EMA), then resumed with --compile to step 6: the same losses, weights
    and EMA as the one eager run of 6 steps."""
    reference, resumed = zero_runs[1, 1], zero_runs["zero1-resumed-compiled", 1]
    assert json.loads((resumed.output / "run.json").read_text())["resumed_from"] == "step00000003"
    assert scalars(resumed.output, "train/loss") == pytest.approx(scalars(reference.output, "train/loss"), rel=1e-4)
    torch.testing.assert_close(torch.load(resumed.probe), torch.load(reference.probe), rtol=1e-3, atol=1e-4)


def test_a_compiled_run_saves_and_exports_the_eager_keys(zero_runs, tmp_path):
    compiled, eager = zero_runs["zero1-resumed-compiled", 1], zero_runs[1, 1]
    states = torch.load(compiled.output / "checkpoints" / "step00000006" / "mp_rank_00_model_states.pt",
                        weights_only=False)["module"]
    assert not [key for key in states if "_orig_mod" in key]
    for flags in ([], ["--ema"]):
        weights = export(compiled.output, tmp_path / f"compiled{len(flags)}.safetensors", *flags)
        reference = export(eager.output, tmp_path / f"eager{len(flags)}.safetensors", *flags)
        assert sorted(weights) == sorted(reference)
        for key in reference:
            torch.testing.assert_close(weights[key], reference[key], rtol=1e-3, atol=1e-4, msg=f"{flags} {key}")
    model, _ = create_model_from_weights(tmp_path / "compiled0.safetensors")   # strict, plain timm
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(probe_images(IMG_SIZE)), torch.load(compiled.probe),
                                   rtol=1e-5, atol=1e-5)


def test_compiled_bf16_trains_as_eager_bf16(zero_runs):
    """bf16 ZeRO-2 compiled on one process against eager bf16 ZeRO-2 on two (the same 16 images per step)."""
    eager, compiled = zero_runs["zero2-bf16", 2], zero_runs["zero2-bf16-compiled", 1]
    losses = scalars(compiled.output, "train/loss")
    assert len(losses) == 3
    assert losses == pytest.approx(scalars(eager.output, "train/loss"), rel=2e-2)
