"""analyze.py report: one self-contained static HTML page plus its PNGs.

The results file comes from real runs (a Sobol analysis with full layer1 maps and a contrast
analysis with stored activations, 32 px ResNet18) and the statistics commands, plus masking and
single-class groups in their stored layout. The page is parsed, its embedded images decoded,
and it is opened in headless Chromium (Debian package ``chromium``; the test skips where it is
not installed) and checked to render without console errors. A synthetic Sobol result with
flagged units checks that the spread tables are over the valid units only.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

import analyze
from sensitivity.html_report import top_units
from sensitivity.masking import GROUP_KIND as MASKING_GROUP
from sensitivity.masking import MaskingResult
from sensitivity.results import AnalysisResult
from sensitivity.single_class import GROUP_KIND as SINGLE_CLASS_GROUP
from sensitivity.single_class import ChanceThreshold, SingleClassResult
from sensitivity.stats import read_tree
from sensitivity.store import ResultsStore

COMMON = [
    "--n", "8", "--data.image_size", "32", "--images-per-class", "2", "--small_input", "false",
    "--layers", json.dumps(["layer1", "fc"]), "--reduction", "{layer1: none}",
    "--accelerator", "cpu", "--no_progress",
]
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--enable-logging=stderr", "--v=0",
]
VARIABLES = ["erasing", "sharpness", "rolling", "grayscale", "gaussian_blur"]


def write_masking_group(store: ResultsStore) -> None:
    """A masking result of the sobol analysis, in the masking module's stored layout."""
    rng = np.random.default_rng(0)
    inputs, configurations = ["original", *VARIABLES[:3]], ["q0.5 a0", "q0.9 a0", "soft"]
    store.write_result(MASKING_GROUP, "sobol_masking", MaskingResult(
        value="S1", analysis="sobol", inputs=inputs, variables=VARIABLES[:3],
        configurations=configurations, layers=["layer1"], quantiles=[0.5, 0.9],
        acc1=rng.uniform(size=(4, 3, 3)), acc5=rng.uniform(size=(4, 3, 3)),
        unmasked_acc1=np.full(4, 0.5), unmasked_acc5=np.ones(4),
        masked_fraction=np.full((3, 2, 1), 0.3), tied=np.zeros((3, 2, 1), dtype=bool),
        ties="strict", top_k=4, n_images=8, k=2, seed=0, prefix_reuse="fx",
    ))


def write_single_class_group(store: ResultsStore) -> None:
    """A single-class result of the sobol analysis, in the single-class module's layout."""
    threshold = ChanceThreshold(threshold=0.0081, mean=0.002, standard_error=1e-5, n_classes=4,
                                samples_per_class=2, n=2, trials=1000, seed=0)
    store.write_result(SINGLE_CLASS_GROUP, "sobol", SingleClassResult(
        value="S1", analysis="sobol", layer="fc", variables=VARIABLES[:2],
        configurations=["q0.5 a0", "soft"], class_names=["c0", "c1", "c2", "c3"], n=2,
        candidates=np.array([[0, 2], [1, 3]]), candidate_scores=np.full((2, 2), 0.5),
        jaccard=np.array([[0.41, 0.2], [0.002, 0.001]]), jaccard_original=np.full(2, 0.1),
        jaccard_augmented=np.full(2, 0.2), threshold=threshold, n_images=8, k=2, seed=0,
        ties="strict", prefix_reuse="fx",
    ))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report_run")
    results = str(out / "results.h5")
    assert analyze.main(["sobol", "--output", str(out), *COMMON]) == 0
    assert analyze.main(["contrast", "--output", str(out), "--contrast_k", "2",
                         "--store-activations", *COMMON]) == 0
    for args in (["contrast-stats", "--analysis", "contrast"],
                 ["correlation", "--analysis", "sobol"],
                 ["lda", "--analysis", "sobol", "--repeats", "1"]):
        assert analyze.main([*args, "--results", results]) == 0
    store = ResultsStore(results)
    write_masking_group(store)
    write_single_class_group(store)
    assert analyze.main(["report", "--results", results]) == 0
    return out


