"""``analyze.py sobol | shapley | variance | contrast``: one analysis through Lightning's Trainer.

``prepare`` builds and checks everything before any output exists (the run options, the
output directory and the provenance of what it already holds, the probe, model and problem,
and the plan: design and unit shapes, one dry forward); ``run_engine`` runs
``lightning_modules.analysis.AnalysisModule`` in ``Trainer.predict`` (every process analyses
its shard, rank zero writes), then prints the outputs and logs the summary to W&B on rank zero.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from jsonargparse import Namespace

from callbacks.wandb_logging import AnalysisLog
from cli.inputs import build_model, build_probe, build_problem, build_segment, weights_sha256
from cli.options import engine_config
from cli.reporting import (
    INPUT_ERRORS,
    input_error,
    log_wandb,
    print_outputs,
    wandb_settings,
)
from lightning_modules.analysis import (
    RESULTS_FILE,
    AnalysisModule,
    AnalysisOutputs,
    one_step_loader,
)
from sensitivity.config import METHODS
from sensitivity.plan import plan_analysis
from sensitivity.probe import probe_size
from sensitivity.provenance import provenance
from sensitivity.results import ranked_variables
from sensitivity.store import ResultsStore, check_name

# Strategies that start the other processes from this one (spawn or fork): Lightning returns no
# predictions from them, so rank zero's results would be written but never reported.
SPAWNING_STRATEGIES = ("ddp_spawn", "ddp_fork", "ddp_notebook")


def run_engine(cfg: Namespace, config_text: str) -> int:
    """Run the analysis of the parsed options (``cfg.method`` one of METHODS).

    Args:
        cfg: the parsed options.
        config_text: their YAML, recorded with the results.

    Returns:
        The exit status: 0 (also on ranks other than zero), 2 for bad input with nothing
        written, 1 when the results were written but W&B failed.
    """
    if cfg.method not in METHODS:
        return input_error(None, f"unknown method {cfg.method!r}; valid: {list(METHODS)}")
    try:
        mode = wandb_settings(cfg)
        module = prepare(cfg, config_text)
        trainer, predictions = predict_per_process(cfg, module)
    except INPUT_ERRORS as error:
        return input_error(None, error)
    if not (trainer.is_global_zero and predictions):
        return 0
    written, name = predictions[0], module.outputs.name
    wandb_lines, status = log_wandb(
        cfg, mode, Path(written["results"]), name,
        lambda run: AnalysisLog(run, written["method"]).log(
            written["epoch"], written["summary"], written["heatmaps"], written["top_shares"]),
        name, name=name, layers=list(module.plan.unit_shapes),
        small_input=getattr(module.network, "small_input", None),
    )
    print_outputs(analysis_lines(written, name) + wandb_lines)
    return status


def predict_per_process(
    cfg: Namespace, module: pl.LightningModule
) -> tuple[pl.Trainer, list[Any] | None]:
    """One predict step of ``module`` in every process of the run options (--accelerator,
    --devices, --strategy, --num_nodes).

    Args:
        cfg: the parsed options.
        module: the module (``AnalysisModule``, ``ShardModule``).

    Returns:
        (the trainer, its predictions: [rank zero's step output] on rank zero).
    """
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
        return trainer, trainer.predict(module, dataloaders=one_step_loader())


def prepare(cfg: Namespace, config_text: str) -> AnalysisModule:
    """Build and check everything an analysis needs, before any output exists.

    Args:
        cfg: the parsed options.
        config_text: their YAML, recorded with the results.

    Returns:
        The module ``Trainer.predict`` runs, with its plan.

    Raises:
        ValueError, FileNotFoundError: bad options, data, weights, output directory or
            provenance (nothing written).
    """
    check_run_options(cfg)
    # A segment's analysis goes next to the network's it may rank channels by: another name.
    default = f"{cfg.method}_segment" if cfg.segment.modules else cfg.method
    name = check_name("analysis", cfg.name or default)
    output = None if cfg.output is None else Path(cfg.output).expanduser()
    if output is not None:
        check_output_dir(output, name, cfg.overwrite)
    config = engine_config(cfg)
    partition = "partition" in cfg.problem.auxiliaries
    probe, n_classes, class_names, dataset = build_probe(cfg, partition)
    # Every process (and every resumed run) must build the same random initialisation.
    torch.manual_seed(cfg.seed)
    model, arch, weights = build_model(cfg, n_classes)
    problem = build_problem(cfg, n_classes)
    record = provenance(
        model=arch, weights=weights, weights_sha256=weights_sha256(cfg, arch, model),
        dataset=dataset, image_size=probe_size(probe), problem=problem,
    )
    if output is not None:
        check_provenance(ResultsStore(output / RESULTS_FILE), record)
    model, config, segment = build_segment(
        cfg, model, config, record["image_size"], None if output is None else output / RESULTS_FILE
    )
    plan = plan_analysis(model, problem, probe, config)
    outputs = AnalysisOutputs(
        name=name, output=output, runs_dir=Path(cfg.runs_dir), overwrite=cfg.overwrite,
        store_activations=cfg.store_activations,
        metadata={
            "model": arch, "weights": weights, "weights_sha256": record["weights_sha256"],
            "dataset": dataset, "image_size": record["image_size"], "seed": cfg.seed,
            "config": config_text, "attrs": {"class_names": class_names},
        },
        # Each analysis describes itself: provenance and its own configuration (the engine's
        # settings come with the result).
        analysis_attrs={**record, "config": config_text, **segment},
        config_text=config_text,
    )
    return AnalysisModule(model, problem, probe, config, outputs, plan=plan)


def check_run_options(cfg: Namespace) -> None:
    """Check the options that concern the run itself.

    Args:
        cfg: the parsed options.

    Raises:
        ValueError: a spawning strategy, or activation storage with resume checkpoints.
    """
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


def check_output_dir(output: Path, name: str, overwrite: bool) -> None:
    """Check --output before anything is written.

    Args:
        output: the run directory.
        name: the analysis name.
        overwrite: --overwrite.

    Raises:
        ValueError: --output, or a folder above it, is an existing file; or (without
            ``overwrite``) its results file already holds an analysis ``name``.
    """
    for path in (output, *output.parents):
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"--output {output}: {path} is a file, not a directory; pass a "
                                 f"run directory (results go to <directory>/{RESULTS_FILE})")
            break
    store = ResultsStore(output / RESULTS_FILE)
    if not overwrite and store.path.exists() and store.has_analysis(name):
        raise ValueError(
            f"{store.path} already holds an analysis {name!r}; pass --overwrite, another "
            f"--name or another --output"
        )


def check_provenance(store: ResultsStore, record: Mapping[str, Any]) -> None:
    """Refuse to add an analysis of something else to a results file.

    A file's root metadata and /problem describe every analysis in it.

    Args:
        store: the results file (it may not exist yet).
        record: the new analysis's ``provenance()``.

    Raises:
        ValueError: the file holds analyses of another model, weights, dataset, image size or
            problem (the differences named).
    """
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


def analysis_lines(written: Mapping[str, Any], name: str) -> list[str]:
    """The "Outputs:" lines of an analysis.

    Args:
        written: rank zero's output of ``AnalysisModule.predict_step``.
        name: the analysis name.

    Returns:
        Where it went and, per layer, the variable with the largest median index over the
        valid units.
    """
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
        lines += [_largest_median(layer, values) for layer, values in summary[key].items()]
    return lines


def _largest_median(layer: str, values: Mapping[str, Mapping[str, float]]) -> str:
    """One layer's line: its variable of the largest finite median, with p10, p90 and the
    share of valid units."""
    ranked = ranked_variables(values)
    if not ranked:
        return f"  {layer:<14} no valid unit (see the flag arrays)"
    top = ranked[0]
    stats = values[top]
    return (
        f"  {layer:<14} {top} {stats['median']:.3f} [p10 {stats['p10']:.3f}, p90 "
        f"{stats['p90']:.3f}], {stats['valid_fraction']:.0%} of units valid"
    )
