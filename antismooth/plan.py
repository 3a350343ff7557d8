"""Plan a run before launching it: the per-rank memory of a model under a DeepSpeed config, part by part.

Model states follow the ZeRO paper's partitioning (Rajbhandari et al. 2020, Fig. 1) as DeepSpeed 0.19.8 does it:
weights and gradients in the config's dtype, Adam's m and v and an fp32 master copy (DeepSpeed keeps one even
for fp32 weights) partitioned over the ranks from ZeRO-1 on, gradients from ZeRO-2 on, weights under ZeRO-3.
DeepSpeed's own buffers come from the config's bucket sizes. Activations are not a formula per layer: they are
measured once per model shape by a real CPU forward + backward of the model at reduced depth (1 and 2 blocks)
and batch (1 and 2; the stem also at 4), under the exact allocator count of antismooth.memory, split into the
backward's phases (head, blocks, stem) by marker allocations; each phase's peak is fitted as
a + b·batch + c·blocks + d·batch·blocks and the step's activation peak is the highest phase at the run's micro
batch and depth, so any model family that antismooth.models.structure describes works unchanged (its depth is
where the family grows: all of a ViT's blocks, Swin's stage 3; the other stages' blocks are part of a). The
optimizer step's fp32 gradient partition and temporaries and the rule peak = held + max(backward, step) were
found on real engines (tests/test_plan.py checks them, within 15 %).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Optional, Union

import torch

from .config import DeepSpeedSettings
from .models import structure

__all__ = ["ModelShape", "ActivationProfile", "StepProfile", "MemoryPlan", "model_shape", "activation_profile", "phase_peaks",
           "forget_activation_profiles", "plan_memory",
           "alternatives", "DEFAULT_BUCKET", "StepTimePlan", "forward_flops", "plan_step_time"]

_logger = logging.getLogger(__name__)

DEFAULT_BUCKET = 500_000_000          # DeepSpeed's reduce_bucket_size / allgather_bucket_size default (elements)
DEFAULT_PREFETCH = 50_000_000         # stage3_prefetch_bucket_size default
DEFAULT_PERSISTENCE = 100_000         # stage3_param_persistence_threshold default
ADAM_STATE_BYTES = 8                  # m and v in fp32, whatever the weights' dtype
MASTER_BYTES = 4                      # DeepSpeed's fp32 master partition
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 2**30

_profiles: dict[str, "StepProfile"] = {}   # per model shape: measured once per process


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a model's parameters: counts, not tensors (built on the meta device)."""
    num_params: int
    depth: int                         # blocks where the depth grows (structure.depth: ViT all, Swin stage 3)
    largest_block_params: int          # ZeRO-3 gathers one block at a time
    persistent_params: int             # ZeRO-3: tensors below the persistence threshold stay whole on every rank
    input_size: int                    # the model's image size


@dataclass(frozen=True)
class ActivationProfile:
    """Activation peak of one forward + backward above what was held, in bytes, as
    a + b·batch + c·blocks + d·batch·blocks (fitted exactly at batch 1, 2 × blocks 1, 2)."""
    a: float
    b: float
    c: float
    d: float

    def peak(self, batch: int, blocks: int) -> float:
        return self.a + self.b * batch + self.c * blocks + self.d * batch * blocks


