"""Provenance: what an analysis was computed from, and where two such descriptions differ.

``provenance`` gives the attributes that make every /analyses/<name> group of a results file
describe itself (model, weights and their hash, dataset, image size, problem);
``describe_differences`` says, leaf by leaf, where two JSON-like descriptions differ, for the
messages that refuse to mix analyses of another run in one results file or to resume from a
checkpoint of other inputs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sensitivity.problem import AugmentationProblem

# --------------------------------------------------------------------------- differences
_MISSING = object()
_SHOWN_DIFFERENCES = 5
_SHORT_TEXT = 40


def _short(value: Any) -> str:
    """A value for a message: compact JSON (strings as they are); long ones keep their start
    and end, so that digests sharing a prefix still show where they differ."""
    if value is _MISSING:
        return "absent"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= _SHORT_TEXT else f"{text[:16]}...{text[-16:]}"


def _leaf_differences(old: Any, new: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    """(dotted path, old, new) of every leaf where two JSON-like values differ, in key order;
    mappings are followed key by key, anything else (a list, a number) is one leaf."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in [*old, *(key for key in new if key not in old)]:
            where = f"{path}.{key}" if path else str(key)
            yield from _leaf_differences(old.get(key, _MISSING), new.get(key, _MISSING), where)
    elif _plain(old) != _plain(new):
        yield path, old, new


def _plain(value: Any) -> Any:
    """Tuples as lists (recursively): a tuple equals the list of its items, as in JSON."""
    return [_plain(v) for v in value] if isinstance(value, list | tuple) else value


def describe_differences(old: Any, new: Any, labels: tuple[str, str] = ("saved", "now")) -> str:
    """Where two JSON-like values (nested dicts) differ, leaf by leaf, for an error message:
    "config.seed (saved 5, now 3); image_size (saved [64, 64], now [32, 32])", at most five
    leaves then "and k more"; "" when they are equal (a tuple equals the list of its items)."""
    found = list(_leaf_differences(old, new, ""))
    shown = [
        f"{path or 'value'} ({labels[0]} {_short(a)}, {labels[1]} {_short(b)})"
        for path, a, b in found[:_SHOWN_DIFFERENCES]
    ]
    if len(found) > _SHOWN_DIFFERENCES:
        shown.append(f"and {len(found) - _SHOWN_DIFFERENCES} more")
    return "; ".join(shown)


# --------------------------------------------------------------------------- provenance
def height_width(image_size: int | Sequence[int]) -> list[int]:
    """An image size as [height, width] in pixels: the one reading of an image size for the
    dry forwards (``capture``), the provenance and the results file's metadata.

    Args:
        image_size: one side (square images) or a (height, width) pair, in pixels.

    Returns:
        [height, width], ints >= 1.

    Raises:
        ValueError: for anything else.
    """
    size = [image_size, image_size] if isinstance(image_size, int) else image_size
    size = [int(s) for s in size]
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be an int or (height, width) >= 1, got {image_size!r}")
    return size


def provenance(
    *,
    model: str,
    weights: str | None,
    weights_sha256: str,
    dataset: str,
    image_size: int | Sequence[int],
    problem: AugmentationProblem,
) -> dict[str, Any]:
    """What an analysis was computed from, as attributes of its /analyses/<name> group
    (``write_analysis(attrs=...)``), so that every analysis describes itself.

    model: architecture; weights: their source (None: random initialisation, stored "none");
    weights_sha256: hex SHA-256 of the checkpoint or weights file, or of the state dict when
    the weights have no file (random initialisation, weights during training); dataset;
    image_size: side or (height, width); problem: stored as JSON text of its ``to_config()``.
    """
    return {
        "model": str(model),
        "weights": "none" if weights is None else str(weights),
        "weights_sha256": str(weights_sha256),
        "dataset": str(dataset),
        "image_size": height_width(image_size),
        "problem": json.dumps(problem.to_config(), sort_keys=True),
    }
