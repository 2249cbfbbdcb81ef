"""Raw-activation files (layout: docs/RESULTS_FORMAT.md "Raw-activation files").

Raw activations are large, so they never go through the results file's copy-on-write:
``ActivationWriter`` fills a standalone file (temporary name until ``finalize``),
``merge_shards`` joins the per-rank files of one run, and ``ResultsStore.add_activations``
(``sensitivity.store``) links the finished file in as ``/activations/<name>`` (an HDF5 external
link, which plain h5py follows). Both writers publish atomically (``sensitivity.h5files``): a
killed writer leaves at most a temporary sibling, never a partial file under the final name.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from sensitivity.h5files import (
    COMPLETE,
    NONE_INT,
    WRITING,
    check_format,
    check_name,
    from_attr,
    is_complete,
    publish,
    stamp_root,
    temporary_path,
    to_attr,
)

if TYPE_CHECKING:
    from torch import Tensor

ACTIVATIONS_FORMAT = "augsens-activations"
_TARGET_CHUNK_BYTES = 1 << 20  # activation chunks of about 1 MiB: cheap row-batch reads
_MERGE_BATCH_BYTES = 64 << 20


def _rows_per_chunk(unit_shape: Sequence[int], itemsize: int = 4) -> int:
    return int(min(4096, max(1, _TARGET_CHUNK_BYTES // (itemsize * max(1, math.prod(unit_shape))))))


def _as_numpy(values: Any, dtype: type) -> np.ndarray:
    """A numpy array or a torch tensor on any device (duck-typed: no torch import) as numpy."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


