"""Run several pretrain.py runs in the same processes, as a test plan: a DeepSpeed launch costs
~20-40 s on the CI machine, a run of a tiny model a few seconds.

    deepspeed --num_gpus 2 tests/jobs/train_plan.py plan.json      (or: python tests/jobs/train_plan.py plan.json)

plan.json is a list of {"argv": [...pretrain.py flags...], "probe": "logits.pt" or null}, or of
{"argv": [...], "status": "file"}: antismooth.startup.main's exit status written to the file (a run expected to stop). After a
run, the trained engine's logits on a fixed batch, probe_images(img_size), are saved to `probe` (eval
mode; the images cast to the engine's parameter dtype, bf16 engines included; the logits in fp32), so
tests can compare runs and exports with the live model. Optional keys, each a file rank 0 writes:
"state_after_load" and "state_at_end", every parameter's fp32 weights and Adam moments gathered whole
(DeepSpeed's safe_get_full_* helpers, every ZeRO stage) right after antismooth.startup's resume loaded a checkpoint
and after the run (its last checkpoint saved); "record", per rank (`-rank{r}` before the suffix), the
labels and sample positions of every batch the training loop took, with its epoch; "weights_each_step",
the whole fp32 weights when training starts and after every optimizer step (a list); "linear_after", the
torch.nn.functional.linear the process holds once the run is over (module.name). With ANTISMOOTH_TEST_KILL_DURING_SAVE=TAG,
the last rank SIGKILLs itself while saving checkpoint TAG, after its model files and before its
optimizer shard: a crash in the middle of writing a checkpoint. With ANTISMOOTH_TEST_ENOSPC_DURING_SAVE=TAG (or
TAG@RANK: on that rank only), writing checkpoint TAG's optimizer shard fails as on a full disk, once per process. With ANTISMOOTH_TEST_SIGNAL_DURING_SAVE=PATH_PART, the last rank sends itself
SIGUSR2 while writing that checkpoint's optimizer shard. An entry's "signal_in_eval_at_epoch": N sends SIGUSR2 to the
last rank as the evaluation at the end of epoch N starts.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from antismooth import startup
from antismooth.distributed import leave
from antismooth.models import structure
from antismooth.train import Trainer

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


def full_disk_during_save(spec: str) -> None:
    """Where no small filesystem can be mounted: the optimizer shard of checkpoint TAG meets a full disk, once per
    process (a later plan entry is the resume after space was freed). `spec` is TAG, or TAG@RANK for one rank only
    (a full disk on one node)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    tag, _, only_rank = spec.partition("@")
    if only_rank and int(only_rank) != rank():
        return
    original = TorchCheckpointEngine.save
    fired = []

    def save(self, state_dict, path):
        if f"/{tag}/" in path and path.endswith("optim_states.pt") and not fired:
            fired.append(path)
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return original(self, state_dict, path)

    TorchCheckpointEngine.save = save


def signal_during_save(path_part: str) -> None:
    """The last rank sends itself SIGUSR2 while writing the optimizer shard of the checkpoint whose path holds
    `path_part` (e.g. "run/checkpoints/step00000004"): a signal in the middle of a save."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    original = TorchCheckpointEngine.save

    def save(self, state_dict, path):
        if rank() == int(os.environ["WORLD_SIZE"]) - 1 and path_part in path and path.endswith("optim_states.pt"):
            os.kill(os.getpid(), signal.SIGUSR2)
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


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


@dataclass
class PlanTrainer(Trainer):
    """The training loop, observed through its override points for one plan entry's optional records."""
    entry: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.batches: list[dict] = []     # "record": (epoch, labels, positions) of every batch the loop took
        self.weights: list[dict] = []     # "weights_each_step": whole fp32 weights at the start and after each step

    def after_resume(self, tag: str) -> None:
        if self.entry.get("state_after_load"):
            state = gathered_state(self.engine)
            if rank() == 0:
                torch.save(state, self.entry["state_after_load"])

    def before_train(self) -> None:
        self.snapshot()

    def on_batch(self, images, targets, positions) -> None:
        if self.entry.get("record"):
            self.batches.append({"epoch": self.state.epoch, "labels": targets.tolist(),
                                 "positions": positions.tolist()})

    def after_step(self) -> None:
        self.snapshot()

    def evaluate(self) -> None:
        if self.entry.get("signal_in_eval_at_epoch") == self.state.epoch and rank() == world_size() - 1:
            os.kill(os.getpid(), signal.SIGUSR2)   # the evaluation below runs with this rank's flag set
        super().evaluate()

    def snapshot(self) -> None:
        if self.entry.get("weights_each_step"):
            from deepspeed.utils import safe_get_full_fp32_param

            self.weights.append({n: safe_get_full_fp32_param(p).detach().clone()
                                 for n, p in self.engine.module.named_parameters()})

    def write_records(self) -> None:
        """What was recorded, also when the run stopped: "record" per rank, "weights_each_step" on rank 0."""
        if self.entry.get("record"):
            stem, suffix = os.path.splitext(self.entry["record"])
            Path(f"{stem}-rank{rank()}{suffix}").write_text(json.dumps(self.batches))
        if self.entry.get("weights_each_step") and rank() == 0:
            torch.save(self.weights, self.entry["weights_each_step"])


def plan_trainer(entry: dict):
    def make_trainer(**fields) -> PlanTrainer:
        return PlanTrainer(entry=entry, **fields)
    return make_trainer


def run_entry(entry: dict):
    """One plan entry's run with a PlanTrainer; its records written however the run ends."""
    trainers: list[PlanTrainer] = []

    def make_trainer(**fields) -> PlanTrainer:
        trainers.append(PlanTrainer(entry=entry, **fields))
        return trainers[-1]

    try:
        return startup.run(startup.parse_config(entry["argv"]), make_trainer=make_trainer)
    finally:
        for trainer in trainers:
            trainer.write_records()


def main(plan_path: str) -> int:
    """Run the plan's entries in order; the exit status of the last one (0 after an entry run by run_entry)."""
    if os.environ.get("ANTISMOOTH_TEST_KILL_DURING_SAVE"):
        kill_during_save(os.environ["ANTISMOOTH_TEST_KILL_DURING_SAVE"])
    if os.environ.get("ANTISMOOTH_TEST_SIGNAL_DURING_SAVE"):
        signal_during_save(os.environ["ANTISMOOTH_TEST_SIGNAL_DURING_SAVE"])
    if os.environ.get("ANTISMOOTH_TEST_ENOSPC_DURING_SAVE"):
        full_disk_during_save(os.environ["ANTISMOOTH_TEST_ENOSPC_DURING_SAVE"])
    status = 0
    for entry in json.loads(Path(plan_path).read_text()):
        if entry.get("pid"):   # for a test that stops or kills one rank
            Path(f"{entry['pid']}-rank{rank()}").write_text(str(os.getpid()))
        if entry.get("status"):  # the run as a user starts it: startup.main's exit status, its message on stderr
            status = startup.main(entry["argv"], plan_trainer(entry))
            Path(entry["status"]).write_text(str(status))
            continue
        status = 0
        engine = run_entry(entry)
        if entry.get("linear_after") and rank() == 0:   # what the next run of this process will call
            linear = torch.nn.functional.linear
            Path(entry["linear_after"]).write_text(f"{linear.__module__}.{linear.__name__}")
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
    return status


if __name__ == "__main__":
    exit_status = main(next(a for a in sys.argv[1:] if not a.startswith("--local_rank")))
    if exit_status == 0:
        leave()   # as pretrain.py does after a finished run
    sys.exit(exit_status)
