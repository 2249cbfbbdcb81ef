"""Statistics on stored analyses (METHOD.md sections 7 and 10).

- Treatment-control tests on the raw activations of a contrast analysis (``--store-activations``):
  Wilcoxon signed-rank test per unit, its rank-biserial correlation, and a Benjamini-Yekutieli
  correction applied per layer and augmentation (``contrast_statistics``).
- Spearman correlation between the sensitivity maps of two variables across units, and against
  the unit covariates mean, variance and CV (``correlation_statistics``).
- Linear discriminant analysis of channel maps by variable (``lda_statistics``).

Correlation and LDA leave out the units the analysis flagged (``AnalysisResult.flags``): their
raw indices can be anything (1e16, -25) and would dominate ranks and features.

The array functions (``paired_differences``, ``signed_rank_test``, ``by_correction``,
``spearman_by_position``, ``map_correlations``, ``lda_samples``, ``lda_channel_maps``) are
pure numpy/scipy/scikit-learn; the ``*_statistics`` functions read an analysis from a results
file and write their result next to it (``ResultsStore.write_group``: /wilcoxon, /correlation,
/lda, one subgroup per layer (and value type); layout in docs/RESULTS_FORMAT.md);
``read_tree`` reads them back. With ``progress`` (default) the ``*_statistics`` functions report
their work up front and then per layer (Wilcoxon), per layer and value type (correlation) or per
LDA fit, on stderr (``sensitivity.progress``). No Lightning, no wandb.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from scipy import stats as sps

from sensitivity.progress import Progress
from sensitivity.results import PER_VARIABLE_KEYS, AnalysisResult
from sensitivity.store import ResultsStore

# Which scipy.stats.wilcoxon method produced each p-value (codes stored per unit).
TEST_METHODS = ("exact", "permutation", "asymptotic")
EXACT, PERMUTATION, ASYMPTOTIC = range(3)
# scipy's defaults: the exact null distribution up to 50 pairs; with zeros or ties an exact
# sign-flip permutation test up to 13 pairs (2**13 flips < its 9999 resamples), else the normal
# approximation.
_EXACT_MAX_PAIRS = 50
_PERMUTATION_MAX_PAIRS = 13
_CHUNK_ELEMENTS = 1 << 24  # bound on temporary array sizes (float64: 128 MiB)
_READ_BYTES = 64 << 20

# Value types compared by correlation and LDA (the maps masking uses), and covariates.
SENSITIVITY_KEYS = ("S1", "ST", "shapley_normalized")
COVARIATES = ("mean", "var", "cv")

WILCOXON_GROUP = "wilcoxon"
CORRELATION_GROUP = "correlation"
LDA_GROUP = "lda"


# ----------------------------------------------------------------------------- results file
def _check_overwrite(store: ResultsStore, kind: str, name: str, overwrite: bool) -> None:
    if not overwrite and store.has_group(f"{kind}/{name}"):
        raise ValueError(
            f"{store.path} already holds /{kind}/{name}; pass --overwrite to replace it"
        )


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"layer1": {"S1": {"variables": a}}} -> {"layer1/S1/variables": a} (h5py makes the
    intermediate groups)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _write(store: ResultsStore, kind: str, name: str, tree: Mapping[str, Any],
           attrs: Mapping[str, Any], overwrite: bool) -> None:
    store.write_group(f"{kind}/{name}", _flatten(tree), attrs, overwrite=overwrite)


def read_tree(results: str | Path, kind: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(nested {subgroup: ... {dataset: array}}, attrs) of the complete group /<kind>/<name>
    (e.g. "correlation", "sobol"); ValueError when it does not exist or is incomplete."""
    store = ResultsStore(results)
    if not store.has_group(f"{kind}/{name}"):
        raise ValueError(f"{store.path} holds no complete /{kind}/{name}")

    def walk(group: h5py.Group) -> dict[str, Any]:
        return {key: walk(item) if isinstance(item, h5py.Group) else item[()]
                for key, item in group.items()}

    with h5py.File(store.path, "r") as f:
        group = f[f"{kind}/{name}"]
        attrs = {key: _plain(value) for key, value in group.attrs.items()}
        return walk(group), attrs


