"""Oversmoothing diagnostics: how much high-frequency signal each transformer block keeps.

Wang et al. (ICLR 2022) Sec. 3 show that self-attention is a low-pass filter: repeated, it
keeps only the DC component of the tokens, so deep ViTs oversmooth. The measurements here
watch that happen block by block, read through forward hooks on an unchanged model:

- hc_share: ||HC(X)||² / ||X||², the high-frequency share of the tokens' energy, with the
  paper's split DC(X) = token mean, HC(X) = X − DC(X) (layers.split_dc_hc). 1 − hc_share is
  the DC share; 0 means every token is the same vector.
- delta_log_amplitude: Park & Kim, "How do vision transformers work?" (ICLR 2022) Fig. 2.
  The patch tokens are laid back on their h×w grid, each channel is 2-D Fourier transformed,
  and log(|F| + 1e-6) is averaged over channels and images; the value is that mean at the
  highest frequency of the half-diagonal of the fftshift'd spectrum, the corner (h−1, w−1),
  minus the mean at its centre (DC). For even h that corner is the frequency (h/2 − 1)·2π/h
  per axis (6π/7 on a 14×14 grid), the point Park & Kim's plots label 1.0π. More negative
  means smoother.
- patch_uniformity: the mean cosine similarity of all pairs of distinct patch tokens
  (Gong et al. 2021, "Vision transformers with patch diversification"); 1 means collapsed.
- attention_similarity (optional): the cosine similarity of block i's attention map with
  block i+1's, per head and per key column, averaged (Zhou et al. 2021, "DeepViT", Eq. 4:
  "attention collapse"). It needs the explicit attention matrix, so the model runs with
  fused attention switched off while measuring; the matrix is the one that multiplies V
  (softmaxed, talking-heads mixed for CaiT, AttnScale'd where the model has λ).
- the learned parameters: mean |λ| of AttnScale per block, the mean FeatScale s_d (`lamb1`)
  and s_h (`lamb2`) per block.

The token measurements use the patch tokens of each block's output only: the class and
register tokens are left out (prefix = tokens − h·w), because the Fourier measurement needs
exactly the grid, and so that ViT (class token in every block) and CaiT (no class token in
its self-attention stage) are measured alike. The attention maps are compared whole.

Which blocks and which grid each block sees come from antismooth.models.structure. A Swin's
blocks are measured stage by stage, each on its own stage's grid (56², 28², 14², 7² at 224 px),
and two more things are recorded for it: the stage of each block (`stage`), and
- hc_share_window: the high-frequency share within the windows the block's attention mixed
  (shifted as the block shifts them), Σ_windows ||X − mean_window(X)||² / ||X||²: the DC that
  AttnScale's D refers to is a window's, not the image's. Recorded for every block of a model
  with windowed attention (a block whose window is its whole grid gives its hc_share; empty for
  ViT/CaiT); NaN for a block whose window does not tile its grid (timm pads those).
Attention maps are compared only between consecutive blocks of one stage (NaN across a patch
merging, where the windows and heads change), each image's windows averaged; patch_uniformity
is NaN on a one-token grid.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from antismooth.models import structure
from antismooth.models.layers import set_fused_attn, split_dc_hc
from antismooth.models.structure import TokenGrid

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["SpectralReport", "MEASUREMENTS", "TRAINING_MEASUREMENTS", "WINDOW_MEASUREMENTS", "window_hc_share", "hc_share", "delta_log_amplitude",
           "patch_uniformity", "attention_similarity", "patch_tokens", "paper_parameters", "measure",
           "plot_measurement", "curves_figure", "write_spectral", "log_spectral"]

_logger = logging.getLogger(__name__)

LOG_EPS = 1e-6  # added to |F| before the log, as in Park & Kim's code, so an empty frequency stays finite

# Every per-block measurement: (plot title, y-axis label). Order is the order of plots and tables.
MEASUREMENTS: dict[str, tuple[str, str]] = {
    "hc_share": ("High-frequency share of the patch tokens", "‖HC(X)‖² / ‖X‖²"),
    "delta_log_amplitude": ("Relative log amplitude at the highest frequency",
                            "Δ log amplitude (highest − DC)"),
    "patch_uniformity": ("Patch uniformity", "mean pairwise cosine similarity"),
    "hc_share_window": ("High-frequency share within the attention windows", "Σ‖X − mean_window(X)‖² / ‖X‖²"),
    "attention_similarity": ("Attention collapse: block i vs block i+1", "cosine similarity of attention maps"),
    "attnscale_lambda": ("AttnScale λ", "mean |λ| over heads"),
    "featscale_s_d": ("FeatScale s_d (DC scale, lamb1)", "mean over channels"),
    "featscale_s_h": ("FeatScale s_h (high-frequency scale, lamb2)", "mean over channels"),
}
# The cheap ones, logged during training (no explicit attention needed); with windowed attention also these.
TRAINING_MEASUREMENTS = ("hc_share", "delta_log_amplitude", "patch_uniformity")
WINDOW_MEASUREMENTS = ("hc_share_window",)


# --- the measurements as pure functions ----------------------------------------------------------------

def hc_share(x: torch.Tensor) -> torch.Tensor:
    """||HC(X)||² / ||X||² of tokens [..., N, C], one value per leading index (Wang et al. Sec. 3)."""
    x = x.float()
    _, hc = split_dc_hc(x)
    return hc.pow(2).sum(dim=(-2, -1)) / x.pow(2).sum(dim=(-2, -1)).clamp_min(torch.finfo(x.dtype).tiny)


def delta_log_amplitude(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Park & Kim's ΔLog amplitude of patch tokens [B, h·w, C]: mean log|F| at the corner minus at DC, per image.

    Equals the last point of their Fig. 2a curve (fftshift'd spectrum, half-diagonal, relative to DC).
    """
    h, w = grid
    if x.shape[-2] != h * w:
        raise ValueError(f"delta_log_amplitude needs the {h}x{w}={h * w} patch tokens of the grid, got {x.shape[-2]}.")
    feature_map = x.float().transpose(-2, -1).unflatten(-1, (h, w))  # [B, C, h, w], row-major as timm's patches
    spectrum = torch.fft.fftshift(torch.fft.fft2(feature_map), dim=(-2, -1))
    log_amplitude = (spectrum.abs() + LOG_EPS).log()
    return (log_amplitude[..., h - 1, w - 1] - log_amplitude[..., h // 2, w // 2]).mean(dim=-1)


def patch_uniformity(x: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over the N(N−1) ordered pairs of distinct tokens [..., N, C], per leading index."""
    n = x.shape[-2]
    if n < 2:
        raise ValueError(f"patch_uniformity needs at least 2 tokens, got {n}.")
    unit = F.normalize(x.float(), dim=-1)
    # Σ_{i≠j} <u_i, u_j> = ||Σ_i u_i||² − Σ_i ||u_i||²: O(N·C) instead of the N×N Gram matrix.
    all_pairs = unit.sum(dim=-2).pow(2).sum(dim=-1)
    self_pairs = unit.pow(2).sum(dim=(-2, -1))
    return (all_pairs - self_pairs) / (n * (n - 1))


def attention_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """DeepViT's cross-layer similarity of attention maps [B, H, N, N]: cosine per head and key column, averaged."""
    if a.shape != b.shape:
        raise ValueError(f"attention maps of different shapes cannot be compared: "
                         f"{tuple(a.shape)} vs {tuple(b.shape)}.")
    return F.cosine_similarity(a.float(), b.float(), dim=-2).mean(dim=(-2, -1))


def window_hc_share(windows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per image: its windows' HC energy Σ_w ||X_w − mean(X_w)||² over its energy ||X||², from the windows
    [B·nW, n, C] (each image's nW windows together, as window_partition orders them) and tokens [B, N, C]."""
    _, hc = split_dc_hc(windows.float())
    hc_energy = hc.pow(2).sum(dim=(-2, -1)).view(tokens.shape[0], -1).sum(dim=-1)
    return hc_energy / tokens.float().pow(2).sum(dim=(-2, -1)).clamp_min(torch.finfo(torch.float32).tiny)


def patch_tokens(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The h·w patch tokens of a block output [B, prefix + h·w, C]: class/register tokens come first in timm."""
    num_patches = grid[0] * grid[1]
    if x.ndim != 3 or x.shape[1] < num_patches:
        raise ValueError(f"expected block outputs [batch, tokens >= {num_patches}, channels] for a "
                         f"{grid[0]}x{grid[1]} patch grid, got {tuple(x.shape)}.")
    return x[:, x.shape[1] - num_patches:]


# --- measuring a model ----------------------------------------------------------------------------------

@dataclass
class SpectralReport:
    """Per-block measurements of one model on one set of images; empty lists where not measured or absent."""
    hc_share: list[float]
    delta_log_amplitude: list[float]
    patch_uniformity: list[float]
    attention_similarity: list[float] = field(default_factory=list)  # entry i: block i vs block i+1
    attnscale_lambda: list[float] = field(default_factory=list)
    featscale_s_d: list[float] = field(default_factory=list)
    featscale_s_h: list[float] = field(default_factory=list)
    hc_share_window: list[float] = field(default_factory=list)   # windowed attention only (Swin)
    stage: list[int] = field(default_factory=list)               # each block's stage; hierarchical models only
    num_images: int = 0

    def curves(self) -> dict[str, list[float]]:
        """The non-empty measurements, in MEASUREMENTS order."""
        return {name: getattr(self, name) for name in MEASUREMENTS if getattr(self, name)}

    def as_dict(self) -> dict:
        return asdict(self)


def _blocks(model: nn.Module) -> Sequence[nn.Module]:
    blocks = structure.blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no transformer blocks to measure.")
    return blocks


def _mean_param(block: nn.Module, suffix: str, absolute: bool = False) -> float:
    """Mean (or mean |·|) of the block's parameter whose name ends in `suffix`; nan if it has none."""
    param = next((p for name, p in block.named_parameters() if name.endswith(suffix)), None)
    if param is None:
        return math.nan
    value = param.detach().float()
    return (value.abs() if absolute else value).mean().item()


def paper_parameters(model: nn.Module) -> dict[str, list[float]]:
    """Mean |λ| (AttnScale) and mean s_d, s_h (FeatScale) per block; a list only where the model has them."""
    blocks = _blocks(model)
    found = {
        "attnscale_lambda": [_mean_param(b, "attn.lamb", absolute=True) for b in blocks],
        "featscale_s_d": [_mean_param(b, "lamb1") for b in blocks],
        "featscale_s_h": [_mean_param(b, "lamb2") for b in blocks],
    }
    return {name: values if not all(math.isnan(v) for v in values) else [] for name, values in found.items()}


@contextmanager
def _explicit_attention(model: nn.Module) -> Iterator[None]:
    """Run every attention on its explicit-matrix path, then give each module back its own fused setting."""
    saved = {module: module.fused_attn for module in model.modules() if hasattr(module, "fused_attn")}
    set_fused_attn(model, False)
    try:
        yield
    finally:
        for module, fused in saved.items():
            module.fused_attn = fused


class _Recorder:
    """Forward hooks that keep each block's per-chunk sums of the per-image measurements.

    The sums stay on the model's device until `means()`, so a GPU is synchronised once, not per block.
    """

    def __init__(self, blocks: Sequence[nn.Module], grids: Sequence[TokenGrid], attention: bool) -> None:
        self.grids = grids
        self.windowed = any(grid.windowed for grid in grids)  # then hc_share_window for every block
        self.images_in_chunk = 0                              # set per forward: attention maps are per window
        depth = len(blocks)
        self.sums: dict[str, list[list[torch.Tensor]]] = {name: [[] for _ in range(depth)]
                                                          for name in TRAINING_MEASUREMENTS + WINDOW_MEASUREMENTS}
        self.sums["attention_similarity"] = [[] for _ in range(depth - 1)]  # pairs of consecutive blocks
        self.attention_seen = [0] * depth
        self.previous_attention: Optional[torch.Tensor] = None
        self.handles = [block.register_forward_hook(self._block_hook(i)) for i, block in enumerate(blocks)]
        if attention:
            for i, block in enumerate(blocks):
                dropout = next((m for name, m in block.named_modules() if name.endswith("attn_drop")), None)
                if dropout is None:
                    self.remove()
                    raise ValueError(f"block {i} ({type(block).__name__}) has no `attn_drop` module through which "
                                     "its attention matrix passes; attention collapse cannot be measured for it.")
                self.handles.append(dropout.register_forward_hook(self._attention_hook(i)))

    def _block_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not isinstance(output, torch.Tensor):
                raise ValueError(f"block {i} returned {type(output).__name__}, not a token tensor; cannot measure it.")
            grid = self.grids[i]
            tokens = grid.patch_tokens(output)
            self.sums["hc_share"][i].append(hc_share(tokens).sum())
            self.sums["delta_log_amplitude"][i].append(delta_log_amplitude(tokens, grid.grid).sum())
            self.sums["patch_uniformity"][i].append(patch_uniformity(tokens).sum() if tokens.shape[1] > 1
                                                    else tokens.new_tensor(math.nan))
            if self.windowed:
                windows = grid.window_tokens(tokens)
                self.sums["hc_share_window"][i].append(
                    tokens.new_tensor(math.nan) if windows is None else window_hc_share(windows, tokens).sum())
        return hook

    def _attention_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            current = args[0]  # the matrix that enters attention dropout: the one that multiplies V
            # Consecutive blocks of one stage only: across a patch merging the windows and heads change.
            if i > 0 and self.previous_attention is not None and self.previous_attention.shape == current.shape:
                similarity = attention_similarity(self.previous_attention, current)  # per window: image mean
                similarity = similarity.view(self.images_in_chunk, -1).mean(dim=-1)
                self.sums["attention_similarity"][i - 1].append(similarity.sum())
            self.previous_attention = current
            self.attention_seen[i] += 1
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.previous_attention = [], None

    def means(self, count: int) -> dict[str, list[float]]:
        """Per-block means over `count` images of every measurement that was recorded (NaN for the blocks
        it was not, e.g. attention pairs across stages)."""
        means = {}
        for name, per_block in self.sums.items():
            if any(per_block):
                device = next(chunks for chunks in per_block if chunks)[0].device
                nan = torch.tensor(math.nan, dtype=torch.float64, device=device)
                sums = [torch.stack(chunks).sum().double() if chunks else nan for chunks in per_block]
                means[name] = (torch.stack(sums) / count).tolist()
        return means


def measure(model: nn.Module, images: torch.Tensor, *, attention: bool = False, batch_size: int = 32) -> SpectralReport:
    """Measure every block of `model` on `images` [B, 3, H, W] in eval mode without gradients.

    The model is not changed: its train/eval mode and (with attention=True) each attention's
    fused setting are restored afterwards. Images go through in chunks of batch_size.
    """
    blocks = _blocks(model)
    grids = structure.token_grids(model)
    first = next(model.parameters())
    was_training = model.training
    recorder = _Recorder(blocks, grids, attention)
    count = 0
    try:
        # Eager even where the blocks are compiled (--compile): the hooks would be traced into the blocks' graphs
        # (FFTs and all) and recompile each block once per hook.
        with torch.no_grad(), torch.compiler.set_stance("force_eager"), \
                (_explicit_attention(model) if attention else nullcontext()):
            model.eval()
            for chunk in images.split(batch_size):
                recorder.previous_attention, recorder.images_in_chunk = None, chunk.shape[0]
                model(chunk.to(device=first.device, dtype=first.dtype))
                count += chunk.shape[0]
    finally:
        recorder.remove()
        model.train(was_training)
    if count == 0:
        raise ValueError("measure() got no images: pass a batch [B, 3, H, W] with B >= 1.")
    if attention and min(recorder.attention_seen) < math.ceil(count / batch_size):
        missing = recorder.attention_seen.index(min(recorder.attention_seen))
        raise ValueError(f"block {missing}'s attention never built an explicit matrix, so attention collapse "
                         "cannot be measured for this model.")
    stages = [grid.stage for grid in grids] if len({grid.stage for grid in grids}) > 1 else []
    report = SpectralReport(**recorder.means(count), num_images=count, stage=stages, **paper_parameters(model))
    _logger.debug("Measured %d blocks on %d images: hc_share %s", len(blocks), count, report.hc_share)
    return report


# --- plots and TensorBoard ------------------------------------------------------------------------------

def plot_measurement(ax: "Axes", curves: Mapping[str, Sequence[float]], name: str) -> None:
    """Draw one measurement as one curve per model (legend: the mapping's keys) over the block index.

    A model keeps its colour across plots: the i-th key draws in colour Ci, and empty curves are skipped.
    """
    title, ylabel = MEASUREMENTS[name]
    for i, (label, values) in enumerate(curves.items()):
        if values:
            ax.plot(range(len(values)), values, marker="o", markersize=3, linewidth=1.5, label=label,
                    color=f"C{i % 10}")
    ax.set_title(title)
    ax.set_xlabel("block i (compared with block i+1)" if name == "attention_similarity" else "block")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if any(curves.values()):
        ax.legend(fontsize="small")


def curves_figure(reports: Mapping[str, SpectralReport], names: Sequence[str]) -> Figure:
    """A figure with one panel per measurement name, each with one curve per labelled report."""
    figure = Figure(figsize=(5.5 * len(names), 4.2), layout="constrained")
    axes = figure.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names, strict=True):
        plot_measurement(ax, {label: getattr(r, name) for label, r in reports.items()}, name)
    return figure


def write_spectral(writer: "SummaryWriter", report: SpectralReport, step: int, *, prefix: str = "spectral") -> None:
    """Write the training measurements of a report: scalars `{prefix}/{measurement}/block_{i:02d}` and one
    figure of the three curves, `{prefix}/curves`."""
    width = max(2, len(str(len(report.hc_share) - 1)))
    names = TRAINING_MEASUREMENTS + tuple(name for name in WINDOW_MEASUREMENTS if getattr(report, name))
    for name in names:
        for i, value in enumerate(getattr(report, name)):
            writer.add_scalar(f"{prefix}/{name}/block_{i:0{width}d}", value, step)
    writer.add_figure(f"{prefix}/curves", curves_figure({f"step {step}": report}, names), step)


def log_spectral(writer: "SummaryWriter", model: nn.Module, probe_images: torch.Tensor, step: int,
                 *, prefix: str = "spectral", batch_size: int = 32) -> SpectralReport:
    """Measure hc_share, delta_log_amplitude and patch_uniformity of every block of the unwrapped model
    on the probe images and write them to TensorBoard (write_spectral). Under ZeRO-3 the caller gathers
    the parameters around this call."""
    report = measure(model, probe_images, batch_size=batch_size)
    write_spectral(writer, report, step, prefix=prefix)
    return report
