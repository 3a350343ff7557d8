"""What only a GPU can show: collectives under NCCL, AttnScale on flash attention, pretrain.py on a GPU.

NCCL groups serve CUDA tensors alone, so a helper that builds a CPU tensor passes every gloo test and
crashes on GPUs; flash attention runs only on a GPU and only in 16-bit; bf16 engines, the per-epoch
evaluation and the export run here on the device they are meant for. Skipped without CUDA, except under
bench/gpu_check.sh (ANTISMOOTH_REQUIRE_GPU=1), where they fail.

    python -m pytest tests/gpu -x -q          (bench/gpu_check.sh runs this, then the demo and benches)

One GPU allows a world of one: NCCL refuses two ranks on the same GPU. In a world of one the
antismooth.distributed helpers skip their collectives, so one test makes them take the path they
take with several ranks, on a real NCCL group.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist

import antismooth  # noqa: F401  (registers the zoo)
from antismooth.models import set_fused_attn
from jobs.train_plan import probe_images  # the batch each run's probe logits were taken on
from conftest import BF16, FULL_BATCH, TINY_MODEL, ZERO3_REGATHER
from launch import REPO, clean_env, ds_config, free_port, launch_plan


# bench/gpu_check.sh sets ANTISMOOTH_REQUIRE_GPU=1: there a GPU that torch cannot see is a failure, not 12 skips
# that read as a pass.
if os.environ.get("ANTISMOOTH_REQUIRE_GPU") == "1" and not torch.cuda.is_available():
    pytest.fail(f"ANTISMOOTH_REQUIRE_GPU=1 but torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no "
                "CUDA GPU: run tests/gpu on the GPU machine, or unset ANTISMOOTH_REQUIRE_GPU to skip them.",
                pytrace=False)
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# --- collectives under NCCL ----------------------------------------------------------------------------------

@pytest.fixture
def nccl_world_of_one():
    """This process as an NCCL group of one on GPU 0, left again after the test."""
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            device_id=device)
    yield device
    dist.destroy_process_group()


def test_the_helpers_run_their_collectives_on_the_gpu_under_nccl(nccl_world_of_one, monkeypatch, tmp_path):
    from antismooth import distributed

    assert distributed.collective_device() == nccl_world_of_one
    # With one rank the helpers return early; make them run the collectives they run with several.
    monkeypatch.setattr(distributed, "_joined", lambda: True)
    assert distributed.all_reduce([1.0, 2.5]) == [1.0, 2.5]
    assert distributed.all_reduce([3.0], op="max") == [3.0]
    assert distributed.broadcast_object({"tag": "step00000030"}) == {"tag": "step00000030"}
    assert distributed.all_gather_object(("node", 0)) == [("node", 0)]
    distributed.barrier()
    distributed.check_shared_folder(tmp_path)
    assert list(tmp_path.iterdir()) == []  # its marker file is gone again


def test_an_nccl_group_refuses_cpu_tensors(nccl_world_of_one):
    """The crash the helpers are built to avoid: a CPU tensor handed to an NCCL collective."""
    with pytest.raises(RuntimeError, match="(?i)cpu"):
        dist.all_reduce(torch.ones(1))


# init_distributed as pretrain.py calls it: DeepSpeed's init, which picks NCCL on a GPU. In a process of its own,
# since a process joins one default group at a time.
DEEPSPEED_CHILD = """
import json, torch, torch.distributed as dist, deepspeed
from antismooth import distributed
env = distributed.init_distributed()
ones = torch.ones(2, device=distributed.collective_device())
dist.all_reduce(ones)
print(json.dumps({"backend": dist.get_backend(), "env_backend": env.backend, "device": str(env.device),
                  "collective_device": str(distributed.collective_device()), "deepspeed_comm": deepspeed.comm.is_initialized(),
                  "sum": ones.tolist(), "helper": distributed.all_reduce([1.5]), "world": dist.get_world_size()}))