def _plain(value: Any) -> Any:
    """An HDF5 attribute as plain Python (str lists, numbers, JSON mappings stay text)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [v.decode() if isinstance(v, bytes) else v for v in value.tolist()]
    return value.item() if isinstance(value, np.generic) else value


# ----------------------------------------------------------------------------- contrast tests
def paired_differences(blocks: np.ndarray, n_augmentations: int, k: int) -> np.ndarray:
    """Per image and augmentation, the mean over the K draws of (treated - original).

    blocks: the contrast design's activations as (n_images, 1 + A*K, *u): per image (design
    block) row 0 the original, then K rows per augmentation in problem order
    (``ContrastDesign``). Returns (n_images, A, *u) float64.

    Pairing: one pair per image and augmentation, the mean of its K draws against the original.
    The image is the independent sampling unit: the K draws of an image share its original
    row, so pairing every draw with the original would count one image K times and make the
    signed-rank test anti-conservative; averaging the draws keeps the pairs independent (what
    the test assumes) and also averages out the augmentation-parameter noise. The same image
    means give the contrast analysis' ``mean_diff_conf``.
    """
    blocks = np.asarray(blocks, dtype=np.float64)
    if blocks.ndim < 2 or blocks.shape[1] != 1 + n_augmentations * k:
        raise ValueError(
            f"blocks have shape {blocks.shape}; expected (images, 1 + A*K = "
            f"{1 + n_augmentations * k}, *unit_shape) for A = {n_augmentations}, K = {k}"
        )
    n = blocks.shape[0]
    treated = blocks[:, 1:].reshape(n, n_augmentations, k, *blocks.shape[2:])
    return (treated - blocks[:, None, None, 0]).mean(axis=2)


@dataclass
class SignedRankResult:
    """Wilcoxon signed-rank tests, one per column; arrays have the columns' shape.

    pvalue: two-sided p-value, equal to ``scipy.stats.wilcoxon(column)`` with scipy's defaults
        (zero_method "wilcox": zero differences dropped; average ranks for ties; method
        "auto"), except that a column whose differences are all zero gets 1 where scipy's
        normal approximation gives NaN (nothing to test: no evidence of a difference).
    r_plus, r_minus: rank sums of the positive and negative differences.
    rank_biserial: matched-pairs rank-biserial correlation (r_plus - r_minus) / (r_plus +
        r_minus) in [-1, 1] (Kerby 2014), 0 when every difference is zero.
    method: int8 codes into ``TEST_METHODS``: how scipy's "auto" computed each p-value.
    n_pairs: pairs per column (before dropping zeros).
    """

    pvalue: np.ndarray
    r_plus: np.ndarray
    r_minus: np.ndarray
    rank_biserial: np.ndarray
    method: np.ndarray
    n_pairs: int


def _sign_flip_pvalue(ranks: np.ndarray, r_plus: np.ndarray) -> np.ndarray:
    """Exact two-sided sign-flip permutation p-values of r_plus, as scipy.stats.permutation_test
    computes them for a one-sample statistic with all 2**n flips enumerated.

    ranks: (n, m) ranks of |d| with 0 for zero differences; r_plus: (m,). Flipping signs keeps
    |d| and so the ranks: the null values of r_plus over the 2**n flips are the subset sums of
    the ranks. Ranks are multiples of 1/2, so the null distribution is counted exactly on the
    integer grid of doubled ranks (subset-sum counting) instead of enumerating 2**n sums per
    column; every count is an exact integer, as scipy's float sums of half-integers are exact.
    The null depends only on the multiset of ranks, which few distinct tie/zero patterns share,
    so it is counted once per distinct pattern.
    """
    n = ranks.shape[0]
    doubled = np.sort(np.rint(2 * ranks).astype(np.int64), axis=0).T  # (m, n) patterns
    patterns, inverse = np.unique(doubled, axis=0, return_inverse=True)
    width = n * (n + 1) + 1  # doubled rank sums lie in [0, n (n + 1)]
    counts = np.zeros((len(patterns), width), dtype=np.int64)
    counts[:, 0] = 1
    grid = np.arange(width)
    for shift in patterns.T:  # add one rank: counts(s) += counts(s - rank)
        source = grid[None, :] - shift[:, None]
        counts = counts + np.where(
            source >= 0, np.take_along_axis(counts, np.maximum(source, 0), axis=1), 0
        )
    cumulative = np.cumsum(counts, axis=1)  # (patterns, width): null <= s
    pattern = inverse.ravel()
    observed = np.rint(2 * r_plus).astype(np.int64)
    less = cumulative[pattern, observed]
    below = np.where(observed > 0, cumulative[pattern, np.maximum(observed - 1, 0)], 0)
    greater = cumulative[pattern, -1] - below
    return np.clip(2 * np.minimum(less, greater) / 2.0**n, 0.0, 1.0)


def _signed_rank_columns(d: np.ndarray) -> tuple[np.ndarray, ...]:
    """signed_rank_test on (n, m) differences; returns (p, r_plus, r_minus, method)."""
    n = d.shape[0]
    nonzero = d != 0
    absolute = np.abs(d)
    # Zeros are the smallest |d|: ranking everything and subtracting the zero count gives the
    # ranks among the non-zero differences (ties averaged), as scipy's NaN-dropping does.
    n_zero = n - np.count_nonzero(nonzero, axis=0)
    ranks = np.where(nonzero, sps.rankdata(absolute, axis=0) - n_zero, 0.0)
    r_plus = (ranks * (d > 0)).sum(axis=0)
    r_minus = (ranks * (d < 0)).sum(axis=0)
    method = np.full(d.shape[1], ASYMPTOTIC, dtype=np.int8)
    if n <= _EXACT_MAX_PAIRS:
        tied = (n_zero > 0) | np.any(np.diff(np.sort(absolute, axis=0), axis=0) == 0, axis=0)
        method[~tied] = EXACT
        if n <= _PERMUTATION_MAX_PAIRS:
            method[tied] = PERMUTATION
    p = np.empty(d.shape[1])
    for code, name in ((EXACT, "exact"), (ASYMPTOTIC, "asymptotic")):
        cols = np.flatnonzero(method == code)
        if len(cols):
            with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-zero columns: 0/0
                p[cols] = sps.wilcoxon(d[:, cols], axis=0, method=name).pvalue
    cols = np.flatnonzero(method == PERMUTATION)
    if len(cols):
        p[cols] = _sign_flip_pvalue(ranks[:, cols], r_plus[cols])
    p[np.isnan(p) & (n_zero == n)] = 1.0
    return p, r_plus, r_minus, method


def signed_rank_test(d: np.ndarray) -> SignedRankResult:
    """Wilcoxon signed-rank test of every column of ``d``, vectorised over columns.

    d: (n_pairs, *shape) paired differences (axis 0 = pairs). Each column gets exactly what
    ``scipy.stats.wilcoxon(d[:, j])`` returns with its defaults (see SignedRankResult): scipy
    chooses the method per call from the column's sample size, zeros and ties, so the columns
    are grouped by that choice; the exact and asymptotic groups go through scipy vectorised,
    the permutation group (zeros or ties, n <= 13) through an equivalent exact count of the
    2**n sign flips (scipy's permutation_test evaluates the statistic column by column there,
    about 30 ms per unit: hours for a conv layer).
    """
    d = np.asarray(d, dtype=np.float64)
    if d.ndim < 1 or d.shape[0] < 1:
        raise ValueError(f"need at least one pair along axis 0, got shape {d.shape}")
    if not np.all(np.isfinite(d)):
        raise ValueError("paired differences contain NaN or inf; the activations are not finite")
    n, shape = d.shape[0], d.shape[1:]
    flat = d.reshape(n, -1)
    parts: list[list[np.ndarray]] = [[], [], [], []]
    step = max(1, _CHUNK_ELEMENTS // (8 * n))
    for start in range(0, max(1, flat.shape[1]), step):
        for part, values in zip(parts, _signed_rank_columns(flat[:, start:start + step]),
                                strict=True):
            part.append(values)
    p, r_plus, r_minus, method = (np.concatenate(part).reshape(shape) for part in parts)
    total = r_plus + r_minus
    rank_biserial = np.divide(r_plus - r_minus, total, out=np.zeros_like(total), where=total > 0)
    return SignedRankResult(p, r_plus, r_minus, rank_biserial, method, n)


def by_correction(p: np.ndarray, axis: int | None = -1) -> np.ndarray:
    """Benjamini-Yekutieli adjusted p-values (q-values): scipy.stats.false_discovery_control
    with method "by", one family per slice along ``axis`` (None: the whole array).

    BY controls the false discovery rate under any dependence between the tests; the units of
    a layer are strongly and not necessarily positively dependent, so Benjamini-Hochberg's
    guarantee (independence or positive dependence) would not hold.
    """
    p = np.asarray(p, dtype=np.float64)
    if p.size == 0:
        return p.copy()
    if not np.all((p >= 0) & (p <= 1)):
        raise ValueError("p-values must lie in [0, 1] (no NaN) for the BY correction")
    if axis is None:
        return sps.false_discovery_control(p.ravel(), method="by").reshape(p.shape)
    return sps.false_discovery_control(p, axis=axis, method="by")


def _contrast_layout(group: h5py.Group, augmentations: list[str]) -> int:
    """K draws per augmentation, checked against the stored row kinds of a contrast design."""
    kinds = [str(k) for k in group.attrs["row_kind_names"]]
    k = (len(kinds) - 1) // max(1, len(augmentations))
    expected = ["original"] + [f"{a}_{i}" for a in augmentations for i in range(k)]
    if kinds != expected:
        raise ValueError(
            f"the stored rows are not a contrast design over {augmentations} (row kinds "
            f"{kinds[:4]}...); Wilcoxon tests need the activations of analyze.py contrast"
        )
    rows = int(group.attrs["rows"])
    if rows == 0 or rows % len(kinds) or not np.array_equal(
        group["row_index"][()], np.arange(rows)
    ):
        raise ValueError(
            f"the stored activations hold {rows} rows, not every row of whole contrast blocks "
            f"of {len(kinds)}; store them with a complete analyze.py contrast --store-activations"
        )
    return k


def _layer_differences(rows: h5py.Dataset, n_augmentations: int, k: int) -> np.ndarray:
    """paired_differences of a stored layer, read in whole blocks of about 64 MiB."""
    block = 1 + n_augmentations * k
    n_blocks = rows.shape[0] // block
    per_read = max(1, _READ_BYTES // (4 * block * max(1, math.prod(rows.shape[1:]))))
    out = np.empty((n_blocks, n_augmentations, *rows.shape[1:]))
    for start in range(0, n_blocks, per_read):
        stop = min(n_blocks, start + per_read)
        values = rows[start * block:stop * block]
        out[start:stop] = paired_differences(
            values.reshape(stop - start, block, *rows.shape[1:]), n_augmentations, k
        )
    return out


def _wilcoxon_layer(
    rows: h5py.Dataset, n_augmentations: int, k: int, alpha: float
) -> dict[str, np.ndarray]:
    """The /wilcoxon arrays of one layer from its stored contrast rows: p- and BY q-values,
    rank-biserial correlations and R+ (augmentations, *unit), and per augmentation the count
    of units with q < alpha and of each test method (``contrast_statistics``)."""
    test = signed_rank_test(_layer_differences(rows, n_augmentations, k))
    q = by_correction(test.pvalue.reshape(n_augmentations, -1)).reshape(test.pvalue.shape)
    counts = (q < alpha).reshape(n_augmentations, -1).sum(axis=1)
    methods = np.stack([
        (test.method == code).reshape(n_augmentations, -1).sum(axis=1)
        for code in range(len(TEST_METHODS))
    ], axis=1)
    return {
        "wilcoxon_p": test.pvalue,
        "wilcoxon_q": q,
        "rank_biserial": test.rank_biserial,
        "r_plus": test.r_plus,
        "n_significant": counts.astype(np.int64),
        "test_methods": methods.astype(np.int64),
    }


def contrast_statistics(
    results: str | Path, name: str, *, alpha: float = 0.05, overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Wilcoxon tests of the contrast analysis ``name`` on its stored activations.

    Per layer, augmentation and unit: the signed-rank test of the image-mean paired differences
    (``paired_differences``), the rank-biserial correlation, and BY q-values with one family
    per (layer, augmentation) over the layer's units. Written atomically as /wilcoxon/<name>
    (docs/RESULTS_FORMAT.md). Returns {"group", "n_pairs", "significant": {layer: {aug: count
    of units with q < alpha}}}. ValueError (nothing written) when the analysis is missing, is
    not a contrast analysis, or has no stored activations.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    store = ResultsStore(results)
    result = store.read_analysis(name)
    if result.method != "contrast":
        raise ValueError(
            f"analysis {name!r} in {store.path} is a {result.method} analysis; Wilcoxon tests "
            "need a contrast analysis (analyze.py contrast --store-activations)"
        )
    _check_overwrite(store, WILCOXON_GROUP, name, overwrite)
    augmentations = result.group_names
    tree: dict[str, dict[str, np.ndarray]] = {}
    significant: dict[str, dict[str, int]] = {}
    with h5py.File(store.path, "r") as f:
        group = f.get(f"activations/{name}")
        if group is None:
            raise ValueError(
                f"analysis {name!r} in {store.path} has no stored activations; rerun it with "
                "analyze.py contrast --store-activations"
            )
        k = _contrast_layout(group, augmentations)
        n_pairs = int(group.attrs["rows"]) // (1 + len(augmentations) * k)
        layers = result.layer_names
        with Progress("contrast-stats", len(layers), "layers", enabled=progress,
                      work=f"{len(layers)} layers: per unit, signed-rank tests of {n_pairs} "
                           f"image pairs x {len(augmentations)} augmentations") as bar:
            for layer in layers:
                if layer not in group:
                    raise ValueError(f"layer {layer!r} of analysis {name!r} has no stored rows")
                tree[layer] = _wilcoxon_layer(group[layer], len(augmentations), k, alpha)
                counts = tree[layer]["n_significant"]
                significant[layer] = {
                    a: int(c) for a, c in zip(augmentations, counts, strict=True)
                }
                bar.update()
    _write(
        store, WILCOXON_GROUP, name, tree, overwrite=overwrite,
        attrs={
            "analysis": name, "variables": augmentations, "layers": result.layer_names,
            "alpha": float(alpha), "n_pairs": n_pairs, "k": k, "pairing": "image_mean",
            "correction": "benjamini-yekutieli", "family": "layer x augmentation",
            "test_method_names": list(TEST_METHODS),
        },
    )
    return {"group": f"/{WILCOXON_GROUP}/{name}", "n_pairs": n_pairs, "significant": significant}


# ----------------------------------------------------------------------------- correlation
# Fewer units than this at a position leave the correlation undefined there: with two the
# Spearman correlation is always +-1, which says nothing about the maps.
MIN_CORRELATION_UNITS = 3


def _as_positions(maps: np.ndarray) -> np.ndarray:
    """(V, C, *spatial) or (V, C) -> (V, C, P): units along axis 1, positions along axis 2."""
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim < 2:
        raise ValueError(f"maps need shape (variables, units...), got {maps.shape}")
    return maps.reshape(maps.shape[0], maps.shape[1], -1)


def _unit_mask(valid: np.ndarray | None, unit_shape: tuple[int, ...]) -> np.ndarray:
    """(*u) bool: the units that take part (``valid``; every unit when None)."""
    if valid is None:
        return np.ones(unit_shape, dtype=bool)
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != tuple(unit_shape):
        raise ValueError(f"valid has shape {valid.shape}, the maps' units {tuple(unit_shape)}")
    return valid


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
    every map of ``y`` (default ``x``).

    x: (V, C, *spatial) or (V, C); y: (W, C, *spatial) or (W, C); valid: (C, *spatial) bool,
    the units that take part (default all; ``AnalysisResult.valid``). The correlation runs over
    axis 1 (channels of a conv map; all units of a channel-mean or fully connected layer) at
    each spatial position, over the units valid there. Returns (V, W, P) with P =
    prod(spatial) (1 without spatial axes): Pearson correlation of average ranks, i.e.
    scipy.stats.spearmanr of the valid units; NaN where a map is constant or not finite across
    them, or fewer than MIN_CORRELATION_UNITS units are valid at that position.
    """
    px = _as_positions(x)
    py = px if y is None else _as_positions(y)
    if px.shape[1:] != py.shape[1:]:
        raise ValueError(f"maps of shape {px.shape[1:]} and {py.shape[1:]} do not match")
    mask = _unit_mask(valid, np.shape(x)[1:]).reshape(px.shape[1:])
    rx = _standard_ranks(px, mask)
    ry = rx if y is None else _standard_ranks(py, mask)
    return np.clip(np.einsum("vcp,wcp->vwp", rx, ry), -1.0, 1.0)


