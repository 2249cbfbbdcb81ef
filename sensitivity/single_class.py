"""Single-class analysis (METHOD.md section 9): which classes the damage of a variable's units
pushes predictions towards.

Candidates. At the classification layer (analysed after softmax) the top-n classes by
sensitivity to variable v (the same value type as the masks, clipped to [0, 1]; ties broken by
the lower class index) are v's candidate classes T_v. Only valid classes (units not flagged in
the analysis) can be candidates: a flagged unit's index is not a sensitivity.

Self-masking. Inputs carry augmentation v alone (K parameter draws per probe image) and the
units sensitive to v are masked at the masked layers (every configuration of
``sensitivity.masking``). Per input the Jaccard index between the top-n predictions and T_v is
J = k / (2n - k), k the size of the intersection; its mean over inputs is reported per
configuration, with the unmasked means on original and on v-augmented inputs for reference.

Chance threshold. Two random n-subsets of C classes intersect in k ~ Hypergeom(C, n, n)
classes. One simulated experiment draws C * s such pairs (s images per class, each class's
images evaluated once) and takes the mean J; the threshold is Q3 + 1.5 IQR of that mean over
many simulated experiments (published: 0.00300 for C = 1000, s = 50; 0.00806 for C = 365,
s = 100). The C * s draws of one experiment enter only through how many pairs share k classes,
so each experiment draws those counts as one multinomial sample (the same distribution, at
O(n) instead of O(C s) cost). The K draws per image are averaged per image first, as the
reference did, so s is the number of probe images per class. A configuration whose mean J
exceeds the threshold is "matched": masking v pushes predictions towards T_v.

This module imports torch, numpy and scipy; never Lightning or wandb.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.stats
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchmetrics import Metric

from sensitivity.augmentations import AUGMENTATIONS
from sensitivity.distributed import resolve_world
from sensitivity.layouts import UnitLayout
from sensitivity.masking import (
    MaskConfig,
    MaskedRun,
    PlanItem,
    ProbeInputs,
    computed,
    default_batch_rows,
    default_configurations,
    run_plans,
)
from sensitivity.problem import AugmentationProblem
from sensitivity.units import unit_mask

# The group kind of single-class results in a results file: /single_class/<name>.
GROUP_KIND = "single_class"


# ---------------------------------------------------------------------------------- chance
@dataclass(frozen=True)
class ChanceThreshold:
    """The chance threshold of the mean Jaccard index (``chance_threshold``).

    Attributes:
        threshold: Q3 + 1.5 IQR of the simulated mean Jaccard index.
        mean: its expectation (simulated).
        standard_error: Monte Carlo standard error of ``threshold`` (batch means).
        n_classes, samples_per_class, n, trials, seed: the simulation's arguments.
    """

    threshold: float
    mean: float
    standard_error: float
    n_classes: int
    samples_per_class: int
    n: int
    trials: int
    seed: int


def _outlier_threshold(means: np.ndarray) -> float:
    q1, q3 = np.quantile(means, [0.25, 0.75])
    return float(q3 + 1.5 * (q3 - q1))


def chance_threshold(
    n_classes: int,
    samples_per_class: int,
    n: int = 5,
    trials: int = 100_000,
    seed: int = 0,
    batches: int = 20,
) -> ChanceThreshold:
    """The chance threshold of the mean Jaccard index of two random n-subsets of
    ``n_classes`` classes over ``n_classes * samples_per_class`` samples (module docstring).

    Args:
        n_classes: C, at least 2.
        samples_per_class: s, probe images per class.
        n: the size of the subsets, below C.
        trials: simulated experiments, drawn from ``np.random.default_rng(seed)``.
        seed: the simulation's seed.
        batches: equal parts of the trials; the standard error is the spread of the
            threshold over them / sqrt(batches).

    Returns:
        The threshold, the simulated mean and the threshold's standard error.
    """
    for label, value, low in (("n_classes", n_classes, 2), ("samples_per_class",
                              samples_per_class, 1), ("n", n, 1), ("trials", trials, 2 * batches),
                              ("batches", batches, 2)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
    if n >= n_classes:
        raise ValueError(
            f"n = {n} candidate classes out of {n_classes}: any two n-subsets would overlap "
            f"almost surely; use n < n_classes (e.g. {max(1, n_classes // 4)})"
        )
    k = np.arange(n + 1)
    pmf = scipy.stats.hypergeom(n_classes, n, n).pmf(k)
    samples = n_classes * samples_per_class
    counts = np.random.default_rng(seed).multinomial(samples, pmf / pmf.sum(), size=trials)
    means = counts @ (k / (2 * n - k)) / samples
    parts = [_outlier_threshold(part) for part in np.array_split(means, batches)]
    return ChanceThreshold(
        threshold=_outlier_threshold(means),
        mean=float(means.mean()),
        standard_error=float(np.std(parts, ddof=1) / np.sqrt(batches)),
        n_classes=int(n_classes), samples_per_class=int(samples_per_class), n=int(n),
        trials=int(trials), seed=int(seed),
    )


# ------------------------------------------------------------------------------- candidates
def candidate_classes(
    head_maps: np.ndarray, n: int, valid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per variable the n valid classes with the largest sensitivity.

    Args:
        head_maps: (V, C) sensitivities at the classification layer.
        n: candidates per variable.
        valid: (C,) bool, the classes not flagged (default all).

    Returns:
        (classes (V, n) int64, values (V, n)), largest first (ties: lower class index
        first); ValueError when fewer than n classes are valid.
    """
    if head_maps.ndim != 2 or not 1 <= n <= head_maps.shape[1]:
        raise ValueError(
            f"need classification-layer maps (variables, classes) and 1 <= n <= classes; got "
            f"shape {head_maps.shape}, n = {n}"
        )
    valid = unit_mask(valid, head_maps.shape[1:], "the classes")
    if np.count_nonzero(valid) < n:
        raise ValueError(
            f"n = {n} candidate classes but only {np.count_nonzero(valid)} of "
            f"{head_maps.shape[1]} classes have valid (unflagged) sensitivities; lower n"
        )
    order = np.argsort(-head_maps, axis=1, kind="stable")
    # A second stable sort moves the valid classes first, keeping their order.
    order = np.take_along_axis(order, np.argsort(~valid[order], axis=1, kind="stable"), axis=1)
    order = order[:, :n]
    return order.astype(np.int64), np.take_along_axis(head_maps, order, axis=1)