class ActivationWriter:
    """Raw activation rows of one analysis, appended in batches to a standalone HDF5 file.

    Layout (docs/RESULTS_FORMAT.md), under /activations/<name>:
    ``<layer>`` (rows, *unit_shape) float32, chunked by rows and compressed; ``design`` (rows, d)
    float64 rows of the unit hypercube; ``row_index`` (rows,) int64 global row indices;
    ``row_kind`` (rows,) int32 codes into the group attribute ``row_kind_names``
    (= ``row_kinds``, the labels of the rows inside one design block, so
    ``row_kind == row_index % block_size``).

    Args:
        path: the finished file; until ``finalize`` the rows go to a temporary sibling
            ``.<file name>.tmp-<uuid>``, so a killed writer never leaves a file at ``path``.
        name: analysis name (as in /analyses/<name>).
        unit_shapes: {layer: unit shape} of the captured outputs, in checkpoint order.
        d: columns of the design rows.
        row_kinds: labels of the rows inside a design block (``Design.row_kinds()``).
        n_rows: rows of the whole design (all shards), or None when unknown; ``merge_shards``
            checks the merged file against it.
        compression: "lzf" (fast), "gzip" or None.
        attrs: extra attributes of the /activations/<name> group.

    Rows must arrive in strictly increasing ``row_index`` (gaps are fine: a rank holds a
    subset of the rows). Use it as a context manager: leaving the block finalizes, an
    exception aborts (the temporary file is removed).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        name: str,
        unit_shapes: Mapping[str, Sequence[int]],
        d: int,
        row_kinds: Sequence[str],
        *,
        n_rows: int | None = None,
        compression: str | None = "lzf",
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        check_name("analysis", name)
        if not unit_shapes:
            raise ValueError("unit_shapes is empty; give {layer: unit shape} of every layer")
        for layer in unit_shapes:
            check_name("layer", layer)
        reserved = {"design", "row_index", "row_kind"} & set(unit_shapes)
        if reserved:
            raise ValueError(f"layer names {sorted(reserved)} clash with the row datasets")
        if compression not in ("lzf", "gzip", None):
            raise ValueError(f"compression must be 'lzf', 'gzip' or None, got {compression!r}")
        if int(d) < 1 or not row_kinds:
            raise ValueError(f"need d >= 1 and at least one row kind, got d={d}, {row_kinds!r}")
        self.path = Path(path)
        self.name = name
        self.unit_shapes = {k: tuple(int(s) for s in v) for k, v in unit_shapes.items()}
        self.d = int(d)
        self.row_kinds = [str(k) for k in row_kinds]
        self.rows = 0
        self._last_index = -1
        self._tmp = temporary_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: h5py.File | None = h5py.File(self._tmp, "w")
        stamp_root(self._file, ACTIVATIONS_FORMAT)
        self._file.attrs["status"] = WRITING
        g = self._file.create_group(f"activations/{name}", track_order=True)
        group_attrs = {
            "d": self.d,
            "block_size": len(self.row_kinds),
            "row_kind_names": self.row_kinds,
            "n_rows": NONE_INT if n_rows is None else int(n_rows),
            "layers": list(self.unit_shapes),
            **(attrs or {}),
        }
        for key, value in group_attrs.items():
            g.attrs[key] = to_attr(value)
        g.create_dataset("design", (0, self.d), np.float64, maxshape=(None, self.d),
                         chunks=(4096, self.d), compression=compression)
        for key, dtype in (("row_index", np.int64), ("row_kind", np.int32)):
            g.create_dataset(key, (0,), dtype, maxshape=(None,), chunks=(16384,),
                             compression=compression)
        for layer, shape in self.unit_shapes.items():
            g.create_dataset(layer, (0, *shape), np.float32, maxshape=(None, *shape),
                             chunks=(_rows_per_chunk(shape), *shape), compression=compression)
        self._group = g

    def append(
        self,
        row_index: np.ndarray | Tensor | Sequence[int],
        design: np.ndarray | Tensor,
        outputs: Mapping[str, np.ndarray | Tensor],
    ) -> None:
        """Append b rows: global ``row_index`` (b,), ``design`` (b, d) and
        ``outputs`` {layer: (b, *unit_shape)} (tensors may live on any device)."""
        if self._file is None:
            raise ValueError("this ActivationWriter is closed; open a new one")
        index = _as_numpy(row_index, np.int64).reshape(-1)
        b = len(index)
        design = _as_numpy(design, np.float64)
        if design.shape != (b, self.d):
            raise ValueError(f"design has shape {design.shape}; expected ({b}, {self.d})")
        if set(outputs) != set(self.unit_shapes):
            raise ValueError(
                f"outputs have layers {sorted(outputs)}; expected {sorted(self.unit_shapes)}"
            )
        if b == 0:
            return
        if index[0] <= self._last_index or np.any(np.diff(index) <= 0):
            raise ValueError(
                "row_index must increase strictly across appends (append rows in design order); "
                f"got {index[:5].tolist()}... after row {self._last_index}"
            )
        arrays = {}
        for layer, shape in self.unit_shapes.items():
            arrays[layer] = _as_numpy(outputs[layer], np.float32)
            if arrays[layer].shape != (b, *shape):
                raise ValueError(
                    f"outputs[{layer!r}] has shape {arrays[layer].shape}; expected {(b, *shape)}"
                )
        start, stop = self.rows, self.rows + b
        g = self._group
        for key, values in (
            ("design", design),
            ("row_index", index),
            ("row_kind", (index % len(self.row_kinds)).astype(np.int32)),
            *arrays.items(),
        ):
            g[key].resize(stop, axis=0)
            g[key][start:stop] = values
        self.rows = stop
        self._last_index = int(index[-1])

    def finalize(self) -> Path:
        """Mark the file complete, close it and move it to ``path`` atomically; returns path."""
        if self._file is None:
            raise ValueError("this ActivationWriter is already closed")
        self._group.attrs["rows"] = self.rows
        self._file.attrs["status"] = COMPLETE
        self._file.close()
        self._file = None
        try:
            publish(self._tmp, self.path)
        finally:
            self._tmp.unlink(missing_ok=True)
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file; ``path`` is left as it was."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ActivationWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif self._file is not None:
            self.finalize()


def check_finalized(path: Path, name: str) -> None:
    """ValueError unless ``path`` is a finalized activation file holding analysis ``name``
    (what ``ResultsStore.add_activations`` may link)."""
    with h5py.File(path, "r") as f:
        check_format(f, ACTIVATIONS_FORMAT, path)
        if not is_complete(f) or f"activations/{name}" not in f:
            raise ValueError(
                f"{path} holds no finalized activations {name!r}; call finalize() first"
            )


def _shard_info(f: h5py.File, path: Path) -> dict[str, dict[str, Any]]:
    check_format(f, ACTIVATIONS_FORMAT, path)
    if not is_complete(f):
        raise ValueError(f"shard {path} was not finalized; its writer did not finish")
    info = {}
    for name, g in f["activations"].items():
        layers = from_attr(g.attrs["layers"])
        info[name] = {
            "d": int(g.attrs["d"]),
            "row_kind_names": from_attr(g.attrs["row_kind_names"]),
            "n_rows": int(g.attrs["n_rows"]),
            "layers": {layer: g[layer].shape[1:] for layer in layers},
        }
    return info


def merge_shards(
    shard_paths: Sequence[str | os.PathLike[str]],
    out_path: str | os.PathLike[str],
    *,
    remove_shards: bool = False,
) -> Path:
    """Merge finalized per-rank activation files into one, rows ordered by global row index.

    Every analysis of the shards is merged; shards must agree on layers, unit shapes, d and
    row kinds. Each row must appear exactly once: a row index in two shards is a ValueError
    (duplicates), and so is a missing index in 0..n_rows-1 (gaps; n_rows from the writers, or
    the largest index + 1 when they did not know it).

    Args:
        shard_paths: the finalized per-rank files.
        out_path: the merged file, written to a temporary sibling and renamed.
        remove_shards: delete the shards after success.

    Returns:
        ``out_path``.
    """
    paths = [Path(p) for p in shard_paths]
    if not paths:
        raise ValueError("merge_shards needs at least one shard path")
    out = Path(out_path)
    if out.resolve() in {p.resolve() for p in paths}:
        raise ValueError(f"out_path {out} is one of the shards; write the merge elsewhere")
    with contextlib.ExitStack() as stack:
        shards = [stack.enter_context(h5py.File(p, "r")) for p in paths]
        infos = [_shard_info(f, p) for f, p in zip(shards, paths, strict=True)]
        for path, info in zip(paths[1:], infos[1:], strict=True):
            if info != infos[0]:
                raise ValueError(
                    f"shard {path} does not match {paths[0]} (analyses, layers, unit shapes, d, "
                    "row kinds or n_rows differ); merge shards of one run only"
                )
        tmp = temporary_path(out)
        try:
            with h5py.File(tmp, "w") as merged:
                stamp_root(merged, ACTIVATIONS_FORMAT)
                for name, info in infos[0].items():
                    _merge_analysis(name, info, shards, paths, merged)
                merged.attrs["status"] = COMPLETE
            publish(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    if remove_shards:
        for path in paths:
            path.unlink()
    return out


def _merge_analysis(
    name: str,
    info: dict[str, Any],
    shards: list[h5py.File],
    paths: list[Path],
    merged: h5py.File,
) -> None:
    sources = [f[f"activations/{name}"] for f in shards]
    indices = [g["row_index"][()] for g in sources]
    for path, index in zip(paths, indices, strict=True):
        if np.any(np.diff(index) <= 0):
            raise ValueError(f"shard {path}: row_index is not strictly increasing; not a shard")
    everything = np.concatenate(indices)
    unique, counts = np.unique(everything, return_counts=True)
    if np.any(counts > 1):
        duplicated = unique[counts > 1]
        owners = [
            str(p) for p, i in zip(paths, indices, strict=True) if np.isin(duplicated, i).any()
        ]
        raise ValueError(
            f"activations {name!r}: {len(duplicated)} row(s) appear in more than one shard, "
            f"e.g. rows {duplicated[:5].tolist()} in {owners}; each row must be written once"
        )
    n_rows = info["n_rows"]
    if n_rows == NONE_INT:
        n_rows = int(unique[-1]) + 1 if len(unique) else 0
    if len(unique) != n_rows or (len(unique) and (unique[0] != 0 or unique[-1] != n_rows - 1)):
        missing = np.setdiff1d(np.arange(n_rows), unique)
        extra = unique[unique >= n_rows]
        raise ValueError(
            f"activations {name!r}: the shards hold {len(unique)} distinct rows but the design has "
            f"{n_rows}; missing rows e.g. {missing[:5].tolist()}, rows beyond it "
            f"{extra[:5].tolist()}; merge the shards of every rank"
        )
    g = merged.create_group(f"activations/{name}", track_order=True)
    for key, value in sources[0].attrs.items():
        g.attrs[key] = to_attr(from_attr(value))
    g.attrs["rows"] = n_rows
    keys = ["design", "row_index", "row_kind", *info["layers"]]
    for key in keys:
        src = sources[0][key]
        g.create_dataset(key, (n_rows, *src.shape[1:]), src.dtype, chunks=src.chunks,
                         maxshape=(None, *src.shape[1:]), compression=src.compression)
    # Shards are sorted, so the rows a shard contributes to any range of merged positions are
    # a contiguous run of its own rows: read slices, scatter them.
    owner = np.concatenate([np.full(len(i), s, dtype=np.int64) for s, i in enumerate(indices)])
    order = np.argsort(everything, kind="stable")
    owner_sorted = owner[order]
    row_bytes = 8 * info["d"] + sum(4 * math.prod(s) for s in info["layers"].values()) + 10
    batch = max(1, _MERGE_BATCH_BYTES // row_bytes)
    consumed = [0] * len(sources)
    for start in range(0, n_rows, batch):
        stop = min(n_rows, start + batch)
        block_owner = owner_sorted[start:stop]
        for key in keys:
            buffer = np.empty((stop - start, *g[key].shape[1:]), dtype=g[key].dtype)
            for s, src in enumerate(sources):
                where = np.flatnonzero(block_owner == s)
                if len(where):
                    buffer[where] = src[key][consumed[s]:consumed[s] + len(where)]
            g[key][start:stop] = buffer
        for s in range(len(sources)):
            consumed[s] += int(np.count_nonzero(block_owner == s))
