"""Two analyses of one network compared unit by unit (``comparison_statistics``, written as
/comparison/<analysis>_vs_<other>): the comparisons the paper draws of Sobol' and Shapley maps.

Per layer:

- the Spearman correlation between the two analyses' maps of every pair of variables (the
  diagonal: the same variable, e.g. Sobol' ST against normalised Shapley effects) over the units
  valid in both, pooled over all of the layer's units (what a scatter of the two maps shows)
  and, as /correlation does (METHOD.md section 10), across the channels at each spatial
  position and averaged over positions;
- per analysis, the same two correlations of each variable's map with the unit covariates
  mean, variance and CV (``COVARIATES``) over that analysis's valid units;
- per analysis and variable, the largest values over the valid units in descending order: the
  head of the curve that single-class selection takes its candidates from.

Flagged units take part in nothing: their raw indices can be anything (1e16, -25). The
correlations are ``spearman_by_position`` of sensitivity.stats.correlation; the pooled one
treats the layer's units as the units of one position. No Lightning, no wandb.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sensitivity.layouts import features_first
from sensitivity.progress import Progress
from sensitivity.provenance import describe_differences
from sensitivity.results import AnalysisResult
from sensitivity.stats.correlation import position_mean, spearman_by_position, unit_covariates
from sensitivity.stats.groups import (
    COMPARISON_GROUP,
    COVARIATES,
    check_overwrite,
    value_keys,
    write_tree,
)
from sensitivity.store import ResultsStore

# Largest values per variable kept for the decay curves (the paper draws 20).
DEFAULT_TOP = 20
# The map of an analysis compared by default: Sobol' total indices, normalised Shapley effects.
PREFERRED_KEYS = ("ST", "shapley_normalized", "S1")
# Analysis attributes that say what it was computed from (``sensitivity.provenance``).
PROVENANCE_KEYS = ("model", "weights", "weights_sha256", "dataset", "image_size", "problem")
# The subgroups of a layer holding each analysis's own arrays, in attrs["analyses"] order.
SIDES = ("a", "b")


@dataclass
class LayerMaps:
    """One analysis's maps of one layer, channels first (``AnalysisResult.features_first``).

    Attributes:
        maps: (G, C, *positions) values of the compared key.
        valid: (C, *positions) bool, the units not flagged.
        covariates: (3, C, *positions) mean, variance and CV; None without moments.
    """

    maps: np.ndarray
    valid: np.ndarray
    covariates: np.ndarray | None


def layer_maps(result: AnalysisResult, layer: str, key: str) -> LayerMaps:
    """The maps of ``key``, the valid units and the covariates of a layer, channels first.

    Args:
        result: the analysis.
        layer: one of its layers.
        key: a per-variable key it has.

    Returns:
        The ``LayerMaps``.
    """
    unit = result.unit_layout(layer)
    covariates = unit_covariates(result.layers[layer])
    return LayerMaps(
        maps=result.features_first(layer, key),
        valid=features_first(result.valid(layer), 0, unit),
        covariates=None if covariates is None else features_first(covariates, 1, unit),
    )


def cross_spearman(
    x: np.ndarray, y: np.ndarray, valid: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Spearman correlation between every map of ``x`` and every map of ``y`` over the valid
    units: pooled over all units, and averaged over positions.

    Args:
        x: (V, C, *positions) maps.
        y: (W, C, *positions) maps.
        valid: (C, *positions) bool, the units that take part.

    Returns:
        (pooled (V, W), by position (V, W)) float64: pooled is scipy.stats.spearmanr of the
        valid units' values; by position the mean over positions of the correlation across
        the channels valid there (``spearman_by_position``; equal to pooled without spatial
        axes). NaN where undefined (constant or non-finite maps, fewer than
        MIN_CORRELATION_UNITS units).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    pooled = spearman_by_position(
        x.reshape(len(x), -1), y.reshape(len(y), -1), np.reshape(valid, -1)
    )[..., 0]
    return pooled, position_mean(spearman_by_position(x, y, valid))


def top_values(maps: np.ndarray, valid: np.ndarray, top: int) -> np.ndarray:
    """Per variable, the largest finite values over the valid units, in descending order.

    Args:
        maps: (G, *u) maps.
        valid: (*u) bool, the units that take part.
        top: how many values to keep.

    Returns:
        (G, K) float64 with K = min(top, units); NaN past a variable's valid finite values.
    """
    values = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)
    kept = np.reshape(valid, -1) & np.isfinite(values)
    ordered = -np.sort(np.where(kept, -values, np.inf), axis=1)  # descending, dropped last
    return np.where(np.isfinite(ordered), ordered, np.nan)[:, :top]


def _check_same(what: str, names: Sequence[str], first: Any, second: Any) -> None:
    """ValueError naming ``what`` when the two analyses' values differ."""
    if first != second:
        raise ValueError(
            f"analyses {names[0]!r} and {names[1]!r} have different {what}: {first} and "
            f"{second}; compare two analyses of the same layers and variables"
        )


