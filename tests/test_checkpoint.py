"""The readers of the run folder's files (antismooth/checkpoint/), on folders laid out as DeepSpeed and antismooth
write them: `latest`, the tag listing, the rank files and antismooth.json. The checkpoints of real engines are
tested through training, resume and export (test_train.py, test_reliability.py, test_elastic.py, test_export.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from antismooth.checkpoint import (CheckpointError, RankFiles, RunFolder, complete_tags, damaged_files, list_tags,
                                   read_latest, require_every_rank, saved_world_size, write_latest)


def _tag(checkpoints: Path, tag: str, world: int = 2, stage: int = 2) -> Path:
    """A tag folder with DeepSpeed's file names for `world` ranks at ZeRO `stage`, each a real torch.save archive."""
    folder = checkpoints / tag
    folder.mkdir(parents=True)
    models = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)] if stage == 3 else \
        ["mp_rank_00_model_states.pt"]
    for name in models + [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]:
        torch.save({"dp_world_size": world, "name": name}, folder / name)
    meta = {"model": "attnscale_tiny_12", "model_kwargs": {}, "classes": ["a"], "data_config": {},
            "world_size": world, "step": int(tag.removeprefix("step").removeprefix("global_step"))}
    (folder / "antismooth.json").write_text(json.dumps(meta))
    return folder


def test_latest_names_a_tag_only_when_its_folder_is_there(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    assert read_latest(tmp_path) is None                 # no file
    (tmp_path / "latest").write_text("\n")
    assert read_latest(tmp_path) is None                 # empty
    write_latest(tmp_path, "step00000004")
    assert (tmp_path / "latest").read_text() == "step00000004" and not (tmp_path / "latest.tmp").exists()
    assert read_latest(tmp_path) is None and "names no checkpoint folder" in caplog.text   # its folder is gone
    _tag(tmp_path, "step00000004")
    assert read_latest(tmp_path) == "step00000004"
    assert RunFolder(tmp_path.parent).latest_tag() is None   # a run folder's save_dir is its checkpoints/


def test_one_tag_listing_for_resume_pruning_and_export(tmp_path: Path):
    for tag in ("step00000004", "step00000008", "step00000012"):
        _tag(tmp_path, tag)
    (tmp_path / "step00000016").mkdir()                    # a save in progress: no files yet
    _tag(tmp_path, "global_step3")                         # saved by another program
    (tmp_path / "step00000002.damaged").mkdir()            # set aside
    assert list_tags(tmp_path) == ["global_step3", "step00000004", "step00000008", "step00000012", "step00000016"]
    assert complete_tags(tmp_path) == []                   # no `latest`: nothing is complete
    write_latest(tmp_path, "step00000008")
    assert complete_tags(tmp_path) == ["step00000004", "step00000008"]
    run = RunFolder(tmp_path.parent)
    run.checkpoints = tmp_path
    assert run.prune(keep=1) == ["step00000004"]
    assert list_tags(tmp_path) == ["global_step3", "step00000008", "step00000012", "step00000016"]


def test_rank_files_say_who_saved_and_what_is_missing(tmp_path: Path):
    zero2, zero3 = _tag(tmp_path, "step00000004", world=2), _tag(tmp_path, "step00000008", world=3, stage=3)
    assert RankFiles.of(zero2) == RankFiles(optim=frozenset({0, 1}), zero3_models=frozenset(), zero12_model=True)
    assert saved_world_size(zero2) == 2 and saved_world_size(zero2, recorded=4) == 4
    assert require_every_rank(zero3) == (3, 3)
    (zero3 / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    (zero3 / "zero_pp_rank_2_mp_rank_00_optim_states.pt").unlink()
    assert RankFiles.of(zero3).missing_ranks(3) == [1, 2]
    with pytest.raises(CheckpointError, match=r"saved by 3 ranks but lacks the files of rank\(s\) 1, 2"):
        require_every_rank(zero3)
    # The resume's check: each rank checks the saving ranks it stands for, rank 0 also the shared files.
    assert damaged_files(zero3, 1, 3, saved=3) == ["zero_pp_rank_1_mp_rank_00_model_states.pt (missing)"]
    assert damaged_files(zero3, 0, 2, saved=3) == ["zero_pp_rank_2_…_optim_states.pt (missing)"]


def test_a_truncated_archive_or_unreadable_json_is_damaged(tmp_path: Path):
    folder = _tag(tmp_path, "step00000004", world=2)
    assert damaged_files(folder, 0, 2, saved=2) == [] and damaged_files(folder, 1, 2, saved=2) == []
    shard = folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:-40])
    (folder / "antismooth.json").write_text("{ cut short")
    assert damaged_files(folder, 1, 2, saved=2) == [shard.name]
    assert damaged_files(folder, 0, 2, saved=2) == ["antismooth.json"]
    assert damaged_files(folder, 0, 1, saved=2) == [shard.name, "antismooth.json"]   # one rank for both


