"""Model EMA under ZeRO: DeiT's `--model-ema` (an exponential moving average of the weights, decay 0.99996),
kept on the fp32 master weights each rank already holds, never gathered per step.

Every ZeRO stage splits the fp32 master copy of each parameter into fragments, one per rank (ZeRO-1/2:
slices of the flat optimizer partition, `param._hp_mapping`; ZeRO-3: the parameter's partition). Each
rank averages its own fragments after every optimizer step, on the device the masters live on (the CPU
under optimizer offload): the EMA costs 4 bytes per parameter divided by the world size, like the master
copy, and one fused lerp per step. DeepSpeed has no public view of these fragments (its
safe_get_local_* helpers copy), so they are taken from the optimizers' own bookkeeping.

The average is saved beside each checkpoint as one file per rank, `ema_rank{r}.pt` (antismooth.checkpoint names it): per parameter, where
its fragment starts in the flattened parameter, and the fragment. That names nothing of the world size,
so a run resumed on any number of processes cuts its own fragments from all the files
(`ShardedEma.load`), and an export joins them into whole tensors (`read_ema_state_dict`), with no
DeepSpeed gather. The decay schedule is timm's (`timm.utils.ModelEmaV3.get_decay`, warmup optional);
the update is timm's too (`torch._foreach_lerp_`), on fragments instead of a model copy.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn as nn

from .checkpoint import ema_file, ema_files
from .config import ConfigError

__all__ = ["ShardedEma", "read_ema_state_dict"]


@dataclass(frozen=True)
class _Fragment:
    name: str
    offset: int              # where it starts in the flattened parameter
    master: torch.Tensor     # a view of this rank's fp32 master slice, updated in place by the optimizer


def local_fragments(engine, rank: int) -> tuple[list[_Fragment], bool]:
    """This rank's fp32 master fragments of every parameter (the slices ZeRO keeps here), and whether every rank
    holds them all (no ZeRO, fp32: the module's weights are the masters; only rank 0 saves them)."""
    params = list(engine.module.named_parameters())
    if engine.zero_optimization_stage() == 3:                 # this rank's partition of each, padded at the end
        optimizer = engine.optimizer
        if getattr(optimizer, "swap_optimizer", False):
            raise ConfigError("--model-ema cannot follow optimizer states swapped to NVMe (offload_optimizer.device "
                              "nvme): offload to cpu, or add --no-model-ema.")
        fragments = []
        for name, param in params:
            offset = rank * param.ds_tensor.ds_numel
            valid = max(0, min(param.ds_tensor.ds_numel, param.ds_numel - offset))
            if valid:
                # Where safe_get_local_fp32_param reads (stage3.py, _get_fp32_opt_state_partition), as a view: that
                # function copies to the GPU when the masters are offloaded to CPU memory, and the average must
                # follow the masters in place, wherever they live.
                group, start, count = optimizer.grad_position[optimizer.get_param_id(param)]
                master = optimizer.fp32_partitioned_groups_flat[group].narrow(0, start, count)
                fragments.append(_Fragment(name, offset, master[:valid]))
        return fragments, False
    mapped = [(name, param._hp_mapping) for name, param in params if getattr(param, "_hp_mapping", None) is not None]
    if mapped:                                                # ZeRO-1/2, and DeepSpeed's bf16 optimizer: the slices
        return [_Fragment(name, m.lp_fragment_address.start, m.get_hp_fragment()) for name, m in mapped], False
    return [_Fragment(name, 0, param.data.view(-1)) for name, param in params], True


class ShardedEma:
    """The EMA of this rank's fp32 master fragments; `update(step)` after every optimizer step."""

    def __init__(self, engine, rank: int, decay: float, warmup: bool = False) -> None:
        from timm.utils import ModelEmaV3

        self.engine, self.rank = engine, rank
        self.fragments, self.replicated = local_fragments(engine, rank)
        # timm's decay schedule: a ModelEmaV3 of a one-weight stand-in, of which only get_decay(step) is used.
        self.schedule = ModelEmaV3(nn.Linear(1, 1, bias=False), decay=decay, use_warmup=warmup)
        self.average = [f.master.detach().clone() for f in self.fragments]   # starts at the weights, as timm's

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = self.schedule.get_decay(step)
        torch._foreach_lerp_(self.average, [f.master for f in self.fragments], 1.0 - decay)

    def save(self, tag_dir: Path) -> Optional[Path]:
        """This rank's file in checkpoint folder `tag_dir` (none from ranks > 0 when every rank holds it all)."""
        if self.replicated and self.rank:
            return None
        Path(tag_dir).mkdir(parents=True, exist_ok=True)   # rank 0's model description may not have made it yet
        path = ema_file(tag_dir, self.rank)
        torch.save({f.name: (f.offset, a) for f, a in zip(self.fragments, self.average, strict=True)}, path)
        return path

    def load(self, tag_dir: Path) -> None:
        """Cut this rank's fragments out of the average saved in `tag_dir` by any number of ranks (every rank's
        file is read into host memory: 4 bytes per parameter, once, at start-up)."""
        pieces = _read_pieces(ema_files(tag_dir))
        for i, f in enumerate(self.fragments):
            if f.name not in pieces:
                raise KeyError(f"{tag_dir} holds no EMA of {f.name}")
            whole = _join(pieces[f.name])
            self.average[i].copy_(whole[f.offset:f.offset + f.master.numel()])

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the weights and the average: called once, the model holds the EMA (to evaluate it), twice,
        its own weights again. A collective under ZeRO-1/2 (the module's weights are gathered from the
        masters), so every rank calls it."""
        for f, a in zip(self.fragments, self.average, strict=True):
            held = f.master.clone()
            f.master.copy_(a)
            a.copy_(held)
        self._masters_to_module()

    def _masters_to_module(self) -> None:
        """The module's (bf16 or fp32) weights from the fp32 masters, as ZeRO's own step leaves them."""
        optimizer = self.engine.optimizer
        if hasattr(optimizer, "update_lp_params"):          # ZeRO-1/2, bf16 optimizer: an all-gather
            optimizer.update_lp_params()
            return
        if not hasattr(optimizer, "persistent_parameters"):  # no ZeRO in fp32: the masters are the module's weights
            return
        # ZeRO-3, as its step() does around an update (stage3.py): every gathered parameter released, this rank's
        # partitions written, the small parameters kept whole on every rank gathered again from the partitions,
        # ZeRO++'s secondary copies dropped.
        optimizer._partition_all_parameters()
        params = dict(self.engine.module.named_parameters())
        for f in self.fragments:
            params[f.name].ds_tensor.data.view(-1)[:f.master.numel()].copy_(f.master)
        if optimizer.persistent_parameters:
            optimizer.persistent_parameters[0].all_gather(optimizer.persistent_parameters)
        optimizer.invalidate_secondary_tensor()


def _read_pieces(files: Iterable[Path]) -> dict[str, list[tuple[int, torch.Tensor]]]:
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for path in files:
        for name, (offset, tensor) in torch.load(path, map_location="cpu", weights_only=True).items():
            pieces.setdefault(name, []).append((offset, tensor))
    return pieces


def _join(pieces: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    pieces = sorted(pieces, key=lambda p: p[0])
    return torch.cat([t.reshape(-1) for _, t in pieces])


def read_ema_state_dict(tag_dir: str | Path, shapes: dict[str, torch.Size],
                        dtype: torch.dtype = torch.float32) -> Optional[dict[str, torch.Tensor]]:
    """The whole EMA weights of a checkpoint, shaped as `shapes` says (the model's parameters), or None when the
    run kept no EMA. Raises KeyError/ValueError when the files do not cover the model."""
    files = ema_files(tag_dir)
    if not files:
        return None
    pieces = _read_pieces(files)
    state_dict = {}
    for name, shape in shapes.items():
        if name not in pieces:
            raise KeyError(f"the EMA files of {tag_dir} hold no {name}")
        whole = _join(pieces[name])
        if whole.numel() != shape.numel():
            raise ValueError(f"the EMA files of {tag_dir} hold {whole.numel()} values of {name}, not {shape.numel()}: "
                             "a rank's file is missing")
        state_dict[name] = whole.view(shape).to(dtype)
    return state_dict
