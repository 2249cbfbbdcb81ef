"""Resume states of the engine and of masking: what a run has summed so far, and proof of what
it was summing.

A state file holds the accumulator states after some block, the next block, the seconds spent
and a fingerprint (sha256) of every input that determines the result: the settings (without
the ones that only change speed or output), the layers and unit shapes, the problem, the
design, the rank and world size, the batch boundaries, the image size and the exact digests of
the probe and of the model's weights (``resume_fields``; masking has its own,
``sensitivity.masking.resume``). A run with the same inputs continues after the saved
block; one with other inputs is refused naming the differing values (never a silent restart:
the file may hold days of work). Files are written atomically (temporary file + ``os.replace``).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from sensitivity.probe import tensor_digest
from sensitivity.provenance import describe_differences

if TYPE_CHECKING:
    from sensitivity.plan import AnalysisPlan

# 3: replicated Sobol' states, Shapley y0 sums.
STATE_VERSION = 3
# Settings that change the speed, the output or how often a state is saved, never the sums.
_NOT_FINGERPRINTED = ("checkpoint_every", "num_workers", "progress", "background")


def model_digest(model: nn.Module) -> str:
    """The exact identity of ``model``'s weights.

    Args:
        model: any module; its ``state_dict()`` (names and tensors) is hashed.

    Returns:
        "<sha256 of the names>:<sha256 of the tensors>".
    """
    state = model.state_dict()
    names = hashlib.sha256(json.dumps(list(state)).encode()).hexdigest()
    return f"{names}:{tensor_digest(list(state.values()))}"


def resume_fields(
    plan: AnalysisPlan, model: nn.Module, rank: int, world_size: int, blocks_per_batch: int
) -> dict[str, Any]:
    """Every input that determines a rank's sums, as JSON-able values (the fingerprint's
    contents, and what a refusal names when they differ).

    Args:
        plan: the analysis plan (settings, problem, design, unit shapes, probe).
        model: the analysed model (its weights' digest).
        rank, world_size: this process's shard.
        blocks_per_batch: design blocks per batch: the batch boundaries a resumed run must keep.

    Returns:
        {"config", "layers", "unit_shapes", "problem", "design", "rank", "world_size",
        "blocks_per_batch", "image_size", "probe", "model"}.
    """
    design, shapes, probe = plan.design, plan.unit_shapes, plan.probe
    return {
        "config": {k: v for k, v in plan.config.to_dict().items() if k not in _NOT_FINGERPRINTED},
        "layers": list(shapes),
        "unit_shapes": {k: list(v) for k, v in shapes.items()},
        "problem": plan.problem.to_config(),
        "design": [type(design).__name__, design.n_blocks, design.block_size, design.d],
        "rank": rank,
        "world_size": world_size,
        "blocks_per_batch": blocks_per_batch,
        "image_size": [probe.height, probe.width],
        "probe": probe.fingerprint(),
        "model": model_digest(model),
    }


def metric_states(metric: Metric) -> dict[str, Tensor]:
    """A metric's states to save: {state name: CPU tensor copy} (this rank's, unsynced)."""
    return {name: value.detach().to("cpu").clone() for name, value in metric.metric_state.items()}


def load_metric_states(metric: Metric, saved: Mapping[str, Tensor], key: str = "") -> None:
    """Restore ``metric_states`` of a run with the same inputs into ``metric``.

    Args:
        metric: the metric to restore.
        saved: its saved states.
        key: the metric's name in the error message ("<key>.<state>"), if any.

    Raises:
        ValueError: a saved state missing, or of another shape than the current one.
    """
    for name, current in metric.metric_state.items():
        value = saved.get(name)
        if value is None or value.shape != current.shape:
            raise ValueError(
                f"saved state {key + '.' if key else ''}{name} has shape "
                f"{None if value is None else tuple(value.shape)}, expected "
                f"{tuple(current.shape)}"
            )
        setattr(metric, name, value.to(current.device, current.dtype))


def save_state(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically: a killed writer leaves the previous file.

    Args:
        path: the state file; its folder is created.
        payload: what ``torch.save`` writes (tensors, numbers, strings, dicts).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ResumeFile:
    """One rank's resume state file and the fingerprint of the inputs it belongs to.

    Args:
        path: the rank's state file (``distributed.shard_path`` of the run's).
        fields: ``resume_fields`` of this run.
    """

    def __init__(self, path: Path, fields: dict[str, Any]) -> None:
        self.path = path
        self.fields = fields
        self.fingerprint = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def load(self) -> dict[str, Any] | None:
        """The saved state, if the file exists.

        Returns:
            None without a file, else {"version", "fingerprint", "fields", "next_block" (the
            first block, masking: forward, not yet summed), "stage" (the stage of an adaptive
            run it belongs to; absent in states of fixed runs written before adaptive runs
            existed: 0),
            "seconds" (wall time so far, s), "states" (the accumulators' or metrics'
            states)}.

        Raises:
            ValueError: for an unreadable file, another engine version, or a state of other
                inputs (naming the differing fields with their saved and current values).
        """
        path = self.path
        if not path.exists():
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # any unreadable file gets the same advice
            # Only the type: torch's text for a corrupt file advises weights_only=False (unsafe).
            raise ValueError(
                f"cannot read the resume state {path} ({type(error).__name__}: truncated or "
                f"corrupt); delete it to start afresh"
            ) from error
        if not isinstance(saved, dict) or saved.get("version") != STATE_VERSION:
            raise ValueError(
                f"{path} is not a resume state of this engine; delete it to start afresh"
            )
        if saved.get("fingerprint") != self.fingerprint:
            differ = describe_differences(saved.get("fields", {}), self.fields)
            raise ValueError(
                f"the resume state {path} was written by a different analysis (differs in: "
                f"{differ or 'unknown'}); rerun with the same model, probe, problem and "
                f"settings to continue it, or delete the file to start afresh"
            )
        return saved

    def save(
        self, next_block: int, seconds: float, states: dict[str, dict[str, Tensor]],
        stage: int = 0,
    ) -> None:
        """Save the sums so far, atomically (``save_state``).

        Args:
            next_block: the first block (masking: forward) not yet summed.
            seconds: wall time of the analysis so far, earlier resumed parts included (s).
            states: the accumulators' states (``LayerAccumulators.state()``), or {metric key:
                ``metric_states``}.
            stage: the stage ``next_block`` belongs to (``adaptive.stages``; 0 for a fixed N).
        """
        save_state(self.path, {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "fields": self.fields,
            "next_block": next_block,
            "stage": stage,
            "seconds": seconds,
            "states": states,
        })

    def remove(self) -> None:
        """Delete the file (the analysis is complete)."""
        self.path.unlink(missing_ok=True)
