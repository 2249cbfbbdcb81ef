"""One batch's partial sums of the power-sum tables, in one pass over each chunk of units.

The accumulators' states are float64 sums over every block seen (``power_sums``). A batch adds
n blocks to them, and its n-term sums are exact enough in float32: each entry's round-off is at
most gamma_(k + n) times the sum of its terms' magnitudes (u = 2^-24, k the roundings of one
term, n the blocks of the batch; ``round_off_bound``), about n * 6e-8 of it, against the
1 / sqrt(N) statistical error of every index. So an update works in float32 on float32 outputs
(float64 outputs keep float64 throughout, which is what the SALib equality tests use) and only
the running state is float64.

Per chunk of units, with the outputs' rows first and the units last (the captured layout, so
there is no transposing copy):
1. y = Y - shift, (n, r, c), one pass;
2. the subclass's terms of each table (e.g. AB_j - A) and the monomials of the shifted
   variables (one product each);
3. every weighted table's products written into one feature tensor (n, F, c);
4. the sums over blocks: one matrix product with the (runs, n) indicator of the replicate runs
   for the replicated tables (a sum per run of consecutive blocks of one replicate), one
   reduction over blocks for the others;
5. the (F, c) partial sums added to the float64 state.
The chunk is sized to keep steps 1-4 in cache (about 4 MiB on CPU: two L2 caches).

Threads. Chunks are independent: ``threads`` workers (``EngineConfig.accumulation_threads``)
take them from a shared queue, each with its own buffers, while torch runs one intra-op thread,
so a worker that the OS deschedules delays only its own chunk, never a barrier of every thread
(a contended parallel region). Python's lock still passes between the workers, which made 2
workers slower than 1 with another job on the cores (docs/PERFORMANCE.md, "Threads").
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

Exponents = tuple[int, ...]
T = TypeVar("T")

# Bytes of one chunk's temporaries (shifted outputs, monomials, features): about two L2 caches on
# CPU; on a GPU the chunk only bounds an update's memory.
_CHUNK_BYTES = {"cpu": 1 << 22, "cuda": 1 << 28}
# Largest degree of any term, in powers of a shifted output (fourth moments).
_MAX_DEGREE = 4
# float32 partial sums are used while every term stays below this (float32 max is ~2^128).
_FLOAT32_LIMIT = 2.0**100


@dataclass(frozen=True)
class TableSpec:
    """Where a table's partial sums are made and where they go.

    Attributes:
        weight: the table's name (its state is ``<weight>_sums``).
        lead: shape of the weight per block.
        selection: the table's entries among the monomials (a slice or an index tensor).
        entries: K, its monomials.
        replicated: one table per replicate.
        offset: its first feature in the feature tensor (weighted tables only), else -1.
    """

    weight: str
    lead: tuple[int, ...]
    selection: slice | Tensor
    entries: int
    replicated: bool
    offset: int

    @property
    def features(self) -> int:
        """Entries times lead elements."""
        size = self.entries
        for k in self.lead:
            size *= k
        return size


# (y (n, r, c) shifted outputs) -> (shifted variables, each (n, c); {table: (n, *lead, c)})
Terms = Callable[[Tensor], tuple[Sequence[Tensor], dict[str, Tensor]]]


def compute_dtype(Y: Tensor, shift: Tensor, low: float, high: float) -> torch.dtype:
    """float32 for the partial sums of float32 (or lower) outputs, float64 for float64 outputs.

    Also float64 when float32 could not hold the terms (a spread of outputs so large that its
    fourth power overflows) or when the shift is not a float32 number (states made from float64
    outputs): y - shift must be the float32 rounding of the exact difference.

    Args:
        Y: the outputs of the update.
        shift: (U,) float64, the states' shift.
        low, high: the smallest and largest output.
    """
    if Y.dtype == torch.float64:
        return torch.float64
    lo, hi = torch.aminmax(shift)
    spread = max(high - float(lo), float(hi) - low, 1.0)
    if (4.0 * spread) ** _MAX_DEGREE * Y.shape[0] > _FLOAT32_LIMIT:
        return torch.float64
    if not torch.equal(shift.to(torch.float32).to(torch.float64), shift):
        return torch.float64
    return torch.float32


def round_off_bound(blocks: int, roundings: int) -> float:
    """gamma_m = m u / (1 - m u), u = 2^-24: the relative round-off of a float32 sum of
    ``blocks`` terms that each took ``roundings`` roundings (Higham, Accuracy and Stability of
    Numerical Algorithms, section 3.1), as a fraction of the sum of the terms' magnitudes."""
    m = blocks + roundings
    u = 2.0**-24
    return m * u / (1.0 - m * u)


