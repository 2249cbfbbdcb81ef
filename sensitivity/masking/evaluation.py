"""The evaluation loop of guided masking (METHOD.md section 8): masked forwards of the probe
inputs and the accuracies they give, overall, per class and as confusion matrices.

Distributed. Images are sharded over ranks (contiguous, ``distributed.shard_range``); accuracies are
sums in a torchmetrics Metric (``dist_reduce_fx="sum"``), so every rank gets the global result:
hit counts as float64, per-class counts and confusion matrices as int64.

Batching (``masking.schedule``). The prefix runs once per image batch and input set; the
suffix forwards hold at most ``batch_rows`` rows: several configurations as copies of the rows,
each copy with its own mask, or row ranges of one configuration. The counts do not depend on it.

Resume (``masking.resume``): with a state path every rank continues its saved counts and, with
``checkpoint_every = k > 0``, saves them after every k forwards; the counts equal those of an
uninterrupted run.

Progress (``progress=True``, rank zero, stderr; ``sensitivity.progress``): the image forwards
of the masked part up front, then a bar (terminal) or plain lines (logs) with rate and ETA.
"""

from __future__ import annotations

import os
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
from sensitivity.distributed import rank_zero_seconds, resolve_world, shard_range
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
from sensitivity.masking.result import PROFILES, MaskingResult
from sensitivity.masking.resume import MaskingCheckpoints, masking_resume_fields
from sensitivity.masking.schedule import Schedule, default_batch_rows
from sensitivity.problem import AugmentationProblem
from sensitivity.progress import Progress


# --------------------------------------------------------------------------------- the loop
def plan_schedule(
    network: MaskedNetwork,
    inputs: ProbeInputs,
    plans: Sequence[Sequence[PlanItem]],
    images: tuple[int, int],
    batch_images: int,
    batch_rows: int,
    device: torch.device,
) -> Schedule:
    """The suffix forwards of the probe images [start, stop) (``schedule.Schedule``); one
    prefix of up to two images (the model in eval mode) tells whether its state can be
    batched."""
    start, stop = images
    batchable = False
    if batch_rows and stop > start:
        x = load_images(inputs.images, start, min(start + 2, stop))
        with torch.inference_mode():
            x = x.to(device, model_device(network.model)[1])
            batchable = network.batchable(network.prefix(x), len(x))
    rows = [1 if i == 0 else inputs.k for i in range(len(inputs.names))]
    return Schedule(plans, rows, images, batch_images, batch_rows, batchable)


def run_plans(
    network: MaskedNetwork,
    inputs: ProbeInputs,
    plans: Sequence[Sequence[PlanItem]],
    consume: Callable[[int, int, Tensor, Tensor], None],
    *,
    batch_images: int = 16,
    batch_rows: int = 0,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    desc: str = "masking",
    work: str = "",
    checkpoints: MaskingCheckpoints | None = None,
) -> None:
    """Run every input set of this rank's probe images through its plans.

    For every batch of images and every input set i: the prefix once, then the suffix
    forwards of ``plans[i]`` (``schedule.Schedule``: several passes in one forward, or row
    ranges of one pass), each followed by ``consume(i, plan index, logits, labels)``. The
    model runs in eval mode under inference mode; its train/eval flags are restored
    afterwards.

    Args:
        network: the masked network.
        inputs: the probe inputs (input sets).
        plans: per input set, its passes [(plan index, mask or None)].
        consume: receives (input set, p, logits (n r, classes), labels (r,)): the passes p,
            p + 1, ..., p + n - 1 of r inputs, pass p + j at rows j r ... (j + 1) r - 1.
        batch_images: probe images per batch.
        batch_rows: the most rows of a suffix forward (``schedule``); 0: one forward per pass
            over the input set's rows.
        device: where the inputs go.
        rank, world_size: this process's share of the images (``shard_range``).
        progress: rank zero reports its image forwards as ``desc``; ``work`` says what they
            are, after their count.
        checkpoints: the rank's resume file: forwards before its ``next_forward`` are
            skipped, and it saves after every forward (``MaskingCheckpoints.after``).
    """
    images = shard_range(inputs.n_images, rank, world_size)
    model = network.model
    dtype = model_device(model)[1]
    modes = {module: module.training for module in model.modules()}
    if world_size > 1:
        work += f"; this process: images {images[0]}-{images[1] - 1} of {inputs.n_images}"
    model.eval()
    try:
        # In eval mode: the schedule's dry prefix must not move BatchNorm statistics.
        schedule = plan_schedule(network, inputs, plans, images, batch_images, batch_rows,
                                 device)
        resume_at = 0 if checkpoints is None else checkpoints.next_forward
        total = schedule.image_forwards
        with torch.inference_mode(), network, Progress(
            desc, total, "image forwards", work=f"{total} image forwards ({work})",
            initial=schedule.done_before(resume_at), enabled=progress and rank == 0,
        ) as bar:
            for first, last, forwards in schedule.pending(resume_at):
                batches = inputs.batch(first, last, device, dtype)
                cached: tuple[int, Any] = (-1, None)
                for number, f in forwards:
                    x, labels = batches[f.input_set]
                    if cached[0] != f.input_set:
                        cached = (f.input_set, network.prefix(x))
                    logits = network.suffix(cached[1], f.mask, slice(f.start, f.stop), f.copies)
                    consume(f.input_set, f.first, logits, labels[f.start:f.stop])
                    bar.update(f.image_forwards)
                    if checkpoints is not None:
                        checkpoints.after(number + 1, schedule.total)
    finally:
        for module, mode in modes.items():
            module.training = mode