dist.destroy_process_group()
"""


def test_init_distributed_joins_deepspeeds_nccl_group_on_the_gpu():
    out = subprocess.run([sys.executable, "-c", DEEPSPEED_CHILD], cwd=REPO, env=clean_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "backend": "nccl", "env_backend": "nccl", "device": "cuda:0", "collective_device": "cuda:0",
        "deepspeed_comm": True, "sum": [1.0, 1.0], "helper": [1.5], "world": 1}


# --- AttnScale on flash attention ----------------------------------------------------------------------------

def _output_and_grads(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out.float() * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    return out.detach().float(), {n: p.grad.detach().float() for n, p in model.named_parameters()}


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).norm() / reference.norm()).item()


def _errors(result: tuple, reference: tuple) -> dict[str, float]:
    """Relative errors against the reference: the output, all gradients together, and the λ gradients together."""
    (out, grads), (ref_out, ref_grads) = result, reference
    lambdas = [n for n in ref_grads if n.endswith(".attn.lamb")]

    def flat(g: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
        return torch.cat([g[n].flatten() for n in names])

    return {"output": _relative_error(out, ref_out),
            "gradients": _relative_error(flat(grads, list(ref_grads)), flat(ref_grads, list(ref_grads))),
            "lambda gradients": _relative_error(flat(grads, lambdas), flat(ref_grads, lambdas))}


def test_fused_attnscale_matches_the_explicit_formula_in_bf16_on_flash_attention():
    """The fused form (flash SDPA, then (1+λ)·AV − λ·mean(V)) is exact algebra: in bf16 it must be as close to
    an fp32 reference as the official explicit form is, outputs, all gradients and λ's own gradients."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = timm.create_model("attnscale_small_12", num_classes=100).cuda()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".attn.lamb"):
                p.copy_(torch.randn_like(p) * 0.5)  # far from their zero init, so AttnScale matters
    x = torch.randn(4, 3, 224, 224, device="cuda")
    reference = _output_and_grads(set_fused_attn(model, False), x)  # fp32, explicit
    model.bfloat16()  # as a bf16 DeepSpeed engine holds it
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash attention cannot run these inputs
        fused = _output_and_grads(set_fused_attn(model, True), x.bfloat16())
    explicit = _output_and_grads(set_fused_attn(model, False), x.bfloat16())

    fused_errors, explicit_errors = _errors(fused, reference), _errors(explicit, reference)
    for key in fused_errors:
        assert fused_errors[key] < 0.1, (key, fused_errors, explicit_errors)
        assert fused_errors[key] < 2 * explicit_errors[key] + 1e-3, (key, fused_errors, explicit_errors)


