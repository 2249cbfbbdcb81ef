"""Designs over the unit hypercube: block regeneration, SALib layouts, Sobol fast-forward."""

from __future__ import annotations

import time

import numpy as np
import pytest
import SALib.analyze.shapley as salib_shapley_analyze
import SALib.sample.shapley as salib_shapley
import SALib.sample.sobol as salib_sobol
from scipy.stats import qmc

from sensitivity.designs import (
    ContrastDesign,
    PermutationDesign,
    ShapleyDesign,
    SobolDesign,
    VarianceDesign,
    saltelli_rows,
)
from sensitivity.problem import AugmentationProblem

GROUPS = [[0, 3], [1], [2, 4, 5]]  # non-contiguous on purpose


def _salib_problem(d: int, groups: list[list[int]] | None) -> dict:
    names = [f"x{c}" for c in range(d)]
    problem = {"num_vars": d, "names": names, "bounds": [[0.0, 1.0]] * d}
    if groups is not None:
        owner = {c: f"g{j}" for j, cols in enumerate(groups) for c in cols}
        problem["groups"] = [owner[c] for c in range(d)]
    return problem


def _contrast_problem() -> AugmentationProblem:
    return AugmentationProblem(
        ["erasing", "grayscale", "rolling"], p_on={"erasing": 0.3, "grayscale": 0.9},
        auxiliaries=("order", "class", "image", "partition"), n_classes=3, images_per_class=2,
    )


# Discrete columns as AugmentationProblem.discrete_columns() gives them: a switch, 3 classes.
DISCRETE = {0: [0.0, 0.5, 1.0], 4: [0.0, 1 / 3, 2 / 3, 1.0]}

DESIGNS = {
    "sobol": lambda: SobolDesign(6, 16, seed=4),
    "sobol_replicated_balanced": lambda: SobolDesign(6, 16, seed=4, groups=GROUPS, replicates=4,
                                                     discrete=DISCRETE),
    "sobol_random_balanced": lambda: SobolDesign(6, 16, seed=4, sampling="random",
                                                 discrete=DISCRETE),
    "shapley_balanced": lambda: ShapleyDesign(6, 12, seed=4, groups=GROUPS, discrete=DISCRETE),
    "sobol_grouped_second_order": lambda: SobolDesign(6, 16, seed=4, groups=GROUPS,
                                                      second_order=True),
    "shapley": lambda: ShapleyDesign(6, 12, seed=4),
    "shapley_grouped": lambda: ShapleyDesign(6, 12, seed=4, groups=GROUPS),
    "permutation": lambda: PermutationDesign(6, 5, n_outer=3, n_inner=2, seed=4, groups=GROUPS),
    "contrast": lambda: ContrastDesign(_contrast_problem(), n_images=6, k=3, seed=4),
    "variance": lambda: VarianceDesign(6, 20, seed=4),
}


@pytest.mark.parametrize("kind", list(DESIGNS))
def test_blocks_regenerate_alone(kind):
    design = DESIGNS[kind]()
    full = design.rows()
    bs = design.block_size
    assert full.shape == (design.n_rows, design.d) == (design.n_blocks * bs, design.d)
    assert full.dtype == np.float64 and full.min() >= 0.0 and full.max() < 1.0
    assert len(design.row_kinds()) == bs
    for b in (0, 1, design.n_blocks - 1):
        np.testing.assert_array_equal(design.block(b), full[b * bs : (b + 1) * bs])
    np.testing.assert_array_equal(design.rows(2, 5), full[2 * bs : 5 * bs])
    # A fresh object with the same seed gives the same design; another seed does not.
    np.testing.assert_array_equal(DESIGNS[kind]().rows(), full)
    assert design.rows(3, 3).shape == (0, design.d)


def test_variance_design_regenerates_any_slice():
    design = VarianceDesign(d=9, n=100, seed=5)
    whole = design.rows()
    assert whole.shape == (100, 9) and 0.0 <= whole.min() and whole.max() < 1.0
    assert design.block_size == 1 and design.row_kinds() == ["row"]
    np.testing.assert_array_equal(design.rows(37, 81), whole[37:81])


