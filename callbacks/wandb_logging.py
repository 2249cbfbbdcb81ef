"""Weights & Biases records of every command and callback (rank zero only).

The keys of each command are listed in CLI.md "W&B". An analysis is logged by an
``AnalysisLog``, the same for a training run (one analysis per epoch) and an analyze.py run:
against the step metric ``analysis/epoch`` (``define_metrics``), the robust summaries as
scalars ``sensitivity/<method>/<layer>/<variable>/<key>/median`` (and ``mean``, half-widths,
valid fractions; hidden from W&B's automatic panels, which would give each its own chart),
one line-series chart per layer of every variable across the epochs, a heatmap image per
value key under one key (a step slider in W&B), the rows of an incremental table, and in the
run summary the dominant variable per layer and the share of units each variable tops.
Training logs through the trainer's WandbLogger (``wandb_run``); analyze.py opens its own run
(``wandb_mode``, ``analysis_run``) and logs its command's record. Artifacts:
``callbacks.wandb_artifacts``; run names and config blocks: ``callbacks.wandb_config``. wandb
itself is imported only inside the functions that use it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger

from callbacks.wandb_artifacts import RESULTS_TYPE
from callbacks.wandb_config import RunNames
from sensitivity.results import ranked_variables
from sensitivity.single_class import SingleClassResult
from sensitivity.stats.comparison import SIDES

STEP_METRIC = "analysis/epoch"
PREFIX = "sensitivity"
TABLE_COLUMNS = ["epoch", "layer", "variable", "index", "median", "p10", "p90", "mean",
                 "valid_fraction"]
# Which summary statistics become scalars: value keys their median and mean, half-widths their
# median; second-order indices go to the table only (one per pair of variables).
_SCALARS = {"value": ("median", "mean"), "conf": ("median",), "pair": ()}
ARTIFACT_TYPE = RESULTS_TYPE  # the results files' artifact type
DEFAULT_PROJECT = "augsens"  # of analyze.py and train.py runs alike
# Summary: {key: {layer: {variable: {statistic: value}}}} (``AnalysisResult.summary()``).
Summary = Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]]


def metric_key(method: str, layer: str, variable: str, key: str) -> str:
    """The W&B key prefix of one index of one variable at one layer.

    Args:
        method, layer, variable, key: e.g. "sobol", "fc", "hue", "ST".

    Returns:
        ``sensitivity/<method>/<layer>/<variable>/<key>``.
    """
    return f"{PREFIX}/{method}/{layer}/{variable}/{key}"


def valid_fraction_key(method: str, layer: str) -> str:
    """``sensitivity/<method>/<layer>/valid_fraction``: the layer's share of valid units."""
    return f"{PREFIX}/{method}/{layer}/valid_fraction"


def heatmap_key(method: str, key: str) -> str:
    """``sensitivity/<method>/heatmap/<key>``: the heatmap image of a value key."""
    return f"{PREFIX}/{method}/heatmap/{key}"


def dominant_key(method: str, layer: str) -> str:
    """``dominant/<method>/<layer>``: the run-summary key of a layer's dominant variable."""
    return f"dominant/{method}/{layer}"


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


def scalar_record(method: str, summary: Summary) -> dict[str, float]:
    """The scalars of one analysis: medians and means of the value keys, median half-widths,
    each layer's valid fraction.

    Args:
        method: the analysis method.
        summary: ``AnalysisResult.summary()``.

    Returns:
        {``sensitivity/<method>/<layer>/<variable>/<key>/<statistic>``: value,
        ``sensitivity/<method>/<layer>/valid_fraction``: share of valid units}; NaN where a
        layer has no valid unit.
    """
    record: dict[str, float] = {}
    for key, layers in summary.items():
        kind = "pair" if key.startswith("S2") else "conf" if key.endswith("_conf") else "value"
        for layer, values in layers.items():
            for variable, stats in values.items():
                for statistic in _SCALARS[kind]:
                    record[f"{metric_key(method, layer, variable, key)}/{statistic}"] = (
                        stats[statistic]
                    )
                record[valid_fraction_key(method, layer)] = stats["valid_fraction"]
    return record


