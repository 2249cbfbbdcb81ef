"""One self-contained static HTML report of a results file (``analyze.py report``).

``write_report(results, out_dir)`` writes ``<out_dir>/index.html`` and every figure as a PNG
next to it. The page needs nothing else: figures are embedded as base64 PNG data URIs, the
style sheet is inline, there is no script and no external resource, so it opens offline, from
an e-mail attachment or an archive. Sections (each only where the results file has the data):

- the run (model, weights, dataset, image size, seed) and its analyses;
- per analysis: how its half-widths were computed and how often each variable changes
  (toggle counts); per value type a heatmap layers x variables of the median over each layer's
  valid units (``sensitivity.report``) and a table of the spread: median [10th, 90th
  percentile], mean and median half-width, with each layer's share of valid units; the
  second-order matrices (S2) where the analysis has them; sensitivity maps of the most
  specialised valid units (per variable, the units with the largest index: small spatial maps
  for conv layers, a table for channel-mean/fully connected layers);
- Wilcoxon tests of a contrast analysis (/wilcoxon/<name>): significant units per layer and
  augmentation after the Benjamini-Yekutieli correction;
- Spearman correlation matrices between variables and against mean/variance/CV
  (/correlation/<name>); LDA accuracy against chance and confusion matrices (/lda/<name>);
- guided-masking specificity (/masking/<name>) and the single-class table
  (/single_class/<name>); nuisance suppression (/suppression/<name>): test accuracy
  against distortion strength of the unmasked network, the chosen mask and random controls;
- comparisons of two reported analyses (/comparison/<name>): Spearman correlation of their
  maps per layer and variable, per layer the scatter of the two maps and of each against mean,
  variance and CV, and the decay of each variable's largest values.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from sensitivity.comparison import (
    Comparison,
    covariates_figure,
    decay_figure,
    read_comparison,
    scatter_figure,
)
from sensitivity.config import MIN_TOGGLES
from sensitivity.estimators import FLAG_NAMES
from sensitivity.html_page import Page, escape, markup_table, number, statistic, table
from sensitivity.layouts import features_first
from sensitivity.masking.figures import dendrogram_figure
from sensitivity.masking.result import GROUP_KIND as MASKING_GROUP
from sensitivity.masking.result import MaskingResult
from sensitivity.report import (
    SIGNED_KEYS,
    colour_scale,
    grid_axes,
    heatmap_figure,
    new_figure,
    pair_figure,
    specificity_figure,
)
from sensitivity.results import AnalysisResult
from sensitivity.single_class import GROUP_KIND as SINGLE_CLASS_GROUP
from sensitivity.single_class import SingleClassResult
from sensitivity.stats import (
    COMPARISON_GROUP,
    CORRELATION_GROUP,
    COVARIATES,
    LDA_GROUP,
    WILCOXON_GROUP,
    read_tree,
)
from sensitivity.store import ResultsStore
from sensitivity.suppression import GROUP_KIND as SUPPRESSION_GROUP
from sensitivity.suppression import SuppressionResult
from sensitivity.suppression_figures import suppression_figure

DPI = 100
TOP_UNITS = 3
# ------------------------------------------------------------------------------- figures
def _finite(values: np.ndarray) -> np.ndarray:
    """``values`` with non-finite entries as NaN."""
    return np.where(np.isfinite(values), values, np.nan)


def _valid_maps(result: AnalysisResult, layer: str, key: str) -> np.ndarray:
    """(G, *u) ``key`` values of ``layer`` with flagged units and non-finite values as NaN:
    a flagged unit's raw index is noise (or 0 for a constant unit) and must not win a ranking
    or stretch a colour scale. Channels first: (G, C, H, W) of an NHWC map, (G, D, L) of
    tokens (``AnalysisResult.features_first``)."""
    valid = features_first(result.valid(layer), 0, result.unit_layout(layer))
    return np.where(valid, _finite(result.features_first(layer, key)), np.nan)


def unit_scores(maps: np.ndarray, key: str) -> np.ndarray:
    """How strongly each unit (channel of a conv map) carries each variable.

    Args:
        maps: (G, C, ...) values of ``key``, NaN where a unit is not valid.
        key: their value key (signed keys are scored by magnitude).

    Returns:
        (G, C) float64, the mean over each channel's finite positions; NaN where it has none.
    """
    values = _finite(np.asarray(maps, dtype=np.float64))
    if key in SIGNED_KEYS:
        values = np.abs(values)
    values = values.reshape(values.shape[0], values.shape[1], -1)
    count = np.isfinite(values).sum(axis=2)
    total = np.nansum(values, axis=2)
    return np.divide(total, count, out=np.full(count.shape, np.nan), where=count > 0)


def top_units(scores: np.ndarray, top: int = TOP_UNITS) -> np.ndarray:
    """The units with the largest scores per variable.

    Args:
        scores: (G, C) float64, NaN for no score.
        top: units per variable.

    Returns:
        (G, min(top, C)) int64 unit indices, largest first (NaN last, ties by index).
    """
    order = np.argsort(np.where(np.isnan(scores), np.inf, -scores), axis=1, kind="stable")
    return order[:, :top]


def specialised_units_figure(
    result: AnalysisResult, key: str, layer: str, top: int = TOP_UNITS
) -> Figure:
    """Per variable, the spatial maps of the channels with the largest mean index.

    Args:
        result: the analysis.
        key: a per-variable key.
        layer: a layer with (C, H, W) units.
        top: channels per variable.

    Returns:
        The figure: rows the variables, columns their ``top`` channels, one colour scale;
        flagged positions left blank.
    """
    maps = _valid_maps(result, layer, key)  # (G, C, H, W)
    scores = unit_scores(maps, key)
    chosen = top_units(scores, top)
    n_vars, top = chosen.shape
    figure = new_figure(1.2 + 1.6 * top, 0.6 + 1.5 * n_vars, dpi=DPI)
    axes = figure.subplots(n_vars, top, squeeze=False)
    low, high, cmap = colour_scale(maps, key, extend_shares=False)
    image = None
    for g, variable in enumerate(result.group_names):
        for j, channel in enumerate(chosen[g]):
            ax = axes[g][j]
            image = ax.imshow(maps[g, channel], cmap=cmap, vmin=low, vmax=high)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"ch {channel}: {number(scores[g, channel], 2)}", fontsize=8)
            if j == 0:
                ax.set_ylabel(variable, fontsize=8)
    if image is not None:
        figure.colorbar(image, ax=axes, shrink=0.6, label=key)
    figure.suptitle(f"{layer}: {key} maps of the most specialised channels", fontsize=10)
    return figure


def matrix_figure(
    matrices: Sequence[np.ndarray],
    titles: Sequence[str],
    rows: Sequence[str],
    columns: Sequence[str],
    title: str,
    *,
    low: float = -1.0,
    high: float = 1.0,
    cmap: str = "RdBu_r",
    label: str = "Spearman correlation",
) -> Figure:
    """One annotated heatmap panel per matrix (e.g. per layer), on a shared colour scale.

    Args:
        matrices: the (R, C) matrices, one per panel.
        titles: one title per panel.
        rows, columns: the R row and C column labels.
        title: the figure's title.
        low, high, cmap: the colour scale.
        label: the colour bar's label.

    Returns:
        The figure (cells annotated when a matrix has at most 160 of them).
    """
    n_panels = len(matrices)
    columns_per_row = min(3, n_panels)
    cell = 0.42
    width = columns_per_row * (1.6 + cell * len(columns)) + 1.0
    height = -(-n_panels // columns_per_row) * (1.4 + cell * len(rows)) + 0.6
    figure = new_figure(max(5.0, width), max(3.0, height), dpi=DPI)
    axes = list(grid_axes(figure, n_panels, columns_per_row).ravel()[:n_panels])
    image = None
    for ax, matrix, panel in zip(axes, matrices, titles, strict=True):
        matrix = np.asarray(matrix, dtype=np.float64)
        image = ax.imshow(matrix, cmap=cmap, vmin=low, vmax=high, aspect="auto")
        if matrix.size <= 160:
            for (i, j), value in np.ndenumerate(matrix):
                strong = np.isfinite(value) and abs(value - (low + high) / 2) > 0.3 * (high - low)
                ax.text(j, i, number(value, 2), ha="center", va="center", fontsize=7,
                        color="white" if strong else "black")
        ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_title(panel, fontsize=9)
    if image is not None:
        figure.colorbar(image, ax=axes, shrink=0.8, label=label)
    figure.suptitle(title, fontsize=10)
    return figure


# ------------------------------------------------------------------------------- sections
def _overview(page: Page, store: ResultsStore, names: Sequence[str]) -> None:
    """The run's metadata, its variables and one row per reported analysis."""
    meta = store.read_metadata()
    page.heading(2, "Run")
    keys = ("model", "weights", "dataset", "image_size", "seed", "created", "software_version")
    page.add(table(["field", "value"], [(k, meta.get(k, "")) for k in keys], left=2))
    problem = meta.get("problem")
    if problem:
        page.add(table(["variables (groups)"], [[", ".join(problem.get("group_names", []))]]))
    rows = []
    for name in names:
        attrs = store.analysis_attrs(name)
        rows.append((name, attrs["method"], attrs["n"], attrs["evaluations"],
                     f"{float(attrs['seconds']):.1f}", ", ".join(attrs["layers"])))
    page.add(table(["analysis", "method", "n", "rows", "seconds", "layers"], rows, left=2))


