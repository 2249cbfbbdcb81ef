"""The options of every analyze.py command: parsers, presets, and the engine settings they give.

``build_parser`` serves the analyses (sobol | shapley | variance | contrast) and masking |
single-class; ``build_statistics_parser`` the commands on a results file (contrast-stats |
correlation | lda | compare | report). The engine's options are generated from
``sensitivity.config.EngineConfig``: one option per field (``--n``, ``--seed``, ``--reduction``,
...), its type, default and docstring help, so that the command line and the training callback
share one definition of every setting; ``engine_config`` turns the parsed options back into
the EngineConfig. configs/analyze/demo.yaml is the default configuration file, so its values
are the effective defaults.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import docstring_parser
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, Namespace

from callbacks.wandb_config import NAME_OPTIONS
from callbacks.wandb_logging import DEFAULT_PROJECT
from sensitivity.config import METHODS, EngineConfig
from sensitivity.stats import DEFAULT_TOP

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ROOT / "configs" / "analyze"
DEMO_CONFIG = PRESETS / "demo.yaml"
MASKING_METHODS = ("masking", "single-class")
STATISTICS = ("contrast-stats", "correlation", "lda", "compare", "report")
# EngineConfig fields given as options; the method is the command itself.
ENGINE_FIELDS = tuple(f.name for f in dataclasses.fields(EngineConfig) if f.name != "method")


def add_option(parser: ArgumentParser, name: str, *aliases: str, **kwargs: Any) -> None:
    """Add an option ``--name``, plus ``--name-with-dashes`` for top-level names.

    Args:
        parser: the parser.
        name: the option's dotted name ("seed", "data.root").
        *aliases: further flags ("--set").
        **kwargs: as ``ArgumentParser.add_argument``.
    """
    names = [f"--{name}"]
    if "_" in name and "." not in name:
        names.append(f"--{name.replace('_', '-')}")
    parser.add_argument(*names, *aliases, **kwargs)


def add_switch(parser: ArgumentParser, name: str, *, default: bool, help: str) -> None:
    """Add a boolean option: ``--name``, ``--no_name`` and ``--name=true|false``.

    The explicit value is the form W&B sweep agents pass (``--second_order=True``).

    Args:
        parser: the parser.
        name: the option's name.
        default: its default.
        help: its help.
    """
    add_option(parser, name, action=ActionYesNo, nargs="?", default=default, help=help)


def add_engine_options(parser: ArgumentParser) -> None:
    """Add one option per ``EngineConfig`` field but the method.

    Each takes the field's annotation as its type, its default, and its entry of the class
    docstring as its help; bool fields are ``--name`` / ``--no_name`` switches.

    Args:
        parser: the parser.
    """
    described = docstring_parser.parse(EngineConfig.__doc__ or "").params
    helps = {p.arg_name: " ".join((p.description or "").split()) for p in described}
    types = typing.get_type_hints(EngineConfig)
    for field in dataclasses.fields(EngineConfig):
        if field.name not in ENGINE_FIELDS:
            continue
        if types[field.name] is bool:
            add_switch(parser, field.name, default=field.default, help=helps[field.name])
        else:
            add_option(parser, field.name, type=types[field.name], default=field.default,
                       help=helps[field.name])


def engine_config(cfg: Namespace) -> EngineConfig:
    """The engine settings of parsed options.

    Args:
        cfg: options parsed by ``build_parser``.

    Returns:
        The EngineConfig.

    Raises:
        ValueError: values that EngineConfig refuses.
    """
    return EngineConfig(method=cfg.method, **{name: cfg[name] for name in ENGINE_FIELDS})


def build_parser() -> ArgumentParser:
    """The parser of the analyses and of masking | single-class.

    Returns:
        The parser; configs/analyze/demo.yaml provides its defaults.
    """
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
    add_option(p, "method", type=str, default="sobol", help=f"one of {list(METHODS)}")
    _add_run_options(p)
    _add_model_options(p)
    _add_data_options(p)
    _add_problem_options(p)
    add_engine_options(p)
    add_switch(p, "store_activations", default=False,
               help="also store every raw activation row (large!)")
    _add_segment_options(p)
    _add_process_options(p)
    _add_masking_options(p)
    _add_wandb_options(p)
    return p


def _add_run_options(p: ArgumentParser) -> None:
    """Where the results go."""
    add_option(p, "name", type=str | None, default=None,
               help="analysis name in results.h5 and file names (default: the method)")
    add_option(p, "output", type=str | None, default=None,
               help="run directory (default <runs_dir>/analysis/<name>/version_<n>); give it "
                    "to resume")
    add_option(p, "runs_dir", type=str, default="runs", help="root of default run directories")
    add_switch(p, "overwrite", default=False,
               help="replace an analysis of the same name in the run directory")


def _add_model_options(p: ArgumentParser) -> None:
    """The analysed network."""
    add_option(p, "checkpoint", type=str | None, default=None,
               help="Lightning checkpoint of an ImageClassifier (train.py's checkpoints/*.ckpt)")
    add_option(p, "arch", type=str | None, default=None,
               help="torchvision architecture (default: the checkpoint's, else resnet18)")
    add_option(p, "weights", type=str | None, default=None,
               help="torchvision state-dict file or weights enum name (IMAGENET1K_V1), read "
                    "offline")
    add_option(p, "small_input", type=bool | None, default=None,
               help="small-input stem (default: auto, for <= 64 px without weights)")


def _add_data_options(p: ArgumentParser) -> None:
    """The probe images."""
    add_option(p, "data.source", type=str, default="planted", help="planted | folder")
    add_option(p, "data.root", type=str | None, default=None,
               help="image folder with one subfolder per class (implies source folder)")
    add_option(p, "data.factor", type=str, default="colour",
               help="planted factor: colour|shape|mixed")
    add_option(p, "data.num_classes", type=int, default=4, help="planted classes")
    add_option(p, "data.image_size", type=int, default=64, help="image side in pixels")
    add_option(p, "data.images_per_class", "--images-per-class", "--images_per_class", type=int,
               default=4, help="probe images per class")
    add_option(p, "data.seed", type=int, default=0,
               help="data seed (planted images, folder choice)")
    add_option(p, "data.checkpoint_split", type=str | None, default=None,
               help="val | train: the probe the training callback used, probe_set("
                    "images_per_class, split) of the datamodule recorded in --checkpoint (the "
                    "other data options are not used); default: the probe of the data options")


def _add_problem_options(p: ArgumentParser) -> None:
    """The augmentation problem."""
    add_option(p, "problem.preset", type=str | None, default=None,
               help="'paper': the published switch semantics and min-max postprocessing")
    add_option(p, "problem.augmentations", "--set", type=int | list[str], default=1,
               help='augmentation set 1 or 2, or a list of names and import paths '
                    'package.module:function of registered augmentations (CLI.md '
                    '"Registering an augmentation")')
    add_option(p, "problem.p_on", type=float | dict[str, float], default=0.5,
               help="probability each augmentation is applied (one value or {name: p})")
    add_option(p, "problem.auxiliaries", type=list[str], default=["order", "class", "image"],
               help="auxiliary variables: order, class, image, partition")
    add_option(p, "problem.postprocess", type=str | None, default=None, help="null or minmax")
    add_option(p, "problem.bounds", type=dict[str, dict[str, list[float]]] | None, default=None,
               help="narrower parameter bounds at 224 px: {aug: {param: [low, high]}}")


def _add_segment_options(p: ArgumentParser) -> None:
    """Single-channel segments (docs/CLI.md): the H, S and V streams of the augmented image
    through a chain of the network's first modules (``sensitivity.segments``)."""
    add_option(p, "segment.modules", type=list[str] | None, default=None,
               help="analyse a single-channel segment instead of the network: module names run "
                    "in order on each of H, S and V of the augmented image, repeated over the 3 "
                    "input channels, e.g. '[conv1, bn1, relu]' (a block such as layer1.0 for a "
                    "residual segment); its layers are the streams H, S and V")
    add_option(p, "segment.channels", type=list[int] | None, default=None,
               help="output channels of the segment's last module to keep, e.g. '[0, 5, 9]' "
                    "(default: all, or --segment.top_k)")
    add_option(p, "segment.top_k", type=int | None, default=None,
               help="keep the k channels of the largest index of --segment.variable in the "
                    "stored analysis --segment.from_analysis of the --output run (valid units "
                    "only)")
    add_option(p, "segment.from_analysis", type=str | None, default=None,
               help="with top_k: the analysis in <output>/results.h5 that ranks the channels")
    add_option(p, "segment.variable", type=str | None, default=None,
               help="with top_k: the variable whose index ranks the channels, e.g. hue")
    add_option(p, "segment.key", type=str | None, default=None,
               help="with top_k: the value that ranks them (default: ST, else the analysis's "
                    "headline value: shapley_normalized, effect_size)")
    add_option(p, "segment.layer", type=str | None, default=None,
               help="with top_k: the stored analysis's layer whose channels are ranked "
                    "(default: the segment's last module)")
    add_switch(p, "segment.normalize", default=True,
               help="normalise each repeated stream with the network's input normalisation "
                    "(ImageNet mean/std), as the network sees a gray image; false: raw H, S, V "
                    "in [0, 1]")


