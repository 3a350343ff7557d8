"""Exports in timm's own format: a folder with config.json, model.safetensors and a model card (README.md).

timm users load it with `timm.create_model("local-dir:DIR", pretrained=True)` (after `import antismooth`,
which registers the architectures), or with "hf-hub:org/name" once pushed. The folder is written by timm's
own `save_for_hf`: config.json carries the architecture, its constructor arguments (`model_args`), the
class names (`label_names`) and the evaluation transform (`pretrained_cfg`: input size, mean, std, crop,
interpolation), plus our provenance under "antismooth". The card says what the model is, cites the paper,
and gives the run's derived numbers (run.json) and its last evaluation (eval.jsonl).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn

from .checkpoint import RunFolder
from .export import DTYPES, TIMM_META_KEY, ExportResult, consolidate_checkpoint, honour_umask
from .models.description import DATA_CONFIG_KEYS, ModelDescription

__all__ = ["CARD_FILE", "PAPER", "HubError", "build_model", "run_summary", "model_card",
           "save_timm_folder", "export_timm", "push_to_hub"]

_logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
PAPER = ('Wang et al., "Anti-Oversmoothing in Deep Vision Transformers via the Fourier Domain Analysis", '
         'ICLR 2022 (https://arxiv.org/abs/2203.05962)')
CITATION = """@inproceedings{wang2022antioversmoothing,
  title={Anti-Oversmoothing in Deep Vision Transformers via the Fourier Domain Analysis: From Theory to Practice},
  author={Wang, Peihao and Zheng, Wenqing and Chen, Tianlong and Wang, Zhangyang},
  booktitle={International Conference on Learning Representations},
  year={2022}
}"""
CARD_PROVENANCE = ("tag", "step", "epoch", "zero_stage", "world_size", "dtype")   # what the card and config.json show


class HubError(RuntimeError):
    """An upload to the Hugging Face Hub that could not be made; the message says what to do."""


def build_model(state_dict: Mapping[str, torch.Tensor], meta: ModelDescription | Mapping[str, Any]) -> nn.Module:
    """The model the description names, weights loaded with strict=True, in the weights' dtype."""
    return ModelDescription.of(meta).build(state_dict).eval()


# ----------------------------------------------------------------------------------------------
# The model card


def _last_eval(run: RunFolder) -> Optional[dict[str, Any]]:
    """The last evaluation of the model's own weights (not its EMA) that the run recorded, or None."""
    records = [r for r in run.eval_records() if not r.get("ema") and {"epoch", "top1", "top5", "loss", "images"} <= r.keys()]
    return records[-1] if records else None


def _recipe(run_json: Mapping[str, Any]) -> dict[str, Any]:
    """The training recipe as the card shows it: flags from run.json, weight decay from its DeepSpeed JSON."""
    flags = run_json.get("flags", {})
    recipe = {k: flags[k] for k in ("epochs", "lr", "min_lr", "warmup_epochs", "drop_path", "mixup", "cutmix",
                                    "smoothing", "data") if k in flags}
    weight_decay = run_json.get("deepspeed", {}).get("optimizer", {}).get("params", {}).get("weight_decay")
    if weight_decay is not None:
        recipe["weight_decay"] = weight_decay
    return recipe


def run_summary(run_dir: Optional[Path]) -> dict[str, Any]:
    """What a card reports about the training run: run.json's flags, DeepSpeed stage and derived numbers, and the
    last evaluation in eval.jsonl; empty for a checkpoint folder outside a run folder."""
    if run_dir is None:
        return {}
    run = RunFolder(run_dir)
    if not run.run_json.is_file():
        return {}
    run_json = run.read_run_json()
    if not run_json:
        _logger.warning("%s is not valid JSON: the model card leaves out the training run.", run.run_json)
        return {}
    summary = {"derived": run_json.get("derived", {}), "recipe": _recipe(run_json),
               "zero_stage": run_json.get("deepspeed", {}).get("zero_optimization", {}).get("stage")}
    last = _last_eval(run)
    if last is not None:
        summary["eval"] = last
    return summary


def _usage(name: str) -> str:
    return ("```python\nimport timm\nimport antismooth  # registers the AttnScale/FeatScale architectures with timm\n\n"
            f"model = timm.create_model(\"local-dir:{name}\", pretrained=True).eval()  # or \"hf-hub:<org>/{name}\"\n"
            "config = timm.data.resolve_model_data_config(model)\n"
            "transform = timm.data.create_transform(**config, is_training=False)\n```\n")