def images(page: str) -> list[bytes]:
    sources = re.findall(r'<img src="([^"]*)"', page)
    prefix = "data:image/png;base64,"
    assert sources and all(s.startswith(prefix) for s in sources)
    return [base64.b64decode(s[len(prefix):], validate=True) for s in sources]


@pytest.mark.slow
def test_report_is_one_self_contained_page_with_every_section(run):
    index = run / "report" / "index.html"
    page = index.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # Nothing to fetch: no script, no external style, link or image; only data URIs.
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert set(re.findall(r'(?:src|href)="([a-z]+):', page)) == {"data"}
    embedded = images(page)
    pngs = sorted((run / "report").glob("*.png"))
    assert sorted(embedded) == sorted(p.read_bytes() for p in pngs)  # each PNG next to it
    for data in embedded:
        assert matplotlib.image.imread(io.BytesIO(data), format="png").ndim == 3
    names = {p.name for p in pngs}
    for name in ("sobol_heatmap_S1.png", "sobol_heatmap_ST.png", "contrast_heatmap_effect_size.png",
                 "sobol_specialised_S1_layer1.png", "sobol_correlation_S1.png",
                 "sobol_covariates_ST.png", "sobol_lda_confusion_S1.png",
                 "masking_sobol_masking_specificity.png"):
        assert name in names
    for heading in ("Analysis sobol (sobol)", "Analysis contrast (contrast)",
                    "Most specialised units (S1)", "Wilcoxon signed-rank tests (contrast)",
                    "Spearman correlation between maps (sobol)",
                    "Linear discriminant analysis (sobol)",
                    "Guided masking sobol_masking (S1 maps of sobol)",
                    "Single-class analysis sobol (S1 maps of sobol)"):
        assert f">{heading}</h" in page, heading
    # Values of the statistics groups appear in the tables.
    lda, _ = read_tree(run / "results.h5", "lda", "sobol")
    assert f"<td>{lda['layer1']['S1']['accuracy'].mean():.3f}</td>" in page
    wilcoxon, _ = read_tree(run / "results.h5", "wilcoxon", "contrast")
    assert f"<td>{int(wilcoxon['fc']['n_significant'][0])}/4 (r=" in page
    assert "<td class=l>c0, c2</td>" in page and "threshold 0.00810" in page
    assert "<td>q0.5 a0, soft</td>" in page and "<td>none</td>" in page  # matched or not
    # The fully connected head has no spatial maps: its top units are a table.
    assert re.search(r"<td class=l>fc</td><td class=l>erasing</td><td class=l>#\d", page)
    # Spread over valid units, how the half-widths were computed, what the indices rest on.
    sobol = ResultsStore(run / "results.h5").read_analysis("sobol")
    assert sobol.interval and f"Half-widths: {sobol.interval}." in page
    assert "<th>valid units</th>" in page and ">S1 over valid units</h3>" in page
    assert "<th>base points where it changes (of 8)</th>" in page


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="headless Chromium (Debian package chromium, installed by .ci/run) "
                           "is not installed on this machine")
def test_report_renders_in_headless_chromium_without_console_errors(run, tmp_path):
    index = run / "report" / "index.html"
    shot = tmp_path / "page.png"

    def chromium(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(
            ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args,
             index.as_uri()],
            capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        # Page console output (errors, failed resources, exceptions) is logged as CONSOLE.
        console = [line for line in done.stderr.splitlines() if "CONSOLE" in line]
        assert not console, console
        return done

    dom = chromium("--dump-dom").stdout
    assert "<h1>Augmentation sensitivity report" in dom
    assert dom.count("<img ") == index.read_text().count("<img ") > 10
    chromium(f"--screenshot={shot}", "--window-size=1280,1600", "--hide-scrollbars")
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1600, 1280) and pixels[..., :3].std() > 0.05  # not blank