# --- pretrain.py on one GPU ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_runs(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """TINY_MODEL trained full-batch for 6 steps, evaluated after each epoch, on one GPU: bf16 ZeRO-2 and bf16
    ZeRO-3 re-gathering its parameters in every forward; each exported, then evaluated by --eval-only."""
    from antismooth.export import export_checkpoint

    work = tmp_path_factory.mktemp("gpu-runs")
    configs = {"zero2": ds_config(work / "zero2.json", 2, **BF16),
               "zero3": ds_config(work / "zero3.json", 3, **BF16, **ZERO3_REGATHER)}
    outputs = {name: work / name for name in configs}
    plan = [{"argv": ["--deepspeed_config", str(config), "--data", str(tiny_shards), "--output", str(outputs[name]),
                      *TINY_MODEL, *FULL_BATCH, "--save-every", "4"], "probe": str(outputs[name] / "probe.pt")}
            for name, config in configs.items()]
    train_log = launch_plan(plan, 1, work)
    exports = {name: export_checkpoint(out, work / f"{name}.safetensors", dtype="bf16").path
               for name, out in outputs.items()}
    eval_plan = [{"argv": ["--deepspeed_config", str(configs[name]), "--data", str(tiny_shards), "--output",
                           str(work / f"eval-{name}"), *TINY_MODEL, "--eval-only", "--finetune", str(path)]}
                 for name, path in exports.items()]
    eval_log = launch_plan(eval_plan, 1, work)
    return {"outputs": outputs, "exports": exports, "train_log": train_log, "eval_log": eval_log}


# The first run of a plan exports RANK/WORLD_SIZE for DeepSpeed, so the second one reads an "env" launch.
WORLD_LINE = re.compile(r"1 process on 1 node \(\w+ launch, nccl backend\)")


def test_pretrain_runs_on_the_gpu_under_nccl_in_bf16(gpu_runs):
    log = gpu_runs["train_log"]
    assert len(WORLD_LINE.findall(log)) == 2, log[-4000:]
    assert log.count("ranks 0 on cuda:0") == 2
    assert "bfloat16, ZeRO-2" in log and "bfloat16, ZeRO-3" in log


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_the_loss_falls_and_every_epoch_is_evaluated(gpu_runs, name):
    from test_train import scalars

    output = gpu_runs["outputs"][name]
    losses = scalars(output, "train/loss")
    assert len(losses) == 6 and losses[-1] < 0.85 * losses[0], losses
    top1 = scalars(output, "eval/top1")
    assert len(top1) == 6 and all(0 <= t <= 100 for t in top1), top1  # the eval's reduce ran under NCCL


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_the_export_reproduces_the_live_gpu_model(gpu_runs, name):
    from antismooth.export import create_model_from_weights

    model, _ = create_model_from_weights(gpu_runs["exports"][name])
    model = model.cuda().bfloat16().eval()
    images = probe_images(model.patch_embed.img_size[0]).cuda().bfloat16()
    live = torch.load(gpu_runs["outputs"][name] / "probe.pt", weights_only=True)
    with torch.no_grad():
        logits = model(images).float().cpu()
    torch.testing.assert_close(logits, live, rtol=0, atol=2e-2)


def test_eval_only_runs_under_nccl(gpu_runs):
    lines = re.findall(r"eval (\S+): top-1 ([\d.]+) %.*\((\d+) images\)", gpu_runs["eval_log"])
    assert sorted(Path(path).stem for path, _, _ in lines) == ["zero2", "zero3"], gpu_runs["eval_log"][-4000:]
    assert all(count == "16" for _, _, count in lines)
    assert len(WORLD_LINE.findall(gpu_runs["eval_log"])) == 2


# --- the GPU decode path: nvJPEG on a side stream, augmentation on the device ----------------------------------

def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(255 ** 2 / mse)


@pytest.mark.parametrize("aa", [None, "rand-m9-mstd0.5-inc1"])
def test_the_device_path_on_the_gpu_gives_what_it_gives_on_the_cpu(sample_images, aa):
    """nvJPEG (TorchCodec or torchvision) against libjpeg-turbo on the same bytes and parameters: the decoders'
    IDCTs differ by a level or two, which RandAugment's thresholds (Posterize, Solarize) can amplify; counted."""
    from antismooth.data import decode
    from antismooth.data.pipeline import AugmentConfig, seed_augmentation, train_transform

    transform = train_transform(AugmentConfig(input_size=224, auto_augment=aa, color_jitter=None))
    files = [p.read_bytes() for p in sorted((sample_images / "train").rglob("*.JPEG"))]
    samples = [decode.worker_sample(data, transform, k, seed_augmentation) for k, data in enumerate(files)]
    batch = decode.JpegBatch(*map(list, zip(*samples, strict=True)))
    stats = decode.DecodeStats()
    on_gpu = decode.decode_batch(batch.pin_memory(), "cuda", stats)
    again = decode.decode_batch(batch.pin_memory(), "cuda")
    torch.cuda.synchronize()
    on_cpu = decode.decode_batch(batch, "cpu")
    assert on_gpu.is_cuda and on_gpu.shape == (len(files), 3, 224, 224) and torch.equal(on_gpu, again)
    assert stats.device == len(files) - stats.worker_cpu and stats.refused == 0, str(stats)
    psnrs = sorted(_psnr(g, c) for g, c in zip(on_gpu.cpu(), on_cpu, strict=True))
    print(f"decoder {decode.decoder_backend()}, RandAugment {aa}: PSNR min {psnrs[0]:.1f}, "
          f"median {psnrs[len(psnrs) // 2]:.1f} dB")
    assert psnrs[len(psnrs) // 2] >= 35 and psnrs[0] >= (30 if aa is None else 15)
