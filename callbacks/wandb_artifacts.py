"""W&B artifacts of this project: results files, checkpoints, and the lineage between them.

Artifacts work offline: ``run.log_artifact`` records them in the offline run, and ``wandb sync``
uploads them later. A file up to ``REFERENCE_ABOVE`` bytes is copied into the artifact (W&B
stages a copy at once, so a results file that later commands extend still uploads as it was);
a larger one is added by reference (``file://`` with its MD5: nothing is copied or uploaded,
the artifact records where the file is and what it held).

Lineage: train.py logs each checkpoint as a version of ``checkpoint-<training run id>`` (type
``model``, one entry ``model.ckpt``); an analysis of a checkpoint builds the same artifact
from the file it read, whose digest depends only on the entry's name and content, so it names
that very version. An online analysis run declares it with ``run.use_artifact`` (train ->
checkpoint -> analysis in the lineage graph). W&B cannot declare an input offline
(``use_artifact`` raises in offline mode): an offline run records the artifact and its digest
in its config (``inputs.checkpoint``), and ``tools/wandb_dashboard.py link`` declares the use
after ``wandb sync`` (docs/CLI.md "W&B"). wandb is imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from callbacks.wandb_config import default_group

RESULTS_TYPE = "sensitivity-results"
CHECKPOINT_TYPE = "model"
CHECKPOINT_ENTRY = "model.ckpt"
# Above this a file is logged by reference: checkpoints (a ResNet18 with its AdamW state is
# about 130 MB) and full-map results files; copying them into every offline run's staging
# area would double the disk they take.
REFERENCE_ABOVE = 64 * 2**20


def file_artifact(
    name: str, kind: str, path: Path, entry: str, metadata: Mapping[str, Any] | None = None
) -> Any:
    """A draft artifact holding one file, copied or by reference by its size.

    Args:
        name: the artifact (collection) name.
        kind: the artifact type.
        path: the file.
        entry: its name inside the artifact.
        metadata: the artifact's metadata.

    Returns:
        The ``wandb.Artifact`` (not yet logged).
    """
    import wandb

    artifact = wandb.Artifact(name, type=kind, metadata=dict(metadata or {}))
    if path.stat().st_size > REFERENCE_ABOVE:
        artifact.add_reference(path.resolve().as_uri(), name=entry)
    else:
        artifact.add_file(str(path), name=entry)
    return artifact


def results_artifact_name(path: Path) -> str:
    """``<file stem>-<run directory group>`` (e.g. ``results-analysis-run``,
    ``sensitivity-demo-version_0``): one collection per results file, a version per log."""
    return f"{path.stem}-{default_group(path.parent)}"


def log_results_artifact(run: Any, path: Path, metadata: Mapping[str, Any] | None = None
                         ) -> Any | None:
    """Log a results file as an artifact of type ``sensitivity-results`` (offline too).

    Args:
        run: a wandb run.
        path: the results file.
        metadata: the artifact's metadata (e.g. the analyses it holds).

    Returns:
        The logged artifact, or None (disabled run, no file).
    """
    if run.disabled or not path.is_file():
        return None
    artifact = file_artifact(results_artifact_name(path), RESULTS_TYPE, path, path.name,
                             metadata)
    return run.log_artifact(artifact)


def checkpoint_artifact(path: Path, run_id: str, metadata: Mapping[str, Any] | None = None
                        ) -> Any:
    """The artifact of a train.py checkpoint: ``checkpoint-<run id>``, entry ``model.ckpt``.

    Args:
        path: the checkpoint file.
        run_id: the id of the training run that saved it.
        metadata: the artifact's metadata.

    Returns:
        A draft ``wandb.Artifact`` whose digest identifies the file's content.
    """
    return file_artifact(f"checkpoint-{run_id}", CHECKPOINT_TYPE, path, CHECKPOINT_ENTRY,
                         metadata)


def log_checkpoints(run: Any, checkpoints: Mapping[str, Path], metadata: Mapping[str, Any]
                    ) -> list[Any]:
    """Log checkpoint files as versions of ``checkpoint-<run id>``, aliased by kind.

    Args:
        run: the training run.
        checkpoints: {alias ("best", "last"): file}; one file under several aliases is
            logged once with all of them.
        metadata: metadata of every version (e.g. the epoch and val/acc1).

    Returns:
        The logged artifacts.
    """
    by_file: dict[Path, list[str]] = {}
    for alias, path in checkpoints.items():
        if path.is_file():
            by_file.setdefault(path.resolve(), []).append(alias)
    logged = []
    for path, aliases in by_file.items():
        artifact = checkpoint_artifact(path, run.id, {**metadata, "file": path.name})
        logged.append(run.log_artifact(artifact, aliases=[*aliases, "latest"]))
    return logged


def use_checkpoint(run: Any, path: Path, recorded: Mapping[str, Any]) -> dict[str, Any]:
    """Declare the checkpoint an analysis read as an input of its run (see the module doc).

    Args:
        run: the analysis run.
        path: the checkpoint file it analysed.
        recorded: the training run the checkpoint records (``wandb_config.recorded_run``).

    Returns:
        {"artifact", "digest", "path", "training_run", "used"}: the run config's
        ``inputs.checkpoint``; "used" is True when ``use_artifact`` declared it (online).
    """
    artifact = checkpoint_artifact(path, recorded["run_id"])
    used = not (run.offline or run.disabled)
    if used:
        run.use_artifact(artifact, aliases=[])
    return {"artifact": artifact.name, "digest": artifact.digest, "path": str(path.resolve()),
            "training_run": recorded["run_id"], "used": used}
