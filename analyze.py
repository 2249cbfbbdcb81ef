"""Analyse a network's activations: ``python analyze.py sobol|shapley|variance|contrast [options]``.

Statistics of a stored analysis: ``python analyze.py contrast-stats|correlation|lda|report
--results RUN/results.h5 --analysis NAME`` (Wilcoxon tests, Spearman correlations, LDA, the HTML
report; written into the same results file / RUN/report).

Guided masking and the single-class analysis of a stored analysis: ``python analyze.py
masking|single-class --results RUN/results.h5 --analysis NAME`` with the model and data options
of the analysis (they run the network; results go into the same file).

Per layer and unit, how much of each activation's variance each augmentation (and the order,
class and image variables) explains: Sobol indices, Shapley effects, per-unit moments, or paired
treatment-control contrasts (METHOD.md). ``python analyze.py sobol`` alone runs the embedded
demo (configs/analyze/demo.yaml: planted-factor images, 64 px, ResNet18); presets for the
published ImageNet settings are in configs/analyze/ (``--config imagenet_alexnet_sobol``).
``python analyze.py --help`` lists every option; docs/CLI.md explains them.

Outputs go to the run directory (``--output``, default ``runs/analysis/<name>/version_<n>``):
results.h5 (docs/RESULTS_FORMAT.md), figures/<name>_<key>.png heatmaps, config.yaml and, with
``--store-activations``, activations_<name>.h5 (every design row once, linked from results.h5).
Every command but report also logs to Weights & Biases (docs/CLI.md "W&B"): an offline run in
<run directory>/wandb/ for ``wandb sync`` by default, online with WANDB_MODE=online or
``--wandb_project NAME``, none with ``--wandb false`` or WANDB_MODE=disabled.

Several processes (``--devices 2 --strategy ddp``, torchrun, SLURM) are launched by Lightning's
Trainer; each analyses its shard of the design and rank zero writes. Bad input (unknown layer,
Sobol n not a power of two, a checkpoint of another architecture, an empty image folder...) is
reported on stderr with exit status 2 before any output is created; exit status 1 means the
results were written but W&B logging failed.
"""

from __future__ import annotations

import inspect
import json
import math
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import yaml
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, Namespace
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset

from callbacks.masking import masking_record
from callbacks.wandb_logging import (
    PREFIX,
    analysis_run,
    contrast_stats_record,
    correlation_record,
    define_metrics,
    lda_record,
    log_results_artifact,
    run_lines,
    single_class_record,
    summary_record,
    wandb_mode,
)
from data import ImageFolderDataModule, PlantedFactorDataModule
from data.common import SPLITS, first_per_class
from lightning_modules import ImageClassifier
from lightning_modules.analysis import (
    RESULTS_FILE,
    AnalysisModule,
    AnalysisOutputs,
    one_step_loader,
)
from lightning_modules.architectures import build_network
from lightning_modules.weights import (
    file_sha256,
    load_tensors,
    read_weights,
    state_dict_sha256,
    weights_file,
)
from sensitivity import html_report, masking, report, single_class, stats
from sensitivity.augmentations import AUGMENTATIONS
from sensitivity.capture import classification_layer
from sensitivity.config import METHODS, EngineConfig, analysis_attrs
from sensitivity.plan import check_inputs
from sensitivity.problem import AugmentationProblem
from sensitivity.provenance import provenance
from sensitivity.store import ResultsStore, check_name

