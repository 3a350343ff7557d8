"""Does depth help? Plain ViT, AttnScale and FeatScale at depths 6, 12, 24 and 48, three seeds each, trained by
pretrain.py through DeepSpeed's launcher (ZeRO-2, activation checkpointing) on Fashion-MNIST, with one recipe for
every cell; top-1 on the whole 10,000-image test split.

    python bench/depth_study.py                             # the grid: resumes where it stopped, never runs a cell twice
    python bench/depth_study.py --budget-minutes 60         # only the cells that fit, and which
    python bench/depth_study.py --only attnscale:48:1 --out /tmp/check   # one cell again, from scratch, elsewhere
    python bench/depth_study.py --report                    # table, figures and curves from the results alone

Fashion-MNIST (70,000 real 28x28 photographs of clothing, 10 classes, MIT licence): `apt-get install
dataset-fashion-mnist` puts its four IDX files in /usr/share/datasets/fashion-mnist (--fashion-mnist DIR for
another folder, e.g. the files of github.com/zalandoresearch/fashion-mnist). They are written as an ImageFolder of
JPEGs (a stratified training subset, the whole test split as val/) and turned into shards by the real shard
builder. Each run appends one JSON record to docs/depth-study/results.jsonl; the report is docs/depth-study.md.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEBIAN_FOLDER = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
RESULTS = REPO / "docs" / "depth-study" / "results.jsonl"
FIGURES = REPO / "docs" / "depth-study"

MODELS = ("vit", "attnscale", "featscale")     # plain ViT and the paper's two techniques: {model}_tiny_{depth}
DEPTHS = (6, 12, 24, 48)
SEEDS = (0, 1, 2)

# One recipe for every cell (chosen by the probes in docs/depth-study.md, never tuned per model or depth).
# 28 px in 4x4 patches: 49 tokens and a class token per block; width 64 with 4 heads; no augmentation but label
# smoothing (the photographs are centred); AdamW, global batch 128, lr warmed up for one epoch then a cosine.
RECIPE = {
    "train_per_class": 500, "subset_seed": 0, "input_size": 28, "patch_size": 4, "embed_dim": 64, "num_heads": 4,
    "epochs": 6, "lr": 1e-2, "warmup_epochs": 1, "min_lr": 1e-5, "micro_batch": 64, "processes": 2,
    "smoothing": 0.1, "drop_path": 0.0, "weight_decay": 0.05, "zero_stage": 2, "activation_checkpointing": 1,
}


class StudyError(Exception):
    """Something a user can fix; the message says what."""


@dataclass(frozen=True)
class Cell:
    family: str
    depth: int
    seed: int

    @property
    def model(self) -> str:
        return f"{self.family}_tiny_{self.depth}"

    @property
    def name(self) -> str:
        return f"{self.family}:{self.depth}:{self.seed}"

    @classmethod
    def parse(cls, text: str) -> "Cell":
        """`attnscale:48:1` (or the record's model name: `attnscale_tiny_48:1`)."""
        parts = text.replace("_tiny_", ":").split(":")
        if len(parts) != 3 or parts[0] not in MODELS or not parts[1].isdigit() or not parts[2].isdigit():
            raise StudyError(f"--only {text!r} is not MODEL:DEPTH:SEED: give e.g. attnscale:48:1 (models "
                             f"{', '.join(MODELS)}).")
        return cls(parts[0], int(parts[1]), int(parts[2]))


def grid(models: Sequence[str] = MODELS, depths: Sequence[int] = DEPTHS, seeds: Sequence[int] = SEEDS) -> list[Cell]:
    """Every cell, seed by seed: a study stopped early has whole seeds for every model and depth."""
    return [Cell(m, d, s) for s in seeds for d in depths for m in models]


def recipe_key(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


# --- the data ---------------------------------------------------------------------------------------------------

def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or plain): uint8 data of the shape its header gives (LeCun's MNIST format)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise StudyError(f"{path} is not an IDX file of unsigned bytes: give the four Fashion-MNIST files as "
                         "distributed (train-images-idx3-ubyte.gz, …).")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(dims))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != math.prod(shape):
        raise StudyError(f"{path} holds {body.size} bytes for a {shape} array: the file is damaged; fetch it again.")
    return body.reshape(shape)


def fashion_files(folder: Path) -> dict[str, tuple[Path, Path]]:
    """The four IDX files in `folder`, or one sentence saying how to get them."""
    found = {split: tuple(folder / name for name in names) for split, names in FILES.items()}
    missing = [p.name for paths in found.values() for p in paths if not p.is_file()]
    if missing:
        raise StudyError(f"Fashion-MNIST is not in {folder} (missing {', '.join(missing)}): `apt-get install "
                         "dataset-fashion-mnist` puts it in /usr/share/datasets/fashion-mnist, or download the four "
                         "files from github.com/zalandoresearch/fashion-mnist into a folder and pass --fashion-mnist.")
    return found


