"""Single-channel segments (the reference's series 3): which early units hue, saturation or
value drive.

A segment is a short chain of a network's first modules ("conv1", "bn1", "relu" of a ResNet;
"features.0", "features.1" of AlexNet; a whole block such as "layer1.0" for a residual segment),
keeping selected output channels of its last module. ``SegmentNetwork`` converts the augmented
image (in [0, 1]) to HSV, repeats each of H, S and V alone over the three input channels, runs
the three single-channel images through the chain in one forward of the stacked batch and hands
each stream's output to its own named identity module, ``H``, ``S`` and ``V``: the engine
captures them as three layers, so the results file, figures, W&B, DDP and resume treat every
stream like any layer. ``top_channels`` picks the channels from a stored analysis (the top k
valid units by a variable's index).

Imports torch, numpy and the rest of ``sensitivity``; never Lightning or wandb.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sensitivity.capture import hookable_layers, model_device
from sensitivity.layouts import features_first
from sensitivity.output_layouts import LayoutTracker
from sensitivity.provenance import height_width
from sensitivity.report import SIGNED_KEYS
from sensitivity.results import AnalysisResult

# The streams, in the order they are stacked and captured: hue, saturation, value.
STREAMS = ("H", "S", "V")
IMAGE_CHANNELS = 3


def rgb_to_hsv(images: Tensor) -> Tensor:
    """HSV of RGB images, as ``colorsys.rgb_to_hsv`` and ``matplotlib.colors.rgb_to_hsv``.

    Args:
        images: (B, 3, H, W) float RGB in [0, 1].

    Returns:
        (B, 3, H, W): hue in [0, 1) (a fraction of the colour circle, 0 red), saturation
        (max - min) / max and value max over the channels, all in [0, 1]. Gray pixels have hue
        0, black ones saturation 0.
    """
    red, green, blue = images.unbind(dim=1)
    value = images.amax(dim=1)
    delta = value - images.amin(dim=1)
    chromatic = delta > 0
    # Divide by 1 where there is no chroma (the hue is set to 0 there), never by 0.
    chroma = torch.where(chromatic, delta, torch.ones_like(delta))
    sector = torch.where(
        red == value, (green - blue) / chroma,
        torch.where(green == value, 2 + (blue - red) / chroma, 4 + (red - green) / chroma),
    )
    hue = torch.where(chromatic, torch.remainder(sector / 6, 1.0), torch.zeros_like(sector))
    lit = value > 0
    saturation = torch.where(lit, delta / torch.where(lit, value, torch.ones_like(value)),
                             torch.zeros_like(delta))
    return torch.stack((hue, saturation, value), dim=1)


class SegmentNetwork(nn.Module):
    """A chain of a network's first modules run on H, S and V of the image, one stream each.

    Args:
        network: the network whose ``named_modules()`` name the segment's modules (an
            ImageClassifier's ``.net``). The segment shares its modules (and weights).
        modules: module names, run in this order on the input: each takes the output of the
            one before (e.g. ["conv1", "bn1", "relu"]); listed in the network's order, none
            inside another. The first convolution takes the image (3 channels).
        channels: output channels of the last module to keep, in this order (a stream's unit
            c is channel ``channels[c]``); None keeps them all.
        mean, std: (3,) the network's input normalisation, applied to each stream repeated over
            the three channels (the network sees a gray image of that brightness); None feeds
            H, S and V in [0, 1] as they are.
        image_size: H (square) or (H, W) of the images, for the dry forward that checks the
            chain.

    ``forward(images)`` takes (B, 3, H, W) RGB in [0, 1] and forwards one batch (3B, 3, H, W):
    the B images' H, then their S, then their V, each repeated over the three input
    channels. It returns the streams' outputs (B, k, H', W') as a tuple (H, S, V), each passed
    through the identity module of its name, where ``ActivationCapture`` hooks them (layers
    "H", "S", "V"). A batch of B rows holds 3B images in the chain.

    Raises:
        ValueError: no or unknown module names (the valid ones listed), repeated or nested
            names, names out of the network's order, no convolution, a first convolution that
            does not take the image, modules that do not chain (naming the one that fails), an
            output that is no (B, C, H, W) map in NCHW order, or channels out of range or
            repeated.
    """

    def __init__(
        self,
        network: nn.Module,
        modules: Sequence[str],
        channels: Sequence[int] | None = None,
        *,
        mean: Tensor | None = None,
        std: Tensor | None = None,
        image_size: int | Sequence[int] = 224,
    ) -> None:
        super().__init__()
        self.module_names = _checked_names(network, modules)
        named = dict(network.named_modules())
        self.chain = nn.Sequential(*(named[name] for name in self.module_names))
        _check_input(self.chain, self.module_names)
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std of the input normalisation, or neither")
        shape = (1, IMAGE_CHANNELS, 1, 1)
        self.register_buffer("mean", None if mean is None else mean.reshape(shape).clone(),
                             persistent=False)
        self.register_buffer("std", None if std is None else std.reshape(shape).clone(),
                             persistent=False)
        self.out_channels = self._dry_channels(image_size)
        kept = list(range(self.out_channels)) if channels is None else list(channels)
        _check_channels(kept, self.out_channels, self.module_names[-1])
        self.register_buffer("channels", torch.tensor(kept, dtype=torch.int64))
        for name in STREAMS:
            self.add_module(name, nn.Identity())
        # A persistent copy of the description: the model's digest (the resume fingerprint)
        # then tells two segments apart even where their weights are the same.
        spec = json.dumps(self.describe(), sort_keys=True).encode()
        self.register_buffer("spec", torch.tensor(list(spec), dtype=torch.uint8))

    def describe(self) -> dict[str, Any]:
        """What the segment is, as plain values (recorded with its analyses).

        Returns:
            {"modules", "channels" (unit order), "out_channels" (of the last module, before
            the selection), "streams", "normalized" (the input normalisation applied)}.
        """
        return {
            "modules": list(self.module_names),
            "channels": self.channels.tolist(),
            "out_channels": self.out_channels,
            "streams": list(STREAMS),
            "normalized": self.mean is not None,
        }

    def streams(self, images: Tensor) -> Tensor:
        """The chain's input: the single-channel images of every stream.

        Args:
            images: (B, 3, H, W) RGB in [0, 1].

        Returns:
            (3B, 3, H, W): H of the B images, then S, then V, each repeated over the three
            channels and normalised when the network normalises.
        """
        stacked = torch.cat(rgb_to_hsv(images).split(1, dim=1))
        stacked = stacked.expand(-1, IMAGE_CHANNELS, -1, -1)
        if self.mean is None:
            return stacked
        return (stacked - self.mean) / self.std

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        """The streams' outputs.

        Args:
            images: (B, 3, H, W) RGB in [0, 1].

        Returns:
            (H, S, V), each (B, k, H', W'): the kept channels of the chain's output.
        """
        out = self.chain(self.streams(images)).index_select(1, self.channels)
        parts = out.chunk(len(STREAMS))
        return tuple(getattr(self, name)(part) for name, part in zip(STREAMS, parts, strict=True))

    def _dry_channels(self, image_size: int | Sequence[int]) -> int:
        """The channels of the chain's output on one zero image, checking that the modules
        chain and that the output is an NCHW map."""
        height, width = height_width(image_size)
        device, dtype = model_device(self.chain)
        value = torch.zeros(1, IMAGE_CHANNELS, height, width, device=device, dtype=dtype)
        modes = {m: m.training for m in self.chain.modules()}
        self.chain.eval()
        tracker = LayoutTracker(self.chain)
        try:
            with torch.no_grad(), tracker:
                for name, module in zip(self.module_names, self.chain, strict=True):
                    value = _run(name, module, value)
        finally:
            for module, mode in modes.items():
                module.training = mode
        if not isinstance(value, Tensor) or value.ndim != 4 or tracker.axes != "NCHW":
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"segment {self.module_names} ends with output {shape}; a segment must end "
                f"with a (B, C, H, W) map in NCHW order whose channels it keeps: end it at a "
                f"convolution, a block or a module after one (batch norm, activation, pooling)"
            )
        return int(value.shape[1])


def _checked_names(network: nn.Module, modules: Sequence[str]) -> list[str]:
    """The segment's module names, checked against the network (``SegmentNetwork``)."""
    if isinstance(modules, str) or not modules:
        raise ValueError(f"a segment needs a list of module names, e.g. [conv1, bn1, relu]; "
                         f"got {modules!r}")
    names = [str(name) for name in modules]
    order = {name: i for i, name in enumerate(hookable_layers(network))}
    unknown = [name for name in names if name not in order]
    if unknown:
        raise ValueError(f"unknown segment module(s) {unknown}; valid names: "
                         f"{', '.join(order)}")
    if len(set(names)) != len(names):
        raise ValueError(f"segment modules {names} repeat a name; list each once")
    nested = [(outer, inner) for outer in names for inner in names
              if inner.startswith(f"{outer}.")]
    if nested:
        raise ValueError(f"segment modules {nested} are nested (the second runs inside the "
                         f"first); list a block or its parts, not both")
    if [order[name] for name in names] != sorted(order[name] for name in names):
        raise ValueError(f"segment modules {names} are not in the network's order "
                         f"({sorted(names, key=order.__getitem__)}); list them as they run")
    return names


