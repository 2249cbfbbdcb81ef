"""Layouts other than NCHW (issue #16): transformer and channels-last outputs, tuple outputs,
their record in the results file, and masking, correlation and LDA of such maps.

Tiny torchvision configurations (random weights, 32 px) stand for each family; the real
architectures are built on the meta device, where a forward costs nothing.
"""

from __future__ import annotations

from collections import namedtuple

import h5py
import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.maxvit import MaxVit
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.ops.misc import Permute

import analyze
from cli.options import engine_config
from lightning_modules.architectures import build_network
from sensitivity.capture import ActivationCapture, default_layers, unit_shapes
from sensitivity.config import EngineConfig
from sensitivity.engine import run_analysis
from sensitivity.layouts import UnitLayout
from sensitivity.masking import (
    MaskConfig,
    MaskedNetwork,
    layer_outputs,
    masking_maps,
    prepare_masks,
)
from sensitivity.problem import AugmentationProblem
from sensitivity.results import AnalysisResult
from sensitivity.stats import correlation_statistics, lda_channel_maps, lda_statistics
from sensitivity.store import ResultsStore

SIZE = 32
CLASSES = 4
ATTENTION = "encoder.layers.encoder_layer_1.self_attention"


def tiny_vit() -> torchvision.models.VisionTransformer:
    """ViT at 32 px: 8 px patches (16 tokens and the class token), 2 layers of width 32. Its
    head starts at zero in torchvision; random weights make the logits depend on the input."""
    torch.manual_seed(0)
    net = torchvision.models.VisionTransformer(image_size=SIZE, patch_size=8, num_layers=2,
                                               num_heads=2, hidden_dim=32, mlp_dim=64,
                                               num_classes=CLASSES)
    nn.init.normal_(net.heads.head.weight)
    return net.eval()


def tiny_swin() -> SwinTransformer:
    """Swin at 32 px: 4 px patches, stages of 8/16/32/64 channels on 8/4/2/1 px grids."""
    torch.manual_seed(0)
    return SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1, 1, 1],
                           num_heads=[1, 1, 2, 2], window_size=[2, 2],
                           num_classes=CLASSES).eval()


def tiny_maxvit() -> MaxVit:
    """MaxViT at 32 px: a stem of 8 channels, two blocks of 8 and 16 channels."""
    torch.manual_seed(0)
    return MaxVit(input_size=(SIZE, SIZE), stem_channels=8, partition_size=2,
                  block_channels=[8, 16], block_layers=[1, 1], head_dim=4,
                  stochastic_depth_prob=0.0, num_classes=CLASSES).eval()


def raw_outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, object]:
    """What the named modules return on ``x`` (a forward with plain hooks)."""
    modules = dict(model.named_modules())
    out: dict[str, object] = {}
    handles = [modules[n].register_forward_hook(
        lambda m, i, o, n=n: out.__setitem__(n, o)) for n in names]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return out


# ------------------------------------------------------------------------------ unit counts
def test_transformer_families_get_one_unit_per_channel_or_hidden_feature():
    vit, swin, maxvit = tiny_vit(), tiny_swin(), tiny_maxvit()
    blocks = ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]
    assert default_layers(vit) == ["conv_proj", *blocks, "encoder", "heads.head"]
    assert unit_shapes(vit, SIZE, reduction="channel_mean") == {
        "conv_proj": (32,), blocks[0]: (32,), blocks[1]: (32,), "encoder": (32,),
        "heads.head": (CLASSES,)}
    # none: every element in the output's own order, tokens (L, D) with the class token.
    assert unit_shapes(vit, SIZE, ["conv_proj", "encoder"]) == {
        "conv_proj": (32, 4, 4), "encoder": (17, 32)}
    stages = ["features.0", "features.1", "features.3", "features.5", "features.7"]
    assert default_layers(swin, SIZE) == [*stages, "avgpool", "head"]
    assert unit_shapes(swin, SIZE, reduction="channel_mean") == {
        "features.0": (8,), "features.1": (8,), "features.3": (16,), "features.5": (32,),
        "features.7": (64,), "avgpool": (64,), "head": (CLASSES,)}
    assert unit_shapes(swin, SIZE, ["features.3", "norm", "avgpool"]) == {
        "features.3": (4, 4, 16), "norm": (1, 1, 64), "avgpool": (64, 1, 1)}
    layers = default_layers(maxvit, SIZE)
    assert layers == ["stem", "blocks.0", "blocks.1", "classifier.0", "classifier.5"]
    assert unit_shapes(maxvit, SIZE, layers, "channel_mean") == {
        "stem": (8,), "blocks.0": (8,), "blocks.1": (16,), "classifier.0": (16,),
        "classifier.5": (CLASSES,)}


