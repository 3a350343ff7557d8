"""Evaluation: top-1, top-5 and loss of a model over validation batches, each sample counted once.

`evaluate(model, batches, device, dtype)` is the loop pretrain.py runs at each epoch end and
tools/eval.py runs on exported weights: it returns this process's summed counts, which
`reduce_eval_metrics(**counts)` (antismooth.data.pipeline) sums over ranks and turns into figures.
The batches come from shards (`build_eval_stream`, every sample on exactly one rank) or from an
ImageFolder split into contiguous, unpadded per-rank ranges (DistributedSampler would pad the last
batch with duplicates and bias top-1), both through the same timm evaluation transform, as uint8
images that `evaluate` normalises on the device (antismooth.data.device). The data's labels are mapped
to the model's outputs by class name (`match_classes`), so a subset of the model's classes, or another
order, is scored against the right outputs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_model_data_config

from .data.device import DeviceBatches
from .data.pipeline import AugmentConfig, ShardSource, build_eval_stream, eval_transform, loader_context
from .data.shards import name_list
from .export import create_model_from_weights, read_export_description
from .models.description import ModelDescription
from .models import structure

__all__ = ["evaluate", "EvalData", "resolve_eval_data", "eval_batches", "augment_from_data_config", "eval_augment",
           "model_data_config", "build_eval_model", "match_classes"]

_logger = logging.getLogger(__name__)


def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device | str,
             dtype: Optional[torch.dtype] = None, forwards: Optional[int] = None, *,
             mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD
             ) -> dict[str, float]:
    """Summed correct top-1/top-5, summed cross-entropy and sample count of this process's batches.

    `batches` hold uint8 images (as `eval_batches` and the eval stream deliver them), normalised with
    `mean`/`std` (the data config's) on `device`, the next batch's copy overlapping this one's forward.
    `model` may be a plain module or a DeepSpeed engine (its forward gathers ZeRO-3 weights);
    `dtype` runs the forward under autocast in that dtype (None: as the model is). Train mode is restored.
    `forwards`: run exactly this many forward passes, repeating the last input uncounted once this
    rank's batches run out. Under ZeRO-3 every forward gathers parameters collectively, so ranks with
    fewer batches (uneven splits, skipped samples) must keep joining until the busiest one is done.
    """
    device = torch.device(device)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # on device: one sync at the end, not per batch
    count = 0                                                      # on the host: a shape, known without a sync
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    done, images = 0, None
    try:
        with torch.no_grad(), autocast:
            for images, targets, *_ in DeviceBatches(batches, device, mean, std):
                images = images.to(dtype or images.dtype)
                logits = model(images).float()
                done += 1
                top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
                totals += torch.stack([
                    (top[:, 0] == targets).sum().double(),
                    (top == targets[:, None]).any(dim=-1).sum().double(),
                    nn.functional.cross_entropy(logits, targets, reduction="sum").double()])
                count += targets.numel()
            for _ in range(done, forwards or 0):
                model(_idle_input(model, images, device, dtype))
    finally:
        model.train(was_training)
    correct1, correct5, loss_sum = totals.tolist()
    return {"correct1": correct1, "correct5": correct5, "loss_sum": loss_sum, "count": count}


def _idle_input(model: nn.Module, last: Optional[torch.Tensor], device: torch.device,
                dtype: Optional[torch.dtype]) -> torch.Tensor:
    """One image for a forward whose result is discarded: the last batch's first, or zeros of the model's size."""
    if last is not None:
        return last[:1]
    height, width = structure.input_size(model)  # a DeepSpeed engine's model unwrapped
    return torch.zeros(1, 3, height, width, device=device, dtype=dtype or torch.float32)


# ----------------------------------------------------------------------------------------------
# Which images


@dataclass(frozen=True)
class EvalData:
    """An evaluation split: a shard manifest or an ImageFolder root, with its classes in label order."""
    kind: Literal["shards", "imagefolder"]
    path: Path
    classes: tuple[str, ...]
    label_map: Optional[tuple[int, ...]] = None  # the model's output for each data label; None: the label itself
    source: Optional[ShardSource] = None         # the shards, resolved once from the manifest (kind "shards")


def resolve_eval_data(data: str | Path, split: str = "val") -> EvalData:
    """A manifest path, a folder holding `<split>.json` (shards), or an ImageFolder (`<split>/` inside, or itself)."""
    data = Path(data)
    manifest = data if data.suffix == ".json" else data / f"{split}.json"
    if manifest.is_file() or data.suffix == ".json":
        source = ShardSource.resolve(manifest)
        return EvalData("shards", manifest, source.classes, source=source)
    others = [s for s in ("train", "val", "test") if s != split and ((data / s).is_dir() or (data / f"{s}.json").is_file())]
    if not (data / split).is_dir() and others:   # a shard folder or ImageFolder root without this split
        raise FileNotFoundError(
            f"--data {data} has no {split} split (no {split}.json, no {split}/ folder; it holds {' and '.join(others)}): "
            f"build the {split} shards from an ImageFolder with a {split}/ folder (tools/build_shards.py), or pass "
            f"--split {others[0]} to measure those images instead.")
    root = data / split if (data / split).is_dir() else data
    if not root.is_dir():
        raise FileNotFoundError(f"no evaluation data at {data}: give a shard folder holding {split}.json, a "
                                f"manifest, or an ImageFolder root (with {split}/<class>/<image> inside).")
    from torchvision.datasets.folder import find_classes
    try:
        classes, _ = find_classes(str(root))
    except FileNotFoundError:
        raise FileNotFoundError(f"{data} holds neither {split}.json (shards) nor class folders of images "
                                f"({split}/<class>/<image>): check --data and --split.") from None
    return EvalData("imagefolder", root, tuple(classes))


class _ImageFolderBatches:
    """This rank's contiguous slice of an ImageFolder, batched in order: every image on exactly one rank."""

    def __init__(self, root: Path, augment: AugmentConfig, batch_size: int, rank: int, world_size: int,
                 num_workers: int, pin_memory: bool = False) -> None:
        from torchvision.datasets import ImageFolder
        # allow_empty: empty class folders keep their label index, as in the shard builder's listing.
        dataset = ImageFolder(str(root), transform=eval_transform(augment), allow_empty=True)
        lo, hi = len(dataset) * rank // world_size, len(dataset) * (rank + 1) // world_size
        self.loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, range(lo, hi)), batch_size=batch_size, shuffle=False,
            num_workers=num_workers, persistent_workers=False, pin_memory=pin_memory,
            multiprocessing_context=loader_context(num_workers))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


