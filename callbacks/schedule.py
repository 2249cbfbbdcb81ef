"""When the analysis callbacks run and where they write; shared by every callback here."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl


def epoch_is_due(trainer: pl.Trainer, every_n_epochs: int) -> bool:
    """Whether the epoch ending now (``trainer.current_epoch``) is analysed: every
    ``every_n_epochs``-th epoch, and always the last one of the fit (max_epochs, max_steps or an
    early stop), so that the final weights are analysed whatever the period."""
    epoch = trainer.current_epoch
    last = (
        trainer.should_stop
        or (trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs)
        or 0 <= trainer.max_steps <= trainer.global_step
    )
    return (epoch + 1) % every_n_epochs == 0 or last


def run_directory(trainer: pl.Trainer, output_dir: str | Path | None) -> Path:
    """``output_dir`` (default ``trainer.default_root_dir``) as rank zero resolves it; every rank
    gets the same path, so shards and results meet in one place under DDP."""
    root = Path(output_dir or trainer.default_root_dir).expanduser().resolve()
    return Path(trainer.strategy.broadcast(str(root), src=0))
