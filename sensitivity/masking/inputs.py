"""Probe inputs of guided masking and single-class analysis: each probe image as the original
and with one input augmentation at a time.

Per probe image: the original, and for each input augmentation K images with only that
augmentation applied and its parameters drawn afresh (``ContrastDesign`` over a problem with the
analysis's bounds and postprocessing, so the draws are reproducible from the seed and shardable
by image).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from sensitivity.augmentations import AUGMENTATIONS
from sensitivity.designs import ContrastDesign
from sensitivity.problem import AugmentationProblem

ORIGINAL = "original"


def input_problem(
    augmentations: Sequence[str], n_images: int, base: AugmentationProblem | None = None
) -> AugmentationProblem:
    """The problem whose ContrastDesign yields each probe image's original and singly-augmented
    rows.

    Args:
        augmentations: the input augmentations.
        n_images: probe images (one class).
        base: the analysed problem, whose bounds and postprocessing the draws keep.

    Returns:
        A problem over ``augmentations`` and the image index.
    """
    unknown = [a for a in augmentations if a not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown input augmentation(s) {unknown}; valid: {list(AUGMENTATIONS)}")
    config = base.to_config() if base is not None else {}
    bounds = {a: b for a, b in (config.get("bounds") or {}).items() if a in augmentations}
    return AugmentationProblem(
        list(augmentations), p_on=0.5, auxiliaries=("image",) if n_images > 1 else (),
        n_classes=1, images_per_class=n_images, postprocess=config.get("postprocess"),
        bounds=bounds or None,
    )


def _image_count(images: Tensor | Dataset) -> int:
    return int(images.shape[0]) if isinstance(images, Tensor) else len(images)


def load_images(images: Tensor | Dataset, start: int, stop: int) -> Tensor:
    """Probe images [start, stop) as one (stop - start, 3, H, W) tensor, from a tensor or a
    Dataset of images or (image, label) pairs."""
    if isinstance(images, Tensor):
        return images[start:stop]
    items = [images[i] for i in range(start, stop)]
    return torch.stack([item[0] if isinstance(item, tuple | list) else item for item in items])


class ProbeInputs:
    """Original and singly-augmented inputs of probe images.

    Input set 0 is the original; input set 1 + a carries augmentation a alone, ``k`` parameter
    draws per image (``ContrastDesign`` block = image).

    Args:
        images: (N, 3, H, W) float in [0, 1], or a Dataset of such images (or (image, label)).
        labels: (N,) int64 class indices.
        augmentations: the input augmentations, in input-set order.
        k: parameter draws per image and augmentation.
        seed: seed of the draws.
        base: the analysed problem, whose bounds and postprocessing the draws use.

    Attributes:
        names: the input sets: "original", then the augmentations.
        n_images, height, width: the probe's size (pixels).
        k, seed: the draws per image and augmentation, and their seed.
    """

    def __init__(
        self,
        images: Tensor | Dataset,
        labels: Tensor,
        augmentations: Sequence[str],
        k: int = 4,
        seed: int = 0,
        base: AugmentationProblem | None = None,
    ) -> None:
        self.images = images
        self.n_images = _image_count(images)
        self.labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if self.n_images == 0 or len(self.labels) != self.n_images:
            raise ValueError(
                f"need one label per probe image: {self.n_images} images, {len(self.labels)} "
                "labels"
            )
        self.augmentations = list(augmentations)
        self.names = [ORIGINAL, *self.augmentations]
        self.k = int(k)
        self.seed = int(seed)
        first = load_images(images, 0, 1)
        self.height, self.width = int(first.shape[-2]), int(first.shape[-1])
        if self.augmentations:
            self.problem: AugmentationProblem | None = input_problem(
                self.augmentations, self.n_images, base
            )
            self.design: ContrastDesign | None = ContrastDesign(
                self.problem, self.n_images, self.k, seed
            )
        else:
            self.problem, self.design = None, None

    def batch(
        self, start: int, stop: int, device: torch.device, dtype: torch.dtype
    ) -> list[tuple[Tensor, Tensor]]:
        """Every input set of the probe images [start, stop).

        Args:
            start, stop: the images.
            device, dtype: where and as what the inputs go.

        Returns:
            [(inputs (R_i, 3, H, W) in [0, 1], labels (R_i,))] per input set, R_0 =
            stop - start, R_i = k (stop - start).
        """
        images = load_images(self.images, start, stop).to(device, dtype)
        labels = self.labels[start:stop].to(device)
        if self.design is None or self.problem is None:
            return [(images, labels)]
        rows = self.design.rows(start, stop)
        decoded = self.problem.decode(rows, self.height, self.width)
        image = decoded.image_index.to(device) - start
        augmented = self.problem.augment(images[image], decoded)
        kind = torch.arange(len(rows), device=device) % self.design.block_size
        which = torch.where(kind == 0, 0, 1 + torch.div(kind - 1, self.k, rounding_mode="floor"))
        return [
            (augmented[which == i], labels[image[which == i]]) for i in range(len(self.names))
        ]
