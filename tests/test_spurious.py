"""A benchmark with a known answer: planted shape classes with a spurious hue cue (issue #18).

In train the object's hue agrees with its shape class in exactly a share ``agreement`` of each
class and names another class in the rest; val and test break the agreement (hue random over the
class hues, or shifted to the next class's). Checked from the recorded cue (``nuisance_labels``)
and from the pixels (the hue measured on the object). Without a cue the generator must give the
very tensors it gave before the cue existed. A small CNN trained on the cue leans on it: right on
train, below chance on the shifted split.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from scipy.stats import chi2
from test_ground_truth import SmallCNN, fit

from data import PlantedFactorDataModule
from data.planted import HUE_JITTER, HUES, generate

CLASS_HUES = torch.tensor(list(HUES.values()))


def spurious(**kwargs) -> PlantedFactorDataModule:
    """A small shape datamodule with the hue cue; ``kwargs`` override."""
    args = {
        "factor": "shape",
        "num_classes": 4,
        "image_size": 32,
        "train_per_class": 25,
        "val_per_class": 40,
        "batch_size": 16,
        "nuisance": "hue",
        "agreement": 0.9,
    }
    return PlantedFactorDataModule(**{**args, **kwargs})


def digest(tensor: torch.Tensor) -> str:
    """The first 16 hex digits of the SHA-256 of a tensor's bytes."""
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()[:16]


