"""A clone of the repository passes on its own: nothing beside it (no ../shared), only its committed files.

The clone's tests of its real photographs and the shards built from them (the tests that read images from a
path: before, ../shared/data/imagenet-sample) run with this venv's Python, importing the clone's antismooth (not the
editable install of this checkout), from a folder with nothing else in it: what `make test` meets on a bare machine.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch import python_path

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_clone_with_nothing_beside_it_passes_the_data_tests(tmp_path: Path):
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTHON"))}
    # The clone first; what a `--target` install put on the path stays (the GPU machine's wheels), this checkout not.
    env.update(PYTHONPATH=python_path(clone, without=REPO), PYTHONDONTWRITEBYTECODE="1")
    imported = subprocess.run([sys.executable, "-c", "import antismooth; print(antismooth.__file__)"], cwd=clone,
                              env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(imported).is_relative_to(clone), imported  # the clone's own code, not this checkout's

    run = subprocess.run([sys.executable, "-m", "pytest", "tests/test_shards.py", "tests/test_sample_images.py",
                          "-m", "not slow", "-q", "-x", "-p", "no:cacheprovider",
                          "--basetemp", str(clone / ".pytest-tmp")],  # its temporary files inside the clone too
                         cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout and " error" not in run.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clone"]  # and the run wrote nothing outside it