ROOT = Path(__file__).resolve().parent
PRESETS = ROOT / "configs" / "analyze"
DEMO_CONFIG = PRESETS / "demo.yaml"
MASKING_METHODS = ("masking", "single-class")
INPUT_ERRORS = (ValueError, FileNotFoundError, MisconfigurationException)
# Strategies that start the other processes from this one (spawn or fork): Lightning returns no
# predictions from them, so rank zero's results would be written but never reported.
SPAWNING_STRATEGIES = ("ddp_spawn", "ddp_fork", "ddp_notebook")
# Datamodules a checkpoint's recorded init arguments can rebuild (--data.checkpoint_split).
DATAMODULES = (PlantedFactorDataModule, ImageFolderDataModule)


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
            "analyze.py masking|single-class --results RUN/results.h5 --analysis NAME; "
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
    _add(p, "data.checkpoint_split", type=str | None, default=None,
         help="val | train: the probe the training callback used, probe_set(images_per_class, "
              "split) of the datamodule recorded in --checkpoint (the other data options are "
              "not used); default: the probe of the data options")
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
    _add(p, "sampling", type=str, default="rqmc",
         help="Sobol base points: rqmc (replicated scrambled Sobol', t intervals over the "
              "replicates) | mc (i.i.d. points, delta-method intervals)")
    _add(p, "replicates", type=int, default=16,
         help="rqmc replicates (a power of two; at most n are used)")
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
    # int | str: "16" and "32" parse as ints (also unquoted in YAML); EngineConfig rejects
    # anything but 32 | bf16 | 16 before any output, naming the valid values.
    _add(p, "precision", type=int | str, default="32",
         help="32 | bf16 | 16: float32, or bfloat16 / float16 autocast on the forward only "
              "(faster on GPUs and bf16-capable CPUs; bf16 shifts indices by about 1e-3)")
    _add(p, "deduplicate", action=ActionYesNo, default=False,
         help="forward each distinct augmented image of a batch once: fewer forwards (Sobol at "
              "p_on 0.5: 22-24 percent fewer), results bit-identical (on CPU)")
    _add(p, "channels_last", action=ActionYesNo, default=False,
         help="channels-last forward: faster convolutions on CPU; indices change by float "
              "round-off (about 1e-7)")
    _add(p, "compile", action=ActionYesNo, default=False,
         help="torch.compile the forward: compile time paid by every run, and the capture hooks "
              "break the graph at every layer, so it rarely helps")
    _add(p, "num_workers", type=int, default=0, help="DataLoader workers decoding rows/images")
    _add(p, "progress", action=ActionYesNo, default=True, help="progress bar on rank zero")
    _add(p, "store_activations", action=ActionYesNo, default=False,
         help="also store every raw activation row (large!)")
    # processes
    _add(p, "accelerator", type=str, default="auto", help="Lightning accelerator: auto|cpu|gpu")
    _add(p, "devices", type=int | str, default=1, help="processes per node (auto: all devices)")
    _add(p, "strategy", type=str, default="auto",
         help="Lightning strategy: auto|ddp (torchrun and SLURM: ddp); spawning ones are refused")
    _add(p, "num_nodes", type=int, default=1, help="nodes (under SLURM/torchrun)")
    _add_masking_options(p)
    _add_wandb_options(p)
    return p


def _add_wandb_options(p: ArgumentParser) -> None:
    """W&B options (docs/CLI.md "W&B"); the mode comes from ``wandb_mode``."""
    _add(p, "wandb", type=bool, default=True,
         help="log to Weights & Biases (offline run in <run dir>/wandb unless online; false: off)")
    _add(p, "wandb_project", type=str | None, default=None,
         help="W&B project; setting it logs online unless WANDB_MODE says otherwise "
              "(default project: augsens)")


def _add_masking_options(p: ArgumentParser) -> None:
    """Options of masking and single-class (they read maps from a stored analysis)."""
    _add(p, "results", type=str | None, default=None,
         help="masking, single-class: the results file holding the analysis (results.h5)")
    _add(p, "analysis", type=str | None, default=None,
         help="masking, single-class: analysis name in --results (default: its only one)")
    _add(p, "masking.value", type=str | None, default=None,
         help="map value: S1 | ST | shapley_normalized (default: ST, else shapley_normalized)")
    _add(p, "masking.layers", type=list[str] | None, default=None,
         help="masked layers (default: the analysed layers whose output is (C, H, W))")
    _add(p, "masking.variables", type=list[str] | None, default=None,
         help="mask variables (default: every variable of the analysis)")
    _add(p, "masking.augmentations", type=list[str] | None, default=None,
         help="input augmentations, each alone (default: the analysis's augmentations)")
    _add(p, "masking.k", type=int, default=4, help="parameter draws per image and augmentation")
    _add(p, "masking.ties", type=str, default="strict",
         help="strict: a quantile at the layer's minimum masks only larger values; inclusive")
    _add(p, "masking.batch_images", type=int, default=16, help="probe images per batch")
    _add(p, "masking.reuse_prefix", type=bool, default=True,
         help="compute the network up to the first masked layer once per batch")
    _add(p, "single_class.n", type=int, default=5,
         help="candidate classes (and top-n predictions) per variable")
    _add(p, "single_class.trials", type=int, default=100_000,
         help="simulated experiments of the chance threshold")


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
    if data.checkpoint_split is not None:
        return _checkpoint_probe(cfg, partition)
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


