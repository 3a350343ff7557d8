"""`pip install .` (not editable) gives a working package: imports, the model zoo, the console entry points.

What this proves: the sdist/wheel build of pyproject.toml holds every module (antismooth.cli included), a
fresh virtual environment with only that install and the third-party packages imports antismooth from its
own site-packages (not from this checkout), builds a zoo model through timm, and runs an entry point; the
declared dependency ranges admit the exact pins of requirements.txt, and every third-party package that
the library imports is declared.

What it does not prove: that pip can *resolve and download* those ranges. Downloading torch and DeepSpeed
takes gigabytes and a network, so the fresh venv sees the third-party packages of the test's own venv
through a path entry (a `.pth` file: plain path, so that venv's editable install of antismooth stays
inactive), pip and setuptools included, and pip installs with --no-deps --no-index --no-build-isolation.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

from launch import python_path, slow_fixture
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
ENTRY_POINTS = ("antismooth-train", "antismooth-build-shards", "antismooth-export", "antismooth-eval",
                "antismooth-analyze", "antismooth-plan", "antismooth-reshard")
# Import names that differ from the distribution names pyproject.toml declares.
IMPORT_TO_DIST = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn"}
# Imported only where the user opts in, with their own error sentence: mpi4py (under mpirun), wandb (--report-to
# wandb; the `wandb` extra).
OPTIONAL_IMPORTS = {"mpi4py", "wandb"}


def _pins() -> dict[str, str]:
    """requirements.txt as {name: exact version}."""
    lines = (line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines())
    return dict(line.split("==") for line in lines if line)


def _third_party_imports() -> set[str]:
    """Top-level names of every module the library imports (anywhere in a file, lazy imports included)."""
    names = set()
    for path in (REPO / "antismooth").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "antismooth"}


def test_declared_ranges_admit_the_pins_and_cover_the_imports():
    declared = {Requirement(r).name.lower(): Requirement(r) for r in PYPROJECT["project"]["dependencies"]}
    pins = _pins()
    for name, req in declared.items():
        assert name in pins, f"{name} is declared in pyproject.toml but not pinned in requirements.txt"
        assert req.specifier.contains(pins[name]), f"{req} does not admit the pinned {name}=={pins[name]}"
    for module in _third_party_imports() - OPTIONAL_IMPORTS:
        assert IMPORT_TO_DIST.get(module, module).lower() in declared, f"antismooth imports {module}, undeclared"
    assert "scikit-learn" not in declared  # only tools/demo.py needs it: the `demo` extra
    assert any(Requirement(r).name == "wandb" for r in PYPROJECT["project"]["optional-dependencies"]["wandb"])
    assert set(PYPROJECT["project"]["scripts"]) == set(ENTRY_POINTS)


@slow_fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    """A new venv with `pip install .` of this checkout; third-party packages visible from the test's venv."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    base = Path(sys.base_prefix) / "bin" / "python3"
    # --without-pip: pip and setuptools come through the path entry too, not the interpreter's bundled old ones.
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], check=True, capture_output=True, text=True).stdout.strip())
    # This venv's packages, and those a `--target` install put on PYTHONPATH (this checkout left out).
    third_party = [sysconfig.get_paths()["purelib"], *filter(None, python_path(without=REPO).split(os.pathsep))]
    (site / "zz_third_party.pth").write_text("".join(f"{entry}\n" for entry in third_party))
    # Build from a copy: an in-tree build (no isolation) would leave build/ and *.egg-info in the checkout.
    source = venv.parent / "source"
    shutil.copytree(REPO / "antismooth", source / "antismooth", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", source / "pyproject.toml")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                           "--no-build-isolation", "--disable-pip-version-check", str(source)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=venv.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return venv


def test_pip_install_gives_a_working_package(fresh_venv):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import antismooth, timm; from antismooth.models import MODEL_NAMES; "
            "m = timm.create_model('attnscale_tiny_12', num_classes=10); "
            "print(antismooth.__file__, len(MODEL_NAMES), m.num_classes)")
    proc = subprocess.run([str(fresh_venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                          timeout=300, env=env, cwd=fresh_venv.parent)  # not the checkout: it must not be on sys.path
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, count, classes = proc.stdout.split()
    assert Path(where).is_relative_to(fresh_venv) and int(count) > 40 and classes == "10"
    for name in ENTRY_POINTS:
        assert (fresh_venv / "bin" / name).is_file()
    help_text = subprocess.run([str(fresh_venv / "bin" / "antismooth-export"), "--help"], capture_output=True,
                               text=True, timeout=300, env=env, cwd=fresh_venv.parent)
    assert help_text.returncode == 0, help_text.stderr[-3000:]
    assert "--format" in help_text.stdout and "DeepSpeed" in help_text.stdout
