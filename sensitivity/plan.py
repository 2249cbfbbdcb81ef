"""What an analysis will do, fixed and checked before its first forward: the ``AnalysisPlan``.

``plan_analysis`` makes every check the engine makes before running (settings, probe count,
shape and range, the design the problem can take, layer names) and builds, once per run, what
every later step reads: the design, each layer's unit shape and unit layout (one dry forward of
one zero image), the probe's size and the toggle counts the indices rest on. ``run_analysis``
takes the plan; so do the activation writer (rows, row kinds, unit shapes) and the results
file's settings (``config.analysis_attrs``), so that a run builds its design once and forwards
one dry image.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor, nn
from torch.utils.data import Dataset

from sensitivity.capture import ActivationCapture
from sensitivity.config import MIN_TOGGLES, EngineConfig, analysis_attrs, build_design
from sensitivity.designs import Design, ShapleyDesign, SobolDesign
from sensitivity.layouts import UnitLayout
from sensitivity.probe import ProbeImages
from sensitivity.problem import AugmentationProblem


class SmallSampleWarning(UserWarning):
    """N is too small for the problem: a variable changes in too few base points."""


@dataclass(frozen=True, eq=False)
class AnalysisPlan:
    """One analysis, fixed before its first forward (``plan_analysis`` builds it).

    Attributes:
        problem: the augmentation problem.
        config: the settings (validated).
        design: the design of ``config.method`` over ``problem``.
        probe: the checked probe images (``probe.size``: (H, W) in pixels).
        unit_shapes: {layer: unit shape}, in checkpoint order: what the accumulators, the
            activation writer and the result hold per row.
        layouts: {layer: unit layout} (output layout, reduction, element), in checkpoint
            order: what the result records of each layer.
        toggles: {variable: base points (trajectories) in which it changes}, among the first
            n (the first stage of an adaptive run); empty for the designs without pairs
            (``toggle_counts``).
        repeated: the layers whose module ran more than once in the dry forward (their last
            output is the one captured, so it cannot be handed on as it is made).
    """

    problem: AugmentationProblem
    config: EngineConfig
    design: Design
    probe: ProbeImages
    unit_shapes: dict[str, tuple[int, ...]]
    layouts: dict[str, UnitLayout]
    toggles: dict[str, int]
    repeated: tuple[str, ...] = ()

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the probe images, in pixels."""
        return self.probe.size

    @property
    def advice(self) -> str | None:
        """The small-N warning for these toggle counts (``small_n_advice``), or None."""
        return small_n_advice(self.toggles, self.config)

    @property
    def n_rows(self) -> int | None:
        """Rows the run will evaluate, or None when the data choose N (adaptive): what an
        activation writer checks its merged rows against."""
        return None if self.config.adaptive else self.design.n_rows

    def settings(self) -> dict[str, Any]:
        """The settings a results file records of this analysis (``config.analysis_attrs``)."""
        return analysis_attrs(self.config, self.design)


def hooked_module(model: nn.Module, layer_root: nn.Module | None = None) -> nn.Module:
    """Where the hooks go: ``layer_root``, else ``model.net`` (an ImageClassifier), else model."""
    if layer_root is not None:
        return layer_root
    net = getattr(model, "net", None)
    return net if isinstance(net, nn.Module) else model


def layer_units(
    model: nn.Module,
    image_size: tuple[int, int],
    config: EngineConfig,
    layer_root: nn.Module | None = None,
) -> tuple[dict[str, tuple[int, ...]], dict[str, UnitLayout], list[str]]:
    """The unit shapes and layouts the analysis will report, from one dry forward of ``model``.

    Args:
        model: the analysed model (``model(x)`` on (1, 3, H, W) images).
        image_size: (H, W) in pixels.
        config: its ``layers``, ``reduction`` and ``layouts``.
        layer_root: the module that names the layers (``hooked_module``).

    Returns:
        ({layer: unit shape}, {layer: unit layout}, the layers whose module ran more than once),
        in checkpoint order.

    Raises:
        ValueError: for unknown layer names (the message lists the valid ones), outputs of no
            detected or given layout, or reductions their layout cannot take.
    """
    capture = ActivationCapture(hooked_module(model, layer_root), config.layers, config.reduction,
                                layouts=config.layouts)
    shapes = capture.unit_shapes(image_size, forward=model)
    return shapes, {name: capture.layouts[name] for name in shapes}, capture.repeated


def layer_shapes(
    model: nn.Module,
    image_size: tuple[int, int],
    config: EngineConfig,
    layer_root: nn.Module | None = None,
) -> dict[str, tuple[int, ...]]:
    """The unit shapes the analysis will report (``layer_units`` without the layouts).

    Args:
        model, image_size, config, layer_root: as ``layer_units``.

    Returns:
        {layer: unit shape}, in checkpoint order.
    """
    return layer_units(model, image_size, config, layer_root)[0]


