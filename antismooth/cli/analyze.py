"""Oversmoothing diagnostics, block by block, of trained or freshly initialised models side by side.

    python tools/analyze.py --weights a.safetensors b.safetensors --data shards/imagenet --out report/
    python tools/analyze.py --model attnscale_small_24 --data shards/imagenet --out report/   # random init
    python tools/analyze.py --weights run.pth --model featscale_small_24 --data /data/imagenet/val --attention

Each weights file names its model in its metadata (tools/export.py writes "model" and
"model_kwargs" into .safetensors, or a side-car <file>.json beside a .pth); --model (and
--model-kwargs) serve for files without it. A timm folder (tools/export.py --format timm) names its
model in its config.json. --data is a shard manifest (val.json), a folder
holding val.json or train.json, or an ImageFolder directory; the first --num-images images
of the manifest, or images evenly spread over the ImageFolder, go through the evaluation
transform. Writes one PNG per measurement with one curve per model, report.csv (model,
measurement, block, value) and report.json. The measurements are antismooth.spectral's.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from timm.utils import ParseKwargs

import antismooth  # noqa: F401  (registers the model zoo with timm)
from antismooth.atomic import write_atomic
from antismooth.cli import usage
from antismooth.cli.eval import check_weights
from antismooth.data.device import to_device
from antismooth.data.pipeline import AugmentConfig, build_eval_stream, eval_transform
from antismooth.evaluate import eval_augment
from antismooth.export import read_export_description
from antismooth.models.description import ModelDescription
from antismooth.models.checks import check_model
from antismooth.spectral import MEASUREMENTS, SpectralReport, curves_figure, measure

MANIFESTS = ("val.json", "train.json")  # looked for, in this order, in a --data folder
SPLITS = ("val", "train")               # an ImageFolder root's split folders, in the same order
REPORT_FILES = ("report.json", "report.csv")


@dataclass(frozen=True)
class ModelSpec:
    """One model to analyse: its legend label, its description (the one exported with the weights, or --model
    and --model-kwargs) and the weights (None: random init)."""
    label: str
    description: ModelDescription
    weights: Optional[Path] = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = usage.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, nargs="*", default=[],
                   help="weights files (.safetensors or .pth) or timm folders (tools/export.py --format timm), "
                        "one curve each")
    p.add_argument("--model", help="timm model name: for weights files without metadata, or alone for a random init")
    p.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                   help="timm.create_model arguments for --model, as in pretrain.py: num_classes=10 img_size=32")
    p.add_argument("--data", type=Path, required=True,
                   help="shard manifest (val.json), a folder holding val.json/train.json, or an ImageFolder directory")
    p.add_argument("--num-images", type=int, default=64, help="images to measure on (default: %(default)s)")
    p.add_argument("--attention", action="store_true",
                   help="also measure attention collapse (explicit attention path: slower, more memory)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init with --model alone")
    p.add_argument("--out", type=Path, default=Path("report"), help="output folder (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace the report an earlier run left in --out")
    args = p.parse_args(argv)
    if not args.weights and not args.model:
        usage.fail("give --weights files, or --model NAME to analyse a random init.")
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Every flag a user can get wrong, before a model is built or an image read."""
    for path in args.weights:
        check_weights(path)
    usage.readable_path(args.data, "--data", "give a shard manifest (val.json), a folder holding one, or an "
                                             "ImageFolder directory")
    usage.at_least(args.num_images, "--num-images", 1, "images to measure on")
    usage.at_least(args.batch_size, "--batch-size", 1, "images per forward pass")
    check_device(args.device)
    usage.output_folder(args.out, "--out", args.overwrite, holds=REPORT_FILES)
    if args.model:
        check_model(args.model, dict(args.model_kwargs))   # on the meta device: a name or kwargs timm refuses


