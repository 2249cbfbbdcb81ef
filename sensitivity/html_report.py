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
  (/single_class/<name>).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from sensitivity.config import MIN_TOGGLES
from sensitivity.estimators import FLAG_NAMES
from sensitivity.masking.result import GROUP_KIND as MASKING_GROUP
from sensitivity.masking.result import MaskingResult
from sensitivity.report import (
    SIGNED_KEYS,
    colour_scale,
    file_part,
    grid_axes,
    heatmap_figure,
    new_figure,
    pair_figure,
    specificity_figure,
)
from sensitivity.results import AnalysisResult
from sensitivity.single_class import GROUP_KIND as SINGLE_CLASS_GROUP
from sensitivity.single_class import SingleClassResult
from sensitivity.stats import CORRELATION_GROUP, COVARIATES, LDA_GROUP, WILCOXON_GROUP, read_tree
from sensitivity.store import ResultsStore

DPI = 100
TOP_UNITS = 3
# Value types in the activations' own units (any magnitude): significant digits, not decimals.
_SCALED = ("shapley", "mean_diff")

_STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
h3 { margin-top: 1.5em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #f2f2f2; } td.l, th.l { text-align: left; }
figure { margin: 0.5em 0 1.5em; } figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
nav ul { columns: 2; } .note { color: #666; font-size: 0.9em; }
td small { color: #666; white-space: nowrap; }
"""


# ------------------------------------------------------------------------------- helpers
def _esc(value: Any) -> str:
    return html.escape(str(value))


def _markup_table(header: Sequence[str], rows: Iterable[Sequence[str]], left: int = 1) -> str:
    """An HTML table of cells given as markup (escaped by the caller); the first ``left``
    columns are left-aligned labels."""
    def cells(tag: str, values: Sequence[str]) -> str:
        return "".join(
            f'<{tag}{" class=l" if i < left else ""}>{v}</{tag}>' for i, v in enumerate(values)
        )
    body = "".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
    return f"<table><tr>{cells('th', header)}</tr>{body}</table>"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], left: int = 1) -> str:
    """An HTML table of plain values; the first ``left`` columns are left-aligned labels."""
    return _markup_table([_esc(h) for h in header], ([_esc(v) for v in row] for row in rows),
                         left)


def _number(value: float, digits: int = 3) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.{digits}f}"


def _statistic(value: float, key: str) -> str:
    """A summary statistic of ``key`` (or its half-width): indices and effect sizes are
    dimensionless, three decimals; values in activation units, three significant digits."""
    if not np.isfinite(value):
        return "n/a"
    return f"{value:.3g}" if key.removesuffix("_conf") in _SCALED else f"{value:.3f}"


class _Page:
    """Collects HTML parts and writes each figure as a PNG next to the page."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.parts: list[str] = []
        self.toc: list[tuple[str, str]] = []
        self.pngs: list[Path] = []
        self.sections = 0

    def heading(self, level: int, text: str) -> None:
        self.sections += 1
        anchor = f"s{self.sections}"
        if level == 2:
            self.toc.append((anchor, text))
        self.parts.append(f'<h{level} id="{anchor}">{_esc(text)}</h{level}>')

    def add(self, markup: str) -> None:
        self.parts.append(markup)

    def note(self, text: str) -> None:
        self.parts.append(f'<p class="note">{_esc(text)}</p>')

    def figure(self, figure: Figure, name: str, caption: str) -> None:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        data = buffer.getvalue()
        path = self.out_dir / f"{file_part(name)}.png"
        path.write_bytes(data)
        self.pngs.append(path)
        encoded = base64.b64encode(data).decode("ascii")
        self.parts.append(
            f'<figure><img src="data:image/png;base64,{encoded}" alt="{_esc(caption)}">'
            f"<figcaption>{_esc(caption)} ({_esc(path.name)})</figcaption></figure>"
        )

    def html(self, title: str) -> str:
        toc = "".join(f'<li><a href="#{a}">{_esc(t)}</a></li>' for a, t in self.toc)
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            # An empty icon: the browser requests no favicon, the page loads nothing else.
            f'<link rel="icon" href="data:,"><title>{_esc(title)}</title>'
            f"<style>{_STYLE}</style></head><body><h1>{_esc(title)}</h1>"
            f"<nav><ul>{toc}</ul></nav>{''.join(self.parts)}</body></html>\n"
        )


# ------------------------------------------------------------------------------- figures
def _finite(values: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(values), values, np.nan)


def _valid_maps(result: AnalysisResult, layer: str, key: str) -> np.ndarray:
    """(G, *u) ``key`` values of ``layer`` with flagged units and non-finite values as NaN:
    a flagged unit's raw index is noise (or 0 for a constant unit) and must not win a ranking
    or stretch a colour scale."""
    return np.where(result.valid(layer), _finite(result.layers[layer][key]), np.nan)


def unit_scores(maps: np.ndarray, key: str) -> np.ndarray:
    """(G, C): how strongly each unit (channel of a conv map) carries each variable: the mean
    over its spatial positions of ``key`` (magnitude for signed values); non-finite values are
    left out."""
    values = _finite(np.asarray(maps, dtype=np.float64))
    if key in SIGNED_KEYS:
        values = np.abs(values)
    values = values.reshape(values.shape[0], values.shape[1], -1)
    count = np.isfinite(values).sum(axis=2)
    total = np.nansum(values, axis=2)
    return np.divide(total, count, out=np.full(count.shape, np.nan), where=count > 0)


def top_units(scores: np.ndarray, top: int = TOP_UNITS) -> np.ndarray:
    """(G, top) indices of the largest scores per variable (NaN last, ties by index)."""
    order = np.argsort(np.where(np.isnan(scores), np.inf, -scores), axis=1, kind="stable")
    return order[:, :top]


def specialised_units_figure(
    result: AnalysisResult, key: str, layer: str, top: int = TOP_UNITS
) -> Figure:
    """Per variable (rows), the spatial ``key`` maps of the ``top`` channels with the largest
    mean index over their valid positions (columns), on one colour scale; flagged positions
    are left blank."""
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
            ax.set_title(f"ch {channel}: {_number(scores[g, channel], 2)}", fontsize=8)
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
    """One annotated heatmap panel per matrix (e.g. per layer), on a shared colour scale."""
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
                ax.text(j, i, _number(value, 2), ha="center", va="center", fontsize=7,
                        color="white" if strong else "black")
        ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_title(panel, fontsize=9)
    if image is not None:
        figure.colorbar(image, ax=axes, shrink=0.8, label=label)
    figure.suptitle(title, fontsize=10)
    return figure


# ------------------------------------------------------------------------------- sections
def _overview(page: _Page, store: ResultsStore, names: Sequence[str]) -> None:
    meta = store.read_metadata()
    page.heading(2, "Run")
    keys = ("model", "weights", "dataset", "image_size", "seed", "created", "software_version")
    page.add(_table(["field", "value"], [(k, meta.get(k, "")) for k in keys], left=2))
    problem = meta.get("problem")
    if problem:
        page.add(_table(["variables (groups)"], [[", ".join(problem.get("group_names", []))]]))
    rows = []
    for name in names:
        attrs = store.analysis_attrs(name)
        rows.append((name, attrs["method"], attrs["n"], attrs["evaluations"],
                     f"{float(attrs['seconds']):.1f}", ", ".join(attrs["layers"])))
    page.add(_table(["analysis", "method", "n", "rows", "seconds", "layers"], rows, left=2))


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
    return _table(["variable", f"{what} where it changes (of {result.n})", "note"], rows)


def _valid_cell(result: AnalysisResult, layer: str) -> str:
    """A layer's share of valid units, with the flagged units per reason as a tooltip."""
    flags = result.flags[layer]
    counts = np.bincount(flags.ravel(), minlength=len(FLAG_NAMES))
    reasons = ", ".join(f"{int(c)} {FLAG_NAMES[code]}" for code, c in enumerate(counts) if code)
    share = counts[0] / flags.size
    return (f'<span title="{_esc(reasons)}">{share:.0%} ({int(counts[0])}/{flags.size})'
            f"</span>")


def _spread_cell(
    key: str, stats: Mapping[str, float], conf: Mapping[str, float] | None
) -> str:
    """median [p10, p90] of ``key`` over the valid units; below it the mean and the median
    half-width."""
    def text(value: float) -> str:
        return _statistic(value, key)
    second = f"mean {text(stats['mean'])}"
    if conf is not None:
        second += f", ±{text(conf['median'])}"
    return (f"{text(stats['median'])} [{text(stats['p10'])}, {text(stats['p90'])}]"
            f"<br><small>{_esc(second)}</small>")


def _spread_table(result: AnalysisResult, summary: Mapping[str, Any], key: str) -> str:
    """Rows layers, columns their share of valid units and the variables' spread of ``key``."""
    values, conf = summary[key], summary.get(f"{key}_conf")
    rows = [
        [_esc(layer), _valid_cell(result, layer), *(
            _spread_cell(key, values[layer][variable],
                         None if conf is None else conf[layer][variable])
            for variable in result.group_names
        )]
        for layer in result.layer_names
    ]
    header = ["layer", "valid units", *result.group_names]
    return _markup_table([_esc(h) for h in header], rows)


def _pair_table(result: AnalysisResult, summary: Mapping[str, Any]) -> str:
    """Rows the variable pairs "a:b", columns the layers: the spread of S2."""
    values, conf = summary["S2"], summary.get("S2_conf")
    pairs = list(values[result.layer_names[0]])
    rows = [
        [_esc(pair), *(
            _spread_cell("S2", values[layer][pair], None if conf is None else conf[layer][pair])
            for layer in result.layer_names
        )]
        for pair in pairs
    ]
    return _markup_table([_esc(h) for h in ("pair", *result.layer_names)], rows)


def _specialised_units(page: _Page, name: str, result: AnalysisResult, key: str) -> None:
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
                f"#{u} ({_number(scores[g, u], 3)})" for u in units) or "no valid unit"))
    if flat_rows:
        page.add(_table(["layer", "variable", f"valid units with the largest {key} (value)"],
                        flat_rows, left=3))


