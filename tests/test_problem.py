"""AugmentationProblem: groups and columns, decoding of rows, batched composition, bad input."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import SALib.sample.sobol as salib_sobol
import torch

from sensitivity import pipeline
from sensitivity.augmentations import AUGMENTATION_SETS, AUGMENTATIONS, apply, minmax_rescale
from sensitivity.decoded import lehmer_permutations
from sensitivity.designs import SobolDesign
from sensitivity.problem import AugmentationProblem

H, W = 40, 48  # non-square, so height/width mix-ups show


def _row(problem: AugmentationProblem, **values: float) -> np.ndarray:
    """One design row: 0.5 everywhere except the named columns ("erasing.switch"=0.1, ...)."""
    x = np.full((1, problem.d), 0.5)
    for name, value in values.items():
        x[0, problem.column_names.index(name.replace("__", "."))] = value
    return x


def _reference_augment(problem: AugmentationProblem, images, decoded) -> torch.Tensor:
    """One row at a time, augmentations in that row's order: what augment() must equal."""
    out = []
    for r in range(images.shape[0]):
        image = images[r : r + 1]
        for a in decoded.order[r].tolist():
            if decoded.active[r, a]:
                name = problem.augmentations[a]
                params = {p: t[r : r + 1] for p, t in decoded.params[name].items()}
                image = apply(name, image, params)
        out.append(image)
    out = torch.cat(out)
    return minmax_rescale(out) if problem.postprocess == "minmax" else out


def test_groups_and_columns_of_set_1():
    problem = AugmentationProblem(1, p_on={"erasing": 1.0}, n_classes=3, images_per_class=2)
    assert problem.augmentations == AUGMENTATION_SETS[1]
    assert problem.group_names == [*AUGMENTATION_SETS[1], "order", "class", "image"]
    assert problem.column_names == [
        "erasing.center_y", "erasing.center_x", "erasing.scale", "erasing.log_ratio",
        "sharpness.switch", "rolling.switch", "rolling.shift_y", "rolling.shift_x",
        "grayscale.switch", "gaussian_blur.switch", "gaussian_blur.sigma",
        "order", "class", "image",
    ]
    assert problem.group_columns[:3] == [[0, 1, 2, 3], [4], [5, 6, 7]]
    assert [g.kind for g in problem.groups][-3:] == ["order", "class", "image"]
    assert problem.switch_columns["erasing"] is None and problem.switch_columns["rolling"] == 5
    assert problem.d == 14 and problem.n_images == 6


def test_paper_preset_switch_semantics():
    sobol = AugmentationProblem.paper(1, method="sobol")
    assert sobol.p_on == {
        "erasing": 1.0, "sharpness": 0.5, "rolling": 1.0, "grayscale": 0.5, "gaussian_blur": 1.0,
    }
    assert sobol.postprocess == "minmax"
    assert "erasing.switch" not in sobol.column_names
    assert "sharpness.switch" in sobol.column_names
    shapley = AugmentationProblem.paper(2, method="shapley")
    assert set(shapley.p_on.values()) == {0.5}
    assert all(f"{name}.switch" in shapley.column_names for name in AUGMENTATION_SETS[2])
    assert AugmentationProblem.from_config(
        {"preset": "paper", "augmentations": 1, "method": "sobol"}
    ).p_on == sobol.p_on


def test_parameterless_always_on_augmentation_owns_no_group():
    problem = AugmentationProblem(["sharpness", "rolling"], p_on={"sharpness": 1.0})
    assert problem.group_names == ["rolling", "order", "class", "image"]
    decoded = problem.decode(np.full((2, problem.d), 0.9), H, W)
    assert decoded.active[:, 0].all()


def test_switch_thresholds():
    problem = AugmentationProblem(["erasing", "hflip"], p_on={"erasing": 0.3, "hflip": 0.8})
    rows = np.concatenate([
        _row(problem, erasing__switch=0.2999, hflip__switch=0.7999),
        _row(problem, erasing__switch=0.3, hflip__switch=0.8),
        _row(problem, erasing__switch=0.0, hflip__switch=0.9999),
    ])
    active = problem.decode(rows, H, W).active.tolist()
    assert active == [[True, True], [False, False], [True, False]]


