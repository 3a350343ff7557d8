"""Swin test helpers: the official (Microsoft) checkpoint layout, λ / s_d / s_h away from 0, and the tiny Swin
runs that ride on conftest's zero_runs world-2 launch (a plain module: `from swin_runs import swin_plan`).

The runs (tests/test_swin.py checks them), each a few steps of a 4-block Swin at 32 px on tiny_shards:
- swin-attnscale-zero3: ZeRO-3, activation checkpointing, the model EMA, the spectral probe every step;
- swin-featscale-zero2: ZeRO-2;
- swin-attnscale-zero1-resumed: ZeRO-1, stopped after 1 step, then resumed to the end by a second run;
- swin-finetune-64: fine-tuned from official-format weights at 64 px with window 8 (relative position tables
  resized), one step, its starting weights recorded;
- a --throughput run (its line lands in the launch's log).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

SWIN_IMG_SIZE = 32
# 2 stages of 2 blocks: an 8x8 grid with shifted 4x4 windows, then 4x4 (one window, no shift).
SWIN_KWARGS = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4)


def swin_model_flags(technique: str, **overrides) -> list[str]:
    kwargs = dict(SWIN_KWARGS, **overrides)
    return ["--model", f"{technique}_tiny_patch4_window7_224", "--model-kwargs",
            *(f"{k}={v!r}".replace(" ", "") for k, v in kwargs.items()), "--input-size", str(SWIN_IMG_SIZE)]


def randomize_paper_params(model: nn.Module, seed: int = 1, std: float = 0.5) -> nn.Module:
    """λ (`attn.lamb`), s_d (`lamb1`) and s_h (`lamb2`) drawn far from their identity value 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lamb", "lamb1", "lamb2")):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _official_relative_position_index(ws: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid([torch.arange(ws), torch.arange(ws)], indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    relative[:, :, 0] += ws - 1
    relative[:, :, 1] += ws - 1
    relative[:, :, 0] *= 2 * ws - 1
    return relative.sum(-1)


def _official_attn_mask(H: int, W: int, ws: int, shift: int) -> torch.Tensor:
    img_mask = torch.zeros((1, H, W, 1))
    cnt = 0
    for h in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for w in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img_mask[:, h, w, :] = cnt
            cnt += 1
    windows = img_mask.view(1, H // ws, ws, W // ws, ws, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws)
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights in the layout of the official Swin code (swin/models/swin_attnscale.py,
    swin_featscale.py, Microsoft's swin_transformer.py): PatchMerging at the end of stage i instead of the
    start of stage i+1, `head.` for timm's `head.fc.`, and the persistent buffers relative_position_index and
    attn_mask computed as the official code computes them (square windows, no padding)."""
    out = {}
    for key, value in model.state_dict().items():
        key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        out[key.replace("head.fc.", "head.")] = value.clone()
    for i, stage in enumerate(model.layers):
        for j, block in enumerate(stage.blocks):
            ws, shift = block.window_size[0], block.shift_size[0]
            out[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = _official_relative_position_index(ws)
            if shift:
                out[f"layers.{i}.blocks.{j}.attn_mask"] = _official_attn_mask(*block.input_resolution, ws, shift)
    return out


def swin_plan(work: Path, shards: Path, ds_config: Callable[..., Path], flags: list[str], ema: list[str]
              ) -> tuple[list[dict], dict[str, Path]]:
    """The plan entries and {run name: output folder}; `flags` are conftest's FULL_BATCH (overridden where they
    differ: later flags win), `ema` its WITH_EMA, `ds_config` tests/launch.py's (checkpointing every 2 blocks)."""
    import timm

    import antismooth  # noqa: F401  (registers the zoo)

    short = [*flags, "--epochs", "2", "--save-every", "1", "--spectral-every", "1"]
    outputs = {name: work / name for name in ("swin-attnscale-zero3", "swin-featscale-zero2",
                                               "swin-attnscale-zero1-resumed", "swin-finetune-64")}

    def argv(name: str, stage: int, *extra: str) -> list[str]:
        return ["--deepspeed_config", str(ds_config(work / f"{name}.json", stage)), "--data", str(shards),
                "--output", str(outputs.get(name, work / name)), *extra]

    # Fine-tuning source: a 32 px, window-4 AttnScale Swin of 10 classes with non-zero λ, in the official layout.
    torch.manual_seed(0)
    source = randomize_paper_params(timm.create_model("attnscale_swin_tiny_patch4_window7_224", num_classes=10,
                                                      img_size=SWIN_IMG_SIZE, **SWIN_KWARGS))
    source_file = work / "swin-finetune-source.pth"
    torch.save({"model": official_state_dict(source)}, source_file)

    attnscale = swin_model_flags("attnscale_swin")
    plan = [
        {"argv": argv("swin-attnscale-zero3", 3, *attnscale, *short, *ema), "probe": str(outputs["swin-attnscale-zero3"] / "probe.pt")},
        {"argv": argv("swin-featscale-zero2", 2, *swin_model_flags("featscale_swin"), *short),
         "probe": str(outputs["swin-featscale-zero2"] / "probe.pt")},
        {"argv": argv("swin-attnscale-zero1-resumed", 1, *attnscale, *short, "--max-steps", "1")},
        {"argv": argv("swin-attnscale-zero1-resumed", 1, *attnscale, *short),
         "probe": str(outputs["swin-attnscale-zero1-resumed"] / "probe.pt")},
        {"argv": argv("swin-finetune-64", 2, *swin_model_flags("attnscale_swin", window_size=8), *short,
                      "--input-size", "64", "--finetune", str(source_file), "--max-steps", "1", "--no-eval"),
         "weights_each_step": str(outputs["swin-finetune-64"] / "weights.pt")},
        {"argv": argv("swin-throughput", 2, *attnscale, *short, "--throughput")},
    ]
    return plan, outputs