def stratified(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """`per_class` indices of each class, drawn with a fixed seed, in ascending order."""
    rng = np.random.default_rng(seed)
    picked = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < per_class:
            raise StudyError(f"class {label} has {len(members)} images, fewer than --train-per-class {per_class}.")
        picked.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(picked))


def write_imagefolder(images: np.ndarray, labels: np.ndarray, indices: Iterable[int], folder: Path) -> int:
    """`folder/<label>/<index>.jpg` for the given indices (grayscale JPEG, quality 95); the count written."""
    count = 0
    for i in indices:
        target = folder / str(int(labels[i])) / f"{int(i):05d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i], mode="L").save(target, quality=95)
        count += 1
    return count


def prepare_data(fashion: Path, work: Path, per_class: int, subset_seed: int) -> Path:
    """The shard folder of the study's data (built once per subset: reused when its manifests are there)."""
    shards = work / f"shards-{per_class}-{subset_seed}"
    if (shards / "train.json").is_file() and (shards / "val.json").is_file():
        return shards
    files = fashion_files(fashion)
    root = work / f"imagefolder-{per_class}-{subset_seed}"
    shutil.rmtree(root, ignore_errors=True)
    for split, (images_file, labels_file) in files.items():
        images, labels = read_idx(images_file), read_idx(labels_file)
        if len(images) != len(labels):
            raise StudyError(f"{images_file} holds {len(images)} images but {labels_file} {len(labels)} labels.")
        indices = stratified(labels, per_class, subset_seed) if split == "train" else range(len(labels))
        write_imagefolder(images, labels, indices, root / split)
    from antismooth.data.shards import ShardOptions, build
    build(str(root), str(shards), ShardOptions(max_count=2000))
    shutil.rmtree(root)
    return shards


# --- one cell -----------------------------------------------------------------------------------------------------

def deepspeed_json(recipe: dict, path: Path) -> Path:
    path.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": recipe["micro_batch"], "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": recipe["zero_stage"]},
        "optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": recipe["weight_decay"], "torch_adam": True}},
        "activation_checkpointing": {"blocks_per_checkpoint": recipe["activation_checkpointing"]},
        "steps_per_print": 10 ** 9}, indent=1))
    return path


def launcher(processes: int) -> list[str]:
    """DeepSpeed's launcher for several processes (its script beside this Python, else the module); one process
    runs pretrain.py directly."""
    from antismooth.distributed import free_port

    if processes == 1:
        return [sys.executable]
    script = Path(sys.executable).parent / "deepspeed"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "deepspeed.launcher.runner"]
    return [*command, "--num_gpus", str(processes), "--master_port", str(free_port())]


