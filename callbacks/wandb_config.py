"""What describes a W&B run of this project: its names (project, group, job type, tags), the
blocks every run config carries (version, problem summary), and the training run a checkpoint
records.

Every run (train.py's, each analyze.py command's) gets: a ``group`` (the training run, so that
its analyses sit with it), a ``job_type`` of ``JOB_TYPES``, tags for the architecture and the
augmentation set, and a config that holds its complete resolved settings plus ``seed``,
``version`` (``version_info``) and ``problem`` (``problem_summary``). Names are checked with
W&B's rules before any compute (``check_run_names``). Train.py's checkpoints carry the
identity of their run (``CHECKPOINT_KEY``, ``recorded_run``), from which an analysis of them
takes its group and the checkpoint artifact it uses (docs/CLI.md "W&B"). No wandb import here.
"""

from __future__ import annotations

import functools
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_modules.weights import load_tensors
from sensitivity.augmentations import AUGMENTATION_SETS
from sensitivity.h5files import software_version
from sensitivity.problem import AugmentationProblem

ROOT = Path(__file__).resolve().parent.parent
JOB_TYPES = ("train", "analyze", "masking", "statistics")
# W&B's own limits: groups of at most 128 characters (the server refuses longer ones), tags and
# job types of 1-64; other characters than these in a group break its page's address (the
# group is part of the URL), so they are refused here rather than by a broken link later.
GROUP_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
NAME_LIMIT = 64
PROJECT_FORBIDDEN = "/\\#?%:"  # as wandb.Settings refuses them
# Where a train.py checkpoint records its W&B run: {run_id, project, entity, group}.
CHECKPOINT_KEY = "wandb"
# The options that name a run, of train.py and every analyze.py command: (name, type, help);
# None (the default) keeps the default of ``resolve_names``.
NAME_OPTIONS: tuple[tuple[str, Any, str], ...] = (
    ("wandb_entity", str | None,
     "W&B entity (user or team); default: the account's, or the one a --checkpoint records. "
     "Offline an unknown entity is no error (nothing is checked before wandb sync)"),
    ("wandb_group", str | None,
     "W&B group: 1-128 letters, digits, '_', '.', '-'; default: the training run's "
     "(<run_name>-version_<n>, recorded in its checkpoints), else the run directory's"),
    ("wandb_job_type", str | None,
     f"W&B job type (1-64 characters); default: one of {list(JOB_TYPES)} by command"),
    ("wandb_tags", list[str] | None,
     "W&B tags, e.g. '[baseline, sweep-3]' (1-64 characters each); default: the "
     "architecture and set-<1|2|custom>"),
)


@dataclass(frozen=True)
class RunNames:
    """Where a run goes and how it is filed.

    Attributes:
        project: the W&B project.
        entity: the W&B entity (user or team); None: the account's default. Offline an
            entity that does not exist is no error: nothing is checked until ``wandb sync``.
        group: the group (the training run's, for its analyses).
        job_type: one of ``JOB_TYPES`` (or the user's own).
        tags: the run's tags (architecture and augmentation set by default).
    """

    project: str
    entity: str | None
    group: str
    job_type: str
    tags: tuple[str, ...]


def check_run_names(
    project: str | None = None,
    group: str | None = None,
    job_type: str | None = None,
    tags: Sequence[str] | None = None,
    option: str = "--wandb_",
) -> None:
    """Refuse names W&B rejects, before any compute.

    Args:
        project, group, job_type, tags: the names given (None: not given).
        option: the prefix of the options that set them, for the message.

    Raises:
        ValueError: a project with one of ``/\\#?%:`` or over 128 characters; a group that is
            not 1-128 letters, digits, ``_``, ``.`` or ``-``; a job type or tag that is empty
            or over 64 characters.
    """
    if project is not None:
        bad = sorted({c for c in project if c in PROJECT_FORBIDDEN})
        if bad or not project or len(project) > 128:
            raise ValueError(f"{option}project {project!r}: W&B project names have 1-128 "
                             f"characters and none of {PROJECT_FORBIDDEN!r} (found {bad})")
    if group is not None and not GROUP_PATTERN.fullmatch(group):
        bad = sorted({c for c in group if not GROUP_PATTERN.fullmatch(c)})
        raise ValueError(
            f"{option}group {group!r}: a W&B group is 1-128 letters, digits, '_', '.' or '-' "
            f"(found {bad or f'{len(group)} characters'}); e.g. "
            f"{option}group {safe_name(group) or 'my-sweep'}"
        )
    for label, names in (("job_type", [job_type]), ("tags", tags or [])):
        for name in names:
            if name is not None and not 1 <= len(name) <= NAME_LIMIT:
                raise ValueError(f"{option}{label}: {name!r} has {len(name)} characters; W&B "
                                 f"takes 1-{NAME_LIMIT}")