def _validity_note(result: AnalysisResult) -> str:
    """What the statistics of an analysis are over, and how its half-widths were computed."""
    interval = result.interval or "not recorded in this results file"
    return (
        f"Statistics are over each layer's valid units: units flagged constant (zero variance), "
        f"unsupported (variance not distinguishable from 0 at n = {result.n}) or negligible "
        f"(variance negligible next to the layer's) are excluded here but kept, with their raw "
        f"values and flags, in the results file. Table cells: median [10th, 90th percentile] "
        f"over the valid units; below: their mean and, where recorded, the median half-width (±). "
        f"Half-widths: {interval}."
    )


def _toggles_table(result: AnalysisResult) -> str:
    """How many base points (trajectories) change each variable: what its indices rest on."""
    what = "base points" if result.method == "sobol" else "trajectories"
    rows = [
        (variable, count, f"fewer than {MIN_TOGGLES}: too few terms to trust its indices"
         if count < MIN_TOGGLES else "")
        for variable, count in result.toggles.items()
    ]
    return table(["variable", f"{what} where it changes (of {result.n})", "note"], rows)


def _valid_cell(result: AnalysisResult, layer: str) -> str:
    """A layer's share of valid units, with the flagged units per reason as a tooltip."""
    flags = result.flags[layer]
    counts = np.bincount(flags.ravel(), minlength=len(FLAG_NAMES))
    reasons = ", ".join(f"{int(c)} {FLAG_NAMES[code]}" for code, c in enumerate(counts) if code)
    share = counts[0] / flags.size
    return (f'<span title="{escape(reasons)}">{share:.0%} ({int(counts[0])}/{flags.size})'
            f"</span>")