def test_parameters_scaled_to_the_image_size():
    problem = AugmentationProblem(["erasing", "rolling", "gaussian_blur"], auxiliaries=())
    h, w = 112, 448
    rows = np.concatenate([
        _row(problem, erasing__center_y=0.0, erasing__center_x=0.0, rolling__shift_y=0.26,
             rolling__shift_x=0.0, gaussian_blur__sigma=0.0),
        _row(problem, erasing__center_y=0.5, erasing__center_x=0.5, rolling__shift_y=0.5,
             rolling__shift_x=0.999999, gaussian_blur__sigma=0.5),
    ])
    params = problem.decode(rows, h, w).params
    # Spatial bounds scale with the side: center_y [44, 180] * 112/224, center_x * 448/224.
    torch.testing.assert_close(params["erasing"]["center_y"], torch.tensor([22.0, 56.0]))
    torch.testing.assert_close(params["erasing"]["center_x"], torch.tensor([88.0, 224.0]))
    # Not spatial: the scale column stays in [0.02, 0.33] at any size.
    torch.testing.assert_close(params["erasing"]["scale"], torch.full((2,), 0.175))
    # sigma scales with the smaller side: [0.1, 2.0] * 112/224.
    torch.testing.assert_close(params["gaussian_blur"]["sigma"], torch.tensor([0.05, 0.525]))
    # Integer parameters: shift_y in [-22, 22] at 112 px, -22 + 0.26 * 44 = -10.56 -> -11.
    assert params["rolling"]["shift_y"].dtype == torch.int64
    assert params["rolling"]["shift_y"].tolist() == [-11, 0]
    assert params["rolling"]["shift_x"].tolist() == [-88, 88]


def test_custom_bounds_narrow_a_parameter():
    problem = AugmentationProblem(["hue"], auxiliaries=(), bounds={"hue": {"factor": (-0.1, 0.1)}})
    params = problem.decode(_row(problem, hue__factor=0.75), H, W).params
    torch.testing.assert_close(params["hue"]["factor"], torch.tensor([0.05]))
    again = AugmentationProblem.from_config(problem.to_config())
    assert again.decode(_row(again, hue__factor=0.75), H, W).params["hue"]["factor"].item() == (
        pytest.approx(0.05)
    )


def test_lehmer_code_enumerates_permutations_lexicographically():
    perms = lehmer_permutations(np.arange(24), 4)
    np.testing.assert_array_equal(perms, list(itertools.permutations(range(4))))


def test_order_decoding_is_a_uniform_permutation():
    problem = AugmentationProblem(["erasing", "sharpness", "rolling", "grayscale"],
                                  auxiliaries=("order",))
    n = 24 * 1000
    rows = np.random.default_rng(0).random((n, problem.d))
    order = problem.decode(rows, H, W).order.numpy()
    np.testing.assert_array_equal(np.sort(order, axis=1), np.tile(np.arange(4), (n, 1)))
    codes = {tuple(p): i for i, p in enumerate(itertools.permutations(range(4)))}
    counts = np.bincount([codes[tuple(p)] for p in order], minlength=24)
    # Each of the 24 orders: binomial(n, 1/24), sd ~ 31; 5 sd covers all 24 cells.
    assert np.all(np.abs(counts - 1000) < 5 * math.sqrt(1000 * 23 / 24))
    # The order cell of u is floor(u * 4!).
    x = _row(problem, order=(17 + 0.5) / 24)
    assert problem.decode(x, H, W).order[0].tolist() == [2, 3, 1, 0]  # rank 17


