"""The result of guided masking: accuracies per input set, mask variable and configuration,
and the specificity that summarises them (METHOD.md section 8)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.stats

# The group kind of masking results in a results file: /masking/<name>.
GROUP_KIND = "masking"


def specificity_matrix(accuracy: np.ndarray) -> np.ndarray:
    """(I - 1, V): Spearman correlation, over configurations, between the accuracy profile on
    input set i >= 1 and on the original inputs (set 0), per mask variable; accuracy is
    (I, V, M). NaN where a profile is constant."""
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
        specificity, specificity_top5: (I - 1, V) (``specificity_matrix``).
        masked_fraction: (V, Q, L) fraction of the layer's (map) units each quantile mask
            selects, flagged units never among them.
        tied: (V, Q, L) the quantile fell on the minimum of the layer's valid units.
        valid_fraction: (L,) share of each layer's (map) units that are valid, the most a mask
            can select (None: every unit, as for groups stored before flags existed).
        seconds: wall time of the evaluation, in seconds.
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
    specificity: np.ndarray = field(init=False)
    specificity_top5: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if self.valid_fraction is None:
            self.valid_fraction = np.ones(len(self.layers))
        self.valid_fraction = np.asarray(self.valid_fraction, dtype=np.float64)
        self.specificity = specificity_matrix(self.acc1)
        self.specificity_top5 = specificity_matrix(self.acc5)

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
    _ATTRS = ("value", "analysis", "inputs", "variables", "configurations", "layers",
              "quantiles", "ties", "top_k", "n_images", "k", "seed", "prefix_reuse", "seconds")

    def arrays(self) -> dict[str, np.ndarray]:
        """The datasets of the /masking/<name> group (docs/RESULTS_FORMAT.md)."""
        keys = (*self._ARRAYS, "valid_fraction", "specificity", "specificity_top5")
        return {key: np.asarray(getattr(self, key)) for key in keys}

    def attrs(self) -> dict[str, Any]:
        """The attributes of the /masking/<name> group (epoch -1: not known)."""
        attrs = {key: getattr(self, key) for key in self._ATTRS}
        attrs.update(epoch=-1 if self.epoch is None else self.epoch,
                     tied_layers=self.tied_layers, fully_masked_layers=self.fully_masked_layers)
        return attrs

    @classmethod
    def from_group(
        cls, arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any]
    ) -> MaskingResult:
        """The result back from a stored group's (arrays, attrs) (``ResultsStore.read_group``);
        groups written before flags existed have no ``valid_fraction``."""
        fields = {key: attrs[key] for key in cls._ATTRS}
        fields.update({key: arrays[key] for key in cls._ARRAYS})
        fields["tied"] = np.asarray(fields["tied"], dtype=bool)
        epoch = int(attrs.get("epoch", -1))
        return cls(**fields, epoch=None if epoch < 0 else epoch,
                   valid_fraction=arrays.get("valid_fraction"))

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
