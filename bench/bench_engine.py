"""Engine efficiency: rows/s of the full analysis against rows/s of the bare forward passes.

For each network (ResNet18, AlexNet, VGG11), augmentation set (1, 2) and engine variant, one
Sobol' analysis (``sensitivity.engine.run_analysis``, reduction "none" at the default
checkpoints) and the bare forward passes of the same batches - the same augmented images,
batch size, device, precision and memory format, no hooks, no accumulation - alternate
``--reps`` times in this process; the medians give the ratio. The analysis is timed end to end
(setup, dry forward, accumulator allocation and compute() included), and its ``timings``
breakdown (data, augment, forward, accumulate, setup + compute) is reported too: on the CPU from
the same runs, on a GPU from one extra run, because phase timing synchronises the device.
Variants (EngineConfig fields): baseline = the defaults (float32, contiguous, every row
forwarded); channels_last; dedup (``deduplicate``: each distinct augmented image once); bf16 /
fp16 (autocast); fast = bf16 + channels_last + dedup; compile (``torch.compile``, fast + compile).
Non-baseline variants report how far their S1/ST move from the baseline's (informative units).

    .venv/bin/python bench/bench_engine.py            # quick: n=16, 2 reps, baseline + fast
    .venv/bin/python bench/bench_engine.py --full     # n=32, 3 reps, every CPU variant
    python3 bench/bench_engine.py --device cuda --size 224 --archs resnet18 --n 4096

Writes bench/results/engine_efficiency[_<device>_<size>].json (or under --out / $OUT).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    PUBLISHED_ROWS,
    build_case,
    competing_load,
    index_difference,
    machine,
    median,
    results_dir,
    set_threads,
    timed,
    write_json,
)

from sensitivity.background import uses_background
from sensitivity.config import EngineConfig, build_design
from sensitivity.engine import run_analysis

VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "channels_last": {"channels_last": True},
    "dedup": {"deduplicate": True},
    "bf16": {"precision": "bf16"},
    "fp16": {"precision": "16"},
    "fast": {"precision": "bf16", "channels_last": True, "deduplicate": True},
    "compile": {"precision": "bf16", "channels_last": True, "deduplicate": True, "compile": True},
}
PHASES = ("data", "augment", "forward", "accumulate")
BACKGROUND = {"auto": None, "on": True, "off": False}
# Batches of augmented images kept on the device for the bare forward passes (cycled).
PREPARED_BATCHES = 4


def prepared_batches(
    problem: Any, probe: torch.Tensor, config: EngineConfig, device: torch.device
) -> tuple[list[torch.Tensor], list[int], int]:
    """(the first augmented batches of the design, as the engine forms them; the rows of every
    batch of the design; rows of the design). Built with the public API: design rows -> decode
    -> augment."""
    design = build_design(problem, config)
    per_batch = max(1, config.batch_rows // design.block_size)
    starts = list(range(0, design.n_blocks, per_batch))
    sizes = [(min(start + per_batch, design.n_blocks) - start) * design.block_size
             for start in starts]
    size = (probe.shape[2], probe.shape[3])
    batches = []
    with torch.inference_mode():
        for start in starts[:PREPARED_BATCHES]:
            rows = design.rows(start, min(start + per_batch, design.n_blocks))
            decoded = problem.decode(rows, *size)
            images = probe[decoded.image_index].to(device)
            batches.append(problem.augment(images, decoded))
    return batches, sizes, design.n_rows


def autocast_for(config: EngineConfig, device: torch.device) -> torch.autocast:
    dtype = torch.float16 if config.precision == "16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=config.precision != "32")


@contextlib.contextmanager
def model_format(model: torch.nn.Module, channels_last: bool):
    """The model in channels-last format inside (for the bare passes; the engine does its own)."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        if channels_last:
            model.to(memory_format=torch.contiguous_format)


def bare_forward(
    forward: Any, batches: list[torch.Tensor], sizes: list[int], config: EngineConfig,
    device: torch.device,
) -> float:
    """Seconds for forward passes of the prepared batches (cycled), one of ``sizes[i]`` rows per
    batch of the design: the rows the analysis forwards, no more."""
    fmt = torch.channels_last if config.channels_last else torch.contiguous_format
    inputs = [b.contiguous(memory_format=fmt) for b in batches]

    def run() -> None:
        with torch.inference_mode(), autocast_for(config, device):
            for i, size in enumerate(sizes):
                forward(inputs[i % len(inputs)][:size])

    return timed(run, device)[0]


