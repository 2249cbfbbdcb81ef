"""Each layer's accumulators for one analysis, and their results as the results format's arrays.

Per layer: the method's accumulator (Sobol, Goda or permutation Shapley, contrast; none for
"variance") and a ``MomentsAccumulator``. They are torchmetrics Metrics with summed states, so
``compute()`` under an initialised process group gives every rank the global sums; their
states are what a resume file saves. ``layer_arrays`` turns one layer's computed results into
``AnalysisResult`` arrays (sensitivity.results), ``analysis_result`` all of them into the
analysis's result.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from sensitivity.config import EngineConfig
from sensitivity.estimators import (
    ContrastAccumulator,
    MomentsAccumulator,
    PermutationShapleyAccumulator,
    ShapleyAccumulator,
    SobolAccumulator,
)
from sensitivity.estimators.partial_sums import intra_op_threads
from sensitivity.plan import AnalysisPlan, toggle_counts
from sensitivity.problem import AugmentationProblem
from sensitivity.results import AnalysisResult
from sensitivity.resume import load_metric_states, metric_states

if TYPE_CHECKING:
    from sensitivity.adaptive import Decision


def _main_accumulator(
    config: EngineConfig, problem: AugmentationProblem, shape: tuple[int, ...]
) -> Metric | None:
    """The method's accumulator for units of ``shape``; None for "variance" (moments only)."""
    g, level = len(problem.groups), config.conf_level
    if config.method == "sobol":
        return SobolAccumulator(
            g, shape, config.second_order, level, config.effective_replicates
        )
    if config.method == "shapley" and config.shapley_method == "goda":
        return ShapleyAccumulator(g, shape, level)
    if config.method == "shapley":
        return PermutationShapleyAccumulator(g, config.n_outer, config.n_inner, shape, level)
    if config.method == "contrast":
        return ContrastAccumulator(len(problem.augmentations), config.contrast_k, shape, level)
    return None


class LayerAccumulators:
    """The method's accumulator and a MomentsAccumulator for each layer.

    A first-order Sobol' accumulator gives the moments of every row itself (its ``moments``
    after compute()), at a fraction of the cost of a second pass over the outputs, so it gets
    no MomentsAccumulator.

    Args:
        config: the analysis settings (method, its options, conf_level, accumulation_threads).
        problem: the problem (G groups, A augmentations).
        shapes: {layer: unit shape}, in checkpoint order.
        device: where the states live (the model's device).
        background: the engine's background thread is on (``background.uses_background``):
            ``compute()``, during which that thread is idle, takes one more chunk worker.

    Each layer's accumulators (GBs of float64 zero sums for large layers, whose first touch
    page-faults for seconds) are made when the layer is first summed, so that with the engine's
    background thread they are made there, beside the forward of the later layers; ``metrics``,
    ``state`` and ``compute`` make the others.
    """

    def __init__(
        self,
        config: EngineConfig,
        problem: AugmentationProblem,
        shapes: Mapping[str, tuple[int, ...]],
        device: torch.device,
        background: bool = False,
    ) -> None:
        self.method = config.method
        self.main: dict[str, Metric | None] = {}
        self.moments: dict[str, MomentsAccumulator | None] = {}
        self.compute_threads = config.accumulation_threads + int(background)
        self._config, self._problem, self._device = config, problem, device
        self._shapes = dict(shapes)

    def _layer(self, layer: str) -> None:
        """Make a layer's accumulators (their zero states) unless they exist."""
        if layer in self.moments:
            return
        config, shape = self._config, self._shapes[layer]
        main = _main_accumulator(config, self._problem, shape)
        self.main[layer] = None if main is None else main.to(self._device)
        own = config.method == "sobol" and not config.second_order
        self.moments[layer] = (
            None if own else MomentsAccumulator(shape, config.conf_level).to(self._device)
        )
        for metric in (self.main[layer], self.moments[layer]):
            if metric is not None:
                metric.threads = config.accumulation_threads

    def _every_layer(self) -> list[str]:
        """Every layer, in checkpoint order, its accumulators made."""
        for layer in self._shapes:
            self._layer(layer)
        return list(self._shapes)

    def update(
        self,
        outputs: Mapping[str, Tensor],
        n_blocks: int,
        perms: Tensor | None,
        replicate: Tensor | None,
    ) -> None:
        """Add the outputs of whole blocks.

        Args:
            outputs: {layer: (n_blocks * block_size, *unit_shape)} in row order; any subset
                of the layers (the engine may add a batch one layer at a time).
            n_blocks: blocks in ``outputs``.
            perms: (n_blocks, G) group orders (Shapley designs), else None.
            replicate: (n_blocks,) replicate ids (replicated Sobol'), else None.
        """
        # One intra-op thread (EngineConfig.threads: parallel regions stall under load); the
        # accumulators' own workers (accumulation_threads) take the chunks.
        with intra_op_threads(1):
            for layer, Y in outputs.items():
                self._layer(layer)
                moments = self.moments[layer]
                if moments is not None:
                    moments.update(Y)
                main = self.main[layer]
                if main is None:
                    continue
                blocks = Y.reshape(n_blocks, -1, *Y.shape[1:])
                if perms is not None:
                    main.update(blocks, perms.to(Y.device))
                elif isinstance(main, SobolAccumulator):
                    main.update(blocks, replicate)
                else:
                    main.update(blocks)

    def metrics(self) -> dict[str, Metric]:
        """Every accumulator by a stable key ("<layer>/main", "<layer>/moments")."""
        out: dict[str, Metric] = {}
        for layer in self._every_layer():
            if self.main[layer] is not None:
                out[f"{layer}/main"] = self.main[layer]
            if self.moments[layer] is not None:
                out[f"{layer}/moments"] = self.moments[layer]
        return out

    def state(self) -> dict[str, dict[str, Tensor]]:
        """The states to save: {metric key: {state name: CPU tensor copy}}."""
        return {key: metric_states(m) for key, m in self.metrics().items()}

    def load_state(self, states: Mapping[str, Mapping[str, Tensor]]) -> None:
        """Restore saved states (``state()`` of a run with the same inputs).

        Raises:
            ValueError: when a saved state is missing or has another shape than the current one.
        """
        for key, metric in self.metrics().items():
            load_metric_states(metric, states[key], key)

    def compute(self) -> dict[str, tuple[Any, Any]]:
        """The results of every layer; a collective under DDP (every rank computes every metric
        in the same order).

        Returns:
            {layer: (the method's result or None, the moments' result)}.
        """
        layers = self._every_layer()
        out = {}
        # One intra-op thread, as in update(): the Sobol' compute takes its chunks of units with
        # ``compute_threads`` workers; the others are a few whole-layer operations.
        with warnings.catch_warnings(), intra_op_threads(1):
            # A rank whose shard is empty (more ranks than blocks) never updates; its zero sums
            # are still part of the global ones.
            warnings.filterwarnings("ignore", message=".*was called before the ``update``")
            for layer in layers:
                metric, moments = self.main[layer], self.moments[layer]
                main = None if metric is None else _computed(metric, self.compute_threads)
                out[layer] = (main, metric.moments if moments is None else moments.compute())
        return out