class _Relabelled:
    """Batches whose targets go through a lookup table: data label i becomes the model's output label_map[i]."""

    def __init__(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], label_map: Sequence[int]) -> None:
        self.batches = batches
        self.lookup = torch.tensor(label_map, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for images, targets, *rest in self.batches:
            yield images, self.lookup[targets], *rest


def eval_batches(data: EvalData, augment: AugmentConfig, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 4, pin_memory: bool = False) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's uint8 evaluation batches (with len()), from shards or an ImageFolder, same transform either
    way; `pin_memory` (for a GPU) pins them in the loader's pin thread; targets are the model's class indices
    when `data.label_map` says how they differ from the data's."""
    if data.kind == "shards":
        batches = build_eval_stream(data.source or data.path, batch_size, rank, world_size, num_workers,
                                    augment).loader(pin_memory)
    else:
        batches = _ImageFolderBatches(data.path, augment, batch_size, rank, world_size, num_workers, pin_memory)
    return batches if data.label_map is None else _Relabelled(batches, data.label_map)


# ----------------------------------------------------------------------------------------------
# Which model, and the transform it expects


def model_data_config(model: nn.Module, meta: Optional[ModelDescription | Mapping[str, Any]] = None) -> dict[str, Any]:
    """The evaluation data config: the one stored with the weights, else (key by key) timm's for the model; the
    input size is always the model's own (timm's pretrained_cfg keeps 224 for img_size=32)."""
    stored = ModelDescription.of(meta).data_config if meta is not None else {}
    config = {**resolve_model_data_config(model), **stored}
    try:
        config["input_size"] = (3, *structure.input_size(model))
    except ValueError:
        pass  # a model outside antismooth's families: timm's config says its size
    return config


def augment_from_data_config(data_config: Mapping[str, Any]) -> AugmentConfig:
    """The AugmentConfig whose evaluation transform is the one a timm data config describes."""
    _, height, width = data_config["input_size"]
    defaults = AugmentConfig()
    return AugmentConfig(input_size=height if height == width else (height, width),
                         interpolation=data_config.get("interpolation", defaults.interpolation),
                         eval_crop_pct=data_config.get("crop_pct", defaults.eval_crop_pct),
                         mean=tuple(data_config.get("mean", defaults.mean)),
                         std=tuple(data_config.get("std", defaults.std)))


def eval_augment(model: nn.Module, meta: Optional[ModelDescription | Mapping[str, Any]] = None) -> AugmentConfig:
    """The evaluation transform of a model: its own image size, and the crop, interpolation, mean and std stored
    with its weights, else its timm pretrained_cfg's (tools/eval.py and antismooth-analyze both use this)."""
    return augment_from_data_config(model_data_config(model, meta))


def build_eval_model(weights: str | Path, model: Optional[str] = None, num_classes: Optional[int] = None,
                     img_size: Optional[int] = None,
                     default_num_classes: Optional[int] = None) -> tuple[nn.Module, Optional[ModelDescription]]:
    """The model a weights file describes (or `model`, for files without a description), weights loaded, and its
    description. `default_num_classes` (the data's class count) serves files without one and no num_classes."""
    described = read_export_description(weights)
    if described is not None and model is not None and model != described.model:
        raise ValueError(f"{weights} holds {described.model} (its metadata says so), not {model}: drop --model.")
    if described is None and num_classes is None:
        num_classes = default_num_classes
    overrides = {k: v for k, v in (("num_classes", num_classes), ("img_size", img_size)) if v is not None}
    return create_model_from_weights(weights, None if described is not None else model, **overrides)


def match_classes(model: nn.Module, model_classes: Optional[Sequence[str]], data: EvalData) -> EvalData:
    """The data with its labels mapped to the model's outputs by class name: the data's classes may be
    a subset of the model's, in any order. Weights without class names take the labels as they are."""
    if model_classes is None:
        _check_unnamed(model, data)
        return data
    output = {wnid: i for i, wnid in enumerate(model_classes)}
    unknown = [wnid for wnid in data.classes if wnid not in output]
    if unknown:
        raise ValueError(f"{data.path} has {len(unknown)} class(es) the model was not trained on "
                         f"({name_list(unknown)}), so no output of the model can score them; evaluate on data "
                         f"whose classes are among the model's {len(model_classes)} (listed in the weights' "
                         "metadata): leave those class folders out, or rebuild the shards with the model's "
                         "train/ under --src.")
    label_map = tuple(output[wnid] for wnid in data.classes)
    if label_map == tuple(range(len(label_map))):
        return dataclasses.replace(data, label_map=None)
    _logger.info("Mapping the %d classes of %s to the model's %d by name.", len(label_map), data.path,
                 len(model_classes))
    return dataclasses.replace(data, label_map=label_map)


def _check_unnamed(model: nn.Module, data: EvalData) -> None:
    """Weights without class names: labels must fit the model's outputs, and differing counts are suspicious."""
    outputs = getattr(model, "num_classes", len(data.classes))
    if outputs < len(data.classes):
        raise ValueError(f"the model has {outputs} outputs but {data.path} has {len(data.classes)} classes; pass "
                         "--num-classes to match the weights, or evaluate on their dataset.")
    if outputs != len(data.classes):
        _logger.warning("The model has %d outputs and %s has %d classes, and the weights do not name their "
                        "classes: data label i is scored as output i, which is right only if the data's classes "
                        "are the model's first %d; export the weights with their classes to map them by name.",
                        outputs, data.path, len(data.classes), len(data.classes))