def test_other_seed_changes_every_design():
    assert not np.array_equal(SobolDesign(3, 8, seed=0).rows(), SobolDesign(3, 8, seed=1).rows())
    assert not np.array_equal(ShapleyDesign(3, 8, seed=0).rows(), ShapleyDesign(3, 8, 1).rows())
    assert not np.array_equal(
        PermutationDesign(3, 2, 2, 2, seed=0).rows(), PermutationDesign(3, 2, 2, 2, seed=1).rows()
    )


@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.parametrize("groups", [None, GROUPS], ids=["ungrouped", "grouped"])
def test_sobol_equals_salib_sample(groups, second_order):
    # SALib orders groups by first appearance; GROUPS is already in that order.
    expected = salib_sobol.sample(
        _salib_problem(6, groups), 32, calc_second_order=second_order, seed=7
    )
    design = SobolDesign(6, 32, seed=7, groups=groups, second_order=second_order)
    np.testing.assert_array_equal(design.rows(), expected)
    # The same cross-sampling from SALib's own A and B rows.
    bs = design.block_size
    a, b = expected[0::bs], expected[bs - 1 :: bs]
    np.testing.assert_array_equal(saltelli_rows(a, b, groups, second_order), expected)


def test_sobol_layout_and_row_kinds():
    design = SobolDesign(6, 8, seed=1, groups=GROUPS, second_order=True)
    assert design.row_kinds() == ["A", "AB_0", "AB_1", "AB_2", "BA_0", "BA_1", "BA_2", "B"]
    block = design.block(5)
    a, b = block[0], block[-1]
    for j, cols in enumerate(GROUPS):
        other = [c for c in range(6) if c not in cols]
        np.testing.assert_array_equal(block[1 + j, cols], b[cols])
        np.testing.assert_array_equal(block[1 + j, other], a[other])
        np.testing.assert_array_equal(block[4 + j, cols], a[cols])
        np.testing.assert_array_equal(block[4 + j, other], b[other])


def test_sobol_point_n_without_generating_earlier_points():
    # 2^17 base points x 8 groups: the tail block range is built from a fast-forwarded engine.
    design = SobolDesign(8, 2**17, seed=3)
    start, stop = 2**17 - 64, 2**17
    began = time.perf_counter()
    tail = design.rows(start, stop)
    elapsed = time.perf_counter() - began
    full_base = qmc.Sobol(d=16, scramble=True, seed=3).random(2**17)
    expected = saltelli_rows(full_base[start:, :8], full_base[start:, 8:])
    np.testing.assert_array_equal(tail, expected)
    # A Python loop over the 131008 skipped points would take far longer than this.
    assert elapsed < 0.5, f"rows({start}, {stop}) took {elapsed:.3f} s"


def test_every_replicate_is_a_balanced_scrambled_sequence_of_its_own():
    """R = 4 replicates of 8 points: in each, every column of A and of B puts one point in each
    eighth of [0, 1) (the first 2^m points of a scrambled Sobol' sequence), and the replicates
    are independent scrambles, not one sequence cut in four."""
    design = SobolDesign(5, 32, seed=2, replicates=4)
    base = design.base_points(0, 32)
    assert design.replicate_of(0, 32).tolist() == [r for r in range(4) for _ in range(8)]
    for r in range(4):
        points = base[8 * r : 8 * (r + 1)]
        for column in range(10):
            assert sorted(np.floor(points[:, column] * 8).astype(int)) == list(range(8))
    one_sequence = SobolDesign(5, 32, seed=2).base_points(0, 32)
    assert not np.array_equal(base, one_sequence)
    # A slice spanning two replicates equals the same slice of the whole design.
    np.testing.assert_array_equal(design.base_points(5, 19), base[5:19])