def _compute(metric: Metric) -> Any:
    """``metric.compute()``. A rank that got no image (more ranks than images) never calls
    ``update``; its zero sums are right, so torchmetrics' warning about that is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was called before the ``update``")
        return metric.compute()


def computed(metric: Metric) -> np.ndarray:
    """``metric.compute()`` (a tensor) as a numpy array, summed over ranks."""
    return _compute(metric).cpu().numpy()


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

    def passes(self, variables: Sequence[str], configs: Sequence[MaskConfig]) -> list[PlanItem]:
        """The passes of every input set: unmasked (plan index 0), then configuration c of
        mask variable v (plan index 1 + v M + c)."""
        plan: list[PlanItem] = [(0, None)]
        for v, variable in enumerate(variables):
            plan += self.masks[variable].plan(configs, 1 + v * len(configs))
        return plan

    def mask_table(self, variables: Sequence[str], table: str) -> np.ndarray:
        """(V, Q, L) of ``VariableMasks.fraction`` or ``.tied`` ("fraction", "tied") per mask
        variable, quantile and masked layer."""
        layers = self.network.layers
        values = [[[getattr(self.masks[v], table)[q][layer] for layer in layers]
                   for q in self.quantiles] for v in variables]
        return np.array(values).reshape(len(variables), len(self.quantiles), len(layers))


class MaskedAccuracy(Metric):
    """Top-1 and top-k hits per (input set, plan) as float64 sums; per class the top-1 hits,
    the inputs and (``confusion``) the confusion matrix as int64 counts; all summed over ranks.

    Args:
        n_inputs, n_plans: the input sets and the passes of each.
        top_k: k of the top-k accuracy.
        n_classes: C, the network's outputs (labels are below it).
        confusion: count the (C, C) confusion matrix of every (input set, plan).
    """

    full_state_update = False

    def __init__(
        self, n_inputs: int, n_plans: int, top_k: int, n_classes: int, confusion: bool = True
    ) -> None:
        super().__init__()
        self.top_k = int(top_k)
        self.n_classes = int(n_classes)
        self.record_confusion = bool(confusion)
        self.add_state("hits", torch.zeros(n_inputs, n_plans, 2, dtype=torch.float64), "sum")
        self.add_state("total", torch.zeros(n_inputs, n_plans, dtype=torch.float64), "sum")
        per_class = (n_inputs, n_plans, self.n_classes)
        self.add_state("class_hits", torch.zeros(per_class, dtype=torch.int64), "sum")
        self.add_state("class_total", torch.zeros(per_class, dtype=torch.int64), "sum")
        if self.record_confusion:
            self.add_state("confusion", torch.zeros(*per_class, self.n_classes,
                                                    dtype=torch.int64), "sum")

    def update(self, input_index: int, plan: int, logits: Tensor, labels: Tensor) -> None:
        """Count the hits of n passes of the same R inputs: logits (n R, classes), pass
        ``plan`` + j at rows j R ... (j + 1) R - 1; labels (R,) in [0, C)."""
        rows, classes = len(labels), self.n_classes
        top = logits.topk(self.top_k, dim=1).indices.view(-1, rows, self.top_k)  # (n, R, k)
        plans = slice(plan, plan + len(top))
        hit = top == labels[:, None]
        first = hit[..., 0]
        self.hits[input_index, plans, 0] += first.sum(dim=1)
        self.hits[input_index, plans, 1] += hit.any(dim=2).sum(dim=1)
        self.total[input_index, plans] += rows
        # Integer sums by index: no boolean indexing (a device synchronisation per pass).
        self.class_hits[input_index, plans].index_add_(1, labels, first.long())
        self.class_total[input_index, plans] += torch.bincount(labels, minlength=classes)
        if self.record_confusion:
            # The top-1 prediction of the hits above (topk's first index, not argmax: the same
            # choice among tied logits), so the trace is the top-1 hit count.
            cells = labels * classes + top[..., 0]
            counts = self.confusion[input_index, plans].view(len(top), classes * classes)
            counts.scatter_add_(1, cells, torch.ones_like(cells))

    def compute(self) -> dict[str, Tensor]:
        """{"accuracy": (n_inputs, n_plans, 2) top-1 and top-k accuracy (NaN where nothing was
        seen), "class_hits", "class_total": (n_inputs, n_plans, C), "confusion":
        (n_inputs, n_plans, C, C) when recorded}."""
        counts = {"accuracy": self.hits / self.total[..., None],
                  "class_hits": self.class_hits.clone(), "class_total": self.class_total.clone()}
        if self.record_confusion:
            counts["confusion"] = self.confusion.clone()
        return counts


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
    profile: str = "top1",
    max_confusion_classes: int = 100,
    class_names: Sequence[str] | None = None,
    batch_rows: int | None = None,
    state_path: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 0,
) -> MaskingResult:
    """Accuracy of ``model`` under every mask configuration of every mask variable: overall,
    per class and (up to ``max_confusion_classes`` classes) as confusion matrices.

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
        profile: what the specificity compares (``result.PROFILES``).
        max_confusion_classes: count confusion matrices (I x passes x C x C int64) up to this
            many classes C (0: never); class_names: the C names (default "0".."C-1").
        batch_rows: the most rows of a suffix forward (``schedule``: several configurations
            in one forward, or row ranges of one); None: ``default_batch_rows`` of the model's
            device; 0: one forward per configuration over an input set's rows.
        state_path, checkpoint_every: resume (``masking.resume``): a saved state of the same
            inputs is continued, and with ``checkpoint_every = k > 0`` the counts are saved
            after every k forwards; each rank's file is ``shard_path(state_path)``, removed
            when the evaluation completes.

    Returns:
        The accuracies (inputs, mask variables, configurations) and the masks' statistics;
        ValueError before any masked forward for unknown variables or profile, labels outside
        the network's classes, profile "confusion" above ``max_confusion_classes`` classes, or
        a resume state of other inputs.
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
    plan = run.passes(chosen, configs)
    metric = _accuracy_metric(run, len(plan), profile, max_confusion_classes, class_names)
    rows = default_batch_rows(run.device) if batch_rows is None else batch_rows
    checkpoints = None
    if state_path is not None:
        settings = {"ties": ties, "batch_images": batch_images, "batch_rows": rows,
                    "reuse_prefix": reuse_prefix, "top_k": metric.top_k,
                    "classes": metric.n_classes, "confusion": metric.record_confusion}
        fields = masking_resume_fields(model, maps, valid, layouts, inputs,
                                       (variables, chosen, configs), settings, (rank, world_size))
        checkpoints = MaskingCheckpoints(state_path, fields, checkpoint_every, metric, started)
    run_plans(run.network, inputs, [plan] * len(inputs.names), metric.update,
              batch_images=batch_images, batch_rows=rows, device=run.device, rank=rank,
              world_size=world_size, progress=progress, desc="masking",
              work=_work(inputs, len(chosen), len(configs)), checkpoints=checkpoints)
    counts = _compute(metric)
    seconds = time.perf_counter() - started if checkpoints is None else checkpoints.seconds()
    if checkpoints is not None:
        checkpoints.remove()
    return _masking_result(
        run, counts, chosen, configs, valid, value=value, analysis=analysis, ties=ties,
        top_k=metric.top_k, seed=seed, seconds=rank_zero_seconds(seconds, world_size, run.device),
        profile=profile, classes=None if class_names is None else list(class_names),
    )


