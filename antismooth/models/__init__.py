"""Model families registered with timm: ViT/DeiT (vit.py), CaiT (cait.py) and Swin (swin.py); the paper's layers
in layers.py; what the engine may know of any of them in structure.py."""
from . import structure
from .cait import CAIT_VARIANTS
from .layers import (AttnScaleAttention, AttnScaleTalkingHeadAttn, FeatScaleBlock, FeatScaleLayerScaleBlock,
                     attnscale_matrix, attnscale_output, featscale, set_fused_attn, split_dc_hc)
from .swin import SWIN_VARIANTS, TIMM_SWIN_NAMES, AttnScaleWindowAttention, FeatScaleSwinBlock
from .vit import VIT_VARIANTS
from .weights import (WeightsMismatchError, checkpoint_filter_fn, clean_state_dict, load_for_finetuning, load_weights,
                      read_checkpoint)

MODEL_NAMES = tuple(VIT_VARIANTS) + tuple(CAIT_VARIANTS) + TIMM_SWIN_NAMES + tuple(SWIN_VARIANTS)

__all__ = [
    "MODEL_NAMES", "VIT_VARIANTS", "CAIT_VARIANTS", "SWIN_VARIANTS", "TIMM_SWIN_NAMES", "structure",
    "AttnScaleAttention", "AttnScaleTalkingHeadAttn", "FeatScaleBlock", "FeatScaleLayerScaleBlock",
    "AttnScaleWindowAttention", "FeatScaleSwinBlock",
    "attnscale_matrix", "attnscale_output", "featscale", "set_fused_attn", "split_dc_hc",
    "WeightsMismatchError", "checkpoint_filter_fn", "clean_state_dict", "load_for_finetuning", "load_weights",
    "read_checkpoint",
]
