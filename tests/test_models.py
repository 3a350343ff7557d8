"""The model zoo: every name builds and trains, the paper's maths is right, the official keys and forward hold."""
from __future__ import annotations

import collections
import logging
import math
import re

import pytest
import timm
import torch
import torch.nn.functional as F

from timm.models._manipulate import reinit_non_persistent_buffers

import antismooth  # noqa: F401  (registers the zoo)
from antismooth.models import (MODEL_NAMES, AttnScaleAttention, WeightsMismatchError, attnscale_matrix,
                               attnscale_output, load_weights, set_fused_attn, split_dc_hc, structure)

SMALL = dict(img_size=32, num_classes=10)


def _fill_random(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Fill every parameter from a small random bank: fast even for 300M-parameter models."""
    bank = torch.randn(1 << 16, generator=torch.Generator().manual_seed(seed)) * std
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            n = p.numel()
            rolled = bank.roll(-7919 * i)  # a different start per tensor, so the blocks differ
            p.copy_(rolled.repeat(n // bank.numel() + 1)[:n].view_as(p))
    return model


def _randomize_paper_params(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Give λ, s_d, s_h (and CaiT's LayerScale γ) values far from their init so every term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lamb", "lamb1", "lamb2")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith(("gamma_1", "gamma_2")):
                p.copy_(0.1 + 0.1 * torch.rand(p.shape, generator=g))
    return model


# --- every name ------------------------------------------------------------------------------------------

def test_zoo_has_every_documented_name():
    expected = {f"{t}_{w}_{d}" for t in ("vit", "attnscale", "featscale")
                for w in ("tiny", "small", "base") for d in (12, 24, 36, 48)}
    expected |= {f"{t}_{s}" for t in ("cait", "attnscale_cait", "featscale_cait")
                 for s in ("XXS24", "XXS36", "XS24", "S24", "S36", "M36", "M48", "S24_224")}
    assert expected <= set(MODEL_NAMES)
    assert set(MODEL_NAMES) <= set(timm.list_models())


def _is_wide(name: str) -> bool:
    # Swins past the tiny one (50M-110M parameters) too: their code is the tiny one's.
    return "_base_" in name or "_M" in name or ("swin" in name and "swin_tiny" not in name)


# A name's depth: the same code builds vit_small_6 ... vit_small_48, cait_S24/S36, swin_small(_42/_60)_patch4_...
NAME_DEPTH = re.compile(r"_?(?<![0-9])(6|12|24|36|42|48|60)(?=_|$)")


def _depth_in_name(name: str) -> int:
    found = NAME_DEPTH.search(name)
    return int(found.group(1)) if found else 0


def _shallowest_of_each_code(names) -> list[str]:
    by_code = collections.defaultdict(list)
    for name in names:
        by_code[NAME_DEPTH.sub("", name)].append(name)
    return [min(group, key=_depth_in_name) for group in by_code.values()]


STEPPED = _shallowest_of_each_code(MODEL_NAMES)


@pytest.mark.parametrize("name", sorted(set(MODEL_NAMES) - set(STEPPED)))
def test_every_deeper_variant_builds_with_the_depth_its_name_says(name):
    """Its code trains one step in its shallowest variant (below); here it builds on the meta device, at no cost."""
    model = timm.create_model(name, device="meta", **dict(SMALL, img_size=64 if "swin" in name else 32))
    assert len(structure.blocks(model)) == _depth_in_name(name)


@pytest.mark.parametrize("name", STEPPED)
def test_every_model_builds_and_trains_one_step(name):
    # Base and M widths (up to 340M parameters) run forward and backward on the meta device: the
    # graph, every shape and every gradient's existence are checked at no memory cost, and their
    # numerics are those of the narrower models of the same code, which run for real here.
    device = "meta" if _is_wide(name) else "cpu"
    # Swin at 64 px: at 32 its last stage is one token, where AttnScale and FeatScale are the identity.
    size = 64 if "swin" in name else 32
    model = timm.create_model(name, device="meta", **dict(SMALL, img_size=size))
    if device == "cpu":
        _fill_random(model.to_empty(device="cpu"))
        reinit_non_persistent_buffers(model)  # Swin's relative position index and shift masks
    logits = model(torch.randn(2, 3, size, size, device=device))
    assert logits.shape == (2, 10)
    F.cross_entropy(logits, torch.tensor([1, 2], device=device)).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and g.shape == p.shape for g, p in zip(grads.values(), model.parameters(), strict=True))
    paper_grads = [g for n, g in grads.items() if n.endswith(("lamb", "lamb1", "lamb2"))]
    assert ("attnscale" in name or "featscale" in name) == bool(paper_grads)
    if device == "cpu":
        assert all(torch.isfinite(g).all() for g in grads.values())
        assert all(g.abs().sum() > 0 for g in paper_grads)


@pytest.mark.parametrize("name, dim, heads, depth, tokens", [
    ("attnscale_small_12", 384, 6, 12, 197), ("attnscale_small_24", 384, 6, 24, 197),
    ("attnscale_base_12", 768, 12, 12, 197), ("attnscale_base_24", 768, 12, 24, 197),
    ("featscale_small_12", 384, 6, 12, 197), ("featscale_small_24", 384, 6, 24, 197),
    ("featscale_base_12", 768, 12, 12, 197), ("featscale_base_24", 768, 12, 24, 197),
    ("vit_tiny_48", 192, 3, 48, 197),
])
def test_paper_vit_shapes(name, dim, heads, depth, tokens):
    sd = timm.create_model(name, device="meta").state_dict()
    assert sd["pos_embed"].shape == (1, tokens, dim)
    assert sd["cls_token"].shape == (1, 1, dim)
    assert sd["patch_embed.proj.weight"].shape == (dim, 3, 16, 16)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * dim, dim) and "blocks.0.attn.qkv.bias" in sd
    assert sd["blocks.0.mlp.fc1.weight"].shape == (4 * dim, dim)
    assert sd["head.weight"].shape == (1000, dim)
    assert f"blocks.{depth - 1}.norm1.weight" in sd and f"blocks.{depth}.norm1.weight" not in sd
    if name.startswith("attnscale"):
        assert sd["blocks.0.attn.lamb"].shape == (heads,)
    if name.startswith("featscale"):
        assert sd["blocks.0.lamb1"].shape == sd["blocks.0.lamb2"].shape == (dim,)


@pytest.mark.parametrize("name, dim, heads, depth, img, init", [
    ("attnscale_cait_XXS24", 192, 4, 24, 384, 1e-5), ("featscale_cait_S24_224", 384, 8, 24, 224, 1e-5),
    ("cait_S36", 384, 8, 36, 384, 1e-6), ("cait_M48", 768, 16, 48, 448, 1e-6), ("cait_XS24", 288, 6, 24, 384, 1e-5),
])
def test_paper_cait_shapes(name, dim, heads, depth, img, init):
    model = timm.create_model(name, device="meta")
    sd = model.state_dict()
    assert sd["pos_embed"].shape == (1, (img // 16) ** 2, dim)
    assert sd["blocks.0.attn.proj_l.weight"].shape == (heads, heads)
    assert f"blocks.{depth - 1}.gamma_1" in sd and f"blocks.{depth}.gamma_1" not in sd
    assert "blocks_token_only.1.attn.q.weight" in sd
    assert not any("blocks_token_only" in k and "lamb" in k for k in sd)  # class attention stays plain
    assert model.pretrained_cfg["input_size"] == (3, img, img)
    assert all(blk.gamma_1.shape == (dim,) for blk in model.blocks)
    assert model.blocks[0].attn.num_heads == heads
    assert init in (1e-5, 1e-6)


def test_real_init_is_deit_and_paper_params_start_at_zero():
    model = timm.create_model("attnscale_small_12")
    assert all(not b.attn.lamb.detach().any() for b in model.blocks)
    assert abs(float(model.blocks[3].mlp.fc1.weight.detach().std()) - 0.02) < 0.002
    assert model.norm.eps == 1e-6
    fs = timm.create_model("featscale_cait_XXS24", img_size=64)
    assert all(not (b.lamb1.detach().any() or b.lamb2.detach().any()) for b in fs.blocks)
    assert torch.allclose(fs.blocks[0].gamma_1, torch.full((192,), 1e-5))


# --- the maths ---------------------------------------------------------------------------------------------

def test_dc_hc_split_is_orthogonal_and_complete():
    x = torch.randn(4, 50, 16)
    dc, hc = split_dc_hc(x)
    torch.testing.assert_close(dc + hc, x)
    assert torch.allclose((dc * hc).sum(dim=-2), torch.zeros(4, 16), atol=1e-5)


def test_attnscale_identity_holds_for_any_matrix():
    attn = torch.randn(2, 3, 7, 7)  # not even row-stochastic: talking heads mixes after the softmax
    v, lamb = torch.randn(2, 3, 7, 5), torch.randn(3)
    torch.testing.assert_close(attnscale_matrix(attn, lamb) @ v, attnscale_output(attn @ v, v, lamb))


def _attn_forward_and_grads(model, x):
    model.zero_grad()
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["attnscale_tiny_12", "attnscale_small_24"])
def test_attnscale_fused_equals_explicit_forward_and_every_gradient(name):
    torch.manual_seed(0)
    model = _randomize_paper_params(timm.create_model(name, **SMALL))
    x = torch.randn(3, 3, 32, 32)
    attention = [m for m in model.modules() if isinstance(m, AttnScaleAttention)]
    fused_out, fused_grads = _attn_forward_and_grads(set_fused_attn(model, True), x)
    assert attention and all(m.fused_attn for m in attention)  # whatever the environment's default
    explicit_out, explicit_grads = _attn_forward_and_grads(set_fused_attn(model, False), x)
    assert not any(m.fused_attn for m in attention)
    torch.testing.assert_close(fused_out, explicit_out, rtol=1e-5, atol=1e-5)
    for key in fused_grads:
        torch.testing.assert_close(fused_grads[key], explicit_grads[key], rtol=1e-5, atol=1e-5, msg=key)


def test_attention_dropout_uses_the_official_explicit_form():
    attn = AttnScaleAttention(32, num_heads=4, qkv_bias=True, attn_drop=0.3).train()
    with torch.no_grad():
        attn.lamb.copy_(torch.tensor([0.5, -0.2, 1.0, 0.3]))
    x = torch.randn(2, 9, 32)
    attn.fused_attn = True   # set, not the environment's default (TIMM_FUSED_ATTN): else this compares explicit with itself
    torch.manual_seed(7)
    fused_flag = attn(x)
    attn.fused_attn = False
    torch.manual_seed(7)
    torch.testing.assert_close(fused_flag, attn(x), rtol=0, atol=0)


@pytest.mark.parametrize("technique", ["attnscale", "featscale"])
def test_zero_init_reproduces_plain_vit_exactly(technique, caplog):
    plain = timm.create_model("vit_tiny_12", **SMALL).eval()
    scaled = timm.create_model(f"{technique}_tiny_12", **SMALL).eval()
    with caplog.at_level(logging.WARNING):
        load_weights(scaled, plain.state_dict())
    missing = 12 if technique == "attnscale" else 24
    assert f"AttnScale/FeatScale parameters for {missing} keys" in caplog.text  # reported, not hidden
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(plain(x), scaled(x))


@pytest.mark.parametrize("technique", ["attnscale_cait", "featscale_cait"])
def test_zero_init_reproduces_plain_cait(technique):
    plain = _randomize_paper_params(timm.create_model("cait_XXS24", **SMALL)).eval()
    scaled = timm.create_model(f"{technique}_XXS24", **SMALL).eval()
    load_weights(scaled, plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain(x), scaled(x), rtol=0, atol=1e-6)


def test_grad_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    model = _randomize_paper_params(timm.create_model("attnscale_tiny_24", drop_path_rate=0.2, **SMALL)).train()
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    out_plain, grads_plain = _attn_forward_and_grads(model, x)
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    out_ckpt, grads_ckpt = _attn_forward_and_grads(model, x)
    assert torch.equal(out_plain, out_ckpt)
    for key in grads_plain:
        torch.testing.assert_close(grads_plain[key], grads_ckpt[key], rtol=0, atol=0, msg=key)


# --- the official forward, written out here from the paper's code, over a bare state_dict --------------

class _Recorder(dict):
    """A state_dict that remembers which keys the reference read, to prove the key sets are equal."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def _ln(x, sd, prefix):
    return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps=1e-6)


