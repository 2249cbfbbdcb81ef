"""The evaluation loop of guided masking (METHOD.md section 8): masked forwards of the probe
inputs and the accuracies they give.

Distributed. Images are sharded over ranks (contiguous, ``distributed.shard_range``); accuracies are
sums in a torchmetrics Metric (``dist_reduce_fx="sum"``), so every rank gets the global result.

Progress (``progress=True``, rank zero, stderr; ``sensitivity.progress``): the image forwards
of the masked part up front, then a bar (terminal) or plain lines (logs) with rate and ETA.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchmetrics import Metric

from sensitivity.capture import model_device
from sensitivity.distributed import resolve_world, shard_range
from sensitivity.layouts import UnitLayout
from sensitivity.masking.inputs import ProbeInputs, load_images
from sensitivity.masking.masks import (
    MaskConfig,
    PlanItem,
    VariableMasks,
    configuration_quantiles,
    default_configurations,
    prepare_masks,
)
from sensitivity.masking.network import MaskedNetwork
from sensitivity.masking.result import MaskingResult
from sensitivity.problem import AugmentationProblem
from sensitivity.progress import Progress


# --------------------------------------------------------------------------------- the loop
def plan_forwards(
    inputs: ProbeInputs, plans: Sequence[Sequence[PlanItem]], images: int
) -> int:
    """Image forwards of the masked part (one image through the suffix) for ``images`` probe
    images: per input set, its inputs (the images, ``k`` draws each for augmented sets) times
    its plans."""
    return sum(len(plan) * images * (1 if i == 0 else inputs.k)
               for i, plan in enumerate(plans[:len(inputs.names)]))


def run_plans(
    network: MaskedNetwork,
    inputs: ProbeInputs,
    plans: Sequence[Sequence[PlanItem]],
    consume: Callable[[int, int, Tensor, Tensor], None],
    *,
    batch_images: int = 16,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    desc: str = "masking",
    work: str = "",
) -> None:
    """Run every input set of this rank's probe images through its plans.

    For every batch of images and every input set i: the prefix once, then for each (plan
    index, mask) of ``plans[i]`` the suffix, and ``consume(i, plan index, logits, labels)``.
    The model runs in eval mode under inference mode; its train/eval flags are restored
    afterwards.

    Args:
        network: the masked network.
        inputs: the probe inputs (input sets).
        plans: per input set, its passes [(plan index, mask or None)].
        consume: receives (input set, plan index, logits (B, classes), labels (B,)).
        batch_images: probe images per batch.
        device: where the inputs go.
        rank, world_size: this process's share of the images (``shard_range``).
        progress: rank zero reports its image forwards as ``desc``; ``work`` says what they
            are, after their count.
    """
    if batch_images < 1:
        raise ValueError(f"batch_images must be >= 1, got {batch_images}")
    start, stop = shard_range(inputs.n_images, rank, world_size)
    model = network.model
    dtype = model_device(model)[1]
    modes = {module: module.training for module in model.modules()}
    total = plan_forwards(inputs, plans, stop - start)
    if world_size > 1:
        work += f"; this process: images {start}-{stop - 1} of {inputs.n_images}"
    model.eval()
    try:
        with torch.inference_mode(), network, Progress(
            desc, total, "image forwards", work=f"{total} image forwards ({work})",
            enabled=progress and rank == 0,
        ) as bar:
            for first in range(start, stop, batch_images):
                batches = inputs.batch(first, min(first + batch_images, stop), device, dtype)
                for i, (x, labels) in enumerate(batches):
                    if not plans[i] or len(x) == 0:
                        continue
                    state = network.prefix(x)
                    for index, mask in plans[i]:
                        consume(i, index, network.suffix(state, mask), labels)
                        bar.update(len(x))
    finally:
        for module, mode in modes.items():
            module.training = mode


def computed(metric: Metric) -> np.ndarray:
    """``metric.compute()`` as a numpy array. A rank that got no image (more ranks than
    images) never calls ``update``; its zero sums are right, so torchmetrics' warning about
    that is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was called before the ``update``")
        return metric.compute().cpu().numpy()


