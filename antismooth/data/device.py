"""uint8 batches from the loader → normalised float32 batches on the device, without stalling it.

The loader workers deliver uint8 images (a quarter of float32's bytes) and, on CUDA, the loader's
pin thread pins them. `DeviceBatches` then does what timm's `PrefetchLoader` (timm/data/loader.py)
does: the next batch's host→device copy and its normalisation run on a side CUDA stream while the
current step computes, one batch ahead. Elsewhere (CPU) a batch is normalised when it is asked for.

`normalize` is torchvision's ToTensor + Normalize, element for element, so on CPU the images are
bit-identical to the old worker-side float path. Random erasing draws normal noise in normalised
space, which uint8 cannot hold, so it runs on the device batch too (`TrainStream.random_erasing`), in
the training loop after the step's seeding.

On the GPU decode path (`--decode gpu`) a batch's images arrive as `decode.JpegBatch` (JPEG bytes and each
sample's augmentation parameters): they are decoded and augmented on the device in the same place, on the
same side stream, before the normalisation (`decode.decode_batch`).
"""
from __future__ import annotations

import functools
from typing import Iterable, Iterator, Optional, Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .decode import DecodeStats, JpegBatch, decode_batch

__all__ = ["DeviceBatches", "normalize", "to_device", "pin_memory_for"]

Batch = tuple[torch.Tensor, ...]   # images, labels, and any fields passed through (sample positions)


def pin_memory_for(device: torch.device | str) -> bool:
    """Whether loaders feeding `device` should pin their batches: only a pinned host→GPU copy can be
    asynchronous (a pageable one synchronises the stream)."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def _stats(values: Sequence[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Per-channel mean or std as a float32 (1, C, 1, 1) tensor on `device`, to broadcast over [B, C, H, W]."""
    return torch.as_tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


def _check_uint8(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8:
        raise TypeError(f"the device stage takes uint8 images [B, 3, H, W] as the loaders deliver them, got "
                        f"{images.dtype}: build batches with antismooth.data.pipeline's transforms (timm's "
                        "use_prefetcher=True), which leave normalisation to the device.")


def normalize(images: torch.Tensor, mean: Sequence[float] | torch.Tensor,
              std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] → float32 (x / 255 - mean) / std, on the images' device.

    The same float32 operations as torchvision's ToTensor (`x.float().div(255)`) then Normalize
    (`sub_(mean).div_(std)`), so on CPU the result equals the old worker-side path bit for bit. (On CUDA
    a division by a Python scalar is a multiplication by its reciprocal: equal to within rounding.)
    """
    _check_uint8(images)
    mean, std = _stats(mean, images.device), _stats(std, images.device)
    return images.float().div_(255).sub_(mean).div_(std)  # in place after .float(): one float buffer, same arithmetic


def to_device(images: torch.Tensor, device: torch.device | str, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
              std: Sequence[float] = IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """One uint8 batch, copied to `device` as it is (4x fewer bytes than float32) and normalised there:
    for single batches (spectral probe images), where there is nothing to overlap with."""
    _check_uint8(images)
    return normalize(images.to(device), mean, std)


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One copy stream per GPU for the whole process: the caching allocator pools blocks per stream, so a
    new stream per epoch (or per evaluation) would leave the old streams' blocks cached but unusable
    (timm#2781, fixed in timm#2784 by one stream per loader; our loaders are per epoch, hence per process)."""
    return torch.cuda.Stream(device=device)


class DeviceBatches:
    """Iterates (uint8 images, int64 labels, ...) host batches as (normalised float32 images, labels, ...) on
    `device`; fields after the labels are passed through on the host.

    On CUDA the copy (non_blocking, from the loader's pinned memory) and the normalisation of batch k+1
    are queued on a side stream before batch k is handed out, so they overlap step k. A batch must be
    consumed on the stream that is current when the iterator is advanced (the default stream, as in
    the training loop).
    """

    def __init__(self, batches: Iterable[Batch], device: torch.device | str,
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
                 decode_stats: Optional[DecodeStats] = None) -> None:
        self.batches = batches
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # one cache entry per GPU, not per spelling
        self.mean, self.std = _stats(mean, self.device), _stats(std, self.device)
        # The GPU decode path's counts (where each image was decoded), added to the caller's where given.
        self.decode_stats = decode_stats if decode_stats is not None else DecodeStats()

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        if self.device.type == "cuda":
            return self._prefetched()
        return (self._transfer(*batch) for batch in self.batches)

    def _transfer(self, images: torch.Tensor, labels: torch.Tensor, *rest: torch.Tensor) -> Batch:
        """Copy one batch to the device and normalise it there, on whatever stream is current; further fields
        (the training stream's sample positions) stay on the host, untouched."""
        if isinstance(images, JpegBatch):
            images = decode_batch(images, self.device, self.decode_stats)
        _check_uint8(images)
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        return normalize(images, self.mean, self.std), labels, *rest

    def _prefetched(self) -> Iterator[Batch]:
        """timm's PrefetchLoader loop: copy k+1 on the side stream, hand out k, then make the consumer wait
        for k+1's copy (queued after step k, so step k does not wait for it)."""
        side = _side_stream(self.device)
        consumer = torch.cuda.current_stream(self.device)
        ready: Optional[Batch] = None
        for batch in self.batches:
            # Blocks the consumer released go back to the side stream's pool and may be handed to the copy
            # below at once: let the side stream write only after the consumer's queued work has read them.
            side.wait_stream(consumer)
            with torch.cuda.stream(side):
                upcoming = self._transfer(*batch)
            if ready is not None:
                yield ready
                consumer = torch.cuda.current_stream(self.device)
            consumer.wait_stream(side)  # the consumer's next reads of `upcoming` come after its copy
            ready = upcoming
        if ready is not None:  # an empty loader yields nothing
            yield ready