def _spread_cell(
    key: str, stats: Mapping[str, float], conf: Mapping[str, float] | None
) -> str:
    """median [p10, p90] of ``key`` over the valid units; below it the mean and the median
    half-width."""
    def text(value: float) -> str:
        return statistic(value, key)
    second = f"mean {text(stats['mean'])}"
    if conf is not None:
        second += f", ±{text(conf['median'])}"
    return (f"{text(stats['median'])} [{text(stats['p10'])}, {text(stats['p90'])}]"
            f"<br><small>{escape(second)}</small>")


def _spread_table(result: AnalysisResult, summary: Mapping[str, Any], key: str) -> str:
    """Rows layers, columns their share of valid units and the variables' spread of ``key``."""
    values, conf = summary[key], summary.get(f"{key}_conf")
    rows = [
        [escape(layer), _valid_cell(result, layer), *(
            _spread_cell(key, values[layer][variable],
                         None if conf is None else conf[layer][variable])
            for variable in result.group_names
        )]
        for layer in result.layer_names
    ]
    header = ["layer", "valid units", *result.group_names]
    return markup_table([escape(h) for h in header], rows)


def _pair_table(result: AnalysisResult, summary: Mapping[str, Any]) -> str:
    """Rows the variable pairs "a:b", columns the layers: the spread of S2."""
    values, conf = summary["S2"], summary.get("S2_conf")
    pairs = list(values[result.layer_names[0]])
    rows = [
        [escape(pair), *(
            _spread_cell("S2", values[layer][pair], None if conf is None else conf[layer][pair])
            for layer in result.layer_names
        )]
        for pair in pairs
    ]
    return markup_table([escape(h) for h in ("pair", *result.layer_names)], rows)