def _work(inputs: ProbeInputs, variables: int, configs: int) -> str:
    """What the image forwards of an evaluation are (the progress report's work line)."""
    return (f"{inputs.n_images} probe images, each as the original and {inputs.k} draws of "
            f"each of {len(inputs.augmentations)} augmentations, x {1 + variables * configs} "
            f"passes: unmasked and {variables} mask variables x {configs} configurations")


def _accuracy_metric(
    run: MaskedRun,
    n_plans: int,
    profile: str,
    max_confusion_classes: int,
    class_names: Sequence[str] | None,
) -> MaskedAccuracy:
    """The metric of an evaluation, on the run's device: top-min(5, C) accuracy, confusion
    matrices up to ``max_confusion_classes`` classes; ValueError for an unknown profile,
    labels outside [0, C), class names of another count, or the confusion profile without
    confusion matrices."""
    if profile not in PROFILES:
        raise ValueError(f"unknown masking profile {profile!r}; valid: {list(PROFILES)}")
    inputs = run.inputs
    classes = _class_count(run.network, inputs, run.device)
    if int(inputs.labels.min()) < 0 or int(inputs.labels.max()) >= classes:
        raise ValueError(f"probe labels must lie in [0, {classes}), the network's outputs; got "
                         f"{int(inputs.labels.min())}..{int(inputs.labels.max())}")
    if class_names is not None and len(class_names) != classes:
        raise ValueError(f"{len(class_names)} class names for a network of {classes} outputs")
    confusion = classes <= max_confusion_classes
    if profile == "confusion" and not confusion:
        raise ValueError(f"profile 'confusion' needs confusion matrices, counted up to "
                         f"max_confusion_classes = {max_confusion_classes} classes; the network "
                         f"has {classes}: raise it, or use profile 'per_class'")
    metric = MaskedAccuracy(len(inputs.names), n_plans, min(5, classes), classes, confusion)
    return metric.to(run.device)


