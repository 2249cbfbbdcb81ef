"""HDF5 results file (ARCHITECTURE.md "Results file"; layout in docs/RESULTS_FORMAT.md).

Atomicity: every change to the results file is copy-on-write. The current file is copied to a
temporary sibling ``.<file name>.tmp-<uuid>``, the change is written there and the file closed,
flushed to disk and ``os.replace``d over the results file (an atomic rename on POSIX). A process
killed at any moment leaves either the previous file or the new one, each closed cleanly by
HDF5, plus at worst a stray temporary file that ``ResultsStore.cleanup()`` removes. Writing in
place would not do: HDF5 has no journal, and a process killed while the file is open for writing
can leave its metadata inconsistent and every analysis in it unreadable.

Raw activations never go through the copy: ``sensitivity.activations`` writes their own files
and ``ResultsStore.add_activations`` links a finished one in as ``/activations/<name>``.

One writer per results file (rank zero); a lock on the directory serialises writers of one
machine. Readers open the file read-only per call and always see a complete file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar

import h5py
import numpy as np
import yaml

from sensitivity.activations import check_finalized
from sensitivity.h5files import (
    COMPLETE,
    NONE_INT,
    STRING_DTYPE,
    WRITING,
    check_format,
    check_name,
    directory_lock,
    from_attr,
    is_complete,
    optional_int,
    publish,
    software_version,
    stamp_root,
    temporary_path,
    to_attr,
    utc_now,
)
from sensitivity.layouts import UnitLayout
from sensitivity.provenance import describe_differences, height_width
from sensitivity.results import AnalysisResult

if TYPE_CHECKING:
    from sensitivity.problem import AugmentationProblem

RESULTS_FORMAT = "augsens-results"
# Per-layer dataset of unit flags (uint8 codes of sensitivity.estimators.FLAG_*).
FLAG_DATASET = "flag"

# --------------------------------------------------------------------------- groups
class StoredResult(Protocol):
    """A result stored as one group (``ResultsStore.write_result``/``read_result``):
    ``MaskingResult``, ``SingleClassResult``."""

    def arrays(self) -> Mapping[str, Any]:
        """{dataset name: array} of the group."""
        ...

    def attrs(self) -> Mapping[str, Any]:
        """{attribute: value} of the group (str, numbers, lists)."""
        ...

    @classmethod
    def from_group(cls, arrays: Mapping[str, Any], attrs: Mapping[str, Any]) -> Self:
        """The result back from ``read_group``'s (arrays, attrs)."""
        ...


ResultT = TypeVar("ResultT", bound=StoredResult)

# Attributes every /analyses/<name> group has (``_analysis_attrs``, the status).
_ANALYSIS_ATTRS = frozenset({
    "method", "n", "evaluations", "epoch", "global_step", "seconds", "status", "group_names",
    "layers", "created", "interval", "replicates", "toggles",
})


def _analysis_attrs(result: AnalysisResult) -> dict[str, Any]:
    """The standard attributes of an analysis group (docs/RESULTS_FORMAT.md), status aside."""
    standard: dict[str, Any] = {
        "method": result.method,
        "n": int(result.n),
        "evaluations": int(result.evaluations),
        "epoch": NONE_INT if result.epoch is None else int(result.epoch),
        "global_step": NONE_INT if result.global_step is None else int(result.global_step),
        "seconds": float(result.seconds),
        "group_names": result.group_names,
        "layers": result.layer_names,
        "created": utc_now(),
        "interval": result.interval,
        "replicates": int(result.replicates),
    }
    if result.toggles:
        standard["toggles"] = np.asarray(
            [result.toggles.get(g, NONE_INT) for g in result.group_names], dtype=np.int64
        )
    return standard


def _write_layer(
    lg: h5py.Group, result: AnalysisResult, layer: str, values: Mapping[str, np.ndarray]
) -> None:
    """One layer of an analysis: unit shape, unit layout (when the result has one) and
    validity counts, the value arrays (float32) and the unit flags (uint8)."""
    lg.attrs["unit_shape"] = np.asarray(result.unit_shape(layer), dtype=np.int64)
    unit = result.unit_layout(layer)
    for key, value in ({} if unit is None else unit.attrs()).items():
        lg.attrs[key] = value
    lg.attrs["n_constant"] = int(result.n_constant.get(layer, 0))
    flag = result.flags[layer]
    lg.attrs["n_valid"] = int(np.count_nonzero(flag == 0))
    lg.attrs["valid_fraction"] = float(np.mean(flag == 0))
    for key, array in values.items():
        lg.create_dataset(key, data=np.asarray(array, dtype=np.float32))
    lg.create_dataset(FLAG_DATASET, data=flag.astype(np.uint8))


def _complete_names(f: h5py.File, kind: str) -> list[str]:
    """Names of the complete groups under /<kind> of the open file, in creation order."""
    parent = f.get(kind)
    if not isinstance(parent, h5py.Group):
        return []
    return [name for name, g in parent.items()
            if not name.startswith(".") and isinstance(g, h5py.Group) and is_complete(g)]


