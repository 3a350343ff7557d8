"""pretrain.py in real DeepSpeed engines: real processes (deepspeed launcher, gloo on CPU), real shards
of real JPEGs, a 24-block AttnScale ViT. CPU runs are deterministic, so resumed runs are compared
with uninterrupted ones bit for bit.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import struct
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import antismooth  # noqa: F401
from antismooth import startup
from conftest import TINY_MODEL, resume_plan
from launch import ds_config, launch_plan, slow_fixture

STAGES_AND_WORLDS = [(stage, world) for stage in (1, 2, 3) for world in (1, 2)]


def scalars(run_dir: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def scalar_tags(run_dir: Path) -> list[str]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return events.Tags()["scalars"]


# --- ZeRO stages × world sizes ---------------------------------------------------------------------------

@pytest.mark.parametrize("stage,world", STAGES_AND_WORLDS)
def test_every_zero_stage_trains_and_the_loss_falls(zero_runs, stage, world):
    losses = scalars(zero_runs[stage, world].output, "train/loss")
    assert len(losses) == 6
    assert losses[-1] < 0.85 * losses[0], losses


@pytest.mark.parametrize("stage,world", STAGES_AND_WORLDS)
def test_runs_agree_with_the_one_process_zero1_run_at_the_same_global_batch(zero_runs, stage, world):
    """Full-batch steps: every run sees the same 16 images per step, so ZeRO stage and world size
    may change only the order of float sums. A rank's gradients lost, summed instead of averaged,
    or not synchronised would show in the losses and in the final logits."""
    reference = zero_runs[1, 1]
    run = zero_runs[stage, world]
    assert scalars(run.output, "train/loss") == pytest.approx(scalars(reference.output, "train/loss"), rel=1e-4)
    torch.testing.assert_close(torch.load(run.probe), torch.load(reference.probe), rtol=1e-3, atol=1e-4)


def test_gradient_accumulation_agrees_with_one_micro_batch_per_step(zero_runs):
    """Two micro-batches of 8 per optimizer step on one process: the same steps as one batch of 16."""
    reference, accumulated = zero_runs[2, 1], zero_runs["zero2-accum2", 1]
    config = json.loads((accumulated.output / "run.json").read_text())["derived"]
    assert (config["micro_batch"], config["grad_accum"], config["global_batch"]) == (8, 2, 16)
    assert scalars(accumulated.output, "train/loss") == pytest.approx(scalars(reference.output, "train/loss"), rel=1e-4)
    torch.testing.assert_close(torch.load(accumulated.probe), torch.load(reference.probe), rtol=1e-3, atol=1e-4)


def test_run_folder_describes_the_run(zero_runs):
    run = zero_runs[2, 2].output
    config = json.loads((run / "run.json").read_text())
    assert config["derived"] == {"world_size": 2, "micro_batch": 8, "grad_accum": 1, "global_batch": 16,
                                 "num_samples": 16, "steps_per_epoch": 1, "total_steps": 6, "warmup_steps": 0,
                                 "peak_lr": pytest.approx(0.05 * 16 / 512)}
    assert config["flags"]["model"] == "attnscale_tiny_24"
    assert not (run / "run.lock").exists()   # released at the end of every run of the launch
    assert config["deepspeed"]["zero_optimization"]["stage"] == 2
    assert config["model"]["model_kwargs"] == {"patch_size": 8, "embed_dim": 64, "num_heads": 4, "num_classes": 16,
                                               "img_size": 32}
    # --save-every 4 plus one per epoch, --keep 3 (the default): the newest three remain
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step00000006"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step00000004", "step00000005",
                                                                           "step00000006"]
    states = torch.load(checkpoints / "step00000006" / "mp_rank_00_model_states.pt", weights_only=False)
    assert states["universal_checkpoint_info"] == {}  # convertible by ds_to_universal (resume at another size)
    meta = json.loads((checkpoints / "step00000006" / "antismooth.json").read_text())
    assert meta["model"] == "attnscale_tiny_24" and meta["step"] == 6 and len(meta["classes"]) == 16
    log = (run / "log.txt").read_text()
    assert "global batch 16 = 8 per process × 1 accumulation × 2 processes" in log
    assert "step 6/6 | epoch 5 | loss" in log and "img/s | ETA" in log


def test_tensorboard_has_training_eval_and_technique_curves(zero_runs):
    run = zero_runs[3, 2].output
    tags = scalar_tags(run)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/img_per_s", "train/img_per_s_per_gpu",
                "train/samples_seen", "train/epoch", "train/corrupt_skipped", "eval/top1", "eval/top5", "eval/loss"):
        assert tag in tags, tag
    for measurement in ("hc_share", "delta_log_amplitude", "patch_uniformity"):  # --spectral-every 3: steps 3, 6
        assert len(scalars(run, f"spectral/{measurement}/block_23")) == 2, measurement
    lambdas = [t for t in tags if t.startswith("attnscale/lambda_abs_mean/block_")]
    assert len(lambdas) == 24
    assert scalars(run, "attnscale/lambda_abs_mean/block_00")[-1] > 0  # λ starts at 0 and learns (ZeRO-3: gathered)
    assert scalars(run, "eval/top1")[-1] > scalars(run, "eval/top1")[0]  # val = the 16 training images
    assert scalars(run, "train/lr") == sorted(scalars(run, "train/lr"), reverse=True)  # cosine, no warmup


# --- kill and resume ---------------------------------------------------------------------------------------

def _latest(run: Path) -> str | None:
    latest = run / "checkpoints" / "latest"
    return latest.read_text() if latest.is_file() else None


@slow_fixture(scope="module")
def resume_runs(sample_shards, resume_reference, tmp_path_factory):
    """The 12-step ZeRO-2 resume run on 2 processes (conftest.resume_reference) interrupted twice: SIGKILL
    from outside once a checkpoint exists, then SIGKILL of one rank in the middle of writing one."""
    work = tmp_path_factory.mktemp("resume")
    config, reference = resume_reference

    def plan(out: Path) -> list[dict]:
        return resume_plan(config, sample_shards.parent, out)

    killed = work / "killed"
    proc = launch_plan(plan(killed), 2, work, popen=True)
    deadline = time.time() + 600
    while _latest(killed) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    after_first_kill = _latest(killed)

    second = launch_plan(plan(killed), 2, work, env={"ANTISMOOTH_TEST_KILL_DURING_SAVE": "step00000008"},
                         check=False)
    after_second_kill = _latest(killed)
    # The third launch, in the same processes: step 8's save meets a full disk on rank 1 alone (the run stops on
    # every rank, as a user starts it), then the same command resumes once space is free and runs to the end.
    full_disk = [{"argv": plan(killed)[0]["argv"], "status": str(work / "full-disk.status")}]
    third = launch_plan(full_disk + plan(killed), 2, work,
                        env={"ANTISMOOTH_TEST_ENOSPC_DURING_SAVE": "step00000008@1"})
    return {"reference": reference, "killed": killed, "after_first_kill": after_first_kill,
            "after_second_kill": after_second_kill, "second_log": second, "third_log": third,
            "full_disk_status": int((work / "full-disk.status").read_text())}


def test_a_run_killed_twice_ends_with_the_weights_of_an_uninterrupted_run(resume_runs):
    assert resume_runs["after_first_kill"] in ("step00000004", "step00000006")  # killed mid-run, not at the end
    assert "Resumed from step0000000" in resume_runs["third_log"]
    reference = torch.load(resume_runs["reference"] / "probe.pt")
    resumed = torch.load(resume_runs["killed"] / "probe.pt")
    assert torch.equal(resumed, reference)
    assert scalars(resume_runs["killed"], "train/loss")[-1] == scalars(resume_runs["reference"], "train/loss")[-1]


def test_a_run_killed_twice_ends_with_the_model_ema_of_an_uninterrupted_run(resume_runs, tmp_path):
    from safetensors.torch import load_file

    from antismooth.cli import export as export_tool

    averages = []
    for name in ("killed", "reference"):
        out = tmp_path / f"{name}.safetensors"
        assert export_tool.main([str(resume_runs[name]), "--out", str(out), "--ema"]) == 0
        averages.append(load_file(out))
    assert averages[0].keys() == averages[1].keys()
    assert all(torch.equal(averages[0][k], averages[1][k]) for k in averages[0])


def test_a_checkpoint_cut_short_is_never_resumed_from(resume_runs):
    """One rank died while writing step 8's optimizer shard: `latest` must still name an older checkpoint."""
    assert "Resumed from step0000000" in resume_runs["second_log"]
    assert resume_runs["after_second_kill"] in ("step00000004", "step00000006")
    partial = resume_runs["killed"] / "checkpoints" / "step00000008"
    assert "Resumed from " + resume_runs["after_second_kill"] in resume_runs["third_log"]
    assert partial.is_dir()  # rewritten in full by the third launch
    assert _latest(resume_runs["killed"]) == "step00000012"
    assert f"Removed step00000008 from {resume_runs['killed'] / 'checkpoints'}" in resume_runs["third_log"]


