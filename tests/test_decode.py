"""antismooth.data.decode on the repository's real JPEGs: reduced-size decode (same boxes, same draws, close pixels),
the per-sample parameters of the GPU path (timm's own draws), the device path run on the CPU (torchvision's CPU
decoder standing in for nvJPEG) against the CPU path, per-sample RandAugment, and the GPU-path stream's
determinism, resume and corrupt-sample handling. No CUDA here: tests/gpu/test_decode_gpu.py runs the CUDA part."""
from __future__ import annotations

import dataclasses
import io
import json
import math
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import pytest
import torch
import webdataset as wds
from PIL import Image

from antismooth.data import decode
from antismooth.data.decode import (SampleDecoder, SampleParams, apply_params_pil, augment_batch, crop_resize_flip,
                                    decode_jpegs, reduction_factor, resolve_decode, sample_params)
from antismooth.data.device import DeviceBatches
from antismooth.data.pipeline import (AugmentConfig, StreamConfig, build_eval_stream, build_train_stream,
                                      eval_transform, seed_augmentation, train_transform)

CROP_ONLY = AugmentConfig(input_size=64, auto_augment=None, color_jitter=0.0)   # RandomResizedCrop + flip
DEIT_64 = AugmentConfig(input_size=64)                                            # the full DeiT recipe
# Reduced vs full decode, same box: the least PSNR any of the 103 images may reach. Measured here (64 px crops):
# min 32.2 dB, median 46.5 dB; evaluation's resize at 64 px: min 32.6, median 44.3 (docs/decode.md).
REDUCED_MIN_PSNR = 30.0


def _files(sample_images: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((sample_images / "train").rglob("*.JPEG"))]


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def _rng_state() -> tuple:
    return random.getstate(), np.random.get_state()[1].tobytes(), torch.get_rng_state()