def jaccard(top: Tensor, candidates: Tensor) -> Tensor:
    """Jaccard index k / (2n - k) of each row's n predicted classes with the candidate set.

    Args:
        top: (B, n) int64 predicted classes per row.
        candidates: (C,) bool mask over classes holding n classes.

    Returns:
        (B,) float64 in [0, 1].
    """
    n = top.shape[1]
    k = candidates[top].sum(dim=1).double()
    return k / (2 * n - k)


class JaccardMean(Metric):
    """Mean Jaccard index per plan, as float64 sums (summed over ranks).

    Args:
        n_plans: the plans (forward configurations) the means are kept for.
    """

    full_state_update = False

    def __init__(self, n_plans: int) -> None:
        super().__init__()
        self.add_state("total", torch.zeros(n_plans, dtype=torch.float64), "sum")
        self.add_state("count", torch.zeros(n_plans, dtype=torch.float64), "sum")

    def update(self, plan: int, values: Tensor) -> None:
        """Add the Jaccard indices of one batch: (B,) under plan ``plan``, or (n, B) under the
        plans ``plan`` ... ``plan`` + n - 1."""
        values = values.reshape(-1, values.shape[-1])
        plans = slice(plan, plan + len(values))
        self.total[plans] += values.sum(dim=1)
        self.count[plans] += values.shape[1]

    def compute(self) -> Tensor:
        """(n_plans,) float64 means (NaN for a plan without values)."""
        return self.total / self.count


