"""``AnalysisResult``: the per-layer sensitivity arrays of one analysis, in memory.

Produced by the engine (and the gsa functions through it), written and read by
``sensitivity.store.ResultsStore``, drawn by ``sensitivity.report``. Arrays are numpy float64;
``u`` below is a layer's unit shape: (C, H, W) for a map, (C,) for a channel mean, (F,) for a
fully connected layer; (H, W, C) for a channels-last map and (L, D) for tokens, whose unit
layout (``layouts``) says which axis holds the channels.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sensitivity.config import METHODS
from sensitivity.layouts import UnitLayout, features_first

# Arrays (G, *u): one map per variable (group, or augmentation for contrast).
PER_VARIABLE_KEYS = (
    "S1", "ST", "S1_conf", "ST_conf",
    "shapley", "shapley_normalized", "shapley_conf", "shapley_normalized_conf",
    "mean_diff", "sd_diff", "effect_size", "mean_diff_conf", "effect_size_conf",
)
# Arrays (G, G, *u).
PAIR_KEYS = ("S2", "S2_conf")
# Arrays (*u).
UNIT_KEYS = (
    "mean", "var", "std", "cv", "mean_conf", "var_conf", "index_variance", "index_variance_conf",
)
KNOWN_KEYS = PER_VARIABLE_KEYS + PAIR_KEYS + UNIT_KEYS

# Per (layer, variable) statistics over a layer's valid units (``AnalysisResult.summary``).
SUMMARY_STATISTICS = ("median", "p10", "p90", "mean")

# The per-variable values each method reports, headline first (summaries, heatmaps, W&B).
METHOD_VALUE_KEYS: dict[str, tuple[str, ...]] = {
    "sobol": ("S1", "ST"),
    "shapley": ("shapley_normalized", "shapley"),
    "variance": (),
    "contrast": ("effect_size", "mean_diff"),
}


def ranked_variables(values: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Variables by their median, largest first (one layer of ``AnalysisResult.summary()``).

    Args:
        values: {variable: {"median": ..., ...}} of one key and layer.

    Returns:
        The variables with a finite median, in descending order of it (ties keep their
        order); [] when the layer has no valid unit.
    """
    finite = [name for name, stats in values.items() if math.isfinite(stats["median"])]
    return sorted(finite, key=lambda name: values[name]["median"], reverse=True)


def _leading_axes(key: str) -> int:
    """How many leading axes of ``key``'s array index variables (0, 1 or 2)."""
    if key in PAIR_KEYS:
        return 2
    if key in UNIT_KEYS:
        return 0
    return 1