def _specialised_units(page: Page, name: str, result: AnalysisResult, key: str) -> None:
    """Per layer and variable, the valid units with the largest ``key``."""
    page.heading(3, f"Most specialised units ({key})")
    flat_rows = []
    for layer in result.layer_names:
        maps = _valid_maps(result, layer, key)
        if maps.ndim == 4:
            page.figure(specialised_units_figure(result, key, layer),
                        f"{name}_specialised_{key}_{layer}",
                        f"{name}, {layer}: per variable the {TOP_UNITS} channels with the "
                        f"largest mean {key} over valid positions")
            continue
        scores = unit_scores(maps, key)
        for g, variable in enumerate(result.group_names):
            units = [u for u in top_units(scores, TOP_UNITS)[g] if np.isfinite(scores[g, u])]
            flat_rows.append((layer, variable, ", ".join(
                f"#{u} ({number(scores[g, u], 3)})" for u in units) or "no valid unit"))
    if flat_rows:
        page.add(table(["layer", "variable", f"valid units with the largest {key} (value)"],
                        flat_rows, left=3))


def _analysis_section(page: Page, name: str, result: AnalysisResult) -> None:
    """One analysis: what its statistics rest on, per value type the median heatmap and the
    spread table, S2 where present, and its most specialised units."""
    page.heading(2, f"Analysis {name} ({result.method})")
    if not result.value_keys:
        page.note("This method has no per-variable maps (moments only).")
        return
    page.note(_validity_note(result))
    if result.toggles:
        page.add(_toggles_table(result))
    summary = result.summary()
    for key in result.value_keys:
        page.heading(3, f"{key} over valid units")
        page.figure(heatmap_figure(result, key), f"{name}_heatmap_{key}",
                    f"{name}: median {key} over each layer's valid units, layers x variables")
        page.add(_spread_table(result, summary, key))
    if "S2" in summary:
        page.heading(3, "Second-order indices S2")
        page.figure(pair_figure(result), f"{name}_S2",
                    f"{name}: median S2 over each layer's valid units (± median half-width)")
        page.add(_pair_table(result, summary))
    _specialised_units(page, name, result, result.value_keys[0])


def _wilcoxon_section(page: Page, path: Path, name: str) -> None:
    """Significant units per layer and augmentation of /wilcoxon/<name>."""
    tree, attrs = read_tree(path, WILCOXON_GROUP, name)
    variables = attrs["variables"]
    page.heading(3, f"Wilcoxon signed-rank tests ({name})")
    page.note(
        f"{attrs['n_pairs']} images, each augmentation's mean over {attrs['k']} draws vs the "
        f"original; Benjamini-Yekutieli per layer and augmentation; cells: units with "
        f"q < {attrs['alpha']} / units, and the mean rank-biserial correlation."
    )
    rows = []
    for layer in attrs["layers"]:
        values = tree[layer]
        units = values["wilcoxon_q"][0].size
        biserial = values["rank_biserial"].reshape(len(variables), -1).mean(axis=1)
        rows.append([layer, *(
            f"{int(c)}/{units} (r={b:+.2f})"
            for c, b in zip(values["n_significant"], biserial, strict=True)
        )])
    page.add(table(["layer", *variables], rows))


def _correlation_section(page: Page, path: Path, name: str) -> None:
    """The correlation matrices of /correlation/<name>."""
    tree, attrs = read_tree(path, CORRELATION_GROUP, name)
    variables, layers = attrs["variables"], attrs["layers"]
    page.heading(3, f"Spearman correlation between maps ({name})")
    page.note("Across channels at each spatial position, averaged over positions (across all "
              "units for channel-mean and fully connected layers).")
    for key in attrs["values"]:
        page.figure(
            matrix_figure([tree[layer][key]["variables"] for layer in layers], layers,
                          variables, variables, f"{name}: Spearman correlation of {key} maps"),
            f"{name}_correlation_{key}", f"{name}: correlation between variables' {key} maps",
        )
        page.figure(
            matrix_figure([tree[layer][key]["covariates"] for layer in layers], layers,
                          variables, list(COVARIATES),
                          f"{name}: Spearman correlation of {key} maps with unit covariates"),
            f"{name}_covariates_{key}", f"{name}: {key} maps against mean, variance and CV",
        )


