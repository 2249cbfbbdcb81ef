"""Suppressing a spurious cue (issue #18): the full experiment on several seeds, with controls.

Per seed: planted shape classes whose train hue agrees with the class in a share
``--agreement`` of each class (``PlantedFactorDataModule``, nuisance "hue"); val and test break
the agreement (hue random over the class hues). A second module with the same seed and
``eval_nuisance="shifted"`` gives a test split whose hue names the *next* class. A seeded
SmallCNN (tests/test_ground_truth.py) is trained on train, a Sobol' analysis of
[hue, hflip, rolling] (+ class, image) is run at ``--layers`` (channel means), and every method
is evaluated on the test split, clean and with the hue distortion at each strength
(``sensitivity.distortion.NuisanceDistortion``, the test stream: every method sees exactly the
same distorted images):

- unmasked: the trained network.
- best suppression: ``run_suppression``'s mask, chosen on val (criterion "mean").
- random masks: the mean of ``--random-draws`` masks with the chosen mask's unit counts.
- fine-tune head, top units: ``finetune_with_suppression`` (the ``--units`` channels of
  ``--finetune-layer`` most sensitive to hue, zeroed; the head retrained).
- fine-tune head, random units: the same with as many channels drawn at random (the control).
- fine-tune augmentation: ``finetune_with_augmentation`` (whole network, hue on every batch).
- fine-tune penalty: ``finetune_with_penalty`` (whole network, the top units' hue variance).

All fine-tunings use the same steps, learning rate, batches and seed. Prints two Markdown tables
(random-hue and shifted-hue test) with "mean ± sd over seeds" (sd with ddof = 1), the chosen
configuration per seed and the seconds taken; writes a figure (accuracy vs strength per method,
error bars = sd over seeds).

    .venv/bin/python bench/bench_suppression.py [--seeds 0 1 2] [--out docs/images/...png]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from test_ground_truth import SmallCNN, fit  # noqa: E402

from data import PlantedFactorDataModule  # noqa: E402
from lightning_modules.finetune import (  # noqa: E402
    finetune_with_augmentation,
    finetune_with_penalty,
    finetune_with_suppression,
    top_units,
)
from sensitivity.config import EngineConfig  # noqa: E402
from sensitivity.distortion import TEST_STREAM, NuisanceDistortion  # noqa: E402
from sensitivity.engine import run_analysis  # noqa: E402
from sensitivity.masking import default_configurations, masking_maps, selection_mask  # noqa: E402
from sensitivity.masking.network import MaskedNetwork  # noqa: E402
from sensitivity.problem import AugmentationProblem  # noqa: E402
from sensitivity.suppression import (  # noqa: E402
    SuppressionMasks,
    evaluate_suppression,
    run_suppression,
    suppression_candidates,
)

NUISANCE = "hue"
AUGMENTATIONS = ["hue", "hflip", "rolling"]
METHODS = [
    "unmasked",
    "best suppression (val-chosen)",
    "random masks (same counts)",
    "fine-tune head, top hue units off",
    "fine-tune head, random units off",
    "fine-tune all, hue augmentation",
    "fine-tune all, hue-variance penalty",
]
EVALS = ("random", "shifted")


@dataclass
class SeedRun:
    """One seed's accuracies: {eval: {method: (1 + S,)}}, the choice and the seconds."""

    seed: int
    accuracy: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    chosen: str = ""
    unit_counts: list[int] = field(default_factory=list)
    train_val_acc: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)


def train_model(data: PlantedFactorDataModule, epochs: int, seed: int, width: int) -> nn.Module:
    """A SmallCNN trained on ``data``'s train split (the tests' ``fit``)."""
    torch.manual_seed(seed)
    return fit(SmallCNN(data.num_classes, width=width), data, epochs)


@torch.no_grad()
def accuracies(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    distortion: NuisanceDistortion,
    strengths: list[float],
    batch: int = 256,
) -> np.ndarray:
    """(1 + S,) top-1 accuracies, clean then at each strength, on the test stream's draws
    (those ``run_suppression`` uses for its test split)."""
    model.eval()
    out = []
    for strength in [0.0, *strengths]:
        correct = 0
        for start in range(0, len(labels), batch):
            index = torch.arange(start, min(start + batch, len(labels)))
            x = distortion(images[index], strength, TEST_STREAM, index)
            correct += int((model(x).argmax(1) == labels[index]).sum())
        out.append(correct / len(labels))
    return np.array(out)


