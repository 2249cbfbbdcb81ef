"""Guided masking (METHOD.md section 8): damage the units most sensitive to a variable and
measure top-1/top-5 accuracy on original and on singly-augmented inputs.

Masks. For a value type ("S1" or "ST" clipped to [0, 1], or "shapley_normalized" clipped to
[0, 1]) and a variable v, every masked layer gets its map M_v. Quantile masks: t = q-quantile of
M_v over the layer's valid units (numpy's linear interpolation); valid units with M_v >= t are
multiplied by alpha, for alpha in ALPHAS x q in QUANTILES. Soft masks multiply every valid unit
by M_v ("soft") or by 1 - M_v ("soft_inverse"). 15 + 2 = 17 configurations; one variable's mask
is applied at every masked layer at once. Default masked layers: the convolutional checkpoints,
i.e. the analysed layers whose output per image is (C, H, W).

Flagged units. Units the analysis flagged (``AnalysisResult.flags``: zero, unsupported or
negligible variance) have no meaningful M_v; their raw values can be anything. They are left out
of the quantile, never selected by a quantile mask, and left untouched (factor 1) by the soft
masks; ``sensitivity_maps`` returns which units are valid next to the maps.

Map shapes. A map of reduction "none" has the layer's output shape (C, H, W) and masks units one
by one. A channel-mean map (C,) masks whole channels: its factor is broadcast over H and W and
the quantile is taken over the C channels. Anything else is a ValueError.

Ties. When many map values are equal to the layer's minimum (typically 0: clipped negative S1
estimates, dead units), the quantile can equal the minimum and "M_v >= t" would select the whole
layer. ``ties="strict"`` (default) then masks only M_v > t; ``ties="inclusive"`` keeps the
published rule. Either way the result counts those layers (``tied``) and reports the fraction
of units each quantile mask selects, so fully masked layers are visible.

Prefix reuse. All configurations of all variables share the network up to the first masked
layer. The network (``model.net`` of an ImageClassifier, whose forward is
``net(normalize(x))``, or a plain network) is traced with torch.fx, the masked layers kept as
leaf modules, and split at the first masked layer in execution order: the prefix graph returns
every value the rest of the network still needs (the first masked layer's output and anything
else live there, e.g. a skip connection) and the suffix graph takes them as inputs. Per input
batch the prefix runs once; per configuration only the suffix runs, the first layer's mask
applied to the cached (unmasked) output, the other layers' masks by forward hooks, which fire
in the suffix because it calls the very same module objects. A network fx cannot trace (data-
dependent control flow) falls back to full masked forwards with a warning.

Inputs. Per probe image: the original, and for each input augmentation K images with only that
augmentation applied and its parameters drawn afresh (``ContrastDesign`` over a problem with the
analysis's bounds and postprocessing, so the draws are reproducible from the seed and shardable
by image).

Distributed. Images are sharded over ranks (contiguous, ``engine.shard_range``); accuracies are
sums in a torchmetrics Metric (``dist_reduce_fx="sum"``), so every rank gets the global result.

Progress (``progress=True``, rank zero, stderr; ``sensitivity.progress``): the image forwards
of the masked part up front, then a bar (terminal) or plain lines (logs) with rate and ETA.

This module imports torch, numpy, scipy and matplotlib; never Lightning or wandb.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import torch
import torch.fx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchmetrics import Metric

from sensitivity.augmentations import AUGMENTATIONS
from sensitivity.capture import ActivationCapture, model_device
from sensitivity.designs import ContrastDesign
from sensitivity.engine import hooked_module, shard_range
from sensitivity.problem import AugmentationProblem
from sensitivity.progress import Progress
from sensitivity.results import AnalysisResult
from sensitivity.store import ResultsStore

ALPHAS = (0.0, 0.5, 1.5)
QUANTILES = (0.5, 0.6, 0.7, 0.8, 0.9)
VALUE_KEYS = ("S1", "ST", "shapley_normalized")
TIES = ("strict", "inclusive")
KINDS = ("quantile", "soft", "soft_inverse")
ORIGINAL = "original"
GROUP_KIND = "masking"

# A mask: layer name -> function of the layer's output (B, *shape) returning the masked output.
Mask = dict[str, Callable[[Tensor], Tensor]]


# ------------------------------------------------------------------------------ configurations
@dataclass(frozen=True)
class MaskConfig:
    """One mask configuration: ``kind`` "quantile" (units with M >= q-quantile times
    ``alpha``), "soft" (activation * M) or "soft_inverse" (activation * (1 - M))."""

    kind: str
    alpha: float = 1.0
    q: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown mask kind {self.kind!r}; valid: {list(KINDS)}")
        if self.kind == "quantile" and not (0.0 <= self.q <= 1.0 and self.alpha >= 0.0):
            raise ValueError(f"quantile masks need 0 <= q <= 1 and alpha >= 0, got {self}")

    @property
    def label(self) -> str:
        """"alpha=0,q=0.5", "soft" or "soft_inverse"."""
        return f"alpha={self.alpha:g},q={self.q:g}" if self.kind == "quantile" else self.kind


def default_configurations(
    alphas: Sequence[float] = ALPHAS, quantiles: Sequence[float] = QUANTILES, soft: bool = True
) -> list[MaskConfig]:
    """Quantile masks alpha-major (alpha 0: q 0.5..0.9, then alpha 0.5, ...), then the two
    soft masks: the published 17 configurations by default."""
    configs = [MaskConfig("quantile", float(a), float(q)) for a in alphas for q in quantiles]
    if soft:
        configs += [MaskConfig("soft"), MaskConfig("soft_inverse")]
    if not configs:
        raise ValueError("no mask configurations: give alphas and quantiles, or soft=True")
    return configs


# ------------------------------------------------------------------------------------- maps
def default_value(result: AnalysisResult) -> str:
    """The value type masking uses by default: ST (Sobol; never negative, so fewer ties than
    S1), else normalised Shapley effects."""
    for key in ("ST", "S1", "shapley_normalized"):
        if all(key in values for values in result.layers.values()):
            return key
    raise ValueError(
        f"analysis of method {result.method!r} has no sensitivity maps ({list(VALUE_KEYS)}); "
        "masking needs a sobol (S1, ST) or shapley (shapley_normalized) analysis"
    )


def sensitivity_maps(
    result: AnalysisResult, value: str, layers: Sequence[str]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(maps, valid): maps {layer: (G, *u) float64}, the ``value`` maps of ``layers`` clipped
    to [0, 1] (a non-finite value, never expected, counts as 0); valid {layer: (*u) bool}, the
    units not flagged in ``result.flags`` (the only ones masks may rank or select)."""
    if value not in VALUE_KEYS:
        raise ValueError(f"value must be one of {list(VALUE_KEYS)}, got {value!r}")
    missing = [layer for layer in layers if layer not in result.layers]
    if missing:
        raise ValueError(
            f"layers {missing} were not analysed; the analysis has {result.layer_names}"
        )
    maps = {}
    for layer in layers:
        if value not in result.layers[layer]:
            raise ValueError(
                f"layer {layer!r} has no {value} maps (a {result.method} analysis has "
                f"{sorted(result.layers[layer])}); choose a value among {list(VALUE_KEYS)} "
                "that the analysis computed"
            )
        values = np.nan_to_num(result.layers[layer][value], nan=0.0, posinf=1.0, neginf=0.0)
        maps[layer] = np.clip(values, 0.0, 1.0)
    return maps, {layer: result.valid(layer) for layer in layers}


