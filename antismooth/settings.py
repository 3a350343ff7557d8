"""Settings written once: each field of a settings dataclass carries its flag, default and help, and the command
line and the recipe files (TOML) are made from them.

A section is a dataclass whose fields are made with `setting(...)`; a run's settings are a dataclass of sections
(antismooth.config.TrainConfig, with the data's sections from antismooth.data.settings). From that tree come the
argparse parser (`build_parser`), the flat {flag name: value} record that run.json keeps (`flat_values`) and the
recipe files (`read_recipe`): `--config recipe.toml` sets any flag by its name (`drop_path = 0.1`), the command
line overrides it. Validation lives in each section's `__post_init__`, once; choices are checked there too
(`check_choices`), not by argparse. Standard library only: antismooth.data imports it.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

__all__ = ["ConfigError", "setting", "section", "check_choices", "flag_fields", "flat_values", "build_parser",
           "parse", "flags_markdown", "read_recipe", "from_flat", "BatchLayout"]


class ConfigError(ValueError):
    """A setting a user got wrong; the message names it and the fix."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, whose complaints (a missing or mistyped flag) are the contract's one line rather than the usage
    block and `prog: error:` (--help still prints the whole usage; docs/commands.md)."""

    def error(self, message: str):
        raise ConfigError(f"{message}: see `{self.prog} --help`.")


# --- declaring settings ----------------------------------------------------------------------------------------

def setting(default: Any = dataclasses.MISSING, *, flag: Optional[str] = None, help: str, **argparse_kwargs: Any):
    """A settings field: its default, its command-line flag (None: not a flag, set by start-up from what it
    derives) and help, and any argparse arguments the flag needs (type for a None default, action, nargs, const,
    choices, aliases, dest). Mutable defaults (a dict) are copied per instance."""
    metadata = {"help": help, "flag": flag, **argparse_kwargs}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: type, title: str):
    """A section of a settings tree: a dataclass of settings fields, titled in --help."""
    return dataclasses.field(default_factory=cls, metadata={"section": title})


def check_choices(section_obj: Any) -> None:
    """Every field with choices holds one of them (the one check of those values: argparse lists, never checks)."""
    for f in dataclasses.fields(section_obj):
        choices = f.metadata.get("choices")
        value = getattr(section_obj, f.name)
        if choices and value is not None and value not in choices:
            raise ConfigError(f"{f.metadata.get('flag') or f.name} must be one of {', '.join(map(str, choices))}, "
                              f"got {value!r}.")


def flag_fields(tree: type) -> Iterator[tuple[Optional[dataclasses.Field], dataclasses.Field]]:
    """(section field or None for a top-level setting, field) of every flag of a settings tree, in order."""
    for f in dataclasses.fields(tree):
        if "section" in f.metadata:
            for g in dataclasses.fields(f.default_factory):
                if g.metadata.get("flag"):
                    yield f, g
        elif f.metadata.get("flag"):
            yield None, f


def flag_key(f: dataclasses.Field) -> str:
    """The name a flag's value has in run.json and in recipe files: its argparse dest (--drop-path: drop_path)."""
    return f.metadata.get("dest") or f.metadata["flag"].lstrip("-").replace("-", "_")


def _path(sect: Optional[dataclasses.Field], f: dataclasses.Field) -> str:
    return f"{sect.name}.{f.name}" if sect else f.name


def flat_values(config: Any) -> dict[str, Any]:
    """{flag key: value} of every flag of a settings tree instance: run.json's "flags"."""
    values = {}
    for sect, f in flag_fields(type(config)):
        owner = getattr(config, sect.name) if sect else config
        value = getattr(owner, f.name)
        values[flag_key(f)] = list(value) if isinstance(value, tuple) else value
    return values


def from_flat(tree: type, values: dict[str, Any]) -> Any:
    """A settings tree from {flag key: value} (the keys run.json and recipes use); missing keys keep defaults."""
    by_key = {flag_key(f): (sect, f) for sect, f in flag_fields(tree)}
    unknown = [k for k in values if k not in by_key]
    if unknown:
        raise ConfigError(_unknown_message(unknown[0], by_key, "setting"))
    nested: dict[str, Any] = {}
    for key, value in values.items():
        sect, f = by_key[key]
        if sect:
            nested.setdefault(sect.name, {})[f.name] = value
        else:
            nested[f.name] = value
    sections = {f.name: f.default_factory(**nested.pop(f.name, {}))
                for f in dataclasses.fields(tree) if "section" in f.metadata}
    return tree(**nested, **sections)


def _unknown_message(key: str, known: dict, what: str) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"Unknown {what} {key!r}" + (f": did you mean {close[0]!r}?" if close else
                                         ": see `pretrain.py --help` for the settings' names.")


# --- the command line and recipe files -------------------------------------------------------------------------

ARGPARSE_KEYS = ("type", "action", "nargs", "const", "metavar")