def model_card(name: str, meta: ModelDescription | Mapping[str, Any], num_params: int,
               run: Mapping[str, Any]) -> dict[str, Any]:
    """The card in the form timm's generate_readme takes (description, details, usage, citation)."""
    description = ModelDescription.of(meta)
    kwargs, data = description.model_kwargs, description.data_config
    details: dict[str, Any] = {
        "Model Type": "Image classification / feature backbone",
        "Architecture": f"{description.model} ({', '.join(f'{k}={v}' for k, v in kwargs.items())})",
        "Model Stats": {"Params (M)": f"{num_params / 1e6:.2f}", "Image size": "x".join(map(str, data.get(
            "input_size", ["?"])[1:])), "Classes": len(description.classes or []) or kwargs.get("num_classes")},
        "Papers": [PAPER],
        "Checkpoint": _provenance(description),
    }
    if run.get("derived"):
        details["Training run (derived)"] = dict(run["derived"], zero_stage=run.get("zero_stage"))
    if run.get("recipe"):
        details["Training recipe"] = dict(run["recipe"])
    if run.get("eval"):
        ev = run["eval"]
        details["Evaluation (last in eval.jsonl)"] = {"epoch": ev["epoch"], "top-1 (%)": ev["top1"],
                                                   "top-5 (%)": ev["top5"], "loss": ev["loss"], "images": ev["images"]}
    summary = (f"`{description.model}` trained with antismooth (DeepSpeed ZeRO), carrying the anti-oversmoothing "
                   f"techniques (AttnScale / FeatScale) of {PAPER}.")
    return {"description": summary, "details": details, "usage": _usage(name), "citation": CITATION,
            "tags": ["image-classification", "timm", "antismooth"]}


# ----------------------------------------------------------------------------------------------
# Writing the folder, and pushing it


def _provenance(description: ModelDescription) -> dict[str, Any]:
    recorded = description.provenance()
    return {k: recorded[k] for k in CARD_PROVENANCE if k in recorded}


def _hf_config(meta: ModelDescription | Mapping[str, Any]) -> dict[str, Any]:
    """The parts of config.json timm's save_for_hf takes from us: class names and our provenance."""
    description = ModelDescription.of(meta)
    config: dict[str, Any] = {TIMM_META_KEY: _provenance(description)}
    if description.classes:
        config["label_names"] = list(description.classes)
    return config


def _data_config(meta: ModelDescription | Mapping[str, Any]) -> dict[str, Any]:
    data = ModelDescription.of(meta).data_config
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in DATA_CONFIG_KEYS}


def _check_folder_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file: --format timm writes a folder; choose another --out.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty: pass --overwrite to replace it, or choose "
                              "another --out.")


def save_timm_folder(model: nn.Module, meta: ModelDescription | Mapping[str, Any], out: str | Path, card: Mapping[str, Any],
                     overwrite: bool = False) -> Path:
    """Write config.json + model.safetensors (timm's save_for_hf) and README.md into `out`, atomically: a
    temporary folder beside it is renamed onto it, so a failure leaves nothing half-written."""
    from timm.models import save_for_hf
    from timm.models._hub import generate_readme  # timm's own card layout, the one push_to_hf_hub writes

    out = Path(out)
    _check_folder_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_for_hf(model, tmp, model_config=_hf_config(meta), safe_serialization=True, data_config=_data_config(meta))
        (tmp / CARD_FILE).write_text(generate_readme(dict(card), out.name), encoding="utf-8")
        honour_umask(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_timm(path: str | Path, out: str | Path, tag: Optional[str] = None, dtype: str = "fp32",
                overwrite: bool = False, ema: bool = False) -> tuple[ExportResult, nn.Module, dict[str, Any]]:
    """Consolidate one checkpoint (or its model EMA) into a timm folder; also returns the model and card (for
    push_to_hub)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
    _check_folder_output(Path(out), overwrite)  # before the slow part
    ref, state_dict, meta = consolidate_checkpoint(path, tag, dtype, ema)
    if "model" not in meta:
        raise ValueError(f"{ref.tag_dir} has no antismooth.json, so its model cannot be named in timm's config.json; "
                         "write one with antismooth.checkpoint.write_model_meta, or export a file (--format file).")
    description = ModelDescription.from_dict(meta)
    model = build_model(state_dict, description)
    num_params = sum(t.numel() for t in state_dict.values())
    run = ref.run_folder
    card = model_card(Path(out).name, description, num_params, run_summary(run.root if run else None))
    written = save_timm_folder(model, description, out, card, overwrite)
    size = sum(p.stat().st_size for p in written.iterdir())
    return ExportResult(written, ref, meta, num_params, size), model, card


def push_to_hub(model: nn.Module, meta: ModelDescription | Mapping[str, Any], repo_id: str, card: Mapping[str, Any],
                folder: str | Path = "<folder>", private: bool = False) -> str:
    """Upload the model with timm's push_to_hf_hub (config.json, model.safetensors, the card); returns its URL."""
    from timm.models._hub import has_hf_hub
    if not has_hf_hub():
        raise HubError("uploading needs the huggingface_hub package, which is not installed: `pip install "
                       "huggingface_hub`, then run again (the exported folder is complete without it).")
    from timm.models import push_to_hf_hub
    try:
        url = push_to_hf_hub(model, repo_id, private=private, model_config=_hf_config(meta), model_card=dict(card),
                             safe_serialization=True, data_config=_data_config(meta))
    except Exception as err:  # noqa: BLE001  (network, auth and HTTP errors come from httpx/requests/hf_hub alike)
        _logger.debug("push_to_hf_hub failed", exc_info=True)
        reason = f"{type(err).__name__}: {err}".splitlines()[0][:200]
        raise HubError(f"could not upload to the Hugging Face Hub repo {repo_id} ({reason}): check the network and "
                       "`huggingface-cli login`, then upload the exported folder with `huggingface-cli upload "
                       f"{repo_id} {folder}`.") from None
    return str(url)