def _add_process_options(p: ArgumentParser) -> None:
    """Lightning's processes and devices."""
    add_option(p, "accelerator", type=str, default="auto",
               help="Lightning accelerator: auto|cpu|gpu")
    add_option(p, "devices", type=int | str, default=1,
               help="processes per node (auto: all devices)")
    add_option(p, "strategy", type=str, default="auto",
               help="Lightning strategy: auto|ddp (torchrun and SLURM: ddp); spawning ones are "
                    "refused")
    add_option(p, "num_nodes", type=int, default=1, help="nodes (under SLURM/torchrun)")


def _add_wandb_options(p: ArgumentParser) -> None:
    """W&B options (docs/CLI.md "W&B"); the mode comes from ``wandb_mode``."""
    add_switch(p, "wandb", default=True,
               help="log to Weights & Biases (offline run in <run dir>/wandb unless online; "
                    "false or --no_wandb: off)")
    add_option(p, "wandb_project", type=str | None, default=None,
               help=f"W&B project; setting it logs online unless WANDB_MODE says otherwise "
                    f"(default project: the one a --checkpoint records, else {DEFAULT_PROJECT})")
    for name, kind, text in NAME_OPTIONS:
        add_option(p, name, type=kind, default=None, help=text)


def _add_masking_options(p: ArgumentParser) -> None:
    """Options of masking and single-class (they read maps from a stored analysis)."""
    add_option(p, "results", type=str | None, default=None,
               help="masking, single-class: the results file holding the analysis (results.h5)")
    add_option(p, "analysis", type=str | None, default=None,
               help="masking, single-class: analysis name in --results (default: its only one)")
    add_option(p, "masking.value", type=str | None, default=None,
               help="map value: S1 | ST | shapley_normalized (default: ST, else "
                    "shapley_normalized)")
    add_option(p, "masking.layers", type=list[str] | None, default=None,
               help="masked layers (default: the analysed layers whose output is (C, H, W))")
    add_option(p, "masking.variables", type=list[str] | None, default=None,
               help="mask variables (default: every variable of the analysis)")
    add_option(p, "masking.augmentations", type=list[str] | None, default=None,
               help="input augmentations, each alone (default: the analysis's augmentations)")
    add_option(p, "masking.k", type=int, default=4,
               help="parameter draws per image and augmentation")
    add_option(p, "masking.ties", type=str, default="strict",
               help="strict: a quantile at the layer's minimum masks only larger values; "
                    "inclusive")
    add_option(p, "masking.batch_images", type=int, default=16, help="probe images per batch")
    add_option(p, "masking.batch_rows", type=int | None, default=None,
               help="the most rows (inputs x configurations) of one forward of the masked part: "
                    "several configurations run as one batch, or an input set's rows in parts "
                    "(default: 8 on a CPU, 256 on a GPU; 0: one forward per configuration)")
    add_option(p, "masking.checkpoint_every", type=int, default=0,
               help="masking: save the counts every k forwards of the masked part to "
                    "<results dir>/<name>.masking.resume.pt, which a rerun continues (0: off)")
    add_switch(p, "masking.reuse_prefix", default=True,
               help="compute the network up to the first masked layer once per batch")
    add_option(p, "masking.profile", type=str, default="top1",
               help="what specificity and clustering compare per (input, mask variable): top1 "
                    "(top-1 accuracy per configuration) | per_class (per-class top-1 "
                    "accuracy) | confusion (confusion matrices, rows per class's inputs)")
    add_option(p, "masking.max_confusion_classes", type=int, default=100,
               help="store confusion matrices when the network has at most this many classes")
    add_switch(p, "masking.cluster", default=True,
               help="cluster the (input, mask variable) profiles hierarchically (stored with "
                    "the result, and a dendrogram PNG)")
    add_option(p, "masking.cluster_method", type=str, default="average",
               help="scipy linkage method: single | complete | average | weighted, or "
                    "centroid | median | ward with the euclidean metric")
    add_option(p, "masking.cluster_metric", type=str, default="spearman",
               help="profile distance: spearman (sqrt(1 - |rho|)) | euclidean")
    add_option(p, "masking.cluster_threshold", type=float | None, default=None,
               help="cut distance of the flat clusters (default: 0.7 x the largest merge "
                    "distance, where the dendrogram's colours change)")
    add_option(p, "single_class.n", type=int, default=5,
               help="candidate classes (and top-n predictions) per variable")
    add_option(p, "single_class.trials", type=int, default=100_000,
               help="simulated experiments of the chance threshold")


