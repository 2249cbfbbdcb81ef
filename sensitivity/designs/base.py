"""What every design shares: the Design base class, argument checks, group masks and the
counter-based uniform stream that makes rows regenerable from (seed, row)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    pass

# Stream tags: independent random streams derived from one seed.
_STREAM_REPLICATE = 1
_STREAM_DISCRETE = 2
_STREAM_RANDOM_POINTS = 3
_STREAM_NESTED = 4


def _check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int >= ``minimum``, or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_power_of_two(name: str, value: int) -> None:
    """ValueError unless ``value`` (a Sobol' base size or replicate count) is a power of two."""
    if value & (value - 1):
        lower = 1 << (value.bit_length() - 1)
        raise ValueError(
            f"{name} must be a power of two, got {value}: a Sobol' sequence is balanced (each "
            f"dyadic box holds its exact share of points) only over its first 2^m points, and "
            f"the Sobol estimators' convergence rests on that; use {lower} or {lower * 2}"
        )


def doubling_stages(first: int, total: int) -> list[tuple[int, int]]:
    """The block ranges of a design grown by doubling: [0, first), [first, 2 first), ...

    Args:
        first: blocks of the first stage, >= 1.
        total: blocks of the whole design, >= first; the last stage ends there (it is shorter
            than a doubling when total / first is not a power of two).

    Returns:
        [(start, stop), ...] covering [0, total) in order; [(0, total)] when first == total.
    """
    stages, stop = [(0, first)], first
    while stop < total:
        stages.append((stop, min(2 * stop, total)))
        stop = stages[-1][1]
    return stages


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
    """Rows [start, stop) of an i.i.d. U[0, 1) stream, regenerable range by range.

    Row r is drawn from a Philox counter-based generator keyed by ``key`` at counter offset
    r * ceil(width / 4) (each counter step yields 4 doubles): no sampler state.

    Args:
        key: integers >= 0 that key the stream.
        start, stop: the row range.
        width: values per row.

    Returns:
        (stop - start, width) float64 in [0, 1).
    """
    steps = -(-width // 4)
    bits = np.random.Philox(key=np.random.SeedSequence(list(key)).generate_state(2, np.uint64))
    bits.advance(start * steps)
    return np.random.Generator(bits).random((stop - start, 4 * steps))[:, :width]


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
        """Rows of the whole design: n_blocks * block_size."""
        return self.n_blocks * self.block_size

    def block(self, index: int) -> np.ndarray:
        """The rows of one block.

        Args:
            index: the block, in [0, n_blocks).

        Returns:
            (block_size, d) float64 in [0, 1).

        Raises:
            ValueError: an index outside the design.
        """
        index = _check_int("block index", index, 0)
        return self.rows(index, index + 1)

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The rows of a range of blocks, concatenated.

        Args:
            start, stop: the block range (default: the whole design).

        Returns:
            ((stop - start) * block_size, d) float64 in [0, 1).

        Raises:
            ValueError: a range outside [0, n_blocks].
        """
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
        """Blocks [start, stop) of a checked, non-empty range (the subclass's sampling)."""
        raise NotImplementedError

    def row_kinds(self) -> list[str]:
        """Labels of the rows inside a block.

        Returns:
            block_size labels ("A", "AB_0", ..., "x1", "original", ...).
        """
        raise NotImplementedError