@dataclass
class MaskedRun:
    """What a masking evaluation sets up before its loop.

    Attributes:
        inputs: the probe inputs.
        quantiles: the distinct q of the quantile configurations, ascending.
        masks: {mask variable: its masks at every masked layer}.
        network: the masked network (layers: the masked layers, in map order).
        device: the model's device.
    """

    inputs: ProbeInputs
    quantiles: list[float]
    masks: dict[str, VariableMasks]
    network: MaskedNetwork
    device: torch.device

    @classmethod
    def prepare(
        cls,
        model: nn.Module,
        maps: Mapping[str, np.ndarray],
        variables: Sequence[str],
        mask_variables: Sequence[str],
        inputs: ProbeInputs,
        configs: Sequence[MaskConfig],
        *,
        ties: str,
        reuse_prefix: bool,
        layer_root: nn.Module | None,
        valid: Mapping[str, np.ndarray] | None,
        layouts: Mapping[str, UnitLayout] | None = None,
    ) -> MaskedRun:
        """The masks of ``mask_variables`` (``prepare_masks``, maps {layer: (V, *u)} of the
        V ``variables``, their unit ``layouts``) and the masked network over the maps'
        layers."""
        quantiles = configuration_quantiles(configs)
        masks = prepare_masks(model, maps, variables, mask_variables,
                              (inputs.height, inputs.width), quantiles, ties, layer_root, valid,
                              layouts)
        network = MaskedNetwork(model, list(maps), reuse_prefix, layer_root)
        return cls(inputs, quantiles, masks, network, model_device(model)[0])

    def mask_table(self, variables: Sequence[str], table: str) -> np.ndarray:
        """(V, Q, L) of ``VariableMasks.fraction`` or ``.tied`` ("fraction", "tied") per mask
        variable, quantile and masked layer."""
        layers = self.network.layers
        values = [[[getattr(self.masks[v], table)[q][layer] for layer in layers]
                   for q in self.quantiles] for v in variables]
        return np.array(values).reshape(len(variables), len(self.quantiles), len(layers))


class MaskedAccuracy(Metric):
    """Top-1 and top-k hits per (input set, plan) as float64 sums (summed over ranks)."""

    full_state_update = False

    def __init__(self, n_inputs: int, n_plans: int, top_k: int) -> None:
        super().__init__()
        self.top_k = int(top_k)
        self.add_state("hits", torch.zeros(n_inputs, n_plans, 2, dtype=torch.float64), "sum")
        self.add_state("total", torch.zeros(n_inputs, n_plans, dtype=torch.float64), "sum")

    def update(self, input_index: int, plan: int, logits: Tensor, labels: Tensor) -> None:
        """Count the top-1 and top-k hits of one pass: logits (B, classes), labels (B,)."""
        hit = logits.topk(self.top_k, dim=1).indices == labels[:, None]
        self.hits[input_index, plan, 0] += hit[:, 0].sum()
        self.hits[input_index, plan, 1] += hit.any(dim=1).sum()
        self.total[input_index, plan] += len(labels)

    def compute(self) -> Tensor:
        """(n_inputs, n_plans, 2) top-1 and top-k accuracy (NaN where nothing was seen)."""
        return self.hits / self.total[..., None]


# ------------------------------------------------------------------------------ evaluation
def _check_variables(chosen: Sequence[str], available: Sequence[str], what: str) -> list[str]:
    unknown = [v for v in chosen if v not in available]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; the analysis has variables {list(available)}")
    if not chosen:
        raise ValueError(f"no {what} given")
    return list(chosen)


def _class_count(network: MaskedNetwork, inputs: ProbeInputs, device: torch.device) -> int:
    """Outputs of the network (one forward of the first probe image)."""
    model = network.model
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.inference_mode():
            x = load_images(inputs.images, 0, 1).to(device, model_device(model)[1])
            return int(model(x).shape[1])
    finally:
        for module, mode in modes.items():
            module.training = mode


