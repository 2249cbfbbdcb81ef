"""HDF5 results file (ARCHITECTURE.md "Results file"; layout in docs/RESULTS_FORMAT.md).

Atomicity: every change to the results file is copy-on-write. The current file is copied to a
temporary sibling ``.<file name>.tmp-<uuid>``, the change is written there and the file closed,
flushed to disk and ``os.replace``d over the results file (an atomic rename on POSIX). A process
killed at any moment leaves either the previous file or the new one, each closed cleanly by
HDF5, plus at worst a stray temporary file that ``ResultsStore.cleanup()`` removes. Writing in
place would not do: HDF5 has no journal, and a process killed while the file is open for writing
can leave its metadata inconsistent and every analysis in it unreadable.

Raw activations are large, so they never go through the copy: ``ActivationWriter`` fills its own
file (temporary name until ``finalize``), ``merge_shards`` joins per-rank files, and
``ResultsStore.add_activations`` links the finished file in as ``/activations/<name>`` (an HDF5
external link, which plain h5py follows).

One writer per results file (rank zero); a lock on the directory serialises writers of one
machine. Readers open the file read-only per call and always see a complete file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import importlib.metadata
import json
import math
import os
import shutil
import tomllib
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import yaml

from sensitivity.results import AnalysisResult

if TYPE_CHECKING:
    from torch import Tensor

    from sensitivity.problem import AugmentationProblem

RESULTS_FORMAT = "augsens-results"
ACTIVATIONS_FORMAT = "augsens-activations"
FORMAT_VERSION = 1
COMPLETE = "complete"
WRITING = "writing"
NONE_INT = -1  # epoch, global_step or seed that is not known (HDF5 attributes cannot be None)
# Per-layer dataset of unit flags (uint8 codes of sensitivity.estimators.FLAG_*).
FLAG_DATASET = "flag"

_STR = h5py.string_dtype()
_TARGET_CHUNK_BYTES = 1 << 20  # activation chunks of about 1 MiB: cheap row-batch reads
_MERGE_BATCH_BYTES = 64 << 20


def software_version() -> str:
    """Version of this project: installed metadata, else pyproject.toml, else "unknown"."""
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version("augsens")
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    with contextlib.suppress(OSError, tomllib.TOMLDecodeError, KeyError):
        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
    return "unknown"


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def check_name(kind: str, name: str) -> str:
    """Validate an analysis or layer name for use as an HDF5 link name.

    "/" separates HDF5 paths, so it is refused (torchvision module names never contain it);
    "." inside a name is fine ("features.2"). Names may not be empty, "." or "..", or start
    with "." (reserved for temporary objects).
    """
    if not isinstance(name, str) or not name or name.startswith(".") or "/" in name:
        raise ValueError(
            f"invalid {kind} name {name!r}: it must be a non-empty string without '/' that does "
            "not start with '.' (module names such as 'layer1' or 'features.2' are fine)"
        )
    return name


def _attr(value: Any) -> Any:
    """A Python value as an HDF5 attribute: str lists become variable-length string arrays."""
    if isinstance(value, str | bool | int | float | np.generic):
        return value
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True)
    array = np.asarray(value)
    if array.dtype.kind in "US" or (array.dtype == object and array.size == 0):
        return np.asarray(array, dtype=object).astype(_STR)
    if array.dtype == object:
        raise ValueError(f"cannot store {value!r} as an HDF5 attribute; use str, numbers or lists")
    return array


def _python(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value (lists of str, ints, floats)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        if value.dtype == object or value.dtype.kind == "S":
            return [v.decode() if isinstance(v, bytes) else str(v) for v in value.ravel()]
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _optional_int(value: Any) -> int | None:
    value = int(value)
    return None if value == NONE_INT else value


# --------------------------------------------------------------------------- differences
_MISSING = object()
_SHOWN_DIFFERENCES = 5
_SHORT_TEXT = 40


def _short(value: Any) -> str:
    """A value for a message: compact JSON (strings as they are); long ones keep their start
    and end, so that digests sharing a prefix still show where they differ."""
    if value is _MISSING:
        return "absent"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= _SHORT_TEXT else f"{text[:16]}...{text[-16:]}"


def _leaf_differences(old: Any, new: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    """(dotted path, old, new) of every leaf where two JSON-like values differ, in key order;
    mappings are followed key by key, anything else (a list, a number) is one leaf."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in [*old, *(key for key in new if key not in old)]:
            where = f"{path}.{key}" if path else str(key)
            yield from _leaf_differences(old.get(key, _MISSING), new.get(key, _MISSING), where)
    elif _plain(old) != _plain(new):
        yield path, old, new