def checkpoint_datamodule(path: Path) -> PlantedFactorDataModule | ImageFolderDataModule:
    """The datamodule of the fit that saved checkpoint ``path``, rebuilt from the init arguments
    Lightning records in it ("datamodule_hyper_parameters")."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    checkpoint = load_tensors(path, "checkpoint")
    recorded = checkpoint.get("datamodule_hyper_parameters") if isinstance(checkpoint, dict) else {}
    if not recorded:
        raise ValueError(
            f"checkpoint {path} records no datamodule (it was not saved by a fit with one, as "
            f"train.py's are); describe the probe with the --data options instead of "
            f"--data.checkpoint_split"
        )
    # LightningCLI adds private keys (_class_path, _instantiator); the rest are init arguments.
    arguments = {key: value for key, value in recorded.items() if not key.startswith("_")}
    for datamodule in DATAMODULES:
        if set(arguments) <= set(inspect.signature(datamodule).parameters):
            return datamodule(**arguments)
    raise ValueError(
        f"checkpoint {path} records a datamodule analyze.py cannot rebuild "
        f"({recorded.get('_class_path', sorted(arguments))}); it knows "
        f"{[d.__name__ for d in DATAMODULES]}: describe the probe with the --data options"
    )


def _checkpoint_probe(cfg: Namespace, partition: bool) -> tuple[torch.Tensor, int, list[str], str]:
    """``build_probe`` for --data.checkpoint_split: exactly the SensitivityCallback's probe,
    ``probe_set(images_per_class, split)`` of the training datamodule (train then val with a
    partition auxiliary)."""
    split = cfg.data.checkpoint_split
    if split not in SPLITS:
        raise ValueError(f"--data.checkpoint_split must be one of {list(SPLITS)}, got {split!r}")
    if cfg.checkpoint is None:
        raise ValueError("--data.checkpoint_split takes the probe from the training data recorded "
                         "in a checkpoint: pass --checkpoint too")
    dm = checkpoint_datamodule(Path(cfg.checkpoint).expanduser())
    splits = SPLITS if partition else (split,)
    probe = torch.cat([dm.probe_set(cfg.data.images_per_class, s)[0] for s in splits])
    dataset = (f"planted:{dm.factor}" if isinstance(dm, PlantedFactorDataModule)
               else str(dm.root))
    return probe, dm.num_classes, dm.class_names, dataset


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
                f"checkpoint {path} holds architecture {arch}, not {cfg.arch}: drop --arch or "
                f"pass a checkpoint of {cfg.arch}"
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


def weights_sha256(cfg: Namespace, arch: str, model: nn.Module) -> str:
    """SHA-256 of the analysed weights: of the --checkpoint or --weights file, else (random
    initialisation) of the model's state dict."""
    if cfg.checkpoint is not None:
        return file_sha256(Path(cfg.checkpoint).expanduser())
    if cfg.weights is not None:
        return file_sha256(weights_file(arch, cfg.weights)[0])
    return state_dict_sha256(model)


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
        method=cfg.method, n=cfg.n, seed=cfg.seed, sampling=cfg.sampling,
        replicates=cfg.replicates, second_order=cfg.second_order,
        shapley_method=cfg.shapley_method, n_outer=cfg.n_outer, n_inner=cfg.n_inner,
        contrast_k=cfg.contrast_k, layers=cfg.layers, reduction=cfg.reduction,
        batch_rows=cfg.batch_rows, checkpoint_every=cfg.checkpoint_every,
        precision=str(cfg.precision), num_workers=cfg.num_workers, progress=cfg.progress,
        deduplicate=cfg.deduplicate, channels_last=cfg.channels_last, compile=cfg.compile,
    )