def test_class_image_and_partition_mapping():
    problem = AugmentationProblem(["hflip"], auxiliaries=("class", "image", "partition"),
                                  n_classes=3, images_per_class=4)
    rows = np.concatenate([
        _row(problem, **{"class": 0.5, "image": 0.99, "partition": 0.49}),
        _row(problem, **{"class": 0.0, "image": 0.25, "partition": 0.5}),
        _row(problem, **{"class": 0.9999999, "image": 0.0, "partition": 0.9999999}),
    ])
    decoded = problem.decode(rows, H, W)
    assert decoded.class_index.tolist() == [1, 0, 2]
    assert decoded.image_index.tolist() == [1 * 4 + 3, 1, 2 * 4]
    assert decoded.partition.tolist() == [0, 1, 1]
    no_partition = AugmentationProblem(["hflip"], auxiliaries=())
    assert no_partition.decode(rows[:, :1], H, W).partition is None


def test_sobol_rows_share_the_image_unless_class_or_image_is_switched():
    problem = AugmentationProblem(1, n_classes=5, images_per_class=4)
    design = SobolDesign(problem.d, 64, seed=2, groups=problem.group_columns)
    decoded = problem.decode(design.rows(), H, W)
    image = decoded.image_index.numpy().reshape(64, design.block_size)
    for j, name in enumerate(problem.group_names):
        same = image[:, 1 + j] == image[:, 0]
        if name in ("class", "image"):
            assert not same.all(), name
        else:
            assert same.all(), name


def test_to_salib_problem_drives_salib_to_our_design():
    problem = AugmentationProblem(2, p_on={"hflip": 1.0}, n_classes=2)
    salib = problem.to_salib()
    assert salib["num_vars"] == problem.d and salib["names"] == problem.column_names
    assert salib["bounds"] == [[0.0, 1.0]] * problem.d
    assert salib["groups"][:3] == ["brightness"] * 2 + ["contrast"]
    expected = salib_sobol.sample(salib, 16, calc_second_order=False, seed=5)
    ours = SobolDesign(problem.d, 16, seed=5, groups=problem.group_columns).rows()
    np.testing.assert_array_equal(ours, expected)


COMPOSITION_PROBLEMS = {
    # erasing, rolling, hflip and rotation do not commute: the order of each row matters.
    "mixed_orders": lambda: AugmentationProblem(
        ["erasing", "rolling", "hflip", "rotation"], p_on=0.6, auxiliaries=("order",)
    ),
    # Always-on augmentations in problem order: whole-batch calls, then min-max.
    "paper_sobol": lambda: AugmentationProblem.paper(
        ["erasing", "rolling", "grayscale", "gaussian_blur"], auxiliaries=()
    ),
}


@pytest.mark.parametrize("kind", list(COMPOSITION_PROBLEMS))
def test_batched_composition_equals_per_row_reference(kind):
    problem = COMPOSITION_PROBLEMS[kind]()
    rows = np.random.default_rng(3).random((24, problem.d))
    decoded = problem.decode(rows, H, W)
    images = torch.rand(24, 3, H, W, generator=torch.Generator().manual_seed(0))
    before = images.clone()
    out = problem.augment(images, decoded)
    torch.testing.assert_close(out, _reference_augment(problem, images, decoded),
                               atol=1e-6, rtol=0)
    assert torch.equal(images, before)
    if kind == "mixed_orders":
        assert len({tuple(o) for o in decoded.order.tolist()}) > 5
        assert decoded.active.sum(dim=1).max() > 2
        # The order matters: applying every row in problem order gives other images.
        fixed = dataclasses.replace(decoded, order=torch.arange(4).repeat(24, 1))
        assert not torch.allclose(problem.augment(images, fixed), out)
    else:
        planes = out.flatten(2)
        torch.testing.assert_close(planes.amin(-1), torch.zeros(24, 3))
        torch.testing.assert_close(planes.amax(-1), torch.ones(24, 3))


def test_cpu_blocks_do_not_change_the_composition(monkeypatch):
    problem = COMPOSITION_PROBLEMS["mixed_orders"]()
    rows = np.random.default_rng(4).random((23, problem.d))
    decoded = problem.decode(rows, H, W)
    images = torch.rand(23, 3, H, W, generator=torch.Generator().manual_seed(1))
    whole = problem.augment(images, decoded)
    monkeypatch.setattr(pipeline, "CPU_BLOCK_BYTES", 5 * images[0].nbytes)
    assert [s.stop - s.start for s in pipeline._cache_blocks(images)] == [5] * 4 + [3]
    blocked = problem.augment(images, decoded)
    # per-sample ops on other batch splits: only vectorised vs scalar float32 math may differ
    torch.testing.assert_close(blocked, whole, atol=1e-6, rtol=0)


