"""Inference-time suppression of a nuisance (sensitivity/suppression.py, analyze.py suppress).

A tiny deterministic conv net with hand-made maps checks the distortion, the selection's
isolation from the test split (a poisoned test split and a test loader that refuses to be read
before the choice), the random controls' unit counts per layer and the stored numbers against
a by-hand recomputation. A demo-scale run of the command (a Sobol analysis of a 32 px ResNet18,
then suppress on the planted data's validation and test splits) checks the stored group, the
figure's data, the W&B record, the report section (parsed and in headless Chromium) and bad
input (exit 2).
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from helpers import cli
from torch import nn

from callbacks.wandb_logging import suppression_record
from sensitivity import suppression as sp
from sensitivity.augmentations import apply
from sensitivity.masking import MaskConfig, MaskedNetwork, MaskingMaps, quantile_mask
from sensitivity.store import ResultsStore
from sensitivity.suppression_figures import suppression_figure

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
SIZE = 16


# ------------------------------------------------------------------------------- tiny model
def tiny_net() -> nn.Module:
    """Conv channels c and c + 3 read colour channel c (the second thresholded), the head
    scores class k by channels k and k + 3: predictions follow the dominant colour, and masks
    and hue shifts change them."""
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("conv", nn.Conv2d(3, 6, 3, padding=1))
    net.add_module("relu", nn.ReLU())
    net.add_module("conv2", nn.Conv2d(6, 6, 3, padding=1))
    net.add_module("pool", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(6, 3))
    with torch.no_grad():
        for conv in (net.conv, net.conv2):
            conv.weight.mul_(0.05)
            conv.bias.zero_()
        net.fc.weight.mul_(0.05)
        for c in range(6):
            net.conv.weight[c, c % 3, 1, 1] += 1.0
            net.conv.bias[c] = -0.3 * (c // 3)
            net.conv2.weight[c, c, 1, 1] += 1.0
            net.fc.weight[c % 3, c] += 1.0 + 0.5 * (c // 3)
    return net.eval()


def tiny_maps() -> MaskingMaps:
    """Maps of variables (hue, class): a channel-mean map at conv, a full map at conv2, a few
    flagged units."""
    rng = np.random.default_rng(0)
    valid2 = np.ones((6, SIZE, SIZE), dtype=bool)
    valid2[0, :4] = False
    return MaskingMaps(
        "ST", ["conv", "conv2"], [],
        {"conv": rng.uniform(size=(2, 6)), "conv2": rng.uniform(size=(2, 6, SIZE, SIZE))},
        {"conv": np.array([True, True, True, True, True, False]), "conv2": valid2}, {})


def split(seed: int, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise on a colour per image (so that the pooled features, hence predictions, differ)."""
    gen = torch.Generator().manual_seed(seed)
    colour = torch.rand(n, 3, 1, 1, generator=gen)
    images = 0.7 * colour + 0.3 * torch.rand(n, 3, SIZE, SIZE, generator=gen)
    return images, colour.flatten(1).argmax(1)  # the dominant colour


def run(net: nn.Module, val, load_test, maps: MaskingMaps | None = None,
        **options) -> sp.SuppressionResult:
    return sp.run_suppression(net, maps or tiny_maps(), ["hue", "class"], "hue", val, load_test,
                              **{"random_draws": 3, "strengths": [0.5, 1.0], **options})


# ------------------------------------------------------------------------------ distortion
def test_distortion_scales_the_parameter_from_its_identity():
    images, _ = split(0, 4)
    index = torch.arange(4)
    hue = sp.NuisanceDistortion("hue", seed=3)
    assert hue(images, 0.0, sp.TEST_STREAM, index) is images
    coins = np.array([np.random.default_rng([3, sp.TEST_STREAM, i]).random(2)[0]
                      for i in range(4)])
    expected = apply("hue", images, {"factor": torch.tensor(np.where(coins < 0.5, 0.25, -0.25))})
    assert torch.allclose(hue(images, 0.5, sp.TEST_STREAM, index), expected)
    # the draws depend on the image index, not on the batch
    assert torch.equal(hue(images[2:], 0.5, sp.TEST_STREAM, index[2:]), expected[2:])
    gray = sp.NuisanceDistortion("grayscale")
    blended = gray(images, 0.5, sp.VAL_STREAM, index)
    assert torch.allclose(blended, (images + apply("grayscale", images)) / 2, atol=1e-6)
    for auxiliary in ("class", "image"):
        with pytest.raises(ValueError, match="not an augmentation"):
            sp.NuisanceDistortion(auxiliary)