def measured_hue_class(dm: PlantedFactorDataModule, split: str) -> torch.Tensor:
    """The class whose hue is nearest to the hue measured on each object's pixels.

    The hue of the mean colour of the fully covered object pixels: the background and the edge
    are left out, and the grain (sd 0.015) averages out, so the measurement is within a few
    degrees of the drawn hue (the classes are >= 60 degrees apart, the jitter 8).
    """
    data = dm.split_data(split)
    full = (data.masks >= 0.999).float()[:, None]
    assert (full.sum(dim=(1, 2, 3)) > 0).all(), "an object without a fully covered pixel"
    rgb = (data.images * full).sum(dim=(2, 3)) / full.sum(dim=(2, 3))
    r, g, b = rgb.unbind(1)
    # atan2 form of the hue (0 red, 120 green, 240 blue); exact for the isoluminant colours.
    hue = torch.rad2deg(torch.atan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360.0
    distance = (hue[:, None] - CLASS_HUES[None, : dm.num_classes]).abs()
    distance = torch.minimum(distance, 360.0 - distance)
    assert (distance.min(dim=1).values < HUE_JITTER + 5.0).all(), "a hue far from every class"
    return distance.argmin(dim=1)


# ---------------------------------------------------------------- no cue: nothing changed

# SHA-256 prefixes of (images, labels) of train and val, taken from the generator before the
# cue was added (commit cc5d63f); the cue's draws come from a stream of their own.
BEFORE = {
    ("colour", 4, 32, 12, 6, 0): {
        "train": ("856600579cefce07", "08fa48be57d4676a"),
        "val": ("ebf269b442305448", "b712b461082675ff"),
    },
    ("shape", 3, 32, 12, 6, 5): {
        "train": ("f4dc88b64c68e2aa", "6e2e8cacc19f69ee"),
        "val": ("a3fad64fb3c3ea5b", "7d12f621fdfc7ca2"),
    },
    ("mixed", 4, 24, 10, 5, 1): {
        "train": ("680a09d1f0b1dabc", "ca52bce7c261188d"),
        "val": ("36ea3f38ce2322c9", "3e6f255870bae597"),
    },
}


@pytest.mark.parametrize("config", list(BEFORE))
@pytest.mark.parametrize("explicit", [False, True])
def test_without_a_cue_the_images_are_bit_identical_to_before(config, explicit, one_thread):
    factor, classes, size, train, val, seed = config
    cue_off = {"nuisance": None, "agreement": 1.0, "eval_nuisance": "random"} if explicit else {}
    dm = PlantedFactorDataModule(factor=factor, num_classes=classes, image_size=size,
                                 train_per_class=train, val_per_class=val, seed=seed, **cue_off)
    dm.setup()
    for split, (images, labels) in BEFORE[config].items():
        assert (digest(dm.datasets[split].tensors[0]), digest(dm.datasets[split].tensors[1])) == (
            images, labels)
    assert set(dm.datasets) == {"train", "val"} and dm.nuisance_labels == {}
    assert dm.split_data("train").nuisance is None


def test_the_cue_changes_the_object_colour_and_nothing_else():
    plain = spurious(nuisance=None, agreement=1.0)
    cued = spurious()
    for split in ("train", "val"):
        a, b = plain.split_data(split), cued.split_data(split)
        assert torch.equal(a.labels, b.labels) and torch.equal(a.shapes, b.shapes)
        assert torch.equal(a.masks, b.masks) and torch.equal(a.luma, b.luma)
        background = (a.masks == 0)[:, None].expand_as(a.images)
        assert torch.equal(a.images[background], b.images[background])
        assert not torch.equal(a.images, b.images)
    assert cued.class_names == plain.class_names == ["disc", "square", "triangle", "cross"]


# ---------------------------------------------------------------- train: agreement


@pytest.mark.parametrize("agreement", [0.0, 0.3, 0.9, 0.95, 1.0])
def test_train_agreement_is_exact_per_class_and_disagreement_is_another_class(agreement):
    dm = spurious(agreement=agreement)
    dm.setup()
    labels, cue = dm.datasets["train"].tensors[1], dm.nuisance_labels["train"]
    assert cue.dtype == torch.int64 and cue.shape == labels.shape
    per_class = 25
    agree = round(agreement * per_class)
    for k in range(4):
        assert int((cue[labels == k] == k).sum()) == agree, f"class {k}"
    # The pixels say the same: the hue measured on every object is its recorded cue's class.
    assert torch.equal(measured_hue_class(dm, "train"), cue)


def test_agreeing_positions_are_random_and_seeded():
    cue = spurious(agreement=0.6).split_data("train").nuisance
    again = spurious(agreement=0.6).split_data("train").nuisance
    other_seed = spurious(agreement=0.6, seed=1).split_data("train").nuisance
    assert torch.equal(cue, again) and not torch.equal(cue, other_seed)
    agrees = (cue == torch.arange(4).repeat_interleave(25)).view(4, 25)
    # Not the first 15 of each class (positions drawn from the seed), nor the same in each class.
    assert not agrees[:, :15].all() and not (agrees == agrees[0]).all()


def test_disagreeing_hues_are_uniform_over_the_other_classes():
    dm = spurious(agreement=0.0, train_per_class=600)
    dm.setup()
    labels, cue = dm.datasets["train"].tensors[1], dm.nuisance_labels["train"]
    table = torch.zeros(4, 4)
    table.index_put_((labels, cue), torch.ones(len(labels)), accumulate=True)
    assert table.diagonal().sum() == 0
    # Goodness of fit to 200 per off-diagonal cell: chi-square with 4 x 2 degrees of freedom.
    off = table[~torch.eye(4, dtype=torch.bool)]
    statistic = float(((off - 200) ** 2 / 200).sum())
    assert statistic < chi2.ppf(0.999, 4 * 2), statistic


# ---------------------------------------------------------------- val and test: agreement broken


def test_random_eval_cue_is_independent_of_the_class():
    dm = spurious(val_per_class=400, test_per_class=400)
    dm.setup()
    for split in ("val", "test"):
        labels, cue = dm.datasets[split].tensors[1], dm.nuisance_labels[split]
        table = torch.zeros(4, 4)
        table.index_put_((labels, cue), torch.ones(len(labels)), accumulate=True)
        # Each class's cue uniform over the 4 hues: per class a goodness-of-fit statistic with 3
        # degrees of freedom, summed over the 4 independent classes: 12. At the 0.999 quantile
        # a correct generator fails one seed in a thousand; this seed is fixed.
        statistic = float(((table - 100) ** 2 / 100).sum())
        assert statistic < chi2.ppf(0.999, 4 * 3), (split, statistic)
        # Not a function of the class either way: every class sees every hue.
        assert (table > 0).all()
    assert torch.equal(measured_hue_class(dm, "val"), dm.nuisance_labels["val"])


def test_shifted_eval_cue_points_to_the_next_class():
    dm = spurious(eval_nuisance="shifted", test_per_class=10)
    dm.setup()
    for split in ("val", "test"):
        labels, cue = dm.datasets[split].tensors[1], dm.nuisance_labels[split]
        assert torch.equal(cue, (labels + 1) % 4)
        assert torch.equal(measured_hue_class(dm, split), cue)
    # The train split is the same whatever the eval split does.
    assert torch.equal(dm.nuisance_labels["train"], spurious().split_data("train").nuisance)


# ---------------------------------------------------------------- the test split


def test_test_split_is_its_own_seeded_split():
    dm = spurious(test_per_class=40)
    dm.setup()
    assert set(dm.datasets) == {"train", "val", "test"} and dm.splits == ("train", "val", "test")
    test_images, test_labels = dm.datasets["test"].tensors
    assert test_images.shape == (160, 3, 32, 32) and torch.equal(
        test_labels, torch.arange(4).repeat_interleave(40))
    # Same size as val, other images (another sub-seed).
    assert not torch.equal(test_images, dm.datasets["val"].tensors[0])
    again = spurious(test_per_class=40)
    again.setup()
    assert torch.equal(test_images, again.datasets["test"].tensors[0])
    assert torch.equal(dm.nuisance_labels["test"], again.nuisance_labels["test"])
    other = spurious(test_per_class=40, seed=1)
    other.setup()
    assert not torch.equal(test_images, other.datasets["test"].tensors[0])
    # Adding a test split leaves train and val as they were.
    without = spurious()
    without.setup()
    for split in ("train", "val"):
        assert torch.equal(dm.datasets[split].tensors[0], without.datasets[split].tensors[0])
    # The loader, the probe contract and the hints know the split.
    batches = list(dm.test_dataloader())
    assert torch.equal(torch.cat([x for x, _ in batches]), test_images)
    assert dm.class_counts("test") == [40] * 4
    probe, probe_labels = dm.probe_set(3, "test")
    assert torch.equal(probe, test_images[torch.tensor([0, 1, 2, 40, 41, 42, 80, 81, 82,
                                                        120, 121, 122])])
    assert probe_labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert dm.more_images_hint("test") == "raise --data.test_per_class (now 40)"


def test_test_split_without_a_cue_and_absent_by_default():
    plain = PlantedFactorDataModule(factor="colour", num_classes=3, image_size=16,
                                    train_per_class=4, val_per_class=4, test_per_class=4)
    plain.setup()
    assert plain.nuisance_labels == {}
    assert not torch.equal(plain.datasets["test"].tensors[0], plain.datasets["val"].tensors[0])
    dm = spurious()
    dm.setup()
    assert "test" not in dm.datasets
    with pytest.raises(ValueError, match=r"set --data\.test_per_class"):
        dm.test_dataloader()
    with pytest.raises(ValueError, match="split must be one of"):
        dm.class_counts("test")
    with pytest.raises(ValueError, match="split must be one of"):
        dm.probe_set(2, "test")


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"agreement": -0.1}, r"agreement must be in \[0, 1\]"),
        ({"agreement": 1.5}, r"agreement must be in \[0, 1\]"),
        ({"factor": "colour"}, "needs factor 'shape'.*set --data.factor shape"),
        ({"factor": "mixed"}, "needs factor 'shape'"),
        ({"eval_nuisance": "inverted"}, "eval_nuisance must be one of"),
        ({"nuisance": "texture"}, "nuisance must be None or one of"),
        ({"nuisance": None}, "act only on a nuisance: set --data.nuisance hue"),
        ({"nuisance": None, "agreement": 1.0, "eval_nuisance": "shifted"}, "act only on a"),
        ({"test_per_class": -1}, "test_per_class must be >= 0"),
    ],
)
def test_bad_cue_options_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        spurious(**kwargs)


