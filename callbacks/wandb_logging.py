"""Weights & Biases logging of sensitivity analyses (rank zero, through the trainer's WandbLogger).

Key scheme (ARCHITECTURE.md "Logging"), all against the step metric ``analysis/epoch``:

- ``sensitivity/<method>/<layer>/<variable>/<key>``: the mean over the layer's units of the index
  ``key`` of ``variable`` (a group: augmentation, order, class, image). ``key`` is each value key
  of the method (``AnalysisResult.value_keys``): ``S1``, ``ST`` (sobol); ``shapley_normalized``
  (shares, sum 1), ``shapley`` (variance units) (shapley); ``effect_size``, ``mean_diff``
  (contrast). The "variance" method has no per-variable index and logs only its epoch.
- ``sensitivity/<method>/heatmap/<key>``: the heatmap PNG (layers x variables) as a wandb.Image.
- ``sensitivity/<method>/summary``: a wandb.Table with columns epoch, layer, variable, index
  (the key), value: every scalar above in one table per analysis.
- ``analysis/epoch``: the training epoch of the analysis.

``define_metric("sensitivity/*", step_metric="analysis/epoch")`` makes W&B chart these against the
epoch instead of the trainer's global step. The results file is uploaded as an artifact of type
``sensitivity-results`` only when the run is online (an offline run would copy it into the run
directory, next to the original). wandb is imported only when a WandbLogger is present.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger

from sensitivity.results import AnalysisResult

STEP_METRIC = "analysis/epoch"
PREFIX = "sensitivity"
TABLE_COLUMNS = ["epoch", "layer", "variable", "index", "value"]
ARTIFACT_TYPE = "sensitivity-results"


def metric_key(method: str, layer: str, variable: str, key: str) -> str:
    """``sensitivity/<method>/<layer>/<variable>/<key>``, e.g. ``sensitivity/sobol/fc/hue/ST``."""
    return f"{PREFIX}/{method}/{layer}/{variable}/{key}"


def wandb_run(trainer: pl.Trainer) -> Any | None:
    """The wandb run of the trainer's first WandbLogger on global rank zero, else None."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return logger.experiment
    return None


def define_metrics(run: Any) -> None:
    """Chart every ``sensitivity/*`` key against ``analysis/epoch``."""
    run.define_metric(STEP_METRIC)
    run.define_metric(f"{PREFIX}/*", step_metric=STEP_METRIC)


def analysis_record(
    result: AnalysisResult, heatmaps: Mapping[str, str | Path]
) -> dict[str, Any]:
    """The dict that ``run.log`` receives for one analysis (module docstring).

    heatmaps: {value key: PNG path} (``sensitivity.report.save_heatmaps`` output by key).
    """
    import wandb

    method = result.method
    epoch = -1 if result.epoch is None else int(result.epoch)
    record: dict[str, Any] = {STEP_METRIC: epoch}
    rows = []
    for key, layers in result.summary().items():
        for layer, values in layers.items():
            for variable, value in values.items():
                record[metric_key(method, layer, variable, key)] = value
                rows.append([epoch, layer, variable, key, value])
    for key, path in heatmaps.items():
        record[f"{PREFIX}/{method}/heatmap/{key}"] = wandb.Image(
            str(path), caption=f"{method} {key}, epoch {epoch}"
        )
    if rows:
        record[f"{PREFIX}/{method}/summary"] = wandb.Table(columns=TABLE_COLUMNS, data=rows)
    return record


def log_results_artifact(run: Any, path: Path) -> bool:
    """Upload the results file as an artifact when the run is online; True if it was."""
    if run.offline or run.disabled or not path.is_file():
        return False
    import wandb

    artifact = wandb.Artifact(f"sensitivity-{run.id}", type=ARTIFACT_TYPE)
    artifact.add_file(str(path))
    run.log_artifact(artifact)
    return True