def test_balanced_pairs_replace_only_the_discrete_columns():
    plain = SobolDesign(6, 16, seed=4, replicates=4)
    balanced = SobolDesign(6, 16, seed=4, replicates=4, discrete=DISCRETE)
    a0, b0 = plain.pair_rows(0, 16)
    a1, b1 = balanced.pair_rows(0, 16)
    other = [1, 2, 3, 5]
    np.testing.assert_array_equal(a0[:, other], a1[:, other])
    np.testing.assert_array_equal(b0[:, other], b1[:, other])
    # Cell midpoints; the switch (p = 0.5) is on in half of A and of B and differs in half.
    for values, cells in ((a1[:, 0], 2), (b1[:, 0], 2), (a1[:, 4], 3), (b1[:, 4], 3)):
        np.testing.assert_allclose(np.modf(values * cells)[0], 0.5)
    assert (a1[:, 0] < 0.5).sum() == (b1[:, 0] < 0.5).sum() == 8
    assert ((a1[:, 0] < 0.5) != (b1[:, 0] < 0.5)).sum() == 8
    with pytest.raises(ValueError, match="increase strictly from 0 to 1"):
        SobolDesign(6, 16, discrete={0: [0.0, 0.7, 0.5, 1.0]})
    with pytest.raises(ValueError, match="outside the design's columns"):
        SobolDesign(6, 16, discrete={6: [0.0, 1.0]})


def test_sobol_rejects_n_not_power_of_two():
    with pytest.raises(ValueError, match=r"power of two.*balanced.*use 512 or 1024"):
        SobolDesign(3, 1000)
    with pytest.raises(ValueError, match="at most 2\\^30"):
        SobolDesign(3, 2**31)
    with pytest.raises(ValueError, match="replicates must be a power of two"):
        SobolDesign(3, 16, replicates=3)
    with pytest.raises(ValueError, match="must not exceed n"):
        SobolDesign(3, 16, replicates=32)
    with pytest.raises(ValueError, match="unknown sampling"):
        SobolDesign(3, 16, sampling="halton")


def test_shapley_ungrouped_matches_salib_structure():
    d, n = 5, 40
    design = ShapleyDesign(d, n, seed=11)
    x = design.rows()
    assert x.shape == salib_shapley.sample(_salib_problem(d, None), n, seed=0).shape
    traj = x.reshape(n, d + 1, d)
    changed = traj[:, 1:] != traj[:, :-1]
    assert np.all(changed.sum(axis=2) == 1)
    # The factor changed at step s is the permutation's s-th entry.
    np.testing.assert_array_equal(changed.argmax(axis=2), design.permutations())
    np.testing.assert_array_equal(design.permutation(7), design.permutations(7, 8)[0])
    # SALib's analyze validates exactly this structure; on Y = sum c_i x_i the Shapley effect of
    # x_i is c_i^2 / 12, estimated here to within a few standard errors.
    coef = np.arange(1.0, d + 1.0)
    result = salib_shapley_analyze.analyze(_salib_problem(d, None), x, x @ coef)
    assert np.all(np.abs(result["shapley"] - coef**2 / 12) <= 4 * result["shapley_conf"] / 1.96)


def test_shapley_grouped_swaps_whole_groups():
    design = ShapleyDesign(6, 20, seed=2, groups=GROUPS)
    traj = design.rows().reshape(20, len(GROUPS) + 1, 6)
    perms = design.permutations()
    for t in range(20):
        for step, group in enumerate(perms[t], start=1):
            changed = np.flatnonzero(traj[t, step] != traj[t, step - 1])
            np.testing.assert_array_equal(changed, sorted(GROUPS[group]))
        # Last row is x2 entirely: every column differs from x1.
        assert np.all(traj[t, -1] != traj[t, 0])


