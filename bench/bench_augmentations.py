"""Throughput of the batched per-sample augmentations against a per-sample torchvision loop.

A batch of 64 photographs at 224 px goes through all 12 augmentations in sequence, every image
with its own random parameters, three ways: ``sensitivity.augmentations.apply`` (one call per
augmentation for the whole batch); ``AugmentationProblem.augment``, the composition the engine
runs (one validation, cache-sized row blocks on CPU), in the fixed order and with a random
order per image; and image by image with the torchvision reference of METHOD.md section 2
(``tests/test_augmentations.py``). Prints images/s and the ratios to the per-sample loop, and
writes bench/results/augmentations.json.

    .venv/bin/python bench/bench_augmentations.py [--device cpu|cuda] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, machine, set_threads, synchronize, write_json

from sensitivity.augmentations import AUGMENTATIONS, apply
from sensitivity.decoded import DecodedRows
from sensitivity.problem import AugmentationProblem
from tests.test_augmentations import torchvision_reference

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


def composed_rows(params: dict, batch: int, shuffle: bool) -> DecodedRows:
    """Decoded rows with every augmentation on and these parameters, in the problem's order or
    (``shuffle``) a random order per row, as a design with the order variable decodes them."""
    k = len(AUGMENTATIONS)
    generator = torch.Generator().manual_seed(1)
    order = (
        torch.stack([torch.randperm(k, generator=generator) for _ in range(batch)])
        if shuffle
        else torch.arange(k).repeat(batch, 1)
    )
    zeros = torch.zeros(batch, dtype=torch.int64)
    return DecodedRows(zeros, zeros, None, order, torch.ones(batch, k, dtype=torch.bool), params)


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
        synchronize(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        fn(*args)
        synchronize(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def per_augmentation_times(images: torch.Tensor, params: dict, device: torch.device) -> dict:
    """Each augmentation alone on ``images`` (B, 3, H, W), batched and per sample: where the
    time goes. Returns {name: {"batched_ms", "per_sample_ms"}}."""
    out = {}
    for name in AUGMENTATIONS:
        one = {name: params[name]}
        alone, _ = timed(apply, name, images, params[name], repeats=3, device=device)
        reference, _ = timed(_per_sample_one, name, images, one, repeats=3, device=device)
        out[name] = {"batched_ms": 1e3 * alone, "per_sample_ms": 1e3 * reference}
    return out


def print_summary(
    args: argparse.Namespace, result: dict, batched: float, composed: float,
    composed_shuffled: float, loop: float, overhead: float, max_diff: float,
) -> None:
    """The bench's table: images/s and ratios to the per-sample loop, per augmentation."""
    per_augmentation = result["per_augmentation"]
    print(
        f"{args.batch} images at {args.size} px, 12 augmentations, {args.device}, "
        f"{result['torch_threads']} threads, load average {result['load_average'][0]:.1f}\n"
        f"{'':34s} {'images/s':>9s} {'vs per-sample':>14s}\n"
        f"{'apply, one call per augmentation':34s} {args.batch / batched:9.1f} "
        f"{result['ratio']:13.1f}x\n"
        f"{'augment, problem order':34s} {args.batch / composed:9.1f} "
        f"{result['ratio_composed']:13.1f}x\n"
        f"{'augment, random order per image':34s} {args.batch / composed_shuffled:9.1f} "
        f"{result['ratio_composed_random_order']:13.1f}x\n"
        f"{'per-sample torchvision loop':34s} {args.batch / loop:9.1f} {1.0:13.1f}x\n"
        f"max |batched - per-sample| = {max_diff:.2e}; ratio of process CPU time: "
        f"apply {result['ratio_cpu_time']:.1f}x, augment {result['ratio_cpu_time_composed']:.1f}x\n"
        f"per-sample loop at 16 px: {1e3 * overhead / args.batch:.2f} ms per image, "
        f"{100 * overhead / loop:.0f}% of the loop at {args.size} px (fixed per-call cost, the "
        "most that batching alone can remove)\n"
        f"written to {args.output}"
    )
    print(f"{'augmentation':22s} {'batched ms':>11s} {'per-sample ms':>14s} {'ratio':>7s}")
    for name, row in per_augmentation.items():
        ratio = row["per_sample_ms"] / row["batched_ms"]
        print(f"{name:22s} {row['batched_ms']:11.1f} {row['per_sample_ms']:14.1f} {ratio:7.2f}")


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
    set_threads(args.threads)
    device = torch.device(args.device)

    images = photos(args.batch, args.size).to(device)
    params = {
        name: {key: value.to(device) for key, value in values.items()}
        for name, values in random_params(args.batch, args.size, seed=0).items()
    }
    problem = AugmentationProblem(list(AUGMENTATIONS), p_on=1.0, auxiliaries=())
    in_order = composed_rows(params, args.batch, shuffle=False)
    shuffled = composed_rows(params, args.batch, shuffle=True)
    batched, batched_cpu = timed(run_batched, images, params, repeats=args.repeats, device=device)
    composed, composed_cpu = timed(
        problem.augment, images, in_order, repeats=args.repeats, device=device
    )
    composed_shuffled, _ = timed(
        problem.augment, images, shuffled, repeats=args.repeats, device=device
    )
    loop, loop_cpu = timed(run_per_sample, images, params, repeats=args.repeats, device=device)
    reference = run_per_sample(images, params)
    # The per-sample loop at 16 px is nearly all fixed per-call cost: the most that batching
    # alone (without doing less arithmetic per pixel) can save at full size.
    tiny = photos(args.batch, 16).to(device)
    tiny_params = {
        name: {key: value.to(device) for key, value in values.items()}
        for name, values in random_params(args.batch, 16, seed=0).items()
    }
    overhead, _ = timed(run_per_sample, tiny, tiny_params, repeats=args.repeats, device=device)
    max_diff = max(
        (run_batched(images, params) - reference).abs().max().item(),
        (problem.augment(images, in_order) - reference).abs().max().item(),
    )
    per_augmentation = per_augmentation_times(images, params, device)

    result = {
        "batch": args.batch,
        "size": args.size,
        "augmentations": list(AUGMENTATIONS),
        **machine(device),
        "batched_images_per_s": args.batch / batched,
        "composed_images_per_s": args.batch / composed,
        "composed_random_order_images_per_s": args.batch / composed_shuffled,
        "per_sample_images_per_s": args.batch / loop,
        "ratio": loop / batched,
        "ratio_composed": loop / composed,
        "ratio_composed_random_order": loop / composed_shuffled,
        "cpu_seconds_batched": batched_cpu,
        "cpu_seconds_composed": composed_cpu,
        "cpu_seconds_per_sample": loop_cpu,
        "ratio_cpu_time": loop_cpu / batched_cpu,
        "ratio_cpu_time_composed": loop_cpu / composed_cpu,
        "per_sample_ms_per_image_at_16px": 1e3 * overhead / args.batch,
        "per_sample_fixed_cost_share": overhead / loop,
        "max_abs_diff": max_diff,
        "per_augmentation": per_augmentation,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output, result, quiet=True)
    print_summary(args, result, batched, composed, composed_shuffled, loop, overhead, max_diff)


if __name__ == "__main__":
    main()