def replicate_indicator(
    runs: Sequence[tuple[int, slice]], n_blocks: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """(runs, n_blocks) 0/1 matrix: row i selects the blocks of run i."""
    out = torch.zeros((len(runs), n_blocks), dtype=dtype, device=device)
    for i, (_, blocks) in enumerate(runs):
        out[i, blocks] = 1.0
    return out


def monomials_into(
    variables: Sequence[Tensor], monomials: Sequence[Exponents], out: Tensor
) -> Tensor:
    """Every monomial prod_t variables[t]^e_t, one product each.

    Args:
        variables: the shifted variables, each (n, c).
        monomials: downward closed, lowest degree first (``power_sums._closure`` order).
        out: (n, M, c) buffer, M = len(monomials).

    Returns:
        ``out``, filled.
    """
    position = {e: i for i, e in enumerate(monomials)}
    for i, e in enumerate(monomials):
        # e minus one power of its first variable comes earlier in the list.
        t = next((t for t, k in enumerate(e) if k > 0), None)
        if t is None:
            out[:, i] = 1.0
            continue
        lower = tuple(k - (u == t) for u, k in enumerate(e))
        if sum(lower) == 0:
            out[:, i] = variables[t]
        else:
            torch.mul(out[:, position[lower]], variables[t], out=out[:, i])
    return out


class ChunkedUpdate:
    """One update of a ``_ShiftedPowerSums``: its tables' partial sums added to its states.

    Args:
        specs: the tables, weighted ones with their feature offsets.
        monomials: the monomials every table draws from.
        states: {table: its float64 state, (K, *lead, U) or (R, K, *lead, U)}.
        shift: (U,) the shift, in the compute dtype.
        runs: [(replicate, blocks)] runs of consecutive blocks of one replicate.
        n_blocks, block_size: n and r of the update's (n, r, U) outputs.
        dtype: the partial sums' dtype (``compute_dtype``).
        threads: workers taking chunks (1: the calling thread alone).
    """

    def __init__(
        self,
        specs: Sequence[TableSpec],
        monomials: Sequence[Exponents],
        states: dict[str, Tensor],
        shift: Tensor,
        runs: Sequence[tuple[int, slice]],
        n_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        threads: int = 1,
    ) -> None:
        self.specs, self.monomials, self.states, self.shift = specs, monomials, states, shift
        self.n, self.r, self.dtype = n_blocks, block_size, dtype
        self.threads = threads
        self.n_features = sum(s.features for s in specs if s.offset >= 0)
        self.replicated_features = sum(s.features for s in specs if s.offset >= 0 and s.replicated)
        device = shift.device
        self.indicator = replicate_indicator(runs, n_blocks, dtype, device)
        ids = [r for r, _ in runs]
        # Consecutive replicates (the designs' order) are one strided slice of the state.
        self.replicates: slice | list[int] = (
            slice(ids[0], ids[-1] + 1) if ids == list(range(ids[0], ids[0] + len(ids))) else ids
        )
        per_unit = n_blocks * (block_size + len(monomials) + self.n_features)
        itemsize = torch.finfo(dtype).bits // 8
        budget = _CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
        self.width = max(1, budget // (itemsize * per_unit))

    def chunks(self, n_units: int) -> list[slice]:
        """The chunks of units, in order."""
        w = self.width
        return [slice(a, min(a + w, n_units)) for a in range(0, n_units, w)]

    def _buffers(self) -> tuple[Tensor, Tensor, Tensor]:
        """Flat buffers for a chunk's shifted outputs, monomials and features (reused across
        chunks: fresh large temporaries page-fault on CPU)."""
        w, n = self.width, self.n
        kwargs = {"dtype": self.dtype, "device": self.shift.device}
        return (torch.empty(n * self.r * w, **kwargs),
                torch.empty(n * len(self.monomials) * w, **kwargs),
                torch.empty(max(1, n * self.n_features * w), **kwargs))

    def run(self, Y: Tensor, terms: Terms) -> None:
        """Add every chunk of ``Y`` (n, r, U) to the states, with ``terms`` per chunk."""
        run_chunks(
            self.chunks(Y.shape[-1]),
            lambda units, buffers: self._chunk(Y, units, terms, buffers),
            self._buffers, self.threads, Y.device,
        )

    def _chunk(
        self, Y: Tensor, units: slice, terms: Terms, buffers: tuple[Tensor, Tensor, Tensor]
    ) -> None:
        """Steps 1-5 of the module docstring for one chunk of units."""
        n, r, w = self.n, self.r, units.stop - units.start
        y = buffers[0][: n * r * w].view(n, r, w)
        torch.sub(Y[:, :, units], self.shift[units], out=y)
        variables, weights = terms(y)
        mono = monomials_into(
            variables, self.monomials, buffers[1][: n * len(self.monomials) * w].view(n, -1, w)
        )
        features = buffers[2][: n * self.n_features * w].view(n, self.n_features, w)
        for spec in self.specs:
            if spec.offset < 0:
                continue
            chosen = _chosen(mono, spec)
            dst = features[:, spec.offset : spec.offset + spec.features].view(
                n, spec.entries, *spec.lead, w
            )
            weight = weights[spec.weight][:, None]
            torch.mul(chosen.view(n, spec.entries, *([1] * len(spec.lead)), w), weight, out=dst)
        replicated = (
            torch.mm(self.indicator, features[:, : self.replicated_features].reshape(n, -1))
            if self.replicated_features
            else None
        )
        pooled = features[:, self.replicated_features :].sum(0)
        for spec in self.specs:
            self._add(spec, mono, replicated, pooled, units, w)

    def _add(
        self, spec: TableSpec, mono: Tensor, replicated: Tensor | None, pooled: Tensor,
        units: slice, w: int,
    ) -> None:
        """Add one table's partial sums of a chunk to its float64 state."""
        state = self.states[spec.weight]
        runs = self.indicator.shape[0]
        if spec.offset < 0:  # weight 1: the monomials' own sums
            chosen = _chosen(mono, spec)
            part = (
                torch.mm(self.indicator, chosen.reshape(self.n, -1)).view(runs, spec.entries, w)
                if spec.replicated
                else chosen.sum(0)
            )
        elif spec.replicated:
            part = replicated.view(runs, -1, w)[:, spec.offset : spec.offset + spec.features]
            part = part.reshape(runs, spec.entries, *spec.lead, w)
        else:
            start = spec.offset - self.replicated_features
            part = pooled[start : start + spec.features].view(spec.entries, *spec.lead, w)
        if not spec.replicated:
            state[..., units] += part
        elif isinstance(self.replicates, slice):
            state[self.replicates, ..., units] += part
        else:
            for i, replicate in enumerate(self.replicates):
                state[replicate, ..., units] += part[i]


def run_chunks(
    chunks: Sequence[slice],
    work: Callable[[slice, T], None],
    buffers: Callable[[], T],
    threads: int,
    device: torch.device,
) -> None:
    """``work(units, own buffers)`` for every chunk, by ``threads`` workers (module docstring).

    Args:
        chunks: the chunks of units.
        work: adds one chunk; workers never touch the same units.
        buffers: makes one worker's buffers.
        threads: workers (1, a GPU, or a single chunk: the calling thread alone).
        device: where the work runs.
    """
    if threads <= 1 or len(chunks) < 2 or device.type != "cpu":
        mine = buffers()
        for units in chunks:
            work(units, mine)
        return
    pending: Iterator[slice] = iter(chunks)
    lock = threading.Lock()
    # Inference mode is per thread: the workers run in the caller's.
    inference = torch.is_inference_mode_enabled()

    def worker() -> None:
        with torch.inference_mode(inference):
            mine = buffers()
            while True:
                with lock:
                    units = next(pending, None)
                if units is None:
                    return
                work(units, mine)

    # torch's intra-op thread count is process-wide: one per worker while they run.
    with intra_op_threads(1), ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(worker) for _ in range(threads)]:
            future.result()


@contextlib.contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """Inside: torch's intra-op threads (process-wide) set to ``threads``, None: left alone;
    restored on exit.

    Args:
        threads: the thread count (``EngineConfig.threads``), or None.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _chosen(mono: Tensor, spec: TableSpec) -> Tensor:
    """The table's monomials, (n, K, c): a view for a prefix slice, else a gather."""
    if isinstance(spec.selection, slice):
        return mono[:, spec.selection]
    return mono.index_select(1, spec.selection.to(mono.device))


def feature_layout(
    tables: dict[str, list[Exponents]],
    leads: dict[str, tuple[int, ...]],
    selection: dict[str, slice | Tensor],
    replicated: set[str],
    weighted: set[str],
) -> list[TableSpec]:
    """The tables' specs: weighted replicated tables first in the feature tensor, then the
    weighted pooled ones (so each group is one contiguous slice); weight-1 tables take their
    sums straight from the monomials."""
    specs: list[TableSpec] = []
    offset = 0
    order = sorted(tables, key=lambda t: (t not in weighted, t not in replicated))
    for weight in order:
        spec = TableSpec(weight, leads[weight], selection[weight], len(tables[weight]),
                         weight in replicated, -1)
        if weight in weighted:
            spec = TableSpec(spec.weight, spec.lead, spec.selection, spec.entries,
                             spec.replicated, offset)
            offset += spec.features
        specs.append(spec)
    return specs