@dataclass
class MemoryPlan:
    """Per-rank bytes of one training step, by part. Three kinds of part: held all along (the model states),
    alive in the backward pass (activations, gradient buckets, gathered ZeRO-3 parameters) and alive in the
    optimizer step (the fp32 gradient partition, the optimizer's temporaries). The planned peak is
    held + max(backward, step): measured on real engines, the activations are freed before the step's
    gradient partition fills (tests/test_plan.py)."""
    model: str
    world_size: int
    zero_stage: int
    dtype: str
    micro_batch: int
    input_size: int
    checkpointing: int                 # blocks per checkpoint, 0: off
    offload_optimizer: bool
    num_params: int
    parameters: float                  # held: weights in the config's dtype (ZeRO-3: the partition + persistent ones)
    gradients: float                   # held: ZeRO-3's gradient partition in the config's dtype
    optimizer_moments: float           # held: Adam's m and v, fp32
    master_copy: float                 # held: the fp32 master partition
    reduce_bucket: float               # held: ZeRO-3's preallocated reduce bucket
    buffers: float                     # backward: ZeRO-1/2 reduce buckets (two with overlap_comm), ZeRO-3 gathered params
    activations: float                 # backward: activation peak of one micro batch
    activations_per_block: float       # of activations: what grows with depth (stored block inputs when checkpointed)
    activations_unchecked: float       # the same micro batch without checkpointing, for comparison
    activations_checked: float         # ... and with checkpointing every block
    step_gradients: float              # step: the fp32 gradient partition the optimizer reads
    step_temporaries: float            # step: torch's foreach AdamW's temporaries; fused kernels have none
    gpu_memory: Optional[float] = None

    @property
    def model_states(self) -> float:
        return self.parameters + self.gradients + self.optimizer_moments + self.master_copy

    @property
    def held(self) -> float:
        return self.model_states + self.reduce_bucket

    @property
    def backward(self) -> float:
        return self.activations + self.buffers

    @property
    def step(self) -> float:
        return self.step_gradients + self.step_temporaries

    @property
    def total(self) -> float:
        return self.held + max(self.backward, self.step)

    @property
    def fits(self) -> Optional[bool]:
        return None if self.gpu_memory is None else self.total <= self.gpu_memory

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), model_states=self.model_states, held=self.held, backward=self.backward,
                    step=self.step, total=self.total, fits=self.fits)


def _settings(ds: Union[DeepSpeedSettings, dict], world_size: int) -> DeepSpeedSettings:
    return ds if isinstance(ds, DeepSpeedSettings) else DeepSpeedSettings.from_dict(ds, world_size)


def _build(model_name: str, model_kwargs: dict[str, Any], input_size: Optional[int], **extra: Any) -> torch.nn.Module:
    import timm

    import antismooth.models  # noqa: F401  (registers the zoo)

    kwargs = dict(model_kwargs, **extra)
    if input_size:
        kwargs["img_size"] = input_size
    return timm.create_model(model_name, **kwargs)


_shapes: dict[str, ModelShape] = {}


def model_shape(model_name: str, model_kwargs: dict[str, Any], input_size: Optional[int] = None,
                persistence_threshold: int = DEFAULT_PERSISTENCE) -> ModelShape:
    """Parameter counts of the model, built on the meta device (no memory, no init cost; cached)."""
    key = json.dumps([model_name, model_kwargs, input_size, persistence_threshold], sort_keys=True, default=str)
    if key not in _shapes:
        _shapes[key] = _count_parameters(model_name, model_kwargs, input_size, persistence_threshold)
    return _shapes[key]


def _count_parameters(model_name: str, model_kwargs: dict[str, Any], input_size: Optional[int],
                      persistence_threshold: int) -> ModelShape:
    with torch.device("meta"):
        model = _build(model_name, model_kwargs, input_size)
    blocks = structure.blocks(model)
    return ModelShape(
        num_params=sum(p.numel() for p in model.parameters()), depth=structure.depth(model),
        largest_block_params=max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0),
        persistent_params=sum(p.numel() for p in model.parameters() if p.numel() < persistence_threshold),
        input_size=int(structure.input_size(model)[0]))


_depth_args: dict[str, dict[str, Any]] = {}


def _depth_kwargs(model_name: str, model_kwargs: dict[str, Any], input_size: Optional[int], depth: int) -> dict[str, Any]:
    """The create_model arguments that give the model `depth` blocks where it grows (structure.depth_kwargs)."""
    key = json.dumps([model_name, model_kwargs, input_size, depth], sort_keys=True, default=str)
    if key not in _depth_args:
        with torch.device("meta"):
            _depth_args[key] = structure.depth_kwargs(_build(model_name, model_kwargs, input_size), depth)
    return _depth_args[key]


# Phases of one forward + backward, told apart in the allocator's timeline by marker allocations of MARKER_BYTES:
# the peak of each is a + b·batch + c·blocks + d·batch·blocks on its own, but the peak of the whole step is their
# maximum: at small batch and depth the stem's backward can be the highest, at the real ones the blocks'.
PHASES = ("forward", "head backward", "blocks backward", "stem backward")
MARKER_BYTES = 4099


