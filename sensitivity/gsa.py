"""Model-agnostic global sensitivity analysis: Sobol' indices and Shapley effects of any function.

The public API of ARCHITECTURE.md. A ``Problem`` names variables with bounds and optional groups
(SALib's problem dict); the ``*_from_outputs`` functions analyse outputs of SALib's designs (or of
ours, which share their layouts), the ``*_analyze`` functions sample our designs
(``sensitivity.designs``), evaluate ``func`` and analyse. Both run the streaming accumulators of
``sensitivity.estimators``, so there is one implementation of each estimator. Outputs may be one
value per row, Y (rows,), or many, Y (rows, U) (e.g. activation units), analysed all at once;
results are numpy float64 arrays (G,) or (G, U).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from sensitivity.designs import PermutationDesign, ShapleyDesign, SobolDesign
from sensitivity.estimators import (
    PermutationShapleyAccumulator,
    ShapleyAccumulator,
    ShapleyResult,
    SobolAccumulator,
    SobolResult,
)

__all__ = [
    "Problem",
    "shapley_analyze",
    "shapley_from_outputs",
    "sobol_analyze",
    "sobol_from_outputs",
]

# Outputs are fed to the accumulators in chunks of about this many values, which bounds their
# temporary memory (a few times this in float64) whatever the size of Y.
_CHUNK_VALUES = 1 << 21


class Problem:
    """Input variables of a model: names, bounds (low < high, uniform) and optional groups.

    Groups are ordered by first appearance; ``group_columns[j]`` lists the variables of group j.

    Args:
        names: the d variables' names, unique.
        bounds: (low, high) of every variable, finite with low < high.
        groups: None (every variable its own group) or one group name per variable, as in SALib.

    Raises:
        ValueError: no names, repeated names, bounds not one finite (low, high) with low < high
            per variable, or not one group name per variable.
    """

    def __init__(
        self,
        names: Sequence[str],
        bounds: Sequence[Sequence[float]],
        groups: Sequence[str] | None = None,
    ) -> None:
        names = [str(name) for name in names]
        if not names:
            raise ValueError("a problem needs at least one variable name")
        if len(set(names)) != len(names):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"variable names must be unique, {duplicates} repeat")
        if len(bounds) != len(names):
            raise ValueError(f"got {len(bounds)} bounds for {len(names)} variables; give one each")
        parsed = []
        for name, bound in zip(names, bounds, strict=True):
            if len(bound) != 2:
                raise ValueError(f"bounds of {name!r} must be (low, high), got {bound!r}")
            low, high = float(bound[0]), float(bound[1])
            if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
                raise ValueError(
                    f"bounds of {name!r} must be finite with low < high, got ({low}, {high}); "
                    f"reversed bounds? write them as (low, high)"
                )
            parsed.append((low, high))
        if groups is not None:
            groups = [str(group) for group in groups]
            if len(groups) != len(names):
                raise ValueError(
                    f"groups must give one group name per variable: {len(groups)} for "
                    f"{len(names)} variables"
                )
        self.names = names
        self.bounds = parsed
        self.groups = groups
        labels = groups if groups is not None else names
        self.group_names = list(dict.fromkeys(labels))
        self.group_columns = [
            [c for c, label in enumerate(labels) if label == group] for group in self.group_names
        ]

    @property
    def d(self) -> int:
        """Number of variables."""
        return len(self.names)

    @property
    def n_groups(self) -> int:
        """Number of groups (G)."""
        return len(self.group_names)

    @classmethod
    def from_salib(cls, problem: Mapping[str, Any]) -> Problem:
        """Build from SALib's problem dict.

        Args:
            problem: {"num_vars" (optional), "names", "bounds", "groups" (optional)}.

        Returns:
            The problem.

        Raises:
            ValueError: no names or bounds, num_vars that disagrees with the names, or what
                the constructor refuses.
        """
        for key in ("names", "bounds"):
            if key not in problem:
                raise ValueError(f"SALib problem dict lacks {key!r}; it needs names and bounds")
        if "num_vars" in problem and problem["num_vars"] != len(problem["names"]):
            raise ValueError(
                f"num_vars = {problem['num_vars']} but {len(problem['names'])} names are given"
            )
        return cls(problem["names"], problem["bounds"], problem.get("groups") or None)

    def to_salib(self) -> dict[str, Any]:
        """SALib's problem dict: num_vars, names, bounds and (when grouped) groups."""
        out: dict[str, Any] = {
            "num_vars": self.d,
            "names": list(self.names),
            "bounds": [list(b) for b in self.bounds],
        }
        if self.groups is not None:
            out["groups"] = list(self.groups)
        return out

    def scale(self, unit_rows: np.ndarray) -> np.ndarray:
        """Map unit-cube rows linearly onto the bounds.

        Args:
            unit_rows: (m, d) in [0, 1).

        Returns:
            (m, d) float64 within the bounds.
        """
        unit_rows = np.asarray(unit_rows, dtype=np.float64)
        low, high = np.asarray(self.bounds).T
        return low + unit_rows * (high - low)

    def __repr__(self) -> str:
        return f"Problem(names={self.names}, bounds={self.bounds}, groups={self.groups})"