def _plain(value: Any) -> Any:
    """Tuples as lists (recursively): a tuple equals the list of its items, as in JSON."""
    return [_plain(v) for v in value] if isinstance(value, list | tuple) else value


def describe_differences(old: Any, new: Any, labels: tuple[str, str] = ("saved", "now")) -> str:
    """Where two JSON-like values (nested dicts) differ, leaf by leaf, for an error message:
    "config.seed (saved 5, now 3); image_size (saved [64, 64], now [32, 32])", at most five
    leaves then "and k more"; "" when they are equal (a tuple equals the list of its items)."""
    found = list(_leaf_differences(old, new, ""))
    shown = [
        f"{path or 'value'} ({labels[0]} {_short(a)}, {labels[1]} {_short(b)})"
        for path, a, b in found[:_SHOWN_DIFFERENCES]
    ]
    if len(found) > _SHOWN_DIFFERENCES:
        shown.append(f"and {len(found) - _SHOWN_DIFFERENCES} more")
    return "; ".join(shown)


# --------------------------------------------------------------------------- provenance
def _image_size(image_size: int | Sequence[int]) -> list[int]:
    """[height, width] of an int side or a (height, width) pair; ValueError otherwise."""
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    size = [int(s) for s in image_size]
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}")
    return size


def provenance(
    *,
    model: str,
    weights: str | None,
    weights_sha256: str,
    dataset: str,
    image_size: int | Sequence[int],
    problem: AugmentationProblem,
) -> dict[str, Any]:
    """What an analysis was computed from, as attributes of its /analyses/<name> group
    (``write_analysis(attrs=...)``), so that every analysis describes itself.

    model: architecture; weights: their source (None: random initialisation, stored "none");
    weights_sha256: hex SHA-256 of the checkpoint or weights file, or of the state dict when
    the weights have no file (random initialisation, weights during training); dataset;
    image_size: side or (height, width); problem: stored as JSON text of its ``to_config()``.
    """
    return {
        "model": str(model),
        "weights": "none" if weights is None else str(weights),
        "weights_sha256": str(weights_sha256),
        "dataset": str(dataset),
        "image_size": _image_size(image_size),
        "problem": json.dumps(problem.to_config(), sort_keys=True),
    }


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, final: Path) -> None:
    """Durably replace ``final`` by the closed file ``tmp`` (atomic rename)."""
    _fsync(tmp)
    os.replace(tmp, final)
    _fsync(final.parent)


def _temporary(final: Path) -> Path:
    return final.parent / f".{final.name}.tmp-{uuid.uuid4().hex}"


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _stamp_root(f: h5py.File, file_format: str) -> None:
    f.attrs["format"] = file_format
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["software_version"] = software_version()
    f.attrs["created"] = _utc_now()


def _check_format(f: h5py.File, file_format: str, path: Path) -> None:
    found = _python(f.attrs.get("format", ""))
    if found != file_format:
        raise ValueError(f"{path} is not an {file_format} file (format attribute {found!r})")
    version = int(f.attrs.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {version}; this software reads up to {FORMAT_VERSION}"
        )


