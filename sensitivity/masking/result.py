"""The result of guided masking: accuracies per input set, mask variable and configuration
(overall, per class, and the confusion matrices), and the specificity that summarises them
(METHOD.md section 8).

Profiles. What specificity compares, per (input set, mask variable), over the M configurations
(``MaskingResult.profile``):

- ``top1`` (default): the M top-1 accuracies;
- ``per_class``: the top-1 accuracy of each class under each configuration (M C features, the
  classes that have probe images); the overall accuracy can stay constant while classes trade
  places, so its specificity is NaN only where no class changes;
- ``confusion``: the confusion matrices under each configuration, each row divided by the
  class's inputs (M C C features; needs the stored confusion matrices).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.stats

from sensitivity.masking.clustering import SUBGROUP, ProfileClustering

# The group kind of masking results in a results file: /masking/<name>.
GROUP_KIND = "masking"
# What specificity can compare, with how figures name it.
PROFILES = {"top1": "top-1 accuracy", "per_class": "per-class top-1 accuracy",
            "confusion": "confusion rates"}


def specificity_matrix(accuracy: np.ndarray) -> np.ndarray:
    """(I - 1, V): Spearman correlation, over the F profile features (configurations, or
    configurations x classes), between the profile on input set i >= 1 and on the original
    inputs (set 0), per mask variable; accuracy is (I, V, F). NaN where a profile is
    constant."""
    n_inputs, n_variables, _ = accuracy.shape
    out = np.full((n_inputs - 1, n_variables), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.stats.ConstantInputWarning)
        for i in range(1, n_inputs):
            for v in range(n_variables):
                out[i - 1, v] = scipy.stats.spearmanr(accuracy[i, v], accuracy[0, v]).statistic
    return out


@dataclass
class MaskingResult:
    """Accuracies under guided masking.

    Attributes:
        inputs: "original", then the input augmentations (I).
        variables: mask variables (V); configurations: their labels (M).
        layers: masked layers (L); quantiles: the q of the quantile masks (Q).
        acc1, acc5: (I, V, M) top-1 / top-k accuracy in [0, 1] (k = ``top_k`` =
            min(5, classes)); unmasked_acc1, unmasked_acc5: (I,) without masks.
        specificity: (I - 1, V) Spearman correlations of the ``profile`` profiles
            (``specificity_matrix``); specificity_top5: (I - 1, V) of the top-k accuracies.
        masked_fraction: (V, Q, L) fraction of the layer's (map) units each quantile mask
            selects, flagged units never among them.
        tied: (V, Q, L) the quantile fell on the minimum of the layer's valid units.
        valid_fraction: (L,) share of each layer's (map) units that are valid, the most a mask
            can select (None: every unit, as for groups stored before flags existed).
        seconds: wall time of the evaluation, in seconds.
        class_acc1: (I, V, M, C) top-1 accuracy on the inputs of each class (NaN for a class
            without inputs); unmasked_class_acc1: (I, C) without masks.
        class_images: (I, C) int64, the inputs of each class in each input set.
        confusion: (I, V, M, C, C) int64 counts, rows the true class, columns the top-1
            prediction; unmasked_confusion: (I, C, C). None where not recorded (more classes
            than ``evaluate_masking``'s ``max_confusion_classes``).
        classes: (C) class names (default "0".."C-1").
        profile: what ``specificity`` compares (``PROFILES``, module docstring).
        clustering: the hierarchical clustering of the profiles, when computed
            (``clustering.cluster_masking``).

    The per-class fields are None for groups stored before they were recorded.
    """

    value: str
    analysis: str
    inputs: list[str]
    variables: list[str]
    configurations: list[str]
    layers: list[str]
    quantiles: list[float]
    acc1: np.ndarray
    acc5: np.ndarray
    unmasked_acc1: np.ndarray
    unmasked_acc5: np.ndarray
    masked_fraction: np.ndarray
    tied: np.ndarray
    ties: str
    top_k: int
    n_images: int
    k: int
    seed: int
    prefix_reuse: str
    seconds: float = 0.0
    epoch: int | None = None
    valid_fraction: np.ndarray | None = None
    class_acc1: np.ndarray | None = None
    unmasked_class_acc1: np.ndarray | None = None
    class_images: np.ndarray | None = None
    confusion: np.ndarray | None = None
    unmasked_confusion: np.ndarray | None = None
    classes: list[str] | None = None
    profile: str = "top1"
    clustering: ProfileClustering | None = None
    specificity: np.ndarray = field(init=False)
    specificity_top5: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"unknown masking profile {self.profile!r}; valid: {list(PROFILES)}")
        if self.valid_fraction is None:
            self.valid_fraction = np.ones(len(self.layers))
        self.valid_fraction = np.asarray(self.valid_fraction, dtype=np.float64)
        if self.classes is None and self.class_images is not None:
            self.classes = [str(c) for c in range(np.shape(self.class_images)[1])]
        self.specificity = specificity_matrix(self.profiles())
        self.specificity_top5 = specificity_matrix(self.acc5)

    def profiles(self, profile: str | None = None) -> np.ndarray:
        """The profile of every (input set, mask variable) (module docstring).

        Args:
            profile: one of ``PROFILES``; None: ``self.profile``.

        Returns:
            (I, V, F) float64: F = M (top1), M C' (per_class) or M C' C (confusion),
            configuration-major, over the C' classes with inputs in every input set.

        Raises:
            ValueError: the result lacks the arrays the profile needs.
        """
        profile = profile or self.profile
        if profile == "top1":
            return np.asarray(self.acc1, dtype=np.float64)
        if self.class_acc1 is None or self.class_images is None:
            raise ValueError(f"profile {profile!r} needs per-class accuracies; this result has "
                             "none (stored before they were recorded)")
        seen = np.all(np.asarray(self.class_images) > 0, axis=0)
        n_inputs, n_variables = np.shape(self.acc1)[:2]
        if profile == "per_class":
            return np.asarray(self.class_acc1)[..., seen].reshape(n_inputs, n_variables, -1)
        if self.confusion is None:
            raise ValueError("profile 'confusion' needs the confusion matrices, which are "
                             "recorded up to max_confusion_classes classes")
        images = np.asarray(self.class_images)[:, None, None, seen, None]
        rates = np.asarray(self.confusion)[..., seen, :] / images
        return rates.reshape(n_inputs, n_variables, -1)

    @property
    def tied_layers(self) -> int:
        """(variable, quantile, layer) triples whose quantile fell on the layer's minimum."""
        return int(np.count_nonzero(self.tied))

    @property
    def fully_masked_layers(self) -> int:
        """(variable, quantile, layer) triples whose quantile mask selects every valid unit
        (of a layer that has some)."""
        full = (self.masked_fraction >= self.valid_fraction) & (self.valid_fraction > 0)
        return int(np.count_nonzero(full))

    _ARRAYS = ("acc1", "acc5", "unmasked_acc1", "unmasked_acc5", "masked_fraction", "tied")
    _CLASS_ARRAYS = ("class_acc1", "unmasked_class_acc1", "class_images", "confusion",
                     "unmasked_confusion")
    _ATTRS = ("value", "analysis", "inputs", "variables", "configurations", "layers",
              "quantiles", "ties", "top_k", "n_images", "k", "seed", "prefix_reuse", "seconds")

    def arrays(self) -> dict[str, np.ndarray]:
        """The datasets of the /masking/<name> group (docs/RESULTS_FORMAT.md): those of the
        clustering as "clustering/<key>"."""
        keys = (*self._ARRAYS, "valid_fraction", "specificity", "specificity_top5")
        arrays = {key: np.asarray(getattr(self, key)) for key in keys}
        arrays.update({key: np.asarray(getattr(self, key)) for key in self._CLASS_ARRAYS
                       if getattr(self, key) is not None})
        if self.clustering is not None:
            arrays.update(self.clustering.arrays())
        return arrays

    def attrs(self) -> dict[str, Any]:
        """The attributes of the /masking/<name> group (epoch -1: not known)."""
        attrs = {key: getattr(self, key) for key in self._ATTRS}
        attrs.update(epoch=-1 if self.epoch is None else self.epoch,
                     tied_layers=self.tied_layers, fully_masked_layers=self.fully_masked_layers,
                     profile=self.profile)
        if self.classes is not None:
            attrs["classes"] = list(self.classes)
        if self.clustering is not None:
            attrs.update(self.clustering.attrs())
        return attrs

    @classmethod
    def from_group(
        cls, arrays: Mapping[str, Any], attrs: Mapping[str, Any]
    ) -> MaskingResult:
        """The result back from a stored group's (arrays, attrs) (``ResultsStore.read_group``;
        with ``nested=True`` the clustering too). Groups written before flags existed have no
        ``valid_fraction``, those written before per-class counts no per-class fields."""
        fields = {key: attrs[key] for key in cls._ATTRS}
        fields.update({key: arrays[key] for key in cls._ARRAYS})
        fields.update({key: arrays.get(key) for key in cls._CLASS_ARRAYS})
        fields["tied"] = np.asarray(fields["tied"], dtype=bool)
        epoch = int(attrs.get("epoch", -1))
        nested = arrays.get(SUBGROUP)
        classes = attrs.get("classes")
        return cls(**fields, epoch=None if epoch < 0 else epoch,
                   valid_fraction=arrays.get("valid_fraction"),
                   classes=None if classes is None else [str(c) for c in classes],
                   profile=str(attrs.get("profile", "top1")),
                   clustering=(ProfileClustering.from_group(nested, attrs)
                               if isinstance(nested, Mapping) else None))

    def table(self) -> list[tuple[str, str, str, float, float]]:
        """Rows (input, variable, configuration, acc1, acc5), unmasked rows first
        (variable and configuration "none")."""
        rows = [(name, "none", "none", float(self.unmasked_acc1[i]), float(self.unmasked_acc5[i]))
                for i, name in enumerate(self.inputs)]
        for i, name in enumerate(self.inputs):
            for v, variable in enumerate(self.variables):
                for c, config in enumerate(self.configurations):
                    rows.append((name, variable, config, float(self.acc1[i, v, c]),
                                 float(self.acc5[i, v, c])))
        return rows

    def class_table(self) -> list[tuple[str, str, str, list[float]]]:
        """Rows (input, variable, configuration, per-class top-1 accuracies (C)) in the order
        of ``table``; [] without per-class accuracies."""
        if self.class_acc1 is None or self.unmasked_class_acc1 is None:
            return []
        rows = [(name, "none", "none", [float(a) for a in self.unmasked_class_acc1[i]])
                for i, name in enumerate(self.inputs)]
        for i, name in enumerate(self.inputs):
            for v, variable in enumerate(self.variables):
                for c, config in enumerate(self.configurations):
                    rows.append((name, variable, config,
                                 [float(a) for a in self.class_acc1[i, v, c]]))
        return rows
