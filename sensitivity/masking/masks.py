"""Mask maths of guided masking (METHOD.md section 8): which units a mask touches and by what
factor.

Masks. For a value type ("S1" or "ST" clipped to [0, 1], or "shapley_normalized" clipped to
[0, 1]) and a variable v, every masked layer gets its map M_v. Quantile masks: t = q-quantile of
M_v over the layer's valid units (numpy's linear interpolation); valid units with M_v >= t are
multiplied by alpha, for alpha in ALPHAS x q in QUANTILES. Soft masks multiply every valid unit
by M_v ("soft") or by 1 - M_v ("soft_inverse"). 15 + 2 = 17 configurations; one variable's mask
is applied at every masked layer at once. Default masked layers: the analysed layers whose
output has positions, i.e. maps (C, H, W) or (H, W, C) and tokens (L, D), not flat (F,) ones.

Flagged units. Units the analysis flagged (``AnalysisResult.flags``: zero, unsupported or
negligible variance) have no meaningful M_v; their raw values can be anything. They are left out
of the quantile, never selected by a quantile mask, and left untouched (factor 1) by the soft
masks; ``sensitivity_maps`` returns which units are valid next to the maps.

Map shapes. A map of reduction "none" has the layer's output shape ((C, H, W), (H, W, C), (L, D)
or (F,)) and masks units one by one. A channel-mean map (C,) or (D,) masks whole channels
(hidden features): its factor is broadcast over the positions, along the channel axis of the
output's layout (``MapPlacement``), and the quantile is taken over the C channels. A class-token
map (D,) masks the class token's features only. Anything else is a ValueError.

Factors. Every mask of a configuration multiplies each masked layer's output by a factor
tensor (alpha at the selected units and 1 elsewhere, or the soft factors): a ``FactorMask``,
which keeps its factors so that several configurations can run in one batch of copies of the
same inputs (``stacked_mask``), with exactly the products each would give alone.

Ties. When many map values are equal to the layer's minimum (typically 0: clipped negative S1
estimates, dead units), the quantile can equal the minimum and "M_v >= t" would select the whole
layer. ``ties="strict"`` (default) then masks only M_v > t; ``ties="inclusive"`` keeps the
published rule. Either way the result counts those layers (``tied``) and reports the fraction
of units each quantile mask selects, so fully masked layers are visible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import Tensor, nn

from sensitivity.capture import model_device
from sensitivity.layouts import UnitLayout
from sensitivity.masking.network import Mask, layer_outputs
from sensitivity.results import AnalysisResult
from sensitivity.units import unit_mask

ALPHAS = (0.0, 0.5, 1.5)
QUANTILES = (0.5, 0.6, 0.7, 0.8, 0.9)
VALUE_KEYS = ("S1", "ST", "shapley_normalized")
TIES = ("strict", "inclusive")
KINDS = ("quantile", "soft", "soft_inverse")

# What one pass of the network does: (plan index, mask or None for unmasked).
PlanItem = tuple[int, Mask | None]


# ------------------------------------------------------------------------------ configurations
@dataclass(frozen=True)
class MaskConfig:
    """One mask configuration.

    Attributes:
        kind: "quantile" (units with M >= the q-quantile times ``alpha``), "soft"
            (activation * M) or "soft_inverse" (activation * (1 - M)).
        alpha: the factor of the selected units (quantile masks), >= 0.
        q: the quantile in [0, 1] (quantile masks).
    """

    kind: str
    alpha: float = 1.0
    q: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown mask kind {self.kind!r}; valid: {list(KINDS)}")
        if self.kind == "quantile" and not (0.0 <= self.q <= 1.0 and self.alpha >= 0.0):
            raise ValueError(f"quantile masks need 0 <= q <= 1 and alpha >= 0, got {self}")

    @property
    def label(self) -> str:
        """"alpha=0,q=0.5", "soft" or "soft_inverse"."""
        return f"alpha={self.alpha:g},q={self.q:g}" if self.kind == "quantile" else self.kind


def default_configurations(
    alphas: Sequence[float] = ALPHAS, quantiles: Sequence[float] = QUANTILES, soft: bool = True
) -> list[MaskConfig]:
    """Quantile masks alpha-major (alpha 0: q 0.5..0.9, then alpha 0.5, ...), then the two
    soft masks: the published 17 configurations by default."""
    configs = [MaskConfig("quantile", float(a), float(q)) for a in alphas for q in quantiles]
    if soft:
        configs += [MaskConfig("soft"), MaskConfig("soft_inverse")]
    if not configs:
        raise ValueError("no mask configurations: give alphas and quantiles, or soft=True")
    return configs


def configuration_quantiles(configs: Sequence[MaskConfig]) -> list[float]:
    """The distinct quantiles of the quantile masks among ``configs``, ascending."""
    return sorted({c.q for c in configs if c.kind == "quantile"})


# ------------------------------------------------------------------------------------- maps
def default_value(result: AnalysisResult) -> str:
    """The value type masking uses by default: ST (Sobol; never negative, so fewer ties than
    S1), else normalised Shapley effects."""
    for key in ("ST", "S1", "shapley_normalized"):
        if all(key in values for values in result.layers.values()):
            return key
    raise ValueError(
        f"analysis of method {result.method!r} has no sensitivity maps ({list(VALUE_KEYS)}); "
        "masking needs a sobol (S1, ST) or shapley (shapley_normalized) analysis"
    )


def sensitivity_maps(
    result: AnalysisResult, value: str, layers: Sequence[str]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The maps masks are made of, and which of their units are valid.

    Args:
        result: the analysis.
        value: its value type, one of ``VALUE_KEYS``.
        layers: the analysed layers to take maps of.

    Returns:
        (maps, valid): maps {layer: (G, *u) float64}, the ``value`` maps clipped to [0, 1] (a
        non-finite value, never expected, counts as 0); valid {layer: (*u) bool}, the units
        not flagged in ``result.flags`` (the only ones masks may rank or select).
    """
    if value not in VALUE_KEYS:
        raise ValueError(f"value must be one of {list(VALUE_KEYS)}, got {value!r}")
    missing = [layer for layer in layers if layer not in result.layers]
    if missing:
        raise ValueError(
            f"layers {missing} were not analysed; the analysis has {result.layer_names}"
        )
    maps = {}
    for layer in layers:
        if value not in result.layers[layer]:
            raise ValueError(
                f"layer {layer!r} has no {value} maps (a {result.method} analysis has "
                f"{sorted(result.layers[layer])}); choose a value among {list(VALUE_KEYS)} "
                "that the analysis computed"
            )
        values = np.nan_to_num(result.layers[layer][value], nan=0.0, posinf=1.0, neginf=0.0)
        maps[layer] = np.clip(values, 0.0, 1.0)
    return maps, {layer: result.valid(layer) for layer in layers}