def prepare(cfg: Namespace, config_text: str) -> tuple[AnalysisModule, nn.Module]:
    """Build and check everything; raises ValueError/FileNotFoundError before any output."""
    if cfg.strategy.startswith(SPAWNING_STRATEGIES):
        raise ValueError(
            f"--strategy {cfg.strategy} is not supported: it starts the processes from this one "
            f"and Lightning returns no results from them, so nothing would be reported (no "
            f"summary, no W&B run); use --strategy ddp (or torchrun)"
        )
    if cfg.store_activations and cfg.checkpoint_every:
        raise ValueError(
            "--store-activations cannot be combined with --checkpoint-every: the raw rows of a "
            "killed run are not resumable; drop one of them"
        )
    name = check_name("analysis", cfg.name or cfg.method)
    output = None if cfg.output is None else Path(cfg.output).expanduser()
    if output is not None:
        check_output_dir(output)
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
    image = probe[0][0] if isinstance(probe, Dataset) else probe[0]
    record = provenance(
        model=arch, weights=weights, weights_sha256=weights_sha256(cfg, arch, model),
        dataset=dataset, image_size=(int(image.shape[-2]), int(image.shape[-1])), problem=problem,
    )
    if output is not None:
        check_provenance(ResultsStore(output / RESULTS_FILE), record)
    check_inputs(model, problem, probe, config)
    outputs = AnalysisOutputs(
        name=name,
        output=output,
        runs_dir=Path(cfg.runs_dir),
        overwrite=cfg.overwrite,
        store_activations=cfg.store_activations,
        metadata={
            "model": arch, "weights": weights, "weights_sha256": record["weights_sha256"],
            "dataset": dataset, "image_size": record["image_size"], "seed": cfg.seed,
            "config": config_text, "attrs": {"class_names": class_names},
        },
        # Each analysis describes itself: provenance and its own configuration.
        analysis_attrs={**analysis_attrs(config, problem), **record, "config": config_text},
        config_text=config_text,
    )
    return AnalysisModule(model, problem, probe, config, outputs), model


def check_output_dir(output: Path) -> None:
    """ValueError when --output, or a folder above it, is an existing file."""
    for path in (output, *output.parents):
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"--output {output}: {path} is a file, not a directory; pass a "
                                 f"run directory (results go to <directory>/{RESULTS_FILE})")
            return


def check_provenance(store: ResultsStore, record: Mapping[str, Any]) -> None:
    """ValueError when ``store`` holds analyses of another model, weights, dataset, image size
    or problem than ``record`` (``provenance()``): its root metadata and /problem describe every
    analysis in it."""
    differences = store.provenance_differences(record)
    if not differences:
        return
    hint = ""
    if record["weights"] == "none" and "weights_sha256" in differences:
        hint = " (a random initialisation is set by --seed)"
    raise ValueError(
        f"{store.path} holds analyses of another model, data or problem: {differences}{hint}. "
        f"A results file describes one model, dataset, image size and problem: pass another "
        f"--output (or none, for a new run directory)"
    )


def print_outputs(written: dict[str, Any], name: str, wandb_lines: Sequence[str] = ()) -> None:
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
        lines.append(f"largest median {key} per layer (over its valid units):")
        for layer, values in summary[key].items():
            ranked = [g for g in values if math.isfinite(values[g]["median"])]
            if not ranked:
                lines.append(f"  {layer:<14} no valid unit (see the flag arrays)")
                continue
            top = max(ranked, key=lambda g: values[g]["median"])
            stats = values[top]
            lines.append(
                f"  {layer:<14} {top} {stats['median']:.3f} [p10 {stats['p10']:.3f}, p90 "
                f"{stats['p90']:.3f}], {stats['valid_fraction']:.0%} of units valid"
            )
    lines += wandb_lines
    print("\n".join(["", "Outputs:", *(f"  {line}" for line in lines)]), flush=True)


# ------------------------------------------------------------------------------------ W&B
Record = Callable[[], dict[str, Any]]


