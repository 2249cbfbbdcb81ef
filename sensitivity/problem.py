"""Augmentation problems: input variables, groups and the decoding of design rows (METHOD.md s. 3).

A problem is an ordered list of groups (the players of the analysis), each owning columns of a
design row x in [0, 1)^d:

- one group per augmentation, built-in or registered (``sensitivity.registry``): a switch column
  (applied iff u < p_on; dropped when p_on == 1) followed by its parameter columns, u mapped
  linearly to the bounds at the image size (integer parameters rounded to the nearest integer);
- ``order``: floor(u * K!) -> the permutation of the K augmentations with that Lehmer code
  (lexicographic rank); switched-on augmentations are applied in that order;
- ``class``: floor(u * n_classes); ``image``: floor(u * images_per_class) within that class;
- ``partition``: floor(2u), the data split, when two splits are analysed together.

Without an ``order`` auxiliary augmentations apply in problem order; without ``class``/``image``
the class/image index is 0 (which is why n_classes > 1 needs ``class`` and images_per_class > 1
needs ``image``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sensitivity import augmentations as augs
from sensitivity.augmentation_specs import BUILTIN
from sensitivity.augmentations import AUGMENTATIONS
from sensitivity.decoded import DecodedRows, cell_index, lehmer_permutations
from sensitivity.pipeline import compose
from sensitivity.problem_arguments import (
    DEFAULT_P_ON,
    resolve_augmentations,
    resolve_p_on,
    resolve_params,
)
from sensitivity.registry import RESERVED_NAMES, check_record, registration_record

AUXILIARIES = RESERVED_NAMES
POSTPROCESSES = ("minmax",)
PAPER_METHODS = ("sobol", "shapley")
# Discrete columns with more cells than this keep their quasi-random values (discrete_columns).
MAX_DISCRETE_CELLS = 2**16


@dataclass(frozen=True)
class Group:
    """A player of the analysis.

    Attributes:
        name: the augmentation's name, or the auxiliary's ("order", "class", ...).
        kind: "augmentation", "order", "class", "image" or "partition".
        columns: its column indices in a design row.
    """

    name: str
    kind: str
    columns: list[int]


class AugmentationProblem:
    """Groups and columns of an augmentation-sensitivity problem, and row decoding.

    Args:
        augmentations: a set number (1 or 2) or augmentation names, in problem order; a name
            may be the import path "package.module:function" of a registered augmentation
            (``sensitivity.registry``), which is imported and stands for its name.
        p_on: probability each augmentation is applied, one number or {name: p} (missing:
            0.5); p_on == 1 drops the switch column (always on).
        auxiliaries: any of "order", "class", "image", "partition", as extra groups in that
            order.
        n_classes, images_per_class: probe-set size, class-major.
        postprocess: None or "minmax" (per-image, per-channel min-max after augmenting, as the
            reference did; it cancels most of brightness and contrast).
        bounds: optional {augmentation: {parameter: (low, high)}} at 224 px, inside the
            published ranges, to narrow a parameter.
        registered: {augmentation: ``registry.registration_record``} of the registered
            (non-built-in) augmentations, as ``to_config`` writes them: each is imported from
            its recorded path if this process has not registered it, and must equal this
            process's registration.

    Raises:
        ValueError: unknown augmentations, auxiliaries or postprocess; p_on outside (0, 1];
            n_classes or images_per_class > 1 without its auxiliary; bounds outside the
            published ranges; no input variable at all; a registered augmentation that differs
            from its record, or a record of an augmentation not in the problem.
    """

    def __init__(
        self,
        augmentations: int | Sequence[str],
        p_on: float | Mapping[str, float] = DEFAULT_P_ON,
        auxiliaries: Sequence[str] = ("order", "class", "image"),
        n_classes: int = 1,
        images_per_class: int = 1,
        postprocess: str | None = None,
        bounds: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
        registered: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        for name, record in (registered or {}).items():
            check_record(name, record)  # before the names: it may import the augmentation
        self.augmentations = resolve_augmentations(augmentations)
        stray = sorted(set(registered or {}) - set(self.augmentations))
        if stray:
            raise ValueError(
                f"registered records {stray} are of augmentations not in this problem "
                f"{self.augmentations}; drop them or add the augmentations"
            )
        self.p_on = resolve_p_on(p_on, self.augmentations)
        self.auxiliaries = self._resolve_auxiliaries(auxiliaries)
        for label, value in (("n_classes", n_classes), ("images_per_class", images_per_class)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{label} must be an integer >= 1, got {value!r}")
        self.n_classes = int(n_classes)
        self.images_per_class = int(images_per_class)
        if self.n_classes > 1 and "class" not in self.auxiliaries:
            raise ValueError(
                f"n_classes={n_classes} but no 'class' auxiliary: every row would use class 0; "
                f"add 'class' to auxiliaries or set n_classes=1"
            )
        if self.images_per_class > 1 and "image" not in self.auxiliaries:
            raise ValueError(
                f"images_per_class={images_per_class} but no 'image' auxiliary: every row would "
                f"use the first image of its class; add 'image' or set images_per_class=1"
            )
        if postprocess is not None and postprocess not in POSTPROCESSES:
            raise ValueError(f"unknown postprocess {postprocess!r}; use None or 'minmax'")
        self.postprocess = postprocess
        self.params = resolve_params(self.augmentations, bounds)
        self._custom_bounds = {a: dict(b) for a, b in (bounds or {}).items()}
        self._build_groups()

    @staticmethod
    def _resolve_auxiliaries(auxiliaries: Sequence[str]) -> tuple[str, ...]:
        """The auxiliary names, checked: known and each once."""
        names = [auxiliaries] if isinstance(auxiliaries, str) else list(auxiliaries)
        unknown = [a for a in names if a not in AUXILIARIES]
        if unknown:
            raise ValueError(f"unknown auxiliary variable(s) {unknown}; valid: {list(AUXILIARIES)}")
        if len(set(names)) != len(names):
            raise ValueError(f"auxiliaries {names} repeat a name; list each once")
        return tuple(names)

    def _build_groups(self) -> None:
        """Lay out the columns and groups: per augmentation switch then parameters, then aux."""
        self.groups: list[Group] = []
        self.column_names: list[str] = []
        self.switch_columns: dict[str, int | None] = {}
        self.param_columns: dict[str, list[int]] = {}
        for name in self.augmentations:
            start = len(self.column_names)
            if self.p_on[name] < 1.0:
                self.switch_columns[name] = start
                self.column_names.append(f"{name}.switch")
            else:
                self.switch_columns[name] = None
            first = len(self.column_names)
            self.column_names += [f"{name}.{p.name}" for p in self.params[name]]
            self.param_columns[name] = list(range(first, len(self.column_names)))
            if len(self.column_names) > start:
                self.groups.append(
                    Group(name, "augmentation", list(range(start, len(self.column_names))))
                )
            # A parameterless augmentation with p_on = 1 is applied to every row: it is part of
            # the model, not an input variable, so it owns no group.
        for aux in self.auxiliaries:
            self.groups.append(Group(aux, aux, [len(self.column_names)]))
            self.column_names.append(aux)
        if not self.groups:
            raise ValueError(
                "the problem has no input variable: every augmentation is parameterless with "
                "p_on = 1 and there are no auxiliaries; lower p_on or add auxiliaries"
            )

    @property
    def group_names(self) -> list[str]:
        """The groups' names, in order (G)."""
        return [g.name for g in self.groups]

    @property
    def group_columns(self) -> list[list[int]]:
        """Each group's column indices, in group order."""
        return [list(g.columns) for g in self.groups]

    @property
    def d(self) -> int:
        """Number of columns of a design row."""
        return len(self.column_names)

    @property
    def n_images(self) -> int:
        """Probe images per split: n_classes * images_per_class."""
        return self.n_classes * self.images_per_class

    def group_index(self, name: str) -> int:
        """Index of a group.

        Args:
            name: an augmentation or auxiliary of this problem.

        Returns:
            Its position in ``groups``.

        Raises:
            ValueError: no group of that name.
        """
        if name not in self.group_names:
            raise ValueError(f"no group {name!r}; groups: {self.group_names}")
        return self.group_names.index(name)

    def discrete_columns(self) -> dict[int, np.ndarray]:
        """{column: cell edges} of the columns read only through the cell their value is in.

        Switches (edges [0, p_on, 1]: on, off), ``class`` (n_classes equal cells), ``image``
        (images_per_class), ``partition`` (2) and ``order`` when it has at most
        ``MAX_DISCRETE_CELLS`` permutations (K! cells; beyond that two draws almost never share
        a cell and a cell's edges would not be resolved in float64). Designs draw these
        columns' pairs balanced (``designs.BalancedPairs``). Cells with one value are left out.

        Returns:
            {column: (cells + 1,) float64 edges in [0, 1]}, by column.
        """
        out: dict[int, np.ndarray] = {}
        for name, column in self.switch_columns.items():
            if column is not None:
                out[column] = np.array([0.0, self.p_on[name], 1.0])
        for group in self.groups:
            count = self._cells(group.kind)
            if 1 < count <= MAX_DISCRETE_CELLS:
                out[group.columns[0]] = np.arange(count + 1) / count
        return dict(sorted(out.items()))

    def changed_groups(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """Whether each group decodes differently in rows ``first`` and ``second``.

        An augmentation changes when its switch differs, or when it is on in both and a
        parameter column differs (an integer parameter can round to the same value: counted as
        a change); an auxiliary when its cell differs. For a Sobol' design with first = A and
        second = B this is where AB_j differs from A in group j: the base points that inform
        group j's indices.

        Args:
            first, second: (R, d) design rows in [0, 1).

        Returns:
            (R, G) bool.

        Raises:
            ValueError: rows that are not (R, d) in [0, 1), or of different shapes.
        """
        first, second = self._check_rows(first), self._check_rows(second)
        if first.shape != second.shape:
            raise ValueError(f"row arrays differ in shape: {first.shape} vs {second.shape}")
        out = np.zeros((first.shape[0], len(self.groups)), dtype=bool)
        for g, group in enumerate(self.groups):
            if group.kind == "augmentation":
                switch = self.switch_columns[group.name]
                params = self.param_columns[group.name]
                moved = (first[:, params] != second[:, params]).any(axis=1)
                if switch is None:
                    out[:, g] = moved
                    continue
                on1 = first[:, switch] < self.p_on[group.name]
                on2 = second[:, switch] < self.p_on[group.name]
                out[:, g] = (on1 != on2) | (on1 & on2 & moved)
            else:
                n, column = self._cells(group.kind), group.columns[0]
                out[:, g] = cell_index(first[:, column], n) != cell_index(second[:, column], n)
        return out

    def _cells(self, kind: str) -> int:
        """Values an auxiliary variable of ``kind`` takes (1 for an augmentation group)."""
        return {
            "class": self.n_classes,
            "image": self.images_per_class,
            "partition": 2,
            "order": math.factorial(len(self.augmentations)),
        }.get(kind, 1)

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def paper(
        cls,
        augmentations: int | Sequence[str],
        method: str = "sobol",
        auxiliaries: Sequence[str] = ("order", "class", "image"),
        n_classes: int = 1,
        images_per_class: int = 1,
    ) -> AugmentationProblem:
        """The published switch semantics (Kharyuk et al.), for reproducing the paper.

        method "sobol": p_on = 1 for augmentations with parameters (always applied, no switch)
        and 0.5 for parameterless ones (sharpness, grayscale, hflip); method "shapley": p_on = 0.5
        for all. Both min-max rescale every augmented image (postprocess "minmax"). The two
        methods thus describe different input distributions, as in the reference code.

        Args:
            augmentations, auxiliaries, n_classes, images_per_class: as for the constructor.
            method: "sobol" or "shapley".

        Returns:
            The problem.

        Raises:
            ValueError: unknown method, or what the constructor refuses.
        """
        if method not in PAPER_METHODS:
            raise ValueError(f"unknown paper method {method!r}; valid: {list(PAPER_METHODS)}")
        names = resolve_augmentations(augmentations)
        if method == "sobol":
            p_on = {n: 1.0 if AUGMENTATIONS[n].params else 0.5 for n in names}
        else:
            p_on = {n: 0.5 for n in names}
        return cls(
            names,
            p_on=p_on,
            auxiliaries=auxiliaries,
            n_classes=n_classes,
            images_per_class=images_per_class,
            postprocess="minmax",
        )

    _CONFIG_KEYS = (
        "augmentations", "p_on", "auxiliaries", "n_classes", "images_per_class", "postprocess",
        "bounds", "registered",
    )

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> AugmentationProblem:
        """Build from a mapping with the constructor's keys (``overrides`` win).

        ``{"preset": "paper", "method": "sobol"|"shapley", ...}`` builds ``paper(...)`` instead;
        then only augmentations, auxiliaries, n_classes and images_per_class may be given.

        Args:
            config: constructor keyword arguments (as ``to_config`` writes them), or a preset.
            **overrides: keys that replace those of ``config``.

        Returns:
            The problem.

        Raises:
            ValueError: unknown keys or preset, no "augmentations", or what the constructor
                refuses.
        """
        merged = {**dict(config), **overrides}
        preset = merged.pop("preset", None)
        if preset is not None:
            if preset != "paper":
                raise ValueError(f"unknown problem preset {preset!r}; valid: ['paper']")
            allowed = ("augmentations", "method", "auxiliaries", "n_classes", "images_per_class")
            extra = sorted(set(merged) - set(allowed))
            if extra:
                raise ValueError(f"keys {extra} are not allowed with preset 'paper'; "
                                 f"allowed: {list(allowed)}")
            if "augmentations" not in merged:
                raise ValueError("problem config needs 'augmentations' (a set number or names)")
            return cls.paper(**merged)
        unknown = sorted(set(merged) - set(cls._CONFIG_KEYS))
        if unknown:
            raise ValueError(
                f"unknown problem config key(s) {unknown}; valid: {[*cls._CONFIG_KEYS, 'preset']}"
            )
        if "augmentations" not in merged:
            raise ValueError("problem config needs 'augmentations' (a set number or names)")
        return cls(**merged)

    def to_config(self) -> dict[str, Any]:
        """The problem as plain values.

        Returns:
            The constructor's keyword arguments (lists, dicts, numbers), which ``from_config``
            turns back into an equal problem. "registered" (the records of the non-built-in
            augmentations: import path, bounds, identity, digest) is present only when there
            are any, so the configs of built-in problems, and the resume fingerprints and
            results files made of them, are those of before the registry.
        """
        config = {
            "augmentations": list(self.augmentations),
            "p_on": dict(self.p_on),
            "auxiliaries": list(self.auxiliaries),
            "n_classes": self.n_classes,
            "images_per_class": self.images_per_class,
            "postprocess": self.postprocess,
            "bounds": {
                a: {p: list(v) for p, v in b.items()} for a, b in self._custom_bounds.items()
            },
        }
        registered = {
            a: registration_record(a) for a in self.augmentations if a not in BUILTIN
        }
        if registered:
            config["registered"] = registered
        return config

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        """Pickle as the config: a spawned process (a DDP rank, a DataLoader worker) rebuilds the
        problem, importing a registered augmentation from its recorded path and refusing one
        registered differently there (``registry.check_record``)."""
        return type(self).from_config, (self.to_config(),)

    def with_p_on(self, p_on: float | Mapping[str, float]) -> AugmentationProblem:
        """The same problem with other switch probabilities.

        Args:
            p_on: one probability in (0, 1] or {augmentation: p} (missing: 0.5).

        Returns:
            A new problem.
        """
        return type(self).from_config(self.to_config(), p_on=p_on)

    def to_salib(self) -> dict[str, Any]:
        """The problem as SALib describes one.

        Returns:
            SALib's problem dict over the unit hypercube (num_vars, names, bounds), with one
            group name per column.
        """
        return {
            "num_vars": self.d,
            "names": list(self.column_names),
            "bounds": [[0.0, 1.0] for _ in range(self.d)],
            "groups": [g.name for g in self.groups for _ in g.columns],
        }

    def __repr__(self) -> str:
        return (
            f"AugmentationProblem(augmentations={self.augmentations}, p_on={self.p_on}, "
            f"auxiliaries={list(self.auxiliaries)}, n_classes={self.n_classes}, "
            f"images_per_class={self.images_per_class}, postprocess={self.postprocess!r})"
        )

    # ---------------------------------------------------------------------------------- decoding
    def _check_rows(self, x: np.ndarray | Tensor) -> np.ndarray:
        """``x`` as float64 numpy, checked to be (R, d) finite rows in [0, 1)."""
        if isinstance(x, Tensor):
            x = x.detach().to("cpu", torch.float64).numpy()
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(
                f"rows must have shape (R, {self.d}) for this problem's columns "
                f"{self.column_names}, got {x.shape}"
            )
        if not np.all(np.isfinite(x)):
            raise ValueError("rows contain NaN or infinite values; design rows lie in [0, 1)")
        if x.size and (x.min() < 0.0 or x.max() >= 1.0):
            raise ValueError(
                f"rows must lie in [0, 1), got values in [{x.min()}, {x.max()}]; pass unit-cube "
                f"design rows, not values scaled to parameter bounds"
            )
        return x

    def decode(self, x: np.ndarray | Tensor, height: int, width: int) -> DecodedRows:
        """Decode design rows for images of ``height x width`` pixels.

        Args:
            x: (R, d) design rows in [0, 1), numpy or tensor.
            height, width: image size in px (parameters scale with it).

        Returns:
            The decoded rows (image, class, partition, order, switches, parameters).

        Raises:
            ValueError: a size that is not a positive integer, or rows that are not (R, d)
                finite values in [0, 1).
        """
        for label, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        x = self._check_rows(x)
        r, k = x.shape[0], len(self.augmentations)
        active = np.ones((r, k), dtype=bool)
        params: dict[str, dict[str, Tensor]] = {}
        for a, name in enumerate(self.augmentations):
            switch = self.switch_columns[name]
            if switch is not None:
                active[:, a] = x[:, switch] < self.p_on[name]
            params[name] = {}
            for spec, column in zip(self.params[name], self.param_columns[name], strict=True):
                low, high = spec.bounds(height, width)
                value = low + x[:, column] * (high - low)
                params[name][spec.name] = (
                    torch.from_numpy(np.rint(value).astype(np.int64))
                    if spec.integer
                    else torch.from_numpy(value.astype(np.float32))
                )
        columns = {g.kind: g.columns[0] for g in self.groups if g.kind != "augmentation"}
        if "order" in columns:
            codes = cell_index(x[:, columns["order"]], math.factorial(k))
            order = lehmer_permutations(codes, k)
        else:
            order = np.tile(np.arange(k, dtype=np.int64), (r, 1))
        zeros = np.zeros(r, dtype=np.int64)
        klass = cell_index(x[:, columns["class"]], self.n_classes) if "class" in columns else zeros
        image = (
            cell_index(x[:, columns["image"]], self.images_per_class)
            if "image" in columns
            else zeros
        )
        partition = (
            torch.from_numpy(cell_index(x[:, columns["partition"]], 2)) if "partition" in columns
            else None
        )
        return DecodedRows(
            image_index=torch.from_numpy(klass * self.images_per_class + image),
            class_index=torch.from_numpy(klass.copy()),
            partition=partition,
            order=torch.from_numpy(order),
            active=torch.from_numpy(active),
            params=params,
        )

    # ------------------------------------------------------------------------------ augmenting
    def augment(self, images: Tensor, decoded: DecodedRows) -> Tensor:
        """Apply each row's switched-on augmentations in that row's order, batched.

        At most K^2 batched calls (``pipeline.compose``), then the problem's ``postprocess``.

        Args:
            images: (R, 3, H, W) float in [0, 1], row r showing the image ``decoded`` names for
                row r; not modified.
            decoded: these rows decoded at this H, W by this problem.

        Returns:
            (R, 3, H, W) augmented images, the input dtype and device.

        Raises:
            ValueError: images that are not (R, 3, H, W) in [0, 1], or rows decoded for another
                row count or problem.
        """
        k = len(self.augmentations)
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images)
            raise ValueError(f"images must be a (R, 3, H, W) tensor, got {shape}")
        if images.shape[0] != len(decoded) or tuple(decoded.order.shape) != (len(decoded), k):
            raise ValueError(
                f"{images.shape[0]} images but decoded rows for {len(decoded)} rows and "
                f"{decoded.order.shape[1]} augmentations (this problem has {k}); decode the "
                f"same rows with this problem"
            )
        on_device = decoded.to(images.device)
        out = compose(images, self.augmentations, decoded.order, decoded.active, on_device.params)
        if self.postprocess == "minmax":
            out = augs.minmax_rescale(out)
        return out