def random_units(selected: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
    """As many units as ``selected`` at each layer, drawn uniformly at random."""
    rng = np.random.default_rng([seed, 7])
    out = {}
    for layer, chosen in selected.items():
        flat = np.zeros(chosen.numel(), dtype=bool)
        flat[rng.choice(flat.size, size=int(chosen.sum()), replace=False)] = True
        out[layer] = torch.from_numpy(flat.reshape(tuple(chosen.shape))).to(chosen.device)
    return out


def run_seed(seed: int, args: argparse.Namespace) -> SeedRun:
    """The whole experiment on one seed."""
    run = SeedRun(seed)
    clock = time.perf_counter()
    sizes = {"factor": "shape", "num_classes": args.classes, "image_size": args.size,
             "train_per_class": args.train_per_class, "val_per_class": args.val_per_class,
             "test_per_class": args.test_per_class, "seed": seed, "batch_size": 64,
             "nuisance": NUISANCE, "agreement": args.agreement}
    data = {kind: PlantedFactorDataModule(**sizes, eval_nuisance=kind) for kind in EVALS}
    for module in data.values():
        module.setup()
    dm = data["random"]
    model = train_model(dm, args.epochs, seed, args.width)
    val_images, val_labels = dm.datasets["val"].tensors
    with torch.no_grad():
        run.train_val_acc = float((model(val_images).argmax(1) == val_labels).float().mean())
    run.seconds["train"] = time.perf_counter() - clock

    clock = time.perf_counter()
    problem = AugmentationProblem(AUGMENTATIONS, auxiliaries=["class", "image"],
                                  n_classes=args.classes, images_per_class=args.probe_per_class)
    config = EngineConfig(method="sobol", n=args.n, seed=seed, layers=list(args.layers),
                          reduction="channel_mean", batch_rows=512, progress=False)
    result = run_analysis(model, problem, dm.probe_set(args.probe_per_class, "val")[0], config)
    size = (args.size, args.size)
    maps = masking_maps(result, model, size, layers=list(args.layers))
    run.seconds["analysis"] = time.perf_counter() - clock

    clock = time.perf_counter()
    tests = {kind: data[kind].datasets["test"].tensors for kind in EVALS}
    strengths = list(args.strengths)
    suppression = run_suppression(
        model, maps, result.group_names, NUISANCE, (val_images, val_labels),
        lambda: tests["random"], strengths=strengths, criterion="mean", scope="both",
        random_draws=args.random_draws, seed=seed, problem=problem, analysis="sobol",
        batch_images=64)
    run.chosen = suppression.chosen
    run.unit_counts = [int(c) for c in suppression.unit_counts]
    run.accuracy["random"] = {
        METHODS[0]: suppression.test_unmasked_acc1,
        METHODS[1]: suppression.test_chosen_acc1,
        METHODS[2]: suppression.test_random_acc1.mean(axis=0),
    }
    # The same chosen mask and the same random controls on the shifted test split.
    configs = default_configurations()
    masks = SuppressionMasks(model, maps, result.group_names, NUISANCE, size, configs)
    chosen = suppression_candidates(masks.layers, configs, "both")[suppression.chosen_index]
    assert chosen.label == suppression.chosen
    distortion = NuisanceDistortion(NUISANCE, seed, problem)
    shifted = evaluate_suppression(
        MaskedNetwork(model, masks.layers), masks, chosen, *tests["shifted"], distortion,
        strengths, random_draws=args.random_draws, seed=seed, batch_images=64)
    run.accuracy["shifted"] = {METHODS[0]: shifted.unmasked, METHODS[1]: shifted.chosen,
                               METHODS[2]: shifted.random.mean(axis=0)}
    check = accuracies(model, *tests["random"], distortion, strengths)
    assert np.allclose(check, suppression.test_unmasked_acc1), (check, suppression)
    run.seconds["suppression"] = time.perf_counter() - clock

    clock = time.perf_counter()
    selected = top_units(result, model, size, NUISANCE, args.finetune_layer, args.units)
    steps, lr = args.steps, args.lr
    tuned = {
        METHODS[3]: finetune_with_suppression(
            copy.deepcopy(model), selection_mask(selected, 0.0), dm, steps, lr, seed)[0],
        METHODS[4]: finetune_with_suppression(
            copy.deepcopy(model), selection_mask(random_units(selected, seed), 0.0), dm, steps,
            lr, seed)[0],
        METHODS[5]: finetune_with_augmentation(
            copy.deepcopy(model), dm, NUISANCE, steps, lr, seed)[0],
        METHODS[6]: finetune_with_penalty(
            copy.deepcopy(model), selected, dm, NUISANCE, args.penalty, steps, lr, seed)[0],
    }
    for name, net in tuned.items():
        for kind in EVALS:
            run.accuracy[kind][name] = accuracies(net, *tests[kind], distortion, strengths)
    run.seconds["finetune"] = time.perf_counter() - clock
    return run


def table(runs: list[SeedRun], kind: str, strengths: list[float]) -> str:
    """Markdown: rows methods, columns clean and each strength, "mean ± sd" over seeds."""
    columns = ["clean", *(f"hue s={s:g}" for s in strengths)]
    lines = ["| method | " + " | ".join(columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for method in METHODS:
        values = np.stack([run.accuracy[kind][method] for run in runs])  # (seeds, 1 + S)
        mean = values.mean(axis=0)
        sd = values.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros_like(mean)
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in zip(mean, sd, strict=True)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(runs: list[SeedRun], strengths: list[float], out: Path) -> None:
    """Accuracy vs hue strength per method, one panel per test split, error bars = sd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.array([0.0, *strengths])
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.0), sharey=True)
    styles = ["k-o", "C3-s", "C7--s", "C0-^", "C0:^", "C2-d", "C1-v"]
    for ax, kind in zip(axes, EVALS, strict=True):
        for method, style in zip(METHODS, styles, strict=True):
            values = np.stack([run.accuracy[kind][method] for run in runs])
            sd = values.std(axis=0, ddof=1) if len(runs) > 1 else None
            ax.errorbar(x + 0.004 * METHODS.index(method), values.mean(axis=0), yerr=sd,
                        fmt=style, capsize=3, ms=4, lw=1.2, label=method)
        ax.set_title(f"test split, hue {kind} w.r.t. the class")
        ax.set_xlabel("hue distortion strength s (0 = clean)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"top-1 accuracy (mean ± sd, {len(runs)} seeds)")
    # below the panels: inside, the legend would hide the error bars
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=4)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def parse() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add("--out", type=Path, default=ROOT / "docs" / "images" / "suppression_benchmark.png")
    add("--classes", type=int, default=4)
    add("--size", type=int, default=32)
    add("--agreement", type=float, default=0.8)
    add("--train-per-class", type=int, default=512)
    add("--val-per-class", type=int, default=48)
    add("--test-per-class", type=int, default=200)
    add("--width", type=int, default=16)
    add("--epochs", type=int, default=15)
    add("--n", type=int, default=64, help="Sobol' base samples")
    add("--probe-per-class", type=int, default=2)
    add("--layers", nargs="+", default=["features.8", "features.11", "features.14"])
    add("--strengths", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    add("--random-draws", type=int, default=5)
    add("--finetune-layer", default="features.14")
    add("--units", type=int, default=16, help="channels suppressed by the fine-tunings")
    add("--steps", type=int, default=120)
    add("--lr", type=float, default=1e-3)
    add("--penalty", type=float, default=1.0, help="weight of the hue-variance penalty")
    add("--threads", type=int, default=2)
    return parser.parse_args()


def main() -> None:
    """Run every seed, print the tables and the choices, write the figure."""
    args = parse()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    runs = []
    for seed in args.seeds:
        run = run_seed(seed, args)
        runs.append(run)
        timing = ", ".join(f"{k} {v:.1f} s" for k, v in run.seconds.items())
        print(f"seed {seed}: val acc {run.train_val_acc:.3f}; chosen {run.chosen!r} "
              f"(units per layer {run.unit_counts} of layers {args.layers}); {timing}",
              flush=True)
    strengths = list(args.strengths)
    for kind in EVALS:
        print(f"\nTest split, hue {kind} w.r.t. the class ({args.test_per_class * args.classes} "
              f"images; mean ± sd over seeds {args.seeds}):\n")
        print(table(runs, kind, strengths))
    figure(runs, strengths, args.out)
    print(f"\nfigure: {args.out}\ntotal {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