def plan_analysis(
    model: nn.Module,
    problem: AugmentationProblem,
    probe: Tensor | Dataset,
    config: EngineConfig,
    layer_root: nn.Module | None = None,
) -> AnalysisPlan:
    """Every check ``run_analysis`` makes before its first forward, and what it found.

    Lets a caller fail before creating any output, then build the activation writer and run
    the analysis from the same plan (``run_analysis(..., plan=plan)``).

    Args:
        model: ``model(x)`` maps images (B, 3, H, W) in [0, 1] to logits; one dry forward of a
            zero image (1, 3, H, W) finds the unit shapes, on the model's current device.
        problem: the augmentation problem.
        probe: the probe images, class-major: a tensor (N, 3, H, W) float in [0, 1] or a
            Dataset of such images or (image, label) tuples (``probe.ProbeImages``).
        config: the settings.
        layer_root: the module whose ``named_modules()`` names the layers (``hooked_module``).

    Returns:
        The plan.

    Raises:
        ValueError: for a bad config (e.g. Sobol n not a power of two), a probe of the wrong
            size, shape or range, a design the problem cannot take, or unknown layer names.
    """
    if not isinstance(config, EngineConfig):
        raise ValueError(f"config must be an EngineConfig, got {type(config).__name__}")
    config.validate()
    if not isinstance(problem, AugmentationProblem):
        raise ValueError(f"problem must be an AugmentationProblem, got {type(problem).__name__}")
    source = ProbeImages(probe, problem, cpu=config.num_workers > 0)
    design = build_design(problem, config)
    shapes, layouts, repeated = layer_units(model, source.size, config, layer_root)
    return AnalysisPlan(problem, config, design, source, shapes, layouts,
                        toggle_counts(problem, design, config.n), tuple(repeated))


def toggle_counts(
    problem: AugmentationProblem, design: Design, stop: int | None = None
) -> dict[str, int]:
    """What each variable's indices rest on.

    S1_j and ST_j are means over base points of terms that are zero wherever AB_j equals A in
    group j; Goda's steps likewise: only the base points where the variable changes count.

    Args:
        problem: decodes the pairs (which groups differ).
        design: a ``SobolDesign`` (pairs A, B) or ``ShapleyDesign`` (pairs x1, x2); decoded in
            chunks of about 2^20 values.
        stop: count the first ``stop`` blocks (an adaptive run's N); None: every block.

    Returns:
        {variable: base points (Sobol') or trajectories (Goda) in which it changes}; empty for
        the other designs.
    """
    if not isinstance(design, SobolDesign | ShapleyDesign):
        return {}
    counts = np.zeros(len(problem.groups), dtype=np.int64)
    step = max(1, 2**20 // max(1, problem.d))
    stop = design.n_blocks if stop is None else stop
    for start in range(0, stop, step):
        first, second = design.pair_rows(start, min(start + step, stop))
        counts += problem.changed_groups(first, second).sum(axis=0)
    return {name: int(c) for name, c in zip(problem.group_names, counts, strict=True)}


def small_n_advice(
    toggles: Mapping[str, int], config: EngineConfig, n: int | None = None
) -> str | None:
    """The warning to give when a variable changes in fewer than MIN_TOGGLES base points.

    Args:
        toggles: ``toggle_counts`` of the design's first n blocks.
        config: its method and n.
        n: the N the toggles were counted over (an adaptive run's N reached); None: config.n.

    Returns:
        The text, with the smallest n that reaches MIN_TOGGLES for every variable (a power of
        two for Sobol), or None when every variable reaches it.
    """
    if not toggles:
        return None
    short = {name: count for name, count in toggles.items() if count < MIN_TOGGLES}
    if not short:
        return None
    n = config.n if n is None else n
    rate = min(count for count in toggles.values()) / n
    needed = math.ceil(MIN_TOGGLES / rate) if rate > 0 else None
    if needed is not None and config.method == "sobol":
        needed = 1 << (needed - 1).bit_length()
    what = "base points" if config.method == "sobol" else "trajectories"
    listed = ", ".join(
        f"{name} {count}" for name, count in sorted(short.items(), key=lambda item: item[1])
    )
    fix = f"use n >= {needed}" if needed else "check the problem (a variable never changes)"
    return (
        f"n = {n} is too small for this problem: these variables change in fewer than "
        f"{MIN_TOGGLES} {what} (of {n}): {listed}; their indices rest on too few terms "
        f"to be trusted; {fix}"
    )