# --- antismooth.json: the model's description ----------------------------------------------------------------

# antismooth.json as pretrain.py wrote it before the description was typed (a flat object, values as JSON).
OLD_META = {"model": "attnscale_tiny_12", "model_kwargs": {"num_classes": 3, "img_size": 32, "patch_size": 8},
            "classes": ["n01", "n02", "n03"],
            "data_config": {"input_size": [3, 32, 32], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                            "crop_pct": 0.875, "interpolation": "bicubic"},
            "step": 12, "epoch": 1, "global_batch": 16, "micro_batch": 8, "world_size": 2}


def test_a_description_written_the_old_way_reads_and_writes_back_the_same(tmp_path: Path):
    from antismooth.checkpoint import read_description, write_model_meta
    from antismooth.config import HeldBatch
    from antismooth.models.description import ModelDescription

    folder = tmp_path / "checkpoints" / "step00000012"
    folder.mkdir(parents=True)
    (folder / "antismooth.json").write_text(json.dumps(OLD_META, indent=2, sort_keys=True) + "\n")
    described = read_description(folder)
    assert (described.model, described.classes, described.step, described.world_size) == \
        ("attnscale_tiny_12", ["n01", "n02", "n03"], 12, 2)
    assert described.to_dict() == OLD_META
    write_latest(tmp_path / "checkpoints", "step00000012")
    run = RunFolder(tmp_path)
    assert run.saved_batch() == HeldBatch(16, 8, 2)
    again = tmp_path / "again"
    write_model_meta(again, described)
    assert (again / "antismooth.json").read_text() == (folder / "antismooth.json").read_text()
    with pytest.raises(ValueError, match="names no model"):
        write_model_meta(again, {"model_kwargs": {}})
    (folder / "antismooth.json").write_text(json.dumps(dict(OLD_META, classes="n01")))
    with pytest.raises(CheckpointError, match="'classes' of .* is not a JSON list"):
        read_description(folder)
    assert run.description("step00000012") is None   # the lenient reader: callers fall back
    assert ModelDescription.from_text({k: v if isinstance(v, str) else json.dumps(v) for k, v in OLD_META.items()}
                                      ) == ModelDescription.from_dict(OLD_META)


def test_the_description_builds_its_model_and_its_evaluation_transform(tmp_path: Path):
    from antismooth.data.pipeline import AugmentConfig
    from antismooth.evaluate import eval_augment
    from antismooth.models.description import ModelDescription

    described = ModelDescription.from_dict(OLD_META)
    torch.manual_seed(0)
    trained = described.create()
    built = described.build({k: v.clone() for k, v in trained.state_dict().items()})
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), trained.state_dict().values(),
                                                     strict=True))
    assert described.parameter_shapes() == {n: p.shape for n, p in trained.named_parameters()}
    assert eval_augment(built, described) == eval_augment(built, OLD_META) == AugmentConfig(
        input_size=32, interpolation="bicubic", eval_crop_pct=0.875, mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225))