def _provenance(store: ResultsStore, name: str) -> dict[str, Any]:
    """What an analysis was computed from (the attributes it has of PROVENANCE_KEYS)."""
    attrs = store.analysis_attrs(name)
    out = {key: attrs[key] for key in PROVENANCE_KEYS if key in attrs}
    if "problem" in out:  # JSON text: compared leaf by leaf
        out["problem"] = json.loads(out["problem"])
    return out


def comparable_analyses(
    store: ResultsStore, names: Sequence[str]
) -> tuple[AnalysisResult, AnalysisResult]:
    """The two analyses, read and checked to describe the same network and units.

    Args:
        store: the results file.
        names: the two analysis names.

    Returns:
        The two AnalysisResults.

    Raises:
        ValueError: one name twice, a missing analysis, provenance that differs (model,
            weights (by their SHA-256 where both record it), dataset, image size, problem:
            the attributes both record), or other variables, layers, unit shapes or unit
            axes.
    """
    if names[0] == names[1]:
        raise ValueError(f"compare needs two different analyses; got {names[0]!r} twice")
    results = [store.read_analysis(name) for name in names]
    given = [_provenance(store, name) for name in names]
    shared = [key for key in given[0] if key in given[1]]
    if all(p.get("weights_sha256") for p in given):  # a moved checkpoint keeps its hash
        shared = [key for key in shared if key != "weights"]
    differences = describe_differences({k: given[0][k] for k in shared},
                                       {k: given[1][k] for k in shared}, labels=tuple(names))
    if differences:
        raise ValueError(
            f"analyses {names[0]!r} and {names[1]!r} were computed from different inputs: "
            f"{differences}; compare analyses of one model, weights, dataset and problem"
        )
    _check_same("variables", names, results[0].group_names, results[1].group_names)
    _check_same("layers", names, sorted(results[0].layers), sorted(results[1].layers))
    for layer in results[0].layer_names:
        _check_same(f"unit shapes at layer {layer!r}", names, results[0].unit_shape(layer),
                    results[1].unit_shape(layer))
        units = [result.unit_layout(layer) for result in results]
        if None not in units:  # a result without a record has its channels first
            _check_same(f"unit axes at layer {layer!r}", names,
                        *(",".join(unit.unit_axes) for unit in units))
    return results[0], results[1]


def compared_keys(
    results: Sequence[AnalysisResult], names: Sequence[str], values: Sequence[str] | None
) -> list[str]:
    """The value type compared of each analysis.

    Args:
        results: the two analyses.
        names: their names (for messages).
        values: one value type for both, or one per analysis; None: per analysis the first
            of PREFERRED_KEYS it has.

    Returns:
        [key of the first, key of the second]; ValueError for a key an analysis lacks.
    """
    if values is not None and len(values) not in (1, 2):
        raise ValueError(f"--value_types takes one value type, or one per analysis; got "
                         f"{list(values)}")
    keys = []
    for i, (result, name) in enumerate(zip(results, names, strict=True)):
        try:
            if values is None:
                available = value_keys(result, None, "compare")
                keys.append(next(key for key in PREFERRED_KEYS if key in available))
            else:
                keys += value_keys(result, [values[min(i, len(values) - 1)]], "compare")
        except ValueError as error:
            raise ValueError(f"analysis {name!r}: {error}") from None
    return keys