# ---------------------------------------------------------------------------------- results
@dataclass
class SingleClassResult:
    """Self-masking Jaccard indices against the candidate classes.

    Attributes:
        variables: the augmentations analysed (V); configurations: mask labels (M).
        candidates: (V, n) class indices (``candidate_names`` their names).
        candidate_scores: (V, n) their sensitivities.
        jaccard: (V, M) mean J in [0, 1] under self-masking.
        jaccard_original, jaccard_augmented: (V,) unmasked, on original / v-augmented inputs.
        threshold: the chance threshold (``chance_threshold``).
        seconds: wall time of the evaluation, in seconds.
    """

    value: str
    analysis: str
    layer: str
    variables: list[str]
    configurations: list[str]
    class_names: list[str]
    n: int
    candidates: np.ndarray
    candidate_scores: np.ndarray
    jaccard: np.ndarray
    jaccard_original: np.ndarray
    jaccard_augmented: np.ndarray
    threshold: ChanceThreshold
    n_images: int
    k: int
    seed: int
    ties: str
    prefix_reuse: str
    seconds: float = 0.0
    epoch: int | None = None

    @property
    def candidate_names(self) -> np.ndarray:
        """(V, n) class names of the candidates."""
        return np.asarray([[self.class_names[c] for c in row] for row in self.candidates])

    @property
    def matched(self) -> np.ndarray:
        """(V, M) bool: mean J under self-masking above the chance threshold."""
        return self.jaccard > self.threshold.threshold

    def matches(self) -> list[dict[str, Any]]:
        """One entry per variable: {"variable", "candidates" (names), "max_jaccard",
        "configuration" (of the max), "matched_configurations"}."""
        out = []
        for v, variable in enumerate(self.variables):
            best = int(np.nanargmax(self.jaccard[v])) if np.isfinite(self.jaccard[v]).any() else 0
            out.append({
                "variable": variable,
                "candidates": [str(c) for c in self.candidate_names[v]],
                "max_jaccard": float(self.jaccard[v, best]),
                "configuration": self.configurations[best],
                "matched_configurations": [
                    c for c, hit in zip(self.configurations, self.matched[v], strict=True) if hit
                ],
            })
        return out

    _ARRAYS = ("candidates", "candidate_scores", "jaccard", "jaccard_original",
               "jaccard_augmented")
    _ATTRS = ("value", "analysis", "layer", "variables", "configurations", "class_names", "n",
              "n_images", "k", "seed", "ties", "prefix_reuse", "seconds")

    def arrays(self) -> dict[str, np.ndarray]:
        """The datasets of the /single_class/<name> group (docs/RESULTS_FORMAT.md)."""
        arrays = {key: np.asarray(getattr(self, key)) for key in self._ARRAYS}
        arrays.update(candidate_names=self.candidate_names, matched=self.matched)
        return arrays

    def attrs(self) -> dict[str, Any]:
        """The attributes of the /single_class/<name> group, the chance threshold's among
        them (epoch -1: not known)."""
        attrs = {key: getattr(self, key) for key in self._ATTRS}
        t = self.threshold
        attrs.update(
            epoch=-1 if self.epoch is None else self.epoch, threshold=t.threshold,
            threshold_se=t.standard_error, chance_mean=t.mean,
            samples_per_class=t.samples_per_class, n_classes=t.n_classes, trials=t.trials,
            threshold_seed=t.seed,
        )
        return attrs

    @classmethod
    def from_group(
        cls, arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any]
    ) -> SingleClassResult:
        """The result back from a stored group's (arrays, attrs) (``ResultsStore.read_group``)."""
        threshold = ChanceThreshold(
            threshold=attrs["threshold"], mean=attrs["chance_mean"],
            standard_error=attrs["threshold_se"], n_classes=attrs["n_classes"],
            samples_per_class=attrs["samples_per_class"], n=attrs["n"], trials=attrs["trials"],
            seed=attrs["threshold_seed"],
        )
        epoch = int(attrs.get("epoch", -1))
        return cls(**{key: attrs[key] for key in cls._ATTRS},
                   **{key: arrays[key] for key in cls._ARRAYS},
                   threshold=threshold, epoch=None if epoch < 0 else epoch)


