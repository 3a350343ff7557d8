"""bench/gpu_check.sh where there is no GPU: it must stop at once in one sentence, not spend the GPU machine's
minutes (or report 12 skipped GPU tests as a pass), and its CPU dry run (GPU_CHECK_CPU=1, what `make device-env`
runs under the GPU machine's software) must pass setup without nvidia-smi or nvcc."""
from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "bench" / "gpu_check.sh"

no_gpu_here = pytest.mark.skipif(torch.cuda.is_available(), reason="shows the check on a machine without a GPU")


def _check(tmp_path: Path, *steps: str, **env: str) -> subprocess.CompletedProcess:
    """The check with this Python, its report and work folder in tmp_path, no wheels to install, and a PATH without
    nvidia-smi or nvcc."""
    full_env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_WORK=str(tmp_path / "work"),
                    GPU_CHECK_WHEELS=str(tmp_path / "no-wheels"), PATH="/usr/bin:/bin", **env)
    return subprocess.run(["bash", str(CHECK), str(tmp_path / "report.md"), *steps], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=300)


@no_gpu_here
def test_without_cuda_the_check_stops_before_any_step_in_one_sentence(tmp_path):
    done = _check(tmp_path)
    assert done.returncode == 2
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "sees no CUDA GPU" in done.stderr and "GPU_CHECK_CPU=1" in done.stderr
    assert "sees no CUDA GPU" in (tmp_path / "report.md").read_text()
    assert not (tmp_path / "work").exists()   # no step ran, no wheel was installed


@no_gpu_here
def test_the_cpu_dry_run_passes_setup_without_nvidia_smi_or_nvcc_and_prints_every_version(tmp_path):
    done = _check(tmp_path, "setup", GPU_CHECK_CPU="1")
    report = (tmp_path / "report.md").read_text()
    assert done.returncode == 0, report[-3000:]
    assert "CPU dry run" in report and "nvcc: not found" in report and "nvidia-smi: not found" in report
    versions = json.loads((tmp_path / "work" / "versions.json").read_text())
    assert {"python", "torch", "cuda", "torchvision", "numpy", "PIL", "timm", "deepspeed", "webdataset",
            "safetensors"} <= set(versions)
    assert versions["cuda_available"] is False
    refused = _check(tmp_path, "setup", "recipe", GPU_CHECK_CPU="1")   # a step that would train on the CPU
    assert refused.returncode == 2 and "recipe needs a GPU" in refused.stderr


@no_gpu_here
def test_the_gpu_tests_fail_rather_than_skip_when_the_gpu_check_runs_them(monkeypatch):
    monkeypatch.setenv("ANTISMOOTH_REQUIRE_GPU", "1")
    with pytest.raises(pytest.fail.Exception, match="sees no CUDA GPU"):
        runpy.run_path(str(REPO / "tests" / "gpu" / "test_gpu.py"))
