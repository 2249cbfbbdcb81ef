"""Training-time suppression (issue #18): fine-tune with nuisance-sensitive units suppressed,
and the baselines it is compared with.

- ``finetune_with_suppression``: the units a stored analysis found sensitive to a nuisance
  (``top_units``) are masked (``selection_mask``, applied by ``MaskedNetwork``'s hooks) during
  fine-tuning and stay masked in the returned model (``SuppressedModel``). ``train="head"``
  retrains the classification layer only, on the suppressed features; ``train="all"`` the whole
  network.
- ``finetune_with_augmentation``: plain fine-tuning with the nuisance augmentation applied to
  every training batch at a random strength within its bounds.
- ``finetune_with_penalty``: whole-network fine-tuning, no mask, with a loss term ``weight`` x
  the nuisance-attributable variance of the selected units, estimated from pairs (image, image
  with the nuisance switched on): var = (a - a')^2 / 4 per unit.

All three share one loop (``_finetune``): the same batches for the same seed
(``training_batches``), the same optimiser (AdamW, no weight decay, constant learning rate) and
the same step count, so that their results compare. Each returns the model and a
``FinetuneRecord`` (steps, lr, train-loss curve). ``evaluate`` measures accuracy with the
nuisance applied at a fixed fraction of its range (``distort``, the inference-time
suppression's ``NuisanceDistortion``). Everything runs on CPU and is
deterministic given the seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from data.common import sub_seed
from sensitivity.augmentations import apply, augmentation_spec
from sensitivity.capture import model_device
from sensitivity.distortion import VAL_STREAM, NuisanceDistortion
from sensitivity.masking.masks import map_placement, top_units_mask
from sensitivity.masking.network import Mask, MaskedNetwork, layer_outputs
from sensitivity.masking.stored import masking_maps
from sensitivity.results import AnalysisResult

TRAIN_MODES = ("head", "all")
OPTIMIZER = "adamw"

# Sub-seed streams of one fine-tuning seed: batch order, augmentation parameters.
_BATCHES, _AUGMENT = 0, 1


@dataclass
class FinetuneRecord:
    """What a fine-tuning did.

    Attributes:
        method: "suppression", "augmentation" or "penalty".
        train: "head" or "all".
        steps: optimiser steps taken.
        lr: the (constant) learning rate.
        seed: the seed of the batch order and of the augmentation parameters.
        optimizer: the optimiser's name (``OPTIMIZER``).
        batch_size: images per step.
        trained: names of the parameters the optimiser updated.
        losses: (steps,) the training loss of each step (penalty included, if any).
        penalties: (steps,) the penalty term of each step (``finetune_with_penalty`` only).
    """

    method: str
    train: str
    steps: int
    lr: float
    seed: int
    optimizer: str
    batch_size: int
    trained: list[str]
    losses: list[float] = field(default_factory=list)
    penalties: list[float] = field(default_factory=list)


class SuppressedModel(nn.Module):
    """``model`` with ``mask`` applied at its layers on every forward (training and inference).

    The hooks exist only during a forward (``MaskedNetwork`` as a context), so ``model`` itself
    stays unmasked when called directly.

    Args:
        model: ``model(x)`` maps images (B, 3, H, W) in [0, 1] to logits (B, K).
        mask: {layer: function of the layer's output} (``selection_mask``, ``factor_mask``);
            layers named under ``layer_root``.
        layer_root: where the layers are named (default ``model.net`` or ``model``).
    """

    def __init__(self, model: nn.Module, mask: Mask, layer_root: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.mask = dict(mask)
        # No fx split: fine-tuning needs plain forwards with gradients through the masks.
        self.network = MaskedNetwork(model, list(self.mask), reuse_prefix=False,
                                     layer_root=layer_root)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, K) of images ``x`` (B, 3, H, W) with the mask applied."""
        with self.network:
            return self.network.forward(x, self.mask)


def top_units(
    result: AnalysisResult,
    model: nn.Module,
    image_size: tuple[int, int],
    variable: str,
    layer: str,
    count: int,
    value: str | None = None,
) -> dict[str, Tensor]:
    """The ``count`` units of ``layer`` most sensitive to ``variable``, placed in its output.

    Args:
        result: a sobol or shapley analysis that analysed ``layer``.
        model: the analysed network (one dry forward finds the layer's output shape).
        image_size: (H, W) of the analysis's probe, in pixels.
        variable: an analysed variable (e.g. "hue").
        layer: the layer to select units of.
        count: how many units (``top_units_mask``: flagged units are never chosen).
        value: the map's value type (default ST, else shapley_normalized).

    Returns:
        {layer: bool tensor} broadcastable to the layer's output per image, e.g. (C, 1, 1)
        for a channel-mean map of an NCHW layer, on the model's device: ``selection_mask``'s
        input.
    """
    maps = masking_maps(result, model, image_size, value=value, layers=[layer],
                        augmentations=[variable])
    values = maps.maps[layer][result.group_names.index(variable)]
    chosen = top_units_mask(values, count, maps.valid[layer])
    layouts = {name: unit.layout for name, unit in maps.layouts.items()}
    shapes, found = layer_outputs(model, [layer], image_size, layouts=layouts)
    placement = map_placement(layer, chosen.shape, shapes[layer], found[layer],
                              maps.layouts.get(layer))
    device = model_device(model)[0]
    return {layer: placement.place(torch.as_tensor(chosen, device=device), False)}


def head_name(model: nn.Module) -> str:
    """The classification layer: the last ``nn.Linear`` in module order (``fc``, ``net.fc``,
    ``net.classifier.6``, ``net.heads.head``); ValueError when there is none."""
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head; pass head=<module name>")
    return linear[-1]


def training_batches(
    datamodule: Any, steps: int, seed: int, batch_size: int | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """``steps`` shuffled training batches, the same for the same seed (epochs repeat as needed).

    Args:
        datamodule: any datamodule; its ``train_dataloader().dataset`` yields (image, label).
        steps: batches to yield.
        seed: seeds the shuffle (independent of the datamodule's own seed).
        batch_size: default the datamodule's ``batch_size`` (else 64).

    Yields:
        (images (B, 3, H, W) float in [0, 1], labels (B,) int64).
    """
    dataset = datamodule.train_dataloader().dataset
    size = batch_size or getattr(datamodule, "batch_size", 64)
    generator = torch.Generator().manual_seed(sub_seed(seed, _BATCHES))
    loader = DataLoader(dataset, batch_size=size, shuffle=True, generator=generator)
    done = 0
    while done < steps:
        for batch in loader:
            yield batch[0], batch[1]
            done += 1
            if done == steps:
                return


def random_parameters(
    augmentation: str, count: int, image_size: tuple[int, int], generator: torch.Generator
) -> dict[str, Tensor]:
    """Parameters drawn uniformly within the augmentation's bounds at ``image_size``.

    Args:
        augmentation: a registered augmentation.
        count: B, the images.
        image_size: (H, W) in pixels.
        generator: the CPU generator to draw from.

    Returns:
        {parameter: (B,) float64}; integer parameters rounded.
    """
    spec = augmentation_spec(augmentation)
    params = {}
    for param, (low, high) in zip(spec.params, spec.bounds(*image_size), strict=True):
        draw = low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float64)
        params[param.name] = draw.round() if param.integer else draw
    return params


def distort(images: Tensor, augmentation: str, strength: float, seed: int = 0) -> Tensor:
    """Images with the nuisance at a fixed fraction of its range (hue: a shift of +-s x 0.5).

    The inference-time suppression's distortion (``sensitivity.distortion.NuisanceDistortion``,
    its validation stream), so that both measure the same thing: parameters move from their
    identity by ``strength`` times the distance to one end of the bounds (a coin per image);
    augmentations without identity values are blended, x + s (aug(x) - x).

    Args:
        images: (N, 3, H, W) float in [0, 1], a whole split (image i gets the draws of index i).
        augmentation: a registered augmentation.
        strength: s in [0, 1].
        seed: the draws' seed.

    Returns:
        (N, 3, H, W) distorted images (``images`` themselves for s = 0).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    distortion = NuisanceDistortion(augmentation, seed)
    return distortion(images, strength, VAL_STREAM, torch.arange(images.shape[0]))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    distortion: str | None = None,
    strength: float = 0.0,
    seed: int = 0,
    batch_size: int = 256,
) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on images, optionally distorted (``distort``).

    Args:
        model: images (B, 3, H, W) in [0, 1] -> logits (B, K).
        images: (N, 3, H, W) float in [0, 1].
        labels: (N,) int64.
        distortion: an augmentation name, or None for the images as they are.
        strength: s in [0, 1] of ``distort``.
        seed: the sides of ``distort``.
        batch_size: images per forward.

    Returns:
        The fraction of correct predictions.
    """
    device = model_device(model)[0]
    if distortion is not None:
        images = distort(images, distortion, strength, seed)
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        logits = model(images[start:start + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == labels[start:start + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, images.shape[0])


# Per step: (model, images, labels) -> (loss, penalty or None).
StepLoss = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor | None]]


def _cross_entropy(model: nn.Module, images: Tensor, labels: Tensor) -> tuple[Tensor, None]:
    return nn.functional.cross_entropy(model(images), labels), None


def _finetune(
    model: nn.Module,
    datamodule: Any,
    record: FinetuneRecord,
    step_loss: StepLoss,
    head: str | None,
) -> nn.Module:
    """The loop every variant shares: ``record.steps`` AdamW steps on ``training_batches``.

    ``record.train`` "head": only the head's parameters get gradients and the rest of the
    network stays in eval mode, so batch-norm statistics do not move either. The
    ``requires_grad`` flags are restored afterwards. Fills ``record.trained``, ``losses`` and
    ``penalties``; returns ``model`` in eval mode.
    """
    if record.train not in TRAIN_MODES:
        raise ValueError(f"train must be one of {list(TRAIN_MODES)}, got {record.train!r}")
    if record.steps < 1 or record.lr <= 0:
        raise ValueError(f"need steps >= 1 and lr > 0, got {record.steps} and {record.lr}")
    torch.manual_seed(record.seed)  # dropout and other random layers, if any
    base = model.model if isinstance(model, SuppressedModel) else model
    named = dict(base.named_parameters())
    if record.train == "head":
        prefix = f"{head or head_name(base)}."
        named = {name: p for name, p in named.items() if name.startswith(prefix)}
    flags = {p: p.requires_grad for p in base.parameters()}
    for p in base.parameters():
        p.requires_grad_(False)
    for p in named.values():
        p.requires_grad_(True)
    record.trained = list(named)
    optimizer = torch.optim.AdamW(named.values(), lr=record.lr, weight_decay=0.0)
    device = model_device(base)[0]
    try:
        model.train(record.train == "all")
        if record.train == "head":
            dict(base.named_modules())[prefix[:-1]].train()
        for images, labels in training_batches(datamodule, record.steps, record.seed,
                                               record.batch_size):
            loss, penalty = step_loss(model, images.to(device), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            record.losses.append(float(loss.detach()))
            if penalty is not None:
                record.penalties.append(float(penalty.detach()))
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return model.eval()


def _record(method: str, datamodule: Any, train: str, steps: int, lr: float, seed: int,
            batch_size: int | None) -> FinetuneRecord:
    size = batch_size or getattr(datamodule, "batch_size", 64)
    return FinetuneRecord(method, train, steps, lr, seed, OPTIMIZER, size, [])


def finetune_with_suppression(
    model: nn.Module,
    masks: Mask,
    datamodule: Any,
    steps: int,
    lr: float,
    seed: int,
    train: str = "head",
    *,
    head: str | None = None,
    batch_size: int | None = None,
    layer_root: nn.Module | None = None,
) -> tuple[SuppressedModel, FinetuneRecord]:
    """Fine-tune ``model`` (in place) with ``masks`` applied; they stay applied afterwards.

    Args:
        model: images (B, 3, H, W) in [0, 1] -> logits (B, K).
        masks: {layer: function of its output}, e.g. ``selection_mask(top_units(...), 0.0)``.
        datamodule: its train split is the fine-tuning data (``training_batches``).
        steps: optimiser steps.
        lr: AdamW's learning rate (constant, no weight decay).
        seed: batch order.
        train: "head" (only ``head``'s parameters change) or "all".
        head: the classification layer's module name (default ``head_name``).
        batch_size: images per step (default the datamodule's).
        layer_root: where the masked layers are named (default ``model.net`` or ``model``).

    Returns:
        (the fine-tuned ``SuppressedModel`` in eval mode, its record).
    """
    suppressed = SuppressedModel(model, masks, layer_root)
    record = _record("suppression", datamodule, train, steps, lr, seed, batch_size)
    _finetune(suppressed, datamodule, record, _cross_entropy, head)
    return suppressed, record


def finetune_with_augmentation(
    model: nn.Module,
    datamodule: Any,
    augmentation: str = "hue",
    steps: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    train: str = "all",
    *,
    head: str | None = None,
    batch_size: int | None = None,
) -> tuple[nn.Module, FinetuneRecord]:
    """Fine-tune ``model`` (in place) with ``augmentation`` on every training batch.

    Each image gets parameters drawn uniformly within the augmentation's bounds
    (``random_parameters``) from a generator seeded by ``seed``; batches, optimiser and steps
    are those of ``finetune_with_suppression`` for the same arguments.

    Args:
        model: images (B, 3, H, W) in [0, 1] -> logits (B, K).
        datamodule: its train split is the fine-tuning data.
        augmentation: the nuisance, a registered augmentation.
        steps, lr, seed, train, head, batch_size: as ``finetune_with_suppression``.

    Returns:
        (``model`` fine-tuned, in eval mode; its record).
    """
    generator = torch.Generator().manual_seed(sub_seed(seed, _AUGMENT))

    def step_loss(net: nn.Module, images: Tensor, labels: Tensor) -> tuple[Tensor, None]:
        params = random_parameters(augmentation, images.shape[0], images.shape[-2:], generator)
        return _cross_entropy(net, apply(augmentation, images, params), labels)

    record = _record("augmentation", datamodule, train, steps, lr, seed, batch_size)
    return _finetune(model, datamodule, record, step_loss, head), record


def finetune_with_penalty(
    model: nn.Module,
    selected: Mapping[str, Tensor],
    datamodule: Any,
    augmentation: str = "hue",
    weight: float = 1.0,
    steps: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    *,
    batch_size: int | None = None,
    layer_root: nn.Module | None = None,
) -> tuple[nn.Module, FinetuneRecord]:
    """Fine-tune the whole ``model`` (in place), penalising the selected units' nuisance variance.

    Per step the batch x and x' = ``augmentation``(x) (parameters as
    ``finetune_with_augmentation``) run together; the loss is cross-entropy on x plus
    ``weight`` x the mean over images and selected units of (a - a')^2 / 4, the variance of a
    unit's activation over the pair: a cheap estimate of its nuisance-attributable variance.

    Args:
        model: images (B, 3, H, W) in [0, 1] -> logits (B, K).
        selected: {layer: bool tensor broadcastable to its output per image} (``top_units``).
        datamodule, augmentation, steps, lr, seed, batch_size: as ``finetune_with_augmentation``.
        weight: lambda, the penalty's weight (0: cross-entropy alone).
        layer_root: where the layers are named (default ``model.net`` or ``model``).

    Returns:
        (``model`` fine-tuned, in eval mode; its record, with ``penalties``).
    """
    generator = torch.Generator().manual_seed(sub_seed(seed, _AUGMENT))
    outputs: dict[str, Tensor] = {}

    def keep(layer: str) -> Callable[[Tensor], Tensor]:
        def store(out: Tensor) -> Tensor:
            outputs[layer] = out
            return out  # unchanged: the "mask" only records the output
        return store

    network = MaskedNetwork(model, list(selected), reuse_prefix=False, layer_root=layer_root)
    recorders = {layer: keep(layer) for layer in selected}

    def step_loss(net: nn.Module, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        params = random_parameters(augmentation, images.shape[0], images.shape[-2:], generator)
        pair = torch.cat([images, apply(augmentation, images, params)])
        with network:
            logits = network.forward(pair, recorders)
        n = images.shape[0]
        terms = []
        for layer, chosen in selected.items():
            out = outputs[layer]
            units = chosen.expand(out.shape[1:])
            terms.append(((out[:n] - out[n:]) ** 2 / 4)[:, units].mean())
        penalty = torch.stack(terms).mean()
        loss = nn.functional.cross_entropy(logits[:n], labels) + weight * penalty
        return loss, penalty

    record = _record("penalty", datamodule, "all", steps, lr, seed, batch_size)
    return _finetune(model, datamodule, record, step_loss, None), record
