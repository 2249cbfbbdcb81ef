"""Adaptive N (EngineConfig.target_halfwidth, sensitivity.adaptive; METHOD.md "Adaptive N").

The problem without discrete columns (every augmentation always on, no auxiliaries) makes the
designs of every stage boundary exactly the fixed designs of that N, so an adaptive run is
checked against fixed runs. One design block per batch keeps every forward's batch the same in
both runs: the float32 outputs are then bit-identical and the runs differ only in the order of
their float64 sums.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import fork_ranks, torch_threads
from test_engine import AUGS, SIZE, AnalyticNet

from sensitivity import adaptive
from sensitivity.config import EngineConfig, build_design
from sensitivity.designs import (
    BalancedPairs,
    ShapleyDesign,
    SobolDesign,
    doubling_stages,
    uniform_rows,
)
from sensitivity.designs.base import _STREAM_DISCRETE
from sensitivity.distributed import shard_path
from sensitivity.engine import run_analysis
from sensitivity.problem import AugmentationProblem
from sensitivity.store import ResultsStore

# Float64 sums of at most 2^10 terms in another order: a relative error of at most about
# 2^10 x 2^-53 ~ 1e-13 per sum; the indices are ratios and differences of a few sums of
# comparable size, so 1e-10 bounds the round-off with room, and is 1000x below the 1e-7 of
# float32 outputs (which another base point or batch composition would show).
RTOL, ATOL = 1e-10, 1e-12
# Across processes each rank's power sums are re-expanded about a common shift before they are
# added: the tolerance of the fixed-N DDP tests (tests/test_analyze.py, assert_same_indices),
# which a fixed-N 2-process run of this problem also needs (4e-8 relative on ST_conf).
DDP_RTOL, DDP_ATOL = 1e-6, 1e-7


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    """One 16 px image in [0, 1] (1 class x 1 image)."""
    return torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def continuous() -> AugmentationProblem:
    """Three parametric augmentations always on, no auxiliaries: no discrete column."""
    problem = AugmentationProblem(["saturation", "brightness", "hue"], p_on=1.0, auxiliaries=[],
                                  n_classes=1, images_per_class=1)
    assert problem.discrete_columns() == {}
    return problem


def settings(method: str, **extra) -> dict:
    """One design block per batch (block_size rows: G + 2 for Sobol', G + 1 for Goda)."""
    return {"method": method, "layers": ["stats", "head"], "progress": False,
            "batch_rows": 5 if method == "sobol" else 4, **extra}


def run(problem, probe, model=None, state_path=None, **config):
    return run_analysis(model or AnalyticNet(), problem, probe, EngineConfig(**config),
                        state_path=state_path)


def assert_same(result, reference) -> None:
    assert result.n == reference.n and result.evaluations == reference.evaluations
    for layer, arrays in reference.layers.items():
        for key, value in arrays.items():
            np.testing.assert_allclose(result.layers[layer][key], value, rtol=RTOL, atol=ATOL,
                                       err_msg=f"{layer}/{key}")
        np.testing.assert_array_equal(result.flags[layer], reference.flags[layer])


def halfwidth(result) -> float:
    return adaptive.result_halfwidth(result, 0.9)


# ---------------------------------------------------------------------------------- designs
def test_stage_boundaries_hold_the_fixed_designs_base_points():
    """Every stage boundary m of a grown Sobol' design holds, per replicate, the base points
    of the m-point design (the same scrambled sequences, extended); Goda trajectories extend."""
    grown = SobolDesign(3, 256, 5, replicates=8, first_stage=16)
    points, replicates = grown.base_points(0, 256), grown.replicate_of(0, 256)
    for _, m in doubling_stages(16, 256):
        fixed = SobolDesign(3, m, 5, replicates=8)
        expected, owner = fixed.base_points(0, m), fixed.replicate_of(0, m)
        for r in range(8):
            np.testing.assert_array_equal(np.sort(points[:m][replicates[:m] == r], axis=0),
                                          np.sort(expected[owner == r], axis=0))
    np.testing.assert_array_equal(grown.rows(0, 16), SobolDesign(3, 16, 5, replicates=8).rows())
    # any block range is regenerated alone
    np.testing.assert_array_equal(np.concatenate([grown.rows(a, min(a + 7, 256))
                                                  for a in range(0, 256, 7)]), grown.rows())
    goda = ShapleyDesign(3, 96, 2, first_stage=12)
    np.testing.assert_array_equal(goda.rows(0, 40), ShapleyDesign(3, 40, 2).rows())


@pytest.mark.parametrize("first, total", [(8, 256), (6, 100)])
def test_nested_pairs_are_balanced_at_every_stage_and_start_as_the_fixed_ones(first, total):
    """The first `first` pairs are BalancedPairs(seed, first)'s; every stage's prefix holds one
    v in each of its strata; the last, partial stage at most one per stratum."""
    edges = {0: np.array([0.0, 0.5, 1.0]), 2: np.array([0.0, 0.25, 0.5, 0.75, 1.0])}
    nested = BalancedPairs(4, total, edges, first)
    strata, scale = nested._permutations()
    w = uniform_rows([4, _STREAM_DISCRETE], 0, total, 2)  # the positions apply() adds
    for start, stop in doubling_stages(first, total):
        strata_count = 2 * start if start else stop
        cells = np.floor((strata[:stop] + w[:stop]) / scale[:stop, None]
                         * strata_count).astype(int)
        for k in range(2):
            assert len(set(cells[:, k])) == stop, (start, stop, k)
    a, b = np.zeros((first, 3)), np.zeros((first, 3))
    a_fixed, b_fixed = a.copy(), b.copy()
    nested.apply(a, b, 0)
    BalancedPairs(4, first, edges).apply(a_fixed, b_fixed, 0)
    np.testing.assert_array_equal(a, a_fixed)
    np.testing.assert_array_equal(b, b_fixed)


def test_a_discrete_problem_starts_with_the_fixed_design_of_n():
    problem = AugmentationProblem(AUGS, n_classes=2, images_per_class=2)
    for method in ("sobol", "shapley"):
        fixed = build_design(problem, EngineConfig(method=method, n=32))
        grown = build_design(problem, EngineConfig(method=method, n=32, target_halfwidth=0.1,
                                                   max_n=256))
        assert grown.n_blocks == 256
        np.testing.assert_array_equal(grown.rows(0, 32), fixed.rows())


# ------------------------------------------------------------------------------------- runs
@pytest.mark.parametrize("method", ["sobol", "shapley"])
def test_stops_at_the_smallest_n_meeting_the_target_and_equals_that_fixed_run(
    method, continuous, probe
):
    fixed = {n: run(continuous, probe, n=n, **settings(method)) for n in (16, 32, 64, 128, 256)}
    widths = {n: halfwidth(result) for n, result in fixed.items()}
    # A target between the half-width at 128 and every larger one before it: the smallest
    # sufficient N is the first whose half-width is below it.
    eps = (widths[128] + min(widths[n] for n in (16, 32, 64))) / 2
    expected = min(n for n, width in widths.items() if width <= eps)
    result = run(continuous, probe, n=16, target_halfwidth=eps, max_n=256, **settings(method))
    assert result.n == expected
    assert_same(result, fixed[expected])
    assert result.settings["halfwidth_reached"] == pytest.approx(widths[expected], rel=1e-9)
    assert result.settings["target_met"] is True
    assert {k: result.settings[k] for k in ("n_start", "max_n", "halfwidth_quantile")} == {
        "n_start": 16, "max_n": 256, "halfwidth_quantile": 0.9}


def test_progress_shows_the_half_width_against_the_target(continuous, probe, capsys):
    with pytest.warns(adaptive.HalfwidthWarning):
        run(continuous, probe, n=16, target_halfwidth=1e-6, max_n=64,
            **settings("sobol", progress=True))
    err = capsys.readouterr().err
    assert err.startswith("sobol: 80 rows (16 blocks of 5 rows, 1 blocks per batch), N = 16 "
                          "first (adaptive: doubled up to 64 until the half-width is <= 1e-06)")
    decisions = re.findall(r"sobol: half-width ([\d.e-]+) > target 1e-06 at N=(\d+), growing "
                           r"to (\d+)", err)
    assert [(n, grown) for _, n, grown in decisions] == [("16", "32"), ("32", "64")]
    assert "sobol: 160 rows (32 blocks of 5 rows, 1 blocks per batch), N 32 -> 64 (adaptive)" in err
    assert re.search(r"sobol: half-width [\d.e-]+ > target 1e-06 at N=64 = max_n: stopped", err)


def test_max_n_reached_warns_with_the_half_width_and_the_n_needed(continuous, probe, tmp_path):
    with pytest.warns(adaptive.HalfwidthWarning) as caught:
        result = run(continuous, probe, n=16, target_halfwidth=0.001, max_n=32,
                     **settings("sobol"))
    reached = result.settings["halfwidth_reached"]
    needed = 1 << (int(np.ceil(32 * (reached / 0.001) ** 2)) - 1).bit_length()
    assert str(caught[0].message) == (
        f"adaptive sobol stopped at max_n = 32 with the 0.9 quantile of the half-widths at "
        f"{reached:.3g}, above the target 0.001; about N = {needed} would reach it (half-widths "
        f"shrink as 1/sqrt(N)): raise max_n")
    assert result.n == 32 and result.settings["target_met"] is False
    store = ResultsStore(tmp_path / "results.h5")
    store.write_analysis("sobol", result)
    with h5py.File(tmp_path / "results.h5") as f:
        attrs = f["analyses/sobol"].attrs
        assert attrs["n"] == 32 and attrs["max_n"] == 32 and not attrs["target_met"]
        assert attrs["target_halfwidth"] == 0.001 and attrs["halfwidth_reached"] == reached


def test_a_killed_adaptive_run_resumes_to_the_uninterrupted_sums(continuous, probe, tmp_path):
    config = settings("sobol", n=16, target_halfwidth=1e-6, max_n=64, checkpoint_every=3)
    with pytest.warns(adaptive.HalfwidthWarning):
        reference = run(continuous, probe, **config)
    state = tmp_path / "state.pt"
    # 16 + 16 blocks of stages 0 and 1, then 5 of stage 2 [32, 64): saved after block 35.
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(continuous, probe, AnalyticNet(fail_after=37), state_path=state, **config)
    saved = torch.load(state, weights_only=True)
    assert (saved["stage"], saved["next_block"]) == (2, 35)
    model = AnalyticNet()
    with pytest.warns(adaptive.HalfwidthWarning):
        resumed = run(continuous, probe, model, state_path=state, **config)
    assert model.batches == 64 - 35 and not state.exists()
    assert_same(resumed, reference)
    assert resumed.settings["halfwidth_reached"] == reference.settings["halfwidth_reached"]


def _ddp_worker(rank: int, world_size: int, problem, probe, out: str) -> None:
    """One rank of a gloo group: an adaptive run killed in stage 1 then in stage 2, and resumed
    with rank 1's state put back to stage 1 (a rank killed between a stage's decision and its
    boundary save): it must catch up and end with the sums of an uninterrupted run."""
    torch.set_num_threads(1)
    config = EngineConfig(**settings("sobol", n=8, target_halfwidth=1e-6, max_n=64,
                                     checkpoint_every=2))
    state = Path(out) / "state.pt"
    mine, old = shard_path(state, rank, world_size), Path(out) / f"old{rank}.pt"
    # Per rank: 4 blocks of stage 0, then 2 of stage 1's 4 (saved at its 2nd).
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_analysis(AnalyticNet(fail_after=6), problem, probe, config, state_path=state)
    shutil.copy(mine, old)
    # The 2 blocks left of stage 1, then 3 of stage 2's 8 (saved at its 2nd).
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_analysis(AnalyticNet(fail_after=5), problem, probe, config, state_path=state)
    if rank == 1:
        shutil.copy(old, mine)
    stages = torch.load(mine, weights_only=True)["stage"]
    result = run_analysis(AnalyticNet(), problem, probe, config, state_path=state)
    np.savez(Path(out) / f"rank{rank}.npz", **{f"{layer}/{key}": value
                                               for layer, arrays in result.layers.items()
                                               for key, value in arrays.items()})
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(
        {"n": result.n, "stage": stages, "halfwidth": result.settings["halfwidth_reached"]}))


