"""Forward hooks at named checkpoints of a network, with per-layer reductions (METHOD.md §4).

Layer names are ``model.named_modules()`` names of the module passed in: for a torchvision
network "layer1", "features.2", "classifier.6", "fc". With an ``ImageClassifier`` pass its
``.net`` for the names and call the classifier itself (hooks fire whichever module runs the
forward, so the ImageNet normalisation inside the classifier still applies).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from sensitivity.provenance import height_width

REDUCTIONS = ("none", "channel_mean")

# METHOD.md section 4. The small-input variants keep these names (ResNet's maxpool becomes an
# nn.Identity, which still calls its hooks).
DEFAULT_LAYERS: dict[str, tuple[str, ...]] = {
    "alexnet": (
        "features.2", "features.5", "features.7", "features.9", "avgpool",
        "classifier.2", "classifier.5", "classifier.6",
    ),
    "vgg11": (
        "features.2", "features.5", "features.10", "features.15", "avgpool",
        "classifier.1", "classifier.4", "classifier.6",
    ),
    "resnet18": ("maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"),
}

# Modules that never make a useful checkpoint of their own in the generic default.
_SKIPPED_IN_DEFAULT = (nn.Dropout, nn.Dropout2d, nn.Flatten, nn.Identity)


def hookable_layers(model: nn.Module) -> list[str]:
    """Every name a checkpoint may use.

    Args:
        model: the network.

    Returns:
        ``model.named_modules()`` names without the root ("").
    """
    return [name for name, _ in model.named_modules() if name]


def classification_layer(model: nn.Module) -> str | None:
    """Name of the classification layer: the last ``nn.Linear`` in registration order.

    Args:
        model: the network.

    Returns:
        "fc" for ResNet, "classifier.6" for AlexNet/VGG; None when the model has no
        ``nn.Linear``.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return names[-1] if names else None


