"""Spearman correlation between the sensitivity maps of two variables across units, and
against the unit covariates mean, variance and CV (METHOD.md section 10;
``correlation_statistics``, written as /correlation/<name>).

Units the analysis flagged (``AnalysisResult.flags``) take part in no correlation: their raw
indices can be anything (1e16, -25) and would dominate the ranks. ``spearman_by_position`` and
``map_correlations`` are pure numpy/scipy and take the channels first; ``correlation_statistics``
puts them there (``AnalysisResult.features_first``): the channels of an NHWC map (H, W, C), the
hidden features of tokens (L, D), correlated at each pixel or token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

from sensitivity.layouts import features_first
from sensitivity.progress import Progress
from sensitivity.stats.groups import (
    CORRELATION_GROUP,
    COVARIATES,
    check_overwrite,
    value_keys,
    write_tree,
)
from sensitivity.store import ResultsStore
from sensitivity.units import unit_mask

# Fewer units than this at a position leave the correlation undefined there: with two the
# Spearman correlation is always +-1, which says nothing about the maps.
MIN_CORRELATION_UNITS = 3


def _as_positions(maps: np.ndarray) -> np.ndarray:
    """(V, C, *spatial) or (V, C) -> (V, C, P): units along axis 1, positions along axis 2."""
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim < 2:
        raise ValueError(f"maps need shape (variables, units...), got {maps.shape}")
    return maps.reshape(maps.shape[0], maps.shape[1], -1)


def _standard_ranks(maps: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Average ranks along axis 1 among each position's valid units, centred and scaled to
    unit norm, 0 at the other units.

    maps: (V, C, P); valid: (C, P) bool. Returns (V, C, P) float64, NaN over a whole position
    where fewer than MIN_CORRELATION_UNITS units are valid, a valid value is not finite, or the
    valid values are constant.
    """
    # Excluded units rank above every finite value, so the valid ones get the ranks 1..n they
    # have among themselves (a valid +inf would tie with them, but is undefined anyway).
    ranks = sps.rankdata(np.where(valid, maps, np.inf), axis=1)
    count = valid.sum(axis=0)  # (P,)
    ranks = np.where(valid, ranks - (count + 1) / 2, 0.0)
    norm = np.sqrt((ranks * ranks).sum(axis=1, keepdims=True))
    finite = np.all(np.isfinite(maps) | ~valid, axis=1, keepdims=True)
    defined = finite & (norm > 0) & (count >= MIN_CORRELATION_UNITS)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(defined, ranks / norm, np.nan)


def spearman_by_position(
    x: np.ndarray, y: np.ndarray | None = None, valid: np.ndarray | None = None
) -> np.ndarray:
    """Spearman correlation across units at every position, between every map of ``x`` and
    every map of ``y``.

    The correlation runs over axis 1 (channels of a conv map; all units of a channel-mean or
    fully connected layer) at each spatial position, over the units valid there.

    Args:
        x: (V, C, *spatial) or (V, C) maps.
        y: (W, C, *spatial) or (W, C) maps; default ``x``.
        valid: (C, *spatial) bool, the units that take part (default all;
            ``AnalysisResult.valid``).

    Returns:
        (V, W, P) with P = prod(spatial) (1 without spatial axes): Pearson correlation of
        average ranks, i.e. scipy.stats.spearmanr of the valid units; NaN where a map is
        constant or not finite across them, or fewer than MIN_CORRELATION_UNITS units are
        valid at that position.
    """
    px = _as_positions(x)
    py = px if y is None else _as_positions(y)
    if px.shape[1:] != py.shape[1:]:
        raise ValueError(f"maps of shape {px.shape[1:]} and {py.shape[1:]} do not match")
    mask = unit_mask(valid, np.shape(x)[1:]).reshape(px.shape[1:])
    rx = _standard_ranks(px, mask)
    ry = rx if y is None else _standard_ranks(py, mask)
    return np.clip(np.einsum("vcp,wcp->vwp", rx, ry), -1.0, 1.0)


@dataclass
class MapCorrelation:
    """Spearman correlations of one layer's maps, averaged over spatial positions.

    Attributes:
        variables: (V, V) between the variables' maps.
        covariates: (V, K) between each variable's map and each covariate map.
        n_positions: positions averaged (P).
        defined: (V, V) positions where the variable correlation was defined (enough valid
            units, not constant).
        valid_units: the units the correlations ran over (valid units at positions with at
            least MIN_CORRELATION_UNITS valid units).
    """

    variables: np.ndarray
    covariates: np.ndarray
    n_positions: int
    defined: np.ndarray
    valid_units: int


def position_mean(values: np.ndarray) -> np.ndarray:
    """The mean over the last axis (positions) of the finite values.

    Args:
        values: (..., P) correlations per position, NaN where undefined.

    Returns:
        (...) float64; NaN where no position has a finite value.
    """
    defined = np.isfinite(values)
    count = defined.sum(axis=-1)
    total = np.where(defined, values, 0.0).sum(axis=-1)
    return np.divide(total, count, out=np.full(count.shape, np.nan), where=count > 0)


