"""The distortion of a suppression experiment: a nuisance augmentation at a strength.

The nuisance augmentation v at strength s in [0, 1] (``NuisanceDistortion``):
for an augmentation with identity values (brightness, contrast, saturation, hue, rotation)
every parameter is moved from its identity c towards one end e of its bound range (low or high,
a coin per image): c + s (e - c), so s = 1 is the range's end (hue: a shift of s * 0.5 turns
either way). An augmentation without identity values (erasing, blurs, rolling, grayscale, ...)
is applied with parameters drawn uniformly within its bounds and blended with the clean image:
x + s (aug(x) - x). The bounds are those of the analysis's problem (custom bounds included) at
the image size; draws come from ``seed``, the split and the image index, so every strength,
candidate and control sees the same draws. s = 0 is the clean image.

Used by ``sensitivity.suppression`` (candidates, choice and test report) and by the fine-tuning
baselines (``lightning_modules.finetune``), so that every method sees the same distorted images.
This module imports torch and numpy; never Lightning or wandb.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from sensitivity.augmentations import AUGMENTATIONS, apply
from sensitivity.problem import AugmentationProblem

# Sub-seeds of the draws: each split's distortions and the random controls are separate streams.
VAL_STREAM, TEST_STREAM, RANDOM_STREAM = 0, 1, 2


class NuisanceDistortion:
    """The nuisance augmentation at a strength (module docstring), deterministic per image.

    Args:
        variable: an augmentation (``AUGMENTATIONS``); auxiliaries (class, image, order,
            partition) are refused: they are no distortion of an image.
        seed: the seed of the draws.
        problem: the analysed problem; its bounds of ``variable`` (if it has the augmentation)
            replace the published ones.

    Raises:
        ValueError: a variable that is not a registered augmentation.
    """

    def __init__(
        self, variable: str, seed: int = 0, problem: AugmentationProblem | None = None
    ) -> None:
        if variable not in AUGMENTATIONS:
            raise ValueError(
                f"nuisance variable {variable!r} is not an augmentation (valid: "
                f"{list(AUGMENTATIONS)}); suppression distorts images with the nuisance, so an "
                "auxiliary such as class or image cannot be suppressed"
            )
        spec = AUGMENTATIONS[variable]
        self.variable = variable
        self.seed = int(seed)
        self.params = (problem.params[variable] if problem is not None
                       and variable in problem.params else spec.params)
        self.identity = spec.identity

    @property
    def mode(self) -> str:
        """"scale" (parameters moved from their identity) or "blend" (output blended)."""
        return "scale" if self.identity is not None else "blend"

    def describe(self) -> str:
        """One line: how strength s distorts an image."""
        if self.mode == "scale":
            moves = ", ".join(f"{p.name}: {self.identity[p.name]:g} + s (end of "
                              f"[{p.low:g}, {p.high:g}] - {self.identity[p.name]:g})"
                              for p in self.params)
            return f"{self.variable} {moves} (bounds at 224 px, one end per image)"
        return (f"{self.variable} with parameters uniform in its bounds, blended: "
                "x + s (aug(x) - x)")

    def draws(self, stream: int, index: Tensor) -> np.ndarray:
        """(B, 1 + P) uniforms in [0, 1) of the images ``index`` of a split (``stream``):
        column 0 the coin, then one per parameter; independent of batching."""
        width = 1 + len(self.params)
        return np.stack([np.random.default_rng([self.seed, stream, int(i)]).random(width)
                         for i in index.tolist()]).reshape(len(index), width)

    def __call__(self, images: Tensor, strength: float, stream: int, index: Tensor) -> Tensor:
        """The images distorted at ``strength``.

        Args:
            images: (B, 3, H, W) float in [0, 1].
            strength: s in [0, 1]; 0 returns the images.
            stream: the split's stream (``VAL_STREAM``, ``TEST_STREAM``).
            index: (B,) the images' indices in their split.

        Returns:
            (B, 3, H, W), the input dtype and device.
        """
        if strength == 0.0 or len(images) == 0:
            return images
        u = self.draws(stream, index)
        height, width = images.shape[-2:]
        values = {}
        for j, spec in enumerate(self.params):
            low, high = spec.bounds(int(height), int(width))
            if self.mode == "scale":
                centre = self.identity[spec.name]
                end = np.where((u[:, 0] < 0.5) & (high != centre) | (low == centre), high, low)
                value = centre + strength * (end - centre)
            else:
                value = low + u[:, 1 + j] * (high - low)
            values[spec.name] = torch.from_numpy(np.rint(value) if spec.integer else value)
        out = apply(self.variable, images, values or None)
        return out if self.mode == "scale" else images + strength * (out - images)