def build_statistics_parser(method: str) -> ArgumentParser:
    """The parser of a command on a results file (docs/CLI.md).

    Args:
        method: contrast-stats, correlation, lda, compare or report.

    Returns:
        The parser.
    """
    p = ArgumentParser(
        prog=f"analyze.py {method}",
        description=(
            "analyze.py report --results RUN/results.h5 [--analysis NAME]: a self-contained "
            "HTML page of the file's analyses (<run directory>/report/index.html and its PNGs)."
            if method == "report"
            else f"analyze.py {method} --results RUN/results.h5 --analysis NAME"
            f"{' [--other NAME]' if method == 'compare' else ''}: statistics of a stored "
            "analysis, written into the same file."
        ),
    )
    p.add_argument("--method", type=str, default=method, help="the method (given first)")
    add_option(p, "results", type=str, required=True, help="results file of a run (results.h5)")
    add_option(p, "analysis", type=str | None, default=None,
               help="analysis name in the results file"
                    + (" (default: all)" if method == "report" else " (required)"))
    if method == "report":
        add_option(p, "output", type=str | None, default=None,
                   help="report directory (default: <run directory>/report)")
        return p
    add_switch(p, "overwrite", default=False,
               help="replace statistics of the same analysis already in the file")
    add_switch(p, "progress", default=True,
               help="the work up front, then a progress bar (terminal) or lines (logs) on stderr")
    _add_wandb_options(p)
    if method == "contrast-stats":
        add_option(p, "alpha", type=float, default=0.05,
                   help="false discovery rate of the Benjamini-Yekutieli correction")
    elif method == "compare":
        add_option(p, "other", type=str | None, default=None,
                   help="the analysis compared with --analysis (default: the file's only other "
                        "sobol or shapley analysis)")
        add_option(p, "value_types", type=list[str] | None, default=None,
                   help="the maps compared: one value type for both or one per analysis, e.g. "
                        "'[ST, shapley_normalized]' (default: ST, else shapley_normalized, "
                        "else S1 of each)")
        add_option(p, "top", type=int, default=DEFAULT_TOP,
                   help="largest values per variable drawn as decay curves")
    else:
        add_option(p, "value_types", type=list[str] | None, default=None,
                   help="value types, e.g. '[S1, ST]' (default: those of S1, ST, "
                        "shapley_normalized the analysis has)")
    if method == "lda":
        add_option(p, "folds", type=int, default=5, help="cross-validation folds")
        add_option(p, "repeats", type=int, default=3, help="cross-validation repeats")
        add_option(p, "seed", type=int, default=0, help="seed of the fold assignment")
    return p


