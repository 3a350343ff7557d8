"""Plain weights in and out: read .pth/.safetensors safely, unwrap, and fit a state_dict to a model.

Checkpoints arrive in many wrappings: the official `main.py` saves {'model': sd, ...},
DeepSpeed prefixes `module.`, torch.compile prefixes `_orig_mod.`. timm's own filters know
none of our parameters, so this one lets the model's family fit the state_dict (position
embeddings or relative position tables for another image size, the Microsoft Swin layout:
antismooth.models.structure) and fills the AttnScale/FeatScale parameters that plain weights
lack with their identity value (0), saying so in the log instead of hiding it behind strict=False.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from .structure import fit_state_dict

__all__ = ["ANTI_OVERSMOOTHING_PARAMS", "TIMM_WEIGHTS_FILES", "weights_file", "read_checkpoint", "clean_state_dict",
           "checkpoint_filter_fn", "describe_mismatch", "load_weights", "load_for_finetuning", "WeightsMismatchError"]

_logger = logging.getLogger(__name__)

# Parameter names the paper adds; everything else is a plain ViT/CaiT/Swin key.
ANTI_OVERSMOOTHING_PARAMS = ("attn.lamb", "lamb1", "lamb2")
_WRAPPER_KEYS = ("model", "module", "state_dict", "model_state_dict")
_PREFIXES = ("module.", "_orig_mod.")
# The weights file names of a timm folder (timm.models.save_for_hf), in the order timm's loader prefers them.
TIMM_WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")


class WeightsMismatchError(ValueError):
    """A checkpoint does not fit the model; the message lists every key and shape that differs."""


def weights_file(path: str | Path) -> Path:
    """The weights file itself: `path`, or the model.safetensors (else pytorch_model.bin) of a timm folder."""
    path = Path(path)
    if path.is_dir():
        found = next((path / name for name in TIMM_WEIGHTS_FILES if (path / name).is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{path} is a folder without {' or '.join(TIMM_WEIGHTS_FILES)}: give a weights "
                                    "file, or a folder written by tools/export.py --format timm.")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"No weights file at {path}: check the path.")
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a .safetensors or .pth file (or a timm folder's weights) without executing code (weights_only=True)."""
    path = weights_file(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError… depending on the damage
        raise ValueError(
            f"{path} could not be read as plain PyTorch weights ({type(err).__name__}): it is corrupt, "
            "or it holds pickled objects other than tensors, which are never loaded; re-export it with "
            "tools/export.py or torch.save(model.state_dict(), path)."
        ) from err


def clean_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Unwrap {'model': …}/{'module': …}/{'state_dict': …} and strip DeepSpeed/torch.compile prefixes."""
    state_dict: Mapping[str, Any] = checkpoint
    while True:
        wrapper = next((k for k in _WRAPPER_KEYS if isinstance(state_dict.get(k), Mapping)), None)
        if wrapper is None:
            break
        state_dict = state_dict[wrapper]
    cleaned = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue  # optimizer steps, args and the like that travel beside the weights
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    return cleaned


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """Fit a checkpoint to `model`: unwrap, strip prefixes, let the family fit it (structure.fit_state_dict:
    ViT's pos_embed resampled, Swin's relative position tables resized and the Microsoft layout converted),
    fill missing λ/s with 0."""
    state_dict = fit_state_dict(clean_state_dict(state_dict), model)
    model_state = model.state_dict()
    added = [k for k in model_state if k not in state_dict and k.endswith(ANTI_OVERSMOOTHING_PARAMS)]
    if added:
        _logger.warning(
            "The checkpoint has no AttnScale/FeatScale parameters for %d keys (%s…); they start at 0, "
            "where the model computes exactly the plain model of the checkpoint.", len(added), added[0])
        for key in added:
            state_dict[key] = torch.zeros_like(model_state[key])
    return state_dict


def describe_mismatch(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> str:
    """The keys missing, unexpected and of another shape in `state_dict` against `model`, a few lines; '' when
    they match."""
    model_state = model.state_dict()
    missing = [k for k in model_state if k not in state_dict]
    unexpected = [k for k in state_dict if k not in model_state]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in model_state.items() if k in state_dict and state_dict[k].shape != v.shape]
    lines = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:8]) + (" …" if len(items) > 8 else ""))
    return "\n".join(lines)


def load_weights(model: nn.Module, source: str | Path | Mapping[str, Any], *, filter_fn: bool = True) -> nn.Module:
    """Load a file or a (wrapped) state_dict into `model` with strict=True, or say exactly what differs."""
    checkpoint = read_checkpoint(source) if isinstance(source, (str, Path)) else source
    state_dict = checkpoint_filter_fn(checkpoint, model) if filter_fn else clean_state_dict(checkpoint)
    mismatch = describe_mismatch(state_dict, model)
    if mismatch:
        name = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise WeightsMismatchError(
            f"The checkpoint does not match model {name}; pick the model it was trained as (--model):\n{mismatch}")
    model.load_state_dict(state_dict, strict=True)
    return model


def load_for_finetuning(model: nn.Module, source: str | Path | Mapping[str, Any]) -> nn.Module:
    """Plain weights to fine-tune from: a head of another class count is dropped (the model keeps its new
    head), the family fits the rest (position embedding resampled, Swin's relative position tables resized and
    the Microsoft layout converted: checkpoint_filter_fn), missing AttnScale/FeatScale parameters start at 0."""
    checkpoint = read_checkpoint(source) if isinstance(source, (str, Path)) else source
    state_dict = checkpoint_filter_fn(checkpoint, model)  # first, so that head keys have the model's names
    own = model.state_dict()
    for key in [k for k in state_dict if k.startswith(("head.", "head_dist.")) and k in own]:
        if state_dict[key].shape != own[key].shape:
            _logger.info("Fine-tuning: dropping %s %s, the model has %s classes.", key, tuple(state_dict[key].shape),
                         model.num_classes)
            state_dict[key] = own[key]
    load_weights(model, state_dict, filter_fn=False)
    if isinstance(source, (str, Path)):
        _logger.info("Fine-tuning from %s.", source)
    return model
