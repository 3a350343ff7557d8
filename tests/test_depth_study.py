"""bench/depth_study.py on data made from the repository's own photographs, written in Fashion-MNIST's IDX format:
the conversion to a stratified ImageFolder and shards, the one-sentence answer when the files are missing or damaged,
resuming and budgeting the grid, the table, and one real cell (pretrain.py, export, eval). The study itself needs
the real files (`apt-get install dataset-fashion-mnist`); nothing here does."""
from __future__ import annotations

import gzip
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import depth_study as study  # noqa: E402

TRAIN_COPIES = 3   # 103 photographs x 3 (as they are, flipped, rotated): 309 training images, 103 test images


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes (LeCun's format, gzip), as Fashion-MNIST ships them."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fashion_like(sample_images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The four IDX files made from the 103 photographs: 28x28 grayscale, label = photograph index mod 10."""
    folder = tmp_path_factory.mktemp("fashion-like")
    photos = sorted(p for p in (sample_images / "train").rglob("*") if p.is_file())
    small = [np.asarray(Image.open(p).convert("L").resize((28, 28), Image.Resampling.BILINEAR)) for p in photos]
    labels = np.arange(len(small)) % 10
    variants = [lambda a: a, np.fliplr, np.rot90]
    train = np.stack([v(a) for v in variants[:TRAIN_COPIES] for a in small])
    write_idx(folder / "train-images-idx3-ubyte.gz", train)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.tile(labels, TRAIN_COPIES))
    write_idx(folder / "t10k-images-idx3-ubyte.gz", np.stack(small))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels)
    return folder


def test_the_idx_files_become_a_stratified_subset_and_the_whole_test_split_in_shards(fashion_like, tmp_path):
    images = study.read_idx(fashion_like / "train-images-idx3-ubyte.gz")
    assert images.shape == (103 * TRAIN_COPIES, 28, 28) and images.dtype == np.uint8
    shards = study.prepare_data(fashion_like, tmp_path, per_class=20, subset_seed=0)
    train, val = (json.loads((shards / f"{split}.json").read_text()) for split in ("train", "val"))
    assert train["num_samples"] == 200 and val["num_samples"] == 103
    assert [c["wnid"] for c in train["classes"]] == [str(k) for k in range(10)]
    # Stratified: 20 of each class, the same 20 for the same seed, others for another.
    labels = study.read_idx(fashion_like / "train-labels-idx1-ubyte.gz")
    picked = study.stratified(labels, 20, 0)
    assert np.bincount(labels[picked]).tolist() == [20] * 10
    assert np.array_equal(picked, study.stratified(labels, 20, 0)) and not np.array_equal(picked, study.stratified(labels, 20, 1))
    # Built once: a second call reuses the shards.
    stamp = (shards / "train.json").stat().st_mtime_ns
    assert study.prepare_data(fashion_like, tmp_path, 20, 0) == shards and (shards / "train.json").stat().st_mtime_ns == stamp


def test_missing_or_damaged_files_are_named_with_what_to_do(fashion_like, tmp_path, capsys):
    code = study.main(["--fashion-mnist", str(tmp_path), "--work", str(tmp_path / "work"), "--only", "vit:6:0",
                       "--out", str(tmp_path / "cell")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "apt-get install dataset-fashion-mnist" in err and "train-images-idx3-ubyte.gz" in err
    damaged = tmp_path / "damaged.gz"
    with gzip.open(damaged, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (1000).to_bytes(4, "big") + b"\x00" * 10)
    with pytest.raises(study.StudyError, match="damaged"):
        study.read_idx(damaged)
    with pytest.raises(study.StudyError, match="MODEL:DEPTH:SEED"):
        study.Cell.parse("vit-48")


def test_a_finished_cell_is_never_run_again_and_the_budget_takes_cells_in_grid_order(tmp_path):
    recipe = dict(study.RECIPE)
    cells = study.grid()
    assert len(cells) == 36 and cells[:3] == [study.Cell(m, 6, 0) for m in study.MODELS]
    assert study.Cell.parse("attnscale:48:1") == study.Cell.parse("attnscale_tiny_48:1") == study.Cell("attnscale", 48, 1)
    results = tmp_path / "results.jsonl"
    for cell in cells[:4]:
        study.append_result(results, {"family": cell.family, "depth": cell.depth, "seed": cell.seed,
                                      "recipe_key": study.recipe_key(recipe), "wall_s": 60.0 + cell.depth})
    study.append_result(results, {"family": "vit", "depth": 24, "seed": 0, "recipe_key": "another-recipe",
                                  "wall_s": 1.0})
    left = study.pending(cells, study.load_results(results), recipe)
    assert left == cells[4:]   # a record of another recipe does not count
    model = study.cost_model(study.load_results(results), recipe)
    assert model[0] > 0       # fitted on two depths: slope per block-image
    fit, rest = study.within_budget(left, 10, recipe, model)
    assert fit == left[:len(fit)] and rest == left[len(fit):]
    assert sum(study.estimate_seconds(c, recipe, model) for c in fit) <= 600 < sum(
        study.estimate_seconds(c, recipe, model) for c in left[:len(fit) + 1])


def test_the_table_gives_mean_and_spread_over_seeds():
    recipe = dict(study.RECIPE)
    key = study.recipe_key(recipe)
    records = [{"family": "vit", "depth": 12, "seed": s, "top1": top1, "wall_s": 120.0, "recipe_key": key}
               for s, top1 in enumerate((80.0, 82.0, 84.0))]
    row = next(line for line in study.table(records, recipe).splitlines() if line.startswith("| vit |"))
    assert f"82.00 ± {statistics.stdev([80.0, 82.0, 84.0]):.2f} (n=3, 2.0 min)" in row


@pytest.mark.slow
def test_one_cell_trains_exports_and_evaluates_from_scratch_without_touching_the_results(fashion_like, tmp_path,
                                                                                          capsys):
    results = tmp_path / "results.jsonl"
    out = tmp_path / "cell"
    assert study.main(["--fashion-mnist", str(fashion_like), "--work", str(tmp_path / "work"), "--results",
                       str(results), "--only", "attnscale:6:0", "--out", str(out), "--train-per-class", "16",
                       "--epochs", "1", "--processes", "1"]) == 0, capsys.readouterr().err
    record = json.loads((out / "result.json").read_text())
    assert record["model"] == "attnscale_tiny_6" and record["seed"] == 0 and record["images"] == 103
    assert 0 <= record["top1"] <= 100 and record["wall_s"] > 0 and record["recipe"]["epochs"] == 1
    assert (out / "attnscale_tiny_6.safetensors").is_file() and not results.exists()
    flags = json.loads((out / "run" / "run.json").read_text())
    assert flags["deepspeed"]["zero_optimization"]["stage"] == 2 and flags["flags"]["seed"] == 0
    assert flags["deepspeed"]["activation_checkpointing"]["blocks_per_checkpoint"] == 1
