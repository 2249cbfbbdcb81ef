"""WandbTrainingRun: what a training run gives W&B besides its metrics and analyses.

- Every checkpoint it saves records the run (``wandb_config.CHECKPOINT_KEY``: run id, project,
  entity, group), so that an analysis of the checkpoint joins the run's group and names the
  checkpoint artifact it uses.
- At the end of the fit: ``final/val_acc1`` and ``final/val_acc5`` in the run summary (the
  runs table), and, with ``log_checkpoints``, the best and last checkpoints as versions of the
  artifact ``checkpoint-<run id>`` (by reference: they stay where they are; offline they are
  recorded now and declared on ``wandb sync``).

train.py adds it whenever it creates its W&B logger (``--wandb_checkpoints`` switches the
artifacts). Rank zero only: the other ranks neither write checkpoints nor hold the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from callbacks.wandb_artifacts import log_checkpoints
from callbacks.wandb_config import CHECKPOINT_KEY, run_identity
from callbacks.wandb_logging import wandb_run

FINAL_METRICS = ("val/acc1", "val/acc5")


def final_key(metric: str) -> str:
    """The run-summary key of a final training metric: ``val/acc1`` -> ``final/val_acc1``."""
    return f"final/{metric.replace('/', '_')}"


class WandbTrainingRun(pl.Callback):
    """Record the training run in its checkpoints; log final accuracies and checkpoints.

    Args:
        log_checkpoints: log the best and last checkpoints as artifacts at the end of fit.
    """

    def __init__(self, log_checkpoints: bool = True) -> None:
        super().__init__()
        self.log_checkpoints = log_checkpoints
        self.logged: list[Any] = []

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Add the run's identity to the checkpoint (rank zero writes the file)."""
        run = wandb_run(trainer)
        if run is not None:
            checkpoint[CHECKPOINT_KEY] = run_identity(run)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Final accuracies to the run summary; the checkpoints as artifacts."""
        run = wandb_run(trainer)
        if run is None:
            return
        final = {final_key(key): float(trainer.callback_metrics[key])
                 for key in FINAL_METRICS if key in trainer.callback_metrics}
        run.summary.update(final)
        if not self.log_checkpoints:
            return
        files: dict[str, Path] = {}
        for callback in trainer.checkpoint_callbacks:
            # a monitored ModelCheckpoint keeps the best; an unmonitored one the last state
            if callback.best_model_path:
                files["best" if callback.monitor else "last"] = Path(callback.best_model_path)
            if getattr(callback, "last_model_path", ""):
                files.setdefault("last", Path(callback.last_model_path))
        metadata = {"epoch": trainer.current_epoch, "global_step": trainer.global_step, **final}
        self.logged = log_checkpoints(run, files, metadata)