def _analysis_section(page: _Page, name: str, result: AnalysisResult) -> None:
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


def _wilcoxon_section(page: _Page, path: Path, name: str) -> None:
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
    page.add(_table(["layer", *variables], rows))


def _correlation_section(page: _Page, path: Path, name: str) -> None:
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


def _lda_section(page: _Page, path: Path, name: str) -> None:
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
    page.add(_table(["layer", "value", "accuracy", "sd", "chance", "x chance", "solver"],
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


def _masking_section(page: _Page, store: ResultsStore, group: str) -> None:
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
    page.add(_table(
        ["input", "unmasked top-1", f"unmasked top-{result.top_k}"],
        [(name, _number(a1), _number(a5)) for name, a1, a5 in
         zip(result.inputs, result.unmasked_acc1, result.unmasked_acc5, strict=True)],
    ))


def _single_class_section(page: _Page, store: ResultsStore, group: str) -> None:
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
            _number(float(result.jaccard_original[v]), 4),
            _number(float(result.jaccard_augmented[v]), 4),
            _number(match["max_jaccard"], 4), match["configuration"],
            ", ".join(match["matched_configurations"]) or "none",
        ))
    page.add(_table(
        ["variable", "candidate classes", "J original", "J augmented", "max J masked",
         "at configuration", "matched (J > threshold)"], rows, left=2,
    ))


