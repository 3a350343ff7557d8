"""The run folder, in one place: what `--output` holds, and how each part is named, written, checked and read.

    runs/<run>/
      run.json                    the resolved flags, DeepSpeed JSON and derived numbers (rewritten at each start)
      log.txt, tensorboard/       rank 0's log and curves
      eval.jsonl                  one record per evaluation (the model card reads these)
      checkpoints/                DeepSpeed's save_dir
        latest                    the newest complete tag: written here, atomically, after every rank's files
        step00001000/             one checkpoint: DeepSpeed's files (mp_rank_00_model_states.pt,
                                  zero_pp_rank_{r}_mp_rank_00_optim_states.pt, ...), antismooth.json (the
                                  model's description, step, batch), ema_rank{r}.pt (the model EMA)
        step00001000_universal/   DeepSpeed's universal checkpoint of it, for a resume at another world size
        step00000500.damaged/     a checkpoint that could not be read back, set aside (never deleted)

One owner per file on disk: `latest` (latest.py), the tag folders (tags.py), the rank files (rank_files.py),
antismooth.json (meta.py), the run's own records (run_folder.py); the conversion for another world size
(universal.py) and the export's lookup (lookup.py) beside them. The Checkpointer (checkpointer.py), as
torchtitan's CheckpointManager, owns when and how a run saves and loads: the trainer asks whether a save is due,
and each part (engine, trainer state, EMA, training stream) saves and restores its own state. The tag folders
stay DeepSpeed's format, so DeepSpeed's own loader, zero_to_fp32 and ds_to_universal read them too.

DeepSpeed's checkpoint files are pickles (zero_to_fp32 and load_checkpoint read them with
weights_only=False): resume and export only checkpoints you trust, your own runs.
"""
from __future__ import annotations

from .checkpointer import Checkpointer
from .files import (CLIENT_STATE_KEY, EMA_FILE, EVAL_FILE, LATEST_FILE, META_FILE, UNIVERSAL_SUFFIX, CheckpointError,
                    checkpoint_tag, ema_file, ema_files, fsync_folder)
from .latest import read_latest, write_latest
from .lookup import CheckpointRef, resolve_checkpoint
from .meta import read_description, read_model_meta, write_model_meta
from .rank_files import RankFiles, damaged_files, files_of_rank, require_every_rank, saved_world_size
from .resume import Loaded, choose_resume_tag, conversion_workers, load_for_resume, processes
from .run_folder import RunFolder
from .tags import complete_tags, list_tags
from .universal import Conversion, convert_to_universal, load_checkpoint, universal_folder

__all__ = ["META_FILE", "LATEST_FILE", "EVAL_FILE", "EMA_FILE", "UNIVERSAL_SUFFIX", "CLIENT_STATE_KEY",
           "CheckpointError", "CheckpointRef", "Conversion", "Loaded", "RunFolder", "RankFiles",
           "checkpoint_tag", "ema_file", "ema_files", "fsync_folder",
           "read_latest", "write_latest", "list_tags", "complete_tags",
           "files_of_rank", "damaged_files", "saved_world_size", "require_every_rank",
           "write_model_meta", "read_model_meta", "read_description", "resolve_checkpoint", "universal_folder", "convert_to_universal",
           "load_checkpoint", "choose_resume_tag", "load_for_resume", "conversion_workers", "processes", "Checkpointer"]