def table_rows(epoch: int, summary: Summary) -> list[list[Any]]:
    """The summary table's rows (``TABLE_COLUMNS``): every key, layer and variable (S2 pairs
    as "a:b"), half-widths included."""
    return [[epoch, layer, variable, key, *(stats[c] for c in TABLE_COLUMNS[4:])]
            for key, layers in summary.items()
            for layer, values in layers.items()
            for variable, stats in values.items()]


def headline(summary: Summary) -> str | None:
    """The summary's headline value key (S1, shapley_normalized, effect_size), None if empty."""
    return next(iter(summary), None)


def run_summary(method: str, summary: Summary,
                top_shares: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """What the runs table shows of the latest analysis (``run.summary``).

    Args:
        method: the analysis method.
        summary: ``AnalysisResult.summary()``.
        top_shares: ``AnalysisResult.top_variable_shares()`` of the headline key.

    Returns:
        {``dominant/<method>/<layer>``: the variable of the largest median headline index
        ("none" without valid units), ``top_share/<method>/<layer>/<variable>``: the share
        of valid units whose largest index is that variable's}.
    """
    key = headline(summary)
    out: dict[str, Any] = {}
    for layer, values in (summary[key] if key else {}).items():
        out[dominant_key(method, layer)] = next(iter(ranked_variables(values)), "none")
    for layer, shares in top_shares.items():
        for variable, share in shares.items():
            out[f"top_share/{method}/{layer}/{variable}"] = share
    return out


def _finite(value: float | None) -> float | None:
    """A value for a chart: NaN (a layer without valid units) becomes a gap (None)."""
    return value if value is not None and math.isfinite(value) else None


def line_series_record(method: str, history: Sequence[tuple[int, Summary]]) -> dict[str, Any]:
    """One line-series chart per layer (x: epoch; a line per variable: its median headline
    index) and one of the valid fractions (a line per layer).

    Args:
        method: the analysis method.
        history: (epoch, summary) of every analysis so far, oldest first; the latest one's
            layers and variables are drawn (missing earlier values are gaps).

    Returns:
        {``sensitivity/<method>/lines/<layer>``, ``sensitivity/<method>/lines/valid_fraction``:
        wandb line-series charts}; {} without a headline key.
    """
    import wandb

    key = headline(history[-1][1])
    if key is None:
        return {}
    epochs = [epoch for epoch, _ in history]
    cells = [summary.get(key, {}) for _, summary in history]  # per epoch {layer: {var: stats}}
    latest = cells[-1]
    record: dict[str, Any] = {}
    for layer, values in latest.items():
        ys = [[_finite(c.get(layer, {}).get(v, {}).get("median")) for c in cells]
              for v in values]
        record[f"{PREFIX}/{method}/lines/{layer}"] = wandb.plot.line_series(
            xs=epochs, ys=ys, keys=list(values), title=f"{method} {layer}: median {key}",
            xname="epoch")
    fractions = [[_finite(next(iter(c.get(layer, {}).values()), {}).get("valid_fraction"))
                  for c in cells] for layer in latest]
    record[f"{PREFIX}/{method}/lines/valid_fraction"] = wandb.plot.line_series(
        xs=epochs, ys=fractions, keys=list(latest), title=f"{method}: share of valid units",
        xname="epoch")
    return record


class AnalysisLog:
    """What one W&B run receives of the analyses of one method (see the module docstring).

    Args:
        run: the wandb run (a training run's, or an analyze.py command's).
        method: the analysis method.
    """

    def __init__(self, run: Any, method: str) -> None:
        import wandb

        self.run = run
        self.method = method
        # One table object for the whole run: each log adds only the new rows (an increment).
        self.table = wandb.Table(columns=TABLE_COLUMNS, log_mode="INCREMENTAL")
        self._hidden: set[str] = set()
        define_metrics(run)

    def log(
        self,
        epoch: int | None,
        summary: Summary,
        heatmaps: Mapping[str, str | Path],
        top_shares: Mapping[str, Mapping[str, float]],
        history: Sequence[tuple[int, Summary]] = (),
    ) -> dict[str, Any]:
        """Log one analysis.

        Args:
            epoch: the training epoch; None (not in training) is logged as -1.
            summary: ``AnalysisResult.summary()``.
            heatmaps: {value key: PNG path}, as ``sensitivity.report.save_heatmaps`` returns.
            top_shares: ``AnalysisResult.top_variable_shares()``.
            history: (epoch, summary) of every analysis of the run so far, this one last; the
                line series are drawn from two epochs on.

        Returns:
            The logged record.
        """
        import wandb

        epoch = -1 if epoch is None else int(epoch)
        scalars = scalar_record(self.method, summary)
        for key in sorted(set(scalars) - self._hidden):
            # charted by the line series and the dashboard recipe, not one auto panel each
            self.run.define_metric(key, step_metric=STEP_METRIC, hidden=True)
            self._hidden.add(key)
        record: dict[str, Any] = {STEP_METRIC: epoch, **scalars}
        for key, path in heatmaps.items():
            record[heatmap_key(self.method, key)] = wandb.Image(
                str(path), caption=f"{self.method} {key}, epoch {epoch}")
        rows = table_rows(epoch, summary)
        for row in rows:
            self.table.add_data(*row)
        if rows:
            record[f"{PREFIX}/{self.method}/summary"] = self.table
        if len(history) > 1:
            record.update(line_series_record(self.method, history))
        self.run.log(record)
        self.run.summary.update(run_summary(self.method, summary, top_shares))
        return record


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
    names: RunNames,
    config: Mapping[str, Any],
) -> Iterator[Any]:
    """A W&B run under ``<run_dir>/wandb/``, finished (files flushed) on exit.

    Args:
        run_dir: the analysis run directory.
        mode: "online" or "offline" (``wandb_mode``).
        name: the run's name.
        names: its project, entity, group (the training run's for an analysis of its
            checkpoint), job type and tags (``wandb_config.resolve_names``).
        config: the command's complete resolved configuration.

    Yields:
        The wandb run.
    """
    import wandb

    run_dir = run_dir.resolve()  # absolute: the printed `wandb sync` works from anywhere
    run = wandb.init(
        dir=str(run_dir), mode=mode, project=names.project, entity=names.entity, name=name,
        job_type=names.job_type, group=names.group, tags=list(names.tags),
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


def comparison_record(
    tree: Mapping[str, Any], attrs: Mapping[str, Any], figures: Mapping[str, str | Path]
) -> dict[str, Any]:
    """What ``run.log`` receives for compare.

    Args:
        tree, attrs: ``sensitivity.stats.read_tree(results, "comparison", name)``.
        figures: {"scatter/<layer>", "covariates/<layer>", "decay": PNG path}, as
            ``sensitivity.comparison.save_figures`` returns.

    Returns:
        ``compare/<layer>/<variable>/spearman`` (the Spearman correlation of the variable's
        two maps over the units valid in both; NaN where undefined) and
        ``.../spearman_positions`` (across channels per position, averaged), the tables
        ``compare/table`` (layer, variable, both correlations, units valid in both) and
        ``compare/covariate_table`` (layer, analysis, value, variable, covariate, both
        correlations), and one image ``compare/<figure key>`` per figure.
    """
    import wandb

    variables = list(attrs["variables"])
    record: dict[str, Any] = {}
    rows, covariate_rows = [], []
    for layer in attrs["layers"]:
        entry = tree[layer]
        for g, variable in enumerate(variables):
            pooled = float(entry["spearman"][g, g])
            by_position = float(entry["spearman_positions"][g, g])
            record[f"compare/{layer}/{variable}/spearman"] = pooled
            record[f"compare/{layer}/{variable}/spearman_positions"] = by_position
            rows.append([layer, variable, pooled, by_position, int(entry["valid_units"])])
        for side, analysis, value in zip(SIDES, attrs["analyses"], attrs["values"],
                                         strict=True):
            against = entry[side]
            if "covariates" not in against:  # an analysis without the unit moments
                continue
            covariate_rows += [
                [layer, analysis, value, variable, covariate, float(against["covariates"][g, c]),
                 float(against["covariates_positions"][g, c])]
                for g, variable in enumerate(variables)
                for c, covariate in enumerate(attrs["covariates"])
            ]
    record["compare/table"] = wandb.Table(
        columns=["layer", "variable", "spearman", "spearman_positions", "valid_units"],
        data=rows)
    record["compare/covariate_table"] = wandb.Table(
        columns=["layer", "analysis", "value", "variable", "covariate", "spearman",
                 "spearman_positions"], data=covariate_rows)
    pair = " vs ".join(f"{a} {v}" for a, v in zip(attrs["analyses"], attrs["values"],
                                                   strict=True))
    for key, path in figures.items():
        record[f"compare/{key}"] = wandb.Image(str(path), caption=f"{pair}: {key}")
    return record


def suppression_record(result: Any, figure: str | Path | None = None) -> dict[str, Any]:
    """What ``run.log`` receives for a suppression experiment (``analyze.py suppress``).

    Args:
        result: the ``sensitivity.suppression.SuppressionResult``.
        figure: its accuracy-vs-strength PNG, if drawn.

    Returns:
        ``suppress/test/<method>/<condition>`` (top-1 test accuracy; method ``unmasked``,
        ``suppression``, ``random_mean``, ``random_sd``; condition ``clean`` or ``s<strength>``),
        ``suppress/val/unmasked_score`` and ``suppress/val/chosen_score``,
        ``suppress/units/<layer>`` (units the chosen mask touches), the tables
        ``suppress/table`` (every test accuracy: method, draw, strength, acc1) and
        ``suppress/candidates`` (every candidate's validation accuracies and score),
        ``suppress/figure`` and the step metric (-1).
    """
    import wandb

    strengths = [0.0, *(float(s) for s in result.strengths)]
    conditions = ["clean", *(f"s{s:g}" for s in strengths[1:])]
    random = np.asarray(result.test_random_acc1, dtype=float).reshape(-1, len(strengths))
    methods = {"unmasked": result.test_unmasked_acc1, "suppression": result.test_chosen_acc1}
    if len(random):
        methods.update(random_mean=random.mean(axis=0), random_sd=random.std(axis=0))
    record: dict[str, Any] = {
        STEP_METRIC: -1,
        "suppress/val/unmasked_score": float(result.val_unmasked_score),
        "suppress/val/chosen_score": float(result.val_score[result.chosen_index]),
    }
    for method, values in methods.items():
        for condition, value in zip(conditions, values, strict=True):
            record[f"suppress/test/{method}/{condition}"] = float(value)
    for layer, count in zip(result.layers, result.unit_counts, strict=True):
        record[f"suppress/units/{layer}"] = int(count)
    rows = [[method, -1, s, float(a)] for method in ("unmasked", "suppression")
            for s, a in zip(strengths, methods[method], strict=True)]
    rows += [["random", d, s, float(a)] for d, draw in enumerate(random)
             for s, a in zip(strengths, draw, strict=True)]
    record["suppress/table"] = wandb.Table(columns=["method", "draw", "strength", "acc1"],
                                           data=rows)
    record["suppress/candidates"] = wandb.Table(
        columns=["candidate", "val_score", *(f"val_acc1/{c}" for c in conditions)],
        data=[[str(label), float(score), *(float(a) for a in acc)] for label, score, acc in
              zip(result.candidates, result.val_score, result.val_acc1, strict=True)])
    if figure is not None:
        record["suppress/figure"] = wandb.Image(
            str(figure), caption=f"suppressing {result.variable}: {result.chosen}")
    return record