def test_augment_checks_parameters_against_the_image_size():
    problem = AugmentationProblem(["erasing"], p_on=1.0, auxiliaries=())
    decoded = problem.decode(np.full((2, problem.d), 0.99), 224, 224)
    with pytest.raises(ValueError, match=r"erasing: parameter 'center_y'.*outside its bounds"):
        problem.augment(torch.rand(2, 3, H, W), decoded)
    with pytest.raises(ValueError, match="image values must lie in"):
        problem.augment(torch.rand(2, 3, 224, 224) + 1, decoded)


def test_rows_may_be_a_tensor_and_decoding_is_deterministic():
    problem = AugmentationProblem(1, n_classes=2, images_per_class=2)
    rows = SobolDesign(problem.d, 8, seed=1, groups=problem.group_columns).rows()
    a, b = problem.decode(rows, H, W), problem.decode(torch.from_numpy(rows), H, W)
    assert torch.equal(a.order, b.order) and torch.equal(a.image_index, b.image_index)
    for name in problem.augmentations:
        for p, t in a.params[name].items():
            assert torch.equal(t, b.params[name][p])
    assert len(a.to("cpu")) == rows.shape[0]
    for pick, same_rows in ((slice(3, 9), rows[3:9]), (torch.tensor([7, 0, 5]), rows[[7, 0, 5]])):
        part, direct = a.select(pick), problem.decode(same_rows, H, W)
        assert torch.equal(part.order, direct.order) and torch.equal(part.active, direct.active)
        assert torch.equal(part.image_index, direct.image_index)
        for name in problem.augmentations:
            for p, t in part.params[name].items():
                assert torch.equal(t, direct.params[name][p])


def test_with_p_on_and_config_round_trip():
    problem = AugmentationProblem(2, p_on={"hue": 0.25}, auxiliaries=("order", "partition"),
                                  postprocess="minmax")
    again = AugmentationProblem.from_config(problem.to_config())
    assert again.column_names == problem.column_names and again.p_on == problem.p_on
    assert again.postprocess == "minmax" and again.auxiliaries == ("order", "partition")
    assert problem.with_p_on(1.0).switch_columns["hue"] is None
    assert problem.p_on["brightness"] == 0.5


