"""The probe images of an analysis: checked once, loaded by index, fingerprinted for resume.

A probe is a tensor (N, 3, H, W) float in [0, 1] or a Dataset of N such images (or (image,
label) tuples), class-major: image i belongs to class i // images_per_class; with a
``partition`` auxiliary the second split follows the first (N = 2 n_images). ``ProbeImages``
checks the count, shape and range before the first forward and loads the images a batch needs
(in DataLoader workers too: CPU only). ``tensor_digest`` is the exact hash resume states use.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from sensitivity.problem import AugmentationProblem

# Images may leave [0, 1] by float round-off of their decoding; augmentations tolerate 1e-4 too.
IMAGE_TOLERANCE = 1e-4


def _as_image(item: Any, index: int) -> Tensor:
    """A probe item ((3, H, W) tensor or a tuple starting with one) as the image tensor.

    Args:
        item: what the probe Dataset returned for ``index``.
        index: its index, for the error message.

    Returns:
        The (3, H, W) image tensor.
    """
    image = item[0] if isinstance(item, tuple | list) else item
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(
            f"probe item {index} is {shape}; expected an image tensor (3, H, W) in [0, 1] or a "
            f"tuple (image, label)"
        )
    return image


def _check_range(images: Tensor, what: str) -> None:
    """ValueError unless ``images`` are floating point within [0, 1] (up to IMAGE_TOLERANCE)."""
    if not images.is_floating_point():
        raise ValueError(f"{what} must be floating point in [0, 1], got {images.dtype}")
    low, high = (float(v) for v in images.aminmax())
    if not (low >= -IMAGE_TOLERANCE and high <= 1.0 + IMAGE_TOLERANCE):
        raise ValueError(
            f"{what} must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]; pass images "
            f"scaled to [0, 1] without ImageNet normalisation (the model normalises after "
            f"augmenting)"
        )


def probe_size(probe: Tensor | Dataset) -> tuple[int, int]:
    """The size of a probe's images, read from its first image (``ProbeImages`` checks that
    the others agree).

    Args:
        probe: a tensor (N, 3, H, W) or a Dataset of (3, H, W) images or (image, label) tuples.

    Returns:
        (H, W) in pixels.

    Raises:
        ValueError: when a Dataset's first item is no image tensor (3, H, W).
    """
    image = probe[0] if isinstance(probe, Tensor) else _as_image(probe[0], 0)
    return int(image.shape[-2]), int(image.shape[-1])


def partition_count(problem: AugmentationProblem) -> int:
    """Probe splits: 2 with a ``partition`` auxiliary (split p owns images p * n_images ...)."""
    return 2 if "partition" in problem.auxiliaries else 1


class ProbeImages:
    """The checked probe images of one analysis.

    Args:
        probe: a tensor (N, 3, H, W) float in [0, 1] or a Dataset with a length whose items are
            such images or (image, label) tuples; only item 0 is read here.
        problem: N must be its n_images, times 2 with a ``partition`` auxiliary.
        cpu: load from a CPU copy of a tensor probe (DataLoader workers index the probe and
            must not touch the accelerator).

    Attributes:
        source: the probe as passed. probe: what images are loaded from (``source``, or its
        CPU copy). count: N. height, width: the image size in pixels. n_images: images per
        split (``problem.n_images``).

    Raises:
        ValueError: for a wrong type, count, shape or value range.
    """

    def __init__(
        self, probe: Tensor | Dataset, problem: AugmentationProblem, cpu: bool = False
    ) -> None:
        self.source = probe
        if cpu and isinstance(probe, Tensor) and probe.device.type != "cpu":
            probe = probe.cpu()
        partitions = partition_count(problem)
        expected = problem.n_images * partitions
        if isinstance(probe, Tensor):
            if probe.ndim != 4 or probe.shape[1] != 3:
                raise ValueError(
                    f"probe must be images (N, 3, H, W) in [0, 1], got shape {tuple(probe.shape)}"
                )
            _check_range(probe, "probe images")
            count, self.height, self.width = probe.shape[0], probe.shape[2], probe.shape[3]
        elif isinstance(probe, Dataset) and hasattr(probe, "__len__"):
            count = len(probe)
            if count == 0:
                raise ValueError("the probe dataset is empty; it needs one item per probe image")
            first = _as_image(probe[0], 0)
            _check_range(first, "probe image 0")
            self.height, self.width = int(first.shape[1]), int(first.shape[2])
        else:
            raise ValueError(
                f"probe must be a tensor (N, 3, H, W) or a Dataset with a length, got "
                f"{type(probe).__name__}"
            )
        if count != expected:
            split = " x 2 partitions" if partitions == 2 else ""
            raise ValueError(
                f"the probe holds {count} images but the problem expects {expected} "
                f"(n_classes {problem.n_classes} x images_per_class {problem.images_per_class}"
                f"{split}, class-major); build the problem with the probe's class and image counts"
            )
        self.probe = probe
        self.count = count
        self.n_images = problem.n_images

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of every probe image, in pixels."""
        return self.height, self.width

    def load(self, index: Tensor) -> Tensor:
        """The probe images at ``index``.

        Args:
            index: (K,) int64 probe indices, on the CPU.

        Returns:
            (K, 3, H, W) images in [0, 1], where the probe is (the CPU for a Dataset).
        """
        if isinstance(self.probe, Tensor):
            return self.probe[index.to(self.probe.device)]
        images = [_as_image(self.probe[i], i) for i in index.tolist()]
        stacked = torch.stack(images)
        if tuple(stacked.shape[2:]) != (self.height, self.width):
            raise ValueError(
                f"probe images differ in size: {tuple(stacked.shape[2:])} vs "
                f"{(self.height, self.width)}; every probe image needs the same size"
            )
        _check_range(stacked, "probe images")
        return stacked

    def fingerprint(self) -> str:
        """What identifies the probe in a resume state (``probe_fingerprint``)."""
        return probe_fingerprint(self.probe)


def probe_fingerprint(probe: Tensor | Dataset) -> str:
    """What identifies probe images in a resume state (the analysis's, masking's).

    Args:
        probe: a tensor (N, 3, H, W), or a Dataset of images or (image, label) pairs.

    Returns:
        A tensor's exact digest; for a Dataset its class name, length and the digest of item 0
        (hashing every item would load the whole probe once more).
    """
    if isinstance(probe, Tensor):
        return tensor_digest([probe])
    first = _as_image(probe[0], 0)
    return f"{type(probe).__name__}:{len(probe)}:{tensor_digest([first])}"


def tensor_digest(tensors: list[Tensor]) -> str:
    """sha256 of the tensors' shapes, dtypes and bytes.

    Exact, not a tolerance: a resumed run must see the very same inputs.

    Args:
        tensors: any tensors, on any device (copied to the CPU to hash).

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    for tensor in tensors:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
