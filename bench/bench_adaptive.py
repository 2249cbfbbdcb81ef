"""Adaptive N against a sweep of fixed N on a planted network (sensitivity.adaptive).

A SmallCNN trained on planted colour classes (tests/test_ground_truth.py: the class is an
object's hue) is analysed at its ``fc`` probabilities over hue, hflip and rolling plus class
and image, as the ground-truth tests do. Per method and seed:

1. a sweep of fixed N (powers of two) gives each N's run half-width (``adaptive.run_halfwidth``:
   the ``--quantile`` quantile of the valid units' S1/ST or share half-widths);
2. the target EPS is the geometric mean of the half-widths at ``--target_n`` / 2 and
   ``--target_n``, and the smallest sufficient fixed N the first swept N whose half-width is at
   most EPS;
3. an adaptive run from the smallest swept N (max_n: the largest) gives the N it reached.

Printed and written (bench/results/adaptive.json): rows of the adaptive run / rows of the
smallest sufficient fixed N (the issue's target: at most 2).

    .venv/bin/python bench/bench_adaptive.py [--seeds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch
from common import machine, results_dir, set_threads, write_json

from sensitivity import adaptive
from sensitivity.config import EngineConfig
from sensitivity.engine import run_analysis
from sensitivity.problem import AugmentationProblem
from tests.test_ground_truth import AUGMENTATIONS, CLASSES, PROBE_PER_CLASS, train


def halfwidth_at(model, problem, probe, config: EngineConfig) -> tuple[float, int, float]:
    """(run half-width, rows, seconds) of one analysis, fixed or adaptive."""
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small-N advice and max_n shortfalls: in the table
        result = run_analysis(model, problem, probe, config)
    seconds = time.perf_counter() - started
    return (adaptive.result_halfwidth(result, config.halfwidth_quantile), result.evaluations,
            seconds)


def case(model, problem, probe, method: str, seed: int, sweep: list[int], args) -> dict:
    """One method and seed: the sweep, the target, the adaptive run and their ratio."""
    base = {"method": method, "seed": seed, "layers": ["fc"], "batch_rows": 512,
            "progress": False, "halfwidth_quantile": args.quantile}
    widths = {}
    for n in sweep:
        widths[n] = halfwidth_at(model, problem, probe, EngineConfig(n=n, **base))
    eps = math.sqrt(widths[args.target_n // 2][0] * widths[args.target_n][0])
    sufficient = min((n for n in sweep if widths[n][0] <= eps), default=None)
    reached, rows, seconds = halfwidth_at(model, problem, probe, EngineConfig(
        n=sweep[0], target_halfwidth=eps, max_n=sweep[-1], **base))
    n_reached = rows * sweep[0] // widths[sweep[0]][1]  # rows per block from the first run
    fixed_rows = widths[sufficient][1] if sufficient else None
    return {
        "method": method, "seed": seed, "target_halfwidth": eps,
        "sweep": {n: {"halfwidth": w, "rows": r, "seconds": s} for n, (w, r, s) in widths.items()},
        "smallest_sufficient_n": sufficient, "smallest_sufficient_rows": fixed_rows,
        "adaptive_n": n_reached, "adaptive_rows": rows,
        "adaptive_halfwidth": reached, "adaptive_seconds": seconds,
        "ratio": rows / fixed_rows if fixed_rows else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="design seeds per method")
    parser.add_argument("--sweep", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024],
                        help="fixed N swept (powers of two, increasing)")
    parser.add_argument("--target_n", type=int, default=256,
                        help="the target lies between the half-widths at this N / 2 and N")
    parser.add_argument("--quantile", type=float, default=0.9, help="halfwidth_quantile")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args()
    set_threads(args.threads)
    started = time.perf_counter()
    model, data, accuracy = train("colour")
    problem = AugmentationProblem(AUGMENTATIONS, auxiliaries=["class", "image"],
                                  n_classes=CLASSES, images_per_class=PROBE_PER_CLASS)
    probe = data.probe_set(PROBE_PER_CLASS)[0]
    rows = [case(model, problem, probe, method, seed, args.sweep, args)
            for method in ("sobol", "shapley") for seed in range(args.seeds)]
    print(f"planted colour SmallCNN (val accuracy {accuracy:.2f}), fc, quantile {args.quantile}")
    print("method   seed  target   sufficient N  adaptive N  adaptive hw  rows ratio")
    for r in rows:
        print(f"{r['method']:8s} {r['seed']:4d}  {r['target_halfwidth']:.4f}  "
              f"{r['smallest_sufficient_n']!s:>12}  {r['adaptive_n']:10d}  "
              f"{r['adaptive_halfwidth']:.4f}       {r['ratio']!s:>5}")
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    print(f"largest ratio {max(ratios):.2f} (target <= 2); {time.perf_counter() - started:.0f} s")
    write_json(results_dir(args.out) / "adaptive.json", {
        "machine": machine(torch.device("cpu")), "accuracy": accuracy,
        "settings": vars(args), "cases": rows, "largest_ratio": max(ratios),
        "seconds": time.perf_counter() - started,
    })


if __name__ == "__main__":
    main()