def log_wandb(
    cfg: Namespace,
    mode: str | None,
    results: Path,
    name: str,
    config_text: str,
    record: Record,
    prefix: str | None = None,
) -> tuple[list[str], int]:
    """Log ``record()`` to a W&B run in ``<results dir>/wandb`` (call on rank zero; mode from
    ``wandb_mode``, None: nothing) and, online, the results file as an artifact.

    prefix: keys charted against ``analysis/epoch``. Returns (lines for "Outputs:", exit
    status): 1 when W&B failed (e.g. online without credentials); the results stay written.
    """
    if mode is None:
        return [], 0
    from wandb.errors import Error as WandbError

    try:
        with analysis_run(results.parent, mode, name=name, job_type=cfg.method,
                          config=yaml.safe_load(config_text) or {},
                          project=cfg.wandb_project) as run:
            if prefix is not None:
                define_metrics(run, prefix)
            run.log(record())
            log_results_artifact(run, results)
            lines = run_lines(run)
    except (WandbError, OSError) as error:
        print(f"analyze.py {cfg.method}: error: W&B logging failed ({error}); the results are "
              f"written, W&B is not: fix the W&B setup, or pass --wandb false", file=sys.stderr)
        return ["W&B             failed (see stderr)"], 1
    return lines, 0


# ------------------------------------------------------------- statistics on a results file
STATISTICS = ("contrast-stats", "correlation", "lda", "report")


def build_statistics_parser(method: str) -> ArgumentParser:
    """Parser of a method that reads an analysis from a results file (docs/CLI.md)."""
    p = ArgumentParser(
        prog=f"analyze.py {method}",
        description=(
            "analyze.py report --results RUN/results.h5 [--analysis NAME]: a self-contained "
            "HTML page of the file's analyses (<run directory>/report/index.html and its PNGs)."
            if method == "report"
            else f"analyze.py {method} --results RUN/results.h5 --analysis NAME: statistics of "
            "a stored analysis, written into the same file."
        ),
    )
    p.add_argument("--method", type=str, default=method, help="the method (given first)")
    _add(p, "results", type=str, required=True, help="results file of a run (results.h5)")
    _add(p, "analysis", type=str | None, default=None,
         help="analysis name in the results file" + (" (default: all)" if method == "report"
                                                     else " (required)"))
    if method == "report":
        _add(p, "output", type=str | None, default=None,
             help="report directory (default: <run directory>/report)")
        return p
    _add(p, "overwrite", action=ActionYesNo, default=False,
         help="replace statistics of the same analysis already in the file")
    _add(p, "progress", action=ActionYesNo, default=True,
         help="the work up front, then a progress bar (terminal) or lines (logs) on stderr")
    _add_wandb_options(p)
    if method == "contrast-stats":
        _add(p, "alpha", type=float, default=0.05,
             help="false discovery rate of the Benjamini-Yekutieli correction")
    else:
        _add(p, "value_types", type=list[str] | None, default=None,
             help="value types, e.g. '[S1, ST]' (default: those of S1, ST, "
                  "shapley_normalized the analysis has)")
    if method == "lda":
        _add(p, "folds", type=int, default=5, help="cross-validation folds")
        _add(p, "repeats", type=int, default=3, help="cross-validation repeats")
        _add(p, "seed", type=int, default=0, help="seed of the fold assignment")
    return p