@pytest.mark.parametrize("arch", ["convnext_tiny", "efficientnet_b0", "mobilenet_v3_small",
                                  "regnet_x_400mf", "resnet18", "vgg11", "alexnet"])
def test_channels_first_families_keep_one_unit_per_output_channel(arch):
    """ConvNeXt permutes to channels-last inside its blocks and back: every default checkpoint
    of the channels-first families is detected nchw (or flat), and channel_mean gives as many
    units as the module's raw output has channels (read with a plain hook)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None).eval()
    size = 64 if arch != "alexnet" else 96  # AlexNet's stride needs a few more pixels
    layers = default_layers(model, size)
    capture = ActivationCapture(model, layers, "channel_mean")
    shapes = capture.unit_shapes(size)
    raw = raw_outputs(model, layers, torch.rand(1, 3, size, size))
    for layer in layers:
        layout = capture.layouts[layer].layout
        assert layout == ("flat" if raw[layer].ndim == 2 else "nchw"), (arch, layer, layout)
        assert shapes[layer] == (raw[layer].shape[1],), (arch, layer)


def test_real_transformers_have_their_published_widths():
    with torch.device("meta"):
        vit = torchvision.models.vit_b_16()
        swin = torchvision.models.swin_t()
        maxvit = torchvision.models.maxvit_t()
    means = unit_shapes(vit, 224, ["encoder", "encoder.layers.encoder_layer_5"], "channel_mean")
    assert means == {"encoder": (768,), "encoder.layers.encoder_layer_5": (768,)}
    assert unit_shapes(vit, 224, ["encoder"], "cls_token") == {"encoder": (768,)}
    assert unit_shapes(vit, 224, ["encoder"]) == {"encoder": (197, 768)}
    stages = ["features.1", "features.3", "features.5", "features.7", "norm"]
    assert unit_shapes(swin, 224, stages, "channel_mean") == {
        "features.1": (96,), "features.3": (192,), "features.5": (384,), "features.7": (768,),
        "norm": (768,)}
    assert default_layers("swin_t")[1:5] == stages[:4]
    assert default_layers("maxvit_t") == ["stem", "blocks.0", "blocks.1", "blocks.2",
                                          "blocks.3", "classifier.0", "classifier.5"]
    assert unit_shapes(maxvit, 224, ["blocks.3"], "channel_mean") == {"blocks.3": (512,)}
    # RegNet computes its widths with tensor ops, which the meta device cannot run.
    assert default_layers("regnet_x_400mf")[-1] == "fc"


def test_vision_transformers_are_built_for_the_image_size_and_options_reach_the_engine():
    with torch.device("meta"):
        vit = build_network("vit_b_16", CLASSES, image_size=SIZE)
        swin = build_network("swin_t", CLASSES, image_size=SIZE)
    assert vit.seq_length == 5  # 2 x 2 patches of 16 px and the class token
    assert unit_shapes(vit, SIZE, ["encoder"]) == {"encoder": (5, 768)}
    assert unit_shapes(swin, SIZE, ["features.7"], "channel_mean") == {"features.7": (768,)}
    layer = f"{ATTENTION}:0"
    args = ["sobol", "--layers", f"[{layer}, heads.head]", "--reduction", f"{{{layer}: cls_token}}",
            "--layouts", "{heads.head: flat}"]
    config = engine_config(analyze.build_parser().parse_args(analyze.normalise_args(args)))
    assert config.layers == [layer, "heads.head"]
    assert config.reduction == {layer: "cls_token"} and config.layouts == {"heads.head": "flat"}


# -------------------------------------------------------------------------- hand-built layouts
class HandBuilt(nn.Module):
    """A conv map (B, 6, 8, 8), the same map channels last (B, 8, 8, 6) after a Permute and a
    Linear per pixel, then tokens (B, 64, 6) that no rule knows."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=4, padding=1)
        self.to_nhwc = Permute([0, 2, 3, 1])
        self.mix = nn.Linear(6, 6)
        self.tokens = nn.Flatten(1, 2)
        self.head = nn.Linear(6, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens(self.mix(self.to_nhwc(self.conv(x))))
        return self.head(tokens.mean(1))


def test_hand_built_layouts_get_the_right_reduction():
    torch.manual_seed(0)
    net = HandBuilt().eval()
    x = torch.rand(2, 3, SIZE, SIZE)
    raw = raw_outputs(net, ["conv", "mix", "tokens"], x)
    layers = ["conv", "mix", "tokens", "head"]
    capture = ActivationCapture(net, layers, "channel_mean", [], layouts={"tokens": "tokens"})
    with torch.no_grad(), capture:
        net(x)
    means = capture.pop()
    assert {k: u.layout for k, u in capture.layouts.items()} == {
        "conv": "nchw", "mix": "nhwc", "tokens": "tokens", "head": "flat"}
    torch.testing.assert_close(means["conv"], raw["conv"].mean((2, 3)))
    torch.testing.assert_close(means["mix"], raw["mix"].mean((1, 2)))  # per channel, not row
    torch.testing.assert_close(means["tokens"], raw["tokens"].mean(1))
    keep = ActivationCapture(net, ["mix", "tokens"], {"tokens": "cls_token"}, [],
                             layouts={"tokens": "tokens_cls"})
    with torch.no_grad(), keep:
        net(x)
    kept = keep.pop()
    torch.testing.assert_close(kept["mix"], raw["mix"])  # none: (H, W, C) as it came
    torch.testing.assert_close(kept["tokens"], raw["tokens"][:, 0])
    assert keep.layouts["mix"].unit_axes == ("H", "W", "C")
    assert keep.layouts["tokens"].unit_axes == ("D",)


def test_undetected_layouts_are_errors_naming_the_override():
    net = HandBuilt().eval()
    with pytest.raises(ValueError, match=r"'tokens' .*unknown layout.*--layouts"):
        unit_shapes(net, SIZE, ["tokens"])
    window = "blocks.0.layers.0.layers.window_attention.attn_layer"
    maxvit = tiny_maxvit()
    with pytest.raises(ValueError, match=r"window partition.*layouts=\{'blocks"):
        unit_shapes(maxvit, SIZE, [window])
    # Channels last inside the windows: an override makes it a per-channel mean.
    assert unit_shapes(maxvit, SIZE, [window], "channel_mean", {window: "nhwc"}) == {
        window: (8,)}
    with pytest.raises(ValueError, match="layout nchw"):
        unit_shapes(net, SIZE, ["tokens"], layouts={"tokens": "nchw"})
    with pytest.raises(ValueError, match="cls_token needs a layer of layout tokens_cls"):
        ActivationCapture(net, ["mix"], "cls_token", [], layouts={"mix": "nhwc"})
    with pytest.raises(ValueError, match="cls_token needs"):
        unit_shapes(tiny_swin(), SIZE, ["features.1"], "cls_token")
    with pytest.raises(ValueError, match="not captured layers"):
        ActivationCapture(net, ["mix"], layouts={"conv": "nchw"})
    with pytest.raises(ValueError, match="unknown layout"):
        EngineConfig(layouts={"conv": "chw"})


# ----------------------------------------------------------------------------------- elements
Pair = namedtuple("Pair", ["map", "pooled"])


class Outputs(nn.Module):
    """Returns {"map": (B, 3, H, W), "pooled": (B, 3)}, or the same as a named tuple."""

    def __init__(self, named: bool) -> None:
        super().__init__()
        self.named = named

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor] | Pair:
        pair = Pair(x, x.mean((2, 3)))
        return pair if self.named else pair._asdict()


class PairNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.as_dict = Outputs(named=False)
        self.as_tuple = Outputs(named=True)
        self.head = nn.Linear(3, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.as_dict(x)["pooled"] + self.as_tuple(x).pooled)


def test_tuple_and_dict_outputs_pick_an_element():
    vit = tiny_vit()
    with pytest.raises(ValueError, match=rf"returns tuple, not a tensor; capture one element: "
                                         rf"{ATTENTION}:0 \(tensor \(1, 17, 32\)\), "
                                         rf"{ATTENTION}:1 \(None\)"):
        unit_shapes(vit, SIZE, [ATTENTION])
    with pytest.raises(ValueError, match=r"element '1' .* is None, not a tensor"):
        unit_shapes(vit, SIZE, [f"{ATTENTION}:1"])
    with pytest.raises(ValueError, match="without an element 'x'; available"):
        unit_shapes(vit, SIZE, [f"{ATTENTION}:x"])
    with pytest.raises(ValueError, match="returns a tensor; capture it as 'encoder'"):
        unit_shapes(vit, SIZE, ["encoder:0"])
    with pytest.raises(ValueError, match=r"unknown layer name\(s\) \['nowhere:0'\]"):
        unit_shapes(vit, SIZE, ["nowhere:0"])
    x = torch.rand(2, 3, SIZE, SIZE)
    attention = raw_outputs(vit, [ATTENTION], x)[ATTENTION][0]
    capture = ActivationCapture(vit, [f"{ATTENTION}:0"], "cls_token")
    with torch.no_grad(), capture:
        vit(x)
    torch.testing.assert_close(capture.pop()[f"{ATTENTION}:0"], attention[:, 0])
    assert capture.layouts[f"{ATTENTION}:0"] == UnitLayout("tokens_cls", "cls_token", "0")
    net = PairNet().eval()
    layers = ["as_dict:map", "as_dict:pooled", "as_tuple:map", "as_tuple:1"]
    assert unit_shapes(net, SIZE, layers, "channel_mean") == dict.fromkeys(layers, (3,))
    with pytest.raises(ValueError, match=r"capture one element: as_tuple:map \(tensor "
                                         r"\(1, 3, 32, 32\)\), as_tuple:pooled"):
        unit_shapes(net, SIZE, ["as_tuple"])


