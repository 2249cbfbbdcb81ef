"""Figures of a comparison of two analyses (/comparison/<name>, ``stats.comparison_statistics``):
per layer the scatter of the two maps of each variable (Sobol' against Shapley), each map
against the unit covariates mean, variance and CV, and the decay of each variable's largest
values; written as PNGs by ``analyze.py compare`` and drawn in the HTML report.

Only the units the stored correlations are over are drawn: those valid in both analyses for
the scatter, each analysis's valid units against its covariates. A layer with more units than
MAX_POINTS draws an evenly spaced subset of them (``shown``); the correlations in the titles
are over all. Figures are matplotlib Figures on their own Agg canvas (``report.new_figure``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sensitivity.html_page import number
from sensitivity.layouts import features_first
from sensitivity.report import file_part, grid_axes, new_figure, save_figure
from sensitivity.results import AnalysisResult
from sensitivity.stats import COMPARISON_GROUP, COVARIATES, LayerMaps, layer_maps, read_tree
from sensitivity.stats.comparison import SIDES
from sensitivity.store import ResultsStore

DPI = 100
# Points drawn per scatter panel at most: a 224 px conv layer has 200 000 units.
MAX_POINTS = 4000


@dataclass
class Comparison:
    """A stored comparison and the two analyses it compares.

    Attributes:
        name: the group name, "<analysis>_vs_<other>".
        analyses: the two analysis names.
        values: the value type compared of each (e.g. ["ST", "shapley_normalized"]).
        variables: the G variables.
        layers: the layers, in the first analysis's order.
        top: the largest values kept per variable (decay curves).
        results: the two analyses.
        tree: the stored arrays, {layer: {"spearman", "spearman_positions", "valid_units",
            "a": {...}, "b": {...}}} (docs/RESULTS_FORMAT.md).
    """

    name: str
    analyses: list[str]
    values: list[str]
    variables: list[str]
    layers: list[str]
    top: int
    results: list[AnalysisResult]
    tree: dict[str, Any]

    def maps(self, layer: str) -> list[LayerMaps]:
        """Each analysis's compared maps, valid units and covariates of ``layer``."""
        return [layer_maps(result, layer, key)
                for result, key in zip(self.results, self.values, strict=True)]

    def spatial(self, layer: str) -> bool:
        """Whether ``layer``'s units have more than one position per channel."""
        result = self.results[0]
        shape = features_first(result.valid(layer), 0, result.unit_layout(layer)).shape
        return int(np.prod(shape[1:])) > 1


def read_comparison(
    results: str | Path, name: str, loaded: Mapping[str, AnalysisResult] | None = None
) -> Comparison:
    """The comparison /comparison/<name> of a results file with its two analyses.

    Args:
        results: the results file.
        name: the group name.
        loaded: analyses already read, by name (the others are read from the file).

    Returns:
        The ``Comparison``; ValueError when the group or an analysis is missing.
    """
    tree, attrs = read_tree(results, COMPARISON_GROUP, name)
    loaded = loaded or {}
    store = ResultsStore(results)
    return Comparison(
        name=name, analyses=list(attrs["analyses"]), values=list(attrs["values"]),
        variables=list(attrs["variables"]), layers=list(attrs["layers"]),
        top=int(attrs["top"]), tree=tree,
        results=[loaded[a] if a in loaded else store.read_analysis(a) for a in attrs["analyses"]],
    )


def shown(count: int, limit: int = MAX_POINTS) -> np.ndarray:
    """Which of ``count`` points a panel draws.

    Args:
        count: the points.
        limit: the most drawn.

    Returns:
        int64 indices, all of them up to ``limit``, else ``limit`` evenly spaced ones (first
        and last included).
    """
    if count <= limit:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, limit).round().astype(np.int64))


