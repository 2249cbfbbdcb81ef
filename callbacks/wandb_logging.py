"""Weights & Biases records of every command and callback (rank zero only).

The keys of each command are listed in CLI.md "W&B"; an analysis logs
``sensitivity/<method>/<layer>/<variable>/<key>/median`` (and ``mean``, half-widths, valid
fractions, heatmaps and a summary table), charted against the step metric ``analysis/epoch``
(``define_metrics``) rather than the trainer's global step. Training logs through the trainer's
WandbLogger (``wandb_run``); analyze.py opens its own run (``wandb_mode``, ``analysis_run``)
and logs the ``*_record`` of its command. The results file is uploaded as an artifact only when
the run is online: an offline run would copy it next to the original. wandb itself is
imported only inside the functions that use it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger

from sensitivity.results import AnalysisResult
from sensitivity.single_class import SingleClassResult

STEP_METRIC = "analysis/epoch"
PREFIX = "sensitivity"
TABLE_COLUMNS = ["epoch", "layer", "variable", "index", "median", "p10", "p90", "mean",
                 "valid_fraction"]
# Which summary statistics become scalars: value keys their median and mean, half-widths their
# median; second-order indices go to the table only (one per pair of variables).
_SCALARS = {"value": ("median", "mean"), "conf": ("median",), "pair": ()}
ARTIFACT_TYPE = "sensitivity-results"
DEFAULT_PROJECT = "augsens"  # of analyze.py and train.py runs alike


def metric_key(method: str, layer: str, variable: str, key: str) -> str:
    """The W&B key prefix of one index of one variable at one layer.

    Args:
        method, layer, variable, key: e.g. "sobol", "fc", "hue", "ST".

    Returns:
        ``sensitivity/<method>/<layer>/<variable>/<key>``.
    """
    return f"{PREFIX}/{method}/{layer}/{variable}/{key}"


def wandb_run(trainer: pl.Trainer) -> Any | None:
    """The W&B run a callback logs to.

    Args:
        trainer: the trainer.

    Returns:
        The wandb run of the trainer's first WandbLogger on global rank zero, else None.
    """
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return logger.experiment
    return None


def define_metrics(run: Any, prefix: str = PREFIX) -> None:
    """Chart every ``<prefix>/*`` key against ``analysis/epoch``.

    Args:
        run: a wandb run.
        prefix: the key prefix ("sensitivity", "masking").
    """
    run.define_metric(STEP_METRIC)
    run.define_metric(f"{prefix}/*", step_metric=STEP_METRIC)


def analysis_record(
    result: AnalysisResult, heatmaps: Mapping[str, str | Path]
) -> dict[str, Any]:
    """What ``run.log`` receives for one analysis.

    Args:
        result: the analysis (its epoch, or -1, is the step).
        heatmaps: {value key: PNG path}, as ``sensitivity.report.save_heatmaps`` returns.

    Returns:
        As ``summary_record``.
    """
    return summary_record(result.method, result.epoch, result.summary(), heatmaps)


def summary_record(
    method: str,
    epoch: int | None,
    summary: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]],
    heatmaps: Mapping[str, str | Path],
) -> dict[str, Any]:
    """What ``run.log`` receives for one analysis, from its summary alone.

    Args:
        method: the analysis method.
        epoch: the training epoch; None (not in training) is logged as -1.
        summary: ``AnalysisResult.summary()``: {key: {layer: {variable: {statistic: value}}}}.
        heatmaps: {value key: PNG path}.

    Returns:
        {key: scalar, wandb.Image or wandb.Table}: medians and means of the value keys, median
        half-widths, valid fractions, heatmaps, the summary table and the step metric.
    """
    import wandb

    epoch = -1 if epoch is None else int(epoch)
    record: dict[str, Any] = {STEP_METRIC: epoch}
    rows = []
    for key, layers in summary.items():
        kind = "pair" if key.startswith("S2") else "conf" if key.endswith("_conf") else "value"
        for layer, values in layers.items():
            for variable, stats in values.items():
                for statistic in _SCALARS[kind]:
                    record[f"{metric_key(method, layer, variable, key)}/{statistic}"] = (
                        stats[statistic]
                    )
                record[f"{PREFIX}/{method}/{layer}/valid_fraction"] = stats["valid_fraction"]
                rows.append([epoch, layer, variable, key,
                             *(stats[c] for c in TABLE_COLUMNS[4:])])
    for key, path in heatmaps.items():
        record[f"{PREFIX}/{method}/heatmap/{key}"] = wandb.Image(
            str(path), caption=f"{method} {key}, epoch {epoch}"
        )
    if rows:
        record[f"{PREFIX}/{method}/summary"] = wandb.Table(columns=TABLE_COLUMNS, data=rows)
    return record


def log_results_artifact(run: Any, path: Path) -> bool:
    """Upload the results file as an artifact when the run is online.

    Args:
        run: a wandb run.
        path: the results file.

    Returns:
        True when it was uploaded (online run, file present).
    """
    if run.offline or run.disabled or not path.is_file():
        return False
    import wandb

    artifact = wandb.Artifact(f"sensitivity-{run.id}", type=ARTIFACT_TYPE)
    artifact.add_file(str(path))
    run.log_artifact(artifact)
    return True


# ------------------------------------------------------------------------ analyze.py runs
def wandb_mode(
    enabled: bool, project: str | None, environ: Mapping[str, str] = os.environ
) -> str | None:
    """The W&B mode of an analyze.py command.

    Args:
        enabled: ``--wandb``.
        project: ``--wandb_project``.
        environ: the environment (its WANDB_MODE).

    Returns:
        None (no logging) for ``--wandb false`` or WANDB_MODE=disabled; WANDB_MODE online or
        offline as set ("dryrun" is offline); else "online" when a project is given,
        otherwise "offline".

    Raises:
        ValueError: another WANDB_MODE value.
    """
    env = environ.get("WANDB_MODE", "").strip().lower()
    if not enabled or env == "disabled":
        return None
    if env in ("online", "offline"):
        return env
    if env == "dryrun":
        return "offline"
    if env:
        raise ValueError(
            f"WANDB_MODE={environ['WANDB_MODE']!r} is not a W&B mode; set online, offline or "
            "disabled (or unset it), or pass --wandb false"
        )
    return "online" if project else "offline"


@contextmanager
def analysis_run(
    run_dir: Path,
    mode: str,
    *,
    name: str,
    job_type: str,
    config: Mapping[str, Any],
    project: str | None = None,
) -> Iterator[Any]:
    """A W&B run under ``<run_dir>/wandb/``, finished (files flushed) on exit.

    The run is grouped by the run directory, so that an analysis and the commands on its
    results file sit together.

    Args:
        run_dir: the analysis run directory.
        mode: "online" or "offline" (``wandb_mode``).
        name: the run's name.
        job_type: the command.
        config: the command's resolved configuration.
        project: the W&B project (default ``DEFAULT_PROJECT``).

    Yields:
        The wandb run.
    """
    import wandb

    run_dir = run_dir.resolve()  # absolute: the printed `wandb sync` works from anywhere
    run = wandb.init(
        dir=str(run_dir), mode=mode, project=project or DEFAULT_PROJECT, name=name,
        job_type=job_type, group=f"{run_dir.parent.name}/{run_dir.name}"[-128:],
        config=dict(config), reinit="create_new",
        # stdout stays ours (the printed outputs); system metrics are noise for a short run.
        settings=wandb.Settings(console="off", x_disable_stats=True),
    )
    try:
        yield run
    finally:
        run.finish()


def run_lines(run: Any) -> list[str]:
    """What analyze.py prints about a W&B run.

    Args:
        run: a wandb run.

    Returns:
        The offline run directory and its ``wandb sync`` command, or the online run's address.
    """
    directory = Path(run.dir).parent  # run.dir is <run>/files
    if run.offline:
        return [f"W&B offline run {directory}", f"upload with     wandb sync {directory}"]
    return [f"W&B run         {run.url or directory}"]


def single_class_record(result: SingleClassResult) -> dict[str, Any]:
    """What ``run.log`` receives for a single-class analysis.

    Args:
        result: the single-class result.

    Returns:
        ``single_class/<variable>/max_jaccard`` (largest mean Jaccard index over mask
        configurations), ``single_class/<variable>/matched`` (configurations above the chance
        threshold), ``single_class/threshold``, ``single_class/chance_mean``, the table
        ``single_class/table`` and the step metric.
    """
    import wandb

    epoch = -1 if result.epoch is None else int(result.epoch)
    record: dict[str, Any] = {
        STEP_METRIC: epoch,
        "single_class/threshold": float(result.threshold.threshold),
        "single_class/chance_mean": float(result.threshold.mean),
    }
    rows = []
    for entry in result.matches():
        variable, matched = entry["variable"], len(entry["matched_configurations"])
        record[f"single_class/{variable}/max_jaccard"] = entry["max_jaccard"]
        record[f"single_class/{variable}/matched"] = matched
        rows.append([variable, ", ".join(entry["candidates"]), entry["max_jaccard"],
                     entry["configuration"], matched])
    record["single_class/table"] = wandb.Table(
        columns=["variable", "candidates", "max_jaccard", "configuration", "matched"], data=rows
    )
    return record


def contrast_stats_record(out: Mapping[str, Any], alpha: float) -> dict[str, Any]:
    """What ``run.log`` receives for contrast-stats.

    Args:
        out: ``sensitivity.stats.contrast_statistics``'s return value.
        alpha: the significance level of the BY-corrected q-values.

    Returns:
        ``contrast_stats/<layer>/<augmentation>/n_significant`` (units with q < alpha),
        ``contrast_stats/n_pairs``, ``contrast_stats/alpha`` and the table
        ``contrast_stats/table``.
    """
    import wandb

    record: dict[str, Any] = {"contrast_stats/n_pairs": int(out["n_pairs"]),
                              "contrast_stats/alpha": float(alpha)}
    rows = []
    for layer, counts in out["significant"].items():
        for augmentation, count in counts.items():
            record[f"contrast_stats/{layer}/{augmentation}/n_significant"] = int(count)
            rows.append([layer, augmentation, int(count)])
    record["contrast_stats/table"] = wandb.Table(
        columns=["layer", "augmentation", "n_significant"], data=rows
    )
    return record


def correlation_record(tree: Mapping[str, Any], attrs: Mapping[str, Any]) -> dict[str, Any]:
    """What ``run.log`` receives for correlation.

    Args:
        tree, attrs: ``sensitivity.stats.read_tree(results, "correlation", name)``.

    Returns:
        ``correlation/<layer>/<value>/mean_abs`` (mean |Spearman| over pairs of variables; NaN
        for constant maps) and the table ``correlation/table``: every pair of variables and
        every variable against the covariates (mean, var, cv).
    """
    import wandb

    variables, covariates = list(attrs["variables"]), list(attrs["covariates"])
    upper = np.triu_indices(len(variables), k=1)
    record: dict[str, Any] = {}
    rows = []
    for layer in attrs["layers"]:
        for value in attrs["values"]:
            entry = tree[layer][value]
            pairs = np.asarray(entry["variables"], dtype=np.float64)
            against = np.asarray(entry["covariates"], dtype=np.float64)
            finite = np.abs(pairs[upper])[np.isfinite(pairs[upper])]
            # a constant map has no defined correlation: NaN, not a misleading 0
            record[f"correlation/{layer}/{value}/mean_abs"] = (
                float(finite.mean()) if finite.size else math.nan
            )
            rows += [[layer, value, variables[i], variables[j], float(pairs[i, j])]
                     for i, j in zip(*upper, strict=True)]
            rows += [[layer, value, variable, covariate, float(against[i, c])]
                     for i, variable in enumerate(variables)
                     for c, covariate in enumerate(covariates)]
    record["correlation/table"] = wandb.Table(
        columns=["layer", "value", "variable", "other", "spearman"], data=rows
    )
    return record


def lda_record(out: Mapping[str, Any]) -> dict[str, Any]:
    """What ``run.log`` receives for lda.

    Args:
        out: ``sensitivity.stats.lda_statistics``'s return value.

    Returns:
        ``lda/<layer>/<value>/accuracy`` and ``.../accuracy_sd`` (over cross-validation folds),
        ``lda/chance`` and the table ``lda/table``.
    """
    import wandb

    chance = float(out["chance"])
    record: dict[str, Any] = {"lda/chance": chance}
    rows = []
    for layer, values in out["accuracy"].items():
        for value, (mean, sd) in values.items():
            record[f"lda/{layer}/{value}/accuracy"] = float(mean)
            record[f"lda/{layer}/{value}/accuracy_sd"] = float(sd)
            rows.append([layer, value, float(mean), float(sd), chance])
    record["lda/table"] = wandb.Table(
        columns=["layer", "value", "accuracy", "accuracy_sd", "chance"], data=rows
    )
    return record
