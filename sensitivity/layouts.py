"""How a captured layer's values are laid out: the layout names, the reductions, the element of
a tuple or dict output, and the axes of the units a results file holds (docs/RESULTS_FORMAT.md).

A layer's *layout* says what the axes of its output (B, ...) are:

- "nchw": (B, C, H, W), convolutional maps (ResNet, VGG, ConvNeXt's stages, ViT's patch
  embedding, MaxViT's blocks, Swin after its final ``permute``);
- "nhwc": (B, H, W, C), channels last (Swin's stages and norm, ConvNeXt inside a block);
- "tokens": (B, L, D), L tokens of D hidden features;
- "tokens_cls": (B, L, D) whose token 0 is a class token (ViT's encoder and its layers);
- "flat": (B, F), features without positions (classifier layers).

A *reduction* turns an output into the units analysed: "none" keeps every element in the
output's own order (unit axes (C, H, W), (H, W, C), (L, D) or (F,)); "channel_mean" averages
over the positions, one unit per channel or hidden feature (C,) or (D,) (tokens: the mean over
all L tokens, the class token included; identity for "flat"); "cls_token" keeps the class token
(D,) of a "tokens_cls" output.

An *element* picks one tensor of a module that returns a tuple, list or dict: the layer name
"encoder.layers.encoder_layer_1.self_attention:0" captures element 0 of that module's output
(``split_layer_name``).

Imports numpy only, so that reading a results file needs neither torch nor torchvision.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

LAYOUTS = ("nchw", "nhwc", "tokens", "tokens_cls", "flat")
REDUCTIONS = ("none", "channel_mean", "cls_token")
# Axes of a layout's output per image (after the batch axis): C channels, H and W positions,
# L tokens, D hidden features, F flat features.
LAYOUT_AXES: dict[str, tuple[str, ...]] = {
    "nchw": ("C", "H", "W"),
    "nhwc": ("H", "W", "C"),
    "tokens": ("L", "D"),
    "tokens_cls": ("L", "D"),
    "flat": ("F",),
}
# The axis of each layout that holds the channels (hidden features); the others are positions.
FEATURE_AXIS = {"nchw": "C", "nhwc": "C", "tokens": "D", "tokens_cls": "D", "flat": "F"}
# What the layouts mean, for error messages that ask for an override.
LAYOUT_HELP = (
    "nchw (B, C, H, W), nhwc (B, H, W, C), tokens (B, L, D), tokens_cls (B, L, D) with a class "
    "token at index 0, flat (B, F)"
)
# Separates a module name from the element of its output: "<module>:<index or key>".
ELEMENT_SEPARATOR = ":"


@dataclass(frozen=True)
class UnitLayout:
    """What the units of one captured layer are.

    Attributes:
        layout: the layout of the module's output (or of its selected element), one of
            ``LAYOUTS``.
        reduction: one of ``REDUCTIONS``.
        element: the index or key of the captured element of a tuple/list/dict output, None
            for a tensor output.

    Raises:
        ValueError: an unknown layout or reduction, or "cls_token" without a class token.
    """

    layout: str
    reduction: str = "none"
    element: str | None = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; valid: {list(LAYOUTS)}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {self.reduction!r}; valid: {list(REDUCTIONS)}")
        if self.reduction == "cls_token" and self.layout != "tokens_cls":
            raise ValueError(
                f"reduction cls_token needs a layer of layout tokens_cls (a class token at "
                f"index 0), not {self.layout}; use channel_mean or none"
            )

    @property
    def unit_axes(self) -> tuple[str, ...]:
        """The names of the unit shape's axes: ("C", "H", "W"), ("H", "W", "C"), ("L", "D"),
        ("F",) with reduction none; ("C",), ("D",) or ("F",) otherwise."""
        if self.reduction == "none":
            return LAYOUT_AXES[self.layout]
        return (FEATURE_AXIS[self.layout],)

    @property
    def feature_axis(self) -> int:
        """The axis of the unit shape that holds the channels (hidden features, flat
        features); the other axes are positions (pixels or tokens)."""
        return self.unit_axes.index(FEATURE_AXIS[self.layout])

    @property
    def has_positions(self) -> bool:
        """Whether the units have position axes besides the feature axis (reduction none of
        a map or token layout)."""
        return len(self.unit_axes) > 1

    def attrs(self) -> dict[str, str]:
        """The attributes a results file records of it per layer: "layout", "reduction",
        "element" ("" for none) and "unit_axes" (comma-separated, "H,W,C")."""
        return {"layout": self.layout, "reduction": self.reduction,
                "element": self.element or "", "unit_axes": ",".join(self.unit_axes)}

    @classmethod
    def from_attrs(cls, attrs: dict[str, str]) -> UnitLayout:
        """The layout back from ``attrs()``."""
        return cls(attrs["layout"], attrs["reduction"], attrs["element"] or None)


def layout_ndim(layout: str) -> int:
    """Axes of a layout's output, the batch axis included (4, 3 or 2)."""
    return 1 + len(LAYOUT_AXES[layout])


