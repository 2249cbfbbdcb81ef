"""Throughput and accuracy of the streaming estimators (sensitivity.estimators).

1. Throughput: D = 8 groups and ``--units`` output units (default 100k, one activation map's
   worth): milliseconds per million (row x unit) updates of every accumulator, their float64
   state per unit, and a full first-order Sobol' / Goda analysis against SALib's per-column loop
   (``SALib.analyze.sobol.analyze`` with its default 100 bootstrap resamples, and
   ``SALib.analyze.shapley.analyze``) timed on a subset of columns and extrapolated to the same
   number of units.
2. Accuracy at equal model-evaluation budgets on Ishigami: RMSE of Goda's and the reference
   permutation (Song, Nelson and Staum, 1 outer x 3 inner) Shapley estimators, over seeds.
3. Coverage of the 95% intervals on Ishigami over ``--seeds`` seeds (Sobol' with Monte Carlo and
   with scrambled Sobol' base points, Goda, permutation).

Writes bench/results/estimators.json.

    .venv/bin/python bench/bench_estimators.py [--units 100000] [--device cpu|cuda] [--threads 2]
        [--load 1] [--updates-only]   # --threads: torch's threads and the accumulators' workers
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import competing_load  # noqa: E402
from sensitivity.designs import ShapleyDesign, SobolDesign, saltelli_rows  # noqa: E402
from sensitivity.estimators import (  # noqa: E402
    ContrastAccumulator,
    MomentsAccumulator,
    PermutationShapleyAccumulator,
    ShapleyAccumulator,
    SobolAccumulator,
)
from sensitivity.gsa import shapley_analyze, sobol_from_outputs  # noqa: E402

# Ishigami (a = 7, b = 0.1) on [-pi, pi]^3 and its analytic indices: the test's definitions, so
# the bench measures against the same truth the tests check.
from tests.test_gsa import (  # noqa: E402
    ISH_S1,
    ISH_SHAPLEY,
    ISH_ST,
    ISHIGAMI,
    V_ISH,
    ishigami,
)

RESULTS = ROOT / "bench" / "results" / "estimators.json"
G = 8


def accumulators(units: int) -> dict:
    """name -> (factory, block_size, extra argument: None, "permutations" or "replicates").

    The rqmc entries are the engine's default (16 replicates) with the block order of an N = 32
    design: two base points per replicate, so every update spans many replicates.
    """
    return {
        "sobol_mc": (lambda: SobolAccumulator(G, (units,)), G + 2, None),
        "sobol_mc_second_order": (
            lambda: SobolAccumulator(G, (units,), second_order=True), 2 * G + 2, None,
        ),
        "sobol_rqmc16": (lambda: SobolAccumulator(G, (units,), replicates=16), G + 2,
                         "replicates"),
        "sobol_rqmc16_second_order": (
            lambda: SobolAccumulator(G, (units,), second_order=True, replicates=16), 2 * G + 2,
            "replicates",
        ),
        "goda": (lambda: ShapleyAccumulator(G, (units,)), G + 1, "permutations"),
        "permutation_1x3": (lambda: PermutationShapleyAccumulator(G, 1, 3, (units,)), 3 * G,
                            "permutations"),
        "contrast_k4": (lambda: ContrastAccumulator(G, 4, (units,)), 1 + 4 * G, None),
        "moments": (lambda: MomentsAccumulator((units,)), 1, None),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_update(factory, block_size, extra, units, rows, device, repeats, threads) -> dict:
    """Median ms per million (row x unit) of update() on float32 outputs of ``rows`` rows."""
    acc = factory().to(device)
    acc.threads = threads
    n_blocks = max(1, rows // block_size)
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (n_blocks * block_size, units) if block_size == 1 else (n_blocks, block_size, units)
    Y = torch.randn(shape, generator=gen, device=device)
    args = [Y]
    if extra == "permutations":
        args.append(torch.stack([torch.randperm(G) for _ in range(n_blocks)]).to(device))
    if extra == "replicates":
        args.append(torch.arange(n_blocks) // 2)
    acc.update(*args)  # warm-up; also fixes the shift
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        acc.update(*args)
        sync(device)
        times.append(time.perf_counter() - start)
    row_units = n_blocks * block_size * units
    state_values = sum(t.numel() for t in acc.metric_state.values())
    return {
        "ms_per_million_row_units": 1e3 * float(np.median(times)) / (row_units / 1e6),
        "rows_per_update": n_blocks * block_size,
        "state_float64_per_unit": state_values / units,
    }


def full_analysis(units: int, n: int, device: torch.device, salib_columns: int) -> dict:
    """A whole first-order Sobol' (n base points) and Goda (n trajectories) analysis of
    ``units`` outputs: ours at once vs SALib's per-column loop extrapolated from a subset."""
    from SALib.analyze import shapley as salib_shapley
    from SALib.analyze import sobol as salib_sobol

    out = {}
    spec = {"num_vars": G, "names": [f"x{i}" for i in range(G)], "bounds": [[0, 1]] * G}
    weights = np.random.default_rng(0).normal(size=(G, units)).astype(np.float32)
    W = torch.from_numpy(weights).to(device)
    goda_design = ShapleyDesign(G, n, seed=0)
    designs = {"sobol": SobolDesign(G, n, seed=0), "goda": goda_design}
    for name, design in designs.items():
        X = design.rows()
        Xt = torch.from_numpy(X.astype(np.float32)).to(device)
        Y = torch.sin(Xt @ W) + (Xt @ W) ** 2  # (rows, units) float32, as activations would be
        block = design.block_size
        blocks = Y.reshape(n, block, units)
        sync(device)
        start = time.perf_counter()
        if name == "sobol":
            acc = SobolAccumulator(G, (units,)).to(device)
            for s in range(0, n, 16):
                acc.update(blocks[s : s + 16])
        else:
            acc = ShapleyAccumulator(G, (units,)).to(device)
            pt = torch.from_numpy(goda_design.permutations()).to(device)
            for s in range(0, n, 32):
                acc.update(blocks[s : s + 32], pt[s : s + 32])
        acc.compute()
        sync(device)
        ours = time.perf_counter() - start
        Ynp = Y[:, :salib_columns].double().cpu().numpy()
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for u in range(salib_columns):
                if name == "sobol":
                    salib_sobol.analyze(spec, Ynp[:, u], calc_second_order=False, seed=1)
                else:
                    salib_shapley.analyze(spec, X, Ynp[:, u])
        salib = (time.perf_counter() - start) / salib_columns * units
        out[name] = {
            "base_points_or_trajectories": n,
            "units": units,
            "ours_s": ours,
            "salib_s_extrapolated": salib,
            "salib_columns_timed": salib_columns,
            "speedup": salib / ours,
        }
    return out