def test_report_of_an_analysis_without_statistics(tmp_path, capsys):
    results = tmp_path / "results.h5"
    store = ResultsStore(results)
    store.write_metadata(model="resnet18", dataset="synthetic", image_size=32, seed=0)
    rng = np.random.default_rng(0)
    effects = rng.uniform(size=(2, 6)) * 1e4  # variance units: any magnitude
    store.write_analysis("shapley", AnalysisResult(
        "shapley", ["hue", "hflip"],
        {"layer2": {"shapley_normalized": rng.uniform(size=(2, 6)), "shapley": effects}},
        n=8, evaluations=24,
    ))
    out = tmp_path / "html"
    assert analyze.main(["report", "--results", str(results), "--output", str(out)]) == 0
    assert str(out / "index.html") in capsys.readouterr().out
    page = (out / "index.html").read_text()
    assert "Most specialised units (shapley_normalized)" in page
    assert "Spearman" not in page and "Wilcoxon" not in page and "masking" not in page
    assert "Second-order" not in page and "where it changes" not in page  # no S2, no toggles
    # Every unit valid; effects in variance units keep three significant digits.
    assert '<td><span title="0 constant, 0 unsupported, 0 negligible">100% (6/6)</span>' in page
    median, p10, p90 = np.percentile(effects[1], [50, 10, 90])
    assert (f"<td>{median:.3g} [{p10:.3g}, {p90:.3g}]<br><small>mean {effects[1].mean():.3g}"
            f"</small></td></tr></table>") in page  # no half-widths recorded: no ±
    assert len(images(page)) == len(list(out.glob("*.png"))) == 2


@pytest.mark.slow
def test_report_bad_input_writes_nothing(run, tmp_path, capsys):
    out = tmp_path / "report"
    code = analyze.main(["report", "--results", str(run / "results.h5"), "--analysis",
                         "missing", "--output", str(out)])
    assert code == 2 and not out.exists()
    assert "no complete analysis ['missing']" in capsys.readouterr().err
    code = analyze.main(["report", "--results", str(tmp_path / "none.h5"), "--output", str(out)])
    assert code == 2 and not out.exists() and "no results file" in capsys.readouterr().err


def without_images(page: str) -> str:
    """The page's text without its base64 PNGs (which may contain any digit sequence)."""
    return re.sub(r'data:image/png;base64,[^"]*', "", page)


def flagged_sobol_result() -> AnalysisResult:
    """A Sobol result with second order whose flagged units hold an absurd raw value (1e9).

    "fc": 5 units, unit 4 unsupported; "conv": (2, 1, 2) units, one position negligible;
    "dead": 3 units, all constant.
    """
    rng = np.random.default_rng(1)
    huge = 1e9

    def layer(shape: tuple[int, ...], flagged: np.ndarray) -> dict[str, np.ndarray]:
        values = {
            "S1": rng.uniform(0.05, 0.5, size=(2, *shape)),
            "ST": rng.uniform(0.5, 0.95, size=(2, *shape)),
            "S1_conf": rng.uniform(0.02, 0.1, size=(2, *shape)),
            "ST_conf": rng.uniform(0.02, 0.1, size=(2, *shape)),
            "S2": rng.uniform(0.02, 0.3, size=(2, 2, *shape)),
            "S2_conf": rng.uniform(0.02, 0.1, size=(2, 2, *shape)),
        }
        for array in values.values():
            array[..., flagged] = huge
        return values

    fc_flags = np.array([0, 0, 0, 0, 2], dtype=np.uint8)
    conv_flags = np.array([[[0, 3]], [[0, 0]]], dtype=np.uint8)
    return AnalysisResult(
        "sobol", ["hue", "hflip"],
        {"fc": layer((5,), fc_flags > 0), "conv": layer((2, 1, 2), conv_flags > 0),
         "dead": layer((3,), np.ones(3, dtype=bool))},
        n=64, evaluations=256,
        flags={"fc": fc_flags, "conv": conv_flags, "dead": np.ones(3, dtype=np.uint8)},
        interval="delta method over base points, normal quantile (assumes i.i.d. points)",
        toggles={"hue": 12, "hflip": 40},
    )


