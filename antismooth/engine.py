"""DeepSpeed glue: parameter groups, the learning-rate schedule, activation checkpointing as a
policy applied to a built model, and the trainer state (saved by antismooth.checkpoint).

Nothing here parses flags or prints; pretrain.py wires these pieces together.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
from timm.models import checkpoint_seq
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler

from .config import Derived, TrainConfig
from .models import structure

__all__ = ["param_groups", "build_scheduler", "apply_activation_checkpointing", "CheckpointedBlocks",
           "TrainState", "TrainingStopped", "compile_blocks", "describe_optimizer", "restore_functional_linear"]

_logger = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run cannot go on safely (it diverged, a checkpoint could not be written); the message says which
    checkpoint is kept and what to do."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """timm's split: no weight decay for 1-D parameters (norms, biases, AttnScale λ, FeatScale s_d/s_h)
    and for the model's `no_weight_decay()` names (position embedding, class token)."""
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, derived: Derived) -> CosineLRScheduler:
    """DeiT's schedule per optimizer step: linear warmup from warmup_lr, then cosine to min_lr.

    The peak lr is written into the groups first; the scheduler is stateless given the step
    (`step_update(global_step)`), so a resumed run needs only the step count.
    """
    for group in optimizer.param_groups:
        group["lr"] = derived.peak_lr
        group.pop("initial_lr", None)
    # warmup_prefix: the cosine starts at the peak when warmup ends (timm's default lets it start at step 0
    # under the warmup, so a short run never reaches the peak lr it logs).
    # timm warns "Cosine annealing scheduler will have no effect" when the cosine is a single step (a run no
    # longer than its warmup); pretrain's start-up summary says what that means for the run instead.
    timm_logger = logging.getLogger("timm.scheduler.cosine_lr")
    level = timm_logger.level
    timm_logger.setLevel(logging.ERROR)
    try:
        scheduler = CosineLRScheduler(optimizer, t_initial=max(1, derived.total_steps - derived.warmup_steps),
                                      lr_min=config.schedule.min_lr, warmup_t=derived.warmup_steps,
                                      warmup_lr_init=config.schedule.warmup_lr, warmup_prefix=True, t_in_epochs=False)
    finally:
        timm_logger.setLevel(level)
    scheduler.step_update(0)
    return scheduler


class CheckpointedBlocks(nn.Sequential):
    """The model's transformer blocks, recomputed in backward in segments of `every` blocks.

    Same children under the same names as the nn.Sequential it replaces, so state_dict keys are
    unchanged (`blocks.3.attn.qkv.weight`) and checkpoints and exports stay plain. Only a segment's
    input is kept per segment; non-reentrant checkpointing restores the RNG state (drop path) on
    recompute, and works with ZeRO-3's gathered parameters.
    """

    def __init__(self, blocks: nn.Sequential, every: int, offload: bool = False) -> None:
        super().__init__(*blocks)
        self.every = every
        self.offload = offload

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        if not self.offload:
            return checkpoint_seq(self, x, every=self.every, use_reentrant=False)
        # The segment inputs are the only tensors kept through the saved-tensor hooks here (what a
        # segment saves inside is the checkpoint's own business), so this moves exactly them to host
        # memory: the device then holds no per-block activations, whatever the depth.
        with torch.autograd.graph.save_on_cpu(pin_memory=x.is_cuda):
            return checkpoint_seq(self, x, every=self.every, use_reentrant=False)


def apply_activation_checkpointing(model: nn.Module, blocks_per_checkpoint: int, offload: bool = False) -> nn.Module:
    """Checkpoint each sequence of blocks the model's structure names (ViT's blocks, CaiT's self-attention stage,
    each Swin stage's blocks) every `blocks_per_checkpoint` blocks, keeping the segment inputs in host memory
    with `offload` (DeepSpeed's `cpu_checkpointing`). A segment never spans two sequences."""
    if blocks_per_checkpoint <= 0:
        return model
    try:
        sequences = structure.block_sequences(model)
    except ValueError as err:
        raise ValueError(f"{err} Turn activation_checkpointing off in the DeepSpeed config.") from None
    for parent, name in sequences:
        setattr(parent, name, CheckpointedBlocks(getattr(parent, name), blocks_per_checkpoint, offload))
    return model


def compile_blocks(blocks: Sequence[nn.Module]) -> None:
    """torch.compile each transformer block in place, torchtitan's regional compile: blocks of one class and shape
    share one graph (their parameters are graph inputs), so compile time stays flat with depth. `Module.compile`
    keeps the modules and their state_dict keys as they are (no `_orig_mod.` prefix, unlike torch.compile(model)),
    so checkpoints, exports and the EMA see the same names; activation checkpointing's segments call the compiled
    blocks, and the recompute in backward runs the same graph."""
    for block in blocks:
        block.compile(fullgraph=True)


def describe_optimizer(engine) -> str:
    """The optimizer DeepSpeed built from the JSON, for the start-up log: torch's AdamW (fused or not), or one of
    DeepSpeed's compiled ops (FusedAdam, DeepSpeedCPUAdam)."""
    optimizer = engine.basic_optimizer
    if type(optimizer).__module__.startswith("torch.optim"):
        return f"torch.optim.{type(optimizer).__name__} ({'fused' if optimizer.defaults.get('fused') else 'not fused'})"
    return f"DeepSpeed's {type(optimizer).__name__}"


@dataclass
class TrainState:
    """Where training stands, saved as DeepSpeed's client_state so a restart continues sample-exactly."""
    epoch: int = 0
    samples_in_epoch: int = 0        # global samples of this epoch consumed (a multiple of the global batch)
    global_step: int = 0             # optimizer steps
    samples_seen: int = 0
    corrupt_skipped: int = 0
    # The epoch's data position (antismooth.data.pipeline.EpochPosition.state_dict()): which copies of which
    # samples were trained on, independent of the world size; {} at an epoch's start.
    data: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if hasattr(self, key):
                setattr(self, key, value)


def restore_functional_linear() -> bool:
    """Put torch's own torch.nn.functional.linear back once an engine's run is over; True if it had been replaced.

    A ZeRO-3 engine replaces it for the whole process with DeepSpeed's memory-efficient linear
    (zero/partition_parameters.py, _enable_mem_efficient_linear: "This will persist unless manually reset"),
    which adds the bias in place; torch 2.11's compiler then silently zeroes the gradients of compiled blocks
    (pytorch/pytorch#180642) in any later --compile run of the same process (a notebook, a sweep, a test plan).
    DeepSpeed keeps the original where DeepCompile restores it from (compile/init_z3.py)."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    original = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
    if original is None or torch.nn.functional.linear is original:
        return False
    torch.nn.functional.linear = original
    return True

