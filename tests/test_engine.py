"""The engine glue on its own, in-process: parameter groups, the schedule, activation checkpointing as a
policy, the run folder's checkpoint bookkeeping, and the DeepSpeed JSON's batch arithmetic."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import timm
import torch

import antismooth  # noqa: F401
from antismooth.config import ConfigError, DeepSpeedSettings, HeldBatch, TrainConfig, check_optimizer_build, derive
from antismooth.checkpoint import RunFolder
from antismooth.engine import TrainState, apply_activation_checkpointing, build_scheduler, param_groups

REPO = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=8, embed_dim=64, num_heads=4, num_classes=10)


def _model(name: str = "attnscale_tiny_24", **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **dict(TINY, **kwargs))


@pytest.mark.parametrize("name", ["attnscale_tiny_12", "featscale_tiny_12"])
def test_no_weight_decay_for_1d_parameters_and_timm_no_weight_decay_names(name):
    model = _model(name)
    groups = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert {"pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"} <= no_decay
    assert ("blocks.3.attn.lamb" in no_decay) if name.startswith("attnscale") else \
        {"blocks.3.lamb1", "blocks.3.lamb2"} <= no_decay
    assert decay == {n for n, p in model.named_parameters() if p.ndim > 1 and n not in ("pos_embed", "cls_token")}
    assert len(no_decay) + len(decay) == len(names)


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_min_lr():
    model = _model("vit_tiny_12")
    optimizer = torch.optim.AdamW(param_groups(model, 0.05))
    config = TrainConfig.from_flags(epochs=10, lr=5e-4, min_lr=1e-5, warmup_lr=1e-6, warmup_epochs=2)
    ds = DeepSpeedSettings.from_dict({"train_micro_batch_size_per_gpu": 64, "optimizer": {"type": "AdamW"}}, 2)
    derived = derive(config, ds, world_size=2, num_samples=1280)
    assert (derived.global_batch, derived.steps_per_epoch, derived.total_steps, derived.warmup_steps) == (128, 10, 100, 20)
    assert derived.peak_lr == pytest.approx(5e-4 * 128 / 512)
    scheduler = build_scheduler(optimizer, config, derived)
    lrs = []
    for step in range(derived.total_steps + 1):
        scheduler.step_update(step)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[10] == pytest.approx(1e-6 + (derived.peak_lr - 1e-6) * 10 / 20)  # linear warmup
    assert max(lrs) == pytest.approx(derived.peak_lr) and lrs.index(max(lrs)) == 20  # the peak, when warmup ends
    assert all(a > b for a, b in zip(lrs[20:], lrs[21:], strict=False))                       # then only down
    assert lrs[-1] == pytest.approx(1e-5)
    assert {g["lr"] for g in optimizer.param_groups} == {lrs[-1]}               # every group alike


def test_a_run_no_longer_than_its_warmup_is_named_in_the_start_up_summary_not_by_timm(tmp_path, caplog):
    from antismooth import startup
    from antismooth.models.description import ModelDescription

    model = _model("vit_tiny_12")
    optimizer = torch.optim.AdamW(param_groups(model, 0.05))
    config = TrainConfig.from_flags(model="vit_tiny_12", epochs=1, warmup_epochs=5, deepspeed_config="x.json")  # DeiT's 5 warmup epochs
    ds = DeepSpeedSettings.from_dict({"train_micro_batch_size_per_gpu": 64, "optimizer": {"type": "AdamW"}}, 1)
    derived = derive(config, ds, world_size=1, num_samples=128)
    with caplog.at_level(logging.INFO):
        build_scheduler(optimizer, config, derived)
        description = ModelDescription("vit_tiny_12", {"num_classes": 10, "img_size": 32, "patch_size": 8})
        startup.log_start(config, ds, derived, description, RunFolder(tmp_path), 1, 12, None)
    assert "will have no effect" not in caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["--warmup-epochs 5 is as long as the whole run (--epochs 1): the learning rate only warms up "
                        f"and never reaches its peak {derived.peak_lr:.3g}; lower --warmup-epochs or train longer."]


def _grads(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)  # drop path draws: the recompute must draw them again identically
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("every,offload", [(1, False), (2, False), (5, False), (1, True), (3, True)])
def test_activation_checkpointing_keeps_keys_and_gradients(every, offload):
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    plain = _model(drop_path_rate=0.2)
    checked = apply_activation_checkpointing(_model(drop_path_rate=0.2), every, offload)
    assert list(checked.state_dict()) == list(plain.state_dict())  # exports and checkpoints stay plain
    expected, got = _grads(plain, images, labels), _grads(checked, images, labels)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


def test_activation_checkpointing_saves_only_segment_inputs():
    """What autograd keeps for backward: every activation without checkpointing; with it, one block input per
    segment (the rest is recomputed)."""
    def saved_bytes(model):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            model(torch.randn(4, 3, 32, 32)).sum()
        return sum(sizes)
    block_input = 4 * 17 * 64
    plain = saved_bytes(_model())
    every_block = saved_bytes(apply_activation_checkpointing(_model(), 1))
    every_4 = saved_bytes(apply_activation_checkpointing(_model(), 4))
    outside = saved_bytes(apply_activation_checkpointing(_model(), 24)) - block_input  # patch embed, head
    assert every_block - outside == 24 * block_input
    assert every_4 - outside == 6 * block_input
    assert plain > 5 * every_block


def test_run_folder_commits_latest_atomically_and_prunes_complete_checkpoints(tmp_path):
    run = RunFolder(tmp_path)
    assert run.latest_tag() is None
    for step in (10, 20, 30, 40):
        (run.checkpoints / f"step{step:08d}").mkdir(parents=True)
    run.commit("step00000030")
    assert run.latest_tag() == "step00000030" and not (run.checkpoints / "latest.tmp").exists()
    assert run.prune(keep=2) == ["step00000010"]
    # step 40 is newer than `latest`: a checkpoint cut short, left for the next save of that step to overwrite
    assert sorted(p.name for p in run.checkpoints.iterdir() if p.is_dir()) == ["step00000020", "step00000030",
                                                                               "step00000040"]
    (run.checkpoints / "latest").write_text("")  # as DeepSpeed's own non-atomic write can leave it
    assert run.latest_tag() is None


def _checkpoint(run: RunFolder, tag: str, world: int) -> None:
    """Files named as DeepSpeed's ZeRO-2 writes them, real torch.save archives (their format: zip)."""
    folder = run.checkpoints / tag
    folder.mkdir(parents=True)
    torch.save({"module": torch.ones(3)}, folder / "mp_rank_00_model_states.pt")
    for rank in range(world):
        torch.save({"state": torch.full((100,), float(rank))}, folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    (folder / "antismooth.json").write_text(json.dumps({"model": "x", "world_size": world}))  # as Trainer.save writes it


def test_run_folder_finds_damaged_checkpoint_files_per_rank_and_sets_them_aside(tmp_path):
    run = RunFolder(tmp_path)
    for tag in ("step00000004", "step00000008"):
        _checkpoint(run, tag, world=2)
    run.commit("step00000008")
    assert run.complete_tags() == ["step00000004", "step00000008"]
    assert run.damaged_files("step00000008", 0) == run.damaged_files("step00000008", 1) == []
    shard = run.checkpoints / "step00000008" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:-200])                       # cut short
    assert run.damaged_files("step00000008", 0) == []                  # rank 0 reads none of rank 1's files
    assert run.damaged_files("step00000008", 1) == [shard.name]
    flipped = bytearray((run.checkpoints / "step00000004" / "mp_rank_00_model_states.pt").read_bytes())
    flipped[len(flipped) // 3] ^= 0xFF                                 # one flipped byte: a CRC mismatch
    (run.checkpoints / "step00000004" / "mp_rank_00_model_states.pt").write_bytes(bytes(flipped))
    assert run.damaged_files("step00000004", 0) == ["mp_rank_00_model_states.pt"]
    (run.checkpoints / "step00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert run.damaged_files("step00000004", 1) == ["zero_pp_rank_1_…_optim_states.pt (missing)"]
    # On another world size the ranks share out every saving rank's files: one process checks them all.
    assert run.damaged_files("step00000008", 0, world_size=1) == [shard.name]
    assert run.damaged_files("step00000004", 0, world_size=1) == ["mp_rank_00_model_states.pt",
                                                                  "zero_pp_rank_1_…_optim_states.pt (missing)"]
    aside = run.set_aside("step00000008")
    assert aside.name == "step00000008.damaged" and (aside / shard.name).is_file()
    run.commit("step00000004")
    assert run.complete_tags() == ["step00000004"] and run.prune(keep=1) == []   # never prunes what was set aside


def test_train_state_round_trips_through_client_state():
    state = TrainState(epoch=3, samples_in_epoch=4096, global_step=123, samples_seen=99,
                       data={"deal": {"world_size": 8, "workers": 10, "samples_in_epoch": 0, "basis": None},
                             "consumed": b"x\x01"})
    restored = TrainState()
    restored.load_state_dict(dict(state.state_dict(), unknown_future_key=1))
    assert restored == state


@pytest.mark.parametrize("raw,world,expected", [
    ({"train_micro_batch_size_per_gpu": 8}, 4, (8, 1)),
    ({"train_batch_size": 64}, 4, (16, 1)),
    ({"train_batch_size": 64, "gradient_accumulation_steps": 2}, 4, (8, 2)),
    ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8}, 4, (8, 2)),
])
def test_batch_sizes_resolve_as_deepspeed_does(raw, world, expected):
    ds = DeepSpeedSettings.from_dict(dict(raw, optimizer={"type": "AdamW"}), world)
    assert (ds.micro_batch, ds.grad_accum) == expected
    resolved = ds.for_deepspeed()
    assert resolved["train_micro_batch_size_per_gpu"] * resolved["gradient_accumulation_steps"] * world == \
        ds.micro_batch * ds.grad_accum * world


