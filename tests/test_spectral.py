"""Oversmoothing diagnostics: the measurements' maths, the paper's low-pass claims, hooks on real models,
and tools/analyze.py end to end on the real ImageNet sample images."""
from __future__ import annotations

import csv
import json
import math

import pytest
import timm
import torch
from safetensors.torch import save_file

import antismooth  # noqa: F401  (registers the zoo)
from antismooth.cli import analyze as tool
from antismooth.models import attnscale_matrix, featscale, load_weights, set_fused_attn, split_dc_hc
from antismooth.spectral import (TRAINING_MEASUREMENTS, attention_similarity, delta_log_amplitude, hc_share,
                                 log_spectral, measure, patch_uniformity)

TINY = dict(img_size=32, patch_size=4, depth=4, num_classes=10)  # an 8x8 grid of patches, 4 blocks


def _tiny(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, **dict(TINY, **kwargs))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# --- the maths -------------------------------------------------------------------------------------------

def test_dc_and_hc_are_orthogonal_and_sum_to_x():
    x = torch.randn(3, 10, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dc, hc = split_dc_hc(x)
    torch.testing.assert_close(dc + hc, x)
    assert (dc.expand_as(hc) * hc).sum(dim=(-2, -1)).abs().max() < 1e-12
    # Hence ||X||² = ||DC||² + ||HC||², and the HC share is one minus the DC share.
    dc_energy = dc.expand_as(x).pow(2).sum(dim=(-2, -1))
    torch.testing.assert_close(hc_share(x).double(), 1 - dc_energy / x.pow(2).sum(dim=(-2, -1)), rtol=1e-6, atol=1e-6)
    assert hc_share(torch.ones(2, 5, 4)).abs().max() < 1e-6  # identical tokens: nothing but DC
    assert hc_share(x - x.mean(dim=-2, keepdim=True)).sub(1).abs().max() < 1e-6  # zero mean: nothing but HC


def test_repeated_attention_is_low_pass_and_attnscale_keeps_high_frequencies():
    """Wang et al. Theorem 1: products of row-stochastic matrices drive HC to 0; AttnScale (λ > 0) resists it."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, 16, 32, generator=g)  # [batch, head, tokens, channels]
    attentions = [torch.randn(4, 1, 16, 16, generator=g).softmax(dim=-1) for _ in range(6)]
    plain, scaled = [hc_share(x0)], [hc_share(x0)]
    x_plain = x_scaled = x0
    for a in attentions:
        x_plain = a @ x_plain
        x_scaled = attnscale_matrix(a, torch.tensor([0.5])) @ x_scaled
        plain.append(hc_share(x_plain))
        scaled.append(hc_share(x_scaled))
    plain, scaled = torch.stack(plain).squeeze(-1), torch.stack(scaled).squeeze(-1)  # [layer, batch]
    assert (plain[1:] < plain[:-1]).all(), "the HC share must fall at every layer"
    assert plain[-1].max() < 1e-4 * plain[0].min()
    assert (scaled[-1] > 10 * plain[-1]).all()
    assert (scaled[1:] > plain[1:]).all()


def test_featscale_with_positive_high_frequency_scale_raises_the_hc_share():
    x = torch.randn(3, 20, 8, generator=torch.Generator().manual_seed(0)) + 0.7  # a DC part as well
    zeros, half = torch.zeros(8), torch.full((8,), 0.5)
    raised = x + featscale(x, zeros, half)  # DC(X) + 1.5·HC(X)
    lowered = x + featscale(x, zeros, -half)
    assert (hc_share(raised) > hc_share(x)).all()
    assert (hc_share(lowered) < hc_share(x)).all()
    torch.testing.assert_close(x + featscale(x, zeros, zeros), x)


def test_delta_log_amplitude_at_the_corner_frequency_of_a_known_map():
    h = w = 8
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    k = h // 2 - 1  # the corner (h-1, w-1) of the fftshift'd spectrum: frequency 3·2π/8 per axis
    wave = torch.cos(2 * math.pi * k * (i + j) / h)
    tokens = (1 + wave).reshape(1, h * w, 1).expand(2, -1, 5)  # DC amplitude N, corner amplitude N/2
    torch.testing.assert_close(delta_log_amplitude(tokens, (h, w)), torch.full((2,), math.log(0.5)), atol=1e-4,
                               rtol=0)
    flat = torch.ones(1, h * w, 3)
    assert delta_log_amplitude(flat, (h, w)).item() < math.log(1e-6 / (h * w)) + 1e-3  # no high frequency at all
    with pytest.raises(ValueError, match="patch tokens"):
        delta_log_amplitude(torch.ones(1, 10, 3), (h, w))


def test_patch_uniformity_against_the_gram_matrix():
    x = torch.randn(2, 9, 5, generator=torch.Generator().manual_seed(0))
    unit = torch.nn.functional.normalize(x, dim=-1)
    gram = unit @ unit.transpose(-2, -1)
    expected = (gram.sum(dim=(-2, -1)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)) / (9 * 8)
    torch.testing.assert_close(patch_uniformity(x), expected)
    assert patch_uniformity(torch.ones(1, 4, 3)).item() == pytest.approx(1.0)
    assert patch_uniformity(torch.eye(4).unsqueeze(0)).item() == pytest.approx(0.0)


def test_attention_similarity():
    a = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0)).softmax(-1)
    torch.testing.assert_close(attention_similarity(a, a), torch.ones(2))
    assert (attention_similarity(a, a.flip(-1)) < 1).all()
    with pytest.raises(ValueError, match="different shapes"):
        attention_similarity(a, a[:, :2])


# --- measuring models ------------------------------------------------------------------------------------

def test_zero_lambda_and_scales_give_the_plain_vit_curves(images):
    plain = _tiny("vit_tiny_12")
    reports = {"vit": measure(plain, images, attention=True)}
    for name in ("attnscale_tiny_12", "featscale_tiny_12"):
        model = load_weights(_tiny(name, seed=1), plain.state_dict())  # λ / s_d / s_h filled with 0
        reports[name] = measure(model, images, attention=True)
    for name in ("attnscale_tiny_12", "featscale_tiny_12"):
        for measurement, curve in reports["vit"].curves().items():
            torch.testing.assert_close(torch.tensor(reports[name].curves()[measurement]), torch.tensor(curve),
                                       atol=2e-5, rtol=1e-4)
    assert len(reports["vit"].hc_share) == 4 and len(reports["vit"].attention_similarity) == 3
    assert reports["attnscale_tiny_12"].attnscale_lambda == [0.0] * 4
    assert reports["featscale_tiny_12"].featscale_s_h == [0.0] * 4
    assert not reports["vit"].attnscale_lambda and not reports["attnscale_tiny_12"].featscale_s_d


def test_learned_parameters_are_read_per_block(images):
    model = _tiny("attnscale_tiny_12")
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            block.attn.lamb.copy_(torch.tensor([-1.0, 2.0, 3.0]) * (i + 1))
    assert measure(model, images[:2]).attnscale_lambda == pytest.approx([2.0, 4.0, 6.0, 8.0])


def test_attention_collapse_path_restores_each_fused_setting_and_train_mode(images):
    model = _tiny("attnscale_tiny_12").train()
    set_fused_attn(model, True)
    model.blocks[1].attn.fused_attn = False
    before = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    report = measure(model, images, attention=True, batch_size=4)  # two chunks
    assert len(report.attention_similarity) == 3 and report.num_images == 6
    assert [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")] == before
    assert model.training
    with pytest.raises(AssertionError, match="Input height"):  # fails inside the forward (timm checks the size)
        measure(model, torch.zeros(1, 3, 48, 48), attention=True)
    assert [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")] == before
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


def test_cait_self_attention_blocks_are_measured_on_patch_tokens(images):
    model = _tiny("attnscale_cait_XXS24", depth=3)
    report = measure(model, images[:2], attention=True)
    assert len(report.hc_share) == 3 and len(report.attention_similarity) == 2
    assert all(0 <= v <= 1 for v in report.hc_share)


def test_log_spectral_writes_scalars_per_block_and_a_figure(images, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    model = _tiny("featscale_tiny_12")
    with SummaryWriter(tmp_path) as writer:
        report = log_spectral(writer, model, images[:4], step=7)
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert scalars == {f"spectral/{m}/block_{i:02d}" for m in TRAINING_MEASUREMENTS for i in range(4)}
    logged = events.Scalars("spectral/hc_share/block_03")[0]
    assert logged.step == 7 and logged.value == pytest.approx(report.hc_share[3])
    assert events.Tags()["images"] == ["spectral/curves"]


# --- tools/analyze.py on real images ---------------------------------------------------------------------

def test_analyze_compares_weights_files_on_real_images(sample_images, tmp_path, capsys):
    kwargs = dict(TINY, depth=3)
    plain = timm.create_model("vit_tiny_12", **kwargs)
    save_file(plain.state_dict(), tmp_path / "plain.safetensors",
              metadata={"model": "vit_tiny_12", "model_kwargs": json.dumps(kwargs), "classes": json.dumps(["a"])})
    scaled = load_weights(timm.create_model("attnscale_tiny_12", **kwargs), plain.state_dict())
    with torch.no_grad():
        for block in scaled.blocks:
            block.attn.lamb.fill_(0.5)
    torch.save(scaled.state_dict(), tmp_path / "scaled.pth")
    (tmp_path / "scaled.pth.json").write_text(json.dumps({"model": "attnscale_tiny_12", "model_kwargs": kwargs}))
    out = tmp_path / "report"

    assert tool.main(["--weights", str(tmp_path / "plain.safetensors"), str(tmp_path / "scaled.pth"),
                      "--data", str(sample_images / "train"), "--num-images", "8", "--attention",
                      "--out", str(out)]) == 0

    pngs = {p.stem for p in out.glob("*.png")}
    assert pngs == {"hc_share", "delta_log_amplitude", "patch_uniformity", "attention_similarity", "attnscale_lambda"}
    assert all((out / f"{name}.png").read_bytes()[:4] == b"\x89PNG" for name in pngs)
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"plain", "scaled"}
    assert report["models"]["scaled"]["attnscale_lambda"] == pytest.approx([0.5] * 3)
    assert report["models"]["plain"]["num_images"] == 8
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["model"], r["measurement"]) for r in rows} >= {("plain", "hc_share"), ("scaled", "attention_similarity")}
    assert sum(r["model"] == "plain" and r["measurement"] == "hc_share" for r in rows) == 3
    assert "wrote" in capsys.readouterr().out


def test_analyze_random_init_from_a_shard_manifest(sample_shards, tmp_path):
    out = tmp_path / "report"
    kwargs = [f"{k}={v}" for k, v in dict(TINY, depth=2).items()]
    assert tool.main(["--model", "featscale_tiny_12", "--model-kwargs", *kwargs, "--data", str(sample_shards.parent),
                      "--num-images", "4", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    (label, measured), = report["models"].items()
    assert label == "featscale_tiny_12 (random init)"
    assert measured["num_images"] == 4 and len(measured["featscale_s_h"]) == 2
    assert (out / "featscale_s_d.png").is_file()


def test_analyze_says_what_to_do_about_missing_or_ignored_model_names(sample_images, tmp_path, capsys):
    data = ["--data", str(sample_images / "train"), "--out", str(tmp_path / "r")]
    torch.save(_tiny("vit_tiny_12").state_dict(), tmp_path / "bare.pth")
    assert tool.main(["--weights", str(tmp_path / "bare.pth"), *data]) == 2
    assert "pass --model NAME" in capsys.readouterr().err
    (tmp_path / "bare.pth.json").write_text(json.dumps({"model": "vit_tiny_12", "model_kwargs": TINY}))
    assert tool.main(["--weights", str(tmp_path / "bare.pth"), "--model", "attnscale_tiny_12", *data]) == 2
    assert "would be ignored" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