@dataclass(frozen=True)
class MapPlacement:
    """Where a map's units sit in its layer's output (per image).

    Attributes:
        shape: the shape the map takes to multiply the output: the output shape itself, or
            the channel axis alone among ones ((C, 1, 1) of NCHW, (1, 1, C) of NHWC, (1, D) of
            tokens).
        tokens: L, the tokens of the output, for a class-token map (it fills token 0 and the
            other L - 1 tokens are left alone); 0 for other maps.
    """

    shape: tuple[int, ...]
    tokens: int = 0

    def place(self, values: Tensor, fill: float | bool) -> Tensor:
        """A map's tensor (*u) in its place: ``shape``, or (L, D) with ``fill`` (a factor of 1,
        a selection of False) at every token but the class token."""
        placed = values.reshape(self.shape)
        if not self.tokens:
            return placed
        rest = torch.full((self.tokens - 1, placed.shape[-1]), fill, dtype=placed.dtype,
                          device=placed.device)
        return torch.cat([placed, rest])


def _map_reduction(layer: str, map_shape: tuple[int, ...], output_shape: tuple[int, ...],
                   layout: str, unit: UnitLayout | None) -> str:
    """The reduction that made a layer's map: recorded, else told from the shapes."""
    if unit is not None:
        return unit.reduction
    if map_shape == output_shape:
        return "none"
    if layout == "tokens_cls":
        raise ValueError(
            f"the maps of layer {layer!r} have unit shape {map_shape}, a channel mean or a "
            f"class token of its {output_shape} tokens; pass the analysis's unit layouts "
            "(AnalysisResult.layouts) to tell which"
        )
    return "channel_mean"


