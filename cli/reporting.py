"""How every analyze.py command ends: the "Outputs:" lines, its W&B run, its exit status.

Exit status (docs/CLI.md "Exit status"): 0 on success; 2 for bad input, with a message on
stderr (``input_error``) and nothing written; 1 when the results were written but W&B logging
failed (``log_wandb``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from callbacks.wandb_logging import analysis_run, define_metrics, log_results_artifact, run_lines

# What a command reports as bad input (exit status 2): checks of the options and data, and
# Lightning's refusal of an accelerator or strategy.
INPUT_ERRORS = (ValueError, FileNotFoundError, MisconfigurationException)
# Builds what a command logs to W&B, called only when it logs.
Record = Callable[[], dict[str, Any]]


def input_error(command: str | None, error: BaseException) -> int:
    """Report bad input: ``analyze.py [command]: error: <error>`` on stderr.

    Args:
        command: the command, or None for an analysis.
        error: the error (its message is printed).

    Returns:
        The exit status 2.
    """
    prefix = "analyze.py" if command is None else f"analyze.py {command}"
    print(f"{prefix}: error: {error}", file=sys.stderr)
    return 2


def print_outputs(lines: Sequence[str]) -> None:
    """Print the "Outputs:" block at the end of a command.

    Args:
        lines: one indented line each.
    """
    print("\n".join(["", "Outputs:", *(f"  {line}" for line in lines)]), flush=True)


def log_wandb(
    cfg: Any,
    mode: str | None,
    results: Path,
    name: str,
    config_text: str,
    record: Record,
    prefix: str | None = None,
) -> tuple[list[str], int]:
    """Log ``record()`` to a W&B run in ``<results dir>/wandb`` (rank zero), and the artifact.

    Online runs also upload the results file as an artifact.

    Args:
        cfg: the parsed options (``method``, ``wandb_project``).
        mode: "online" | "offline", or None for no logging.
        results: the results file; its folder holds the run.
        name: the W&B run's name.
        config_text: the command's configuration (YAML), the run's config.
        record: builds the logged dict.
        prefix: keys charted against ``analysis/epoch`` (``define_metrics``), None: none.

    Returns:
        (lines for "Outputs:", exit status): 1 when W&B failed (e.g. online without
        credentials); the results stay written.
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