@dataclass
class MapCorrelation:
    """Spearman correlations of one layer's maps, averaged over spatial positions.

    variables: (V, V) between the variables' maps; covariates: (V, K) between each variable's
    map and each covariate map; n_positions: positions averaged (P); defined: (V, V) positions
    where the variable correlation was defined (enough valid units, not constant);
    valid_units: the units the correlations ran over (valid units at positions with at least
    MIN_CORRELATION_UNITS valid units).
    """

    variables: np.ndarray
    covariates: np.ndarray
    n_positions: int
    defined: np.ndarray
    valid_units: int


def _position_mean(values: np.ndarray) -> np.ndarray:
    defined = np.isfinite(values)
    count = defined.sum(axis=-1)
    total = np.where(defined, values, 0.0).sum(axis=-1)
    return np.divide(total, count, out=np.full(count.shape, np.nan), where=count > 0)


def map_correlations(
    maps: np.ndarray, covariates: np.ndarray | None = None, valid: np.ndarray | None = None
) -> MapCorrelation:
    """Spearman correlations of a layer (METHOD.md 10), averaged over spatial positions.

    maps: (V, *u) one map per variable; covariates: (K, *u) maps of unit covariates (mean,
    variance, CV) or None; valid: (*u) bool, the units whose values mean something (default
    all): flagged units take part in no correlation. For a conv map u = (C, H, W) the
    correlation runs across the channels valid at each of the H*W positions and is averaged
    over positions where it is defined; for u = (C,) or (F,) it runs across the valid units.
    """
    maps = np.asarray(maps, dtype=np.float64)
    mask = _unit_mask(valid, maps.shape[1:])
    per_position = spearman_by_position(maps, valid=mask)
    if covariates is None:
        against = np.empty((maps.shape[0], 0))
    else:
        covariates = np.asarray(covariates, dtype=np.float64)
        if covariates.shape[1:] != maps.shape[1:]:
            raise ValueError(
                f"covariates have unit shape {covariates.shape[1:]}, maps {maps.shape[1:]}"
            )
        against = _position_mean(spearman_by_position(maps, covariates, mask))
    by_position = mask.reshape(mask.shape[0], -1)
    enough = by_position.sum(axis=0) >= MIN_CORRELATION_UNITS
    return MapCorrelation(
        variables=_position_mean(per_position),
        covariates=against,
        n_positions=per_position.shape[-1],
        defined=np.isfinite(per_position).sum(axis=-1),
        valid_units=int(by_position[:, enough].sum()),
    )


