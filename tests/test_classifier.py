"""ImageClassifier: architectures, small-input variants, normalisation, offline weight loading."""

from __future__ import annotations

import argparse
import hashlib

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from lightning_modules import ImageClassifier
from lightning_modules.weights import file_sha256, state_dict_sha256

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
# torchvision's file name for ResNet18_Weights.IMAGENET1K_V1 inside <TORCH_HOME>/hub/checkpoints.
RESNET18_IMAGENET_FILE = "resnet18-f37072fd.pth"


def images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """(batch, 3, size, size) uniform images in [0, 1]."""
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def torchvision_state(arch: str, seed: int, **kwargs) -> dict[str, torch.Tensor]:
    """State dict of a freshly initialised torchvision model (seeded)."""
    torch.manual_seed(seed)
    return torchvision.models.get_model(arch, weights=None, **kwargs).state_dict()


def assert_same_tensors(a: dict, b: dict, skip: tuple[str, ...] = ()) -> None:
    for key, value in a.items():
        if not key.startswith(skip):
            assert torch.equal(value, b[key]), key


RESNET_NAMES = ["maxpool", "layer1", "layer4", "avgpool", "fc"]
ALEXNET_NAMES = ["features.2", "features.5", "avgpool", "classifier.6"]
VGG_NAMES = ["features.2", "features.15", "avgpool", "classifier.6"]
# (arch, image size, batch, module names that must exist, stem module, its kernel). The 64 px
# cases get the small-input stem (auto); VGG's stem is the same in both variants.
FORWARD_CASES = [
    ("resnet18", 64, 2, RESNET_NAMES, "conv1", (3, 3)),
    ("resnet18", 224, 2, RESNET_NAMES, "conv1", (7, 7)),
    ("alexnet", 64, 2, ALEXNET_NAMES, "features.0", (3, 3)),
    ("alexnet", 224, 2, ALEXNET_NAMES, "features.0", (11, 11)),
    ("vgg11", 64, 2, VGG_NAMES, "features.0", (3, 3)),
    ("vgg11", 224, 1, VGG_NAMES, "features.0", (3, 3)),  # heavy: batch 1
]


@pytest.mark.parametrize(("arch", "size", "batch", "names", "stem", "kernel"), FORWARD_CASES)
def test_forward_shapes_and_module_names(arch, size, batch, names, stem, kernel):
    torch.manual_seed(0)
    model = ImageClassifier(arch, num_classes=7, image_size=size).eval()
    modules = dict(model.net.named_modules())
    assert all(name in modules for name in names)
    assert modules[stem].kernel_size == kernel
    with torch.no_grad():
        logits = model(images(batch, size))
    assert logits.shape == (batch, 7)
    assert torch.isfinite(logits).all()


def test_small_input_variant_is_auto_only_for_small_images_without_weights():
    small = ImageClassifier("resnet18", image_size=32)
    assert small.small_input and isinstance(small.net.maxpool, nn.Identity)
    assert small.net.conv1.stride == (1, 1)
    assert not ImageClassifier("resnet18", image_size=96).small_input
    assert not ImageClassifier("resnet18").small_input  # size unknown: stock network
    forced = ImageClassifier("alexnet", small_input=True)
    assert forced.net.features[0].stride == (1, 1)
    with pytest.raises(ValueError, match="no small-input variant"):
        ImageClassifier("squeezenet1_0", small_input=True)
    with pytest.raises(ValueError, match="63 px"):
        ImageClassifier("alexnet", small_input=False, image_size=32)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="unknown architecture 'resnet7'"):
        ImageClassifier("resnet7")
    with pytest.raises(ValueError, match="num_classes"):
        ImageClassifier(num_classes=1)
    with pytest.raises(ValueError, match="optimizer"):
        ImageClassifier(optimizer="rmsprop")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ImageClassifier()(torch.rand(3, 32, 32))


def test_forward_normalises_with_imagenet_statistics():
    torch.manual_seed(0)
    model = ImageClassifier("resnet18", num_classes=4, image_size=32).eval()
    x = images(2, 32)
    expected = (x - IMAGENET_MEAN) / IMAGENET_STD
    torch.testing.assert_close(model.normalize(x), expected)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net(expected))
        assert not torch.allclose(model(x), model.net(x), atol=1e-3)
    # The statistics are constants, not part of the saved weights.
    assert all(key.startswith("net.") for key in model.state_dict())


