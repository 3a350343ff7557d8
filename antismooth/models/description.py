"""What a checkpoint or an exported file says of its model: enough to rebuild it and its evaluation transform.

One typed description for every place that builds a model from weights (export, the timm folder, evaluation,
analysis) and for every file that carries it: `antismooth.json` beside each checkpoint, a .safetensors header, the
`.json` beside a .pth, the `antismooth` entry of a timm folder's config.json. On disk it stays the flat JSON object
those files have always held (`model`, `model_kwargs`, `classes`, `data_config`, then where it came from), so the
files written before this class read as they are.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn

__all__ = ["ModelDescription", "DATA_CONFIG_KEYS", "PROVENANCE_KEYS", "encode_text_values", "decode_text_values"]

# timm's data config keys that travel with the weights (timm.data.resolve_model_data_config's names).
DATA_CONFIG_KEYS = ("input_size", "mean", "std", "crop_pct", "interpolation")
# Where the weights came from: the checkpoint's step and batch (written at each save), then what an export adds.
PROVENANCE_KEYS = ("step", "epoch", "global_batch", "micro_batch", "world_size", "tag", "zero_stage", "dtype", "ema")
TEXT_KEYS = ("model", "tag", "dtype")   # the fields that are strings: every other one travels JSON-encoded as text


@dataclass(frozen=True)
class ModelDescription:
    """A model by its timm name and constructor arguments, its class names (output i is classes[i]), the data
    config of its evaluation transform, and the provenance of its weights (None where not recorded)."""
    model: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    classes: Optional[list[str]] = None
    data_config: dict[str, Any] = field(default_factory=dict)
    step: Optional[int] = None
    epoch: Optional[int] = None
    global_batch: Optional[int] = None
    micro_batch: Optional[int] = None
    world_size: Optional[int] = None
    tag: Optional[str] = None
    zero_stage: Optional[int] = None
    dtype: Optional[str] = None
    ema: Optional[bool] = None

    # --- the flat JSON object on disk

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str | Path = "the description") -> "ModelDescription":
        """Read the on-disk object; ValueError names `source` and the field when one has the wrong type."""
        if not isinstance(raw.get("model"), str) or not raw["model"]:
            raise ValueError(f"{source} names no model (its 'model' field): write the timm model name there.")
        kinds = {"model_kwargs": dict, "classes": list, "data_config": dict}
        for key, kind in kinds.items():
            if raw.get(key) is not None and not isinstance(raw[key], kind):
                raise ValueError(f"the {key!r} of {source} is not a JSON {'object' if kind is dict else 'list'}: "
                                 "fix that field or export the weights again.")
        return cls(model=raw["model"], model_kwargs=dict(raw.get("model_kwargs") or {}),
                   classes=list(raw["classes"]) if raw.get("classes") is not None else None,
                   data_config=dict(raw.get("data_config") or {}),
                   **{key: raw[key] for key in PROVENANCE_KEYS if raw.get(key) is not None})

    @classmethod
    def of(cls, description: "ModelDescription | Mapping[str, Any]") -> "ModelDescription":
        """A description as it is, or read from its on-disk object."""
        return description if isinstance(description, cls) else cls.from_dict(description)

    @classmethod
    def from_text(cls, raw: Mapping[str, str], source: str | Path = "the description") -> "ModelDescription":
        """Read string values (a .safetensors header: str -> str), each field but the names JSON-decoded."""
        return cls.from_dict(decode_text_values(raw, source), source)

    def to_dict(self) -> dict[str, Any]:
        """The on-disk object: the four model fields always, the provenance where recorded."""
        out = {"model": self.model, "model_kwargs": dict(self.model_kwargs), "classes": self.classes,
               "data_config": dict(self.data_config)}
        out.update({key: getattr(self, key) for key in PROVENANCE_KEYS if getattr(self, key) is not None})
        return out

    def provenance(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in PROVENANCE_KEYS if getattr(self, key) is not None}

    def replace(self, **changes: Any) -> "ModelDescription":
        return dataclasses.replace(self, **changes)

    # --- the model it describes

    def create(self, **overrides: Any) -> nn.Module:
        """The model, freshly initialised (`overrides` win over the recorded arguments); an unknown name is one
        sentence (ValueError)."""
        import timm

        if not timm.is_model(self.model):
            raise ValueError(f"unknown model {self.model!r}: see antismooth.models.MODEL_NAMES or timm.list_models().")
        return timm.create_model(self.model, **{**self.model_kwargs, **overrides})

    def parameter_shapes(self) -> dict[str, torch.Size]:
        """Each parameter's shape, from the model built on the meta device (no memory, no init)."""
        with torch.device("meta"):
            return {name: p.shape for name, p in self.create().named_parameters()}

    def build(self, weights: str | Path | Mapping[str, torch.Tensor], **overrides: Any) -> nn.Module:
        """The model with `weights` loaded with strict=True: a file (through checkpoint_filter_fn, as timm loads one),
        or a state_dict as it is, the model then in its dtype; WeightsMismatchError says what differs."""
        from .weights import load_weights

        model = self.create(**overrides)
        if isinstance(weights, Mapping):
            model.load_state_dict(weights, strict=True)
            return model.to(next(iter(weights.values())).dtype)
        return load_weights(model, weights)


def encode_text_values(values: Mapping[str, Any]) -> dict[str, str]:
    """A description's on-disk object as str -> str (safetensors metadata): every value but a string JSON-encoded."""
    return {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in values.items()}


def decode_text_values(raw: Mapping[str, str], source: str | Path = "the description") -> dict[str, Any]:
    """The inverse of encode_text_values for the description's fields (others are left as text)."""
    fields = [f.name for f in dataclasses.fields(ModelDescription) if f.name not in TEXT_KEYS]
    values: dict[str, Any] = dict(raw)
    for key in fields:
        if isinstance(values.get(key), str):
            try:
                values[key] = json.loads(values[key])
            except ValueError:
                raise ValueError(f"the {key!r} metadata of {source} is not valid JSON; export it again.") from None
    return values
