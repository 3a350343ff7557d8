"""The seam: what the engine may know of any model, so that nothing outside antismooth.models reads
`model.blocks` or `model.patch_embed`.

The engine needs five things of a model: its transformer blocks in forward order (a hierarchical
model's blocks of every stage, in order), its input size, the token grid each block sees (the
spectral probe lays tokens back on it; Swin's stages have different grids and attend per window),
where its blocks sit so that activation checkpointing can wrap them (the nn.Sequentials that hold
them: one for ViT/CaiT, one per stage for Swin), and the create_model arguments that change its
depth (the memory planner measures a model at 1 and 2 blocks). Fitting a checkpoint to the model
(position embeddings, relative position tables, another layout of the same family) is the family's
business too, so weights.py asks here.

Each family registers one `ModelStructure` for its class (`register_structure(SwinTransformer, ...)`);
`structure_of(model)` finds it through the class's MRO. Models of unregistered classes that have a
`blocks` sequence and a `patch_embed` (timm's ViT-likes) get the flat default. Adding a family is
then one file in this package: its classes, its variants, and its ModelStructure.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

__all__ = ["TokenGrid", "ModelStructure", "FlatStructure", "register_structure", "structure_of", "blocks",
           "input_size", "token_grids", "block_sequences", "body", "depth", "depth_kwargs", "fit_state_dict"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenGrid:
    """How one block's output lays out its tokens: `grid` patch tokens (h, w) in row-major order, after any
    class/register tokens (3-D [B, prefix + h·w, C]) or as an NHWC map (4-D [B, h, w, C], Swin); attention
    mixes tokens within `window` (the whole grid for global attention) after a cyclic `shift`; `stage` is the
    block's stage in a hierarchical model (0 for single-stage ones)."""
    grid: tuple[int, int]
    window: tuple[int, int]
    shift: tuple[int, int] = (0, 0)
    stage: int = 0

    @property
    def windowed(self) -> bool:
        """True when attention is local: the window is smaller than the grid."""
        return tuple(self.window) != tuple(self.grid)

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The h·w patch tokens [B, h·w, C] of a block output; class and register tokens come first in timm."""
        h, w = self.grid
        if x.ndim == 4 and tuple(x.shape[1:3]) == (h, w):
            return x.flatten(1, 2)
        if x.ndim != 3 or x.shape[1] < h * w:
            raise ValueError(f"expected block outputs [batch, tokens >= {h * w}, channels] or [batch, {h}, {w}, "
                             f"channels] for a {h}x{w} patch grid, got {tuple(x.shape)}.")
        return x[:, x.shape[1] - h * w:]

    def window_tokens(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """Patch tokens [B, h·w, C] regrouped as the windows the block's attention mixed, [B·nW, wh·ww, C]
        (shifted as the block shifts them); None when the window does not tile the grid (timm pads those)."""
        (h, w), (wh, ww) = self.grid, self.window
        if h % wh or w % ww:
            return None
        x = tokens.unflatten(1, (h, w))
        if any(self.shift):
            x = torch.roll(x, shifts=(-self.shift[0], -self.shift[1]), dims=(1, 2))
        x = x.unflatten(1, (h // wh, wh)).unflatten(3, (w // ww, ww))   # [B, h/wh, wh, w/ww, ww, C]
        return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, x.shape[-1])


class ModelStructure:
    """What the engine may know of one model family. The default describes a flat ViT-like model: one
    `blocks` nn.Sequential, a `patch_embed` with `img_size` and `grid_size`, a `depth` constructor argument;
    families override what differs."""

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """Every transformer block, in forward order."""
        return [block for parent, name in self.block_sequences(model) for block in getattr(parent, name)]

    def block_sequences(self, model: nn.Module) -> list[tuple[nn.Module, str]]:
        """(parent, attribute) of each nn.Sequential of blocks, in forward order: what activation checkpointing
        replaces (by a Sequential with the same children, so that state_dict keys stay the same)."""
        sequence = getattr(model, "blocks", None)
        if not isinstance(sequence, nn.Sequential):
            raise ValueError(f"{type(model).__name__} has no `blocks` sequence and no registered structure "
                             "(antismooth.models.structure.register_structure).")
        return [(model, "blocks")]

    def body(self, model: nn.Module) -> nn.Module:
        """The module whose forward runs every block: its input is the stem's output, its output the head's
        input (the planner's markers of the backward's phases hook it)."""
        (parent, name), = self.block_sequences(model)
        return getattr(parent, name)

    def input_size(self, model: nn.Module) -> tuple[int, int]:
        """The (height, width) of the images the model takes."""
        return tuple(int(s) for s in model.patch_embed.img_size)

    def token_grids(self, model: nn.Module) -> list[TokenGrid]:
        """The TokenGrid of each block's output, one per block in forward order."""
        grid = tuple(int(g) for g in model.patch_embed.grid_size)
        return [TokenGrid(grid=grid, window=grid)] * len(self.blocks(model))

    def depth(self, model: nn.Module) -> int:
        """The number of blocks `depth_kwargs` sets (ViT: all of them)."""
        return len(self.blocks(model))

    def depth_kwargs(self, model: nn.Module, depth: int) -> dict[str, Any]:
        """timm.create_model arguments that build this model with `depth` blocks where its depth grows."""
        return {"depth": depth}

    def fit_state_dict(self, state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """A clean state_dict (no wrappers or prefixes) of this family made to fit `model`: another image size,
        another layout of the same architecture. The default changes nothing."""
        return state_dict


class FlatStructure(ModelStructure):
    """The default: one `blocks` sequence, timm's `patch_embed`, a `depth` argument (ViT/DeiT, CaiT); a learned
    position embedding is resampled to the model's patch grid."""

    def fit_state_dict(self, state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        if "pos_embed" in state_dict and getattr(model, "pos_embed", None) is not None:
            state_dict["pos_embed"] = _resample_pos_embed(state_dict["pos_embed"], model)
        return state_dict


def _resample_pos_embed(pos_embed: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Interpolate a learned position embedding to the model's patch grid, keeping prefix tokens."""
    target = model.pos_embed
    if pos_embed.shape == target.shape:
        return pos_embed
    grid = tuple(model.patch_embed.grid_size)
    num_prefix = target.shape[1] - math.prod(grid)  # ViT: 1 (cls), CaiT: 0
    old_grid = int(math.isqrt(pos_embed.shape[1] - num_prefix))
    _logger.info("Resampling pos_embed from a %dx%d to a %s grid.", old_grid, old_grid, grid)
    return resample_abs_pos_embed(pos_embed, new_size=grid, old_size=(old_grid, old_grid),
                                  num_prefix_tokens=num_prefix)


_STRUCTURES: dict[type, ModelStructure] = {}
_FLAT = FlatStructure()


def register_structure(cls: type, structure: ModelStructure) -> ModelStructure:
    """Say how the engine sees models of class `cls` (and its subclasses, unless they register their own)."""
    _STRUCTURES[cls] = structure
    return structure


def structure_of(model: nn.Module) -> ModelStructure:
    """The structure registered for the model's class (the nearest in its MRO), else the flat default for a
    model with `blocks` and `patch_embed`. A DeepSpeed engine or other wrapper with `.module` is unwrapped."""
    model = _unwrap(model)
    for cls in type(model).__mro__:
        if cls in _STRUCTURES:
            return _STRUCTURES[cls]
    if isinstance(getattr(model, "blocks", None), nn.Sequential) and hasattr(model, "patch_embed"):
        return _FLAT
    raise ValueError(f"antismooth does not know how to see inside {type(model).__name__}: it has no `blocks` "
                     "sequence and `patch_embed`, and no structure is registered for it (give the model itself, "
                     "not a wrapper, or register one with antismooth.models.structure.register_structure).")


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DeepSpeed engine (or any wrapper holding it as `.module`)."""
    while not any(cls in _STRUCTURES for cls in type(model).__mro__) and isinstance(
            getattr(model, "module", None), nn.Module):
        model = model.module
    return model


# Shorthands: structure_of(model).<method>(model).

def blocks(model: nn.Module) -> list[nn.Module]:
    """Every transformer block of the model, in forward order."""
    return structure_of(model).blocks(_unwrap(model))


def block_sequences(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of each nn.Sequential of blocks, in forward order."""
    return structure_of(model).block_sequences(_unwrap(model))


def body(model: nn.Module) -> nn.Module:
    """The module whose forward runs every block."""
    return structure_of(model).body(_unwrap(model))


def input_size(model: nn.Module) -> tuple[int, int]:
    """The (height, width) of the model's input images."""
    return structure_of(model).input_size(_unwrap(model))


def token_grids(model: nn.Module) -> list[TokenGrid]:
    """The TokenGrid of each block, in forward order."""
    return structure_of(model).token_grids(_unwrap(model))


def depth(model: nn.Module) -> int:
    """The number of blocks depth_kwargs sets."""
    return structure_of(model).depth(_unwrap(model))


def depth_kwargs(model: nn.Module, n: int) -> dict[str, Any]:
    """timm.create_model arguments that rebuild the model with `n` blocks where its depth grows."""
    return structure_of(model).depth_kwargs(_unwrap(model), n)


def fit_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The family's own fitting of a clean state_dict to `model` (see ModelStructure.fit_state_dict)."""
    return structure_of(model).fit_state_dict(state_dict, _unwrap(model))