def shapley_rmse(budgets: list[int], seeds: int) -> dict:
    """RMSE over seeds of the Shapley shares and effects of Ishigami at equal evaluation budgets."""
    out = {}
    for budget in budgets:
        for method, per_block, kwargs in (
            ("goda", 4, {}),
            ("permutation_1x3", 9, {"method": "permutation", "n_outer": 1, "n_inner": 3}),
        ):
            n = budget // per_block
            shares, effects, covered = [], [], np.zeros(3)
            for seed in range(seeds):
                r = shapley_analyze(ISHIGAMI, ishigami, n, seed=seed, **kwargs)
                shares.append(r.shapley_normalized)
                effects.append(r.shapley)
                covered += np.abs(r.shapley - ISH_SHAPLEY) <= r.shapley_conf
            shares, effects = np.array(shares), np.array(effects)
            out[f"{method}@{budget}"] = {
                "method": method,
                "evaluations": n * per_block,
                "blocks": n,
                "rmse_shares": np.sqrt(((shares - ISH_SHAPLEY / V_ISH) ** 2).mean(0)).tolist(),
                "rmse_effects": np.sqrt(((effects - ISH_SHAPLEY) ** 2).mean(0)).tolist(),
                "coverage_effects": (covered / seeds).tolist(),
            }
    return out