VALID = list(AUGMENTATIONS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"augmentations": ["erasing", "blur"]}, r"unknown augmentation\(s\) \['blur'\].*erasing"),
        ({"augmentations": ["hue", "hue"]}, r"\['hue'\] listed more than once"),
        ({"augmentations": 3}, r"unknown augmentation set 3.*\[1, 2\]"),
        ({"augmentations": []}, "augmentations is empty"),
        ({"augmentations": 1, "p_on": 0.0}, r"must be in \(0, 1\]"),
        ({"augmentations": 1, "p_on": 1.5}, r"must be in \(0, 1\]"),
        ({"augmentations": 1, "p_on": float("nan")}, r"must be in \(0, 1\]"),
        ({"augmentations": 1, "p_on": {"hue": 0.5}}, r"p_on given for \['hue'\]"),
        ({"augmentations": 1, "auxiliaries": ["order", "colour"]},
         r"unknown auxiliary.*\['colour'\].*partition"),
        ({"augmentations": 1, "auxiliaries": ["order", "order"]}, "repeat a name"),
        ({"augmentations": 1, "n_classes": 0}, "n_classes must be an integer >= 1"),
        ({"augmentations": 1, "images_per_class": 0}, "images_per_class must be an integer >= 1"),
        ({"augmentations": 1, "n_classes": 3, "auxiliaries": ["order"]}, "no 'class' auxiliary"),
        ({"augmentations": 1, "images_per_class": 2, "auxiliaries": ["class"]},
         "no 'image' auxiliary"),
        ({"augmentations": 1, "postprocess": "clip"}, "unknown postprocess 'clip'"),
        ({"augmentations": ["hue"], "bounds": {"hue": {"factor": (-0.6, 0.1)}}},
         "leave the published range"),
        ({"augmentations": ["hue"], "bounds": {"hue": {"factor": (0.3, 0.1)}}}, "low < high"),
        ({"augmentations": ["hue"], "bounds": {"hue": {"angle": (0.0, 0.1)}}},
         "hue has no parameter 'angle'"),
        ({"augmentations": ["hue"], "bounds": {"erasing": {"scale": (0.1, 0.2)}}},
         "bounds given for 'erasing'"),
        ({"augmentations": ["hflip"], "p_on": 1.0, "auxiliaries": ()}, "no input variable"),
        ({"augmentations": 1, "colour": 1}, r"unknown problem config key\(s\) \['colour'\]"),
        ({"preset": "reference", "augmentations": 1}, "unknown problem preset"),
        ({"preset": "paper", "augmentations": 1, "method": "lhs"}, "unknown paper method"),
        ({"preset": "paper", "augmentations": 1, "p_on": 0.5}, r"\['p_on'\] are not allowed"),
        ({"p_on": 0.5}, "needs 'augmentations'"),
    ],
)
def test_bad_problem_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AugmentationProblem.from_config(kwargs)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (np.full((2, 6), 0.5), r"shape \(R, 7\)"),
        (np.full(7, 0.5), r"shape \(R, 7\)"),
        (np.full((2, 7), 1.0), r"\[0, 1\)"),
        (np.full((2, 7), -0.1), r"\[0, 1\)"),
        (np.full((2, 7), np.nan), "NaN or infinite"),
    ],
)
def test_bad_rows(rows, message):
    problem = AugmentationProblem(["erasing", "hflip"], auxiliaries=("class",), n_classes=2)
    assert problem.d == 7
    with pytest.raises(ValueError, match=message):
        problem.decode(rows, H, W)


def test_bad_size_and_mismatched_images():
    problem = AugmentationProblem(["hflip"])
    decoded = problem.decode(np.full((3, problem.d), 0.1), H, W)
    with pytest.raises(ValueError, match="height must be a positive integer"):
        problem.decode(np.full((3, problem.d), 0.1), 0, W)
    with pytest.raises(ValueError, match="2 images but decoded rows for 3 rows"):
        problem.augment(torch.rand(2, 3, H, W), decoded)
    with pytest.raises(ValueError, match=r"\(R, 3, H, W\)"):
        problem.augment(torch.rand(3, H, W), decoded)
    with pytest.raises(ValueError, match="no group 'hue'"):
        problem.group_index("hue")


def test_discrete_columns_are_the_cells_decoding_reads():
    problem = AugmentationProblem(["erasing", "grayscale", "hue"], p_on={"erasing": 0.3},
                                  n_classes=3, images_per_class=1)
    cells = problem.discrete_columns()
    switches = [problem.switch_columns[a] for a in problem.augmentations]
    assert cells[switches[0]].tolist() == [0.0, 0.3, 1.0]
    assert cells[switches[1]].tolist() == [0.0, 0.5, 1.0]
    order, klass, image = (problem.group_columns[problem.group_index(n)][0]
                           for n in ("order", "class", "image"))
    assert len(cells[order]) == 3 * 2 + 1 and len(cells[klass]) == 4
    assert image not in cells  # one image per class: nothing to balance
    assert set(cells) == {*switches, order, klass}
    # Each cell decodes to one value: its midpoint lands in it.
    midpoints = (cells[klass][:-1] + cells[klass][1:]) / 2
    rows = np.tile(np.full(problem.d, 0.1), (3, 1))
    rows[:, klass] = midpoints
    assert problem.decode(rows, 16, 16).class_index.tolist() == [0, 1, 2]
    # 12 augmentations: 12! orders, too many cells to balance (and to resolve in float64).
    everything = AugmentationProblem(list(AUGMENTATIONS))
    assert everything.group_columns[everything.group_index("order")][0] not in (
        everything.discrete_columns()
    )
