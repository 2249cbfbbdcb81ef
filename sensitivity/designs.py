"""Sampling designs over the unit hypercube [0, 1)^d (METHOD.md sections 3, 5, 6, 7).

A design is a sequence of *blocks*: rows that an estimator consumes together (one Sobol base point
with its cross-samples, one Shapley trajectory, one permutation, one probe image). Every block is a
pure function of ``(seed, block index)``: there is no sampler state, so ``rows(start, stop)`` of any
range equals the same slice of the whole design, and a run can be sharded over processes or
resumed from any block. Rows are float64 numpy arrays ``(rows, d)`` in [0, 1).

Designs know nothing of augmentations except ``ContrastDesign``, which reads the switch and
image columns of an ``AugmentationProblem``. The Sobol' and Goda designs take ``discrete``
columns (``AugmentationProblem.discrete_columns()``: a column read only through the cell its
value falls in, such as a switch ``u < p_on`` or a class ``floor(u * n_classes)``) and draw their
pairs of values from ``BalancedPairs`` instead of the sequence (see there why).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy.stats import qmc

if TYPE_CHECKING:
    from sensitivity.problem import AugmentationProblem

# scipy's Sobol engine uses 30-bit integers by default: at most 2**30 distinct points.
_SOBOL_MAX_POINTS = 2**30
SAMPLINGS = ("sobol", "random")
# Stream tags: independent random streams derived from one seed.
_STREAM_REPLICATE = 1
_STREAM_DISCRETE = 2
_STREAM_RANDOM_POINTS = 3


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_groups(groups: Sequence[Sequence[int]] | None, d: int) -> list[list[int]]:
    """Validate that ``groups`` partitions the columns ``0..d-1``; default one group per column."""
    if groups is None:
        return [[c] for c in range(d)]
    result = [[int(c) for c in group] for group in groups]
    if any(len(group) == 0 for group in result):
        raise ValueError("every group needs at least one column; remove empty groups")
    flat = sorted(c for group in result for c in group)
    if flat != list(range(d)):
        raise ValueError(
            f"groups must partition the columns 0..{d - 1}, each column in exactly one group; "
            f"got {result}"
        )
    return result


def _group_mask(groups: list[list[int]], d: int) -> np.ndarray:
    """(G, d) bool: mask[g, c] is True iff column c belongs to group g."""
    mask = np.zeros((len(groups), d), dtype=bool)
    for g, columns in enumerate(groups):
        mask[g, columns] = True
    return mask


def uniform_rows(key: Sequence[int], start: int, stop: int, width: int) -> np.ndarray:
    """Rows [start, stop) of an i.i.d. U[0, 1) stream: ((stop - start), width) float64.

    Row r is drawn from a Philox counter-based generator keyed by ``key`` (integers >= 0) at
    counter offset r * ceil(width / 4) (each counter step yields 4 doubles), so any range of rows
    is regenerated alone, without sampler state.
    """
    steps = -(-width // 4)
    bits = np.random.Philox(key=np.random.SeedSequence(list(key)).generate_state(2, np.uint64))
    bits.advance(start * steps)
    return np.random.Generator(bits).random((stop - start, 4 * steps))[:, :width]


def _check_discrete(
    discrete: Mapping[int, Sequence[float]] | None, d: int
) -> dict[int, np.ndarray]:
    """{column: cell edges} checked: columns in 0..d-1, edges increasing from 0 to 1."""
    out: dict[int, np.ndarray] = {}
    for column, edges in (discrete or {}).items():
        column = int(column)
        if not 0 <= column < d:
            raise ValueError(f"discrete column {column} is outside the design's columns 0..{d - 1}")
        e = np.asarray(edges, dtype=np.float64)
        if e.ndim != 1 or e.size < 2 or e[0] != 0.0 or e[-1] != 1.0 or np.any(np.diff(e) <= 0):
            raise ValueError(
                f"cell edges of discrete column {column} must increase strictly from 0 to 1, "
                f"got {list(edges)}"
            )
        out[column] = e
    return dict(sorted(out.items()))


class BalancedPairs:
    """Balanced cells for the discrete columns of a design's pairs: (A_n, B_n) or (x1_b, x2_b).

    Why: a discrete column is read only through the cell its value falls in (a switch through
    ``u < p_on``). In the Saltelli layout on one scrambled Sobol' sequence, the leading bit of
    column c and of column c + d is the same linear function of the point index (or its
    complement) over the first N points whenever N is small for the dimension, so a switch
    toggles between A and AB_j never (or always): S1 = ST = 0 (or 2) for a unit that depends
    only on it. Independent scrambles do not help (the same direction numbers), and i.i.d.
    draws leave each toggle count to chance (no toggle at all with probability 2^-N).

    How: the two cells of pair n are drawn jointly by stratified sampling over all n_pairs
    pairs. v_n = (pi(n) + w_n) / n_pairs, with pi a random permutation of 0..n_pairs - 1 and
    w_n ~ U[0, 1) (both keyed by the seed and the column); the cell of v_n under the column's
    edges is the first cell i, the cell of v_n's position inside cell i (rescaled to [0, 1))
    the second cell j. Each pair is then distributed as two independent draws, independent of
    the other columns, and every quantity that is an interval of v (a combination (i, j); the
    first member in cell i; for a switch, "the two differ") occurs in its expected number of
    pairs up to less than 2 (one partial stratum at each end): a switch at p_on = 0.5 is on in
    exactly half of the As and of the Bs and differs in exactly half of the pairs once n_pairs
    is a multiple of 4. Values are cell midpoints, which decode exactly.
    Pair n is a pure function of (seed, n_pairs, n): the permutations are regenerated from the
    seed (and cached), w from a counter-based stream.
    """

    def __init__(self, seed: int, n_pairs: int, discrete: Mapping[int, np.ndarray]) -> None:
        self.seed = seed
        self.n_pairs = n_pairs
        self.discrete = dict(discrete)
        self._strata: np.ndarray | None = None

    def _permutations(self) -> np.ndarray:
        """(n_pairs, C) int64: the stratum of each pair, per discrete column."""
        if self._strata is None:
            self._strata = np.stack(
                [
                    np.random.default_rng([self.seed, _STREAM_DISCRETE, c]).permutation(
                        self.n_pairs
                    )
                    for c in self.discrete
                ],
                axis=1,
            ) if self.discrete else np.empty((self.n_pairs, 0), dtype=np.int64)
        return self._strata

    def apply(self, first: np.ndarray, second: np.ndarray, start: int) -> None:
        """Overwrite the discrete columns of pairs [start, start + len(first)) in place.

        first, second: (k, d) float64, the two members of each pair (A and B, or x1 and x2).
        """
        if not self.discrete:
            return
        stop = start + first.shape[0]
        strata = self._permutations()[start:stop]
        w = uniform_rows([self.seed, _STREAM_DISCRETE], start, stop, len(self.discrete))
        v = (strata + w) / self.n_pairs
        for k, (column, edges) in enumerate(self.discrete.items()):
            widths = np.diff(edges)
            last = len(widths) - 1
            i = np.clip(np.searchsorted(edges, v[:, k], side="right") - 1, 0, last)
            inner = np.clip((v[:, k] - edges[i]) / widths[i], 0.0, np.nextafter(1.0, 0.0))
            j = np.clip(np.searchsorted(edges, inner, side="right") - 1, 0, last)
            first[:, column] = edges[i] + widths[i] / 2.0
            second[:, column] = edges[j] + widths[j] / 2.0


class Design:
    """Base class: ``n_blocks`` blocks of ``block_size`` rows over ``d`` columns.

    Subclasses set ``d``, ``groups``, ``n_blocks``, ``block_size``, ``seed`` and implement
    ``_rows(start, stop)`` (vectorised over blocks) and ``row_kinds()``.
    """

    d: int
    groups: list[list[int]]
    n_blocks: int
    block_size: int
    seed: int

    @property
    def n_rows(self) -> int:
        return self.n_blocks * self.block_size

    def block(self, index: int) -> np.ndarray:
        """Rows of block ``index``: (block_size, d) float64 in [0, 1)."""
        index = _check_int("block index", index, 0)
        return self.rows(index, index + 1)

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Blocks ``[start, stop)`` concatenated: ((stop - start) * block_size, d) float64."""
        stop = self.n_blocks if stop is None else stop
        start = _check_int("start", start, 0)
        stop = _check_int("stop", stop, 0)
        if not start <= stop <= self.n_blocks:
            raise ValueError(
                f"block range [{start}, {stop}) is outside this design's {self.n_blocks} blocks"
            )
        if start == stop:
            return np.empty((0, self.d), dtype=np.float64)
        return self._rows(start, stop)

    def _rows(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def row_kinds(self) -> list[str]:
        """A label for each row inside a block (block_size labels)."""
        raise NotImplementedError


def saltelli_rows(
    A: np.ndarray,
    B: np.ndarray,
    groups: Sequence[Sequence[int]] | None = None,
    second_order: bool = False,
) -> np.ndarray:
    """Saltelli cross-samples of base matrices ``A`` and ``B`` (N, d) in SALib's interleaved layout.

    Per base point n the rows are [A_n, AB_n^0..AB_n^{G-1}, (BA_n^0..BA_n^{G-1}), B_n], where
    AB^j is A with group j's columns taken from B and BA^j the reverse. Returns
    (N * (G + 2), d), or (N * (2G + 2), d) with ``second_order``.
    """
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    if A.ndim != 2 or A.shape != B.shape:
        raise ValueError(f"A and B must be 2-D arrays of equal shape, got {A.shape} and {B.shape}")
    d = A.shape[1]
    mask = _group_mask(_check_groups(groups, d), d)[None]  # (1, G, d)
    a, b = A[:, None, :], B[:, None, :]
    parts = [a, np.where(mask, b, a)]
    if second_order:
        parts.append(np.where(mask, a, b))
    parts.append(b)
    return np.concatenate(parts, axis=1).reshape(-1, d)


class SobolDesign(Design):
    """Saltelli design on scrambled Sobol' points (METHOD.md section 5).

    With the defaults (one replicate, no discrete columns) base point n is point n of
    ``scipy.stats.qmc.Sobol(d=2*d, scramble=True, seed=seed)`` (LMS + digital shift scrambling,
    the same call as ``SALib.sample.sobol.sample``): A_n its first d columns, B_n its last d.
    Block n = [A_n, AB_n^0..AB_n^{G-1}, (BA_n^0..), B_n]: G + 2 rows, or 2G + 2 with
    ``second_order``; AB^j is A with all columns of group j from B.

    replicates: R > 1 splits the n base points into R replicates of n / R points, replicate r
        (base points r * n / R ...) an independently scrambled Sobol' sequence (randomised
        quasi-Monte Carlo). The spread of the R replicate estimates gives confidence intervals
        that hold for these points; the delta method over base points assumes i.i.d. points and
        is off under a single scrambled sequence (too wide, or too narrow, by factors).
    sampling: "sobol" (the above) or "random": i.i.d. uniform base points (``uniform_rows``).
    discrete: {column: cell edges} of the columns drawn by ``BalancedPairs`` instead.

    ``n`` (and R) must be powers of two: the equidistribution of a Sobol' sequence (every dyadic
    box holds its exact share of points) holds for the first 2^m points only, and the
    estimators' quasi-Monte-Carlo error rests on it.
    """

    def __init__(
        self,
        d: int,
        n: int,
        seed: int = 0,
        groups: Sequence[Sequence[int]] | None = None,
        second_order: bool = False,
        replicates: int = 1,
        sampling: str = "sobol",
        discrete: Mapping[int, Sequence[float]] | None = None,
    ) -> None:
        self.d = _check_int("d", d, 1)
        n = _check_int("n", n, 1)
        replicates = _check_int("replicates", replicates, 1)
        for label, value in (("n", n), ("replicates", replicates)):
            if value & (value - 1):
                lower = 1 << (value.bit_length() - 1)
                raise ValueError(
                    f"{label} must be a power of two, got {value}: a Sobol' sequence is balanced "
                    f"(each dyadic box holds its exact share of points) only over its first 2^m "
                    f"points, and the convergence of the Sobol estimators rests on that; use "
                    f"{lower} or {lower * 2}"
                )
        if n > _SOBOL_MAX_POINTS:
            raise ValueError(f"n must be at most 2^30 (scipy's 30-bit Sobol' engine), got {n}")
        if replicates > n:
            raise ValueError(f"replicates ({replicates}) must not exceed n ({n}) base points")
        if sampling not in SAMPLINGS:
            raise ValueError(f"unknown sampling {sampling!r}; valid: {list(SAMPLINGS)}")
        self.seed = _check_int("seed", seed, 0)
        self.groups = _check_groups(groups, self.d)
        self.second_order = bool(second_order)
        self.replicates = replicates
        self.sampling = sampling
        g = len(self.groups)
        self.n_blocks = n
        self.block_size = 2 * g + 2 if self.second_order else g + 2
        self.balanced = BalancedPairs(self.seed, n, _check_discrete(discrete, self.d))

    @property
    def replicate_size(self) -> int:
        """Base points per replicate: n / R."""
        return self.n_blocks // self.replicates

    def replicate_of(self, start: int, stop: int) -> np.ndarray:
        """(stop - start,) int64: the replicate of each base point (block) in [start, stop)."""
        return np.arange(start, stop, dtype=np.int64) // self.replicate_size

    def _engine(self, replicate: int) -> qmc.Sobol:
        if self.replicates == 1:
            # ``seed=`` (not ``rng=``) on purpose: it is the call SALib makes, and scipy derives a
            # different scrambling from ``rng=seed``; this keeps our base points equal to SALib's.
            return qmc.Sobol(d=2 * self.d, scramble=True, seed=self.seed)
        rng = np.random.default_rng([self.seed, _STREAM_REPLICATE, replicate])
        return qmc.Sobol(d=2 * self.d, scramble=True, rng=rng)

    def base_points(self, start: int, stop: int) -> np.ndarray:
        """Base points [start, stop) as [A | B]: (stop - start, 2d) float64.

        A replicate's fresh engine is fast-forwarded to the first point asked for: scipy XORs one
        direction number per skipped point in compiled code (about 1 ms per 2^17 points), so no
        Python loop over earlier points and no state carried between calls.
        """
        if not 0 <= start <= stop <= self.n_blocks:
            raise ValueError(f"base point range [{start}, {stop}) outside [0, {self.n_blocks})")
        if self.sampling == "random":
            base = uniform_rows([self.seed, _STREAM_RANDOM_POINTS], start, stop, 2 * self.d)
        else:
            parts = []
            size = self.replicate_size
            for replicate in range(start // size, -(-stop // size)):
                first = max(start, replicate * size) - replicate * size
                last = min(stop, (replicate + 1) * size) - replicate * size
                engine = self._engine(replicate)
                if first > 0:
                    engine.fast_forward(first)
                with warnings.catch_warnings():
                    # A slice of a power-of-two design is rarely a power of two itself; the
                    # balance the warning is about belongs to the whole replicate.
                    warnings.filterwarnings("ignore", message="The balance properties of Sobol")
                    parts.append(engine.random(last - first))
            base = np.concatenate(parts) if parts else np.empty((0, 2 * self.d))
        self.balanced.apply(base[:, : self.d], base[:, self.d :], start)
        return base

    def _rows(self, start: int, stop: int) -> np.ndarray:
        base = self.base_points(start, stop)
        return saltelli_rows(base[:, : self.d], base[:, self.d :], self.groups, self.second_order)

    def pair_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(A, B) of base points [start, stop): each (stop - start, d) float64."""
        base = self.base_points(start, stop)
        return base[:, : self.d], base[:, self.d :]

    def row_kinds(self) -> list[str]:
        g = len(self.groups)
        kinds = ["A"] + [f"AB_{j}" for j in range(g)]
        if self.second_order:
            kinds += [f"BA_{j}" for j in range(g)]
        return [*kinds, "B"]


class _PermutationBlocks(Design):
    """Shared part of the designs whose blocks carry a random permutation of the groups."""

    def _block_permutation(self, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def permutation(self, index: int) -> np.ndarray:
        """Group order of block ``index``: (G,) int64."""
        index = _check_int("block index", index, 0)
        return self.permutations(index, index + 1)[0]

    def permutations(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Group orders of blocks [start, stop): (stop - start, G) int64."""
        stop = self.n_blocks if stop is None else stop
        if not 0 <= start <= stop <= self.n_blocks:
            raise ValueError(
                f"block range [{start}, {stop}) is outside this design's {self.n_blocks} blocks"
            )
        g = len(self.groups)
        out = np.empty((stop - start, g), dtype=np.int64)
        for i, b in enumerate(range(start, stop)):
            out[i] = self._block_permutation(np.random.default_rng([self.seed, b]))
        return out


class ShapleyDesign(_PermutationBlocks):
    """Goda (2021) trajectories in ``SALib.sample.shapley``'s layout (METHOD.md section 6).

    Block b is one trajectory of G + 1 rows: x1, then one group at a time, in a random
    permutation of the groups, its columns replaced by those of x2 (the last row is x2).
    ``np.random.default_rng([seed, b])`` draws x1 (d,), then x2 (d,), then the permutation (G,).
    Ungrouped (one column per group), consecutive rows differ in exactly one column, which is
    what ``SALib.analyze.shapley`` checks. ``discrete`` columns ({column: cell edges}) of the
    pair (x1, x2) come from ``BalancedPairs`` over the n trajectories instead.
    """

    def __init__(
        self,
        d: int,
        n: int,
        seed: int = 0,
        groups: Sequence[Sequence[int]] | None = None,
        discrete: Mapping[int, Sequence[float]] | None = None,
    ) -> None:
        self.d = _check_int("d", d, 1)
        self.n_blocks = _check_int("n (number of trajectories)", n, 1)
        self.seed = _check_int("seed", seed, 0)
        self.groups = _check_groups(groups, self.d)
        self.block_size = len(self.groups) + 1
        self._mask = _group_mask(self.groups, self.d)
        self.balanced = BalancedPairs(self.seed, self.n_blocks, _check_discrete(discrete, self.d))

    def _draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        pair = rng.random((2, self.d))
        return pair, rng.permutation(len(self.groups))

    def _block_permutation(self, rng: np.random.Generator) -> np.ndarray:
        return self._draw(rng)[1]

    def _pairs(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(pairs (k, 2, d) of x1 and x2, permutations (k, G)) of trajectories [start, stop)."""
        k, g = stop - start, len(self.groups)
        pairs = np.empty((k, 2, self.d))
        perms = np.empty((k, g), dtype=np.int64)
        # One generator per block is what makes a block regenerable alone; the rows themselves
        # are assembled in _rows without a loop.
        for i, b in enumerate(range(start, stop)):
            pairs[i], perms[i] = self._draw(np.random.default_rng([self.seed, b]))
        self.balanced.apply(pairs[:, 0], pairs[:, 1], start)
        return pairs, perms

    def pair_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(x1, x2) of trajectories [start, stop): each (stop - start, d) float64."""
        pairs = self._pairs(start, stop)[0]
        return pairs[:, 0], pairs[:, 1]

    def _rows(self, start: int, stop: int) -> np.ndarray:
        g = len(self.groups)
        pairs, perms = self._pairs(start, stop)
        position = np.argsort(perms, axis=1)  # (k, G): step at which each group is swapped
        column_step = position[:, np.argmax(self._mask, axis=0)]  # (k, d)
        # Row s (0..G) holds x2 in the columns whose group was swapped at steps 0..s-1.
        swapped = column_step[:, None, :] < np.arange(g + 1)[None, :, None]
        rows = np.where(swapped, pairs[:, 1:2, :], pairs[:, 0:1, :])
        return rows.reshape(-1, self.d)

    def row_kinds(self) -> list[str]:
        return ["x1"] + [f"step_{s}" for s in range(1, len(self.groups) + 1)]


class PermutationDesign(_PermutationBlocks):
    """Song, Nelson and Staum (2016) random-permutation design (the reference's estimator).

    Block b = one random permutation pi of the G groups, drawn first from
    ``np.random.default_rng([seed, b])``, followed by outer draws (G, n_outer, d) and inner draws
    (G, n_outer, n_inner, d). Rows are ordered (position j, outer l, inner i): G * No * Ni rows.
    At position j with J = {pi_0..pi_j}, the columns outside J come from outer draw (j, l), shared
    by the Ni inner rows; the columns of J come from inner draw (j, l, i). The inner variance then
    estimates Var(Y | X_{-J}) and its outer mean c(J) = E[Var(Y | X_{-J})].
    """

    def __init__(
        self,
        d: int,
        n_perm: int,
        n_outer: int,
        n_inner: int,
        seed: int = 0,
        groups: Sequence[Sequence[int]] | None = None,
    ) -> None:
        self.d = _check_int("d", d, 1)
        self.n_blocks = _check_int("n_perm", n_perm, 1)
        self.n_outer = _check_int("n_outer", n_outer, 1)
        self.n_inner = _check_int("n_inner", n_inner, 2)
        self.seed = _check_int("seed", seed, 0)
        self.groups = _check_groups(groups, self.d)
        self.block_size = len(self.groups) * self.n_outer * self.n_inner
        self._mask = _group_mask(self.groups, self.d)

    def _block_permutation(self, rng: np.random.Generator) -> np.ndarray:
        return rng.permutation(len(self.groups))

    def _block(self, b: int) -> np.ndarray:
        g, no, ni, d = len(self.groups), self.n_outer, self.n_inner, self.d
        rng = np.random.default_rng([self.seed, b])
        perm = self._block_permutation(rng)
        outer = rng.random((g, no, 1, d))
        inner = rng.random((g, no, ni, d))
        # in_j[j, c]: column c belongs to one of the groups pi_0..pi_j.
        in_j = np.cumsum(self._mask[perm], axis=0) > 0
        return np.where(in_j[:, None, None, :], inner, outer).reshape(-1, d)

    def _rows(self, start: int, stop: int) -> np.ndarray:
        return np.concatenate([self._block(b) for b in range(start, stop)])

    def row_kinds(self) -> list[str]:
        return [
            f"pos_{j}/outer_{l}/inner_{i}"
            for j in range(len(self.groups))
            for l in range(self.n_outer)  # noqa: E741
            for i in range(self.n_inner)
        ]


class ContrastDesign(Design):
    """Treatment-control design: each augmentation alone against the original image (section 7).

    Block b = one probe image: row 0 the original image (every augmentation off), then for each
    augmentation a in problem order K rows with only a switched on and all parameters drawn afresh
    (1 + A*K rows). Parameter and order columns are uniform draws of
    ``np.random.default_rng([seed, b])`` (order is irrelevant with one augmentation on).

    Encoding: a switch column holds (1 + p_on) / 2 for "off" and p_on / 2 for "on", the middles of
    the off and on regions of ``u < p_on``, so decoding is exact whatever p_on is. An augmentation
    with p_on = 1 has no switch column and is always on, so no row can show the original image:
    such a problem is rejected; use ``problem.with_p_on(0.5)`` (any p_on < 1 gives the same
    design, since switches are set here, not drawn).

    Block b shows probe image b (class-major: class b // images_per_class); with a partition
    auxiliary, blocks [0, n_images) use split 0 and [n_images, 2 n_images) split 1.
    """

    def __init__(self, problem: AugmentationProblem, n_images: int, k: int, seed: int = 0) -> None:
        always_on = [a for a in problem.augmentations if problem.switch_columns[a] is None]
        if always_on:
            raise ValueError(
                f"ContrastDesign needs a switch column for every augmentation to encode the "
                f"original image, but {always_on} have p_on = 1 (always on, switch column "
                f"dropped); build the problem with p_on < 1, e.g. problem.with_p_on(0.5) - the "
                f"contrast design sets switches itself, so the value does not matter"
            )
        self.problem = problem
        self.n_images = _check_int("n_images", n_images, 1)
        if self.n_images > problem.n_images:
            raise ValueError(
                f"n_images={n_images} exceeds the problem's {problem.n_images} probe images "
                f"(n_classes * images_per_class)"
            )
        self.k = _check_int("k", k, 1)
        self.seed = _check_int("seed", seed, 0)
        self.d = problem.d
        self.groups = problem.group_columns
        n_partitions = 2 if "partition" in problem.auxiliaries else 1
        self.n_blocks = self.n_images * n_partitions
        self.block_size = 1 + len(problem.augmentations) * self.k

    def _switches(self) -> np.ndarray:
        """(block_size, d) float with the switch values of a block, NaN elsewhere."""
        p = self.problem
        out = np.full((self.block_size, self.d), np.nan)
        for a, name in enumerate(p.augmentations):
            column, p_on = p.switch_columns[name], p.p_on[name]
            out[:, column] = (1.0 + p_on) / 2.0
            out[1 + a * self.k : 1 + (a + 1) * self.k, column] = p_on / 2.0
        return out

    def _rows(self, start: int, stop: int) -> np.ndarray:
        p = self.problem
        blocks = np.stack(
            [
                np.random.default_rng([self.seed, b]).random((self.block_size, self.d))
                for b in range(start, stop)
            ]
        )
        switches = self._switches()
        blocks = np.where(np.isnan(switches)[None], blocks, switches[None])
        index = np.arange(start, stop)
        image = index % self.n_images
        # Middle of each decoding cell, so floor(u * n) recovers the index exactly.
        centres = {
            "class": (image // p.images_per_class + 0.5) / p.n_classes,
            "image": (image % p.images_per_class + 0.5) / p.images_per_class,
            "partition": (index // self.n_images + 0.5) / 2.0,
        }
        for group in p.groups:
            if group.kind in centres:
                blocks[:, :, group.columns[0]] = centres[group.kind][:, None]
        return blocks.reshape(-1, self.d)

    def row_kinds(self) -> list[str]:
        return ["original"] + [
            f"{name}_{i}" for name in self.problem.augmentations for i in range(self.k)
        ]


class VarianceDesign(Design):
    """Rows for method "variance": i.i.d. uniform (its moments' intervals assume independence).

    Args:
        d: columns of a row.
        n: rows (blocks of one row).
        seed: key of the ``uniform_rows`` stream: any block range is regenerated alone.
    """

    def __init__(self, d: int, n: int, seed: int = 0) -> None:
        self.d, self.n_blocks, self.seed, self.block_size = int(d), int(n), int(seed), 1
        self.groups = [[c] for c in range(self.d)]

    def _rows(self, start: int, stop: int) -> np.ndarray:
        return uniform_rows([self.seed], start, stop, self.d)

    def row_kinds(self) -> list[str]:
        return ["row"]