# ------------------------------------------------------------------------------- entry point
def write_report(
    results: str | Path,
    out_dir: str | Path | None = None,
    analyses: Sequence[str] | None = None,
) -> Path:
    """Write ``<out_dir>/index.html`` (default: ``<results dir>/report``) and its PNGs.

    analyses: analysis names to report (default: every complete analysis). Statistics,
    masking and single-class groups are included when their analysis is reported. Returns the
    page's path. FileNotFoundError / ValueError (nothing written) for a missing results file
    or analysis.
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
    page = _Page(out)
    _overview(page, store, names)
    groups = {kind: store.groups(kind) for kind in (
        WILCOXON_GROUP, CORRELATION_GROUP, LDA_GROUP, MASKING_GROUP, SINGLE_CLASS_GROUP)}
    sections = ((WILCOXON_GROUP, _wilcoxon_section), (CORRELATION_GROUP, _correlation_section),
                (LDA_GROUP, _lda_section))
    for name, result in loaded.items():
        _analysis_section(page, name, result)
        for kind, section in sections:
            if name in groups[kind]:
                section(page, store.path, name)
    for kind, section in ((MASKING_GROUP, _masking_section),
                          (SINGLE_CLASS_GROUP, _single_class_section)):
        for group in groups[kind]:
            if analyses is None or store.read_group(f"{kind}/{group}")[1].get(
                "analysis", group
            ) in names:
                section(page, store, group)
    index = out / "index.html"
    tmp = out / f".{index.name}.tmp"
    tmp.write_text(page.html(f"Augmentation sensitivity report: {store.path.parent.name}"),
                   encoding="utf-8")
    os.replace(tmp, index)  # a reader never sees a half-written page
    return index