def phase_peaks(model_name: str, model_kwargs: dict[str, Any], input_size: Optional[int], dtype: str,
                 blocks_per_checkpoint: int, batch: int, depth: int) -> list[int]:
    """Allocator peak of each of PHASES in one forward + backward of the model cut to `depth` blocks, above what
    was held before (the parameters' gradients allocated first, as they are after a first step in training)."""
    import torch.nn.functional as F

    from .engine import apply_activation_checkpointing
    from .memory import allocation_timeline

    torch.manual_seed(0)
    model = _build(model_name, model_kwargs, input_size, drop_path_rate=0.0,
                   **_depth_kwargs(model_name, model_kwargs, input_size, depth)).to(getattr(torch, dtype))
    apply_activation_checkpointing(model, min(blocks_per_checkpoint, depth) if blocks_per_checkpoint else 0)
    x = torch.randn(batch, 3, *structure.input_size(model), dtype=getattr(torch, dtype))
    y = torch.zeros(batch, dtype=torch.long)
    for p in model.parameters():   # a warm-up step would cost as much as the measured one
        p.grad = torch.zeros_like(p)

    def mark(*_: Any) -> None:
        del _
        torch.empty(MARKER_BYTES, dtype=torch.uint8)

    def on_blocks(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        args[0].register_hook(mark)   # fires when the blocks' backward is done
        out.register_hook(mark)       # fires when the blocks' backward starts

    handle = structure.body(model).register_forward_hook(on_blocks)

    def step() -> None:
        loss = F.cross_entropy(model(x).float(), y)
        mark()
        loss.backward()

    try:
        timeline = allocation_timeline(step)
    finally:
        handle.remove()
    peaks, phase, total = [0] * len(PHASES), 0, 0
    for size in timeline:
        if size == MARKER_BYTES and phase + 1 < len(PHASES):
            phase += 1
        total += size
        peaks[phase] = max(peaks[phase], total)
    if phase != len(PHASES) - 1:
        raise RuntimeError(f"{model_name}: found {phase + 1} of the {len(PHASES)} phases of a training step.")
    return peaks


def forget_activation_profiles() -> None:
    """Drop the profiles measured so far in this process, so the next `activation_profile` measures again."""
    _profiles.clear()


@dataclass(frozen=True)
class StepProfile:
    """The activation peak of a forward + backward: the highest of its phases' fitted peaks."""
    phases: tuple[ActivationProfile, ...]

    def peak(self, batch: int, blocks: int) -> float:
        # The forward's own peak is left out: at 1-2 blocks its early transients (the stem) outweigh what it
        # stores, which then extrapolates wrongly; its end is the head backward's start, which is counted.
        return max(p.peak(batch, blocks) for p in self.phases[1:])

    def per_block(self, batch: int) -> float:
        """How much the blocks' backward peak grows per block: stored block inputs when checkpointed."""
        blocks = self.phases[PHASES.index("blocks backward")]
        return blocks.c + blocks.d * batch


def _fit(p: dict[tuple[int, int], int]) -> ActivationProfile:
    """a + b·batch + c·blocks + d·batch·blocks through the four points at batch 1, 2 × blocks 1, 2."""
    d = p[2, 2] - p[1, 2] - p[2, 1] + p[1, 1]
    c = p[1, 2] - p[1, 1] - d
    b = p[2, 1] - p[1, 1] - d
    return ActivationProfile(a=p[1, 1] - b - c - d, b=b, c=c, d=d)


def activation_profile(model_name: str, model_kwargs: dict[str, Any], input_size: Optional[int], dtype: str,
                       blocks_per_checkpoint: int) -> StepProfile:
    """The model's activation peak as a function of batch and depth, measured on the CPU (cached per shape)."""
    key = json.dumps([model_name, model_kwargs, input_size, dtype, blocks_per_checkpoint > 0], sort_keys=True,
                     default=str)
    if key not in _profiles:
        # Checkpointing every block is measured as such; k blocks per segment is scaled in _activations.
        every = 1 if blocks_per_checkpoint else 0
        with torch.random.fork_rng(devices=[]):   # the run's own random state stays untouched (pretrain calls this)
            points = {(b, d): phase_peaks(model_name, model_kwargs, input_size, dtype, every, b, d)
                      for b in (1, 2) for d in (1, 2)}
            points[4, 1] = phase_peaks(model_name, model_kwargs, input_size, dtype, every, 4, 1)
        phases = [_fit({k: v[i] for k, v in points.items() if k != (4, 1)}) for i in range(len(PHASES))]
        # The stem's backward holds a convolution workspace that on the CPU grows with the batch only up to the
        # thread count (attnscale_tiny_12 at 64 px: 2.3 MiB for 1 image, 5.2 for 2, 5.4 for 8): its growth per
        # image is taken between batch 2 and 4 instead (the stem does not depend on the depth).
        stem = PHASES.index("stem backward")
        slope = (points[4, 1][stem] - points[2, 1][stem]) / 2
        phases[stem] = ActivationProfile(a=points[2, 1][stem] - 2 * slope, b=slope, c=0.0, d=0.0)
        _profiles[key] = StepProfile(tuple(phases))
        _logger.debug("activation profile of %s: %s", model_name, _profiles[key])
    return _profiles[key]


def _activations(model_name: str, model_kwargs: dict[str, Any], input_size: Optional[int], dtype: str,
                 every: int, batch: int, depth: int) -> tuple[float, float]:
    """(peak, of it the part that grows with depth) for `every` blocks per checkpoint (0: off)."""
    profile = activation_profile(model_name, model_kwargs, input_size, dtype, every)
    if every <= 1:
        return profile.peak(batch, depth), profile.per_block(batch) * depth
    # Segments of k blocks: one stored input per segment, one segment's recompute (k blocks) at a time.
    unchecked = activation_profile(model_name, model_kwargs, input_size, dtype, 0)
    segments = math.ceil(depth / every)
    stored = profile.per_block(batch) * segments
    recompute = unchecked.per_block(batch) * every
    return profile.peak(batch, 1) - profile.per_block(batch) + stored + recompute, stored


def _zero(ds: DeepSpeedSettings) -> dict[str, Any]:
    return ds.raw.get("zero_optimization") or {}


def plan_memory(model_name: str, model_kwargs: Optional[dict[str, Any]], ds: Union[DeepSpeedSettings, dict],
                world_size: int, input_size: Optional[int] = None, micro_batch: Optional[int] = None,
                gpu_memory: Optional[float] = None, compare: bool = True) -> MemoryPlan:
    """The per-rank memory of a training step of `model_name` under the DeepSpeed config on `world_size` ranks.

    compare=False skips the activations with checkpointing switched (a third of the measuring time)."""
    model_kwargs = dict(model_kwargs or {})
    ds = _settings(ds, world_size)
    zero = _zero(ds)
    stage, n = ds.zero_stage, world_size
    batch = micro_batch or ds.micro_batch
    shape = model_shape(model_name, model_kwargs, input_size,
                        int(zero.get("stage3_param_persistence_threshold", DEFAULT_PERSISTENCE)))
    psi, w = shape.num_params, DTYPE_BYTES[ds.dtype]
    offload = _device(zero, "offload_optimizer") != "none"
    share = psi / n if stage >= 1 else psi            # what this rank's optimizer owns
    every = ds.blocks_per_checkpoint
    acts, per_block = _activations(model_name, model_kwargs, input_size, ds.dtype, every, batch, shape.depth)
    if compare:
        unchecked = _activations(model_name, model_kwargs, input_size, ds.dtype, 0, batch, shape.depth)[0]
        checked = _activations(model_name, model_kwargs, input_size, ds.dtype, 1, batch, shape.depth)[0]
    else:
        unchecked = checked = acts
    adam = (ds.raw.get("optimizer") or {}).get("params") or {}
    foreach_adam = bool(adam.get("torch_adam", False)) and not adam.get("fused", False)
    return MemoryPlan(
        model=model_name, world_size=n, zero_stage=stage, dtype=ds.dtype, micro_batch=batch,
        input_size=input_size or shape.input_size, checkpointing=every,
        offload_optimizer=offload, num_params=psi,
        parameters=w * _parameters_per_rank(shape, stage, n, _device(zero, "offload_param") != "none"),
        gradients=w * psi / n if stage == 3 else 0.0,
        optimizer_moments=0.0 if offload else ADAM_STATE_BYTES * share,
        master_copy=0.0 if offload else MASTER_BYTES * share,
        reduce_bucket=float(w * int(zero.get("reduce_bucket_size", DEFAULT_BUCKET))) if stage == 3 else 0.0,
        buffers=_backward_buffers(zero, shape, stage, n, w), activations=acts, activations_per_block=per_block,
        activations_unchecked=unchecked, activations_checked=checked,
        step_gradients=0.0 if offload else MASTER_BYTES * share,
        # torch's foreach AdamW makes two fp32 temporaries of the partition (measured: 12 bytes/param with the
        # gradient partition, tests/test_plan.py); its fused=True kernel (the shipped configs) and DeepSpeed's
        # FusedAdam update in place (fused AdamW measured at 0 bytes/param above the step's input on CPU).
        step_temporaries=0.0 if offload or not foreach_adam else 2 * MASTER_BYTES * share,
        gpu_memory=gpu_memory)


def _device(zero: dict[str, Any], key: str) -> str:
    return str((zero.get(key) or {}).get("device", "none") or "none")


def _parameters_per_rank(shape: ModelShape, stage: int, n: int, offload_params: bool) -> float:
    """Weights (elements) on one rank: all of them below ZeRO-3; under ZeRO-3 the rank's partition plus a
    whole copy of every tensor below the persistence threshold (one rank: the partition is the whole model)."""
    if stage < 3 or n == 1:
        return float(shape.num_params)
    return (0.0 if offload_params else shape.num_params / n) + shape.persistent_params


def _backward_buffers(zero: dict[str, Any], shape: ModelShape, stage: int, n: int, w: int) -> float:
    """DeepSpeed's buffers alive in backward: ZeRO-1/2's reduce buckets, allocated for each backward at
    reduce_bucket_size (two with overlap_comm); under ZeRO-3 the gathered parameters of the block in use
    and the prefetched ones (nothing is gathered on one rank)."""
    if stage in (1, 2):
        if not zero.get("contiguous_gradients", True):
            return 0.0
        buckets = 2 if zero.get("overlap_comm", False) else 1
        return float(w * int(zero.get("reduce_bucket_size", DEFAULT_BUCKET)) * buckets)
    if stage == 3 and n > 1:
        prefetch = int(zero.get("stage3_prefetch_bucket_size", DEFAULT_PREFETCH))
        gathered = shape.num_params - shape.persistent_params
        # Measured (tests/test_plan.py): twice the gathered set at the backward's start: the forward's last
        # gathered parameters are still held while the backward prefetches.
        return float(2 * w * min(shape.largest_block_params + prefetch, gathered))
    return 0.0


def with_settings(raw: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of a DeepSpeed JSON with a ZeRO stage, offload, checkpointing or micro batch changed."""
    raw = json.loads(json.dumps(raw))
    zero = raw.setdefault("zero_optimization", {})
    if "stage" in changes:
        zero["stage"] = changes["stage"]
    if changes.get("offload"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if "checkpointing" in changes:
        raw.setdefault("activation_checkpointing", {})["blocks_per_checkpoint"] = changes["checkpointing"]
    if "micro_batch" in changes:
        raw["train_micro_batch_size_per_gpu"] = changes["micro_batch"]
        raw.pop("train_batch_size", None)
    return raw


def largest_micro_batch(model_name: str, model_kwargs: Optional[dict[str, Any]], raw: dict[str, Any],
                        world_size: int, input_size: Optional[int], gpu_memory: float, limit: int = 4096) -> int:
    """The largest micro batch whose planned peak fits in `gpu_memory` (0 when not even 1 does)."""
    def fits(batch: int) -> bool:
        plan = plan_memory(model_name, model_kwargs, raw, world_size, input_size, batch, compare=False)
        return plan.total <= gpu_memory

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def alternatives(model_name: str, model_kwargs: Optional[dict[str, Any]], raw: dict[str, Any], world_size: int,
                 input_size: Optional[int], micro_batch: Optional[int], gpu_memory: float) -> list[tuple[str, MemoryPlan]]:
    """Configurations near the given one that would fit: the next ZeRO stages, optimizer offload, checkpointing
    every block, their combination, and the largest micro batch that fits as given."""
    ds = DeepSpeedSettings.from_dict(raw, world_size)
    if micro_batch:
        raw = with_settings(raw, micro_batch=micro_batch)
    candidates: list[tuple[str, dict[str, Any]]] = []
    for stage in range(max(ds.zero_stage, 1) + (ds.zero_stage >= 1), 4):
        candidates.append((f"ZeRO-{stage}", with_settings(raw, stage=stage)))
    if ds.blocks_per_checkpoint != 1:
        candidates.append(("checkpointing every block", with_settings(raw, checkpointing=1)))
        candidates.append(("ZeRO-3 + checkpointing every block", with_settings(raw, stage=3, checkpointing=1)))
    candidates.append(("ZeRO-3 + optimizer offload + checkpointing every block",
                       with_settings(raw, stage=3, offload=True, checkpointing=1)))
    rows = []
    for name, candidate in candidates:
        plan = plan_memory(model_name, model_kwargs, candidate, world_size, input_size, gpu_memory=gpu_memory)
        rows.append((name, plan))
    largest = largest_micro_batch(model_name, model_kwargs, raw, world_size, input_size, gpu_memory)
    if largest:
        plan = plan_memory(model_name, model_kwargs, raw, world_size, input_size, largest, gpu_memory=gpu_memory)
        rows.append((f"micro batch {largest} (largest that fits as configured)", plan))
    return [(name, plan) for name, plan in rows if plan.fits]


# --- step time and loader workers (an estimate from a FLOP count and an assumed MFU) --------------------------

# Images/s one loader worker (CPU core) delivers with DeiT's recipe at 224 px, per --decode path: `cpu` decodes and
# augments (reduced-size decode on), `gpu` only reads the bytes, checks them and draws each sample's parameters (the
# device decodes and augments). Measured through the loader, one worker, batch 128, on 103 ImageNet photographs x 20
# (bench/loader.py --src DIR --copies 20 --batch 128 --workers 1; 2-vCPU machine, 2026-12-05; docs/decode.md).
CPU_IMAGES_PER_CORE = {"cpu": 296.0, "gpu": 4073.0}
_flops: dict[str, float] = {}


@dataclass
class StepTimePlan:
    """Time of one optimizer step at an assumed model FLOPs utilisation, and the loader workers that rate needs."""
    forward_flops_per_image: float     # counted by torch's FlopCounterMode on the meta device
    train_flops_per_image: float       # forward + backward (2x forward), + one more forward when checkpointed
    images_per_step_per_gpu: int       # micro batch x accumulation
    seconds_per_step: float
    images_per_second_per_gpu: float
    loader_workers_per_gpu: int
    decode: str = "cpu"                # where the workers' images are decoded and augmented (--decode)
    images_per_core: float = 0.0       # the per-core rate the worker count assumes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def forward_flops(model_name: str, model_kwargs: Optional[dict[str, Any]], input_size: Optional[int]) -> float:
    """FLOPs of one image's forward pass (matmuls, convolutions, attention), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    key = json.dumps([model_name, model_kwargs, input_size], sort_keys=True, default=str)
    if key not in _flops:
        with torch.device("meta"):
            model = _build(model_name, dict(model_kwargs or {}), input_size)
            x = torch.randn(1, 3, *structure.input_size(model))
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
        _flops[key] = float(counter.get_total_flops())
    return _flops[key]


def plan_step_time(model_name: str, model_kwargs: Optional[dict[str, Any]], ds: Union[DeepSpeedSettings, dict],
                   world_size: int, input_size: Optional[int], micro_batch: Optional[int], mfu: float,
                   peak_tflops: float, images_per_core: Optional[float] = None, decode: str = "cpu") -> StepTimePlan:
    """Step time at `mfu` of `peak_tflops` per GPU, and the CPU cores (loader workers) per GPU that feed it on the
    `decode` path, at `images_per_core` (default: that path's measured rate)."""
    if decode not in CPU_IMAGES_PER_CORE:
        raise ValueError(f"Unknown decode path {decode!r}: use cpu or gpu.")
    images_per_core = images_per_core or CPU_IMAGES_PER_CORE[decode]
    ds = _settings(ds, world_size)
    forward = forward_flops(model_name, model_kwargs, input_size)
    train = forward * (4 if ds.blocks_per_checkpoint else 3)   # backward costs two forwards; recompute one more
    images = (micro_batch or ds.micro_batch) * ds.grad_accum
    seconds = images * train / (mfu * peak_tflops * 1e12)
    rate = images / seconds
    return StepTimePlan(forward_flops_per_image=forward, train_flops_per_image=train, images_per_step_per_gpu=images,
                        seconds_per_step=seconds, images_per_second_per_gpu=rate,
                        loader_workers_per_gpu=math.ceil(rate / images_per_core), decode=decode,
                        images_per_core=images_per_core)