def check_device(device: str) -> None:
    """A device torch knows, and a GPU that is there."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        usage.fail(f"--device {device} is not a device: pass cpu or cuda.")
    if kind == "cuda" and not torch.cuda.is_available():
        usage.fail(f"--device {device} but no GPU is visible: pass --device cpu.")


# --- which models ---------------------------------------------------------------------------------------

def resolve_specs(args: argparse.Namespace) -> list[ModelSpec]:
    """One ModelSpec per weights file (model and kwargs from its metadata, else --model and --model-kwargs),
    or the random init of --model alone."""
    given = ModelDescription(args.model, dict(args.model_kwargs)) if args.model else None
    if not args.weights:
        return [ModelSpec(f"{args.model} (random init)", given)]
    described = {path: read_export_description(path) for path in args.weights}
    if args.model and all(described.values()) and (args.model_kwargs or any(d.model != args.model
                                                                             for d in described.values())):
        # Every file names its own model: --model (or --model-kwargs) would be silently ignored.
        raise ValueError("every weights file names its model in its metadata, so --model/--model-kwargs would be "
                         "ignored; drop them (they are for files without metadata, or for a random init).")
    stems = [w.stem for w in args.weights]
    specs = []
    for path, description in described.items():
        description = description or given
        if description is None:
            raise ValueError(f"{path} does not say which model it holds (no 'model' metadata); pass --model NAME.")
        label = path.stem if stems.count(path.stem) == 1 else str(path)
        specs.append(ModelSpec(label, description, path))
    return specs


def build_model(spec: ModelSpec, seed: int) -> nn.Module:
    """Create the model with timm and load its weights (λ/s of plain ViT weights start at 0, logged)."""
    torch.manual_seed(seed)
    if spec.weights is None:
        return spec.description.create()
    return spec.description.build(spec.weights)


# --- which images ---------------------------------------------------------------------------------------

def resolve_data(data: Path) -> Path:
    """The images --data names: a manifest, a folder's val.json (else train.json), an ImageFolder root's val/
    (else train/), or an ImageFolder itself. Measuring the training split is said once: the curves then describe
    images the model was trained on."""
    if data.suffix == ".json" or not data.is_dir():
        return data
    found = next((data / m for m in MANIFESTS if (data / m).is_file()), None)
    if found is None and not any((data / s).is_dir() for s in SPLITS):
        return data   # an ImageFolder itself (<class>/<image>)
    found = found or next(data / s for s in SPLITS if (data / s).is_dir())
    if found.name.startswith("train"):
        print(f"note: {data} has no validation split (val.json or val/): measuring the training images of "
              f"{found}; pass a validation set to --data to measure unseen images.", file=sys.stderr)
    return found


def load_images(data: Path, num_images: int, augment: AugmentConfig) -> torch.Tensor:
    """num_images uint8 images [B, 3, S, S] through the deterministic evaluation transform (normalised later,
    on the device, by antismooth.data.device as in training and evaluation)."""
    manifest = data if data.suffix == ".json" else None
    if manifest is not None:
        stream = build_eval_stream(manifest, batch_size=min(num_images, 64), rank=0, world_size=1,
                                   num_workers=0, augment=augment)
        batches, count = [], 0
        for images, *_ in stream.loader():
            batches.append(images)
            count += images.shape[0]
            if count >= num_images:
                break
        images = torch.cat(batches)[:num_images] if batches else torch.empty(0, dtype=torch.uint8)
    elif data.is_dir():
        from torchvision.datasets import ImageFolder
        try:
            dataset = ImageFolder(str(data), transform=eval_transform(augment))
        except (FileNotFoundError, RuntimeError) as err:
            raise ValueError(f"{data} holds neither a shard manifest ({' or '.join(MANIFESTS)}) nor an "
                             f"ImageFolder tree (<class>/<image>): {err}") from err
        step = max(1, len(dataset) // num_images)  # spread over the classes, which ImageFolder lists in order
        images = torch.stack([dataset[i][0] for i in range(0, len(dataset), step)[:num_images]])
    else:
        raise FileNotFoundError(f"No data at {data}: give a shard manifest, a folder holding one, or an ImageFolder.")
    if images.shape[0] < num_images:
        print(f"note: {data} holds only {images.shape[0]} images; measuring on those.", file=sys.stderr)
    if images.shape[0] == 0:
        raise ValueError(f"{data} yielded no images.")
    return images


# --- the report -----------------------------------------------------------------------------------------

def write_report(reports: dict[str, SpectralReport], specs: list[ModelSpec], out: Path,
                 data: Path) -> list[Path]:
    """One PNG per measurement (a curve per model), report.csv (long format) and report.json, each written whole
    (write_atomic): an interrupted analyze leaves no half file."""
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in MEASUREMENTS if any(getattr(r, n) for r in reports.values())]
    written = []
    for name in names:
        path = out / f"{name}.png"
        png = io.BytesIO()
        curves_figure(reports, [name]).savefig(png, format="png", dpi=120)
        write_atomic(path, png.getvalue())
        written.append(path)
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["model", "measurement", "block", "value"])
    for label, report in reports.items():
        for name, values in report.curves().items():
            writer.writerows([label, name, i, f"{v:.6g}"] for i, v in enumerate(values))
    write_atomic(out / "report.csv", table.getvalue().encode())
    payload = {
        "data": str(data),
        "models": {spec.label: {"model": spec.description.model, "model_kwargs": spec.description.model_kwargs,
                                "weights": str(spec.weights) if spec.weights else None,
                                **reports[spec.label].as_dict()} for spec in specs},
    }
    write_atomic(out / "report.json", (json.dumps(payload, indent=1, default=str) + "\n").encode())
    return written + [out / "report.csv", out / "report.json"]


def analyze(args: argparse.Namespace) -> int:
    specs = resolve_specs(args)
    data = resolve_data(args.data)
    reports: dict[str, SpectralReport] = {}
    images_by_augment: dict[AugmentConfig, torch.Tensor] = {}
    for spec in specs:
        model = build_model(spec, args.seed).to(args.device)
        augment = eval_augment(model, spec.description)
        if augment not in images_by_augment:
            images_by_augment[augment] = load_images(data, args.num_images, augment)
        images = to_device(images_by_augment[augment], args.device, augment.mean, augment.std)
        reports[spec.label] = report = measure(model, images, attention=args.attention, batch_size=args.batch_size)
        print(f"{spec.label}: {len(report.hc_share)} blocks on {report.num_images} images, "
              f"hc_share {report.hc_share[0]:.3f} -> {report.hc_share[-1]:.3f}, "
              f"patch_uniformity {report.patch_uniformity[0]:.3f} -> {report.patch_uniformity[-1]:.3f}")
        del model
    for path in write_report(reports, specs, args.out, data):
        print(f"wrote {path}")
    return 0


@usage.entry_point(interrupted="interrupted: no report was written.",
                   user_errors=(OSError, ValueError))   # the weights' and the data's own sentences
def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 a usage or input error)."""
    return analyze(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
