"""DeepSpeed ZeRO checkpoints -> one plain weights file that timm loads, with the model's description in it.

The run folder's layout (tags, `latest`, each tag's `antismooth.json` with the timm name and kwargs that
rebuild the model, the class list and the evaluation data config) is antismooth.checkpoint's; it finds
and checks the checkpoint (`resolve_checkpoint`). Export consolidates the ZeRO-1/2/3
partitions of any world size with DeepSpeed's own zero_to_fp32 (lazily, so memory stays near two fp32
copies of the model), strips wrapper prefixes so the keys are the model's own, and writes .safetensors
(the description in its metadata) or .pth (the description in a side-car `<file>.json`). Output is
written under a temporary name and renamed, so a failed export leaves nothing behind.

DeepSpeed's checkpoint files are pickles that zero_to_fp32 loads with weights_only=False: export only
checkpoints you trust (your own runs). The exported files load with weights_only=True.
"""
from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import timm
import torch
import torch.nn as nn

from .checkpoint import META_FILE, CheckpointError, CheckpointRef, read_description, resolve_checkpoint
from .models.description import DATA_CONFIG_KEYS, ModelDescription, decode_text_values, encode_text_values
from .models.weights import clean_state_dict, describe_mismatch

__all__ = ["ExportResult", "DTYPES", "consolidate", "save_weights", "read_export_meta", "read_export_description",
           "read_timm_config",
           "consolidate_checkpoint", "export_checkpoint", "create_model_from_weights"]

_logger = logging.getLogger(__name__)

TIMM_CONFIG = "config.json"            # a timm folder's description (timm.models.save_for_hf)
TIMM_META_KEY = "antismooth"           # our provenance (tag, step, ZeRO stage…) inside that config.json
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")


# ----------------------------------------------------------------------------------------------
# Consolidation (DeepSpeed's zero_to_fp32) and writing


@contextlib.contextmanager
def _captured_output() -> Iterator[None]:
    """zero_to_fp32 prints and draws tqdm bars: library code logs instead, at debug level."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if line.strip():
                _logger.debug("zero_to_fp32: %s", line.strip())


def consolidate(ref: CheckpointRef, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The full state_dict of a ZeRO-1/2/3 checkpoint in `dtype`, keys as the model names them.

    DeepSpeed's lazy mode returns views (ZeRO-1/2) or per-parameter gatherers (ZeRO-3) over the
    memory-mapped partitions; each tensor is materialised once, then the partitions are dropped.
    no_grad: the saved partitions require grad, so torch.cat would otherwise record a graph whose
    AccumulateGrad nodes keep every memory-mapped partition alive as long as the result (+1x RSS).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, to_torch_tensor

    try:
        with _captured_output(), torch.no_grad():
            lazy = get_fp32_state_dict_from_zero_checkpoint(str(ref.checkpoint_dir), tag=ref.tag, lazy_mode=True)
            state_dict = to_torch_tensor(lazy, dtype=dtype)
    except (RuntimeError, ValueError, KeyError, EOFError, OSError) as err:
        raise CheckpointError(f"DeepSpeed could not consolidate {ref.tag_dir} ({type(err).__name__}: {err}); a file "
                              "there is damaged or half-written: export another tag.") from err
    del lazy
    gc.collect()  # drop the partitions' memory maps before the output is written
    return _untie(clean_state_dict(state_dict))


def _untie(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give tied weights (the same tensor under two names) their own copy: neither format stores aliases."""
    seen: set[int] = set()
    for key, tensor in state_dict.items():
        if id(tensor) in seen:
            state_dict[key] = tensor.clone()
        seen.add(id(tensor))
    return state_dict


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _check_output(out: Path, overwrite: bool) -> None:
    if out.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"cannot tell the format of {out}: name it *.safetensors (recommended) or *.pth.")
    if out.is_dir():
        raise ValueError(f"{out} is a folder: give a file name ending in .safetensors or .pth.")
    if not overwrite:
        taken = [p for p in (out, _sidecar(out))[:1 if out.suffix == ".safetensors" else 2] if p.exists()]
        if taken:
            raise FileExistsError(f"{taken[0]} already exists: pass --overwrite to replace it, or choose another "
                                  "--out.")


