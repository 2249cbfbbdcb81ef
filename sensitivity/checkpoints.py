"""The layers of a network that can be captured, its classification layer and the default
checkpoints (METHOD.md section 4).

Layer names are ``model.named_modules()`` names of the hooked module: for a torchvision network
"layer1", "features.2", "classifier.6", "fc", "encoder.layers.encoder_layer_3"; a suffix
":<element>" picks one tensor of a tuple or dict output (``sensitivity.layouts``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.swin_transformer import PatchMerging, PatchMergingV2
from torchvision.ops.misc import Permute

from sensitivity.layouts import FEATURE_AXIS, LAYOUT_AXES
from sensitivity.output_layouts import LayoutTracker
from sensitivity.provenance import height_width

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

# Modules that never make a useful checkpoint of their own in the generic default (a Permute
# only reorders the axes of its input, e.g. Swin's final one).
_SKIPPED_IN_DEFAULT = (nn.Dropout, nn.Dropout2d, nn.Flatten, nn.Identity, Permute)


def hookable_layers(model: nn.Module) -> list[str]:
    """Every module name a checkpoint may use.

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
        "fc" for ResNet, "classifier.6" for AlexNet/VGG, "heads.head" for ViT, "head" for
        Swin, "classifier.5" for MaxViT; None when the model has no ``nn.Linear``.
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


def dry_forward(
    model: nn.Module,
    image_size: int | Sequence[int],
    channels: int = 3,
    forward: Callable[[Tensor], Any] | None = None,
) -> None:
    """One forward of a zero batch (1, channels, H, W) in eval mode, without gradients.

    Args:
        model: the network (its device and dtype take the batch; its training flags are
            restored afterwards).
        image_size: H (square) or (H, W) in px.
        channels: input channels.
        forward: what runs the batch (default: the model).
    """
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


# ------------------------------------------------------------------------------- the defaults
def _vit_layers(model: nn.Module) -> list[str]:
    """ViT: the patch embedding, every encoder layer, the encoder's output (after its final
    norm), the classification layer."""
    blocks = [f"encoder.layers.{name}" for name, _ in model.encoder.layers.named_children()]
    return ["conv_proj", *blocks, "encoder", classification_layer(model)]


def _swin_layers(model: nn.Module) -> list[str]:
    """Swin: the patch embedding and every stage of ``features`` (not the patch mergings
    between them), the pooled features, the classification layer."""
    stages = [f"features.{name}" for name, m in model.features.named_children()
              if not isinstance(m, PatchMerging | PatchMergingV2)]
    return [*stages, "avgpool", classification_layer(model)]


# Families whose stages the generic rule cannot tell apart: ViT's encoder layers all keep one
# resolution, and Swin's final norm would stand in for its last stage.
_FAMILY_LAYERS: dict[type, Callable[[nn.Module], list[str]]] = {
    torchvision.models.VisionTransformer: _vit_layers,
    torchvision.models.SwinTransformer: _swin_layers,
}


def _matches_arch(model: nn.Module, arch: str) -> bool:
    """Whether ``model`` has exactly the module names of torchvision's ``arch``."""
    with torch.device("meta"):
        reference = torchvision.models.get_model(arch, weights=None)
    return hookable_layers(model) == hookable_layers(reference)


def _resolutions(model: nn.Module, hooked: dict[str, nn.Module],
                 image_size: int | Sequence[int]) -> dict[str, tuple[int, ...]]:
    """{name: positions of its first output} of the ``hooked`` modules that ran, in execution
    order: (H, W) of a map, (L,) of tokens, () of a flat output; outputs without a detected
    layout (``LayoutTracker``) are left out."""
    resolutions: dict[str, tuple[int, ...]] = {}
    tracker = LayoutTracker(model)

    def record(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not isinstance(output, Tensor) or name in resolutions:
                return
            layout, _ = tracker.layout(name, output.ndim)
            if layout is not None:
                feature = FEATURE_AXIS[layout]
                resolutions[name] = tuple(
                    size for size, axis in zip(output.shape[1:], LAYOUT_AXES[layout], strict=True)
                    if axis != feature
                )

        return hook

    with tracker:  # entered first: its hooks update the order before the recording ones read it
        handles = [module.register_forward_hook(record(name)) for name, module in hooked.items()]
        try:
            dry_forward(model, image_size)
        finally:
            for handle in handles:
                handle.remove()
    return resolutions


def _generic_layers(model: nn.Module, image_size: int | Sequence[int]) -> list[str]:
    """Last module of each run of equal output resolution, then the classification layer."""
    hooked = dict(model.named_children())
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential | nn.ModuleList):
            hooked.update({f"{name}.{sub}": m for sub, m in child.named_children()})
    resolutions = _resolutions(model, hooked, image_size)
    # A top-level Sequential that spans several resolutions ("features") is a stack of stages:
    # use its children; one that keeps a single resolution ("layer1") is itself a stage. A
    # ModuleList never runs itself: always its children (MaxViT's "blocks").
    seen: list[tuple[str, tuple[int, ...]]] = []
    for name, child in model.named_children():
        children = [(f"{name}.{sub}", m) for sub, m in child.named_children()]
        inner = [n for n, _ in children if n in resolutions]
        stack = isinstance(child, nn.ModuleList) or (
            isinstance(child, nn.Sequential) and len({resolutions[n] for n in inner}) > 1
        )
        if stack:
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


def _reference_network(arch: str) -> nn.Module:
    """torchvision's ``arch`` with random weights on the meta device (no memory, no compute)."""
    try:
        with torch.device("meta"):
            return torchvision.models.get_model(arch, weights=None)
    except NotImplementedError:
        # RegNet computes its block widths with tensor ops, which have no values on the meta
        # device: build it on the CPU, then move it.
        return torchvision.models.get_model(arch, weights=None).to("meta")


def default_layers(
    arch_or_model: str | nn.Module, image_size: int | Sequence[int] = 224
) -> list[str]:
    """Default checkpoints of a torchvision architecture name or network.

    alexnet, vgg11, resnet18 (also their small-input variants and any network with exactly
    their module names): the lists of METHOD.md section 4. ViT: "conv_proj", every
    "encoder.layers.encoder_layer_<i>", "encoder", the head. Swin: the patch embedding
    "features.0" and the stages "features.1/3/5/7", "avgpool", "head". Other networks: the last
    module of each run of equal output resolution (spatial or token axes, in the detected
    layout) among the top-level modules, where a top-level ``nn.Sequential`` spanning several
    resolutions (such as ``features``) and every top-level ``nn.ModuleList`` (MaxViT's
    ``blocks``) contribute their children instead; dropout, flatten, identity and permute
    modules, resolution-free (B, F) outputs and outputs of no detected layout are skipped;
    then the classification layer (last ``nn.Linear``). Execution order of the dry forward
    decides "last". A name is built on the meta device, so no memory or compute is spent on
    weights.

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
        return _network_layers(_reference_network(arch_or_model), image_size)
    if not isinstance(arch_or_model, nn.Module):
        raise ValueError(
            f"default_layers needs an architecture name or an nn.Module, got "
            f"{type(arch_or_model).__name__}"
        )
    for arch, names in DEFAULT_LAYERS.items():
        if _matches_arch(arch_or_model, arch):
            return list(names)
    return _network_layers(arch_or_model, image_size)


def _network_layers(model: nn.Module, image_size: int | Sequence[int]) -> list[str]:
    """The family's checkpoints (``_FAMILY_LAYERS``), else the generic rule's."""
    for family, layers in _FAMILY_LAYERS.items():
        if isinstance(model, family):
            return layers(model)
    return _generic_layers(model, image_size)
