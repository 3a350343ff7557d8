"""Forward+backward time and peak memory of one training step: plain ViT-S/24 vs AttnScale/FeatScale, or (with
--family swin) plain timm Swin-S vs AttnScale/FeatScale Swin-S.

Peak memory is the process's peak RSS (CPU) or peak allocation (CUDA) above what it held
before the step; saved activations are the bytes autograd keeps for backward (exact, no
allocator noise). Every configuration runs in a fresh subprocess (so peak memory is its own), the
configurations are interleaved round by round (so machine noise hits all alike), and the
figures are reported as ratios to plain timm ViT-S/24 (Swin-S) measured in the same run.

    python bench/model_step.py                  # CPU, batch 4, 224 and 384 px
    python bench/model_step.py --device cuda --batch 64 --dtype bfloat16 --sdpa flash
    python bench/model_step.py --family swin --img-sizes 224 --batch 2

timm keeps its plain Swin on the explicit attention path unless TIMM_FUSED_ATTN=2 (its SDPA path is marked
experimental); the Swin table shows it both ways ("timm default" and "SDPA"), so the AttnScale/FeatScale
ratios can be read against the plain model on the same attention path. The AttnScale Swin's own default is SDPA
with the bias and shift mask as one additive mask (antismooth/models/swin.py).

--sdpa pins torch's scaled_dot_product_attention to one kernel (flash attention needs a GPU and a
16-bit dtype), so the fused AttnScale is timed on the kernel it is meant for, not on whatever torch picks.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Each family: its configurations, the baseline of the ratios, and the fused/explicit AttnScale pair compared.
# "fused": True/False switches every attention (set_fused_attn); None keeps the model's own default.
FAMILIES = {
    "vit": dict(configs={
        "plain ViT-S/24 (timm)": dict(model="vit_small_patch16_224", depth=24, fused=True),
        "attnscale_small_24": dict(model="attnscale_small_24", fused=True),
        "featscale_small_24": dict(model="featscale_small_24", fused=True),
        "attnscale explicit (official)": dict(model="attnscale_small_24", fused=False),
    }, baseline="plain ViT-S/24 (timm)", fused="attnscale_small_24", explicit="attnscale explicit (official)"),
    "swin": dict(configs={
        "plain Swin-S (timm default: explicit)": dict(model="swin_small_patch4_window7_224", fused=None),
        "plain Swin-S (timm, SDPA)": dict(model="swin_small_patch4_window7_224", fused=True),
        "attnscale_swin_small (SDPA)": dict(model="attnscale_swin_small_patch4_window7_224", fused=True),
        "featscale_swin_small (timm default)": dict(model="featscale_swin_small_patch4_window7_224", fused=None),
        "attnscale_swin_small explicit (official)": dict(model="attnscale_swin_small_patch4_window7_224",
                                                         fused=False),
    }, baseline="plain Swin-S (timm default: explicit)", fused="attnscale_swin_small (SDPA)",
        explicit="attnscale_swin_small explicit (official)"),
}
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}  # torch.nn.attention.SDPBackend names; "default": torch's own choice


def measure(config: dict, img_size: int, batch: int, steps: int, device: str, dtype: str) -> dict:
    """Build one model and time `steps` training steps after a warm-up; return seconds and peak bytes."""
    import timm
    import torch
    import torch.nn.functional as F

    import antismooth  # noqa: F401
    from antismooth.models import set_fused_attn

    torch.manual_seed(0)
    kwargs = {k: v for k, v in config.items() if k in ("depth",)}
    model = timm.create_model(config["model"], img_size=img_size, **kwargs).to(device).train()
    if config["fused"] is not None:
        set_fused_attn(model, config["fused"])
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype),
                              enabled=dtype != "float32")

    def step() -> None:
        with autocast:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def saved_activation_bytes() -> int:
        """Bytes autograd keeps for backward in one forward, parameters excluded: exact on any device."""
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            loss = F.cross_entropy(model(x), y)
        activations = sum(storages.values())
        loss.backward()
        model.zero_grad(set_to_none=True)
        return activations

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    activations = saved_activation_bytes()  # also the warm-up step
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda") else _max_rss_bytes()) - base
    return {"seconds": statistics.median(times), "peak_bytes": peak, "activation_bytes": activations}


def sdpa_backend(name: str) -> contextlib.AbstractContextManager:
    """A context that pins scaled_dot_product_attention to one kernel ("default": torch chooses)."""
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[name]))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run_in_subprocess(name: str, args: argparse.Namespace, img_size: int) -> dict:
    payload = json.dumps(dict(name=name, family=args.family, img_size=img_size, batch=args.batch, steps=args.steps,
                              device=args.device, dtype=args.dtype, sdpa=args.sdpa))
    out = subprocess.run([sys.executable, __file__, "--child", payload], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{name} at {img_size} px failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="vit")
    parser.add_argument("--img-sizes", type=int, nargs="+", default=[224, 384])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement (median)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (median across rounds)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--sdpa", default="default", choices=["default", *SDPA_BACKENDS],
                        help="attention kernel of the fused models (flash: CUDA and a 16-bit dtype only)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        job = json.loads(args.child)
        with sdpa_backend(job["sdpa"]):
            print(json.dumps(measure(FAMILIES[job["family"]]["configs"][job["name"]], job["img_size"], job["batch"],
                                     job["steps"], job["device"], job["dtype"])))
        return 0

    report = {}
    configs = FAMILIES[args.family]["configs"]
    for img_size in args.img_sizes:
        runs = {name: [] for name in configs}
        for _ in range(args.rounds):
            for name in configs:
                runs[name].append(_run_in_subprocess(name, args, img_size))
        report[img_size] = {name: {key: statistics.median(r[key] for r in rs)
                                   for key in ("seconds", "peak_bytes", "activation_bytes")}
                            for name, rs in runs.items()}
        _print_table(img_size, report[img_size], args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def _print_table(img_size: int, rows: dict, args: argparse.Namespace) -> None:
    family = FAMILIES[args.family]
    base = rows[family["baseline"]]
    explicit = rows[family["explicit"]]
    print(f"\n{img_size} px, batch {args.batch}, {args.device}, {args.dtype}, SDPA {args.sdpa}: "
          "one forward+backward step")
    print("| model | step ms | × plain | peak MiB | × plain | saved activations MiB | × plain |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['seconds'] * 1e3:.0f} | {r['seconds'] / base['seconds']:.3f} | "
              f"{r['peak_bytes'] / 2**20:.0f} | {r['peak_bytes'] / base['peak_bytes']:.3f} | "
              f"{r['activation_bytes'] / 2**20:.0f} | {r['activation_bytes'] / base['activation_bytes']:.3f} |")
    fused = rows[family["fused"]]
    print(f"fused AttnScale vs explicit: {explicit['seconds'] / fused['seconds']:.2f}× faster, "
          f"{fused['peak_bytes'] / explicit['peak_bytes']:.2f}× the peak memory, "
          f"{fused['activation_bytes'] / explicit['activation_bytes']:.2f}× the saved activations")


if __name__ == "__main__":
    sys.exit(main())