def _class_fields(counts: Mapping[str, np.ndarray], shape: tuple[int, ...]) -> dict[str, Any]:
    """The per-class fields of a MaskingResult from the counts of ``MaskedAccuracy.compute``
    (passes: the unmasked one, then ``shape`` = (I, V, M) masked ones)."""
    hits, total = counts["class_hits"], counts["class_total"]
    accuracy = np.divide(hits, total, out=np.full(hits.shape, np.nan), where=total > 0)
    classes = hits.shape[-1]
    fields = {
        "class_acc1": accuracy[:, 1:].reshape(*shape, classes),
        "unmasked_class_acc1": accuracy[:, 0],
        "class_images": total[:, 0],  # every pass of an input set sees the same inputs
    }
    if "confusion" in counts:
        fields["confusion"] = counts["confusion"][:, 1:].reshape(*shape, classes, classes)
        fields["unmasked_confusion"] = counts["confusion"][:, 0]
    return fields


def _masking_result(
    run: MaskedRun,
    counts: Mapping[str, Tensor],
    chosen: Sequence[str],
    configs: Sequence[MaskConfig],
    valid: Mapping[str, np.ndarray] | None,
    **recorded: Any,
) -> MaskingResult:
    """The MaskingResult of an evaluation: counts are ``MaskedAccuracy.compute``'s, its
    accuracy (I, 1 + V M, 2) the unmasked pass first, then V mask variables x M
    configurations, top-1 and top-k; ``recorded`` are the remaining fields (value, analysis,
    ties, top_k, seed, seconds, profile, classes)."""
    shape = (len(run.inputs.names), len(chosen), len(configs))
    layers = run.network.layers
    counts = {key: value.cpu().numpy() for key, value in counts.items()}
    accuracy = counts["accuracy"]
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
        **_class_fields(counts, shape), **recorded,
    )