def _check_input(chain: nn.Sequential, names: Sequence[str]) -> None:
    """ValueError unless the chain's first convolution takes the image's three channels."""
    first = next((m for m in chain.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ValueError(f"segment {list(names)} has no convolution: its channels would be "
                         f"the image's; start it at the network's first convolution")
    if first.in_channels != IMAGE_CHANNELS:
        raise ValueError(
            f"segment {list(names)} does not start at the network's input: its first "
            f"convolution takes {first.in_channels} channels, not the image's "
            f"{IMAGE_CHANNELS}; start it at the network's first convolution (the streams are "
            f"images)"
        )


def _run(name: str, module: nn.Module, value: Any) -> Any:
    """``module(value)`` of the dry forward; a ValueError naming the module that fails."""
    try:
        return module(value)
    except (RuntimeError, TypeError, ValueError, AttributeError) as error:
        given = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"segment modules do not chain: {name} ({type(module).__name__}) cannot take "
            f"{given}, the output of the modules before it ({error}); list the modules that "
            f"run one after the other from the input"
        ) from error


def _check_channels(channels: list[int], available: int, last: str) -> None:
    """ValueError unless ``channels`` are distinct integers in [0, available)."""
    if not channels:
        raise ValueError("segment channels are empty; give at least one, or none for all")
    bad = [c for c in channels if isinstance(c, bool) or not isinstance(c, int | np.integer)
           or not 0 <= c < available]
    if bad:
        raise ValueError(f"segment channels {bad} are out of range: {last} has {available} "
                         f"output channels (0 to {available - 1})")
    if len(set(channels)) != len(channels):
        raise ValueError(f"segment channels {channels} repeat a channel; list each once")


def top_channels(
    result: AnalysisResult, layer: str, variable: str, key: str, k: int
) -> tuple[list[int], list[float]]:
    """The k channels of a layer with the largest index of one variable, valid units only.

    A channel's score is its unit's value (units (C,)) or the mean over its valid positions
    (maps (C, H, W), NHWC and tokens taken channels first); the magnitude for signed keys
    (mean_diff, effect_size). Flagged units never count: a channel without a valid unit is
    never picked.

    Args:
        result: a stored analysis.
        layer: its layer whose channels are ranked.
        variable: one of its variables (``group_names``).
        key: a per-variable value key it has (S1, ST, shapley_normalized, ...).
        k: how many channels, >= 1.

    Returns:
        (channels, scores), largest score first (ties by channel index).

    Raises:
        ValueError: an unknown layer, variable or key (the valid ones listed), k < 1, or fewer
            than k channels with a valid unit.
    """
    if layer not in result.layers:
        raise ValueError(f"the analysis has no layer {layer!r}; layers: {result.layer_names}")
    if variable not in result.group_names:
        raise ValueError(f"the analysis has no variable {variable!r}; variables: "
                         f"{result.group_names}")
    keys = [key for key in result.layers[layer] if key in result.value_keys]
    if key not in keys:
        raise ValueError(f"the analysis ({result.method}) has no per-variable key {key!r}; "
                         f"keys: {keys}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {k!r}")
    layout = result.unit_layout(layer)
    values = features_first(result.layers[layer][key], 1, layout)[
        result.group_names.index(variable)]
    valid = features_first(result.valid(layer), 0, layout) & np.isfinite(values)
    values = np.abs(values) if key in SIGNED_KEYS else values
    flat_values = values.reshape(len(values), -1)
    flat_valid = valid.reshape(len(valid), -1)
    counts = flat_valid.sum(axis=1)
    scores = np.where(flat_valid, flat_values, 0.0).sum(axis=1) / np.maximum(counts, 1)
    ranked = [c for c in np.argsort(-scores, kind="stable") if counts[c] > 0]
    if len(ranked) < k:
        raise ValueError(
            f"only {len(ranked)} channels of layer {layer!r} have a valid unit (the others are "
            f"flagged); ask for top_k <= {len(ranked)}"
        )
    chosen = [int(c) for c in ranked[:k]]
    return chosen, [float(scores[c]) for c in chosen]
