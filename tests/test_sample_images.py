"""The repository's own test images (tests/data/images, written by tests/data/make_images.py) keep what the
other tests count on: 103 classes of one image each, ImageNet's sizes and its odd files."""
from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from conftest import SAMPLE_IMAGES


def _images() -> list[Path]:
    return sorted((SAMPLE_IMAGES / "train").glob("*/*"))


def test_103_classes_of_one_image_each_named_in_class_order():
    classes = sorted(p.name for p in (SAMPLE_IMAGES / "train").iterdir())
    assert len(classes) == 103 and all(re.fullmatch(rf"c{i:03d}_[a-z]+", c) for i, c in enumerate(classes))
    assert [p.parent.name for p in _images()] == classes  # one file per class folder
    assert all(p.name.startswith(p.parent.name) and p.suffix == ".JPEG" for p in _images())
    assert sum(p.stat().st_size for p in _images()) <= 3_000_000


def test_imagenet_sizes_and_odd_files():
    found = {"L": 0, "CMYK": 0, "PNG": 0, "progressive": 0, "both sides >= 500": 0}
    for path in _images():
        with Image.open(path) as im:
            assert 120 <= min(im.size) and max(im.size) <= 700, (path.name, im.size)
            found["L"] += im.mode == "L" and im.format == "JPEG"
            found["CMYK"] += im.mode == "CMYK"
            found["PNG"] += im.format == "PNG"
            found["progressive"] += bool(im.info.get("progressive"))
            found["both sides >= 500"] += min(im.size) >= 500
            im.load()  # every one decodes whole
    assert found["L"] >= 3 and found["CMYK"] == found["PNG"] == found["progressive"] == 1
    assert 3 <= found["both sides >= 500"] <= 10
    assert any("'" in p.name for p in _images())


def test_the_readme_lists_every_image():
    readme = (SAMPLE_IMAGES / "README.md").read_text()
    assert all(f"| `{p.parent.name}` | `{p.name}` |" in readme for p in _images())