def layout_shape(layout: str) -> str:
    """A layout's output axes for messages: "(B, H, W, C)"."""
    return f"({', '.join(('B', *LAYOUT_AXES[layout]))})"


def check_layouts(layouts: object, what: str = "layouts") -> dict[str, str]:
    """A checked {layer: layout} mapping of overrides.

    Args:
        layouts: the mapping to check.
        what: its name, for the error message.

    Returns:
        {layer: layout} as a plain dict.

    Raises:
        ValueError: not a mapping of names to known layouts.
    """
    if not isinstance(layouts, dict) or not all(isinstance(k, str) for k in layouts):
        raise ValueError(
            f"{what} must map layer names to layouts, e.g. {{'features.1': 'nhwc'}}; got "
            f"{layouts!r}"
        )
    bad = {layer: value for layer, value in layouts.items() if value not in LAYOUTS}
    if bad:
        raise ValueError(f"unknown layout(s) {bad} in {what}; valid: {LAYOUT_HELP}")
    return dict(layouts)


def split_layer_name(name: str, modules: Collection[str]) -> tuple[str, str | None]:
    """The module and element a layer name names.

    Args:
        name: "<module>" or "<module>:<element>" (an index of a tuple/list output, a key of a
            dict output or a field of a named tuple).
        modules: the module names of the network.

    Returns:
        (module name, element or None). A name that is itself a module name has no element.
        A name whose module part is unknown comes back whole (the caller reports it).
    """
    if name in modules or ELEMENT_SEPARATOR not in name:
        return name, None
    module, element = name.rsplit(ELEMENT_SEPARATOR, 1)
    if module not in modules or not element:
        return name, None
    return module, element


def features_first(values: np.ndarray, lead: int, unit: UnitLayout | None) -> np.ndarray:
    """Values with the unit shape's feature axis first, positions after it in their order.

    Correlation, LDA and the reports take maps as (..., C, *positions); an NHWC map
    (H, W, C) becomes (C, H, W) and a token map (L, D) becomes (D, L).

    Args:
        values: (*lead axes, *unit shape).
        lead: the leading axes that index variables (0, 1 or 2).
        unit: the layer's unit layout; None (a result without a record): the feature axis is
            already first.

    Returns:
        ``values`` itself when the feature axis is first, else a C-contiguous copy in the new
        order (so that sums run in the same order as over maps stored channels first).

    Raises:
        ValueError: a unit layout with another number of axes than the unit shape.
    """
    if unit is None or unit.feature_axis == 0:
        return values
    axes = unit.unit_axes
    if values.ndim != lead + len(axes):
        raise ValueError(
            f"values of shape {values.shape} do not have {lead} leading axes and unit axes "
            f"{','.join(axes)}"
        )
    return np.ascontiguousarray(np.moveaxis(values, lead + unit.feature_axis, lead))