def test_a_full_disk_on_one_rank_stops_every_rank_and_the_same_command_resumes(resume_runs):
    """Rank 1 alone meets a full disk writing step 8: both ranks stop with the sentence naming the node, the folder,
    the room a checkpoint needs and the intact newest checkpoint; `latest` is untouched, the partial step 8 removed,
    and the resume (the weights test above) ends as the uninterrupted run."""
    log = resume_runs["third_log"]
    assert resume_runs["full_disk_status"] == 3
    lines = [line for line in log.splitlines() if line.startswith("error: Checkpoint step00000008 could not be")]
    assert len(lines) == 2 and lines[0] == lines[1], log[-4000:]   # every rank stops, with the same sentence
    checkpoints = resume_runs["killed"] / "checkpoints"
    sentence = re.fullmatch(
        rf"error: Checkpoint step00000008 could not be written to {re.escape(str(checkpoints))} on node "
        rf"{re.escape(socket.gethostname())} \(rank 1: the disk is full\), and a checkpoint needs [0-9.]+ MiB there "
        r"\(the size of (step0000000[46])\); (step0000000[46]) is still the newest checkpoint, intact: free space "
        r"there \(or lower --keep\) and run the same command to resume from it\.", lines[0])
    assert sentence and sentence[1] == sentence[2], lines[0]
    kept = sentence[1]
    assert f"Resumed from {kept}" in log.split(lines[0])[-1]   # the resume after it: `latest` was untouched