# ------------------------------------------------------------------------------- selection
def test_selection_sees_validation_only():
    """A poisoned test split (labels = another candidate's predictions, so the test split
    favours it) does not move the choice, and the test loader refuses to be read before the
    choice is made."""
    net, val, test_images = tiny_net(), split(0), split(1)[0]
    masks = sp.SuppressionMasks(net, tiny_maps(), ["hue", "class"], "hue", (SIZE, SIZE),
                                sp.default_configurations())
    candidates = sp.suppression_candidates(masks.layers, sp.default_configurations())
    network = MaskedNetwork(net, masks.layers)
    distortion = sp.NuisanceDistortion("hue")
    alone = sp.select_suppression(network, masks, candidates, *val, distortion, [0.5, 1.0])
    # the test labels are the predictions of the candidate that disagrees most with the choice
    with torch.no_grad(), network:
        predictions = [network.forward(test_images, masks.mask(c)).argmax(1)
                       for c in candidates]
    own = predictions[alone.index]
    poisoned = max(predictions, key=lambda p: int((p != own).sum()))
    on_test = sp.masked_accuracies(network, [masks.mask(c) for c in candidates], test_images,
                                   poisoned, distortion, [0.5, 1.0], sp.TEST_STREAM)
    test_best = int(np.argmax(sp.criterion_scores(on_test, "mean")))
    assert candidates[test_best] != alone.chosen  # the poison works: test would choose another

    state = {"selected": False}
    select = sp.select_suppression

    def spy(*args, **kwargs):
        chosen = select(*args, **kwargs)
        state["selected"] = True
        return chosen

    def load_test():
        assert state["selected"], "the test split was read before the choice"
        return test_images, poisoned

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sp, "select_suppression", spy)
        result = run(net, val, load_test)
    assert result.chosen == alone.chosen.label
    np.testing.assert_array_equal(result.val_acc1, alone.accuracy)


# -------------------------------------------------------------------------------- controls
def touched(mask, layer: str, shape: tuple[int, ...], channels: bool) -> int:
    """Units a mask changes, counted on its output for an all-ones activation."""
    out = mask[layer](torch.ones(1, *shape))[0] != 1.0
    return int(out.any(dim=(1, 2)).sum() if channels else out.sum())


def test_random_controls_touch_as_many_units_per_layer():
    net = tiny_net()
    masks = sp.SuppressionMasks(net, tiny_maps(), ["hue", "class"], "hue", (SIZE, SIZE),
                                sp.default_configurations())
    shape = (6, SIZE, SIZE)
    rng = np.random.default_rng(0)
    for candidate in sp.suppression_candidates(masks.layers, [
            MaskConfig("quantile", 0.0, 0.7), MaskConfig("quantile", 0.5, 0.5),
            MaskConfig("soft"), MaskConfig("soft_inverse")]):
        counts = masks.unit_counts(candidate)
        chosen = masks.mask(candidate)
        by_hand = [touched(chosen, layer, shape, layer == "conv") if layer in chosen else 0
                   for layer in masks.layers]
        assert counts.tolist() == by_hand and counts.sum() > 0
        draws = [masks.random_mask(candidate, rng) for _ in range(3)]
        for mask, drawn in draws:
            assert drawn.tolist() == counts.tolist()
            assert [touched(mask, layer, shape, layer == "conv") if layer in mask else 0
                    for layer in masks.layers] == counts.tolist()
        if candidate.config.kind == "quantile" and candidate.scope == "conv2":
            picks = [mask["conv2"](torch.ones(1, *shape)) for mask, _ in draws]
            assert not torch.equal(picks[0], picks[1])  # random, not the chosen units
    # soft controls permute the factors among the valid units: the same multiset
    soft = sp.Candidate("conv2", MaskConfig("soft"))
    mask, _ = masks.random_mask(soft, rng)
    factors = mask["conv2"](torch.ones(1, *shape))[0].numpy()
    expected = masks.mask(soft)["conv2"](torch.ones(1, *shape))[0].numpy()
    valid = masks.valid["conv2"]
    np.testing.assert_allclose(np.sort(factors[valid]), np.sort(expected[valid]))
    assert np.all(factors[~valid] == 1.0)