def _statistics(method: str, cfg: Namespace) -> tuple[list[str], Record | None]:
    """Run one statistics method; returns the lines to print and its W&B record (None: the
    report, which is not logged)."""
    if method == "report":
        names = None if cfg.analysis is None else [cfg.analysis]
        index = html_report.write_report(cfg.results, cfg.output, names)
        return [f"report          {index}  (PNGs next to it)"], None
    if cfg.analysis is None:
        raise ValueError(f"analyze.py {method} needs --analysis NAME (an analysis in "
                         f"{cfg.results})")
    where = f"results file    {Path(cfg.results)}"
    if method == "contrast-stats":
        out = stats.contrast_statistics(cfg.results, cfg.analysis, alpha=cfg.alpha,
                                        overwrite=cfg.overwrite, progress=cfg.progress)
        lines = [f"{where}  ({out['group']}: {out['n_pairs']} image pairs)",
                 f"units with BY q < {cfg.alpha} per layer:"]
        lines += [f"  {layer:<14} " + ", ".join(f"{a} {c}" for a, c in counts.items())
                  for layer, counts in out["significant"].items()]
        return lines, lambda: contrast_stats_record(out, cfg.alpha)
    if method == "correlation":
        out = stats.correlation_statistics(cfg.results, cfg.analysis, values=cfg.value_types,
                                           overwrite=cfg.overwrite, progress=cfg.progress)
        lines = [f"{where}  ({out['group']}: {', '.join(out['values'])} x "
                 f"{len(out['layers'])} layers)"]
        return lines, lambda: correlation_record(
            *stats.read_tree(cfg.results, stats.CORRELATION_GROUP, cfg.analysis)
        )
    out = stats.lda_statistics(cfg.results, cfg.analysis, values=cfg.value_types,
                               n_folds=cfg.folds, n_repeats=cfg.repeats, seed=cfg.seed,
                               overwrite=cfg.overwrite, progress=cfg.progress)
    lines = [f"{where}  ({out['group']})", f"LDA accuracy (chance {out['chance']:.3f}):"]
    for layer, values in out["accuracy"].items():
        lines += [f"  {layer:<14} {key} {mean:.3f} +- {sd:.3f}"
                  for key, (mean, sd) in values.items()]
    if out["skipped"]:
        lines.append(f"skipped (no spatial maps): {', '.join(out['skipped'])}")
    return lines, lambda: lda_record(out)


def run_statistics(method: str, args: Sequence[str]) -> int:
    """``analyze.py contrast-stats|correlation|lda|report``: exit status 0, 2 for bad input
    (missing file or analysis, wrong method...) with nothing written, 1 when W&B failed."""
    parser = build_statistics_parser(method)
    try:
        cfg = parser.parse_args(list(args))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        mode = None if method == "report" else wandb_mode(cfg.wandb, cfg.wandb_project)
        lines, record = _statistics(method, cfg)
    except (ValueError, OSError) as error:
        print(f"analyze.py {method}: error: {error}", file=sys.stderr)
        return 2
    status = 0
    if record is not None:
        results = Path(cfg.results).expanduser()
        wandb_lines, status = log_wandb(cfg, mode, results, f"{method} {cfg.analysis}",
                                        parser.dump(cfg), record)
        lines += wandb_lines
    print("\n".join(["", "Outputs:", *(f"  {line}" for line in lines)]), flush=True)
    return status


# ------------------------------------------------ masking and single-class (METHOD.md 8-9)
def _masking_device(accelerator: str) -> torch.device:
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"--accelerator {accelerator} but no CUDA device is available")
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    if accelerator not in ("auto", "cpu"):
        raise ValueError(f"masking runs on one device: --accelerator auto|cpu|gpu, not "
                         f"{accelerator!r}")
    return torch.device("cpu")


