"""Resume states of a masking evaluation (the analysis's guarantees, ``sensitivity.resume``).

With a state path and ``checkpoint_every = k > 0`` each rank saves, after every k-th suffix
forward of its schedule (``schedule.Schedule``; not after the last), its metric's counts, the
next forward and the seconds so far, atomically, with a fingerprint of everything that
determines the counts: the maps and valid units (exact digests), the layers and their unit
layouts, the variables, mask variables and configurations, the ties rule, the probe (digest of
the images and of the labels), the input augmentations, k, seed and problem, the model's
weights, the network's class count, top-k and confusion counting, and the batching (images per
batch, rows per forward, prefix reuse: they number the forwards), the rank and the world size.
A run with the same inputs skips the saved forwards and ends with exactly the counts of an
uninterrupted one (the counts are integers); a state of other inputs is a ValueError naming the
differing values. Each rank keeps its own file (``distributed.shard_path``); it is removed when
the evaluation completes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchmetrics import Metric

from sensitivity.distributed import shard_path
from sensitivity.layouts import UnitLayout
from sensitivity.masking.inputs import ProbeInputs
from sensitivity.masking.masks import MaskConfig
from sensitivity.probe import probe_fingerprint, tensor_digest
from sensitivity.resume import ResumeFile, load_metric_states, metric_states, model_digest

log = logging.getLogger(__name__)


def _digest(arrays: Mapping[str, np.ndarray] | None) -> str | None:
    """Exact digest of {layer: array} in layer order; None stays None."""
    if arrays is None:
        return None
    return tensor_digest([torch.as_tensor(np.ascontiguousarray(a)) for a in arrays.values()])


def masking_resume_fields(
    model: nn.Module,
    maps: Mapping[str, np.ndarray],
    valid: Mapping[str, np.ndarray] | None,
    layouts: Mapping[str, UnitLayout] | None,
    inputs: ProbeInputs,
    names: tuple[Sequence[str], Sequence[str], Sequence[MaskConfig]],
    settings: Mapping[str, Any],
    world: tuple[int, int],
) -> dict[str, Any]:
    """Every input that determines a rank's masking counts, as JSON-able values.

    Args:
        model: the network (its weights' digest).
        maps, valid, layouts: as ``evaluate_masking``.
        inputs: the probe inputs.
        names: (the maps' variables, the mask variables, the configurations).
        settings: the other settings that shape the counts or number the forwards (ties,
            batch_images, batch_rows, reuse_prefix, top_k, classes, confusion), JSON-able.
        world: (rank, world size).

    Returns:
        The fingerprint's contents (module docstring).
    """
    variables, chosen, configs = names
    problem = inputs.problem
    return {
        "kind": "masking",
        "layers": list(maps),
        "maps": _digest(maps),
        "valid": _digest(valid),
        "layouts": {layer: [u.layout, u.reduction, u.element]
                    for layer, u in (layouts or {}).items()},
        "variables": list(variables),
        "mask_variables": list(chosen),
        "configurations": [c.label for c in configs],
        "probe": probe_fingerprint(inputs.images),
        "labels": tensor_digest([inputs.labels]),
        "augmentations": list(inputs.augmentations),
        "k": inputs.k,
        "seed": inputs.seed,
        "problem": None if problem is None else problem.to_config(),
        "model": model_digest(model),
        "settings": dict(settings),
        "rank": world[0],
        "world_size": world[1],
    }


class MaskingCheckpoints:
    """A rank's resume file of one evaluation: loads a saved state, saves every k forwards.

    Args:
        state_path: the run's state file (this rank's is ``shard_path`` of it).
        fields: ``masking_resume_fields`` of this run.
        every: forwards between saves (k >= 1); 0 never saves (a saved state still resumes).
        metric: the metric whose counts are saved and restored.
        started: ``time.perf_counter()`` when the evaluation started.

    Attributes:
        next_forward: the first forward not yet counted (0, or a saved state's).
        seconds_before: seconds of the runs this one resumes.
    """

    def __init__(
        self,
        state_path: str | os.PathLike[str],
        fields: dict[str, Any],
        every: int,
        metric: Metric,
        started: float,
    ) -> None:
        if every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 (0: never save), got {every}")
        rank, world_size = fields["rank"], fields["world_size"]
        self.file = ResumeFile(shard_path(Path(state_path), rank, world_size), fields)
        self.every, self.metric, self.started = every, metric, started
        self.next_forward, self.seconds_before, self._saved = 0, 0.0, 0
        saved = self.file.load()
        if saved is not None:
            load_metric_states(metric, saved["states"]["accuracy"])
            self.next_forward = self._saved = int(saved["next_block"])
            self.seconds_before = float(saved["seconds"])
            log.info("resuming masking from %s at forward %d", self.file.path, self.next_forward)

    def after(self, done: int, total: int) -> None:
        """Save when k or more forwards were counted since the last save, but not after the
        last forward (the evaluation is then complete).

        Args:
            done: forwards counted so far (the next forward's number).
            total: the rank's forwards.
        """
        if self.every and done - self._saved >= self.every and done < total:
            self.file.save(done, self.seconds(), {"accuracy": metric_states(self.metric)})
            self._saved = done

    def seconds(self) -> float:
        """Wall time of the evaluation so far, resumed parts included (s)."""
        return self.seconds_before + time.perf_counter() - self.started

    def remove(self) -> None:
        """Delete the file (the evaluation is complete)."""
        self.file.remove()