# ------------------------------------------------------------------------------- evaluation
def evaluate_single_class(
    model: nn.Module,
    maps: Mapping[str, np.ndarray],
    variables: Sequence[str],
    head_maps: np.ndarray,
    images: Tensor | Dataset,
    labels: Tensor,
    *,
    n: int = 5,
    augmentations: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    configurations: Sequence[MaskConfig] | None = None,
    k: int = 4,
    seed: int = 0,
    problem: AugmentationProblem | None = None,
    ties: str = "strict",
    trials: int = 100_000,
    batch_images: int = 16,
    reuse_prefix: bool = True,
    value: str = "",
    analysis: str = "",
    layer: str = "",
    layer_root: nn.Module | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    valid: Mapping[str, np.ndarray] | None = None,
    head_valid: np.ndarray | None = None,
    progress: bool = True,
    layouts: Mapping[str, UnitLayout] | None = None,
    batch_rows: int | None = None,
) -> SingleClassResult:
    """Self-masking Jaccard indices of every augmentation variable (module docstring); every
    rank must call it (DDP) and gets the global result.

    Args:
        maps, valid: {masked layer: (G, *u)} in [0, 1] and {masked layer: (*u) bool}
            (``masking.sensitivity_maps``; valid None: every unit) of the G ``variables``.
        head_maps, head_valid: (G, C) the same value type at the classification layer and
            (C,) bool its unflagged classes, the only possible candidates (None: all).
        augmentations: the variables analysed (default: every augmentation variable).
        images, labels: the probe, class-balanced (s = images / C per class).
        n: candidates and predictions compared (n < C); class_names: default the indices.
        trials: simulated experiments of the chance threshold.
        value, analysis, layer: recorded (value type, analysis, classification layer).
        progress: rank zero reports the image forwards (as ``masking.run_plans``).
        model, configurations, k, seed, problem, ties, batch_images, reuse_prefix,
            layer_root, rank, world_size, layouts, batch_rows: as
            ``masking.evaluate_masking``.

    Returns:
        Mean Jaccard indices (variables, configurations), references, candidates, threshold.
    """
    started = time.perf_counter()
    rank, world_size = resolve_world(rank, world_size)
    chosen = _analyzed_variables(variables, augmentations)
    head_maps, names = _classification_maps(head_maps, variables, class_names)
    configs = list(configurations or default_configurations())
    inputs = ProbeInputs(images, labels, chosen, k, seed, problem)
    threshold = chance_threshold(len(names), max(1, round(inputs.n_images / len(names))), n,
                                 trials, seed)
    classes, scores = candidate_classes(head_maps[[list(variables).index(v) for v in chosen]],
                                        n, head_valid)
    run = MaskedRun.prepare(model, maps, variables, chosen, inputs, configs, ties=ties,
                            reuse_prefix=reuse_prefix, layer_root=layer_root, valid=valid,
                            layouts=layouts)
    stride = len(configs) + 2  # per variable: unmasked original, unmasked augmented, configs
    metric = JaccardMean(len(chosen) * stride).to(run.device)
    work = (f"{inputs.n_images} probe images: the originals unmasked, and {inputs.k} draws "
            f"of each of {len(chosen)} augmentations, unmasked and under that augmentation's "
            f"{len(configs)} mask configurations")
    run_plans(run.network, inputs, _self_masking_plans(run, chosen, configs, stride),
              _jaccard_updates(metric, classes, len(names), n, stride, run.device),
              batch_images=batch_images, device=run.device, rank=rank, world_size=world_size,
              progress=progress, desc="single-class", work=work,
              batch_rows=default_batch_rows(run.device) if batch_rows is None else batch_rows)
    means = computed(metric).reshape(len(chosen), stride)
    return SingleClassResult(
        value=value, analysis=analysis, layer=layer, variables=chosen,
        configurations=[c.label for c in configs], class_names=names, n=n, candidates=classes,
        candidate_scores=scores, jaccard=means[:, 2:], jaccard_original=means[:, 0],
        jaccard_augmented=means[:, 1], threshold=threshold, n_images=inputs.n_images,
        k=inputs.k, seed=seed, ties=ties, prefix_reuse=run.network.split_note,
        seconds=time.perf_counter() - started,
    )