@pytest.mark.slow
def test_two_process_ddp_with_resumes_equals_one_process(continuous, probe, tmp_path):
    # One thread, as the ranks: the float32 reductions of the forward then round alike.
    with pytest.warns(adaptive.HalfwidthWarning), torch_threads(1):
        reference = run(continuous, probe, **settings("sobol", n=8, target_halfwidth=1e-6,
                                                      max_n=64))
    fork_ranks(_ddp_worker, 2, continuous, probe, str(tmp_path))
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["stage"] for r in records] == [2, 1]  # the ranks resumed in different stages
    for rank, record in enumerate(records):
        assert record["n"] == 64
        assert record["halfwidth"] == pytest.approx(reference.settings["halfwidth_reached"],
                                                    rel=DDP_RTOL)
        arrays = np.load(tmp_path / f"rank{rank}.npz")
        for layer, values in reference.layers.items():
            for key, value in values.items():
                np.testing.assert_allclose(arrays[f"{layer}/{key}"], value, rtol=DDP_RTOL,
                                           atol=DDP_ATOL, err_msg=f"rank {rank} {layer}/{key}")


@pytest.mark.parametrize("bad, message", [
    ({"target_halfwidth": 0.0, "max_n": 64}, "target_halfwidth must be a number > 0, got 0.0"),
    ({"target_halfwidth": -1, "max_n": 64}, "target_halfwidth must be a number > 0"),
    ({"target_halfwidth": 0.1}, "target_halfwidth needs max_n"),
    ({"max_n": 64}, r"max_n \(64\) applies only to an adaptive run"),
    ({"target_halfwidth": 0.1, "max_n": 8}, r"max_n must be an integer >= n \(16\), got 8"),
    ({"target_halfwidth": 0.1, "max_n": 48}, "max_n must be a power of two, got 48"),
    ({"target_halfwidth": 0.1, "max_n": 64, "halfwidth_quantile": 0.0},
     r"halfwidth_quantile must lie in \(0, 1\]"),
    ({"target_halfwidth": 0.1, "max_n": 64, "halfwidth_quantile": 1.5},
     r"halfwidth_quantile must lie in \(0, 1\]"),
    ({"method": "variance", "target_halfwidth": 0.1, "max_n": 64},
     "target_halfwidth .adaptive N. applies to sobol and shapley, not variance"),
])
def test_bad_adaptive_settings_are_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**{"n": 16, **bad})


def test_shapley_takes_any_max_n_and_ends_on_it():
    assert adaptive.stages(EngineConfig(method="shapley", n=24, target_halfwidth=0.1,
                                        max_n=100)) == [(0, 24), (24, 48), (48, 96), (96, 100)]
    assert adaptive.stages(EngineConfig(method="sobol", n=16)) == [(0, 16)]