def build_suppress_parser() -> ArgumentParser:
    """The parser of ``analyze.py suppress`` (docs/CLI.md, suppressing a nuisance).

    Returns:
        The parser (no preset file: its data options describe a validation and a test split).
    """
    p = ArgumentParser(
        prog="analyze.py suppress",
        description=(
            "analyze.py suppress --results RUN/results.h5 --analysis NAME --variable hue: "
            "attenuate the units most sensitive to a nuisance augmentation, choose the mask on "
            "the validation split, report test accuracy clean and distorted against the "
            "unmasked network and random masks of the same size per layer."
        ),
    )
    p.add_argument("--method", type=str, default="suppress", help="the method (given first)")
    add_option(p, "results", type=str | None, default=None,
               help="the results file holding the analysis (results.h5)")
    add_option(p, "analysis", type=str | None, default=None,
               help="analysis name in --results (default: its only one)")
    add_option(p, "variable", type=str | None, default=None,
               help="the nuisance variable: an augmentation of the analysis, e.g. hue")
    add_option(p, "name", type=str | None, default=None,
               help="group /suppression/<name> (default: <analysis>_<variable>)")
    add_switch(p, "overwrite", default=False, help="replace a suppression group of that name")
    add_option(p, "seed", type=int, default=0,
               help="seed of the distortion draws and of the random masks")
    add_switch(p, "progress", default=True,
               help="the work up front, then a progress bar (terminal) or lines (logs) on stderr")
    add_option(p, "accelerator", type=str, default="auto", help="auto | cpu | gpu (one device)")
    _add_model_options(p)
    _add_suppress_data_options(p)
    _add_suppress_options(p)
    _add_wandb_options(p)
    return p


