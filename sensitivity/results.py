"""``AnalysisResult``: the per-layer sensitivity arrays of one analysis, in memory.

Produced by the engine (and the gsa functions through it), written and read by
``sensitivity.store.ResultsStore``, drawn by ``sensitivity.report``. Arrays are numpy float64;
``u`` below is a layer's unit shape: (C, H, W) for a map, (C,) for a channel mean, (F,) for a
fully connected layer.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

METHODS = ("sobol", "shapley", "variance", "contrast")

# Arrays (G, *u): one map per variable (group, or augmentation for contrast).
PER_VARIABLE_KEYS = (
    "S1", "ST", "S1_conf", "ST_conf",
    "shapley", "shapley_normalized", "shapley_conf", "shapley_normalized_conf",
    "mean_diff", "sd_diff", "effect_size", "mean_diff_conf", "effect_size_conf",
)
# Arrays (G, G, *u).
PAIR_KEYS = ("S2", "S2_conf")
# Arrays (*u).
UNIT_KEYS = ("mean", "var", "std", "cv", "mean_conf", "var_conf")
KNOWN_KEYS = PER_VARIABLE_KEYS + PAIR_KEYS + UNIT_KEYS

# The per-variable values each method reports, headline first (summaries, heatmaps, W&B).
METHOD_VALUE_KEYS: dict[str, tuple[str, ...]] = {
    "sobol": ("S1", "ST"),
    "shapley": ("shapley_normalized", "shapley"),
    "variance": (),
    "contrast": ("effect_size", "mean_diff"),
}


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

    method: "sobol" | "shapley" | "variance" | "contrast".
    group_names: the variables in index order (G): the problem's groups (players); for
        "contrast" the augmentations (A).
    layers: layer name -> {key: array}, in checkpoint order. Keys and shapes (u = unit shape):
        "S1", "ST", "S1_conf", "ST_conf" (G, *u); "S2", "S2_conf" (G, G, *u);
        "shapley", "shapley_normalized", "shapley_conf", "shapley_normalized_conf" (G, *u)
        ("shapley" in variance units, "shapley_normalized" sums to 1 over variables);
        "mean", "var", "std", "cv", "mean_conf", "var_conf" (*u) (population variance);
        "mean_diff", "sd_diff", "effect_size", "mean_diff_conf", "effect_size_conf" (A, *u).
        Conf arrays are confidence-interval half-widths (95% unless the analysis says otherwise).
    n: base size (Sobol base points, Shapley trajectories or permutations, probe images).
    evaluations: forward rows evaluated.
    seconds: wall time of the analysis.
    epoch, global_step: training position when analysed (None outside training).
    n_constant: layer -> number of units with zero variance (their indices are reported as 0);
        completed with 0 for every layer not given.

    Construction validates names and shapes (ValueError) and converts arrays to float64.
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

    def __post_init__(self) -> None:
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

    def _check_layer(self, layer: str, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
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
        """Unit shape of ``layer``: (C, H, W), (C,) or (F,)."""
        values = self._layer(layer)
        key, array = next(iter(values.items()))
        return tuple(array.shape[_leading_axes(key):])

    def _layer(self, layer: str) -> dict[str, np.ndarray]:
        if layer not in self.layers:
            raise ValueError(f"no layer {layer!r} in this result; layers: {self.layer_names}")
        return self.layers[layer]

    def mean_index(self, key: str) -> np.ndarray:
        """(L, G) float64: per layer and variable, the mean of ``key`` over the layer's units.

        ``key`` is a per-variable key ("S1", "ST", "shapley_normalized", ...). Non-finite
        units are left out of the mean; a layer without finite units gives NaN.
        """
        if key not in PER_VARIABLE_KEYS:
            raise ValueError(
                f"mean_index needs a per-variable key (G, *u), one of {list(PER_VARIABLE_KEYS)}; "
                f"got {key!r}"
            )
        missing = [layer for layer, values in self.layers.items() if key not in values]
        if missing:
            raise ValueError(
                f"key {key!r} is missing in layers {missing}; this {self.method} result has "
                f"value keys {self.value_keys}"
            )
        rows = []
        for values in self.layers.values():
            flat = values[key].reshape(len(self.group_names), -1)
            finite = np.isfinite(flat)
            count = finite.sum(axis=1)
            total = np.where(finite, flat, 0.0).sum(axis=1)
            rows.append(np.divide(total, count, out=np.full(len(total), np.nan), where=count > 0))
        return np.stack(rows)

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """{key: {layer: {variable: mean over units}}} for every key of ``value_keys``.

        This is what W&B logs as ``sensitivity/<method>/<layer>/<variable>``; the "variance"
        method has no per-variable keys and gives {}.
        """
        out: dict[str, dict[str, dict[str, float]]] = {}
        for key in self.value_keys:
            means = self.mean_index(key)
            out[key] = {
                layer: {g: float(v) for g, v in zip(self.group_names, row, strict=True)}
                for layer, row in zip(self.layer_names, means, strict=True)
            }
        return out

    def allclose(self, other: AnalysisResult, rtol: float = 1e-6, atol: float = 0.0) -> bool:
        """Same metadata, layers, keys and shapes, and arrays equal within ``rtol``/``atol``
        (NaN equals NaN). ``seconds`` is compared with ``rtol`` too."""
        for f in dataclasses.fields(self):
            if f.name in ("layers", "seconds"):
                continue
            if getattr(self, f.name) != getattr(other, f.name):
                return False
        if not math.isclose(self.seconds, other.seconds, rel_tol=rtol, abs_tol=atol):
            return False
        if list(self.layers) != list(other.layers):
            return False
        for layer, values in self.layers.items():
            theirs = other.layers[layer]
            if set(values) != set(theirs):
                return False
            for key, array in values.items():
                if array.shape != theirs[key].shape or not np.allclose(
                    array, theirs[key], rtol=rtol, atol=atol, equal_nan=True
                ):
                    return False
        return True
