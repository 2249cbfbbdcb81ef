"""The augmentation registry: the built-in 12 and the user's augmentations, registered one way.

An augmentation is a name, ordered parameters with bounds (at 224 px, see ``ParamSpec``),
optional identity values and a batched function ``fn(images, params) -> images``:

- images: (B, 3, H, W) float in [0, 1] (float32 or float64; half precision arrives as float32
  unless ``moves_data``), on CPU or CUDA; never modified in place;
- params: {parameter: (B,) float64 tensor} in natural units at H x W, on the images' device;
- returns (B, 3, H, W) of the images' dtype in [0, 1]; row b depends only on image b and the
  parameters of row b (the pipeline augments varying subsets of a batch), deterministically.

``register_augmentation`` (a call or a decorator) checks the registration, runs ``fn`` on a
small test batch (``check_augmentation``) and adds it to ``AUGMENTATIONS``, before any compute.
From then on the augmentation takes part in problems, every design, the order variable, DDP and
resume exactly like the built-ins, which ``sensitivity.augmentations`` registers the same way on
import (import this API from there, so that the built-ins are registered first).

Configurations name an augmentation by import path, "package.module:function", whose module
registers it on import (``import_augmentation``). A problem's config records every non-built-in
augmentation it uses (``registration_record``: import path, bounds, identity and a digest of the
spec and of the function's source code); building a problem from a record that differs from
this process's registration is refused (``check_record``), so results files and resume states
are never continued with another augmentation under the same name.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor

from sensitivity.augmentation_specs import (
    AUGMENTATIONS,
    BUILTIN,
    IMAGE_TOLERANCE,
    AugmentationSpec,
    Kernel,
    ParamSpec,
    augmentation_spec,
)
from sensitivity.provenance import describe_differences

__all__ = [
    "AUGMENTATIONS",
    "RESERVED_NAMES",
    "check_augmentation",
    "check_record",
    "import_augmentation",
    "register_augmentation",
    "registration_record",
    "unregister_augmentation",
]

RESERVED_NAMES = ("order", "class", "image", "partition")
"""A problem's auxiliary variables: they name groups beside the augmentations, so no
augmentation may take their names."""

CHECK_SHAPE = (4, 3, 16, 12)
"""The test batch of ``check_augmentation``: B, C, H, W (not square, so that H and W differ)."""

IDENTITY_TOLERANCE = 1e-5
"""Largest change of a pixel at the identity values: float32 round-off of a resampling (rotation
by 0) or of a colour-space round trip (hue by 0)."""

SUBSET_TOLERANCE = 1e-5
"""Largest difference between a row augmented in the whole test batch and in a part of it:
vectorised kernels may sum in another order for another batch size."""


def register_augmentation(
    name: str,
    fn: Kernel | None = None,
    *,
    params: Mapping[str, Sequence[float]] | Sequence[ParamSpec] = (),
    identity: Mapping[str, float] | None = None,
    moves_data: bool = False,
    check: bool = True,
) -> Kernel | Callable[[Kernel], Kernel]:
    """Register an augmentation; without ``fn``, a decorator that registers the function.

    Registering a name again is allowed only with the same spec and the same function source
    (a module imported again); anything else is refused, so that one name means one
    augmentation in a run.

    Args:
        name: a Python identifier, not an auxiliary variable's name (``RESERVED_NAMES``).
        fn: the batched function (module docstring); None returns a decorator.
        params: {parameter: (low, high)} in natural units, bounds that do not scale with the
            image, or ``ParamSpec``s, in design-column order, for integer parameters or ones
            stated at 224 px that scale with the image (``axis``).
        identity: {parameter: value} at which ``fn`` returns its input, within the bounds; None
            when no value does (the augmentation is off only when switched off).
        moves_data: ``fn`` only moves or zeroes values (exact in any dtype): it gets half
            precision images as they are instead of in float32.
        check: run ``check_augmentation`` before registering; the built-ins skip it (their
            exactness against torchvision is tested in tests/test_augmentations.py).

    Returns:
        ``fn`` itself, or the decorator, which returns the function it registers unchanged.

    Raises:
        ValueError: a bad name or parameter, bounds reversed or not finite, identity values
            missing, extra or outside the bounds, a name taken by another augmentation, or a
            function that ``check_augmentation`` refuses.
    """
    if fn is None:
        def decorator(function: Kernel) -> Kernel:
            return register_augmentation(
                name, function, params=params, identity=identity, moves_data=moves_data,
                check=check,
            )

        return decorator
    spec = _build_spec(name, fn, params, identity, moves_data)
    existing = AUGMENTATIONS.get(name)
    if existing is not None and _digest(existing) != _digest(spec):
        raise ValueError(
            f"augmentation {name!r} is already registered (from {existing.source}); choose "
            f"another name, or unregister_augmentation({name!r}) first to replace it"
        )
    if check:
        check_augmentation(spec)
    AUGMENTATIONS[name] = spec
    return fn


def unregister_augmentation(name: str) -> None:
    """Remove a registered augmentation (e.g. to register an edited version in a notebook).

    Args:
        name: a registered, non-built-in augmentation.

    Raises:
        ValueError: a built-in or unknown name.
    """
    if name in BUILTIN:
        raise ValueError(f"{name!r} is a built-in augmentation and cannot be unregistered")
    augmentation_spec(name)  # unknown: the ValueError lists the registered names
    del AUGMENTATIONS[name]


def import_augmentation(path: str) -> str:
    """Import an augmentation by path: the module registers it on import.

    Args:
        path: "package.module:function", the function registered in that module (decorated
            with ``register_augmentation`` or passed to it).

    Returns:
        The augmentation's registered name.

    Raises:
        ValueError: a malformed path, a module that cannot be imported (or whose import
            fails, e.g. a bad registration), no such attribute, or an attribute that is not a
            registered augmentation's function; each naming the path.
    """
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(
            f"augmentation import path {path!r} must be 'package.module:function' (the "
            f"registered function, e.g. mypackage.augmentations:channel_swap)"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as error:  # any failure of foreign code: name the path that caused it
        raise ValueError(
            f"cannot import {module_name!r} for augmentation {path!r} "
            f"({type(error).__name__}: {error}); is it installed or on PYTHONPATH?"
        ) from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"augmentation {path!r}: {module_name} has no attribute {attribute!r}")
        target = getattr(target, part)
    names = [n for n, spec in AUGMENTATIONS.items() if spec.fn is target]
    if not names:
        raise ValueError(
            f"{path!r} is not a registered augmentation: decorate it in its module with "
            f"@register_augmentation(name, params=..., identity=...)"
        )
    return names[0]


def check_augmentation(spec: AugmentationSpec) -> None:
    """Run an augmentation's function on a small test batch and check what it returns.

    The batch is ``CHECK_SHAPE`` float32 in [0, 1] from a fixed seed, with parameters drawn in
    the bounds at its size. Checked: no exception; (B, 3, H, W) of the input dtype in [0, 1];
    the input not modified; equal results of two calls with equal inputs; rows independent of
    the rest of the batch (``SUBSET_TOLERANCE``); the input returned at the identity values
    (``IDENTITY_TOLERANCE``).

    Args:
        spec: the augmentation (registered or not).

    Raises:
        ValueError: naming the augmentation, what is wrong and what to do.
    """
    label = f"augmentation {spec.name!r} ({spec.source or spec.fn!r})"
    batch, _, height, width = CHECK_SHAPE
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(CHECK_SHAPE, generator=generator)
    params = _draw_params(spec, generator, height, width)
    out = _checked_call(spec, images, params, label)
    if not torch.equal(out, _checked_call(spec, images, params, label)):
        raise ValueError(
            f"{label} gave different images in two calls with the same images and parameters: "
            f"it must be deterministic (derive any randomness from a parameter, e.g. a "
            f"generator seeded from it)"
        )
    part = slice(1, 3)
    subset = _checked_call(spec, images[part], {p: v[part] for p, v in params.items()}, label)
    if not torch.allclose(subset, out[part], rtol=0.0, atol=SUBSET_TOLERANCE):
        raise ValueError(
            f"{label} changes an image's result with the other images of the batch: each image "
            f"must depend only on itself and its own parameters (batch statistics are not "
            f"allowed: rows are augmented in varying subsets)"
        )
    if spec.identity is not None:
        at_identity = {
            p: torch.full((batch,), value, dtype=torch.float64)
            for p, value in spec.identity.items()
        }
        moved = float((_checked_call(spec, images, at_identity, label) - images).abs().max())
        if moved > IDENTITY_TOLERANCE:
            raise ValueError(
                f"{label} is not the identity at its identity values {spec.identity}: it "
                f"changed pixels by up to {moved:.3g}; give the values at which it returns its "
                f"input, or identity=None if there are none"
            )


def registration_record(name: str) -> dict[str, Any]:
    """What a problem's config records of a registered augmentation.

    Args:
        name: a registered augmentation.

    Returns:
        {"source": import path or None, "params": {parameter: [low, high]} at 224 px,
        "identity": {parameter: value} or None, "digest": sha256 hex of the whole spec and of
        the function's source code}; JSON-able.

    Raises:
        ValueError: an unknown name.
    """
    spec = augmentation_spec(name)
    return {
        "source": spec.source,
        "params": {p.name: [p.low, p.high] for p in spec.params},
        "identity": None if spec.identity is None else dict(spec.identity),
        "digest": _digest(spec),
    }


def check_record(name: str, record: Mapping[str, Any]) -> None:
    """Make sure ``name`` is registered as a config recorded it, importing it if needed.

    Args:
        name: the augmentation's name in the config.
        record: its ``registration_record`` as the config holds it.

    Raises:
        ValueError: not registered and no importable source, a source that registers another
            name, or a registration that differs from the record (naming the differences).
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"the config's record of augmentation {name!r} must be a mapping "
                         f"(registration_record), got {record!r}")
    if name not in AUGMENTATIONS:
        source = record.get("source")
        if not source:
            raise ValueError(
                f"augmentation {name!r} of this config is not registered and has no import "
                f"path; register it (import the module that does) before building the problem"
            )
        imported = import_augmentation(source)
        if imported != name:
            raise ValueError(
                f"{source!r} registers augmentation {imported!r}, but the config records it as "
                f"{name!r}"
            )
    differences = describe_differences(
        dict(record), registration_record(name), labels=("config", "registered")
    )
    if differences:
        raise ValueError(
            f"augmentation {name!r} is registered differently from the one this config was "
            f"made with: {differences}; results or resume states of another registration "
            f"cannot be continued: register the same function and spec, or start a new analysis"
        )


