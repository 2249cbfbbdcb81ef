"""Augmentations a user registers, for tests/test_registry.py: importing this module registers
them, so that a problem config can name them by import path (``user_augmentations:channel_swap``;
pytest puts tests/ on ``sys.path``)."""

from __future__ import annotations

import torch

from sensitivity.augmentations import ParamSpec, register_augmentation


@register_augmentation("channel_swap", params={"mix": (0.0, 1.0)}, identity={"mix": 0.0})
def channel_swap(images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Blend RGB with BGR: (1 - mix) * x + mix * x[:, [2, 1, 0]]; mix 1 swaps red and blue.

    Args:
        images: (B, 3, H, W) float in [0, 1].
        params: {"mix": (B,) float64 in [0, 1]}.

    Returns:
        (B, 3, H, W) of the images' dtype in [0, 1] (a convex combination of two images).
    """
    mix = params["mix"].to(images.dtype).view(-1, 1, 1, 1)
    return torch.lerp(images, images.flip(1), mix)


@register_augmentation("posterize", params=(ParamSpec("levels", 2, 32, integer=True),))
def posterize(images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Quantise every value to ``levels`` equally spaced levels (a JPEG-like loss of detail).

    Args:
        images: (B, 3, H, W) float in [0, 1].
        params: {"levels": (B,) float64 whole numbers in [2, 32]}.

    Returns:
        (B, 3, H, W) of the images' dtype in [0, 1].
    """
    steps = (params["levels"] - 1).to(images.dtype).view(-1, 1, 1, 1)
    return (images * steps).round() / steps


def not_registered(images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """A function of the right form that nobody registered (import_augmentation refuses it)."""
    return images.clone()
