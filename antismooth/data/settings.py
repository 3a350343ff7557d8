"""The data's settings, two sections of a run's settings (antismooth.settings): how the shards are streamed
(StreamConfig) and how images are augmented (AugmentConfig). Each field's flag, default and help are written here once."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..settings import ConfigError, check_choices, setting

SHUFFLE_BUFFER = 5000      # samples per worker; raw JPEG bytes, ~110 KB each on ImageNet: ~0.5 GB
SHUFFLE_INITIAL = 1000     # fill before the first sample leaves, so the first batches are mixed too
DEFAULT_WORKERS = 8        # loader workers per process when --workers is left out, at most the CPUs it may use


@dataclass(frozen=True)
class AugmentConfig:
    """The DeiT recipe's augmentation, every knob with DeiT's default (Touvron et al. 2021); the flags' section of
    the run's settings (antismooth.config.TrainConfig.augment). Fields without a flag keep timm's values."""
    input_size: int = setting(224, help="training and evaluation image size: start-up sets the model's")
    no_aug: bool = setting(False, flag="--no-aug", action="store_true",
                           help="resize and centre crop only, as timm's --no-aug (debugging, tiny data)")
    color_jitter: float = setting(0.4, flag="--color-jitter", help="colour jitter strength (0: off)")
    auto_augment: Optional[str] = setting("rand-m9-mstd0.5-inc1", flag="--aa", dest="aa",
                                          help="RandAugment policy, 'none' for off")
    interpolation: str = setting("bicubic", help="resize interpolation")
    reprob: float = setting(0.25, flag="--reprob", help="random erasing probability (0: off)")
    remode: str = setting("pixel", help="random erasing fill mode")
    recount: int = setting(1, help="random erasing count")
    mixup: float = setting(0.8, flag="--mixup", help="Mixup alpha (0: off)")
    cutmix: float = setting(1.0, flag="--cutmix", help="CutMix alpha (0: off)")
    cutmix_minmax: Optional[tuple[float, float]] = setting(None, help="CutMix box ratio bounds (None: from alpha)")
    mixup_prob: float = setting(1.0, help="probability of Mixup or CutMix per batch")
    mixup_switch_prob: float = setting(0.5, help="probability of CutMix rather than Mixup when both are on")
    mixup_mode: str = setting("batch", help="Mixup/CutMix parameters per batch, pair or element")
    smoothing: float = setting(0.1, flag="--smoothing", help="label smoothing (0: off)")
    repeated_aug: int = setting(3, flag="--repeated-aug",
                                help="DeiT's repeated augmentation: copies of each image per epoch (1: off)")
    eval_crop_pct: float = setting(0.875, flag="--crop-pct", dest="crop_pct",
                                   help="evaluation centre-crop fraction: resize to size / crop_pct (timm)")
    mean: tuple[float, float, float] = setting(IMAGENET_DEFAULT_MEAN, help="normalisation mean")
    std: tuple[float, float, float] = setting(IMAGENET_DEFAULT_STD, help="normalisation standard deviation")
    # Evaluation decodes in full whatever this says (EvalStream).
    reduced_decode: bool = setting(False, flag="--reduced-decode", action=argparse.BooleanOptionalAction,
                                   help="CPU workers decode JPEGs at 1/2-1/8 scale where the crop still has the "
                                        "output's pixels: faster on large photographs, but training then sees other "
                                        "pixels than evaluation, which costs accuracy (docs/decode.md)")

    def __post_init__(self) -> None:
        if self.auto_augment in ("none", "None", ""):
            object.__setattr__(self, "auto_augment", None)
        if self.repeated_aug < 1:
            raise ConfigError(f"--repeated-aug must be 1 (off) or more, got {self.repeated_aug}.")
        if not 0 < self.eval_crop_pct <= 1:
            raise ConfigError(f"--crop-pct must be in (0, 1], got {self.eval_crop_pct}.")
        for flag, value in (("--color-jitter", self.color_jitter), ("--mixup", self.mixup), ("--cutmix", self.cutmix)):
            if value is not None and value < 0:   # None: off, as timm's transforms take it
                raise ConfigError(f"{flag} must be 0 (off) or more, got {value}.")
        if not 0 <= self.reprob <= 1:
            raise ConfigError(f"--reprob is a probability, in [0, 1], got {self.reprob}.")
        if not 0 <= self.smoothing < 1:
            raise ConfigError(f"--smoothing must be in [0, 1), got {self.smoothing}.")


@dataclass(frozen=True)
class StreamConfig:
    """How the shards are read: where, mode, seed, batch, workers and where JPEGs are decoded; the flags' section
    of the run's settings (antismooth.config.TrainConfig.stream)."""
    data: str = setting("shards/imagenet", flag="--data",
                        help="folder with train.json (and val.json) from tools/build_shards.py")
    batch_size: int = setting(0, help="per rank: start-up sets the DeepSpeed JSON's micro batch")
    mode: Literal["exact", "resampled"] = setting(
        "exact", flag="--stream-mode", dest="stream_mode", choices=("exact", "resampled"),
        help="exact: every sample once per epoch (per repeated-augmentation copy), resumable sample-exactly; "
             "resampled: shards drawn with replacement")
    seed: int = setting(0, flag="--seed",
                        help="seeds the initial weights, the data order, augmentation and every step's randomness")
    # None: left out, so that a number given (8 included) is told from the default; with_workers resolves it.
    num_workers: Optional[int] = setting(None, flag="--workers", dest="workers", type=int,
                                         help=f"loader workers per process (default: {DEFAULT_WORKERS}, at most the "
                                              "CPUs the process may use)")
    shuffle_buffer: int = setting(SHUFFLE_BUFFER, help="samples in each worker's shuffle buffer")
    shuffle_initial: int = setting(SHUFFLE_INITIAL, help="samples in the buffer before the first leaves")
    decode: Literal["cpu", "gpu", "auto"] = setting(
        "auto", flag="--decode", choices=("cpu", "gpu", "auto"),
        help="where JPEGs are decoded and augmented: the loader workers (cpu), the device (gpu: nvJPEG and "
             "per-sample augmentation on the GPU, the workers only read bytes), auto: gpu on CUDA where the recipe "
             "allows (docs/decode.md); a stream takes cpu or gpu, start-up resolves auto")

    def __post_init__(self) -> None:
        check_choices(self)
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"--workers must be 0 or more, got {self.num_workers}.")

    def with_workers(self, cpus: int) -> StreamConfig:
        """--workers as given; left out, DEFAULT_WORKERS at most `cpus` (more only fight over them, and torch warns
        of it for each loader). The one place the default is resolved: start-up calls it before building streams."""
        if self.num_workers is not None:
            return self
        return dataclasses.replace(self, num_workers=min(DEFAULT_WORKERS, cpus))
