"""Tables of shifted power sums: the states of the Sobol' and moment accumulators.

Numerics. These sums are kept as sums of powers of y - shift, where ``shift`` (per unit) is the
mean of the first batch an accumulator sees. Raw power sums lose about (mean / sd)^k of relative
precision to cancellation for a k-th moment; shifted ones do not (docs/PERFORMANCE.md,
"Estimators": Numerics). Accumulators whose shifts differ are brought to a common shift (a
binomial re-expansion, ``_rebase_table``, exact in exact arithmetic) before their sums are added,
in ``merge_state`` and in the distributed sync (so ``shift`` is the one state not reduced by
"sum"); add the raw states of two accumulators by hand only when their ``shift`` states are
equal. The Shapley and contrast sums are built from differences of outputs and need no shift.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors

from sensitivity.estimators.common import _UnitMetric
from sensitivity.estimators.partial_sums import (
    ChunkedUpdate,
    TableSpec,
    Terms,
    compute_dtype,
    feature_layout,
)

Exponents = tuple[int, ...]


def _closure(exponents: Iterable[Exponents]) -> list[Exponents]:
    """Every exponent tuple <= one of ``exponents`` (what the binomial re-expansion needs).

    Returns:
        The tuples sorted by degree, then lexicographically.
    """
    out = {f for e in exponents for f in itertools.product(*(range(k + 1) for k in e))}
    return sorted(out, key=lambda e: (sum(e), e))


def _rebase_table(table: dict[Exponents, Tensor], delta: Tensor) -> dict[Exponents, Tensor]:
    """Re-expand a table of power sums about another shift.

    One variable at a time, the binomial expansion sum_k C(i, k) delta^(i - k) S_k is built in
    place by repeated synthetic steps S_i += delta * S_(i-1) (i from the top down, once per
    degree): d(d + 1) / 2 fused multiply-adds per line of degree d instead of a power, two
    products and a sum per term.

    Args:
        table: {e: sum of w * prod_t y_t^e_t}, a downward-closed set of exponent tuples, each
            entry (*lead, U).
        delta: (U,) added to every variable y_t.

    Returns:
        {e: sum of w * prod_t (y_t + delta)^e_t}, new tensors of the same shapes.
    """
    out = {e: value.clone() for e, value in table.items()}
    for t in range(len(next(iter(table)))):
        top = max(e[t] for e in out)
        descending = sorted(out, key=lambda e: -e[t])
        for step in range(1, top + 1):
            for e in descending:
                if e[t] >= step:
                    lower = tuple(k - (u == t) for u, k in enumerate(e))
                    out[e].addcmul_(delta, out[lower])
    return out


def _agreed(stacked: Tensor) -> Tensor:
    """Reduction of the shift state: every process holds the same value after re-basing."""
    return stacked[0]


class _ShiftedPowerSums(_UnitMetric):
    """Base of the accumulators whose states are float64 sums of w * prod_t (y_t - shift)^e_t.

    A *table* is a weight name (a per-block, shift-invariant tensor such as AB_j - A) with a
    downward-closed set of exponent tuples over the shifted variables; it is one state
    ``<weight>_sums`` (K, *lead, U), or (R, K, *lead, U) for a replicated table, units last like
    the captured outputs, so that a chunk's partial sums (``partial_sums``) are added without a
    transposing copy. A table of lead () has weight 1 (plain power sums); every other table's
    weight comes from the subclass's terms. ``table`` gives the entries as (*lead, U) views.
    ``_rebased_states`` re-expands every table about a new shift, which is how accumulators with
    different shifts are merged; ``compute`` centres the sums the same way (``_rebase_table``).

    Args:
        unit_shape: shape of one row's outputs.
        conf_level: confidence level of the half-widths, in (0, 1).
        replicates: R, the copies kept of a replicated table (positive int).
        **kwargs: passed to ``torchmetrics.Metric``.
    """

    def __init__(
        self,
        unit_shape: Sequence[int] = (),
        conf_level: float = 0.95,
        replicates: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(unit_shape, conf_level, **kwargs)
        if isinstance(replicates, bool) or not isinstance(replicates, int) or replicates < 1:
            raise ValueError(f"replicates must be a positive integer, got {replicates!r}")
        self.replicates = replicates
        self._tables: dict[str, list[Exponents]] = {}
        self._replicated: set[str] = set()
        # Every monomial any table needs, in the order tables were added: a table whose entries
        # are the first k monomials reads them as a slice of the per-chunk monomial tensor.
        self._monomials: list[Exponents] = []
        self._selection: dict[str, slice | Tensor] = {}
        self._leads: dict[str, tuple[int, ...]] = {}
        self._specs: list[TableSpec] | None = None
        self.add_state("shift", torch.zeros(self.n_units, dtype=torch.float64), _agreed)
        self.add_state("n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    # ------------------------------------------------------------------------------------ tables
    def _add_table(
        self,
        weight: str,
        lead: tuple[int, ...],
        exponents: Iterable[Exponents],
        replicated: bool = False,
    ) -> None:
        """Add a table of sums and its state.

        Args:
            weight: the table's name; its state is ``<weight>_sums``.
            lead: shape of the weight per block (e.g. (G,) for one value per group).
            exponents: the highest exponent tuples needed; every lower one is kept too.
            replicated: keep one table per replicate: state (R, K, *lead, U), else (K, *lead, U).
        """
        closure = _closure(exponents)
        self._monomials += [e for e in closure if e not in self._monomials]
        index = sorted(self._monomials.index(e) for e in closure)
        self._tables[weight] = [self._monomials[i] for i in index]
        k = len(index)
        self._selection[weight] = (
            slice(0, k) if index == list(range(k)) else torch.tensor(index, dtype=torch.long)
        )
        if replicated:
            self._replicated.add(weight)
            shape: tuple[int, ...] = (self.replicates, k, *lead, self.n_units)
        else:
            shape = (k, *lead, self.n_units)
        self._leads[weight] = tuple(lead)
        self._add_sum_state(self._state_name(weight), shape)

    def _add_sum_state(self, name: str, shape: tuple[int, ...]) -> None:
        """A float64 zero state of ``shape`` summed across processes.

        torchmetrics keeps a deep copy of every state's default for ``reset()``, which would
        double the memory of these sums (docs/PERFORMANCE.md, "Engine efficiency"). The default
        kept here is a zero-stride view of one zero instead; ``reset()`` clones it into a real
        zero tensor.
        """
        self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        setattr(self, name, torch.zeros(shape, dtype=torch.float64))
        self._defaults[name] = self._defaults[name].expand(shape)

    @staticmethod
    def _state_name(weight: str) -> str:
        return f"{weight}_sums"

    def table(
        self, weight: str, states: dict[str, Tensor] | None = None
    ) -> dict[Exponents, Tensor]:
        """The sums of one table.

        Args:
            weight: the table's name.
            states: states to read it from (default: this accumulator's).

        Returns:
            {exponent tuple: (*lead, U) view}, or (R, *lead, U) for a replicated table.
        """
        name = self._state_name(weight)
        sums = states[name] if states is not None else getattr(self, name)
        if weight in self._replicated:
            return {e: sums[:, k] for k, e in enumerate(self._tables[weight])}
        return {e: sums[k] for k, e in enumerate(self._tables[weight])}

    # ------------------------------------------------------------------------------------ update
    def _fix_shift(self, Y: Tensor) -> None:
        """On the first batch, take its per-unit mean as the shift. Y (..., U)."""
        # torchmetrics counts this update already: only the first update since construction or
        # reset() reads n (a device synchronisation on a GPU); resumed or merged states keep n.
        if self._update_count <= 1 and float(self.n) == 0.0:
            # A mean in the outputs' own dtype is much faster on CPU than one accumulated in
            # float64 (docs/PERFORMANCE.md, "Engine efficiency") and just as good a shift (any
            # value near the mean keeps the sums exact); a float32 mean is a float32 number,
            # which float32 partial sums need (partial_sums.compute_dtype).
            self.shift = Y.reshape(-1, self.n_units).mean(0).to(torch.float64)

    def _update_blocks(
        self,
        Y: Tensor,
        runs: Sequence[tuple[int, slice]],
        terms: Terms,
        value_range: tuple[float, float],
    ) -> None:
        """Add the partial sums of n blocks to every table (``partial_sums``).

        Args:
            Y: (n, r, U) outputs, rows of each block in order, units last.
            runs: [(replicate, blocks)] runs of consecutive blocks of one replicate
                ([(0, slice(0, n))] without replicated tables).
            terms: per chunk, y (n, r, c) shifted -> (shifted variables, each (n, c);
                {weighted table: (n, *lead, c)}).
            value_range: the smallest and largest output (``_check_finite``).
        """
        dtype = compute_dtype(Y, self.shift, *value_range)
        if self._specs is None:
            self._specs = feature_layout(
                self._tables, self._leads, self._selection, self._replicated,
                {w for w, lead in self._leads.items() if lead},
            )
        states = {w: getattr(self, self._state_name(w)) for w in self._tables}
        ChunkedUpdate(
            self._specs, self._monomials, states, self.shift.to(dtype), runs, Y.shape[0],
            Y.shape[1], dtype, self.threads,
        ).run(Y, terms)

    # ----------------------------------------------------------------------------- merge and sync
    def _rebased_states(self, states: dict[str, Tensor], new_shift: Tensor) -> dict[str, Tensor]:
        """``states`` with every table re-expanded about ``new_shift`` (U,)."""
        out = dict(states)
        delta = states["shift"] - new_shift
        for weight, exponents in self._tables.items():
            rebased = _rebase_table(self.table(weight, states), delta)
            out[self._state_name(weight)] = torch.stack(
                [rebased[e] for e in exponents], dim=1 if weight in self._replicated else 0
            )
        out["shift"] = new_shift.clone()
        return out

    def _set_states(self, states: dict[str, Tensor]) -> None:
        for name, value in states.items():
            setattr(self, name, value)

    @staticmethod
    def _common_shift(counts: Sequence[Tensor], shifts: Sequence[Tensor]) -> Tensor:
        """The count-weighted mean of the shifts (zeros when no process has seen a row),
        rounded to float32 when every shift is a float32 number, so that float32 partial sums
        (``partial_sums.compute_dtype``) go on after a merge."""
        total = sum(counts)
        if float(total) == 0.0:
            return torch.zeros_like(shifts[0])
        common = sum(c * s for c, s in zip(counts, shifts, strict=True)) / total
        if all(torch.equal(s.to(torch.float32).to(s.dtype), s) for s in shifts):
            common = common.to(torch.float32).to(common.dtype)
        return common

    def _reduce_states(self, incoming_state: dict[str, Any]) -> None:
        # Behind merge_state (and forward): move both sets of sums to one shift, then add.
        for name in self._defaults:
            if name not in incoming_state:
                raise ValueError(f"incoming state lacks {name!r}; was it built the same way?")
            if incoming_state[name].shape != getattr(self, name).shape:
                raise ValueError(
                    f"state {name!r} has shape {tuple(incoming_state[name].shape)}, expected "
                    f"{tuple(getattr(self, name).shape)}: accumulators differ in groups or units"
                )
        common = self._common_shift(
            [self.n, incoming_state["n"]], [self.shift, incoming_state["shift"]]
        )
        self._set_states(self._rebased_states(self.metric_state, common))
        super()._reduce_states(self._rebased_states(dict(incoming_state), common))

    def _sync_dist(self, dist_sync_fn: Any = gather_all_tensors, process_group: Any = None) -> None:
        # Sums taken about different shifts cannot be added: agree on the count-weighted mean
        # shift first (one extra gather), re-base locally, then let torchmetrics sum.
        group = process_group or self.process_group
        counts = dist_sync_fn(self.n, group=group)
        shifts = dist_sync_fn(self.shift, group=group)
        common = self._common_shift(counts, shifts)
        self._set_states(self._rebased_states(self.metric_state, common))
        super()._sync_dist(dist_sync_fn, process_group)
