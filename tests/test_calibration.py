"""Numbers a researcher can trust, on the designs the engine builds.

- Switches: every augmentation's switch toggles between A and AB_j in its expected share of the
  base points whatever N (balanced pairs), so a unit that is the switch itself gets S1 = ST = 1
  with a real interval instead of 0 or 2 with none.
- Intervals: on Ishigami, the 95% intervals of the engine's Sobol' design kinds (replicated
  scrambled Sobol' points with Student-t intervals; i.i.d. points with the delta method) and of
  Goda's shares cover the analytic values in 88-99% of seeds, and are not wider than twice
  what the estimators' actual error calls for.

Why 200 seeds, where the issue asked for 100: a calibrated 95% interval covers all of 100 seeds
with probability 0.6%, and 27 indices are checked here, so a 100-seed test of the 88-99 band
fails by chance about once in six seed sets (it did: Goda's share of x1 at N = 1024 covers 100
of seeds 0-99, and 94.0% of 1000 seeds). With 200 seeds the same band fails by chance about
once in a hundred.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_gsa import ISH_S1, ISH_SHAPLEY, ISH_ST, ISHIGAMI, V_ISH, ishigami

from sensitivity.augmentations import AUGMENTATIONS
from sensitivity.config import EngineConfig, build_design
from sensitivity.designs import ShapleyDesign, SobolDesign
from sensitivity.estimators import SobolAccumulator
from sensitivity.gsa import shapley_from_outputs
from sensitivity.problem import AugmentationProblem

SEEDS = 200
COVERAGE_BAND = (0.88, 0.99)
# Mean half-width at most this many times 1.96 RMSE: intervals may be conservative, not useless.
WIDTH_RATIO = 2.0
# Base points / trajectories: n = 256 is in make test-fast, the larger ones (seconds each) are slow.
SAMPLE_SIZES = [256, pytest.param(1024, marks=pytest.mark.slow),
                pytest.param(4096, marks=pytest.mark.slow)]


def _pure_switch_indices(problem: AugmentationProblem, n: int, seed: int):
    """Sobol' indices of the outputs Y_a = 1[augmentation a is on], on the engine's design."""
    config = EngineConfig(method="sobol", n=n, seed=seed)
    design = build_design(problem, config)
    active = problem.decode(design.rows(), 64, 64).active.double()
    g, k = len(problem.groups), len(problem.augmentations)
    acc = SobolAccumulator(g, (k,), replicates=config.effective_replicates)
    acc.update(active.reshape(n, g + 2, k), torch.from_numpy(design.replicate_of(0, n)))
    return acc.compute()


@pytest.mark.slow
def test_a_pure_switch_unit_gets_indices_of_one_with_real_intervals():
    problem = AugmentationProblem(list(AUGMENTATIONS), n_classes=10, images_per_class=8)
    rows = [problem.group_index(a) for a in problem.augmentations]
    units = np.arange(len(problem.augmentations))
    covered = np.zeros(len(units))
    pairs = 0
    for n in (8, 16, 32, 64):
        for seed in range(16):
            r = _pure_switch_indices(problem, n, seed)
            s1, st = r.S1[rows, units], r.ST[rows, units]
            h1, ht = r.S1_conf[rows, units], r.ST_conf[rows, units]
            where = f"n={n} seed={seed}"
            assert not np.isin(s1, [0.0, 2.0]).any(), f"{where}: S1 {s1}"
            assert not np.isin(st, [0.0, 2.0]).any(), f"{where}: ST {st}"
            assert (h1 > 0).all() and (ht > 0).all(), f"{where}: half-widths {h1} {ht}"
            covered += (np.abs(s1 - 1) <= h1) & (np.abs(st - 1) <= ht)
            assert (r.flag == 0).all()
            pairs += 1
    share = covered / pairs
    assert (share >= 0.9).all(), dict(zip(problem.augmentations, share, strict=True))


def test_switches_toggle_in_their_expected_share_of_base_points():
    """p_on = 0.3: a switch differs between A and B in 2 p (1 - p) = 42% of the base points for
    any n, and A is on in 30% of them, each up to less than 2 points (stratified sampling: one
    partial stratum at each end of the quantity's interval); B's "on" is two intervals of the
    stratified variable (cells on-on and off-on), so less than 4 points."""
    problem = AugmentationProblem(["grayscale", "hflip", "hue"], p_on=0.3, n_classes=3,
                                  images_per_class=2)
    for n in (8, 64, 1024):
        design = build_design(problem, EngineConfig(method="sobol", n=n, seed=1))
        a, b = design.pair_rows(0, n)
        for name in problem.augmentations:
            column = problem.switch_columns[name]
            on_a, on_b = a[:, column] < 0.3, b[:, column] < 0.3
            assert abs(on_a.sum() - 0.3 * n) < 2 and abs(on_b.sum() - 0.3 * n) < 4
            assert abs((on_a != on_b).sum() - 0.42 * n) < 2, (name, n)
            assert abs((on_a & on_b).sum() - 0.09 * n) < 2
        classes_a = np.floor(a[:, problem.group_columns[problem.group_index("class")][0]] * 3)
        assert np.abs(np.bincount(classes_a.astype(int), minlength=3) - n / 3).max() < 2


def _coverage(estimates, half_widths, truth) -> tuple[np.ndarray, np.ndarray]:
    """(share of seeds covered, mean half-width / (1.96 RMSE)) per index; arrays (S, k)."""
    covered = (np.abs(estimates - truth) <= half_widths).mean(0)
    rmse = np.sqrt(((estimates - truth) ** 2).mean(0))
    return covered, half_widths.mean(0) / (1.96 * rmse)


def _assert_calibrated(label: str, estimates, half_widths, truth) -> None:
    covered, width = _coverage(np.asarray(estimates), np.asarray(half_widths), truth)
    low, high = COVERAGE_BAND
    assert np.all((covered >= low) & (covered <= high)), f"{label}: coverage {covered}"
    assert np.all(width <= WIDTH_RATIO), f"{label}: half-width / (1.96 RMSE) {width}"


@pytest.mark.parametrize("sampling", ["rqmc", "mc"])
@pytest.mark.parametrize("n", SAMPLE_SIZES)
def test_sobol_intervals_are_calibrated_on_ishigami(sampling, n):
    config = EngineConfig(method="sobol", n=n, sampling=sampling)
    replicates = config.effective_replicates
    designs = [
        SobolDesign(3, n, seed=seed, replicates=replicates,
                    sampling="sobol" if sampling == "rqmc" else "random")
        for seed in range(SEEDS)
    ]
    # Every seed is one unit of the same accumulator (the replicate layout is shared).
    Y = np.stack([ishigami(ISHIGAMI.scale(d.rows())) for d in designs], axis=1)
    acc = SobolAccumulator(3, (SEEDS,), replicates=replicates)
    ids = torch.from_numpy(designs[0].replicate_of(0, n)) if replicates > 1 else None
    acc.update(torch.from_numpy(Y).reshape(n, 5, SEEDS), ids)
    r = acc.compute()
    _assert_calibrated(f"{sampling} S1 n={n}", r.S1.T, r.S1_conf.T, ISH_S1)
    _assert_calibrated(f"{sampling} ST n={n}", r.ST.T, r.ST_conf.T, ISH_ST)


@pytest.mark.parametrize("n", SAMPLE_SIZES)
def test_goda_shares_are_calibrated_on_ishigami(n):
    shares, half_widths = [], []
    for seed in range(SEEDS):
        X = ISHIGAMI.scale(ShapleyDesign(3, n, seed=seed).rows())
        # The group order of each trajectory is read from X (every step changes its variable).
        r = shapley_from_outputs(ISHIGAMI, X, ishigami(X))
        shares.append(r.shapley_normalized)
        half_widths.append(r.shapley_normalized_conf)
    _assert_calibrated(f"Goda shares n={n}", shares, half_widths, ISH_SHAPLEY / V_ISH)
