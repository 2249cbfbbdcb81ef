"""Throughput of the batched per-sample augmentations against a per-sample torchvision loop.

A batch of 64 photographs at 224 px goes through all 12 augmentations in sequence, every image
with its own random parameters: once with ``sensitivity.augmentations.apply`` (one call per
augmentation for the whole batch) and once image by image with the torchvision reference of
METHOD.md section 2 (``tests/test_augmentations.py``). Prints images/s both ways and the ratio,
and writes bench/results/augmentations.json.

    .venv/bin/python bench/bench_augmentations.py [--device cpu|cuda] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sensitivity.augmentations import AUGMENTATIONS, apply  # noqa: E402
from tests.test_augmentations import torchvision_reference  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "augmentations.json"


def photos(batch: int, size: int) -> torch.Tensor:
    """(batch, 3, size, size) float32 in [0, 1]: sklearn's two sample photos, cycled."""
    import torchvision.transforms.v2.functional as F
    from sklearn.datasets import load_sample_images

    images = [torch.from_numpy(im.copy()).permute(2, 0, 1) for im in load_sample_images().images]
    square = [F.resize(F.center_crop(im, min(im.shape[-2:])), [size, size]) for im in images]
    stacked = torch.stack(square).float() / 255.0
    return stacked[torch.arange(batch) % len(square)].contiguous()


def random_params(batch: int, size: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Uniform per-sample parameters within the bounds at this size, integers rounded."""
    generator = torch.Generator().manual_seed(seed)
    params = {}
    for name, spec in AUGMENTATIONS.items():
        params[name] = {}
        for pspec, (low, high) in zip(spec.params, spec.bounds(size, size), strict=True):
            value = low + (high - low) * torch.rand(batch, generator=generator)
            params[name][pspec.name] = value.round() if pspec.integer else value
    return params


def cpu_name() -> str:
    """CPU model from /proc/cpuinfo where there is one, else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def run_batched(images: torch.Tensor, params: dict) -> torch.Tensor:
    for name in AUGMENTATIONS:
        images = apply(name, images, params[name])
    return images


def run_per_sample(images: torch.Tensor, params: dict) -> torch.Tensor:
    out = []
    for index, image in enumerate(images):
        for name in AUGMENTATIONS:
            scalars = {key: float(value[index]) for key, value in params[name].items()}
            image = torchvision_reference(name, image, scalars)
        out.append(image)
    return torch.stack(out)


def _per_sample_one(name: str, images: torch.Tensor, params: dict) -> list[torch.Tensor]:
    return [
        torchvision_reference(name, image, {k: float(v[i]) for k, v in params[name].items()})
        for i, image in enumerate(images)
    ]


def timed(fn, *args, repeats: int, device: torch.device) -> tuple[float, float]:
    """Median wall and process-CPU seconds of ``repeats`` calls after one warm-up call.

    CPU time is reported too because on a shared machine wall time also counts the time other
    processes hold the cores.
    """
    fn(*args)
    wall, cpu = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    images = photos(args.batch, args.size).to(device)
    params = {
        name: {key: value.to(device) for key, value in values.items()}
        for name, values in random_params(args.batch, args.size, seed=0).items()
    }
    batched, batched_cpu = timed(run_batched, images, params, repeats=args.repeats, device=device)
    loop, loop_cpu = timed(run_per_sample, images, params, repeats=args.repeats, device=device)
    max_diff = (run_batched(images, params) - run_per_sample(images, params)).abs().max().item()
    # each augmentation alone on the photos, to show where the time goes
    per_augmentation = {}
    for name in AUGMENTATIONS:
        one = {name: params[name]}
        alone, _ = timed(apply, name, images, params[name], repeats=3, device=device)
        reference, _ = timed(_per_sample_one, name, images, one, repeats=3, device=device)
        per_augmentation[name] = {"batched_ms": 1e3 * alone, "per_sample_ms": 1e3 * reference}

    result = {
        "batch": args.batch,
        "size": args.size,
        "augmentations": list(AUGMENTATIONS),
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batched_images_per_s": args.batch / batched,
        "per_sample_images_per_s": args.batch / loop,
        "ratio": loop / batched,
        "cpu_seconds_batched": batched_cpu,
        "cpu_seconds_per_sample": loop_cpu,
        "ratio_cpu_time": loop_cpu / batched_cpu,
        "max_abs_diff": max_diff,
        "per_augmentation": per_augmentation,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{args.batch} images at {args.size} px, 12 augmentations, {args.device}, "
        f"{result['torch_threads']} threads, load average {result['load_average_1min']:.1f}\n"
        f"batched:    {result['batched_images_per_s']:10.1f} images/s\n"
        f"per-sample: {result['per_sample_images_per_s']:10.1f} images/s\n"
        f"ratio:      {result['ratio']:10.1f}x   (max |batched - per-sample| = {max_diff:.2e})\n"
        f"ratio of process CPU time: {result['ratio_cpu_time']:.1f}x\n"
        f"written to {args.output}"
    )
    print(f"{'augmentation':22s} {'batched ms':>11s} {'per-sample ms':>14s} {'ratio':>7s}")
    for name, row in per_augmentation.items():
        ratio = row["per_sample_ms"] / row["batched_ms"]
        print(f"{name:22s} {row['batched_ms']:11.1f} {row['per_sample_ms']:14.1f} {ratio:7.2f}")


if __name__ == "__main__":
    main()
