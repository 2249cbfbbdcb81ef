"""Sampling designs over the unit hypercube [0, 1)^d (METHOD.md sections 3, 5, 6, 7).

A design is a sequence of *blocks*: rows that an estimator consumes together (one Sobol base point
with its cross-samples, one Shapley trajectory, one permutation, one probe image). Every block is a
pure function of ``(seed, block index)``: there is no sampler state, so ``rows(start, stop)`` of any
range equals the same slice of the whole design, and a run can be sharded over processes or
resumed from any block. Rows are float64 numpy arrays ``(rows, d)`` in [0, 1).

Designs know nothing of augmentations except ``ContrastDesign``, which reads the switch and
image columns of an ``AugmentationProblem``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy.stats import qmc

if TYPE_CHECKING:
    from sensitivity.problem import AugmentationProblem

# scipy's Sobol engine uses 30-bit integers by default: at most 2**30 distinct points.
_SOBOL_MAX_POINTS = 2**30


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
    """Saltelli design on a scrambled Sobol' sequence (METHOD.md section 5).

    Base point n is point n of ``scipy.stats.qmc.Sobol(d=2*d, scramble=True, seed=seed)``
    (LMS + digital shift scrambling, the same call as ``SALib.sample.sobol.sample``): A_n its
    first d columns, B_n its last d. Block n = [A_n, AB_n^0..AB_n^{G-1}, (BA_n^0..), B_n]:
    G + 2 rows, or 2G + 2 with ``second_order``; AB^j is A with all columns of group j from B.

    ``n`` must be a power of two: the equidistribution of a Sobol' sequence (every dyadic box
    holds its exact share of points) holds for the first 2^m points only, and the estimators'
    quasi-Monte-Carlo error rests on it.
    """

    def __init__(
        self,
        d: int,
        n: int,
        seed: int = 0,
        groups: Sequence[Sequence[int]] | None = None,
        second_order: bool = False,
    ) -> None:
        self.d = _check_int("d", d, 1)
        n = _check_int("n", n, 1)
        if n & (n - 1):
            lower = 1 << (n.bit_length() - 1)
            raise ValueError(
                f"n must be a power of two, got {n}: a Sobol' sequence is balanced (each dyadic "
                f"box holds its exact share of points) only over its first 2^m points, and the "
                f"convergence of the Sobol estimators rests on that; use {lower} or {lower * 2}"
            )
        if n > _SOBOL_MAX_POINTS:
            raise ValueError(f"n must be at most 2^30 (scipy's 30-bit Sobol' engine), got {n}")
        self.seed = _check_int("seed", seed, 0)
        self.groups = _check_groups(groups, self.d)
        self.second_order = bool(second_order)
        g = len(self.groups)
        self.n_blocks = n
        self.block_size = 2 * g + 2 if self.second_order else g + 2

    def _engine(self) -> qmc.Sobol:
        # ``seed=`` (not ``rng=``) on purpose: it is the call SALib makes, and scipy derives a
        # different scrambling from ``rng=seed``; this keeps our base points equal to SALib's.
        return qmc.Sobol(d=2 * self.d, scramble=True, seed=self.seed)

    def base_points(self, start: int, stop: int) -> np.ndarray:
        """Scrambled Sobol' points [start, stop) of dimension 2d: (stop - start, 2d) float64.

        A fresh engine is fast-forwarded to ``start``: scipy XORs one direction number per skipped
        point in compiled code (about 1 ms per 2^17 points), so no Python loop over earlier points
        and no state carried between calls.
        """
        if not 0 <= start <= stop <= self.n_blocks:
            raise ValueError(f"base point range [{start}, {stop}) outside [0, {self.n_blocks})")
        engine = self._engine()
        if start > 0:
            engine.fast_forward(start)
        with warnings.catch_warnings():
            # A slice of a power-of-two design is rarely a power of two itself; the balance the
            # warning is about belongs to the whole design, checked in __init__.
            warnings.filterwarnings("ignore", message="The balance properties of Sobol")
            return engine.random(stop - start)

    def _rows(self, start: int, stop: int) -> np.ndarray:
        base = self.base_points(start, stop)
        return saltelli_rows(base[:, : self.d], base[:, self.d :], self.groups, self.second_order)

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
    what ``SALib.analyze.shapley`` checks.
    """

    def __init__(
        self, d: int, n: int, seed: int = 0, groups: Sequence[Sequence[int]] | None = None
    ) -> None:
        self.d = _check_int("d", d, 1)
        self.n_blocks = _check_int("n (number of trajectories)", n, 1)
        self.seed = _check_int("seed", seed, 0)
        self.groups = _check_groups(groups, self.d)
        self.block_size = len(self.groups) + 1
        self._mask = _group_mask(self.groups, self.d)

    def _draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        pair = rng.random((2, self.d))
        return pair, rng.permutation(len(self.groups))

    def _block_permutation(self, rng: np.random.Generator) -> np.ndarray:
        return self._draw(rng)[1]

    def _rows(self, start: int, stop: int) -> np.ndarray:
        k, g = stop - start, len(self.groups)
        pairs = np.empty((k, 2, self.d))
        perms = np.empty((k, g), dtype=np.int64)
        # One generator per block is what makes a block regenerable alone; the rows themselves
        # are assembled below without a loop.
        for i, b in enumerate(range(start, stop)):
            pairs[i], perms[i] = self._draw(np.random.default_rng([self.seed, b]))
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
