"""sensitivity.stats and analyze.py contrast-stats | correlation | lda.

Wilcoxon p-values and rank sums are checked against scipy.stats.wilcoxon column by column, on
synthetic pairs (every method scipy picks) and on the stored activations of a real contrast
analysis (a 32 px ResNet18 through analyze.py --store-activations); the BY correction against
scipy.stats.false_discovery_control; Spearman correlations against scipy.stats.spearmanr; LDA
on planted and shuffled maps.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.stats

import analyze
from sensitivity.results import AnalysisResult
from sensitivity.stats import (
    ASYMPTOTIC,
    EXACT,
    PERMUTATION,
    by_correction,
    lda_channel_maps,
    map_correlations,
    read_tree,
    signed_rank_test,
    spearman_by_position,
)
from sensitivity.store import ResultsStore

K = 2
AUGMENTATIONS = ["erasing", "sharpness", "rolling", "grayscale", "gaussian_blur"]
# 4 planted classes x 2 images = 8 pairs per unit: exact and permutation tests both occur.
CONTRAST = [
    "contrast", "--n", "8", "--contrast_k", str(K), "--store-activations", "--seed", "3",
    "--data.image_size", "32", "--images-per-class", "2", "--small_input", "false",
    "--layers", json.dumps(["layer1", "layer3", "fc"]),
    "--reduction", "{layer1: none, layer3: channel_mean}", "--accelerator", "cpu",
    "--no_progress",
]


def scipy_wilcoxon(column: np.ndarray, **kwargs) -> scipy.stats._morestats.WilcoxonResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 0/0 of an all-zero column
        return scipy.stats.wilcoxon(column, **kwargs)


def assert_equals_scipy(d: np.ndarray, columns: np.ndarray | None = None) -> None:
    """signed_rank_test(d) equals scipy.stats.wilcoxon on every (chosen) column of (n, m) d."""
    test = signed_rank_test(d)
    n = d.shape[0]
    for j in range(d.shape[1]) if columns is None else columns:
        column = d[:, j]
        reference = scipy_wilcoxon(column).pvalue
        if np.isnan(reference):  # only where every difference is zero (documented: p = 1)
            assert np.all(column == 0)
            reference = 1.0
        assert test.pvalue[j] == pytest.approx(reference, rel=1e-12, abs=0), j
        # With alternative "greater" scipy reports the positive rank sum itself.
        assert test.r_plus[j] == scipy_wilcoxon(column, alternative="greater").statistic
        nonzero = column[column != 0]
        ranks = scipy.stats.rankdata(np.abs(nonzero))
        plus, minus = ranks[nonzero > 0].sum(), ranks[nonzero < 0].sum()
        expected = (plus - minus) / (plus + minus) if len(nonzero) else 0.0
        assert test.rank_biserial[j] == pytest.approx(expected, abs=1e-12)
    assert test.n_pairs == n


@pytest.mark.parametrize("n", [8, 20, 60])
def test_signed_rank_equals_scipy_column_by_column(n):
    rng = np.random.default_rng(n)
    d = rng.normal(0.4, 1.0, size=(n, 48))
    d[:, :16] = np.round(d[:, :16], 1)  # ties
    d[: n // 3, 16:24] = 0.0  # zeros (dropped, as scipy's zero_method "wilcox")
    d[:, 24] = 0.0  # nothing to test
    d[:, 25] = np.abs(d[:, 25]) + 0.1  # all positive: the smallest p-value
    test = signed_rank_test(d)
    methods = set(np.unique(test.method).tolist())
    if n <= 13:
        assert methods == {EXACT, PERMUTATION}
    elif n <= 50:
        assert methods == {EXACT, ASYMPTOTIC}
    else:
        assert methods == {ASYMPTOTIC}
    assert_equals_scipy(d)
    assert test.rank_biserial[25] == 1.0 and test.pvalue[24] == 1.0


def test_signed_rank_is_vectorised_over_unit_shapes():
    rng = np.random.default_rng(0)
    d = np.round(rng.normal(size=(8, 3, 4, 5)), 1)
    test = signed_rank_test(d)
    assert test.pvalue.shape == (3, 4, 5) and test.method.shape == (3, 4, 5)
    flat = signed_rank_test(d.reshape(8, -1))
    np.testing.assert_array_equal(test.pvalue.ravel(), flat.pvalue)
    with pytest.raises(ValueError, match="NaN or inf"):
        signed_rank_test(np.full((4, 2), np.nan))


def test_by_correction_equals_scipy_and_is_applied():
    rng = np.random.default_rng(1)
    p = np.concatenate([rng.uniform(0, 1e-3, (3, 20)), rng.uniform(size=(3, 200))], axis=1)
    q = by_correction(p)
    for row in range(3):
        np.testing.assert_allclose(
            q[row], scipy.stats.false_discovery_control(p[row], method="by"), rtol=1e-14
        )
    # BY's harmonic factor sum_{i<=m} 1/i makes it stricter than BH: q > BH q >= p.
    bh = scipy.stats.false_discovery_control(p, axis=-1, method="bh")
    assert np.all(q >= bh) and np.all(bh >= p) and np.any(q > bh)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        by_correction(np.array([0.1, np.nan]))


# ------------------------------------------------------------------------ stored activations
@pytest.fixture(scope="module")
def contrast_run(tmp_path_factory) -> Path:
    """A real contrast analysis with stored activations, and its Wilcoxon statistics."""
    out = tmp_path_factory.mktemp("contrast")
    assert analyze.main([*CONTRAST, "--output", str(out)]) == 0
    results = out / "results.h5"
    assert analyze.main(["contrast-stats", "--results", str(results), "--analysis",
                         "contrast", "--alpha", "0.1"]) == 0
    return results


def stored_pairs(results: Path, layer: str) -> np.ndarray:
    """(images, A, units): per design block, mean over the K draws of augmented - original,
    assembled from the raw rows by their row kinds."""
    with h5py.File(results, "r") as f:
        rows = f["activations/contrast"]
        kinds = list(rows.attrs["row_kind_names"])
        block = len(kinds)
        values = rows[layer][()].astype(np.float64)
        index = rows["row_index"][()]
    values = values.reshape(len(values), -1)
    n_images = len(index) // block
    pairs = np.empty((n_images, len(AUGMENTATIONS), values.shape[1]))
    for b in range(n_images):
        original = values[b * block + kinds.index("original")]
        for a, name in enumerate(AUGMENTATIONS):
            draws = [values[b * block + kinds.index(f"{name}_{i}")] for i in range(K)]
            pairs[b, a] = np.mean([draw - original for draw in draws], axis=0)
    return pairs


def test_wilcoxon_on_stored_activations_equals_scipy_per_unit(contrast_run, capsys):
    tree, attrs = read_tree(contrast_run, "wilcoxon", "contrast")
    assert attrs["variables"] == AUGMENTATIONS and attrs["n_pairs"] == 8 and attrs["k"] == K
    assert attrs["layers"] == ["layer1", "layer3", "fc"] and attrs["alpha"] == 0.1
    rng = np.random.default_rng(0)
    for layer, unit_shape in (("layer1", (64, 8, 8)), ("layer3", (256,)), ("fc", (4,))):
        values = tree[layer]
        assert values["wilcoxon_p"].shape == (len(AUGMENTATIONS), *unit_shape)
        pairs = stored_pairs(contrast_run, layer)  # (8, A, U)
        d = pairs.reshape(8, -1)
        p = values["wilcoxon_p"].reshape(-1)
        test = signed_rank_test(d)
        np.testing.assert_array_equal(test.pvalue, p)
        np.testing.assert_array_equal(test.rank_biserial, values["rank_biserial"].reshape(-1))
        # scipy column by column: every unit of the head, and for the 1280 and 20480 units of
        # the conv layers a sample of each test method scipy chose (its permutation test costs
        # tens of ms a unit).
        columns = np.arange(d.shape[1])
        if layer != "fc":
            columns = np.concatenate([
                rng.choice(np.flatnonzero(test.method == code),
                           min(12, np.count_nonzero(test.method == code)), replace=False)
                for code in np.unique(test.method)
            ])
        if layer == "layer1":  # ReLU maps: zero differences, hence permutation tests
            assert set(np.unique(test.method).tolist()) == {EXACT, PERMUTATION}
        assert_equals_scipy(d, columns)
        # The BY correction is applied per (layer, augmentation) over the layer's units.
        q = values["wilcoxon_q"].reshape(len(AUGMENTATIONS), -1)
        for a in range(len(AUGMENTATIONS)):
            reference = scipy.stats.false_discovery_control(
                values["wilcoxon_p"].reshape(len(AUGMENTATIONS), -1)[a], method="by"
            )
            np.testing.assert_allclose(q[a], reference, rtol=1e-14)
        np.testing.assert_array_equal(values["n_significant"], (q < 0.1).sum(axis=1))
        assert values["test_methods"].sum() == q.size
    args = ["contrast-stats", "--results", str(contrast_run), "--analysis", "contrast",
            "--alpha", "0.1", "--overwrite"]
    assert analyze.main(args) == 0  # deterministic: the same group again
    printed = capsys.readouterr().out
    assert str(contrast_run) in printed and "/wilcoxon/contrast: 8 image pairs" in printed
    np.testing.assert_array_equal(read_tree(contrast_run, "wilcoxon", "contrast")[0]["fc"][
        "wilcoxon_p"], tree["fc"]["wilcoxon_p"])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bad_input_exits_2_and_writes_nothing(contrast_run, tmp_path, capsys):
    before = digest(contrast_run)
    cases = [
        (["contrast-stats", "--analysis", "missing"], "no complete analysis 'missing'"),
        (["correlation", "--analysis", "missing"], "no complete analysis 'missing'"),
        (["lda", "--analysis", "missing"], "no complete analysis 'missing'"),
        (["contrast-stats", "--analysis", "contrast"], "already holds /wilcoxon/contrast"),
        (["correlation", "--analysis", "contrast"], "compares sensitivity maps.*has none"),
        (["lda"], "needs --analysis NAME"),
    ]
    for args, message in cases:
        assert analyze.main([*args, "--results", str(contrast_run)]) == 2, args
        assert re.search(message, capsys.readouterr().err), args
    assert digest(contrast_run) == before
    assert not list(contrast_run.parent.glob(".*tmp*"))
    missing = tmp_path / "none" / "results.h5"
    assert analyze.main(["correlation", "--results", str(missing), "--analysis", "x"]) == 2
    assert "no results file" in capsys.readouterr().err and not missing.parent.exists()


def test_contrast_stats_needs_stored_activations(tmp_path, capsys):
    results = tmp_path / "results.h5"
    store = ResultsStore(results)
    store.write_metadata(model="resnet18", dataset="synthetic", image_size=32, seed=0)
    shape = (len(AUGMENTATIONS), 3)
    store.write_analysis("contrast", AnalysisResult(
        "contrast", AUGMENTATIONS, {"fc": {"mean_diff": np.ones(shape),
                                           "effect_size": np.ones(shape)}}, n=4, evaluations=44,
    ))
    before = digest(results)
    code = analyze.main(["contrast-stats", "--results", str(results), "--analysis", "contrast"])
    assert code == 2 and "--store-activations" in capsys.readouterr().err
    assert digest(results) == before


# ------------------------------------------------------------------------ correlation
def test_spearman_equals_scipy_per_position():
    rng = np.random.default_rng(2)
    maps = np.round(rng.normal(size=(4, 12, 3, 5)), 1)  # ties across channels
    maps[2, :, 0, 0] = 0.5  # constant at one position: undefined there, as spearmanr
    covariates = rng.normal(size=(3, 12, 3, 5))
    per_position = spearman_by_position(maps)
    against = spearman_by_position(maps, covariates)
    assert per_position.shape == (4, 4, 15) and against.shape == (4, 3, 15)
    flat, cflat = maps.reshape(4, 12, 15), covariates.reshape(3, 12, 15)
    for i, j, p in [(0, 1, 0), (1, 3, 7), (2, 0, 3), (3, 3, 14)]:
        expected = scipy.stats.spearmanr(flat[i, :, p], flat[j, :, p]).statistic
        assert per_position[i, j, p] == pytest.approx(expected, abs=1e-12)
        expected = scipy.stats.spearmanr(flat[i, :, p], cflat[j % 3, :, p]).statistic
        assert against[i, j % 3, p] == pytest.approx(expected, abs=1e-12)
    assert np.isnan(per_position[2, 0, 0]) and np.isnan(per_position[2, 2, 0])
    corr = map_correlations(maps, covariates)
    assert corr.n_positions == 15 and corr.defined[2, 1] == 14 and corr.defined[0, 1] == 15
    expected = np.mean([scipy.stats.spearmanr(flat[2, :, p], flat[1, :, p]).statistic
                        for p in range(1, 15)])
    assert corr.variables[2, 1] == pytest.approx(expected, abs=1e-12)
    np.testing.assert_allclose(np.diag(corr.variables), 1.0)
    # (C,) units: one correlation across all channels.
    vector = map_correlations(maps[:, :, 1, 1])
    assert vector.variables[0, 3] == pytest.approx(
        scipy.stats.spearmanr(maps[0, :, 1, 1], maps[3, :, 1, 1]).statistic, abs=1e-12)


def synthetic_sobol(path: Path, rng: np.random.Generator, signal: float = 0.6) -> AnalysisResult:
    """A sobol analysis with planted per-variable spatial patterns in its conv layer."""
    variables = ["hue", "hflip", "rotation", "order"]
    g, c, h, w = len(variables), 40, 5, 5
    templates = rng.normal(size=(2, g, 1, h, w))
    layers = {}
    for name, template in (("conv", templates[0]), ("head", None)):
        shape = (c, h, w) if template is not None else (7,)
        maps = rng.uniform(size=(2, g, *shape))
        if template is not None:
            maps = maps + signal * template[None]
        layers[name] = {"S1": maps[0], "ST": maps[1] + maps[0], "mean": rng.normal(size=shape),
                        "var": rng.uniform(size=shape), "cv": rng.uniform(size=shape)}
    result = AnalysisResult("sobol", variables, layers, n=16, evaluations=96)
    store = ResultsStore(path)
    store.write_metadata(model="resnet18", dataset="synthetic", image_size=32, seed=0)
    store.write_analysis("sobol", result)
    return store.read_analysis("sobol")  # float32 round trip, as the commands read it


def test_correlation_command_writes_spearman_matrices(tmp_path, capsys):
    results = tmp_path / "results.h5"
    result = synthetic_sobol(results, np.random.default_rng(3))
    assert analyze.main(["correlation", "--results", str(results), "--analysis", "sobol"]) == 0
    assert "/correlation/sobol" in capsys.readouterr().out
    tree, attrs = read_tree(results, "correlation", "sobol")
    assert attrs["values"] == ["S1", "ST"] and attrs["covariates"] == ["mean", "var", "cv"]
    conv = result.layers["conv"]
    stored = tree["conv"]["ST"]
    assert stored["variables"].shape == (4, 4) and stored["covariates"].shape == (4, 3)
    assert int(stored["n_positions"]) == 25
    flat = conv["ST"].reshape(4, 40, 25)
    expected = np.mean([scipy.stats.spearmanr(flat[0, :, p], flat[2, :, p]).statistic
                        for p in range(25)])
    assert stored["variables"][0, 2] == pytest.approx(expected, abs=1e-10)
    cv = conv["cv"].reshape(40, 25)
    expected = np.mean([scipy.stats.spearmanr(flat[1, :, p], cv[:, p]).statistic
                        for p in range(25)])
    assert stored["covariates"][1, 2] == pytest.approx(expected, abs=1e-10)
    head = result.layers["head"]
    assert tree["head"]["S1"]["variables"][1, 3] == pytest.approx(
        scipy.stats.spearmanr(head["S1"][1], head["S1"][3]).statistic, abs=1e-10)


# ------------------------------------------------------------------------ LDA
def test_lda_planted_difference_beats_chance_shuffled_labels_do_not():
    rng = np.random.default_rng(4)
    g, c, h, w = 4, 40, 5, 5
    maps = 0.5 * rng.normal(size=(g, 1, h, w)) + rng.normal(size=(g, c, h, w))
    planted = lda_channel_maps(maps, n_folds=5, n_repeats=3, seed=0)
    shuffled_maps = maps.reshape(g * c, h, w)[rng.permutation(g * c)].reshape(g, c, h, w)
    shuffled = lda_channel_maps(shuffled_maps, n_folds=5, n_repeats=3, seed=0)
    assert planted.chance == shuffled.chance == 0.25 and planted.solver == "svd"
    assert len(planted.accuracy) == 15 and planted.confusion.sum() == 3 * g * c
    # Margins from the folds' spread: the planted maps beat chance by 3 fold sd (even a single
    # fold would); the shuffled mean (a whole-sample accuracy: folds partition the samples, so
    # its sd is about the fold sd / sqrt(5)) stays within 3 of those of chance.
    assert planted.mean - planted.chance > 3 * planted.sd
    assert abs(shuffled.mean - shuffled.chance) < 3 * shuffled.sd / np.sqrt(5)
    assert planted.mean - shuffled.mean > 3 * planted.sd
    # Most of the planted confusion mass sits on the diagonal.
    assert np.trace(planted.confusion) > planted.confusion.sum() / 2


def test_lda_shrinks_when_features_outnumber_samples():
    rng = np.random.default_rng(5)
    g, c, h, w = 3, 10, 8, 8  # 64 features, 24 training samples per fold
    maps = 0.5 * rng.normal(size=(g, 1, h, w)) + rng.normal(size=(g, c, h, w))
    result = lda_channel_maps(maps, seed=1)
    assert result.solver == "lsqr+shrinkage" and result.n_features == 64
    assert result.mean - result.chance > 3 * result.sd
    with pytest.raises(ValueError, match="reduction none"):
        lda_channel_maps(maps[:, :, 0, 0])


def test_lda_command_writes_accuracy_and_confusion(tmp_path, capsys):
    results = tmp_path / "results.h5"
    synthetic_sobol(results, np.random.default_rng(6))
    args = ["lda", "--results", str(results), "--analysis", "sobol", "--repeats", "2",
            "--value-types", "[S1]"]
    assert analyze.main(args) == 0
    printed = capsys.readouterr().out
    assert "chance 0.250" in printed and "skipped (no spatial maps): head" in printed
    tree, attrs = read_tree(results, "lda", "sobol")
    assert attrs["layers"] == ["conv"] and attrs["values"] == ["S1"] and attrs["n_repeats"] == 2
    assert json.loads(attrs["solvers"]) == {"conv/S1": "svd"}
    accuracy = tree["conv"]["S1"]["accuracy"]
    assert accuracy.shape == (10,) and accuracy.mean() - 0.25 > 3 * accuracy.std(ddof=1)
    assert tree["conv"]["S1"]["confusion"].sum() == 2 * 4 * 40
    assert analyze.main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert analyze.main([*args, "--overwrite"]) == 0
