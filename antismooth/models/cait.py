"""CaiT family: timm's Cait (talking-heads attention, class-attention blocks, LayerScale)
with AttnScale attention or FeatScale blocks in the self-attention stage.

Names: `{cait, attnscale_cait, featscale_cait}_{XXS24, XXS36, XS24, S24, S36, M36, M48}` at the
official CaiT resolutions (384 px, 448 for M48), and the `_224` variants the paper fine-tunes.
The class-attention blocks stay plain, as in the official code.
"""
from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.cait import Cait

from .layers import AttnScaleTalkingHeadAttn, FeatScaleLayerScaleBlock
from .registry import register_variants
from .structure import FlatStructure, register_structure
from .weights import checkpoint_filter_fn

__all__ = ["CAIT_VARIANTS"]

# (embed_dim, depth, num_heads, LayerScale init, image size) of the official CaiT models.
SIZES = {
    "XXS24": (192, 24, 4, 1e-5, 384),
    "XXS24_224": (192, 24, 4, 1e-5, 224),
    "XXS36": (192, 36, 4, 1e-5, 384),
    "XXS36_224": (192, 36, 4, 1e-5, 224),
    "XS24": (288, 24, 6, 1e-5, 384),
    "S24": (384, 24, 8, 1e-5, 384),
    "S24_224": (384, 24, 8, 1e-5, 224),
    "S36": (384, 36, 8, 1e-6, 384),
    "M36": (768, 36, 16, 1e-6, 384),
    "M48": (768, 48, 16, 1e-6, 448),
}
TECHNIQUES = {
    "cait": {},
    "attnscale_cait": dict(attn_block=AttnScaleTalkingHeadAttn),
    "featscale_cait": dict(block_layers=FeatScaleLayerScaleBlock),
}
CAIT_VARIANTS = {
    f"{technique}_{size}": dict(img_size=img, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads,
                                init_values=init, **TECHNIQUES[technique])
    for technique in TECHNIQUES for size, (dim, depth, heads, init, img) in SIZES.items()
}


def _cfg(img_size: int, **kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, img_size, img_size), "pool_size": None,
        "crop_pct": 1.0 if img_size > 224 else 0.875, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", **kwargs,
    }


default_cfgs = generate_default_cfgs({name: _cfg(args["img_size"]) for name, args in CAIT_VARIANTS.items()})


def _create_cait(variant: str, pretrained: bool = False, **kwargs: Any) -> Cait:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        Cait, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


globals().update(register_variants(CAIT_VARIANTS, _create_cait, __name__))
register_structure(Cait, FlatStructure())
