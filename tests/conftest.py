"""Shared pytest fixtures, one section per concern."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

# ----------------------------------------------------------------------------------------------
# Data fixtures: the real ImageNet sample images and ImageFolder trees built from them.
# (Used by tests/test_shards.py; keep fixtures for other concerns in their own section.)

IMAGENET_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    """The 103 real ImageNet JPEGs (train/<wnid>/<file>.JPEG) next to the repo, never copied into it."""
    if not (IMAGENET_SAMPLE / "train").is_dir():
        pytest.fail(f"the ImageNet sample images are missing: expected them at {IMAGENET_SAMPLE} "
                    "(../shared/data/imagenet-sample from the repo root).")
    return IMAGENET_SAMPLE


@pytest.fixture
def imagefolder(imagenet_sample: Path, tmp_path: Path) -> Path:
    """A fresh ImageFolder root in tmp: train/ holds all 103 images, val/ the same 103 class folders
    with every fourth one holding its image and the rest empty (torchvision still counts them)."""
    root = tmp_path / "imagenet"
    shutil.copytree(imagenet_sample / "train", root / "train")
    for i, class_dir in enumerate(sorted((root / "train").iterdir())):
        val_dir = root / "val" / class_dir.name
        val_dir.mkdir(parents=True)
        if i % 4 == 0:
            for image in class_dir.iterdir():
                shutil.copyfile(image, val_dir / image.name)
    return root


# ----------------------------------------------------------------------------------------------
# Stream fixtures: shards of the sample images, built once per session with the real builder.

@pytest.fixture(scope="session")
def sample_shards(imagenet_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.json and 11 shards of 10 (the last of 3) real JPEGs: 103 images, one per class, so a label
    names its image; 11 shards divide neither by 2 ranks × 2 workers nor by anything else."""
    from antismooth.data.shards import ShardOptions, build

    out = tmp_path_factory.mktemp("sample-shards")
    build(str(imagenet_sample), str(out), ShardOptions(max_count=10), splits=("train",))
    return out / "train.json"
