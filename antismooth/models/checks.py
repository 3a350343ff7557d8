"""The model a user asks for, checked before any work: its name, its --model-kwargs and its --input-size.

Written once for every command that builds a model from flags (pretrain.py's start-up, tools/plan.py). The model is
built on the meta device: no memory and no initialisation, so a 48-block model costs milliseconds, and whatever
timm or the family rejects (an assertion such as "dim should be divisible by num_heads", an argument the model
does not take) becomes one sentence naming the flag and the fix.
"""
from __future__ import annotations

import difflib
from typing import Any, Optional

import timm
import torch
import torch.nn as nn

from ..settings import ConfigError

__all__ = ["check_model_name", "check_model", "patch_size"]


def check_model_name(name: str) -> None:
    """A registered name, or ConfigError with the closest registered names."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else " See the model zoo in the README (docs/models.md)."
        raise ConfigError(f"Unknown model {name!r}.{hint}")


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in kwargs.items())


def check_model(name: str, kwargs: dict[str, Any], input_size: Optional[int] = None, **fixed: Any) -> nn.Module:
    """The model `name` built on the meta device with `kwargs` (--model-kwargs), `input_size` (--input-size) and
    `fixed` (arguments the program sets itself, e.g. num_classes); ConfigError when it cannot be built or its input
    size leaves pixels out of every patch."""
    check_model_name(name)
    args = dict(kwargs, **fixed)
    if input_size is not None:
        if input_size < 1:
            raise ConfigError(f"--input-size must be a positive number of pixels, got {input_size}.")
        args["img_size"] = input_size
    try:
        with torch.device("meta"):
            model = timm.create_model(name, **args)
    except (AssertionError, TypeError, ValueError, RuntimeError, KeyError, ZeroDivisionError) as err:
        given = [f"--model-kwargs {_kwargs_text(kwargs)}"] if kwargs else []
        given += [f"--input-size {input_size}"] if input_size is not None else []
        what = " with " + " and ".join(given) if given else ""
        reason = str(err).strip().rstrip(".") or type(err).__name__
        raise ConfigError(f"{name}{what} cannot be built: {reason}. Fix {' or '.join(g.split()[0] for g in given) or 'the model name'}"
                          " (docs/models.md lists each model's arguments).") from None
    check_input_size(name, model, input_size)
    return model


def patch_size(model: nn.Module) -> Optional[tuple[int, int]]:
    """The (height, width) of the model's patches; None for a model without a patch embedding."""
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "patch_size", None)
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)


def check_input_size(name: str, model: nn.Module, input_size: Optional[int]) -> None:
    """Refuse an image size that is not a multiple of the patch size: timm's patch embedding would silently drop
    the last rows and columns of every image."""
    patch = patch_size(model)
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if patch is None or img is None:
        return
    img = (int(img), int(img)) if isinstance(img, int) else tuple(int(s) for s in img)
    for size, p in zip(img, patch, strict=True):
        if size % p:
            flag = f"--input-size {input_size}" if input_size is not None else f"the image size {size}"
            lower, upper = size - size % p, size - size % p + p
            raise ConfigError(f"{flag} is not a multiple of {name}'s patch size {p}: the last {size % p} rows and "
                              f"columns of every image would never be seen; use {lower or upper}"
                              f"{f' or {upper}' if lower else ''}.")