def _outputs(Y: Any, what: str) -> np.ndarray:
    """Y as float64 (rows, *unit_shape); raise naming the first non-finite row and unit."""
    if isinstance(Y, torch.Tensor):
        Y = Y.detach().cpu().to(torch.float64).numpy()
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim < 1 or Y.shape[0] == 0:
        raise ValueError(f"{what} must be an array (rows,) or (rows, U), got shape {Y.shape}")
    bad = ~np.isfinite(Y)
    if bad.any():
        index = np.argwhere(bad)[0]
        unit = f", unit {tuple(int(i) for i in index[1:])}" if Y.ndim > 1 else ""
        raise ValueError(
            f"{what} holds a non-finite value {Y[tuple(index)]} at row {int(index[0])}{unit}; "
            f"the estimators need finite outputs"
        )
    return Y


def _blocks(Y: np.ndarray, block_size: int) -> tuple[torch.Tensor, int]:
    """Y (rows, *unit) -> tensor (n_blocks, block_size, *unit) and a chunk length in blocks."""
    blocks = torch.from_numpy(Y.reshape(Y.shape[0] // block_size, block_size, *Y.shape[1:]))
    chunk = max(1, _CHUNK_VALUES // (block_size * max(1, math.prod(Y.shape[1:]))))
    return blocks, chunk


def _stream(
    acc: Any, problem: Problem, blocks: torch.Tensor, chunk: int, labels: torch.Tensor | None
) -> Any:
    """Feed ``blocks`` to an accumulator ``chunk`` blocks at a time and compute its result.

    Args:
        acc: a fresh accumulator of ``sensitivity.estimators``.
        problem: names the result's groups.
        blocks: (n_blocks, block_size, *unit) outputs.
        chunk: blocks per update.
        labels: (n_blocks, ...) what ``acc.update`` takes with each block (group orders,
            replicate ids), or None.

    Returns:
        ``acc.compute()`` with ``names`` set to the problem's group names.
    """
    for start in range(0, blocks.shape[0], chunk):
        stop = min(start + chunk, blocks.shape[0])
        acc.update(blocks[start:stop], None if labels is None else labels[start:stop])
    result = acc.compute()
    result.names = list(problem.group_names)
    return result


def _evaluate(func: Callable[[np.ndarray], Any], X: np.ndarray) -> np.ndarray:
    """``func(X)`` as checked float64 outputs with one row per row of X."""
    Y = _outputs(func(X), "func(X)")
    if Y.shape[0] != X.shape[0]:
        raise ValueError(
            f"func returned {Y.shape[0]} rows for {X.shape[0]} input rows; it must map X (m, d) "
            f"to (m,) or (m, U)"
        )
    return Y


def sobol_from_outputs(
    problem: Problem,
    Y: Any,
    second_order: bool = False,
    conf_level: float = 0.95,
    replicates: int = 1,
) -> SobolResult:
    """Sobol' indices from outputs of a Saltelli design in SALib's interleaved layout.

    The indices equal ``SALib.analyze.sobol.analyze`` column by column. The intervals are ours:
    with ``replicates=1`` the delta method over base points (right for i.i.d. points, off by
    factors for one scrambled Sobol' sequence such as SALib's); with R > 1 the base points are R
    consecutive replicates of N / R points (``SobolDesign(replicates=R)``) and the intervals
    come from Student's t over the replicate estimates (``sensitivity.estimators.sobol``).

    Args:
        problem: the variables and groups (G groups).
        Y: (N * (G + 2),) or (N * (G + 2), U) outputs (N * (2G + 2) rows with
            ``second_order``), a numpy array or tensor.
        second_order: the design has BA_j rows; compute S2.
        conf_level: confidence level of the half-widths, in (0, 1).
        replicates: R, a divisor of N.

    Returns:
        S1, ST, S1_conf, ST_conf (G,) or (G, U); S2, S2_conf (G, G[, U]) with second order.

    Raises:
        ValueError: non-finite outputs, a row count that is not a multiple of the block size,
            or replicates that do not divide N.
    """
    Y = _outputs(Y, "Y")
    g = problem.n_groups
    block_size = 2 * g + 2 if second_order else g + 2
    rows = Y.shape[0]
    if rows % block_size:
        other = g + 2 if second_order else 2 * g + 2
        hint = (
            f"; it fits second_order={not second_order} ({rows // other} base points)"
            if rows % other == 0
            else ""
        )
        raise ValueError(
            f"Y has {rows} rows, not a multiple of {block_size} rows per base point "
            f"({g} groups, second_order={second_order}){hint}"
        )
    blocks, chunk = _blocks(Y, block_size)
    if replicates < 1 or blocks.shape[0] % replicates:
        raise ValueError(
            f"replicates must be a positive divisor of the {blocks.shape[0]} base points, got "
            f"{replicates}"
        )
    acc = SobolAccumulator(
        g, Y.shape[1:], second_order=second_order, conf_level=conf_level, replicates=replicates
    )
    size = blocks.shape[0] // replicates
    ids = torch.arange(blocks.shape[0]) // size if replicates > 1 else None
    return _stream(acc, problem, blocks, chunk, ids)


def sobol_analyze(
    problem: Problem,
    func: Callable[[np.ndarray], Any],
    n: int,
    seed: int = 0,
    second_order: bool = False,
    conf_level: float = 0.95,
    replicates: int = 16,
) -> SobolResult:
    """Sample a Saltelli design of ``n`` base points, evaluate ``func``, analyse.

    Args:
        problem: the variables and groups.
        func: X (m, d) float64 within the bounds -> (m,) or (m, U).
        n: base points, a power of two.
        seed: the design's scrambling seed.
        second_order: also sample BA_j rows and compute S2.
        conf_level: confidence level of the half-widths, in (0, 1).
        replicates: the design's randomised quasi-Monte-Carlo replicates (min(replicates, n)
            are used; a power of two), whose spread gives the intervals; 1 samples SALib's
            design (one scrambled sequence, ``SALib.sample.sobol.sample``) with delta-method
            intervals, which assume i.i.d. points.

    Returns:
        As ``sobol_from_outputs``.

    Raises:
        ValueError: what ``SobolDesign`` refuses, or ``func`` returning the wrong row count
            or non-finite values.
    """
    design = SobolDesign(
        problem.d, n, seed=seed, groups=problem.group_columns, second_order=second_order,
        replicates=min(replicates, n),
    )
    X = problem.scale(design.rows())
    return sobol_from_outputs(
        problem, _evaluate(func, X), second_order, conf_level, design.replicates
    )


def _trajectory_permutations(problem: Problem, X: np.ndarray, n: int) -> np.ndarray:
    """Group changed at each step of each trajectory, recovered from X as SALib does: (n, G)."""
    g, d = problem.n_groups, problem.d
    steps = X.reshape(n, g + 1, d)
    changed = steps[:, 1:] != steps[:, :-1]  # (n, G steps, d)
    membership = np.zeros((d, g), dtype=np.int64)
    for j, columns in enumerate(problem.group_columns):
        membership[columns, j] = 1
    groups_changed = (changed.astype(np.int64) @ membership) > 0  # (n, G steps, G groups)
    count = groups_changed.sum(axis=2)
    if np.any(count != 1):
        t, s = (int(i) for i in np.argwhere(count != 1)[0])
        raise ValueError(
            f"each trajectory step must change the variables of exactly one group; trajectory "
            f"{t}, step {s + 1} changed {int(count[t, s])} groups - is X from a Shapley design "
            f"(SALib.sample.shapley or ShapleyDesign with these groups)?"
        )
    perms = groups_changed.argmax(axis=2)
    incomplete = np.any(np.sort(perms, axis=1) != np.arange(g), axis=1)
    if incomplete.any():
        raise ValueError(
            f"each trajectory must change every group exactly once; trajectory "
            f"{int(np.argmax(incomplete))} does not"
        )
    return perms


def shapley_from_outputs(
    problem: Problem,
    X: Any,
    Y: Any,
    permutations: Any = None,
    conf_level: float = 0.95,
) -> ShapleyResult:
    """Goda's Shapley effects from trajectories in ``SALib.sample.shapley``'s layout.

    Args:
        problem: the variables and groups (G groups).
        X: (N * (G + 1), d) inputs.
        Y: (N * (G + 1),) or (N * (G + 1), U) outputs.
        permutations: (N, G) the group changed at each step of each trajectory
            (``ShapleyDesign.permutations()``), or None to read it from X as SALib does (which
            needs every step to change its group's values).
        conf_level: confidence level of the half-widths, in (0, 1).

    Returns:
        shapley (output-variance units), shapley_normalized and their half-widths, (G,) or
        (G, U); ungrouped they equal ``SALib.analyze.shapley.analyze``.

    Raises:
        ValueError: X or Y of the wrong shape or non-finite, or (``permutations`` None) steps
            that do not change exactly one group each.
    """
    g = problem.n_groups
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != problem.d:
        raise ValueError(f"X must have shape (N * {g + 1}, {problem.d}), got {X.shape}")
    if not np.isfinite(X).all():
        row = int(np.argwhere(~np.isfinite(X))[0, 0])
        raise ValueError(f"X holds a non-finite value at row {row}; inputs must be finite")
    Y = _outputs(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but Y has {Y.shape[0]}; they must match")
    if Y.shape[0] % (g + 1):
        raise ValueError(
            f"Y has {Y.shape[0]} rows, not a multiple of {g + 1} rows per trajectory ({g} groups)"
        )
    n = Y.shape[0] // (g + 1)
    if permutations is None:
        perms = torch.from_numpy(_trajectory_permutations(problem, X, n))
    else:
        perms = torch.as_tensor(np.asarray(permutations, dtype=np.int64))
    return _goda(problem, Y, perms, conf_level)


def _goda(problem: Problem, Y: np.ndarray, perms: torch.Tensor, conf_level: float) -> ShapleyResult:
    """Goda's effects of outputs Y (N (G + 1), *unit) with group orders perms (N, G)."""
    acc = ShapleyAccumulator(problem.n_groups, Y.shape[1:], conf_level=conf_level)
    return _stream(acc, problem, *_blocks(Y, problem.n_groups + 1), perms)


def shapley_analyze(
    problem: Problem,
    func: Callable[[np.ndarray], Any],
    n: int,
    seed: int = 0,
    method: str = "goda",
    n_outer: int = 1,
    n_inner: int = 3,
    conf_level: float = 0.95,
) -> ShapleyResult:
    """Shapley effects of the problem's groups: sample, evaluate ``func``, analyse.

    Args:
        problem: the variables and groups (G groups).
        func: X (m, d) float64 within the bounds -> (m,) or (m, U).
        n: trajectories ("goda": n (G + 1) evaluations) or permutations ("permutation":
            n G n_outer n_inner evaluations).
        seed: the design's seed.
        method: "goda", or "permutation" (Song, Nelson and Staum, the reference's estimator).
        n_outer, n_inner: rows per position of the permutation estimator.
        conf_level: confidence level of the half-widths, in (0, 1).

    Returns:
        As ``shapley_from_outputs``.

    Raises:
        ValueError: an unknown method, what the design refuses, or ``func`` returning the
            wrong row count or non-finite values.
    """
    g = problem.n_groups
    if method == "goda":
        design = ShapleyDesign(problem.d, n, seed=seed, groups=problem.group_columns)
        Y = _evaluate(func, problem.scale(design.rows()))
        return _goda(problem, Y, torch.from_numpy(design.permutations()), conf_level)
    if method != "permutation":
        raise ValueError(f"method must be 'goda' or 'permutation', got {method!r}")
    design = PermutationDesign(
        problem.d, n, n_outer, n_inner, seed=seed, groups=problem.group_columns
    )
    Y = _evaluate(func, problem.scale(design.rows()))
    acc = PermutationShapleyAccumulator(g, n_outer, n_inner, Y.shape[1:], conf_level=conf_level)
    perms = torch.from_numpy(design.permutations())
    return _stream(acc, problem, *_blocks(Y, design.block_size), perms)
