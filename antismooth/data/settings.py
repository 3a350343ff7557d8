"""The data's settings: how the shards are streamed (StreamConfig) and how images are augmented (AugmentConfig)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

SHUFFLE_BUFFER = 5000      # samples per worker; raw JPEG bytes, ~110 KB each on ImageNet: ~0.5 GB
SHUFFLE_INITIAL = 1000     # fill before the first sample leaves, so the first batches are mixed too


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
    reduced_decode: bool = False    # opt-in: training JPEGs decoded at 1/2-1/8 scale where the crop still has the
                                    # output's pixels (antismooth.data.decode). Off, training sees evaluation's
                                    # pixels; on, another resampling that costs accuracy (docs/decode.md).


@dataclass(frozen=True)
class StreamConfig:
    """How the shards are read: mode, seed, batch and workers."""
    batch_size: int                 # per rank
    mode: Literal["exact", "resampled"] = "exact"
    seed: int = 0
    num_workers: int = 8
    shuffle_buffer: int = SHUFFLE_BUFFER
    shuffle_initial: int = SHUFFLE_INITIAL
    decode: Literal["cpu", "gpu"] = "cpu"   # gpu: workers pass JPEG bytes and parameters, DeviceBatches decodes