def measure(
    case: tuple[Any, torch.Tensor, Any], variant: str, args: argparse.Namespace,
    device: torch.device, reference: dict | None,
) -> tuple[dict[str, Any], dict]:
    """One variant of one case: interleaved analysis / bare-forward repetitions."""
    model, probe, problem = case
    config = EngineConfig(
        method="sobol", n=args.n, reduction="none", batch_rows=args.batch_rows,
        num_workers=args.workers, progress=False, second_order=args.second_order,
        threads=args.threads, accumulation_threads=args.accumulation_threads,
        background=BACKGROUND[args.background], **VARIANTS[variant],
    )
    batches, sizes, rows = prepared_batches(problem, probe, config, device)
    load_before = list(os.getloadavg())
    compile_seconds = None
    forward = torch.compile(model) if config.compile else model
    with model_format(model, config.channels_last):
        if config.compile:
            compile_seconds = bare_forward(forward, batches[:1], sizes[:1], config, device)
        bare_forward(forward, batches[:1], sizes[:1], config, device)  # warm-up
    bare, analysis, breakdowns = [], [], []
    result = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # bare, analysis, bare, ..., analysis, bare: both see the same load drift
    for rep in range(args.reps + 1):
        with model_format(model, config.channels_last):
            bare.append(bare_forward(forward, batches, sizes, config, device))
        if rep == args.reps:
            break
        timings: dict[str, float] | None = {} if device.type == "cpu" else None
        seconds, result = timed(
            lambda t=timings: run_analysis(model, problem, probe, config, timings=t), device
        )
        analysis.append(seconds)
        if timings is not None:
            breakdowns.append(timings)
    del batches
    cuda_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    if device.type == "cuda":  # phase timing synchronises: one extra run for the breakdown
        timings = {}
        run_analysis(model, problem, probe, config, timings=timings)
        breakdowns.append(timings)
    breakdown = {k: median([b.get(k, 0.0) for b in breakdowns]) for k in breakdowns[0]}
    steady = sum(breakdown.get(k, 0.0) for k in PHASES)
    analysis_s, bare_s = median(analysis), median(bare)
    arrays = {
        layer: {k: v for k, v in a.items() if k in ("S1", "ST", "S1_conf", "ST_conf", "var")}
        for layer, a in result.layers.items()
    }
    row = {
        "variant": variant,
        "options": VARIANTS[variant],
        "background": uses_background(config, device),
        "n": args.n,
        "rows": rows,
        "batches": len(sizes),
        "forwarded": int(breakdown.get("forwarded", rows)),
        "units": int(sum(a["var"].size for a in arrays.values())),
        "analysis_seconds": analysis,
        "bare_forward_seconds": bare,
        "analysis_rows_per_s": rows / analysis_s,
        "bare_rows_per_s": rows / bare_s,
        "ratio": bare_s / analysis_s,
        "steady_ratio": bare_s / steady if steady else None,
        "breakdown_seconds": breakdown,
        "compile_seconds": compile_seconds,
        "cuda_peak_mb": cuda_peak,
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
    }
    if reference is not None:
        row["index_difference_vs_baseline"] = index_difference(reference, arrays)
    return row, arrays


def extrapolate(row: dict[str, Any], block_size: int) -> dict[str, float]:
    """Hours for the published 2.4 M forward passes and for this problem's N = 2^17 design."""
    rate = row["analysis_rows_per_s"]
    return {
        "published_2.4M_rows_hours": PUBLISHED_ROWS / rate / 3600,
        "n_2^17_rows": block_size * 2**17,
        "n_2^17_hours": block_size * 2**17 / rate / 3600,
    }


def background_seconds(breakdown: dict[str, float]) -> float:
    """The background thread's own seconds (its phases end in "_background")."""
    return sum(v for k, v in breakdown.items() if k.endswith("_background"))


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'arch':9} {'set':>3} {'variant':13} {'rows':>6} {'fwd%':>5} {'analysis r/s':>12} "
            f"{'bare r/s':>9} {'ratio':>6} {'steady':>6} | {'setup':>6} {'data':>5} "
            f"{'augm':>5} {'fwd':>6} {'accum':>6} {'comp':>5} s; background thread")
    print(head)
    for r in rows:
        b = r["breakdown_seconds"]
        steady = f"{r['steady_ratio']:.2f}" if r["steady_ratio"] else "-"
        print(f"{r['arch']:9} {r['set']:>3} {r['variant']:13} {r['rows']:>6} "
              f"{100 * r['forwarded'] / r['rows']:>5.0f} {r['analysis_rows_per_s']:>12.1f} "
              f"{r['bare_rows_per_s']:>9.1f} {r['ratio']:>6.2f} {steady:>6} | "
              f"{b.get('setup', 0):>6.2f} {b.get('data', 0):>5.2f} {b.get('augment', 0):>5.2f} "
              f"{b.get('forward', 0):>6.2f} {b.get('accumulate', 0):>6.2f} "
              f"{b.get('compute', 0):>5.2f}; "
              + (f"{background_seconds(b):.2f} s" if r["background"] else "no"))
    diffs = [r for r in rows if "index_difference_vs_baseline" in r]
    if diffs:
        print("\nS1 / ST vs baseline, clipped to [0, 1]: max |diff|, mean |diff|, fraction of "
              "values moved by more than the baseline's half-width")
        for r in diffs:
            d = r["index_difference_vs_baseline"]
            print(f"{r['arch']:9} {r['set']:>3} {r['variant']:13} " + "  ".join(
                f"{k}: {d[k]['max_abs_diff_clipped']:.2e} {d[k]['mean_abs_diff_clipped']:.2e} "
                f"{d[k]['fraction_beyond_half_width']:.4f}" for k in ("S1", "ST")))


