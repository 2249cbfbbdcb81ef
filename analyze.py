"""Analyse a network's activations: ``python analyze.py sobol|shapley|variance|contrast [options]``.

Per layer and unit, how much of each activation's variance each augmentation (and the order,
class and image variables) explains: Sobol indices, Shapley effects, per-unit moments, or paired
treatment-control contrasts (METHOD.md). ``python analyze.py sobol`` alone runs the embedded
demo (configs/analyze/demo.yaml: planted-factor images, 64 px, ResNet18); presets for the
published ImageNet settings are in configs/analyze/ (``--config imagenet_alexnet_sobol``).
``python analyze.py --help`` lists every option; docs/CLI.md explains them.

Outputs go to the run directory (``--output``, default ``runs/analysis/<name>/version_<n>``):
results.h5 (docs/RESULTS_FORMAT.md), figures/<name>_<key>.png heatmaps, config.yaml and, with
``--store-activations``, activations_<name>.h5 (every design row once, linked from results.h5).

Several processes (``--devices 2 --strategy ddp``, torchrun, SLURM) are launched by Lightning's
Trainer; each analyses its shard of the design and rank zero writes. Bad input (unknown layer,
Sobol n not a power of two, a checkpoint of another architecture, an empty image folder...) is
reported on stderr with exit status 2 before any output is created.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, Namespace
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset

from data import ImageFolderDataModule, PlantedFactorDataModule
from data.common import first_per_class
from lightning_modules import ImageClassifier
from lightning_modules.analysis import (
    RESULTS_FILE,
    AnalysisModule,
    AnalysisOutputs,
    one_step_loader,
)
from lightning_modules.architectures import build_network
from lightning_modules.weights import read_weights
from sensitivity.capture import classification_layer
from sensitivity.engine import METHODS, EngineConfig, build_design, check_inputs
from sensitivity.problem import AugmentationProblem
from sensitivity.store import ResultsStore, check_name

ROOT = Path(__file__).resolve().parent
PRESETS = ROOT / "configs" / "analyze"
DEMO_CONFIG = PRESETS / "demo.yaml"
PLANNED = ("masking", "single-class", "correlation", "lda", "report")
INPUT_ERRORS = (ValueError, FileNotFoundError, MisconfigurationException)


# ------------------------------------------------------------------------------------ parsing
def _add(parser: ArgumentParser, name: str, *aliases: str, **kwargs: Any) -> None:
    """An option ``--name`` (plus ``--name-with-dashes`` for top-level names) and aliases."""
    names = [f"--{name}"]
    if "_" in name and "." not in name:
        names.append(f"--{name.replace('_', '-')}")
    parser.add_argument(*names, *aliases, **kwargs)


def build_parser() -> ArgumentParser:
    """The analyze.py parser; configs/analyze/demo.yaml provides the defaults."""
    p = ArgumentParser(
        prog="analyze.py",
        description=(
            "Decompose the variance of every activation unit over simultaneous image "
            "augmentations. Usage: analyze.py sobol|shapley|variance|contrast [options]; "
            "without options runs the CPU demo (configs/analyze/demo.yaml)."
        ),
        default_config_files=[str(DEMO_CONFIG)],
    )
    p.add_argument("--config", action=ActionConfigFile,
                   help="YAML preset: a path or a name in configs/analyze/, e.g. demo")
    _add(p, "method", type=str, default="sobol", help=f"one of {list(METHODS)}")
    _add(p, "name", type=str | None, default=None,
         help="analysis name in results.h5 and file names (default: the method)")
    _add(p, "output", type=str | None, default=None,
         help="run directory (default <runs_dir>/analysis/<name>/version_<n>); give it to resume")
    _add(p, "runs_dir", type=str, default="runs", help="root of default run directories")
    _add(p, "overwrite", action=ActionYesNo, default=False,
         help="replace an analysis of the same name in the run directory")
    _add(p, "seed", type=int, default=0, help="design seed (same seed and inputs: same result)")
    # model
    _add(p, "checkpoint", type=str | None, default=None,
         help="Lightning checkpoint of an ImageClassifier (train.py's checkpoints/*.ckpt)")
    _add(p, "arch", type=str | None, default=None,
         help="torchvision architecture (default: the checkpoint's, else resnet18)")
    _add(p, "weights", type=str | None, default=None,
         help="torchvision state-dict file or weights enum name (IMAGENET1K_V1), read offline")
    _add(p, "small_input", type=bool | None, default=None,
         help="small-input stem (default: auto, for <= 64 px without weights)")
    # data
    _add(p, "data.source", type=str, default="planted", help="planted | folder")
    _add(p, "data.root", type=str | None, default=None,
         help="image folder with one subfolder per class (implies source folder)")
    _add(p, "data.factor", type=str, default="colour", help="planted factor: colour|shape|mixed")
    _add(p, "data.num_classes", type=int, default=4, help="planted classes")
    _add(p, "data.image_size", type=int, default=64, help="image side in pixels")
    _add(p, "data.images_per_class", "--images-per-class", "--images_per_class", type=int,
         default=4, help="probe images per class")
    _add(p, "data.seed", type=int, default=0, help="data seed (planted images, folder choice)")
    # problem
    _add(p, "problem.preset", type=str | None, default=None,
         help="'paper': the published switch semantics and min-max postprocessing")
    _add(p, "problem.augmentations", "--set", type=int | list[str], default=1,
         help="augmentation set 1 or 2, or a list of names")
    _add(p, "problem.p_on", type=float | dict[str, float], default=0.5,
         help="probability each augmentation is applied (one value or {name: p})")
    _add(p, "problem.auxiliaries", type=list[str], default=["order", "class", "image"],
         help="auxiliary variables: order, class, image, partition")
    _add(p, "problem.postprocess", type=str | None, default=None, help="null or minmax")
    _add(p, "problem.bounds", type=dict[str, dict[str, list[float]]] | None, default=None,
         help="narrower parameter bounds at 224 px: {aug: {param: [low, high]}}")
    # engine
    _add(p, "n", type=int, default=32,
         help="Sobol base points (power of two) / Shapley trajectories or permutations / "
              "variance rows / contrast images")
    _add(p, "second_order", action=ActionYesNo, default=False, help="Sobol second-order S2")
    _add(p, "shapley_method", type=str, default="goda", help="goda | permutation")
    _add(p, "n_outer", type=int, default=1, help="permutation Shapley: outer samples")
    _add(p, "n_inner", type=int, default=3, help="permutation Shapley: inner samples")
    _add(p, "contrast_k", type=int, default=4, help="contrast: draws per augmentation and image")
    _add(p, "layers", type=list[str] | None, default=None,
         help="module names to analyse (default: the network's default checkpoints)")
    _add(p, "reduction", type=str | dict[str, str], default="none",
         help="none (every element) | channel_mean, or {layer: reduction}")
    _add(p, "batch_rows", type=int, default=256, help="rows per forward (whole design blocks)")
    _add(p, "checkpoint_every", type=int, default=0,
         help="design blocks between resume checkpoints (0: off)")
    _add(p, "precision", type=int | str, default="32", help="32 | bf16 (forward only)")
    _add(p, "num_workers", type=int, default=0, help="DataLoader workers decoding rows/images")
    _add(p, "progress", action=ActionYesNo, default=True, help="progress bar on rank zero")
    _add(p, "store_activations", action=ActionYesNo, default=False,
         help="also store every raw activation row (large!)")
    # processes
    _add(p, "accelerator", type=str, default="auto", help="Lightning accelerator: auto|cpu|gpu")
    _add(p, "devices", type=int | str, default=1, help="processes per node (auto: all devices)")
    _add(p, "strategy", type=str, default="auto", help="Lightning strategy: auto|ddp|ddp_spawn")
    _add(p, "num_nodes", type=int, default=1, help="nodes (under SLURM/torchrun)")
    return p


def normalise_args(args: Sequence[str]) -> list[str]:
    """``sobol ...`` -> ``--method sobol ...``; preset names after --config -> their paths."""
    args = list(args)
    if args and not args[0].startswith("-"):
        args = ["--method", args[0], *args[1:]]
    for i, arg in enumerate(args[:-1]):
        if arg == "--config" and not Path(args[i + 1]).exists():
            candidate = PRESETS / f"{args[i + 1].removesuffix('.yaml')}.yaml"
            if candidate.exists():
                args[i + 1] = str(candidate)
    return args


def requested_method(args: Sequence[str]) -> str | None:
    """The method named on the command line, if any (before the full parse)."""
    for i, arg in enumerate(args[:-1]):
        if arg == "--method":
            return args[i + 1]
    return next((a.split("=", 1)[1] for a in args if a.startswith("--method=")), None)


# ------------------------------------------------------------------------------------ building
def build_probe(
    cfg: Namespace, partition: bool
) -> tuple[torch.Tensor | Dataset, int, list[str], str]:
    """(probe images class-major, class count, class names, dataset description).

    Planted data: a tensor. Image folders: a lazy Dataset (decoded in the engine's workers).
    With a partition auxiliary the probe is split 0 (train) followed by split 1 (val).
    """
    data, n = cfg.data, cfg.data.images_per_class
    if data.root is None and data.source == "folder":
        raise ValueError(
            "this configuration analyses an image folder: pass --data.root <folder with one "
            "subfolder per class> (e.g. ILSVRC val sorted into class folders)"
        )
    if data.root is None:
        if data.source != "planted":
            raise ValueError(f"data.source must be planted or folder, got {data.source!r}")
        dm = PlantedFactorDataModule(
            factor=data.factor, num_classes=data.num_classes, image_size=data.image_size,
            train_per_class=n, val_per_class=n, seed=data.seed,
        )
        splits = ["train", "val"] if partition else ["val"]
        probe = torch.cat([dm.probe_set(n, split)[0] for split in splits])
        return probe, dm.num_classes, dm.class_names, f"planted:{data.factor}"
    dm = ImageFolderDataModule(
        data.root, image_size=data.image_size, images_per_class=2 * n if partition else n,
        val_fraction=0.5 if partition else 1.0, seed=data.seed,
    )
    parts = []
    for split in ["train", "val"] if partition else ["val"]:
        files = dm.dataset(split)
        labels = torch.tensor(files.labels, dtype=torch.int64)
        index = first_per_class(labels, dm.num_classes, n, f"{data.root} ({split})")
        parts.append(Subset(files, index.tolist()))
    probe = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    return probe, dm.num_classes, dm.class_names, str(Path(data.root).expanduser())


def _weights_classes(arch: str, weights: str, default: int) -> int:
    """Class count of a weights file/enum (its classification head), else ``default``."""
    state, _ = read_weights(arch, weights)
    with torch.device("meta"):  # names only: no memory or compute for the weights
        head = classification_layer(build_network(arch, num_classes=2))
    key = f"{head}.weight"
    value = state.get(key) if hasattr(state, "get") else None
    return int(value.shape[0]) if isinstance(value, torch.Tensor) else default


def build_model(cfg: Namespace, data_classes: int) -> tuple[ImageClassifier, str, str | None]:
    """(model, architecture, weights description or None for random initialisation)."""
    if cfg.checkpoint is not None:
        path = Path(cfg.checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        try:
            model = ImageClassifier.load_from_checkpoint(path, map_location="cpu")
        except (KeyError, TypeError, RuntimeError, EOFError, AttributeError) as error:
            raise ValueError(
                f"{path} is not a Lightning checkpoint of an ImageClassifier ({error}); pass a "
                f"train.py checkpoint, or a torchvision state dict with --weights"
            ) from error
        arch = model.hparams.arch
        if cfg.arch is not None and cfg.arch != arch:
            raise ValueError(
                f"checkpoint {path} holds a {arch}, not a {cfg.arch}: it is a checkpoint of "
                f"another architecture; drop --arch or pass a {cfg.arch} checkpoint"
            )
        return model, arch, f"checkpoint {path}"
    arch = cfg.arch or "resnet18"
    classes = max(2, data_classes)
    if cfg.weights is not None:
        classes = _weights_classes(arch, cfg.weights, classes)
    else:
        print(f"analyze.py: no --checkpoint or --weights: analysing a randomly initialised "
              f"{arch}", file=sys.stderr)
    model = ImageClassifier(arch, num_classes=classes, weights=cfg.weights,
                            small_input=cfg.small_input, image_size=cfg.data.image_size)
    return model, arch, model.weights_source


def build_problem(cfg: Namespace, n_classes: int) -> AugmentationProblem:
    pc, ipc = cfg.problem, cfg.data.images_per_class
    if pc.preset is not None:
        if pc.preset != "paper":
            raise ValueError(f"unknown problem preset {pc.preset!r}; valid: paper")
        return AugmentationProblem.paper(
            pc.augmentations, method="shapley" if cfg.method == "shapley" else "sobol",
            auxiliaries=pc.auxiliaries, n_classes=n_classes, images_per_class=ipc,
        )
    return AugmentationProblem(
        pc.augmentations, p_on=pc.p_on, auxiliaries=pc.auxiliaries, n_classes=n_classes,
        images_per_class=ipc, postprocess=pc.postprocess, bounds=pc.bounds,
    )


def engine_config(cfg: Namespace) -> EngineConfig:
    return EngineConfig(
        method=cfg.method, n=cfg.n, seed=cfg.seed, second_order=cfg.second_order,
        shapley_method=cfg.shapley_method, n_outer=cfg.n_outer, n_inner=cfg.n_inner,
        contrast_k=cfg.contrast_k, layers=cfg.layers, reduction=cfg.reduction,
        batch_rows=cfg.batch_rows, checkpoint_every=cfg.checkpoint_every,
        precision=str(cfg.precision), num_workers=cfg.num_workers, progress=cfg.progress,
    )


def prepare(cfg: Namespace, config_text: str) -> tuple[AnalysisModule, nn.Module]:
    """Build and check everything; raises ValueError/FileNotFoundError before any output."""
    if cfg.store_activations and cfg.checkpoint_every:
        raise ValueError(
            "--store-activations cannot be combined with --checkpoint-every: the raw rows of a "
            "killed run are not resumable; drop one of them"
        )
    name = check_name("analysis", cfg.name or cfg.method)
    output = None if cfg.output is None else Path(cfg.output).expanduser()
    if output is not None and not cfg.overwrite:
        store = ResultsStore(output / RESULTS_FILE)
        if store.path.exists() and store.has_analysis(name):
            raise ValueError(
                f"{store.path} already holds an analysis {name!r}; pass --overwrite, another "
                f"--name or another --output"
            )
    config = engine_config(cfg)
    partition = "partition" in cfg.problem.auxiliaries
    probe, n_classes, class_names, dataset = build_probe(cfg, partition)
    # Every process (and every resumed run) must build the same random initialisation.
    torch.manual_seed(cfg.seed)
    model, arch, weights = build_model(cfg, n_classes)
    problem = build_problem(cfg, n_classes)
    check_inputs(model, problem, probe, config)
    design = build_design(problem, config)
    image = probe[0][0] if isinstance(probe, Dataset) else probe[0]
    attrs: dict[str, Any] = {
        "design": type(design).__name__, "block_size": design.block_size, "seed": cfg.seed,
        "reduction": config.reduction, "precision": config.precision,
        "conf_level": config.conf_level,
    }
    if config.method == "sobol":
        attrs["second_order"] = config.second_order
    if config.method == "shapley":
        attrs["shapley_method"] = config.shapley_method
        if config.shapley_method == "permutation":
            attrs.update(n_outer=config.n_outer, n_inner=config.n_inner)
    if config.method == "contrast":
        attrs["contrast_k"] = config.contrast_k
    outputs = AnalysisOutputs(
        name=name,
        output=output,
        runs_dir=Path(cfg.runs_dir),
        overwrite=cfg.overwrite,
        store_activations=cfg.store_activations,
        metadata={
            "model": arch, "weights": weights, "dataset": dataset,
            "image_size": (int(image.shape[-2]), int(image.shape[-1])), "seed": cfg.seed,
            "config": config_text, "attrs": {"class_names": class_names},
        },
        analysis_attrs=attrs,
        config_text=config_text,
    )
    return AnalysisModule(model, problem, probe, config, outputs), model


def print_outputs(written: dict[str, Any], name: str) -> None:
    lines = [
        f"run directory   {written['run_dir']}",
        f"results file    {written['results']}  (analysis {name!r}: {written['evaluations']} "
        f"rows in {written['seconds']:.1f} s)",
    ]
    lines += [f"heatmap         {path}" for path in written["figures"]]
    if written["activations"]:
        lines.append(f"activations     {written['activations']}")
    summary = written["summary"]
    if summary:
        key = next(iter(summary))
        lines.append(f"largest mean {key} per layer:")
        for layer, values in summary[key].items():
            top = max(values, key=lambda g: values[g])
            lines.append(f"  {layer:<14} {top} {values[top]:.3f}")
    print("\n".join(["", "Outputs:", *(f"  {line}" for line in lines)]), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default: the command line); returns the exit status.

    Several processes (devices > 1) need the command line: Lightning relaunches this script
    with ``sys.argv`` for the other ranks.
    """
    args = normalise_args(sys.argv[1:] if argv is None else argv)
    method = requested_method(args)
    if method in PLANNED:
        print(f"analyze.py {method}: not yet implemented (implemented: {', '.join(METHODS)})",
              file=sys.stderr)
        return 2
    parser = build_parser()
    try:
        cfg = parser.parse_args(args)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if cfg.method in PLANNED:
        print(f"analyze.py {cfg.method}: not yet implemented", file=sys.stderr)
        return 2
    if cfg.method not in METHODS:
        print(f"analyze.py: error: unknown method {cfg.method!r}; valid: {list(METHODS)}",
              file=sys.stderr)
        return 2
    config_text = parser.dump(cfg)
    try:
        module, _ = prepare(cfg, config_text)
        trainer = pl.Trainer(
            accelerator=cfg.accelerator, devices=cfg.devices, strategy=cfg.strategy,
            num_nodes=cfg.num_nodes, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
            use_distributed_sampler=False, inference_mode=True,
        )
        with warnings.catch_warnings():
            # Lightning's own notices, irrelevant here: the predict loader has one item per
            # process on purpose, and pytree's deprecation is internal to Lightning.
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
            predictions = trainer.predict(module, dataloaders=one_step_loader())
    except INPUT_ERRORS as error:
        print(f"analyze.py: error: {error}", file=sys.stderr)
        return 2
    if trainer.is_global_zero and predictions:
        print_outputs(predictions[0], module.outputs.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