def model_device(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the model's first parameter, else its first buffer.

    Args:
        model: the network.

    Returns:
        (device, dtype); CPU float32 for a model with neither parameters nor buffers.
    """
    for tensor in model.parameters():
        return tensor.device, tensor.dtype
    for tensor in model.buffers():
        return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def _dry_forward(
    model: nn.Module,
    image_size: int | Sequence[int],
    channels: int = 3,
    forward: Callable[[Tensor], Any] | None = None,
) -> None:
    """One forward of a zero batch (1, channels, H, W) in eval mode, without gradients;
    restores the training flags afterwards."""
    height, width = height_width(image_size)
    device, dtype = model_device(model)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            (forward or model)(torch.zeros(1, channels, height, width, device=device, dtype=dtype))
    finally:
        for module, mode in modes.items():
            module.training = mode


class ActivationCapture:
    """Context manager: forward hooks on named modules of ``model`` that keep their outputs.

    Args:
        model: root module; ``layers`` are names from its ``named_modules()``.
        layers: checkpoint names, in the order results are reported; None for
            ``default_layers(model)``.
        reduction: per layer, "none" (every element is a unit: unit shape (C, H, W) or (F,),
            the published sensitivity maps) or "channel_mean" (mean over every axis after the
            channel axis: (C,); identity for (B, F) outputs). One string for all layers or
            {layer: reduction} (layers not named get "none").
        softmax_layers: layers whose output is turned into probabilities with a softmax over
            axis 1 before the reduction; None (default) means the classification layer
            (``classification_layer(model)``) if it is a checkpoint, [] means none.

    Inside ``with capture:`` every forward of the model stores, per layer, a contiguous float32
    tensor (B, *unit_shape) on the model's device, detached and copied (a later in-place op such as
    ``ReLU(inplace=True)`` cannot alter it). ``pop()`` returns them. When a module runs several
    times in one forward (e.g. the shared ``relu`` inside a ResNet block), the last call wins;
    hook the enclosing block instead. Hooks are removed on exit, also after an exception.

    Raises:
        ValueError: no layers, unknown or repeated layer names, unknown reductions, reductions
            or softmax layers named for layers that are not captured.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] | None = None,
        reduction: str | Mapping[str, str] = "none",
        softmax_layers: Sequence[str] | None = None,
    ) -> None:
        self.model = model
        modules = dict(model.named_modules())
        valid = hookable_layers(model)
        if isinstance(layers, str):
            raise ValueError(f"layers must be a list of names, got the string {layers!r}")
        self.layers = list(default_layers(model) if layers is None else layers)
        if not self.layers:
            raise ValueError("no layers to capture; give at least one module name")
        unknown = [name for name in self.layers if name not in valid]
        if unknown:
            raise ValueError(
                f"unknown layer name(s) {unknown} for {type(model).__name__}; valid names: "
                f"{', '.join(valid)}"
            )
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers {self.layers} repeat a name; list each once")
        self.reductions = self._resolve_reductions(reduction)
        if softmax_layers is None:
            head = classification_layer(model)
            softmax_layers = [head] if head in self.layers else []
        outside = [name for name in softmax_layers if name not in self.layers]
        if outside:
            raise ValueError(
                f"softmax_layers {outside} are not among the captured layers {self.layers}"
            )
        self.softmax_layers = list(softmax_layers)
        self._modules = {name: modules[name] for name in self.layers}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._outputs: dict[str, Tensor] = {}

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

    # --------------------------------------------------------------------------- hooks
    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        """The forward hook that stores layer ``name``'s reduced float32 output."""
        reduction = self.reductions[name]
        softmax = name in self.softmax_layers

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not isinstance(output, Tensor):
                raise ValueError(
                    f"layer {name!r} ({type(module).__name__}) returns {type(output).__name__}, "
                    "not a tensor; capture a module that returns one tensor"
                )
            if output.ndim < 2:
                raise ValueError(
                    f"layer {name!r} returns shape {tuple(output.shape)}; expected (B, C, ...)"
                )
            value = output.detach()
            derived = False
            if softmax:
                if value.ndim != 2:
                    raise ValueError(
                        f"softmax layer {name!r} returns shape {tuple(value.shape)}; expected "
                        "(B, classes)"
                    )
                value, derived = torch.softmax(value.float(), dim=1), True
            if reduction == "channel_mean" and value.ndim > 2:
                value, derived = value.float().mean(dim=tuple(range(2, value.ndim))), True
            # Copy the raw output: the module's output may be modified in place later in the
            # forward (e.g. by ReLU(inplace=True)). Contiguous in (C, H, W) order whatever the
            # module's memory format: a channels-last output is transposed in the same pass.
            self._outputs[name] = value.to(
                torch.float32, memory_format=torch.contiguous_format, copy=not derived
            )

        return hook

    def __enter__(self) -> ActivationCapture:
        """Register the hooks; RuntimeError when already active."""
        if self._handles:
            raise RuntimeError("this ActivationCapture is already active; do not nest it")
        self._outputs = {}
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

    @property
    def active(self) -> bool:
        """Whether the hooks are registered (inside ``with``)."""
        return bool(self._handles)

    def pop(self) -> dict[str, Tensor]:
        """Take the outputs of the latest forward (and clear them).

        Returns:
            {layer: (B, *unit_shape) float32} on the model's device, in ``layers`` order.

        Raises:
            ValueError: a layer has not run since the last ``pop``.
        """
        missing = [name for name in self.layers if name not in self._outputs]
        if missing:
            raise ValueError(
                f"layer(s) {missing} produced no output since the last pop(); run a forward "
                "inside `with capture:` (and check that these modules are used by the forward)"
            )
        outputs = {name: self._outputs[name] for name in self.layers}
        self._outputs = {}
        return outputs

    def unit_shapes(
        self,
        image_size: int | Sequence[int],
        channels: int = 3,
        forward: Callable[[Tensor], Any] | None = None,
    ) -> dict[str, tuple[int, ...]]:
        """Unit shapes after the reductions, from one dry forward in eval mode.

        Args:
            image_size: H (square) or (H, W) in px.
            channels: input channels of the zero image (1, channels, H, W).
            forward: what runs the image (default: the model).

        Returns:
            {layer: unit shape}, e.g. (C, H', W'), (F,) or (C,) with channel_mean.
        """
        pending = self._outputs
        entered = not self.active
        if entered:
            self.__enter__()
        try:
            self._outputs = {}
            _dry_forward(self.model, image_size, channels, forward)
            shapes = {name: tuple(t.shape[1:]) for name, t in self.pop().items()}
        finally:
            self._outputs = pending
            if entered:
                self.__exit__(None, None, None)
        return shapes


