"""The GPU check's figures as one JSON file (bench/gpu_check.sh runs this last): the versions setup found, each
step's status and time, the
throughput lines (img/s, TFLOP/s, MFU) eager and compiled, the planner against the recipe run's allocated peak, and
the benches' own JSON files. Prints the planner's comparison for the report.

    python bench/gpu_results.py runs/gpu-check $OUT/gpu-results.json
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

THROUGHPUT = re.compile(r"^throughput: ([\d.]+) img/s .*?; ([\d.]+) model TFLOP/s per process \(([\d.]+) GFLOP"
                        r"(?:.*MFU ([\d.]+) %)?")
PLANNED = re.compile(r"planned peak per rank ([\d.]+) GiB")
ALLOCATED = re.compile(r"peak GPU memory allocated ([\d.]+) GiB")
BENCH_FILES = ("decode", "model_step", "memory_depth", "host_syncs", "demo-eval", "zero2-eval", "zero3-eval")


def throughput_runs(log: str) -> dict[str, dict]:
    """{run name: figures} from the '== name' headers and the --throughput lines under them."""
    runs, name = {}, None
    for line in log.splitlines():
        if line.startswith("== "):
            name = line[3:].strip()
        elif (match := THROUGHPUT.search(line)) and name:
            img_s, tflops, gflop, mfu = match.groups()
            runs[name] = {"img_per_s": float(img_s), "model_tflops": float(tflops), "gflop_per_image": float(gflop),
                          "mfu_percent": float(mfu) if mfu else None}
        elif (match := ALLOCATED.search(line)) and name in runs:
            runs[name]["allocated_gib"] = float(match.group(1))
    return runs


def planner(log: str) -> dict | None:
    """The recipe run's planned peak against what it allocated at its peak."""
    planned, allocated = PLANNED.search(log), ALLOCATED.search(log)
    if not (planned and allocated):
        return None
    p, a = float(planned.group(1)), float(allocated.group(1))
    return {"planned_gib": p, "allocated_gib": a, "planned_over_allocated": p / a}


def main(work: str, out: str) -> int:
    work_dir = Path(work)
    logs = {p.stem: p.read_text(errors="replace") for p in (work_dir / "logs").glob("*.log")}
    versions = work_dir / "versions.json"   # the setup step's: every package, CUDA, the GPU
    results: dict = {"versions": json.loads(versions.read_text()) if versions.is_file() else None,
                     "steps": {}, "throughput": {}, "planner": None, "benches": {}}
    for status in sorted((work_dir / "status").glob("*")):
        state, seconds = status.read_text().strip().rsplit("|", 1)
        results["steps"][status.name] = {"status": state, "seconds": int(seconds)}
    for step in ("throughput", "throughput_base", "fusedadam", "decode"):
        results["throughput"].update(throughput_runs(logs.get(step, "")))
    results["planner"] = planner(logs.get("recipe", ""))
    for name in BENCH_FILES:
        path = work_dir / f"{name}.json"
        if path.is_file():
            results["benches"][name] = json.loads(path.read_text())
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    print("\n## Results as data\n")
    print(f"Written to {out}.")
    if results["planner"]:
        plan = results["planner"]
        print(f"Planner: {plan['planned_gib']:.2f} GiB planned, {plan['allocated_gib']:.2f} GiB allocated at the peak "
              f"(torch.cuda.max_memory_allocated): {plan['planned_over_allocated']:.3f}× (goal within 15 %).")
    for name, run in results["throughput"].items():
        print(f"- {name}: {run['img_per_s']:.0f} img/s, {run['model_tflops']:.0f} TFLOP/s, MFU {run['mfu_percent']} %")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
