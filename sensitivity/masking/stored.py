"""What masking takes from a stored analysis: the analysis and its problem, then its maps.

``read_stored_analysis`` reads an analysis of a results file together with the problem and the
image size it was computed on; ``masking_maps`` picks the value type, the masked layers and the
input augmentations (by default those of METHOD.md section 8) and takes the maps and their
valid units. ``analyze.py masking|single-class`` and ``callbacks.masking.MaskingCallback``
build their inputs with both, so that the command and the callback mask the same units.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from sensitivity.augmentations import AUGMENTATIONS
from sensitivity.layouts import UnitLayout
from sensitivity.masking.masks import default_value, sensitivity_maps
from sensitivity.masking.network import layer_outputs, positional_layers
from sensitivity.problem import AugmentationProblem
from sensitivity.provenance import height_width
from sensitivity.results import AnalysisResult
from sensitivity.store import ResultsStore


@dataclass(frozen=True)
class StoredAnalysis:
    """An analysis as a results file holds it.

    Attributes:
        result: the analysis (/analyses/<name>).
        problem: the file's /problem (its augmentations' bounds and postprocessing), None for a
            file without one.
        image_size: (H, W) in pixels of the probe it was computed on, None when the file does
            not say.
    """

    result: AnalysisResult
    problem: AugmentationProblem | None
    image_size: tuple[int, int] | None


def read_stored_analysis(store: ResultsStore, name: str) -> StoredAnalysis:
    """Read analysis ``name`` of ``store`` with the problem and image size of the file.

    Args:
        store: the results file.
        name: a complete analysis in it.

    Returns:
        The ``StoredAnalysis``.

    Raises:
        ValueError: when the file holds no complete analysis ``name`` (the message lists those
            it holds), or ``name`` analysed a single-channel segment (its layers H, S, V are
            not modules of the network that masking runs).
    """
    result = store.read_analysis(name)
    if "segment" in store.analysis_attrs(name):
        raise ValueError(
            f"analysis {name!r} analysed a single-channel segment (layers H, S, V), not the "
            f"network: masking and single-class need an analysis of the whole network; give "
            f"another --analysis"
        )
    meta = store.read_metadata()
    problem = None
    if "problem" in meta:
        problem = AugmentationProblem.from_config(json.loads(meta["problem"]["config"]))
    size = meta.get("image_size")
    return StoredAnalysis(result, problem, None if size is None else tuple(height_width(size)))


@dataclass(frozen=True)
class MaskingMaps:
    """The maps masks are made of, with the choices that made them.

    Attributes:
        value: the value type of the maps ("S1", "ST" or "shapley_normalized").
        layers: the masked layers (may be empty: no layer of the analysis has outputs with
            positions, maps or tokens, and none were named).
        augmentations: the input augmentations, each applied alone.
        maps: {layer: (G, *unit_shape) float64} in [0, 1] (``masks.sensitivity_maps``).
        valid: {layer: (*unit_shape) bool}, the units not flagged in the analysis.
        layouts: {layer: unit layout} the analysis recorded of the masked layers (none for
            results written before layouts were recorded): ``evaluate_masking(layouts=)``.
    """

    value: str
    layers: list[str]
    augmentations: list[str]
    maps: dict[str, np.ndarray]
    valid: dict[str, np.ndarray]
    layouts: dict[str, UnitLayout]


def masking_maps(
    result: AnalysisResult,
    model: nn.Module,
    image_size: tuple[int, int],
    *,
    value: str | None = None,
    layers: Sequence[str] | None = None,
    augmentations: Sequence[str] | None = None,
) -> MaskingMaps:
    """The maps of ``result`` that masking ``model`` uses, with the defaults filled in.

    Args:
        result: the stored analysis.
        model: the network to mask; one dry forward of a zero image (1, 3, H, W) finds the
            output layouts of the analysed layers (an error when they do not exist).
        image_size: (H, W) of the probe images, in pixels.
        value: the map's value type; None: ST, else shapley_normalized (``default_value``).
        layers: the masked layers; None: the analysed layers whose output has positions
            (maps (C, H, W) or (H, W, C), tokens (L, D); not flat (F,) ones).
        augmentations: the input augmentations; None: the analysis's augmentations.

    Returns:
        The ``MaskingMaps``.

    Raises:
        ValueError: for an analysis without sensitivity maps, layers it did not analyse or
            layers the model lacks, or a value type it has no maps of.
    """
    value = value or default_value(result)
    _, found = layer_outputs(model, result.layer_names, image_size,
                             layouts={layer: unit.layout for layer, unit in result.layouts.items()})
    chosen = list(layers or positional_layers(found))
    if augmentations is None:
        augmentations = [v for v in result.group_names if v in AUGMENTATIONS]
    maps, valid = sensitivity_maps(result, value, chosen)
    units = {layer: result.layouts[layer] for layer in chosen if layer in result.layouts}
    return MaskingMaps(value, chosen, list(augmentations), maps, valid, units)
