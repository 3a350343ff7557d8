"""Model families registered with timm: ViT/DeiT (vit.py) and CaiT (cait.py); the paper's layers in layers.py."""
from .cait import CAIT_VARIANTS
from .layers import (AttnScaleAttention, AttnScaleTalkingHeadAttn, FeatScaleBlock, FeatScaleLayerScaleBlock,
                     attnscale_matrix, attnscale_output, featscale, set_fused_attn, split_dc_hc)
from .vit import VIT_VARIANTS
from .weights import (WeightsMismatchError, checkpoint_filter_fn, clean_state_dict, load_for_finetuning, load_weights,
                      read_checkpoint)

MODEL_NAMES = tuple(VIT_VARIANTS) + tuple(CAIT_VARIANTS)

__all__ = [
    "MODEL_NAMES", "VIT_VARIANTS", "CAIT_VARIANTS",
    "AttnScaleAttention", "AttnScaleTalkingHeadAttn", "FeatScaleBlock", "FeatScaleLayerScaleBlock",
    "attnscale_matrix", "attnscale_output", "featscale", "set_fused_attn", "split_dc_hc",
    "WeightsMismatchError", "checkpoint_filter_fn", "clean_state_dict", "load_for_finetuning", "load_weights",
    "read_checkpoint",
]
