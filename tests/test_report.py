"""Report figures: heatmaps and histories written as real, readable PNGs."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread

from sensitivity.report import (
    heatmap_figure,
    history_figure,
    pair_figure,
    save_heatmaps,
    save_history,
)
from sensitivity.results import AnalysisResult

GROUPS = ["erasing", "sharpness", "rolling", "order"]
UNITS = {"layer1": (8, 4, 4), "layer4": (16, 2, 2), "fc": (4,)}


def sobol(epoch: int | None, seed: int = 0) -> AnalysisResult:
    rng = np.random.default_rng(seed)
    layers = {}
    for i, (layer, unit) in enumerate(UNITS.items()):
        s1 = rng.uniform(0, 0.2, (len(GROUPS), *unit))
        s1[i] = 0.6  # variable i dominates layer i: a visible diagonal
        layers[layer] = {"S1": s1, "ST": np.clip(s1 + 0.1, 0, 1)}
    return AnalysisResult("sobol", GROUPS, layers, n=16, evaluations=96, epoch=epoch)


def shapley() -> AnalysisResult:
    rng = np.random.default_rng(1)
    layers = {}
    for layer, unit in UNITS.items():
        share = rng.dirichlet(np.ones(len(GROUPS)), size=int(np.prod(unit))).T
        layers[layer] = {"shapley_normalized": share.reshape(len(GROUPS), *unit),
                         "shapley": 2.0 * share.reshape(len(GROUPS), *unit)}
    return AnalysisResult("shapley", GROUPS, layers, n=32, evaluations=160)


def assert_png(path, min_kb: float = 10) -> None:
    assert path.is_file() and path.stat().st_size > min_kb * 1024
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 250 and image.shape[1] > 400
    assert image[..., :3].std() > 0.05  # drawn, not a blank canvas


def test_heatmap_cells_are_layer_variable_medians_over_valid_units():
    result = sobol(epoch=2)
    # A flagged unit with a wild raw value must not move the cells (its raw value stays).
    result.layers["fc"]["S1"][:, 0] = 1e6
    result.flags["fc"][0] = 2
    figure = heatmap_figure(result, "S1")
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "layer1 (100% valid)", "layer4 (100% valid)", "fc (75% valid)"
    ]
    assert [t.get_text() for t in ax.get_xticklabels()] == GROUPS
    assert "epoch 2" in ax.get_title() and "median over valid units" in ax.get_title()
    labels = [t.get_text() for t in ax.texts]
    assert len(labels) == len(UNITS) * len(GROUPS)
    assert [labels[i * len(GROUPS) + i] for i in range(len(UNITS))] == ["0.60"] * 3
    median = np.median(result.layers["fc"]["S1"][1, 1:])
    assert labels[2 * len(GROUPS) + 1] == f"{median:.2f}"
    assert len(figure.axes) == 2  # the colour bar
    mean = heatmap_figure(result, "S1", statistic="mean")
    assert "mean over valid units" in mean.axes[0].get_title()
    with pytest.raises(ValueError, match="per-variable key"):
        heatmap_figure(result, "mean")
    with pytest.raises(ValueError, match="unknown statistic"):
        heatmap_figure(result, "S1", statistic="mode")


def test_save_heatmaps_one_png_per_value_key(tmp_path):
    paths = save_heatmaps(sobol(epoch=None), tmp_path / "figs", name="final")
    assert [(k, p.name) for k, p in paths.items()] == [("S1", "final_S1.png"),
                                                       ("ST", "final_ST.png")]
    shapley_paths = save_heatmaps(shapley(), tmp_path / "figs")
    assert [p.name for p in shapley_paths.values()] == ["shapley_shapley_normalized.png",
                                                        "shapley_shapley.png"]
    for path in [*paths.values(), *shapley_paths.values()]:
        assert_png(path)


def test_second_order_figure_shows_the_median_s2_and_its_half_width(tmp_path):
    rng = np.random.default_rng(3)
    g = len(GROUPS)
    layers = {}
    for layer, unit in UNITS.items():
        s2 = rng.uniform(-0.05, 0.05, (g, g, *unit))
        s2 = (s2 + s2.swapaxes(0, 1)) / 2
        s2[0, 1] = s2[1, 0] = 0.3
        s2[np.arange(g), np.arange(g)] = 0.0
        layers[layer] = {"S1": rng.uniform(0, 0.2, (g, *unit)), "ST": np.full((g, *unit), 0.4),
                         "S2": s2, "S2_conf": np.full((g, g, *unit), 0.05)}
    result = AnalysisResult("sobol", GROUPS, layers, n=16, evaluations=160)
    paths = save_heatmaps(result, tmp_path, name="final")
    assert list(paths) == ["S1", "ST", "S2"] and paths["S2"].name == "final_S2.png"
    assert_png(paths["S2"])
    figure = pair_figure(result)
    texts = [t.get_text() for t in figure.axes[0].texts]
    assert len(texts) == g * (g - 1) and texts[0] == "0.30\n±0.05"  # cell (0, 1)


def test_history_over_epochs(tmp_path):
    results = [sobol(epoch=e, seed=e) for e in (2, 0, 1)]  # order is restored by epoch
    figure = history_figure(results, "ST")
    panels = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == list(UNITS)
    line = panels[0].lines[0]
    np.testing.assert_array_equal(line.get_xdata(), [0, 1, 2])
    np.testing.assert_allclose(
        line.get_ydata()[0], np.median(sobol(0, seed=0).layers["layer1"]["ST"][0])
    )
    paths = save_history(results, tmp_path)
    assert [p.name for p in paths] == ["history_S1.png", "history_ST.png"]
    paths += save_history(results, tmp_path, layer="fc", name="fc")
    assert paths[-1].name == "fc_ST_fc.png"
    for path in paths:
        assert_png(path)
    with pytest.raises(ValueError, match="epoch"):
        history_figure([sobol(epoch=None)], "S1")
    with pytest.raises(ValueError, match="missing"):
        history_figure(results, "S1", layer="layer9")
    with pytest.raises(ValueError, match="share method"):
        save_history([results[0], shapley()], tmp_path)


def test_top_variable_shares_count_the_argmax_over_valid_units():
    """Recomputed with numpy from the raw arrays: flagged units and units with a non-finite
    value are left out; a layer without such units gets zero shares."""
    result = sobol(epoch=0, seed=3)
    result.flags["layer1"].reshape(-1)[:5] = 2  # negligible: out of the count
    result.layers["layer4"]["S1"][1, 0, 0, 0] = np.nan
    result.flags["fc"][:] = 1  # no valid unit
    shares = result.top_variable_shares()
    for layer in ("layer1", "layer4"):
        s1 = result.layers[layer]["S1"].reshape(len(GROUPS), -1)
        keep = (result.flags[layer].reshape(-1) == 0) & np.isfinite(s1).all(axis=0)
        top = s1[:, keep].argmax(axis=0)
        expected = [np.mean(top == g) for g in range(len(GROUPS))]
        assert [shares[layer][v] for v in GROUPS] == pytest.approx(expected)
        assert sum(shares[layer].values()) == pytest.approx(1.0)
    # the planted diagonal: variable i tops every unit of layer i
    assert shares["layer4"]["sharpness"] == 1.0
    assert shares["fc"] == dict.fromkeys(GROUPS, 0.0)
    assert result.top_variable_shares("ST")["layer1"]["erasing"] == 1.0
    with pytest.raises(ValueError, match="per-variable key"):
        result.top_variable_shares("S2")
