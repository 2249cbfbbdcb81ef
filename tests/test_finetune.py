"""Training-time suppression (lightning_modules/finetune.py): head-only fine-tuning with masks
in place, plain fine-tuning with the nuisance augmentation, the penalty variant, the distorted
evaluation, determinism, and a demo-scale run on the spurious-cue (shape vs hue) data."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from test_ground_truth import SmallCNN, fit
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from data import PlantedFactorDataModule
from lightning_modules.finetune import (
    SuppressedModel,
    distort,
    evaluate,
    finetune_with_augmentation,
    finetune_with_penalty,
    finetune_with_suppression,
    head_name,
    random_parameters,
    top_units,
    training_batches,
)
from sensitivity.augmentations import apply
from sensitivity.config import EngineConfig
from sensitivity.engine import run_analysis
from sensitivity.masking import selection_mask
from sensitivity.problem import AugmentationProblem

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

SIZE = 32
CLASSES = 4
LAYER = "features.5"  # ReLU of the second block: (8, 16, 16) at width 4
NEXT = "features.6"  # the module after it: its input is the (masked) layer output
SELECTED = torch.zeros(8, 1, 1, dtype=torch.bool)
SELECTED[[1, 4]] = True


def small_data(**kwargs) -> PlantedFactorDataModule:
    options = dict(factor="shape", num_classes=CLASSES, image_size=SIZE, train_per_class=16,
                   val_per_class=8, batch_size=16)
    return PlantedFactorDataModule(**(options | kwargs))


def small_model(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(CLASSES, width=4)


def inputs_of(model: nn.Module, module: str) -> tuple[list[Tensor], RemovableHandle]:
    """A list filled with the inputs of ``model``'s ``module`` on every forward, and the hook."""
    seen: list[Tensor] = []
    target = dict(model.named_modules())[module]
    handle = target.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    return seen, handle


def test_head_only_fine_tuning_changes_only_the_head_with_masks_in_place():
    model, data = small_model(), small_data()
    before = copy.deepcopy(model.state_dict())
    seen, handle = inputs_of(model, NEXT)
    tuned, record = finetune_with_suppression(
        model, selection_mask({LAYER: SELECTED}, 0.0), data, steps=5, lr=1e-2, seed=0
    )
    assert isinstance(tuned, SuppressedModel) and tuned.model is model
    assert head_name(model) == "fc" and record.trained == ["fc.weight", "fc.bias"]
    # During training: the selected channels reach the next layer as zeros, the others do not.
    assert len(seen) == 5
    assert all(x[:, SELECTED.flatten()].abs().max() == 0 for x in seen)
    assert all(x[:, ~SELECTED.flatten()].abs().max() > 0 for x in seen)
    after = model.state_dict()
    for name, value in before.items():  # parameters and batch-norm buffers alike
        same = torch.equal(value, after[name])
        assert same != name.startswith("fc."), name
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    # After: the returned model still masks; the bare model does not.
    images = data.probe_set(2)[0]
    seen.clear()
    tuned(images)
    assert seen[-1][:, SELECTED.flatten()].abs().max() == 0
    model(images)
    assert seen[-1][:, SELECTED.flatten()].abs().max() > 0
    handle.remove()


def test_scaled_mask_multiplies_the_selected_units():
    model, data = small_model(), small_data()
    images = data.probe_set(2)[0]
    tuned, _ = finetune_with_suppression(model, selection_mask({LAYER: SELECTED}, 0.5), data,
                                         steps=2, lr=1e-2, seed=0)
    seen, handle = inputs_of(model, NEXT)
    tuned(images)
    model(images)
    handle.remove()
    masked, plain = seen
    expected = torch.where(SELECTED, plain * 0.5, plain)
    torch.testing.assert_close(masked, expected)


def test_augmentation_fine_tuning_sees_augmented_batches_with_the_same_steps_and_optimiser():
    data, steps, seed = small_data(), 6, 3
    model = small_model()
    seen, handle = inputs_of(model, "features")
    tuned, record = finetune_with_augmentation(model, data, "hue", steps=steps, lr=1e-3,
                                               seed=seed, train="head")
    handle.remove()
    raw = [images for images, _ in training_batches(data, steps, seed)]
    assert tuned is model and len(seen) == len(raw) == steps
    # Recompute: the raw batches of the seed, hue-shifted with parameters from its stream.
    from data.common import sub_seed
    generator = torch.Generator().manual_seed(sub_seed(seed, 1))
    for got, images in zip(seen, raw, strict=True):
        params = random_parameters("hue", images.shape[0], (SIZE, SIZE), generator)
        assert params["factor"].abs().max() <= 0.5
        assert not torch.allclose(got, (images - 0.5) / 0.25)
        torch.testing.assert_close(got, (apply("hue", images, params) - 0.5) / 0.25)
    _, suppressed = finetune_with_suppression(
        small_model(), selection_mask({LAYER: SELECTED}, 0.0), data, steps=steps, lr=1e-3,
        seed=seed
    )
    for key in ("steps", "lr", "seed", "optimizer", "batch_size", "train", "trained"):
        assert getattr(record, key) == getattr(suppressed, key), key
    assert len(record.losses) == len(suppressed.losses) == steps