def build_parser(tree: type, description: str) -> argparse.ArgumentParser:
    """The argparse parser of a settings tree: one flag per settings field, grouped by section, each with its help
    and default; values land in dests "section.field". `--config FILE` names a recipe (read_recipe)."""
    defaults = tree()
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="RECIPE.toml", default=None,
                   help="a recipe file (recipes/*.toml): any of the settings below by name (drop_path = 0.1); "
                        "flags on the command line override it")
    groups: dict[str, Any] = {}
    for sect, f in flag_fields(tree):
        title = sect.metadata["section"] if sect else "run"
        group = groups.setdefault(title, p.add_argument_group(title) if sect else p)
        meta = f.metadata
        kwargs = {k: meta[k] for k in ARGPARSE_KEYS if k in meta}
        default = getattr(getattr(defaults, sect.name) if sect else defaults, f.name)
        if "choices" in meta:
            kwargs.setdefault("metavar", "{" + ",".join(map(str, meta["choices"])) + "}")
        if "action" not in kwargs and "type" not in kwargs and default is not None:
            kwargs["type"] = type(default)
        if kwargs.get("action") in ("store_true", "store_false") or "action" in kwargs and kwargs["action"] is \
                argparse.BooleanOptionalAction:
            kwargs.pop("metavar", None)
        elif "metavar" not in kwargs and kwargs.get("nargs") not in ("*", "?"):
            kwargs["metavar"] = flag_key(f).upper()
        shown = "" if default in (None, {}, "") or isinstance(default, bool) else " (default: %(default)s)"
        group.add_argument(meta["flag"], *meta.get("aliases", ()), dest=_path(sect, f), default=default,
                           help=meta["help"] + shown, **kwargs)
    return p


def flags_markdown(tree: type) -> str:
    """The flags of a settings tree as a Markdown table by section (flag, default, help): docs/training.md holds it,
    and a test checks that it is the parser's."""
    defaults = tree()
    rows, title = ["| flag | default | meaning |", "|---|---|---|"], None
    for sect, f in flag_fields(tree):
        if sect and sect.metadata["section"] != title:
            title = sect.metadata["section"]
            rows.append(f"| **{title}** | | |")
        meta = f.metadata
        default = getattr(getattr(defaults, sect.name) if sect else defaults, f.name)
        if meta.get("action") is argparse.BooleanOptionalAction:
            names = f"`{meta['flag']}` / `--no-{meta['flag'][2:]}`"
        else:
            names = ", ".join(f"`{name}`" for name in (meta["flag"], *meta.get("aliases", ())))
        shown = "on" if default is True else "off" if default is False else "" if default in (None, {}, "") \
            else f"`{default}`"
        if meta.get("action") == "store_false":
            shown = "off"   # the flag turns off what is on by default
        rows.append(f"| {names} | {shown} | {meta['help'].replace('|', '&#124;')} |")
    return "\n".join(rows) + "\n"


def parse(tree: type, parser: argparse.ArgumentParser, argv: Optional[list[str]]) -> Any:
    """A settings tree from the command line: a recipe's values (--config) as the defaults, the flags over them."""
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**read_recipe(tree, first.config))
    args = vars(parser.parse_args(argv))
    flat_by_path = {_path(sect, f): flag_key(f) for sect, f in flag_fields(tree)}
    return from_flat(tree, {flat_by_path[k]: v for k, v in args.items() if k in flat_by_path})


def read_recipe(tree: type, path: str | Path) -> dict[str, Any]:
    """A recipe file's settings as {"section.field": value}, each name and type checked: a TOML file of
    `flag_name = value` lines (the flag without dashes, dashes as underscores: drop_path = 0.1)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Recipe {path} does not exist: pass one of recipes/*.toml to --config.")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"Recipe {path} is not valid TOML ({err}): fix the file.") from err
    by_key = {flag_key(f): (sect, f) for sect, f in flag_fields(tree)}
    defaults = tree()
    out = {}
    for key, value in values.items():
        if key not in by_key:
            raise ConfigError(f"{path}: " + _unknown_message(key, by_key, "setting"))
        sect, f = by_key[key]
        default = getattr(getattr(defaults, sect.name) if sect else defaults, f.name)
        expected = _value_type(f, default)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or expected is int and isinstance(value, bool):
            raise ConfigError(f"{path}: {key} = {value!r} should be {_TYPE_NAMES.get(expected, expected.__name__)}.")
        out[_path(sect, f)] = value
    return out


_TYPE_NAMES = {int: "a whole number", float: "a number", str: "a string", bool: "true or false", dict: "a table"}


def _value_type(f: dataclasses.Field, default: Any) -> type:
    meta = f.metadata
    if meta.get("action") in ("store_true", "store_false") or meta.get("action") is argparse.BooleanOptionalAction:
        return bool
    if callable(meta.get("type")) and meta["type"] in (int, float, str):
        return meta["type"]
    return type(default) if default is not None else str


# --- derived once ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's samples are laid out: micro batch per rank × accumulation × ranks, and the steps
    that make an epoch of `num_samples` (the last partial global batch dropped). Computed here and only here."""
    micro_batch: int
    grad_accum: int
    world_size: int
    num_samples: int

    def __post_init__(self) -> None:
        if self.steps_per_epoch < 1:
            raise ConfigError(f"The training split has {self.num_samples} samples, fewer than one global batch of "
                              f"{self.global_batch} ({self.micro_batch} per process × {self.grad_accum} accumulation "
                              f"× {self.world_size} processes): lower the batch size in the DeepSpeed config.")

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    @property
    def epoch_samples(self) -> int:
        """Samples trained on per epoch: the same at any world size (a resumed run holds its global batch)."""
        return self.steps_per_epoch * self.global_batch