def test_state_dict_file_round_trip(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(num_classes=4).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)

    model = ImageClassifier("resnet18", num_classes=4, weights=str(path)).eval()
    assert_same_tensors(reference.state_dict(), model.net.state_dict())
    x = images(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(model.normalize(x)), rtol=0, atol=0)


def test_state_dict_file_with_other_class_count_keeps_the_head(tmp_path):
    state = torchvision_state("resnet18", seed=2, num_classes=10)
    path = tmp_path / "resnet18_10.pth"
    torch.save(state, path)
    with pytest.warns(UserWarning, match=r"fc\.weight"):
        model = ImageClassifier("resnet18", num_classes=4, weights=str(path))
    loaded = model.net.state_dict()
    assert_same_tensors(state, loaded, skip=("fc.",))
    assert loaded["fc.weight"].shape == (4, 512)

    # A small-input model takes everything but the stock stem (and the head).
    with pytest.warns(UserWarning, match=r"conv1\.weight"):
        small = ImageClassifier("resnet18", num_classes=4, weights=str(path), small_input=True)
    assert_same_tensors(state, small.net.state_dict(), skip=("fc.", "conv1."))
    assert small.net.conv1.weight.shape == (64, 3, 3, 3)


def test_wrong_weights_fail_clearly(tmp_path):
    other = tmp_path / "squeezenet.pth"
    torch.save(torchvision_state("squeezenet1_0", seed=3), other)
    with pytest.raises(ValueError, match="does not match architecture 'resnet18'"):
        ImageClassifier("resnet18", weights=str(other))

    wrapped = tmp_path / "lightning_style.ckpt"
    torch.save({"state_dict": ImageClassifier().state_dict(), "epoch": 3}, wrapped)
    with pytest.raises(ValueError, match="load_from_checkpoint"):
        ImageClassifier("resnet18", weights=str(wrapped))

    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageClassifier("resnet18", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        ImageClassifier("resnet18", weights="IMAGENET9K_V9")
    with pytest.raises(ValueError, match="another architecture"):
        ImageClassifier("resnet18", weights="AlexNet_Weights.IMAGENET1K_V1")


def test_enum_weights_come_only_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / RESNET18_IMAGENET_FILE
    with pytest.raises(FileNotFoundError, match="never downloads") as failure:
        ImageClassifier("resnet18", num_classes=1000, weights="IMAGENET1K_V1")
    assert str(cached) in str(failure.value)
    assert not cached.exists()

    state = torchvision_state("resnet18", seed=4)  # stands in for the ImageNet file
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    for name in ("IMAGENET1K_V1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1"):
        model = ImageClassifier("resnet18", num_classes=1000, weights=name)
        assert_same_tensors(state, model.net.state_dict())
    with pytest.warns(UserWarning, match=r"fc\.bias"):
        model = ImageClassifier("resnet18", num_classes=4, weights="IMAGENET1K_V1", image_size=64)
    assert not model.small_input  # pretrained weights keep the stock network
    assert_same_tensors(state, model.net.state_dict(), skip=("fc.",))


def test_unreadable_files_fail_without_suggesting_unsafe_loading(tmp_path):
    """Random bytes and pickled objects other than tensors are ValueErrors naming the file;
    torch's advice to load with weights_only=False (running the file's code) never shows."""
    garbage = tmp_path / "random.ckpt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    pickled = tmp_path / "namespace.pth"
    torch.save(argparse.Namespace(lr=0.1), pickled)  # a Python object, not tensors
    for path in (garbage, pickled):
        with pytest.raises(ValueError, match="not a readable torch file") as failure:
            ImageClassifier("resnet18", weights=str(path))
        assert str(path) in str(failure.value) and "weights_only" not in str(failure.value)
    with pytest.raises(ValueError, match=f"checkpoint {garbage} is not a readable") as failure:
        ImageClassifier.load_from_checkpoint(garbage)
    assert "weights_only" not in str(failure.value) and failure.value.__cause__ is None


def test_weight_digests_identify_files_and_state_dicts(tmp_path):
    torch.manual_seed(0)
    a = ImageClassifier("resnet18", num_classes=4)
    torch.manual_seed(0)
    same = ImageClassifier("resnet18", num_classes=4)
    assert state_dict_sha256(a) == state_dict_sha256(same)
    with torch.no_grad():
        same.net.fc.bias[0] += 1e-6
    assert state_dict_sha256(a) != state_dict_sha256(same)
    path = tmp_path / "weights.pth"
    path.write_bytes(b"abc")
    assert file_sha256(path) == hashlib.sha256(b"abc").hexdigest()
