"""How every analyze.py command ends: the "Outputs:" lines, its W&B run, its exit status.

Exit status (docs/CLI.md "Exit status"): 0 on success; 2 for bad input, with a message on
stderr (``input_error``) and nothing written; 1 when the results were written but W&B logging
failed (``log_wandb``).

Every command's W&B run is described by its results file (``file_description``: the model, the
problem and the analysis) and its options: the group of the training run a checkpoint records
(the analysed ``--checkpoint``, or the one named in the file), job type, tags, and the
complete options with the inferred values as config (``wandb_config``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from callbacks.wandb_artifacts import log_results_artifact, use_checkpoint
from callbacks.wandb_config import (
    check_run_names,
    default_group,
    default_tags,
    problem_summary,
    recorded_run,
    resolve_names,
    version_info,
)
from callbacks.wandb_logging import (
    DEFAULT_PROJECT,
    analysis_run,
    define_metrics,
    run_lines,
    wandb_mode,
)
from sensitivity.problem import AugmentationProblem
from sensitivity.store import ResultsStore

# What a command reports as bad input (exit status 2): checks of the options and data, and
# Lightning's refusal of an accelerator or strategy.
INPUT_ERRORS = (ValueError, FileNotFoundError, MisconfigurationException)
# Logs what a command computed into its W&B run, called only when it logs.
Log = Callable[[Any], None]
# The job type of each command (docs/CLI.md "W&B").
JOB_TYPES = {"masking": "masking", "single-class": "masking", "suppress": "masking",
             "contrast-stats": "statistics",
             "correlation": "statistics", "lda": "statistics", "compare": "statistics"}


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


def record_log(record: Callable[[], dict[str, Any]], prefix: str | None = None) -> Log:
    """The Log of a command that logs one record.

    Args:
        record: builds the record (called only when the command logs).
        prefix: keys charted against ``analysis/epoch`` (``define_metrics``), None: none.

    Returns:
        The Log.
    """

    def log(run: Any) -> None:
        if prefix is not None:
            define_metrics(run, prefix)
        run.log(record())

    return log


def wandb_settings(cfg: Namespace) -> str | None:
    """The W&B mode of a command, its run names checked: call it before any compute.

    Args:
        cfg: the parsed options (``wandb``, ``wandb_project``, ``wandb_group``, ...).

    Returns:
        "online", "offline", or None for no logging (``wandb_mode``).

    Raises:
        ValueError: an unknown WANDB_MODE, or a project, group, job type or tag W&B rejects.
    """
    mode = wandb_mode(cfg.wandb, cfg.wandb_project)
    if mode is not None:
        check_run_names(cfg.wandb_project, cfg.wandb_group, cfg.wandb_job_type, cfg.wandb_tags)
    return mode


def file_description(results: Path, analysis: str | None) -> dict[str, Any]:
    """What a results file says about a command's subject, for its W&B run.

    Args:
        results: the results file.
        analysis: the analysis the command concerns (None: none in particular).

    Returns:
        {"arch": the model, "problem": ``problem_summary`` (None without the analysis or a
        problem), "provenance": {model, weights, weights_sha256, dataset, image_size, seed},
        "layers": the analysis's layers (None without it), "checkpoint": the checkpoint the
        file's analyses were computed from, when that file exists (else None)}.
    """
    store = ResultsStore(results)
    meta = store.read_metadata()
    keys = ("model", "weights", "weights_sha256", "dataset", "image_size", "seed")
    out: dict[str, Any] = {"arch": meta.get("model"), "problem": None, "layers": None,
                           "provenance": {key: meta.get(key) for key in keys}}
    # a train.py checkpoint's analyses record "checkpoint <path>" as their weights
    weights = str(meta.get("weights") or "").split(" ", 1)
    source = Path(weights[1]) if weights[0] == "checkpoint" and len(weights) == 2 else None
    out["checkpoint"] = source if source is not None and source.is_file() else None
    if analysis is not None and "problem" in meta and store.has_analysis(analysis):
        attrs = store.analysis_attrs(analysis)
        problem = AugmentationProblem.from_config(json.loads(meta["problem"]["config"]))
        out["problem"] = problem_summary(problem, attrs["method"], attrs["n"],
                                         attrs.get("design", ""), attrs.get("interval", ""))
        out["layers"] = list(attrs.get("layers", []))
    return out


def run_config(cfg: Namespace, described: Mapping[str, Any], **inferred: Any) -> dict[str, Any]:
    """A command's W&B run config: every option (nulls kept: an option left to its default
    shows as such), the inferred values filled in, ``command``, ``seed``, ``arch``,
    ``version``, ``problem`` and ``provenance``.

    Args:
        cfg: the parsed options.
        described: ``file_description`` of its results file.
        **inferred: options the command resolved (e.g. ``layers``, ``name``, ``small_input``);
            they replace the given values.

    Returns:
        Plain values (paths as strings).
    """
    options = json.loads(json.dumps(cfg.as_dict(), default=str))
    for key in ("config", "__default_config__"):  # preset files: their values are the options
        options.pop(key, None)
    provenance = described["provenance"]
    # The problem options (preset, bounds, ...) as given, the resolved summary over them.
    problem = {**(options.get("problem") or {}), **(described["problem"] or {})}
    return {**options, **inferred, "command": cfg.method, "arch": described["arch"],
            "seed": options.get("seed", provenance.get("seed")), "version": version_info(),
            "problem": problem or None, "provenance": provenance}


def log_wandb(
    cfg: Namespace,
    mode: str | None,
    results: Path,
    run_name: str,
    log: Log,
    subject: str | None,
    **inferred: Any,
) -> tuple[list[str], int]:
    """Log a command to a W&B run in ``<results dir>/wandb`` (rank zero), with the artifacts.

    The run's group is the training run's that the analysed checkpoint records (the
    ``--checkpoint`` the command read, else the one the results file names), else the run
    directory's; an analysis that read a checkpoint declares it as its input
    (``use_checkpoint``). The results file is logged as an artifact (offline too).

    Args:
        cfg: the parsed options (``method``, ``checkpoint``, ``wandb_*``).
        mode: "online" | "offline", or None for no logging.
        results: the results file; its folder holds the run.
        run_name: the W&B run's name.
        log: logs the command's records into the run.
        subject: the analysis in the results file the command concerns.
        **inferred: resolved options for the run config (``run_config``).

    Returns:
        (lines for "Outputs:", exit status): 1 when W&B failed (e.g. online without
        credentials); the results stay written.
    """
    if mode is None:
        return [], 0
    from wandb.errors import Error as WandbError

    try:
        described = file_description(results, subject)
        read = getattr(cfg, "checkpoint", None)
        checkpoint = Path(read).expanduser() if read else described["checkpoint"]
        recorded = _recorded(checkpoint)
        names = resolve_names(
            cfg, job_type=JOB_TYPES.get(cfg.method, "analyze"),
            group=(recorded or {}).get("group") or default_group(results.parent),
            tags=default_tags(described["arch"], described["problem"]),
            project=(recorded or {}).get("project") or DEFAULT_PROJECT,
            entity=(recorded or {}).get("entity"),
        )
        with analysis_run(results.parent, mode, name=run_name, names=names,
                          config=run_config(cfg, described, **inferred)) as run:
            if recorded is not None and read:
                inputs = use_checkpoint(run, checkpoint, recorded)
                run.config.update({"inputs": {"checkpoint": inputs}})
            log(run)
            log_results_artifact(run, results, {"command": cfg.method, "analysis": subject})
            lines = run_lines(run)
    except (WandbError, OSError) as error:
        print(f"analyze.py {cfg.method}: error: W&B logging failed ({error}); the results are "
              f"written, W&B is not: fix the W&B setup, or pass --wandb false", file=sys.stderr)
        return ["W&B             failed (see stderr)"], 1
    return lines, 0


def _recorded(checkpoint: Path | None) -> dict[str, Any] | None:
    """The training run a checkpoint records; None for none, or for a file named in a results
    file that no longer reads as a checkpoint (the group falls back to the run directory's)."""
    if checkpoint is None:
        return None
    try:
        return recorded_run(checkpoint)
    except ValueError:
        return None
