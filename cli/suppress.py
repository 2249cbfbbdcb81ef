"""``analyze.py suppress``: inference-time suppression of a nuisance variable with the maps of a
stored analysis (``sensitivity.suppression``), on one device; the result goes into the same
results file (/suppression/<name>), its figure next to it, its record to W&B.

``suppress_inputs`` checks and builds everything before any forward: the stored analysis, the
variable, the validation split, the model and the maps. The test split is only described there:
``SuppressInputs.load_test`` reads it, and ``run_suppression`` calls it after the choice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jsonargparse import Namespace
from torch import Tensor
from torch.utils.data import Dataset

from callbacks.wandb_logging import suppression_record
from cli.masking import new_result_group, open_stored_analysis, seeded_model
from cli.options import build_suppress_parser
from cli.reporting import (
    INPUT_ERRORS,
    input_error,
    log_wandb,
    print_outputs,
    record_log,
    wandb_settings,
)
from data import ImageFolderDataModule, PlantedFactorDataModule
from lightning_modules import ImageClassifier
from sensitivity import masking, suppression
from sensitivity.distortion import NuisanceDistortion
from sensitivity.store import ResultsStore, check_name
from sensitivity.suppression_figures import save_suppression_figure

Split = tuple[Tensor | Dataset, Tensor]
# Options of the planted spurious cue, passed on only when given (the data's defaults else).
CUE_OPTIONS = ("nuisance", "agreement", "eval_nuisance")


@dataclass(frozen=True)
class SuppressInputs:
    """What suppress runs on, checked.

    Attributes:
        store: the results file (and receiver of the result).
        name: the analysis; output: the group name (/suppression/<output>).
        stored: the analysis with its problem and image size.
        model: the network, on its device.
        maps: the masked layers' maps.
        val: the validation split (images, labels).
        load_test: reads the test split (called once the choice is fixed).
    """

    store: ResultsStore
    name: str
    output: str
    stored: masking.StoredAnalysis
    model: ImageClassifier
    maps: masking.MaskingMaps
    val: Split
    load_test: Callable[[], Split]


def run_suppress(args: Sequence[str]) -> int:
    """Run ``analyze.py suppress`` on its command line.

    Args:
        args: the command line after the method.

    Returns:
        The exit status: 0, 2 for bad input with nothing written, 1 when W&B failed.
    """
    parser = build_suppress_parser()
    try:
        cfg = parser.parse_args(list(args))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        mode = wandb_settings(cfg)
        inputs = suppress_inputs(cfg)
        result = suppress(cfg, inputs)
        store = inputs.store
        group = store.write_result(suppression.GROUP_KIND, inputs.output, result,
                                   overwrite=cfg.overwrite)
        figure = save_suppression_figure(result, store.path.parent / "figures", inputs.output)
    except INPUT_ERRORS as error:
        return input_error("suppress", error)
    wandb_lines, status = log_wandb(
        cfg, mode, store.path, f"suppress {inputs.output}",
        record_log(lambda: suppression_record(result, figure), "suppress"), inputs.name,
        analysis=inputs.name, name=inputs.output,
    )
    print_outputs(_lines(result, store, group, figure) + wandb_lines)
    return status


def suppress(cfg: Namespace, inputs: SuppressInputs) -> suppression.SuppressionResult:
    """The experiment of the options on checked inputs (``suppression.run_suppression``)."""
    options = cfg.suppress
    return suppression.run_suppression(
        inputs.model, inputs.maps, inputs.stored.result.group_names, cfg.variable, inputs.val,
        inputs.load_test, strengths=options.strengths, criterion=options.criterion,
        scope=options.scope, random_draws=options.random_draws, seed=cfg.seed,
        ties=options.ties, problem=inputs.stored.problem, analysis=inputs.name,
        batch_images=options.batch_images, reuse_prefix=options.reuse_prefix,
        progress=cfg.progress,
    )


def _check_options(cfg: Namespace, variables: Sequence[str]) -> None:
    """ValueError for options that would fail after the forwards (or silently mislead)."""
    options = cfg.suppress
    if cfg.variable is None:
        raise ValueError("suppress needs the nuisance: --variable NAME (an augmentation of the "
                         f"analysis: {list(variables)})")
    if cfg.variable not in variables:
        raise ValueError(f"--variable {cfg.variable!r} is not a variable of the analysis; it "
                         f"has {list(variables)}")
    NuisanceDistortion(cfg.variable)  # refuses auxiliaries (class, image, ...)
    suppression.check_strengths(options.strengths)
    suppression.criterion_scores(torch.zeros(1).numpy(), options.criterion)
    suppression.suppression_candidates(["layer"], masking.default_configurations(),
                                       options.scope)
    if options.ties not in masking.TIES:
        raise ValueError(f"--suppress.ties must be one of {list(masking.TIES)}")
    for key in ("random_draws", "batch_images"):
        if options[key] < (0 if key == "random_draws" else 1):
            raise ValueError(f"--suppress.{key} is too small: {options[key]}")


def suppress_inputs(cfg: Namespace) -> SuppressInputs:
    """Everything suppress needs, checked before any forward and before anything is written.

    Args:
        cfg: the parsed options.

    Returns:
        The inputs (the test split not yet read).

    Raises:
        ValueError, FileNotFoundError: no results file or analysis, a bad variable or option,
            an existing group without --overwrite, data without a test split or of another
            image size, maps that do not fit the model.
    """
    store, name, stored = open_stored_analysis(cfg, "suppress", " --variable NAME")
    _check_options(cfg, stored.result.group_names)
    output = check_name("output", cfg.name or f"{name}_{cfg.variable}")
    new_result_group(store, f"{suppression.GROUP_KIND}/{output}", cfg.overwrite)
    val, load_test, n_classes = splits(cfg)
    size = tuple(masking.load_images(val[0], 0, 1).shape[-2:])
    if stored.image_size is not None and stored.image_size != size:
        raise ValueError(f"analysis {name!r} was computed on {stored.image_size[0]}x"
                         f"{stored.image_size[1]} images but the data are {size[0]}x{size[1]}; "
                         f"pass --data.image_size {stored.image_size[0]}")
    model = seeded_model(cfg, n_classes)
    maps = masking.masking_maps(stored.result, model, size, value=cfg.suppress.value,
                                layers=cfg.suppress.layers, augmentations=[])
    if not maps.layers:
        raise ValueError(f"analysis {name!r} has no layer with map or token outputs to mask; "
                         f"name layers with --suppress.layers")
    return SuppressInputs(store, name, output, stored, model, maps, val, load_test)


def splits(cfg: Namespace) -> tuple[Split, Callable[[], Split], int]:
    """The validation split, the test split's loader and the class count of the data options.

    Planted data: ``PlantedFactorDataModule`` with a test split (``test_per_class``) and the
    spurious-cue options given; an image folder: --data.root (validation) and --data.test_root
    (test), the same classes.
    """
    data = cfg.data
    if data.source == "folder" or data.root is not None:
        return _folder_splits(cfg)
    if data.source != "planted":
        raise ValueError(f"data.source must be planted or folder, got {data.source!r}")
    cue = {key: data[key] for key in CUE_OPTIONS if data[key] is not None}
    try:
        dm = PlantedFactorDataModule(
            factor=data.factor, num_classes=data.num_classes, image_size=data.image_size,
            train_per_class=1, val_per_class=data.val_per_class,
            test_per_class=data.test_per_class, seed=data.seed, **cue)
    except TypeError as error:  # a datamodule without a test split or the cue options
        raise ValueError(f"the planted data cannot make a test split here ({error})") from error
    dm.setup()
    if "test" not in dm.datasets:
        raise ValueError("the planted data has no test split; raise --data.test_per_class")

    def load_test() -> Split:
        images, labels = dm.datasets["test"].tensors
        return images, labels

    images, labels = dm.datasets["val"].tensors
    return (images, labels), load_test, dm.num_classes


def _folder_splits(cfg: Namespace) -> tuple[Split, Callable[[], Split], int]:
    """``splits`` of image folders: validation --data.root, test --data.test_root."""
    data = cfg.data
    if data.root is None or data.test_root is None:
        raise ValueError("folder data: pass --data.root (validation images) and --data.test_root "
                         "(held-out test images), each with one subfolder per class")

    def split(root: str, per_class: int) -> tuple[Split, list[str]]:
        dm = ImageFolderDataModule(root, image_size=data.image_size, images_per_class=per_class,
                                   val_fraction=1.0, seed=data.seed)
        files = dm.dataset("val")
        return (files, torch.tensor(files.labels, dtype=torch.int64)), dm.class_names

    val, names = split(data.root, data.val_per_class)
    test_names = ImageFolderDataModule(data.test_root, image_size=data.image_size).class_names
    if test_names != names:
        raise ValueError(f"--data.test_root has classes {test_names}, --data.root {names}: "
                         "give both the same class subfolders")
    return val, lambda: split(data.test_root, data.test_per_class)[0], len(names)


def _lines(result: suppression.SuppressionResult, store: ResultsStore, group: str,
           figure: Path) -> list[str]:
    """What suppress prints: where its outputs went, the choice and the test accuracies."""
    header = " ".join(f"{c:>8}" for c in result.conditions)
    random = result.test_random_acc1
    rows = [("unmasked", result.test_unmasked_acc1), ("suppressed", result.test_chosen_acc1)]
    if len(random):
        rows.append((f"random x{len(random)}", random.mean(axis=0)))
    return [
        f"results file    {store.path}  (/{group}: {len(result.candidates)} candidates, "
        f"{result.n_val} validation and {result.n_test} test images)",
        f"figure          {figure}",
        f"distortion      {result.distortion}",
        f"chosen          {result.chosen} (validation {result.criterion} score "
        f"{result.val_score[result.chosen_index]:.3f}, unmasked {result.val_unmasked_score:.3f})",
        "units per layer " + ", ".join(f"{layer} {int(n)}/{int(u)}" for layer, n, u in zip(
            result.layers, result.unit_counts, result.layer_units, strict=True)),
        f"test top-1      {' ' * 6}{header}",
        *(f"  {label:<20}" + " ".join(f"{a:8.3f}" for a in acc) for label, acc in rows),
    ]
