"""Streaming accumulators: batch/merge/process invariance, dtypes, numerics, validation.

Agreement with SALib and the analytic benchmarks are in test_gsa.py; here the accumulators are fed
random outputs directly. Tolerances: results of the same sums added in a different order (or
re-expanded about a different shift) agree to float64 round-off, ~1e-13 relative here.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import scipy.stats
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sensitivity.estimators import (
    FLAG_CONSTANT,
    FLAG_NEGLIGIBLE,
    FLAG_UNSUPPORTED,
    FLAG_VALID,
    ContrastAccumulator,
    MomentsAccumulator,
    PermutationShapleyAccumulator,
    ShapleyAccumulator,
    SobolAccumulator,
)

G = 3
UNITS = (2, 3)
RTOL = 1e-10


def _outputs(n_blocks: int, block_size: int, seed: int = 0, offset: float = 50.0) -> torch.Tensor:
    """Random outputs with unit-dependent interactions and a large mean (to exercise the shift)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_blocks, block_size, *UNITS, generator=gen, dtype=torch.float64)
    return offset + x + 0.5 * x**2 * torch.linspace(0, 1, 6, dtype=torch.float64).reshape(UNITS)


def _permutations(n: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(G, generator=gen) for _ in range(n)])


def _assert_same(a, b, rtol: float = RTOL) -> None:
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, np.ndarray):
            np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol, err_msg=field.name)
        else:
            assert x == y, field.name


# 40 blocks in 8 replicates of 5 consecutive blocks (a SobolDesign with replicates=8).
REPLICATES = 8
REPLICATE_IDS = torch.arange(40) // 5


def _make(kind: str):
    """(accumulator factory, outputs (40 blocks), extra update argument or None)."""
    if kind == "sobol":
        return lambda: SobolAccumulator(G, UNITS), _outputs(40, G + 2), None
    if kind == "sobol2":
        return lambda: SobolAccumulator(G, UNITS, second_order=True), _outputs(40, 2 * G + 2), None
    if kind == "sobol_rep":
        return (lambda: SobolAccumulator(G, UNITS, replicates=REPLICATES), _outputs(40, G + 2),
                REPLICATE_IDS)
    if kind == "sobol2_rep":
        return (lambda: SobolAccumulator(G, UNITS, True, replicates=REPLICATES),
                _outputs(40, 2 * G + 2), REPLICATE_IDS)
    if kind == "goda":
        return lambda: ShapleyAccumulator(G, UNITS), _outputs(40, G + 1), _permutations(40)
    if kind == "permutation":
        y = _outputs(40, G * 2 * 3)
        return lambda: PermutationShapleyAccumulator(G, 2, 3, UNITS), y, _permutations(40)
    if kind == "contrast":
        return lambda: ContrastAccumulator(G, 2, UNITS), _outputs(40, 1 + G * 2), None
    y = _outputs(40, 5)
    return lambda: MomentsAccumulator(UNITS), y.reshape(200, *UNITS), None


def _feed(acc, y, extra, bounds) -> None:
    for start, stop in itertools.pairwise(bounds):
        if extra is None:
            acc.update(y[start:stop])
        else:
            acc.update(y[start:stop], extra[start:stop])


KINDS = ["sobol", "sobol2", "sobol_rep", "sobol2_rep", "goda", "permutation", "contrast",
         "moments"]


