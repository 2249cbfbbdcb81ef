"""Treatment-control tests on the raw activations of a contrast analysis (METHOD.md section 7,
``analyze.py contrast --store-activations``): Wilcoxon signed-rank test per unit, its
rank-biserial correlation, and a Benjamini-Yekutieli correction applied per layer and
augmentation (``contrast_statistics``, written as /wilcoxon/<name>).

``paired_differences``, ``signed_rank_test`` and ``by_correction`` are pure numpy/scipy.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from scipy import stats as sps

from sensitivity.progress import Progress
from sensitivity.stats.groups import WILCOXON_GROUP, check_overwrite, write_tree
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


def paired_differences(blocks: np.ndarray, n_augmentations: int, k: int) -> np.ndarray:
    """Per image and augmentation, the mean over the K draws of (treated - original).

    Args:
        blocks: the contrast design's activations as (n_images, 1 + A*K, *u): per image
            (design block) row 0 the original, then K rows per augmentation in problem order
            (``ContrastDesign``), in activation units.
        n_augmentations: A.
        k: K, draws per augmentation.

    Returns:
        (n_images, A, *u) float64 paired differences, in activation units.

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

    Attributes:
        pvalue: two-sided p-value, equal to ``scipy.stats.wilcoxon(column)`` with scipy's
            defaults (zero_method "wilcox": zero differences dropped; average ranks for ties;
            method "auto"), except that a column whose differences are all zero gets 1 where
            scipy's normal approximation gives NaN (nothing to test: no evidence of a
            difference).
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

    scipy chooses the method per call from the column's sample size, zeros and ties, so the
    columns are grouped by that choice: the exact and asymptotic groups go through scipy
    vectorised, the permutation group (zeros or ties, n <= 13) through an equivalent exact count
    of the 2**n sign flips (scipy's is column by column: PERFORMANCE.md "Design sampling and
    signed-rank tests").

    Args:
        d: (n_pairs, *shape) finite paired differences (axis 0 = pairs).

    Returns:
        The tests, arrays of ``shape``: each column gets exactly what
        ``scipy.stats.wilcoxon(d[:, j])`` returns with its defaults (see SignedRankResult).

    Raises:
        ValueError: no pairs, or non-finite differences.
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
    with method "by".

    Args:
        p: p-values in [0, 1], any shape.
        axis: one family of tests per slice along ``axis``; None: the whole array.

    Returns:
        q-values, the shape of ``p``.

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
    (docs/RESULTS_FORMAT.md).

    Args:
        results: the results file.
        name: a contrast analysis stored with its activations (``--store-activations``).
        alpha: the q-value below which a unit counts as significant, in (0, 1).
        overwrite: replace an existing /wilcoxon/<name>.
        progress: report the work and each layer on stderr.

    Returns:
        {"group", "n_pairs", "significant": {layer: {augmentation: count of units with
        q < alpha}}}. ValueError (nothing written) when the analysis is missing, is not a
        contrast analysis, or has no stored activations.
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
    check_overwrite(store, WILCOXON_GROUP, name, overwrite)
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
    write_tree(
        store, WILCOXON_GROUP, name, tree, overwrite=overwrite,
        attrs={
            "analysis": name, "variables": augmentations, "layers": result.layer_names,
            "alpha": float(alpha), "n_pairs": n_pairs, "k": k, "pairing": "image_mean",
            "correction": "benjamini-yekutieli", "family": "layer x augmentation",
            "test_method_names": list(TEST_METHODS),
        },
    )
    return {"group": f"/{WILCOXON_GROUP}/{name}", "n_pairs": n_pairs, "significant": significant}