def default_other(store: ResultsStore, analysis: str) -> str:
    """The analysis to compare ``analysis`` with: the file's only other one with sensitivity
    maps (sobol or shapley); ValueError when there is none or several."""
    candidates = [name for name in store.analyses() if name != analysis
                  and store.analysis_attrs(name)["method"] in ("sobol", "shapley")]
    if len(candidates) != 1:
        raise ValueError(
            f"name the analysis to compare {analysis!r} with (--other NAME); the other "
            f"sobol and shapley analyses of {store.path}: {candidates}"
        )
    return candidates[0]


def compare_layer(
    results: Sequence[AnalysisResult], layer: str, keys: Sequence[str], top: int
) -> dict[str, Any]:
    """The /comparison arrays of one layer (module docstring; docs/RESULTS_FORMAT.md).

    Args:
        results: the two analyses.
        layer: the layer.
        keys: the value type compared of each.
        top: values kept per variable for the decay curves.

    Returns:
        {"spearman", "spearman_positions": (G, G), "valid_units", "a": {...}, "b": {...}},
        each side {"decay": (G, K), "covariates", "covariates_positions": (G, 3)} (the
        covariates only where the analysis has the moments).
    """
    sides = [layer_maps(r, layer, key) for r, key in zip(results, keys, strict=True)]
    joint = sides[0].valid & sides[1].valid
    pooled, positions = cross_spearman(sides[0].maps, sides[1].maps, joint)
    entry: dict[str, Any] = {"spearman": pooled, "spearman_positions": positions,
                             "valid_units": np.int64(joint.sum())}
    for label, side in zip(SIDES, sides, strict=True):
        entry[label] = {"decay": top_values(side.maps, side.valid, top)}
        if side.covariates is not None:
            against, against_positions = cross_spearman(side.maps, side.covariates, side.valid)
            entry[label].update(covariates=against, covariates_positions=against_positions)
    return entry


def comparison_statistics(
    results: str | Path,
    analysis: str,
    other: str | None = None,
    *,
    values: Sequence[str] | None = None,
    top: int = DEFAULT_TOP,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Compare two analyses of one results file per layer and write the result atomically as
    /comparison/<analysis>_vs_<other> (module docstring; docs/RESULTS_FORMAT.md).

    Args:
        results: the results file.
        analysis: the first analysis.
        other: the second (default: ``default_other``).
        values: the value types compared (``compared_keys``).
        top: values kept per variable for the decay curves (>= 1).
        overwrite: replace an existing group of that name.
        progress: report the work and each layer on stderr.

    Returns:
        {"group", "name", "analyses", "values", "layers", "variables", "spearman":
        {layer: {variable: pooled Spearman of the variable's two maps}}}.

    Raises:
        ValueError: as ``comparable_analyses`` and ``compared_keys``, top < 1, or an existing
            group without ``overwrite`` (all before any computation).
    """
    if isinstance(top, bool) or top < 1:
        raise ValueError(f"--top must be an integer >= 1, got {top!r}")
    store = ResultsStore(results)
    names = [analysis, other or default_other(store, analysis)]
    pair = comparable_analyses(store, names)
    keys = compared_keys(pair, names, values)
    name = f"{names[0]}_vs_{names[1]}"
    check_overwrite(store, COMPARISON_GROUP, name, overwrite)
    layers, variables = pair[0].layer_names, pair[0].group_names
    tree = {}
    with Progress("compare", len(layers), "layers", enabled=progress,
                  work=f"{len(layers)} layers: {names[0]} {keys[0]} vs {names[1]} {keys[1]}"
                  ) as bar:
        for layer in layers:
            tree[layer] = compare_layer(pair, layer, keys, top)
            bar.update()
    write_tree(store, COMPARISON_GROUP, name, tree, overwrite=overwrite, attrs={
        "analyses": names, "values": keys, "variables": variables, "layers": layers,
        "covariates": list(COVARIATES), "top": int(top), "method": "spearman",
    })
    return {"group": f"/{COMPARISON_GROUP}/{name}", "name": name, "analyses": names,
            "values": keys, "layers": layers, "variables": variables,
            "spearman": {layer: dict(zip(variables, np.diag(tree[layer]["spearman"]).tolist(),
                                         strict=True)) for layer in layers}}