def _datasets(group: h5py.Group, nested: bool) -> dict[str, Any]:
    """{name: array} of a group's datasets (strings as str arrays), {name: {...}} of its
    subgroups when ``nested``."""
    out: dict[str, Any] = {}
    for key, item in group.items():
        if isinstance(item, h5py.Group):
            if nested:
                out[key] = _datasets(item, nested)
        elif item.dtype.kind == "O":
            out[key] = item.asstr()[()].astype(str)
        else:
            out[key] = item[()]
    return out


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
        with directory_lock(self.path.parent):
            tmp = temporary_path(self.path)
            try:
                if self.path.exists():
                    shutil.copyfile(self.path, tmp)
                    with h5py.File(tmp, "r+") as f:
                        check_format(f, RESULTS_FORMAT, self.path)
                        yield f
                else:
                    with h5py.File(tmp, "w") as f:
                        stamp_root(f, RESULTS_FORMAT)
                        yield f
                publish(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _read(self) -> Iterator[h5py.File]:
        if not self.path.exists():
            raise FileNotFoundError(f"no results file at {self.path}; nothing has been written")
        with h5py.File(self.path, "r") as f:
            check_format(f, RESULTS_FORMAT, self.path)
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
        size = height_width(image_size)
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
                f.attrs[key] = to_attr(value)
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
            g.attrs[key] = to_attr(value)

    def read_metadata(self) -> dict[str, Any]:
        """Root attributes as plain Python values, with "problem": {...} when /problem exists."""
        with self._read() as f:
            meta = {key: from_attr(value) for key, value in f.attrs.items()}
            if "problem" in f:
                meta["problem"] = {k: from_attr(v) for k, v in f["problem"].attrs.items()}
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

        Args:
            name: the analysis name (``check_name``).
            result: the analysis. Its ``settings`` (the engine's analysis settings: design,
                reduction, seed, ...; results made without them have none) become group
                attributes after the standard ones.
            attrs: further group attributes (provenance, the run's config text); on a key
                that ``result.settings`` has too, ``attrs`` wins.
            overwrite: replace an existing analysis of that name instead of a ValueError.

        Raises:
            ValueError: a settings or attrs key would overwrite a standard attribute, or the
                analysis exists and ``overwrite`` is False.
        """
        check_name("analysis", name)
        for layer in result.layers:
            check_name("layer", layer)
        extra = {**result.settings, **(attrs or {})}
        clash = sorted(_ANALYSIS_ATTRS & set(extra))
        if clash:
            raise ValueError(f"attrs {clash} would overwrite standard attributes; rename them")
        with self._transaction() as f:
            g = self._new_group(f, "analyses", name, f"analysis {name!r}", overwrite)
            for key, value in {**_analysis_attrs(result), **extra}.items():
                g.attrs[key] = to_attr(value)
            for layer, values in result.layers.items():
                _write_layer(g.create_group(layer, track_order=True), result, layer, values)
            g.attrs["status"] = COMPLETE

    def analyses(self) -> list[str]:
        """Names of the complete analyses, in the order they were first written."""
        return self.groups("analyses")

    def has_analysis(self, name: str) -> bool:
        """Whether a complete analysis ``name`` exists."""
        return name in self.analyses()

    def analysis_attrs(self, name: str) -> dict[str, Any]:
        """Attributes of /analyses/<name> as plain Python values (the extra ``attrs`` too)."""
        with self._read() as f:
            return {k: from_attr(v) for k, v in self._analysis_group(f, name).attrs.items()}

    def _analysis_group(self, f: h5py.File, name: str) -> h5py.Group:
        check_name("analysis", name)
        return self._complete(f, "analyses", name, f"analysis {name!r}", "available")

    def _complete(self, f: h5py.File, kind: str, name: str, label: str, listing: str) -> Any:
        """The complete group /<kind>/<name> of the open file ``f``; else a ValueError naming
        it as ``label`` and listing the complete groups of ``kind`` after ``listing``."""
        group = f.get(f"{kind}/{name}")
        if group is None or not is_complete(group):
            raise ValueError(
                f"no complete {label} in {self.path}; {listing}: {_complete_names(f, kind)}"
            )
        return group

    def read_analysis(self, name: str) -> AnalysisResult:
        """The complete analysis ``name`` as an AnalysisResult (arrays back to float64)."""
        with self._read() as f:
            g = self._analysis_group(f, name)
            layers: dict[str, dict[str, np.ndarray]] = {}
            n_constant: dict[str, int] = {}
            flags: dict[str, np.ndarray] = {}
            layouts: dict[str, UnitLayout] = {}
            for layer in from_attr(g.attrs["layers"]):
                lg = g[layer]
                layers[layer] = {
                    key: lg[key][()].astype(np.float64) for key in lg if key != FLAG_DATASET
                }
                n_constant[layer] = int(lg.attrs.get("n_constant", 0))
                if FLAG_DATASET in lg:
                    flags[layer] = lg[FLAG_DATASET][()]
                if "layout" in lg.attrs:  # files written before layouts were recorded lack it
                    layouts[layer] = UnitLayout.from_attrs(
                        {k: from_attr(lg.attrs[k]) for k in ("layout", "reduction", "element")}
                    )
            names = from_attr(g.attrs["group_names"])
            toggles = g.attrs.get("toggles")
            return AnalysisResult(
                method=from_attr(g.attrs["method"]),
                group_names=names,
                layers=layers,
                n=int(g.attrs["n"]),
                evaluations=int(g.attrs["evaluations"]),
                seconds=float(g.attrs["seconds"]),
                epoch=optional_int(g.attrs["epoch"]),
                global_step=optional_int(g.attrs["global_step"]),
                n_constant=n_constant,
                flags=flags,
                interval=from_attr(g.attrs.get("interval", "")),
                replicates=int(g.attrs.get("replicates", 1)),
                toggles={} if toggles is None else {
                    name: int(c) for name, c in zip(names, toggles, strict=True) if c >= 0
                },
                layouts=layouts,
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

    def groups(self, kind: str) -> list[str]:
        """Names of the complete groups /<kind>/<name> ("analyses", "masking", ...), in the
        order they were first written; [] without a file or a /<kind> group."""
        if not self.path.exists():
            return []
        with self._read() as f:
            return _complete_names(f, kind)

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

        The group gets ``status = "complete"`` and ``created`` as its last step.

        Args:
            path: "<kind>/<name>", a kind other than analyses, activations, problem.
            arrays: {dataset name: array}; a name with "/" ("layer1/S1/variables") creates
                the intermediate groups; numbers keep their dtype, strings become UTF-8
                string datasets.
            attrs: group attributes (str, numbers, lists).
            overwrite: replace an existing group instead of a ValueError.
        """
        self._group_path(path)
        clash = sorted({"status", "created"} & set(attrs or {}))
        if clash:
            raise ValueError(f"attrs {clash} would overwrite standard attributes; rename them")
        with self._transaction() as f:
            kind, name = path.split("/")
            g = self._new_group(f, kind, name, repr(path), overwrite)
            for key, value in (attrs or {}).items():
                g.attrs[key] = to_attr(value)
            for key, value in arrays.items():
                array = np.asarray(value)
                if array.dtype.kind in "US" or array.dtype == object:
                    array = np.asarray(array, dtype=object).astype(STRING_DTYPE)
                g.create_dataset(key, data=array)
            g.attrs["created"] = utc_now()
            g.attrs["status"] = COMPLETE

    def has_group(self, path: str) -> bool:
        """Whether a complete group ``path`` ("<kind>/<name>") exists."""
        kind, name = self._group_path(path).split("/")
        return name in self.groups(kind)

    def read_group(
        self, path: str, *, nested: bool = False
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The datasets and attributes of the complete group ``path`` ("<kind>/<name>").

        Args:
            path: the group, as given to ``write_group``.
            nested: also read the subgroups (the /wilcoxon, /correlation, /lda layouts), as
                nested dicts; else only the group's own datasets.

        Returns:
            (arrays, attrs): {dataset: array} (string datasets as str arrays; with
            ``nested``, {subgroup: {...}} too) and the attributes as plain Python values.
            ValueError when the group does not exist or is incomplete.
        """
        kind, name = self._group_path(path).split("/")
        with self._read() as f:
            g = self._complete(f, kind, name, f"group {path!r}", kind)
            return _datasets(g, nested), {k: from_attr(v) for k, v in g.attrs.items()}

    def write_result(
        self, kind: str, name: str, result: StoredResult, *, overwrite: bool = False
    ) -> str:
        """Store a result object as the group /<kind>/<name> (``write_group``), atomically.

        Args:
            kind: the group kind, e.g. "masking" or "single_class" (docs/RESULTS_FORMAT.md).
            name: the group name (``check_name``).
            result: its ``arrays()`` become the datasets, its ``attrs()`` the attributes.
            overwrite: replace an existing group instead of a ValueError.

        Returns:
            The group path "<kind>/<name>".
        """
        path = f"{kind}/{name}"
        self.write_group(path, result.arrays(), result.attrs(), overwrite=overwrite)
        return path

    def read_result(self, cls: type[ResultT], kind: str, name: str) -> ResultT:
        """The group /<kind>/<name> as a ``cls`` (``cls.from_group(arrays, attrs)``), the
        inverse of ``write_result``; ValueError when the group does not exist."""
        return cls.from_group(*self.read_group(f"{kind}/{name}"))

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
        check_finalized(target, name)
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
        with directory_lock(directory):
            removed = sorted(p for p in directory.glob(".*.tmp-*") if p.is_file())
            for path in removed:
                path.unlink(missing_ok=True)
        return removed


