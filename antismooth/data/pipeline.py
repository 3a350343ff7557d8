"""Shards → augmented batches, on every rank and worker, reproducible from (seed, epoch).

The reading plan is made from sample counts, not shard counts: an epoch is one sequence of
samples (the shards in a seeded order), of which it trains on the first positions, each once per
repeated-augmentation copy. This pool is *dealt*: cut into equal contiguous parts, one per rank,
and each rank's part into one per loader worker, in proportion to the batches each makes. So every
rank runs the same number of steps whatever the number of shards, ranks and workers (webdataset's
shard-level `split_by_node`/`split_by_worker` would give unequal batch counts, or hang, when shards
do not divide: webdataset#188, #225), and each worker reads at most one shard it shares with a
neighbour. Every batch carries its samples' positions; a checkpoint saves which copies were trained
on (`EpochPosition`), so a run resumed on the same layout continues its deal sample-exactly
(webdataset#177), and one resumed on another world size or worker count deals out exactly what is
left of the epoch (see "the data position" below).

Within a worker the stages are webdataset's own: tar to samples (with a logging handler), a seeded
shuffle buffer, then our decode of the image and `cls` fields only (never webdataset's default
decoders, which unpickle `.pyd`), timm's DeiT transform up to uint8 pixels (`use_prefetcher=True`),
and `batched` into uint8 [B, 3, H, W]. Normalisation happens on the device
(`antismooth.data.device.DeviceBatches`); random erasing (`TrainStream.random_erasing`) and
Mixup/CutMix (`TrainStream.mixup`) run on the batch in the training loop.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import math
import multiprocessing.spawn as mp_spawn
import os
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import braceexpand
import numpy as np
import torch
import torch.multiprocessing as mp
import webdataset as wds
from PIL import Image
from timm.data import Mixup, auto_augment, create_transform
from timm.data.random_erasing import RandomErasing

from ..distributed import all_reduce, all_reduce_counts
from ..settings import BatchLayout
from .decode import CpuSampleStage, GpuSampleStage, SampleDecoder
from .settings import AugmentConfig, StreamConfig
from .shards import load_manifest

__all__ = ["AugmentConfig", "StreamConfig", "ShardSource", "TrainStream", "EvalStream", "Deal", "EpochPosition",
           "build_train_stream", "build_eval_stream", "train_transform", "eval_transform", "seed_augmentation",
           "reduce_eval_metrics", "loader_context"]

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tiff", "tif", "ppm")
MAX_TOP_UP_PASSES = 10     # re-reads of a worker's ranges to replace corrupt samples before giving up


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
    def resolve(cls, shards: "Shards", num_samples: Optional[int] = None) -> "ShardSource":
        """A manifest path (`train.json`), or URLs / a brace pattern / `pipe:` commands plus num_samples; a source
        resolved before is returned as it is (a run reads each manifest once and hands the source down)."""
        if isinstance(shards, ShardSource):
            return shards
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


Shards = str | Path | Sequence[str] | ShardSource   # what the stream builders take


def seed_for(*parts: Any) -> int:
    """A 63-bit seed from any parts, stable across processes and Python runs (unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def epoch_shard_order(source: ShardSource, seed: int, epoch: int) -> list[int]:
    """The shards' reading order for one epoch: a permutation seeded by (seed, epoch)."""
    order = list(range(len(source.urls)))
    random.Random(seed_for("shards", seed, epoch)).shuffle(order)
    return order


def shard_starts(source: ShardSource, order: Sequence[int]) -> np.ndarray:
    """Where each shard of `order` begins in the epoch's sample sequence (and, last, its length)."""
    return np.concatenate([[0], np.cumsum([source.counts[i] for i in order], dtype=np.int64)])


def worker_batches(num_batches: int, worker: int, num_workers: int) -> int:
    """How many of a rank's batches worker `worker` makes: the loader takes batch b from worker b % W."""
    return len(range(worker, num_batches, num_workers))


def proportional_cuts(total: int, weights: Sequence[int]) -> list[tuple[int, int]]:
    """[0, total) cut into contiguous pieces in proportion to `weights`; when total ≥ sum(weights), each piece
    is at least its weight long."""
    whole = max(sum(weights), 1)
    bounds = [total * before // whole for before in itertools.accumulate(weights, initial=0)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _runs(positions: np.ndarray, starts: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """`positions` cut into runs that one pass through one shard can read: (shard slot in the order, run)."""
    if not len(positions):
        return
    slots = np.searchsorted(starts, positions, side="right") - 1
    breaks = np.flatnonzero((np.diff(slots) != 0) | (np.diff(positions) < 0)) + 1
    for run in np.split(np.arange(len(positions)), breaks):
        yield int(slots[run[0]]), positions[run]


def _read_positions(source: ShardSource, order: Sequence[int], positions: np.ndarray,
                    handler: Callable) -> Iterator[dict]:
    """The raw samples at `positions` of the epoch's sequence (the shards in `order`), in that order, each
    tagged with its `__position__`; a position repeated is yielded again (a copy for repeated augmentation).
    Read with webdataset's tar reader (local paths, URLs, `pipe:`), one pass per run of a shard."""
    starts = shard_starts(source, order)
    for slot, run in _runs(positions, starts):
        offset = int(starts[slot])
        samples = wds.tarfile_to_samples(handler=handler)(iter([{"url": source.urls[order[slot]]}]))
        indexed = enumerate(itertools.islice(samples, int(run[-1]) - offset + 1))
        index, sample = -1, None
        for position in run.tolist():
            while index < position - offset:
                index, sample = next(indexed, (None, None))
                if index is None:   # a truncated shard ends early: its missing samples are skipped
                    break
            if index is None:
                break
            if index == position - offset:
                yield dict(sample, __position__=position)


def sample_fields(sample: dict) -> tuple[bytes, int]:
    """The encoded image and the class index; every other field is dropped unread, pickles included."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None or "cls" not in sample:
        raise ValueError(f"sample {sample.get('__key__')} has no image or no cls field")
    return sample[ext], int(sample["cls"])


class _SkipCounter:
    """A webdataset handler that logs and counts what it skips (corrupt samples, truncated shards)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, exn: Exception, what: str = "a corrupt sample or shard") -> bool:
        self.count += 1
        _logger.warning("Skipping %s: %r", what, exn)
        return True


def seed_augmentation(sample_seed: int) -> None:
    """Seed the generators timm's transforms draw from (all three), for one sample's augmentation."""
    random.seed(sample_seed)
    np.random.seed(sample_seed % 2**32)
    torch.default_generator.manual_seed(sample_seed)  # torch.manual_seed also queues CUDA seeding, per sample


def _decoded(samples: Iterable[tuple[int, dict]], stage: Any, seed: int,
             counter: _SkipCounter) -> Iterator[tuple]:
    """Decode and transform (or, on the GPU path, check and draw the parameters), seeding the augmentation per
    sample so a resumed run draws the same crops. What the decode or the augmentation raises is skipped and
    counted like a corrupt sample: an exception in a loader worker would end the whole DataLoader, and the
    top-up replaces the sample so every rank still runs the same steps."""
    for index, sample in samples:
        try:
            data, label = sample_fields(sample)
            image, finish = stage.decode(data, seed_for(seed, index), seed_augmentation)
        except Exception as exn:  # PIL raises many types for damaged bytes
            counter(exn)
            continue
        try:
            pixels = finish(image)
        except Exception as exn:  # an augmentation op that fails on this image and draw (a library's bug)
            counter(exn, what="a sample whose augmentation failed")
            continue
        yield pixels, label, sample["__position__"]


def _collate(stage: Any, samples: Sequence[tuple[Any, ...]]) -> tuple[Any, ...]:
    """A batch of the stage's images (uint8 [B, 3, H, W], or a decode.JpegBatch on the GPU path), int64 labels
    and positions."""
    images, labels, *rest = zip(*samples, strict=True)
    return (stage.collate(images), torch.tensor(labels, dtype=torch.int64),
            *(torch.tensor(field, dtype=torch.int64) for field in rest))


class _WorkerStream(torch.utils.data.IterableDataset):
    """One rank's batches of one deal; each DataLoader worker makes its share (batch b from worker b % W)."""

    def __init__(self, plan: "_EpochPlan", skip_batches: int, stage: Any, config: StreamConfig) -> None:
        super().__init__()
        self.plan, self.skip_batches, self.stage, self.config = plan, skip_batches, stage, config

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        info = torch.utils.data.get_worker_info()
        loader_id, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # The loader takes its first batch from worker 0; on resume that batch is batch `skip_batches`,
        # made by worker skip % W in the uninterrupted run, so the roles rotate by `skip_batches`.
        worker = (loader_id + self.skip_batches) % num_workers
        plan = self.plan
        wanted = plan.wanted[worker]
        done = worker_batches(self.skip_batches, worker, num_workers) * plan.batch_size
        counter = _SkipCounter()
        raw = self._raw_samples(plan.pieces[worker], worker, counter)
        # Resume: drop, undecoded, the samples this worker's batches before `skip_batches` used.
        indexed = itertools.islice(enumerate(raw), done, None)
        samples = _decoded(indexed, self.stage, seed_for(plan.seed, worker), counter)
        samples = itertools.islice(samples, max(0, wanted - done))
        reported = 0
        collate = functools.partial(_collate, self.stage)
        for batch in wds.batched(plan.batch_size, collation_fn=collate, partial=plan.partial)(samples):
            yield (*batch[:2], counter.count - reported, *batch[2:])
            reported = counter.count

    def _raw_samples(self, piece: np.ndarray, worker: int, counter: _SkipCounter) -> Iterator[dict]:
        """The worker's piece, shuffled (training); then, while corrupt samples left the worker short, its
        positions again, read lazily."""
        plan = self.plan
        raw = _read_positions(plan.source, plan.order, piece, counter)
        if plan.shuffle and self.config.shuffle_buffer > 1:
            raw = wds.shuffle(self.config.shuffle_buffer, self.config.shuffle_initial,
                              seed=seed_for(plan.seed, worker, "shuffle"))(raw)
        yield from raw
        if not plan.top_up:
            return
        once = np.unique(piece)
        for _ in range(MAX_TOP_UP_PASSES):
            yield from _read_positions(plan.source, plan.order, once, counter)
        _logger.error("A loader worker ran out of readable samples after %d passes over its shards; "
                      "its rank will run fewer steps. Check the shards with build_shards.py --verify.",
                      MAX_TOP_UP_PASSES)


@dataclass(frozen=True)
class _EpochPlan:
    """What each loader worker of one rank reads: its piece, the positions of the epoch's sample sequence
    (the shards in `order`) in reading order, a position repeated once per copy; and how many samples it
    delivers. A plain dataclass, so that loader workers started by spawn can receive it."""
    source: ShardSource
    order: tuple[int, ...]
    pieces: tuple[np.ndarray, ...]
    wanted: tuple[int, ...]
    batch_size: int
    seed: int
    shuffle: bool = True            # training: a seeded shuffle buffer per worker
    top_up: bool = True             # training: cycle the piece when corrupt samples were skipped, so no rank runs short
    partial: bool = False           # evaluation: the last batch may be short


def _even_split(lo: int, hi: int, part: int, parts: int) -> tuple[int, int]:
    """Part `part` of `parts` near-equal contiguous pieces of [lo, hi)."""
    size = hi - lo
    return lo + size * part // parts, lo + size * (part + 1) // parts


# --- the data position ---------------------------------------------------------------------------------------
#
# A checkpoint must say where an epoch stands in terms that outlive the world size and the loader worker
# count, so that a run resumed on 6 nodes instead of 8 uses every remaining sample once, on equal steps.
# Published answers constrain the run instead: MosaicML Streaming fixes the order over a constant number of
# "canonical nodes" (physical node counts must divide or be multiples of it), IBM fms-fsdp keeps logical-shard
# cursors (a multiple of every world size, and ranks drain them unevenly: fine for endless streams, not for
# epochs of equal steps), Megatron keeps one global count (exact only for its unsharded samplers). Our workers
# shuffle through buffers, so the samples consumed so far are a scattered subset of each worker's piece, and
# no count or cursor names them. So the position is the set itself: per sample position of the epoch's sequence,
# the copies trained on (one byte per sample: 1.3 MB for ImageNet, summed over ranks by one all_reduce per
# save). Any world size and worker count can then deal out exactly what is left, evenly, and corrupt samples
# or top-ups cannot make the record drift from what was trained on.

def pack_counts(counts: Optional[np.ndarray]) -> Optional[bytes]:
    """Per-position copy counts as compressed bytes (a checkpoint's client state), None for none."""
    if counts is None:
        return None
    return zlib.compress(np.minimum(counts, 255).astype(np.uint8).tobytes(), 1)


def unpack_counts(packed: Optional[bytes]) -> Optional[np.ndarray]:
    return None if packed is None else np.frombuffer(zlib.decompress(packed), dtype=np.uint8).astype(np.int32)


@dataclass(frozen=True)
class Deal:
    """How the samples of an epoch not yet trained on are dealt to ranks and loader workers.

    An epoch is dealt when it starts, and what is left of it is dealt again when a run resumes on another
    world size or worker count. A deal is rebuilt from these fields alone, so a run resumed at the same size
    continues its deal sample for sample (same batches, same augmentations) as if never stopped.
    """
    world_size: int
    workers: int
    samples_in_epoch: int = 0                 # global samples of the epoch trained on when it was dealt
    basis: Optional[np.ndarray] = None        # copies of each sample position trained on then; None: none

    def state_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "workers": self.workers, "samples_in_epoch": self.samples_in_epoch,
                "basis": pack_counts(self.basis)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "Deal":
        return cls(state["world_size"], state["workers"], state["samples_in_epoch"], unpack_counts(state["basis"]))

    def same_layout(self, world_size: int, workers: int) -> bool:
        return (self.world_size, self.workers) == (world_size, workers)


@dataclass(frozen=True)
class EpochPosition:
    """Where an epoch stands, saved with every checkpoint: the deal in force, and how many copies of each
    sample position the run has trained on (summed over all ranks; None in the resampled mode, which draws
    shards with replacement and promises no exactness). Only the deal's layout mentions a world size, and only
    to continue that deal when the layout is unchanged."""
    deal: Optional[Deal] = None               # None: the epoch has not started
    consumed: Optional[np.ndarray] = None

    def state_dict(self) -> dict[str, Any]:
        if self.deal is None:
            return {}
        return {"deal": self.deal.state_dict(), "consumed": pack_counts(self.consumed)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "EpochPosition":
        if not state:
            return cls()
        return cls(Deal.from_state_dict(state["deal"]), unpack_counts(state["consumed"]))

    def deal_for(self, world_size: int, workers: int, samples_in_epoch: int) -> Deal:
        """The deal to go on with: this one on the same layout, else what is left dealt anew to this layout."""
        if self.deal is None:
            return Deal(world_size, workers, samples_in_epoch)
        if self.deal.same_layout(world_size, workers):
            return self.deal
        return Deal(world_size, workers, samples_in_epoch, self.consumed)


@dataclass
class TrainStream:
    """The training batches of one rank: equal steps on every rank, resumable at any sample, on any number
    of ranks and loader workers."""
    source: ShardSource
    config: StreamConfig
    augment: AugmentConfig
    rank: int
    world_size: int
    num_classes: int
    layout: BatchLayout              # micro batch × accumulation × ranks, and the steps of an epoch
    corrupt_skipped: int = 0

    def __post_init__(self) -> None:
        if self.layout.micro_batch != self.config.batch_size or self.layout.world_size != self.world_size:
            raise ValueError(f"The stream's batch of {self.config.batch_size} on {self.world_size} ranks is not the "
                             f"layout's {self.layout.micro_batch} on {self.layout.world_size}.")
        self.transform = train_transform(self.augment)
        if self.config.decode not in ("cpu", "gpu"):
            raise ValueError(f"Unknown decode {self.config.decode!r} for the stream: resolve auto first "
                             "(antismooth.data.decode.resolve_decode).")
        if self.config.num_workers is None:
            raise ValueError("The stream's number of loader workers is not set: give num_workers, or resolve the "
                             "default first (StreamConfig.with_workers).")
        self.stage = (GpuSampleStage(self.transform) if self.config.decode == "gpu"
                      else CpuSampleStage(SampleDecoder(self.transform, self.augment.reduced_decode)))
        self.mixup = self._build_mixup()
        self._consumed_before: Optional[np.ndarray] = None     # copies trained on before this loader (all ranks)
        self._delivered = np.zeros(self.source.num_samples, np.int32)   # ... and by this rank since
        self.position = EpochPosition()   # the deal in force (epoch_loader) or loaded (load_state_dict)

    @property
    def global_batch(self) -> int:
        return self.layout.global_batch

    @property
    def accumulation(self) -> int:
        return self.layout.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch, the same on every rank; the last partial global batch is dropped."""
        return self.layout.steps_per_epoch

    @property
    def epoch_samples(self) -> int:
        """Samples trained on per epoch, copies included: the same at any world size (the global batch is held)."""
        return self.layout.epoch_samples

    def __len__(self) -> int:
        return self.steps_per_epoch * self.accumulation

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

    def pool(self, consumed: Optional[np.ndarray] = None) -> np.ndarray:
        """The epoch's copies not yet trained on, as ascending sample positions, one entry per copy: an epoch
        is the first ceil(epoch_samples / r) positions of its sequence, r copies each (repeated augmentation)."""
        repeats = self.augment.repeated_aug
        unique = math.ceil(self.epoch_samples / repeats)
        copies = np.full(unique, repeats, np.int64)
        if consumed is not None:
            copies = np.maximum(copies - consumed[:unique], 0)
        return np.repeat(np.arange(unique, dtype=np.int64), copies)

    def _plan(self, epoch: int, deal: Deal) -> _EpochPlan:
        """This rank's share of `deal`: the pool cut evenly between the ranks, each rank's part between its
        workers in proportion to the batches each makes. Contiguous cuts, so a worker reads at most one shard
        it shares with a neighbour."""
        batch, workers = self.config.batch_size, max(1, deal.workers)
        num_batches = (self.epoch_samples - deal.samples_in_epoch) // (batch * self.world_size)
        wanted = [worker_batches(num_batches, w, workers) * batch for w in range(workers)]
        order = tuple(epoch_shard_order(self.source, self.config.seed, epoch))
        fresh = deal.samples_in_epoch == 0 and deal.basis is None
        seed = seed_for(self.config.seed, epoch, self.rank, *(() if fresh else (deal.samples_in_epoch,)))
        if self.config.mode == "exact":
            pool = self.pool(deal.basis)
            lo, hi = _even_split(0, len(pool), self.rank, self.world_size)
            pieces = [pool[lo + a:lo + b] for a, b in proportional_cuts(hi - lo, wanted)]
        else:
            pieces = [self._resampled_piece(order, seed, w, wanted[w]) for w in range(workers)]
        return _EpochPlan(source=self.source, order=order, pieces=tuple(pieces), wanted=tuple(wanted),
                          batch_size=batch, seed=seed)

    def _resampled_piece(self, order: Sequence[int], seed: int, worker: int, wanted: int) -> np.ndarray:
        """Whole shards drawn with replacement until they hold `wanted` samples (copies counted)."""
        rng, repeats = random.Random(seed_for("resampled", seed, worker)), self.augment.repeated_aug
        starts, slot_of = shard_starts(self.source, order), {shard: slot for slot, shard in enumerate(order)}
        need, runs = math.ceil(wanted / repeats), []
        while need > 0:
            slot = slot_of[rng.randrange(len(self.source.urls))]
            runs.append(np.arange(starts[slot], starts[slot + 1]))
            need -= len(runs[-1])
        return np.repeat(np.concatenate(runs) if runs else np.zeros(0, np.int64), repeats)

    def loader(self, epoch: int, samples_consumed: int = 0, deal: Optional[Deal] = None,
               consumed: Optional[np.ndarray] = None,
               pin_memory: bool = False) -> Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """This rank's (uint8 images, labels, sample positions) batches of `epoch` under `deal` (default: the
        epoch dealt to this layout from its start), after `samples_consumed` (global count) of the epoch, of
        which `consumed` says which copies (the checkpoint's record; None: none). Give `record` the positions
        of every batch trained on. `pin_memory` (for a GPU: `device.pin_memory_for(device)`) pins the batches
        in the loader's pin thread."""
        deal = deal or Deal(self.world_size, self.config.num_workers)
        if not deal.same_layout(self.world_size, self.config.num_workers):
            raise ValueError(f"A deal for {deal.world_size} ranks × {deal.workers} workers cannot feed "
                             f"{self.world_size} × {self.config.num_workers}: deal the rest anew (EpochPosition.deal_for).")
        since_deal = samples_consumed - deal.samples_in_epoch
        if since_deal < 0 or since_deal % self.global_batch:
            raise ValueError(f"Resume position {samples_consumed} is not a step boundary after the deal at "
                             f"{deal.samples_in_epoch} (global batch {self.global_batch}): a run resumes at a step "
                             "boundary.")
        skip = since_deal // (self.config.batch_size * self.world_size)
        self._consumed_before = consumed
        self._delivered[:] = 0
        dataset = _WorkerStream(self._plan(epoch, deal), skip, self.stage, self.config)
        batches = (self.epoch_samples - samples_consumed) // (self.config.batch_size * self.world_size)
        return _CountingLoader(self, dataset, batches, self.config.num_workers, pin_memory)

    def epoch_loader(self, epoch: int, samples_in_epoch: int = 0,
                     pin_memory: bool = False) -> Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """`loader` of `epoch` from `samples_in_epoch` (global) on: mid-epoch, the position `load_state_dict` gave
        goes on (its deal on the same layout, else what is left dealt anew); at an epoch's start, a fresh deal.
        The deal becomes the one `state_dict` saves."""
        position = self.position if samples_in_epoch else EpochPosition()
        deal = position.deal_for(self.world_size, self.config.num_workers, samples_in_epoch)
        self.position = EpochPosition(deal, position.consumed)
        return self.loader(epoch, samples_in_epoch, deal, position.consumed, pin_memory=pin_memory)

    # --- the stream's own position, saved with each checkpoint (as torchtitan's dataloader is Stateful)

    def state_dict(self) -> dict[str, Any]:
        """Where the epoch stands (EpochPosition.state_dict: the deal in force, the copies trained on by all ranks);
        {} before its first loader. A collective: every rank calls it, at a mid-epoch save."""
        if self.position.deal is None:
            return {}
        return EpochPosition(self.position.deal, self.consumed()).state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on from a saved position at the next `epoch_loader` ({}: the epoch's start)."""
        self.position = EpochPosition.from_state_dict(state)

    def load_layout(self, world_size: int, workers: int) -> None:
        """For checkpoints saved before they recorded which samples were trained on: only the layout the epoch was
        dealt to is known (its samples are then dealt on by count)."""
        self.position = EpochPosition(Deal(world_size, workers))

    def redeal_note(self, samples_in_epoch: int) -> str:
        """'' when the loaded position goes on as it was dealt, else what changes (for the resume's log line)."""
        saved = self.position.deal
        if not samples_in_epoch or saved is None or saved.same_layout(self.world_size, self.config.num_workers):
            return ""
        left = "the rest of its samples" if self.position.consumed is not None else \
            "its samples by count (this checkpoint predates the record of which were trained on: some may repeat)"
        return (f"data was dealt to {saved.world_size} × {saved.workers} loader workers, now {left} to "
                f"{self.world_size} × {self.config.num_workers}")

    @property
    def delivered(self) -> np.ndarray:
        """Copies of each sample position this rank trained on since its loader began (see `record`)."""
        return self._delivered

    def record(self, positions: torch.Tensor) -> None:
        """Count the samples of a batch this rank trained on (the loader's third field)."""
        if self.config.mode == "exact":
            np.add.at(self._delivered, positions.numpy(), 1)

    def consumed(self) -> Optional[np.ndarray]:
        """The copies of each sample position trained on in this epoch, on all ranks: a collective, called by
        every rank when a checkpoint is saved. None in the resampled mode."""
        if self.config.mode != "exact":
            return None
        delivered = all_reduce_counts(self._delivered)
        return delivered if self._consumed_before is None else delivered + self._consumed_before


# Loader workers are forked from a clean server process (multiprocessing's forkserver), not from the training
# process: forking a process that runs threads (TensorBoard's writer; the last loader's queue feeders, exiting)
# deadlocked a worker inside CPython 3.11's after-fork hook (_PyThreadState_DeleteExcept waiting for a lock held at
# the fork) in about one test launch in three here, its rank then waiting for a batch forever. Python 3.14 makes
# forkserver the default on Linux for this class of bug. The server imports the main script (whose start must sit
# under `if __name__ == "__main__":`, as with spawn; `_forkserver` does it, see there), torch and this module once
# per process; every worker after that is a fork of it, as fast as a fork of the training process. `_forkserver`
# also makes the server die with its process, so that a killed rank leaves no workers behind.
FORKSERVER_PRELOAD = ["__main__", "torch", __name__, f"{__package__}._forkserver"]


def loader_context(workers: int) -> Optional[Any]:
    """The multiprocessing context of loader workers: forkserver where the platform has it, else its default."""
    if not workers or "forkserver" not in mp.get_all_start_methods():
        return None
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(FORKSERVER_PRELOAD)   # effective until the server starts, harmless after
    _hand_main_to_server()
    return context


# CPython before 3.13.8 never tells the server where the main script is (its '__main__' preload is dead code:
# python/cpython#126631, #137996), so every worker imported the main script itself: pretrain.py's DeepSpeed, timm
# and TensorBoard, at every loader start (each epoch and evaluation; docs/benchmarks.md, "Figures behind code
# comments"). `_forkserver` imports it instead, from what this variable says; the server inherits the environment of the process that starts it.
FORKSERVER_MAIN_ENV = "ANTISMOOTH_FORKSERVER_MAIN"


def _hand_main_to_server() -> None:
    data = mp_spawn.get_preparation_data("loader")   # what every worker will be told to import, and from where
    if "init_main_from_path" in data:   # a script; `python -m` mains are re-imported by name, cheaply or not at all
        os.environ[FORKSERVER_MAIN_ENV] = json.dumps({key: data[key] for key in
                                                      ("init_main_from_path", "sys_path", "sys_argv")})


class _CountingLoader:
    """Iterates a WebLoader and adds the workers' skipped-sample counts to the stream's total."""

    def __init__(self, owner: Any, dataset: torch.utils.data.IterableDataset, length: int, workers: int,
                 pin_memory: bool = False) -> None:
        self.owner, self.length = owner, length
        # pin_memory: the DataLoader's pin thread pins each batch, so the main thread never waits on it.
        self.loader = wds.WebLoader(dataset, batch_size=None, num_workers=workers,
                                    multiprocessing_context=loader_context(workers),
                                    persistent_workers=False, prefetch_factor=4 if workers else None,
                                    pin_memory=pin_memory)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for images, labels, skipped, *rest in self.loader:
            self.owner.corrupt_skipped += int(skipped)
            yield images, labels, *rest


def train_transform(augment: AugmentConfig) -> Callable[[Image.Image], torch.Tensor]:
    """timm's DeiT training transform up to uint8 pixels [3, H, W] (use_prefetcher=True): normalisation and
    random erasing are left to the device (antismooth.data.device, TrainStream.random_erasing)."""
    a = augment
    transform = create_transform(a.input_size, is_training=True, use_prefetcher=True, no_aug=a.no_aug,
                                 color_jitter=a.color_jitter, auto_augment=a.auto_augment,
                                 interpolation=a.interpolation, mean=a.mean, std=a.std)
    for op in _augment_ops(transform):
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = posterize_any_pillow
    return transform


def posterize_any_pillow(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize op with Pillow 12's result at 0 bits kept (a black image) on every Pillow: Pillow 13's
    ImageOps.posterize refuses 0 bits, which timm's RandAugment draws (DeiT's rand-m9-mstd0.5-inc1, magnitude
    10: PosterizeIncreasing keeps 4 - 4 = 0 bits), and the device path (decode._posterize) gives black too."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _augment_ops(transform: Any) -> Iterator[Any]:
    """The timm AugmentOps of a transform's RandAugment, AugMix or AutoAugment (whose policy lists sub-policies)."""
    for t in getattr(transform, "transforms", ()):
        yield from getattr(t, "ops", ())
        for sub_policy in getattr(t, "policy", ()):
            yield from sub_policy


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
    # Full decode by default: reported figures are then timm's validate.py's to the bit. A reduced decode pays only
    # for images at least twice the resize (short side >= 512 at 224 px: few of ImageNet's val images), and moves
    # a borderline prediction now and then (docs/data.md).
    reduced_decode: bool = False

    def __post_init__(self) -> None:
        self.transform = eval_transform(self.augment)
        self.stage = CpuSampleStage(SampleDecoder(self.transform, self.reduced_decode))

    def loader(self, pin_memory: bool = False) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's uint8 batches; `pin_memory` pins them in the loader's pin thread (for a GPU)."""
        lo, hi = _even_split(0, self.source.num_samples, self.rank, self.world_size)
        workers = max(1, self.num_workers)
        pieces = [np.arange(*_even_split(lo, hi, w, workers)) for w in range(workers)]
        plan = _EpochPlan(source=self.source, order=tuple(range(len(self.source.urls))), pieces=tuple(pieces),
                          wanted=tuple(len(piece) for piece in pieces), batch_size=self.batch_size, seed=0,
                          shuffle=False, top_up=False, partial=True)
        config = StreamConfig(batch_size=self.batch_size, num_workers=self.num_workers, shuffle_buffer=0)
        length = sum(math.ceil(len(piece) / self.batch_size) for piece in pieces)
        return _CountingLoader(self, _WorkerStream(plan, 0, self.stage, config), length, self.num_workers,
                               pin_memory)


def build_train_stream(shards: Shards, config: StreamConfig, rank: int, world_size: int,
                       augment: AugmentConfig = AugmentConfig(), num_samples: Optional[int] = None,
                       num_classes: Optional[int] = None, global_batch: int = 0,
                       layout: Optional[BatchLayout] = None) -> TrainStream:
    """The training stream of this rank, from a manifest, shard URLs or a ShardSource. Its batch layout: `layout`
    (a run's, derived once at start-up), else one of `global_batch` samples per optimizer step on all ranks
    (default: one batch per rank, no accumulation)."""
    source = ShardSource.resolve(shards, num_samples)
    classes = num_classes or len(source.classes)
    if not classes:
        raise ValueError("Shard URLs without a manifest need num_classes for Mixup's label smoothing.")
    if layout is None:
        per_pass = config.batch_size * world_size
        if (global_batch or per_pass) % per_pass:
            raise ValueError(f"A global batch of {global_batch} is no whole number of batches of "
                             f"{config.batch_size} on {world_size} ranks.")
        layout = BatchLayout(config.batch_size, (global_batch or per_pass) // per_pass, world_size, source.num_samples)
    return TrainStream(source, config, augment, rank, world_size, classes, layout)


def build_eval_stream(shards: Shards, batch_size: int, rank: int, world_size: int,
                      num_workers: int = 4, augment: AugmentConfig = AugmentConfig(),
                      num_samples: Optional[int] = None) -> EvalStream:
    """The evaluation stream of this rank, from a manifest, shard URLs or a ShardSource."""
    return EvalStream(ShardSource.resolve(shards, num_samples), batch_size, rank, world_size, num_workers, augment)


def reduce_eval_metrics(correct1: float, correct5: float, loss_sum: float, count: int) -> dict[str, float]:
    """Sum the per-rank counts over all ranks (exact top-1: no padded duplicates) and form the metrics."""
    c1, c5, loss, n = all_reduce([correct1, correct5, loss_sum, count])
    return {"top1": 100 * c1 / max(n, 1), "top5": 100 * c5 / max(n, 1), "loss": loss / max(n, 1), "count": int(n)}