def _computed(metric: Metric, threads: int) -> Any:
    """``metric.compute()`` with ``threads`` chunk workers (its update's are kept)."""
    update_threads, metric.threads = metric.threads, threads
    try:
        return metric.compute()
    finally:
        metric.threads = update_threads


def _moment_arrays(moments: Any) -> dict[str, np.ndarray]:
    """mean, population var/std/cv (results format) and the moments' half-widths, (*u) each."""
    n = moments.n
    population = (n - 1) / n  # MomentsAccumulator reports the sample variance (ddof 1)
    return {
        "mean": moments.mean,
        "var": moments.var * population,
        "std": moments.std * math.sqrt(population),
        "cv": moments.cv * math.sqrt(population),
        "mean_conf": moments.mean_conf,
        "var_conf": moments.var_conf,
    }


def layer_arrays(
    method: str, main: Any, moments: Any
) -> tuple[dict[str, np.ndarray], int, np.ndarray]:
    """One layer's results in the results format (``AnalysisResult.layers``).

    Args:
        method: the analysis method.
        main: the method's computed result, or None ("variance").
        moments: the computed moments.

    Returns:
        ({key: array}: (G, *u), (G, G, *u) or (*u) as ``AnalysisResult`` documents; the number
        of constant units; (*u) uint8 unit flags).
    """
    arrays: dict[str, np.ndarray] = {}
    if method == "sobol":
        arrays.update(S1=main.S1, ST=main.ST, S1_conf=main.S1_conf, ST_conf=main.ST_conf)
        if main.S2 is not None:
            arrays.update(S2=main.S2, S2_conf=main.S2_conf)
    elif method == "shapley":
        arrays.update(
            shapley=main.shapley,
            shapley_normalized=main.shapley_normalized,
            shapley_conf=main.shapley_conf,
            shapley_normalized_conf=main.shapley_normalized_conf,
        )
    elif method == "contrast":
        arrays.update(
            mean_diff=main.mean_diff,
            sd_diff=main.sd_diff,
            effect_size=main.effect_size,
            mean_diff_conf=main.mean_diff_conf,
            effect_size_conf=main.effect_size_conf,
        )
    if method in ("sobol", "shapley"):
        arrays.update(index_variance=main.variance, index_variance_conf=main.variance_conf)
    arrays.update(_moment_arrays(moments))
    source = moments if main is None else main
    return arrays, source.n_constant, source.flag


def analysis_result(
    plan: AnalysisPlan, computed: dict[str, tuple[Any, Any]], seconds: float,
    decision: Decision | None,
) -> AnalysisResult:
    """The AnalysisResult of the computed accumulators (``LayerAccumulators.compute()``).

    Args:
        plan: the analysis plan (method, variables, design, toggles, settings).
        computed: ``LayerAccumulators.compute()``.
        seconds: rank zero's wall time of the analysis.
        decision: an adaptive run's last decision (its N and half-width), else None.
    """
    config, problem = plan.config, plan.problem
    layers: dict[str, dict[str, np.ndarray]] = {}
    n_constant: dict[str, int] = {}
    flags: dict[str, np.ndarray] = {}
    for layer, (main, moments) in computed.items():
        layers[layer], n_constant[layer], flags[layer] = layer_arrays(
            config.method, main, moments
        )
    main, moments = next(iter(computed.values()))
    n = config.n if decision is None else decision.n
    return AnalysisResult(
        method=config.method,
        group_names=(
            list(problem.augmentations) if config.method == "contrast" else problem.group_names
        ),
        layers=layers,
        n=n,
        evaluations=n * plan.design.block_size,
        seconds=seconds,
        n_constant=n_constant,
        flags=flags,
        interval=(moments if main is None else main).interval,
        replicates=config.effective_replicates,
        toggles=plan.toggles if decision is None else toggle_counts(problem, plan.design, n),
        settings={**plan.settings(), **({} if decision is None else decision.attrs())},
        layouts=plan.layouts,
    )