@dataclass(eq=False)
class AnalysisResult:
    """Sensitivity arrays of one analysis, per checkpoint layer.

    Attributes:
        method: "sobol" | "shapley" | "variance" | "contrast".
        group_names: the variables in index order (G): the problem's groups (players); for
            "contrast" the augmentations (A).
        layers: layer name -> {key: float64 array}, in checkpoint order (u = unit shape):
            "S1", "ST", "S1_conf", "ST_conf" (G, *u); "S2", "S2_conf" (G, G, *u);
            "shapley" (variance units), "shapley_normalized" (sums to 1 over variables) and
            their "_conf" (G, *u); "mean", "var", "std", "cv", "mean_conf", "var_conf" (*u)
            over all rows; "index_variance", "index_variance_conf" (*u), the variance the
            indices are normalised by (Sobol: of the A and B rows; Shapley: the sum of the
            effects); "mean_diff", "sd_diff", "effect_size", "mean_diff_conf",
            "effect_size_conf" (A, *u). "_conf" arrays are confidence-interval half-widths.
        n: base size (Sobol base points, Shapley trajectories or permutations, probe images).
        evaluations: forward rows evaluated.
        seconds: wall time of the analysis on rank zero, a resumed run's earlier part included.
        epoch, global_step: training position when analysed (None outside training).
        n_constant: layer -> number of units with zero variance (indices reported as 0);
            completed with 0 for every layer not given.
        flags: layer -> (*u) uint8, ``sensitivity.estimators.FLAG_*`` (0 valid, 1 constant,
            2 unsupported, 3 negligible); a layer not given has every unit valid. Flagged units
            keep their raw values and are left out of ``summary``, figures and rankings.
        interval: how the ``*_conf`` half-widths were computed.
        replicates: randomised quasi-Monte-Carlo replicates behind them (1: none).
        toggles: variable -> base points (trajectories) in which that variable changes between
            the two rows of a pair (Sobol: A and AB_j; Goda: x1 and x2).
        settings: the run's settings as the results file records them
            (``config.analysis_attrs``), filled by the engine; empty for results made otherwise.
        layouts: layer -> ``UnitLayout`` (output layout, reduction, element; the names of the
            unit axes), filled by the engine; a layer not given has no record (its units are
            read as (C, ...) or (F,), channels first).

    Raises:
        ValueError: an unknown method, repeated names, no layers, unknown keys, shapes that do
            not match G and one unit shape per layer, or flags, n_constant or toggles naming
            unknown layers or variables, or layouts of unknown layers or with another number of
            unit axes than the unit shape. Arrays are converted to float64.
    """

    method: str
    group_names: list[str]
    layers: dict[str, dict[str, np.ndarray]]
    n: int
    evaluations: int
    seconds: float = 0.0
    epoch: int | None = None
    global_step: int | None = None
    n_constant: dict[str, int] = field(default_factory=dict)
    flags: dict[str, np.ndarray] = field(default_factory=dict)
    interval: str = ""
    replicates: int = 1
    toggles: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    layouts: dict[str, UnitLayout] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check names and shapes; complete n_constant and flags."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; valid: {list(METHODS)}")
        self.group_names = [str(g) for g in self.group_names]
        if len(set(self.group_names)) != len(self.group_names):
            raise ValueError(f"group_names {self.group_names} repeat a name; list each once")
        if not self.layers:
            raise ValueError("an AnalysisResult needs at least one layer")
        unknown_constant = sorted(set(self.n_constant) - set(self.layers))
        if unknown_constant:
            raise ValueError(f"n_constant names layers {unknown_constant} that have no arrays")
        self.layers = {
            str(layer): self._check_layer(str(layer), values)
            for layer, values in self.layers.items()
        }
        self.n_constant = {layer: int(self.n_constant.get(layer, 0)) for layer in self.layers}
        unknown_flags = sorted(set(self.flags) - set(self.layers))
        if unknown_flags:
            raise ValueError(f"flags name layers {unknown_flags} that have no arrays")
        flags = {}
        for layer in self.layers:
            shape = self.unit_shape(layer)
            flag = np.asarray(self.flags.get(layer, np.zeros(shape)), dtype=np.uint8)
            if flag.shape != shape:
                raise ValueError(
                    f"layer {layer!r}: flags have shape {flag.shape}, the units {shape}"
                )
            flags[layer] = flag
        self.flags = flags
        unknown_toggles = sorted(set(self.toggles) - set(self.group_names))
        if unknown_toggles:
            raise ValueError(f"toggles name {unknown_toggles}, which are not variables")
        self.toggles = {str(k): int(v) for k, v in self.toggles.items()}
        self.settings = dict(self.settings)
        self.layouts = self._check_layouts(self.layouts)

    def _check_layouts(self, layouts: Mapping[str, UnitLayout]) -> dict[str, UnitLayout]:
        """The unit layouts, checked against the layers and their unit shapes."""
        unknown = sorted(set(layouts) - set(self.layers))
        if unknown:
            raise ValueError(f"layouts name layers {unknown} that have no arrays")
        for layer, unit in layouts.items():
            if len(unit.unit_axes) != len(self.unit_shape(layer)):
                raise ValueError(
                    f"layer {layer!r}: unit shape {self.unit_shape(layer)} does not have the "
                    f"unit axes {','.join(unit.unit_axes)} of its layout {unit}"
                )
        return {layer: layouts[layer] for layer in self.layers if layer in layouts}

    def _check_layer(self, layer: str, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One layer's arrays as float64, checked: known keys, G leading axes, one unit shape."""
        if not values:
            raise ValueError(f"layer {layer!r} has no arrays")
        g = len(self.group_names)
        checked: dict[str, np.ndarray] = {}
        unit_shape: tuple[int, ...] | None = None
        for key, value in values.items():
            if key not in KNOWN_KEYS:
                raise ValueError(f"layer {layer!r}: unknown key {key!r}; valid: {list(KNOWN_KEYS)}")
            array = np.asarray(value, dtype=np.float64)
            lead = _leading_axes(key)
            if array.ndim < lead or array.shape[:lead] != (g,) * lead:
                raise ValueError(
                    f"layer {layer!r}: {key} has shape {array.shape}; expected {(g,) * lead} "
                    f"followed by the unit shape (G = {g} variables {self.group_names})"
                )
            shape = array.shape[lead:]
            if unit_shape is not None and shape != unit_shape:
                raise ValueError(
                    f"layer {layer!r}: {key} has unit shape {shape} but other arrays have "
                    f"{unit_shape}; every array of a layer shares the unit shape"
                )
            unit_shape = shape
            checked[key] = array
        return checked

    # ------------------------------------------------------------------------------- queries
    @property
    def layer_names(self) -> list[str]:
        """Layers in checkpoint order."""
        return list(self.layers)

    @property
    def value_keys(self) -> list[str]:
        """The method's per-variable value keys present in every layer, headline first.

        sobol: S1, ST; shapley: shapley_normalized, shapley; contrast: effect_size, mean_diff;
        variance: none.
        """
        return [
            key for key in METHOD_VALUE_KEYS[self.method]
            if all(key in values for values in self.layers.values())
        ]

    def unit_shape(self, layer: str) -> tuple[int, ...]:
        """The unit shape of a layer.

        Args:
            layer: a layer of this result.

        Returns:
            (C, H, W), (C,) or (F,); (H, W, C) or (L, D) for other layouts.

        Raises:
            ValueError: an unknown layer.
        """
        values = self._layer(layer)
        key, array = next(iter(values.items()))
        return tuple(array.shape[_leading_axes(key):])

    def unit_layout(self, layer: str) -> UnitLayout | None:
        """The unit layout of a layer.

        Args:
            layer: a layer of this result.

        Returns:
            Its ``UnitLayout``, None when the result has no record of it.

        Raises:
            ValueError: an unknown layer.
        """
        self._layer(layer)
        return self.layouts.get(layer)

    def features_first(self, layer: str, key: str) -> np.ndarray:
        """A layer's ``key`` array with the channels (hidden features) right after the
        variable axes: (G, C, H, W) of an (H, W, C) map, (G, D, L) of tokens (L, D); unchanged
        for channels-first units and layers without a record. Correlation, LDA and the
        reports take maps this way.

        Args:
            layer: a layer of this result.
            key: one of its keys.

        Returns:
            The array, or a C-contiguous transposed copy (``layouts.features_first``).
        """
        values = self._layer(layer)[key]
        return features_first(values, _leading_axes(key), self.layouts.get(layer))

    def _layer(self, layer: str) -> dict[str, np.ndarray]:
        """The arrays of ``layer``, or a ValueError listing the layers."""
        if layer not in self.layers:
            raise ValueError(f"no layer {layer!r} in this result; layers: {self.layer_names}")
        return self.layers[layer]

    def valid(self, layer: str) -> np.ndarray:
        """The units of a layer whose indices are meaningful (flag 0).

        Args:
            layer: a layer of this result.

        Returns:
            (*u) bool.

        Raises:
            ValueError: an unknown layer.
        """
        self._layer(layer)
        return self.flags[layer] == 0

    def valid_fraction(self) -> np.ndarray:
        """The share of each layer's units that are valid.

        Returns:
            (L,) float64 in [0, 1], in layer order.
        """
        return np.array([float(self.valid(layer).mean()) for layer in self.layer_names])

    def _values(self, key: str, lead: int) -> list[np.ndarray]:
        """Per layer, the valid units' values of ``key``: (G^lead, V) arrays (V valid units)."""
        missing = [layer for layer, values in self.layers.items() if key not in values]
        if missing:
            raise ValueError(
                f"key {key!r} is missing in layers {missing}; this {self.method} result has "
                f"value keys {self.value_keys}"
            )
        if _leading_axes(key) != lead:
            raise ValueError(f"{key!r} is not a key with {lead} variable axes")
        g = len(self.group_names)
        return [
            values[key].reshape(g**lead, -1)[:, self.valid(layer).reshape(-1)]
            for layer, values in self.layers.items()
        ]

    def layer_statistics(self, key: str) -> dict[str, np.ndarray]:
        """Per layer and variable, statistics of ``key`` over the layer's valid units.

        Units flagged in ``flags`` and non-finite values are left out.

        Args:
            key: a per-variable key ("S1", "ST_conf", "shapley_normalized", ...) or a pair key
                ("S2", "S2_conf").

        Returns:
            {"median", "p10", "p90", "mean": (L, G) float64, (L, G, G) for a pair key}; NaN
            where a layer has no valid unit with a finite value.

        Raises:
            ValueError: a key of another kind, or one missing in some layer.
        """
        if key not in PER_VARIABLE_KEYS + PAIR_KEYS:
            raise ValueError(
                f"layer statistics need a per-variable or pair key, one of "
                f"{list(PER_VARIABLE_KEYS + PAIR_KEYS)}; got {key!r}"
            )
        lead = _leading_axes(key)
        shape = (len(self.group_names),) * lead
        functions = {
            "median": np.nanmedian,
            "p10": lambda v, axis: np.nanpercentile(v, 10, axis=axis),
            "p90": lambda v, axis: np.nanpercentile(v, 90, axis=axis),
            "mean": np.nanmean,
        }
        out: dict[str, list[np.ndarray]] = {name: [] for name in SUMMARY_STATISTICS}
        for values in self._values(key, lead):
            values = np.where(np.isfinite(values), values, np.nan)
            with warnings.catch_warnings():
                # A layer without valid finite units gives NaN, which is the answer.
                warnings.simplefilter("ignore", RuntimeWarning)
                for name, function in functions.items():
                    out[name].append(function(values, axis=1).reshape(shape))
        return {name: np.stack(rows) for name, rows in out.items()}

    def summary(self) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
        """Statistics of the value keys over each layer's valid units (what W&B logs).

        Returns:
            {key: {layer: {variable: {statistic: value}}}}. Keys: every key of ``value_keys``
            and its half-width key when present ("S1", "S1_conf", ...), then "S2" and
            "S2_conf" with second order, whose variables are the pairs "a:b" (a before b in
            ``group_names``). Statistics: "median", "p10", "p90", "mean", and
            "valid_fraction" (the share of the layer's units behind them). {} for the
            "variance" method.
        """
        candidates = [k for key in self.value_keys for k in (key, f"{key}_conf")]
        if self.value_keys:
            candidates += list(PAIR_KEYS)
        keys = [k for k in candidates if all(k in values for values in self.layers.values())]
        names = self.group_names
        pairs = [(j, k) for j in range(len(names)) for k in range(j + 1, len(names))]
        fractions = self.valid_fraction()
        out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
        for key in keys:
            stats = self.layer_statistics(key)
            cells = (
                [(f"{names[j]}:{names[k]}", (j, k)) for j, k in pairs] if key in PAIR_KEYS
                else [(name, (j,)) for j, name in enumerate(names)]
            )
            out[key] = {
                layer: {
                    label: {
                        **{name: float(stats[name][(i, *at)]) for name in SUMMARY_STATISTICS},
                        "valid_fraction": float(fractions[i]),
                    }
                    for label, at in cells
                }
                for i, layer in enumerate(self.layer_names)
            }
        return out

    def top_variable_shares(self, key: str | None = None) -> dict[str, dict[str, float]]:
        """Per layer, the share of valid units whose largest index is each variable's.

        Args:
            key: a per-variable key; None: the headline value key (``value_keys[0]``).

        Returns:
            {layer: {variable: share in [0, 1]}}: among the layer's valid units with a finite
            value for every variable, the fraction whose argmax over the variables is that
            variable (a tie goes to the first in ``group_names``); shares sum to 1, or are all
            0 when no unit qualifies. {} when the result has no value key (variance).

        Raises:
            ValueError: a key that is not a per-variable key, or one missing in some layer.
        """
        if key is None:
            if not self.value_keys:
                return {}
            key = self.value_keys[0]
        if _leading_axes(key) != 1:
            raise ValueError(f"top-variable shares need a per-variable key, got {key!r}")
        out: dict[str, dict[str, float]] = {}
        for layer, values in zip(self.layer_names, self._values(key, 1), strict=True):
            finite = values[:, np.isfinite(values).all(axis=0)]  # (G, units kept)
            counts = np.bincount(finite.argmax(axis=0), minlength=len(self.group_names))
            total = max(finite.shape[1], 1)
            out[layer] = {name: float(counts[g] / total)
                          for g, name in enumerate(self.group_names)}
        return out

    def allclose(self, other: AnalysisResult, rtol: float = 1e-6, atol: float = 0.0) -> bool:
        """Whether two results agree: metadata, layers, keys, shapes, flags and arrays.

        ``settings`` are not compared (a result read back from a results file has them among
        the group's other attributes).

        Args:
            other: the result to compare with.
            rtol, atol: tolerances of the arrays (NaN equals NaN) and of ``seconds``.

        Returns:
            True when everything agrees.
        """
        for f in dataclasses.fields(self):
            if f.name in ("layers", "seconds", "flags", "settings"):
                continue
            if getattr(self, f.name) != getattr(other, f.name):
                return False
        if not math.isclose(self.seconds, other.seconds, rel_tol=rtol, abs_tol=atol):
            return False
        if list(self.layers) != list(other.layers):
            return False
        for layer, values in self.layers.items():
            if not np.array_equal(self.flags[layer], other.flags[layer]):
                return False
            theirs = other.layers[layer]
            if set(values) != set(theirs):
                return False
            for key, array in values.items():
                if array.shape != theirs[key].shape or not np.allclose(
                    array, theirs[key], rtol=rtol, atol=atol, equal_nan=True
                ):
                    return False
        return True
