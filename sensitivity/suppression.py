"""Inference-time suppression of a nuisance variable (issue #18): attenuate the units most
sensitive to it, choose how on a validation split, report on a held-out test split.

Distortion: ``sensitivity.distortion.NuisanceDistortion``, the nuisance augmentation v at
strength s in [0, 1] (s = 0: the clean image), the same draws for every candidate and control.

Candidates. The masks of guided masking (``sensitivity.masking``) of v's map: every
configuration of the grid (alpha x q quantile masks and the soft masks) at each masked layer
alone and at every masked layer at once (``scope``). Each is scored on the validation split by
``criterion`` over its top-1 accuracies at s = 0 and at every strength: "mean" (of clean and
distorted), "worst" (their minimum) or "distorted" (the mean of the distorted ones only); the
highest score wins (ties: the first candidate).

Structural guarantee. ``select_suppression`` takes the validation images only; ``run_suppression``
takes the test split as a loader it calls after the choice is fixed, so no test image can reach
the choice.

Controls. On the test split: the unmasked network, the chosen mask, and ``random_draws`` random
masks with exactly the chosen mask's unit count at every layer: quantile masks select as many
valid units chosen uniformly at random (``masks.random_units_mask``) and scale them by the same
alpha; soft masks permute their factors among the layer's valid units (the same multiset of
factors, so the same count of attenuated units).

This module imports torch and numpy; never Lightning or wandb.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from sensitivity.capture import model_device
from sensitivity.distortion import RANDOM_STREAM, TEST_STREAM, VAL_STREAM, NuisanceDistortion
from sensitivity.masking import (
    MaskConfig,
    MaskedAccuracy,
    MaskedNetwork,
    MaskingMaps,
    VariableMasks,
    configuration_quantiles,
    default_configurations,
    factor_mask,
    layer_outputs,
    load_images,
    map_placement,
    random_units_mask,
    run_plans,
    selection_mask,
)
from sensitivity.masking.masks import MapPlacement
from sensitivity.masking.network import Mask
from sensitivity.problem import AugmentationProblem
from sensitivity.units import unit_mask

# The group kind of suppression results in a results file: /suppression/<name>.
GROUP_KIND = "suppression"
CRITERIA = ("mean", "worst", "distorted")
SCOPES = ("both", "per_layer", "across")
ACROSS = "all"  # the scope of a candidate masked at every masked layer at once

Images = Tensor | Dataset


# ------------------------------------------------------------------------------ candidates
@dataclass(frozen=True)
class Candidate:
    """A suppression candidate: one mask configuration at one masked layer or at all of them.

    Attributes:
        scope: a masked layer, or ``ACROSS`` for every masked layer at once.
        config: the mask configuration.
    """

    scope: str
    config: MaskConfig

    @property
    def label(self) -> str:
        """"<scope>:<configuration>", e.g. "layer3:alpha=0,q=0.9"."""
        return f"{self.scope}:{self.config.label}"


def suppression_candidates(
    layers: Sequence[str], configs: Sequence[MaskConfig], scope: str = "both"
) -> list[Candidate]:
    """The candidates: each configuration per layer ("per_layer"), across all layers
    ("across") or both (per layer first; across only with several layers, where it differs)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {list(SCOPES)}, got {scope!r}")
    scopes = [] if scope == "across" else list(layers)
    if scope == "across" or (scope == "both" and len(layers) > 1):
        scopes.append(ACROSS)
    return [Candidate(s, c) for s in scopes for c in configs]


def _count(selected: Tensor, soft: bool) -> int:
    """Units a placed mask tensor touches: selected ones, or factors other than 1."""
    return int((selected != 1.0).sum() if soft else selected.sum())


