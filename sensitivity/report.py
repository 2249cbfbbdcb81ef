"""PNG figures of results: heatmaps (layers x variables), index-over-epochs lines and the
guided-masking specificity; the figure helpers the HTML report shares.

Figures are built on ``matplotlib.figure.Figure`` and rendered by the Agg canvas, never through
pyplot: no global backend switch, no GUI, no figure registry to leak from long training runs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sensitivity.masking.result import PROFILES
from sensitivity.results import PER_VARIABLE_KEYS, SUMMARY_STATISTICS, AnalysisResult

if TYPE_CHECKING:
    from sensitivity.masking.result import MaskingResult

# Keys whose values are shares of variance, drawn on a [0, 1] colour scale.
SHARE_KEYS = ("S1", "ST", "shapley_normalized")
# Keys whose sign matters: a diverging colour map centred on 0.
SIGNED_KEYS = ("effect_size", "mean_diff")
_LABELS = {
    "S1": "first-order Sobol index S1",
    "ST": "total Sobol index ST",
    "shapley_normalized": "normalised Shapley effect",
    "shapley": "Shapley effect (variance units)",
    "effect_size": "paired effect size (mean diff / sd)",
    "mean_diff": "mean difference (augmented - original)",
}
DPI = 120


def _label(key: str) -> str:
    """A key's axis label."""
    return _LABELS.get(key, key)


