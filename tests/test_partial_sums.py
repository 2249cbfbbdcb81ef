"""float32 partial sums of the power-sum accumulators (sensitivity.estimators.partial_sums).

A batch's sums are taken in float32 for float32 outputs and added to float64 states. Checked:
exactness where float32 arithmetic is exact, the round-off against its derived bound on realistic
outputs (and against the indices' own half-widths), the float64 fallbacks, and that worker
threads change nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import requires_cuda

from sensitivity.estimators import MomentsAccumulator, SobolAccumulator
from sensitivity.estimators.partial_sums import compute_dtype, round_off_bound

G = 3
UNITS = (5, 7)


def _accumulators(second_order: bool, replicates: int) -> list:
    return [SobolAccumulator(G, UNITS, second_order, replicates=replicates) for _ in range(2)]


def _block_size(second_order: bool) -> int:
    return 2 * G + 2 if second_order else G + 2


def _states(acc) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in acc.metric_state.items()}


def _symmetric_integers(n_blocks: int, block_size: int, seed: int) -> torch.Tensor:
    """Integer outputs in [-3, 3] whose mean over the batch is exactly 0 per unit (each block
    followed by its negation): the shift is 0 and every term and partial sum is an integer
    below 2^24, so float32 arithmetic is exact."""
    gen = torch.Generator().manual_seed(seed)
    half = torch.randint(-3, 4, (n_blocks // 2, block_size, *UNITS), generator=gen)
    return torch.stack([half, -half], dim=1).reshape(n_blocks, block_size, *UNITS).float()


@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.parametrize("replicates", [1, 4])
def test_float32_partial_sums_are_exact_where_float32_is(second_order, replicates):
    low, exact = _accumulators(second_order, replicates)
    for seed in range(3):
        y = _symmetric_integers(8, _block_size(second_order), seed)
        replicate = torch.arange(8) // 2 if replicates > 1 else None
        assert compute_dtype(y, torch.zeros(1, dtype=torch.float64), -3.0, 3.0) == torch.float32
        low.update(y, replicate)
        exact.update(y.double(), replicate)
    for name, value in _states(exact).items():
        assert torch.equal(getattr(low, name), value), name


def test_moments_float32_partial_sums_are_exact_where_float32_is():
    low, exact = MomentsAccumulator(UNITS), MomentsAccumulator(UNITS)
    for seed in range(3):
        y = _symmetric_integers(16, 1, seed)[:, 0]
        low.update(y)
        exact.update(y.double())
    for name, value in _states(exact).items():
        assert torch.equal(getattr(low, name), value), name


def _realistic(n_blocks: int, block_size: int, seed: int) -> torch.Tensor:
    """Outputs with a mean of 3, unit-dependent interactions and heavy-ish tails."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_blocks, block_size, *UNITS, generator=gen, dtype=torch.float64)
    scale = torch.linspace(0.1, 2.0, int(np.prod(UNITS)), dtype=torch.float64).reshape(UNITS)
    return (3.0 + scale * (x + 0.3 * x**2)).float()


@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.parametrize("replicates", [1, 16])
def test_float32_round_off_is_within_its_bound(second_order, replicates):
    """Every state entry of the float32 path is within gamma_(n + k) * (sum of the terms'
    magnitudes) of the float64 path's. Each term is a product of at most four shifted outputs
    or differences of two (|AB_j - A| <= 2M, |H| <= 4M, |Z| <= 16 M^2 with M the largest
    |y - shift|), so every magnitude is at most (4M)^4 (and at least the count 1); k = 8 covers
    a term's roundings (the shift, a difference, a half and up to five products)."""
    low, exact = _accumulators(second_order, replicates)
    blocks, updates, outputs = 32, 4, []
    for step in range(updates):
        y = _realistic(blocks, _block_size(second_order), step)
        replicate = (torch.arange(blocks) + step * blocks) // (blocks * updates // replicates)
        replicate = replicate if replicates > 1 else None
        low.update(y, replicate)
        exact.update(y.double(), replicate)
        outputs.append(y.double().reshape(-1, int(np.prod(UNITS))))
    spread = float((torch.cat(outputs) - exact.shift).abs().max())
    bound = round_off_bound(blocks, 8) * blocks * updates * max(1.0, 4 * float(spread)) ** 4
    for name, value in _states(exact).items():
        difference = (getattr(low, name) - value).abs().max()
        assert difference <= bound, (name, float(difference), bound)
    # And what a user sees: the indices move by far less than their statistical half-widths.
    a, b = exact.compute(), low.compute()
    valid = a.flag == 0
    for key in ("S1", "ST"):
        half_width = getattr(a, f"{key}_conf")[:, valid]
        moved = np.abs(getattr(a, key) - getattr(b, key))[:, valid]
        assert (moved <= 1e-3 * half_width).all(), key
        # and the half-widths themselves (variances of per-block terms, which cancel)
        moved = np.abs(getattr(a, f"{key}_conf") - getattr(b, f"{key}_conf"))[:, valid]
        assert (moved <= 1e-3 * half_width).all(), f"{key}_conf"


def test_float32_overflow_falls_back_to_float64():
    """A spread whose fourth power would overflow float32 is summed in float64: the indices
    agree with those of the same values given as float64 to float64 round-off (float32 partial
    sums would differ by ~1e-6), and no term overflowed."""
    y = _realistic(8, G + 2, 0) * 1e28
    low, exact = _accumulators(False, 1)
    low.update(y)
    assert compute_dtype(y, low.shift, float(y.min()), float(y.max())) == torch.float64
    exact.update(y.double())
    a, b = exact.compute(), low.compute()
    for key in ("S1", "ST", "variance"):
        np.testing.assert_allclose(getattr(b, key), getattr(a, key), rtol=1e-9, atol=1e-12)


