"""Peak memory and time of the analysis engine as the design grows: flat memory, linear time.

The engine streams: per batch it holds one batch of images and captured outputs, and the
accumulators hold float64 sums whose size depends on the units and groups, never on the number
of rows. This runs ``sensitivity.engine.run_analysis`` (Sobol, augmentation set 1 + order,
class, image: 8 groups, 10 rows per base point) on the demo network - a small-input ResNet18 at
64 px - with fixed layers (layer3 and layer4 full maps, the softmax head: 98,308 units), for
N = base, 2 base, 4 base, ... base points. Each N runs in a fresh process, so that its peak
resident set size (ru_maxrss) is its own; tracemalloc's peak covers Python/numpy allocations
(torch's CPU tensors bypass it), torch.cuda.max_memory_allocated the GPU. The engine's phase
``timings`` separate the per-row loop (data, augment, forward, accumulate) from the one-off
setup and compute(), so that the time's linearity in N can be read off. Prints a table and
writes bench/results/engine_memory.json (or ``--output``).

    .venv/bin/python bench/bench_engine_memory.py [--base 4] [--steps 4] [--device cpu|cuda]
    # scaling at the default checkpoints (docs/PERFORMANCE.md, "Scaling"), one command:
    .venv/bin/python bench/bench_engine_memory.py --layers default --batch-rows 40
        --threads 1 --base 8 --output bench/results/engine_scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "engine_memory.json"
LAYERS = ["layer3", "layer4", "fc"]
IMAGE_SIZE = 64
BATCH_ROWS = 40


LOOP = ("data", "augment", "forward", "accumulate")
BACKGROUND = {"auto": None, "on": True, "off": False}


def measure(
    n: int, device: str, threads: int, layers: list[str] | None, batch_rows: int,
    background: bool | None,
) -> dict:
    """One engine run with N = n in this process; returns its figures."""
    sys.path.insert(0, str(ROOT))
    import torch

    from data import PlantedFactorDataModule
    from lightning_modules import ImageClassifier
    from sensitivity.config import EngineConfig
    from sensitivity.engine import run_analysis
    from sensitivity.problem import AugmentationProblem

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data = PlantedFactorDataModule(num_classes=4, image_size=IMAGE_SIZE, train_per_class=4,
                                   val_per_class=4)
    probe, _ = data.probe_set(4)
    model = ImageClassifier("resnet18", num_classes=4, small_input=True, image_size=IMAGE_SIZE)
    model.to(device)
    problem = AugmentationProblem(1, n_classes=4, images_per_class=4)
    config = EngineConfig(method="sobol", n=n, layers=layers, reduction="none",
                          batch_rows=batch_rows, progress=False, threads=threads,
                          background=background)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tracemalloc.start()
    start = time.perf_counter()
    timings: dict[str, float] = {}
    result = run_analysis(model, problem, probe, config, timings=timings)
    seconds = time.perf_counter() - start
    _, python_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    units = sum(int(torch.tensor(result.unit_shape(layer)).prod()) for layer in result.layers)
    return {
        "n": n,
        "rows": result.evaluations,
        "seconds": seconds,
        "rows_per_s": result.evaluations / seconds,
        "units": units,
        "rss_before_mb": before_mb,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "python_peak_mb": python_peak / 2**20,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
        "timings": timings,
        "loop_seconds": sum(timings.get(k, 0.0) for k in LOOP),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=int, default=4, help="smallest N (a power of two)")
    parser.add_argument("--steps", type=int, default=4, help="N = base * 2^k, k < steps")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", default=",".join(LAYERS),
                        help="comma-separated checkpoints, or 'default' (capture.default_layers)")
    parser.add_argument("--batch-rows", type=int, default=BATCH_ROWS)
    parser.add_argument("--background", choices=list(BACKGROUND), default="auto",
                        help="EngineConfig.background (auto: on the CPU with more than one "
                        "core)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    layers = None if args.layers == "default" else args.layers.split(",")
    if args.child is not None:
        print(json.dumps(measure(args.child, args.device, args.threads, layers,
                                 args.batch_rows, BACKGROUND[args.background])))
        return
    rows = []
    for k in range(args.steps):
        n = args.base * 2**k
        done = subprocess.run(
            [sys.executable, __file__, "--child", str(n), "--device", args.device,
             "--threads", str(args.threads), "--layers", args.layers,
             "--batch-rows", str(args.batch_rows), "--background", args.background],
            capture_output=True, text=True, check=True,
        )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"N={r['n']:>5}  rows={r['rows']:>6}  {r['seconds']:7.1f} s  "
              f"{r['rows_per_s']:6.1f} rows/s  peak RSS {r['peak_rss_mb']:7.1f} MB", flush=True)
    first = rows[0]
    print(f"\nsmall-input ResNet18, {IMAGE_SIZE} px, layers {args.layers} "
          f"({first['units']} units), Sobol set 1 (G = 8), batch {args.batch_rows} rows, "
          f"{args.device}, {args.threads} threads, background thread: {args.background}")
    header = (f"{'N':>6} {'rows':>7} {'seconds':>8} {'rows/s':>7} {'loop s':>7} "
              f"{'loop ms/row':>11} {'peak RSS MB':>12} {'python MB':>10} {'cuda MB':>8}")
    print(header)
    for r in rows:
        cuda = f"{r['cuda_peak_mb']:8.1f}" if r["cuda_peak_mb"] is not None else f"{'-':>8}"
        print(f"{r['n']:>6} {r['rows']:>7} {r['seconds']:>8.1f} {r['rows_per_s']:>7.1f} "
              f"{r['loop_seconds']:>7.1f} {1e3 * r['loop_seconds'] / r['rows']:>11.1f} "
              f"{r['peak_rss_mb']:>12.1f} {r['python_peak_mb']:>10.2f} {cuda}")
    growth = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    scale = rows[-1]["rows"] / rows[0]["rows"]
    time_ratio = rows[-1]["seconds"] / rows[0]["seconds"]
    loop_ratio = rows[-1]["loop_seconds"] / rows[0]["loop_seconds"]
    print(f"peak RSS ratio N={rows[-1]['n']} / N={rows[0]['n']}: {growth:.3f} "
          f"(rows x{scale:.0f}); time x{time_ratio:.2f} (loop x{loop_ratio:.2f}, linear: "
          f"x{scale:.0f})")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "device": args.device,
        "threads": args.threads,
        "background": args.background,
        "model": f"resnet18 small-input, {IMAGE_SIZE} px",
        "layers": args.layers,
        "batch_rows": args.batch_rows,
        "load_average_end": list(os.getloadavg()),
        "runs": rows,
        "peak_rss_ratio_last_over_first": growth,
        "time_ratio_last_over_first": time_ratio,
        "loop_time_ratio_last_over_first": loop_ratio,
        "rows_ratio_last_over_first": scale,
    }, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
