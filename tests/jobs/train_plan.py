"""Run several pretrain.py runs in the same processes, as a test plan: a DeepSpeed launch costs
~20-40 s on the CI machine, a run of a tiny model a few seconds.

    deepspeed --num_gpus 2 tests/jobs/train_plan.py plan.json      (or: python tests/jobs/train_plan.py plan.json)

plan.json is a list of {"argv": [...pretrain.py flags...], "probe": "logits.pt" or null}, or of
{"argv": [...], "status": "file"}: pretrain.main's exit status written to the file (a run expected to stop). After a
run, the trained engine's logits on a fixed batch, probe_images(img_size), are saved to `probe` (eval
mode; the images cast to the engine's parameter dtype, bf16 engines included; the logits in fp32), so
tests can compare runs and exports with the live model. Optional keys, each a file rank 0 writes:
"state_after_load" and "state_at_end", every parameter's fp32 weights and Adam moments gathered whole
(DeepSpeed's safe_get_full_* helpers, every ZeRO stage) right after antismooth.startup's resume loaded a checkpoint
and after the run (its last checkpoint saved); "record", per rank (`-rank{r}` before the suffix), the
labels and sample positions of every batch the training loop took, with its epoch; "weights_each_step",
the whole fp32 weights when training starts and after every optimizer step (a list). With ANTISMOOTH_TEST_KILL_DURING_SAVE=TAG,
the last rank SIGKILLs itself while saving checkpoint TAG, after its model files and before its
optimizer shard: a crash in the middle of writing a checkpoint. With ANTISMOOTH_TEST_ENOSPC_DURING_SAVE=TAG,
writing checkpoint TAG's optimizer shard fails as on a full disk.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import pretrain  # noqa: E402
from antismooth import startup  # noqa: E402
from antismooth.distributed import leave  # noqa: E402
from antismooth.models import structure  # noqa: E402

PROBE_BATCH = 4


def probe_images(img_size: int) -> torch.Tensor:
    """The fixed fp32 batch the probe logits are taken on; tests rebuild it to check exports."""
    return torch.randn(PROBE_BATCH, 3, img_size, img_size, generator=torch.Generator().manual_seed(1234))


def kill_during_save(tag: str) -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    original = TorchCheckpointEngine.save

    def save(self, state_dict, path):
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if rank == world - 1 and f"/{tag}/" in path and path.endswith("optim_states.pt"):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, state_dict, path)

    TorchCheckpointEngine.save = save


def full_disk_during_save(tag: str) -> None:
    """Where no small filesystem can be mounted: the optimizer shard of checkpoint `tag` meets a full disk."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    original = TorchCheckpointEngine.save

    def save(self, state_dict, path):
        if f"/{tag}/" in path and path.endswith("optim_states.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return original(self, state_dict, path)

    TorchCheckpointEngine.save = save


def gathered_state(engine) -> dict[str, tuple[torch.Tensor, ...]]:
    """{name: (fp32 weights, exp_avg, exp_avg_sq)}, each whole: a collective under ZeRO-3, on every rank."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    # DeepSpeed 0.19.8's ZeRO-1/2 and bf16 optimizers link each parameter to its slice of the Adam moments once,
    # after the first group's first step: with two parameter groups (weight decay or not) the second group's
    # moments do not exist yet and stay unlinked. Link again, from the optimizer's current state.
    optimizer = engine.optimizer
    if hasattr(optimizer, "_hp_optimizer_states_linked"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    return {name: tuple(t.detach().cpu().clone() for t in (safe_get_full_fp32_param(p),
                                                         safe_get_full_optimizer_state(p, "exp_avg"),
                                                         safe_get_full_optimizer_state(p, "exp_avg_sq")))
            for name, p in engine.module.named_parameters()}


def rank() -> int:
    return int(os.environ.get("RANK", 0))


@contextlib.contextmanager
def state_after_load(path: str | None):
    """Wrap antismooth.startup.resume so that the engine's whole state is saved to `path` right after it loaded."""
    if not path:
        yield
        return
    original = startup.resume

    def resume(engine, *args, **kwargs):
        original(engine, *args, **kwargs)
        state = gathered_state(engine)
        if rank() == 0:
            torch.save(state, path)

    startup.resume = resume
    try:
        yield
    finally:
        startup.resume = original


@contextlib.contextmanager
def record_batches(path: str | None):
    """Record (epoch, labels, positions) of every batch the training loop takes: on CPU, DeviceBatches hands out
    batches lazily, so what it hands out is what is trained on."""
    if not path:
        yield
        return
    import antismooth.train as train

    records, epoch = [], {"now": None}
    original_batches, original_epoch = train.DeviceBatches, train.Trainer.train_epoch

    class Recorded(original_batches):
        def __iter__(self):
            for batch in super().__iter__():
                records.append({"epoch": epoch["now"], "labels": batch[1].tolist(), "positions": batch[2].tolist()})
                yield batch

    def train_epoch(self):
        epoch["now"] = self.state.epoch
        return original_epoch(self)

    train.DeviceBatches, train.Trainer.train_epoch = Recorded, train_epoch
    try:
        yield
    finally:
        train.DeviceBatches, train.Trainer.train_epoch = original_batches, original_epoch
        stem, suffix = os.path.splitext(path)
        Path(f"{stem}-rank{rank()}{suffix}").write_text(json.dumps(records))


@contextlib.contextmanager
def weights_each_step(path: str | None):
    """Record {name: whole fp32 weights} when Trainer.train starts and after every optimizer step (after_step)."""
    if not path:
        yield
        return
    import antismooth.train as train
    from deepspeed.utils import safe_get_full_fp32_param

    history, original_train, original_after = [], train.Trainer.train, train.Trainer.after_step

    def snapshot(engine):
        history.append({n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()})

    def train_(self):
        snapshot(self.engine)
        return original_train(self)

    def after_step(self):
        snapshot(self.engine)
        return original_after(self)

    train.Trainer.train, train.Trainer.after_step = train_, after_step
    try:
        yield
    finally:
        train.Trainer.train, train.Trainer.after_step = original_train, original_after
        if rank() == 0:
            torch.save(history, path)


def main(plan_path: str) -> None:
    if os.environ.get("ANTISMOOTH_TEST_KILL_DURING_SAVE"):
        kill_during_save(os.environ["ANTISMOOTH_TEST_KILL_DURING_SAVE"])
    if os.environ.get("ANTISMOOTH_TEST_ENOSPC_DURING_SAVE"):
        full_disk_during_save(os.environ["ANTISMOOTH_TEST_ENOSPC_DURING_SAVE"])
    for entry in json.loads(Path(plan_path).read_text()):
        if entry.get("status"):  # the run as a user starts it: pretrain.main's exit status, its message on stderr
            Path(entry["status"]).write_text(str(pretrain.main(entry["argv"])))
            continue
        with state_after_load(entry.get("state_after_load")), record_batches(entry.get("record")), \
                weights_each_step(entry.get("weights_each_step")):
            engine = pretrain.run(pretrain.parse_config(entry["argv"]))
        if entry.get("state_at_end") and engine is not None:
            state = gathered_state(engine)
            if rank() == 0:
                torch.save(state, entry["state_at_end"])
        if entry.get("probe") and engine is not None:
            engine.eval()
            dtype = next(engine.module.parameters()).dtype  # bf16 under a bf16 engine (ZeRO-3: the partitions')
            images = probe_images(structure.input_size(engine.module)[0]).to(engine.device, dtype)
            with torch.no_grad():
                logits = engine(images).float().cpu()
            if rank() == 0:
                torch.save(logits, entry["probe"])


if __name__ == "__main__":
    main(next(a for a in sys.argv[1:] if not a.startswith("--local_rank")))
    leave()   # as pretrain.py does after a finished run