def test_a_float64_shift_keeps_float64_partial_sums():
    """States begun from float64 outputs have a shift float32 cannot hold: later float32
    outputs are summed in float64, as if they had been given as float64."""
    first = _realistic(8, G + 2, 0).double() + 1e-9
    later = _realistic(8, G + 2, 1)
    mixed, exact = _accumulators(False, 1)
    for acc, second in ((mixed, later), (exact, later.double())):
        acc.update(first)
        acc.update(second)
    for name, value in _states(exact).items():
        assert torch.equal(getattr(mixed, name), value), name


@pytest.mark.parametrize("second_order", [False, True])
def test_worker_threads_give_identical_states(second_order):
    """Chunks are independent and each unit's arithmetic is the same in any worker, in the
    updates and in compute()."""
    one, two = _accumulators(second_order, 4)
    two.threads = 2
    many = SobolAccumulator(G, (300, 40), second_order, replicates=4)
    many.threads = 3
    single = SobolAccumulator(G, (300, 40), second_order, replicates=4)
    for step in range(2):
        y = _realistic(8, _block_size(second_order), step)
        replicate = torch.arange(8) // 4 + 2 * step
        one.update(y, replicate)
        two.update(y, replicate)
        big = y.reshape(8, -1, 35).repeat(1, 1, 343)[..., :12000].reshape(8, -1, 300, 40)
        many.update(big, replicate)
        single.update(big, replicate)
    for a, b in ((one, two), (single, many)):
        for name, value in _states(a).items():
            assert torch.equal(getattr(b, name), value), name
    # compute() takes its chunks of units with the same workers
    expected, got = single.compute(), many.compute()
    for key in ("S1", "ST", "S1_conf", "ST_conf", "variance", "flag"):
        np.testing.assert_array_equal(getattr(got, key), getattr(expected, key), err_msg=key)


@pytest.mark.parametrize("threads", [1, 2])
def test_shapley_float32_sums_are_within_their_bound(threads):
    """Goda's states are sums of output differences c (|c| <= the outputs' range s) and of
    their group totals r (|r| <= G s): every term is at most (G s)^2, so each entry of the
    float32 path lies within gamma_(n + 4) * N * (G s)^2 of the float64 path's; with worker
    threads the float32 states are bit-identical to one thread's."""
    from sensitivity.estimators import ShapleyAccumulator

    gen = torch.Generator().manual_seed(0)
    low, exact, single = (ShapleyAccumulator(G, (300, 40)) for _ in range(3))
    low.threads = threads
    blocks, updates, span = 16, 3, 0.0
    for step in range(updates):
        y = _realistic(blocks, G + 1, step).reshape(blocks, G + 1, -1)
        y = y.repeat(1, 1, 343)[..., :12000].reshape(blocks, G + 1, 300, 40)
        perms = torch.stack([torch.randperm(G, generator=gen) for _ in range(blocks)])
        low.update(y, perms)
        single.update(y, perms)
        exact.update(y.double(), perms)
        span = max(span, float(y.max() - y.min()))
    bound = round_off_bound(blocks, 4) * blocks * updates * (G * span) ** 2
    for name, value in _states(exact).items():
        assert (getattr(low, name) - value).abs().max() <= bound, name
        assert torch.equal(getattr(low, name), getattr(single, name)), name


@requires_cuda
@pytest.mark.parametrize("second_order", [False, True])
def test_cuda_float32_partial_sums_match_float64_on_the_cpu(second_order):
    """The same chunked update on a GPU (one chunk per layer of this size): within the same
    derived bound of the CPU's float64 states."""
    gpu = SobolAccumulator(G, UNITS, second_order, replicates=4).to("cuda")
    cpu = SobolAccumulator(G, UNITS, second_order, replicates=4)
    outputs = []
    for step in range(2):
        y = _realistic(16, _block_size(second_order), step)
        replicate = torch.arange(16) // 8 + 2 * step
        gpu.update(y.cuda(), replicate.cuda())
        cpu.update(y.double(), replicate)
        outputs.append(y.double().reshape(-1, int(np.prod(UNITS))))
    spread = float((torch.cat(outputs) - cpu.shift).abs().max())
    bound = round_off_bound(16, 8) * 32 * max(1.0, 4 * spread) ** 4
    for name, value in _states(cpu).items():
        assert (getattr(gpu, name).cpu() - value).abs().max() <= bound, name


def test_merged_float32_states_keep_a_float32_shift():
    """Merging re-bases both sums to a common shift; for float32-fed accumulators it is
    rounded to a float32 number, so later float32 outputs keep float32 partial sums."""
    a, b = _accumulators(False, 1)
    a.update(_realistic(8, G + 2, 0))
    b.update(_realistic(8, G + 2, 1) + 0.37)
    a.merge_state(b)
    later = _realistic(8, G + 2, 2)
    assert compute_dtype(later, a.shift, float(later.min()), float(later.max())) == torch.float32


def test_workers_run_in_the_callers_inference_mode():
    """The engine updates and computes under inference mode; the workers write the results of
    compute() into tensors made there."""
    acc = SobolAccumulator(G, (300, 40), replicates=4)
    acc.threads = 2
    y = _realistic(8, G + 2, 0).reshape(8, G + 2, -1).repeat(1, 1, 343)[..., :12000]
    with torch.inference_mode():
        acc.update(y.reshape(8, G + 2, 300, 40), torch.arange(8) // 2)
        result = acc.compute()
    assert np.isfinite(result.S1[:, result.flag == 0]).all()
