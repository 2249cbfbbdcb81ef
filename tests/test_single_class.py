"""Single-class analysis: chance thresholds, Jaccard indices, self-masking plumbing, the CLI."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import helpers
import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from lightning_modules import ImageClassifier
from sensitivity.estimators import FLAG_CONSTANT, FLAG_UNSUPPORTED
from sensitivity.masking import MaskConfig, ProbeInputs, layer_output_shapes, sensitivity_maps
from sensitivity.problem import AugmentationProblem
from sensitivity.results import AnalysisResult
from sensitivity.single_class import (
    GROUP_KIND,
    SingleClassResult,
    candidate_classes,
    chance_threshold,
    evaluate_single_class,
    jaccard,
)
from sensitivity.store import ResultsStore

SIZE = 32
# One intra-op thread: two threads per process oversubscribe a few shared cores.
pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.mark.parametrize(("classes", "samples", "published"), [(1000, 50, 0.00300),
                                                               (365, 100, 0.00806)])
def test_chance_threshold_matches_the_published_values(classes, samples, published):
    t = chance_threshold(classes, samples, n=5, trials=100_000, seed=0)
    # Published to 5 decimals (half a unit: 5e-6) from 10^7 simulated experiments (their own
    # Monte Carlo error is negligible); ours carries a Monte Carlo error of t.standard_error.
    assert abs(t.threshold - published) <= 5e-6 + 4 * t.standard_error
    assert 0 < t.standard_error < 1e-5
    # The simulated mean against the exact expectation E[k / (2n - k)], k ~ Hypergeom(C, 5, 5).
    k = np.arange(6)
    pmf = scipy.stats.hypergeom(classes, 5, 5).pmf(k)
    j = k / (10 - k)
    expected, variance = pmf @ j, pmf @ j**2 - (pmf @ j) ** 2
    assert abs(t.mean - expected) <= 4 * np.sqrt(variance / (classes * samples) / 100_000)
    assert chance_threshold(classes, samples, seed=0, trials=100_000) == t  # deterministic


def test_chance_threshold_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n = 5 candidate classes out of 4"):
        chance_threshold(4, 10, n=5)
    with pytest.raises(ValueError, match="samples_per_class"):
        chance_threshold(10, 0)


def test_jaccard_and_candidates():
    candidates = torch.zeros(10, dtype=torch.bool)
    candidates[[1, 2, 3]] = True
    top = torch.tensor([[1, 2, 3], [3, 4, 5], [7, 8, 9], [2, 1, 0]])
    torch.testing.assert_close(jaccard(top, candidates),
                               torch.tensor([1.0, 1 / 5, 0.0, 2 / 4], dtype=torch.float64))
    maps = np.array([[0.1, 0.5, 0.5, 0.2], [0.9, 0.0, 0.3, 0.3]])
    classes, values = candidate_classes(maps, 2)
    np.testing.assert_array_equal(classes, [[1, 2], [0, 2]])  # ties: lower class first
    np.testing.assert_array_equal(values, [[0.5, 0.5], [0.9, 0.3]])


def test_candidates_are_valid_classes_only():
    rng = np.random.default_rng(1)
    st = rng.uniform(0.1, 0.8, size=(2, 6))
    st[:, 4] = 1e9  # flagged, and what it clips to (1) would lead every ranking
    st[:, 1] = -25.0
    flags = np.zeros(6, dtype=np.uint8)
    flags[4], flags[1] = FLAG_UNSUPPORTED, FLAG_CONSTANT
    result = AnalysisResult("sobol", ["hue", "hflip"], {"fc": {"ST": st}}, n=8, evaluations=32,
                            flags={"fc": flags})
    maps, valid = sensitivity_maps(result, "ST", ["fc"])
    assert result.layers["fc"]["ST"][0, 4] == 1e9 and maps["fc"][0, 4] == 1.0
    classes, values = candidate_classes(maps["fc"], 3, valid["fc"])
    expected = np.argsort(-np.where(flags == 0, st, -np.inf), axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(classes, expected)
    np.testing.assert_array_equal(values, np.take_along_axis(st, expected, axis=1))
    assert not np.isin(classes, [1, 4]).any()
    assert (candidate_classes(maps["fc"], 3)[0][:, 0] == 4).all()  # unflagged: class 4 first
    with pytest.raises(ValueError, match="only 4 of 6 classes"):
        candidate_classes(maps["fc"], 5, valid["fc"])


class SmallNet(nn.Module):
    """(B, 3, 32, 32) -> 6 logits; ``features.1`` and ``features.4`` are the masked ReLUs."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def test_self_masking_jaccard_equals_a_direct_computation():
    torch.manual_seed(0)
    net = SmallNet().eval()
    with torch.no_grad():
        net.fc.bias.copy_(torch.tensor([0.0, 3.0, 1.0, 2.0, -1.0, 0.5]))
    layers = ["features.1", "features.4"]
    variables = ["hue", "hflip", "class"]
    shapes = layer_output_shapes(net, layers, (SIZE, SIZE))
    # All-zero maps: the strict quantile masks select nothing, "soft_inverse" multiplies by 1
    # (both leave the network as it is), "soft" multiplies by 0: the logits become the bias.
    maps = {layer: np.zeros((3, *shape)) for layer, shape in shapes.items()}
    head = np.array([[0.9, 0.1, 0.8, 0.0, 0.2, 0.3],      # hue: candidates 0, 2
                     [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],      # hflip: candidates 5, 4
                     [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    images = torch.rand(12, 3, SIZE, SIZE)
    labels = torch.arange(6).repeat_interleave(2)
    out = evaluate_single_class(net, maps, variables, head, images, labels, n=2, k=2, seed=3,
                                class_names=list("abcdef"), trials=2000)
    assert out.variables == ["hue", "hflip"] and out.configurations[-2:] == ["soft",
                                                                             "soft_inverse"]
    assert out.candidate_names.tolist() == [["a", "c"], ["f", "e"]]
    inputs = ProbeInputs(images, labels, ["hue", "hflip"], k=2, seed=3)
    with torch.no_grad():
        sets = inputs.batch(0, 12, torch.device("cpu"), torch.float32)
        for v, classes in enumerate(out.candidates):
            candidates = torch.zeros(6, dtype=torch.bool)
            candidates[torch.as_tensor(classes)] = True
            original = jaccard(net(sets[0][0]).topk(2).indices, candidates).mean()
            augmented = jaccard(net(sets[1 + v][0]).topk(2).indices, candidates).mean()
            assert out.jaccard_original[v] == pytest.approx(float(original), abs=1e-12)
            assert out.jaccard_augmented[v] == pytest.approx(float(augmented), abs=1e-12)
            unchanged = [c for c in range(17) if c != 15]  # every mask but "soft"
            np.testing.assert_allclose(out.jaccard[v, unchanged], float(augmented), atol=1e-12)
            # soft: top-2 of the bias = classes 1 and 3, none of them a candidate of hue or hflip
            assert out.jaccard[v, 15] == 0.0
    assert out.threshold.n_classes == 6 and out.threshold.samples_per_class == 2
    assert out.matched.shape == (2, 17)
    np.testing.assert_array_equal(out.matched, out.jaccard > out.threshold.threshold)

    # Class 0 (hue's top class) and class 5 (hflip's) flagged: the next valid classes stand in.
    head_valid = np.array([False, True, True, True, True, False])
    valid = {layer: np.ones(shape, dtype=bool) for layer, shape in shapes.items()}
    flagged = evaluate_single_class(net, maps, variables, head, images, labels, n=2, k=2,
                                    seed=3, configurations=[MaskConfig("soft")], trials=2000,
                                    valid=valid, head_valid=head_valid)
    np.testing.assert_array_equal(flagged.candidates, [[2, 4], [4, 3]])
    np.testing.assert_array_equal(flagged.candidate_scores, [[0.8, 0.2], [0.4, 0.3]])
    with torch.no_grad():
        for v, classes in enumerate(flagged.candidates):
            candidates = torch.zeros(6, dtype=torch.bool)
            candidates[torch.as_tensor(classes)] = True
            augmented = jaccard(net(sets[1 + v][0]).topk(2).indices, candidates).mean()
            assert flagged.jaccard_augmented[v] == pytest.approx(float(augmented), abs=1e-12)


def test_single_class_gives_its_image_forwards_up_front_then_plain_lines(capsys):
    torch.manual_seed(0)
    net = SmallNet().eval()
    layers = ["features.1", "features.4"]
    maps = {layer: np.full((3, *shape), 0.5)
            for layer, shape in layer_output_shapes(net, layers, (SIZE, SIZE)).items()}
    head = np.arange(18, dtype=np.float64).reshape(3, 6) % 5
    images, labels = torch.rand(12, 3, SIZE, SIZE), torch.arange(6).repeat_interleave(2)

    def evaluate(**options):
        return evaluate_single_class(net, maps, ["hue", "hflip", "class"], head, images, labels,
                                     n=2, k=2, configurations=[MaskConfig("soft")],
                                     trials=2000, **options)

    evaluate()
    lines = capsys.readouterr().err.splitlines()
    # 12 originals once; 2 draws x 12 images per augmentation, unmasked and soft-masked: 2 x 48.
    assert lines[0] == (
        "single-class: 108 image forwards (12 probe images: the originals unmasked, and 2 draws "
        "of each of 2 augmentations, unmasked and under that augmentation's 1 mask "
        "configurations)"
    )
    assert re.fullmatch(r"single-class: 108/108 image forwards \(100%\), [\d.]+/s, done in .+",
                        lines[-1])
    assert all(re.match(r"single-class: \d+/108 image forwards", line) for line in lines[1:])
    evaluate(progress=False)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------- the CLI
def write_results(path: Path, layers: list[str]) -> Path:
    """A results file with a Sobol analysis "sobol" of random maps of ResNet18's ``layers``;
    class 0 of the head ("fc") flagged with the raw ST 1e9."""
    model = ImageClassifier("resnet18", num_classes=4, small_input=False, image_size=SIZE)
    problem = AugmentationProblem(["hue", "hflip"], auxiliaries=("class", "image"), n_classes=4,
                                  images_per_class=2)
    g, rng = len(problem.groups), np.random.default_rng(0)
    maps = {layer: {"ST": rng.random((g, *shape))}
            for layer, shape in layer_output_shapes(model, layers, (SIZE, SIZE)).items()}
    flags = {}
    if "fc" in maps:
        maps["fc"]["ST"][:, 0] = 1e9
        flags["fc"] = np.array([FLAG_UNSUPPORTED, 0, 0, 0], dtype=np.uint8)
    store = ResultsStore(path)
    store.write_metadata(model="resnet18", dataset="planted:colour", image_size=SIZE, seed=0,
                         problem=problem)
    store.write_analysis("sobol", AnalysisResult("sobol", problem.group_names, maps, n=8,
                                                 evaluations=48, flags=flags))
    return path


def cli(checkpoint: Path, results: Path, *args: str) -> int:
    """``analyze.py single-class`` of ``results`` with the small probe settings of this module."""
    return helpers.cli(
        "single-class", "--checkpoint", checkpoint, "--results", results,
        "--analysis", "sobol", "--data.image_size", SIZE, "--images-per-class", "2",
        "--small_input", "false", "--accelerator", "cpu", "--masking.k", "1", *args,
    )


@pytest.mark.slow
def test_cli_single_class_and_its_bad_input(checkpoint, tmp_path, capsys):
    results = write_results(tmp_path / "results.h5", ["layer1", "layer4", "fc"])
    assert cli(checkpoint, results, "--single_class.n", "2") == 0
    printed = capsys.readouterr().out
    out = ResultsStore(results).read_result(SingleClassResult, GROUP_KIND, "sobol")
    assert out.variables == ["hue", "hflip"] and out.layer == "fc" and out.n == 2
    assert out.class_names == ["red", "green", "blue", "yellow"]
    assert out.jaccard.shape == (2, 17) and out.threshold.samples_per_class == 2
    assert not np.any(out.candidates == 0)  # flagged: its raw 1e9 is no sensitivity
    for name in out.candidate_names[0]:
        assert name in printed
    assert f"threshold {out.threshold.threshold:.5f}" in printed

    before = hashlib.sha256(results.read_bytes()).hexdigest()
    assert cli(checkpoint, results, "--single_class.n", "4", "--overwrite") == 2
    assert "n = 4 candidate classes out of 4" in capsys.readouterr().err
    no_head = write_results(tmp_path / "no_head" / "results.h5", ["layer1", "layer4"])
    no_head_before = hashlib.sha256(no_head.read_bytes()).hexdigest()
    assert cli(checkpoint, no_head, "--single_class.n", "2") == 2
    assert "no maps of the classification layer 'fc'" in capsys.readouterr().err
    assert hashlib.sha256(results.read_bytes()).hexdigest() == before
    assert hashlib.sha256(no_head.read_bytes()).hexdigest() == no_head_before
