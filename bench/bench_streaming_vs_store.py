"""Streaming analysis against store-then-analyse (the published pipeline) on the same design.

One Sobol' design (ResNet18 at 64 px, augmentation set 1 + order, class, image, reduction
"none" at the default checkpoints, N base points), three ways, each in a fresh process so that
its peak resident set size (ru_maxrss) is its own:

- streaming: ``sensitivity.engine.run_analysis``; the only file is the results file
  (``ResultsStore.write_analysis``), whose size depends on the units, never on N;
- store, vectorised: the published approach's sampling step - every design row forwarded and
  its activations appended to HDF5 (``activations.ActivationWriter``, lzf) - then the file read back
  layer by layer and analysed with ``gsa.sobol_from_outputs`` (the same streaming accumulators,
  fed the stored rows): the fastest store-then-analyse there can be;
- store, SALib per unit: the same stored file analysed as the published code did, one
  ``SALib.analyze.sobol.analyze`` call (100 bootstrap resamples) per unit; timed on a sample
  of units and extrapolated to all of them (the full loop takes hours). Skipped without SALib.

Reports wall time, peak RSS, disk bytes (and their extrapolation to N = 2^17), and checks that
both store-then-analyse variants give the streaming indices (max |S1 - S1'|, |ST - ST'|).

    .venv/bin/python bench/bench_streaming_vs_store.py [--n 16] [--threads 1] [--salib-units 24]

Writes bench/results/streaming_vs_store.json (or under --out / $OUT).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build_case, machine, median, results_dir, set_threads, write_json

from sensitivity import gsa
from sensitivity.activations import ActivationWriter
from sensitivity.capture import ActivationCapture
from sensitivity.config import EngineConfig, build_design
from sensitivity.engine import run_analysis
from sensitivity.plan import layer_shapes
from sensitivity.store import ResultsStore

ARCH, SIZE, SET = "resnet18", 64, 1


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def config_for(n: int) -> EngineConfig:
    return EngineConfig(method="sobol", n=n, reduction="none", progress=False)


def streaming(n: int, work: Path) -> dict[str, Any]:
    model, probe, problem = build_case(ARCH, SIZE, SET, torch.device("cpu"))
    rss_before = peak_rss_mb()
    start = time.perf_counter()
    result = run_analysis(model, problem, probe, config_for(n))
    store = ResultsStore(work / "results.h5")
    store.write_analysis("sobol", result)
    seconds = time.perf_counter() - start
    save_indices(result.layers, work / "streaming.npz")
    return {"seconds": seconds, "rss_before_mb": rss_before, "peak_rss_mb": peak_rss_mb(),
            "disk_bytes": (work / "results.h5").stat().st_size, "rows": result.evaluations}


def sample_to_hdf5(n: int, path: Path) -> dict[str, Any]:
    """The published sampling step: forward every row, append its activations to HDF5."""
    model, probe, problem = build_case(ARCH, SIZE, SET, torch.device("cpu"))
    config = config_for(n)
    design = build_design(problem, config)
    shapes = layer_shapes(model, (SIZE, SIZE), config)
    per_batch = max(1, config.batch_rows // design.block_size)
    capture = ActivationCapture(model.net, config.layers, config.reduction)
    start = time.perf_counter()
    with ActivationWriter(path, "sobol", shapes, problem.d, design.row_kinds(),
                          n_rows=design.n_rows) as writer, torch.inference_mode(), capture:
        for first in range(0, design.n_blocks, per_batch):
            last = min(first + per_batch, design.n_blocks)
            rows = design.rows(first, last)
            decoded = problem.decode(rows, SIZE, SIZE)
            model(problem.augment(probe[decoded.image_index], decoded))
            index = np.arange(first * design.block_size, last * design.block_size)
            writer.append(index, rows, capture.pop())
    return {"sample_seconds": time.perf_counter() - start, "disk_bytes": path.stat().st_size,
            "rows": design.n_rows, "units": int(sum(np.prod(s) for s in shapes.values()))}


def read_layers(path: Path):
    import h5py

    with h5py.File(path, "r") as f:
        group = f["activations/sobol"]
        for layer in group.attrs["layers"]:
            yield str(layer), group[layer][()]


def store_vectorised(n: int, work: Path) -> dict[str, Any]:
    _, _, problem = build_case(ARCH, SIZE, SET, torch.device("cpu"))
    path = work / "activations.h5"
    sampled = sample_to_hdf5(n, path)
    salib_problem = gsa.Problem.from_salib(problem.to_salib())
    start = time.perf_counter()
    layers = {}
    for layer, Y in read_layers(path):
        r = gsa.sobol_from_outputs(salib_problem, Y.reshape(Y.shape[0], -1))
        layers[layer] = {"S1": r.S1.reshape(-1, *Y.shape[1:]), "ST": r.ST.reshape(-1, *Y.shape[1:])}
        del Y, r
    analyze_seconds = time.perf_counter() - start
    save_indices(layers, work / "store.npz")
    return {**sampled, "analyze_seconds": analyze_seconds,
            "seconds": sampled["sample_seconds"] + analyze_seconds, "peak_rss_mb": peak_rss_mb()}


def store_salib(n: int, work: Path, units_sampled: int) -> dict[str, Any]:
    """SALib's per-output analysis of the stored file, on ``units_sampled`` units spread over
    the layers; the time per unit is extrapolated to every unit."""
    from SALib.analyze import sobol as salib_sobol

    _, _, problem = build_case(ARCH, SIZE, SET, torch.device("cpu"))
    salib_problem = problem.to_salib()
    path = work / "activations.h5"
    layers = list(read_layers(path))
    total_units = sum(int(np.prod(Y.shape[1:])) for _, Y in layers)
    streamed = np.load(work / "streaming.npz")
    per_layer = max(1, units_sampled // len(layers))
    rng = np.random.default_rng(0)
    seconds, differences = [], []
    for layer, Y in layers:
        flat = Y.reshape(Y.shape[0], -1).astype(np.float64)
        informative = np.flatnonzero(flat.std(0) > 1e-6)
        chosen = rng.choice(informative, size=min(per_layer, informative.size), replace=False)
        S1 = streamed[f"{layer}/S1"].reshape(streamed[f"{layer}/S1"].shape[0], -1)
        for unit in chosen:
            start = time.perf_counter()
            r = salib_sobol.analyze(salib_problem, flat[:, unit], calc_second_order=False,
                                    num_resamples=100, print_to_console=False, seed=0)
            seconds.append(time.perf_counter() - start)
            differences.append(float(np.abs(np.asarray(r["S1"]) - S1[:, unit]).max()))
    per_unit = median(seconds)
    return {"seconds_per_unit": per_unit, "units_timed": len(seconds), "units": total_units,
            "analyze_seconds_extrapolated": per_unit * total_units,
            "max_abs_diff_S1_vs_streaming": max(differences) if differences else None}


def save_indices(layers: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    np.savez(path, **{f"{layer}/{k}": a[k] for layer, a in layers.items() for k in ("S1", "ST")})


def agreement(work: Path) -> dict[str, float]:
    a, b = np.load(work / "streaming.npz"), np.load(work / "store.npz")
    out = {}
    for key in ("S1", "ST"):
        diffs = []
        for name in a.files:
            if name.endswith(f"/{key}"):
                x, y = a[name], b[name]
                finite = np.isfinite(x) & np.isfinite(y)
                # relative to the index size: near-degenerate units have huge raw indices
                diffs.append((np.abs(x - y) / np.maximum(1.0, np.abs(x)))[finite].max())
        out[f"max_rel_diff_{key}"] = float(max(diffs))
    return out


def child(kind: str, n: int, work: Path, threads: int, salib_units: int) -> None:
    set_threads(threads)
    if kind == "streaming":
        out = streaming(n, work)
    elif kind == "store":
        out = store_vectorised(n, work)
    else:
        out = store_salib(n, work, salib_units)
    print(json.dumps(out))


def run_child(kind: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--n", str(args.n), "--work", str(work),
         "--threads", str(args.threads), "--salib-units", str(args.salib_units)],
        capture_output=True, text=True,
    )
    if done.returncode:
        raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="Sobol' base points")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--salib-units", type=int, default=24,
                        help="units timed with SALib (0: skip)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.n, Path(args.work), args.threads, args.salib_units)
        return
    set_threads(args.threads)
    info = machine(torch.device("cpu"))
    print(f"{info['cpu']}, {args.threads} threads, load average {info['load_average'][0]:.2f}; "
          f"{ARCH} {SIZE} px, set {SET}, Sobol' N = {args.n}, reduction none, default "
          f"checkpoints", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        work = Path(tmp)
        stream = run_child("streaming", args, work)
        print(f"streaming: {stream['seconds']:.1f} s", flush=True)
        store = run_child("store", args, work)
        print(f"store-then-analyse: {store['seconds']:.1f} s", flush=True)
        agree = agreement(work)
        salib = None
        if args.salib_units:
            try:
                import SALib  # noqa: F401
            except ImportError:
                print("SALib missing: per-unit SALib analysis skipped")
            else:
                salib = run_child("salib", args, work)
    rows_2_17 = store["rows"] // args.n * 2**17
    result = {
        "machine": info,
        "settings": {"arch": ARCH, "size": SIZE, "set": SET, "n": args.n,
                     "threads": args.threads, "salib_units": args.salib_units},
        "streaming": stream,
        "store_vectorised": store,
        "store_salib": salib,
        "agreement_streaming_vs_store": agree,
        "speedup_vs_store_vectorised": store["seconds"] / stream["seconds"],
        "speedup_vs_store_salib": (
            (store["sample_seconds"] + salib["analyze_seconds_extrapolated"]) / stream["seconds"]
            if salib else None
        ),
        "disk_bytes_per_row_store": store["disk_bytes"] / store["rows"],
        "disk_bytes_store_at_n_2^17": store["disk_bytes"] / store["rows"] * rows_2_17,
        "rows_at_n_2^17": rows_2_17,
    }
    print_table(result)
    write_json(results_dir(args.out) / "streaming_vs_store.json", result)


def print_table(r: dict[str, Any]) -> None:
    s, v, sal = r["streaming"], r["store_vectorised"], r["store_salib"]
    print(f"\n{'approach':34} {'seconds':>10} {'peak RSS MB':>12} {'disk MB':>10}")
    print(f"{'streaming engine':34} {s['seconds']:>10.1f} {s['peak_rss_mb']:>12.0f} "
          f"{s['disk_bytes'] / 2**20:>10.1f}")
    print(f"{'store (HDF5) + vectorised analysis':34} {v['seconds']:>10.1f} "
          f"{v['peak_rss_mb']:>12.0f} {v['disk_bytes'] / 2**20:>10.1f}"
          f"   (sample {v['sample_seconds']:.1f} s + analyse {v['analyze_seconds']:.1f} s)")
    if sal:
        total = v["sample_seconds"] + sal["analyze_seconds_extrapolated"]
        print(f"{'store (HDF5) + SALib per unit':34} {total:>10.0f} {'':>12} "
              f"{v['disk_bytes'] / 2**20:>10.1f}   (SALib {1e3 * sal['seconds_per_unit']:.1f} ms "
              f"per unit x {sal['units']} units, extrapolated from {sal['units_timed']})")
    print(f"speed-up of streaming: {r['speedup_vs_store_vectorised']:.2f}x vs store + vectorised"
          + (f", {r['speedup_vs_store_salib']:.0f}x vs store + SALib" if sal else ""))
    a = r["agreement_streaming_vs_store"]
    print(f"indices, streaming vs store + vectorised: max relative diff S1 "
          f"{a['max_rel_diff_S1']:.1e}, ST {a['max_rel_diff_ST']:.1e}"
          + (f"; SALib S1 max abs diff {sal['max_abs_diff_S1_vs_streaming']:.1e} "
             "(on the units timed)" if sal else ""))
    print(f"store disk: {r['disk_bytes_per_row_store'] / 2**20:.2f} MB per row -> "
          f"{r['disk_bytes_store_at_n_2^17'] / 2**30:.0f} GB at N = 2^17 "
          f"({r['rows_at_n_2^17']} rows); streaming results file: "
          f"{s['disk_bytes'] / 2**20:.1f} MB whatever N")


if __name__ == "__main__":
    main()
