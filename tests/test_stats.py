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
from sensitivity.estimators import FLAG_CONSTANT, FLAG_NEGLIGIBLE, FLAG_UNSUPPORTED
from sensitivity.results import AnalysisResult
from sensitivity.stats import (
    ASYMPTOTIC,
    EXACT,
    PERMUTATION,
    by_correction,
    correlation_statistics,
    lda_channel_maps,
    lda_samples,
    lda_statistics,
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


@pytest.mark.slow
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


def test_contrast_stats_reports_its_layers(contrast_run, capsys):
    args = ["contrast-stats", "--results", str(contrast_run), "--analysis", "contrast",
            "--alpha", "0.1", "--overwrite"]
    assert analyze.main(args) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == ("contrast-stats: 3 layers: per unit, signed-rank tests of 8 image "
                        f"pairs x {len(AUGMENTATIONS)} augmentations")
    assert re.fullmatch(r"contrast-stats: 3/3 layers \(100%\), [\d.]+/s, done in .+", lines[-1])
    assert analyze.main([*args, "--no_progress"]) == 0
    assert capsys.readouterr().err == ""


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


def test_spearman_leaves_out_flagged_units_per_position():
    rng = np.random.default_rng(7)
    c, h, w = 12, 2, 3
    maps = np.round(rng.normal(size=(3, c, h, w)), 1)  # ties across channels
    # Map 1 is an increasing function of map 0 on every valid unit: Spearman 1 there. The
    # flagged units carry raw values that would break it (and rank first / last).
    maps[1] = 2 * maps[0] + 1
    valid = rng.random((c, h, w)) < 0.75
    valid[:4, 0, 1] = True
    valid[4:, 0, 1] = False  # 4 valid channels at position (0, 1)
    valid[2:, 1, 2] = False  # 2 valid channels at (1, 2): undefined, like a constant map
    valid[:2, 1, 2] = True
    maps[0][~valid], maps[1][~valid] = 1e9, -25.0
    covariates = rng.normal(size=(2, c, h, w))
    covariates[:, ~valid] = 1e16
    per_position = spearman_by_position(maps, valid=valid)
    against = spearman_by_position(maps, covariates, valid)
    flat, cflat, mask = maps.reshape(3, c, 6), covariates.reshape(2, c, 6), valid.reshape(c, 6)
    for p in range(6):
        units = mask[:, p]
        for i in range(3):
            for j in range(3):
                if units.sum() < 3:
                    assert np.isnan(per_position[i, j, p])
                    continue
                expected = scipy.stats.spearmanr(flat[i, units, p], flat[j, units, p]).statistic
                assert per_position[i, j, p] == pytest.approx(expected, abs=1e-12), (i, j, p)
            for k in range(2):
                if units.sum() >= 3:
                    expected = scipy.stats.spearmanr(flat[i, units, p], cflat[k, units, p])
                    assert against[i, k, p] == pytest.approx(expected.statistic, abs=1e-12)
    defined = np.flatnonzero(mask.sum(axis=0) >= 3)
    np.testing.assert_allclose(per_position[0, 1, defined], 1.0)
    # With the flagged units the same maps lose most of their correlation at every position.
    assert np.all(spearman_by_position(maps)[0, 1] < 0.6)
    corr = map_correlations(maps, covariates, valid)
    assert corr.variables[0, 1] == pytest.approx(1.0)
    assert corr.n_positions == 6 and corr.defined[0, 1] == 5
    assert corr.valid_units == int(valid.sum()) - 2  # the 2 valid units at (1, 2) are unused
    # (F,) units: one correlation across the valid units.
    vector = map_correlations(maps[:, :, 0, 0], valid=valid[:, 0, 0])
    units = valid[:, 0, 0]
    assert vector.variables[0, 2] == pytest.approx(scipy.stats.spearmanr(
        maps[0, units, 0, 0], maps[2, units, 0, 0]).statistic, abs=1e-12)
    assert vector.valid_units == units.sum()
    with pytest.raises(ValueError, match="valid has shape"):
        map_correlations(maps, valid=valid[0])


def test_correlation_command_leaves_out_flagged_units(tmp_path):
    rng = np.random.default_rng(8)
    variables = ["hue", "hflip", "rotation"]
    conv = rng.uniform(size=(3, 10, 2, 2))
    conv[1] = conv[0] ** 2  # monotone in map 0 on every unit: Spearman 1
    head = rng.uniform(size=(3, 7))
    head[2] = head[0] + 1
    flags = {"conv": np.zeros((10, 2, 2), dtype=np.uint8), "head": np.zeros(7, dtype=np.uint8)}
    flags["conv"][[0, 3], 0, 0] = FLAG_UNSUPPORTED
    flags["conv"][5, 1, :] = FLAG_NEGLIGIBLE
    flags["head"][[1, 4]] = FLAG_CONSTANT
    conv[0][flags["conv"] > 0], conv[1][flags["conv"] > 0] = 1e16, -25.0
    head[0][flags["head"] > 0], head[2][flags["head"] > 0] = -25.0, 1e16
    layers = {name: {"ST": maps, "mean": rng.normal(size=maps.shape[1:]),
                     "var": rng.uniform(size=maps.shape[1:])}
              for name, maps in (("conv", conv), ("head", head))}
    store = ResultsStore(tmp_path / "results.h5")
    store.write_metadata(model="resnet18", dataset="synthetic", image_size=32, seed=0)
    store.write_analysis("sobol", AnalysisResult("sobol", variables, layers, n=16,
                                                 evaluations=80, flags=flags))
    correlation_statistics(store.path, "sobol")
    tree, _ = read_tree(store.path, "correlation", "sobol")
    stored = store.read_analysis("sobol")
    assert stored.layers["conv"]["ST"][0, 0, 0, 0] == pytest.approx(1e16, rel=1e-6)  # kept raw
    assert tree["conv"]["ST"]["variables"][0, 1] == pytest.approx(1.0)
    assert tree["head"]["ST"]["variables"][0, 2] == pytest.approx(1.0)
    assert int(tree["conv"]["ST"]["valid_units"]) == 40 - 4
    assert int(tree["head"]["ST"]["valid_units"]) == 5
    np.testing.assert_array_equal(tree["conv"]["ST"]["defined_positions"], 4)
    valid = stored.valid("conv").reshape(10, 4)
    st, var = stored.layers["conv"]["ST"].reshape(3, 10, 4), layers["conv"]["var"].reshape(10, 4)
    expected = np.mean([scipy.stats.spearmanr(st[2, valid[:, p], p], var[valid[:, p], p])
                        .statistic for p in range(4)])
    assert tree["conv"]["ST"]["covariates"][2, 1] == pytest.approx(expected, abs=1e-6)


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


def test_correlation_command_reports_its_maps(tmp_path, capsys):
    results = tmp_path / "results.h5"
    synthetic_sobol(results, np.random.default_rng(3))
    args = ["correlation", "--results", str(results), "--analysis", "sobol"]
    assert analyze.main(args) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "correlation: 4 maps: 2 layers x 2 value types (S1, ST)"
    assert [line.split(" (")[0] for line in lines[1:]] == [
        f"correlation: {n}/4 maps" for n in (1, 2, 3, 4)
    ]
    assert re.search(r"done in \d+ s$", lines[-1])
    assert analyze.main([*args, "--overwrite", "--no_progress"]) == 0
    assert capsys.readouterr().err == ""


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


def test_lda_samples_drop_mostly_flagged_channels_and_fill_flagged_units():
    maps = np.arange(2 * 4 * 2 * 2, dtype=np.float64).reshape(2, 4, 2, 2)
    valid = np.ones((4, 2, 2), dtype=bool)
    valid[1, 0, 0] = False           # 1 of 4 flagged: filled
    valid[2, 0, :] = False           # exactly half flagged: kept, filled
    valid[3].flat[:3] = False        # 3 of 4 flagged: dropped
    raw = maps.copy()
    maps[:, ~valid] = 1e9
    samples = lda_samples(maps, valid)
    assert samples.shape == (2, 3, 2, 2)
    np.testing.assert_array_equal(samples[:, 0], raw[:, 0])
    np.testing.assert_array_equal(samples[:, 1, 0, 0], raw[:, 1].reshape(2, 4)[:, 1:].mean(1))
    np.testing.assert_array_equal(samples[:, 2, 0], raw[:, 2, 1].mean(1, keepdims=True)
                                  .repeat(2, axis=1))
    np.testing.assert_array_equal(samples[:, 2, 1], raw[:, 2, 1])
    valid[1].flat[1:] = False
    valid[2, 1, 0] = False
    with pytest.raises(ValueError, match="only 1 of 4 channels"):
        lda_samples(maps, valid)


def test_lda_leaves_out_flagged_units_that_would_give_the_variable_away():
    rng = np.random.default_rng(9)
    g, c, h, w = 2, 40, 5, 5
    maps = rng.normal(size=(g, c, h, w))  # no planted difference between the variables
    valid = np.ones((c, h, w), dtype=bool)
    valid[:, 2, 2] = False
    valid[:8, :3] = False  # 15 of 25 flagged: these channels are dropped
    maps[0][~valid] += 1e3  # raw values that would tell the variables apart
    maps[1][~valid] -= 25.0
    assert lda_channel_maps(maps, seed=0).mean == 1.0
    result = lda_channel_maps(maps, valid=valid, seed=0)
    assert result.n_channels == 32 and result.n_samples == 64 and result.n_features == 25
    assert result.mean < 0.7 and result.mean - result.chance < 3 * result.sd


def test_lda_command_records_channels_and_names_a_layer_without_enough(tmp_path):
    rng = np.random.default_rng(10)
    variables = ["hue", "hflip"]
    shape = (10, 3, 3)
    flags = {"good": np.zeros(shape, dtype=np.uint8), "sparse": np.zeros(shape, dtype=np.uint8)}
    flags["good"][:3, 0] = FLAG_NEGLIGIBLE  # 3 of 9 units: channels 0-2 kept
    flags["good"][3, :2] = FLAG_UNSUPPORTED  # 6 of 9: channel 3 dropped
    flags["sparse"][1:] = FLAG_CONSTANT  # one channel left
    layers = {name: {"S1": rng.normal(size=(2, *shape))} for name in flags}
    store = ResultsStore(tmp_path / "results.h5")
    store.write_metadata(model="resnet18", dataset="synthetic", image_size=32, seed=0)
    store.write_analysis("sobol", AnalysisResult("sobol", variables, layers, n=8,
                                                 evaluations=32, flags=flags))
    before = digest(store.path)
    with pytest.raises(ValueError, match=r"layer 'sparse'.*only 1 of 10 channels"):
        lda_statistics(store.path, "sobol", n_folds=3, n_repeats=1)
    assert digest(store.path) == before
    del flags["sparse"], layers["sparse"]
    store.write_analysis("good", AnalysisResult("sobol", variables, layers, n=8,
                                                evaluations=32, flags=flags))
    lda_statistics(store.path, "good", n_folds=3, n_repeats=1)
    tree, _ = read_tree(store.path, "lda", "good")
    assert int(tree["good"]["S1"]["n_channels"]) == 9
    assert tree["good"]["S1"]["confusion"].sum() == 2 * 9


def test_lda_command_reports_its_fits(tmp_path, capsys):
    results = tmp_path / "results.h5"
    synthetic_sobol(results, np.random.default_rng(6))
    args = ["lda", "--results", str(results), "--analysis", "sobol", "--repeats", "2"]
    assert analyze.main(args) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "lda: 20 LDA fits: 1 layers x 2 value types x 2 repeats x 5 folds"
    steps = [int(re.match(r"lda: (\d+)/20 fits \(", line).group(1)) for line in lines[1:]]
    assert steps == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]  # a line per tenth, then the end
    assert re.fullmatch(r"lda: 20/20 fits \(100%\), [\d.]+/s, done in \d+ s", lines[-1])
    assert analyze.main([*args, "--overwrite", "--no_progress"]) == 0
    assert capsys.readouterr().err == ""


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
    assert int(tree["conv"]["S1"]["n_channels"]) == 40
    assert analyze.main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert analyze.main([*args, "--overwrite"]) == 0