def _finite_pairs(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (x, y) pairs drawn: both finite, at most MAX_POINTS (``shown``)."""
    finite = np.isfinite(x) & np.isfinite(y)
    index = shown(int(finite.sum()))
    return x[finite][index], y[finite][index]


def _rho(label: str, pooled: float, positions: float | None) -> str:
    """A panel title: the label, the pooled Spearman correlation (and the one by position)."""
    text = f"{label}: ρ = {number(pooled, 2)}"
    return text if positions is None else f"{text} (by position {number(positions, 2)})"


def scatter_figure(comparison: Comparison, layer: str) -> Figure:
    """One panel per variable: the second analysis's map against the first's.

    Args:
        comparison: the comparison.
        layer: one of its layers.

    Returns:
        The figure: x the first analysis's values, y the second's, one point per unit valid
        in both (finite in both); titles the variable and its stored Spearman correlation.
    """
    first, second = comparison.maps(layer)
    joint = first.valid & second.valid
    entry = comparison.tree[layer]
    (a, b), (key_a, key_b) = comparison.analyses, comparison.values
    count = len(comparison.variables)
    columns = min(4, count)
    figure = new_figure(3.0 * columns + 0.4, 2.7 * -(-count // columns) + 0.6, dpi=DPI)
    axes = grid_axes(figure, count, columns).ravel()
    for g, variable in enumerate(comparison.variables):
        ax = axes[g]
        ax.scatter(*_finite_pairs(first.maps[g][joint], second.maps[g][joint]), s=5,
                   alpha=0.5, linewidths=0)
        by_position = entry["spearman_positions"][g, g] if comparison.spatial(layer) else None
        ax.set_title(_rho(variable, entry["spearman"][g, g], by_position), fontsize=8)
        ax.set_xlabel(f"{a} {key_a}", fontsize=8)
        ax.set_ylabel(f"{b} {key_b}", fontsize=8)
        ax.grid(alpha=0.3)
    figure.suptitle(f"{layer}: {b} {key_b} against {a} {key_a}, Spearman ρ over the "
                    f"{int(entry['valid_units'])} units valid in both", fontsize=10)
    return figure


def _covariate_panel(
    ax: Axes, comparison: Comparison, sides: Sequence[LayerMaps], layer: str, g: int, c: int
) -> None:
    """Variable g's maps against covariate c, one colour per analysis with covariates."""
    parts = []
    for i, side in enumerate(sides):
        if side.covariates is None:
            continue
        x, y = _finite_pairs(side.covariates[c][side.valid], side.maps[g][side.valid])
        ax.scatter(x, y, s=4, alpha=0.4, linewidths=0, color=f"C{i}",
                   label=f"{comparison.analyses[i]} {comparison.values[i]}")
        rho = comparison.tree[layer][SIDES[i]]["covariates"][g, c]
        parts.append(f"{comparison.analyses[i]} {number(rho, 2)}")
        if x.size and x.min() > 0 and x.max() > 100 * x.min():  # spans orders of magnitude
            ax.set_xscale("log")
    ax.set_title(f"{comparison.variables[g]} vs {COVARIATES[c]}: ρ {', '.join(parts)}",
                 fontsize=7)
    ax.tick_params(labelsize=6)
    ax.grid(alpha=0.3)


def covariates_figure(comparison: Comparison, layer: str) -> Figure | None:
    """Rows the variables, columns mean, variance and CV: each analysis's map against its
    units' covariate.

    Args:
        comparison: the comparison.
        layer: one of its layers.

    Returns:
        The figure (each analysis's valid units; titles its stored Spearman correlation), or
        None when neither analysis has the moments.
    """
    sides = comparison.maps(layer)
    if all(side.covariates is None for side in sides):
        return None
    count = len(comparison.variables)
    figure = new_figure(3 * 2.8 + 1.6, 2.0 * count + 0.7, dpi=DPI)
    axes = figure.subplots(count, len(COVARIATES), squeeze=False)
    for g in range(count):
        for c in range(len(COVARIATES)):
            _covariate_panel(axes[g][c], comparison, sides, layer, g, c)
    for c, covariate in enumerate(COVARIATES):
        axes[-1][c].set_xlabel(f"unit {covariate}", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8,
                  markerscale=3)
    figure.suptitle(f"{layer}: maps against the units' mean, variance and CV (Spearman ρ over "
                    f"each analysis's valid units)", fontsize=10)
    return figure


def decay_figure(comparison: Comparison) -> Figure:
    """Rows the layers, columns the two analyses: each variable's largest values over the
    valid units, in descending order (the stored decay curves).

    Args:
        comparison: the comparison.

    Returns:
        The figure, one line per variable against the rank 1..K.
    """
    rows = len(comparison.layers)
    figure = new_figure(2 * 4.2 + 1.8, 2.5 * rows + 0.6, dpi=DPI)
    axes = figure.subplots(rows, len(SIDES), squeeze=False)
    for r, layer in enumerate(comparison.layers):
        for i, side in enumerate(SIDES):
            ax = axes[r][i]
            decay = comparison.tree[layer][side]["decay"]
            ranks = np.arange(1, decay.shape[1] + 1)
            for g, variable in enumerate(comparison.variables):
                ax.plot(ranks, decay[g], marker="o", markersize=2, linewidth=1, label=variable)
            ax.set_title(f"{layer}: {comparison.analyses[i]} {comparison.values[i]}", fontsize=9)
            ax.set_xlabel("rank among the valid units", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right upper", title="variable")
    figure.suptitle(f"the largest values per variable over the valid units, descending (at "
                    f"most {comparison.top})", fontsize=10)
    return figure


def save_figures(comparison: Comparison, out_dir: str | Path) -> dict[str, Path]:
    """Write every figure of a comparison as a PNG.

    Args:
        comparison: the comparison.
        out_dir: the folder (created when missing).

    Returns:
        {"scatter/<layer>", "covariates/<layer>", "decay": path} of
        ``<out_dir>/<name>_scatter_<layer>.png``, ``<name>_covariates_<layer>.png`` (layers
        with covariates) and ``<name>_decay.png``.
    """
    paths: dict[str, Path] = {}

    def save(key: str, figure: Figure | None) -> None:
        # Written as drawn: the figures of many large layers are not all held in memory.
        if figure is not None:
            paths[key] = save_figure(figure, out_dir,
                                     f"{file_part(comparison.name)}_{file_part(key)}.png")

    for layer in comparison.layers:
        save(f"scatter/{layer}", scatter_figure(comparison, layer))
        save(f"covariates/{layer}", covariates_figure(comparison, layer))
    save("decay", decay_figure(comparison))
    return paths