@pytest.mark.parametrize("raw,world,expected", [
    ({"train_batch_size": 64}, 2, (16, 2)),                                   # the micro batch it ran with
    ({"train_batch_size": 64, "gradient_accumulation_steps": 1}, 8, (8, 1)),   # the JSON fixes the accumulation
    ({"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1}, 1, (16, 4)),  # accumulation follows
    ({"train_micro_batch_size_per_gpu": 8}, 4, (8, 2)),                       # a new micro batch the JSON sets
])
def test_a_resumed_run_holds_its_global_batch_at_any_world_size(raw, world, expected):
    held = HeldBatch(global_batch=64, micro_batch=16, world_size=4)
    ds = DeepSpeedSettings.from_dict(dict(raw, optimizer={"type": "AdamW"}), world, held=held)
    assert (ds.micro_batch, ds.grad_accum) == expected and ds.micro_batch * ds.grad_accum * world == 64


@pytest.mark.parametrize("raw,world,expected", [
    ({"train_batch_size": 64}, 3, "3 processes × 16 per process (train_micro_batch_size_per_gpu) cannot make the "
                                  "global batch of 64 this run was trained with: resume on 1, 2 or 4 processes."),
    ({"train_micro_batch_size_per_gpu": 16}, 8, "resume on 1, 2 or 4 processes, or set train_micro_batch_size_per_gpu "
                                                "to 8 (or another divisor of 8) to resume on 8."),
    ({"train_batch_size": 128}, 4, "train_batch_size 128 in the DeepSpeed config is not the global batch 64 this "
                                   "run was trained with: set it back to 64"),
])
def test_a_world_size_that_cannot_hold_the_global_batch_names_those_that_can(raw, world, expected):
    held = HeldBatch(global_batch=64, micro_batch=16, world_size=4)
    with pytest.raises(ConfigError) as err:
        DeepSpeedSettings.from_dict(dict(raw, optimizer={"type": "AdamW"}), world, held=held)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_activation_checkpointing_section_is_read_and_deepspeed_gets_its_own_keys_only():
    raw = {"train_batch_size": 8, "optimizer": {"type": "AdamW"},
           "activation_checkpointing": {"blocks_per_checkpoint": 3, "cpu_checkpointing": True}}
    ds = DeepSpeedSettings.from_dict(raw, 1)
    assert (ds.blocks_per_checkpoint, ds.offload_checkpoints) == (3, True)
    assert "blocks_per_checkpoint" not in ds.for_deepspeed()["activation_checkpointing"]
    assert DeepSpeedSettings.from_dict({"train_batch_size": 8, "optimizer": {"type": "AdamW"}}, 1).blocks_per_checkpoint == 0
    with pytest.raises(ConfigError, match="contiguous_memory_optimization"):
        DeepSpeedSettings.from_dict(dict(raw, activation_checkpointing={"contiguous_memory_optimization": True}), 1)


# --- what the shipped configs' optimizer needs on a bare GPU node ------------------------------------------------

SHIPPED = REPO / "ds_configs"


@pytest.mark.parametrize("name", ["zero1.json", "zero2.json", "zero3.json"])
def test_the_shipped_configs_use_torchs_fused_adamw_which_needs_no_compiler(name, monkeypatch, tmp_path):
    raw = json.loads((SHIPPED / name).read_text())
    assert raw["optimizer"]["params"]["torch_adam"] is True and raw["optimizer"]["params"]["fused"] is True
    monkeypatch.setenv("PATH", str(tmp_path))          # no compiler, no ninja, no nvcc on this "node"
    monkeypatch.setattr("torch.utils.cpp_extension.CUDA_HOME", None)
    for cuda in (True, False):
        check_optimizer_build(raw, name, cuda)


@pytest.mark.parametrize("name,cuda,needs", [
    ("zero2_fusedadam.json", True, "FusedAdam, which DeepSpeed compiles on first use with nvcc"),
    ("zero3_offload.json", True, "DeepSpeedCPUAdam (the optimizer is offloaded to the CPU), which DeepSpeed compiles "
                                 "on first use with a C++ compiler"),
])
def test_a_deepspeed_adam_op_without_its_compiler_stops_at_start_up_in_one_sentence(name, cuda, needs, monkeypatch,
                                                                                     tmp_path):
    raw = json.loads((SHIPPED / name).read_text())
    monkeypatch.setenv("PATH", str(tmp_path))          # a node without compilers
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("torch.utils.cpp_extension.CUDA_HOME", None)
    with pytest.raises(ConfigError) as err:
        check_optimizer_build(raw, name, cuda)
    message = str(err.value)
    assert message.startswith(f"{name} selects DeepSpeed's {needs}") and "\n" not in message
    assert "is not on this machine" in message and '"torch_adam": true' in message and "ninja" in message