def _masking_inputs(cfg: Namespace) -> dict[str, Any]:
    """Everything masking and single-class need, checked before anything is written: the
    stored analysis and its maps, the model, the probe. ValueError/FileNotFoundError."""
    method = cfg.method
    if cfg.results is None:
        raise ValueError(f"{method} reads sensitivity maps from a stored analysis: pass "
                         f"--results RUN/results.h5 --analysis NAME")
    store = ResultsStore(Path(cfg.results).expanduser())
    if not store.path.is_file():
        raise FileNotFoundError(f"no results file at {store.path}")
    name = cfg.analysis
    if name is None:
        available = store.analyses()
        if len(available) != 1:
            raise ValueError(f"{store.path} holds the analyses {available}; choose one with "
                             f"--analysis NAME")
        name = available[0]
    result = store.read_analysis(name)
    meta = store.read_metadata()
    output = check_name("output", cfg.name or name)
    group = f"{'masking' if method == 'masking' else 'single_class'}/{output}"
    if store.has_group(group) and not cfg.overwrite:
        raise ValueError(f"{store.path} already holds /{group}; pass --overwrite or --name")
    probe, n_classes, class_names, _ = build_probe(cfg, partition=False)
    image = probe[0][0] if isinstance(probe, Dataset) else probe[0]
    size = (int(image.shape[-2]), int(image.shape[-1]))
    stored = tuple(meta.get("image_size", size))
    if stored != size:
        raise ValueError(f"analysis {name!r} was computed on {stored[0]}x{stored[1]} images but "
                         f"the probe images are {size[0]}x{size[1]}; pass --data.image_size "
                         f"{stored[0]} (and the data the analysis used)")
    torch.manual_seed(cfg.seed)
    model, _, _ = build_model(cfg, n_classes)
    model.to(_masking_device(cfg.accelerator))
    problem = None
    if "problem" in meta:
        problem = AugmentationProblem.from_config(json.loads(meta["problem"]["config"]))
    options = cfg.masking
    value = options.value or masking.default_value(result)
    shapes = masking.layer_output_shapes(model, result.layer_names, size)
    layers = options.layers or masking.convolutional_layers(shapes)
    if not layers:
        raise ValueError(f"analysis {name!r} has no layer with (C, H, W) outputs to mask; "
                         f"name layers with --masking.layers")
    augmentations = options.augmentations
    if augmentations is None:
        augmentations = [v for v in result.group_names if v in AUGMENTATIONS]
    maps, valid = masking.sensitivity_maps(result, value, layers)
    return {
        "store": store, "name": name, "output": output, "result": result, "model": model,
        "probe": probe, "class_names": class_names, "problem": problem, "value": value,
        "maps": maps, "valid": valid,
        "labels": torch.arange(n_classes).repeat_interleave(cfg.data.images_per_class),
        "augmentations": augmentations,
    }


def _run_masking(cfg: Namespace, inputs: dict[str, Any]) -> tuple[list[str], Record]:
    options, result = cfg.masking, inputs["result"]
    out = masking.evaluate_masking(
        inputs["model"], inputs["maps"], result.group_names, inputs["probe"], inputs["labels"],
        inputs["augmentations"], value=inputs["value"], analysis=inputs["name"],
        mask_variables=options.variables, k=options.k, seed=cfg.seed,
        problem=inputs["problem"], ties=options.ties, batch_images=options.batch_images,
        reuse_prefix=options.reuse_prefix, valid=inputs["valid"], progress=cfg.progress,
    )
    store = inputs["store"]
    group = store.write_result(masking.GROUP_KIND, inputs["output"], out,
                               overwrite=cfg.overwrite)
    figure = report.save_specificity(out, store.path.parent / "figures", inputs["output"])
    lines = [
        f"results file    {store.path}  (/{group}: {len(out.variables)} mask variables x "
        f"{len(out.configurations)} configurations, {out.n_images} images x {out.k} draws, "
        f"{out.value} maps of {', '.join(out.layers)})",
        f"heatmap         {figure}",
        f"prefix reuse    {out.prefix_reuse}",
        f"ties            {out.tied_layers} (variable, q, layer) quantiles at the layer minimum "
        f"(rule {out.ties}); fully masked layers: {out.fully_masked_layers}",
        "unmasked top-1  " + ", ".join(
            f"{n} {a:.3f}" for n, a in zip(out.inputs, out.unmasked_acc1, strict=True)),
    ]
    if len(out.inputs) > 1:
        lines.append("specificity (Spearman of top-1 profiles vs original; rows: input):")
        lines.append(" " * 16 + " ".join(f"{v[:8]:>8}" for v in out.variables))
        for name, row in zip(out.inputs[1:], out.specificity, strict=True):
            lines.append(f"  {name:<14}" + " ".join(f"{x:8.2f}" for x in row))
    return lines, lambda: masking_record(out, figure)


