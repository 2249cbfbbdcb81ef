"""Per-row augmentation pipelines, batched: what ``AugmentationProblem.augment`` runs.

Every row of a batch has its own switched-on augmentations, its own order and its own
parameters. For each position in the order and each augmentation, the rows with that
augmentation at that position (and switched on) are augmented together by one
``augmentations.apply`` call: at most K^2 batched calls for K augmentations, never a loop over
rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from sensitivity import augmentations as augs

CPU_BLOCK_BYTES = 4 * 2**20
"""Size of the row blocks ``compose`` works through on the CPU (4 MiB: 6 images at 224 px, 85
at 64 px). A whole batch streams every intermediate tensor through main memory, which on CPU
costs more than the arithmetic of the pointwise augmentations (docs/PERFORMANCE.md,
"Augmentations")."""


def compose(
    images: Tensor,
    names: Sequence[str],
    order: Tensor,
    active: Tensor,
    params: Mapping[str, Mapping[str, Tensor]],
) -> Tensor:
    """Apply each row's switched-on augmentations in that row's order, batched.

    On the CPU the rows go through in blocks of about ``CPU_BLOCK_BYTES`` of images, so that the
    intermediate tensors of all K^2 calls stay in cache; results do not depend on blocking.

    Args:
        images: (R, 3, H, W) float in [0, 1]; not modified.
        names: the K augmentations, in problem order.
        order: (R, K) int64 augmentation indices in application order (a permutation per row).
        active: (R, K) bool, whether augmentation a is switched on in row r.
        params: {augmentation: {parameter: (R,) tensor}} in natural units at H x W.

    Returns:
        (R, 3, H, W) augmented images, the input dtype and device.

    Raises:
        ValueError: images or parameters that ``augmentations.validate`` refuses.
    """
    validated = augs.validate(images, params)  # once for all K^2 calls below
    # Which rows take which augmentation is decided on the CPU: tests of device tensors
    # would stall an accelerator's queue once per (position, augmentation).
    order, active = order.cpu(), active.cpu()
    blocks = _cache_blocks(images)
    if len(blocks) == 1:
        return _compose_block(images, names, order, active, validated)
    out = torch.empty_like(images)
    for rows in blocks:
        out[rows] = _compose_block(
            images[rows],
            names,
            order[rows],
            active[rows],
            {a: {p: t[rows] for p, t in ps.items()} for a, ps in validated.items()},
        )
    return out


def _compose_block(
    images: Tensor,
    names: Sequence[str],
    order: Tensor,
    active: Tensor,
    params: dict[str, dict[str, Tensor]],
) -> Tensor:
    """``compose`` on rows whose images and validated (float64, on device) params are given."""
    out = images.clone()
    for position in range(len(names)):
        at_position = order[:, position]
        for a, name in enumerate(names):
            selected = active[:, a] & (at_position == a)
            if bool(selected.all()):
                out = augs.apply(name, out, params[name], validated=True)
            elif bool(selected.any()):
                index = selected.nonzero().squeeze(1).to(images.device, non_blocking=True)
                out[index] = augs.apply(
                    name,
                    out[index],
                    {p: t[index] for p, t in params[name].items()},
                    validated=True,
                )
    return out


def _cache_blocks(images: Tensor) -> list[slice]:
    """Row slices of ``images`` (R, 3, H, W): blocks of ``CPU_BLOCK_BYTES`` on CPU, else one."""
    rows = images.shape[0]
    if images.device.type != "cpu" or rows == 0:
        return [slice(0, rows)]
    step = max(1, CPU_BLOCK_BYTES // (images[0].numel() * images.element_size()))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]