def _full(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


# --- reduced-size decode ---------------------------------------------------------------------------------------

def test_reduction_factor_keeps_at_least_the_output_size():
    assert reduction_factor((448, 448), (224, 224)) == 2
    assert reduction_factor((447, 900), (224, 224)) == 1
    assert reduction_factor((2000, 1800), (224, 224)) == 8
    assert reduction_factor((1000, 900), (224, 224)) == 4
    assert reduction_factor((100, 100), (224, 224)) == 1


def test_reduced_decode_draws_the_same_boxes_and_random_numbers_and_stays_close(sample_images):
    """Every box is drawn from the header's size exactly as from the decoded image; the generators end in the same
    state (the same draws), images no DCT scale qualifies for are bit-identical, the others close."""
    transform = train_transform(CROP_ONLY)
    full, reduced = SampleDecoder(transform, reduced=False), SampleDecoder(transform, reduced=True)
    crop = transform.transforms[0]
    psnrs = []
    for k, data in enumerate(_files(sample_images)):
        image = _full(data)
        seed_augmentation(k)
        box_full = crop.get_params(image, crop.scale, crop.ratio)
        with Image.open(io.BytesIO(data)) as header:
            seed_augmentation(k)
            box_header = crop.get_params(header, crop.scale, crop.ratio)
        assert box_header == box_full
        x, after_full = full(data, k, seed_augmentation), _rng_state()
        y, after_reduced = reduced(data, k, seed_augmentation), _rng_state()
        assert after_full[0] == after_reduced[0] and after_full[1] == after_reduced[1]
        assert torch.equal(after_full[2], after_reduced[2])
        assert x.shape == y.shape == (3, 64, 64) and y.dtype == torch.uint8
        i, j, h, w = box_full
        if reduction_factor((w, h), (64, 64)) == 1 or Image.open(io.BytesIO(data)).format != "JPEG":
            assert torch.equal(x, y)
        else:
            psnrs.append(_psnr(x, y))
    assert len(psnrs) > 40, "too few crops decoded reduced for the test to mean anything"
    assert min(psnrs) >= REDUCED_MIN_PSNR and np.median(psnrs) >= 40


def test_reduced_decode_of_evaluations_resize_is_close_and_off_is_the_old_path(sample_images):
    transform = eval_transform(AugmentConfig(input_size=64))
    reduced, full = SampleDecoder(transform, reduced=True), SampleDecoder(transform, reduced=False)
    psnrs = []
    for k, data in enumerate(_files(sample_images)):
        old = transform(_full(data))   # what the stream did before reduced decoding: decode, then transform
        assert torch.equal(full(data, k, seed_augmentation), old)
        psnrs.append(_psnr(reduced(data, k, seed_augmentation), old))
    assert sum(p < math.inf for p in psnrs) > 80 and min(psnrs) >= REDUCED_MIN_PSNR


def test_reduced_decode_off_is_the_full_decode_bit_for_bit_with_the_deit_recipe(sample_images):
    transform = train_transform(DEIT_64)
    off = SampleDecoder(transform, reduced=False)
    for k, data in enumerate(_files(sample_images)[:30]):
        seed_augmentation(k)
        expected = transform(_full(data))
        assert torch.equal(off(data, k, seed_augmentation), expected)


# --- the GPU path's per-sample parameters and device ops, on the CPU ------------------------------------------

# The device path against timm's PIL transform with the same parameters (tests/test_decode.py measured, 64 px,
# the 103 images): crop + resize + flip min 70.5 dB; the full DeiT recipe min 46.9, median 74.4 dB (a pixel one
# level off after the resize can cross a Posterize or Equalize step). Each RandAugment op alone: within one level.
# Pillow 13's bicubic no longer gives Pillow 12's pixels on a crop it enlarges (torchvision's antialiased resize,
# the device path's, still does): up to 9 levels on 3 small photographs enlarged ~1.8x, min 54.6 dB, median 75.0
# (make device-env, 2026-12-06); its decoder and bilinear resize are unchanged. The bound follows the installed Pillow.
CROP_MIN_PSNR = 60.0 if int(PIL.__version__.split(".")[0]) < 13 else 50.0
DEIT_MIN_PSNR, DEIT_MEDIAN_PSNR = 40.0, 70.0


def _worker_samples(files: list[bytes], transform) -> list[tuple[torch.Tensor, SampleParams, bool]]:
    return [decode.worker_sample(data, transform, k, seed_augmentation) for k, data in enumerate(files)]


def test_sample_params_are_timms_own_draws(sample_images):
    """The parameters drawn from the header equal what timm's transform draws: applied with timm's own PIL ops
    they give its output bit for bit, and the generators end where the transform leaves them."""
    transform = train_transform(DEIT_64)
    ops_seen = set()
    for k, data in enumerate(_files(sample_images)):
        image = _full(data)
        seed_augmentation(k)
        expected, after_transform = transform(image), _rng_state()
        with Image.open(io.BytesIO(data)) as header:
            params = sample_params(transform, header, k, seed_augmentation)
        after_params = _rng_state()
        assert after_params[:2] == after_transform[:2] and torch.equal(after_params[2], after_transform[2])
        assert torch.equal(apply_params_pil(image, params, transform), expected)
        ops_seen.update(name for name, _ in params.ops)
    assert len(ops_seen) >= 12, f"only {sorted(ops_seen)} drawn: too few ops for the test to mean anything"


def test_each_randaugment_op_on_the_device_is_pils_to_one_level(sample_images):
    transform = train_transform(DEIT_64)
    ra = decode.randaugment_of(transform)
    crops = [_full(data).resize((64, 64), Image.Resampling.BICUBIC) for data in _files(sample_images)[:24]]
    for op in ra.ops:
        for k, crop in enumerate(crops):
            magnitude = random.Random(k).uniform(0, 10)
            args = tuple(op.level_fn(magnitude, op.hparams)) if op.level_fn else ()
            expected = decode.TF.pil_to_tensor(op.aug_fn(crop, *args, **op.kwargs)).int()
            got = augment_batch(decode.TF.pil_to_tensor(crop)[None], [[(op.name, args)]])[0].int()
            assert (got - expected).abs().max() <= 1, (op.name, args)


def test_grouped_randaugment_applies_each_samples_own_ops_as_one_call_per_sample_does(sample_images):
    transform = train_transform(DEIT_64)
    samples = _worker_samples(_files(sample_images), transform)
    images = crop_resize_flip([d if cpu else decode_jpegs([d], "cpu")[0] for d, _, cpu in samples],
                              [p for _, p, _ in samples])
    ops = [p.ops for _, p, _ in samples]
    assert len({tuple(name for name, _ in o) for o in ops}) > 20   # the batch holds many different op sets
    assert torch.equal(augment_batch(images, ops, grouped=True), augment_batch(images, ops, grouped=False))


@pytest.mark.parametrize("augment, min_psnr", [(AugmentConfig(input_size=64, auto_augment=None, color_jitter=None),
                                                CROP_MIN_PSNR), (DEIT_64, DEIT_MIN_PSNR)])
def test_the_device_path_on_the_cpu_gives_the_cpu_paths_images(sample_images, augment, min_psnr):
    """The workers' share (bytes and parameters), then decode_batch on the CPU (the same decoding library stands
    in for nvJPEG), against timm's transform with the same seeds: same sizes and flips, close pixels."""
    transform = train_transform(augment)
    files = _files(sample_images)
    samples = _worker_samples(files, transform)
    stats = decode.DecodeStats()
    batch = decode.JpegBatch(*map(list, zip(*samples, strict=True)))
    images = decode.decode_batch(batch, "cpu", stats)
    assert images.shape == (len(files), 3, 64, 64) and images.dtype == torch.uint8
    psnrs = []
    for k, data in enumerate(files):
        seed_augmentation(k)
        psnrs.append(_psnr(images[k], transform(_full(data))))
    assert min(psnrs) >= min_psnr and np.median(psnrs) >= DEIT_MEDIAN_PSNR, (min(psnrs), np.median(psnrs))
    # The odd files ImageNet has (CMYK, progressive, a PNG named .JPEG) are decoded by the worker, counted.
    assert stats.worker_cpu == sum(cpu for *_, cpu in samples) >= 3 and stats.device == len(files) - stats.worker_cpu


def test_a_jpeg_the_device_decoder_refuses_is_decoded_on_the_cpu_and_counted(sample_images):
    transform = train_transform(DEIT_64)
    files = _files(sample_images)[:4]
    samples = _worker_samples(files, transform)
    data, params, cpu = map(list, zip(*samples, strict=True))
    # Bytes that open as a JPEG header but no decoder reads: the fill colour, counted, and the batch goes on.
    data[1] = data[1][:200]
    stats = decode.DecodeStats()
    images = decode.decode_batch(decode.JpegBatch(data, params, cpu), "cpu", stats)
    assert images.shape[0] == 4 and stats.refused == 1 and stats.undecodable == 1
    assert "1 undecodable" in str(stats)


def test_the_gpu_path_needs_a_recipe_it_applies():
    with pytest.raises(ValueError, match="--decode cpu"):
        decode.check_gpu_recipe(train_transform(AugmentConfig(input_size=64, auto_augment=None)))  # colour jitter
    decode.check_gpu_recipe(train_transform(AugmentConfig(input_size=64, no_aug=True)))   # resize, centre crop
    decode.check_gpu_recipe(train_transform(DEIT_64))
    assert resolve_decode("auto", "cpu") == "cpu" and resolve_decode("gpu", "cpu") == "gpu"
    with pytest.raises(ValueError, match="cpu, gpu or auto"):
        resolve_decode("nvjpeg", "cpu")


# --- the GPU path's stream: deterministic, resumable, corrupt samples skipped as on the CPU path -----------------

def _gpu_path_batches(shards, samples_consumed: int = 0, decode_mode: str = "gpu", num_samples=None,
                      batch: int = 8, workers: int = 2) -> tuple[list[tuple[torch.Tensor, ...]], Any]:
    config = StreamConfig(batch_size=batch, num_workers=workers, shuffle_buffer=40, shuffle_initial=10,
                          decode=decode_mode)
    stream = build_train_stream(shards, config, 0, 1, AugmentConfig(input_size=32, repeated_aug=1),
                                num_samples=num_samples, num_classes=103)
    batches = DeviceBatches(stream.loader(0, samples_consumed=samples_consumed), "cpu")
    return [(images.clone(), labels, positions) for images, labels, positions in batches], stream


def test_the_gpu_path_stream_is_deterministic_and_resumes_sample_exactly(sample_shards):
    first, _ = _gpu_path_batches(sample_shards)
    again, _ = _gpu_path_batches(sample_shards)
    resumed, _ = _gpu_path_batches(sample_shards, samples_consumed=5 * 8)
    cpu_path, _ = _gpu_path_batches(sample_shards, decode_mode="cpu")
    assert len(first) == len(again) == len(cpu_path) == 103 // 8 and len(resumed) == len(first) - 5
    for a, b in zip(first, again, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    for a, b in zip(first[5:], resumed, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # The same samples in the same batches as the CPU path, augmented alike (same parameters, close pixels).
    for (x_gpu, y_gpu, at_gpu), (x_cpu, y_cpu, at_cpu) in zip(first, cpu_path, strict=True):
        assert torch.equal(y_gpu, y_cpu) and torch.equal(at_gpu, at_cpu)
        assert (x_gpu - x_cpu).abs().mean() < 0.05   # normalised units; different draws would differ by ~1


def test_the_gpu_path_skips_corrupt_samples_as_the_cpu_path_does(sample_shards, tmp_path):
    source = wds.WebDataset(str(sample_shards.parent / "train-000000.tar"), shardshuffle=False)
    good = [{"__key__": s["__key__"], "jpg": s["jpg"], "cls": s["cls"]} for s in list(source)[:10]]
    corrupt = [dict(good[0], __key__="bad_0", jpg=good[0]["jpg"][:300]),      # a JPEG cut short
               dict(good[1], __key__="bad_1", jpg=b"not an image at all")]
    with wds.TarWriter(str(tmp_path / "d-000000.tar"), encoder=False) as sink:
        for sample in good + corrupt:
            sink.write(sample)
    shards = str(tmp_path / "d-000000.tar")
    on_gpu_path, gpu_stream = _gpu_path_batches(shards, num_samples=12, batch=2)
    on_cpu_path, cpu_stream = _gpu_path_batches(shards, num_samples=12, batch=2, decode_mode="cpu")
    assert len(on_gpu_path) == len(on_cpu_path) == 6 and gpu_stream.corrupt_skipped == cpu_stream.corrupt_skipped >= 2
    assert [y.tolist() for _, y, _ in on_gpu_path] == [y.tolist() for _, y, _ in on_cpu_path]


# --- pretrain.py --decode gpu, in the real engine (conftest's world-1 zero_runs launch) --------------------------

def test_pretrain_with_the_device_path_trains_and_resumes_sample_exactly(zero_runs):
    """--decode gpu on the CPU with the DeiT recipe (RandAugment on the batch, erasing on the device): 2 steps
    straight through, and 1 step, stopped, resumed to 2: the same losses and the same final logits, bit for bit."""
    from test_train import scalars

    straight, resumed = zero_runs["decode-gpu", 1], zero_runs["decode-gpu-resumed", 1]
    losses = scalars(straight.output, "train/loss")
    assert len(losses) == 2 and scalars(resumed.output, "train/loss") == losses
    assert json.loads((resumed.output / "run.json").read_text())["resumed_from"] == "step00000001"
    assert torch.equal(torch.load(resumed.probe), torch.load(straight.probe))
    flags = json.loads((straight.output / "run.json").read_text())["flags"]
    assert flags["decode"] == "gpu" and flags["aa"] and not flags["no_aug"]
    log = (straight.output / "log.txt").read_text()
    assert "decoded and augmented on the device" in log
    counts = re.search(r"input on rank 0: (\d+) images decoded on the device, (\d+) by the loader workers", log)
    assert counts and int(counts[1]) + int(counts[2]) == 32   # 16 images, 2 epochs


def test_a_batch_of_jpegs_crosses_the_process_boundary_as_one_buffer(sample_images):
    """The loader pickles a worker's batch: one shared buffer for all its JPEGs (one handle per JPEG capped a
    worker at ~1,600 images/s), the worker-decoded pixels beside it, everything back in its place."""
    from multiprocessing.reduction import ForkingPickler

    samples = _worker_samples(_files(sample_images), train_transform(DEIT_64))
    batch = decode.JpegBatch(*map(list, zip(*samples, strict=True)))
    assert any(batch.decoded_on_cpu) and not all(batch.decoded_on_cpu)
    back = ForkingPickler.loads(bytes(ForkingPickler.dumps(batch)))
    assert back.decoded_on_cpu == batch.decoded_on_cpu and back.params == batch.params and back.fill == batch.fill
    assert all(torch.equal(a, b) for a, b in zip(back.data, batch.data, strict=True))
    jpegs = [d for d, cpu in zip(back.data, back.decoded_on_cpu, strict=True) if not cpu]
    assert len({d.untyped_storage().data_ptr() for d in jpegs}) == 1   # views of one buffer


# --- training and evaluation see the same pixels -----------------------------------------------------------------

def _demo_augment() -> AugmentConfig:
    """The augmentation `make demo` trains with: its recipe's flags (tools/demo.py) parsed by pretrain.py, every
    other setting at its default, so a default that changes what training sees shows here."""
    import importlib.util

    from antismooth import startup

    spec = importlib.util.spec_from_file_location("demo", Path(__file__).resolve().parents[1] / "tools" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    config = startup.parse_config([*demo.RECIPE, "--deepspeed_config", "ds_configs/demo.json"])
    return startup.augment_config(config, int(config.model.input_size))


def _by_label(batches) -> dict[int, torch.Tensor]:
    images = {}
    for x, labels, *_ in batches:
        if isinstance(x, decode.JpegBatch):
            x = decode.decode_batch(x, "cpu")
        images.update({int(y): image for image, y in zip(x, labels, strict=True)})
    return images


@pytest.mark.parametrize("decode_mode", ["cpu", "gpu"])
def test_training_and_evaluation_see_the_same_pixels_with_the_demos_recipe(tiny_shards, decode_mode):
    """The demo's recipe (no random augmentation: resize, centre crop) through the real training stream (a loader
    worker; `gpu`: the device path's decode and resize run on the CPU) and the real evaluation stream, on the same
    JPEGs (tiny_shards' val split is its train split): the CPU path gives evaluation's tensor bit for bit (the same
    decoder and the same PIL resize). The device path resizes with torchvision's antialiased bicubic on tensors,
    which rounds where PIL's fixed-point filter rounds otherwise: at most one level (of 255) on any pixel. A
    training image resampled any other way (reduced-size decode's 1/2-1/8 DCT scaling, ~30-45 dB) is many levels
    off somewhere and fails."""
    augment = _demo_augment()
    assert augment.no_aug and augment.eval_crop_pct == 1.0, "the demo's recipe changed: revisit this test"
    train = build_train_stream(str(tiny_shards / "train.json"), StreamConfig(batch_size=4, num_workers=1,
                               decode=decode_mode), 0, 1, dataclasses.replace(augment, repeated_aug=1))
    evaluated = build_eval_stream(str(tiny_shards / "val.json"), 4, 0, 1, num_workers=1, augment=augment)
    seen, reference = _by_label(train.loader(0)), _by_label(evaluated.loader())
    assert len(seen) == len(reference) == 16
    worst = max((seen[k].int() - reference[k].int()).abs().max().item() for k in reference)
    assert worst <= (0 if decode_mode == "cpu" else 1), f"training pixels differ from evaluation's by {worst} levels"


def test_reduced_decode_makes_training_pixels_differ_from_evaluation(tiny_shards):
    """The consistency test above can fail: the opt-in --reduced-decode on the demo's recipe trips it."""
    augment = dataclasses.replace(_demo_augment(), reduced_decode=True, repeated_aug=1)
    train = build_train_stream(str(tiny_shards / "train.json"),
                               StreamConfig(batch_size=4, num_workers=0, decode="cpu"), 0, 1, augment)
    evaluated = build_eval_stream(str(tiny_shards / "val.json"), 4, 0, 1, num_workers=0, augment=augment)
    seen, reference = _by_label(train.loader(0)), _by_label(evaluated.loader())
    assert max((seen[k].int() - reference[k].int()).abs().max().item() for k in reference) > 1


def test_a_resume_that_changes_the_decode_of_its_run_says_so_in_one_sentence():
    """Reduced-size decode was the default until 2026-12-06: a run started then (run.json records it on) and resumed
    now (off) is told which flag keeps its images as they were; a run that recorded nothing decoded in full."""
    from antismooth.config import TrainConfig

    now = TrainConfig()
    [sentence] = now.input_changes({"reduced_decode": True})
    assert "--reduced-decode" in sentence and "pass --reduced-decode" in sentence
    assert now.input_changes({"reduced_decode": False}) == now.input_changes({}) == []
    assert "pass --no-reduced-decode" in TrainConfig.from_flags(reduced_decode=True).input_changes({})[0]