def test_stored_numbers_equal_a_recomputation_by_hand(tmp_path):
    """One candidate (alpha 0.5, q 0.6 at conv2): its validation and test accuracies and the
    unmasked ones, recomputed with a forward hook and the hue shift written out."""
    net, val, test = tiny_net(), split(0), split(1)
    config = MaskConfig("quantile", 0.5, 0.6)
    result = run(net, val, lambda: test, configurations=[config], scope="per_layer", seed=4)
    maps = tiny_maps()
    only = MaskingMaps("ST", ["conv2"], [], {"conv2": maps.maps["conv2"]},
                       {"conv2": maps.valid["conv2"]}, {})
    alone = run(net, val, lambda: test, only, configurations=[config], seed=4)
    store = ResultsStore(tmp_path / "results.h5")
    store.write_result(sp.GROUP_KIND, "hue", result)
    stored = store.read_result(sp.SuppressionResult, sp.GROUP_KIND, "hue")
    selected, _ = quantile_mask(maps.maps["conv2"][0], 0.6, "strict", maps.valid["conv2"])
    hooked = torch.as_tensor(selected)

    def accuracy(images, labels, stream, strength, masked):
        coins = np.array([np.random.default_rng([4, stream, i]).random(2)[0]
                          for i in range(len(labels))])
        shift = torch.tensor(np.where(coins < 0.5, 0.5, -0.5) * strength)
        x = images if strength == 0 else apply("hue", images, {"factor": shift})
        handle = net.conv2.register_forward_hook(
            lambda m, i, out: torch.where(hooked, out * 0.5, out) if masked else None)
        try:
            with torch.no_grad():
                return float((net(x).argmax(1) == labels).double().mean())
        finally:
            handle.remove()

    strengths = [0.0, 0.5, 1.0]
    assert stored.candidates.tolist() == ["conv:alpha=0.5,q=0.6", "conv2:alpha=0.5,q=0.6"]
    for images, labels, stream, unmasked, masked in (
            (*val, sp.VAL_STREAM, stored.val_unmasked_acc1, stored.val_acc1[1]),
            (*test, sp.TEST_STREAM, stored.test_unmasked_acc1, None)):
        np.testing.assert_allclose(unmasked, [accuracy(images, labels, stream, s, False)
                                              for s in strengths])
        if masked is not None:
            np.testing.assert_allclose(masked, [accuracy(images, labels, stream, s, True)
                                                for s in strengths])
    # the only candidate at conv2 alone is chosen: its test accuracies, and the same numbers
    # as the candidate of the two-layer experiment
    assert alone.chosen == "conv2:alpha=0.5,q=0.6"
    np.testing.assert_allclose(alone.test_chosen_acc1,
                               [accuracy(*test, sp.TEST_STREAM, s, True) for s in strengths])
    np.testing.assert_array_equal(alone.val_acc1[0], stored.val_acc1[1])
    np.testing.assert_allclose(stored.val_score, stored.val_acc1.mean(axis=1))
    assert stored.chosen_index == int(np.argmax(stored.val_score))
    assert stored.unit_counts.tolist() == result.unit_counts.tolist()
    assert stored.random_unit_counts.tolist() == [result.unit_counts.tolist()] * 3
    assert stored.test_random_acc1.shape == (3, 3) and stored.n_val == stored.n_test == 12


def test_figure_draws_the_stored_accuracies():
    net = tiny_net()
    result = run(net, split(0), lambda: split(1))
    axes = suppression_figure(result).axes[0]
    lines = {line.get_gid(): line for line in axes.get_lines()}
    np.testing.assert_array_equal(lines["unmasked"].get_xdata(), [0.0, 0.5, 1.0])
    np.testing.assert_allclose(lines["unmasked"].get_ydata(), result.test_unmasked_acc1)
    np.testing.assert_allclose(lines["suppression"].get_ydata(), result.test_chosen_acc1)
    random = result.test_random_acc1
    np.testing.assert_allclose(lines["random_mean"].get_ydata(), random.mean(axis=0))
    np.testing.assert_allclose(lines["random_min"].get_ydata(), random.min(axis=0))
    np.testing.assert_allclose(lines["random_max"].get_ydata(), random.max(axis=0))
    record = suppression_record(result)
    assert record["suppress/test/suppression/clean"] == result.test_chosen_acc1[0]
    assert record["suppress/test/random_mean/s1"] == pytest.approx(random[:, 2].mean())
    assert record["suppress/units/conv2"] == result.unit_counts[1]


# ----------------------------------------------------------------------------- the command
ANALYSIS = ["--n", "8", "--data.image_size", "32", "--images-per-class", "2",
            "--small_input", "false", "--layers", "[layer4, fc]", "--problem.augmentations",
            "[hue, grayscale]", "--accelerator", "cpu", "--no_progress", "--wandb", "false"]