# --- fine-tuning, eval-only, throughput (one process, under torchrun) ------------------------------------------

@slow_fixture(scope="module")
def one_process_runs(tiny_shards, tmp_path_factory):
    work = tmp_path_factory.mktemp("one-process")
    plain = timm.create_model("vit_tiny_24", img_size=64, patch_size=8, embed_dim=64, num_heads=4, num_classes=1000)
    source = work / "plain_vit.pth"
    torch.save({"model": plain.state_dict()}, source)
    matching = work / "plain_vit_16_classes.pth"  # eval-only needs the head of the data's 16 classes
    torch.save(timm.create_model("vit_tiny_24", img_size=32, patch_size=8, embed_dim=64, num_heads=4,
                                 num_classes=16).state_dict(), matching)
    config = str(ds_config(work / "zero2.json", 2))
    common = ["--deepspeed_config", config, "--data", str(tiny_shards), *TINY_MODEL]
    plan = [
        {"argv": [*common, "--output", str(work / "finetune"), "--finetune", str(source), "--max-steps", "1",
                  "--lr", "1e-9", "--warmup-lr", "1e-9", "--min-lr", "1e-9", "--no-eval"]},
        {"argv": [*common, "--model", "vit_tiny_24", "--output", str(work / "eval"), "--eval-only",
                  "--finetune", str(matching)]},
        {"argv": [*common, "--output", str(work / "throughput"), "--throughput"]},
        # The input path measured with the model: the DeiT recipe decoded and augmented on the device (here the CPU).
        {"argv": [*common, "--output", str(work / "throughput-loader"), "--throughput", "loader", "--decode", "gpu"]},
    ]
    if WANDB:   # W&B beside TensorBoard, in its offline mode (no network here): WANDB_MODE for the launch
        plan.append({"argv": [*common, "--output", str(work / "wandb"), "--max-steps", "2", "--log-every", "1",
                              "--no-eval", "--spectral-every", "2", "--report-to", "tensorboard,wandb"]})
    log = launch_plan(plan, 1, work, torchrun=True, env={"WANDB_MODE": "offline"})
    return {"work": work, "source": plain.state_dict(), "log": log}


