"""Linear discriminant analysis of channel maps by variable (METHOD.md section 10;
``lda_statistics``, written as /lda/<name>): can a channel's spatial map tell which variable it
belongs to? A channel's map is its values over the positions: the H x W pixels of a conv map
(NCHW or NHWC), the L tokens of a hidden feature of a token layer.

Units the analysis flagged (``AnalysisResult.flags``) are left out as ``lda_samples`` says:
their raw indices can be anything and would dominate the features. ``lda_samples`` and
``lda_channel_maps`` are pure numpy/scikit-learn.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sensitivity.layouts import features_first
from sensitivity.progress import Progress
from sensitivity.results import AnalysisResult
from sensitivity.stats.groups import LDA_GROUP, check_overwrite, value_keys, write_tree
from sensitivity.store import ResultsStore
from sensitivity.units import unit_mask


@dataclass
class LdaResult:
    """Cross-validated LDA of channel maps by variable.

    Attributes:
        accuracy: (n_repeats * n_folds,) test accuracy of every fold, in [0, 1].
        confusion: (V, V) int64 counts, true variable x predicted variable, summed over folds
            and repeats (every sample is tested once per repeat).
        chance: 1 / V.
        solver: "svd" or "lsqr+shrinkage" (see lda_channel_maps).
        n_samples: V * C'; n_features: positions P (H * W, or L tokens); n_channels: channels
            used (C', lda_samples).
    """

    accuracy: np.ndarray
    confusion: np.ndarray
    chance: float
    solver: str
    n_samples: int
    n_features: int
    n_channels: int

    @property
    def mean(self) -> float:
        """Mean accuracy over folds and repeats."""
        return float(self.accuracy.mean())

    @property
    def sd(self) -> float:
        """Sample standard deviation of the accuracy over folds (0 for a single fold)."""
        return float(self.accuracy.std(ddof=1)) if len(self.accuracy) > 1 else 0.0


def lda_samples(maps: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """The channel maps LDA classifies, without flagged units.

    Channels more than half of whose units are flagged are dropped (C' channels stay, for every
    variable alike, so the classes stay balanced); in the others each flagged unit is replaced
    by the mean of its channel's valid units in the same map. Dropping the flagged positions
    instead would keep every channel, but one flagged unit in any channel removes a position
    from all, which empties the features of sparse layers.

    Args:
        maps: (V, C, *positions) one map per variable.
        valid: (C, *positions) bool, the units whose values mean something (default all).

    Returns:
        (V, C', *positions) float64; ValueError when fewer than 2 channels stay.
    """
    maps = np.asarray(maps, dtype=np.float64)
    if valid is None:
        return maps
    positions = maps.shape[2:]
    valid = unit_mask(valid, maps.shape[1:]).reshape(maps.shape[1], -1)
    maps = maps.reshape(*maps.shape[:2], -1)
    per_channel = valid.sum(axis=1)
    keep = 2 * per_channel >= valid.shape[1]
    if np.count_nonzero(keep) < 2:
        raise ValueError(
            f"only {np.count_nonzero(keep)} of {len(valid)} channels have at most half of their "
            "units flagged; LDA needs at least 2 such channels"
        )
    kept, mask = maps[:, keep], valid[keep]
    total = np.where(mask, kept, 0.0).sum(axis=2, keepdims=True)
    mean = total / per_channel[keep][None, :, None]
    return np.where(mask, kept, mean).reshape(*kept.shape[:2], *positions)


def lda_channel_maps(
    maps: np.ndarray,
    *,
    valid: np.ndarray | None = None,
    n_folds: int = 5,
    n_repeats: int = 3,
    seed: int = 0,
    progress: Progress | None = None,
) -> LdaResult:
    """Can a channel's spatial map tell which variable it belongs to? (METHOD.md 10)

    Samples are the (variable, channel) pairs of the C' channels used, features the channel's
    flattened map over the positions (H*W pixels, L tokens), labels the variable (balanced: C'
    samples each, chance 1/V); scikit-learn's LinearDiscriminantAnalysis under
    RepeatedStratifiedKFold. Small-sample guard: when the features are at least the training
    samples minus the classes, the pooled within-class covariance is singular; then the solver
    is "lsqr" with Ledoit-Wolf shrinkage (shrinkage="auto"), a well-conditioned covariance
    estimate, instead of the default "svd" solver (which would fit the noise of a
    rank-deficient covariance).

    Args:
        maps: (V, C, *positions) one sensitivity map per variable, channels first: (V, C, H, W)
            of a conv layer, (V, D, L) of a token layer.
        valid: (C, *positions) bool, the units whose values mean something (default all;
            flagged units are handled by ``lda_samples``).
        n_folds, n_repeats, seed: the cross-validation splits.
        progress: counts each of the n_folds * n_repeats fits.

    Returns:
        The fold accuracies and summed confusion matrix (``LdaResult``).
    """
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.metrics import confusion_matrix
    from sklearn.model_selection import RepeatedStratifiedKFold

    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim < 3:
        raise ValueError(
            f"LDA needs maps with positions (variables, channels, *positions), got shape "
            f"{maps.shape}; analyse the layer with reduction none"
        )
    maps = lda_samples(maps, valid)
    n_vars, channels = maps.shape[:2]
    if n_vars < 2 or channels < n_folds:
        raise ValueError(
            f"LDA needs >= 2 variables and >= {n_folds} channels (one per fold and variable), "
            f"got {n_vars} variables x {channels} channels used"
        )
    if not np.all(np.isfinite(maps)):
        raise ValueError("maps contain NaN or inf; LDA needs finite features")
    x = maps.reshape(n_vars * channels, -1)
    y = np.repeat(np.arange(n_vars), channels)
    n_train = len(y) - -(-len(y) // n_folds)  # the smallest training fold
    shrink = x.shape[1] >= n_train - n_vars
    folds = RepeatedStratifiedKFold(n_splits=n_folds, n_repeats=n_repeats, random_state=seed)
    accuracy, confusion = [], np.zeros((n_vars, n_vars), dtype=np.int64)
    for train, test in folds.split(x, y):
        model = (LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto") if shrink
                 else LinearDiscriminantAnalysis())
        with warnings.catch_warnings():
            # Constant map positions (e.g. zero padding) are collinear; svd drops them.
            warnings.filterwarnings("ignore", message="Variables are collinear")
            predicted = model.fit(x[train], y[train]).predict(x[test])
        accuracy.append(float(np.mean(predicted == y[test])))
        confusion += confusion_matrix(y[test], predicted, labels=np.arange(n_vars))
        if progress is not None:
            progress.update()
    return LdaResult(
        accuracy=np.asarray(accuracy), confusion=confusion, chance=1.0 / n_vars,
        solver="lsqr+shrinkage" if shrink else "svd", n_samples=len(y), n_features=x.shape[1],
        n_channels=channels,
    )


def _has_positions(result: AnalysisResult, layer: str) -> bool:
    """Whether a layer's units have positions besides the channels: a recorded layout says;
    without a record, (C, H, W) maps do."""
    unit = result.unit_layout(layer)
    return len(result.unit_shape(layer)) == 3 if unit is None else unit.has_positions


def lda_statistics(
    results: str | Path,
    name: str,
    *,
    values: Sequence[str] | None = None,
    n_folds: int = 5,
    n_repeats: int = 3,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """LDA of analysis ``name``'s maps per layer and value type, written atomically as
    /lda/<name> (docs/RESULTS_FORMAT.md). Layers without positions (channel means, class
    tokens, fully connected) are skipped; none left is a ValueError. Units flagged in the
    analysis are left out as ``lda_samples`` says; a layer with too few channels left is a
    ValueError naming it.

    Args:
        results: the results file.
        name: the analysis.
        values: value types (default: those of S1, ST, shapley_normalized it has).
        n_folds, n_repeats, seed: the cross-validation splits (``lda_channel_maps``).
        overwrite: replace an existing /lda/<name>.
        progress: report the work and each fit on stderr.

    Returns:
        {"group", "values", "layers", "skipped", "accuracy": {layer: {value: (mean, sd)}},
        "chance"}.
    """
    store = ResultsStore(results)
    result = store.read_analysis(name)
    keys = value_keys(result, values, "lda")
    layers = [layer for layer in result.layer_names if _has_positions(result, layer)]
    if not layers:
        shapes = {layer: result.unit_shape(layer) for layer in result.layer_names}
        raise ValueError(
            f"analysis {name!r} has no maps with positions (unit shapes {shapes}: channel "
            "means, class tokens or flat features); LDA needs a conv map (C, H, W) or "
            "(H, W, C), or tokens (L, D): analyse such a layer with --reduction none"
        )
    check_overwrite(store, LDA_GROUP, name, overwrite)
    tree: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    accuracy: dict[str, dict[str, tuple[float, float]]] = {}
    solvers: dict[str, str] = {}
    fits = len(layers) * len(keys) * n_repeats * n_folds
    with Progress("lda", fits, "fits", enabled=progress,
                  work=f"{fits} LDA fits: {len(layers)} layers x {len(keys)} value types x "
                       f"{n_repeats} repeats x {n_folds} folds") as bar:
        for layer in layers:
            tree[layer], accuracy[layer] = {}, {}
            for key in keys:
                valid = features_first(result.valid(layer), 0, result.unit_layout(layer))
                try:
                    lda = lda_channel_maps(result.features_first(layer, key), valid=valid,
                                           n_folds=n_folds, n_repeats=n_repeats, seed=seed,
                                           progress=bar)
                except ValueError as error:
                    raise ValueError(f"LDA of layer {layer!r} ({key}): {error}") from error
                tree[layer][key] = {"accuracy": lda.accuracy, "confusion": lda.confusion,
                                    "n_channels": np.int64(lda.n_channels)}
                accuracy[layer][key] = (lda.mean, lda.sd)
                solvers[f"{layer}/{key}"] = lda.solver
    chance = 1.0 / len(result.group_names)
    write_tree(
        store, LDA_GROUP, name, tree, overwrite=overwrite,
        attrs={"analysis": name, "variables": result.group_names, "layers": layers,
               "values": keys, "n_folds": n_folds, "n_repeats": n_repeats, "seed": seed,
               "chance": chance, "solvers": solvers},
    )
    return {"group": f"/{LDA_GROUP}/{name}", "values": keys, "layers": layers,
            "skipped": [layer for layer in result.layer_names if layer not in layers],
            "accuracy": accuracy, "chance": chance}
