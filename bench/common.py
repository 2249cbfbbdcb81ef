"""Shared helpers of the engine benchmarks: the benchmark cases, machine facts, JSON output.

Imports only torch, numpy and the project (never SALib, wandb or jsonargparse), so that the
engine benchmarks run on a bare GPU machine (bench/gpu_check.sh).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
# The project, and tests/ for the reference implementations the benches share with the tests
# (which import their helpers as top-level modules, as pytest's rootdir insertion allows).
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from data import PlantedFactorDataModule  # noqa: E402
from lightning_modules import ImageClassifier  # noqa: E402
from sensitivity.problem import AugmentationProblem  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PROBE_CLASSES = 4
PROBE_IMAGES_PER_CLASS = 4
# A published analysis (ResNet18, Sobol', set 1, N = 2^17) took 2.4 million forward passes.
PUBLISHED_ROWS = 2_400_000


def results_dir(out: str | None) -> Path:
    """``out``, else $OUT when set (the device tool collects it), else bench/results."""
    path = Path(out or os.environ.get("OUT") or RESULTS)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cpu_name() -> str:
    """CPU model from /proc/cpuinfo where there is one, else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures depend on: hardware, software, threads, load (1/5/15-min averages)."""
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
        ),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def set_threads(threads: int) -> None:
    """torch intra-op threads; interop threads are left alone (not settable twice)."""
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


@contextlib.contextmanager
def competing_load(processes: int) -> Iterator[None]:
    """Inside: ``processes`` busy Python processes (another job on the machine's cores)."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(processes)]
    try:
        yield
    finally:
        for process in busy:
            process.kill()
            process.wait()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(wall seconds, result) of one call, the device synchronised on both sides."""
    synchronize(device)
    start = time.perf_counter()
    value = fn()
    synchronize(device)
    return time.perf_counter() - start, value


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def build_case(
    arch: str, image_size: int, augmentation_set: int, device: torch.device, seed: int = 0
) -> tuple[torch.nn.Module, torch.Tensor, AugmentationProblem]:
    """(model, probe, problem) of one benchmark case, random weights (speed does not depend on
    them). <= 64 px: the small-input variant with 4 classes (the demo network); larger: the
    stock torchvision network with 1000 classes (ImageNet). Probe: 4 classes x 4 planted-factor
    images on the CPU, (16, 3, S, S) in [0, 1]. Problem: augmentation set 1 or 2 with order,
    class and image (p_on 0.5)."""
    torch.manual_seed(seed)
    small = image_size <= 64
    model = ImageClassifier(
        arch, num_classes=4 if small else 1000, small_input=small, image_size=image_size
    )
    model.to(device).eval()
    data = PlantedFactorDataModule(
        num_classes=PROBE_CLASSES,
        image_size=image_size,
        train_per_class=PROBE_IMAGES_PER_CLASS,
        val_per_class=PROBE_IMAGES_PER_CLASS,
        seed=seed,
    )
    probe, _ = data.probe_set(PROBE_IMAGES_PER_CLASS)
    problem = AugmentationProblem(
        augmentation_set, n_classes=PROBE_CLASSES, images_per_class=PROBE_IMAGES_PER_CLASS
    )
    return model, probe, problem


def index_difference(
    reference: dict[str, dict[str, np.ndarray]],
    other: dict[str, dict[str, np.ndarray]],
    keys: Sequence[str] = ("S1", "ST"),
    relative_variance: float = 1e-4,
) -> dict[str, dict[str, float]]:
    """How far ``other``'s indices are from ``reference``'s, per key, over every layer.

    Indices are compared clipped to [0, 1], as the maps are used (METHOD.md section 8): near-
    degenerate units (almost no variance on the A and B rows) have unbounded raw indices that
    any rounding change moves arbitrarily. Units: population variance above
    ``relative_variance`` x the layer's mean variance. Reports the max and mean absolute
    difference and the fraction of (group, unit) values whose raw difference exceeds the
    reference's confidence half-width (``<key>_conf``): changes larger than the estimator's
    own uncertainty.
    """
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        diffs, beyond, count, total = [], [], 0, 0
        for layer, arrays in reference.items():
            variance = arrays["var"].reshape(-1)
            keep = variance > relative_variance * variance.mean()
            a = arrays[key].reshape(arrays[key].shape[0], -1)[:, keep]
            b = other[layer][key].reshape(a.shape[0], -1)[:, keep]
            conf = arrays[f"{key}_conf"].reshape(a.shape[0], -1)[:, keep]
            diffs.append(np.abs(np.clip(a, 0, 1) - np.clip(b, 0, 1)).reshape(-1))
            beyond.append((np.abs(a - b) > conf).reshape(-1))
            count += int(keep.sum())
            total += keep.size
        diff, over = np.concatenate(diffs), np.concatenate(beyond)
        out[key] = {
            "max_abs_diff_clipped": float(diff.max()) if diff.size else 0.0,
            "mean_abs_diff_clipped": float(diff.mean()) if diff.size else 0.0,
            "fraction_beyond_half_width": float(over.mean()) if over.size else 0.0,
            "units_compared": count,
            "units": total,
        }
    return out


def write_json(path: Path, payload: dict[str, Any], quiet: bool = False) -> None:
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    if not quiet:
        print(f"wrote {path}")
