"""The masked network: masks at named layers, and the network split so that the unmasked part
runs once per input batch (METHOD.md section 8, "prefix reuse").

All configurations of all variables share the network up to the first masked layer. The network
(``model.net`` of an ImageClassifier, whose forward is ``net(normalize(x))``, or a plain
network) is traced with torch.fx, the masked layers kept as leaf modules, and split at the first
masked layer in execution order: the prefix graph returns every value the rest of the network
still needs (the first masked layer's output and anything else live there, e.g. a skip
connection) and the suffix graph takes them as inputs. Per input batch the prefix runs once; per
configuration only the suffix runs, the first layer's mask applied to the cached (unmasked)
output, the other layers' masks by forward hooks, which fire in the suffix because it calls the
very same module objects. A network fx cannot trace (data-dependent control flow) falls back to
full masked forwards with a warning.

A suffix forward may take a row range of the cached values, or n copies of them in one batch
(``masking.schedule``): the cached values are sliced or repeated along the batch, and a stacked
mask gives each copy its own factors (``masks.stacked_mask``). Only where every cached value has
the batch as its first axis (``batchable``); a value computed from the batch size is not.

A masked layer may name one element of a tuple or dict output ("<module>:<element>",
``sensitivity.layouts``): its mask multiplies that element, the others pass unchanged. Masks
act on the module's output in its own layout (NCHW, NHWC, tokens: ``masks.MapPlacement``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from sensitivity.capture import ActivationCapture
from sensitivity.layouts import split_layer_name
from sensitivity.output_layouts import element_applier
from sensitivity.plan import hooked_module

# A mask: layer name -> function of the layer's output (B, *shape) returning the masked output.
Mask = dict[str, Callable[[Tensor], Tensor]]


def layer_outputs(
    model: nn.Module,
    layers: Sequence[str],
    image_size: tuple[int, int],
    layer_root: nn.Module | None = None,
    layouts: Mapping[str, str] | None = None,
) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The output shapes and layouts of ``model``'s named layers (one dry forward).

    Args:
        model: the network (``model(x)`` on (1, 3, H, W) images).
        layers: layer names under the hooked module (":<element>" picks an element).
        image_size: (H, W) in pixels.
        layer_root: where the layers are named (default ``model.net`` or ``model``).
        layouts: {layer: layout} overrides (the analysis's ``UnitLayout.layout``).

    Returns:
        ({layer: output shape per image}, {layer: layout}).

    Raises:
        ValueError: what ``ActivationCapture`` refuses (unknown layers, undetected layouts).
    """
    capture = ActivationCapture(hooked_module(model, layer_root), list(layers), "none", [],
                                layouts=layouts)
    shapes = capture.unit_shapes(image_size, forward=model)
    return shapes, {layer: capture.layouts[layer].layout for layer in shapes}


def layer_output_shapes(
    model: nn.Module,
    layers: Sequence[str],
    image_size: tuple[int, int],
    layer_root: nn.Module | None = None,
    layouts: Mapping[str, str] | None = None,
) -> dict[str, tuple[int, ...]]:
    """{layer: output shape per image} of ``model``'s named layers (``layer_outputs``)."""
    return layer_outputs(model, layers, image_size, layer_root, layouts)[0]


def positional_layers(layouts: Mapping[str, str]) -> list[str]:
    """The layers whose output has positions: maps (NCHW, NHWC) and tokens, not flat ones."""
    return [layer for layer, layout in layouts.items() if layout != "flat"]


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
    """``net`` cut after the first masked module: ``prefix(x)`` returns the values still needed
    later (a tuple); ``suffix(*values)`` computes the output from them."""

    def __init__(self, net: nn.Module, modules: Sequence[str]) -> None:
        graph = _LeafTracer(set(modules)).trace(net)
        nodes = list(graph.nodes)
        index = {node: i for i, node in enumerate(nodes)}
        calls: dict[str, list[torch.fx.Node]] = {module: [] for module in modules}
        for node in nodes:
            if node.op == "call_module" and node.target in calls:
                calls[node.target].append(node)
        odd = {module: len(found) for module, found in calls.items() if len(found) != 1}
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


def _taken(value: Any, rows: slice, copies: int) -> Any:
    """A cached value's tensors, rows ``rows`` of each, repeated ``copies`` times along the
    batch (copy j at rows j R ... (j + 1) R - 1), always a copy: a tensor, or a module's
    tuple, list or dict; anything else as it is."""
    if isinstance(value, Tensor):
        taken = value[rows]
        return taken.repeat(copies, *(1,) * (taken.dim() - 1)) if copies > 1 else taken.clone()
    if isinstance(value, dict):
        return {key: _taken(v, rows, copies) for key, v in value.items()}
    if isinstance(value, tuple | list):
        items = [_taken(v, rows, copies) for v in value]
        if isinstance(value, list):
            return items
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value


