"""The Swin family: AttnScale and FeatScale as the official swin_attnscale.py / swin_featscale.py compute them,
official and timm checkpoints, the structure seam, and every downstream path (training under ZeRO-1/2/3 with
checkpointing, resume, EMA, export, eval, fine-tuning, the planner, the spectral probe, FLOPs).

The training runs ride on conftest's zero_runs world-2 launch (tests/swin_runs.py): no launch of their own.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resize_rel_pos_bias_table

import antismooth  # noqa: F401  (registers the zoo)
from antismooth.cli import analyze as analyze_tool
from antismooth.cli import eval as eval_tool
from antismooth.cli import export as export_tool
from antismooth.engine import CheckpointedBlocks, apply_activation_checkpointing
from antismooth.export import create_model_from_weights
from antismooth.flops import training_flops_per_image
from antismooth.models import (MODEL_NAMES, SWIN_VARIANTS, TIMM_SWIN_NAMES, WeightsMismatchError, load_for_finetuning,
                               load_weights, set_fused_attn, structure)
from antismooth.models.swin import FeatScaleSwinBlock
from antismooth.plan import activation_profile, model_shape, phase_peaks
from antismooth.spectral import measure
from jobs.train_plan import probe_images
from swin_runs import (SWIN_IMG_SIZE, SWIN_KWARGS, official_state_dict, randomize_paper_params)


TECHNIQUES = ("attnscale_swin", "featscale_swin")
# 64 px, 4 stages of 2 blocks, window 4: grids 16, 8, 4, 2; shifted windows (masks) in stages 0 and 1, a window as
# large as the grid in stage 2 (no shift, as the official code decides), a clamped 2x2 window in stage 3.
SMALL = dict(img_size=64, embed_dim=24, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), window_size=4, num_classes=7,
             drop_path_rate=0.0)


def _tiny(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, **dict(SMALL, **kwargs)).eval()


def _images(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- the zoo ---------------------------------------------------------------------------------------------

def test_every_swin_name_is_registered_with_the_paper_parameters_at_the_official_shapes():
    for width in ("tiny", "small", "base"):
        assert f"swin_{width}_patch4_window7_224" in TIMM_SWIN_NAMES
        for technique in TECHNIQUES:
            assert f"{technique}_{width}_patch4_window7_224" in SWIN_VARIANTS
    for blocks in (42, 60):
        for technique in ("swin", *TECHNIQUES):
            assert f"{technique}_small_{blocks}_patch4_window7_224" in SWIN_VARIANTS
    assert set(SWIN_VARIANTS) | set(TIMM_SWIN_NAMES) <= set(MODEL_NAMES) <= set(timm.list_models())

    with torch.device("meta"):
        plain = timm.create_model("swin_small_patch4_window7_224")
        scaled = timm.create_model("attnscale_swin_small_patch4_window7_224")
        feat = timm.create_model("featscale_swin_small_patch4_window7_224")
        deep = timm.create_model("attnscale_swin_small_60_patch4_window7_224")
    plain_keys = set(plain.state_dict())
    lambdas = {k: v.shape for k, v in scaled.state_dict().items() if k not in plain_keys}
    scales = {k: v.shape for k, v in feat.state_dict().items() if k not in plain_keys}
    assert set(scaled.state_dict()) >= plain_keys and set(feat.state_dict()) >= plain_keys
    # The official names and shapes: attn.lamb [heads] per block; lamb1 = s_d, lamb2 = s_h [dim] on the block.
    assert lambdas["layers.2.blocks.17.attn.lamb"] == (12,) and len(lambdas) == 24
    assert sum(s.numel() for s in lambdas.values()) == 2 * 3 + 2 * 6 + 18 * 12 + 2 * 24
    assert scales["layers.3.blocks.1.lamb1"] == (768,) and scales["layers.0.blocks.0.lamb2"] == (96,)
    assert len(scales) == 48
    assert [len(s.blocks) for s in deep.layers] == [2, 2, 54, 2] and len(structure.blocks(deep)) == 60
    assert all(not p.requires_grad or p.ndim for p in scaled.parameters())


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_zero_init_is_timms_plain_swin_on_its_weights(technique, caplog):
    plain = _tiny("swin_tiny_patch4_window7_224")
    model = load_weights(_tiny(f"{technique}_tiny_patch4_window7_224", seed=1), plain.state_dict())
    assert "start at 0" in caplog.text
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)
        set_fused_attn(model, False)  # the official explicit form: D + (A − D) = A exactly
        torch.testing.assert_close(model(x), plain(x), rtol=1e-6, atol=1e-6)


def test_attnscale_fused_equals_explicit_forward_and_every_gradient(monkeypatch):
    """SDPA with bias + shift mask as one additive mask, then (1+λ)·AV − λ·mean_window(V), against the official
    matrix D + (1+λ)(A − D) with D = 1/N over all N window tokens, masked ones included."""
    import antismooth.models.swin as swin

    calls = []
    sdpa = swin.F.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(kwargs.get("attn_mask").shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(swin.F, "scaled_dot_product_attention", counted)
    model = randomize_paper_params(_tiny("attnscale_swin_tiny_patch4_window7_224").train())
    x = _images(3)
    results = {}
    for fused in (True, False):
        set_fused_attn(model, fused)
        model.zero_grad()
        logits = model(x)
        F.cross_entropy(logits, torch.tensor([0, 3, 6])).backward()
        results[fused] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert len(calls) == 8 and calls[1] == (3 * 16, 2, 16, 16)  # shifted block of stage 0: 16 windows × 3 images
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-5)
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(results[True][1][n].abs().sum() > 0 for n in results[True][1] if n.endswith("attn.lamb"))


def test_attention_dropout_in_training_drops_the_rescaled_matrix_as_officially():
    model = _tiny("attnscale_swin_tiny_patch4_window7_224", attn_drop_rate=0.5).train()
    attn = model.layers[0].blocks[1].attn
    seen = []
    attn.attn_drop.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        attn.lamb.fill_(0.5)
        model(_images(1))
    assert attn.fused_attn and seen, "the explicit path runs for dropout although fused_attn is on"
    n = seen[0].shape[-1]
    assert torch.allclose(seen[0].sum(-1), torch.ones(()), atol=1e-5)  # rows of D + (1+λ)(A − D) still sum to 1
    assert seen[0].min() < -0.5 / n + 1e-3  # the −λ/N leak onto masked positions (D counts all N tokens)


def test_featscale_acts_on_the_whole_image_after_the_roll_back_added_once():
    block = _tiny("featscale_swin_tiny_patch4_window7_224").layers[0].blocks[1]  # a shifted block
    assert isinstance(block, FeatScaleSwinBlock) and any(block.shift_size)
    with torch.no_grad():
        block.lamb1.normal_(), block.lamb2.normal_()
        x = torch.randn(2, 16, 16, 24)
        attn = super(FeatScaleSwinBlock, block)._attn(x)          # timm's branch: windows, reverse, roll back
        tokens = attn.flatten(1, 2)
        dc = tokens.mean(dim=1, keepdim=True)                     # the mean of all 256 tokens of the image
        expected = tokens + block.lamb1 * dc + block.lamb2 * (tokens - dc)
        torch.testing.assert_close(block._attn(x).flatten(1, 2), expected)


# --- the official checkpoints ----------------------------------------------------------------------------

def _official_window(x: torch.Tensor, ws: int) -> torch.Tensor:
    B, H, W, C = x.shape
    return x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)


def _official_unwindow(w: torch.Tensor, ws: int, H: int, W: int) -> torch.Tensor:
    B = w.shape[0] // (H * W // ws // ws)
    return w.view(B, H // ws, W // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, -1)


def official_forward(sd: dict, x: torch.Tensor, depths, heads, window: int, technique: str) -> torch.Tensor:
    """The official SwinAttnScale / SwinFeatScale forward, written out on an official-format state dict (its
    relative_position_index and attn_mask buffers included, downsample at a stage's end, `head.`)."""
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4)
    B, C, H, W = x.shape
    x = F.layer_norm(x.flatten(2).transpose(1, 2), (C,), sd["patch_embed.norm.weight"], sd["patch_embed.norm.bias"])
    for i, depth in enumerate(depths):
        C = x.shape[-1]
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            ws, shift = window, (0 if j % 2 == 0 else window // 2)
            if min(H, W) <= ws:
                ws, shift = min(H, W), 0
            shortcut = x
            h = F.layer_norm(x, (C,), sd[p + "norm1.weight"], sd[p + "norm1.bias"]).view(B, H, W, C)
            if shift:
                h = torch.roll(h, (-shift, -shift), (1, 2))
            win = _official_window(h, ws)
            B_, N, _ = win.shape
            nh = heads[i]
            qkv = F.linear(win, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
            q, k, v = qkv.reshape(B_, N, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
            attn = (q * (C // nh) ** -0.5) @ k.transpose(-2, -1)
            table = sd[p + "attn.relative_position_bias_table"]
            bias = table[sd[p + "attn.relative_position_index"].view(-1)].view(N, N, -1).permute(2, 0, 1)
            attn = attn + bias.unsqueeze(0)
            if shift:
                mask = sd[p + "attn_mask"]
                attn = (attn.view(B_ // mask.shape[0], mask.shape[0], nh, N, N) + mask[None, :, None]).view(-1, nh, N, N)
            attn = attn.softmax(dim=-1)
            if technique == "attnscale_swin":
                d = torch.ones(N, N) / N
                attn = d + (attn - d) * (1.0 + sd[p + "attn.lamb"][None, :, None, None])
            out = F.linear((attn @ v).transpose(1, 2).reshape(B_, N, C), sd[p + "attn.proj.weight"],
                           sd[p + "attn.proj.bias"])
            h = _official_unwindow(out.view(-1, ws, ws, C), ws, H, W)
            if shift:
                h = torch.roll(h, (shift, shift), (1, 2))
            h = h.reshape(B, H * W, C)
            if technique == "featscale_swin":
                dc = h.mean(-2, keepdim=True)
                h = h + dc * sd[p + "lamb1"] + (h - dc) * sd[p + "lamb2"]
            x = shortcut + h
            m = F.layer_norm(x, (C,), sd[p + "norm2.weight"], sd[p + "norm2.bias"])
            m = F.linear(F.gelu(F.linear(m, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                         sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
            x = x + m
        if i < len(depths) - 1:  # the official PatchMerging, at the stage's end
            g = x.view(B, H, W, C)
            g = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]], -1)
            H, W = H // 2, W // 2
            g = F.layer_norm(g.view(B, H * W, 4 * C), (4 * C,), sd[f"layers.{i}.downsample.norm.weight"],
                             sd[f"layers.{i}.downsample.norm.bias"])
            x = F.linear(g, sd[f"layers.{i}.downsample.reduction.weight"])
    x = F.layer_norm(x, (x.shape[-1],), sd["norm.weight"], sd["norm.bias"]).mean(1)
    return F.linear(x, sd["head.weight"], sd["head.bias"])


@pytest.mark.parametrize("technique, config", [
    ("attnscale_swin", "small"), ("featscale_swin", "small"), ("attnscale_swin", "tiny@224")])
def test_official_format_weights_give_the_official_models_logits(technique, config):
    """An official-format state dict with non-zero λ / s_d / s_h, loaded strictly by load_weights, gives the
    logits of the official forward (written out above), fused path and explicit path alike."""
    if config == "small":
        args, depths, heads, window, size = SMALL, SMALL["depths"], SMALL["num_heads"], 4, 64
    else:  # Swin-T itself: 56/28/14/7 grids, window 7, shift 3
        args, depths, heads, window, size = dict(num_classes=5), (2, 2, 6, 2), (3, 6, 12, 24), 7, 224
    source = randomize_paper_params(timm.create_model(f"{technique}_tiny_patch4_window7_224", **args), std=0.5)
    official = official_state_dict(source)
    assert "layers.0.downsample.reduction.weight" in official and "head.weight" in official
    x = _images(1 if size == 224 else 2, size)
    with torch.no_grad():
        expected = official_forward(official, x, depths, heads, window, technique)
        model = load_weights(timm.create_model(f"{technique}_tiny_patch4_window7_224", **args), official).eval()
        for fused in (True, False):
            set_fused_attn(model, fused)
            torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
        plain = timm.create_model("swin_tiny_patch4_window7_224", **args).eval()
        plain.load_state_dict({k: v for k, v in source.state_dict().items() if "lamb" not in k})
        assert not torch.allclose(plain(x), expected, atol=1e-3)  # the paper's parameters matter here


def test_timm_and_microsoft_plain_weights_load_strictly_with_the_paper_parameters_at_zero():
    plain = _tiny("swin_tiny_patch4_window7_224")
    microsoft = official_state_dict(plain)  # the layout of Microsoft's swin_tiny_patch4_window7_224.pth
    x = _images()
    for technique in TECHNIQUES:
        for state in ({"model": microsoft}, {"module": {f"module.{k}": v for k, v in plain.state_dict().items()}}):
            model = load_weights(_tiny(f"{technique}_tiny_patch4_window7_224", seed=3), state)
            with torch.no_grad():
                torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(WeightsMismatchError, match="unexpected .*attn.lamb"):
        load_weights(_tiny("featscale_swin_tiny_patch4_window7_224"), _tiny("attnscale_swin_tiny_patch4_window7_224").state_dict())


def test_finetuning_at_another_size_resizes_relative_position_tables_as_timm_does():
    source = randomize_paper_params(_tiny("attnscale_swin_tiny_patch4_window7_224"))
    target = _tiny("attnscale_swin_tiny_patch4_window7_224", img_size=128, window_size=8, num_classes=3)
    load_for_finetuning(target, official_state_dict(source))
    key = "layers.1.blocks.1.attn.relative_position_bias_table"
    expected = resize_rel_pos_bias_table(source.state_dict()[key], new_window_size=(8, 8),
                                         new_bias_shape=target.state_dict()[key].shape)
    assert target.state_dict()[key].shape == (15 * 15, 4)
    torch.testing.assert_close(target.state_dict()[key], expected)
    torch.testing.assert_close(target.layers[2].blocks[0].attn.lamb, source.layers[2].blocks[0].attn.lamb)
    assert target.head.fc.weight.shape == (3, 192)
    assert target(_images(1, 128)).shape == (1, 3)


# --- the seam --------------------------------------------------------------------------------------------

def test_structure_names_blocks_grids_windows_and_the_depth_knob():
    model = _tiny("attnscale_swin_tiny_patch4_window7_224")
    grids = structure.token_grids(model)
    assert [(g.grid, g.window, g.shift, g.stage) for g in grids] == [
        ((16, 16), (4, 4), (0, 0), 0), ((16, 16), (4, 4), (2, 2), 0), ((8, 8), (4, 4), (0, 0), 1),
        ((8, 8), (4, 4), (2, 2), 1), ((4, 4), (4, 4), (0, 0), 2), ((4, 4), (4, 4), (0, 0), 2),
        ((2, 2), (2, 2), (0, 0), 3), ((2, 2), (2, 2), (0, 0), 3)]
    assert structure.blocks(model) == [b for s in model.layers for b in s.blocks]
    assert structure.input_size(model) == (64, 64) and structure.body(model) is model.layers
    assert structure.depth(model) == 2 and structure.depth_kwargs(model, 5) == {"depths": (2, 2, 5, 2)}
    deeper = timm.create_model("attnscale_swin_tiny_patch4_window7_224", **dict(SMALL, **structure.depth_kwargs(model, 5)))
    assert [len(s.blocks) for s in deeper.layers] == [2, 2, 5, 2]
    # The windows a grid describes are those the block's attention mixed (shifted like the block shifts them).
    block, grid = model.layers[0].blocks[1], grids[1]
    x = torch.randn(1, 16, 16, 24)
    seen = []
    handle = block.attn.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        block._attn(x)
    handle.remove()
    torch.testing.assert_close(grid.window_tokens(x.flatten(1, 2)), seen[0])
    vit = timm.create_model("attnscale_tiny_12", img_size=32, depth=2)
    assert structure.token_grids(vit)[0].grid == (2, 2) and not structure.token_grids(vit)[0].windowed


def test_activation_checkpointing_wraps_each_stage_and_keeps_keys_and_gradients():
    model = randomize_paper_params(_tiny("featscale_swin_tiny_patch4_window7_224", drop_path_rate=0.2).train())
    checked = _tiny("featscale_swin_tiny_patch4_window7_224", drop_path_rate=0.2).train()
    checked.load_state_dict(model.state_dict())
    apply_activation_checkpointing(checked, 1)
    assert all(isinstance(stage.blocks, CheckpointedBlocks) for stage in checked.layers)
    assert list(checked.state_dict()) == list(model.state_dict())
    x = _images()
    for m in (model, checked):
        torch.manual_seed(5)  # the same drop-path draws: non-reentrant checkpointing replays the RNG state
        F.cross_entropy(m(x), torch.tensor([1, 2])).backward()
    for (name, p), q in zip(model.named_parameters(), checked.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_planner_fits_swin_activations_by_stage_three_depth():
    kwargs = {k: v for k, v in SMALL.items() if k != "img_size"}
    name = "attnscale_swin_tiny_patch4_window7_224"
    assert model_shape(name, kwargs, 64).depth == 2
    for every in (0, 1):
        profile = activation_profile(name, kwargs, 64, "float32", every)
        measured = max(phase_peaks(name, kwargs, 64, "float32", every, 2, 6)[1:])
        assert profile.peak(2, 6) == pytest.approx(measured, rel=0.05)


def test_flops_match_the_swin_papers_figures():
    # Liu et al. 2021, Table 1: Swin-T 4.5G, Swin-S 8.7G multiply-adds at 224 px; 2 FLOPs each, × 3 to train.
    for name, gmacs in (("tiny", 4.5), ("small", 8.7)):
        plain = training_flops_per_image(f"swin_{name}_patch4_window7_224")
        assert plain / 6e9 == pytest.approx(gmacs, rel=0.03)
        for technique in TECHNIQUES:  # AttnScale's and FeatScale's elementwise work is not counted
            assert training_flops_per_image(f"{technique}_{name}_patch4_window7_224") == pytest.approx(plain, rel=1e-6)


def test_spectral_probe_measures_each_stage_on_its_grid_and_each_window():
    model = randomize_paper_params(_tiny("attnscale_swin_tiny_patch4_window7_224"))
    report = measure(model, _images(3), attention=True, batch_size=2)
    assert report.stage == [0, 0, 1, 1, 2, 2, 3, 3] and len(report.hc_share) == 8
    # Attention maps are compared within a stage only: NaN across each patch merging.
    assert [math.isnan(v) for v in report.attention_similarity] == [False, True, False, True, False, True, False]
    assert all(0 < v <= 1 for v in report.attention_similarity if not math.isnan(v))
    # Within windows there is less high-frequency energy than over the image; equal where the window is the grid.
    assert all(w < h for w, h in zip(report.hc_share_window[:4], report.hc_share[:4], strict=True))
    assert report.hc_share_window[4:] == pytest.approx(report.hc_share[4:], rel=1e-5)
    assert report.attnscale_lambda == pytest.approx([b.attn.lamb.abs().mean().item() for b in structure.blocks(model)])
    vit = measure(timm.create_model("attnscale_tiny_12", img_size=32, patch_size=8, depth=2), torch.randn(2, 3, 32, 32))
    assert not vit.hc_share_window and not vit.stage


# --- training, resume, EMA, export, eval, fine-tuning, analysis: the runs of tests/swin_runs.py ---------------

def _scalars(run: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [e.value for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def _export(*argv) -> Path:
    assert export_tool.main([str(a) for a in argv]) == 0
    return Path(argv[argv.index("--out") + 1])


def test_swin_trains_resumes_exports_evaluates_and_analyzes_as_a_vit(zero_runs, tiny_shards, tmp_path, capsys):
    images = probe_images(SWIN_IMG_SIZE)
    runs = {name: zero_runs[name, 2] for name in ("swin-attnscale-zero3", "swin-featscale-zero2",
                                                  "swin-attnscale-zero1-resumed")}
    for name, run in runs.items():
        losses = _scalars(run.output, "train/loss")
        assert len(losses) >= 1 and all(math.isfinite(v) for v in losses), name
    log = runs["swin-attnscale-zero3"].log
    assert "attnscale_swin_tiny_patch4_window7_224: 0.0M parameters, 4 blocks" in log
    assert "activation checkpointing every 2 block(s)" in log

    # Export (file) of every stage reproduces the live engine; the EMA exports too.
    for name, run in runs.items():
        out = _export(run.output, "--out", tmp_path / f"{name}.safetensors")
        model = create_model_from_weights(out)[0].eval()
        with torch.no_grad():
            torch.testing.assert_close(model(images), torch.load(run.probe), rtol=1e-5, atol=1e-5, msg=name)
    ema = _export(runs["swin-attnscale-zero3"].output, "--out", tmp_path / "ema.safetensors", "--ema")
    assert create_model_from_weights(ema)[0] is not None

    # A run stopped after one step and resumed ends where the uninterrupted run ends (ZeRO-1 vs ZeRO-3).
    assert "Resuming from" in log or "resum" in log.lower()
    torch.testing.assert_close(torch.load(runs["swin-attnscale-zero1-resumed"].probe),
                               torch.load(runs["swin-attnscale-zero3"].probe), rtol=1e-4, atol=1e-4)

    # The timm folder loads with timm's local-dir: loader.
    folder = _export(runs["swin-attnscale-zero3"].output, "--out", tmp_path / "timm", "--format", "timm")
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images), torch.load(runs["swin-attnscale-zero3"].probe), rtol=1e-5, atol=1e-5)

    # tools/eval.py gives the run's own last evaluation.
    weights = tmp_path / "swin-attnscale-zero3.safetensors"
    capsys.readouterr()
    assert eval_tool.main(["--weights", str(weights), "--data", str(tiny_shards), "--json", str(tmp_path / "e.json"),
                           "--device", "cpu"]) == 0
    figures = json.loads((tmp_path / "e.json").read_text())
    last = [json.loads(line) for line in (runs["swin-attnscale-zero3"].output / "eval.jsonl").read_text().splitlines()]
    last = [r for r in last if not r.get("ema")][-1]
    assert figures["top1"] == pytest.approx(last["top1"]) and figures["count"] == 16

    # The spectral probe ran during training, per window too.
    assert _scalars(runs["swin-attnscale-zero3"].output, "spectral/hc_share_window/block_00")

    # tools/analyze.py on the exported file.
    out = tmp_path / "report"
    assert analyze_tool.main(["--weights", str(weights), "--data", str(tiny_shards), "--num-images", "4",
                              "--attention", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())["models"]["swin-attnscale-zero3"]
    assert report["stage"] == [0, 0, 1, 1] and len(report["hc_share_window"]) == 4
    assert (out / "hc_share_window.png").is_file()

    # --throughput counts the FLOPs antismooth.flops counts for the model.
    flops = training_flops_per_image("attnscale_swin_tiny_patch4_window7_224", SWIN_IMG_SIZE, num_classes=16,
                                     **SWIN_KWARGS)
    counted = re.search(r"throughput: .*?\(([\d.]+) GFLOP", log)
    assert counted and float(counted.group(1)) == pytest.approx(flops / 1e9, rel=1e-2)


def test_swin_finetunes_from_official_weights_at_another_image_size_and_window(zero_runs):
    run = zero_runs["swin-finetune-64", 2]
    source = torch.load(run.output.parent / "swin-finetune-source.pth", weights_only=True)["model"]
    start = torch.load(run.output / "weights.pt")[0]   # the weights pretrain trained from
    key = "layers.1.blocks.1.attn.relative_position_bias_table"
    assert start[key].shape == (15 * 15, 4)                     # window 4 -> 8: 7x7 -> 15x15 relative positions
    torch.testing.assert_close(start[key], resize_rel_pos_bias_table(source[key], new_window_size=(8, 8),
                                                                     new_bias_shape=(15 * 15, 4)))
    torch.testing.assert_close(start["layers.1.blocks.0.attn.lamb"], source["layers.1.blocks.0.attn.lamb"])
    torch.testing.assert_close(start["layers.1.downsample.reduction.weight"],  # the Microsoft layout converted
                               source["layers.0.downsample.reduction.weight"])
    assert start["head.fc.weight"].shape == (16, 32) and "dropping head.fc.weight" in run.log