def _lda_section(page: Page, path: Path, name: str) -> None:
    """Accuracy table and confusion matrices of /lda/<name>."""
    tree, attrs = read_tree(path, LDA_GROUP, name)
    variables, layers, chance = attrs["variables"], attrs["layers"], float(attrs["chance"])
    solvers = json.loads(attrs["solvers"]) if isinstance(attrs["solvers"], str) else {}
    page.heading(3, f"Linear discriminant analysis ({name})")
    page.note(f"Samples: (variable, channel) pairs; features: the channel's spatial map; "
              f"{attrs['n_repeats']} x {attrs['n_folds']}-fold stratified cross-validation; "
              f"chance {chance:.3f}.")
    rows = []
    for layer in layers:
        for key in attrs["values"]:
            accuracy = np.asarray(tree[layer][key]["accuracy"], dtype=np.float64)
            sd = accuracy.std(ddof=1) if accuracy.size > 1 else 0.0
            rows.append((layer, key, f"{accuracy.mean():.3f}", f"{sd:.3f}", f"{chance:.3f}",
                         f"{accuracy.mean() / chance:.2f}", solvers.get(f"{layer}/{key}", "")))
    page.add(table(["layer", "value", "accuracy", "sd", "chance", "x chance", "solver"],
                    rows, left=2))
    for key in attrs["values"]:
        matrices = []
        for layer in layers:
            confusion = np.asarray(tree[layer][key]["confusion"], dtype=np.float64)
            totals = confusion.sum(axis=1, keepdims=True)
            matrices.append(np.divide(confusion, totals, out=np.zeros_like(confusion),
                                      where=totals > 0))
        page.figure(
            matrix_figure(matrices, layers, variables, variables,
                          f"{name}: LDA confusion ({key} maps), rows true, columns predicted",
                          low=0.0, high=1.0, cmap="Blues", label="fraction of the true class"),
            f"{name}_lda_confusion_{key}", f"{name}: LDA confusion matrices of {key} maps",
        )


def _masking_section(page: Page, store: ResultsStore, group: str) -> None:
    """The specificity figure and unmasked accuracies of /masking/<group>."""
    result = store.read_result(MaskingResult, MASKING_GROUP, group)
    page.heading(2, f"Guided masking {group} ({result.value} maps of {result.analysis})")
    page.note(
        f"{result.n_images} images, {result.k} draws per input augmentation, "
        f"{len(result.configurations)} configurations, masked layers {', '.join(result.layers)}; "
        f"{result.tied_layers} (variable, quantile, layer) masks fell on a tied quantile, "
        f"{result.fully_masked_layers} masked a whole layer (ties: {result.ties})."
    )
    page.figure(specificity_figure(result), f"masking_{group}_specificity",
                f"masking {group}: specificity (Spearman of accuracy profiles)")
    page.add(table(
        ["input", "unmasked top-1", f"unmasked top-{result.top_k}"],
        [(name, number(a1), number(a5)) for name, a1, a5 in
         zip(result.inputs, result.unmasked_acc1, result.unmasked_acc5, strict=True)],
    ))
    _masking_profiles_section(page, store, group)


def _masking_profiles_section(page: Page, store: ResultsStore, group: str) -> None:
    """The unmasked per-class accuracies and the clustering of the profiles of
    /masking/<group> (nothing for groups stored before they were recorded)."""
    result = MaskingResult.from_group(*store.read_group(f"{MASKING_GROUP}/{group}", nested=True))
    if result.class_acc1 is None and result.clustering is None:
        return
    page.heading(3, f"Masking profiles and clusters ({group})")
    stored = ("per-class top-1 accuracies and confusion matrices" if result.confusion is not None
              else "per-class top-1 accuracies (no confusion matrices: too many classes)")
    classes = result.classes or []
    shown = result.unmasked_class_acc1 is not None and len(classes) <= 20  # a readable table
    page.note(f"Specificity compares {result.profile} profiles; the results file holds the "
              f"{stored} of every configuration."
              + (" Unmasked top-1 accuracy per class:" if shown else ""))
    if shown:
        page.add(table(["input", *classes], [
            (name, *(number(a) for a in row))
            for name, row in zip(result.inputs, result.unmasked_class_acc1, strict=True)
        ]))
    clustering = result.clustering
    if clustering is None:
        return
    page.figure(dendrogram_figure(clustering), f"masking_{group}_dendrogram",
                f"masking {group}: {clustering.method}-linkage dendrogram of the (input | mask "
                f"variable) {clustering.profile} profiles, {clustering.metric} distance")
    page.add(table(["cluster", "profiles (input | mask variable)"], [
        (k, ", ".join(members)) for k, members in enumerate(clustering.members(), start=1)
    ], left=2))