def layer_output_shapes(
    model: nn.Module,
    layers: Sequence[str],
    image_size: tuple[int, int],
    layer_root: nn.Module | None = None,
) -> dict[str, tuple[int, ...]]:
    """{layer: output shape per image} of ``model``'s named layers (one dry forward)."""
    capture = ActivationCapture(hooked_module(model, layer_root), list(layers), "none", [])
    return capture.unit_shapes(image_size, forward=model)


def convolutional_layers(output_shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """The layers whose output per image is (C, H, W)."""
    return [layer for layer, shape in output_shapes.items() if len(shape) == 3]


def broadcast_shape(
    layer: str, map_shape: tuple[int, ...], output_shape: tuple[int, ...]
) -> tuple[int, ...]:
    """The shape a map of ``map_shape`` takes to multiply the layer's output (without batch):
    the output shape itself, or (C, 1, 1) for a channel map (C,) of a (C, H, W) output."""
    if tuple(map_shape) == tuple(output_shape):
        return tuple(output_shape)
    if len(map_shape) == 1 and len(output_shape) == 3 and map_shape[0] == output_shape[0]:
        return (map_shape[0], 1, 1)
    raise ValueError(
        f"the maps of layer {layer!r} have unit shape {tuple(map_shape)} but the model's layer "
        f"outputs {tuple(output_shape)} per image: the results belong to another model or "
        "image size; pass the model and --data.image_size the analysis used (masking needs "
        "maps of reduction 'none' or 'channel_mean')"
    )


# ------------------------------------------------------------------------------------ masks
def quantile_mask(
    values: np.ndarray, q: float, ties: str = "strict", valid: np.ndarray | None = None
) -> tuple[np.ndarray, bool]:
    """(selected, tied): the valid units with ``values >= t``, t the q-quantile of the valid
    units' ``values``.

    values: (*u); valid: (*u) bool, default every unit; flagged units are never selected and
    do not move t. tied: t equals the valid units' minimum, so ``values >= t`` selects every
    valid unit; with ``ties="strict"`` the selection is then ``values > t`` (units at the
    minimum, typically zeros, stay). Without valid units nothing is selected (not tied).
    """
    if ties not in TIES:
        raise ValueError(f"ties must be one of {list(TIES)}, got {ties!r}")
    mask = _valid_mask(valid, values.shape)
    pool = values[mask]
    if pool.size == 0:
        return np.zeros(values.shape, dtype=bool), False
    threshold = float(np.quantile(pool, q))
    tied = threshold <= float(pool.min())
    if tied and ties == "strict":
        return (values > threshold) & mask, True
    return (values >= threshold) & mask, tied


def top_units_mask(
    values: np.ndarray, count: int, valid: np.ndarray | None = None
) -> np.ndarray:
    """Exactly ``count`` valid units with the largest ``values`` (ties: lower flat index
    first). values: (*u); valid: (*u) bool, default every unit; ValueError when fewer than
    ``count`` units are valid."""
    order = np.argsort(-values.ravel(), kind="stable")
    order = order[_valid_mask(valid, values.shape).ravel()[order]]
    if count > len(order):
        raise ValueError(f"{count} units requested but only {len(order)} are valid")
    flat = np.zeros(values.size, dtype=bool)
    flat[order[:count]] = True
    return flat.reshape(values.shape)


def _valid_mask(valid: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """(*shape) bool: ``valid``, or every unit when None; ValueError on another shape."""
    if valid is None:
        return np.ones(shape, dtype=bool)
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != tuple(shape):
        raise ValueError(f"valid has shape {valid.shape}, the map {tuple(shape)}")
    return valid


def random_units_mask(shape: tuple[int, ...], count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` units chosen uniformly at random without replacement."""
    flat = np.zeros(math.prod(shape), dtype=bool)
    flat[rng.choice(flat.size, size=count, replace=False)] = True
    return flat.reshape(shape)


def selection_mask(selected: Mapping[str, Tensor], alpha: float) -> Mask:
    """Multiply the selected units (bool tensors broadcastable to each layer's output) by
    ``alpha``; the others are left as they are."""
    return {
        layer: (lambda out, m=m: torch.where(m, out * alpha, out)) for layer, m in selected.items()
    }


def factor_mask(factors: Mapping[str, Tensor]) -> Mask:
    """Multiply each layer's output by a factor tensor broadcastable to it."""
    return {layer: (lambda out, w=w: out * w) for layer, w in factors.items()}


class VariableMasks:
    """The masks of one variable at every masked layer, on the model's device.

    maps: {layer: M_v (map shape)} in [0, 1]; shapes: {layer: broadcast shape}; valid:
    {layer: (map shape) bool} the units masks may touch (default: every unit of every layer).
    Quantile selections are computed once per q and shared by every alpha.
    fraction[q][layer]: fraction of the layer's map units the q mask selects (flagged units
    are never selected); tied[q][layer]: the quantile fell on the minimum of the layer's valid
    units (see ``quantile_mask``). The soft factors are M_v and 1 - M_v at valid units, 1 at
    flagged ones.
    """

    def __init__(
        self,
        maps: Mapping[str, np.ndarray],
        shapes: Mapping[str, tuple[int, ...]],
        quantiles: Sequence[float],
        ties: str,
        device: torch.device,
        valid: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        masks = {layer: _valid_mask(None if valid is None else valid[layer], m.shape)
                 for layer, m in maps.items()}
        self.soft: dict[str, Tensor] = {}
        self.soft_inverse: dict[str, Tensor] = {}
        for layer, m in maps.items():
            weight = torch.as_tensor(m, dtype=torch.float32, device=device)
            keep = torch.as_tensor(masks[layer], device=device)
            self.soft[layer] = torch.where(keep, weight, 1.0).reshape(shapes[layer])
            self.soft_inverse[layer] = torch.where(keep, 1.0 - weight, 1.0).reshape(shapes[layer])
        self.selected: dict[float, dict[str, Tensor]] = {}
        self.fraction: dict[float, dict[str, float]] = {}
        self.tied: dict[float, dict[str, bool]] = {}
        for q in quantiles:
            self.selected[q], self.fraction[q], self.tied[q] = {}, {}, {}
            for layer, m in maps.items():
                chosen, tied = quantile_mask(m, q, ties, masks[layer])
                self.selected[q][layer] = torch.as_tensor(chosen, device=device).reshape(
                    shapes[layer]
                )
                self.fraction[q][layer] = float(chosen.mean())
                self.tied[q][layer] = tied

    def mask(self, config: MaskConfig) -> Mask:
        if config.kind == "quantile":
            return selection_mask(self.selected[config.q], config.alpha)
        return factor_mask(self.soft if config.kind == "soft" else self.soft_inverse)


# ---------------------------------------------------------------------------- masked network
class _LeafTracer(torch.fx.Tracer):
    """Traces a network keeping the masked layers as call_module nodes."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(
            m, module_qualified_name
        )


class _Split:
    """``net`` cut after the first masked layer: ``prefix(x)`` returns the values still needed
    later (a tuple); ``suffix(*values)`` computes the output from them."""

    def __init__(self, net: nn.Module, layers: Sequence[str]) -> None:
        graph = _LeafTracer(set(layers)).trace(net)
        nodes = list(graph.nodes)
        index = {node: i for i, node in enumerate(nodes)}
        calls: dict[str, list[torch.fx.Node]] = {layer: [] for layer in layers}
        for node in nodes:
            if node.op == "call_module" and node.target in calls:
                calls[node.target].append(node)
        odd = {layer: len(found) for layer, found in calls.items() if len(found) != 1}
        if odd:
            raise ValueError(f"masked layers not called exactly once in the traced graph: {odd}")
        cut = min((found[0] for found in calls.values()), key=index.__getitem__)
        c = index[cut]
        live = [
            node for node in nodes[: c + 1]
            if node.op != "get_attr" and any(index[user] > c for user in node.users)
        ]
        prefix = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        for node in nodes[: c + 1]:
            env[node] = prefix.node_copy(node, env.__getitem__)
        prefix.output(tuple(env[node] for node in live))
        suffix = torch.fx.Graph()
        senv = {node: suffix.placeholder(f"live_{i}") for i, node in enumerate(live)}

        def arg(node: torch.fx.Node) -> torch.fx.Node:
            if node not in senv:  # a parameter read before the cut: read it again
                senv[node] = suffix.node_copy(node, arg)
            return senv[node]

        for node in nodes[c + 1:]:
            if node.op == "output":
                suffix.output(torch.fx.map_arg(node.args[0], arg))
            else:
                senv[node] = suffix.node_copy(node, arg)
        self.layer = str(cut.target)
        self.cut = live.index(cut)
        self.prefix = torch.fx.GraphModule(net, prefix)
        self.prefix.graph.eliminate_dead_code()
        self.prefix.recompile()
        self.suffix = torch.fx.GraphModule(net, suffix)


def _identity(x: Tensor) -> Tensor:
    return x


class MaskedNetwork:
    """``model`` with masks at named layers, optionally split at the first of them.

    model: ``model(x)`` maps images (B, 3, H, W) in [0, 1] to logits; hooks go on
    ``layer_root`` (default ``model.net`` if it exists, else ``model``). With ``reuse_prefix``
    the network is split (module docstring) when ``model`` is an ImageClassifier (``net`` and
    ``normalize``, forward ``net(normalize(x))``) or the hooked module itself; ``split_note``
    says why not otherwise. Use inside ``with``: the hooks exist only there.

    ``prefix(x)`` -> state computed once per input batch; ``suffix(state, mask)`` -> logits
    with ``mask`` (None: unmasked); ``forward(x, mask)`` the plain masked forward.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        reuse_prefix: bool = True,
        layer_root: nn.Module | None = None,
    ) -> None:
        self.model = model
        self.layers = list(layers)
        root = hooked_module(model, layer_root)
        modules = dict(root.named_modules())
        unknown = [layer for layer in self.layers if layer not in modules or not layer]
        if unknown:
            raise ValueError(f"unknown layer name(s) {unknown} for {type(root).__name__}")
        self._modules = {layer: modules[layer] for layer in self.layers}
        self._mask: Mask | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.split: _Split | None = None
        self.split_note = "prefix reuse disabled"
        self._preprocess: Callable[[Tensor], Tensor] = _identity
        if reuse_prefix:
            self._try_split(root)

    def _try_split(self, root: nn.Module) -> None:
        normalize = getattr(self.model, "normalize", None)
        if root is getattr(self.model, "net", None) and callable(normalize):
            self._preprocess = normalize
        elif root is not self.model:
            self.split_note = "the hooked module is neither the model nor an ImageClassifier's net"
            return
        try:
            self.split = _Split(root, self.layers)
            self.split_note = f"prefix up to {self.split.layer!r} computed once per batch"
        except Exception as error:  # tracing fails in many ways; every one means "no split"
            self.split_note = f"torch.fx could not split the network ({error}); full forwards"
            warnings.warn(f"masking: {self.split_note}", stacklevel=3)

    def _hook(self, layer: str) -> Callable[[nn.Module, Any, Tensor], Tensor | None]:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> Tensor | None:
            transform = None if self._mask is None else self._mask.get(layer)
            return None if transform is None else transform(output)

        return hook

    def __enter__(self) -> MaskedNetwork:
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self._modules.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._mask = None

    def forward(self, x: Tensor, mask: Mask | None) -> Tensor:
        """Logits of ``x`` with ``mask`` applied by the hooks (the plain path)."""
        self._mask = mask
        try:
            return self.model(x)
        finally:
            self._mask = None

    def prefix(self, x: Tensor) -> Any:
        """The unmasked state of ``x`` at the split (the images themselves without a split)."""
        if self.split is None:
            return x
        return self.split.prefix(self._preprocess(x))

    def suffix(self, state: Any, mask: Mask | None) -> Tensor:
        """Logits from a ``prefix`` state with ``mask`` (the state is not modified)."""
        if self.split is None:
            return self.forward(state, mask)
        # Clones: the suffix may modify its inputs in place (e.g. ReLU(inplace=True)).
        values = [v.clone() if isinstance(v, Tensor) else v for v in state]
        first = None if mask is None else mask.get(self.split.layer)
        if first is not None:
            values[self.split.cut] = first(state[self.split.cut])
        self._mask = mask
        try:
            return self.split.suffix(*values)
        finally:
            self._mask = None


# ------------------------------------------------------------------------------------ inputs
def input_problem(
    augmentations: Sequence[str], n_images: int, base: AugmentationProblem | None = None
) -> AugmentationProblem:
    """A problem over ``augmentations`` and ``n_images`` probe images (one class) whose
    ContrastDesign yields each image's original and singly-augmented rows; bounds and
    postprocessing come from ``base`` (the analysed problem) when given."""
    unknown = [a for a in augmentations if a not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown input augmentation(s) {unknown}; valid: {list(AUGMENTATIONS)}")
    config = base.to_config() if base is not None else {}
    bounds = {a: b for a, b in (config.get("bounds") or {}).items() if a in augmentations}
    return AugmentationProblem(
        list(augmentations), p_on=0.5, auxiliaries=("image",) if n_images > 1 else (),
        n_classes=1, images_per_class=n_images, postprocess=config.get("postprocess"),
        bounds=bounds or None,
    )


def _image_count(images: Tensor | Dataset) -> int:
    return int(images.shape[0]) if isinstance(images, Tensor) else len(images)


def _load(images: Tensor | Dataset, start: int, stop: int) -> Tensor:
    if isinstance(images, Tensor):
        return images[start:stop]
    items = [images[i] for i in range(start, stop)]
    return torch.stack([item[0] if isinstance(item, tuple | list) else item for item in items])


class ProbeInputs:
    """Original and singly-augmented inputs of probe images.

    images: (N, 3, H, W) float in [0, 1], or a Dataset of such images (or (image, label));
    labels: (N,) int64. Input set 0 is the original; input set 1 + a carries augmentation a
    alone, ``k`` parameter draws per image (``ContrastDesign`` block = image).
    """

    def __init__(
        self,
        images: Tensor | Dataset,
        labels: Tensor,
        augmentations: Sequence[str],
        k: int = 4,
        seed: int = 0,
        base: AugmentationProblem | None = None,
    ) -> None:
        self.images = images
        self.n_images = _image_count(images)
        self.labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if self.n_images == 0 or len(self.labels) != self.n_images:
            raise ValueError(
                f"need one label per probe image: {self.n_images} images, {len(self.labels)} "
                "labels"
            )
        self.augmentations = list(augmentations)
        self.names = [ORIGINAL, *self.augmentations]
        self.k = int(k)
        first = _load(images, 0, 1)
        self.height, self.width = int(first.shape[-2]), int(first.shape[-1])
        if self.augmentations:
            self.problem: AugmentationProblem | None = input_problem(
                self.augmentations, self.n_images, base
            )
            self.design: ContrastDesign | None = ContrastDesign(
                self.problem, self.n_images, self.k, seed
            )
        else:
            self.problem, self.design = None, None

    def batch(
        self, start: int, stop: int, device: torch.device, dtype: torch.dtype
    ) -> list[tuple[Tensor, Tensor]]:
        """[(inputs (R_i, 3, H, W), labels (R_i,)) for every input set] of images
        [start, stop): R_0 = stop - start, R_i = k (stop - start)."""
        images = _load(self.images, start, stop).to(device, dtype)
        labels = self.labels[start:stop].to(device)
        if self.design is None or self.problem is None:
            return [(images, labels)]
        rows = self.design.rows(start, stop)
        decoded = self.problem.decode(rows, self.height, self.width)
        image = decoded.image_index.to(device) - start
        augmented = self.problem.augment(images[image], decoded)
        kind = torch.arange(len(rows), device=device) % self.design.block_size
        which = torch.where(kind == 0, 0, 1 + torch.div(kind - 1, self.k, rounding_mode="floor"))
        return [
            (augmented[which == i], labels[image[which == i]]) for i in range(len(self.names))
        ]


# --------------------------------------------------------------------------------- the loop


def resolve_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size): torch.distributed's when initialised, else (0, 1)."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = rank if rank is not None else torch.distributed.get_rank() if initialised else 0
    world_size = (
        world_size if world_size is not None
        else torch.distributed.get_world_size() if initialised else 1
    )
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got {rank}, {world_size}")
    if world_size > 1 and not initialised:
        raise ValueError(
            f"world_size={world_size} but torch.distributed is not initialised: the accuracy "
            "sums are reduced through the process group; initialise it (Lightning's DDP does) "
            "or run with world_size=1"
        )
    return rank, world_size


def plan_forwards(
    inputs: ProbeInputs, plans: Sequence[Sequence[tuple[int, Mask | None]]], images: int
) -> int:
    """Image forwards of the masked part (one image through the suffix) for ``images`` probe
    images: per input set, its inputs (the images, ``k`` draws each for augmented sets) times
    its plans."""
    return sum(len(plan) * images * (1 if i == 0 else inputs.k)
               for i, plan in enumerate(plans[:len(inputs.names)]))


def run_plans(
    network: MaskedNetwork,
    inputs: ProbeInputs,
    plans: Sequence[Sequence[tuple[int, Mask | None]]],
    consume: Callable[[int, int, Tensor, Tensor], None],
    *,
    batch_images: int = 16,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    desc: str = "masking",
    work: str = "",
) -> None:
    """For every batch of this rank's images and every input set i: run the prefix once, then
    for each (plan index, mask) of ``plans[i]`` the suffix, and ``consume(i, plan index,
    logits, labels)``. The model runs in eval mode under inference mode; its train/eval flags
    are restored afterwards. progress: rank zero reports its image forwards (``desc``; ``work``
    says what they are, after their count)."""
    if batch_images < 1:
        raise ValueError(f"batch_images must be >= 1, got {batch_images}")
    start, stop = shard_range(inputs.n_images, rank, world_size)
    model = network.model
    dtype = model_device(model)[1]
    modes = {module: module.training for module in model.modules()}
    total = plan_forwards(inputs, plans, stop - start)
    if world_size > 1:
        work += f"; this process: images {start}-{stop - 1} of {inputs.n_images}"
    model.eval()
    try:
        with torch.inference_mode(), network, Progress(
            desc, total, "image forwards", work=f"{total} image forwards ({work})",
            enabled=progress and rank == 0,
        ) as bar:
            for first in range(start, stop, batch_images):
                batches = inputs.batch(first, min(first + batch_images, stop), device, dtype)
                for i, (x, labels) in enumerate(batches):
                    if not plans[i] or len(x) == 0:
                        continue
                    state = network.prefix(x)
                    for index, mask in plans[i]:
                        consume(i, index, network.suffix(state, mask), labels)
                        bar.update(len(x))
    finally:
        for module, mode in modes.items():
            module.training = mode


class MaskedAccuracy(Metric):
    """Top-1 and top-k hits per (input set, plan) as float64 sums (summed over ranks)."""

    full_state_update = False

    def __init__(self, n_inputs: int, n_plans: int, top_k: int) -> None:
        super().__init__()
        self.top_k = int(top_k)
        self.add_state("hits", torch.zeros(n_inputs, n_plans, 2, dtype=torch.float64), "sum")
        self.add_state("total", torch.zeros(n_inputs, n_plans, dtype=torch.float64), "sum")

    def update(self, input_index: int, plan: int, logits: Tensor, labels: Tensor) -> None:
        hit = logits.topk(self.top_k, dim=1).indices == labels[:, None]
        self.hits[input_index, plan, 0] += hit[:, 0].sum()
        self.hits[input_index, plan, 1] += hit.any(dim=1).sum()
        self.total[input_index, plan] += len(labels)

    def compute(self) -> Tensor:
        """(n_inputs, n_plans, 2) top-1 and top-k accuracy (NaN where nothing was seen)."""
        return self.hits / self.total[..., None]


# ---------------------------------------------------------------------------------- results
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

    inputs: "original", then the input augmentations (I); variables: mask variables (V);
    configurations: labels (M); layers: masked layers (L); quantiles: Q.
    acc1, acc5: (I, V, M) top-1 / top-k accuracy (k = ``top_k`` = min(5, classes));
    unmasked_acc1, unmasked_acc5: (I,); specificity, specificity_top5: (I - 1, V)
    (``specificity_matrix``); masked_fraction: (V, Q, L) fraction of the layer's (map) units
    each quantile mask selects, flagged units never among them; tied: (V, Q, L) the quantile
    fell on the minimum of the layer's valid units; valid_fraction: (L,) share of each layer's
    (map) units that are valid, the most a mask can select (None: every unit, as for groups
    stored before flags existed).
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
        keys = (*self._ARRAYS, "valid_fraction", "specificity", "specificity_top5")
        return {key: np.asarray(getattr(self, key)) for key in keys}

    def attrs(self) -> dict[str, Any]:
        attrs = {key: getattr(self, key) for key in self._ATTRS}
        attrs.update(epoch=-1 if self.epoch is None else self.epoch,
                     tied_layers=self.tied_layers, fully_masked_layers=self.fully_masked_layers)
        return attrs

    @classmethod
    def from_group(
        cls, arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any]
    ) -> MaskingResult:
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


def _check_variables(chosen: Sequence[str], available: Sequence[str], what: str) -> list[str]:
    unknown = [v for v in chosen if v not in available]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; the analysis has variables {list(available)}")
    if not chosen:
        raise ValueError(f"no {what} given")
    return list(chosen)


def prepare_masks(
    model: nn.Module,
    maps: Mapping[str, np.ndarray],
    variables: Sequence[str],
    mask_variables: Sequence[str],
    image_size: tuple[int, int],
    quantiles: Sequence[float],
    ties: str,
    layer_root: nn.Module | None = None,
    valid: Mapping[str, np.ndarray] | None = None,
) -> dict[str, VariableMasks]:
    """{variable: VariableMasks} on the model's device; ValueError when a map does not fit
    its layer (``broadcast_shape``). maps: {layer: (V, *u)}; valid: {layer: (*u) bool} the
    units masks may touch (``sensitivity_maps``; default every unit)."""
    missing = [layer for layer in maps if valid is not None and layer not in valid]
    if missing:
        raise ValueError(f"valid units are not given for the masked layers {missing}")
    device = model_device(model)[0]
    outputs = layer_output_shapes(model, list(maps), image_size, layer_root)
    shapes = {}
    for layer, values in maps.items():
        if values.shape[0] != len(variables):
            raise ValueError(
                f"maps of layer {layer!r} have {values.shape[0]} variables, expected "
                f"{len(variables)} ({list(variables)})"
            )
        shapes[layer] = broadcast_shape(layer, values.shape[1:], outputs[layer])
    index = {v: i for i, v in enumerate(variables)}
    return {
        v: VariableMasks({layer: m[index[v]] for layer, m in maps.items()}, shapes, quantiles,
                         ties, device, valid)
        for v in mask_variables
    }


def evaluate_masking(
    model: nn.Module,
    maps: Mapping[str, np.ndarray],
    variables: Sequence[str],
    images: Tensor | Dataset,
    labels: Tensor,
    augmentations: Sequence[str],
    *,
    value: str = "",
    analysis: str = "",
    mask_variables: Sequence[str] | None = None,
    configurations: Sequence[MaskConfig] | None = None,
    k: int = 4,
    seed: int = 0,
    problem: AugmentationProblem | None = None,
    ties: str = "strict",
    batch_images: int = 16,
    reuse_prefix: bool = True,
    layer_root: nn.Module | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    valid: Mapping[str, np.ndarray] | None = None,
    progress: bool = True,
) -> MaskingResult:
    """Accuracy of ``model`` under every mask configuration of every mask variable.

    maps: {masked layer: (V, *u)} in [0, 1] and valid: {masked layer: (*u) bool}, the units
    not flagged (both from ``sensitivity_maps``; valid None: every unit), V = len(variables);
    mask_variables: which of ``variables`` to mask (default all); images, labels: the probe
    (module docstring); augmentations: input augmentations (each alone, ``k`` draws per
    image); problem: the analysed problem (bounds, postprocessing of the inputs);
    configurations: default the 17 of ``default_configurations``. ``value``/``analysis``
    are recorded. progress: rank zero reports the image forwards (module docstring). Every
    rank must call it (DDP); every rank gets the global result.
    """
    started = time.perf_counter()
    rank, world_size = resolve_world(rank, world_size)
    configs = list(configurations or default_configurations())
    chosen = _check_variables(
        list(variables) if mask_variables is None else list(mask_variables), variables,
        "mask variables",
    )
    inputs = ProbeInputs(images, labels, augmentations, k, seed, problem)
    quantiles = sorted({c.q for c in configs if c.kind == "quantile"})
    masks = prepare_masks(model, maps, variables, chosen, (inputs.height, inputs.width),
                          quantiles, ties, layer_root, valid)
    network = MaskedNetwork(model, list(maps), reuse_prefix, layer_root)
    device = model_device(model)[0]
    plan: list[tuple[int, Mask | None]] = [(0, None)]
    for v, variable in enumerate(chosen):
        plan += [(1 + v * len(configs) + c, masks[variable].mask(config))
                 for c, config in enumerate(configs)]
    n_classes = _class_count(network, inputs, device)
    metric = MaskedAccuracy(len(inputs.names), len(plan), min(5, n_classes)).to(device)
    work = (f"{inputs.n_images} probe images, each as the original and {inputs.k} draws of "
            f"each of {len(inputs.augmentations)} augmentations, x {len(plan)} passes: "
            f"unmasked and {len(chosen)} mask variables x {len(configs)} configurations")
    run_plans(network, inputs, [plan] * len(inputs.names), metric.update,
              batch_images=batch_images, device=device, rank=rank, world_size=world_size,
              progress=progress, desc="masking", work=work)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was called before the ``update``")
        accuracy = metric.compute().cpu().numpy()  # (I, 1 + V M, 2)
    shape = (len(inputs.names), len(chosen), len(configs))
    layers = list(maps)
    return MaskingResult(
        value=value, analysis=analysis, inputs=inputs.names, variables=chosen,
        configurations=[c.label for c in configs], layers=layers, quantiles=quantiles,
        acc1=accuracy[:, 1:, 0].reshape(shape), acc5=accuracy[:, 1:, 1].reshape(shape),
        unmasked_acc1=accuracy[:, 0, 0], unmasked_acc5=accuracy[:, 0, 1],
        masked_fraction=np.array([[[masks[v].fraction[q][layer] for layer in layers]
                                   for q in quantiles] for v in chosen]).reshape(
                                       len(chosen), len(quantiles), len(layers)),
        tied=np.array([[[masks[v].tied[q][layer] for layer in layers] for q in quantiles]
                       for v in chosen], dtype=bool).reshape(
                           len(chosen), len(quantiles), len(layers)),
        ties=ties, top_k=min(5, n_classes), n_images=inputs.n_images, k=inputs.k, seed=seed,
        prefix_reuse=network.split_note, seconds=time.perf_counter() - started,
        valid_fraction=np.array([1.0 if valid is None else float(np.mean(valid[layer]))
                                 for layer in layers]),
    )


def _class_count(network: MaskedNetwork, inputs: ProbeInputs, device: torch.device) -> int:
    """Outputs of the network (one forward of the first probe image)."""
    model = network.model
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.inference_mode():
            x = _load(inputs.images, 0, 1).to(device, model_device(model)[1])
            return int(model(x).shape[1])
    finally:
        for module, mode in modes.items():
            module.training = mode


# ---------------------------------------------------------------------------- store, figure
def write_masking(
    store: ResultsStore, name: str, result: MaskingResult, *, overwrite: bool = False
) -> str:
    """Store ``result`` as /masking/<name> (atomic); returns the group path."""
    path = f"{GROUP_KIND}/{name}"
    store.write_group(path, result.arrays(), result.attrs(), overwrite=overwrite)
    return path


def read_masking(store: ResultsStore, name: str) -> MaskingResult:
    return MaskingResult.from_group(*store.read_group(f"{GROUP_KIND}/{name}"))


def specificity_figure(result: MaskingResult, top5: bool = False) -> Figure:
    """Heatmap input augmentation x mask variable of the Spearman specificity (low values on
    the diagonal: masking v's units hurts v-augmented inputs specifically)."""
    values = result.specificity_top5 if top5 else result.specificity
    rows, columns = values.shape
    figure = Figure(figsize=(max(5.0, 1.2 + 0.8 * columns), max(3.0, 1.6 + 0.5 * rows)),
                    dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    image = ax.imshow(values, cmap="RdBu_r", vmin=-1.0, vmax=1.0, aspect="auto")
    for i in range(rows):
        for j in range(columns):
            text = "n/a" if not np.isfinite(values[i, j]) else f"{values[i, j]:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if np.isfinite(values[i, j]) and abs(values[i, j]) > 0.6
                    else "black")
    ax.set_xticks(range(columns), result.variables, rotation=45, ha="right")
    ax.set_yticks(range(rows), result.inputs[1:])
    ax.set_xlabel(f"mask variable ({result.value} maps)")
    ax.set_ylabel("input augmentation")
    ax.set_title(f"masking specificity (top-{5 if top5 else 1} accuracy)\nSpearman vs original "
                 f"inputs over {len(result.configurations)} configurations", fontsize=10)
    figure.colorbar(image, ax=ax, label="Spearman correlation")
    return figure


def save_specificity(result: MaskingResult, out_dir: str | Path, name: str) -> Path:
    """``<out_dir>/<name>_masking_specificity.png``; returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}_masking_specificity.png"
    specificity_figure(result).savefig(path)
    return path

