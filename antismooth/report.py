"""Where a run reports its curves (--report-to): TensorBoard in the run folder, always, and Weights & Biases beside
it when asked (`pip install antismooth[wandb]`), as timm's --log-wandb and OpenCLIP's --report-to do. Rank 0 only:
the Trainer opens a Reporter there and nowhere else.

W&B reads its own environment (WANDB_API_KEY, WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE=offline for a machine without
network); its run's config is the run's resolved settings, as run.json holds them.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["REPORT_TARGETS", "parse_targets", "check_targets_installed", "Reporter"]

log = logging.getLogger(__name__)

REPORT_TARGETS = ("tensorboard", "wandb")
WANDB_DEFAULT_PROJECT = "antismooth"


def parse_targets(value: str) -> tuple[str, ...]:
    """"tensorboard,wandb" -> ("tensorboard", "wandb"); names checked, TensorBoard always among them."""
    from .settings import ConfigError

    targets = tuple(t.strip() for t in value.split(",") if t.strip())
    unknown = [t for t in targets if t not in REPORT_TARGETS]
    if unknown or "tensorboard" not in targets:
        raise ConfigError(f"--report-to {value!r} is not one of tensorboard or tensorboard,wandb: TensorBoard always "
                          "writes the run folder's curves, W&B can report beside it.")
    return targets


def check_targets_installed(targets: tuple[str, ...]) -> None:
    """Start-up's check, before any process group: a target whose package is missing stops the run in one sentence."""
    from .settings import ConfigError

    if "wandb" in targets and importlib.util.find_spec("wandb") is None:
        raise ConfigError("--report-to wandb needs the wandb package, which is not installed: "
                          "pip install 'antismooth[wandb]', or drop wandb from --report-to.")


class Reporter:
    """TensorBoard's SummaryWriter methods the Trainer uses (add_scalar, add_figure, close), each sent to every
    target of --report-to."""

    def __init__(self, folder: Path, tensorboard: Path, targets: tuple[str, ...], settings: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.tensorboard = SummaryWriter(str(tensorboard))
        self.wandb = self._open_wandb(folder, settings) if "wandb" in targets else None

    @staticmethod
    def _open_wandb(folder: Path, settings: dict[str, Any]):
        import wandb

        run = wandb.init(project=os.environ.get("WANDB_PROJECT") or WANDB_DEFAULT_PROJECT, name=folder.name,
                         dir=str(folder), config=settings, reinit="create_new")
        log.info("reporting to W&B: %s", run.url or f"offline run in {run.dir}")
        return run

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.tensorboard.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log({tag: value}, step=step)

    def add_figure(self, tag: str, figure, step: int) -> None:
        if self.wandb is not None:   # before TensorBoard, which closes the figure
            self.wandb.log({tag: _wandb_image(figure)}, step=step)
        self.tensorboard.add_figure(tag, figure, step)

    def close(self) -> None:
        self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_image(figure):
    """A matplotlib figure as a W&B image, rendered here: W&B's own conversion needs pyplot, which the figures of
    antismooth.spectral never import (no display, no global state)."""
    import io

    import wandb
    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    buffer.seek(0)
    return wandb.Image(Image.open(buffer))