def run_all(seed: int) -> list[tuple[dict, list[float]]]:
    """State dicts and loss curves of the three variants from the same initial model."""
    data, runs = small_data(), []
    mask = selection_mask({LAYER: SELECTED}, 0.0)
    for train in ("head", "all"):
        tuned, record = finetune_with_suppression(small_model(), mask, data, 3, 1e-2, seed,
                                                  train=train)
        runs.append((tuned.state_dict(), record.losses))
    tuned, record = finetune_with_augmentation(small_model(), data, "hue", 3, 1e-2, seed)
    runs.append((tuned.state_dict(), record.losses))
    tuned, record = finetune_with_penalty(small_model(), {LAYER: SELECTED}, data, "hue", 1.0, 3,
                                          1e-2, seed)
    runs.append((tuned.state_dict(), record.losses + record.penalties))
    return runs


def test_fine_tuning_is_deterministic_per_seed():
    first, again, other = run_all(0), run_all(0), run_all(1)
    for (state, losses), (state2, losses2), (_, losses3) in zip(first, again, other, strict=True):
        assert losses == losses2 and losses != losses3
        assert all(torch.equal(value, state2[name]) for name, value in state.items())


def test_penalty_is_the_pair_variance_of_the_selected_units():
    model, data = small_model(), small_data()
    seen, handle = inputs_of(model, NEXT)
    _, record = finetune_with_penalty(model, {LAYER: SELECTED}, data, "hue", 0.5, steps=1,
                                      lr=1e-9, seed=0)
    handle.remove()
    (pair,) = seen  # the layer's output for (x, hue(x)), unmasked
    n = pair.shape[0] // 2
    expected = ((pair[:n] - pair[n:]) ** 2 / 4)[:, SELECTED.flatten()].mean()
    assert record.train == "all" and record.penalties[0] == pytest.approx(float(expected))
    assert record.penalties[0] > 0


def test_distort_and_evaluate():
    model, data = small_model().eval(), small_data()
    images, labels = data.probe_set(4, "val")
    assert torch.equal(distort(images, "hue", 0.0), images)
    # Hue +0.5 and -0.5 turns are the same shift: s = 1 is one image whatever the side.
    full = distort(images, "hue", 1.0, seed=1)
    torch.testing.assert_close(
        full, apply("hue", images, {"factor": torch.full((len(images),), 0.5)}),
        atol=1e-5, rtol=0
    )
    half = distort(images, "hue", 0.5, seed=2)
    with torch.no_grad():
        expected = (model(half).argmax(1) == labels).float().mean().item()
    assert evaluate(model, images, labels, "hue", 0.5, seed=2, batch_size=5) == \
        pytest.approx(expected)
    with pytest.raises(ValueError, match="strength"):
        distort(images, "hue", 1.5)


def train_on_spurious(data: PlantedFactorDataModule, epochs: int) -> SmallCNN:
    """SmallCNN trained on shape classes whose train hue agrees with the class."""
    return fit(small_model(), data, epochs)


def test_demo_suppression_vs_augmentation_on_the_spurious_cue(capsys):
    """The pipeline end to end: train on shape with a 95 % hue cue, find the hue-sensitive
    channels of one layer by a Sobol analysis, fine-tune (suppression, head only; augmentation,
    whole network; same steps) and evaluate on the shifted val split. No claim about which
    wins: the accuracies must equal a recomputation."""
    start = time.perf_counter()
    data = PlantedFactorDataModule(factor="shape", num_classes=CLASSES, image_size=SIZE,
                                   train_per_class=128, val_per_class=32, batch_size=64,
                                   nuisance="hue", agreement=0.95, eval_nuisance="shifted")
    model = train_on_spurious(data, epochs=4)
    problem = AugmentationProblem(["hue", "hflip"], auxiliaries=["class", "image"],
                                  n_classes=CLASSES, images_per_class=2)
    config = EngineConfig(method="sobol", n=32, layers=["features.11"], reduction="channel_mean",
                          batch_rows=512, progress=False)
    result = run_analysis(model, problem, data.probe_set(2)[0], config)
    selected = top_units(result, model, (SIZE, SIZE), "hue", "features.11", count=4)
    assert selected["features.11"].shape == (16, 1, 1) and selected["features.11"].sum() == 4
    images, labels = data.datasets["val"].tensors
    accuracy = {"before": evaluate(model, images, labels)}
    base = copy.deepcopy(model)
    suppressed, record = finetune_with_suppression(
        copy.deepcopy(base), selection_mask(selected, 0.0), data, steps=20, lr=3e-3, seed=0)
    augmented, plain = finetune_with_augmentation(copy.deepcopy(base), data, "hue", steps=20,
                                                  lr=3e-3, seed=0)
    for name, tuned in (("suppression", suppressed), ("augmentation", augmented)):
        accuracy[name] = evaluate(tuned, images, labels)
        with torch.no_grad():
            recomputed = (tuned(images).argmax(1) == labels).float().mean().item()
        assert accuracy[name] == pytest.approx(recomputed)
    assert record.steps == plain.steps == 20 and len(record.losses) == len(plain.losses) == 20
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        print(f"\nshifted-val accuracy {accuracy}; {elapsed:.1f} s")
    assert elapsed < 60
