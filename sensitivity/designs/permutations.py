"""Designs whose blocks carry a random order of the groups: Goda's trajectories
(ShapleyDesign) and Song, Nelson and Staum's permutations (PermutationDesign), METHOD.md
section 6."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    pass

from sensitivity.designs.balanced import BalancedPairs, _check_discrete
from sensitivity.designs.base import Design, _check_groups, _check_int, _group_mask


class _PermutationBlocks(Design):
    """Shared part of the designs whose blocks carry a random permutation of the groups."""

    def _block_permutation(self, rng: np.random.Generator) -> np.ndarray:
        """The group order drawn from a block's generator."""
        raise NotImplementedError

    def permutation(self, index: int) -> np.ndarray:
        """The group order of one block.

        Args:
            index: the block, >= 0.

        Returns:
            (G,) int64 permutation of the groups.

        Raises:
            ValueError: a negative index.
        """
        index = _check_int("block index", index, 0)
        return self.permutations(index, index + 1)[0]

    def permutations(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The group orders of a range of blocks.

        Args:
            start, stop: the block range (default: the whole design).

        Returns:
            (stop - start, G) int64, one permutation per block.

        Raises:
            ValueError: a range outside [0, n_blocks].
        """
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

    Args:
        d: columns of a row.
        n: trajectories (blocks).
        seed: >= 0.
        groups: G lists of columns partitioning 0..d-1 (default: one group per column).
        discrete: {column: cell edges} of the columns of (x1, x2) drawn by ``BalancedPairs``
            over the n trajectories instead.
        first_stage: a design grown by doubling (METHOD.md "Adaptive N"): the discrete pairs
            are nested ``BalancedPairs`` from this many trajectories on, so that the first m
            trajectories of every stage boundary m are balanced (trajectory b's other draws
            never depend on n). In [1, n]; None: n.

    Raises:
        ValueError: non-positive d or n, a negative seed, first_stage outside [1, n], bad groups
            or discrete columns.
    """

    def __init__(
        self,
        d: int,
        n: int,
        seed: int = 0,
        groups: Sequence[Sequence[int]] | None = None,
        discrete: Mapping[int, Sequence[float]] | None = None,
        first_stage: int | None = None,
    ) -> None:
        self.d = _check_int("d", d, 1)
        self.n_blocks = _check_int("n (number of trajectories)", n, 1)
        if first_stage is not None and not 1 <= _check_int("first_stage", first_stage, 1) <= n:
            raise ValueError(f"first_stage ({first_stage}) must not exceed n ({n})")
        self.seed = _check_int("seed", seed, 0)
        self.groups = _check_groups(groups, self.d)
        self.block_size = len(self.groups) + 1
        self._mask = _group_mask(self.groups, self.d)
        self.balanced = BalancedPairs(self.seed, self.n_blocks,
                                      _check_discrete(discrete, self.d), first_stage)

    def _draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(x1, x2) as (2, d) and the group permutation (G,), in that order from ``rng``."""
        pair = rng.random((2, self.d))
        return pair, rng.permutation(len(self.groups))

    def _block_permutation(self, rng: np.random.Generator) -> np.ndarray:
        """The permutation, drawn after x1 and x2."""
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
        """The pairs of a range of trajectories.

        Args:
            start, stop: the trajectory range.

        Returns:
            (x1, x2), each (stop - start, d) float64 in [0, 1).
        """
        pairs = self._pairs(start, stop)[0]
        return pairs[:, 0], pairs[:, 1]

    def _rows(self, start: int, stop: int) -> np.ndarray:
        """The G + 1 rows of each trajectory in [start, stop)."""
        g = len(self.groups)
        pairs, perms = self._pairs(start, stop)
        position = np.argsort(perms, axis=1)  # (k, G): step at which each group is swapped
        column_step = position[:, np.argmax(self._mask, axis=0)]  # (k, d)
        # Row s (0..G) holds x2 in the columns whose group was swapped at steps 0..s-1.
        swapped = column_step[:, None, :] < np.arange(g + 1)[None, :, None]
        rows = np.where(swapped, pairs[:, 1:2, :], pairs[:, 0:1, :])
        return rows.reshape(-1, self.d)

    def row_kinds(self) -> list[str]:
        """"x1", then "step_s" for s = 1..G."""
        return ["x1"] + [f"step_{s}" for s in range(1, len(self.groups) + 1)]


class PermutationDesign(_PermutationBlocks):
    """Song, Nelson and Staum (2016) random-permutation design (the reference's estimator).

    Block b = one random permutation pi of the G groups, drawn first from
    ``np.random.default_rng([seed, b])``, followed by outer draws (G, n_outer, d) and inner draws
    (G, n_outer, n_inner, d). Rows are ordered (position j, outer l, inner i): G * No * Ni rows.
    At position j with J = {pi_0..pi_j}, the columns outside J come from outer draw (j, l), shared
    by the Ni inner rows; the columns of J come from inner draw (j, l, i). The inner variance then
    estimates Var(Y | X_{-J}) and its outer mean c(J) = E[Var(Y | X_{-J})].

    Args:
        d: columns of a row.
        n_perm: permutations (blocks).
        n_outer, n_inner: outer draws per position (>= 1) and inner draws per outer (>= 2).
        seed: >= 0.
        groups: G lists of columns partitioning 0..d-1 (default: one group per column).

    Raises:
        ValueError: counts below their minimum, a negative seed, or bad groups.
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
        """The permutation, the first draw of a block."""
        return rng.permutation(len(self.groups))

    def _block(self, b: int) -> np.ndarray:
        """The G * n_outer * n_inner rows of block ``b``."""
        g, no, ni, d = len(self.groups), self.n_outer, self.n_inner, self.d
        rng = np.random.default_rng([self.seed, b])
        perm = self._block_permutation(rng)
        outer = rng.random((g, no, 1, d))
        inner = rng.random((g, no, ni, d))
        # in_j[j, c]: column c belongs to one of the groups pi_0..pi_j.
        in_j = np.cumsum(self._mask[perm], axis=0) > 0
        return np.where(in_j[:, None, None, :], inner, outer).reshape(-1, d)

    def _rows(self, start: int, stop: int) -> np.ndarray:
        """Blocks [start, stop), one at a time."""
        return np.concatenate([self._block(b) for b in range(start, stop)])

    def row_kinds(self) -> list[str]:
        """"pos_j/outer_l/inner_i", position-major."""
        return [
            f"pos_{j}/outer_{l}/inner_{i}"
            for j in range(len(self.groups))
            for l in range(self.n_outer)  # noqa: E741
            for i in range(self.n_inner)
        ]