def unit_shapes(
    model: nn.Module,
    image_size: int | Sequence[int],
    layers: Sequence[str] | None = None,
    reduction: str | Mapping[str, str] = "none",
) -> dict[str, tuple[int, ...]]:
    """Unit shapes of a network's checkpoints, from one dry forward.

    Args:
        model: the network (takes (1, 3, H, W) images).
        image_size: H (square) or (H, W) in px.
        layers: checkpoint names (default: ``default_layers(model)``).
        reduction: as for ``ActivationCapture``.

    Returns:
        {layer: unit shape}.

    Raises:
        ValueError: what ``ActivationCapture`` refuses.
    """
    return ActivationCapture(model, layers, reduction).unit_shapes(image_size)


def _matches_arch(model: nn.Module, arch: str) -> bool:
    """Whether ``model`` has exactly the module names of torchvision's ``arch``."""
    with torch.device("meta"):
        reference = torchvision.models.get_model(arch, weights=None)
    return hookable_layers(model) == hookable_layers(reference)


def _generic_layers(model: nn.Module, image_size: int | Sequence[int]) -> list[str]:
    """Last module of each run of equal output resolution, then the classification layer."""
    hooked = dict(model.named_children())
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential):
            hooked.update({f"{name}.{sub}": m for sub, m in child.named_children()})
    resolutions: dict[str, tuple[int, ...]] = {}  # execution order, first call of each module

    def record(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, Tensor) and output.ndim >= 2:
                resolutions.setdefault(name, tuple(output.shape[2:]))

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in hooked.items()]
    try:
        _dry_forward(model, image_size)
    finally:
        for handle in handles:
            handle.remove()
    # A top-level Sequential that spans several resolutions ("features") is a stack of stages:
    # use its children; one that keeps a single resolution ("layer1") is itself a stage.
    seen: list[tuple[str, tuple[int, ...]]] = []
    for name, child in model.named_children():
        children = [(f"{name}.{sub}", m) for sub, m in child.named_children()]
        inner = [n for n, _ in children if n in resolutions]
        if isinstance(child, nn.Sequential) and len({resolutions[n] for n in inner}) > 1:
            seen += [(n, resolutions[n]) for n, m in children
                     if n in resolutions and not isinstance(m, _SKIPPED_IN_DEFAULT)]
        elif name in resolutions and not isinstance(child, _SKIPPED_IN_DEFAULT):
            seen.append((name, resolutions[name]))
    head = classification_layer(model)
    chosen = [
        name for i, (name, resolution) in enumerate(seen)
        if name != head and resolution and (i + 1 == len(seen) or seen[i + 1][1] != resolution)
    ]
    return chosen + ([head] if head else [])


def default_layers(
    arch_or_model: str | nn.Module, image_size: int | Sequence[int] = 224
) -> list[str]:
    """Default checkpoints of a torchvision architecture name or network.

    alexnet, vgg11, resnet18 (also their small-input variants and any network with exactly
    their module names): the lists of METHOD.md section 4. Other networks: the last module of
    each run of equal output resolution (spatial or token axes) among the top-level modules,
    where a top-level ``nn.Sequential`` spanning several resolutions (such as ``features``)
    contributes its children instead; dropout, flatten and identity modules and other
    resolution-free (B, F) outputs are skipped; then the classification layer (last
    ``nn.Linear``). Execution order of the dry forward decides "last".
    A name is built on the meta device, so no memory or compute is spent on weights.

    Args:
        arch_or_model: a torchvision classification model name, or a network.
        image_size: H (square) or (H, W) in px of the dry forward that finds the resolutions.

    Returns:
        The checkpoint names, in execution order.

    Raises:
        ValueError: an unknown architecture name, or neither a name nor an ``nn.Module``.
    """
    if isinstance(arch_or_model, str):
        if arch_or_model in DEFAULT_LAYERS:
            return list(DEFAULT_LAYERS[arch_or_model])
        known = torchvision.models.list_models(module=torchvision.models)
        if arch_or_model not in known:
            raise ValueError(
                f"unknown architecture {arch_or_model!r}; expected a torchvision classification "
                f"model name (e.g. {', '.join(DEFAULT_LAYERS)}) or a network"
            )
        with torch.device("meta"):
            model = torchvision.models.get_model(arch_or_model, weights=None)
        return _generic_layers(model, image_size)
    if not isinstance(arch_or_model, nn.Module):
        raise ValueError(
            f"default_layers needs an architecture name or an nn.Module, got "
            f"{type(arch_or_model).__name__}"
        )
    for arch, layers in DEFAULT_LAYERS.items():
        if _matches_arch(arch_or_model, arch):
            return list(layers)
    return _generic_layers(arch_or_model, image_size)
