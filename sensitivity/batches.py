"""Batches of an analysis: whole design blocks, decoded, with their probe images.

Item i of a ``BatchSource`` is batch i of this rank's shard: the design rows of its blocks, their
decoded parameters, each probe image they show (loaded once per batch) and which rows are the
distinct augmented images (each is augmented once; with deduplication, also forwarded once).
It runs in DataLoader workers when num_workers > 0, so only numpy and CPU torch: no device work
here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from sensitivity.decoded import DecodedRows
from sensitivity.designs import Design, PermutationDesign, ShapleyDesign, SobolDesign
from sensitivity.probe import ProbeImages
from sensitivity.problem import AugmentationProblem


@dataclass
class Batch:
    """One batch of whole design blocks [start, stop), ready for the device.

    Attributes:
        start, stop: the block range.
        rows: (R, d) float64 design rows.
        decoded: their parameters.
        images: (U, 3, H, W) the unique probe images of the batch.
        inverse: (R,) int64 row -> index into ``images``.
        permutations: (stop - start, G) int64 group orders (Shapley designs) or None.
        replicate: (stop - start,) int64 replicate of each block (replicated Sobol') or None.
        distinct, copies: (F,) int64 the rows whose augmented images are distinct (first
            occurrences, in row order) and (R,) int64 row -> index into them (``distinct_rows``).
        deduplicate: forward the distinct rows only (``EngineConfig.deduplicate``), else every
            row (the distinct images copied).
    """

    start: int
    stop: int
    rows: np.ndarray
    decoded: DecodedRows
    images: Tensor
    inverse: Tensor
    permutations: Tensor | None
    replicate: Tensor | None
    distinct: Tensor
    copies: Tensor
    deduplicate: bool

    def pin_memory(self) -> Batch:
        """Page-locked images for asynchronous copies (DataLoader pin_memory)."""
        return dataclasses.replace(self, images=self.images.pin_memory())

    def distinct_images(self) -> tuple[Tensor, DecodedRows]:
        """The distinct augmented images to make.

        Returns:
            ((F,) int64 indices into ``images``, the decoded parameters of those F rows).
        """
        return self.inverse[self.distinct], self.decoded.select(self.distinct)


class BatchSource(Dataset):
    """Item i = batch i: rows of blocks [start, stop), decoded, with their unique probe images.

    Args:
        design: the analysis's design.
        problem: decodes the rows.
        probe: loads the probe images.
        batches: the block ranges [start, stop) of the batches (``batch_ranges``).
        deduplicate: forward each distinct augmented image once (they are augmented once
            either way).
    """

    def __init__(
        self,
        design: Design,
        problem: AugmentationProblem,
        probe: ProbeImages,
        batches: list[tuple[int, int]],
        deduplicate: bool = False,
    ) -> None:
        self.design, self.problem, self.probe, self.batches = design, problem, probe, batches
        self.with_permutations = isinstance(design, ShapleyDesign | PermutationDesign)
        self.deduplicate = deduplicate

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Batch:
        start, stop = self.batches[i]
        rows = self.design.rows(start, stop)
        decoded = self.problem.decode(rows, self.probe.height, self.probe.width)
        index = decoded.image_index
        if decoded.partition is not None:
            index = index + decoded.partition * self.probe.n_images
        # Rows of a batch share few images (A and AB_j rows share theirs by design): load each
        # once and expand on the device.
        unique, inverse = torch.unique(index, return_inverse=True)
        permutations = (
            torch.from_numpy(self.design.permutations(start, stop))
            if self.with_permutations
            else None
        )
        replicate = (
            torch.from_numpy(self.design.replicate_of(start, stop))
            if isinstance(self.design, SobolDesign) and self.design.replicates > 1
            else None
        )
        distinct, copies = distinct_rows(decoded, index)
        return Batch(
            start, stop, rows, decoded, self.probe.load(unique), inverse, permutations,
            replicate, distinct, copies, self.deduplicate,
        )


def distinct_rows(decoded: DecodedRows, image: Tensor) -> tuple[Tensor, Tensor]:
    """Rows whose augmented images are identical, from what determines them (METHOD.md s. 2-3).

    A row's image is a function of its probe image, the active augmentations in their relative
    application order, their parameters, and nothing else: switched-off augmentations' values
    and the positions of inactive augmentations in the order do not matter.

    Args:
        decoded: the batch's decoded rows (R rows).
        image: (R,) int64 probe index of each row (partition included).

    Returns:
        (distinct, copies): (F,) int64 the first row of each distinct image, ascending; (R,)
        int64 each row's index into ``distinct``.
    """
    active = decoded.active
    # rank[r, a] = number of active augmentations applied before a in row r (-1: a is off)
    in_order = torch.gather(active, 1, decoded.order).long()
    rank = torch.empty_like(in_order).scatter_(1, decoded.order, in_order.cumsum(1) - 1)
    columns = [image.double()[:, None], torch.where(active, rank, -1).double()]
    for a, params in enumerate(decoded.params.values()):
        for value in params.values():
            columns.append(torch.where(active[:, a], value.double(), 0.0)[:, None])
    _, inverse = torch.unique(torch.cat(columns, 1), dim=0, return_inverse=True)
    rows = torch.arange(len(image))
    first = torch.full((int(inverse.max()) + 1,), len(image)).scatter_reduce(
        0, inverse, rows, "amin"
    )
    distinct, order = torch.sort(first)
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order))
    return distinct, position[inverse]


def batch_ranges(start: int, stop: int, per_batch: int, resume_at: int) -> list[tuple[int, int]]:
    """The batches of a shard, from ``resume_at`` on.

    Boundaries are start + k * per_batch whatever ``resume_at``, so a resumed run adds the same
    batches (and the same sums) as an uninterrupted one.

    Args:
        start, stop: the shard's blocks [start, stop).
        per_batch: blocks per batch.
        resume_at: the first block not yet done (``start`` for a fresh run).

    Returns:
        Block ranges [a, b), in order.
    """
    return [(a, min(a + per_batch, stop)) for a in range(resume_at, stop, per_batch)]


def _keep(item: Batch) -> Batch:
    """The DataLoader's collate function: items already are whole batches."""
    return item


def batch_loader(source: BatchSource, num_workers: int, pin_memory: bool) -> DataLoader:
    """The batches of ``source`` in order, prepared in ``num_workers`` worker processes.

    Args:
        source: the batches.
        num_workers: 0 prepares each batch in this process when it is needed.
        pin_memory: page-locked images, for asynchronous copies to CUDA.

    Returns:
        A DataLoader yielding ``Batch`` items.
    """
    return DataLoader(
        source,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_keep,
        pin_memory=pin_memory,
    )