def test_generate_checks_hue_classes():
    with pytest.raises(ValueError, match="needs factor 'shape'"):
        generate("colour", 3, 2, 16, hue_classes=torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
        generate("shape", 3, 2, 16, hue_classes=torch.full((6,), 3))
    with pytest.raises(ValueError, match=r"must be \(6,\)"):
        generate("shape", 3, 2, 16, hue_classes=torch.zeros(5, dtype=torch.long))


# ---------------------------------------------------------------- a network leans on the cue


@pytest.mark.slow
def test_a_network_trained_with_the_cue_leans_on_it(one_thread):
    """Trained where the hue agrees with the shape in 95% of images, a small CNN takes the hue
    (the easier cue): about 95% right on train, near chance on random hues, and below chance
    where the hue names the next class. About 2 s."""
    torch.manual_seed(0)
    common = {"num_classes": 3, "train_per_class": 128, "val_per_class": 64,
              "batch_size": 64, "agreement": 0.95}
    data = {e: spurious(eval_nuisance=e, **common) for e in ("random", "shifted")}
    model = fit(SmallCNN(3), data["random"], epochs=4)

    def accuracy(dm: PlantedFactorDataModule, split: str) -> float:
        dm.setup()
        images, labels = dm.datasets[split].tensors
        with torch.no_grad():
            return (model(images).argmax(1) == labels).float().mean().item()

    train = accuracy(data["random"], "train")
    random, shifted = accuracy(data["random"], "val"), accuracy(data["shifted"], "val")
    assert train >= 0.9, train
    assert shifted < 1 / 3 and shifted <= random - 0.2, (random, shifted)
