"""Helpers shared by the data modules: seeds, class-count checks, class-major probe sets, and
the base class of the datamodules (loaders, probe sets)."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

SPLITS = ("train", "val")


class HasClasses(Protocol):
    """A datamodule with a class count and class names."""

    num_classes: int
    class_names: list[str]


def sub_seed(seed: int, *keys: int) -> int:
    """A well-mixed seed for one stream of a seeded datamodule (e.g. one per split).

    Args:
        seed: the datamodule's seed.
        *keys: integers >= 0 that name the stream.

    Returns:
        A 63-bit seed.
    """
    state = np.random.SeedSequence([int(seed), *keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def check_split(split: str, splits: tuple[str, ...] = SPLITS) -> int:
    """Index of a split in ``splits``.

    Args:
        split: "train" or "val" (or another of ``splits``).
        splits: the splits a datamodule has; ``SPLITS`` unless it adds some (e.g. "test").

    Returns:
        Its index in ``splits``.

    Raises:
        ValueError: any other split.
    """
    if split not in splits:
        raise ValueError(f"split must be one of {splits}, got {split!r}")
    return splits.index(split)


def check_num_classes(model_num_classes: int, datamodule: HasClasses) -> None:
    """Check that a model's output classes match the data's classes.

    Args:
        model_num_classes: the model's outputs.
        datamodule: anything with ``num_classes`` (and ideally ``class_names``), e.g.
            ``PlantedFactorDataModule`` or ``ImageFolderDataModule``.

    Raises:
        ValueError: the counts differ.
    """
    data_classes = int(datamodule.num_classes)
    if int(model_num_classes) != data_classes:
        names = getattr(datamodule, "class_names", None)
        shown = f" ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})" if names else ""
        raise ValueError(
            f"the model predicts {model_num_classes} classes but the data "
            f"{type(datamodule).__name__} has {data_classes}{shown}; set the model's "
            f"num_classes to {data_classes} or use data with {model_num_classes} classes"
        )


def first_per_class(labels: torch.Tensor, num_classes: int, n: int, what: str) -> torch.Tensor:
    """Indices of the first ``n`` items of each class, class-major.

    Args:
        labels: (N,) int64 class labels.
        num_classes: C.
        n: items per class, >= 1.
        what: the data's description, for the error message.

    Returns:
        (C * n,) int64 indices into ``labels``.

    Raises:
        ValueError: n < 1, or a class with fewer than ``n`` items (named).
    """
    if n < 1:
        raise ValueError(f"images_per_class must be >= 1, got {n}")
    picked = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        if idx.numel() < n:
            raise ValueError(
                f"{what}: class {c} has only {idx.numel()} images, {n} requested; "
                "ask for fewer images_per_class or give the split more images"
            )
        picked.append(idx[:n])
    return torch.cat(picked)


def make_loader(
    data: Dataset, batch_size: int, num_workers: int, seed: int, shuffle: bool
) -> DataLoader:
    """The datamodules' DataLoader: the shuffle order is a pure function of ``seed``.

    Args:
        data: the split's dataset.
        batch_size: images per batch.
        num_workers: loader processes (0: in the main process; persistent otherwise).
        seed: the datamodule's seed.
        shuffle: shuffle every epoch (train).

    Returns:
        The DataLoader.
    """
    generator = torch.Generator().manual_seed(sub_seed(seed, 2)) if shuffle else None
    return DataLoader(
        data,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=generator,
        persistent_workers=num_workers > 0,
    )


class LabelledSplitsDataModule(pl.LightningDataModule):
    """Base of the datamodules: a train and a val split of images with class labels.

    Subclasses set ``num_classes``, make the splits in ``setup()`` and give ``_loader(split,
    shuffle)``, ``_labels(split)`` and ``_images(split, idx)``; this class turns those into the
    Lightning loaders and ``probe_set``, the probe contract the callbacks and analyze.py rely on.
    A subclass with more splits (e.g. a held-out "test") lists them in ``splits``.
    """

    num_classes: int
    splits: tuple[str, ...] = SPLITS

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        """The DataLoader of the set-up ``split``."""
        raise NotImplementedError

    def _labels(self, split: str) -> torch.Tensor:
        """(N,) int64 labels of the set-up ``split``, in dataset order."""
        raise NotImplementedError

    def _images(self, split: str, idx: torch.Tensor) -> torch.Tensor:
        """(len(idx), 3, S, S) float32 in [0, 1]: the images at ``idx`` of the set-up ``split``."""
        raise NotImplementedError

    def more_images_hint(self, split: str) -> str:
        """How a user gives a split more images per class, for error messages.

        Args:
            split: "train", "val", or another of ``splits``.

        Returns:
            The datamodule options to change (as ``--data.<option>``) or the data to add.

        Raises:
            ValueError: an unknown split.
        """
        check_split(split, self.splits)
        return f"see the options of {type(self).__name__}"

    def class_counts(self, split: str) -> list[int]:
        """Images of each class in a split (sets up the data first).

        Args:
            split: "train", "val", or another of ``splits``.

        Returns:
            num_classes counts, in class order.

        Raises:
            ValueError: an unknown split, or data that cannot be set up.
        """
        check_split(split, self.splits)
        self.setup()
        return torch.bincount(self._labels(split), minlength=self.num_classes).tolist()

    def train_dataloader(self) -> DataLoader:
        """The shuffled train loader."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """The val loader, in dataset order."""
        return self._loader("val", shuffle=False)

    def probe_set(
        self, images_per_class: int, split: str = "val"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first images of each class of a split, loaded, class-major.

        Args:
            images_per_class: n.
            split: "train", "val", or another of ``splits``.

        Returns:
            (images (C*n, 3, S, S) float32 in [0, 1], labels (C*n,) int64); class c owns rows
            c*n ... (c+1)*n - 1. Deterministic from the seed.

        Raises:
            ValueError: an unknown split, n < 1, or a class with fewer than n images.
        """
        check_split(split, self.splits)
        self.setup()
        labels = self._labels(split)
        idx = first_per_class(labels, self.num_classes, images_per_class, f"{split} split")
        return self._images(split, idx), labels[idx]
