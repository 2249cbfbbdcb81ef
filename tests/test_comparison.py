"""analyze.py compare: two analyses of one network compared unit by unit (Sobol' against
Shapley), each map against mean, variance and CV, and the decay of the largest values; the
stored numbers, the figures drawn from them, the HTML report's section and the W&B keys.

Synthetic analyses with flagged units whose raw values are absurd (1e9) check the numbers
against scipy.stats.spearmanr and numpy's sort over the valid units, and the figures' artists
against the data. A small real run (32 px ResNet18, Sobol and Shapley, full layer1 maps and
channel means of layer4) is compared with W&B offline and reported, and the report is opened
in headless Chromium (skipped where it is not installed).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import scipy.stats
from helpers import cli
from wandb_records import history_row, runs_by_command

from sensitivity import comparison
from sensitivity.results import AnalysisResult
from sensitivity.stats import (
    COMPARISON_GROUP,
    CORRELATION_GROUP,
    COVARIATES,
    cross_spearman,
    read_tree,
    top_values,
)
from sensitivity.store import ResultsStore

VARIABLES = ["hue", "hflip", "class"]
PROVENANCE = {
    "model": "resnet18", "weights": "none", "weights_sha256": "ab" * 32,
    "dataset": "planted:colour", "image_size": [32, 32],
    "problem": json.dumps({"augmentations": ["hue", "hflip"], "auxiliaries": ["class"]}),
}
HUGE = 1e9  # a flagged unit's raw index: it would dominate every rank it entered
CONV = (6, 2, 3)  # (C, H, W)
# Flagged units: at position (0, 0) only channels 4 and 5 are valid in both analyses, too few
# for a correlation across channels there.
FLAGS = {
    "sobol": {"conv": [(0, 0, 0), (1, 0, 0), (5, 1, 2)], "fc": [0]},
    "shapley": {"conv": [(2, 0, 0), (3, 0, 0), (4, 1, 1)], "fc": [5, 6]},
}
COMMON = [
    "--data.image_size", "32", "--images-per-class", "1", "--small_input", "false",
    "--layers", json.dumps(["layer1", "layer4"]), "--reduction", "{layer1: none}",
    "--accelerator", "cpu", "--no_progress",
]
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--enable-logging=stderr", "--v=0",
]
pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def flags(method: str, layer: str, shape: tuple[int, ...]) -> np.ndarray:
    flag = np.zeros(shape, dtype=np.uint8)
    for unit in FLAGS[method][layer]:
        flag[unit] = 2
    return flag


def synthetic(method: str, base: dict[str, np.ndarray], rng: np.random.Generator,
              keys: tuple[str, str]) -> AnalysisResult:
    """A result whose maps are ``base`` plus noise (so the two analyses correlate), with unit
    moments, and HUGE at its flagged units."""
    layers = {}
    for layer, shared in base.items():
        shape = shared.shape[1:]
        flagged = flags(method, layer, shape) > 0
        mean = rng.normal(0.5, 1.0, size=shape)
        var = rng.lognormal(-2.0, 2.0, size=shape)
        values = {key: shared + rng.normal(scale=0.3, size=shared.shape) for key in keys}
        for array in values.values():
            array[:, flagged] = HUGE
        values.update(mean=mean, var=var, cv=np.sqrt(var) / np.abs(mean))
        layers[layer] = values
    return AnalysisResult(method, VARIABLES, layers, n=16, evaluations=80,
                          flags={layer: flags(method, layer, base[layer].shape[1:])
                                 for layer in base})


def write_pair(path: Path, seed: int = 0) -> ResultsStore:
    """Metadata and the analyses "sobol" (S1, ST) and "shapley" of the same variables and
    provenance."""
    rng = np.random.default_rng(seed)
    base = {"conv": rng.uniform(size=(3, *CONV)), "fc": rng.uniform(size=(3, 8))}
    store = ResultsStore(path)
    store.write_metadata(model="resnet18", dataset="planted:colour", image_size=32, seed=0)
    store.write_analysis("sobol", synthetic("sobol", base, rng, ("S1", "ST")), attrs=PROVENANCE)
    store.write_analysis("shapley", synthetic("shapley", base, rng,
                                              ("shapley", "shapley_normalized")), attrs=PROVENANCE)
    return store


def compare(results: Path, *args: object) -> int:
    return cli("compare", "--results", results, "--no_progress", "--wandb", "false", *args,
               quiet=True)


@pytest.fixture
def pair(tmp_path) -> ResultsStore:
    store = write_pair(tmp_path / "results.h5")
    assert compare(store.path, "--analysis", "sobol", "--other", "shapley", "--top", "7") == 0
    return store


def joint_valid(store: ResultsStore, layer: str) -> np.ndarray:
    return store.read_analysis("sobol").valid(layer) & store.read_analysis("shapley").valid(layer)


def stored_maps(store: ResultsStore, layer: str) -> tuple[np.ndarray, np.ndarray]:
    """The compared maps as the file stores them: sobol ST, shapley shapley_normalized."""
    return (store.read_analysis("sobol").layers[layer]["ST"],
            store.read_analysis("shapley").layers[layer]["shapley_normalized"])


# ------------------------------------------------------------------------------- statistics
def test_spearman_over_jointly_valid_units_equals_scipy(pair):
    tree, attrs = read_tree(pair.path, COMPARISON_GROUP, "sobol_vs_shapley")
    assert attrs["analyses"] == ["sobol", "shapley"]
    assert attrs["values"] == ["ST", "shapley_normalized"]
    for layer in ("conv", "fc"):
        a, b = stored_maps(pair, layer)
        joint = joint_valid(pair, layer)
        assert tree[layer]["valid_units"] == joint.sum()
        for i in range(3):
            for j in range(3):
                expected = scipy.stats.spearmanr(a[i][joint], b[j][joint]).statistic
                assert tree[layer]["spearman"][i, j] == pytest.approx(expected, abs=1e-12)
            # the flagged units would have changed it
            everything = scipy.stats.spearmanr(a[i].ravel(), b[i].ravel()).statistic
            assert abs(everything - tree[layer]["spearman"][i, i]) > 1e-3
    np.testing.assert_allclose(tree["fc"]["spearman_positions"], tree["fc"]["spearman"])


def test_spearman_by_position_averages_the_defined_positions(pair):
    tree, _ = read_tree(pair.path, COMPARISON_GROUP, "sobol_vs_shapley")
    a, b = stored_maps(pair, "conv")
    joint = joint_valid(pair, "conv")
    assert joint[:, 0, 0].sum() == 2  # undefined there, left out of the mean
    for i in range(3):
        for j in range(3):
            per_position = [
                scipy.stats.spearmanr(a[i][joint[:, h, w], h, w], b[j][joint[:, h, w], h, w])
                .statistic for h in range(CONV[1]) for w in range(CONV[2])
                if joint[:, h, w].sum() >= 3
            ]
            assert len(per_position) == CONV[1] * CONV[2] - 1
            assert tree["conv"]["spearman_positions"][i, j] == pytest.approx(
                np.mean(per_position), abs=1e-12)


def test_covariate_correlations_over_each_analysis_valid_units(pair):
    tree, _ = read_tree(pair.path, COMPARISON_GROUP, "sobol_vs_shapley")
    for side, name, key in (("a", "sobol", "ST"), ("b", "shapley", "shapley_normalized")):
        result = pair.read_analysis(name)
        for layer in ("conv", "fc"):
            values, valid = result.layers[layer], result.valid(layer)
            for g in range(3):
                for c, covariate in enumerate(COVARIATES):
                    expected = scipy.stats.spearmanr(values[key][g][valid],
                                                     values[covariate][valid]).statistic
                    assert tree[layer][side]["covariates"][g, c] == pytest.approx(expected,
                                                                                 abs=1e-12)
    # By position they are what the correlation command stores: one computation, reused.
    assert cli("correlation", "--results", pair.path, "--analysis", "sobol", "--value-types",
               "[ST]", "--no_progress", "--wandb", "false", quiet=True) == 0
    correlation, _ = read_tree(pair.path, CORRELATION_GROUP, "sobol")
    for layer in ("conv", "fc"):
        np.testing.assert_allclose(tree[layer]["a"]["covariates_positions"],
                                   correlation[layer]["ST"]["covariates"], atol=1e-12)


def test_decay_curves_are_the_sorted_valid_values(pair):
    tree, attrs = read_tree(pair.path, COMPARISON_GROUP, "sobol_vs_shapley")
    assert attrs["top"] == 7
    for side, name, key in (("a", "sobol", "ST"), ("b", "shapley", "shapley_normalized")):
        result = pair.read_analysis(name)
        for layer in ("conv", "fc"):
            maps, valid = result.layers[layer][key], result.valid(layer)
            decay = tree[layer][side]["decay"]
            assert decay.shape == (3, 7)
            for g in range(3):
                expected = np.sort(maps[g][valid])[::-1][:7]
                np.testing.assert_array_equal(decay[g, :expected.size], expected)
                assert np.isnan(decay[g, expected.size:]).all()  # past the valid units
    assert np.isnan(tree["fc"]["b"]["decay"][:, 6]).all()  # shapley: 6 of 8 fc units valid


def test_array_functions_leave_out_invalid_and_non_finite_values():
    maps = np.array([[3.0, np.nan, 1.0, 7.0, 5.0], [1.0, 2.0, 3.0, 4.0, np.inf]])
    valid = np.array([True, True, True, False, True])
    np.testing.assert_array_equal(top_values(maps, valid, 3), [[5.0, 3.0, 1.0],
                                                               [3.0, 2.0, 1.0]])
    assert top_values(maps, valid, 9).shape == (2, 5)
    x = np.arange(12.0).reshape(1, 4, 3)
    pooled, by_position = cross_spearman(x, -x, np.ones((4, 3), dtype=bool))
    assert pooled[0, 0] == pytest.approx(-1.0) and by_position[0, 0] == pytest.approx(-1.0)
    np.testing.assert_array_equal(comparison.shown(10, 4), [0, 3, 6, 9])
    np.testing.assert_array_equal(comparison.shown(3, 4), [0, 1, 2])


# ------------------------------------------------------------------------------- figures
def test_scatter_draws_the_jointly_valid_units_with_rho_in_the_titles(pair):
    loaded = comparison.read_comparison(pair.path, "sobol_vs_shapley")
    for layer in ("conv", "fc"):
        a, b = stored_maps(pair, layer)
        joint = joint_valid(pair, layer)
        entry = loaded.tree[layer]
        axes = [ax for ax in comparison.scatter_figure(loaded, layer).axes if ax.get_visible()]
        assert len(axes) == 3
        for g, ax in enumerate(axes):
            (points,) = ax.collections
            np.testing.assert_array_equal(points.get_offsets(),
                                          np.column_stack([a[g][joint], b[g][joint]]))
            title = ax.get_title()
            assert title.startswith(f"{VARIABLES[g]}: ρ = {entry['spearman'][g, g]:.2f}")
            by_position = f"(by position {entry['spearman_positions'][g, g]:.2f})"
            assert (by_position in title) == (layer == "conv")
            assert (ax.get_xlabel(), ax.get_ylabel()) == ("sobol ST", "shapley shapley_normalized")


def test_covariate_figure_draws_each_analysis_against_its_moments(pair):
    loaded = comparison.read_comparison(pair.path, "sobol_vs_shapley")
    axes = comparison.covariates_figure(loaded, "conv").axes
    assert len(axes) == 3 * len(COVARIATES)
    for g in range(3):
        for c, covariate in enumerate(COVARIATES):
            ax = axes[g * len(COVARIATES) + c]
            parts = []
            for points, side, name, key in zip(ax.collections, "ab", ("sobol", "shapley"),
                                                ("ST", "shapley_normalized"), strict=True):
                result = pair.read_analysis(name)
                values, valid = result.layers["conv"], result.valid("conv")
                np.testing.assert_array_equal(points.get_offsets(), np.column_stack(
                    [values[covariate][valid], values[key][g][valid]]))
                parts.append(f"{name} {loaded.tree['conv'][side]['covariates'][g, c]:.2f}")
            assert ax.get_title() == f"{VARIABLES[g]} vs {covariate}: ρ {', '.join(parts)}"


def test_decay_figure_draws_the_sorted_values(pair):
    loaded = comparison.read_comparison(pair.path, "sobol_vs_shapley")
    axes = comparison.decay_figure(loaded).axes
    assert [ax.get_title() for ax in axes[:4]] == [
        "conv: sobol ST", "conv: shapley shapley_normalized", "fc: sobol ST",
        "fc: shapley shapley_normalized"]
    panels = [(layer, name, key) for layer in ("conv", "fc")
              for name, key in (("sobol", "ST"), ("shapley", "shapley_normalized"))]
    for ax, (layer, name, key) in zip(axes, panels, strict=True):
        result = pair.read_analysis(name)
        maps, valid = result.layers[layer][key], result.valid(layer)
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == VARIABLES
        for g, line in enumerate(lines):
            expected = np.sort(maps[g][valid])[::-1][:7]
            np.testing.assert_array_equal(line.get_ydata()[:expected.size], expected)
            np.testing.assert_array_equal(line.get_xdata(), np.arange(1, 8))


def test_pngs_are_written_and_not_blank(pair, tmp_path):
    loaded = comparison.read_comparison(pair.path, "sobol_vs_shapley")
    paths = comparison.save_figures(loaded, tmp_path / "figures")
    assert {key: path.name for key, path in paths.items()} == {
        "scatter/conv": "sobol_vs_shapley_scatter_conv.png",
        "covariates/conv": "sobol_vs_shapley_covariates_conv.png",
        "scatter/fc": "sobol_vs_shapley_scatter_fc.png",
        "covariates/fc": "sobol_vs_shapley_covariates_fc.png",
        "decay": "sobol_vs_shapley_decay.png",
    }
    for path in paths.values():
        pixels = matplotlib.image.imread(path)[..., :3]
        colours = np.unique(pixels.reshape(-1, 3).round(2), axis=0)
        assert pixels.std() > 0.05 and len(colours) > 20, path.name


# ------------------------------------------------------------------------------- the command
def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def add_analysis(store: ResultsStore, name: str, *, shape: int = 8,
                 variables: list[str] = VARIABLES, layer: str = "fc", **provenance) -> None:
    """A further Sobol analysis in the file, with other provenance, variables or units."""
    rng = np.random.default_rng(1)
    maps = rng.uniform(size=(len(variables), shape))
    layers = {layer: {"S1": maps, "ST": maps}}
    if layer == "fc":
        layers["conv"] = {"S1": rng.uniform(size=(len(variables), *CONV)),
                          "ST": rng.uniform(size=(len(variables), *CONV))}
    store.write_analysis(name, AnalysisResult("sobol", variables, layers, n=16, evaluations=80),
                         attrs={**PROVENANCE, **provenance})


@pytest.mark.parametrize(("args", "message"), [
    (["--analysis", "sobol", "--other", "sobol"], "two different analyses; got 'sobol' twice"),
    (["--analysis", "sobol", "--other", "missing"], "no complete analysis 'missing'"),
    (["--analysis", "sobol", "--other", "epoch_3"],
     "'sobol' and 'epoch_3' were computed from different inputs: weights_sha256 (sobol abab"),
    (["--analysis", "sobol", "--other", "set_2"], "problem.augmentations (sobol"),
    (["--analysis", "sobol", "--other", "variables"], "have different variables: ['hue', "),
    (["--analysis", "sobol", "--other", "layers"], "have different layers: ['conv', 'fc'] and "),
    (["--analysis", "sobol", "--other", "units"],
     "have different unit shapes at layer 'fc': (8,) and (9,)"),
    (["--analysis", "sobol", "--other", "shapley", "--value_types", "[ST]"],
     "analysis 'shapley': value types ['ST'] are not all in this analysis"),
    (["--analysis", "sobol", "--other", "shapley", "--value_types", "[S1, ST, shapley]"],
     "one value type, or one per analysis"),
    (["--analysis", "sobol", "--other", "shapley", "--top", "0"], "--top must be"),
    (["--analysis", "sobol"], "name the analysis to compare 'sobol' with (--other NAME)"),
    (["--other", "shapley"], "analyze.py compare needs --analysis NAME"),
])
def test_mismatched_analyses_are_refused_and_nothing_is_written(tmp_path, capsys, args, message):
    store = write_pair(tmp_path / "results.h5")
    add_analysis(store, "epoch_3", weights_sha256="cd" * 32)
    add_analysis(store, "set_2", problem=json.dumps({"augmentations": ["hflip"],
                                                     "auxiliaries": ["class"]}))
    add_analysis(store, "variables", variables=["hue", "hflip", "image"])
    add_analysis(store, "layers", layer="head")
    add_analysis(store, "units", shape=9)
    before = digest(store.path)
    assert compare(store.path, *args) == 2
    assert message in capsys.readouterr().err
    assert digest(store.path) == before and not (tmp_path / "figures").exists()


def test_weights_are_compared_by_their_sha256(tmp_path):
    store = write_pair(tmp_path / "results.h5")
    add_analysis(store, "moved", weights="checkpoint elsewhere/last.ckpt")  # the same hash
    assert compare(store.path, "--analysis", "sobol", "--other", "moved") == 0


def test_the_other_analysis_defaults_to_the_only_one_and_overwrite_is_explicit(tmp_path, capsys):
    store = write_pair(tmp_path / "results.h5")
    assert compare(store.path, "--analysis", "shapley", "--value_types", "[S1]") == 2
    assert "analysis 'shapley': value types ['S1']" in capsys.readouterr().err
    assert compare(store.path, "--analysis", "shapley", "--value_types",
                   "[shapley, S1]") == 0
    _, attrs = read_tree(store.path, COMPARISON_GROUP, "shapley_vs_sobol")
    assert (attrs["analyses"], attrs["values"]) == (["shapley", "sobol"], ["shapley", "S1"])
    assert compare(store.path, "--analysis", "shapley") == 2
    assert "already holds /comparison/shapley_vs_sobol; pass --overwrite" in (
        capsys.readouterr().err)
    assert compare(store.path, "--analysis", "shapley", "--overwrite") == 0
    _, attrs = read_tree(store.path, COMPARISON_GROUP, "shapley_vs_sobol")
    assert attrs["values"] == ["shapley_normalized", "ST"] and attrs["top"] == 20
    assert len(list((tmp_path / "figures").glob("shapley_vs_sobol_*.png"))) == 5


def test_the_command_prints_the_correlations_and_the_figures(pair, capsys):
    assert cli("compare", "--results", pair.path, "--analysis", "sobol", "--overwrite",
               "--no_progress", "--wandb", "false") == 0
    printed = capsys.readouterr().out
    tree, _ = read_tree(pair.path, COMPARISON_GROUP, "sobol_vs_shapley")
    rho = ", ".join(f"{v} {tree['fc']['spearman'][g, g]:.2f}" for g, v in enumerate(VARIABLES))
    assert f"  fc             {rho}" in printed
    assert "(/comparison/sobol_vs_shapley: sobol ST vs shapley shapley_normalized, 2 layers)" in (
        printed)
    assert f"{pair.path.parent / 'figures' / 'sobol_vs_shapley'}_*.png (5 PNGs" in printed


# ------------------------------------------------------------------------------- a real run
@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """Sobol and Shapley analyses of a random 32 px ResNet18 (n = 16), compared with W&B
    offline, and the report."""
    run_dir = tmp_path_factory.mktemp("compare") / "run"
    for method in ("sobol", "shapley"):
        assert cli(method, "--output", run_dir, "--n", "16", "--wandb", "false", *COMMON,
                   quiet=True) == 0
    results = run_dir / "results.h5"
    assert cli("compare", "--results", results, "--analysis", "sobol", "--no_progress",
               quiet=True) == 0
    assert cli("report", "--results", results, quiet=True) == 0
    return run_dir


@pytest.mark.slow
def test_compare_logs_the_correlations_tables_and_figures(real_run):
    records = runs_by_command(real_run)["compare"]
    (run,) = [r.run for r in records if r.HasField("run")]
    assert (run.display_name, run.job_type) == ("compare sobol", "statistics")
    (row,) = [history_row(r.history) for r in records if r.HasField("history")]
    tree, attrs = read_tree(real_run / "results.h5", COMPARISON_GROUP, "sobol_vs_shapley")
    variables = attrs["variables"]
    for layer in ("layer1", "layer4"):
        for g, variable in enumerate(variables):
            np.testing.assert_allclose(row[f"compare/{layer}/{variable}/spearman"],
                                       tree[layer]["spearman"][g, g])  # NaN: constant maps
            np.testing.assert_allclose(row[f"compare/{layer}/{variable}/spearman_positions"],
                                       tree[layer]["spearman_positions"][g, g])
        for key in (f"compare/scatter/{layer}", f"compare/covariates/{layer}"):
            assert row[key]["_type"] == "image-file", key
    assert row["compare/decay"]["_type"] == "image-file"
    assert row["compare/table"]["nrows"] == 2 * len(variables)
    assert row["compare/covariate_table"]["nrows"] == 2 * 2 * len(variables) * len(COVARIATES)
    figures = sorted(p.name for p in (real_run / "figures").glob("sobol_vs_shapley_*.png"))
    assert len(figures) == 5


def comparison_anchor(page: str) -> str:
    (anchor,) = re.findall(r'<h2 id="(s\d+)">Comparison of sobol \(ST\) and shapley '
                           r"\(shapley_normalized\)</h2>", page)
    return anchor


@pytest.mark.slow
def test_report_shows_the_comparison_sections(real_run):
    report = real_run / "report"
    page = re.sub(r'data:image/png;base64,[^"]*', "", (report / "index.html").read_text())
    comparison_anchor(page)
    for heading in ("Maps against mean, variance and CV (sobol_vs_shapley)",
                    "Decay of the largest values (sobol_vs_shapley)"):
        assert f">{heading}</h3>" in page
    tree, _ = read_tree(real_run / "results.h5", COMPARISON_GROUP, "sobol_vs_shapley")
    cells = "".join(f"<td>{tree['layer4']['spearman'][g, g]:.2f}</td>".replace("nan", "n/a")
                    for g in range(len(tree["layer4"]["spearman"])))
    assert f"<td class=l>layer4</td><td>{int(tree['layer4']['valid_units'])}</td>{cells}" in page
    spatial = f"<td>{tree['layer1']['spearman'][0, 0]:.2f}<br><small>by position "
    assert spatial in page
    for name in ("spearman", "scatter_layer1", "scatter_layer4", "covariates_layer1",
                 "covariates_layer4", "decay"):
        assert (report / f"sobol_vs_shapley_{name}.png").is_file()
        assert f"(sobol_vs_shapley_{name}.png)</figcaption>" in page


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="headless Chromium (Debian package chromium) is not installed")
def test_report_comparison_renders_in_headless_chromium(real_run, tmp_path):
    index = real_run / "report" / "index.html"

    def chromium(*args: str) -> str:
        done = subprocess.run(
            ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args,
             index.as_uri()],
            capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        console = [line for line in done.stderr.splitlines() if "CONSOLE" in line]
        assert not console, console
        return done.stdout

    dom = chromium("--dump-dom")
    assert f'<h2 id="{comparison_anchor(dom)}">' in dom
    assert dom.count('alt="sobol_vs_shapley') == 6  # matrix, 2 scatters, 2 covariates, decay
    # The whole page in one tall window: the comparison closes it, the decay figure last.
    shot = tmp_path / "page.png"
    height = 24000
    chromium(f"--screenshot={shot}", f"--window-size=1280,{height}", "--hide-scrollbars")
    pixels = matplotlib.image.imread(shot)[..., :3]
    drawn = np.flatnonzero((pixels < 0.95).any(axis=(1, 2)))
    assert pixels.shape[:2] == (height, 1280) and drawn[-1] < height - 100  # all of the page
    assert pixels[drawn[-1] - 500:drawn[-1]].std() > 0.05  # the decay curves are drawn