def _lin(x, sd, prefix):
    return F.linear(x, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])


def _mlp(x, sd, prefix):
    return _lin(F.gelu(_lin(x, sd, f"{prefix}.fc1")), sd, f"{prefix}.fc2")


def _official_attnscale(attn, lamb):
    n = attn.shape[-1]
    attn_d = torch.ones(attn.shape[-2:]) / n
    return attn_d + (attn - attn_d) * (1. + lamb[None, :, None, None])


def _official_featscale(x_attn, sd, prefix):
    x_d = x_attn.mean(-2, keepdim=True)
    return x_d * sd[f"{prefix}.lamb1"], (x_attn - x_d) * sd[f"{prefix}.lamb2"]


def _patches(img, sd):
    return F.conv2d(img, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16).flatten(2).transpose(1, 2)


def _official_vit(sd, img, heads, technique):
    x = _patches(img, sd)
    x = torch.cat((sd["cls_token"].expand(x.shape[0], -1, -1), x), dim=1) + sd["pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.{i}"
        B, N, C = x.shape
        q, k, v = _lin(_ln(x, sd, f"{p}.norm1"), sd, f"{p}.attn.qkv").reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
        if technique == "attnscale":
            attn = _official_attnscale(attn, sd[f"{p}.attn.lamb"])
        x_attn = _lin((attn @ v).transpose(1, 2).reshape(B, N, C), sd, f"{p}.attn.proj")
        if technique == "featscale":  # the official block: x_attn += x_d + x_h, then adds x_d + x_h again
            x_d, x_h = _official_featscale(x_attn, sd, p)
            x_attn = x_attn + x_d + x_h
            x_attn = x_attn + x_d + x_h
        x = x + x_attn
        x = x + _mlp(_ln(x, sd, f"{p}.norm2"), sd, f"{p}.mlp")
    return _lin(_ln(x, sd, "norm")[:, 0], sd, "head")


def _official_cait(sd, img, heads):
    x = _patches(img, sd) + sd["pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.{i}"
        B, N, C = x.shape
        qkv = _lin(_ln(x, sd, f"{p}.norm1"), sd, f"{p}.attn.qkv").reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] * (C // heads) ** -0.5) @ qkv[1].transpose(-2, -1)
        attn = _lin(attn.permute(0, 2, 3, 1), sd, f"{p}.attn.proj_l").permute(0, 3, 1, 2).softmax(dim=-1)
        attn = _lin(attn.permute(0, 2, 3, 1), sd, f"{p}.attn.proj_w").permute(0, 3, 1, 2)
        attn = _official_attnscale(attn, sd[f"{p}.attn.lamb"])
        x_attn = _lin((attn @ qkv[2]).transpose(1, 2).reshape(B, N, C), sd, f"{p}.attn.proj")
        x = x + sd[f"{p}.gamma_1"] * x_attn
        x = x + sd[f"{p}.gamma_2"] * _mlp(_ln(x, sd, f"{p}.norm2"), sd, f"{p}.mlp")
    cls = sd["cls_token"].expand(x.shape[0], -1, -1)
    for i in range(2):
        p = f"blocks_token_only.{i}"
        u = _ln(torch.cat((cls, x), dim=1), sd, f"{p}.norm1")
        B, N, C = u.shape
        q = _lin(u[:, 0], sd, f"{p}.attn.q").reshape(B, 1, heads, C // heads).transpose(1, 2) * (C // heads) ** -0.5
        k = _lin(u, sd, f"{p}.attn.k").reshape(B, N, heads, C // heads).transpose(1, 2)
        v = _lin(u, sd, f"{p}.attn.v").reshape(B, N, heads, C // heads).transpose(1, 2)
        x_cls = ((q @ k.transpose(-2, -1)).softmax(dim=-1) @ v).transpose(1, 2).reshape(B, 1, C)
        cls = cls + sd[f"{p}.gamma_1"] * _lin(x_cls, sd, f"{p}.attn.proj")
        cls = cls + sd[f"{p}.gamma_2"] * _mlp(_ln(cls, sd, f"{p}.norm2"), sd, f"{p}.mlp")
    return _lin(_ln(torch.cat((cls, x), dim=1), sd, "norm")[:, 0], sd, "head")


@pytest.mark.parametrize("name, heads, img", [
    ("attnscale_small_12", 6, 224), ("featscale_small_12", 6, 224), ("attnscale_cait_XXS24", 4, 384),
])
def test_official_forward_gives_the_same_logits_on_the_same_state_dict(name, heads, img):
    torch.manual_seed(0)
    model = _randomize_paper_params(timm.create_model(name)).eval()
    sd = _Recorder(model.state_dict())
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        expected = (_official_cait(sd, x, heads) if "cait" in name
                    else _official_vit(sd, x, heads, name.split("_")[0]))
        got = model(x)
    assert sd.read == set(sd), f"keys the official forward never reads: {sorted(set(sd) - sd.read)[:5]}"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# --- weights in and out ------------------------------------------------------------------------------------

@pytest.mark.parametrize("wrap", ["bare", "official", "deepspeed"])
def test_load_weights_accepts_bare_wrapped_and_prefixed_files(tmp_path, wrap):
    source = timm.create_model("attnscale_tiny_12", **SMALL).eval()
    sd = source.state_dict()
    payload = {"bare": sd, "official": {"model": sd, "epoch": 3},
               "deepspeed": {"module": {f"module.{k}": v for k, v in sd.items()}}}[wrap]
    torch.save(payload, tmp_path / "w.pth")
    target = load_weights(timm.create_model("attnscale_tiny_12", **SMALL).eval(), tmp_path / "w.pth")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(source(x), target(x))


class _WritesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_load_weights_never_unpickles_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _WritesAFile(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="never loaded"):
        load_weights(timm.create_model("vit_tiny_12", **SMALL), tmp_path / "evil.pth")
    assert not marker.exists()


def test_mismatched_checkpoint_lists_keys_and_shapes():
    small = timm.create_model("attnscale_small_12", device="meta").state_dict()
    with pytest.raises(WeightsMismatchError) as err:
        load_weights(timm.create_model("attnscale_tiny_12"), small)
    assert "shape mismatch" in str(err.value) and "blocks.0.attn.qkv.weight" in str(err.value)
    assert "pick the model" in str(err.value)


def test_pos_embed_is_resampled_for_another_image_size():
    src = timm.create_model("featscale_tiny_12", img_size=32, patch_size=8, num_classes=10)
    dst = load_weights(timm.create_model("featscale_tiny_12", img_size=64, patch_size=8, num_classes=10), src.state_dict())
    assert dst.pos_embed.shape == (1, 1 + 64, 192)
    torch.testing.assert_close(dst.pos_embed[:, 0], src.pos_embed[:, 0])  # the class token's entry is kept


def test_timm_conventions(tmp_path):
    model = timm.create_model("attnscale_tiny_12", **SMALL)
    assert {"pos_embed", "cls_token"} <= model.no_weight_decay()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.forward_head(model.forward_features(x)), model(x))
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    loaded = timm.create_model("attnscale_tiny_12", img_size=32, num_classes=7, checkpoint_path=str(tmp_path / "w.pth"))
    assert torch.equal(loaded.blocks[0].attn.lamb, model.blocks[0].attn.lamb)
    assert math.isclose(loaded.blocks[0].norm1.eps, 1e-6)


def test_attnscale_output_backward_passes_gradcheck():
    attn_v = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    lamb = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(attnscale_output, (attn_v, v, lamb))
