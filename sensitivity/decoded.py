"""Design rows decoded into what augments an image: DecodedRows, and the Lehmer code of orders."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class DecodedRows:
    """Design rows decoded at one image size; R rows, K augmentations (problem order).

    Attributes:
        image_index: (R,) int64 index into the probe set (class-major: class c owns images
            c * images_per_class ... (c + 1) * images_per_class - 1); within ``partition``.
        class_index: (R,) int64.
        partition: (R,) int64 in {0, 1}, or None.
        order: (R, K) int64 augmentation indices in application order (a permutation per row).
        active: (R, K) bool, active[r, a] iff augmentation a is switched on in row r.
        params: {augmentation: {parameter: (R,) tensor}} in natural units at the decoded size
            (pixels, degrees, factors); float32, or int64 for integer parameters. Values of
            switched-off augmentations are decoded too but never used.
    """

    image_index: Tensor
    class_index: Tensor
    partition: Tensor | None
    order: Tensor
    active: Tensor
    params: dict[str, dict[str, Tensor]]

    def __len__(self) -> int:
        return int(self.image_index.shape[0])

    def select(self, rows: slice | Tensor) -> DecodedRows:
        """A subset of the rows.

        Args:
            rows: a slice (the result holds views), or an (R',) int64 or (R,) bool index
                (copies).

        Returns:
            The selected rows.
        """
        return DecodedRows(
            image_index=self.image_index[rows],
            class_index=self.class_index[rows],
            partition=None if self.partition is None else self.partition[rows],
            order=self.order[rows],
            active=self.active[rows],
            params={a: {p: t[rows] for p, t in ps.items()} for a, ps in self.params.items()},
        )

    def to(self, device: torch.device | str) -> DecodedRows:
        """A copy with every tensor on another device.

        Args:
            device: the target device.

        Returns:
            The rows on ``device``.
        """
        return DecodedRows(
            image_index=self.image_index.to(device),
            class_index=self.class_index.to(device),
            partition=None if self.partition is None else self.partition.to(device),
            order=self.order.to(device),
            active=self.active.to(device),
            params={
                a: {p: t.to(device) for p, t in ps.items()} for a, ps in self.params.items()
            },
        )


def lehmer_permutations(codes: np.ndarray, k: int) -> np.ndarray:
    """Permutations of range(k) with lexicographic ranks ``codes``.

    Args:
        codes: (R,) int Lehmer codes in [0, k!).
        k: the permutations' length.

    Returns:
        (R, k) int64.
    """
    codes = np.asarray(codes, dtype=np.int64).copy()
    remaining = np.tile(np.arange(k, dtype=np.int64), (codes.shape[0], 1))
    out = np.empty((codes.shape[0], k), dtype=np.int64)
    rows = np.arange(codes.shape[0])
    for position in range(k):
        radix = math.factorial(k - 1 - position)
        digit, codes = np.divmod(codes, radix)
        out[:, position] = remaining[rows, digit]
        keep = remaining != out[:, position : position + 1]
        remaining = remaining[keep].reshape(codes.shape[0], k - 1 - position)
    return out


def cell_index(u: np.ndarray, n: int) -> np.ndarray:
    """floor(u * n) as int64, kept below n against rounding at u -> 1."""
    return np.minimum(np.floor(u * n).astype(np.int64), n - 1)
