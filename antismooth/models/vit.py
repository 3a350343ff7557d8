"""ViT/DeiT family: timm's VisionTransformer with AttnScale attention or FeatScale blocks plugged in.

Names follow the paper: `{vit, attnscale, featscale}_{tiny, small, base}_{6, 12, 24, 36, 48}`,
patch 16, 224 px, MLP ratio 4, qkv bias, LayerNorm eps 1e-6, class token, learned position
embedding, DeiT init. State-dict keys are the official checkpoints' keys (timm-0.4 ViT keys,
plus `blocks.{i}.attn.lamb` or `blocks.{i}.lamb1/lamb2`).
"""
from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer

from .layers import AttnScaleAttention, FeatScaleBlock
from .registry import register_variants
from .structure import FlatStructure, register_structure
from .weights import checkpoint_filter_fn

__all__ = ["VIT_VARIANTS"]

WIDTHS = {
    "tiny": dict(embed_dim=192, num_heads=3),
    "small": dict(embed_dim=384, num_heads=6),
    "base": dict(embed_dim=768, num_heads=12),
}
DEPTHS = (6, 12, 24, 36, 48)
TECHNIQUES = {
    "vit": {},
    "attnscale": dict(attn_layer=AttnScaleAttention),
    "featscale": dict(block_fn=FeatScaleBlock),
}
VIT_VARIANTS = {
    f"{technique}_{width}_{depth}": dict(patch_size=16, depth=depth, mlp_ratio=4, qkv_bias=True,
                                          **WIDTHS[width], **TECHNIQUES[technique])
    for technique in TECHNIQUES for width in WIDTHS for depth in DEPTHS
}


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", **kwargs,
    }


default_cfgs = generate_default_cfgs({name: _cfg() for name in VIT_VARIANTS})


def _create_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        VisionTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


globals().update(register_variants(VIT_VARIANTS, _create_vit, __name__))
register_structure(VisionTransformer, FlatStructure())