def evaluate_masking(
    model: nn.Module,
    maps: Mapping[str, np.ndarray],
    variables: Sequence[str],
    images: Tensor | Dataset,
    labels: Tensor,
    augmentations: Sequence[str],
    *,
    value: str = "",
    analysis: str = "",
    mask_variables: Sequence[str] | None = None,
    configurations: Sequence[MaskConfig] | None = None,
    k: int = 4,
    seed: int = 0,
    problem: AugmentationProblem | None = None,
    ties: str = "strict",
    batch_images: int = 16,
    reuse_prefix: bool = True,
    layer_root: nn.Module | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    valid: Mapping[str, np.ndarray] | None = None,
    progress: bool = True,
    layouts: Mapping[str, UnitLayout] | None = None,
) -> MaskingResult:
    """Accuracy of ``model`` under every mask configuration of every mask variable.

    Every rank must call it (DDP); every rank gets the global result.

    Args:
        model, layer_root: the network and where its layers are named (``MaskedNetwork``).
        maps, valid: {masked layer: (V, *u)} in [0, 1] and {masked layer: (*u) bool}, the
            units not flagged (both from ``sensitivity_maps``; valid None: every unit).
        variables: the V variables of the maps; mask_variables: those to mask (default all).
        images, labels, augmentations, k, seed, problem: the probe inputs (``ProbeInputs``):
            each image as the original and with each input augmentation alone, k draws.
        value, analysis: recorded in the result (the maps' value type and analysis name).
        configurations: default the 17 of ``default_configurations``.
        ties, batch_images, reuse_prefix: ``quantile_mask``, ``run_plans``, ``MaskedNetwork``.
        rank, world_size: default torch.distributed's, else (0, 1).
        progress: rank zero reports the image forwards.
        layouts: {masked layer: unit layout} the analysis recorded (``MaskingMaps.layouts``):
            the layouts of NHWC and token outputs given by an override, and which reduction
            made each map (``prepare_masks``); None: detected and told from the shapes.

    Returns:
        The accuracies (inputs, mask variables, configurations) and the masks' statistics.
    """
    started = time.perf_counter()
    rank, world_size = resolve_world(rank, world_size)
    configs = list(configurations or default_configurations())
    chosen = _check_variables(
        list(variables) if mask_variables is None else list(mask_variables), variables,
        "mask variables",
    )
    inputs = ProbeInputs(images, labels, augmentations, k, seed, problem)
    run = MaskedRun.prepare(model, maps, variables, chosen, inputs, configs, ties=ties,
                            reuse_prefix=reuse_prefix, layer_root=layer_root, valid=valid,
                            layouts=layouts)
    plan: list[PlanItem] = [(0, None)]
    for v, variable in enumerate(chosen):
        plan += run.masks[variable].plan(configs, 1 + v * len(configs))
    top_k = min(5, _class_count(run.network, inputs, run.device))
    metric = MaskedAccuracy(len(inputs.names), len(plan), top_k).to(run.device)
    work = (f"{inputs.n_images} probe images, each as the original and {inputs.k} draws of "
            f"each of {len(inputs.augmentations)} augmentations, x {len(plan)} passes: "
            f"unmasked and {len(chosen)} mask variables x {len(configs)} configurations")
    run_plans(run.network, inputs, [plan] * len(inputs.names), metric.update,
              batch_images=batch_images, device=run.device, rank=rank, world_size=world_size,
              progress=progress, desc="masking", work=work)
    return _masking_result(
        run, computed(metric), chosen, configs, valid, value=value, analysis=analysis, ties=ties,
        top_k=top_k, seed=seed, seconds=time.perf_counter() - started,
    )


def _masking_result(
    run: MaskedRun,
    accuracy: np.ndarray,
    chosen: Sequence[str],
    configs: Sequence[MaskConfig],
    valid: Mapping[str, np.ndarray] | None,
    **recorded: Any,
) -> MaskingResult:
    """The MaskingResult of an evaluation: accuracy is (I, 1 + V M, 2), the unmasked pass
    first, then V mask variables x M configurations, top-1 and top-k; ``recorded`` are the
    remaining fields (value, analysis, ties, top_k, seed, seconds)."""
    shape = (len(run.inputs.names), len(chosen), len(configs))
    layers = run.network.layers
    return MaskingResult(
        inputs=run.inputs.names, variables=list(chosen),
        configurations=[c.label for c in configs], layers=layers, quantiles=run.quantiles,
        acc1=accuracy[:, 1:, 0].reshape(shape), acc5=accuracy[:, 1:, 1].reshape(shape),
        unmasked_acc1=accuracy[:, 0, 0], unmasked_acc5=accuracy[:, 0, 1],
        masked_fraction=run.mask_table(chosen, "fraction"),
        tied=run.mask_table(chosen, "tied").astype(bool),
        n_images=run.inputs.n_images, k=run.inputs.k, prefix_reuse=run.network.split_note,
        valid_fraction=np.array([1.0 if valid is None else float(np.mean(valid[layer]))
                                 for layer in layers]),
        **recorded,
    )
