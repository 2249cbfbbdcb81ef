"""When the analysis callbacks run and where they write; shared by every callback here."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl


def epoch_is_due(trainer: pl.Trainer, every_n_epochs: int) -> bool:
    """Whether the epoch ending now (``trainer.current_epoch``) is analysed.

    The last epoch of the fit (max_epochs, max_steps or an early stop) always is, so that the
    final weights are analysed whatever the period.

    Args:
        trainer: the fitting trainer.
        every_n_epochs: the period k: epochs k-1, 2k-1, ... (0-based) are due.

    Returns:
        True when due.
    """
    epoch = trainer.current_epoch
    last = (
        trainer.should_stop
        or (trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs)
        or 0 <= trainer.max_steps <= trainer.global_step
    )
    return (epoch + 1) % every_n_epochs == 0 or last


def run_directory(trainer: pl.Trainer, output_dir: str | Path | None) -> Path:
    """The run directory as rank zero resolves it, on every rank (a collective).

    Every rank gets the same path, so shards and results meet in one place under DDP.

    Args:
        trainer: the fitting trainer.
        output_dir: the directory; None: ``trainer.default_root_dir``.

    Returns:
        The absolute path.
    """
    root = Path(output_dir or trainer.default_root_dir).expanduser().resolve()
    return Path(trainer.strategy.broadcast(str(root), src=0))