def _value_keys(result: AnalysisResult, values: Sequence[str] | None, what: str) -> list[str]:
    available = [
        key for key in PER_VARIABLE_KEYS
        if not key.endswith("_conf") and all(key in v for v in result.layers.values())
    ]
    if values is None:
        chosen = [key for key in SENSITIVITY_KEYS if key in available]
        if not chosen:
            raise ValueError(
                f"{what} compares sensitivity maps ({', '.join(SENSITIVITY_KEYS)}), but the "
                f"{result.method} analysis has none; name a sobol or shapley analysis, or "
                f"choose value types (--value-types) among {available}"
            )
        return chosen
    unknown = [key for key in values if key not in available]
    if unknown or not values:
        raise ValueError(
            f"value types {list(values)} are not all in this analysis; valid: {available}"
        )
    return list(values)


def _covariates(values: dict[str, np.ndarray]) -> np.ndarray | None:
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
    atomically as /correlation/<name> (docs/RESULTS_FORMAT.md).

    values: value types to correlate (default: those of S1, ST, shapley_normalized the
    analysis has). Units flagged in the analysis (``AnalysisResult.flags``) take part in no
    correlation (``map_correlations``). Returns {"group", "values", "layers"}.
    """
    store = ResultsStore(results)
    result = store.read_analysis(name)
    keys = _value_keys(result, values, "correlation")
    _check_overwrite(store, CORRELATION_GROUP, name, overwrite)
    tree: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    total = len(result.layers) * len(keys)
    with Progress("correlation", total, "maps", enabled=progress,
                  work=f"{total} maps: {len(result.layers)} layers x {len(keys)} value types "
                       f"({', '.join(keys)})") as bar:
        for layer, arrays in result.layers.items():
            covariates = _covariates(arrays)
            tree[layer] = {}
            for key in keys:
                corr = map_correlations(arrays[key], covariates, result.valid(layer))
                tree[layer][key] = _correlation_arrays(corr)
                bar.update()
    _write(
        store, CORRELATION_GROUP, name, tree, overwrite=overwrite,
        attrs={"analysis": name, "variables": result.group_names, "layers": result.layer_names,
               "values": keys, "covariates": list(COVARIATES), "method": "spearman"},
    )
    return {"group": f"/{CORRELATION_GROUP}/{name}", "values": keys,
            "layers": result.layer_names}


# ----------------------------------------------------------------------------- LDA
@dataclass
class LdaResult:
    """Cross-validated LDA of channel maps by variable.

    accuracy: (n_repeats * n_folds,) test accuracy of every fold; confusion: (V, V) int64
    counts, true variable x predicted variable, summed over folds and repeats (every sample is
    tested once per repeat); chance: 1 / V; solver: "svd" or "lsqr+shrinkage" (see
    lda_channel_maps); n_channels: channels used (C', see lda_samples); n_samples = V * C',
    n_features = H * W.
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
        return float(self.accuracy.mean())

    @property
    def sd(self) -> float:
        return float(self.accuracy.std(ddof=1)) if len(self.accuracy) > 1 else 0.0


def lda_samples(maps: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """The channel maps LDA classifies, without flagged units: (V, C', H, W) float64.

    maps: (V, C, H, W); valid: (C, H, W) bool, the units whose values mean something (default
    all). Channels more than half of whose units are flagged are dropped (C' channels stay,
    for every variable alike, so the classes stay balanced); in the others each flagged unit is
    replaced by the mean of its channel's valid units in the same map. Dropping the flagged
    positions instead would keep every channel, but one flagged unit in any channel removes a
    position from all, which empties the features of sparse layers. ValueError when fewer than
    2 channels stay.
    """
    maps = np.asarray(maps, dtype=np.float64)
    if valid is None:
        return maps
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != maps.shape[1:]:
        raise ValueError(f"valid has shape {valid.shape}, the maps' units {maps.shape[1:]}")
    per_channel = valid.reshape(len(valid), -1).sum(axis=1)
    keep = 2 * per_channel >= valid[0].size
    if np.count_nonzero(keep) < 2:
        raise ValueError(
            f"only {np.count_nonzero(keep)} of {len(valid)} channels have at most half of their "
            "units flagged; LDA needs at least 2 such channels"
        )
    kept, mask = maps[:, keep], valid[keep]
    total = np.where(mask, kept, 0.0).sum(axis=(2, 3), keepdims=True)
    mean = total / per_channel[keep][None, :, None, None]
    return np.where(mask, kept, mean)


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

    maps: (V, C, H, W) one sensitivity map per variable of a conv layer; valid: (C, H, W) bool,
    the units whose values mean something (default all; flagged units are handled by
    ``lda_samples``). Samples are the (variable, channel) pairs of the C' channels used,
    features the channel's flattened H*W map, labels the variable (balanced: C' samples each,
    chance 1/V). scikit-learn's LinearDiscriminantAnalysis under
    RepeatedStratifiedKFold(n_folds, n_repeats, random_state=seed).

    Small-sample guard: when the features are at least the training samples minus the classes,
    the pooled within-class covariance is singular; then the solver is "lsqr" with
    Ledoit-Wolf shrinkage (shrinkage="auto"), a well-conditioned covariance estimate, instead
    of the default "svd" solver (which would fit the noise of a rank-deficient covariance).
    progress: counts each of the n_folds * n_repeats fits.
    """
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.metrics import confusion_matrix
    from sklearn.model_selection import RepeatedStratifiedKFold

    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 4:
        raise ValueError(
            f"LDA needs conv maps (variables, channels, height, width), got shape {maps.shape}; "
            "analyse the layer with reduction none"
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
    """LDA of analysis ``name``'s conv maps per layer and value type, written atomically as
    /lda/<name> (docs/RESULTS_FORMAT.md). Layers without spatial maps (channel means, fully
    connected) are skipped; none left is a ValueError. Units flagged in the analysis are left
    out as ``lda_samples`` says; a layer with too few channels left is a ValueError naming it.
    Returns {"group", "values", "layers", "skipped", "accuracy": {layer: {value: (mean, sd)}},
    "chance"}.
    """
    store = ResultsStore(results)
    result = store.read_analysis(name)
    keys = _value_keys(result, values, "lda")
    layers = [layer for layer in result.layer_names if len(result.unit_shape(layer)) == 3]
    if not layers:
        raise ValueError(
            f"analysis {name!r} has no conv maps (layers {result.layer_names} all have unit "
            "shape (C,) or (F,)); LDA needs spatial maps: analyse with --reduction none"
        )
    _check_overwrite(store, LDA_GROUP, name, overwrite)
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
                try:
                    lda = lda_channel_maps(result.layers[layer][key], valid=result.valid(layer),
                                           n_folds=n_folds, n_repeats=n_repeats, seed=seed,
                                           progress=bar)
                except ValueError as error:
                    raise ValueError(f"LDA of layer {layer!r} ({key}): {error}") from error
                tree[layer][key] = {"accuracy": lda.accuracy, "confusion": lda.confusion,
                                    "n_channels": np.int64(lda.n_channels)}
                accuracy[layer][key] = (lda.mean, lda.sd)
                solvers[f"{layer}/{key}"] = lda.solver
    chance = 1.0 / len(result.group_names)
    _write(
        store, LDA_GROUP, name, tree, overwrite=overwrite,
        attrs={"analysis": name, "variables": result.group_names, "layers": layers,
               "values": keys, "n_folds": n_folds, "n_repeats": n_repeats, "seed": seed,
               "chance": chance, "solvers": solvers},
    )
    return {"group": f"/{LDA_GROUP}/{name}", "values": keys, "layers": layers,
            "skipped": [layer for layer in result.layer_names if layer not in layers],
            "accuracy": accuracy, "chance": chance}
