"""Swin family: timm's SwinTransformer with AttnScale in its window attention or FeatScale in its blocks.

Names: `{attnscale_swin, featscale_swin}_{tiny, small, base}_patch4_window7_224` (timm's Swin-T/S/B:
depths 2-2-6-2 and 2-2-18-2, widths 96 and 128), the plain `swin_*_patch4_window7_224` being timm's own,
and deeper variants in the spirit of the ViT zoo: `{swin, attnscale_swin, featscale_swin}_{small, base}_{42,
60}_patch4_window7_224`, stage 3 of 36 and 54 blocks (42 and 60 in all). The official repository ships the
small variant only (swin/configs/{attnscale,featscale}_small_patch4_window7_224.yaml, drop path 0.3).

As in the official swin/models/swin_attnscale.py and swin_featscale.py:
- AttnScale acts on each window's attention matrix after the softmax, so after the relative position bias
  and the shifted-window mask: D + (1 + λ_h)(A − D), D uniform over the window's N tokens, λ per head per
  block (`attn.lamb`).
- FeatScale acts on the attention branch after window_reverse and the roll back, on the whole image's
  H·W tokens (DC = their mean), added once: x + s_d⊙DC(x) + s_h⊙HC(x) (`lamb1`, `lamb2` on the block).

timm's SwinTransformerStage builds its blocks and each block its WindowAttention with no hook for another
class, so the model is timm's, built as timm builds it, and each block (FeatScale) or attention (AttnScale)
becomes our subclass in place afterwards: every timm submodule, buffer, init and parameter name is kept and
only the paper's parameters are added. State-dict keys are timm's (`layers.{i}.blocks.{j}.attn.qkv.weight`);
the official (Microsoft) layout converts on loading, as timm's own Swin filter does.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import use_fused_attn
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, WindowAttention
from timm.models.swin_transformer import checkpoint_filter_fn as timm_swin_filter

from .layers import attnscale_matrix, attnscale_output, featscale
from .registry import register_variants
from .structure import ModelStructure, TokenGrid, register_structure
from .weights import checkpoint_filter_fn

__all__ = ["SWIN_VARIANTS", "TIMM_SWIN_NAMES", "AttnScaleWindowAttention", "FeatScaleSwinBlock",
           "AntiSmoothSwinTransformer", "SwinStructure"]


# --- layers ---------------------------------------------------------------------------------------------

class AttnScaleWindowAttention(WindowAttention):
    """timm's window attention (relative position bias, shifted-window mask) with AttnScale, λ per head from 0.

    Fused path: SDPA with the bias and the mask as one additive mask, then attnscale_output's identity
    (1+λ)·AV − λ·mean_window(V). Explicit path (fused_attn off, or attention dropout in training, where the
    official code drops out the rescaled matrix): the official matrix form. Fused unless TIMM_FUSED_ATTN=0
    (timm keeps its own plain Swin on the explicit path unless TIMM_FUSED_ATTN=2).
    """

    def __init__(self, dim: int, num_heads: int, **kwargs: Any) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self._add_lambda()

    @classmethod
    def adopt(cls, module: WindowAttention) -> "AttnScaleWindowAttention":
        """Turn a built timm WindowAttention into this class in place, λ = 0 (the same function until trained)."""
        module.__class__ = cls
        module._add_lambda()
        return module

    def _add_lambda(self) -> None:
        weight = self.qkv.weight
        self.lamb = nn.Parameter(torch.zeros(self.num_heads, device=weight.device, dtype=weight.dtype))
        self.fused_attn = use_fused_attn()

    def _additive_mask(self, mask: Optional[torch.Tensor], num_windows_batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The relative position bias [1, H, N, N], plus the shifted-window mask [nW, N, N] as SDPA takes it
        ([B·nW, H, N, N], window-major within each image as window_partition orders them)."""
        bias = self._get_rel_pos_bias()
        if mask is not None:
            num_windows, n = mask.shape[0], mask.shape[-1]
            bias = (bias + mask.unsqueeze(1)).unsqueeze(0).expand(num_windows_batch // num_windows, -1, -1, -1, -1)
            bias = bias.reshape(num_windows_batch, self.num_heads, n, n)
        return bias.to(dtype)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)

        if self.fused_attn and not (self.training and self.attn_drop.p > 0):
            attn_v = F.scaled_dot_product_attention(q, k, v, attn_mask=self._additive_mask(mask, B_, q.dtype))
            # D = 1/N over all N window tokens, masked ones included, as the official code has it (a −λ/N
            # leak onto the positions the shift mask hides): the fused identity holds exactly for that D.
            x = attnscale_output(attn_v, v, self.lamb)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + self._get_rel_pos_bias()
            if mask is not None:
                num_windows = mask.shape[0]
                attn = attn.view(-1, num_windows, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, self.num_heads, N, N)
            attn = attnscale_matrix(self.softmax(attn), self.lamb)  # after bias, mask and softmax
            x = self.attn_drop(attn) @ v

        x = x.transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))