def _single_class_section(page: Page, store: ResultsStore, group: str) -> None:
    """The candidate-class table of /single_class/<group>."""
    result = store.read_result(SingleClassResult, SINGLE_CLASS_GROUP, group)
    t = result.threshold
    page.heading(2, f"Single-class analysis {group} ({result.value} maps of {result.analysis})")
    page.note(
        f"Candidates: the top {result.n} classes of {result.layer} by sensitivity to each "
        f"variable. Mean Jaccard index of the top-{result.n} predictions with the candidates "
        f"under self-masking, over {len(result.configurations)} configurations; chance "
        f"threshold {t.threshold:.5f} (Q3 + 1.5 IQR of the simulated mean, C = {t.n_classes}, "
        f"s = {t.samples_per_class}, Monte Carlo se {t.standard_error:.1e})."
    )
    rows = []
    for v, match in enumerate(result.matches()):
        rows.append((
            match["variable"], ", ".join(match["candidates"]),
            number(float(result.jaccard_original[v]), 4),
            number(float(result.jaccard_augmented[v]), 4),
            number(match["max_jaccard"], 4), match["configuration"],
            ", ".join(match["matched_configurations"]) or "none",
        ))
    page.add(table(
        ["variable", "candidate classes", "J original", "J augmented", "max J masked",
         "at configuration", "matched (J > threshold)"], rows, left=2,
    ))


def _suppression_section(page: Page, store: ResultsStore, group: str) -> None:
    """Nuisance suppression (/suppression/<group>): the choice, the test accuracies against
    distortion strength (figure and table) and the chosen mask's units per layer."""
    result = store.read_result(SuppressionResult, SUPPRESSION_GROUP, group)
    page.heading(2, f"Suppression {group} ({result.variable}, {result.value} maps of "
                    f"{result.analysis})")
    page.note(
        f"{len(result.candidates)} candidates (mask configurations per masked layer and across "
        f"layers) scored on {result.n_val} validation images by the {result.criterion} of "
        f"their top-1 accuracies clean and at strengths "
        f"{', '.join(f'{s:g}' for s in result.strengths)}; chosen: {result.chosen} (score "
        f"{result.val_score[result.chosen_index]:.3f}, unmasked {result.val_unmasked_score:.3f})."
        f" Test: {result.n_test} images; {result.random_draws} random masks with the chosen "
        f"mask's unit count per layer. Distortion: {result.distortion}."
    )
    page.figure(suppression_figure(result), f"suppression_{group}",
                f"suppression {group}: test top-1 accuracy against {result.variable} strength")
    random = result.test_random_acc1
    rows = [("unmasked", *(number(a) for a in result.test_unmasked_acc1)),
            ("suppression", *(number(a) for a in result.test_chosen_acc1))]
    if len(random):
        rows.append((f"random (mean of {len(random)})", *(number(a) for a in random.mean(0))))
    page.add(table(["test top-1", *result.conditions], rows))
    page.add(table(["layer", "units masked", "valid units"], [
        (layer, int(n), int(u)) for layer, n, u in
        zip(result.layers, result.unit_counts, result.layer_units, strict=True)]))


def _comparison_table(comparison: Comparison) -> str:
    """Rows the layers, columns the units valid in both and each variable's Spearman
    correlation (pooled; by position below it for spatial maps)."""
    rows = []
    for layer in comparison.layers:
        entry = comparison.tree[layer]
        cells = []
        for g in range(len(comparison.variables)):
            cell = number(entry["spearman"][g, g], 2)
            if comparison.spatial(layer):
                cell += f"<br><small>by position {number(entry['spearman_positions'][g, g], 2)}"
                cell += "</small>"
            cells.append(cell)
        rows.append([escape(layer), str(int(entry["valid_units"])), *cells])
    header = ["layer", "units valid in both", *comparison.variables]
    return markup_table([escape(h) for h in header], rows)


