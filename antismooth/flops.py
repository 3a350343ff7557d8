"""Model FLOPs of a training image and MFU (model FLOPs utilisation) against a GPU's dense bf16 peak.

FLOPs are counted by torch's FlopCounterMode, which counts matrix products, convolutions and
attention kernels at 2 FLOPs per multiply-add (fvcore and the DeiT paper count 1: their "4.6 GFLOPs"
for ViT-S/16 at 224 px are multiply-adds, 9.2 GFLOPs here). Elementwise work (softmax, norms, GELU,
AttnScale's rescaling) is not counted, by the same convention.

A training image costs 3 × its forward (the backward computes two products per forward product),
as PaLM's MFU defines it (Chowdhery et al. 2022, App. B): activation checkpointing's recompute in
the backward is work the hardware does but not model FLOPs, so it lowers MFU instead of being counted.
"""
from __future__ import annotations

from typing import Optional

import timm
import torch
import torch.nn as nn
from torch.utils.flop_counter import (FlopCounterMode, flop_registry, register_flop_formula, sdpa_backward_flop_count,
                                      sdpa_flop_count)

from .models import structure

__all__ = ["PEAK_BF16_TFLOPS", "TRAINING_FLOPS_PER_FORWARD", "flop_counter", "forward_flops", "training_flops_per_image", "peak_tflops", "mfu"]

# Backward ≈ 2 × forward: each product Y = XW needs dX = dY·Wᵀ and dW = Xᵀ·dY.
TRAINING_FLOPS_PER_FORWARD = 3

# Dense (not 2:4-sparse) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s, matched as
# substrings of torch.cuda.get_device_name() in this order (so "H100 PCIe" before "H100", "GH200" before "H200").
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),        # SXM5: "NVIDIA H100 80GB HBM3"
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),        # SXM4 and PCIe alike
    ("A800", 312.0),
    ("L40S", 362.0),
)


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                              **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch counts SDPA's CUDA kernels (flash, memory-efficient, cuDNN) but not its CPU flash kernel, which CPU
# forwards run: without these two the same ViT-S counts 8 % fewer FLOPs on a CPU than on a GPU or the meta
# device. The same formulas as torch's for the CUDA kernels.
_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops}
for _op, _formula in _CPU_ATTENTION.items():
    if _op not in flop_registry:
        register_flop_formula(_op)(_formula)


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode: `with flop_counter() as counter: ...`, then `counter.get_total_flops()`."""
    return FlopCounterMode(display=False)


def forward_flops(model: nn.Module, images: torch.Tensor) -> int:
    """FLOPs of one forward of `model` on `images` (gradients on: the forward as trained, the recompute
    of checkpointed blocks happens only in a backward, which this does not run)."""
    with flop_counter() as counter:
        model(images)
    return counter.get_total_flops()


def training_flops_per_image(model: str | nn.Module, img_size: Optional[int] = None, **model_kwargs) -> float:
    """Model FLOPs of training on one image: 3 × one forward of a batch of one. A name is built on the meta
    device (only shapes, no memory or compute) with `img_size` and `model_kwargs` as timm.create_model takes
    them; a module runs at its own image size on its own device."""
    if isinstance(model, str):
        kwargs = dict(model_kwargs, **({"img_size": img_size} if img_size else {}))
        with torch.device("meta"):
            model = timm.create_model(model, **kwargs)
    param = next(model.parameters())
    height, width = structure.input_size(model)
    images = torch.zeros(1, 3, height, width, device=param.device, dtype=param.dtype)
    return float(TRAINING_FLOPS_PER_FORWARD * forward_flops(model, images))


def peak_tflops(device_name: str) -> Optional[float]:
    """The dense bf16 peak of a GPU named as torch.cuda.get_device_name() names it; None when unknown."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def mfu(images_per_second: float, flops_per_image: float, peak: float) -> float:
    """Model FLOPs utilisation of one device: achieved model FLOP/s over its peak (`peak` in TFLOP/s)."""
    return images_per_second * flops_per_image / (peak * 1e12)