def coverage(seeds: int) -> dict:
    """Fraction of seeds whose 95% interval covers the analytic Ishigami value, per index."""
    out = {}
    # sobol_qmc: one scrambled sequence with delta-method intervals (the design before
    # replicates); sobol_rqmc16: the engine's default, 16 replicates with Student-t intervals.
    cases = [("sobol_mc", 1024), ("sobol_qmc", 512), ("sobol_qmc", 1024)]
    cases += [("sobol_rqmc16", n) for n in (256, 1024, 4096)]
    for label, n in cases:
        replicates = 16 if label == "sobol_rqmc16" else 1
        columns = []
        for seed in range(seeds):
            if label == "sobol_mc":
                base = np.random.default_rng(seed).random((n, 6))
                rows = saltelli_rows(base[:, :3], base[:, 3:])
            else:
                rows = SobolDesign(3, n, seed=seed, replicates=replicates).rows()
            columns.append(ishigami(ISHIGAMI.scale(rows)))
        # Seeds are the units of one call: the replicate layout is the same for every seed.
        r = sobol_from_outputs(ISHIGAMI, np.stack(columns, axis=1), replicates=replicates)
        out[f"{label}_n{n}"] = {
            "S1": (np.abs(r.S1 - ISH_S1[:, None]) <= r.S1_conf).mean(1).tolist(),
            "ST": (np.abs(r.ST - ISH_ST[:, None]) <= r.ST_conf).mean(1).tolist(),
            "rmse_over_standard_error_S1": (
                np.sqrt(((r.S1 - ISH_S1[:, None]) ** 2).mean(1)) / (r.S1_conf.mean(1) / 1.96)
            ).tolist(),
        }
    for method, kwargs in (("goda", {}), ("permutation_1x3", {"method": "permutation"})):
        effects, shares = np.zeros(3), np.zeros(3)
        for seed in range(seeds):
            r = shapley_analyze(ISHIGAMI, ishigami, 200, seed=seed, **kwargs)
            effects += np.abs(r.shapley - ISH_SHAPLEY) <= r.shapley_conf
            shares += np.abs(r.shapley_normalized - ISH_SHAPLEY / V_ISH) <= (
                r.shapley_normalized_conf
            )
        out[f"{method}_n200"] = {
            "shapley": (effects / seeds).tolist(),
            "shapley_normalized": (shares / seeds).tolist(),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, default=100_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=160, help="rows per timed update")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--base-points", type=int, default=256, help="full-analysis size")
    parser.add_argument("--salib-columns", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=1000, help="coverage seeds")
    parser.add_argument("--rmse-seeds", type=int, default=200)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--load", type=int, default=0,
                        help="competing busy processes while the update costs are timed")
    parser.add_argument("--updates-only", action="store_true",
                        help="only the update costs (printed, not written)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    throughput = {}
    with competing_load(args.load):
        for name, (factory, block, extra) in accumulators(args.units).items():
            throughput[name] = time_update(
                factory, block, extra, args.units, args.rows, device, args.repeats, args.threads
            )
            print(
                f"{name:26s} {throughput[name]['ms_per_million_row_units']:8.2f} ms per 1e6 "
                f"row x unit updates; {throughput[name]['state_float64_per_unit']:.0f} float64 "
                f"states per unit"
            )
    if args.updates_only:
        return
    analysis = full_analysis(args.units, args.base_points, device, args.salib_columns)
    for name, r in analysis.items():
        print(
            f"full {name} analysis, {r['base_points_or_trajectories']} blocks x {r['units']} "
            f"units: ours {r['ours_s']:.1f} s, SALib loop {r['salib_s_extrapolated']:.0f} s "
            f"(from {r['salib_columns_timed']} columns) -> {r['speedup']:.0f}x"
        )
    rmse = shapley_rmse([720, 2880, 11520], args.rmse_seeds)
    for key, r in rmse.items():
        print(
            f"Ishigami Shapley {key:22s} RMSE shares {np.round(r['rmse_shares'], 4)} "
            f"effects {np.round(r['rmse_effects'], 3)}"
        )
    cover = coverage(args.seeds)
    for key, r in cover.items():
        print(f"coverage {key:22s} " + " ".join(f"{k} {np.round(v, 3)}" for k, v in r.items()))

    args.output.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": args.threads,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
        },
        "groups": G,
        "units": args.units,
        "throughput": throughput,
        "full_analysis_vs_salib": analysis,
        "shapley_rmse_equal_budget": rmse,
        "coverage_95": cover,
    }
    args.output.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