def map_placement(
    layer: str,
    map_shape: tuple[int, ...],
    output_shape: tuple[int, ...],
    layout: str,
    unit: UnitLayout | None = None,
) -> MapPlacement:
    """How a map multiplies the layer's output.

    Args:
        layer: the layer's name, for the error message.
        map_shape: the map's unit shape.
        output_shape: the layer's output shape per image (without batch).
        layout: the output's layout (``masking.layer_outputs``).
        unit: the unit layout the analysis recorded (its reduction); None: reduction "none"
            when the shapes agree, else "channel_mean" (refused for tokens_cls outputs, where
            it could be "cls_token").

    Returns:
        The placement; ValueError for a map that does not fit the output.
    """
    map_shape, output_shape = tuple(map_shape), tuple(output_shape)
    reduction = _map_reduction(layer, map_shape, output_shape, layout, unit)
    channel = UnitLayout(layout).feature_axis
    size = output_shape[channel]
    if reduction == "none" and map_shape == output_shape:
        return MapPlacement(output_shape)
    if reduction != "none" and map_shape == (size,):
        if reduction == "cls_token":
            return MapPlacement((1, size), tokens=output_shape[0])
        return MapPlacement(tuple(size if axis == channel else 1
                                  for axis in range(len(output_shape))))
    raise ValueError(
        f"the maps of layer {layer!r} have unit shape {map_shape} but the model's layer "
        f"outputs {output_shape} per image: the results belong to another model or "
        "image size; pass the model and --data.image_size the analysis used (masking needs "
        "maps of reduction 'none', 'channel_mean' or 'cls_token')"
    )


# ------------------------------------------------------------------------------------ masks
def quantile_mask(
    values: np.ndarray, q: float, ties: str = "strict", valid: np.ndarray | None = None
) -> tuple[np.ndarray, bool]:
    """The valid units at or above the q-quantile of the valid units' values.

    Args:
        values: (*u) one map.
        q: the quantile in [0, 1].
        ties: "strict" or "inclusive" (module docstring).
        valid: (*u) bool, default every unit; flagged units are never selected and do not
            move the threshold t.

    Returns:
        (selected (*u) bool, tied): tied means t equals the valid units' minimum, so
        ``values >= t`` selects every valid unit; with ``ties="strict"`` the selection is then
        ``values > t`` (units at the minimum, typically zeros, stay). Without valid units
        nothing is selected (not tied).
    """
    if ties not in TIES:
        raise ValueError(f"ties must be one of {list(TIES)}, got {ties!r}")
    mask = unit_mask(valid, values.shape, "the map")
    pool = values[mask]
    if pool.size == 0:
        return np.zeros(values.shape, dtype=bool), False
    threshold = float(np.quantile(pool, q))
    tied = threshold <= float(pool.min())
    if tied and ties == "strict":
        return (values > threshold) & mask, True
    return (values >= threshold) & mask, tied


def top_units_mask(
    values: np.ndarray, count: int, valid: np.ndarray | None = None
) -> np.ndarray:
    """Exactly ``count`` valid units with the largest ``values``.

    Args:
        values: (*u) one map.
        count: units to select.
        valid: (*u) bool, default every unit.

    Returns:
        (*u) bool (ties: lower flat index first); ValueError when fewer than ``count`` units
        are valid.
    """
    order = np.argsort(-values.ravel(), kind="stable")
    order = order[unit_mask(valid, values.shape, "the map").ravel()[order]]
    if count > len(order):
        raise ValueError(f"{count} units requested but only {len(order)} are valid")
    flat = np.zeros(values.size, dtype=bool)
    flat[order[:count]] = True
    return flat.reshape(values.shape)


