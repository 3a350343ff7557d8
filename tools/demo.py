"""`make demo`: the main job on the embedded default, on any machine.

Until the shard → DeepSpeed → export → eval path lands, the demo is a training smoke run:
a 24-layer AttnScale ViT fits a batch of scikit-learn's bundled handwritten digits
(real 8×8 scans, upsampled to 32 px) for a few AdamW steps, and prints the loss falling
and the learned AttnScale λ moving away from 0.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import antismooth  # noqa: F401  (registers the model zoo)


def digits_batch(n: int, img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` scikit-learn digits as normalised 3-channel images of `img_size` px."""
    digits = load_digits()
    images = torch.from_numpy(digits.images[:n].astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(images, size=img_size, mode="bilinear", align_corners=False)
    images = (images - 0.5) / 0.5
    return images.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(digits.target[:n]).long()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="attnscale_tiny_24")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10, img_size=args.img_size, patch_size=args.patch_size)
    model.set_grad_checkpointing(True)
    images, labels = digits_batch(args.batch, args.img_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    depth = len(model.blocks)
    print(f"{args.model}: {depth} blocks, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{args.batch} digits at {args.img_size} px, activation checkpointing on")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 1 or step % 5 == 0:
            acc = (model(images).argmax(-1) == labels).float().mean() if step == args.steps else None
            print(f"step {step:3d}  loss {loss.item():.4f}" + (f"  train acc {acc:.0%}" if acc is not None else ""))
    lambdas = torch.stack([blk.attn.lamb.detach().abs().mean() for blk in model.blocks]) \
        if hasattr(model.blocks[0].attn, "lamb") else None
    print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s")
    if lambdas is not None:
        print("mean |λ| per block: " + " ".join(f"{v:.3f}" for v in lambdas.tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
