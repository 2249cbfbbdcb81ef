"""The forwards of a masking evaluation, in the order they run: which rows of which input set
go through the masked part of the network under which passes.

Per batch of probe images and input set (R rows: the images, or k draws of each) the prefix
runs once; then the passes of the input set's plan run as suffix forwards of at most
``batch_rows`` rows:

- R < batch_rows: up to batch_rows // R consecutive passes (plan indices p, p + 1, ...) whose
  masks are ``FactorMask`` or None run as one forward over that many copies of the R rows,
  each copy with its own mask (``masks.stacked_mask``): one forward instead of several small
  ones, which a GPU needs to be busy;
- R >= batch_rows: each pass runs over row ranges of batch_rows rows: on a CPU large batches
  are slower per image (ResNet18 at 64 px from its stem, one thread: about 21 ms per image at
  8 rows, 33 ms at 64; ``bench/bench_masking.py``);
- ``batch_rows`` 0, or a network whose cached prefix values cannot be sliced or repeated
  (``MaskedNetwork.batchable``): one forward per pass over all R rows.

A mask multiplies each copy exactly as it multiplies a lone batch (x * 1 = x for unmasked
copies), and the counts are integers, so the grouping changes the speed, not the counts. The
forwards are numbered in order from 0: a resumed evaluation skips the ones a saved state holds.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import torch

from sensitivity.masking.masks import FactorMask, PlanItem, stacked_mask
from sensitivity.masking.network import Mask

# Rows per suffix forward when not given (``default_batch_rows``).
CPU_BATCH_ROWS = 8
GPU_BATCH_ROWS = 256


def default_batch_rows(device: torch.device) -> int:
    """Rows per suffix forward on ``device``: 8 on a CPU (measured fastest per image, module
    docstring), 256 on an accelerator (large batches fill it; about 3 GB of activations for
    ResNet18 at 224 px)."""
    return CPU_BATCH_ROWS if device.type == "cpu" else GPU_BATCH_ROWS


@dataclass(frozen=True)
class Forward:
    """One suffix forward.

    Attributes:
        input_set: the input set (0: the originals).
        start, stop: its rows [start, stop) of the input set's R rows in the image batch.
        first: the plan index of its first pass; its passes are first, first + 1, ...
        copies: n, the passes run as n copies of the rows.
        mask: the mask of the forward (stacked over the copies), None for unmasked.
    """

    input_set: int
    start: int
    stop: int
    first: int
    copies: int
    mask: Mask | None

    @property
    def image_forwards(self) -> int:
        """Rows through the suffix: copies x (stop - start)."""
        return self.copies * (self.stop - self.start)


def _stackable(item: PlanItem) -> bool:
    return item[1] is None or isinstance(item[1], FactorMask)


def pass_groups(plan: Sequence[PlanItem], size: int) -> list[list[PlanItem]]:
    """The plan's passes in order, in groups of at most ``size`` that one forward can run:
    consecutive plan indices, every mask a ``FactorMask`` or None; other passes alone."""
    groups: list[list[PlanItem]] = []
    for item in plan:
        last = groups[-1] if groups else None
        if (last is not None and len(last) < size and _stackable(item)
                and _stackable(last[-1]) and item[0] == last[-1][0] + 1):
            last.append(item)
        else:
            groups.append([item])
    return groups


class Schedule:
    """Every suffix forward of a rank's probe images, image batch by image batch.

    Args:
        plans: per input set, its passes [(plan index, mask or None)].
        set_rows: rows of input set i per probe image (1 for the originals, k for augmented
            sets).
        images: (start, stop), the rank's probe images.
        batch_images: probe images per batch (>= 1).
        batch_rows: the most rows of a suffix forward (module docstring); 0: one forward per
            pass over the input set's rows.
        batchable: whether the network's prefix state can be sliced and repeated.

    Attributes:
        batches: [(first image, stop image, its forwards)] in order.
        total: forwards in all; image_forwards: rows through the suffix in all.
    """

    def __init__(
        self,
        plans: Sequence[Sequence[PlanItem]],
        set_rows: Sequence[int],
        images: tuple[int, int],
        batch_images: int,
        batch_rows: int,
        batchable: bool,
    ) -> None:
        if batch_images < 1:
            raise ValueError(f"batch_images must be >= 1, got {batch_images}")
        if batch_rows < 0:
            raise ValueError(f"batch_rows must be >= 0 (0: no limit), got {batch_rows}")
        self._stacked: dict[tuple[int, ...], Mask | None] = {}
        self.batches: list[tuple[int, int, list[Forward]]] = []
        start, stop = images
        for first in range(start, stop, batch_images):
            last = min(first + batch_images, stop)
            forwards = [
                forward
                for i, (plan, per_image) in enumerate(zip(plans, set_rows, strict=False))
                for forward in self._forwards(i, plan, per_image * (last - first),
                                              batch_rows if batchable else 0)
            ]
            self.batches.append((first, last, forwards))
        self.total = sum(len(forwards) for *_, forwards in self.batches)
        self.image_forwards = sum(f.image_forwards for *_, fs in self.batches for f in fs)

    def _forwards(
        self, i: int, plan: Sequence[PlanItem], rows: int, batch_rows: int
    ) -> list[Forward]:
        """The forwards of input set i's ``rows`` rows in one image batch."""
        if not plan or rows == 0:
            return []
        if batch_rows == 0:
            return [Forward(i, 0, rows, index, 1, mask) for index, mask in plan]
        if rows >= batch_rows:
            return [Forward(i, a, min(a + batch_rows, rows), index, 1, mask)
                    for index, mask in plan for a in range(0, rows, batch_rows)]
        return [Forward(i, 0, rows, group[0][0], len(group), self._mask(group))
                for group in pass_groups(plan, batch_rows // rows)]

    def _mask(self, group: Sequence[PlanItem]) -> Mask | None:
        """The mask of a group's forward, stacked once per distinct group."""
        if len(group) == 1:
            return group[0][1]
        key = tuple(id(mask) for _, mask in group)
        if key not in self._stacked:
            # pass_groups groups only FactorMask and None masks
            masks = [cast(FactorMask | None, mask) for _, mask in group]
            self._stacked[key] = stacked_mask(masks)
        return self._stacked[key]

    def done_before(self, number: int) -> int:
        """Rows through the suffix in the forwards before forward ``number``."""
        forwards = [f for *_, fs in self.batches for f in fs]
        return sum(f.image_forwards for f in forwards[:number])

    def pending(self, number: int) -> Iterator[tuple[int, int, list[tuple[int, Forward]]]]:
        """The image batches that still have forwards from forward ``number`` on.

        Yields:
            (first image, stop image, [(forward number, forward)]).
        """
        counted = 0
        for first, last, forwards in self.batches:
            numbered = [(counted + j, f) for j, f in enumerate(forwards)
                        if counted + j >= number]
            counted += len(forwards)
            if numbered:
                yield first, last, numbered