@pytest.mark.parametrize("kind", KINDS)
def test_batch_size_and_merge_invariance(kind):
    factory, y, extra = _make(kind)
    n = y.shape[0]
    whole = factory()
    _feed(whole, y, extra, [0, n])
    reference = whole.compute()

    uneven = factory()
    _feed(uneven, y, extra, [0, 1, 8, 21, n])
    _assert_same(reference, uneven.compute())

    # Two accumulators with different row splits (hence different shifts), merged.
    left, right = factory(), factory()
    _feed(left, y, extra, [0, 3, n // 3])
    _feed(right, y, extra, [n // 3, n])
    left.merge_state(right)
    _assert_same(reference, left.compute())


def _sync_worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for kind in ("sobol2", "sobol_rep", "goda", "moments"):
            factory, y, extra = _make(kind)
            acc = factory()
            # Uneven shards: rank 0 gets the first 7 blocks.
            bounds = [0, 7] if rank == 0 else [7, y.shape[0]]
            _feed(acc, y, extra, bounds)
            result = acc.compute()  # torchmetrics syncs the sums across the two processes
            for field in dataclasses.fields(result):
                value = getattr(result, field.name)
                if isinstance(value, np.ndarray):
                    results[f"{kind}.{field.name}"] = value
        np.savez(f"{out}/rank{rank}.npz", **results)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_sync_equals_single_process(tmp_path):
    """Real gloo process group: synced sums (after agreeing on a shift) equal one process."""
    mp.spawn(_sync_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        synced = np.load(tmp_path / f"rank{rank}.npz")
        for kind in ("sobol2", "sobol_rep", "goda", "moments"):
            factory, y, extra = _make(kind)
            acc = factory()
            _feed(acc, y, extra, [0, y.shape[0]])
            reference = acc.compute()
            for field in dataclasses.fields(reference):
                value = getattr(reference, field.name)
                if isinstance(value, np.ndarray):
                    np.testing.assert_allclose(
                        synced[f"{kind}.{field.name}"], value, rtol=RTOL, atol=RTOL
                    )


def test_moments_survive_a_large_mean():
    """mean 1e8, sd 1e-3: raw power sums lose every digit (off by ~1e7 relative); shifted ones
    agree with numpy's two-pass variance to ~5e-9 relative (asserted at 1e-6)."""
    rng = np.random.default_rng(0)
    y = 1e8 + 1e-3 * rng.standard_normal((1000, 4))
    acc = MomentsAccumulator((4,))
    for chunk in np.array_split(y, 7):
        acc.update(torch.from_numpy(chunk))
    r = acc.compute()
    np.testing.assert_allclose(r.mean, y.mean(0), rtol=1e-15)
    np.testing.assert_allclose(r.var, y.var(0, ddof=1), rtol=1e-6)
    m4 = ((y - y.mean(0)) ** 4).mean(0)
    half = 1.959963984540054 * np.sqrt((m4 - y.var(0) ** 2) / len(y))
    np.testing.assert_allclose(r.var_conf, half, rtol=1e-5)
    np.testing.assert_allclose(r.mean_conf, 1.959963984540054 * y.std(0, ddof=1) / np.sqrt(1000))


def test_sobol_large_mean_matches_centred_outputs():
    """Indices are shift-invariant; adding 1e6 changes them by round-off only."""
    y = _outputs(64, G + 2, offset=0.0)
    a, b = SobolAccumulator(G, UNITS), SobolAccumulator(G, UNITS)
    a.update(y)
    b.update(y + 1e6)
    ra, rb = a.compute(), b.compute()
    for name in ("S1", "ST", "S1_conf", "ST_conf"):
        np.testing.assert_allclose(getattr(rb, name), getattr(ra, name), atol=1e-8)


def test_contrast_matches_direct_computation():
    a, k, m = G, 2, 40
    y = _outputs(m, 1 + a * k)
    acc = ContrastAccumulator(a, k, UNITS)
    acc.update(y[:13])
    acc.update(y[13:])
    r = acc.compute()
    d = (y[:, 1:] - y[:, :1]).reshape(m, a, k, *UNITS).numpy()
    pooled = d.transpose(1, 0, 2, 3, 4).reshape(a, m * k, *UNITS)
    np.testing.assert_allclose(r.mean_diff, pooled.mean(1), rtol=1e-12)
    np.testing.assert_allclose(r.sd_diff, pooled.std(1, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(r.effect_size, pooled.mean(1) / pooled.std(1, ddof=1), rtol=1e-10)
    per_image = d.mean(2)  # (m, a, *units)
    half = 1.959963984540054 * per_image.std(0, ddof=1) / np.sqrt(m)
    np.testing.assert_allclose(r.mean_diff_conf, half, rtol=1e-9)


def test_constant_units_give_zero_and_are_counted():
    y = _outputs(32, 2 * G + 2)
    y[..., 0, 1] = 0.0  # a dead ReLU
    y[..., 1, 2] = 0.3  # constant, not representable exactly in binary
    acc = SobolAccumulator(G, UNITS, second_order=True)
    acc.update(y)
    r = acc.compute()
    assert r.n_constant == 2
    assert r.constant[0, 1] and r.constant[1, 2]
    for name in ("S1", "ST", "S1_conf", "ST_conf", "S2", "S2_conf"):
        values = getattr(r, name)
        assert np.isfinite(values).all(), name
        assert (values[..., 0, 1] == 0).all() and (values[..., 1, 2] == 0).all(), name

    traj = _outputs(32, G + 1)
    traj[..., 0, 1] = 0.3
    goda = ShapleyAccumulator(G, UNITS)
    goda.update(traj, _permutations(32))
    s = goda.compute()
    assert s.n_constant == 1 and s.constant[0, 1]
    assert (s.shapley_normalized[:, 0, 1] == 0).all() and np.isfinite(s.shapley_normalized).all()

    moments = MomentsAccumulator(UNITS)
    moments.update(y.reshape(-1, *UNITS))
    m = moments.compute()
    assert m.n_constant == 2 and m.var[1, 2] == 0 and m.cv[0, 1] == 0


def test_flat_base_rows_stay_degenerate_after_merging_different_shifts():
    """A unit that is 0 on every A and B row but not on a few AB rows (a sparse ReLU map) has
    V = 0: merging accumulators whose shifts differ must not turn that 0, through re-expansion
    round-off, into a tiny positive V that blows the indices up to ~1e16."""
    n, units = 256, 40
    gen = torch.Generator().manual_seed(0)
    y = torch.zeros(n, G + 2, units, dtype=torch.float64)
    for u in range(units):
        rows = torch.randint(0, n, (5,), generator=gen)
        columns = 1 + torch.randint(0, G, (5,), generator=gen)
        y[rows, columns, u] = 3 * torch.rand(5, generator=gen, dtype=torch.float64)
    parts = [SobolAccumulator(G, (units,)) for _ in range(4)]
    for acc, chunk in zip(parts, y.split(n // 4), strict=True):
        acc.update(chunk)  # each part takes its own shift from its first batch
    for acc in parts[1:]:
        parts[0].merge_state(acc)
    r = parts[0].compute()
    assert r.n_constant == units
    for name in ("S1", "ST", "S1_conf", "ST_conf"):
        assert (getattr(r, name) == 0).all(), name


def test_non_finite_output_names_unit_and_row():
    acc = SobolAccumulator(G, UNITS)
    y = _outputs(8, G + 2)
    acc.update(y[:3])
    y[5, 2, 1, 0] = float("nan")  # block 5 = third block of the next batch
    with pytest.raises(ValueError, match=r"row 27 \(block 5, position 2 in the block\), unit 3"):
        acc.update(y[3:])
    moments = MomentsAccumulator(UNITS)
    bad = torch.zeros(10, *UNITS)
    bad[4, 0, 2] = float("inf")
    with pytest.raises(ValueError, match=r"inf at row 4, unit 2"):
        moments.update(bad)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_update_validates_shapes_and_permutations():
    acc = SobolAccumulator(G, UNITS)
    with pytest.raises(ValueError, match=r"\(n_blocks, 5, \*\(2, 3\)\)"):
        acc.update(torch.zeros(4, 6, *UNITS))
    with pytest.raises(ValueError, match="n_blocks, 5"):
        acc.update(torch.zeros(4, 5, 3, 2))
    goda = ShapleyAccumulator(G, UNITS)
    y = _outputs(2, G + 1)
    with pytest.raises(ValueError, match=r"permutations\[1\] = \[0, 0, 2\] is not a permutation"):
        goda.update(y, torch.tensor([[0, 1, 2], [0, 0, 2]]))
    with pytest.raises(ValueError, match="shape \\(2, 3\\)"):
        goda.update(y, torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="at least 2 base points"):
        SobolAccumulator(G).compute()
    with pytest.raises(ValueError, match="conf_level"):
        SobolAccumulator(G, conf_level=1.5)
    other = SobolAccumulator(G + 1, UNITS)
    other.update(_outputs(2, G + 3))
    acc.update(_outputs(2, G + 2))
    with pytest.raises(ValueError, match="differ in groups or units"):
        acc.merge_state(other)


def _replicate_reference(y: np.ndarray, replicates: int, second_order: bool, conf: float = 0.95):
    """Indices and half-widths from R replicates, in plain numpy from the rows.

    y: (n, block_size, U). Per base point the terms of SALib's formulas about the global centres
    (mu: all rows; m: the A and B rows); the index is the ratio of their means, the half-width
    Student's t over the R replicate means of (x - S v) / V (the delta method over replicates).
    """
    n, g = y.shape[0], G
    ids = np.arange(n) // (n // replicates)
    A, B = y[:, 0], y[:, -1]
    D = y[:, 1 : g + 1] - A[:, None]
    mu, m = y.mean((0, 1)), (A.mean(0) + B.mean(0)) / 2
    v = ((A - m) ** 2 + (B - m) ** 2) / 2
    t = scipy.stats.t.ppf(0.5 + conf / 2, replicates - 1)

    def per_replicate(x: np.ndarray) -> np.ndarray:
        return np.stack([x[ids == r].mean(0) for r in range(replicates)])

    vr = per_replicate(v)
    V = vr.mean(0)

    def ratio(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xr = per_replicate(x)
        S = xr.mean(0) / V
        spread = (xr - S * vr[:, None]) / V
        return S, t * spread.std(0, ddof=1) / np.sqrt(replicates)

    out = {"variance": V, "variance_conf": t * vr.std(0, ddof=1) / np.sqrt(replicates)}
    out["S1"], out["S1_conf"] = ratio((B - mu)[:, None] * D)
    out["ST"], out["ST_conf"] = ratio(D**2 / 2)
    if second_order:
        BA = y[:, g + 1 : 2 * g + 1]
        pairs = list(itertools.combinations(range(g), 2))
        # SALib's z minus (B - mu)(D_j + D_k): S2 = mean(z) / V - S1_j - S1_k as one ratio.
        z = np.stack([
            (BA[:, j] - mu) * (A + D[:, k] - mu) - (A - mu) * (B - mu)
            - (B - mu) * (D[:, j] + D[:, k])
            for j, k in pairs
        ], axis=1)
        s2, s2_conf = ratio(z)
        out["S2"], out["S2_conf"] = np.zeros((g, g, *y.shape[2:])), np.zeros((g, g, *y.shape[2:]))
        for p, (j, k) in enumerate(pairs):
            out["S2"][j, k] = out["S2"][k, j] = s2[p]
            out["S2_conf"][j, k] = out["S2_conf"][k, j] = s2_conf[p]
    return out


@pytest.mark.parametrize("second_order", [False, True])
def test_replicate_intervals_equal_an_independent_recomputation(second_order):
    block_size = 2 * G + 2 if second_order else G + 2
    y = _outputs(40, block_size, seed=3)
    replicated = SobolAccumulator(G, UNITS, second_order, replicates=REPLICATES)
    replicated.update(y, REPLICATE_IDS)
    r = replicated.compute()
    expected = _replicate_reference(y.numpy(), REPLICATES, second_order)
    for key, value in expected.items():
        np.testing.assert_allclose(getattr(r, key), value, rtol=1e-9, atol=1e-12, err_msg=key)
    assert r.replicates == REPLICATES and "Student t (7 df)" in r.interval
    # The indices are the pooled ones: those of one accumulator over the same rows.
    single = SobolAccumulator(G, UNITS, second_order)
    single.update(y)
    s = single.compute()
    for key in ("S1", "ST", "mean", "variance") + (("S2",) if second_order else ()):
        np.testing.assert_allclose(getattr(r, key), getattr(s, key), rtol=1e-12, err_msg=key)
    if not second_order:
        np.testing.assert_allclose(replicated.moments.var, single.moments.var, rtol=1e-12)


@pytest.mark.parametrize("replicates", [1, REPLICATES])
def test_sobol_moments_of_every_row_equal_a_moments_pass_over_them(replicates):
    """The moments a first-order Sobol' accumulator gives from its tables (rows A, AB_j, B from
    sums about A and B) equal those of a MomentsAccumulator fed every row, also after a merge of
    accumulators whose shifts differ."""
    y = _outputs(40, G + 2, seed=5)
    ids = REPLICATE_IDS if replicates > 1 else None
    halves = []
    for part in (slice(0, 20), slice(20, 40)):
        acc = SobolAccumulator(G, UNITS, replicates=replicates)
        acc.update(y[part], None if ids is None else ids[part])
        halves.append(acc)
    assert not torch.equal(halves[0].shift, halves[1].shift)
    halves[0].merge_state(halves[1])
    halves[0].compute()
    expected = MomentsAccumulator(UNITS)
    expected.update(y.reshape(-1, *UNITS))
    reference = expected.compute()
    assert halves[0].moments.n == reference.n == 40 * (G + 2)
    for key in ("mean", "var", "std", "cv", "mean_conf", "var_conf"):
        np.testing.assert_allclose(getattr(halves[0].moments, key), getattr(reference, key),
                                   rtol=RTOL, err_msg=key)


def test_replicated_accumulator_validates_its_replicate_ids():
    acc = SobolAccumulator(G, UNITS, replicates=4)
    y = _outputs(8, G + 2)
    with pytest.raises(ValueError, match="pass replicate"):
        acc.update(y)
    with pytest.raises(ValueError, match=r"8 ids in \[0, 4\)"):
        acc.update(y, torch.full((8,), 4))
    acc.update(y, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    acc.update(y[:2], torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="every replicate needs the same number"):
        acc.compute()
    with pytest.raises(ValueError, match="1 replicate"):
        SobolAccumulator(G, UNITS).update(y, torch.ones(8, dtype=torch.long))


def test_degenerate_units_are_flagged_with_the_reason():
    """Unit 0 varies; unit 1 is 1.0 plus 1e-9 noise (below float32 resolution of its value);
    unit 2 is 0 except in 2 of the rows; unit 3 is 1e-7 times unit 0 (negligible next to the
    layer); unit 4 is constant. Flags: valid, negligible, unsupported, negligible, constant,
    for the Sobol' (with and without replicates) and the Goda accumulators. Raw values stay."""
    gen = torch.Generator().manual_seed(4)

    def planted(n_blocks: int, block_size: int) -> torch.Tensor:
        base = torch.randn(n_blocks, block_size, generator=gen, dtype=torch.float64)
        sparse = torch.zeros_like(base)
        sparse[3, 0] = 2.0  # an A row
        sparse[9, -1] = 1.5  # a B row
        units = [base, 1.0 + 1e-9 * torch.randn(base.shape, generator=gen, dtype=torch.float64),
                 sparse, 1e-7 * base, torch.full_like(base, 0.3)]
        return torch.stack(units, dim=-1)

    expected = [FLAG_VALID, FLAG_NEGLIGIBLE, FLAG_UNSUPPORTED, FLAG_NEGLIGIBLE, FLAG_CONSTANT]
    y = planted(64, G + 2)
    for replicates in (1, 8):
        acc = SobolAccumulator(G, (5,), replicates=replicates)
        acc.update(y, torch.arange(64) // 8 if replicates > 1 else None)
        r = acc.compute()
        assert r.flag.tolist() == expected, replicates
        assert r.valid.tolist() == [True, False, False, False, False]
        assert r.n_constant == 1 and np.abs(r.ST[:, 2]).max() > 0  # raw values of flagged units
    goda = ShapleyAccumulator(G, (5,))
    goda.update(planted(64, G + 1), _permutations(64))
    assert goda.compute().flag.tolist() == expected
