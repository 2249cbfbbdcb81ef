"""Masking profiles beyond top-1 and their hierarchical clustering (METHOD.md section 8).

A tiny deterministic network, a linear classifier on the channel means of its input (the
masked layer "features" is the identity), makes every masked prediction computable by hand:
masking channel c by alpha scales its mean by alpha. Per-class accuracies and confusion
matrices of every configuration are checked against that recomputation (numpy, float64) on the
very inputs the evaluation used; the linkage against scipy on the stored profiles; the
dendrogram by what its figure draws; ``analyze.py masking`` and the HTML report end to end on a
real Sobol analysis.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import h5py
import matplotlib.image
import numpy as np
import pytest
import scipy.cluster.hierarchy
import scipy.spatial.distance
import scipy.stats
import torch
from helpers import cli, fork_ranks
from torch import nn

from callbacks.masking import masking_record
from sensitivity import report
from sensitivity.masking import (
    GROUP_KIND,
    MaskConfig,
    MaskingResult,
    ProbeInputs,
    check_clustering,
    cluster_masking,
    cluster_profiles,
    default_configurations,
    evaluate_masking,
    specificity_matrix,
)
from sensitivity.masking.clustering import spearman_distance
from sensitivity.masking.figures import dendrogram_figure, save_dendrogram
from sensitivity.results import AnalysisResult
from sensitivity.store import ResultsStore

CLASSES, PER_CLASS, SIZE = 3, 4, 8
VARIABLES = ["a", "b"]
# One map per variable over the 3 channels of "features": a ranks channel 0 first, b channel 2.
MAPS = {"features": np.array([[0.9, 0.5, 0.1], [0.1, 0.2, 0.8]])}
AUGMENTATIONS = ["erasing"]


class ChannelMeanClassifier(nn.Module):
    """logits = W mean_hw(features(x)) + b, ``features`` the identity (the masked layer)."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray) -> None:
        super().__init__()
        self.features = nn.Identity()
        self.head = nn.Linear(3, len(bias))
        with torch.no_grad():
            self.head.weight.copy_(torch.as_tensor(weight))
            self.head.bias.copy_(torch.as_tensor(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def tiny_problem() -> tuple[ChannelMeanClassifier, torch.Tensor, torch.Tensor]:
    """The classifier (W near the identity: class c is the brightest channel) and 4 images per
    class whose channel c is brighter than the others."""
    rng = np.random.default_rng(0)
    weight = np.eye(3) + 0.1 * rng.normal(size=(3, 3))
    bias = 0.02 * rng.normal(size=3)
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    generator = torch.Generator().manual_seed(1)
    images = 0.4 * torch.rand(len(labels), 3, SIZE, SIZE, generator=generator)
    images[torch.arange(len(labels)), labels] += 0.45
    return ChannelMeanClassifier(weight, bias).eval(), images, labels


def config_factor(config: MaskConfig, values: np.ndarray) -> np.ndarray:
    """The factor of each channel under ``config`` (METHOD.md section 8), by hand: quantile
    masks multiply the channels at or above the q-quantile by alpha (the values are distinct and
    q >= 0.5, so no tie), soft masks multiply by M or 1 - M."""
    if config.kind == "soft":
        return values
    if config.kind == "soft_inverse":
        return 1.0 - values
    return np.where(values >= np.quantile(values, config.q), config.alpha, 1.0)


def by_hand(net: ChannelMeanClassifier, x: torch.Tensor, labels: torch.Tensor,
            factor: np.ndarray) -> tuple[np.ndarray, float]:
    """(confusion (C, C) int64, smallest top-2 logit margin) of the masked classifier."""
    means = x.double().mean(dim=(2, 3)).numpy() * factor
    logits = means @ net.head.weight.detach().double().numpy().T + net.head.bias.detach().numpy()
    top2 = np.sort(logits, axis=1)[:, -2:]
    confusion = np.zeros((CLASSES, CLASSES), dtype=np.int64)
    np.add.at(confusion, (labels.numpy(), logits.argmax(axis=1)), 1)
    return confusion, float((top2[:, 1] - top2[:, 0]).min())


def tiny_run(**options) -> MaskingResult:
    net, images, labels = tiny_problem()
    return evaluate_masking(net, MAPS, VARIABLES, images, labels, AUGMENTATIONS, k=2, seed=0,
                            batch_images=5, progress=False, **options)


def test_per_class_accuracy_and_confusion_equal_a_by_hand_recomputation():
    net, images, labels = tiny_problem()
    out = tiny_run(class_names=["red", "green", "blue"])
    configs = default_configurations()
    assert out.confusion.shape == (2, 2, 17, CLASSES, CLASSES)
    assert out.class_acc1.shape == (2, 2, 17, CLASSES) and out.classes == ["red", "green", "blue"]
    # The evaluation's inputs: each image as it is, and k = 2 erasing draws of it.
    sets = ProbeInputs(images, labels, AUGMENTATIONS, k=2, seed=0).batch(
        0, len(labels), torch.device("cpu"), torch.float32)
    changed = 0
    for i, (x, y) in enumerate(sets):
        expected, margin = by_hand(net, x, y, np.ones(3))
        np.testing.assert_array_equal(out.unmasked_confusion[i], expected)
        np.testing.assert_array_equal(out.class_images[i], np.bincount(y.numpy()))
        for v in range(len(VARIABLES)):
            for c, config in enumerate(configs):
                confusion, gap = by_hand(net, x, y, config_factor(config, MAPS["features"][v]))
                margin = min(margin, gap)
                np.testing.assert_array_equal(out.confusion[i, v, c], confusion)
                np.testing.assert_array_equal(out.class_acc1[i, v, c],
                                              np.diag(confusion) / confusion.sum(axis=1))
                assert out.acc1[i, v, c] == pytest.approx(np.trace(confusion) / len(y))
                changed += not np.array_equal(confusion, expected)
        assert margin > 1e-5  # no near-tie that float32 round-off could decide otherwise
    assert changed >= 3 * len(sets)  # masks change predictions in many configurations
    # Zeroing the channel a ranks first (q 0.9 selects channel 0 alone) fails class 0 only.
    zero_top = configs.index(MaskConfig("quantile", 0.0, 0.9))
    np.testing.assert_array_equal(out.unmasked_class_acc1[0], [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(out.class_acc1[0, 0, zero_top], [0.0, 1.0, 1.0])


def test_richer_profiles_give_the_specificity_where_top1_is_constant():
    # Masking swaps which class is right: top-1 stays at 0.5, per-class accuracy moves.
    acc1 = np.full((2, 1, 3), 0.5)
    class_acc1 = np.array([[[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]],
                           [[[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]]]])
    confusion = np.array([[[[[2, 0], [2, 0]], [[0, 2], [0, 2]], [[1, 1], [1, 1]]]]] * 2)
    fields = dict(
        value="ST", analysis="sobol", inputs=["original", "hue"], variables=["hue"],
        configurations=["x", "y", "z"], layers=["l"], quantiles=[0.5], acc1=acc1, acc5=acc1,
        unmasked_acc1=np.full(2, 0.5), unmasked_acc5=np.ones(2),
        masked_fraction=np.zeros((1, 1, 1)), tied=np.zeros((1, 1, 1), dtype=bool),
        ties="strict", top_k=2, n_images=4, k=1, seed=0, prefix_reuse="",
        class_acc1=class_acc1, unmasked_class_acc1=np.full((2, 2), 0.5),
        class_images=np.full((2, 2), 2), confusion=confusion,
        unmasked_confusion=confusion[:, 0, 0],
    )
    assert np.isnan(MaskingResult(**fields).specificity).all()
    per_class = MaskingResult(**fields, profile="per_class")
    assert per_class.profiles().shape == (2, 1, 6)
    np.testing.assert_allclose(per_class.specificity, [[-1.0]])  # the classes trade places
    np.testing.assert_array_equal(per_class.specificity,
                                  specificity_matrix(class_acc1.reshape(2, 1, 6)))
    rates = MaskingResult(**fields, profile="confusion")
    np.testing.assert_array_equal(rates.profiles(), confusion.reshape(2, 1, 12) / 2)
    np.testing.assert_array_equal(rates.specificity, [[1.0]])  # the same confusion rows
    with pytest.raises(ValueError, match="unknown masking profile"):
        MaskingResult(**fields, profile="top5")


def test_confusion_matrices_only_up_to_max_confusion_classes():
    out = tiny_run(max_confusion_classes=2, profile="per_class")
    assert out.confusion is None and out.class_acc1 is not None
    np.testing.assert_array_equal(out.specificity, specificity_matrix(out.profiles()))
    with pytest.raises(ValueError, match="confusion matrices"):
        out.profiles("confusion")
    with pytest.raises(ValueError, match="max_confusion_classes = 2 classes"):
        tiny_run(max_confusion_classes=2, profile="confusion")
    with pytest.raises(ValueError, match="unknown masking profile"):
        tiny_run(profile="top5")


def test_results_file_holds_the_counts_and_the_clustering(tmp_path):
    out = tiny_run(profile="per_class")
    out.clustering = cluster_masking(out)
    store = ResultsStore(tmp_path / "results.h5")
    store.write_result(GROUP_KIND, "tiny", out)
    with h5py.File(store.path, "r") as f:
        group = f["masking/tiny"]
        assert group["confusion"].dtype == np.int64 and group["class_images"].dtype == np.int64
        assert group["clustering/linkage"].shape == (3, 4)
        assert [s.decode() for s in group["clustering/labels"][()]] == [
            "original | a", "original | b", "erasing | a", "erasing | b"]
        assert group.attrs["profile"] == "per_class" and group.attrs["cluster_method"] == "average"
        assert list(group.attrs["classes"]) == ["0", "1", "2"]
    back = MaskingResult.from_group(*store.read_group("masking/tiny", nested=True))
    for key in ("class_acc1", "unmasked_class_acc1", "class_images", "confusion",
                "unmasked_confusion", "specificity"):
        np.testing.assert_array_equal(getattr(back, key), getattr(out, key), err_msg=key)
    for key in ("linkage", "clusters", "profiles", "distance"):
        np.testing.assert_array_equal(getattr(back.clustering, key), getattr(out.clustering, key))
    assert back.clustering.labels == out.clustering.labels and back.profile == "per_class"
    assert store.read_result(MaskingResult, GROUP_KIND, "tiny").clustering is None  # flat read


@pytest.mark.parametrize(("method", "metric"), [("average", "spearman"), ("ward", "euclidean"),
                                                ("complete", "euclidean")])
def test_linkage_equals_scipy_on_the_stored_profiles(tmp_path, method, metric):
    out = tiny_run(profile="confusion")
    out.clustering = cluster_masking(out, method=method, metric=metric)
    store = ResultsStore(tmp_path / "results.h5")
    store.write_result(GROUP_KIND, "tiny", out)
    with h5py.File(store.path, "r") as f:
        stored = {key: f[f"masking/tiny/clustering/{key}"][()] for key in
                  ("profiles", "linkage", "clusters", "distance")}
        threshold = float(f["masking/tiny"].attrs["cluster_threshold"])
    np.testing.assert_array_equal(stored["profiles"], out.profiles().reshape(4, -1))
    if metric == "euclidean":
        expected = scipy.cluster.hierarchy.linkage(stored["profiles"], method, metric=metric)
    else:
        rho = scipy.stats.spearmanr(stored["profiles"], axis=1).statistic
        distance = np.sqrt(1.0 - np.abs(rho))
        np.testing.assert_allclose(stored["distance"], distance, atol=1e-7)
        expected = scipy.cluster.hierarchy.linkage(
            scipy.spatial.distance.squareform(distance, checks=False), method)
    np.testing.assert_allclose(stored["linkage"], expected, rtol=1e-12, atol=1e-7)
    assert threshold == pytest.approx(0.7 * expected[:, 2].max())
    np.testing.assert_array_equal(
        stored["clusters"],
        scipy.cluster.hierarchy.fcluster(stored["linkage"], threshold, criterion="distance"))


def test_spearman_distance_of_constant_and_opposite_profiles():
    profiles = np.array([[1.0, 1.0, 1.0], [0.2, 0.2, 0.2], [1.0, 2.0, 3.0], [3.0, 2.0, 1.0],
                         [1.0, 3.0, 2.0]])
    distance = spearman_distance(profiles)
    assert distance[0, 1] == 0.0  # two constant profiles: the same (tied) ranks
    np.testing.assert_array_equal(distance[0, 2:], 1.0)  # constant vs varying: rho taken as 0
    assert distance[2, 3] == pytest.approx(0.0, abs=1e-7)  # anti-correlated counts as close
    assert distance[2, 4] == pytest.approx(np.sqrt(0.5))  # rho = 0.5
    clustering = cluster_profiles(profiles, list("vwxyz"), threshold=0.1)
    assert clustering.members() == [["v", "w"], ["x", "y"], ["z"]]


def test_clustering_options_are_checked():
    with pytest.raises(ValueError, match="assumes Euclidean distances"):
        check_clustering("ward", "spearman")
    with pytest.raises(ValueError, match="unknown cluster method"):
        check_clustering("kmeans", "euclidean")
    with pytest.raises(ValueError, match="unknown cluster metric"):
        check_clustering("average", "cosine")
    with pytest.raises(ValueError, match=">= 0"):
        check_clustering("average", "spearman", -1.0)
    with pytest.raises(ValueError, match="n >= 2"):
        cluster_profiles(np.ones((1, 3)), ["a"])


def test_dendrogram_draws_the_stored_clustering(tmp_path):
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(3, 8))
    profiles = np.repeat(centres, [3, 2, 2], axis=0) + 0.01 * rng.normal(size=(7, 8))
    labels = [f"input{i} | v{i % 3}" for i in range(7)]
    clustering = cluster_profiles(profiles, labels, metric="euclidean")
    assert clustering.count == 3
    figure = dendrogram_figure(clustering)
    (ax,) = figure.axes
    expected = scipy.cluster.hierarchy.dendrogram(clustering.linkage, labels=labels,
                                                  no_plot=True)
    assert [t.get_text() for t in ax.get_yticklabels()] == expected["ivl"]
    assert sorted(expected["ivl"]) == sorted(labels)
    (cut,) = [line for line in ax.lines if line.get_linestyle() == ":"]
    np.testing.assert_allclose(cut.get_xdata(), clustering.threshold)
    # One link colour per cluster of several profiles, grey above the cut.
    colours = {tuple(c) for collection in ax.collections for c in collection.get_colors()}
    assert len(colours) == 1 + sum(len(m) > 1 for m in clustering.members())
    assert "3 clusters" in ax.get_title() and "average linkage" in ax.get_title()
    path = save_dendrogram(clustering, tmp_path, "tiny")
    assert path == tmp_path / "tiny_masking_dendrogram.png"
    pixels = matplotlib.image.imread(path)
    width, height = figure.get_size_inches() * figure.dpi
    assert pixels.shape[:2] == (round(height), round(width))
    assert pixels[..., :3].std() > 0.05  # not blank


def test_masking_record_logs_per_class_accuracies_and_the_dendrogram(tmp_path):
    out = tiny_run(class_names=["red", "green", "blue"])
    out.clustering = cluster_masking(out)
    heatmap = report.save_specificity(out, tmp_path, "tiny")
    dendrogram = save_dendrogram(out.clustering, tmp_path, "tiny")
    record = masking_record(out, heatmap, dendrogram)
    table = record["masking/class_table"]
    assert table.columns == ["epoch", "input", "variable", "configuration", "acc1/red",
                             "acc1/green", "acc1/blue"]
    assert len(table.data) == len(record["masking/table"].data) == 2 * (1 + 2 * 17)
    assert table.data[0] == [-1, "original", "none", "none", *out.unmasked_class_acc1[0]]
    assert table.data[2] == [-1, "original", "a", "alpha=0,q=0.5", *out.class_acc1[0, 0, 0]]
    assert type(record["masking/dendrogram"]).__name__ == "Image"
    assert "masking/dendrogram" not in masking_record(out, heatmap)


# ----------------------------------------------------------------------- distributed
def _ddp_worker(rank: int, world_size: int, out: str) -> None:
    """One rank of a gloo process group: the tiny run on its shard of the images."""
    torch.set_num_threads(1)
    result = tiny_run()
    if rank == 0:
        np.savez(out, confusion=result.confusion, class_acc1=result.class_acc1,
                 class_images=result.class_images)


@pytest.mark.slow
def test_two_processes_give_the_single_process_counts(tmp_path):
    out = tmp_path / "ddp.npz"
    fork_ranks(_ddp_worker, 2, str(out))
    single, ddp = tiny_run(), np.load(out)
    for key in ("confusion", "class_acc1", "class_images"):
        np.testing.assert_array_equal(ddp[key], getattr(single, key), err_msg=key)


# ------------------------------------------------------------------ analyze.py and report
COMMON = [
    "--data.image_size", "32", "--images-per-class", "2", "--small_input", "false",
    "--accelerator", "cpu", "--no_progress", "--wandb", "false",
]
MASKING = ["--masking.k", "1", "--masking.augmentations", "[erasing]",
           "--masking.variables", "[erasing, class]", "--masking.layers", "[layer1]"]
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--enable-logging=stderr", "--v=0",
]


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory) -> tuple[Path, str]:
    """A Sobol analysis of a 32 px ResNet18 and its masking with per-class profiles; the run
    directory and what masking printed."""
    run = tmp_path_factory.mktemp("profiles_run")
    assert cli("sobol", "--output", run, "--n", "8", "--layers", json.dumps(["layer1", "fc"]),
               "--reduction", "channel_mean", *COMMON, quiet=True) == 0
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli("masking", "--results", run / "results.h5", "--analysis", "sobol",
                   "--masking.profile", "per_class", *MASKING, *COMMON) == 0
    return run, printed.getvalue()


@pytest.mark.slow
def test_cli_stores_per_class_profiles_and_their_clusters(masked_run):
    run, printed = masked_run
    out = MaskingResult.from_group(*ResultsStore(run / "results.h5").read_group(
        "masking/sobol", nested=True))
    assert out.profile == "per_class" and out.classes == ["red", "green", "blue", "yellow"]
    assert out.confusion.shape == (2, 2, 17, 4, 4) and out.class_images.tolist() == [[2] * 4] * 2
    np.testing.assert_array_equal(out.confusion.sum(axis=(-2, -1)), [[[8] * 17] * 2] * 2)
    np.testing.assert_array_equal(out.specificity, specificity_matrix(out.profiles()))
    clustering = out.clustering
    assert clustering.labels == ["original | erasing", "original | class", "erasing | erasing",
                                 "erasing | class"]
    np.testing.assert_array_equal(clustering.profiles, out.profiles().reshape(4, 68))
    dendrogram = run / "figures" / "sobol_masking_dendrogram.png"
    assert matplotlib.image.imread(dendrogram)[..., :3].std() > 0.05
    assert "specificity (Spearman of per_class profiles vs original" in printed
    assert re.search(rf"clusters        \d of 4 \(input \| mask variable\) per_class profiles "
                     rf"\(spearman, average linkage, cut at [\d.e+-]+\): {dendrogram}", printed)


@pytest.mark.slow
def test_cli_bad_profile_or_clustering_options_exit_2_and_write_nothing(masked_run, capsys):
    run, _ = masked_run
    results = run / "results.h5"
    before = hashlib.sha256(results.read_bytes()).hexdigest()
    for option, value, message in (
        ("--masking.cluster_method", "ward", "assumes Euclidean distances"),
        ("--masking.profile", "top5", "unknown masking profile 'top5'"),
        ("--masking.max_confusion_classes", "3", "max_confusion_classes = 3 classes"),
    ):
        profile = ["--masking.profile", "confusion"] if option.endswith("classes") else []
        assert cli("masking", "--results", results, "--analysis", "sobol", "--name", "bad",
                   *profile, option, value, *MASKING, *COMMON) == 2
        assert message in capsys.readouterr().err
    assert hashlib.sha256(results.read_bytes()).hexdigest() == before


@pytest.mark.slow
def test_report_shows_the_profiles_and_the_dendrogram(masked_run, tmp_path):
    run, _ = masked_run
    out = tmp_path / "report"
    assert cli("report", "--results", run / "results.h5", "--output", out, quiet=True) == 0
    index = out / "index.html"
    page = index.read_text(encoding="utf-8")
    assert ">Masking profiles and clusters (sobol)</h3>" in page
    assert "<th class=l>input</th><th>red</th><th>green</th><th>blue</th><th>yellow</th>" in page
    stored = MaskingResult.from_group(*ResultsStore(run / "results.h5").read_group(
        "masking/sobol", nested=True)).clustering
    for k, members in enumerate(stored.members(), start=1):
        assert f"<td class=l>{k}</td><td class=l>{', '.join(members)}</td>" in page
    png = out / "masking_sobol_dendrogram.png"
    encoded = base64.b64encode(png.read_bytes()).decode("ascii")
    assert f'<img src="data:image/png;base64,{encoded}"' in page
    if shutil.which("chromium") is None:
        pytest.skip("headless Chromium (Debian package chromium) is not installed")
    done = subprocess.run(
        ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
         index.as_uri()], capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not [line for line in done.stderr.splitlines() if "CONSOLE" in line]
    assert "Masking profiles and clusters (sobol)" in done.stdout
    assert f"data:image/png;base64,{encoded}" in done.stdout


def test_old_groups_without_per_class_counts_still_read(tmp_path):
    # A group in the layout before per-class counts: no class arrays, no profile attribute.
    out = tiny_run()
    store = ResultsStore(tmp_path / "results.h5")
    store.write_metadata(model="tiny", dataset="synthetic", image_size=SIZE, seed=0)
    store.write_analysis("sobol", AnalysisResult("sobol", VARIABLES,
                                                 {"features": {"ST": MAPS["features"]}},
                                                 n=8, evaluations=32))
    arrays = {key: value for key, value in out.arrays().items()
              if key not in MaskingResult._CLASS_ARRAYS}
    attrs = {key: value for key, value in out.attrs().items()
             if key not in ("profile", "classes")}
    store.write_group("masking/old", arrays, attrs)
    old = store.read_result(MaskingResult, GROUP_KIND, "old")
    assert old.class_acc1 is None and old.profile == "top1" and old.class_table() == []
    np.testing.assert_array_equal(old.specificity, out.specificity)
    with pytest.raises(ValueError, match="per-class accuracies"):
        old.profiles("per_class")
    assert cluster_masking(old).profile == "top1"
    assert cli("report", "--results", store.path, "--output", tmp_path / "html",
               quiet=True) == 0
    assert "Masking profiles" not in (tmp_path / "html" / "index.html").read_text()
