"""The device stage: uint8 batches from the loaders, normalised (and randomly erased) on the device.

Real JPEGs, real shards, real loader workers; on this CPU machine the device is the CPU, where
normalisation must equal timm's old worker-side float transforms bit for bit. (The CUDA side-stream
path needs a GPU and is not exercised here.)
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from timm.data import create_transform

from antismooth.data.device import DeviceBatches, normalize, to_device
from antismooth.data.pipeline import (AugmentConfig, ShardSource, StreamConfig, build_eval_stream, build_train_stream,
                                      eval_transform, seed_augmentation, train_transform)
from antismooth.train import seed_step  # the training loop's per-micro-step seeding

NUM_SAMPLES = 103


def _jpeg(sample_images: Path, wnid: str) -> Image.Image:
    """The one sample image of class `wnid`, decoded as the pipeline decodes it (RGB)."""
    with Image.open(next((sample_images / "train" / wnid).iterdir())) as img:
        return img.convert("RGB")


def test_eval_batches_normalised_on_the_device_equal_timms_float_transform_bit_for_bit(sample_shards,
                                                                                       sample_images):
    augment = AugmentConfig()  # 224 px, resize 256 / crop 224, bicubic, ImageNet mean and std
    float_transform = create_transform(augment.input_size, is_training=False, interpolation=augment.interpolation,
                                       crop_pct=augment.eval_crop_pct, mean=augment.mean, std=augment.std)
    classes = ShardSource.resolve(sample_shards).classes
    stream = build_eval_stream(str(sample_shards), batch_size=16, rank=0, world_size=1, num_workers=2, augment=augment)
    seen = 0
    for images, labels, *_ in DeviceBatches(stream.loader(), "cpu", augment.mean, augment.std):
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 224, 224)
        for image, label in zip(images, labels, strict=True):
            assert torch.equal(image, float_transform(_jpeg(sample_images, classes[label])))
        seen += len(labels)
    assert seen == NUM_SAMPLES


def test_deit_training_transform_normalised_on_the_device_equals_timms_float_transform_bit_for_bit(sample_images):
    augment = AugmentConfig(reprob=0)  # the full DeiT recipe (RandomResizedCrop, flip, RandAugment), erasing off
    float_transform = create_transform(
        augment.input_size, is_training=True, color_jitter=augment.color_jitter, auto_augment=augment.auto_augment,
        interpolation=augment.interpolation, re_prob=0, mean=augment.mean, std=augment.std)
    uint8_transform = train_transform(augment)
    wnids = sorted(p.name for p in (sample_images / "train").iterdir())
    for position, wnid in enumerate(wnids):
        image = _jpeg(sample_images, wnid)
        seed_augmentation(position)
        expected = float_transform(image)
        seed_augmentation(position)  # the same per-sample seed, as the workers draw it
        pixels = uint8_transform(image)
        assert pixels.dtype == torch.uint8
        assert torch.equal(normalize(pixels[None], augment.mean, augment.std)[0], expected), wnid
    seed_augmentation(len(wnids))  # and the seeds matter: another one crops and augments otherwise
    assert not torch.equal(uint8_transform(image), pixels)


def _erased_training_batches(shards: Path, seed: int, samples_consumed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """(normalised, erased, labels) per step of epoch 0, erasing applied as pretrain.py's loop does:
    on the device batch, right after the micro-step's seeding."""
    augment = AugmentConfig(input_size=32, repeated_aug=1, reprob=1.0)
    config = StreamConfig(batch_size=8, num_workers=2, seed=seed, shuffle_buffer=40, shuffle_initial=10, decode="cpu")
    stream = build_train_stream(str(shards), config, 0, 1, augment)
    erase = stream.random_erasing("cpu")
    first_step = samples_consumed // config.batch_size
    batches = DeviceBatches(stream.loader(0, samples_consumed=samples_consumed), "cpu", augment.mean, augment.std)
    out = []
    for step, (images, labels, _) in enumerate(batches, start=first_step):
        seed_step(seed, step, 0, 0)
        out.append((images.clone(), erase(images), labels))
    return out


def test_erasing_on_the_device_is_deterministic_resumable_and_erases(sample_shards):
    first = _erased_training_batches(sample_shards, seed=0)
    again = _erased_training_batches(sample_shards, seed=0)
    assert len(first) == len(again) == NUM_SAMPLES // 8
    for (clean_a, erased_a, labels_a), (clean_b, erased_b, labels_b) in zip(first, again, strict=True):
        assert torch.equal(labels_a, labels_b) and torch.equal(clean_a, clean_b) and torch.equal(erased_a, erased_b)
    resumed = _erased_training_batches(sample_shards, seed=0, samples_consumed=5 * 8)
    assert len(resumed) == len(first) - 5
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(first[5:], resumed, strict=True))
    changed = sum(int((clean != erased).flatten(1).any(1).sum()) for clean, erased, _ in first)
    assert changed > 0.9 * len(first) * 8  # reprob=1: every sample is tried, nearly every box fits at 32 px


def test_erasing_is_off_at_reprob_0_and_under_no_aug(sample_shards):
    for augment in (AugmentConfig(input_size=32, reprob=0), AugmentConfig(input_size=32, no_aug=True)):
        config = StreamConfig(batch_size=8, num_workers=0, decode="cpu")
        stream = build_train_stream(str(sample_shards), config, 0, 1, augment)
        assert stream.random_erasing("cpu") is None


def test_device_stage_takes_uint8_only_and_keeps_length_and_order(sample_images):
    augment = AugmentConfig(input_size=32)
    pixels = torch.stack([eval_transform(augment)(_jpeg(sample_images, w))
                          for w in sorted(p.name for p in (sample_images / "train").iterdir())[:6]])
    batches = [(pixels[:4], torch.arange(4)), (pixels[4:], torch.arange(4, 6))]
    stage = DeviceBatches(batches, "cpu", augment.mean, augment.std)
    out = list(stage)
    assert len(stage) == 2 and [y.tolist() for _, y in out] == [[0, 1, 2, 3], [4, 5]]
    assert torch.equal(torch.cat([x for x, _ in out]), to_device(pixels, "cpu", augment.mean, augment.std))
    assert list(DeviceBatches([], "cpu")) == []
    with pytest.raises(TypeError, match="uint8"):
        list(DeviceBatches([(out[0][0], out[0][1])], "cpu"))  # already normalised floats