def _batched(value: Any, rows: int) -> bool:
    """Whether every leaf of a cached value is a tensor of ``rows`` rows (so its rows can be
    sliced and repeated); a value computed from the batch size (an int) is not."""
    if isinstance(value, Tensor):
        return value.dim() > 0 and value.shape[0] == rows
    if isinstance(value, dict):
        return all(_batched(v, rows) for v in value.values())
    if isinstance(value, tuple | list):
        return all(_batched(v, rows) for v in value)
    return False


class MaskedNetwork:
    """``model`` with masks at named layers, optionally split at the first of them.

    Use inside ``with``: the hooks exist only there. ``prefix(x)`` -> the state computed once
    per input batch; ``suffix(state, mask)`` -> logits with ``mask`` (None: unmasked), also of
    a row range or of several copies of the rows in one batch; ``forward(x, mask)`` the plain
    masked forward.

    Args:
        model: ``model(x)`` maps images (B, 3, H, W) in [0, 1] to logits.
        layers: the masked layers, as named under the hooked module (":<element>" masks one
            element of a tuple or dict output).
        reuse_prefix: split the network (module docstring) when ``model`` is an
            ImageClassifier (``net`` and ``normalize``, forward ``net(normalize(x))``) or the
            hooked module itself.
        layer_root: where the hooks go (default ``model.net`` if it exists, else ``model``).

    Attributes:
        split_note: how the network runs: where it is split, or why it is not.
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
        self._targets = {layer: split_layer_name(layer, modules) for layer in self.layers}
        unknown = [layer for layer, (module, _) in self._targets.items()
                   if not module or module not in modules]
        if unknown:
            raise ValueError(f"unknown layer name(s) {unknown} for {type(root).__name__}")
        self._modules = {layer: modules[module] for layer, (module, _) in self._targets.items()}
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
            modules = list(dict.fromkeys(module for module, _ in self._targets.values()))
            self.split = _Split(root, modules)
            self.split_note = f"prefix up to {self.split.layer!r} computed once per batch"
        except Exception as error:  # tracing fails in many ways; every one means "no split"
            self.split_note = f"torch.fx could not split the network ({error}); full forwards"
            warnings.warn(f"masking: {self.split_note}", stacklevel=3)

    def _masked(self, layers: Sequence[str], output: Any, mask: Mask) -> Any:
        """A module's ``output`` with the masks of ``layers`` (its masked elements) applied."""
        for layer in layers:
            transform = mask.get(layer)
            if transform is not None:
                output = element_applier(self._targets[layer][1], transform)(output)
        return output

    def _hook(self, layer: str) -> Callable[[nn.Module, Any, Any], Any]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            if self._mask is None or layer not in self._mask:
                return None
            return self._masked([layer], output, self._mask)

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

    def batchable(self, state: Any, rows: int) -> bool:
        """Whether ``suffix`` may take a row range of ``state`` (a ``prefix`` of ``rows``
        inputs) or copies of it: every value it caches has the batch as its first axis."""
        return _batched(state if self.split is None else list(state), rows)

    def suffix(
        self, state: Any, mask: Mask | None, rows: slice = slice(None), copies: int = 1
    ) -> Tensor:
        """Logits from a ``prefix`` state with ``mask`` (the state is not modified).

        Args:
            state: a ``prefix`` of R inputs.
            mask: the mask, None for unmasked.
            rows: the inputs to run, a range of the R (only where ``batchable``).
            copies: run n copies of them in one batch (only where ``batchable``); ``mask``
                then transforms the (n r, ...) outputs (``masks.stacked_mask``).

        Returns:
            (copies r, classes) logits, copy j at rows j r ... (j + 1) r - 1.
        """
        if self.split is None:
            return self.forward(_taken(state, rows, copies), mask)
        # Copies: the suffix may modify its inputs in place (e.g. ReLU(inplace=True)).
        values = [_taken(v, rows, copies) for v in state]
        if mask is not None:
            # The cut module ran in the prefix: its masks apply to its cached output.
            cut = [layer for layer, (module, _) in self._targets.items()
                   if module == self.split.layer]
            values[self.split.cut] = self._masked(cut, values[self.split.cut], mask)
        self._mask = mask
        try:
            return self.split.suffix(*values)
        finally:
            self._mask = None