class FeatScaleSwinBlock(SwinTransformerBlock):
    """timm's Swin block with FeatScale on the attention branch over the whole image's tokens, added once;
    s_d (`lamb1`) and s_h (`lamb2`) start at 0."""

    def __init__(self, dim: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(dim, *args, **kwargs)
        self._add_scales()

    @classmethod
    def adopt(cls, block: SwinTransformerBlock) -> "FeatScaleSwinBlock":
        """Turn a built timm SwinTransformerBlock into this class in place, s_d = s_h = 0."""
        block.__class__ = cls
        block._add_scales()
        return block

    def _add_scales(self) -> None:
        weight = self.norm1.weight
        self.lamb1 = nn.Parameter(torch.zeros(self.dim, device=weight.device, dtype=weight.dtype))
        self.lamb2 = nn.Parameter(torch.zeros(self.dim, device=weight.device, dtype=weight.dtype))

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        x = super()._attn(x)  # [B, H, W, C]: after window_reverse, the crop of any padding and the roll back
        B, H, W, C = x.shape
        return x + featscale(x.reshape(B, H * W, C), self.lamb1, self.lamb2).view(B, H, W, C)


# --- the model ------------------------------------------------------------------------------------------

class AntiSmoothSwinTransformer(SwinTransformer):
    """timm's SwinTransformer whose attentions are `attn_layer` and blocks `block_fn` (each a subclass of
    timm's with an `adopt` classmethod), turned so after timm built and initialised them."""

    def __init__(self, *args: Any, attn_layer: Optional[type] = None, block_fn: Optional[type] = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for stage in self.layers:
            for block in stage.blocks:
                if block_fn is not None:
                    block_fn.adopt(block)
                if attn_layer is not None:
                    attn_layer.adopt(block.attn)


class SwinStructure(ModelStructure):
    """How the engine sees a Swin: the blocks of every stage in order, each stage's `blocks` Sequential
    checkpointed on its own (a segment never spans a patch merging), each block's own grid and window, the
    depth of stage 3 (the stage deeper variants grow), and timm's Swin filter for checkpoints."""

    def block_sequences(self, model: nn.Module) -> list[tuple[nn.Module, str]]:
        return [(stage, "blocks") for stage in model.layers]

    def body(self, model: nn.Module) -> nn.Module:
        return model.layers

    def token_grids(self, model: nn.Module) -> list[TokenGrid]:
        return [TokenGrid(grid=tuple(block.input_resolution), window=tuple(block.window_size),
                          shift=tuple(block.shift_size), stage=i)
                for i, stage in enumerate(model.layers) for block in stage.blocks]

    def depth(self, model: nn.Module) -> int:
        return len(model.layers[self._deep_stage(model)].blocks)

    def depth_kwargs(self, model: nn.Module, depth: int) -> dict[str, Any]:
        depths = [len(stage.blocks) for stage in model.layers]
        depths[self._deep_stage(model)] = depth
        return {"depths": tuple(depths)}

    @staticmethod
    def _deep_stage(model: nn.Module) -> int:
        return max(0, len(model.layers) - 2)

    def fit_state_dict(self, state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        # timm's: the Microsoft layout (downsample at a stage's end, `head.`) to timm's, relative position
        # tables resized to the model's windows, patch embedding resampled, persistent index/mask buffers dropped.
        return timm_swin_filter(state_dict, model)


register_structure(SwinTransformer, SwinStructure())


# --- variants -------------------------------------------------------------------------------------------

WIDTHS = {
    "tiny": dict(embed_dim=96, num_heads=(3, 6, 12, 24)),
    "small": dict(embed_dim=96, num_heads=(3, 6, 12, 24)),
    "base": dict(embed_dim=128, num_heads=(4, 8, 16, 32)),
}
# (width, blocks in all or "" for timm's depth): stage depths.
DEPTHS = {
    ("tiny", ""): (2, 2, 6, 2),
    ("small", ""): (2, 2, 18, 2),
    ("base", ""): (2, 2, 18, 2),
    ("small", "42"): (2, 2, 36, 2),
    ("small", "60"): (2, 2, 54, 2),
    ("base", "42"): (2, 2, 36, 2),
    ("base", "60"): (2, 2, 54, 2),
}
TECHNIQUES = {
    "swin": {},
    "attnscale_swin": dict(attn_layer=AttnScaleWindowAttention),
    "featscale_swin": dict(block_fn=FeatScaleSwinBlock),
}


def _name(technique: str, width: str, blocks: str) -> str:
    return f"{technique}_{width}{'_' + blocks if blocks else ''}_patch4_window7_224"


# timm's own plain Swins, part of the zoo but registered by timm.
TIMM_SWIN_NAMES = tuple(_name("swin", width, blocks) for width, blocks in DEPTHS if not blocks)
SWIN_VARIANTS = {
    _name(technique, width, blocks): dict(patch_size=4, window_size=7, depths=depths, **WIDTHS[width],
                                          **TECHNIQUES[technique])
    for technique in TECHNIQUES for (width, blocks), depths in DEPTHS.items()
    if _name(technique, width, blocks) not in TIMM_SWIN_NAMES
}


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.9, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head.fc", "license": "mit", **kwargs,
    }


default_cfgs = generate_default_cfgs({name: _cfg() for name in SWIN_VARIANTS})


def _create_swin(variant: str, pretrained: bool = False, **kwargs: Any) -> AntiSmoothSwinTransformer:
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs.get("depths", (1, 1, 3, 1))))))
    return build_model_with_cfg(
        AntiSmoothSwinTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


globals().update(register_variants(SWIN_VARIANTS, _create_swin, __name__))