def current_umask() -> int:
    """This process's umask, read without changing it where Linux says it (/proc), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
        return umask


def honour_umask(path: Path) -> None:
    """Give a written file (or a folder and everything in it) the mode a plain open() or mkdir() would have under
    this process's umask: safetensors writes its files 0600, which other users of a shared machine cannot read."""
    umask = current_umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def _atomic_paths(*paths: Path) -> Iterator[list[Path]]:
    """Temporary names beside `paths`; renamed onto them on success (with the umask's mode), deleted on any
    exception."""
    tmps = [p.with_name(f".{p.name}.{os.getpid()}.tmp") for p in paths]
    try:
        yield tmps
        for tmp, path in zip(tmps, paths, strict=True):
            honour_umask(tmp)
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def save_weights(state_dict: Mapping[str, torch.Tensor], out: str | Path, meta: Optional[Mapping[str, Any]] = None,
                 overwrite: bool = False) -> Path:
    """Write a state_dict as .safetensors (meta in its header) or .pth (meta in `<out>.json`), atomically."""
    out = Path(out)
    _check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file
        with _atomic_paths(out) as (tmp,):
            # "format": "pt" marks PyTorch tensors for readers such as transformers'.
            save_file(dict(state_dict), str(tmp), metadata={"format": "pt", **encode_text_values(meta)})
        return out
    # torch.save stores whole storages: views into one flat ZeRO-1/2 partition get their own copies.
    owned = {k: v if v.untyped_storage().nbytes() == v.nbytes else v.clone() for k, v in state_dict.items()}
    with _atomic_paths(*((out, _sidecar(out)) if meta else (out,))) as tmps:
        torch.save(owned, tmps[0])
        if meta:
            tmps[1].write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def read_timm_config(folder: str | Path) -> dict[str, Any]:
    """A timm folder's config.json as the description our exports carry: model, model_kwargs (timm's
    model_args), classes (label_names), data_config (from pretrained_cfg) and the provenance we added."""
    path = Path(folder) / TIMM_CONFIG
    try:
        config = json.loads(path.read_text())
        pretrained_cfg = config.get("pretrained_cfg", {})
        meta = {"model": config["architecture"], "model_kwargs": dict(config.get("model_args") or {}),
                "classes": config.get("label_names"),
                "data_config": {k: pretrained_cfg[k] for k in DATA_CONFIG_KEYS if k in pretrained_cfg}}
    except (ValueError, KeyError, AttributeError) as err:
        raise ValueError(f"{path} is not a timm model config ({type(err).__name__}: {err}); export the folder "
                         "again with tools/export.py --format timm.") from None
    meta["model_kwargs"].setdefault("num_classes", config.get("num_classes"))
    return {**config.get(TIMM_META_KEY, {}), **meta}


def read_export_meta(path: str | Path) -> Optional[dict[str, Any]]:
    """The model description stored with a weights file (safetensors metadata, or `<file>.json` beside
    a .pth) or in a timm folder's config.json, values decoded; None when there is none (e.g. an official
    DeiT checkpoint)."""
    path = Path(path)
    if path.is_dir() and (path / TIMM_CONFIG).is_file():
        return read_timm_config(path)
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a folder without {TIMM_CONFIG}: give a weights file, or a folder "
                                "written by tools/export.py --format timm.")
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}: check the path.")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                raw: dict[str, Any] = dict(f.metadata() or {})
        except Exception as err:  # safetensors raises its own SafetensorError for a damaged header
            raise ValueError(f"{path} is not a readable .safetensors file ({err}); export it again.") from None
        raw.pop("format", None)
        raw = decode_text_values(raw, path)
    else:
        sidecar = _sidecar(path)
        if not sidecar.is_file():
            return None
        try:
            raw = json.loads(sidecar.read_text())
        except ValueError as err:
            raise ValueError(f"{sidecar} is not valid JSON ({err}); fix or delete it (then pass --model).") from None
    return raw if raw.get("model") else None


