"""Forward hooks at named checkpoints of a network, with per-layer layouts and reductions
(METHOD.md §4).

Layer names are ``model.named_modules()`` names of the module passed in: for a torchvision
network "layer1", "features.2", "classifier.6", "fc", "encoder.layers.encoder_layer_3"; a suffix
":<index or key>" captures one element of a module that returns a tuple or dict
("encoder.layers.encoder_layer_3.self_attention:0"). With an ``ImageClassifier`` pass its
``.net`` for the names and call the classifier itself (hooks fire whichever module runs the
forward, so the ImageNet normalisation inside the classifier still applies). Each layer's output
layout (NCHW, NHWC, tokens, flat: ``sensitivity.layouts``) is detected on the first forward
(``sensitivity.output_layouts``) or given as an override; the default checkpoints and the
classification layer come from ``sensitivity.checkpoints``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from sensitivity.checkpoints import (
    DEFAULT_LAYERS,
    classification_layer,
    default_layers,
    dry_forward,
    hookable_layers,
    model_device,
)
from sensitivity.layouts import (
    LAYOUT_HELP,
    REDUCTIONS,
    UnitLayout,
    check_layouts,
    layout_ndim,
    layout_shape,
    split_layer_name,
)
from sensitivity.output_layouts import LayoutTracker, reduce_output, select_element

__all__ = [
    "DEFAULT_LAYERS",
    "REDUCTIONS",
    "ActivationCapture",
    "classification_layer",
    "default_layers",
    "hookable_layers",
    "model_device",
    "unit_shapes",
]


class ActivationCapture:
    """Context manager: forward hooks on named modules of ``model`` that keep their outputs.

    Args:
        model: root module; ``layers`` are names from its ``named_modules()``, each optionally
            followed by ":<element>" (an index of a tuple/list output, a key of a dict output,
            a field of a named tuple).
        layers: checkpoint names, in the order results are reported; None for
            ``default_layers(model)``.
        reduction: per layer, "none" (every element is a unit, in the output's own order: unit
            shape (C, H, W), (H, W, C), (L, D) or (F,), the published sensitivity maps),
            "channel_mean" (the mean over the positions: (C,) or (D,); identity for (B, F)
            outputs) or "cls_token" (the class token (D,) of a tokens_cls output). One string
            for all layers or {layer: reduction} (layers not named get "none").
        softmax_layers: layers whose output is turned into probabilities with a softmax over
            axis 1 before the reduction; None (default) means the classification layer
            (``classification_layer(model)``) if it is a checkpoint, [] means none.
        layouts: {layer: layout} overrides ("nchw", "nhwc", "tokens", "tokens_cls", "flat");
            the other layers' layouts are detected (``sensitivity.output_layouts``).

    Inside ``with capture:`` every forward of the model stores, per layer, a contiguous float32
    tensor (B, *unit_shape) on the model's device, detached and copied (a later in-place op such as
    ``ReLU(inplace=True)`` cannot alter it). ``pop()`` returns them. The first forward fixes each
    layer's ``UnitLayout`` (``layouts``). When a module runs several times in one forward (e.g.
    the shared ``relu`` inside a ResNet block), the last call wins (``repeated`` names such
    layers after a ``pop()``); hook the enclosing block instead. With a ``sink`` set, each
    output is handed to ``sink(layer, output)`` as soon as it is made instead of being kept
    (its layers must run once per forward). Hooks are removed on exit, also after an exception.

    Raises:
        ValueError: no layers, unknown or repeated layer names, unknown reductions or layouts,
            reductions, layouts or softmax layers named for layers that are not captured. On the
            first forward: an output that is no tensor (listing its elements), an unknown
            element, an output whose layout is not detected and not given, or a reduction the
            layout cannot take.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] | None = None,
        reduction: str | Mapping[str, str] = "none",
        softmax_layers: Sequence[str] | None = None,
        layouts: Mapping[str, str] | None = None,
    ) -> None:
        self.model = model
        modules = dict(model.named_modules())
        if isinstance(layers, str):
            raise ValueError(f"layers must be a list of names, got the string {layers!r}")
        self.layers = list(default_layers(model) if layers is None else layers)
        self._targets = self._resolve_targets(modules)
        self.reductions = self._resolve_reductions(reduction)
        self.overrides = self._resolve_overrides(layouts)
        if softmax_layers is None:
            head = classification_layer(model)
            softmax_layers = [head] if head in self.layers else []
        outside = [name for name in softmax_layers if name not in self.layers]
        if outside:
            raise ValueError(
                f"softmax_layers {outside} are not among the captured layers {self.layers}"
            )
        self.softmax_layers = list(softmax_layers)
        self._modules = {name: modules[module] for name, (module, _) in self._targets.items()}
        self.layouts: dict[str, UnitLayout] = {}
        self._tracker = LayoutTracker(model)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._outputs: dict[str, Tensor] = {}
        self._calls: dict[str, int] = {}
        # The layers whose module ran more than once in the forward before the last pop().
        self.repeated: list[str] = []
        self.sink: Callable[[str, Tensor], None] | None = None

    def _resolve_targets(
        self, modules: Mapping[str, nn.Module]
    ) -> dict[str, tuple[str, str | None]]:
        """{layer: (module name, element or None)} of every captured layer, checked."""
        if not self.layers:
            raise ValueError("no layers to capture; give at least one module name")
        targets = {name: split_layer_name(name, modules) for name in self.layers}
        unknown = [name for name, (module, _) in targets.items() if not module or
                   module not in modules]
        if unknown:
            raise ValueError(
                f"unknown layer name(s) {unknown} for {type(self.model).__name__}; valid names: "
                f"{', '.join(hookable_layers(self.model))} (followed by ':<index or key>' to "
                "capture one element of a tuple or dict output)"
            )
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers {self.layers} repeat a name; list each once")
        return targets

    def _resolve_reductions(self, reduction: str | Mapping[str, str]) -> dict[str, str]:
        """{layer: reduction} for every captured layer, checked."""
        if isinstance(reduction, str):
            chosen = dict.fromkeys(self.layers, reduction)
        else:
            extra = sorted(set(reduction) - set(self.layers))
            if extra:
                raise ValueError(
                    f"reduction given for {extra}, which are not captured layers {self.layers}"
                )
            chosen = {name: reduction.get(name, "none") for name in self.layers}
        bad = {name: r for name, r in chosen.items() if r not in REDUCTIONS}
        if bad:
            raise ValueError(f"unknown reduction(s) {bad}; valid: {list(REDUCTIONS)}")
        return chosen

    def _resolve_overrides(self, layouts: Mapping[str, str] | None) -> dict[str, str]:
        """{layer: layout} of the overrides, checked against the layers and reductions."""
        overrides = check_layouts(dict(layouts or {}))
        extra = sorted(set(overrides) - set(self.layers))
        if extra:
            raise ValueError(
                f"layouts given for {extra}, which are not captured layers {self.layers}"
            )
        for name, layout in overrides.items():
            UnitLayout(layout, self.reductions[name])  # a reduction the layout cannot take
        return overrides

    # --------------------------------------------------------------------------- layouts
    def _unit_layout(self, name: str, module: nn.Module, value: Tensor) -> UnitLayout:
        """Layer ``name``'s unit layout: fixed by its first output (override or detection),
        then checked against every later one."""
        unit = self.layouts.get(name)
        if unit is not None:
            if value.ndim != layout_ndim(unit.layout):
                raise ValueError(
                    f"layer {name!r} returns shape {tuple(value.shape)}, but its first output "
                    f"had layout {unit.layout} {layout_shape(unit.layout)}"
                )
            return unit
        kind, shape = type(module).__name__, tuple(value.shape)
        if not 2 <= value.ndim <= 4:
            raise ValueError(
                f"layer {name!r} ({kind}) returns shape {shape}; a captured output has 2 to 4 "
                "axes (B, C, ...): capture another module"
            )
        layout = self.overrides.get(name)
        if layout is None:
            layout, why = self._tracker.layout(self._targets[name][0], value.ndim)
            if layout is None:
                raise ValueError(
                    f"layer {name!r} ({kind}) returns shape {shape} of unknown layout: {why}; "
                    f"give it with layouts={{{name!r}: ...}} (analyze.py --layouts "
                    f"'{{\"{name}\": ...}}'), one of {LAYOUT_HELP}"
                )
        elif value.ndim != layout_ndim(layout):
            raise ValueError(
                f"layer {name!r} ({kind}) returns shape {shape}, which layout {layout} "
                f"{layout_shape(layout)} cannot have; valid layouts: {LAYOUT_HELP}"
            )
        unit = UnitLayout(layout, self.reductions[name], self._targets[name][1])
        self.layouts[name] = unit
        return unit

    # --------------------------------------------------------------------------- hooks
    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        """The forward hook that stores layer ``name``'s reduced float32 output."""
        element = self._targets[name][1]
        softmax = name in self.softmax_layers

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            value = select_element(output, element, name, module).detach()
            unit = self._unit_layout(name, module, value)
            derived = False
            if softmax:
                if value.ndim != 2:
                    raise ValueError(
                        f"softmax layer {name!r} returns shape {tuple(value.shape)}; expected "
                        "(B, classes)"
                    )
                value, derived = torch.softmax(value.float(), dim=1), True
            value, reduced = reduce_output(value, unit)
            # Copy the raw output: the module's output may be modified in place later in the
            # forward (e.g. by ReLU(inplace=True)). Contiguous in the layout's axis order
            # whatever the module's memory format: a channels-last NCHW output is transposed in
            # the same pass.
            value = value.to(
                torch.float32, memory_format=torch.contiguous_format,
                copy=not (derived or reduced),
            )
            self._calls[name] = self._calls.get(name, 0) + 1
            if self.sink is None:
                self._outputs[name] = value
            elif self._calls[name] > 1:
                raise ValueError(
                    f"layer {name!r} ran twice in one forward, but its first output was handed "
                    "on already (sink); capture the enclosing block instead"
                )
            else:
                self.sink(name, value)

        return hook

    def __enter__(self) -> ActivationCapture:
        """Register the hooks; RuntimeError when already active."""
        if self._handles:
            raise RuntimeError("this ActivationCapture is already active; do not nest it")
        self._outputs, self._calls = {}, {}
        if set(self.layers) - set(self.layouts) - set(self.overrides):
            # First: its hooks update the axis order before a capture hook on the same module
            # reads it.
            self._tracker.__enter__()
        self._handles = [
            module.register_forward_hook(self._hook(name)) for name, module in self._modules.items()
        ]
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
        self._tracker.__exit__(exc_type, exc, traceback)

    @property
    def active(self) -> bool:
        """Whether the hooks are registered (inside ``with``)."""
        return bool(self._handles)

    def pop(self) -> dict[str, Tensor]:
        """Take the outputs of the latest forward (and clear them).

        Returns:
            {layer: (B, *unit_shape) float32} on the model's device, in ``layers`` order; empty
            with a ``sink`` (it had them).

        Raises:
            ValueError: a layer has not run since the last ``pop``.
        """
        missing = [name for name in self.layers if name not in self._calls]
        if missing:
            raise ValueError(
                f"layer(s) {missing} produced no output since the last pop(); run a forward "
                "inside `with capture:` (and check that these modules are used by the forward)"
            )
        self.repeated = [name for name in self.layers if self._calls[name] > 1]
        outputs = {name: self._outputs[name] for name in self.layers if name in self._outputs}
        self._outputs, self._calls = {}, {}
        return outputs

    def unit_shapes(
        self,
        image_size: int | Sequence[int],
        channels: int = 3,
        forward: Callable[[Tensor], Any] | None = None,
    ) -> dict[str, tuple[int, ...]]:
        """Unit shapes after the reductions, from one dry forward in eval mode (which also
        fixes ``layouts``).

        Args:
            image_size: H (square) or (H, W) in px.
            channels: input channels of the zero image (1, channels, H, W).
            forward: what runs the image (default: the model).

        Returns:
            {layer: unit shape}, e.g. (C, H', W'), (H', W', C), (L, D), (F,), or (C,) / (D,)
            with channel_mean or cls_token.
        """
        pending = self._outputs, self._calls, self.sink
        entered = not self.active
        if entered:
            self.__enter__()
        try:
            self._outputs, self._calls, self.sink = {}, {}, None
            dry_forward(self.model, image_size, channels, forward)
            shapes = {name: tuple(t.shape[1:]) for name, t in self.pop().items()}
        finally:
            self._outputs, self._calls, self.sink = pending
            if entered:
                self.__exit__(None, None, None)
        return shapes


def unit_shapes(
    model: nn.Module,
    image_size: int | Sequence[int],
    layers: Sequence[str] | None = None,
    reduction: str | Mapping[str, str] = "none",
    layouts: Mapping[str, str] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Unit shapes of a network's checkpoints, from one dry forward.

    Args:
        model: the network (takes (1, 3, H, W) images).
        image_size: H (square) or (H, W) in px.
        layers: checkpoint names (default: ``default_layers(model)``).
        reduction, layouts: as for ``ActivationCapture``.

    Returns:
        {layer: unit shape}.

    Raises:
        ValueError: what ``ActivationCapture`` refuses.
    """
    return ActivationCapture(model, layers, reduction, layouts=layouts).unit_shapes(image_size)
