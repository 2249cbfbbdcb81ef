"""Masking throughput: the evaluation against the bare masked forwards it needs, and two
processes against one.

The demo network (small-input ResNet18, 64 px, 4 classes, random weights: speed does not depend
on them), random channel-mean maps of the analysis variables (augmentation set 1 + order, class,
image) at ``--layers`` (default: every layer from ``maxpool``, as the CLI's default), probe
images of 4 planted-factor classes, each as the original and with each of the 5 augmentations
alone (``--k`` draws), ``--variables`` mask variables x 17 configurations.

(a) Efficiency, per ``--batch-rows`` value (rows per forward of the masked part; "auto" is the
    device's default, 0 the unbatched path: one forward per configuration): the wall time of
    ``evaluate_masking`` (setup, masks, inputs, prefixes, metric and all) against the bare masked
    forwards of its schedule: the same suffix forwards on the same batch shapes with the same
    masks applied, from prefix states computed beforehand, nothing counted. They alternate
    ``--reps`` times; the ratio of the medians is bare / evaluation (1 = no overhead).
(b) Processes: ``evaluate_masking`` in one process and in ``--processes`` (gloo DDP, forked,
    one thread each; rank zero's wall time from a barrier to the result), medians of ``--reps``;
    the speed-up is one / several, and the counts must be equal.
(c) Bare suffix forwards, ms per image, at 1, 4, 8, 16, 32 and 64 rows per forward (what
    ``schedule.default_batch_rows`` rests on).

    .venv/bin/python bench/bench_masking.py                 # CPU, 1 thread, 2 reps
    .venv/bin/python bench/bench_masking.py --images-per-class 2 --variables 8 --reps 3
    python3 bench/bench_masking.py --device cuda --images-per-class 16 --k 4 --no-processes

Writes bench/results/masking[_<device>].json (or under --out / $OUT).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build_case, machine, median, results_dir, set_threads, timed, write_json

from sensitivity.masking import (
    MaskedRun,
    MaskingResult,
    ProbeInputs,
    default_batch_rows,
    default_configurations,
    evaluate_masking,
    layer_output_shapes,
)
from sensitivity.masking.evaluation import plan_schedule

LAYERS = ["maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
COUNTS = ("acc1", "acc5", "unmasked_acc1", "class_acc1", "confusion")


class Case:
    """The benchmark's network, maps and probe (module docstring)."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.model, probe, problem = build_case("resnet18", 64, 1, device)
        per_class = args.images_per_class
        keep = torch.arange(4).repeat_interleave(per_class) * 4 + torch.arange(per_class).repeat(4)
        self.images, self.labels = probe[keep], torch.arange(4).repeat_interleave(per_class)
        self.problem, self.variables = problem, problem.group_names
        shapes = layer_output_shapes(self.model, args.layers, (64, 64))
        rng = np.random.default_rng(0)
        self.maps = {layer: rng.random((len(self.variables), shape[0]))
                     for layer, shape in shapes.items()}
        self.options = {"mask_variables": self.variables[:args.variables], "k": args.k,
                        "batch_images": args.batch_images, "progress": False}

    def evaluate(self, batch_rows: int | None, **world: int) -> MaskingResult:
        return evaluate_masking(self.model, self.maps, self.variables, self.images, self.labels,
                                list(self.problem.augmentations), problem=self.problem,
                                batch_rows=batch_rows, **self.options, **world)

    def bare(self, batch_rows: int) -> tuple[Any, list[tuple[Any, Any]]]:
        """(the masked network, [(forward, prefix state)]) of the evaluation's schedule: the
        prefix states computed here, the forwards left to time."""
        inputs = ProbeInputs(self.images, self.labels, list(self.problem.augmentations),
                             self.options["k"], 0, self.problem)
        configs = default_configurations()
        chosen = self.options["mask_variables"]
        run = MaskedRun.prepare(self.model, self.maps, self.variables, chosen, inputs, configs,
                                ties="strict", reuse_prefix=True, layer_root=None, valid=None)
        plan = run.passes(chosen, configs)
        schedule = plan_schedule(run.network, inputs, [plan] * len(inputs.names),
                                 (0, inputs.n_images), self.options["batch_images"], batch_rows,
                                 run.device)
        work = []
        with torch.inference_mode():
            for first, last, forwards in schedule.batches:
                batches = inputs.batch(first, last, run.device, torch.float32)
                states = [run.network.prefix(x) for x, _ in batches]
                work += [(f, states[f.input_set]) for f in forwards]
        return run.network, work


def bare_forwards(network: Any, work: list[tuple[Any, Any]]) -> None:
    """The suffix forwards alone: masks applied, nothing counted."""
    with torch.inference_mode(), network:
        for f, state in work:
            network.suffix(state, f.mask, slice(f.start, f.stop), f.copies)


