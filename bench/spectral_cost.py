"""Cost of one spectral probe against one training step, and the --spectral-every that keeps it under 2 %.

The probe is what pretrain.py runs every --spectral-every steps: antismooth.spectral.log_spectral
on a fixed batch of probe images, i.e. measure() (a no-grad forward with hooks) then
write_spectral() (scalars per block and one matplotlib figure to TensorBoard). The training step
is forward, backward and an AdamW step on a batch. All run on the same model in the same process,
interleaved round by round so machine noise hits them alike; each figure is the least disturbed
(fastest) round.

    python bench/spectral_cost.py                         # CPU: attnscale_small_24 @224 and the demo's tiny model
    python bench/spectral_cost.py --device cuda --batch 64 --tiny-batch 64

Probing every N steps costs probe / (N · step) of the training time, so N >= probe / (budget · step).
On CPU the batch is kept small (one ViT-S/24 step of 64 images takes minutes on two cores): a
larger batch only makes a step longer, so the N derived at a small batch is on the safe side.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "attnscale_small_24 @224": dict(model="attnscale_small_24", kwargs={}, batch="batch"),
    # The model of `make demo`: 24 blocks, 32 px, patch 8 (16 patch tokens).
    "attnscale_tiny_24 @32 (demo)": dict(model="attnscale_tiny_24", batch="tiny_batch",
                                         kwargs=dict(img_size=32, patch_size=8, num_classes=10)),
}


def measure_config(model_name: str, kwargs: dict, batch: int, probe_images: int, rounds: int,
                   device: str) -> dict:
    """Seconds (least disturbed round) of one training step, one measure() and one write_spectral()."""
    import timm
    import torch
    import torch.nn.functional as F
    from torch.utils.tensorboard import SummaryWriter

    import antismooth  # noqa: F401  (registers the zoo)
    from antismooth.models import structure
    from antismooth.spectral import measure, write_spectral

    torch.manual_seed(0)
    model = timm.create_model(model_name, **kwargs).to(device).train()
    size = structure.input_size(model)
    num_classes = model.num_classes
    x = torch.randn(batch, 3, *size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    probe = torch.randn(probe_images, 3, *size, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    def train_step() -> None:
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    report = measure(model, probe)
    times: dict[str, list[float]] = {"step": [], "measure": [], "write": []}
    with tempfile.TemporaryDirectory() as logdir, SummaryWriter(logdir) as writer:
        parts = {"step": train_step,
                 "measure": lambda: measure(model, probe),
                 "write": lambda: (write_spectral(writer, report, step=0), writer.flush())}
        for fn in parts.values():  # warm-up: allocator, kernels, matplotlib's first figure
            fn()
        for _ in range(rounds):
            for name, fn in parts.items():
                times[name].append(timed(fn))
    # The minimum, not the median: on a shared machine the least disturbed round is the closest to the cost.
    best = {name: min(values) for name, values in times.items()}
    return dict(best, probe=best["measure"] + best["write"])


def spectral_every(probe: float, step: float, budget: float) -> int:
    """The smallest N with probe / (N · step) <= budget."""
    return max(1, math.ceil(probe / (budget * step)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="training batch of attnscale_small_24")
    parser.add_argument("--tiny-batch", type=int, default=64, help="training batch of the demo model")
    parser.add_argument("--probe-images", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the fastest counts)")
    parser.add_argument("--budget", type=float, default=0.02, help="largest share of training time for probes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", choices=list(CONFIGS), help="measure one configuration only")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    import torch
    print(f"device {args.device}, {torch.get_num_threads()} threads, probe {args.probe_images} images, "
          f"budget {args.budget:.0%} of training time")
    print(f"{'configuration':30s} {'batch':>5s} {'step s':>8s} {'measure s':>9s} {'write s':>8s} {'probe s':>8s} "
          f"{'probe/step':>10s} {'min N':>6s}")
    results = {}
    for name, config in CONFIGS.items():
        if args.only and name != args.only:
            continue
        batch = getattr(args, config["batch"])
        t = measure_config(config["model"], config["kwargs"], batch, args.probe_images, args.rounds, args.device)
        ratio = t["probe"] / t["step"]
        n = spectral_every(t["probe"], t["step"], args.budget)
        results[name] = dict(t, batch=batch, probe_over_step=ratio, min_spectral_every=n)
        print(f"{name:30s} {batch:5d} {t['step']:8.3f} {t['measure']:9.3f} {t['write']:8.3f} {t['probe']:8.3f} "
              f"{ratio:10.3f} {n:6d}", flush=True)
    print("write = scalars + figure to TensorBoard: CPU time whatever the device, so with an accelerator's "
          "step time S the bound is N >= (measure + write) / (budget * S).")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
