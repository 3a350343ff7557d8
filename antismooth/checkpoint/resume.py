"""Choosing the checkpoint to resume from, and loading it at any world size."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from ..config import ConfigError
from ..distributed import DistEnv, all_gather_object, barrier, broadcast_object, usable_cpus
from .files import CLIENT_STATE_KEY
from .run_folder import RunFolder
from .universal import Conversion, convert_to_universal, load_checkpoint

_logger = logging.getLogger(__name__)


def choose_resume_tag(run_folder: RunFolder, env: DistEnv) -> Optional[str]:
    """The newest complete checkpoint that every rank can read back, one decision for all ranks (a rank that
    chose alone could load while the others start fresh, and hang them). Newer damaged ones are renamed
    `<tag>.damaged`, never deleted, and `latest` names the one the run continues from. Folders newer than `latest`
    (a save that some rank never finished) are removed first, and said in the log."""
    if env.rank == 0 and (uncommitted := run_folder.remove_uncommitted()):
        _logger.warning("Removed %s from %s: a save that stopped before every rank had written it (never named in "
                        "`latest`, so never resumed from).", ", ".join(uncommitted), run_folder.checkpoints)
    tags = broadcast_object(run_folder.complete_tags() if env.rank == 0 else None)
    damaged: dict[str, list[str]] = {}
    for tag in reversed(tags):
        files = [name for names in all_gather_object(run_folder.damaged_files(tag, env.rank, env.world_size))
                 for name in names]
        if not files:
            break
        damaged[tag] = files
    else:
        if tags:
            listing = "; ".join(f"{bad}: " + ", ".join(files) for bad, files in damaged.items())
            raise ConfigError(f"No checkpoint in {run_folder.checkpoints} can be read back ({listing}): restore "
                              "them from a backup, or start a new --output (--finetune from an export of an older run).")
        return None
    if damaged and env.rank == 0:
        for bad, files in damaged.items():
            aside = run_folder.set_aside(bad)
            _logger.warning("Checkpoint %s cannot be read back (%s): moved to %s; going on from %s.", bad,
                            ", ".join(files), aside.name, tag)
        run_folder.commit(tag)
    barrier()
    return tag


@dataclass(frozen=True)
class Loaded:
    """A checkpoint loaded into an engine: the trainer state it saved, and how it was loaded (for the log)."""
    tag: str
    state: dict[str, Any]
    how: str              # "" at the world size that saved it, else "; saved by N processes, loaded on M ..."


def load_for_resume(engine, run_folder: RunFolder, tag: str, env: DistEnv) -> Loaded:
    """Load checkpoint `tag` into the engine: as it is when this world size saved it, else through DeepSpeed's
    universal checkpoint (made once, by rank 0, while the others wait)."""
    saved_world = run_folder.saved_world_size(tag)
    universal = saved_world is not None and saved_world != env.world_size
    load_tag, how = tag, ""
    if universal:
        conversion = _convert_on_rank_zero(run_folder, tag, env)
        load_tag = conversion.folder.name
        how = (f"; saved by {processes(saved_world)}, loaded on {env.world_size} through DeepSpeed's universal "
               f"checkpoint {conversion.folder.name} (" + ("reused" if conversion.reused else
                                                          f"converted in {conversion.seconds:.1f} s") + ")")
    load_path, client_state = load_checkpoint(engine, run_folder.checkpoints, load_tag, universal)
    if load_path is None:
        raise ConfigError(f"Checkpoint {run_folder.tag_dir(tag)} could not be loaded: move it away to "
                          "start from the previous one, or start a new --output.")
    return Loaded(tag, client_state[CLIENT_STATE_KEY], how)


def processes(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"


def conversion_workers() -> int:
    """Processes for DeepSpeed's converter: the node's other ranks wait meanwhile, so half its CPUs (at most 8);
    1 (no process pool) on small machines."""
    return max(1, min(8, usable_cpus() // 2))


def _convert_on_rank_zero(run_folder: RunFolder, tag: str, env: DistEnv) -> Conversion:
    """Rank 0 converts checkpoint `tag` to a universal checkpoint (or finds it converted) while the others wait;
    a failure stops every rank with rank 0's reason."""
    result: Conversion | str = ""
    if env.rank == 0:
        try:
            result = convert_to_universal(run_folder.checkpoints, tag, workers=conversion_workers())
        except Exception as err:  # noqa: BLE001  (any converter failure: every rank must hear of it)
            result = f"{type(err).__name__}: {err}"
    result = broadcast_object(result)
    if isinstance(result, str):
        saved = processes(run_folder.saved_world_size(tag))
        raise ConfigError(f"Checkpoint {run_folder.tag_dir(tag)} could not be converted for a resume on "
                          f"{processes(env.world_size)} ({result}): resume on the {saved} that saved it, or convert "
                          "it by hand with tools/reshard.py to see DeepSpeed's full error.")
    return result
