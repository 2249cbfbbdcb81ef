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

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from sensitivity.comparison import (
    read_comparison,
)
from sensitivity.config import MIN_TOGGLES
from sensitivity.estimators import FLAG_NAMES
from sensitivity.html_page import DPI, Page, escape, markup_table, number, statistic, table
from sensitivity.html_sections import (
    comparison_section,
    correlation_section,
    lda_section,
    masking_section,
    single_class_section,
    suppression_section,
    wilcoxon_section,
)
from sensitivity.layouts import features_first
from sensitivity.masking.result import GROUP_KIND as MASKING_GROUP
from sensitivity.report import (
    SIGNED_KEYS,
    colour_scale,
    heatmap_figure,
    new_figure,
    pair_figure,
)
from sensitivity.results import AnalysisResult
from sensitivity.single_class import GROUP_KIND as SINGLE_CLASS_GROUP
from sensitivity.stats import (
    COMPARISON_GROUP,
    CORRELATION_GROUP,
    LDA_GROUP,
    WILCOXON_GROUP,
)
from sensitivity.store import ResultsStore
from sensitivity.suppression import GROUP_KIND as SUPPRESSION_GROUP

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
    sections = ((WILCOXON_GROUP, wilcoxon_section), (CORRELATION_GROUP, correlation_section),
                (LDA_GROUP, lda_section))
    for name, result in loaded.items():
        _analysis_section(page, name, result)
        for kind, section in sections:
            if name in groups[kind]:
                section(page, store.path, name)
    for kind, section in ((MASKING_GROUP, masking_section),
                          (SINGLE_CLASS_GROUP, single_class_section),
                          (SUPPRESSION_GROUP, suppression_section)):
        for group in groups[kind]:
            if analyses is None or store.read_group(f"{kind}/{group}")[1].get(
                "analysis", group
            ) in names:
                section(page, store, group)
    for group in store.groups(COMPARISON_GROUP):
        if set(store.read_group(f"{COMPARISON_GROUP}/{group}")[1]["analyses"]) <= set(names):
            comparison_section(page, read_comparison(store.path, group, loaded))
    index = out / "index.html"
    tmp = out / f".{index.name}.tmp"
    tmp.write_text(page.html(f"Augmentation sensitivity report: {store.path.parent.name}"),
                   encoding="utf-8")
    os.replace(tmp, index)  # a reader never sees a half-written page
    return index
