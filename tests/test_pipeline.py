"""The streaming input pipeline: real shards, real torch.distributed processes (gloo), real loader workers.

The sample shards hold one image per class, so a label names its image: the tests follow
samples through the stream by their labels, without any hook in the pipeline.
"""
from __future__ import annotations

import collections
import itertools
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds

from antismooth.data.device import DeviceBatches
from antismooth.data.pipeline import (AugmentConfig, StreamConfig, build_eval_stream, build_train_stream,
                                      reduce_eval_metrics)

AUG = AugmentConfig(input_size=32)           # DeiT recipe, small images: repeated augmentation on
PLAIN = AugmentConfig(input_size=32, repeated_aug=1)
NUM_SAMPLES = 103


def _stream(shards, rank=0, world=1, batch=8, workers=2, mode="exact", augment=PLAIN, seed=0):
    config = StreamConfig(batch_size=batch, num_workers=workers, mode=mode, seed=seed,
                          shuffle_buffer=40, shuffle_initial=10, decode="cpu")
    return build_train_stream(shards, config, rank, world, augment)


def _labels(loader):
    return [int(y) for _, labels, *_ in loader for y in labels]


# --- two real ranks ---------------------------------------------------------------------------------------

def _rank_job(rank: int, world: int, shards: str, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result = {}
    evaluation = build_eval_stream(shards, batch_size=7, rank=rank, world_size=world, num_workers=2,
                                   augment=PLAIN)
    result["eval"] = _labels(evaluation.loader())
    correct = sum(1 for y in result["eval"] if y % 2 == 0)  # a made-up classifier: right on even classes
    result["metrics"] = reduce_eval_metrics(correct, correct, 0.5 * len(result["eval"]), len(result["eval"]))
    for mode in ("exact", "resampled"):
        stream = _stream(shards, rank, world, mode=mode, augment=PLAIN)
        result[mode] = {epoch: [[int(y) for y in labels] for _, labels, _ in stream.loader(epoch)] for epoch in (0, 1)}
    ra = _stream(shards, rank, world, augment=AUG)
    result["repeated"] = _labels(ra.loader(0))
    counts = torch.tensor([len(result["exact"][0]), len(result["resampled"][0])])
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)   # would hang, not fail, if the ranks' step counts differed
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(sample_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("two-ranks")
    mp.start_processes(_rank_job, args=(2, str(sample_shards), str(out / "init"), str(out)), nprocs=2,
                       start_method="spawn")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_eval_stream_covers_every_sample_exactly_once_across_ranks_and_workers(two_ranks):
    seen = two_ranks[0]["eval"] + two_ranks[1]["eval"]
    assert sorted(seen) == list(range(NUM_SAMPLES))
    assert abs(len(two_ranks[0]["eval"]) - len(two_ranks[1]["eval"])) <= 1


def test_eval_metrics_reduce_exactly_across_ranks(two_ranks):
    even = len(range(0, NUM_SAMPLES, 2))
    for result in two_ranks:  # every rank holds the global figures after the reduction
        assert result["metrics"]["count"] == NUM_SAMPLES
        assert result["metrics"]["top1"] == pytest.approx(100 * even / NUM_SAMPLES)
        assert result["metrics"]["loss"] == pytest.approx(0.5)


@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_every_rank_runs_the_same_number_of_full_batches(two_ranks, mode):
    steps = NUM_SAMPLES // (2 * 8)
    for result in two_ranks:
        for epoch in ("0", "1"):
            assert len(result[mode][epoch]) == steps
            assert all(len(batch) == 8 for batch in result[mode][epoch])


def test_exact_epoch_sees_no_sample_twice_and_reshuffles_each_epoch(two_ranks):
    epochs = []
    for epoch in ("0", "1"):
        seen = [y for result in two_ranks for batch in result["exact"][epoch] for y in batch]
        assert len(seen) == len(set(seen)) == (NUM_SAMPLES // 16) * 16
        epochs.append(seen)
    assert epochs[0] != epochs[1]


def test_repeated_augmentation_repeats_each_image_at_most_three_times(two_ranks):
    seen = collections.Counter(y for result in two_ranks for y in result["repeated"])
    assert max(seen.values()) <= 3 and sum(seen.values()) == (NUM_SAMPLES // 16) * 16
    assert sum(1 for c in seen.values() if c == 3) >= len(seen) // 2   # copies, not just distinct images


# --- one process ------------------------------------------------------------------------------------------

def test_same_seed_same_stream_other_seed_other_stream(sample_shards):
    first = list(_stream(sample_shards, augment=AUG).loader(0))
    again = list(_stream(sample_shards, augment=AUG).loader(0))
    other = list(_stream(sample_shards, augment=AUG, seed=1).loader(0))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert [y.tolist() for _, y, _ in first] != [y.tolist() for _, y, _ in other]


@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_resume_continues_with_exactly_the_same_samples_and_augmentations(sample_shards, mode):
    stream = _stream(sample_shards, batch=4, workers=3, mode=mode, augment=AUG)
    full = list(stream.loader(epoch=1))
    consumed_steps = 7
    resumed = list(stream.loader(epoch=1, samples_consumed=consumed_steps * 4))
    assert len(resumed) == len(full) - consumed_steps
    for (x_full, y_full, at_full), (x_res, y_res, at_res) in zip(full[consumed_steps:], resumed, strict=True):
        assert torch.equal(y_full, y_res) and torch.equal(at_full, at_res)
        assert torch.equal(x_full, x_res)


def test_resume_off_a_step_boundary_is_refused(sample_shards):
    with pytest.raises(ValueError, match="step boundary"):
        _stream(sample_shards).loader(0, samples_consumed=3)


def test_batches_are_uint8_deit_augmented_rgb_and_mixup_is_timms(sample_shards):
    stream = _stream(sample_shards, augment=AUG)
    images, labels, positions = next(iter(stream.loader(0)))
    assert positions.shape == (8,) and positions.dtype == torch.int64
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    raw = images
    images, labels, _ = next(iter(DeviceBatches(stream.loader(0), "cpu", AUG.mean, AUG.std)))  # normalised, as trained on
    # ImageNet's mean and std, written out here (timm's IMAGENET_DEFAULT_*): each pixel as x / 255 - mean over std.
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    assert images.dtype == torch.float32
    torch.testing.assert_close(images, (raw.float() / 255 - mean[:, None, None]) / std[:, None, None])
    assert stream.mixup is not None and stream.mixup.label_smoothing == 0.1
    mixed, soft = stream.mixup(images, labels)
    assert soft.shape == (8, NUM_SAMPLES) and torch.allclose(soft.sum(-1), torch.ones(8))


def _write_shard(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path), encoder=False) as sink:
        for sample in samples:
            sink.write(sample)


def _jpegs(sample_shards: Path, n: int) -> list[dict]:
    source = wds.WebDataset(str(sample_shards.parent / "train-000000.tar"), shardshuffle=False)
    return [{"__key__": s["__key__"], "jpg": s["jpg"], "cls": s["cls"]} for s in list(source)[:n]]


class _WritesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_fields_are_never_unpickled(sample_shards, tmp_path):
    marker = tmp_path / "pwned"
    samples = [dict(s, pyd=pickle.dumps(_WritesAFile(str(marker))), pickle=pickle.dumps(_WritesAFile(str(marker))))
               for s in _jpegs(sample_shards, 8)]
    _write_shard(tmp_path / "evil-000000.tar", samples)
    stream = build_train_stream(str(tmp_path / "evil-000000.tar"),
                                StreamConfig(batch_size=4, num_workers=1, decode="cpu"), 0, 1, PLAIN, num_samples=8,
                                num_classes=NUM_SAMPLES)
    assert len(_labels(stream.loader(0))) == 8
    evaluation = build_eval_stream(str(tmp_path / "evil-000000.tar"), 4, 0, 1, num_workers=0, augment=PLAIN,
                                   num_samples=8)
    assert len(_labels(evaluation.loader())) == 8
    assert not marker.exists()


def test_corrupt_samples_and_truncated_shards_are_skipped_counted_and_training_goes_on(sample_shards, tmp_path):
    good = _jpegs(sample_shards, 10)
    corrupt = [dict(good[0], __key__="bad_0", jpg=good[0]["jpg"][:300]),      # a JPEG cut short
               dict(good[1], __key__="bad_1", jpg=b"not an image at all")]
    _write_shard(tmp_path / "d-000000.tar", good[:5] + corrupt)
    _write_shard(tmp_path / "d-000001.tar", good[5:])
    data = (tmp_path / "d-000001.tar").read_bytes()
    (tmp_path / "d-000001.tar").write_bytes(data[: len(data) // 2])           # a shard cut mid-file
    stream = build_train_stream(str(tmp_path / "d-{000000..000001}.tar"),
                                StreamConfig(batch_size=2, num_workers=2, shuffle_buffer=4, shuffle_initial=2,
                                             decode="cpu"),
                                0, 1, PLAIN, num_samples=12, num_classes=NUM_SAMPLES)
    batches = list(stream.loader(0))
    assert len(batches) == stream.steps_per_epoch == 6          # topped up from the good samples
    assert all(len(y) == 2 for _, y, _ in batches)
    assert stream.corrupt_skipped >= 3



def test_an_augmentation_op_that_raises_is_skipped_counted_and_replaced(sample_shards):
    """An op that fails on some images (here torchvision's RandomCrop on the photographs smaller than its crop; on
    the GPU machine, timm's posterize under Pillow 13) costs its samples, not the loader workers: the epoch keeps
    its steps, topped up from the other samples."""
    import torchvision.transforms as T

    from antismooth.data.decode import CpuSampleStage, SampleDecoder

    stream = _stream(sample_shards, batch=8, workers=2)
    stream.stage = CpuSampleStage(SampleDecoder(T.Compose([T.RandomCrop(200), *stream.transform.transforms])))
    batches = list(stream.loader(0))
    assert len(batches) == stream.steps_per_epoch == NUM_SAMPLES // 8
    assert all(len(y) == 8 for _, y, _ in batches)
    assert stream.corrupt_skipped >= 10   # 21 of the 103 images are under 200 px on a side


def test_randaugment_posterize_keeping_no_bits_gives_a_black_image_on_any_pillow():
    """DeiT's RandAugment draws posterize with 0 bits kept at magnitude 10: Pillow 12 gives a black image,
    Pillow 13 raises; the training transform gives Pillow 12's result on both."""
    from PIL import Image

    from antismooth.data.decode import randaugment_of
    from antismooth.data.pipeline import train_transform

    ops = {op.name: op for op in randaugment_of(train_transform(AUG)).ops}
    op = ops["PosterizeIncreasing"]
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    assert op.aug_fn(image, 0, **op.kwargs).getextrema() == ((0, 0),) * 3
    assert op.aug_fn(image, 1, **op.kwargs).getextrema() == ((128, 128), (0, 0), (0, 0))


# --- the data position across a change of world size or loader workers ------------------------------------

def _train(shards, rank, world, workers, steps, position=None, samples=0, global_batch=16):
    """`steps` optimizer steps of epoch 0 on rank `rank` of `world` (micro batch 8, accumulation to
    global_batch), from `position` (None: the epoch's start): the labels seen and the rank's record."""
    from antismooth.data.pipeline import EpochPosition

    config = StreamConfig(batch_size=8, num_workers=workers, shuffle_buffer=40, shuffle_initial=10, decode="cpu")
    stream = build_train_stream(shards, config, rank, world, AUG, global_batch=global_batch)
    position = position or EpochPosition()
    deal = position.deal_for(world, workers, samples)
    labels, batches = [], stream.accumulation * steps
    for _, y, positions in stream.loader(0, samples, deal, position.consumed):
        if not batches:
            break
        stream.record(positions)
        labels += y.tolist()
        batches -= 1
    assert batches == 0, "a rank ran short of batches"
    return labels, stream, deal


def test_an_epoch_resumed_on_other_ranks_and_workers_uses_every_sample_exactly_once(sample_shards):
    """2 ranks × 2 workers for 2 of the epoch's 6 steps, then 1 rank × 3 workers (2 micro batches per step) for 2,
    then 2 ranks × 1 worker for the last 2, each resumed from the record the previous saved. Repeated
    augmentation on: each of the epoch's images comes exactly 3 times, the images an uninterrupted epoch uses."""
    from antismooth.data.pipeline import EpochPosition

    seen, consumed, samples = [], np.zeros(NUM_SAMPLES, np.int32), 0
    position = None
    for world, workers, steps in ((2, 2, 2), (1, 3, 2), (2, 1, 2)):
        for rank in range(world):
            labels, stream, deal = _train(sample_shards, rank, world, workers, steps, position, samples)
            seen += labels
            consumed += stream.delivered
        samples += steps * 16
        position = EpochPosition(deal, consumed.copy())
    uninterrupted = [y for rank in range(2) for y in _train(sample_shards, rank, 2, 2, 6)[0]]
    counts = collections.Counter(seen)
    assert len(seen) == 6 * 16 and set(counts.values()) == {3}
    assert counts == collections.Counter(uninterrupted)


def test_the_same_layout_continues_its_deal_sample_for_sample(sample_shards):
    from antismooth.data.pipeline import EpochPosition

    first, stream, deal = _train(sample_shards, 0, 1, 3, 2)
    rest, _, _ = _train(sample_shards, 0, 1, 3, 4, EpochPosition(deal, stream.delivered.copy()), 32)
    whole, _, _ = _train(sample_shards, 0, 1, 3, 6)
    assert first + rest == whole


def _epoch_labels(stream, samples: int, steps: int) -> list[int]:
    labels = []
    for _, y, positions in itertools.islice(stream.epoch_loader(0, samples), steps * stream.accumulation):
        stream.record(positions)
        labels += y.tolist()
    return labels


def test_the_stream_saves_and_restores_its_own_position(sample_shards):
    """What a checkpoint holds of the data (TrainStream.state_dict) lets a new stream go on sample for sample on the
    same layout, and deal the rest anew on another, saying so."""
    def stream(workers):
        config = StreamConfig(batch_size=8, num_workers=workers, shuffle_buffer=40, shuffle_initial=10,
                              decode="cpu")
        return build_train_stream(sample_shards, config, 0, 1, AUG, global_batch=16)

    first = stream(3)
    assert first.state_dict() == {}                       # before its first loader: the epoch's start
    head = _epoch_labels(first, 0, 2)
    saved = first.state_dict()
    again = stream(3)
    again.load_state_dict(saved)
    assert again.redeal_note(32) == ""
    assert head + _epoch_labels(again, 32, 4) == _epoch_labels(stream(3), 0, 6)
    other = stream(2)
    other.load_state_dict(saved)
    assert other.redeal_note(32) == "data was dealt to 1 × 3 loader workers, now the rest of its samples to 1 × 2"
    rest = _epoch_labels(other, 32, 4)
    assert collections.Counter(head + rest) == collections.Counter(_epoch_labels(stream(3), 0, 6))


# --- the loader workers' forkserver --------------------------------------------------------------------------

# A main script as pretrain.py is one: heavy imports at the top (here: a line written per import), its start guarded.
WORKER_MAIN = '''
import os, signal, sys, time
with open(sys.argv[2], "a") as f:
    f.write(f"{os.getpid()}\\n")
from antismooth.data.pipeline import build_eval_stream

if __name__ == "__main__":
    stream = build_eval_stream(sys.argv[1], 4, 0, 1, num_workers=2)
    for _ in range(3):   # three loaders: six worker starts
        assert sum(len(batch[1]) for batch in stream.loader()) == 103
    loader = iter(stream.loader())
    next(loader)
    parents = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                parents[int(stat)] = int(open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                pass   # gone meanwhile
    descendants, grown = {os.getpid()}, True
    while grown:
        new = {pid for pid, parent in parents.items() if parent in descendants} - descendants
        descendants |= new
        grown = bool(new)
    print(" ".join(str(pid) for pid in descendants - {os.getpid()}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)   # killed outright, as by the OOM killer, its workers alive
'''


def test_workers_find_the_main_script_imported_and_die_with_a_killed_process(sample_shards, tmp_path):
    import subprocess
    import sys
    import time

    script, imports = tmp_path / "main.py", tmp_path / "imports.txt"
    script.write_text(WORKER_MAIN)
    done = subprocess.run([sys.executable, str(script), str(sample_shards), str(imports)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    # Imported by the process and once by the forkserver: none of the eight workers imports it again.
    assert len(imports.read_text().split()) == 2
    children = [int(pid) for pid in done.stdout.split()]   # the forkserver, its two workers, the resource tracker
    assert len(children) >= 3
    deadline = time.monotonic() + 30
    while any(map(_running, children)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in children if _running(pid)], "processes outlived their killed parent"


def _running(pid: int) -> bool:
    """Alive and not a zombie (where no init reaps orphans, a dead process stays in /proc as one)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
