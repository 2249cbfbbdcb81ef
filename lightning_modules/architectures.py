"""torchvision classification networks by name, with small-input variants for 32-64 px images.

The variants replace only the stem, in place, so every module keeps the name torchvision gives it
(hooks such as "maxpool", "layer1", "features.2" or "classifier.6" exist in both variants):

- ResNet family (resnet*, resnext*, wide_resnet*): ``conv1`` becomes a 3x3 stride-1 convolution
  (same output channels, no bias, He init as torchvision) and ``maxpool`` becomes ``nn.Identity``.
  The stock stem divides the side by 4 before ``layer1``, leaving 2x2 maps in ``layer4`` at 64 px;
  the variant divides by 8 overall (``layer4`` 8x8 at 64 px, 4x4 at 32 px). Costs about 16x the
  stock network's compute at the same size.
- AlexNet: ``features.0`` (11x11 stride 4) becomes a 3x3 stride-1 convolution. The stock network
  needs >= 63 px (three 3x3 stride-2 max pools after the stride-4 stem) and keeps 1x1 maps at
  64 px; the variant works from 16 px up (7x7 maps before ``avgpool`` at 64 px). ``avgpool`` is
  adaptive (6x6), so the classifier is unchanged.
- VGG (vgg*): nothing changes. Its stem is already 3x3 stride 1, its five 2x2 pools leave 1x1
  (32 px) or 2x2 (64 px) maps and its adaptive ``avgpool`` (7x7) keeps the classifier's input size.

Other architectures have no small-input variant; they are built as torchvision defines them,
for the input size where it is part of the network: a vision transformer (vit_*) is built for
``image_size`` (its position embedding has one entry per patch; 32 px with 16 px patches gives 4
patch tokens and the class token), the others accept any size (Swin) or need their own
(MaxViT: 224 px).
"""

from __future__ import annotations

from collections.abc import Callable

import torchvision
from torch import nn

# Below this size the stock stems throw most of the image away (see the module docstring).
SMALL_INPUT_MAX_SIZE = 64
# Stock AlexNet fails below this size (the last max pool gets an empty map).
ALEXNET_MIN_SIZE = 63


def available_architectures() -> list[str]:
    """Names of torchvision's image classification models.

    Returns:
        The model names of the ``torchvision.models`` namespace.
    """
    return torchvision.models.list_models(module=torchvision.models)


def _resnet_stem(net: nn.Module) -> list[str]:
    """3x3 stride-1 ``conv1`` and no ``maxpool``, in place; the replaced names."""
    conv = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    net.conv1 = conv
    net.maxpool = nn.Identity()
    return ["conv1", "maxpool"]


def _alexnet_stem(net: nn.Module) -> list[str]:
    """3x3 stride-1 ``features.0``, in place; the replaced names."""
    net.features[0] = nn.Conv2d(3, net.features[0].out_channels, kernel_size=3, stride=1, padding=1)
    return ["features.0"]


def _vgg_stem(net: nn.Module) -> list[str]:
    """Nothing to replace: VGG's stem already suits small inputs."""
    return []


# Keyed by torchvision class so that every depth/width of a family shares its variant.
_SMALL_INPUT_VARIANTS: dict[type, Callable[[nn.Module], list[str]]] = {
    torchvision.models.ResNet: _resnet_stem,
    torchvision.models.AlexNet: _alexnet_stem,
    torchvision.models.VGG: _vgg_stem,
}


def has_small_input_variant(net: nn.Module) -> bool:
    """Whether a network's family has a small-input variant.

    Args:
        net: a torchvision network.

    Returns:
        True for the ResNet, AlexNet and VGG families.
    """
    return type(net) in _SMALL_INPUT_VARIANTS


def build_network(arch: str, num_classes: int, image_size: int | None = None) -> nn.Module:
    """A randomly initialised torchvision classification network.

    Args:
        arch: a torchvision classification model name ("resnet18", "alexnet", ...).
        num_classes: outputs of its head.
        image_size: side of the (square) input images in px: a vision transformer is built
            for it (module docstring); None, or another family: torchvision's network.

    Returns:
        The network.

    Raises:
        ValueError: a name that is not a torchvision classification model.
    """
    known = available_architectures()
    if arch not in known:
        raise ValueError(
            f"unknown architecture {arch!r}: expected a torchvision classification model name, "
            f"e.g. resnet18, alexnet, vgg11 (all: {', '.join(known)})"
        )
    sized = {"image_size": image_size} if image_size is not None and arch.startswith("vit_") else {}
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **sized)


def make_small_input(net: nn.Module, arch: str) -> list[str]:
    """Turn a network into its small-input variant, in place (module docstring).

    Args:
        net: a torchvision network.
        arch: its name, for the error message.

    Returns:
        The replaced module names (["conv1", "maxpool"], ["features.0"] or []).

    Raises:
        ValueError: the family has no variant.
    """
    variant = _SMALL_INPUT_VARIANTS.get(type(net))
    if variant is None:
        raise ValueError(
            f"{arch!r} has no small-input variant (only the ResNet, AlexNet and VGG families "
            "have one); use small_input=False"
        )
    return variant(net)
