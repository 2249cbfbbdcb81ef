"""The arguments of an ``AugmentationProblem`` (sensitivity.problem), checked and resolved:
augmentation names (a set number, names, or import paths of registered augmentations), the
probability p_on that each is applied, and parameter bounds narrowed within the published
ranges. Every bad value is a ValueError naming it and what is valid.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from sensitivity.augmentations import AUGMENTATION_SETS, AUGMENTATIONS, ParamSpec
from sensitivity.registry import import_augmentation

DEFAULT_P_ON = 0.5


def resolve_augmentations(augmentations: int | str | Sequence[str]) -> list[str]:
    """Augmentation names of a set number or a list of names and import paths, checked."""
    if isinstance(augmentations, bool):
        raise ValueError(f"augmentations must be a set number or names, got {augmentations!r}")
    if isinstance(augmentations, int | np.integer):
        if int(augmentations) not in AUGMENTATION_SETS:
            raise ValueError(
                f"unknown augmentation set {augmentations!r}; valid sets: "
                f"{sorted(AUGMENTATION_SETS)}"
            )
        return list(AUGMENTATION_SETS[int(augmentations)])
    names = [augmentations] if isinstance(augmentations, str) else list(augmentations)
    if not names:
        raise ValueError("augmentations is empty; give a set number (1, 2) or at least one name")
    # "package.module:function" imports a user's augmentation, which registers itself
    names = [import_augmentation(n) if isinstance(n, str) and ":" in n else n for n in names]
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ValueError(
            f"unknown augmentation(s) {unknown}; valid names: {list(AUGMENTATIONS)}, or the "
            f"import path 'package.module:function' of a registered augmentation"
        )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"augmentation(s) {duplicates} listed more than once; list each once")
    return names


def _check_probability(name: str, value: object) -> float:
    """``value`` as a probability in (0, 1], or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise ValueError(f"p_on for {name} must be a number in (0, 1], got {value!r}")
    p = float(value)
    if not (math.isfinite(p) and 0.0 < p <= 1.0):
        raise ValueError(
            f"p_on for {name} must be in (0, 1] (probability that it is applied), got {p}"
        )
    return p


def resolve_p_on(p_on: float | Mapping[str, float], names: list[str]) -> dict[str, float]:
    """{augmentation: p_on} from one number or a partial mapping (missing: DEFAULT_P_ON)."""
    if isinstance(p_on, Mapping):
        unknown = [n for n in p_on if n not in names]
        if unknown:
            raise ValueError(f"p_on given for {unknown}, which are not in this problem {names}")
        return {n: _check_probability(n, p_on.get(n, DEFAULT_P_ON)) for n in names}
    return {n: _check_probability(n, p_on) for n in names}


def resolve_params(
    names: list[str], bounds: Mapping[str, Mapping[str, Sequence[float]]] | None
) -> dict[str, tuple[ParamSpec, ...]]:
    """Parameter specs per augmentation, narrowed by custom ``bounds`` (stated at 224 px)."""
    params = {n: AUGMENTATIONS[n].params for n in names}
    for name, overrides in (bounds or {}).items():
        if name not in params:
            raise ValueError(f"bounds given for {name!r}, which is not in this problem {names}")
        specs = {p.name: p for p in params[name]}
        for pname, value in overrides.items():
            if pname not in specs:
                raise ValueError(
                    f"{name} has no parameter {pname!r}; its parameters: {list(specs)}"
                )
            spec = specs[pname]
            low, high = (float(v) for v in value)
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(
                    f"bounds of {name}.{pname} must be finite with low < high, got {value!r}"
                )
            if low < spec.low or high > spec.high:
                raise ValueError(
                    f"bounds of {name}.{pname} {[low, high]} leave the published range "
                    f"[{spec.low}, {spec.high}] (at 224 px); narrow them"
                )
            specs[pname] = dataclasses.replace(spec, low=low, high=high)
        params[name] = tuple(specs[p.name] for p in params[name])
    return params