def efficiency(case: Case, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """(a): per batch_rows value, evaluation and bare forwards alternating."""
    rows = []
    for value in args.batch_rows:
        batch_rows = default_batch_rows(device) if value == "auto" else int(value)
        network, work = case.bare(batch_rows)
        evaluations, bares = [], []
        for _ in range(args.reps):
            evaluations.append(timed(partial(case.evaluate, batch_rows), device)[0])
            bares.append(timed(partial(bare_forwards, network, work), device)[0])
        image_forwards = sum(f.image_forwards for f, _ in work)
        row = {"batch_rows": batch_rows, "forwards": len(work),
               "image_forwards": image_forwards, "evaluation_s": median(evaluations),
               "bare_s": median(bares), "ratio": median(bares) / median(evaluations),
               "evaluation_runs_s": evaluations, "bare_runs_s": bares}
        print(f"(a) batch_rows {batch_rows:>4}: {len(work)} forwards, {image_forwards} image "
              f"forwards: evaluation {row['evaluation_s']:.2f} s, bare masked forwards "
              f"{row['bare_s']:.2f} s -> ratio {row['ratio']:.3f} (target >= 0.7)", flush=True)
        rows.append(row)
    return rows


def _rank(rank: int, world_size: int, port: int, args: argparse.Namespace, out: str) -> None:
    """One process of (b): the evaluation on its shard, timed from a barrier (rank zero)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        case = Case(args, torch.device("cpu"))
        batch_rows = None if args.batch_rows[0] == "auto" else int(args.batch_rows[0])
        seconds, cpu = [], []
        for _ in range(args.reps):
            torch.distributed.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            result = case.evaluate(batch_rows, rank=rank, world_size=world_size)
            seconds.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        if rank == 0:
            np.savez(out, seconds=np.array(seconds), cpu=np.array(cpu),
                     **{name: getattr(result, name) for name in COUNTS})
    finally:
        torch.distributed.destroy_process_group()


def processes(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """(b): one process against ``args.processes`` (gloo, one thread each)."""
    batch_rows = None if args.batch_rows[0] == "auto" else int(args.batch_rows[0])
    set_threads(1)
    single, single_cpu = [], []
    for _ in range(args.reps):
        start_cpu = time.process_time()
        single.append(timed(partial(case.evaluate, batch_rows), torch.device("cpu")))
        single_cpu.append(time.process_time() - start_cpu)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "ranks.npz")
        # fork: the children reuse this process's imports and the built case's code
        torch.multiprocessing.start_processes(_rank, args=(args.processes, port, args, out),
                                              nprocs=args.processes, start_method="fork")
        several = dict(np.load(out))
    one = median([s for s, _ in single])
    many = median(list(several["seconds"]))
    equal = all(np.array_equal(several[name], getattr(single[-1][1], name), equal_nan=True)
                for name in COUNTS)
    # CPU seconds tell the work a process did from the time it waited for a busy core.
    cpu_one, cpu_many = median(single_cpu), median(list(several["cpu"]))
    print(f"(b) 1 process {one:.2f} s, {args.processes} processes {many:.2f} s -> speed-up "
          f"{one / many:.2f}x (target >= 1.7x); CPU seconds of rank zero {cpu_many:.2f} vs "
          f"{cpu_one:.2f} -> {cpu_one / cpu_many:.2f}x; counts equal: {equal}", flush=True)
    return {"one_process_s": one, "processes": args.processes, "several_processes_s": many,
            "speedup": one / many, "counts_equal": equal, "one_process_cpu_s": cpu_one,
            "rank_zero_cpu_s": cpu_many, "cpu_speedup": cpu_one / cpu_many,
            "one_process_runs_s": [s for s, _ in single],
            "several_processes_runs_s": list(several["seconds"])}


def rows_sweep(case: Case, device: torch.device, reps: int = 3) -> dict[int, float]:
    """(c): bare suffix ms per image against rows per forward (unmasked, copies of the last
    input set's rows where it has fewer)."""
    network, work = case.bare(0)
    state = work[-1][1]
    rows = work[-1][0].stop
    per_image = {}
    with torch.inference_mode(), network:
        for size in (1, 4, 8, 16, 32, 64):
            take, copies = slice(0, min(size, rows)), max(1, size // rows)
            count = copies * min(size, rows)
            network.suffix(state, None, take, copies)  # warm-up
            seconds = timed(lambda: [network.suffix(state, None, take, copies)  # noqa: B023
                                     for _ in range(reps)], device)[0]
            per_image[count] = 1000 * seconds / (reps * count)
    print("(c) bare suffix ms per image by rows per forward: " + ", ".join(
        f"{n}: {ms:.1f}" for n, ms in per_image.items()), flush=True)
    return per_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of (a) and (c)")
    parser.add_argument("--images-per-class", type=int, default=1, choices=range(1, 5))
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--variables", type=int, default=2, help="mask variables (<= 8)")
    parser.add_argument("--layers", nargs="+", default=LAYERS)
    parser.add_argument("--batch-images", type=int, default=16)
    parser.add_argument("--batch-rows", nargs="+", default=["auto", "0"],
                        help="rows per masked forward to time: auto, 0 (unbatched), numbers")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--no-processes", action="store_true", help="skip (b)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    set_threads(args.threads)
    case = Case(args, device)
    print(f"masking: resnet18 small-input 64 px, {len(case.labels)} images, k {args.k}, "
          f"{args.variables} mask variables x 17 configurations, layers {args.layers}; "
          f"{args.threads} thread(s), load average {os.getloadavg()}", flush=True)
    payload: dict[str, Any] = {"machine": machine(device), "settings": vars(args)}
    payload["efficiency"] = efficiency(case, args, device)
    payload["rows_sweep_ms_per_image"] = rows_sweep(case, device)
    if not args.no_processes and device.type == "cpu":
        payload["processes"] = processes(case, args)
    payload["load_average_end"] = list(os.getloadavg())
    suffix = "" if device.type == "cpu" else f"_{device.type}"
    write_json(results_dir(args.out) / f"masking{suffix}.json", payload)


if __name__ == "__main__":
    main()
