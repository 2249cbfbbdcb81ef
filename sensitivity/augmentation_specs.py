"""What an augmentation is (``AugmentationSpec``), the registry of them and the checks of a batch.

``AUGMENTATIONS`` is the registry (``sensitivity.registry`` adds to it; the built-in 12 of
METHOD.md section 2 register on import of ``sensitivity.augmentations``). Every spec states its
parameters' bounds at 224 px; ``AugmentationSpec.bounds(h, w)`` scales the spatial ones to
another image size. ``validate(images, {name: params, ...})`` checks a batch of images and the
parameters of several augmentations at once, so that a pipeline (``pipeline.compose``, behind
``AugmentationProblem.augment``) pays the checks once and then calls ``augmentations.apply``
with ``validated=True``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

Kernel = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
"""An augmentation's batched function: ``fn(images, params) -> images``, images (B, 3, H, W)
float in [0, 1], params {parameter: (B,) float64 tensor} in natural units at H x W."""

REFERENCE_SIDE = 224
"""Image side in px at which ``AUGMENTATIONS`` states its bounds."""


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of an augmentation.

    Attributes:
        name: the parameter's name (a key of ``augmentations.apply``'s ``params``).
        low, high: its bounds at 224 px, in natural units (px, degrees, factors).
        integer: whether values must be whole (pixel shifts).
        axis: how it scales with the image: ``"y"`` with the height, ``"x"`` with the width,
            ``"xy"`` with the smaller side, None not at all (factors, angles, ratios).
    """

    name: str
    low: float
    high: float
    integer: bool = False
    axis: str | None = None

    def bounds(self, height: int, width: int) -> tuple[float, float]:
        """The bounds at another image size (spatial parameters scale linearly).

        Args:
            height, width: image size in px.

        Returns:
            (low, high) in natural units at that size, rounded for integer parameters.

        Raises:
            ValueError: ``axis`` is not "x", "y", "xy" or None.
        """
        scale = _axis_scale(self.axis, height, width)
        low, high = self.low * scale, self.high * scale
        if self.integer:
            low, high = float(round(low)), float(round(high))
        return low, high


@dataclass(frozen=True)
class AugmentationSpec:
    """An augmentation: ordered parameters, its identity values and its batched function.

    Attributes:
        name: its key in ``AUGMENTATIONS``.
        params: its parameters, in the order of design columns.
        identity: parameter -> identity value (brightness 1, rotation 0, ...); None for
            augmentations that are off only when switched off (erasing, blur, flips, ...).
        fn: the batched function (``Kernel``); None only for a spec not (yet) registered.
        moves_data: ``fn`` only moves or zeroes values (erasing, rolling, hflip), exact in any
            dtype: it gets half-precision images as they are, where others get them in float32.
    """

    name: str
    params: tuple[ParamSpec, ...]
    identity: dict[str, float] | None
    fn: Kernel | None = None
    moves_data: bool = False

    @property
    def source(self) -> str | None:
        """``fn``'s import path, "package.module:function", or None without one (a lambda or a
        callable object has no importable name)."""
        module = getattr(self.fn, "__module__", None)
        qualname = getattr(self.fn, "__qualname__", None)
        if module is None or qualname is None or "<" in qualname:
            return None
        return f"{module}:{qualname}"

    @property
    def param_names(self) -> tuple[str, ...]:
        """The parameters' names, in order."""
        return tuple(p.name for p in self.params)

    def bounds(self, height: int, width: int) -> list[tuple[float, float]]:
        """Per-parameter bounds at another image size.

        Args:
            height, width: image size in px.

        Returns:
            [(low, high)] in parameter order, natural units at that size.
        """
        return [p.bounds(height, width) for p in self.params]


def _axis_scale(axis: str | None, height: int, width: int) -> float:
    """Factor by which a parameter along ``axis`` scales from 224 px to ``height x width``."""
    if axis is None:
        return 1.0
    if axis == "y":
        return height / REFERENCE_SIDE
    if axis == "x":
        return width / REFERENCE_SIDE
    if axis == "xy":
        return min(height, width) / REFERENCE_SIDE
    raise ValueError(f"unknown axis {axis!r}; expected 'x', 'y', 'xy' or None")


AUGMENTATIONS: dict[str, AugmentationSpec] = {}
"""The registry: name -> spec, in registration order. ``sensitivity.augmentations`` registers the
built-in 12 on import, the user's come from ``sensitivity.registry.register_augmentation``."""

AUGMENTATION_SETS: dict[int, list[str]] = {
    1: ["erasing", "sharpness", "rolling", "grayscale", "gaussian_blur"],
    2: ["brightness", "contrast", "saturation", "hue", "hflip", "rotation", "elliptic_local_blur"],
}

BUILTIN = frozenset(AUGMENTATION_SETS[1] + AUGMENTATION_SETS[2])
"""The built-in augmentations (METHOD.md section 2): never unregistered or replaced."""

IMAGE_TOLERANCE = 1e-4  # float32 round-off of earlier augmentations may leave [0, 1] by ~1e-7
_BOUND_TOLERANCE = 1e-5  # relative; bounds mapped from the unit cube in float32 may overshoot