def random_units_mask(shape: tuple[int, ...], count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` units chosen uniformly at random without replacement."""
    flat = np.zeros(math.prod(shape), dtype=bool)
    flat[rng.choice(flat.size, size=count, replace=False)] = True
    return flat.reshape(shape)


def selection_mask(selected: Mapping[str, Tensor], alpha: float) -> Mask:
    """Multiply the selected units (bool tensors broadcastable to each layer's output) by
    ``alpha``; the others are left as they are."""
    return {
        layer: (lambda out, m=m: torch.where(m, out * alpha, out)) for layer, m in selected.items()
    }


def _multiply(factor: Tensor, output: Tensor) -> Tensor:
    """``output`` times ``factor`` (broadcast), in the output's dtype."""
    return output * factor.to(output.dtype)


def _multiply_copies(factors: Tensor, output: Tensor) -> Tensor:
    """``output`` (n R, *s), n copies of R rows, copy j times ``factors[j]`` (broadcast to s),
    in the output's dtype."""
    copies = output.unflatten(0, (len(factors), -1))
    return (copies * factors.to(output.dtype).unsqueeze(1)).flatten(0, 1)


class FactorMask(dict):
    """A mask that multiplies each layer's output by a factor tensor: a ``Mask`` (layer ->
    transform) that keeps its factors, so that several can run in one batch
    (``stacked_mask``).

    Args:
        factors: {layer: factor tensor broadcastable to the layer's output per image}.
    """

    def __init__(self, factors: Mapping[str, Tensor]) -> None:
        super().__init__({layer: partial(_multiply, f) for layer, f in factors.items()})
        self.factors = dict(factors)


def factor_mask(factors: Mapping[str, Tensor]) -> FactorMask:
    """Multiply each layer's output by a factor tensor broadcastable to it."""
    return FactorMask(factors)


def stacked_mask(masks: Sequence[FactorMask | None]) -> Mask | None:
    """One mask for n passes run as one batch of n copies of the same R rows (copy j first
    rows j R ... (j + 1) R - 1): copy j gets ``masks[j]``, a None copy (unmasked) and a layer a
    mask lacks get the factor 1. Exactly each mask's own products (x * 1 = x).

    Args:
        masks: the n passes' masks; at every layer their factors share a shape.

    Returns:
        {layer: transform of the (n R, *s) output}, or None when every pass is unmasked.
    """
    layers = list(dict.fromkeys(layer for m in masks if m is not None for layer in m.factors))
    stacked: Mask = {}
    for layer in layers:
        given = [None if m is None else m.factors.get(layer) for m in masks]
        one = torch.ones_like(next(f for f in given if f is not None))
        factors = torch.stack([one if f is None else f for f in given])
        stacked[layer] = partial(_multiply_copies, factors)
    return stacked or None


class VariableMasks:
    """The masks of one variable at every masked layer, on the model's device.

    Quantile selections are computed once per q and shared by every alpha. The soft factors
    are M_v and 1 - M_v at valid units, 1 at flagged ones.

    Args:
        maps: {layer: M_v (map shape)} in [0, 1].
        placements: {layer: where M_v sits in the layer's output} (``map_placement``), or the
            shape M_v is reshaped to (``MapPlacement(shape)``).
        quantiles: the q of the quantile masks.
        ties: "strict" or "inclusive" (``quantile_mask``).
        device: where the masks live.
        valid: {layer: (map shape) bool} the units masks may touch (default: every unit).

    Attributes:
        fraction: fraction[q][layer], the share of the layer's map units the q mask selects
            (flagged units are never selected).
        tied: tied[q][layer], the quantile fell on the minimum of the layer's valid units.
    """

    def __init__(
        self,
        maps: Mapping[str, np.ndarray],
        placements: Mapping[str, MapPlacement | tuple[int, ...]],
        quantiles: Sequence[float],
        ties: str,
        device: torch.device,
        valid: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        masks = {layer: unit_mask(None if valid is None else valid[layer], m.shape, "the map")
                 for layer, m in maps.items()}
        places = {layer: p if isinstance(p, MapPlacement) else MapPlacement(tuple(p))
                  for layer, p in placements.items()}
        self.soft: dict[str, Tensor] = {}
        self.soft_inverse: dict[str, Tensor] = {}
        for layer, m in maps.items():
            weight = torch.as_tensor(m, dtype=torch.float32, device=device)
            keep = torch.as_tensor(masks[layer], device=device)
            self.soft[layer] = places[layer].place(torch.where(keep, weight, 1.0), 1.0)
            self.soft_inverse[layer] = places[layer].place(torch.where(keep, 1.0 - weight, 1.0),
                                                           1.0)
        self._masks: dict[MaskConfig, FactorMask] = {}
        self.selected: dict[float, dict[str, Tensor]] = {}
        self.fraction: dict[float, dict[str, float]] = {}
        self.tied: dict[float, dict[str, bool]] = {}
        for q in quantiles:
            self.selected[q], self.fraction[q], self.tied[q] = {}, {}, {}
            for layer, m in maps.items():
                chosen, tied = quantile_mask(m, q, ties, masks[layer])
                self.selected[q][layer] = places[layer].place(
                    torch.as_tensor(chosen, device=device), False
                )
                self.fraction[q][layer] = float(chosen.mean())
                self.tied[q][layer] = tied

    def mask(self, config: MaskConfig) -> FactorMask:
        """The mask of one configuration at every layer, as factors (a quantile mask: alpha at
        the selected units, 1 elsewhere; the same products as ``selection_mask``), made once
        per configuration."""
        if config not in self._masks:
            if config.kind == "quantile":
                self._masks[config] = factor_mask({
                    layer: torch.where(chosen, config.alpha, 1.0).to(torch.float32)
                    for layer, chosen in self.selected[config.q].items()
                })
            else:
                self._masks[config] = factor_mask(
                    self.soft if config.kind == "soft" else self.soft_inverse)
        return self._masks[config]

    def plan(self, configs: Sequence[MaskConfig], start: int) -> list[PlanItem]:
        """[(start + c, mask of configs[c])]: one pass per configuration, numbered from
        ``start`` (``run_plans``)."""
        return [(start + c, self.mask(config)) for c, config in enumerate(configs)]


def prepare_masks(
    model: nn.Module,
    maps: Mapping[str, np.ndarray],
    variables: Sequence[str],
    mask_variables: Sequence[str],
    image_size: tuple[int, int],
    quantiles: Sequence[float],
    ties: str,
    layer_root: nn.Module | None = None,
    valid: Mapping[str, np.ndarray] | None = None,
    layouts: Mapping[str, UnitLayout] | None = None,
) -> dict[str, VariableMasks]:
    """The masks of each mask variable, fitted to the model's layer outputs.

    Args:
        model: the network (one dry forward finds its layers' output shapes).
        maps: {layer: (V, *u)} in [0, 1], one map per variable of ``variables``.
        variables: the V variables of the maps, in order.
        mask_variables: the variables to build masks for.
        image_size: (height, width) of the inputs in pixels.
        quantiles, ties: as ``VariableMasks``.
        layer_root: where the layers are named (default ``model.net`` or ``model``).
        valid: {layer: (*u) bool} the units masks may touch (``sensitivity_maps``; default
            every unit).
        layouts: {layer: unit layout} the analysis recorded (``AnalysisResult.layouts``):
            the outputs' layouts (given to the capture, so that an override of the analysis
            applies here too) and the maps' reductions; a layer without one has its layout
            detected and its reduction told from the shapes (``map_placement``).

    Returns:
        {variable: VariableMasks} on the model's device; ValueError when a map does not fit
        its layer (``map_placement``).
    """
    missing = [layer for layer in maps if valid is not None and layer not in valid]
    if missing:
        raise ValueError(f"valid units are not given for the masked layers {missing}")
    device = model_device(model)[0]
    units = {layer: unit for layer, unit in (layouts or {}).items() if layer in maps}
    shapes, found = layer_outputs(model, list(maps), image_size, layer_root,
                                  {layer: unit.layout for layer, unit in units.items()})
    placements = {}
    for layer, values in maps.items():
        if values.shape[0] != len(variables):
            raise ValueError(
                f"maps of layer {layer!r} have {values.shape[0]} variables, expected "
                f"{len(variables)} ({list(variables)})"
            )
        placements[layer] = map_placement(layer, values.shape[1:], shapes[layer], found[layer],
                                          units.get(layer))
    index = {v: i for i, v in enumerate(variables)}
    return {
        v: VariableMasks({layer: m[index[v]] for layer, m in maps.items()}, placements,
                         quantiles, ties, device, valid)
        for v in mask_variables
    }