def new_figure(width: float, height: float, dpi: int = DPI) -> Figure:
    """An empty figure on its own Agg canvas (module docstring), constrained layout.

    Args:
        width, height: size in inches.
        dpi: resolution in dots per inch.

    Returns:
        The figure.
    """
    figure = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def grid_axes(figure: Figure, panels: int, columns: int) -> np.ndarray:
    """Axes for panels filled row by row, the unused ones hidden.

    Args:
        figure: the figure to add them to.
        panels: panels needed.
        columns: panels per row.

    Returns:
        (rows, columns) array of axes.
    """
    axes = figure.subplots(-(-panels // columns), columns, squeeze=False)
    for ax in axes.ravel()[panels:]:
        ax.set_visible(False)
    return axes


def colour_scale(values: np.ndarray, key: str, *, extend_shares: bool) -> tuple[float, float, str]:
    """The colour scale of a key's values.

    Args:
        values: the values drawn (any shape; non-finite ones ignored).
        key: their key: shares of variance go on [0, 1], signed keys on a symmetric diverging
            scale, other keys over their finite range.
        extend_shares: widen [0, 1] to the values' range (estimates can leave it).

    Returns:
        (low, high, colour map name).
    """
    finite = values[np.isfinite(values)]
    if key in SHARE_KEYS:
        if not extend_shares:
            return 0.0, 1.0, "viridis"
        low = min(0.0, float(finite.min())) if finite.size else 0.0
        high = max(1.0, float(finite.max())) if finite.size else 1.0
        return low, high, "viridis"
    if key in SIGNED_KEYS:
        high = float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0
        return -high, high, "RdBu_r"
    low = float(finite.min()) if finite.size else 0.0
    high = float(finite.max()) if finite.size and finite.max() > low else low + 1.0
    return low, high, "viridis"


def file_part(text: str) -> str:
    """Make text safe as part of a file name.

    Args:
        text: e.g. a layer or analysis name.

    Returns:
        ``text`` with runs of other characters than letters, digits, ".", "_" and "-" replaced
        by "_" (module names keep their dots); "x" when nothing is left.
    """
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def _check_key(key: str) -> None:
    """ValueError unless ``key`` is a per-variable key."""
    if key not in PER_VARIABLE_KEYS:
        raise ValueError(
            f"figures need a per-variable key, one of {list(PER_VARIABLE_KEYS)}; got {key!r}"
        )


def _check_statistic(statistic: str) -> None:
    """ValueError unless ``statistic`` is one of SUMMARY_STATISTICS."""
    if statistic not in SUMMARY_STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; valid: {list(SUMMARY_STATISTICS)}")


def _layer_labels(result: AnalysisResult) -> list[str]:
    """Layer names with the share of valid units behind their statistics."""
    return [
        f"{layer} ({fraction:.0%} valid)"
        for layer, fraction in zip(result.layer_names, result.valid_fraction(), strict=True)
    ]


def heatmap_figure(result: AnalysisResult, key: str, statistic: str = "median") -> Figure:
    """Heatmap layers x variables of a statistic over each layer's valid units.

    Args:
        result: the analysis.
        key: a per-variable key ("S1", "shapley_normalized", ...).
        statistic: one of SUMMARY_STATISTICS.

    Returns:
        The figure: rows the layers in checkpoint order (labelled with their share of valid
        units), columns the variables, each cell annotated with its value.

    Raises:
        ValueError: a key or statistic of another kind.
    """
    _check_key(key)
    _check_statistic(statistic)
    values = result.layer_statistics(key)[statistic]  # (L, G)
    n_layers, n_vars = values.shape
    figure = new_figure(max(5.0, 1.0 + 0.75 * n_vars), max(3.0, 1.6 + 0.45 * n_layers))
    ax = figure.add_subplot()
    low, high, cmap = colour_scale(values, key, extend_shares=True)
    image = ax.imshow(values, cmap=cmap, vmin=low, vmax=high, aspect="auto")
    colourmap = image.get_cmap()
    for i in range(n_layers):
        for j in range(n_vars):
            value = values[i, j]
            shade = colourmap(image.norm(value)) if np.isfinite(value) else (1, 1, 1, 1)
            # Light text on dark cells: relative luminance of the cell colour.
            luminance = 0.2126 * shade[0] + 0.7152 * shade[1] + 0.0722 * shade[2]
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if luminance > 0.5 else "white")
    ax.set_xticks(range(n_vars), result.group_names, rotation=45, ha="right")
    ax.set_yticks(range(n_layers), _layer_labels(result))
    ax.set_xlabel("variable")
    ax.set_ylabel("layer (checkpoint)")
    when = f", epoch {result.epoch}" if result.epoch is not None else ""
    ax.set_title(
        f"{result.method}: {_label(key)}, {statistic} over valid units{when} (n = {result.n})"
    )
    figure.colorbar(image, ax=ax, label=_label(key))
    return figure


def pair_figure(result: AnalysisResult, statistic: str = "median") -> Figure:
    """Second-order Sobol' indices: one (G, G) matrix per layer.

    Args:
        result: a Sobol' analysis with S2.
        statistic: one of SUMMARY_STATISTICS, of S2 and of its half-width over valid units.

    Returns:
        The figure, each cell annotated with the statistic and that of its half-width.

    Raises:
        ValueError: an unknown statistic, or a result without S2.
    """
    _check_statistic(statistic)
    s2 = result.layer_statistics("S2")[statistic]  # (L, G, G)
    conf = result.layer_statistics("S2_conf")[statistic]
    n_layers, g = s2.shape[0], s2.shape[1]
    columns = min(3, n_layers)
    rows = -(-n_layers // columns)
    side = max(3.2, 0.45 * g + 1.5)
    figure = new_figure(side * columns + 1.0, side * rows + 0.6)
    axes = grid_axes(figure, n_layers, columns)
    finite = s2[np.isfinite(s2)]
    high = max(0.05, float(np.abs(finite).max())) if finite.size else 1.0
    image = None
    for index, label in enumerate(_layer_labels(result)):
        ax = axes[index // columns][index % columns]
        matrix = np.where(np.eye(g, dtype=bool), np.nan, s2[index])
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=-high, vmax=high)
        for i in range(g):
            for j in range(g):
                if i != j and np.isfinite(s2[index, i, j]):
                    ax.text(j, i, f"{s2[index, i, j]:.2f}\n±{conf[index, i, j]:.2f}",
                            ha="center", va="center", fontsize=5)
        ax.set_xticks(range(g), result.group_names, rotation=90, fontsize=6)
        ax.set_yticks(range(g), result.group_names, fontsize=6)
        ax.set_title(label, fontsize=8)
    when = f", epoch {result.epoch}" if result.epoch is not None else ""
    figure.suptitle(
        f"second-order Sobol indices S2 (± half-width), {statistic} over valid units{when} "
        f"(n = {result.n})"
    )
    if image is not None:
        figure.colorbar(image, ax=axes, label="S2", shrink=0.6)
    return figure


def save_heatmaps(
    result: AnalysisResult, out_dir: str | Path, name: str | None = None
) -> dict[str, Path]:
    """Write one heatmap PNG per value key, and the S2 figure with second-order indices.

    Args:
        result: the analysis.
        out_dir: the folder, created only when there is a figure (a variance analysis has
            none).
        name: file name stem (default: the method).

    Returns:
        {key: path} of ``<out_dir>/<name>_<key>.png``, in ``result.value_keys`` order, then
        "S2" for ``<name>_S2.png``.
    """
    out = Path(out_dir)
    stem = file_part(name or result.method)
    keys = list(result.value_keys)
    if all("S2" in values for values in result.layers.values()):
        keys.append("S2")
    if keys:
        out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key in keys:
        paths[key] = out / f"{stem}_{key}.png"
        figure = pair_figure(result) if key == "S2" else heatmap_figure(result, key)
        figure.savefig(paths[key])
    return paths


def _positions(results: Sequence[AnalysisResult]) -> tuple[list[int], str]:
    """The results' epochs (else global steps) and the axis label."""
    if all(r.epoch is not None for r in results):
        return [int(r.epoch) for r in results], "epoch"
    if all(r.global_step is not None for r in results):
        return [int(r.global_step) for r in results], "global step"
    raise ValueError(
        "a history needs every result to carry an epoch (or every result a global_step); "
        "set them when the analyses are made during training"
    )


def _check_history(results: Sequence[AnalysisResult]) -> None:
    """ValueError unless there are results and they share method and variables."""
    if not results:
        raise ValueError("a history needs at least one AnalysisResult")
    first = results[0]
    for other in results[1:]:
        if other.method != first.method or other.group_names != first.group_names:
            raise ValueError(
                "history results must share method and variables; got "
                f"{first.method} {first.group_names} and {other.method} {other.group_names}"
            )


def history_figure(
    results: Sequence[AnalysisResult], key: str, layer: str | None = None
) -> Figure:
    """Each variable's median ``key`` over the valid units against the epoch (or global step).

    Args:
        results: analyses of one run, in any order (sorted by epoch here).
        key: a per-variable key.
        layer: draw only this layer (default: one panel per layer of the first result).

    Returns:
        The figure.

    Raises:
        ValueError: no results, results of different methods or variables, results without
            epochs (or global steps), a key of another kind, or a layer some result lacks.
    """
    _check_key(key)
    _check_history(results)
    x, x_label = _positions(results)
    order = np.argsort(x, kind="stable")
    x = [x[i] for i in order]
    results = [results[i] for i in order]
    layers = results[0].layer_names if layer is None else [layer]
    for r in results:
        missing = [name for name in layers if name not in r.layers]
        if missing:
            raise ValueError(
                f"layer(s) {missing} missing from a result (epoch {r.epoch}); it has "
                f"{r.layer_names}"
            )
    columns = min(3, len(layers))
    rows = -(-len(layers) // columns)
    figure = new_figure(4.2 * columns + 1.8, 3.0 * rows + 0.6)
    axes = grid_axes(figure, len(layers), columns)
    names = results[0].group_names
    tables = [
        dict(zip(r.layer_names, r.layer_statistics(key)["median"], strict=True)) for r in results
    ]
    for index, name in enumerate(layers):
        ax = axes[index // columns][index % columns]
        means = np.stack([table[name] for table in tables])  # (epochs, G)
        for g, variable in enumerate(names):
            ax.plot(x, means[:, g], marker="o", markersize=3, label=variable)
        ax.set_title(name)
        ax.set_xlabel(x_label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(_label(key))
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right upper", title="variable")
    figure.suptitle(
        f"{results[0].method}: {_label(key)} over training (median over valid units)"
    )
    return figure


def save_history(
    results: Sequence[AnalysisResult],
    out_dir: str | Path,
    layer: str | None = None,
    name: str = "history",
) -> list[Path]:
    """Write one history PNG per value key the results share.

    Args:
        results: analyses of one run.
        out_dir: the folder (created when missing).
        layer: draw only this layer.
        name: file name stem.

    Returns:
        The paths: ``<out_dir>/<name>_<key>.png``, or ``<name>_<key>_<layer>.png``.

    Raises:
        ValueError: as ``history_figure``.
    """
    _check_history(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = [k for k in results[0].value_keys if all(k in r.value_keys for r in results)]
    suffix = f"_{file_part(layer)}" if layer is not None else ""
    paths = []
    for key in keys:
        path = out / f"{file_part(name)}_{key}{suffix}.png"
        history_figure(results, key, layer).savefig(path)
        paths.append(path)
    return paths


def specificity_figure(result: MaskingResult, top5: bool = False) -> Figure:
    """Heatmap input augmentation x mask variable of the guided-masking specificity.

    Args:
        result: a masking result.
        top5: draw the top-k (k = ``result.top_k``) specificity instead of the top-1 one.

    Returns:
        The figure: Spearman correlations in [-1, 1], low values on the diagonal meaning that
        masking v's units hurts v-augmented inputs specifically.
    """
    values = result.specificity_top5 if top5 else result.specificity
    rows, columns = values.shape
    figure = new_figure(max(5.0, 1.2 + 0.8 * columns), max(3.0, 1.6 + 0.5 * rows))
    ax = figure.add_subplot()
    image = ax.imshow(values, cmap="RdBu_r", vmin=-1.0, vmax=1.0, aspect="auto")
    for i in range(rows):
        for j in range(columns):
            text = "n/a" if not np.isfinite(values[i, j]) else f"{values[i, j]:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if np.isfinite(values[i, j]) and abs(values[i, j]) > 0.6
                    else "black")
    ax.set_xticks(range(columns), result.variables, rotation=45, ha="right")
    ax.set_yticks(range(rows), result.inputs[1:])
    ax.set_xlabel(f"mask variable ({result.value} maps)")
    ax.set_ylabel("input augmentation")
    # what the specificity compared: the stored profile (top-k always compares accuracies)
    what = "top-5 accuracy" if top5 else PROFILES[result.profile]
    ax.set_title(f"masking specificity ({what})\nSpearman vs original inputs over "
                 f"{len(result.configurations)} configurations", fontsize=10)
    figure.colorbar(image, ax=ax, label="Spearman correlation")
    return figure


def save_specificity(result: MaskingResult, out_dir: str | Path, name: str) -> Path:
    """Write the top-1 specificity figure as ``<out_dir>/<name>_masking_specificity.png``.

    Args:
        result: a masking result.
        out_dir: the folder (created when missing).
        name: file name stem.

    Returns:
        The path written.
    """
    return save_figure(specificity_figure(result), out_dir, f"{name}_masking_specificity.png")


def save_figure(figure: Figure, out_dir: str | Path, filename: str) -> Path:
    """Write ``figure`` as ``<out_dir>/<filename>``, the folder created when missing.

    Args:
        figure: the figure.
        out_dir: the folder.
        filename: the file name, e.g. ``sobol_masking_specificity.png``.

    Returns:
        The path written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / filename
    figure.savefig(path)
    return path
