"""FLOP counts (antismooth.flops): against the published ViT-S figure, the closed form, and depth."""
from __future__ import annotations

import pytest
import timm
import torch

from antismooth.flops import forward_flops, mfu, peak_tflops, training_flops_per_image

# timm and the DeiT paper list ViT-S/16 (DeiT-S) at 224 px as 4.6 G: fvcore multiply-adds, 2 FLOPs each here.
VIT_S_GMACS = 4.6


def vit_forward_flops(depth: int, dim: int = 384, tokens: int = 197, patch: int = 16, classes: int = 1000) -> int:
    """A ViT forward in closed form, 2 FLOPs per multiply-add: per block qkv, proj and the 4× MLP (12·D² per
    token) and Q·Kᵀ, A·V (2·N²·D); the patch embedding and the head once."""
    block = 2 * tokens * 12 * dim**2 + 2 * 2 * tokens**2 * dim
    return depth * block + 2 * (tokens - 1) * 3 * patch**2 * dim + 2 * dim * classes


def test_vit_small_matches_the_published_figure_and_the_closed_form():
    flops = training_flops_per_image("vit_small_patch16_224") / 3
    assert flops == vit_forward_flops(12)
    assert flops / 2 == pytest.approx(VIT_S_GMACS * 1e9, rel=0.02)


def test_flops_grow_with_depth_by_whole_blocks():
    f12, f24 = (training_flops_per_image(f"attnscale_small_{d}") / 3 for d in (12, 24))
    assert (f12, f24) == (vit_forward_flops(12), vit_forward_flops(24))
    assert 1.95 < f24 / f12 < 2.0  # the stem and head are counted once


def test_a_cpu_forward_counts_what_the_meta_device_counts():
    """SDPA's CPU kernel is counted too (torch counts only its CUDA kernels by itself)."""
    model = timm.create_model("attnscale_small_12", img_size=64)
    on_cpu = forward_flops(model, torch.zeros(2, 3, 64, 64)) / 2
    assert on_cpu == training_flops_per_image("attnscale_small_12", img_size=64) / 3
    assert on_cpu == vit_forward_flops(12, tokens=17)


def test_other_families_count_on_the_meta_device():
    featscale, cait = (training_flops_per_image(n) for n in ("featscale_small_12", "attnscale_cait_S24_224"))
    assert featscale == training_flops_per_image("vit_small_patch16_224")
    assert cait > featscale


def test_peaks_and_mfu():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert peak_tflops("NVIDIA H100 PCIe") == 756
    assert peak_tflops("NVIDIA H200") == 989
    assert peak_tflops("NVIDIA A100-SXM4-40GB") == 312
    assert peak_tflops("Tesla T4") is None
    assert mfu(1000.0, 30e9, 100.0) == pytest.approx(0.3)
