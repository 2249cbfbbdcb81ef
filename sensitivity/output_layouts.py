"""What a hooked module outputs: the element of a tuple or dict output, the layout of the tensor
(``sensitivity.layouts``) and its reduction to units.

Layouts are detected, never guessed:

- (B, F) outputs are "flat".
- (B, C, H, W) outputs follow the axis order of the image through the forward (``LayoutTracker``):
  the input is NCHW, and only the modules that reorder axes change it: torchvision's ``Permute``
  (Swin's patch embedding to NHWC and its final ``permute`` back, ConvNeXt's blocks inside),
  MaxViT's ``SwapAxes``, its ``WindowPartition`` (windows: no image layout until the
  ``WindowDepartition`` back to NCHW). A forward hook fires after the module's own submodules, so
  a layer's layout is the order after the last reordering that ran before its output.
- (B, L, D) outputs are tokens only inside the ``encoder`` of a torchvision
  ``VisionTransformer``, whose token 0 is the class token ("tokens_cls").

Anything else (an output inside MaxViT's windows, tokens of another network, five axes) has no
detected layout; ``ActivationCapture`` then asks for an override.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.maxvit import SwapAxes, WindowDepartition, WindowPartition
from torchvision.ops.misc import Permute

from sensitivity.layouts import FEATURE_AXIS, LAYOUT_AXES, UnitLayout

# The image axes in the order of NCHW and NHWC tensors.
_ORDERS = {"NCHW": "nchw", "NHWC": "nhwc"}
# The modules that reorder the axes of a 4-D tensor (module docstring).
_REORDERING = (Permute, SwapAxes, WindowPartition, WindowDepartition)


def _reorder(module: nn.Module, axes: str | None) -> str | None:
    """The axis order after ``module`` ran on a tensor of order ``axes`` (None: unknown)."""
    if isinstance(module, WindowDepartition):
        return "NCHW"
    if isinstance(module, WindowPartition) or axes is None:
        return None
    if isinstance(module, Permute):
        dims = list(module.dims)
        return "".join(axes[d] for d in dims) if sorted(dims) == [0, 1, 2, 3] else None
    order = list(axes)  # SwapAxes
    order[module.a], order[module.b] = order[module.b], order[module.a]
    return "".join(order)


class LayoutTracker:
    """Follows the axis order of the image tensor through the forwards of ``root``.

    Inside ``with tracker:`` a forward pre-hook on ``root`` resets the order to NCHW and forward
    hooks on the reordering modules (module docstring) update it; a network without such modules
    gets no hooks at all. ``layout`` tells a module's output layout from it.

    Args:
        root: the hooked module (the network); layer names are its ``named_modules()`` names.
    """

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self._reorders = [m for m in root.modules() if isinstance(m, _REORDERING)]
        self._token_roots = [
            f"{name}.encoder" if name else "encoder" for name, m in root.named_modules()
            if isinstance(m, torchvision.models.VisionTransformer)
        ]
        self.axes: str | None = "NCHW"
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> LayoutTracker:
        """Register the hooks (none for a network that never reorders axes)."""
        self.axes = "NCHW"
        if self._reorders and not self._handles:
            self._handles.append(self.root.register_forward_pre_hook(self._reset))
            self._handles += [m.register_forward_hook(self._update) for m in self._reorders]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _reset(self, module: nn.Module, inputs: Any) -> None:
        self.axes = "NCHW"

    def _update(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, Tensor) and output.ndim == 4:
            self.axes = _reorder(module, self.axes)

    def layout(self, module: str, ndim: int) -> tuple[str | None, str]:
        """The layout of module ``module``'s output, as far as it is known.

        Args:
            module: the module's name under ``root``.
            ndim: axes of its output (the batch axis included).

        Returns:
            (layout or None, why it is not known: "" when it is).
        """
        if ndim == 2:
            return "flat", ""
        if ndim == 3:
            if any(module == r or module.startswith(f"{r}.") for r in self._token_roots):
                return "tokens_cls", ""
            return None, ("(B, L, D) outputs are detected as tokens only inside the encoder "
                          "of a torchvision VisionTransformer")
        if ndim == 4:
            layout = _ORDERS.get(self.axes or "")
            if layout is not None:
                return layout, ""
            if self.axes is None:
                return None, "it runs inside a window partition (MaxViT's attention)"
            return None, f"it runs after a reordering of the image axes to {self.axes}"
        return None, "a layout has 2 to 4 axes; capture a module with such an output"


# ------------------------------------------------------------------------------------ elements
def _describe(value: Any) -> str:
    """A short description of an output element: "tensor (2, 50, 32)", "None", "int"."""
    if isinstance(value, Tensor):
        return f"tensor {tuple(value.shape)}"
    return "None" if value is None else type(value).__name__


def _fields(output: Any) -> tuple[str, ...]:
    """The field names of a named tuple, () for anything else."""
    return tuple(getattr(output, "_fields", ())) if isinstance(output, tuple) else ()


def _elements(output: Any) -> dict[str, Any]:
    """{element name: value} of a tuple, list, named tuple (fields and indices) or dict;
    {} for anything else."""
    if isinstance(output, dict):
        return {str(key): value for key, value in output.items()}
    if isinstance(output, tuple | list):
        indexed = {str(i): v for i, v in enumerate(output)}
        return {**indexed, **{field: getattr(output, field) for field in _fields(output)}}
    return {}


def _listing(layer: str, output: Any) -> str:
    """The elements a layer name can pick, with what each holds."""
    elements = _elements(output)
    if _fields(output):
        elements = {field: elements[field] for field in _fields(output)}
    return ", ".join(f"{layer}:{name} ({_describe(v)})" for name, v in elements.items())


def select_element(output: Any, element: str | None, layer: str, module: nn.Module) -> Tensor:
    """The tensor a layer captures of its module's output.

    Args:
        output: what the module returned.
        element: the index or key to pick (``layouts.split_layer_name``); None for a tensor.
        layer: the layer's name, for the messages.
        module: the module, for the messages.

    Returns:
        The tensor.

    Raises:
        ValueError: a non-tensor output without an element (listing the elements to pick), an
            element of a tensor, an unknown element or one that is not a tensor.
    """
    kind = type(module).__name__
    if element is None:
        if isinstance(output, Tensor):
            return output
        listed = _listing(layer, output)
        pick = f"; capture one element: {listed}" if listed else ""
        raise ValueError(
            f"layer {layer!r} ({kind}) returns {type(output).__name__}, not a tensor{pick}"
        )
    base = layer[: -len(element) - 1]
    if isinstance(output, Tensor):
        raise ValueError(f"layer {layer!r} ({kind}) returns a tensor; capture it as {base!r}")
    elements = _elements(output)
    if element not in elements:
        raise ValueError(
            f"layer {layer!r}: {kind} returns {type(output).__name__} without an element "
            f"{element!r}; available: {_listing(base, output) or 'none'}"
        )
    value = elements[element]
    if not isinstance(value, Tensor):
        raise ValueError(
            f"layer {layer!r}: element {element!r} of the {kind} output is {_describe(value)}, "
            f"not a tensor; available: {_listing(base, output)}"
        )
    return value


def replace_element(output: Any, element: str | None, value: Tensor) -> Any:
    """``output`` with the element ``element`` replaced by ``value`` (masking a tuple output).

    Args:
        output: the module's output, whose element ``select_element`` picked.
        element: that element; None: ``value`` replaces the whole (tensor) output.
        value: the new element.

    Returns:
        A new output of the same kind (tuple, named tuple, list or dict).
    """
    if element is None:
        return value
    if isinstance(output, dict):
        return {key: value if str(key) == element else v for key, v in output.items()}
    named = list(_fields(output))
    index = named.index(element) if element in named else int(element)
    items = list(output)
    items[index] = value
    if isinstance(output, list):
        return items
    return type(output)(*items) if named else tuple(items)


def element_applier(
    element: str | None, transform: Callable[[Tensor], Tensor]
) -> Callable[[Any], Any]:
    """``transform`` applied to one element of a module's output, the rest kept.

    Args:
        element: the element (None: the output is the tensor).
        transform: maps the element's tensor to its replacement.

    Returns:
        A function of the whole output.
    """
    if element is None:
        return transform

    def apply(output: Any) -> Any:
        return replace_element(output, element, transform(_elements(output)[element]))

    return apply


# ----------------------------------------------------------------------------------- reduction
def reduce_output(value: Tensor, unit: UnitLayout) -> tuple[Tensor, bool]:
    """A layer's output reduced to its units.

    Args:
        value: (B, ...) the output in layout ``unit.layout``.
        unit: the layout and reduction.

    Returns:
        (units, derived): (B, *unit shape); derived is True when the units are a new tensor
        (a mean), False when they are ``value`` or a view of it (the caller copies those).
    """
    if unit.reduction == "channel_mean" and unit.layout != "flat":
        feature = FEATURE_AXIS[unit.layout]
        positions = tuple(1 + i for i, a in enumerate(LAYOUT_AXES[unit.layout]) if a != feature)
        return value.float().mean(dim=positions), True
    if unit.reduction == "cls_token":
        return value[:, 0], False
    return value, False