def _run_single_class(cfg: Namespace, inputs: dict[str, Any]) -> tuple[list[str], Record]:
    result, model = inputs["result"], inputs["model"]
    head = classification_layer(model.net)
    if head not in result.layers:
        raise ValueError(f"analysis {inputs['name']!r} has no maps of the classification layer "
                         f"{head!r} (layers: {result.layer_names}); analyse it too")
    head_maps, head_valid = masking.sensitivity_maps(result, inputs["value"], [head])
    out = single_class.evaluate_single_class(
        model, inputs["maps"], result.group_names, head_maps[head], inputs["probe"],
        inputs["labels"], n=cfg.single_class.n, augmentations=cfg.masking.variables,
        class_names=inputs["class_names"], k=cfg.masking.k, seed=cfg.seed,
        problem=inputs["problem"], ties=cfg.masking.ties, trials=cfg.single_class.trials,
        batch_images=cfg.masking.batch_images, reuse_prefix=cfg.masking.reuse_prefix,
        value=inputs["value"], analysis=inputs["name"], layer=head, valid=inputs["valid"],
        head_valid=head_valid[head], progress=cfg.progress,
    )
    store = inputs["store"]
    group = store.write_result(single_class.GROUP_KIND, inputs["output"], out,
                               overwrite=cfg.overwrite)
    t = out.threshold
    lines = [
        f"results file    {store.path}  (/{group}: {len(out.variables)} variables x "
        f"{len(out.configurations)} configurations, {out.n_images} images x {out.k} draws)",
        f"chance level    mean J {t.mean:.5f}, threshold {t.threshold:.5f} (Q3 + 1.5 IQR; C = "
        f"{t.n_classes}, s = {t.samples_per_class}, n = {t.n})",
        "self-masking    variable: max mean J [configuration] -> candidates",
    ]
    for entry in out.matches():
        status = (f"matched in {len(entry['matched_configurations'])} configurations"
                  if entry["matched_configurations"] else "not matched")
        lines.append(f"  {entry['variable']:<14} {entry['max_jaccard']:.4f} "
                     f"[{entry['configuration']}] {status}: {', '.join(entry['candidates'])}")
    return lines, lambda: single_class_record(out)


def run_masking(cfg: Namespace, config_text: str) -> int:
    """``analyze.py masking|single-class``: exit status 0, 2 for bad input (no results file
    or analysis, maps that do not fit the model...) with nothing written, 1 when W&B failed."""
    try:
        mode = wandb_mode(cfg.wandb, cfg.wandb_project)
        inputs = _masking_inputs(cfg)
        run = _run_masking if cfg.method == "masking" else _run_single_class
        lines, record = run(cfg, inputs)
    except INPUT_ERRORS as error:
        print(f"analyze.py {cfg.method}: error: {error}", file=sys.stderr)
        return 2
    wandb_lines, status = log_wandb(
        cfg, mode, inputs["store"].path, f"{cfg.method} {inputs['output']}", config_text, record,
        prefix="masking" if cfg.method == "masking" else "single_class",
    )
    print("\n".join(["", "Outputs:", *(f"  {line}" for line in lines + wandb_lines)]),
          flush=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default: the command line); returns the exit status.

    Several processes (devices > 1) need the command line: Lightning relaunches this script
    with ``sys.argv`` for the other ranks.
    """
    args = normalise_args(sys.argv[1:] if argv is None else argv)
    method = requested_method(args)
    if method in STATISTICS:
        return run_statistics(method, args)
    parser = build_parser()
    try:
        cfg = parser.parse_args(args)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if cfg.method in MASKING_METHODS:
        return run_masking(cfg, parser.dump(cfg))
    if cfg.method not in METHODS:
        print(f"analyze.py: error: unknown method {cfg.method!r}; valid: {list(METHODS)}",
              file=sys.stderr)
        return 2
    config_text = parser.dump(cfg)
    try:
        mode = wandb_mode(cfg.wandb, cfg.wandb_project)
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
    if not (trainer.is_global_zero and predictions):
        return 0
    written, name = predictions[0], module.outputs.name
    wandb_lines, status = log_wandb(
        cfg, mode, Path(written["results"]), name, config_text,
        lambda: summary_record(written["method"], written["epoch"], written["summary"],
                               written["heatmaps"]),
        prefix=PREFIX,
    )
    print_outputs(written, name, wandb_lines)
    return status


if __name__ == "__main__":
    sys.exit(main())