def read_export_description(path: str | Path) -> Optional[ModelDescription]:
    """The description a weights file or timm folder carries (read_export_meta), typed; None when there is none."""
    raw = read_export_meta(path)
    return None if raw is None else ModelDescription.from_dict(raw, path)


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote (the file, or timm's folder), its description, where it came from, its size."""
    path: Path
    ref: CheckpointRef
    meta: dict[str, Any]
    num_params: int
    num_bytes: int


def _check_against_model(state_dict: Mapping[str, torch.Tensor], description: ModelDescription,
                         ref: CheckpointRef) -> None:
    """The weights must load with strict=True into the model the description names; checked on the meta device."""
    if not timm.is_model(description.model):
        raise CheckpointError(f"{ref.tag_dir / META_FILE} names the model {description.model!r}, which timm does not "
                              "know: fix its 'model' field.")
    with torch.device("meta"):
        model = description.create()
    mismatch = describe_mismatch(state_dict, model)
    if mismatch:
        raise CheckpointError(f"the weights of {ref.tag_dir} do not fit the model its {META_FILE} describes "
                              f"({description.model} with {description.model_kwargs}); fix that file:\n{mismatch}")


def consolidate_checkpoint(path: str | Path, tag: Optional[str] = None, dtype: str = "fp32", ema: bool = False
                           ) -> tuple[CheckpointRef, dict[str, torch.Tensor], dict[str, Any]]:
    """The checked checkpoint, its consolidated state_dict in `dtype` (with `ema`, the model EMA's weights instead)
    and the description an export carries (the tag's antismooth.json plus where it came from); the slow part
    every export format shares."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
    ref = resolve_checkpoint(path, tag)
    description = read_description(ref.tag_dir)
    if description is None:
        if ema:
            raise CheckpointError(f"{ref.tag_dir} has no {META_FILE}, which names the model whose EMA to rebuild: "
                                  "export it without --ema.")
        _logger.warning("%s has no %s: the export will not say which model it holds, so tools/eval.py needs "
                        "--model for it.", ref.tag_dir, META_FILE)
    state_dict = consolidate_ema(ref, description, DTYPES[dtype]) if ema else consolidate(ref, DTYPES[dtype])
    if description is not None:
        _check_against_model(state_dict, description, ref)
    export_meta = dict(description.to_dict() if description else {}, tag=ref.tag, zero_stage=ref.stage,
                       world_size=ref.world_size, dtype=dtype, **({"ema": True} if ema else {}))
    return ref, state_dict, export_meta


def consolidate_ema(ref: CheckpointRef, description: ModelDescription, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model EMA of a checkpoint (antismooth.ema's per-rank files), whole, shaped as the model's parameters."""
    from .ema import read_ema_state_dict

    try:
        state_dict = read_ema_state_dict(ref.tag_dir, description.parameter_shapes(), dtype)
    except (KeyError, ValueError, RuntimeError, OSError) as err:
        raise CheckpointError(f"the model EMA of {ref.tag_dir} cannot be rebuilt ({err}): export another tag, or "
                              "the weights without --ema.") from err
    if state_dict is None:
        raise CheckpointError(f"{ref.tag_dir} holds no model EMA (the run was trained with --no-model-ema): export "
                              "the weights without --ema.")
    return state_dict


def export_checkpoint(path: str | Path, out: str | Path, tag: Optional[str] = None, dtype: str = "fp32",
                      overwrite: bool = False, ema: bool = False) -> ExportResult:
    """Consolidate one checkpoint (default: `latest`) of a run, or its model EMA, into a weights file timm loads
    with strict=True."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
    _check_output(Path(out), overwrite)  # before the slow part
    ref, state_dict, export_meta = consolidate_checkpoint(path, tag, dtype, ema)
    written = save_weights(state_dict, out, export_meta, overwrite)
    num_params = sum(t.numel() for t in state_dict.values())
    return ExportResult(written, ref, export_meta, num_params, written.stat().st_size)


def create_model_from_weights(path: str | Path, model: Optional[str] = None,
                              **model_kwargs: Any) -> tuple[nn.Module, Optional[ModelDescription]]:
    """Build the model a weights file describes (or `model` with `model_kwargs` for files without a
    description) and load the file into it with strict=True; WeightsMismatchError says what differs. Also the
    file's description (None without one)."""
    description = read_export_description(path)
    if model is not None:
        return ModelDescription(model, model_kwargs).build(path), description
    if description is None:
        raise ValueError(f"{path} does not say which model it holds (no metadata): pass --model NAME "
                         "(and --num-classes / --img-size where they differ from the defaults).")
    return description.build(path, **model_kwargs), description