def safe_name(text: str) -> str:
    """``text`` as a W&B group: characters other than letters, digits, ``_.-`` become ``_``.

    Args:
        text: any name (a run name, a directory).

    Returns:
        At most its last 128 characters (the version part stays).
    """
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", text)[-128:]


def default_group(run_dir: Path) -> str:
    """The group of the runs of a run directory: ``<parent>-<name>``, e.g. ``demo-version_0``.

    A training run's directory gives its group; analyze.py commands on a results file in a
    directory without a recorded training run share that directory's group.

    Args:
        run_dir: the run directory.

    Returns:
        A valid group name (``safe_name``).
    """
    run_dir = run_dir.resolve()
    return safe_name(f"{run_dir.parent.name}-{run_dir.name}")


@functools.lru_cache(maxsize=1)
def version_info() -> dict[str, Any]:
    """The software a run used: {"package": version, "commit": git HEAD or "unknown",
    "dirty": uncommitted changes to tracked files (None when git is unavailable)}."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"package": software_version(), "commit": commit or "unknown",
            "dirty": None if status is None else bool(status)}


def augmentation_set(augmentations: Sequence[str]) -> str:
    """"1" or "2" when the augmentations are a published set (in any order), else "custom"."""
    for number, names in AUGMENTATION_SETS.items():
        if sorted(names) == sorted(augmentations):
            return str(number)
    return "custom"


def problem_summary(
    problem: AugmentationProblem, method: str, n: int, design: str, interval: str
) -> dict[str, Any]:
    """The compact description of an analysis every run config carries (``problem``).

    Args:
        problem: the augmentation problem.
        method: the engine's method.
        n: the base size N (base points, trajectories, permutations, rows or images).
        design: the design's class name (``SobolDesign``, ...).
        interval: how the half-widths were computed (``AnalysisResult.interval``).

    Returns:
        {"method", "set" ("1", "2" or "custom"), "augmentations", "p_on" (one number when all
        are equal, else {name: p}), "auxiliaries", "N", "design", "interval"}.
    """
    p_on = dict(problem.p_on)
    values = set(p_on.values())
    return {
        "method": method,
        "set": augmentation_set(problem.augmentations),
        "augmentations": list(problem.augmentations),
        "p_on": values.pop() if len(values) == 1 else p_on,
        "auxiliaries": list(problem.auxiliaries),
        "N": int(n),
        "design": design,
        "interval": interval,
    }


def default_tags(arch: str | None, summary: Mapping[str, Any] | None) -> list[str]:
    """The tags of a run: its architecture and ``set-<set>`` (either left out when unknown)."""
    tags = [] if arch is None else [str(arch)[:NAME_LIMIT]]
    if summary is not None:
        tags.append(f"set-{summary['set']}")
    return tags


def run_identity(run: Any) -> dict[str, Any]:
    """What a checkpoint records of the run that saved it (``CHECKPOINT_KEY``).

    Args:
        run: a wandb run.

    Returns:
        {"run_id", "project", "entity", "group"} (entity None offline without one).
    """
    return {"run_id": run.id, "project": run.project, "entity": run.entity or None,
            "group": run.group or None}


def recorded_run(checkpoint: Path) -> dict[str, Any] | None:
    """The training run a checkpoint records (``run_identity``), if any.

    Args:
        checkpoint: a Lightning checkpoint file.

    Returns:
        The identity, or None for a checkpoint saved without a W&B run (or not by train.py).

    Raises:
        ValueError: an unreadable file (``load_tensors``).
    """
    state = load_tensors(checkpoint, "checkpoint")
    recorded = state.get(CHECKPOINT_KEY) if isinstance(state, dict) else None
    return dict(recorded) if isinstance(recorded, Mapping) and recorded.get("run_id") else None


def resolve_names(
    given: Mapping[str, Any],
    *,
    job_type: str,
    group: str,
    tags: Sequence[str],
    project: str,
    entity: str | None = None,
) -> RunNames:
    """The run's names: those given on the command line or in YAML win over the defaults.

    Args:
        given: {"wandb_project", "wandb_entity", "wandb_group", "wandb_job_type",
            "wandb_tags"} as parsed (None: not given).
        job_type, group, tags, project, entity: the defaults.

    Returns:
        The RunNames.

    Raises:
        ValueError: a name W&B rejects (``check_run_names``).
    """
    names = RunNames(
        project=given.get("wandb_project") or project,
        entity=given.get("wandb_entity") or entity,
        group=given.get("wandb_group") or group,
        job_type=given.get("wandb_job_type") or job_type,
        tags=tuple(tags if given.get("wandb_tags") is None else given["wandb_tags"]),
    )
    check_run_names(names.project, names.group, names.job_type, names.tags)
    return names
