"""Planted ground truth: networks trained on images whose class is a known factor must show it.

A small CNN learns the planted ``colour`` classes (the class is the object's hue) or the planted
``shape`` classes (hue random). At the output layer (softmax probabilities) the colour network's
variance must come from hue rather than from a flip or a circular shift, and the shape network
must be far less hue-sensitive. A small vision transformer (torchvision's VisionTransformer,
two layers) trained on the colour classes must rank hue first at its head as the CNN does. The
hand-built counterpart (a unit computing the mean chroma, whose decomposition puts saturation
and grayscale on top) is tests/test_engine.py's ColourStats.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import VisionTransformer

from data import PlantedFactorDataModule
from sensitivity.config import EngineConfig
from sensitivity.engine import run_analysis
from sensitivity.problem import AugmentationProblem

SIZE = 32
CLASSES = 4
PROBE_PER_CLASS = 4
AUGMENTATIONS = ["hue", "hflip", "rolling"]
# Sobol base points / Shapley trajectories: the 95% half-widths at the output layer come out
# near 0.05-0.2 here, well below the gaps the assertions test.
N = 256
# Every test needs the two trained networks (about 20 s): slow. Convolutions this small gain
# nothing from a second thread, and on shared cores an OpenMP team waiting for a busy core slows
# them many times over.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread_per_module")]


class SmallCNN(nn.Module):
    """Five 3x3 conv-BN-ReLU layers (two with stride 2), global average pooling, ``fc``.

    Images (B, 3, 32, 32) in [0, 1] -> logits (B, classes). About 3 MFLOPs per image: trains
    in seconds on a CPU, and (unlike a ResNet18 on a few hundred images) generalises on the
    shape classes.
    """

    def __init__(self, classes: int, width: int = 16) -> None:
        super().__init__()
        channels = [3, width, 2 * width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for i, stride in enumerate((1, 2, 1, 2, 1)):
            layers += [nn.Conv2d(channels[i], channels[i + 1], 3, stride, 1, bias=False),
                       nn.BatchNorm2d(channels[i + 1]), nn.ReLU()]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(channels[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features((x - 0.5) / 0.25))


class SmallViT(VisionTransformer):
    """torchvision's VisionTransformer at 32 px: 8 px patches (16 tokens and a class token),
    2 encoder layers of width 32 with 2 heads, the head ``heads.head``; inputs normalised as
    SmallCNN's. Images (B, 3, 32, 32) in [0, 1] -> logits (B, classes)."""

    def __init__(self, classes: int) -> None:
        super().__init__(image_size=SIZE, patch_size=8, num_layers=2, num_heads=2,
                         hidden_dim=32, mlp_dim=64, num_classes=classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward((x - 0.5) / 0.25)


def fit(model: nn.Module, data: PlantedFactorDataModule, epochs: int) -> nn.Module:
    """Train ``model`` on ``data``'s train split: AdamW (lr 3e-3, weight decay 0.01) with a
    one-cycle schedule, cross-entropy; returned in eval mode. Seed the caller's generator
    first for a repeatable run."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    loader = data.train_dataloader()
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, epochs * len(loader))
    model.train()
    for _ in range(epochs):
        for images, labels in loader:
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def train(
    factor: str, epochs: int = 10, network: type[nn.Module] = SmallCNN
) -> tuple[nn.Module, PlantedFactorDataModule, float]:
    """A seeded ``network`` trained on ``factor`` classes; returns it, its data, val accuracy."""
    torch.manual_seed(0)
    data = PlantedFactorDataModule(factor=factor, num_classes=CLASSES, image_size=SIZE,
                                   train_per_class=256, val_per_class=32, batch_size=64)
    model = fit(network(CLASSES), data, epochs)
    images, labels = data.datasets["val"].tensors
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    return model, data, accuracy


def analyze(
    model: nn.Module, data: PlantedFactorDataModule, method: str, head: str = "fc"
) -> dict[str, tuple]:
    """{variable: (mean over classes of the index, mean half-width)} at ``head`` (softmax)."""
    problem = AugmentationProblem(AUGMENTATIONS, auxiliaries=["class", "image"],
                                  n_classes=CLASSES, images_per_class=PROBE_PER_CLASS)
    probe = data.probe_set(PROBE_PER_CLASS)[0]
    config = EngineConfig(method=method, n=N, seed=0, layers=[head], batch_rows=512,
                          progress=False)
    fc = run_analysis(model, problem, probe, config).layers[head]
    key = "ST" if method == "sobol" else "shapley_normalized"
    values, conf = fc[key].mean(axis=1), fc[f"{key}_conf"].mean(axis=1)
    return {g: (float(v), float(c)) for g, v, c in zip(problem.group_names, values, conf,
                                                         strict=True)}


@pytest.fixture(scope="module")
def colour() -> dict:
    model, data, accuracy = train("colour")
    return {"accuracy": accuracy, "sobol": analyze(model, data, "sobol"),
            "shapley": analyze(model, data, "shapley")}


@pytest.fixture(scope="module")
def transformer() -> dict:
    model, data, accuracy = train("colour", network=SmallViT)
    return {"accuracy": accuracy, "sobol": analyze(model, data, "sobol", "heads.head")}


@pytest.fixture(scope="module")
def shape() -> dict:
    model, data, accuracy = train("shape")
    return {"accuracy": accuracy, "sobol": analyze(model, data, "sobol")}


def test_both_networks_learned_their_factor(colour, shape):
    assert colour["accuracy"] >= 0.95  # chance: 0.25
    assert shape["accuracy"] >= 0.5


@pytest.mark.parametrize("method", ["sobol", "shapley"])
def test_colour_network_is_sensitive_to_hue_not_to_flips_or_shifts(colour, method):
    """Total Sobol index (ST) and Shapley share of hue exceed those of hflip and rolling by
    more than both confidence half-widths."""
    indices = colour[method]
    hue, hue_conf = indices["hue"]
    for other in ("hflip", "rolling"):
        value, conf = indices[other]
        assert hue - hue_conf > value + conf, (method, indices)
    assert hue > 0.15


def test_shape_network_is_far_less_hue_sensitive_than_the_colour_network(colour, shape):
    colour_hue, colour_conf = colour["sobol"]["hue"]
    shape_hue, shape_conf = shape["sobol"]["hue"]
    assert colour_hue - colour_conf > shape_hue + shape_conf, (colour["sobol"], shape["sobol"])


def test_a_transformer_ranks_the_planted_factor_first_at_its_head(transformer):
    """As the CNN: the ViT learned the colour classes, and at its head (softmax) the total
    index of hue exceeds those of hflip and rolling by more than both half-widths."""
    assert transformer["accuracy"] >= 0.95
    indices = transformer["sobol"]
    hue, hue_conf = indices["hue"]
    for other in ("hflip", "rolling"):
        value, conf = indices[other]
        assert hue - hue_conf > value + conf, indices
    assert hue == max(value for name, (value, _) in indices.items() if name in AUGMENTATIONS)