def _add_suppress_data_options(p: ArgumentParser) -> None:
    """The validation (selection) and test (report) splits of suppress."""
    add_option(p, "data.source", type=str, default="planted", help="planted | folder")
    add_option(p, "data.root", type=str | None, default=None,
               help="folder source: the validation images (one subfolder per class)")
    add_option(p, "data.test_root", type=str | None, default=None,
               help="folder source: the held-out test images (the same class subfolders)")
    add_option(p, "data.factor", type=str, default="colour",
               help="planted factor: colour | shape | mixed")
    add_option(p, "data.num_classes", type=int, default=4, help="planted classes")
    add_option(p, "data.image_size", type=int, default=64,
               help="image side in pixels (the analysis's)")
    add_option(p, "data.seed", type=int, default=0, help="data seed (planted images)")
    add_option(p, "data.val_per_class", type=int, default=16,
               help="validation images per class (selection)")
    add_option(p, "data.test_per_class", type=int, default=16,
               help="test images per class (report)")
    add_option(p, "data.nuisance", type=str | None, default=None,
               help="planted spurious cue: null or hue (with factor shape)")
    add_option(p, "data.agreement", type=float | None, default=None,
               help="planted cue: train share agreeing with the class (default: the data's)")
    add_option(p, "data.eval_nuisance", type=str | None, default=None,
               help="planted cue in val and test: random | shifted (default: the data's)")


def _add_suppress_options(p: ArgumentParser) -> None:
    """The candidates, the choice and the controls of suppress."""
    add_option(p, "suppress.strengths", type=list[float], default=[0.25, 0.5, 1.0],
               help="distortion strengths in (0, 1]: the fraction of the nuisance's bound range")
    add_option(p, "suppress.criterion", type=str, default="mean",
               help="validation score: mean (of clean and distorted accuracies) | worst | "
                    "distorted (mean of the distorted ones)")
    add_option(p, "suppress.scope", type=str, default="both",
               help="candidates per masked layer (per_layer), at all at once (across) or both")
    add_option(p, "suppress.layers", type=list[str] | None, default=None,
               help="masked layers (default: the analysed layers whose output has positions)")
    add_option(p, "suppress.value", type=str | None, default=None,
               help="map value: S1 | ST | shapley_normalized (default: ST, else "
                    "shapley_normalized)")
    add_option(p, "suppress.random_draws", type=int, default=5,
               help="random masks with the chosen mask's unit count per layer")
    add_option(p, "suppress.ties", type=str, default="strict",
               help="strict: a quantile at the layer's minimum masks only larger values; "
                    "inclusive")
    add_option(p, "suppress.batch_images", type=int, default=16, help="images per batch")
    add_switch(p, "suppress.reuse_prefix", default=True,
               help="compute the network up to the first masked layer once per batch")


def normalise_args(args: Sequence[str]) -> list[str]:
    """Rewrite a command line for the parser.

    Args:
        args: the command line, e.g. ``sobol --config demo``.

    Returns:
        The arguments with the leading method as ``--method sobol`` and preset names after
        --config replaced by their paths in configs/analyze/.
    """
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
    """The method named on the command line, before the full parse.

    Args:
        args: the normalised command line (``normalise_args``).

    Returns:
        The value of ``--method``, or None.
    """
    for i, arg in enumerate(args[:-1]):
        if arg == "--method":
            return args[i + 1]
    return next((a.split("=", 1)[1] for a in args if a.startswith("--method=")), None)