# ----------------------------------------------------------------------------- helpers


def _build_spec(
    name: str,
    fn: Kernel,
    params: Mapping[str, Sequence[float]] | Sequence[ParamSpec],
    identity: Mapping[str, float] | None,
    moves_data: bool,
) -> AugmentationSpec:
    """The spec of a registration, its name, parameters and identity checked."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(
            f"augmentation name {name!r} must be a Python identifier (letters, digits, _): it "
            f"names design columns ('{name}.<parameter>') and results"
        )
    if name in RESERVED_NAMES:
        raise ValueError(
            f"augmentation name {name!r} is an auxiliary variable's ({list(RESERVED_NAMES)}); "
            f"choose another"
        )
    if not callable(fn):
        raise ValueError(f"augmentation {name!r}: fn must be callable, got {type(fn).__name__}")
    specs = tuple(_param_spec(name, p, params) for p in params)
    if len({p.name for p in specs}) != len(specs):
        raise ValueError(f"augmentation {name!r}: parameter names repeat in {list(params)}")
    return AugmentationSpec(name, specs, _check_identity(name, specs, identity), fn,
                            bool(moves_data))


def _param_spec(
    name: str, item: str | ParamSpec, params: Mapping[str, Sequence[float]] | Sequence[ParamSpec]
) -> ParamSpec:
    """One parameter of a registration: a ``ParamSpec`` or a key of ``params``, checked."""
    if isinstance(item, ParamSpec):
        spec = item
    elif isinstance(item, str) and isinstance(params, Mapping):
        bounds = params[item]
        if isinstance(bounds, str) or not isinstance(bounds, Sequence) or len(bounds) != 2:
            raise ValueError(
                f"bounds of {name}.{item} must be (low, high), got {bounds!r}"
            )
        spec = ParamSpec(item, *bounds)
    else:
        raise ValueError(
            f"augmentation {name!r}: params must be {{name: (low, high)}} or ParamSpecs, got "
            f"an item {item!r}"
        )
    if not isinstance(spec.name, str) or not spec.name.isidentifier():
        raise ValueError(f"augmentation {name!r}: parameter name {spec.name!r} must be an "
                         f"identifier")
    low, high = spec.low, spec.high
    if not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in (low, high)):
        raise ValueError(f"bounds of {name}.{spec.name} must be finite numbers, got "
                         f"({low!r}, {high!r})")
    if not low < high:
        raise ValueError(
            f"bounds of {name}.{spec.name} must have low < high, got ({low}, {high}); reversed? "
            f"write them as (low, high)"
        )
    spec.bounds(224, 224)  # an unknown axis is a ValueError here, not at the first image
    return ParamSpec(spec.name, float(low), float(high), spec.integer, spec.axis)


def _check_identity(
    name: str, params: tuple[ParamSpec, ...], identity: Mapping[str, float] | None
) -> dict[str, float] | None:
    """The identity values as floats: one per parameter, inside its bounds, or None."""
    if identity is None:
        return None
    if not params:
        raise ValueError(
            f"augmentation {name!r} has no parameters, so no identity values: pass "
            f"identity=None (it is off only when switched off)"
        )
    expected = [p.name for p in params]
    if not isinstance(identity, Mapping) or set(identity) != set(expected):
        got = list(identity) if isinstance(identity, Mapping) else identity
        raise ValueError(
            f"identity of {name!r} must give a value for each parameter {expected}, got {got!r}"
        )
    values = {}
    for p in params:
        value = identity[p.name]
        if not isinstance(value, numbers.Real) or not p.low <= value <= p.high:
            raise ValueError(
                f"identity of {name}.{p.name} = {value!r} is outside its bounds "
                f"[{p.low}, {p.high}]; widen the bounds or fix the identity value"
            )
        if p.integer and value != round(value):
            raise ValueError(f"identity of {name}.{p.name} = {value} must be a whole number")
        values[p.name] = float(value)
    return values


def _draw_params(
    spec: AugmentationSpec, generator: torch.Generator, height: int, width: int
) -> dict[str, Tensor]:
    """Per-row parameters uniform in the bounds at ``height x width`` (integers rounded)."""
    batch = CHECK_SHAPE[0]
    params = {}
    for pspec, (low, high) in zip(spec.params, spec.bounds(height, width), strict=True):
        value = low + (high - low) * torch.rand(batch, generator=generator, dtype=torch.float64)
        params[pspec.name] = value.round() if pspec.integer else value
    return params


def _checked_call(
    spec: AugmentationSpec, images: Tensor, params: dict[str, Tensor], label: str
) -> Tensor:
    """``spec.fn(images, params)``, checked: no exception, shape, dtype, range, input intact."""
    before = images.clone()
    shape = tuple(images.shape)
    try:
        out = spec.fn(images, params)
    except Exception as error:  # foreign code: any failure is a bad registration
        raise ValueError(
            f"{label} raised {type(error).__name__}: {error} on a test batch {shape} float32 in "
            f"[0, 1] with parameters {{name: ({shape[0]},) float64}} in its bounds"
        ) from error
    if not isinstance(out, Tensor) or tuple(out.shape) != shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{label} returned {got} for images {shape}; return one augmented "
                         f"image per input, (B, 3, H, W)")
    if out.dtype != images.dtype:
        raise ValueError(f"{label} returned {out.dtype} for {images.dtype} images; return the "
                         f"images' dtype (e.g. out.to(images.dtype))")
    if not torch.equal(images, before):
        raise ValueError(f"{label} modified its input images in place; compute a new tensor "
                         f"(e.g. start from images.clone())")
    low, high = (float(v) for v in out.aminmax())
    if not (low >= -IMAGE_TOLERANCE and high <= 1 + IMAGE_TOLERANCE):
        raise ValueError(f"{label} returned values in [{low:.4g}, {high:.4g}], outside [0, 1]; "
                         f"clamp them (out.clamp(0, 1))")
    return out


def _digest(spec: AugmentationSpec) -> str:
    """sha256 of a spec and of its function's source code (or its import path where the source
    cannot be read, e.g. a function defined at an interactive prompt)."""
    try:
        code = inspect.getsource(spec.fn)
    except (OSError, TypeError):
        code = None
    described = {
        "name": spec.name,
        "params": [asdict(p) for p in spec.params],
        "identity": spec.identity,
        "moves_data": spec.moves_data,
        "source": spec.source,
        "code": code,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()

