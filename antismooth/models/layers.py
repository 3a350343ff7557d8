"""The paper in code: the DC/HC split, AttnScale and FeatScale.

Wang et al., "Anti-Oversmoothing in Deep Vision Transformers via the Fourier Domain
Analysis", ICLR 2022. Self-attention is a low-pass filter: repeated, it keeps only the
DC component of the tokens (their mean). AttnScale (Sec. 4.1) amplifies the high-pass
part of each attention matrix; FeatScale (Sec. 4.2) re-weights the DC and high-frequency
parts of the attention output per channel. Both families (vit.py, cait.py) use these.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.cait import LayerScaleBlock, TalkingHeadAttn
from timm.models.vision_transformer import Block

__all__ = [
    "split_dc_hc", "featscale", "attnscale_matrix", "attnscale_output",
    "AttnScaleAttention", "AttnScaleTalkingHeadAttn", "FeatScaleBlock", "FeatScaleLayerScaleBlock",
    "set_fused_attn",
]


def _factory_kwargs(kwargs: dict) -> dict:
    """The device/dtype timm passes to every layer, so our parameters are born beside theirs (meta too)."""
    return {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}


def split_dc_hc(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split tokens [..., N, C] into DC(X) = (1/N)·11ᵀX (the token mean) and HC(X) = X − DC(X)."""
    dc = x.mean(dim=-2, keepdim=True)
    return dc, x - dc


def featscale(x: torch.Tensor, scale_dc: torch.Tensor, scale_hc: torch.Tensor) -> torch.Tensor:
    """FeatScale's re-weighted parts s_d⊙DC(X) + s_h⊙HC(X), per channel (paper Sec. 4.2)."""
    dc, hc = split_dc_hc(x)
    return scale_dc * dc + scale_hc * hc


def attnscale_matrix(attn: torch.Tensor, lamb: torch.Tensor) -> torch.Tensor:
    """AttnScale on an explicit attention matrix [B, H, N, N]: D + (1+λ_h)(A − D), D = 11ᵀ/N (Sec. 4.1)."""
    dc = 1.0 / attn.shape[-1]
    return dc + (attn - dc) * (1.0 + lamb.view(1, -1, 1, 1))


def attnscale_output(attn_v: torch.Tensor, v: torch.Tensor, lamb: torch.Tensor) -> torch.Tensor:
    """(D + (1+λ)(A − D))·V from A·V alone: (1+λ)·AV − λ·mean_tokens(V), exact for any A.

    This is what lets AttnScale run on fused SDPA kernels that never materialise A.
    attn_v and v are [B, H, N, head_dim]; lamb is [H].
    """
    return _AttnScaleOutput.apply(attn_v, v, lamb)


class _AttnScaleOutput(torch.autograd.Function):
    """attnscale_output with a hand-written backward that keeps only AV (which SDPA keeps anyway)
    and mean(V): autograd would also keep AV − mean(V), one more activation per block."""

    @staticmethod
    def forward(ctx, attn_v: torch.Tensor, v: torch.Tensor, lamb: torch.Tensor) -> torch.Tensor:
        mean_v = v.mean(dim=-2, keepdim=True)
        lam = lamb.view(1, -1, 1, 1).to(attn_v.dtype)
        ctx.save_for_backward(attn_v, mean_v, lamb)
        ctx.num_tokens = v.shape[-2]
        return attn_v + lam * (attn_v - mean_v)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn_v, mean_v, lamb = ctx.saved_tensors
        lam = lamb.view(1, -1, 1, 1).to(grad.dtype)
        grad_attn_v = grad * (1 + lam)
        grad_v = (-lam * grad.sum(dim=-2, keepdim=True) / ctx.num_tokens).expand_as(grad)
        grad_lamb = (grad * (attn_v - mean_v)).sum(dim=(0, 2, 3), dtype=torch.promote_types(grad.dtype, torch.float32))
        return grad_attn_v, grad_v, grad_lamb.to(lamb.dtype)


class AttnScaleAttention(Attention):
    """timm's multi-head self-attention with AttnScale: a learned λ per head, initialised to 0.

    The fused path (SDPA + attnscale_output) is used unless attention dropout is active in
    training, where the official code drops out the rescaled matrix itself: then, and when
    `fused_attn` is switched off, the explicit matrix form runs.
    """

    def __init__(self, dim: int, num_heads: int = 8, **kwargs) -> None:
        super().__init__(dim, num_heads=num_heads, **kwargs)
        self.lamb = nn.Parameter(torch.zeros(num_heads, **_factory_kwargs(kwargs)))

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("AttnScale is defined for full self-attention; attention masks are not supported.")
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)

        if self.fused_attn and not (self.training and self.attn_drop.p > 0):
            x = attnscale_output(F.scaled_dot_product_attention(q, k, v), v, self.lamb)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            x = self.attn_drop(attnscale_matrix(attn, self.lamb)) @ v

        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.proj(self.norm(x))
        return self.proj_drop(x)


class AttnScaleTalkingHeadAttn(TalkingHeadAttn):
    """CaiT's talking-heads attention with AttnScale after the post-softmax head mixing.

    Talking heads needs the attention matrix anyway, so this always uses the explicit form.
    """

    def __init__(self, dim: int, num_heads: int = 8, **kwargs) -> None:
        super().__init__(dim, num_heads=num_heads, **kwargs)
        self.lamb = nn.Parameter(torch.zeros(num_heads, **_factory_kwargs(kwargs)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(dim=-1)
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = self.attn_drop(attnscale_matrix(attn, self.lamb))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class FeatScaleBlock(Block):
    """timm's ViT block with FeatScale on the attention branch; s_d (`lamb1`) and s_h (`lamb2`) start at 0."""

    def __init__(self, dim: int, *args, **kwargs) -> None:
        super().__init__(dim, *args, **kwargs)
        self.lamb1 = nn.Parameter(torch.zeros(dim, **_factory_kwargs(kwargs)))
        self.lamb2 = nn.Parameter(torch.zeros(dim, **_factory_kwargs(kwargs)))

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        x_attn = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        # The official ViT block adds the re-weighted parts twice; its checkpoints were trained so.
        x_attn = x_attn + 2 * featscale(x_attn, self.lamb1, self.lamb2)
        x = x + self.drop_path1(self.ls1(x_attn))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class FeatScaleLayerScaleBlock(LayerScaleBlock):
    """CaiT's LayerScale block with FeatScale on the attention branch, before LayerScale's γ₁."""

    def __init__(self, dim: int, *args, **kwargs) -> None:
        super().__init__(dim, *args, **kwargs)
        self.lamb1 = nn.Parameter(torch.zeros(dim, **_factory_kwargs(kwargs)))
        self.lamb2 = nn.Parameter(torch.zeros(dim, **_factory_kwargs(kwargs)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_attn = self.attn(self.norm1(x))
        x_attn = x_attn + featscale(x_attn, self.lamb1, self.lamb2)  # once in CaiT, as officially
        x = x + self.drop_path(self.gamma_1 * x_attn)
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


def set_fused_attn(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch every fused-capable attention in `model` between SDPA and the explicit matrix form."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = enabled
    return model
