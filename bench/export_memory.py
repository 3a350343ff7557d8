"""Peak memory of tools/export.py against the fp32 size of the model it exports.

Makes real DeepSpeed checkpoints (one optimizer step, world size 1) of a real model under ZeRO-2
and ZeRO-3, then runs tools/export.py on them, each in a fresh process whose peak RSS (ru_maxrss,
read with os.wait4) is compared with a process that only imports the same modules. Peak RSS counts
the memory-mapped checkpoint pages DeepSpeed's consolidation reads (clean page cache the kernel can
drop); the anonymous part alone (RssAnon, sampled every 10 ms) is what must really fit. The figure
that matters is (peak - baseline) / fp32 model size; the worst ratio then estimates what a 48-block
base model (counted on the meta device) needs.

    python bench/export_memory.py                          # attnscale_base_24, bf16 training, ~3 GB of checkpoints
    python bench/export_memory.py --model attnscale_base_12 --fp32
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "tests" / "jobs" / "make_checkpoints.py"  # the tests' DeepSpeed job, here with a real-size model
ESTIMATE_FOR = "attnscale_base_48"
IMG_SIZE = 64  # small images make the one training step quick; only pos_embed differs from the 224-px model
BASELINE_CODE = ("import antismooth.export, deepspeed.utils.zero_to_fp32, safetensors.torch, timm, torch; "
                 "import antismooth.models")


def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0


def peak_rss(cmd: list[str]) -> tuple[int, int, float]:
    """(peak RSS, peak anonymous RSS sampled every 10 ms, seconds) of one fresh process running cmd."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        anon = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            anon = max(anon, _rss_anon(proc.pid))
            time.sleep(0.01)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed:\n{err.read().decode()[-3000:]}")
    return usage.ru_maxrss * 1024, anon, time.perf_counter() - start  # Linux reports ru_maxrss in KiB


def count_params(name: str, **kwargs) -> int:
    import timm
    import torch

    import antismooth  # noqa: F401
    with torch.device("meta"):
        return sum(p.numel() for p in timm.create_model(name, **kwargs).parameters())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="attnscale_base_24")
    p.add_argument("--fp32", action="store_true", help="train in fp32 instead of bf16 (ds_configs' choice)")
    p.add_argument("--work", help="folder for the checkpoints and exports (default: a temporary one)")
    p.add_argument("--json", type=Path, help="write the figures here too")
    args = p.parse_args(argv)

    py = sys.executable
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        fp32_bytes = 4 * count_params(args.model, img_size=IMG_SIZE)
        configs = ("zero2", "zero3") if args.fp32 else ("zero2-bf16", "zero3-bf16")
        start = time.perf_counter()
        subprocess.run([py, str(JOB), "--out", work, "--configs", ",".join(configs), "--model", args.model,
                        "--model-kwargs", json.dumps({"img_size": IMG_SIZE}), "--steps", "1"],
                       check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        runs = {stage: Path(work) / name for stage, name in zip((2, 3), configs, strict=True)}
        for stage, run in runs.items():
            size = sum(f.stat().st_size for f in run.rglob("*.pt"))
            print(f"ZeRO-{stage} checkpoint of {args.model}: {size / 2**30:.2f} GiB on disk", flush=True)
        print(f"({time.perf_counter() - start:.0f} s to make both)")
        baseline, baseline_anon, _ = peak_rss([py, "-c", BASELINE_CODE])
        cases = [(2, "fp32", "safetensors"), (3, "fp32", "safetensors"), (2, "fp32", "pth"), (3, "bf16", "safetensors")]
        rows = []
        print(f"\nfp32 model size {fp32_bytes / 2**30:.3f} GiB; baseline (imports only) RSS "
              f"{baseline / 2**30:.3f} GiB, anonymous {baseline_anon / 2**30:.3f} GiB")
        print(f"{'case':28s} {'peak RSS GiB':>12s} {'above base':>11s} {'/ fp32':>7s} {'anon above base':>16s} "
              f"{'/ fp32':>7s} {'seconds':>8s}")
        for stage, dtype, fmt in cases:
            out = Path(work) / f"export-zero{stage}-{dtype}.{fmt}"
            peak, anon, seconds = peak_rss([py, str(REPO / "tools" / "export.py"), str(runs[stage]), "--out",
                                            str(out), "--dtype", dtype])
            name = f"ZeRO-{stage} -> {dtype} .{fmt}"
            row = {"case": name, "peak_rss": peak, "ratio": (peak - baseline) / fp32_bytes, "peak_anon": anon,
                   "anon_ratio": (anon - baseline_anon) / fp32_bytes, "seconds": seconds}
            rows.append(row)
            print(f"{name:28s} {peak / 2**30:12.3f} {(peak - baseline) / 2**30:11.3f} {row['ratio']:7.2f} "
                  f"{(anon - baseline_anon) / 2**30:16.3f} {row['anon_ratio']:7.2f} {seconds:8.1f}", flush=True)
            out.unlink()
            out.with_name(out.name + ".json").unlink(missing_ok=True)

    worst, worst_anon = max(r["ratio"] for r in rows), max(r["anon_ratio"] for r in rows)
    target = 4 * count_params(ESTIMATE_FOR)
    estimate, estimate_anon = baseline + worst * target, baseline_anon + worst_anon * target
    print(f"\n{ESTIMATE_FOR}: {target / 4 / 1e6:.1f} M parameters, fp32 {target / 2**30:.2f} GiB; at the worst "
          f"ratios measured an export peaks at about {estimate / 2**30:.2f} GiB RSS ({worst:.2f} x fp32 + "
          f"{baseline / 2**30:.2f} GiB of imports), of which {estimate_anon / 2**30:.2f} GiB anonymous "
          f"({worst_anon:.2f} x fp32 + {baseline_anon / 2**30:.2f} GiB).")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "fp32_bytes": fp32_bytes, "baseline": baseline,
                                         "baseline_anon": baseline_anon, "rows": rows, "estimate_model": ESTIMATE_FOR,
                                         "estimate_bytes": estimate, "estimate_anon_bytes": estimate_anon},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
