"""The treatment-control design: each augmentation alone against the original image
(METHOD.md section 7)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sensitivity.problem import AugmentationProblem

from sensitivity.designs.base import Design, _check_int


class ContrastDesign(Design):
    """Treatment-control design: each augmentation alone against the original image (section 7).

    Block b = one probe image: row 0 the original image (every augmentation off), then for each
    augmentation a in problem order K rows with only a switched on and all parameters drawn afresh
    (1 + A*K rows). Parameter and order columns are uniform draws of
    ``np.random.default_rng([seed, b])`` (order is irrelevant with one augmentation on).

    Encoding: a switch column holds (1 + p_on) / 2 for "off" and p_on / 2 for "on", the middles of
    the off and on regions of ``u < p_on``, so decoding is exact whatever p_on is. An augmentation
    with p_on = 1 has no switch column and is always on, so no row can show the original image:
    such a problem is rejected; use ``problem.with_p_on(0.5)`` (any p_on < 1 gives the same
    design, since switches are set here, not drawn).

    Block b shows probe image b (class-major: class b // images_per_class); with a partition
    auxiliary, blocks [0, n_images) use split 0 and [n_images, 2 n_images) split 1.

    Args:
        problem: the problem whose columns the rows fill.
        n_images: probe images (blocks per split), at most ``problem.n_images``.
        k: rows per augmentation in a block, >= 1.
        seed: >= 0.

    Raises:
        ValueError: an augmentation without a switch column (p_on = 1), n_images above the
            problem's, or non-positive counts.
    """

    def __init__(self, problem: AugmentationProblem, n_images: int, k: int, seed: int = 0) -> None:
        always_on = [a for a in problem.augmentations if problem.switch_columns[a] is None]
        if always_on:
            raise ValueError(
                f"ContrastDesign needs a switch column for every augmentation to encode the "
                f"original image, but {always_on} have p_on = 1 (always on, switch column "
                f"dropped); build the problem with p_on < 1, e.g. problem.with_p_on(0.5) - the "
                f"contrast design sets switches itself, so the value does not matter"
            )
        self.problem = problem
        self.n_images = _check_int("n_images", n_images, 1)
        if self.n_images > problem.n_images:
            raise ValueError(
                f"n_images={n_images} exceeds the problem's {problem.n_images} probe images "
                f"(n_classes * images_per_class)"
            )
        self.k = _check_int("k", k, 1)
        self.seed = _check_int("seed", seed, 0)
        self.d = problem.d
        self.groups = problem.group_columns
        n_partitions = 2 if "partition" in problem.auxiliaries else 1
        self.n_blocks = self.n_images * n_partitions
        self.block_size = 1 + len(problem.augmentations) * self.k

    def _switches(self) -> np.ndarray:
        """(block_size, d) float with the switch values of a block, NaN elsewhere."""
        p = self.problem
        out = np.full((self.block_size, self.d), np.nan)
        for a, name in enumerate(p.augmentations):
            column, p_on = p.switch_columns[name], p.p_on[name]
            out[:, column] = (1.0 + p_on) / 2.0
            out[1 + a * self.k : 1 + (a + 1) * self.k, column] = p_on / 2.0
        return out

    def _rows(self, start: int, stop: int) -> np.ndarray:
        """Blocks [start, stop): uniform draws with switches and probe cells set."""
        p = self.problem
        blocks = np.stack(
            [
                np.random.default_rng([self.seed, b]).random((self.block_size, self.d))
                for b in range(start, stop)
            ]
        )
        switches = self._switches()
        blocks = np.where(np.isnan(switches)[None], blocks, switches[None])
        index = np.arange(start, stop)
        image = index % self.n_images
        # Middle of each decoding cell, so floor(u * n) recovers the index exactly.
        centres = {
            "class": (image // p.images_per_class + 0.5) / p.n_classes,
            "image": (image % p.images_per_class + 0.5) / p.images_per_class,
            "partition": (index // self.n_images + 0.5) / 2.0,
        }
        for group in p.groups:
            if group.kind in centres:
                blocks[:, :, group.columns[0]] = centres[group.kind][:, None]
        return blocks.reshape(-1, self.d)

    def row_kinds(self) -> list[str]:
        """"original", then "<augmentation>_i" for i < k per augmentation."""
        return ["original"] + [
            f"{name}_{i}" for name in self.problem.augmentations for i in range(self.k)
        ]
