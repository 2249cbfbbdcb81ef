"""The HTML report's sections of what commands add to an analysis: Wilcoxon tests,
correlations, LDA, guided masking (specificity, per-class profiles and their clustering),
single-class analysis, nuisance suppression and comparisons of two analyses. Each takes the
page and what it draws from the results file; ``sensitivity.html_report`` decides which to show
(its module docstring lists them).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from sensitivity.comparison import Comparison, covariates_figure, decay_figure, scatter_figure
from sensitivity.html_page import DPI, Page, escape, markup_table, number, table
from sensitivity.masking.figures import dendrogram_figure
from sensitivity.masking.result import GROUP_KIND as MASKING_GROUP
from sensitivity.masking.result import MaskingResult
from sensitivity.report import grid_axes, new_figure, specificity_figure
from sensitivity.single_class import GROUP_KIND as SINGLE_CLASS_GROUP
from sensitivity.single_class import SingleClassResult
from sensitivity.stats import CORRELATION_GROUP, COVARIATES, LDA_GROUP, WILCOXON_GROUP, read_tree
from sensitivity.store import ResultsStore
from sensitivity.suppression import GROUP_KIND as SUPPRESSION_GROUP
from sensitivity.suppression import SuppressionResult
from sensitivity.suppression_figures import suppression_figure


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


def wilcoxon_section(page: Page, path: Path, name: str) -> None:
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


def correlation_section(page: Page, path: Path, name: str) -> None:
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


def lda_section(page: Page, path: Path, name: str) -> None:
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


def masking_section(page: Page, store: ResultsStore, group: str) -> None:
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
    masking_profiles_section(page, store, group)


def masking_profiles_section(page: Page, store: ResultsStore, group: str) -> None:
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


def single_class_section(page: Page, store: ResultsStore, group: str) -> None:
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


def suppression_section(page: Page, store: ResultsStore, group: str) -> None:
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


def comparison_table(comparison: Comparison) -> str:
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


def comparison_section(page: Page, comparison: Comparison) -> None:
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
    page.add(comparison_table(comparison))
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