def _comparison_section(page: Page, comparison: Comparison) -> None:
    """Two analyses compared (/comparison/<name>): the correlation table and matrices, per
    layer the scatter of the two maps and of each against the unit covariates, the decay
    curves."""
    (a, b), (key_a, key_b), name = comparison.analyses, comparison.values, comparison.name
    page.heading(2, f"Comparison of {a} ({key_a}) and {b} ({key_b})")
    page.note(
        "Spearman correlation of the two maps of each variable over the units valid in both "
        "analyses (flagged units left out), pooled over the layer's units as in the scatter "
        "plots; below it, for spatial maps, across the channels at each position and averaged "
        "over positions (as the correlation statistics)."
    )
    page.add(_comparison_table(comparison))
    page.figure(
        matrix_figure([comparison.tree[layer]["spearman"] for layer in comparison.layers],
                      comparison.layers, comparison.variables, comparison.variables,
                      f"{name}: Spearman correlation, rows {a} {key_a}, columns {b} {key_b}"),
        f"{name}_spearman", f"{name}: correlation between every two variables' maps",
    )
    for layer in comparison.layers:
        page.figure(scatter_figure(comparison, layer), f"{name}_scatter_{layer}",
                    f"{name}, {layer}: {b} {key_b} against {a} {key_a}, units valid in both")
    page.heading(3, f"Maps against mean, variance and CV ({name})")
    page.note("Each analysis's map of every variable against its units' mean, variance and "
              "coefficient of variation, over its valid units: how much of a sensitivity map "
              "the activation statistics alone would predict.")
    for layer in comparison.layers:
        figure = covariates_figure(comparison, layer)
        if figure is not None:
            page.figure(figure, f"{name}_covariates_{layer}",
                        f"{name}, {layer}: maps against mean, variance and CV")
    page.heading(3, f"Decay of the largest values ({name})")
    page.note(f"Per layer and variable the {comparison.top} largest values over the valid "
              f"units, descending: how fast sensitivity falls off from the most specialised "
              f"units. Single-class selection takes its candidate classes from the head of the "
              f"classification layer's curve.")
    page.figure(decay_figure(comparison), f"{name}_decay",
                f"{name}: largest values per variable, descending")


# ------------------------------------------------------------------------------- entry point
def write_report(
    results: str | Path,
    out_dir: str | Path | None = None,
    analyses: Sequence[str] | None = None,
) -> Path:
    """Write ``<out_dir>/index.html`` and its PNGs.

    Args:
        results: the results file.
        out_dir: the folder (default: ``<results dir>/report``).
        analyses: analysis names to report (default: every complete analysis). Statistics,
            masking and single-class groups are included when their analysis is reported.

    Returns:
        The page's path.

    Raises:
        FileNotFoundError: no results file (nothing written).
        ValueError: a named analysis is not complete in the file, or there is none (nothing
            written).
    """
    store = ResultsStore(results)
    if not store.path.is_file():
        raise FileNotFoundError(f"no results file at {store.path}; pass a run's results.h5")
    available = store.analyses()
    names = list(available if analyses is None else analyses)
    missing = [n for n in names if n not in available]
    if missing or not names:
        raise ValueError(
            f"no complete analysis {missing or names} in {store.path}; available: {available}"
        )
    loaded = {name: store.read_analysis(name) for name in names}
    out = store.path.parent / "report" if out_dir is None else Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    page = Page(out)
    _overview(page, store, names)
    groups = {kind: store.groups(kind) for kind in (
        WILCOXON_GROUP, CORRELATION_GROUP, LDA_GROUP, MASKING_GROUP, SINGLE_CLASS_GROUP,
        SUPPRESSION_GROUP)}
    sections = ((WILCOXON_GROUP, _wilcoxon_section), (CORRELATION_GROUP, _correlation_section),
                (LDA_GROUP, _lda_section))
    for name, result in loaded.items():
        _analysis_section(page, name, result)
        for kind, section in sections:
            if name in groups[kind]:
                section(page, store.path, name)
    for kind, section in ((MASKING_GROUP, _masking_section),
                          (SINGLE_CLASS_GROUP, _single_class_section),
                          (SUPPRESSION_GROUP, _suppression_section)):
        for group in groups[kind]:
            if analyses is None or store.read_group(f"{kind}/{group}")[1].get(
                "analysis", group
            ) in names:
                section(page, store, group)
    for group in store.groups(COMPARISON_GROUP):
        if set(store.read_group(f"{COMPARISON_GROUP}/{group}")[1]["analyses"]) <= set(names):
            _comparison_section(page, read_comparison(store.path, group, loaded))
    index = out / "index.html"
    tmp = out / f".{index.name}.tmp"
    tmp.write_text(page.html(f"Augmentation sensitivity report: {store.path.parent.name}"),
                   encoding="utf-8")
    os.replace(tmp, index)  # a reader never sees a half-written page
    return index