def map_correlations(
    maps: np.ndarray, covariates: np.ndarray | None = None, valid: np.ndarray | None = None
) -> MapCorrelation:
    """Spearman correlations of a layer (METHOD.md 10), averaged over spatial positions.

    For a conv map u = (C, H, W) the correlation runs across the channels valid at each of the
    H*W positions and is averaged over positions where it is defined; for u = (C,) or (F,) it
    runs across the valid units.

    Args:
        maps: (V, *u) one map per variable.
        covariates: (K, *u) maps of unit covariates (mean, variance, CV), or None.
        valid: (*u) bool, the units whose values mean something (default all): flagged units
            take part in no correlation.

    Returns:
        The layer's correlations (``MapCorrelation``).
    """
    maps = np.asarray(maps, dtype=np.float64)
    mask = unit_mask(valid, maps.shape[1:])
    per_position = spearman_by_position(maps, valid=mask)
    if covariates is None:
        against = np.empty((maps.shape[0], 0))
    else:
        covariates = np.asarray(covariates, dtype=np.float64)
        if covariates.shape[1:] != maps.shape[1:]:
            raise ValueError(
                f"covariates have unit shape {covariates.shape[1:]}, maps {maps.shape[1:]}"
            )
        against = position_mean(spearman_by_position(maps, covariates, mask))
    by_position = mask.reshape(mask.shape[0], -1)
    enough = by_position.sum(axis=0) >= MIN_CORRELATION_UNITS
    return MapCorrelation(
        variables=position_mean(per_position),
        covariates=against,
        n_positions=per_position.shape[-1],
        defined=np.isfinite(per_position).sum(axis=-1),
        valid_units=int(by_position[:, enough].sum()),
    )


def unit_covariates(values: dict[str, np.ndarray]) -> np.ndarray | None:
    """The unit covariates of a layer.

    Args:
        values: the layer's arrays (``AnalysisResult.layers[layer]``).

    Returns:
        (3, *u) mean, variance and CV (``COVARIATES``) of its units (CV from std / |mean|
        where the analysis has none); None without the moments mean and var.
    """
    if not all(key in values for key in ("mean", "var")):
        return None
    cv = values.get("cv")
    if cv is None:
        with np.errstate(divide="ignore", invalid="ignore"):
            std = np.sqrt(values["var"])
            cv = np.where(std == 0, 0.0, std / np.abs(values["mean"]))
    return np.stack([values["mean"], values["var"], cv])


def _correlation_arrays(corr: MapCorrelation) -> dict[str, np.ndarray]:
    """The /correlation arrays of one layer and value type."""
    return {
        "variables": corr.variables,
        "covariates": corr.covariates,
        "defined_positions": corr.defined.astype(np.int64),
        "n_positions": np.int64(corr.n_positions),
        "valid_units": np.int64(corr.valid_units),
    }


def correlation_statistics(
    results: str | Path,
    name: str,
    *,
    values: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Spearman correlation matrices of analysis ``name`` per layer and value type, written
    atomically as /correlation/<name> (docs/RESULTS_FORMAT.md). Units flagged in the analysis
    (``AnalysisResult.flags``) take part in no correlation (``map_correlations``).

    Args:
        results: the results file.
        name: the analysis.
        values: value types to correlate (default: those of S1, ST, shapley_normalized the
            analysis has).
        overwrite: replace an existing /correlation/<name>.
        progress: report the work and each (layer, value type) on stderr.

    Returns:
        {"group", "values", "layers"}.
    """
    store = ResultsStore(results)
    result = store.read_analysis(name)
    keys = value_keys(result, values, "correlation")
    check_overwrite(store, CORRELATION_GROUP, name, overwrite)
    tree: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    total = len(result.layers) * len(keys)
    with Progress("correlation", total, "maps", enabled=progress,
                  work=f"{total} maps: {len(result.layers)} layers x {len(keys)} value types "
                       f"({', '.join(keys)})") as bar:
        for layer, arrays in result.layers.items():
            unit = result.unit_layout(layer)
            covariates = unit_covariates(arrays)
            if covariates is not None:
                covariates = features_first(covariates, 1, unit)
            valid = features_first(result.valid(layer), 0, unit)
            tree[layer] = {}
            for key in keys:
                corr = map_correlations(result.features_first(layer, key), covariates, valid)
                tree[layer][key] = _correlation_arrays(corr)
                bar.update()
    write_tree(
        store, CORRELATION_GROUP, name, tree, overwrite=overwrite,
        attrs={"analysis": name, "variables": result.group_names, "layers": result.layer_names,
               "values": keys, "covariates": list(COVARIATES), "method": "spearman"},
    )
    return {"group": f"/{CORRELATION_GROUP}/{name}", "values": keys,
            "layers": result.layer_names}