def print_extrapolation(rows: list[dict[str, Any]]) -> None:
    print("\nextrapolated analysis time (at the measured analysis rows/s):")
    for r in rows:
        e = r["extrapolation"]
        print(f"{r['arch']:9} set {r['set']} {r['variant']:13} published 2.4 M rows: "
              f"{e['published_2.4M_rows_hours']:8.2f} h;  this problem at N = 2^17 "
              f"({e['n_2^17_rows']} rows): {e['n_2^17_hours']:8.2f} h")


def measure_all(
    args: argparse.Namespace, variants: list[str], device: torch.device, started: float,
    rows: list[dict[str, Any]], skipped: list[dict[str, Any]], save: Callable[[], None],
) -> None:
    """Every (architecture, set, variant) case in turn, appending to ``rows`` (or, past
    ``args.deadline``, to ``skipped``) and saving after each variant."""
    last_seconds_per_row = None
    for arch in args.archs.split(","):
        for aug_set in (int(s) for s in args.sets.split(",")):
            case = build_case(arch, args.size, aug_set, device)
            block_size = (2 if args.second_order else 1) * len(case[2].groups) + 2
            reference = None
            for variant in variants:
                elapsed = time.perf_counter() - started
                if args.deadline and last_seconds_per_row is not None:
                    # a variant costs about its last measured cost per design row
                    expected = last_seconds_per_row * block_size * args.n
                    if elapsed + expected > args.deadline:
                        skipped.append({"arch": arch, "set": aug_set, "variant": variant,
                                        "expected_seconds": expected})
                        print(f"  {arch} set {aug_set} {variant}: skipped (expected "
                              f"{expected:.0f} s, {args.deadline - elapsed:.0f} s left)")
                        continue
                variant_started = time.perf_counter()
                row, arrays = measure(case, variant, args, device, reference)
                last_seconds_per_row = (time.perf_counter() - variant_started) / row["rows"]
                if variant == "baseline":
                    reference = arrays
                row.update(arch=arch, set=aug_set, extrapolation=extrapolate(row, block_size))
                rows.append(row)
                print(f"  {arch} set {aug_set} {variant}: {row['analysis_rows_per_s']:.1f} "
                      f"rows/s, bare {row['bare_rows_per_s']:.1f}, ratio {row['ratio']:.2f} "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
                save()
            del case, reference
            gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--archs", default="resnet18,alexnet,vgg11")
    parser.add_argument("--sets", default="1,2")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated among {', '.join(VARIANTS)}")
    parser.add_argument("--n", type=int, default=None, help="Sobol' base points (power of 2)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--batch-rows", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (EngineConfig.threads of the analysis)")
    parser.add_argument("--accumulation-threads", type=int, default=1,
                        help="EngineConfig.accumulation_threads of the analysis")
    parser.add_argument("--background", choices=list(BACKGROUND), default="auto",
                        help="EngineConfig.background (auto: on the CPU with more than one "
                        "core)")
    parser.add_argument("--second-order", action="store_true", help="Sobol' S2 (2G + 2 rows "
                        "per base point)")
    parser.add_argument("--load", type=int, default=0,
                        help="competing busy processes running during the measurement")
    parser.add_argument("--full", action="store_true",
                        help="n=32, 3 reps, variants baseline,channels_last,dedup,bf16,fast")
    parser.add_argument("--out", default=None, help="results folder (default $OUT or "
                        "bench/results)")
    parser.add_argument("--name", default=None, help="JSON file name")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds: skip variants expected to end after it")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch.cuda.is_available() is False")
    args.n = args.n or (32 if args.full else 16)
    args.reps = args.reps or (3 if args.full else 2)
    if args.variants is None:
        args.variants = ("baseline,channels_last,dedup,bf16,fast" if args.full
                         else "baseline,fast")
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose among {list(VARIANTS)}")
    set_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: both sides profit alike
    info = machine(device)
    print(f"{info['device_name']}, torch {info['torch']}, {info['torch_threads']} threads, "
          f"load average {info['load_average'][0]:.2f}, {args.load} competing processes; "
          f"Sobol'{' second order' if args.second_order else ''}, reduction none, default "
          f"checkpoints, {args.size} px, N = {args.n}, batch_rows {args.batch_rows}, "
          f"{args.reps} reps, background thread: {args.background}", flush=True)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    started = time.perf_counter()
    suffix = "" if (args.device, args.size) == ("cpu", 64) else f"_{args.device}_{args.size}"
    out = results_dir(args.out) / (args.name or f"engine_efficiency{suffix}.json")

    def save() -> None:  # after every variant: a run killed by a time limit keeps its figures
        info["load_average_end"] = list(os.getloadavg())
        write_json(out, {
            "machine": info,
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "name")},
            "published_rows": PUBLISHED_ROWS,
            "runs": rows,
            "skipped": skipped,
            "seconds": time.perf_counter() - started,
        }, quiet=True)

    with competing_load(args.load):
        measure_all(args, variants, device, started, rows, skipped, save)
    print()
    if rows:
        print_table(rows)
        print_extrapolation(rows)
    save()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
