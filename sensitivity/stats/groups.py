"""The statistics groups of a results file: their kinds, the value types and covariates the
statistics compare, and one write/read path for their nested layout (docs/RESULTS_FORMAT.md:
/wilcoxon, /correlation, /lda, /comparison, one subgroup per layer (and value type))."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sensitivity.results import PER_VARIABLE_KEYS, AnalysisResult
from sensitivity.store import ResultsStore

# Value types compared by correlation and LDA (the maps masking uses), and covariates.
SENSITIVITY_KEYS = ("S1", "ST", "shapley_normalized")
COVARIATES = ("mean", "var", "cv")

WILCOXON_GROUP = "wilcoxon"
CORRELATION_GROUP = "correlation"
LDA_GROUP = "lda"
COMPARISON_GROUP = "comparison"


def check_overwrite(store: ResultsStore, kind: str, name: str, overwrite: bool) -> None:
    """ValueError when /<kind>/<name> exists and ``overwrite`` is False: checked before the
    (long) computation, not only when writing."""
    if not overwrite and store.has_group(f"{kind}/{name}"):
        raise ValueError(
            f"{store.path} already holds /{kind}/{name}; pass --overwrite to replace it"
        )


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"layer1": {"S1": {"variables": a}}} -> {"layer1/S1/variables": a} (h5py makes the
    intermediate groups)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def write_tree(store: ResultsStore, kind: str, name: str, tree: Mapping[str, Any],
               attrs: Mapping[str, Any], overwrite: bool) -> None:
    """Store the nested arrays ``tree`` ({subgroup: ... {dataset: array}}) and ``attrs`` as
    the group /<kind>/<name>, atomically (``ResultsStore.write_group``)."""
    store.write_group(f"{kind}/{name}", _flatten(tree), attrs, overwrite=overwrite)


def read_tree(results: str | Path, kind: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The group /<kind>/<name> of a results file, the inverse of ``write_tree``.

    Args:
        results: the results file.
        kind: the statistics kind ("wilcoxon", "correlation", "lda", "comparison").
        name: the analysis name.

    Returns:
        (nested {subgroup: ... {dataset: array}}, attrs as plain Python values); ValueError
        when the group does not exist or is incomplete.
    """
    return ResultsStore(results).read_group(f"{kind}/{name}", nested=True)


def value_keys(result: AnalysisResult, values: Sequence[str] | None, what: str) -> list[str]:
    """The value types ``what`` ("correlation", "lda") compares: ``values``, default those of
    ``SENSITIVITY_KEYS`` the analysis has; ValueError for none or one it lacks."""
    available = [
        key for key in PER_VARIABLE_KEYS
        if not key.endswith("_conf") and all(key in v for v in result.layers.values())
    ]
    if values is None:
        chosen = [key for key in SENSITIVITY_KEYS if key in available]
        if not chosen:
            raise ValueError(
                f"{what} compares sensitivity maps ({', '.join(SENSITIVITY_KEYS)}), but the "
                f"{result.method} analysis has none; name a sobol or shapley analysis, or "
                f"choose value types (--value-types) among {available}"
            )
        return chosen
    unknown = [key for key in values if key not in available]
    if unknown or not values:
        raise ValueError(
            f"value types {list(values)} are not all in this analysis; valid: {available}"
        )
    return list(values)