# ------------------------------------------------------------------------------ results file
@pytest.fixture(scope="module")
def vit_analysis(tmp_path_factory) -> tuple[AnalysisResult, ResultsStore]:
    """A Sobol analysis of the tiny ViT at every kind of unit, written and read back."""
    problem = AugmentationProblem(["hflip", "hue"], n_classes=2, images_per_class=2)
    probe = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    config = EngineConfig(
        method="sobol", n=8, replicates=2, progress=False, batch_rows=64,
        layers=["conv_proj", "encoder.layers.encoder_layer_0", "encoder", f"{ATTENTION}:0",
                "heads.head"],
        reduction={"conv_proj": "channel_mean", "encoder": "cls_token",
                   f"{ATTENTION}:0": "channel_mean"},
    )
    with pytest.warns(UserWarning, match="too small"):
        result = run_analysis(tiny_vit(), problem, probe, config)
    store = ResultsStore(tmp_path_factory.mktemp("vit") / "results.h5")
    store.write_analysis("vit", result)
    return result, store


def test_layouts_are_recorded_per_layer_and_read_back(vit_analysis):
    result, store = vit_analysis
    expected = {
        "conv_proj": UnitLayout("nchw", "channel_mean"),
        "encoder.layers.encoder_layer_0": UnitLayout("tokens_cls"),
        "encoder": UnitLayout("tokens_cls", "cls_token"),
        f"{ATTENTION}:0": UnitLayout("tokens_cls", "channel_mean", "0"),
        "heads.head": UnitLayout("flat"),
    }
    assert result.layouts == expected
    back = store.read_analysis("vit")
    assert back.layouts == expected and back.allclose(result)
    with h5py.File(store.path) as f:
        group = f["analyses/vit/encoder.layers.encoder_layer_0"]
        assert list(group.attrs["unit_shape"]) == [17, 32]
        assert {k: group.attrs[k] for k in ("layout", "reduction", "element", "unit_axes")} == {
            "layout": "tokens_cls", "reduction": "none", "element": "", "unit_axes": "L,D"}
        assert f[f"analyses/vit/{ATTENTION}:0"].attrs["element"] == "0"
    st = result.layers["encoder.layers.encoder_layer_0"]["ST"]  # (G, L, D)
    np.testing.assert_array_equal(result.features_first("encoder.layers.encoder_layer_0", "ST"),
                                  st.transpose(0, 2, 1))
    with pytest.raises(ValueError, match="does not have the unit axes L,D"):
        AnalysisResult("sobol", ["a"], {"x": {"S1": np.zeros((1, 4))}}, n=2, evaluations=6,
                       layouts={"x": UnitLayout("tokens")})