def pretrain_argv(cell: Cell, recipe: dict, shards: Path, out: Path, config: Path) -> list[str]:
    base_lr = recipe["lr"]   # pretrain.py scales it by global batch / 512, as DeiT does
    return ["pretrain.py", "--deepspeed_config", str(config), "--model", cell.model,
            "--model-kwargs", f"patch_size={recipe['patch_size']}", f"embed_dim={recipe['embed_dim']}",
            f"num_heads={recipe['num_heads']}", "--input-size", str(recipe["input_size"]), "--crop-pct", "1.0",
            "--data", str(shards), "--output", str(out), "--seed", str(cell.seed), "--epochs", str(recipe["epochs"]),
            "--lr", str(base_lr), "--warmup-epochs", str(recipe["warmup_epochs"]), "--min-lr", str(recipe["min_lr"]),
            "--no-aug", "--mixup", "0", "--cutmix", "0", "--repeated-aug", "1", "--smoothing", str(recipe["smoothing"]),
            "--drop-path", str(recipe["drop_path"]), "--workers", "1", "--no-model-ema", "--no-eval",
            "--spectral-every", "0", "--log-every", "50", "--save-every", "100000", "--keep", "1"]


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as sink:
        sink.write("$ " + " ".join(cmd) + "\n")
        sink.flush()
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
        proc = subprocess.run(cmd, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise StudyError(f"`{' '.join(cmd[:3])} …` failed (exit {proc.returncode}): see {log}.")


def run_cell(cell: Cell, recipe: dict, shards: Path, out: Path) -> dict:
    """Train, export and evaluate one cell from scratch in `out` (replaced); its record."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log = out / "study.log"
    start = time.time()
    config = deepspeed_json(recipe, out / "deepspeed.json")
    _run([*launcher(recipe["processes"]), *pretrain_argv(cell, recipe, shards, out / "run", config)], log)
    train_s = time.time() - start
    weights = out / f"{cell.model}.safetensors"
    _run([sys.executable, "tools/export.py", str(out / "run"), "--out", str(weights)], log)
    _run([sys.executable, "tools/eval.py", "--weights", str(weights), "--data", str(shards), "--workers", "1",
          "--batch-size", "500", "--json", str(out / "eval.json")], log)
    figures = json.loads((out / "eval.json").read_text())
    return {"model": cell.model, "family": cell.family, "depth": cell.depth, "seed": cell.seed,
            "top1": round(figures["top1"], 3), "top5": round(figures["top5"], 3), "loss": round(figures["loss"], 5),
            "images": figures["count"], "wall_s": round(time.time() - start, 1), "train_s": round(train_s, 1),
            "recipe": recipe, "recipe_key": recipe_key(recipe), "machine": machine(), "date": date.today().isoformat()}


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"


# --- the grid: results, resume, budget ----------------------------------------------------------------------------

def load_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_result(path: Path, record: dict) -> None:
    """One line, flushed and synced: a cell that finished is never lost or run again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def pending(cells: Sequence[Cell], results: Sequence[dict], recipe: dict) -> list[Cell]:
    """The cells without a record for this recipe."""
    done = {(r["family"], r["depth"], r["seed"]) for r in results if r.get("recipe_key") == recipe_key(recipe)}
    return [c for c in cells if (c.family, c.depth, c.seed) not in done]


# Seconds per block per training image at this recipe, and per cell besides (launch, start-up, export, evaluation),
# on the 2-vCPU machine: the probes vit:12 (106 s) and vit:48 (341 s); the records replace them once two depths ran.
DEFAULT_SECONDS_PER_BLOCK_IMAGE = 2.2e-4
FIXED_SECONDS_PER_CELL = 28.0


def cost_model(results: Sequence[dict], recipe: dict) -> tuple[float, float]:
    """(seconds per block per trained image, fixed seconds per cell), fitted to this recipe's records by least
    squares when two depths are known, else the defaults."""
    mine = [r for r in results if r.get("recipe_key") == recipe_key(recipe)]
    images = recipe["train_per_class"] * 10 * recipe["epochs"]
    if len({r["depth"] for r in mine}) < 2:
        return DEFAULT_SECONDS_PER_BLOCK_IMAGE, FIXED_SECONDS_PER_CELL
    x = np.array([r["depth"] * images for r in mine], dtype=float)
    y = np.array([r["wall_s"] for r in mine], dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    return max(float(slope), 1e-6), max(float(intercept), 0.0)


def estimate_seconds(cell: Cell, recipe: dict, model: tuple[float, float]) -> float:
    per_block_image, fixed = model
    return fixed + per_block_image * cell.depth * recipe["train_per_class"] * 10 * recipe["epochs"]


def within_budget(cells: Sequence[Cell], minutes: Optional[float], recipe: dict,
                  model: tuple[float, float]) -> tuple[list[Cell], list[Cell]]:
    """(cells that fit in `minutes` in grid order, the rest); no budget: all of them."""
    if minutes is None:
        return list(cells), []
    fit, left, spent = [], [], 0.0
    for cell in cells:
        cost = estimate_seconds(cell, recipe, model)
        if not left and spent + cost <= minutes * 60:
            fit.append(cell)
            spent += cost
        else:
            left.append(cell)
    return fit, left


# --- the report ---------------------------------------------------------------------------------------------------

def table(results: Sequence[dict], recipe: dict) -> str:
    """Markdown: top-1 mean ± std over seeds per model × depth, with the seeds and the mean wall time per cell."""
    mine = [r for r in results if r.get("recipe_key") == recipe_key(recipe)]
    depths = sorted({r["depth"] for r in mine})
    lines = ["| model | " + " | ".join(f"depth {d}" for d in depths) + " |",
             "|---|" + "---:|" * len(depths)]
    for family in MODELS:
        row = []
        for depth in depths:
            runs = [r for r in mine if r["family"] == family and r["depth"] == depth]
            if not runs:
                row.append("")
                continue
            top1 = [r["top1"] for r in runs]
            spread = f" ± {statistics.stdev(top1):.2f}" if len(top1) > 1 else ""
            wall = statistics.mean(r["wall_s"] for r in runs)
            row.append(f"{statistics.mean(top1):.2f}{spread} (n={len(top1)}, {wall / 60:.1f} min)")
        lines.append(f"| {family} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(results: Sequence[dict], recipe: dict, path: Path) -> None:
    """Top-1 against depth, mean with ± one standard deviation over seeds, one line per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in results if r.get("recipe_key") == recipe_key(recipe)]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for family in MODELS:
        depths = sorted({r["depth"] for r in mine if r["family"] == family})
        if not depths:
            continue
        values = [[r["top1"] for r in mine if r["family"] == family and r["depth"] == d] for d in depths]
        means = [statistics.mean(v) for v in values]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        ax.errorbar(depths, means, yerr=stds, marker="o", capsize=4, label=family)
    ax.set_xscale("log", base=2)
    ax.set_xticks(DEPTHS, [str(d) for d in DEPTHS])
    ax.set_xlabel("blocks")
    ax.set_ylabel("Fashion-MNIST test top-1 (%)")
    ax.set_title("tiny ViT (width 64, 49 tokens), mean ± std over seeds")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def curves(shards: Path, weights: Sequence[Path], out: Path, log: Path) -> None:
    """The oversmoothing curves (tools/analyze.py) of the given exports, side by side."""
    _run([sys.executable, "tools/analyze.py", "--weights", *map(str, weights), "--data", str(shards / "val.json"),
          "--out", str(out), "--num-images", "256", "--overwrite"], log)


# --- the command ----------------------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fashion-mnist", type=Path, default=DEBIAN_FOLDER, help="folder of the four IDX files")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "depth-study", help="runs and shards (kept)")
    p.add_argument("--results", type=Path, default=RESULTS, help="one JSON record per finished run (appended)")
    p.add_argument("--figures", type=Path, default=FIGURES, help="where the PNGs go")
    p.add_argument("--budget-minutes", type=float, help="run only the pending cells that fit, in grid order")
    p.add_argument("--only", help="MODEL:DEPTH:SEED: run this cell from scratch into --out, not into --results")
    p.add_argument("--out", type=Path, help="with --only: the folder for that run (replaced)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--depths", nargs="+", type=int, default=list(DEPTHS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--train-per-class", type=int, default=RECIPE["train_per_class"])
    p.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    p.add_argument("--lr", type=float, default=RECIPE["lr"], help="base lr per 512 images of global batch")
    p.add_argument("--processes", type=int, default=RECIPE["processes"], help="training processes (DeepSpeed)")
    p.add_argument("--report", action="store_true", help="write the table and figures from the results; run nothing")
    p.add_argument("--dry-run", action="store_true", help="say which cells would run, and their estimated time")
    args = p.parse_args(argv)
    if args.only and not args.out:
        p.error("--only re-runs one cell from scratch: give --out DIR for it (the study's results stay as they are).")
    return args


def report(results: list[dict], recipe: dict, figures: Path, shards: Optional[Path], work: Path) -> None:
    print(table(results, recipe))
    plot(results, recipe, figures / "top1_vs_depth.png")
    deepest = max((r["depth"] for r in results if r.get("recipe_key") == recipe_key(recipe)), default=None)
    if deepest is None or shards is None:
        return
    exports = [work / f"{f}-{deepest}-0" / f"{f}_tiny_{deepest}.safetensors" for f in MODELS]
    if all(p.is_file() for p in exports):
        curves(shards, exports, figures / f"curves-depth{deepest}", work / "analyze.log")
        print(f"curves of the depth-{deepest} seed-0 models in {figures / f'curves-depth{deepest}'}")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    recipe = dict(RECIPE, train_per_class=args.train_per_class, epochs=args.epochs, lr=args.lr, processes=args.processes)
    try:
        results = load_results(args.results)
        if args.report:
            shards = args.work / f"shards-{recipe['train_per_class']}-{recipe['subset_seed']}"
            report(results, recipe, args.figures, shards if shards.is_dir() else None, args.work)
            return 0
        if args.only:
            cell = Cell.parse(args.only)
            shards = prepare_data(args.fashion_mnist, args.work, recipe["train_per_class"], recipe["subset_seed"])
            record = run_cell(cell, recipe, shards, args.out)
            (args.out / "result.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
            print(json.dumps({k: record[k] for k in ("model", "seed", "top1", "wall_s")}))
            return 0
        cells = pending(grid(args.models, args.depths, args.seeds), results, recipe)
        model = cost_model(results, recipe)
        run, left = within_budget(cells, args.budget_minutes, recipe, model)
        total = sum(estimate_seconds(c, recipe, model) for c in run)
        print(f"{len(cells)} cells pending; running {len(run)} (about {total / 60:.0f} min at "
              f"{model[0] * 1e3:.2f} ms per block-image + {model[1]:.0f} s per cell): "
              f"{' '.join(c.name for c in run) or 'none'}" + (f"; left for later: {' '.join(c.name for c in left)}"
                                                                 if left else ""), flush=True)
        if args.dry_run or not run:
            return 0
        shards = prepare_data(args.fashion_mnist, args.work, recipe["train_per_class"], recipe["subset_seed"])
        for cell in run:
            record = run_cell(cell, recipe, shards, args.work / f"{cell.family}-{cell.depth}-{cell.seed}")
            append_result(args.results, record)
            print(f"{cell.name}: top-1 {record['top1']:.2f} %, {record['wall_s'] / 60:.1f} min", flush=True)
        report(load_results(args.results), recipe, args.figures, shards, args.work)
        return 0
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
