"""Rank zero's publishing of one analysis into a run directory, and new run directories.

``publish_analysis`` is the one write path of an analysis, for ``analyze.py`` (through
``lightning_modules.analysis.AnalysisModule``) and the training callback alike: merge the
ranks' activation shards, write the root metadata and /problem, the analysis (with the
settings its result carries), link the activation file, save the run's config.yaml and the
heatmaps. Each step is atomic on its own (docs/RESULTS_FORMAT.md). ``next_version_dir`` names
the ``version_<n>`` run directories of both entry points. No Lightning, no wandb.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sensitivity.activations import merge_shards
from sensitivity.distributed import shard_path
from sensitivity.report import save_heatmaps
from sensitivity.results import AnalysisResult
from sensitivity.store import ResultsStore


def next_version_dir(parent: Path, create: bool = False) -> Path:
    """``parent/version_<n>`` with the smallest n not yet taken.

    Args:
        parent: the folder of the versions (created with ``create``).
        create: make the directory, atomically: of two runs choosing at once, the one whose
            ``mkdir`` fails takes the next n (analyze.py). Without it the directory is only
            named: train.py creates it after the checks that may still refuse the run, and
            every DDP rank it starts must name the same one.

    Returns:
        The run directory.
    """
    if create:
        parent.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        candidate = parent / f"version_{n}"
        n += 1
        if candidate.exists():
            continue
        if not create:
            return candidate
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:  # another run took it since the check
            continue


@dataclass(frozen=True)
class Published:
    """Where an analysis went.

    Attributes:
        results: the results file.
        heatmaps: {value key: PNG path} (``report.save_heatmaps``; empty for "variance").
        activations: the merged raw-activation file, None without activation storage.
    """

    results: Path
    heatmaps: dict[str, Path]
    activations: Path | None


def publish_analysis(
    store: ResultsStore,
    name: str,
    result: AnalysisResult,
    *,
    figures: Path,
    attrs: Mapping[str, Any],
    overwrite: bool,
    metadata: Mapping[str, Any] | None = None,
    activations: Path | None = None,
    world_size: int = 1,
    config_text: str | None = None,
) -> Published:
    """Write one analysis and everything that goes with it (rank zero, after every rank's
    activation shard is on disk).

    Args:
        store: the results file.
        name: the analysis name (/analyses/<name>, file names).
        result: the global result; its ``settings`` become attributes of the analysis.
        figures: the heatmaps' folder (created when there is a figure).
        attrs: further attributes of the analysis (provenance, config text, ...).
        overwrite: replace an analysis (and activation link) of that name.
        metadata: keyword arguments of ``ResultsStore.write_metadata`` (model, dataset,
            image_size, seed, problem, ...); None leaves the root metadata as it is (a
            training run writes it with its first analysis).
        activations: the merged raw-activation file; with ``world_size`` > 1 it is merged from
            the ranks' shards (``distributed.shard_path``), which are removed.
        world_size: the processes that wrote activation shards.
        config_text: the run's configuration, saved as ``config.yaml`` next to the results
            file (only now, with its results: a refused or killed run leaves the previous one).

    Returns:
        The ``Published`` paths.

    Raises:
        ValueError: an analysis of that name exists and ``overwrite`` is False, or an attribute
            would overwrite a standard one.
    """
    if activations is not None and world_size > 1:
        shards = [shard_path(activations, rank, world_size) for rank in range(world_size)]
        merge_shards(shards, activations, remove_shards=True)
    if metadata is not None:
        store.write_metadata(**metadata)
    store.write_analysis(name, result, attrs=attrs, overwrite=overwrite)
    if activations is not None:
        store.add_activations(name, activations, overwrite=overwrite)
    if config_text:
        (store.path.parent / "config.yaml").write_text(config_text)
    heatmaps = save_heatmaps(result, figures, name)
    return Published(store.path, heatmaps, activations)