def _analyzed_variables(
    variables: Sequence[str], augmentations: Sequence[str] | None
) -> list[str]:
    """The augmentation variables to analyse: ``augmentations``, default every variable that
    is an augmentation; ValueError for none or for one that is not such a variable."""
    chosen = [v for v in variables if v in AUGMENTATIONS] if augmentations is None else list(
        augmentations)
    bad = [v for v in chosen if v not in variables or v not in AUGMENTATIONS]
    if bad or not chosen:
        raise ValueError(
            f"single-class needs augmentation variables of the analysis; got {bad or chosen}, "
            f"the analysis has {list(variables)}"
        )
    return chosen


def _classification_maps(
    head_maps: np.ndarray, variables: Sequence[str], class_names: Sequence[str] | None
) -> tuple[np.ndarray, list[str]]:
    """(head_maps (G, C) float64, the C class names), checked against the G variables."""
    head_maps = np.asarray(head_maps, dtype=np.float64)
    n_classes = head_maps.shape[1] if head_maps.ndim == 2 else 0
    if head_maps.ndim != 2 or head_maps.shape[0] != len(variables):
        raise ValueError(
            f"classification-layer maps have shape {head_maps.shape}; expected "
            f"({len(variables)} variables, classes)"
        )
    names = [str(c) for c in (class_names or range(n_classes))]
    if len(names) != n_classes:
        raise ValueError(f"{len(names)} class names for {n_classes} classes")
    return head_maps, names


def _self_masking_plans(
    run: MaskedRun, chosen: Sequence[str], configs: Sequence[MaskConfig], stride: int
) -> list[list[PlanItem]]:
    """The passes per input set. Input set 0 (original) runs once unmasked for all variables
    (plan -1); input set 1 + v runs unmasked (plan v * stride + 1) and under each of v's
    masks (plans v * stride + 2 + c)."""
    plans: list[list[PlanItem]] = [[(-1, None)]]
    for v, variable in enumerate(chosen):
        plans.append([(v * stride + 1, None), *run.masks[variable].plan(configs, v * stride + 2)])
    return plans


def _jaccard_updates(
    metric: JaccardMean,
    classes: np.ndarray,
    n_classes: int,
    n: int,
    stride: int,
    device: torch.device,
) -> Callable[[int, int, Tensor, Tensor], None]:
    """The ``run_plans`` consumer: the Jaccard index of each pass's top-n predictions with the
    candidates (classes (V, n)) of the input set's variable; the unmasked originals (plan -1)
    count for every variable, at plan v * stride."""
    candidates = torch.zeros(len(classes), n_classes, dtype=torch.bool, device=device)
    candidates[torch.arange(len(classes))[:, None], torch.as_tensor(classes)] = True

    def consume(i: int, plan: int, logits: Tensor, labels: Tensor) -> None:
        top = logits.topk(n, dim=1).indices
        if plan < 0:  # one pass (the originals), never batched with others
            for v in range(len(classes)):
                metric.update(v * stride, jaccard(top, candidates[v]))
        else:  # passes plan, plan + 1, ... of the same inputs
            metric.update(plan, jaccard(top, candidates[i - 1]).view(-1, len(labels)))

    return consume