SUPPRESS = ["--variable", "hue", "--data.image_size", "32", "--small_input", "false",
            "--data.val_per_class", "2", "--data.test_per_class", "2", "--data.factor", "shape",
            "--data.nuisance", "hue", "--suppress.layers", "[layer4]", "--suppress.random_draws",
            "2", "--suppress.strengths", "[0.5, 1.0]", "--accelerator", "cpu", "--no_progress"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A Sobol analysis and a suppress run on the planted data; the test split refuses to be
    read before the choice."""
    from cli import suppress as command
    from data import PlantedFactorDataModule

    out = tmp_path_factory.mktemp("suppress")
    assert cli("sobol", "--output", out, *ANALYSIS, quiet=True) == 0
    state = {"selected": False, "read": False}

    class Guarded(dict):
        def __getitem__(self, key):
            if key == "test":
                assert state["selected"], "the test split was read before the choice"
                state["read"] = True
            return super().__getitem__(key)

    class GuardedData(PlantedFactorDataModule):
        def setup(self, stage=None):
            super().setup(stage)
            self.datasets = Guarded(self.datasets)

    select = sp.select_suppression

    def spy(*args, **kwargs):
        chosen = select(*args, **kwargs)
        state["selected"] = True
        return chosen

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(command, "PlantedFactorDataModule", GuardedData)
        patch.setattr(sp, "select_suppression", spy)
        assert cli("suppress", "--results", out / "results.h5", *SUPPRESS, quiet=True) == 0
    assert state["read"]
    assert cli("report", "--results", out / "results.h5", quiet=True) == 0
    return out


def test_command_stores_the_experiment(demo):
    store = ResultsStore(demo / "results.h5")
    result = store.read_result(sp.SuppressionResult, sp.GROUP_KIND, "sobol_hue")
    assert result.layers == ["layer4"] and len(result.candidates) == 17
    assert result.n_val == result.n_test == 2 * 4  # 4 classes
    assert result.random_unit_counts.tolist() == [result.unit_counts.tolist()] * 2
    assert result.val_acc1.shape == (17, 3) and result.test_random_acc1.shape == (2, 3)
    assert (demo / "figures" / "sobol_hue_suppression.png").is_file()
    assert list((demo / "wandb").glob("offline-run-*"))


def test_report_section(demo, tmp_path):
    page = (demo / "report" / "index.html").read_text(encoding="utf-8")
    result = ResultsStore(demo / "results.h5").read_result(sp.SuppressionResult, sp.GROUP_KIND,
                                                           "sobol_hue")
    assert ">Suppression sobol_hue (hue, ST maps of sobol)</h2>" in page
    assert f"chosen: {result.chosen}" in page
    cells = "".join(f"<td>{a:.3f}</td>" for a in result.test_chosen_acc1)
    assert f"<td class=l>suppression</td>{cells}" in page
    assert (demo / "report" / "suppression_sobol_hue.png").is_file()
    if shutil.which("chromium") is None:
        pytest.skip("headless Chromium is not installed")
    from test_html_report import CHROMIUM_FLAGS

    done = subprocess.run(
        ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
         (demo / "report" / "index.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not [line for line in done.stderr.splitlines() if "CONSOLE" in line]
    assert "Suppression sobol_hue" in done.stdout


@pytest.mark.parametrize("args, message", [
    ([], "--variable"),
    (["--variable", "class"], "not an augmentation"),
    (["--variable", "brightness"], "not a variable of the analysis"),
    (["--variable", "hue", "--suppress.strengths", "[0, 2]"], "strengths"),
    (["--variable", "hue", "--suppress.criterion", "best"], "criterion"),
    (["--variable", "hue", "--suppress.scope", "some"], "scope"),
    (["--variable", "hue", "--suppress.random_draws", "-1"], "random_draws"),
    (["--variable", "hue", "--data.image_size", "64"], "32x32"),
])
def test_bad_input_exits_2_and_writes_nothing(demo, capsys, args, message):
    before = ResultsStore(demo / "results.h5").groups(sp.GROUP_KIND)
    status = cli("suppress", "--results", demo / "results.h5", "--name", "bad", "--wandb",
                 "false", *args)
    assert status == 2 and message in capsys.readouterr().err
    assert ResultsStore(demo / "results.h5").groups(sp.GROUP_KIND) == before


def test_existing_group_and_missing_file(demo, capsys, tmp_path):
    args = ["--variable", "hue", "--wandb", "false"]
    assert cli("suppress", "--results", demo / "results.h5", *args) == 2
    assert "already holds /suppression/sobol_hue" in capsys.readouterr().err
    assert cli("suppress", "--results", tmp_path / "none.h5", *args) == 2
    assert json.dumps(str(tmp_path / "none.h5"))[1:-1] in capsys.readouterr().err