def expected_cell(values: np.ndarray, conf: np.ndarray) -> str:
    """The spread cell of ``values`` (valid units only), computed here from the raw values."""
    return (f"{np.median(values):.3f} [{np.percentile(values, 10):.3f}, "
            f"{np.percentile(values, 90):.3f}]<br><small>mean {values.mean():.3f}, "
            f"±{np.median(conf):.3f}</small>")


def test_report_spread_is_over_valid_units_only(tmp_path):
    result = flagged_sobol_result()
    store = ResultsStore(tmp_path / "results.h5")
    store.write_metadata(model="resnet18", dataset="synthetic", image_size=32, seed=0)
    store.write_analysis("sobol", result)
    out = tmp_path / "html"
    assert analyze.main(["report", "--results", str(store.path), "--output", str(out)]) == 0
    text = without_images((out / "index.html").read_text())
    fc, conv = result.layers["fc"], result.layers["conv"]
    conv_valid = result.valid("conv")
    for key in ("S1", "ST"):
        for g in range(2):
            assert expected_cell(fc[key][g, :4], fc[f"{key}_conf"][g, :4]) in text, (key, g)
            assert expected_cell(conv[key][g][conv_valid],
                                 conv[f"{key}_conf"][g][conv_valid]) in text, (key, g)
    # The flagged raw values neither appear nor shift any statistic.
    assert "e+0" not in text and "1000000000" not in text
    # Each layer's share of valid units, with the reasons of the others as a tooltip.
    assert ('<td><span title="0 constant, 1 unsupported, 0 negligible">80% (4/5)</span></td>'
            in text)
    assert '<td><span title="0 constant, 0 unsupported, 1 negligible">75% (3/4)</span>' in text
    assert '<td><span title="3 constant, 0 unsupported, 0 negligible">0% (0/3)</span>' in text
    assert "n/a [n/a, n/a]" in text  # the all-constant layer has no statistic
    # Second order: the figure and the table of the pair.
    assert ">Second-order indices S2</h3>" in text and "sobol_S2.png" in text
    assert (out / "sobol_S2.png").is_file()
    pair = expected_cell(fc["S2"][0, 1, :4], fc["S2_conf"][0, 1, :4])
    assert f"<td class=l>hue:hflip</td><td>{pair}</td>" in text
    # What the statistics are over, the interval kind and the toggle counts.
    assert "excluded here but kept, with their raw values and flags, in the results file" in text
    assert f"Half-widths: {result.interval}." in text
    assert "<th>base points where it changes (of 64)</th>" in text
    assert "<td class=l>hue</td><td>12</td><td>fewer than 16: too few terms" in text
    assert "<td class=l>hflip</td><td>40</td><td></td>" in text
    # Rankings skip flagged units: unit 4 of fc never ranks, the dead layer has none.
    for g, variable in enumerate(result.group_names):
        scores = fc["S1"][g, :4]
        ranked = ", ".join(f"#{u} ({scores[u]:.3f})" for u in np.argsort(-scores)[:3])
        assert f"<td class=l>fc</td><td class=l>{variable}</td><td class=l>{ranked}</td>" in text
    assert "<td class=l>dead</td><td class=l>hue</td><td class=l>no valid unit</td>" in text


def test_top_units_rank_missing_scores_last():
    scores = np.array([[0.1, np.nan, 0.3, 0.3], [np.nan, np.nan, -1.0, 2.0]])
    assert top_units(scores, 3).tolist() == [[2, 3, 0], [3, 2, 0]]