def test_finetune_from_plain_weights_with_another_class_count_and_image_size(one_process_runs):
    work = one_process_runs["work"]
    state = torch.load(work / "finetune" / "checkpoints" / "step00000001" / "mp_rank_00_model_states.pt",
                       weights_only=False)["module"]
    source = one_process_runs["source"]
    assert state["head.weight"].shape == (16, 64)                    # new head for 16 classes
    assert state["pos_embed"].shape == (1, 1 + 16, 64)              # 8×8 grid resampled to 4×4
    assert "blocks.0.attn.lamb" in state                              # plain ViT has no λ: starts at 0
    torch.testing.assert_close(state["blocks.5.mlp.fc1.weight"], source["blocks.5.mlp.fc1.weight"], atol=1e-6, rtol=0)
    assert "dropping head.weight" in one_process_runs["log"]


def test_eval_only_and_throughput_report_and_exit(one_process_runs):
    log = one_process_runs["log"]
    assert "eval " in log and "(16 images)" in log
    lines = re.findall(r"^throughput: .*$", log, flags=re.M)
    assert len(lines) == 2 and " img/s" in lines[0]
    assert lines[0].endswith("on random data") and lines[1].endswith("on the real input path, --decode gpu")
    assert not (one_process_runs["work"] / "throughput" / "checkpoints").exists()
    assert not (one_process_runs["work"] / "throughput-loader" / "checkpoints").exists()


# --- --report-to: Weights & Biases beside TensorBoard ---------------------------------------------------------------

WANDB = importlib.util.find_spec("wandb") is not None
LEVELDB_BLOCK = 32768   # W&B's run file: a LevelDB log (blocks of 32 KiB, 7-byte record headers) of protobuf Records