class SuppressionMasks:
    """The masks of one variable's map at the masked layers, their unit counts and their
    random controls.

    Args:
        model: the network (one dry forward finds the layers' outputs).
        maps: the maps of the stored analysis (``masking.masking_maps``).
        variables: the analysis's variables (the maps' first axis).
        variable: the nuisance variable.
        image_size: (H, W) in pixels.
        configs: the configurations (their quantiles are computed once).
        ties: "strict" or "inclusive" (``masks.quantile_mask``).
        layer_root: where the layers are named (default ``model.net`` or ``model``).
    """

    def __init__(
        self,
        model: nn.Module,
        maps: MaskingMaps,
        variables: Sequence[str],
        variable: str,
        image_size: tuple[int, int],
        configs: Sequence[MaskConfig],
        ties: str = "strict",
        layer_root: nn.Module | None = None,
    ) -> None:
        if variable not in variables:
            raise ValueError(f"variable {variable!r} is not in the analysis; it has "
                             f"{list(variables)}")
        self.layers = list(maps.layers)
        v = list(variables).index(variable)
        shapes, found = layer_outputs(model, self.layers, image_size, layer_root,
                                      {k: u.layout for k, u in maps.layouts.items()})
        self.placements: dict[str, MapPlacement] = {
            layer: map_placement(layer, maps.maps[layer].shape[1:], shapes[layer], found[layer],
                                 maps.layouts.get(layer)) for layer in self.layers}
        self.maps = {layer: maps.maps[layer][v] for layer in self.layers}
        self.valid = {layer: unit_mask(maps.valid.get(layer), self.maps[layer].shape, "the map")
                      for layer in self.layers}
        self.device = model_device(model)[0]
        self.masks = VariableMasks(self.maps, self.placements, configuration_quantiles(configs),
                                   ties, self.device, self.valid)

    def _scope(self, candidate: Candidate) -> list[str]:
        return self.layers if candidate.scope == ACROSS else [candidate.scope]

    def mask(self, candidate: Candidate) -> Mask:
        """The candidate's mask, at the layers of its scope."""
        full = self.masks.mask(candidate.config)
        return {layer: full[layer] for layer in self._scope(candidate)}

    def _tensors(self, config: MaskConfig) -> dict[str, Tensor]:
        """The placed tensors of a configuration: selections or factors, per layer."""
        if config.kind == "quantile":
            return self.masks.selected[config.q]
        return self.masks.soft if config.kind == "soft" else self.masks.soft_inverse

    def unit_counts(self, candidate: Candidate) -> np.ndarray:
        """(L,) int64: map units the candidate touches per masked layer (0 outside its
        scope; channels for channel-mean maps)."""
        tensors, soft = self._tensors(candidate.config), candidate.config.kind != "quantile"
        scope = self._scope(candidate)
        return np.array([_count(tensors[layer], soft) if layer in scope else 0
                         for layer in self.layers], dtype=np.int64)

    def random_mask(
        self, candidate: Candidate, rng: np.random.Generator
    ) -> tuple[Mask, np.ndarray]:
        """A random control of ``candidate`` (module docstring): (mask, (L,) unit counts,
        counted on the random mask itself)."""
        config, selected, counts = candidate.config, {}, []
        target = self.unit_counts(candidate)
        for layer, count in zip(self.layers, target, strict=True):
            if layer not in self._scope(candidate):
                counts.append(0)
                continue
            valid = np.flatnonzero(self.valid[layer].ravel())
            values = np.ones(self.maps[layer].size, dtype=np.float32)
            if config.kind == "quantile":
                pick = random_units_mask((len(valid),), int(count), rng)
                values = np.zeros(self.maps[layer].size, dtype=bool)
                values[valid[pick]] = True
            else:  # the configuration's factors, permuted among the valid units
                factors = self._factors(layer, config.kind)
                values[valid] = rng.permutation(factors[valid])
            placed = self.placements[layer].place(
                torch.as_tensor(values.reshape(self.maps[layer].shape), device=self.device),
                config.kind != "quantile")
            selected[layer] = placed
            counts.append(_count(placed, config.kind != "quantile"))
        mask = (selection_mask(selected, config.alpha) if config.kind == "quantile"
                else factor_mask(selected))
        return mask, np.array(counts, dtype=np.int64)

    def _factors(self, layer: str, kind: str) -> np.ndarray:
        """The flat map-domain factors of a soft mask (1 at flagged units)."""
        m = self.maps[layer].ravel().astype(np.float32)
        values = m if kind == "soft" else 1.0 - m
        return np.where(self.valid[layer].ravel(), values, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------ evaluation
class _DistortedInputs:
    """The input sets of ``run_plans``: a split clean (s = 0) and at each strength.

    It has what ``run_plans`` reads of a ``ProbeInputs``: ``names``, ``k`` (1), ``n_images``
    and ``batch``."""

    def __init__(self, images: Images, labels: Tensor, distortion: NuisanceDistortion,
                 strengths: Sequence[float], stream: int) -> None:
        self.images, self.labels = images, torch.as_tensor(labels, dtype=torch.int64)
        self.n_images = len(self.labels)
        self.distortion, self.strengths, self.stream = distortion, list(strengths), stream
        self.names = ["clean", *(f"s={s:g}" for s in self.strengths)]
        self.k = 1

    def batch(self, start: int, stop: int, device: torch.device,
              dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
        """[(images (B, 3, H, W), labels (B,))] clean, then at each strength."""
        images = load_images(self.images, start, stop).to(device, dtype)
        labels = self.labels[start:stop].to(device)
        index = torch.arange(start, stop)
        return [(images, labels)] + [
            (self.distortion(images, s, self.stream, index), labels) for s in self.strengths]


def masked_accuracies(
    network: MaskedNetwork,
    masks: Sequence[Mask | None],
    images: Images,
    labels: Tensor,
    distortion: NuisanceDistortion,
    strengths: Sequence[float],
    stream: int,
    *,
    batch_images: int = 16,
    progress: bool = False,
    desc: str = "suppression",
) -> np.ndarray:
    """Top-1 accuracy of every mask, clean and at every strength.

    Args:
        network: the masked network (its layers include every mask's).
        masks: the masks (None: unmasked).
        images, labels: the split: (N, 3, H, W) in [0, 1] (or a Dataset of them) and (N,).
        distortion, strengths, stream: the distortion, its strengths and the split's stream.
        batch_images, progress, desc: as ``masking.run_plans``.

    Returns:
        (len(masks), 1 + S) float64: column 0 clean, then the strengths in order.
    """
    inputs = _DistortedInputs(images, labels, distortion, strengths, stream)
    plan = list(enumerate(masks))
    metric = MaskedAccuracy(len(inputs.names), len(plan), 1, int(inputs.labels.max()) + 1,
                            confusion=False)
    device = model_device(network.model)[0]
    metric = metric.to(device)
    run_plans(network, inputs, [plan] * len(inputs.names), metric.update,  # type: ignore[arg-type]
              batch_images=batch_images, device=device, progress=progress, desc=desc,
              work=f"{inputs.n_images} images x {len(inputs.names)} strengths x {len(plan)} masks")
    accuracy = metric.compute()["accuracy"][:, :, 0]
    return accuracy.cpu().numpy().T.astype(np.float64)


def criterion_scores(accuracy: np.ndarray, criterion: str) -> np.ndarray:
    """The selection score of accuracies (..., 1 + S), column 0 clean (module docstring)."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {list(CRITERIA)}, got {criterion!r}")
    if criterion == "worst":
        return accuracy.min(axis=-1)
    return accuracy[..., 1:].mean(axis=-1) if criterion == "distorted" else accuracy.mean(axis=-1)


# ------------------------------------------------------------------------------- selection
@dataclass(frozen=True)
class Selection:
    """The choice on the validation split.

    Attributes:
        candidates: the K candidates, in order.
        accuracy: (K, 1 + S) their validation top-1 accuracies, clean then per strength.
        unmasked: (1 + S,) the unmasked network's.
        scores: (K,) the criterion's score of each; unmasked_score the unmasked one's.
        index: the chosen candidate (the first of the highest score).
        n_images: validation images.
    """

    candidates: list[Candidate]
    accuracy: np.ndarray
    unmasked: np.ndarray
    scores: np.ndarray
    unmasked_score: float
    index: int
    n_images: int

    @property
    def chosen(self) -> Candidate:
        """The chosen candidate."""
        return self.candidates[self.index]


def select_suppression(
    network: MaskedNetwork,
    masks: SuppressionMasks,
    candidates: Sequence[Candidate],
    val_images: Images,
    val_labels: Tensor,
    distortion: NuisanceDistortion,
    strengths: Sequence[float],
    criterion: str = "mean",
    *,
    batch_images: int = 16,
    progress: bool = False,
) -> Selection:
    """Choose the candidate with the best validation score; it sees validation data only.

    Args:
        network: the masked network over ``masks.layers``.
        masks: the variable's masks.
        candidates: the candidates (``suppression_candidates``).
        val_images, val_labels: the validation split, (N, 3, H, W) in [0, 1] and (N,).
        distortion, strengths: the nuisance distortion and its strengths in (0, 1].
        criterion: "mean", "worst" or "distorted" (``criterion_scores``).
        batch_images, progress: as ``masked_accuracies``.

    Returns:
        The selection.
    """
    if not candidates:
        raise ValueError("no suppression candidates")
    criterion_scores(np.zeros(1 + len(strengths)), criterion)  # bad criteria fail up front
    accuracy = masked_accuracies(
        network, [None, *(masks.mask(c) for c in candidates)], val_images, val_labels,
        distortion, strengths, VAL_STREAM, batch_images=batch_images, progress=progress,
        desc="suppression (validation)")
    scores = criterion_scores(accuracy, criterion)
    return Selection(list(candidates), accuracy[1:], accuracy[0], scores[1:], float(scores[0]),
                     int(np.argmax(scores[1:])), len(val_labels))


@dataclass(frozen=True)
class TestEvaluation:
    """The held-out evaluation of a chosen candidate.

    Attributes:
        unmasked, chosen: (1 + S,) top-1 accuracies, clean then per strength.
        random: (D, 1 + S) those of the D random controls.
        unit_counts: (L,) units the chosen mask touches per masked layer.
        random_unit_counts: (D, L) those of each random control (equal to ``unit_counts``).
        n_images: test images.
    """

    unmasked: np.ndarray
    chosen: np.ndarray
    random: np.ndarray
    unit_counts: np.ndarray
    random_unit_counts: np.ndarray
    n_images: int


def evaluate_suppression(
    network: MaskedNetwork,
    masks: SuppressionMasks,
    chosen: Candidate,
    test_images: Images,
    test_labels: Tensor,
    distortion: NuisanceDistortion,
    strengths: Sequence[float],
    *,
    random_draws: int = 5,
    seed: int = 0,
    batch_images: int = 16,
    progress: bool = False,
) -> TestEvaluation:
    """Test accuracies of the unmasked network, the chosen mask and its random controls.

    Args:
        network, masks: as ``select_suppression``.
        chosen: the chosen candidate (fixed before this is called).
        test_images, test_labels: the held-out split.
        distortion, strengths: as ``select_suppression``.
        random_draws: random controls, drawn from ``seed`` (``RANDOM_STREAM``).
        batch_images, progress: as ``masked_accuracies``.

    Returns:
        The evaluation.
    """
    if random_draws < 0:
        raise ValueError(f"random_draws must be >= 0, got {random_draws}")
    rng = np.random.default_rng([int(seed), RANDOM_STREAM])
    controls = [masks.random_mask(chosen, rng) for _ in range(random_draws)]
    accuracy = masked_accuracies(
        network, [None, masks.mask(chosen), *(m for m, _ in controls)], test_images, test_labels,
        distortion, strengths, TEST_STREAM, batch_images=batch_images, progress=progress,
        desc="suppression (test)")
    counts = np.array([c for _, c in controls], dtype=np.int64).reshape(random_draws,
                                                                        len(masks.layers))
    return TestEvaluation(accuracy[0], accuracy[1], accuracy[2:], masks.unit_counts(chosen),
                          counts, len(test_labels))


# ---------------------------------------------------------------------------------- result
@dataclass
class SuppressionResult:
    """A suppression experiment, as /suppression/<name> stores it (docs/RESULTS_FORMAT.md).

    Accuracies are top-1, their last axis (1 + S) clean (s = 0) then ``strengths`` in order.

    Attributes:
        analysis, value, variable: the analysis, its map value type, the nuisance variable.
        criterion, scope, ties: how candidates were made and chosen.
        layers: the L masked layers; layer_units (L,) their valid map units.
        strengths: (S,) distortion strengths in (0, 1]; distortion: what they mean.
        candidates, candidate_scopes, candidate_configurations: (K,) labels, scopes (a layer
            or "all") and configuration labels.
        val_acc1: (K, 1 + S); val_score: (K,); val_unmasked_acc1: (1 + S,);
            val_unmasked_score: the unmasked network's score.
        chosen, chosen_index: the chosen candidate's label and index.
        test_unmasked_acc1, test_chosen_acc1: (1 + S,); test_random_acc1: (D, 1 + S).
        unit_counts: (L,) units the chosen mask touches; random_unit_counts: (D, L).
        n_val, n_test, random_draws, seed, prefix_reuse, seconds: the run's sizes and notes.
    """

    analysis: str
    value: str
    variable: str
    criterion: str
    scope: str
    ties: str
    layers: list[str]
    distortion: str
    chosen: str
    chosen_index: int
    val_unmasked_score: float
    n_val: int
    n_test: int
    random_draws: int
    seed: int
    prefix_reuse: str
    strengths: np.ndarray
    layer_units: np.ndarray
    candidates: np.ndarray
    candidate_scopes: np.ndarray
    candidate_configurations: np.ndarray
    val_acc1: np.ndarray
    val_score: np.ndarray
    val_unmasked_acc1: np.ndarray
    test_unmasked_acc1: np.ndarray
    test_chosen_acc1: np.ndarray
    test_random_acc1: np.ndarray
    unit_counts: np.ndarray
    random_unit_counts: np.ndarray
    seconds: float = field(default=0.0)

    _ATTRS = ("analysis", "value", "variable", "criterion", "scope", "ties", "layers",
              "distortion", "chosen", "chosen_index", "val_unmasked_score", "n_val", "n_test",
              "random_draws", "seed", "prefix_reuse", "seconds")
    _ARRAYS = ("strengths", "layer_units", "candidates", "candidate_scopes",
               "candidate_configurations", "val_acc1", "val_score", "val_unmasked_acc1",
               "test_unmasked_acc1", "test_chosen_acc1", "test_random_acc1", "unit_counts",
               "random_unit_counts")

    @property
    def conditions(self) -> list[str]:
        """The 1 + S accuracy columns: "clean", "s=<strength>"..."""
        return ["clean", *(f"s={s:g}" for s in self.strengths)]

    def arrays(self) -> dict[str, np.ndarray]:
        """The datasets of the /suppression/<name> group."""
        return {key: np.asarray(getattr(self, key)) for key in self._ARRAYS}

    def attrs(self) -> dict[str, Any]:
        """The attributes of the /suppression/<name> group."""
        return {key: getattr(self, key) for key in self._ATTRS}

    @classmethod
    def from_group(
        cls, arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any]
    ) -> SuppressionResult:
        """The result back from a stored group (``ResultsStore.read_group``)."""
        values = {key: attrs[key] for key in cls._ATTRS}
        values["layers"] = list(values["layers"])
        arrays = {key: np.asarray(arrays[key]) for key in cls._ARRAYS}
        for key in ("candidates", "candidate_scopes", "candidate_configurations"):
            arrays[key] = arrays[key].astype(str)
        return cls(**values, **arrays)


def _result(
    selection: Selection, test: TestEvaluation, masks: SuppressionMasks, **recorded: Any
) -> SuppressionResult:
    """The SuppressionResult of a selection and its test evaluation; ``recorded`` are the
    remaining fields."""
    chosen = selection.chosen
    return SuppressionResult(
        chosen=chosen.label, chosen_index=selection.index,
        val_unmasked_score=selection.unmasked_score, n_val=selection.n_images,
        n_test=test.n_images, layers=list(masks.layers),
        layer_units=np.array([int(masks.valid[layer].sum()) for layer in masks.layers]),
        candidates=np.array([c.label for c in selection.candidates]),
        candidate_scopes=np.array([c.scope for c in selection.candidates]),
        candidate_configurations=np.array([c.config.label for c in selection.candidates]),
        val_acc1=selection.accuracy, val_score=selection.scores,
        val_unmasked_acc1=selection.unmasked, test_unmasked_acc1=test.unmasked,
        test_chosen_acc1=test.chosen, test_random_acc1=test.random,
        unit_counts=test.unit_counts, random_unit_counts=test.random_unit_counts, **recorded,
    )


# ------------------------------------------------------------------------------ experiment
def check_strengths(strengths: Sequence[float]) -> list[float]:
    """The strengths as floats, each in (0, 1] and distinct; ValueError otherwise."""
    values = [float(s) for s in strengths]
    if not values or any(not 0.0 < s <= 1.0 for s in values) or len(set(values)) < len(values):
        raise ValueError(f"strengths must be distinct values in (0, 1], e.g. [0.25, 0.5, 1.0]; "
                         f"got {list(strengths)}")
    return values


def run_suppression(
    model: nn.Module,
    maps: MaskingMaps,
    variables: Sequence[str],
    variable: str,
    val: tuple[Images, Tensor],
    load_test: Callable[[], tuple[Images, Tensor]],
    *,
    strengths: Sequence[float] = (0.25, 0.5, 1.0),
    criterion: str = "mean",
    scope: str = "both",
    configurations: Sequence[MaskConfig] | None = None,
    random_draws: int = 5,
    seed: int = 0,
    ties: str = "strict",
    problem: AugmentationProblem | None = None,
    analysis: str = "",
    batch_images: int = 16,
    reuse_prefix: bool = True,
    layer_root: nn.Module | None = None,
    progress: bool = False,
) -> SuppressionResult:
    """The whole experiment: candidates, the choice on ``val``, then the test evaluation.

    ``load_test`` is called only after the choice is fixed: the test split cannot reach it.

    Args:
        model: the network (its device is used).
        maps: the stored analysis's maps (``masking.masking_maps``): masked layers, values.
        variables: the analysis's variables (the maps' first axis).
        variable: the nuisance variable (an augmentation).
        val: (images (N, 3, H, W) in [0, 1] or a Dataset of them, labels (N,)).
        load_test: returns the test split in the same form.
        strengths: distortion strengths in (0, 1] (``check_strengths``).
        criterion, scope: the selection criterion and the candidates' scopes.
        configurations: default the 17 of ``masking.default_configurations``.
        random_draws, seed: random controls; the seed also draws the distortions.
        ties: as ``masking.quantile_mask``.
        problem: the analysed problem (the nuisance's bounds).
        analysis: the analysis's name, recorded.
        batch_images, reuse_prefix, layer_root, progress: as ``masking.evaluate_masking``.

    Returns:
        The result; ValueError before any forward for bad options or a variable that is no
        augmentation or not in the analysis.
    """
    started = time.perf_counter()
    strengths = check_strengths(strengths)
    configs = list(configurations or default_configurations())
    criterion_scores(np.zeros(1), criterion)
    distortion = NuisanceDistortion(variable, seed, problem)
    val_images, val_labels = val
    first = load_images(val_images, 0, 1)
    size = (int(first.shape[-2]), int(first.shape[-1]))
    masks = SuppressionMasks(model, maps, variables, variable, size, configs, ties, layer_root)
    candidates = suppression_candidates(masks.layers, configs, scope)
    network = MaskedNetwork(model, masks.layers, reuse_prefix, layer_root)
    options = {"batch_images": batch_images, "progress": progress}
    selection = select_suppression(network, masks, candidates, val_images, val_labels,
                                   distortion, strengths, criterion, **options)
    test_images, test_labels = load_test()  # only now: the choice is fixed
    test = evaluate_suppression(network, masks, selection.chosen, test_images, test_labels,
                                distortion, strengths, random_draws=random_draws, seed=seed,
                                **options)
    return _result(
        selection, test, masks, analysis=analysis, value=maps.value, variable=variable,
        criterion=criterion, scope=scope, ties=ties, distortion=distortion.describe(),
        random_draws=random_draws, seed=seed, prefix_reuse=network.split_note,
        strengths=np.array(strengths), seconds=time.perf_counter() - started,
    )