def augmentation_spec(name: str) -> AugmentationSpec:
    """The spec of one augmentation.

    Args:
        name: an augmentation name.

    Returns:
        ``AUGMENTATIONS[name]``.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    spec = AUGMENTATIONS.get(name)
    if spec is None:
        raise ValueError(
            f"unknown augmentation {name!r}; valid names: {', '.join(AUGMENTATIONS)} (register "
            f"yours with sensitivity.registry.register_augmentation)"
        )
    return spec


def validate(
    images: torch.Tensor, params: Mapping[str, Mapping[str, torch.Tensor] | None]
) -> dict[str, dict[str, torch.Tensor]]:
    """Check a batch of images and the parameters of one or more augmentations for it.

    Gathers every statistic into one small tensor, so the whole check costs one pass over the
    images and a single device synchronisation.

    Args:
        images: (B, 3, H, W) floating point in [0, 1].
        params: augmentation name -> its parameters, each a (B,) tensor in natural units at
            H x W (pixels, degrees, factors; as for ``augmentations.apply``).

    Returns:
        The parameters as {name: {parameter: (B,) float64 tensor}} on the images' device.

    Raises:
        ValueError: naming the augmentation and what is wrong (see ``augmentations.apply``).
    """
    label = ", ".join(params) or "augmentation"
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{label}: images must be a (B, 3, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(
            f"{label}: images must be floating point in [0, 1], got {images.dtype}; "
            "convert with images.float() / 255"
        )
    batch, _, height, width = images.shape
    if height < 3 or width < 3:
        raise ValueError(f"{label}: images must be at least 3 x 3 px, got {height} x {width}")
    specs = [augmentation_spec(name) for name in params]
    values = {
        spec.name: _check_param_shapes(spec, params[spec.name], batch, images.device)
        for spec in specs
    }
    if batch == 0:
        return values

    stats = [torch.stack(images.aminmax()).to(torch.float64)]
    for spec in specs:
        if spec.params:
            stacked = torch.stack([values[spec.name][p] for p in spec.param_names])
            low, high = stacked.aminmax(dim=1)
            stats += [low, high, (stacked - stacked.round()).abs().amax(dim=1)]
    flat = torch.cat(stats).tolist()

    img_low, img_high = flat[0], flat[1]
    if not (img_low >= -IMAGE_TOLERANCE and img_high <= 1 + IMAGE_TOLERANCE):
        raise ValueError(
            f"{label}: image values must lie in [0, 1], got [{img_low:.4g}, {img_high:.4g}]; "
            "scale uint8 images by 1/255 and apply ImageNet normalisation only after augmenting"
        )
    start = 2
    for spec in specs:
        n = len(spec.params)
        lows, highs = flat[start : start + n], flat[start + n : start + 2 * n]
        frac = flat[start + 2 * n : start + 3 * n]
        start += 3 * n
        _check_param_values(spec, lows, highs, frac, height, width)
    return values


def _check_param_shapes(
    spec: AugmentationSpec,
    params: Mapping[str, torch.Tensor] | None,
    batch: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Names and shapes of one augmentation's parameters; returns them float64 on ``device``."""
    params = {} if params is None else params
    if not isinstance(params, Mapping):
        raise ValueError(f"{spec.name}: params must be a dict of (B,) tensors, got {type(params)}")
    expected = spec.param_names
    if set(params) != set(expected):
        missing = [p for p in expected if p not in params]
        extra = [p for p in params if p not in expected]
        raise ValueError(
            f"{spec.name}: expected parameters {list(expected)}; missing {missing}, extra {extra}"
        )
    for pname in expected:
        value = params[pname]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (batch,):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"{spec.name}: parameter {pname!r} must be a tensor of shape ({batch},) "
                f"(one value per image), got {shape}"
            )
    return {p: params[p].to(device, torch.float64) for p in expected}


def _check_param_values(
    spec: AugmentationSpec,
    lows: list[float],
    highs: list[float],
    frac: list[float],
    height: int,
    width: int,
) -> None:
    """Per-parameter minimum, maximum and largest distance to an integer against the spec."""
    for i, (pspec, (lo, hi)) in enumerate(
        zip(spec.params, spec.bounds(height, width), strict=True)
    ):
        if not (math.isfinite(lows[i]) and math.isfinite(highs[i])):
            raise ValueError(f"{spec.name}: parameter {pspec.name!r} has non-finite values")
        tol = _BOUND_TOLERANCE * max(1.0, abs(lo), abs(hi))
        if lows[i] < lo - tol or highs[i] > hi + tol:
            raise ValueError(
                f"{spec.name}: parameter {pspec.name!r} has values in [{lows[i]:.6g}, "
                f"{highs[i]:.6g}], outside its bounds [{lo:.6g}, {hi:.6g}] at {height} x {width} "
                "px; pass natural units scaled to this size (AUGMENTATIONS[name].bounds(H, W))"
            )
        if pspec.integer and frac[i] > 0:
            raise ValueError(
                f"{spec.name}: parameter {pspec.name!r} must be integral (whole pixels); round it"
            )

