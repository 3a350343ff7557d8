"""DeepSpeed ZeRO checkpoints -> one plain weights file that timm loads, with the model's description in it.

A run's `checkpoints/` folder is DeepSpeed's save_dir: one folder per tag, and a `latest` file naming
the newest complete one (written after every rank's files, so it is the completeness signal). Next to
DeepSpeed's files each tag holds `antismooth.json` (`write_model_meta`): the timm name and kwargs that
rebuild the model, the class list and the evaluation data config. Export consolidates the ZeRO-1/2/3
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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import timm
import torch
import torch.nn as nn

from .models.weights import _describe_mismatch, clean_state_dict, load_weights

__all__ = ["META_FILE", "CheckpointError", "CheckpointRef", "ExportResult", "DTYPES", "write_model_meta",
           "read_model_meta", "list_tags", "resolve_checkpoint", "consolidate", "save_weights",
           "read_export_meta", "read_timm_config", "consolidate_checkpoint", "export_checkpoint",
           "create_model_from_weights"]

_logger = logging.getLogger(__name__)

META_FILE = "antismooth.json"          # beside DeepSpeed's files in every tag folder
LATEST_FILE = "latest"                 # DeepSpeed's name for the newest complete tag
REQUIRED_META = ("model", "model_kwargs", "classes", "data_config")
# Metadata values that are not strings travel JSON-encoded (safetensors metadata is str -> str).
JSON_META_KEYS = ("model_kwargs", "classes", "data_config", "step", "epoch", "zero_stage", "world_size", "global_batch",
                  "micro_batch", "ema")
TIMM_CONFIG = "config.json"            # a timm folder's description (timm.models.save_for_hf)
TIMM_META_KEY = "antismooth"           # our provenance (tag, step, ZeRO stage…) inside that config.json
DATA_CONFIG_KEYS = ("input_size", "mean", "std", "crop_pct", "interpolation")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")
# zero_pp_rank_{dp}_mp_rank_{mp}_optim_states.pt, with a bf16_ prefix when bf16 training saved it.
_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_ZERO3_MODEL_FILE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_ZERO12_MODEL_FILE = "mp_rank_00_model_states.pt"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be exported; the message names the problem and the fix."""


# ----------------------------------------------------------------------------------------------
# The model description beside each checkpoint


def write_model_meta(tag_dir: str | Path, meta: Mapping[str, Any]) -> Path:
    """Write `antismooth.json` into a tag folder (created if needed) atomically; any rank may call it."""
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"the model description lacks {', '.join(missing)}: an export could not rebuild the "
                         "model without them.")
    tag_dir = Path(tag_dir)
    tag_dir.mkdir(parents=True, exist_ok=True)
    path = tag_dir / META_FILE
    tmp = tag_dir / f".{META_FILE}.{os.getpid()}.tmp"  # one name per process: ranks never share a temporary
    tmp.write_text(json.dumps(dict(meta), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_model_meta(tag_dir: str | Path) -> Optional[dict[str, Any]]:
    """The `antismooth.json` of a tag folder, or None when there is none."""
    path = Path(tag_dir) / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); rewrite it (see antismooth.export."
                              "write_model_meta) or delete it and pass --model to tools/eval.py.") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; rewrite it with "
                              "antismooth.export.write_model_meta.")
    return meta


# ----------------------------------------------------------------------------------------------
# Finding and checking a checkpoint


@dataclass(frozen=True)
class CheckpointRef:
    """One complete DeepSpeed checkpoint: save_dir, tag, ZeRO stage (None: 1 or 2) and data-parallel world size."""
    checkpoint_dir: Path
    tag: str
    stage: Optional[int]
    world_size: int

    @property
    def tag_dir(self) -> Path:
        return self.checkpoint_dir / self.tag