class ResultsStore:
    """The HDF5 results file of one run (layout: docs/RESULTS_FORMAT.md).

    ``ResultsStore(path)`` does not touch the disk; the first write creates the file (and its
    directory). Every write is atomic (module docstring).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"ResultsStore({str(self.path)!r})"

    # ------------------------------------------------------------------------- plumbing
    @contextlib.contextmanager
    def _transaction(self) -> Iterator[h5py.File]:
        """Copy-on-write: yield a writable copy of the file, then publish it atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _directory_lock(self.path.parent):
            tmp = _temporary(self.path)
            try:
                if self.path.exists():
                    shutil.copyfile(self.path, tmp)
                    with h5py.File(tmp, "r+") as f:
                        _check_format(f, RESULTS_FORMAT, self.path)
                        yield f
                else:
                    with h5py.File(tmp, "w") as f:
                        _stamp_root(f, RESULTS_FORMAT)
                        yield f
                _publish(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _read(self) -> Iterator[h5py.File]:
        if not self.path.exists():
            raise FileNotFoundError(f"no results file at {self.path}; nothing has been written")
        with h5py.File(self.path, "r") as f:
            _check_format(f, RESULTS_FORMAT, self.path)
            yield f

    def _new_group(
        self, f: h5py.File, kind: str, name: str, label: str, overwrite: bool
    ) -> h5py.Group:
        """An empty group /<kind>/<name> marked ``status = "writing"`` in the open file ``f``.

        /<kind> is created (insertion-ordered) when missing. An existing <name> is deleted when
        ``overwrite``, else a ValueError names it as ``label`` ("analysis 'x'", "'masking/x'").
        """
        parent = f[kind] if kind in f else f.create_group(kind, track_order=True)
        if name in parent:
            if not overwrite:
                raise ValueError(
                    f"{label} already exists in {self.path}; pass overwrite=True or choose "
                    "another name"
                )
            del parent[name]
        g = parent.create_group(name, track_order=True)
        g.attrs["status"] = WRITING
        return g

    # ------------------------------------------------------------------------- metadata
    def write_metadata(
        self,
        *,
        model: str,
        dataset: str,
        image_size: int | Sequence[int],
        seed: int | None,
        config: str | Mapping[str, Any] | None = None,
        weights: str | None = None,
        weights_sha256: str | None = None,
        problem: AugmentationProblem | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        """Set the root attributes (and /problem when ``problem`` is given).

        model: architecture name ("resnet18"); weights: where the weights came from (a path,
        a torchvision enum name, a checkpoint) or None for random initialisation ("none");
        weights_sha256: hex SHA-256 of those weights (see ``provenance``), None ("") when they
        are not one set (a training run); dataset: a description ("planted:colour", an image
        folder path); image_size: side or (height, width) in pixels; seed: the run's seed
        (None: -1); config: the run's YAML text or a mapping dumped to YAML; attrs: extra root
        attributes (str, numbers, lists). Calling it again overwrites these attributes
        ("created" keeps the file's creation time): callers that add analyses of another run
        check ``provenance_differences`` first.
        """
        size = _image_size(image_size)
        if isinstance(config, Mapping):
            config = yaml.safe_dump(dict(config), sort_keys=False)
        values: dict[str, Any] = {
            "config": config or "",
            "seed": NONE_INT if seed is None else int(seed),
            "model": str(model),
            "weights": "none" if weights is None else str(weights),
            "weights_sha256": weights_sha256 or "",
            "dataset": str(dataset),
            "image_size": np.asarray(size, dtype=np.int64),
        }
        reserved = set(values) | {"format", "format_version", "software_version", "created"}
        clash = sorted(reserved & set(attrs or {}))
        if clash:
            raise ValueError(f"attrs {clash} would overwrite standard root attributes; rename them")
        with self._transaction() as f:
            for key, value in {**values, **(attrs or {})}.items():
                f.attrs[key] = _attr(value)
            f.attrs["software_version"] = software_version()
            if problem is not None:
                if "problem" in f:
                    del f["problem"]
                self._write_problem(f.create_group("problem"), problem)

    @staticmethod
    def _write_problem(g: h5py.Group, problem: AugmentationProblem) -> None:
        # Imported here so that reading results needs neither torch nor torchvision.
        from sensitivity.augmentations import AUGMENTATION_SETS

        column_group = np.empty(problem.d, dtype=np.int64)
        for index, group in enumerate(problem.groups):
            column_group[group.columns] = index
        bounds = np.tile([0.0, 1.0], (problem.d, 1))  # switches and auxiliaries: unit interval
        for name in problem.augmentations:
            for column, spec in zip(problem.param_columns[name], problem.params[name], strict=True):
                bounds[column] = (spec.low, spec.high)
        sets = [k for k, names in AUGMENTATION_SETS.items() if list(names) == problem.augmentations]
        values = {
            "group_names": problem.group_names,
            "group_kinds": [group.kind for group in problem.groups],
            "variables": problem.column_names,
            "column_group": column_group,
            "bounds": bounds,
            "augmentations": problem.augmentations,
            "p_on": np.asarray([problem.p_on[a] for a in problem.augmentations], dtype=np.float64),
            "set": sets[0] if sets else 0,
            "auxiliaries": list(problem.auxiliaries),
            "n_classes": problem.n_classes,
            "images_per_class": problem.images_per_class,
            "postprocess": problem.postprocess or "",
            "config": json.dumps(problem.to_config(), sort_keys=True),
        }
        for key, value in values.items():
            g.attrs[key] = _attr(value)

    def read_metadata(self) -> dict[str, Any]:
        """Root attributes as plain Python values, with "problem": {...} when /problem exists."""
        with self._read() as f:
            meta = {key: _python(value) for key, value in f.attrs.items()}
            if "problem" in f:
                meta["problem"] = {k: _python(v) for k, v in f["problem"].attrs.items()}
        return meta

    def provenance_differences(self, given: Mapping[str, Any]) -> str:
        """How the provenance ``given`` (``provenance()``) differs from this file's root
        metadata: model, dataset, image size, problem and weights, the weights by their SHA-256
        when both sides have one (a moved checkpoint keeps it), else by their description.

        Returns ``describe_differences`` text, "" when they agree or there is no file yet.
        Attributes the file lacks (written by older versions) are not compared.
        """
        if not self.path.exists():
            return ""
        meta = self.read_metadata()
        weights = "weights"
        if meta.get("weights_sha256") and given.get("weights_sha256"):
            weights = "weights_sha256"
        keys = ("model", weights, "dataset", "image_size")
        stored = {key: meta[key] for key in keys if meta.get(key) not in (None, "")}
        now = {key: given[key] for key in stored}
        if "config" in meta.get("problem", {}):
            stored["problem"] = json.loads(meta["problem"]["config"])
            now["problem"] = json.loads(given["problem"])
        return describe_differences(stored, now, labels=("in the file", "now"))

    # ------------------------------------------------------------------------- analyses
    def write_analysis(
        self,
        name: str,
        result: AnalysisResult,
        *,
        attrs: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        """Store ``result`` as /analyses/<name> (arrays as float32), atomically.

        attrs: extra attributes of the analysis group (design, reduction, seed, ...).
        An existing analysis of that name is a ValueError unless ``overwrite``.
        """
        check_name("analysis", name)
        for layer in result.layers:
            check_name("layer", layer)
        reserved = {"method", "n", "evaluations", "epoch", "global_step", "seconds", "status",
                    "group_names", "layers", "created", "interval", "replicates", "toggles"}
        clash = sorted(reserved & set(attrs or {}))
        if clash:
            raise ValueError(f"attrs {clash} would overwrite standard attributes; rename them")
        with self._transaction() as f:
            g = self._new_group(f, "analyses", name, f"analysis {name!r}", overwrite)
            standard = {
                "method": result.method,
                "n": int(result.n),
                "evaluations": int(result.evaluations),
                "epoch": NONE_INT if result.epoch is None else int(result.epoch),
                "global_step": NONE_INT if result.global_step is None else int(result.global_step),
                "seconds": float(result.seconds),
                "group_names": result.group_names,
                "layers": result.layer_names,
                "created": _utc_now(),
                "interval": result.interval,
                "replicates": int(result.replicates),
            }
            if result.toggles:
                standard["toggles"] = np.asarray(
                    [result.toggles.get(g, NONE_INT) for g in result.group_names], dtype=np.int64
                )
            for key, value in {**standard, **(attrs or {})}.items():
                g.attrs[key] = _attr(value)
            for layer, values in result.layers.items():
                lg = g.create_group(layer, track_order=True)
                lg.attrs["unit_shape"] = np.asarray(result.unit_shape(layer), dtype=np.int64)
                lg.attrs["n_constant"] = int(result.n_constant.get(layer, 0))
                flag = result.flags[layer]
                lg.attrs["n_valid"] = int(np.count_nonzero(flag == 0))
                lg.attrs["valid_fraction"] = float(np.mean(flag == 0))
                for key, array in values.items():
                    lg.create_dataset(key, data=np.asarray(array, dtype=np.float32))
                lg.create_dataset(FLAG_DATASET, data=flag.astype(np.uint8))
            g.attrs["status"] = COMPLETE

    def analyses(self) -> list[str]:
        """Names of the complete analyses, in the order they were first written."""
        if not self.path.exists():
            return []
        with self._read() as f:
            if "analyses" not in f:
                return []
            return [
                name for name, g in f["analyses"].items()
                if not name.startswith(".") and _python(g.attrs.get("status")) == COMPLETE
            ]

    def has_analysis(self, name: str) -> bool:
        """Whether a complete analysis ``name`` exists."""
        return name in self.analyses()

    def analysis_attrs(self, name: str) -> dict[str, Any]:
        """Attributes of /analyses/<name> as plain Python values (the extra ``attrs`` too)."""
        with self._read() as f:
            return {k: _python(v) for k, v in self._complete_group(f, name).attrs.items()}

    def _complete_group(self, f: h5py.File, name: str) -> h5py.Group:
        group = f.get(f"analyses/{check_name('analysis', name)}")
        if group is None or _python(group.attrs.get("status")) != COMPLETE:
            available = [
                n for n, g in f.get("analyses", {}).items()
                if _python(g.attrs.get("status")) == COMPLETE
            ]
            raise ValueError(
                f"no complete analysis {name!r} in {self.path}; available: {available}"
            )
        return group

    def read_analysis(self, name: str) -> AnalysisResult:
        """The complete analysis ``name`` as an AnalysisResult (arrays back to float64)."""
        with self._read() as f:
            g = self._complete_group(f, name)
            layers: dict[str, dict[str, np.ndarray]] = {}
            n_constant: dict[str, int] = {}
            flags: dict[str, np.ndarray] = {}
            for layer in _python(g.attrs["layers"]):
                lg = g[layer]
                layers[layer] = {
                    key: lg[key][()].astype(np.float64) for key in lg if key != FLAG_DATASET
                }
                n_constant[layer] = int(lg.attrs.get("n_constant", 0))
                if FLAG_DATASET in lg:
                    flags[layer] = lg[FLAG_DATASET][()]
            names = _python(g.attrs["group_names"])
            toggles = g.attrs.get("toggles")
            return AnalysisResult(
                method=_python(g.attrs["method"]),
                group_names=names,
                layers=layers,
                n=int(g.attrs["n"]),
                evaluations=int(g.attrs["evaluations"]),
                seconds=float(g.attrs["seconds"]),
                epoch=_optional_int(g.attrs["epoch"]),
                global_step=_optional_int(g.attrs["global_step"]),
                n_constant=n_constant,
                flags=flags,
                interval=_python(g.attrs.get("interval", "")),
                replicates=int(g.attrs.get("replicates", 1)),
                toggles={} if toggles is None else {
                    name: int(c) for name, c in zip(names, toggles, strict=True) if c >= 0
                },
            )

    # ------------------------------------------------------------------------- derived groups
    _RESERVED_GROUPS = ("analyses", "activations", "problem")

    def _group_path(self, path: str) -> str:
        parts = path.split("/")
        if len(parts) != 2 or parts[0] in self._RESERVED_GROUPS:
            raise ValueError(
                f"invalid group path {path!r}: use '<kind>/<name>' (e.g. 'masking/final') with "
                f"a kind other than {list(self._RESERVED_GROUPS)}"
            )
        check_name("group kind", parts[0])
        check_name("group", parts[1])
        return path

    def write_group(
        self,
        path: str,
        arrays: Mapping[str, Any],
        attrs: Mapping[str, Any] | None = None,
        *,
        overwrite: bool = False,
    ) -> None:
        """Store derived results (masking, single-class, ...) as the group ``path`` =
        "<kind>/<name>", atomically (copy-on-write, like ``write_analysis``).

        arrays: {dataset name: array}; a name with "/" ("layer1/S1/variables") creates the
        intermediate groups; numbers keep their dtype, strings become UTF-8 string datasets.
        attrs: group attributes (str, numbers, lists). The group gets
        ``status = "complete"`` and ``created`` as its last step. An existing group is a
        ValueError unless ``overwrite``.
        """
        self._group_path(path)
        clash = sorted({"status", "created"} & set(attrs or {}))
        if clash:
            raise ValueError(f"attrs {clash} would overwrite standard attributes; rename them")
        with self._transaction() as f:
            kind, name = path.split("/")
            g = self._new_group(f, kind, name, repr(path), overwrite)
            for key, value in (attrs or {}).items():
                g.attrs[key] = _attr(value)
            for key, value in arrays.items():
                array = np.asarray(value)
                if array.dtype.kind in "US" or array.dtype == object:
                    array = np.asarray(array, dtype=object).astype(_STR)
                g.create_dataset(key, data=array)
            g.attrs["created"] = _utc_now()
            g.attrs["status"] = COMPLETE

    def has_group(self, path: str) -> bool:
        """Whether a complete group ``path`` ("<kind>/<name>") exists."""
        self._group_path(path)
        if not self.path.exists():
            return False
        with self._read() as f:
            g = f.get(path)
            return g is not None and _python(g.attrs.get("status")) == COMPLETE

    def read_group(self, path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays, attrs) of the complete group ``path``: its top-level datasets (strings
        as str arrays) and attributes as plain Python values."""
        self._group_path(path)
        with self._read() as f:
            g = f.get(path)
            if g is None or _python(g.attrs.get("status")) != COMPLETE:
                kind = path.split("/")[0]
                available = [n for n, h in f.get(kind, {}).items()
                             if _python(h.attrs.get("status")) == COMPLETE]
                raise ValueError(f"no complete group {path!r} in {self.path}; {kind}: {available}")
            arrays = {}
            for key, dataset in g.items():
                if not isinstance(dataset, h5py.Dataset):
                    continue  # nested groups: sensitivity.stats.read_tree reads those
                value = dataset[()]
                if dataset.dtype.kind == "O":
                    value = dataset.asstr()[()].astype(str)
                arrays[key] = value
            return arrays, {k: _python(v) for k, v in g.attrs.items()}

    # ------------------------------------------------------------------------- activations
    def add_activations(
        self, name: str, activation_path: str | os.PathLike[str], *, overwrite: bool = False
    ) -> None:
        """Link the finalized activation file as /activations/<name> (HDF5 external link).

        The link holds the path relative to the results file's directory: keep both files
        together when moving the run directory.
        """
        check_name("analysis", name)
        target = Path(activation_path)
        with h5py.File(target, "r") as af:
            _check_format(af, ACTIVATIONS_FORMAT, target)
            if _python(af.attrs.get("status")) != COMPLETE or f"activations/{name}" not in af:
                raise ValueError(
                    f"{target} holds no finalized activations {name!r}; call finalize() first"
                )
        relative = os.path.relpath(target.resolve(), self.path.parent.resolve())
        with self._transaction() as f:
            group = f.require_group("activations")
            if name in group:
                if not overwrite:
                    raise ValueError(f"activations {name!r} already linked; pass overwrite=True")
                del group[name]
            group[name] = h5py.ExternalLink(relative, f"/activations/{name}")

    # ------------------------------------------------------------------------- maintenance
    def cleanup(self) -> list[Path]:
        """Remove temporary files (``.*.tmp-*``) left in the results directory by killed
        writers, of this store and of ActivationWriter/merge_shards; returns them.

        Call it when no ActivationWriter writes into this directory (e.g. at the start of a
        run, before the writers start); store writes are excluded by the directory lock.
        """
        directory = self.path.parent
        if not directory.exists():
            return []
        with _directory_lock(directory):
            removed = sorted(p for p in directory.glob(".*.tmp-*") if p.is_file())
            for path in removed:
                path.unlink(missing_ok=True)
        return removed


# --------------------------------------------------------------------------- raw activations
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
        self._tmp = _temporary(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: h5py.File | None = h5py.File(self._tmp, "w")
        _stamp_root(self._file, ACTIVATIONS_FORMAT)
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
            g.attrs[key] = _attr(value)
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
            _publish(self._tmp, self.path)
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


def _shard_info(f: h5py.File, path: Path) -> dict[str, dict[str, Any]]:
    _check_format(f, ACTIVATIONS_FORMAT, path)
    if _python(f.attrs.get("status")) != COMPLETE:
        raise ValueError(f"shard {path} was not finalized; its writer did not finish")
    info = {}
    for name, g in f["activations"].items():
        layers = _python(g.attrs["layers"])
        info[name] = {
            "d": int(g.attrs["d"]),
            "row_kind_names": _python(g.attrs["row_kind_names"]),
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
    the largest index + 1 when they did not know it). The output is written to a temporary
    sibling and renamed; ``remove_shards`` deletes the shards after success.
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
        tmp = _temporary(out)
        try:
            with h5py.File(tmp, "w") as merged:
                _stamp_root(merged, ACTIVATIONS_FORMAT)
                for name, info in infos[0].items():
                    _merge_analysis(name, info, shards, paths, merged)
                merged.attrs["status"] = COMPLETE
            _publish(tmp, out)
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
        g.attrs[key] = _attr(_python(value))
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