# ------------------------------------------------------------------------ statistics of maps
def channels_last_result(seed: int) -> tuple[AnalysisResult, AnalysisResult]:
    """A result with an NHWC map (4, 4, 8) and a token map (5, 8), each with a few flagged
    units, and the same values channels first: an NCHW map (8, 4, 4) and, without a layout
    record, the token map as (8, 5)."""
    rng = np.random.default_rng(seed)
    shapes = {"stage": (4, 4, 8), "tokens": (5, 8)}
    units = {"stage": UnitLayout("nhwc"), "tokens": UnitLayout("tokens")}
    layers = {layer: {"S1": rng.random((3, *shape)), "ST": rng.random((3, *shape)),
                      "mean": rng.normal(size=shape), "var": rng.random(shape)}
              for layer, shape in shapes.items()}
    flags = {layer: (rng.random(shape) < 0.1).astype(np.uint8) for layer, shape in shapes.items()}
    last = AnalysisResult("sobol", ["a", "b", "c"], layers, n=8, evaluations=40, flags=flags,
                          layouts=units)
    first_layers = {
        layer: {key: np.moveaxis(v, -1, v.ndim - len(shapes[layer])) for key, v in arrays.items()}
        for layer, arrays in layers.items()}
    first_flags = {layer: np.moveaxis(f, -1, 0) for layer, f in flags.items()}
    first = AnalysisResult("sobol", ["a", "b", "c"], first_layers, n=8, evaluations=40,
                           flags=first_flags, layouts={"stage": UnitLayout("nchw")})
    return last, first


def test_correlation_and_lda_read_channels_where_the_layout_puts_them(tmp_path):
    last, first = channels_last_result(seed=3)
    out = {}
    for name, result in (("last", last), ("first", first)):
        store = ResultsStore(tmp_path / f"{name}.h5")
        store.write_analysis("a", result)
        correlation_statistics(store.path, "a", progress=False)
        lda = lda_statistics(store.path, "a", n_folds=2, n_repeats=1, progress=False)
        out[name] = (lda["layers"], store.read_group("correlation/a", nested=True)[0],
                     store.read_group("lda/a", nested=True)[0])
    (lda_layers, corr_last, lda_last), (first_layers, corr_first, lda_first) = out.values()
    # LDA takes the token map too (a hidden feature's map over the tokens); without a record
    # a (F, L) map is not told from flat features.
    assert lda_layers == ["stage", "tokens"] and first_layers == ["stage"]
    for key in ("S1", "ST"):
        for layer in ("stage", "tokens"):
            for name, value in corr_first[layer][key].items():
                np.testing.assert_array_equal(corr_last[layer][key][name], value)
        for name, value in lda_first["stage"][key].items():
            np.testing.assert_array_equal(lda_last["stage"][key][name], value)
        tokens = lda_channel_maps(first.layers["tokens"][key], valid=first.valid("tokens"),
                                  n_folds=2, n_repeats=1)
        np.testing.assert_array_equal(lda_last["tokens"][key]["accuracy"], tokens.accuracy)