def _is_tag_dir(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*_model_states.pt"))


def list_tags(checkpoint_dir: str | Path) -> list[str]:
    """The tag folders of a save_dir (folders holding DeepSpeed model states), sorted by name."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    return sorted(p.name for p in checkpoint_dir.iterdir() if _is_tag_dir(p))


def _tags_sentence(checkpoint_dir: Path) -> str:
    tags = list_tags(checkpoint_dir)
    return f"the tags there are {', '.join(tags)}" if tags else "it holds no checkpoint tags"


def _find_save_dir(path: Path, tag: Optional[str]) -> tuple[Path, Optional[str]]:
    """Accept a run folder (its checkpoints/), a save_dir, or a tag folder itself."""
    if not path.exists():
        raise CheckpointError(f"no checkpoint folder at {path}: give a run folder (runs/<run>), its checkpoints/ "
                              "folder, or one tag folder inside it.")
    if (path / "checkpoints").is_dir() and not (path / LATEST_FILE).exists() and not _is_tag_dir(path):
        path = path / "checkpoints"
    if _is_tag_dir(path):
        if tag is not None and tag != path.name:
            raise CheckpointError(f"{path} is itself the tag folder {path.name}, but --tag {tag} was given; "
                                  "drop --tag or point at the checkpoints/ folder.")
        return path.parent, path.name
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint folder: give the run folder or its checkpoints/.")
    return path, tag


def _read_latest(checkpoint_dir: Path) -> Optional[str]:
    latest = checkpoint_dir / LATEST_FILE
    if not latest.is_file():
        return None
    return latest.read_text().strip() or None


def _step_of(checkpoint_dir: Path, tag: str) -> Optional[int]:
    try:
        meta = read_model_meta(checkpoint_dir / tag)
    except CheckpointError:
        return None
    step = (meta or {}).get("step")
    return step if isinstance(step, int) else None


def _recorded_layout(model_file: Path) -> tuple[Optional[int], Optional[int]]:
    """(world size, ZeRO stage) as DeepSpeed recorded them in a model-states file (memory-mapped, tensors
    unread); None for what it did not record (the stage is there only when the config was given as a dict)."""
    try:
        states = torch.load(model_file, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # an unreadable or unusual file: DeepSpeed's own checks will speak
        return None, None
    config = states.get("ds_config")
    stage = config.get("zero_optimization", {}).get("stage") if isinstance(config, dict) else None
    world = states.get("dp_world_size")
    return (int(world) if isinstance(world, int) else None), (int(stage) if isinstance(stage, int) else None)


def _check_rank_files(tag_dir: Path) -> tuple[Optional[int], int]:
    """(ZeRO stage, world size) of a tag folder whose every rank's files are present, else CheckpointError.
    The stage is None for a stage-1/2 checkpoint whose config DeepSpeed did not record (a JSON path)."""
    names = [p.name for p in tag_dir.iterdir() if p.is_file()]
    zero3_models = {int(m.group(1)) for n in names if (m := _ZERO3_MODEL_FILE.match(n))}
    optim = {int(m.group(1)) for n in names if (m := _OPTIM_FILE.match(n))}
    if not zero3_models and _ZERO12_MODEL_FILE not in names:
        raise CheckpointError(f"{tag_dir} holds no DeepSpeed model states (*_model_states.pt): it is not a "
                              f"DeepSpeed checkpoint, or its save did not finish; {_tags_sentence(tag_dir.parent)}.")
    if not optim:
        raise CheckpointError(
            f"{tag_dir} holds no ZeRO optimizer partitions (*_optim_states.pt): it is a ZeRO stage-0 checkpoint "
            "(or one saved without optimizer state), which DeepSpeed's zero_to_fp32 cannot consolidate; train "
            "with a ZeRO stage 1-3 config (ds_configs/zero1.json, zero2.json, zero3.json).")
    model_file = tag_dir / (f"zero_pp_rank_{min(zero3_models)}_mp_rank_00_model_states.pt" if zero3_models
                            else _ZERO12_MODEL_FILE)
    world, stage = _recorded_layout(model_file)
    world = world or max(optim | zero3_models) + 1
    stage = 3 if zero3_models else stage  # stage 1 and 2 checkpoints are laid out alike
    missing = sorted(set(range(world)) - optim) + (sorted(set(range(world)) - zero3_models) if zero3_models else [])
    if missing:
        raise CheckpointError(
            f"{tag_dir} was saved by {world} ranks but lacks the files of rank(s) "
            f"{', '.join(str(r) for r in sorted(set(missing)))}: every rank writes its own partition, so copy all "
            "ranks' files of this tag into that one folder (multi-node runs without shared storage keep them on "
            "each node), or export another tag.")
    return stage, world


def resolve_checkpoint(path: str | Path, tag: Optional[str] = None) -> CheckpointRef:
    """Find the checkpoint to export (default: the one `latest` names) and check every rank's files are there."""
    checkpoint_dir, tag = _find_save_dir(Path(path), tag)
    latest = _read_latest(checkpoint_dir)
    if tag is None:
        if latest is None:
            raise CheckpointError(
                f"{checkpoint_dir} has no '{LATEST_FILE}' file naming a complete checkpoint, so no save finished "
                f"there; {_tags_sentence(checkpoint_dir)}: pass --tag to pick one, or point at the checkpoints/ "
                "folder of a run that saved.")
        tag = latest
    tag_dir = checkpoint_dir / tag
    if not tag_dir.is_dir():
        raise CheckpointError(f"there is no checkpoint {tag!r} in {checkpoint_dir}; {_tags_sentence(checkpoint_dir)}.")
    if latest is not None and tag != latest:
        step, latest_step = _step_of(checkpoint_dir, tag), _step_of(checkpoint_dir, latest)
        if step is not None and latest_step is not None and step > latest_step:
            raise CheckpointError(
                f"{tag} is newer than the checkpoint '{LATEST_FILE}' names ({latest}): its save did not finish "
                f"(DeepSpeed names a tag in '{LATEST_FILE}' only once every rank wrote it); export {latest}, or "
                "wait until training has saved it.")
    stage, world = _check_rank_files(tag_dir)
    return CheckpointRef(checkpoint_dir, tag, stage, world)


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


def _encode_meta(meta: Mapping[str, Any]) -> dict[str, str]:
    """safetensors metadata: strings as they are, everything else JSON-encoded."""
    return {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in meta.items()}


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


@contextlib.contextmanager
def _atomic_paths(*paths: Path) -> Iterator[list[Path]]:
    """Temporary names beside `paths`; renamed onto them on success, deleted on any exception."""
    tmps = [p.with_name(f".{p.name}.{os.getpid()}.tmp") for p in paths]
    try:
        yield tmps
        for tmp, path in zip(tmps, paths):
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
            save_file(dict(state_dict), str(tmp), metadata={"format": "pt", **_encode_meta(meta)})
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
        for key in JSON_META_KEYS:
            if isinstance(raw.get(key), str):
                try:
                    raw[key] = json.loads(raw[key])
                except ValueError:
                    raise ValueError(f"the {key!r} metadata of {path} is not valid JSON; export it again.") from None
    else:
        sidecar = _sidecar(path)
        if not sidecar.is_file():
            return None
        try:
            raw = json.loads(sidecar.read_text())
        except ValueError as err:
            raise ValueError(f"{sidecar} is not valid JSON ({err}); fix or delete it (then pass --model).") from None
    return raw if raw.get("model") else None


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote (the file, or timm's folder), its description, where it came from, its size."""
    path: Path
    ref: CheckpointRef
    meta: dict[str, Any]
    num_params: int
    num_bytes: int


def _check_against_model(state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, Any], ref: CheckpointRef) -> None:
    """The weights must load with strict=True into the model the description names; checked on the meta device."""
    if not timm.is_model(meta["model"]):
        raise CheckpointError(f"{ref.tag_dir / META_FILE} names the model {meta['model']!r}, which timm does not "
                              "know: fix its 'model' field.")
    with torch.device("meta"):
        model = timm.create_model(meta["model"], **meta["model_kwargs"])
    mismatch = _describe_mismatch(state_dict, model)
    if mismatch:
        raise CheckpointError(f"the weights of {ref.tag_dir} do not fit the model its {META_FILE} describes "
                              f"({meta['model']} with {meta['model_kwargs']}); fix that file:\n{mismatch}")


def consolidate_checkpoint(path: str | Path, tag: Optional[str] = None, dtype: str = "fp32", ema: bool = False
                           ) -> tuple[CheckpointRef, dict[str, torch.Tensor], dict[str, Any]]:
    """The checked checkpoint, its consolidated state_dict in `dtype` (with `ema`, the model EMA's weights instead)
    and the description an export carries (the tag's antismooth.json plus where it came from); the slow part
    every export format shares."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
    ref = resolve_checkpoint(path, tag)
    meta = read_model_meta(ref.tag_dir)
    if meta is None:
        if ema:
            raise CheckpointError(f"{ref.tag_dir} has no {META_FILE}, which names the model whose EMA to rebuild: "
                                  "export it without --ema.")
        _logger.warning("%s has no %s: the export will not say which model it holds, so tools/eval.py needs "
                        "--model for it.", ref.tag_dir, META_FILE)
    state_dict = consolidate_ema(ref, meta, DTYPES[dtype]) if ema else consolidate(ref, DTYPES[dtype])
    if meta is not None:
        _check_against_model(state_dict, meta, ref)
    export_meta = dict(meta or {}, tag=ref.tag, zero_stage=ref.stage, world_size=ref.world_size, dtype=dtype,
                       **({"ema": True} if ema else {}))
    return ref, state_dict, export_meta


def consolidate_ema(ref: CheckpointRef, meta: Mapping[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model EMA of a checkpoint (antismooth.ema's per-rank files), whole, shaped as the model's parameters."""
    from .ema import read_ema_state_dict

    with torch.device("meta"):
        model = timm.create_model(meta["model"], **meta["model_kwargs"])
    shapes = {name: param.shape for name, param in model.named_parameters()}
    try:
        state_dict = read_ema_state_dict(ref.tag_dir, shapes, dtype)
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
                              **model_kwargs: Any) -> tuple[nn.Module, Optional[dict[str, Any]]]:
    """Build the model a weights file describes (or `model` with `model_kwargs` for files without a
    description) and load the file into it with strict=True; WeightsMismatchError says what differs."""
    meta = read_export_meta(path)
    if model is None:
        if meta is None:
            raise ValueError(f"{path} does not say which model it holds (no metadata): pass --model NAME "
                             "(and --num-classes / --img-size where they differ from the defaults).")
        model, model_kwargs = meta["model"], {**meta.get("model_kwargs", {}), **model_kwargs}
    if not timm.is_model(model):
        raise ValueError(f"unknown model {model!r}: see antismooth.models.MODEL_NAMES or timm.list_models().")
    net = timm.create_model(model, **model_kwargs)
    load_weights(net, path)
    return net, meta
