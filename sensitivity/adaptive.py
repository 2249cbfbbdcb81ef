"""Adaptive N: grow the design until the intervals are as narrow as asked (METHOD.md "Adaptive N").

An adaptive run (``EngineConfig.target_halfwidth``) builds the design of ``max_n`` blocks in
stages of doubling size (``designs.doubling_stages``: [0, n), [n, 2n), [2n, 4n), ...): the
first m blocks of every stage boundary m are the design of m blocks (Sobol': the same scrambled
sequences, each replicate extended; Goda and permutations: trajectories b < m; the balanced
discrete pairs nested). The engine runs one stage at a time, each rank its shard of the stage's
blocks, then computes the accumulators (synced sums under DDP: every rank sees the same
half-widths) and asks ``decide`` whether to stop. The half-width of a run is the largest, over
layers, of each layer's ``halfwidth_quantile`` quantile of the half-widths of its valid units'
main indices: S1 and ST (Sobol'), the shares ``shapley_normalized`` (Shapley), every variable.

Pure numpy: no torch, Lightning or wandb.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sensitivity.config import EngineConfig
from sensitivity.designs import doubling_stages

if TYPE_CHECKING:
    from sensitivity.results import AnalysisResult


class HalfwidthWarning(UserWarning):
    """An adaptive run reached max_n with its half-width still above the target."""


@dataclass(frozen=True)
class Decision:
    """What an adaptive run does after a stage.

    Attributes:
        n: N reached (blocks summed so far).
        halfwidth: the run's half-width at n (``run_halfwidth``; nan without a valid unit).
        grow: whether to run the next stage.
        text: the progress line, e.g. "half-width 0.031 > target 0.02 at N=256, growing to
            512".
        warning: the warning to give when max_n is reached short of the target, else None.
    """

    n: int
    halfwidth: float
    grow: bool
    text: str
    warning: str | None

    @property
    def met(self) -> bool:
        """Whether the half-width is at most the target (False for nan)."""
        return not self.grow and self.warning is None

    def attrs(self) -> dict[str, Any]:
        """What the results file records of the outcome: "halfwidth_reached", "target_met"."""
        return {"halfwidth_reached": self.halfwidth, "target_met": self.met}


def stages(config: EngineConfig) -> list[tuple[int, int]]:
    """The block ranges a run processes one after the other.

    Args:
        config: the settings.

    Returns:
        [(start, stop), ...]: one stage [0, n) for a fixed N, the doubling stages from n to
        max_n for an adaptive run.
    """
    return doubling_stages(config.n, config.design_n)


# The indices whose half-widths an adaptive run drives down, per method.
MAIN_KEYS = {"sobol": ("S1_conf", "ST_conf"), "shapley": ("shapley_normalized_conf",)}


def main_halfwidths(
    method: str, arrays: Mapping[str, np.ndarray], flag: np.ndarray
) -> np.ndarray:
    """The half-widths of one layer's main indices at its valid units.

    Args:
        method: "sobol" or "shapley".
        arrays: the layer's half-widths by key, at least ``MAIN_KEYS[method]``, each (G, *u).
        flag: (*u) the layer's unit flags.

    Returns:
        (k,) float64: S1_conf and ST_conf (Sobol') or shapley_normalized_conf (Shapley) of every
        variable at every unit whose flag is 0 (valid).
    """
    valid = np.asarray(flag) == 0
    return np.concatenate([np.asarray(arrays[key])[:, valid].ravel()
                           for key in MAIN_KEYS[method]])


def largest_quantile(per_layer: Iterable[np.ndarray], quantile: float) -> float:
    """The largest, over layers with a valid unit, of the layer's ``quantile`` quantile (numpy's
    linear interpolation) of ``main_halfwidths``; nan when no layer has a valid unit."""
    values = [float(np.quantile(v, quantile)) for v in per_layer if v.size]
    return max(values) if values else math.nan


def run_halfwidth(config: EngineConfig, computed: Mapping[str, tuple[Any, Any]]) -> float:
    """The half-width an adaptive run compares with its target (``largest_quantile``).

    Args:
        config: its method and ``halfwidth_quantile``.
        computed: ``LayerAccumulators.compute()``, {layer: (main result, moments)}.

    Returns:
        The half-width; nan when no layer has a valid unit.
    """
    keys = MAIN_KEYS[config.method]
    return largest_quantile(
        (main_halfwidths(config.method, {k: getattr(main, k) for k in keys}, main.flag)
         for main, _ in computed.values()),
        config.halfwidth_quantile,
    )


def result_halfwidth(result: AnalysisResult, quantile: float) -> float:
    """``run_halfwidth`` of a finished sobol or shapley result (e.g. of a fixed N).

    Args:
        result: the analysis.
        quantile: the ``halfwidth_quantile`` to apply.

    Returns:
        The half-width; nan when no layer has a valid unit.
    """
    return largest_quantile(
        (main_halfwidths(result.method, result.layers[layer], result.flags[layer])
         for layer in result.layers),
        quantile,
    )


def needed_n(config: EngineConfig, halfwidth: float, n: int) -> int | None:
    """The N at which the half-width would meet the target, extrapolated as 1 / sqrt(N).

    Args:
        config: the target, and the method (Sobol' N is a power of two).
        halfwidth: the half-width at n.
        n: the N it was reached at.

    Returns:
        ceil(n (halfwidth / target)^2), the next power of two for Sobol'; None for a nan
        half-width.
    """
    if not math.isfinite(halfwidth):
        return None
    needed = math.ceil(n * (halfwidth / float(config.target_halfwidth)) ** 2)
    return 1 << (needed - 1).bit_length() if config.method == "sobol" else needed


def decide(
    config: EngineConfig, computed: Mapping[str, tuple[Any, Any]], stage: tuple[int, int],
    last: bool,
) -> Decision:
    """Stop or grow after a stage (every rank decides alike: ``computed`` holds global sums).

    Args:
        config: an adaptive run's settings.
        computed: ``LayerAccumulators.compute()`` after the stage.
        stage: the stage's blocks [start, stop); stop is the N reached.
        last: whether it was the last stage (N = max_n).

    Returns:
        The decision; grow only when the target is not met and a stage is left.
    """
    n, eps = stage[1], float(config.target_halfwidth)
    halfwidth = run_halfwidth(config, computed)
    shown = "nan (no valid unit)" if math.isnan(halfwidth) else f"{halfwidth:.3g}"
    if halfwidth <= eps:
        return Decision(n, halfwidth, False, f"half-width {shown} <= target {eps:g} at N={n}: "
                        f"done", None)
    if not last:
        grown = min(2 * n, config.design_n)
        return Decision(n, halfwidth, True, f"half-width {shown} > target {eps:g} at N={n}, "
                        f"growing to {grown}", None)
    needed = needed_n(config, halfwidth, n)
    advice = (f"about N = {needed} would reach it (half-widths shrink as 1/sqrt(N)): raise "
              f"max_n" if needed else "no unit is valid yet: raise max_n or check the layers")
    warning = (f"adaptive {config.method} stopped at max_n = {n} with the "
               f"{config.halfwidth_quantile:g} quantile of the half-widths at {shown}, above "
               f"the target {eps:g}; {advice}")
    return Decision(n, halfwidth, False, f"half-width {shown} > target {eps:g} at N={n} = "
                    f"max_n: stopped", warning)