def test_permutation_design_layout():
    g, no, ni = len(GROUPS), 3, 4
    design = PermutationDesign(6, 4, n_outer=no, n_inner=ni, seed=9, groups=GROUPS)
    assert design.block_size == g * no * ni
    assert design.row_kinds()[: ni + 1] == [f"pos_0/outer_0/inner_{i}" for i in range(ni)] + [
        "pos_0/outer_1/inner_0"
    ]
    for b in range(4):
        perm = design.permutation(b)
        block = design.block(b).reshape(g, no, ni, 6)
        for j in range(g):
            in_j = sorted(c for group in perm[: j + 1] for c in GROUPS[group])
            out_j = [c for c in range(6) if c not in in_j]
            for l in range(no):  # noqa: E741
                # Columns outside J shared by the inner rows of an outer sample, J drawn afresh.
                assert np.all(block[j, l, :, out_j] == block[j, l, :1, out_j])
                assert np.all(block[j, l, 1:, in_j] != block[j, l, :1, in_j])
            if out_j:
                assert np.all(block[j, 1:, 0, out_j] != block[j, :1, 0, out_j])
    np.testing.assert_array_equal(design.permutations(1, 3), design.permutations()[1:3])


def test_contrast_rows_decode_to_original_and_single_augmentations():
    problem = _contrast_problem()
    k = 3
    design = ContrastDesign(problem, n_images=6, k=k, seed=1)
    assert design.n_blocks == 12  # 6 images x 2 partitions
    assert design.row_kinds()[:2] == ["original", "erasing_0"]
    decoded = problem.decode(design.rows(), 16, 16)
    n_aug = len(problem.augmentations)
    active = decoded.active.numpy().reshape(12, 1 + n_aug * k, n_aug)
    assert not active[:, 0].any()
    for a in range(n_aug):
        rows = active[:, 1 + a * k : 1 + (a + 1) * k]
        assert rows[..., a].all() and rows.sum(axis=-1).max() == 1
    block_of_row = np.repeat(np.arange(12), design.block_size)
    np.testing.assert_array_equal(decoded.image_index.numpy(), block_of_row % 6)
    np.testing.assert_array_equal(decoded.class_index.numpy(), (block_of_row % 6) // 2)
    np.testing.assert_array_equal(decoded.partition.numpy(), block_of_row // 6)
    # The K treated rows of one augmentation get fresh parameters.
    scale = decoded.params["erasing"]["scale"].numpy().reshape(12, -1)[:, 1 : 1 + k]
    assert np.all(scale[:, 1:] != scale[:, :1])


def test_contrast_rejects_always_on_augmentation():
    problem = AugmentationProblem(["erasing", "grayscale"], p_on={"erasing": 1.0})
    with pytest.raises(ValueError, match=r"\['erasing'\] have p_on = 1.*with_p_on"):
        ContrastDesign(problem, n_images=1, k=2)
    ContrastDesign(problem.with_p_on(0.5), n_images=1, k=2)  # the suggested fix works
    with pytest.raises(ValueError, match="exceeds the problem's 1 probe images"):
        ContrastDesign(problem.with_p_on(0.5), n_images=2, k=2)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SobolDesign(4, 8, groups=[[0, 1], [1, 2, 3]]), "partition the columns"),
        (lambda: SobolDesign(4, 8, groups=[[0, 1]]), "partition the columns"),
        (lambda: SobolDesign(4, 8, groups=[[0, 1, 2, 3], []]), "at least one column"),
        (lambda: SobolDesign(0, 8), "d must be an integer >= 1"),
        (lambda: SobolDesign(2, 8, seed=-1), "seed must be an integer >= 0"),
        (lambda: ShapleyDesign(2, 0), "number of trajectories"),
        (lambda: PermutationDesign(2, 3, n_outer=2, n_inner=1), "n_inner must be an integer >= 2"),
        (lambda: SobolDesign(2, 8).rows(3, 9), r"block range \[3, 9\) is outside"),
        (lambda: SobolDesign(2, 8).rows(5, 3), r"block range \[5, 3\)"),
        (lambda: ShapleyDesign(2, 4).block(4), r"outside this design's 4 blocks"),
        (lambda: saltelli_rows(np.zeros((3, 2)), np.zeros((3, 3))), "equal shape"),
    ],
)
def test_bad_design_input(make, message):
    with pytest.raises(ValueError, match=message):
        make()
