"""Entrypoints from data: each model family is a table of variants, each variant one timm name."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch.nn as nn
from timm.models import register_model

__all__ = ["register_variants"]


def register_variants(
        variants: Mapping[str, Mapping[str, Any]],
        create: Callable[..., nn.Module],
        module: str,
) -> dict[str, Callable[..., nn.Module]]:
    """Register one timm entrypoint per variant: `name(pretrained=False, **kwargs)` builds it.

    Keyword arguments given to timm.create_model override the variant's (img_size, num_classes…).
    `module` must be the caller's __name__ so timm finds the caller's `default_cfgs`.
    """
    entrypoints = {}
    for name, model_args in variants.items():
        def entrypoint(pretrained: bool = False, _name: str = name, _args: Mapping = model_args, **kwargs) -> nn.Module:
            return create(_name, pretrained, **dict(_args, **kwargs))
        entrypoint.__name__ = entrypoint.__qualname__ = name
        entrypoint.__module__ = module
        entrypoint.__doc__ = f"{name}: " + ", ".join(f"{k}={getattr(v, '__name__', v)}" for k, v in model_args.items())
        entrypoints[name] = register_model(entrypoint)
    return entrypoints