def wandb_records(path: Path):
    """The protobuf records of a W&B run file (run-<id>.wandb), as W&B's sync reads them."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pieces = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        left = LEVELDB_BLOCK - pos % LEVELDB_BLOCK
        if left < 7:   # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pieces, pos = pieces + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):   # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


@pytest.mark.skipif(not WANDB, reason="wandb is not installed here: pip install 'antismooth[wandb]' to test it")
def test_report_to_wandb_logs_the_curves_and_the_resolved_settings_in_offline_mode(one_process_runs):
    run_dir = one_process_runs["work"] / "wandb"
    [run_file] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    config, history = {}, []
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            items = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in items})
        elif kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
    written = json.loads((run_dir / "run.json").read_text())
    for key in ("flags", "deepspeed", "derived", "model"):
        assert config[key] == written[key], key               # the resolved settings, as run.json holds them
    assert config["flags"]["report_to"] == "tensorboard,wandb"
    assert [h["_step"] for h in history] == [1, 2]
    assert [h["train/loss"] for h in history] == pytest.approx(scalars(run_dir, "train/loss"))  # TensorBoard's too
    assert "spectral/curves/path" in history[1]                  # the figure as an image


def test_report_to_wandb_without_the_package_stops_in_one_sentence(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)   # what an environment without the package imports
    assert startup.main(["--deepspeed_config", "x.json", "--report-to", "tensorboard,wandb"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --report-to wandb needs the wandb package, which is not "
                                               "installed: pip install 'antismooth[wandb]', or drop wandb from "
                                               "--report-to.")


# --- start-up errors -----------------------------------------------------------------------------------------

def _write(path: Path, content: dict) -> str:
    path.write_text(json.dumps(content))
    return str(path)


GOOD_JSON = {"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}


@pytest.mark.parametrize("case,expected", [
    ("missing_data", "does not exist: build shards first"),
    ("no_manifest", "has no train.json manifest"),
    ("unknown_model", "Unknown model 'attnscale_smal_24'. Did you mean attnscale_small_24"),
    ("missing_json", "DeepSpeed config"),
    ("lr_in_json", "sets optimizer.params.lr, but the learning rate comes from --lr"),
    ("scheduler_in_json", "has a scheduler section"),
    ("batch_not_dividing", "does not divide into 2 processes"),
    ("batch_mismatch", "is not train_micro_batch_size_per_gpu 4"),
    ("too_few_samples", "fewer than one global batch"),
    ("missing_finetune", "--finetune"),
    ("eval_only_without_weights", "--eval-only evaluates given weights"),
    ("partition_activations", "partition_activations"),
    ("val_other_classes", "numbers its labels by another class list"),
    ("compile_zero3", "--compile cannot run under ZeRO-3"),
    ("decode_gpu_color_jitter", "--decode gpu does not apply ColorJitter"),
])
def test_bad_startup_inputs_stop_with_one_clear_sentence(case, expected, tiny_shards, tmp_path, monkeypatch, capsys):
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)  # rank 0 of a 2-process launch
    data, model = str(tiny_shards), "attnscale_tiny_24"
    config = _write(tmp_path / "ok.json", GOOD_JSON)
    extra = []
    if case == "missing_data":
        data = str(tmp_path / "nowhere")
    elif case == "no_manifest":
        data = str(tmp_path)
    elif case == "unknown_model":
        model = "attnscale_smal_24"
    elif case == "missing_json":
        config = str(tmp_path / "nope.json")
    elif case == "lr_in_json":
        config = _write(tmp_path / "c.json", {**GOOD_JSON, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    elif case == "scheduler_in_json":
        config = _write(tmp_path / "c.json", {**GOOD_JSON, "scheduler": {"type": "WarmupLR"}})
    elif case == "batch_not_dividing":
        config = _write(tmp_path / "c.json", {**GOOD_JSON, "train_batch_size": 9})
    elif case == "batch_mismatch":
        config = _write(tmp_path / "c.json", {**GOOD_JSON, "train_micro_batch_size_per_gpu": 4,
                                              "gradient_accumulation_steps": 2})
    elif case == "too_few_samples":
        config = _write(tmp_path / "c.json", {**GOOD_JSON, "train_batch_size": 64})
    elif case == "missing_finetune":
        extra = ["--finetune", str(tmp_path / "nope.pth")]
    elif case == "eval_only_without_weights":
        extra = ["--eval-only"]
    elif case == "val_other_classes":  # shards of an older build: val/ numbered by its own 15 folders
        import shutil
        data = str(shutil.copytree(tiny_shards, tmp_path / "shards"))
        val = json.loads((tmp_path / "shards" / "val.json").read_text())
        val.update(classes=val["classes"][1:], num_classes=len(val["classes"]) - 1)
        (tmp_path / "shards" / "val.json").write_text(json.dumps(val))
    elif case == "compile_zero3":
        config = _write(tmp_path / "c.json", {**GOOD_JSON, "zero_optimization": {"stage": 3}})
        extra = ["--compile"]
    elif case == "partition_activations":
        config = _write(tmp_path / "c.json", {**GOOD_JSON, "activation_checkpointing": {"partition_activations": True}})
    elif case == "decode_gpu_color_jitter":   # colour jitter without RandAugment: an op the device path lacks
        extra = ["--decode", "gpu", "--aa", "none"]
    out = tmp_path / "run"
    code = startup.main(["--deepspeed_config", config, "--data", data, "--model", model, "--output", str(out),
                         *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and expected in err and "\n" not in err, err
    assert not out.exists()  # stopped before anything was written