# ----------------------------------------------------------------------------------- masking
def masked_output(net: nn.Module, layer: str, masks, config: MaskConfig, x: torch.Tensor):
    """(plain, masked) outputs of ``layer`` captured under ``masks.mask(config)``."""
    network = MaskedNetwork(net, [layer], reuse_prefix=False)
    capture = ActivationCapture(net, [layer], "none", [])
    with torch.no_grad(), network, capture:
        network.forward(x, None)
        plain = capture.pop()[layer]
        network.forward(x, masks.mask(config))
        return plain, capture.pop()[layer]


def test_channel_masks_act_along_the_channel_axis_of_the_output():
    swin, x = tiny_swin(), torch.rand(2, 3, SIZE, SIZE)
    rng = np.random.default_rng(4)
    channel_map = rng.random((2, 16))  # (V, C) of features.3, a (4, 4, 16) NHWC output
    masks = prepare_masks(swin, {"features.3": channel_map}, ["a", "b"], ["a"], (SIZE, SIZE),
                          [0.5], "strict")["a"]
    plain, soft = masked_output(swin, "features.3", masks, MaskConfig("soft"), x)
    torch.testing.assert_close(soft, plain * torch.as_tensor(channel_map[0]).float())
    vit = tiny_vit()
    cls_map = rng.random((2, 32))  # (V, D) of the class token of "encoder"
    masks = prepare_masks(vit, {"encoder": cls_map}, ["a", "b"], ["a"], (SIZE, SIZE), [0.5],
                          "strict", layouts={"encoder": UnitLayout("tokens_cls", "cls_token")})["a"]
    plain, soft = masked_output(vit, "encoder", masks, MaskConfig("soft"), x)
    torch.testing.assert_close(soft[:, 0], plain[:, 0] * torch.as_tensor(cls_map[0]).float())
    torch.testing.assert_close(soft[:, 1:], plain[:, 1:])  # the patch tokens are left alone
    with pytest.raises(ValueError, match="channel mean or a class token"):
        prepare_masks(vit, {"encoder": cls_map}, ["a", "b"], ["a"], (SIZE, SIZE), [0.5],
                      "strict")


def test_masking_takes_token_layers_and_tuple_elements(vit_analysis):
    result, _ = vit_analysis
    vit = tiny_vit()
    chosen = masking_maps(result, vit, (SIZE, SIZE))
    # Default masked layers: those with positions, the element of the attention included.
    assert chosen.layers == ["conv_proj", "encoder.layers.encoder_layer_0", "encoder",
                             f"{ATTENTION}:0"]
    assert chosen.layouts == {layer: result.layouts[layer] for layer in chosen.layers}
    shapes, found = layer_outputs(vit, chosen.layers, (SIZE, SIZE))
    assert shapes[f"{ATTENTION}:0"] == (17, 32) and found["encoder"] == "tokens_cls"
    # Not "encoder" as well: torch.fx cannot cut inside a masked module (full forwards).
    chosen = masking_maps(result, vit, (SIZE, SIZE), layers=[*chosen.layers[:2], chosen.layers[3]])
    masks = prepare_masks(vit, chosen.maps, result.group_names, result.group_names[:1],
                          (SIZE, SIZE), [0.5], "strict", valid=chosen.valid,
                          layouts=chosen.layouts)[result.group_names[0]]
    split = MaskedNetwork(vit, chosen.layers)
    plain = MaskedNetwork(vit, chosen.layers, reuse_prefix=False)
    assert split.split is not None and split.split.layer == "conv_proj"
    x = torch.rand(3, 3, SIZE, SIZE)
    with torch.no_grad(), split, plain:
        state = split.prefix(x)
        unmasked = vit(x)
        for config in (MaskConfig("quantile", 0.0, 0.5), MaskConfig("soft_inverse")):
            masked = split.suffix(state, masks.mask(config))
            torch.testing.assert_close(masked, plain.forward(x, masks.mask(config)),
                                       rtol=0, atol=0)
            assert not torch.equal(masked, unmasked)
