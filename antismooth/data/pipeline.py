"""Shards → augmented batches, on every rank and worker, reproducible from (seed, epoch).

The reading plan is made from sample counts, not shard counts: an epoch is one
sequence of samples (the shards in a seeded order), cut into equal contiguous ranges,
one per rank, and each rank's range into one per loader worker. So every rank runs the
same number of steps whatever the number of shards, ranks and workers (webdataset's
shard-level `split_by_node`/`split_by_worker` would give unequal batch counts, or hang,
when shards do not divide: webdataset#188, #225), each worker reads at most one shard
it shares with a neighbour, and a position (epoch, samples consumed) names the exact
samples still to come, which is what sample-exact resume needs (webdataset#177).

Within a worker the stages are webdataset's own: tar to samples (with a logging
handler), a seeded shuffle buffer, then our decode of the image and `cls` fields only
(never webdataset's default decoders, which unpickle `.pyd`), timm's DeiT transform up
to uint8 pixels (`use_prefetcher=True`), and `batched` into uint8 [B, 3, H, W]. Normalisation
happens on the device (`antismooth.data.device.DeviceBatches`); random erasing
(`TrainStream.random_erasing`) and Mixup/CutMix (`TrainStream.mixup`) run on the batch in the
training loop.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Optional, Sequence

import braceexpand
import numpy as np
import torch
import torch.multiprocessing as mp
import webdataset as wds
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.random_erasing import RandomErasing

from ..distributed import all_reduce
from .shards import load_manifest

__all__ = ["AugmentConfig", "StreamConfig", "ShardSource", "TrainStream", "EvalStream",
           "build_train_stream", "build_eval_stream", "train_transform", "eval_transform", "seed_augmentation",
           "collate_uint8", "reduce_eval_metrics"]

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tiff", "tif", "ppm")
SHUFFLE_BUFFER = 5000      # samples per worker; raw JPEG bytes, ~110 KB each on ImageNet: ~0.5 GB
SHUFFLE_INITIAL = 1000     # fill before the first sample leaves, so the first batches are mixed too
MAX_TOP_UP_PASSES = 10     # re-reads of a worker's ranges to replace corrupt samples before giving up


@dataclass(frozen=True)
class AugmentConfig:
    """The DeiT recipe's augmentation, every knob with DeiT's default (Touvron et al. 2021)."""
    input_size: int = 224
    no_aug: bool = False            # timm's --no-aug: resize and centre crop only (debugging, tiny data)
    color_jitter: float = 0.4
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
    interpolation: str = "bicubic"
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    mixup: float = 0.8
    cutmix: float = 1.0
    cutmix_minmax: Optional[tuple[float, float]] = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1
    repeated_aug: int = 3           # DeiT's repeated augmentation: copies of each image per epoch (1 = off)
    eval_crop_pct: float = 0.875    # resize 256 / crop 224, scaled with input_size as timm does
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD


@dataclass(frozen=True)
class StreamConfig:
    """How the shards are read: mode, seed, batch and workers."""
    batch_size: int                 # per rank
    mode: Literal["exact", "resampled"] = "exact"
    seed: int = 0
    num_workers: int = 8
    shuffle_buffer: int = SHUFFLE_BUFFER
    shuffle_initial: int = SHUFFLE_INITIAL


@dataclass(frozen=True)
class ShardSource:
    """Shard URLs with their sample counts (exact from a manifest, else an even split of num_samples)."""
    urls: tuple[str, ...]
    counts: tuple[int, ...]
    classes: tuple[str, ...] = ()

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @classmethod
    def resolve(cls, shards: str | Path | Sequence[str], num_samples: Optional[int] = None) -> "ShardSource":
        """A manifest path (`train.json`), or URLs / a brace pattern / `pipe:` commands plus num_samples."""
        if isinstance(shards, (str, Path)) and str(shards).endswith(".json"):
            manifest = load_manifest(shards)
            root = Path(shards).parent
            return cls(urls=tuple(str(root / s["name"]) for s in manifest["shards"]),
                       counts=tuple(int(s["num_samples"]) for s in manifest["shards"]),
                       classes=tuple(c["wnid"] for c in manifest["classes"]))
        patterns = [str(shards)] if isinstance(shards, (str, Path)) else list(shards)
        urls = tuple(u for p in patterns for u in braceexpand.braceexpand(p))
        if not urls:
            raise ValueError(f"No shards in {shards!r}: give a manifest (train.json) or shard URLs.")
        if num_samples is None:
            raise ValueError("Shard URLs without a manifest need num_samples (the total sample count): "
                             "pass it, or point at the manifest the shard builder wrote.")
        base, extra = divmod(num_samples, len(urls))
        return cls(urls=urls, counts=tuple(base + (i < extra) for i in range(len(urls))))


@dataclass(frozen=True)
class Range:
    """Samples [start, stop) of one shard."""
    url: str
    start: int
    stop: int


def seed_for(*parts: Any) -> int:
    """A 63-bit seed from any parts, stable across processes and Python runs (unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def epoch_shard_order(source: ShardSource, seed: int, epoch: int) -> list[int]:
    """The shards' reading order for one epoch: a permutation seeded by (seed, epoch)."""
    order = list(range(len(source.urls)))
    random.Random(seed_for("shards", seed, epoch)).shuffle(order)
    return order


def cut_ranges(source: ShardSource, order: Sequence[int], start: int, stop: int) -> list[Range]:
    """The sample positions [start, stop) of the sequence `order` of shards, as per-shard ranges."""
    ranges, offset = [], 0
    for index in order:
        count = source.counts[index]
        lo, hi = max(start, offset), min(stop, offset + count)
        if lo < hi:
            ranges.append(Range(source.urls[index], lo - offset, hi - offset))
        offset += count
        if offset >= stop:
            break
    return ranges


def worker_batches(num_batches: int, worker: int, num_workers: int) -> int:
    """How many of a rank's batches worker `worker` makes: the loader takes batch b from worker b % W."""
    return len(range(worker, num_batches, num_workers))


def _read_ranges(ranges: Iterable[Range], handler: Callable) -> Iterator[dict]:
    """Raw samples of each range, read with webdataset's tar reader (local paths, URLs, `pipe:`)."""
    for r in ranges:
        samples = wds.tarfile_to_samples(handler=handler)(iter([{"url": r.url}]))
        yield from itertools.islice(samples, r.start, r.stop)


def _repeat_each(samples: Iterable[dict], times: int) -> Iterator[dict]:
    """Repeated augmentation over a stream: each sample `times` times, before the shuffle spreads them."""
    for sample in samples:
        for copy in range(times):
            yield dict(sample, __copy__=copy)


def decode_sample(sample: dict) -> tuple[Image.Image, int]:
    """The image (as RGB) and the class index; every other field is dropped unread, pickles included."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None or "cls" not in sample:
        raise ValueError(f"sample {sample.get('__key__')} has no image or no cls field")
    with Image.open(io.BytesIO(sample[ext])) as img:
        img.load()
        rgb = img.convert("RGB")  # grayscale and CMYK JPEGs are real in ImageNet
    return rgb, int(sample["cls"])


class _SkipCounter:
    """A webdataset handler that logs and counts what it skips (corrupt samples, truncated shards)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        _logger.warning("Skipping a corrupt sample or shard: %r", exn)
        return True


def seed_augmentation(sample_seed: int) -> None:
    """Seed the generators timm's transforms draw from (all three), for one sample's augmentation."""
    random.seed(sample_seed)
    np.random.seed(sample_seed % 2**32)
    torch.default_generator.manual_seed(sample_seed)  # torch.manual_seed also queues CUDA seeding: 2 ms


def _decoded(samples: Iterable[dict], transform: Callable, seed: int, counter: _SkipCounter) -> Iterator[tuple]:
    """Decode and transform, seeding the augmentation per sample so a resumed run draws the same crops."""
    for position, sample in samples:
        try:
            image, label = decode_sample(sample)
        except Exception as exn:  # PIL raises many types for damaged bytes
            counter(exn)
            continue
        seed_augmentation(seed_for(seed, position))
        yield transform(image), label


def collate_uint8(samples: Sequence[tuple[Any, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [3, H, W] (tensors or timm's ToNumpy arrays) into one uint8 [B, 3, H, W] batch and the
    labels into int64: timm's fast_collate, as a webdataset `batched` collation."""
    images, labels = zip(*samples)
    return torch.stack([torch.as_tensor(image) for image in images]), torch.tensor(labels, dtype=torch.int64)


class _WorkerStream(torch.utils.data.IterableDataset):
    """One rank's batches for one epoch; each DataLoader worker makes its share (batch b from worker b % W)."""

    def __init__(self, plan: "_EpochPlan", skip_batches: int, transform: Callable, config: StreamConfig) -> None:
        super().__init__()
        self.plan, self.skip_batches, self.transform, self.config = plan, skip_batches, transform, config

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        info = torch.utils.data.get_worker_info()
        loader_id, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # The loader takes its first batch from worker 0; on resume that batch is batch `skip_batches`,
        # made by worker skip % W in the uninterrupted run, so the roles rotate by `skip_batches`.
        worker = (loader_id + self.skip_batches) % num_workers
        plan, batch = self.plan, self.plan.batch_size
        ranges, wanted = plan.ranges(worker, num_workers), plan.wanted(worker, num_workers)
        done = worker_batches(self.skip_batches, worker, num_workers) * batch
        counter = _SkipCounter()
        raw = self._raw_samples(ranges, worker, counter)
        # Resume: drop, undecoded, the samples this worker's batches before `skip_batches` used.
        positions = itertools.islice(enumerate(raw), done, None)
        samples = _decoded(positions, self.transform, seed_for(plan.seed, worker), counter)
        samples = itertools.islice(samples, max(0, wanted - done))
        reported = 0
        for images, labels in wds.batched(batch, collation_fn=collate_uint8, partial=plan.mode == "eval")(samples):
            yield images, labels, counter.count - reported
            reported = counter.count

    def _raw_samples(self, ranges: list[Range], worker: int, counter: _SkipCounter) -> Iterator[dict]:
        """The worker's ranges, repeated per image and shuffled; then, while corrupt samples left the
        worker short (or repeated augmentation's rounding did), the same ranges again, read lazily."""
        plan = self.plan
        raw = _repeat_each(_read_ranges(ranges, counter), plan.repeats)
        if self.config.shuffle_buffer > 1:
            raw = wds.shuffle(self.config.shuffle_buffer, self.config.shuffle_initial,
                              seed=seed_for(plan.seed, worker, "shuffle"))(raw)
        yield from raw
        for _ in range(MAX_TOP_UP_PASSES if plan.top_up else 0):
            yield from _read_ranges(ranges, counter)
        if plan.top_up:
            _logger.error("A loader worker ran out of readable samples after %d passes over its shards; "
                          "its rank will run fewer steps. Check the shards with build_shards.py --verify.",
                          MAX_TOP_UP_PASSES)


@dataclass(frozen=True)
class _EpochPlan:
    """Which sample ranges each loader worker of one rank reads, and how many samples it delivers.

    exact: the rank's slice [lo, hi) of the epoch's sample sequence, shared among workers in
    proportion to their batches; resampled: whole shards drawn with replacement per worker;
    eval: [lo, hi) split evenly, every sample once. A plain dataclass, so that loader workers
    started by spawn can receive it.
    """
    source: ShardSource
    mode: Literal["exact", "resampled", "eval"]
    order: tuple[int, ...]
    lo: int
    hi: int
    num_batches: int
    batch_size: int
    repeats: int
    seed: int

    @property
    def top_up(self) -> bool:
        """Training workers cycle their ranges when corrupt samples were skipped, so no rank runs short."""
        return self.mode != "eval"

    def wanted(self, worker: int, num_workers: int) -> int:
        if self.mode == "eval":
            lo, hi = _even_split(self.lo, self.hi, worker, num_workers)
            return hi - lo
        return worker_batches(self.num_batches, worker, num_workers) * self.batch_size

    def ranges(self, worker: int, num_workers: int) -> list[Range]:
        if self.mode == "eval":
            return cut_ranges(self.source, self.order, *_even_split(self.lo, self.hi, worker, num_workers))
        if self.mode == "exact":
            per_rank, unique = self.num_batches * self.batch_size, self.hi - self.lo
            before = sum(self.wanted(w, num_workers) for w in range(worker))
            lo = self.lo + unique * before // per_rank
            hi = self.lo + unique * (before + self.wanted(worker, num_workers)) // per_rank
            return cut_ranges(self.source, self.order, lo, hi)
        rng = random.Random(seed_for("resampled", self.seed, worker))
        need, picked = math.ceil(self.wanted(worker, num_workers) / self.repeats), []
        while need > 0:
            i = rng.randrange(len(self.source.urls))
            picked.append(Range(self.source.urls[i], 0, self.source.counts[i]))
            need -= self.source.counts[i]
        return picked


def _even_split(lo: int, hi: int, part: int, parts: int) -> tuple[int, int]:
    """Part `part` of `parts` near-equal contiguous pieces of [lo, hi)."""
    size = hi - lo
    return lo + size * part // parts, lo + size * (part + 1) // parts


@dataclass
class TrainStream:
    """The training batches of one rank: equal steps on every rank, resumable at any sample."""
    source: ShardSource
    config: StreamConfig
    augment: AugmentConfig
    rank: int
    world_size: int
    num_classes: int
    corrupt_skipped: int = 0

    def __post_init__(self) -> None:
        if self.config.mode not in ("exact", "resampled"):
            raise ValueError(f"Unknown stream mode {self.config.mode!r}: use 'exact' or 'resampled'.")
        if self.steps_per_epoch < 1:
            raise ValueError(f"{self.source.num_samples} samples make no step of global batch {self.global_batch}: "
                             "lower the batch size or add data.")
        self.transform = train_transform(self.augment)
        self.mixup = self._build_mixup()

    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        """Every rank runs this many steps; the last partial global batch of an epoch is dropped."""
        return self.source.num_samples // self.global_batch

    def _build_mixup(self) -> Optional[Mixup]:
        """timm's Mixup/CutMix with label smoothing for the batch, or None when both are off."""
        a = self.augment
        if a.mixup <= 0 and a.cutmix <= 0 and a.cutmix_minmax is None:
            return None
        return Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, cutmix_minmax=a.cutmix_minmax,
                     prob=a.mixup_prob, switch_prob=a.mixup_switch_prob, mode=a.mixup_mode,
                     label_smoothing=a.smoothing, num_classes=self.num_classes)

    def random_erasing(self, device: torch.device | str) -> Optional[RandomErasing]:
        """timm's RandomErasing for normalised batches on `device` (noise drawn there), or None when off.
        It runs in the training loop, not in the workers: its normal noise lives in normalised space,
        which the workers' uint8 images cannot hold. As in timm, --no-aug turns it off."""
        a = self.augment
        if a.reprob <= 0 or a.no_aug:
            return None
        return RandomErasing(a.reprob, mode=a.remode, max_count=a.recount, device=str(device))

    def _plan(self, epoch: int) -> _EpochPlan:
        per_rank = self.steps_per_epoch * self.config.batch_size   # samples this rank delivers, copies included
        unique = math.ceil(per_rank / self.augment.repeated_aug)     # distinct images it reads for them
        return _EpochPlan(
            source=self.source, mode=self.config.mode, order=tuple(epoch_shard_order(self.source, self.config.seed, epoch)),
            lo=self.rank * unique, hi=(self.rank + 1) * unique, num_batches=self.steps_per_epoch,
            batch_size=self.config.batch_size, repeats=self.augment.repeated_aug,
            seed=seed_for(self.config.seed, epoch, self.rank))

    def loader(self, epoch: int, samples_consumed: int = 0,
               pin_memory: bool = False) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's uint8 batches of `epoch`, starting after `samples_consumed` (global count) of it;
        `pin_memory` (for a GPU: `device.pin_memory_for(device)`) pins them in the loader's pin thread."""
        if samples_consumed % self.global_batch:
            raise ValueError(f"Resume position {samples_consumed} is not a multiple of the global batch "
                             f"{self.global_batch}: a run resumes at a step boundary.")
        skip = samples_consumed // self.global_batch
        dataset = _WorkerStream(self._plan(epoch), skip, self.transform, self.config)
        return _CountingLoader(self, dataset, self.steps_per_epoch - skip, self.config.num_workers, pin_memory)

    def __len__(self) -> int:
        return self.steps_per_epoch


class _CountingLoader:
    """Iterates a WebLoader and adds the workers' skipped-sample counts to the stream's total."""

    def __init__(self, owner: Any, dataset: torch.utils.data.IterableDataset, length: int, workers: int,
                 pin_memory: bool = False) -> None:
        self.owner, self.length = owner, length
        # fork: workers start in milliseconds; spawn (the default inside spawned ranks) re-imports torch in each.
        context = "fork" if workers and "fork" in mp.get_all_start_methods() else None
        # pin_memory: the DataLoader's pin thread pins each batch, so the main thread never waits on it.
        self.loader = wds.WebLoader(dataset, batch_size=None, num_workers=workers, multiprocessing_context=context,
                                    persistent_workers=False, prefetch_factor=4 if workers else None,
                                    pin_memory=pin_memory)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, skipped in self.loader:
            self.owner.corrupt_skipped += int(skipped)
            yield images, labels


def train_transform(augment: AugmentConfig) -> Callable[[Image.Image], torch.Tensor]:
    """timm's DeiT training transform up to uint8 pixels [3, H, W] (use_prefetcher=True): normalisation and
    random erasing are left to the device (antismooth.data.device, TrainStream.random_erasing)."""
    a = augment
    return create_transform(a.input_size, is_training=True, use_prefetcher=True, no_aug=a.no_aug,
                            color_jitter=a.color_jitter, auto_augment=a.auto_augment, interpolation=a.interpolation,
                            mean=a.mean, std=a.std)


def eval_transform(augment: AugmentConfig) -> Callable[[Image.Image], torch.Tensor]:
    """timm's deterministic evaluation transform (resize, centre crop) up to uint8 pixels [3, H, W]
    (use_prefetcher=True), normalised on the device: one for shards and ImageFolder."""
    return create_transform(augment.input_size, is_training=False, use_prefetcher=True,
                            interpolation=augment.interpolation, crop_pct=augment.eval_crop_pct,
                            mean=augment.mean, std=augment.std)


@dataclass
class EvalStream:
    """Validation batches: deterministic, each sample exactly once across ranks and workers, no padding."""
    source: ShardSource
    batch_size: int
    rank: int
    world_size: int
    num_workers: int = 4
    augment: AugmentConfig = AugmentConfig()
    corrupt_skipped: int = 0

    def __post_init__(self) -> None:
        self.transform = eval_transform(self.augment)

    def loader(self, pin_memory: bool = False) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's uint8 batches; `pin_memory` pins them in the loader's pin thread (for a GPU)."""
        lo, hi = _even_split(0, self.source.num_samples, self.rank, self.world_size)
        plan = _EpochPlan(source=self.source, mode="eval", order=tuple(range(len(self.source.urls))), lo=lo, hi=hi,
                          num_batches=0, batch_size=self.batch_size, repeats=1, seed=0)
        config = StreamConfig(batch_size=self.batch_size, num_workers=self.num_workers, shuffle_buffer=0)
        workers = max(1, self.num_workers)
        length = sum(math.ceil(plan.wanted(w, workers) / self.batch_size) for w in range(workers))
        return _CountingLoader(self, _WorkerStream(plan, 0, self.transform, config), length, self.num_workers,
                               pin_memory)


def build_train_stream(shards: str | Path | Sequence[str], config: StreamConfig, rank: int, world_size: int,
                       augment: AugmentConfig = AugmentConfig(), num_samples: Optional[int] = None,
                       num_classes: Optional[int] = None) -> TrainStream:
    """The training stream of this rank, from a manifest or shard URLs."""
    source = ShardSource.resolve(shards, num_samples)
    classes = num_classes or len(source.classes)
    if not classes:
        raise ValueError("Shard URLs without a manifest need num_classes for Mixup's label smoothing.")
    return TrainStream(source, config, augment, rank, world_size, classes)


def build_eval_stream(shards: str | Path | Sequence[str], batch_size: int, rank: int, world_size: int,
                      num_workers: int = 4, augment: AugmentConfig = AugmentConfig(),
                      num_samples: Optional[int] = None) -> EvalStream:
    """The evaluation stream of this rank, from a manifest or shard URLs."""
    return EvalStream(ShardSource.resolve(shards, num_samples), batch_size, rank, world_size, num_workers, augment)


def reduce_eval_metrics(correct1: float, correct5: float, loss_sum: float, count: int) -> dict[str, float]:
    """Sum the per-rank counts over all ranks (exact top-1: no padded duplicates) and form the metrics."""
    c1, c5, loss, n = all_reduce([correct1, correct5, loss_sum, count])
    return {"top1": 100 * c1 / max(n, 1), "top5": 100 * c5 / max(n, 1), "loss": loss / max(n, 1), "count": int(n)}
