"""ActivationCapture, unit_shapes and default_layers on small torchvision networks at 64 px."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from sensitivity.capture import (
    DEFAULT_LAYERS,
    ActivationCapture,
    classification_layer,
    default_layers,
    unit_shapes,
)

SIZE = 64


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=4).eval()


@pytest.fixture(scope="module")
def alexnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.alexnet(weights=None, num_classes=4).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def test_default_layers_follow_method_section_4(resnet, alexnet):
    assert default_layers("resnet18") == list(DEFAULT_LAYERS["resnet18"])
    assert default_layers(resnet) == ["maxpool", "layer1", "layer2", "layer3", "layer4",
                                      "avgpool", "fc"]
    assert default_layers(alexnet) == [
        "features.2", "features.5", "features.7", "features.9", "avgpool",
        "classifier.2", "classifier.5", "classifier.6",
    ]
    assert default_layers("vgg11")[-1] == "classifier.6"
    assert classification_layer(resnet) == "fc"
    assert classification_layer(alexnet) == "classifier.6"


def test_default_layers_of_other_networks_end_at_the_classifier():
    layers = default_layers("mobilenet_v2")
    with torch.device("meta"):
        valid = {n for n, _ in torchvision.models.mobilenet_v2().named_modules()}
    assert set(layers) <= valid
    assert layers[-1] == "classifier.1" and len(layers) >= 4
    with pytest.raises(ValueError, match="unknown architecture"):
        default_layers("not_a_net")


def test_unit_shapes_for_both_reductions(resnet):
    shapes = unit_shapes(resnet, SIZE)
    assert shapes == {
        "maxpool": (64, 16, 16), "layer1": (64, 16, 16), "layer2": (128, 8, 8),
        "layer3": (256, 4, 4), "layer4": (512, 2, 2), "avgpool": (512, 1, 1), "fc": (4,),
    }
    means = unit_shapes(resnet, SIZE, reduction="channel_mean")
    assert means == {k: v[:1] for k, v in shapes.items()}
    mixed = unit_shapes(resnet, (SIZE, 48), layers=["layer1", "fc"],
                        reduction={"layer1": "channel_mean"})
    assert mixed == {"layer1": (64,), "fc": (4,)}


def test_small_input_resnet_identity_maxpool_still_captures(images):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    assert default_layers(net) == list(DEFAULT_LAYERS["resnet18"])
    with ActivationCapture(net, ["maxpool", "layer4"]) as capture:
        net(images)
        outputs = capture.pop()
    assert outputs["maxpool"].shape == (3, 64, SIZE, SIZE)
    assert outputs["layer4"].shape == (3, 512, SIZE // 8, SIZE // 8)


def test_reductions_agree_with_each_other_and_with_the_network(resnet, images):
    layers = ["layer4", "avgpool", "fc"]
    with (
        ActivationCapture(resnet, layers) as full,
        ActivationCapture(resnet, layers, reduction="channel_mean") as means,
    ):
        with torch.no_grad():
            logits = resnet(images)
        full_out, mean_out = full.pop(), means.pop()
    for tensor in full_out.values():
        assert tensor.dtype == torch.float32 and not tensor.requires_grad
        assert tensor.shape[0] == len(images)
    # channel_mean is the spatial mean; ResNet's avgpool is that same mean.
    torch.testing.assert_close(mean_out["layer4"], full_out["layer4"].mean(dim=(2, 3)))
    torch.testing.assert_close(mean_out["layer4"], full_out["avgpool"].flatten(1))
    assert mean_out["fc"].shape == (3, 4)
    # The classification layer is captured after softmax.
    torch.testing.assert_close(full_out["fc"].sum(dim=1), torch.ones(3))
    torch.testing.assert_close(full_out["fc"], torch.softmax(logits, dim=1))


def test_softmax_can_be_switched_off_or_moved(resnet, images):
    with ActivationCapture(resnet, ["fc"], softmax_layers=[]) as capture:
        logits = resnet(images)
        raw = capture.pop()["fc"]
    torch.testing.assert_close(raw, logits.detach())
    with pytest.raises(ValueError, match="not among the captured layers"):
        ActivationCapture(resnet, ["layer1"], softmax_layers=["fc"])


def test_outputs_are_detached_copies_unaffected_by_inplace_relu(alexnet, images):
    x = images.clone().requires_grad_(True)
    layers = ["classifier.1", "classifier.2", "classifier.6"]
    with ActivationCapture(alexnet, layers) as capture:
        alexnet(x).sum().backward()
        out = capture.pop()
    linear, relu = out["classifier.1"], out["classifier.2"]
    # classifier.2 is ReLU(inplace=True) on classifier.1's output: the capture kept a copy.
    assert (linear < 0).any()
    torch.testing.assert_close(relu, linear.clamp(min=0))
    assert not any(t.requires_grad for t in out.values())
    assert all(t.device == next(alexnet.parameters()).device for t in out.values())
    torch.testing.assert_close(out["classifier.6"].sum(dim=1), torch.ones(3))


def test_alexnet_default_unit_shapes_at_64_px(alexnet):
    shapes = unit_shapes(alexnet, SIZE)
    assert shapes["features.2"] == (64, 7, 7)
    assert shapes["avgpool"] == (256, 6, 6)
    assert shapes["classifier.5"] == (4096,)
    assert shapes["classifier.6"] == (4,)


def test_bad_layer_name_lists_the_valid_ones(resnet):
    with pytest.raises(ValueError, match="unknown layer name") as info:
        ActivationCapture(resnet, ["layer1", "layer9"])
    message = str(info.value)
    assert "'layer9'" in message
    for valid in ("layer1", "layer4.1.conv2", "avgpool", "fc"):
        assert valid in message
    with pytest.raises(ValueError, match="unknown reduction"):
        ActivationCapture(resnet, ["fc"], reduction="max")
    with pytest.raises(ValueError, match="list of names"):
        ActivationCapture(resnet, "fc")


def test_hooks_are_removed_and_modes_restored(resnet, images):
    resnet.train()
    try:
        capture = ActivationCapture(resnet, ["layer2", "fc"])
        assert capture.unit_shapes(SIZE)["layer2"] == (128, 8, 8)
        assert resnet.training and resnet.layer2[0].bn1.training
        with capture:
            assert capture.active
            with pytest.raises(ValueError, match="produced no output"):
                capture.pop()
        assert not capture.active
        assert all(not m._forward_hooks for m in resnet.modules())
    finally:
        resnet.eval()


def test_a_sink_takes_each_output_as_it_is_made_and_repeated_modules_are_named(resnet, images):
    handed: list[tuple[str, torch.Tensor]] = []
    with ActivationCapture(resnet, ["layer1", "layer2", "fc"]) as capture:
        capture.sink = lambda name, value: handed.append((name, value))
        resnet(images)
        assert capture.pop() == {} and capture.repeated == []
        capture.sink = None
        resnet(images)
        kept = capture.pop()
    assert [name for name, _ in handed] == ["layer1", "layer2", "fc"]
    for name, value in handed:
        torch.testing.assert_close(value, kept[name], rtol=0, atol=0)
    # A BasicBlock's relu runs twice per forward: kept, the last call wins; handed on, the
    # first output is gone already, so the second call is an error.
    with ActivationCapture(resnet, ["layer1.0.relu", "fc"]) as capture:
        resnet(images)
        capture.pop()
        assert capture.repeated == ["layer1.0.relu"]
        capture.sink = lambda name, value: None
        with pytest.raises(ValueError, match=r"'layer1\.0\.relu' ran twice in one forward"):
            resnet(images)
