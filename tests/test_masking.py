"""Guided masking: planted ground truth, quantile ties, soft masks, prefix reuse, the callback
and ``analyze.py masking``.

A small CNN (three conv stages with BatchNorm, 32 px) is trained once per module on planted
colour classes; its sensitivity maps come from the engine (Sobol, full maps at the conv stages).
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import helpers
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import fork_ranks
from torch import nn

from callbacks.masking import MaskingCallback, masking_record
from callbacks.sensitivity import SensitivityCallback
from data import PlantedFactorDataModule
from lightning_modules import ImageClassifier
from sensitivity.capture import ActivationCapture
from sensitivity.config import EngineConfig
from sensitivity.engine import run_analysis
from sensitivity.estimators import FLAG_CONSTANT, FLAG_NEGLIGIBLE, FLAG_UNSUPPORTED
from sensitivity.masking import (
    GROUP_KIND,
    MaskConfig,
    MaskedNetwork,
    MaskingResult,
    VariableMasks,
    default_configurations,
    evaluate_masking,
    layer_output_shapes,
    quantile_mask,
    sensitivity_maps,
    top_units_mask,
)
from sensitivity.problem import AugmentationProblem
from sensitivity.results import AnalysisResult
from sensitivity.store import ResultsStore

SIZE = 32
LAYERS = ["features.2", "features.6", "features.10"]  # the ReLU output of each conv stage
# Hue within +-18 degrees: class hues are >= 60 degrees apart (+-8 jitter), so hue-augmented
# inputs keep their class and the unmasked network still classifies them.
HUE_BOUNDS = {"hue": {"factor": [-0.05, 0.05]}}
# One intra-op thread: on a few shared cores, two threads per process oversubscribe them and
# each forward waits on the other thread (many times slower).
pytestmark = pytest.mark.usefixtures("one_thread_per_module")


class TinyNet(nn.Module):
    """(B, 3, 32, 32) in [0, 1] -> logits; conv stages at 32, 16 and 8 px."""

    def __init__(self, classes: int) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(*stage(3, 8), nn.MaxPool2d(2), *stage(8, 16),
                                      nn.MaxPool2d(2), *stage(16, 16))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def train(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int) -> None:
    optimiser = torch.optim.Adam(net.parameters(), 1e-2)
    order = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(epochs):
        permutation = torch.randperm(len(images), generator=order)
        for start in range(0, len(images), 32):
            batch = permutation[start:start + 32]
            loss = nn.functional.cross_entropy(net(images[batch]), labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    net.eval()


@pytest.fixture(scope="module")
def planted() -> dict:
    """TinyNet trained on 4 planted colour classes; ST maps of hue, hflip, rotation."""
    torch.manual_seed(0)
    data = PlantedFactorDataModule("colour", num_classes=4, image_size=SIZE,
                                   train_per_class=128, val_per_class=64, seed=0)
    data.setup()
    net = TinyNet(4)
    train(net, *data.datasets["train"].tensors, epochs=8)
    problem = AugmentationProblem(["hue", "hflip", "rotation"], auxiliaries=("class", "image"),
                                  n_classes=4, images_per_class=4, bounds=HUE_BOUNDS)
    config = EngineConfig(method="sobol", n=128, layers=LAYERS, reduction="none", progress=False)
    result = run_analysis(net, problem, data.probe_set(4)[0], config)
    images, labels = data.probe_set(64)
    return {"net": net, "problem": problem, "result": result, "images": images,
            "labels": labels}


def ranks(values: np.ndarray) -> np.ndarray:
    """Distinct ranks in [0, 1) of ``values`` (ties broken by position)."""
    out = np.empty(values.size)
    out[np.argsort(values.ravel(), kind="stable")] = np.arange(values.size) / values.size
    return out.reshape(values.shape)


@pytest.mark.slow
def test_masking_hue_units_hurts_hue_inputs_more_than_hflip_or_random_units(planted):
    result, names = planted["result"], planted["result"].group_names
    maps, _ = sensitivity_maps(result, "ST", LAYERS)
    rng = np.random.default_rng(0)
    variables = ["hue", "hflip", "random_0", "random_1", "random_2"]
    # Rank-transformed maps have no ties, so the q = 0.5 mask selects exactly the top half of
    # each layer for every variable; uniform noise maps select half at random.
    ranked = {
        layer: np.stack([ranks(m[names.index("hue")]), ranks(m[names.index("hflip")]),
                         *(rng.random(m.shape[1:]) for _ in range(3))])
        for layer, m in maps.items()
    }
    out = evaluate_masking(planted["net"], ranked, variables, planted["images"],
                           planted["labels"], ["hue"], k=2, seed=0, problem=planted["problem"],
                           configurations=[MaskConfig("quantile", 0.0, 0.5)], batch_images=64)
    assert out.inputs == ["original", "hue"]
    np.testing.assert_array_equal(out.masked_fraction, out.masked_fraction[:1].repeat(5, 0))
    assert np.allclose(out.masked_fraction, 0.5, atol=1e-3)
    hue, hflip, *random = out.acc1[1, :, 0].tolist()
    unmasked = float(out.unmasked_acc1[1])
    print(f"hue inputs: unmasked {unmasked:.3f}, hue units masked {hue:.3f}, hflip units "
          f"{hflip:.3f}, random units {random}")
    assert unmasked > 0.8  # the network reads colour, and the narrow hue keeps the class
    # The accuracies are paired (same 256 images x 2 draws). The difference of two paired
    # accuracies has a standard error of at most 1/sqrt(n) with n independent samples; the two
    # draws of one image are not independent, so n = 256 images: 2 / sqrt(256) = 0.125 is two
    # worst-case standard errors.
    margin = 2 / math.sqrt(len(planted["images"]))
    assert hue + margin < hflip
    assert hue + margin < min(random)


def test_quantile_ties_are_reported_and_strict_rule_keeps_the_zeros():
    rng = np.random.default_rng(1)
    values = np.where(rng.random((4, 5, 5)) < 0.7, 0.0, rng.random((4, 5, 5)))
    strict, tied = quantile_mask(values, 0.5, "strict")
    assert tied and np.array_equal(strict, values > 0)
    inclusive, tied = quantile_mask(values, 0.5, "inclusive")
    assert tied and inclusive.all()
    top, tied = quantile_mask(values, 0.9, "strict")
    assert not tied and np.array_equal(top, values >= np.quantile(values, 0.9))

    torch.manual_seed(0)
    net = TinyNet(4).eval()
    shapes = layer_output_shapes(net, LAYERS, (SIZE, SIZE))
    dead = np.zeros((1, *shapes["features.2"]))                      # every unit 0
    sparse = np.full(shapes["features.6"], 0.5)  # 65% zeros: the 0.5 and 0.6 quantiles are 0
    sparse.flat[rng.permutation(sparse.size)[:round(0.65 * sparse.size)]] = 0.0
    sparse = sparse[None]
    dense = rng.random((1, *shapes["features.10"]))                  # no ties
    maps = {"features.2": dead, "features.6": sparse, "features.10": dense}
    images = torch.rand(8, 3, SIZE, SIZE)
    labels = torch.arange(4).repeat_interleave(2)
    results = {
        ties: evaluate_masking(net, maps, ["v"], images, labels, [], k=1, ties=ties)
        for ties in ("strict", "inclusive")
    }
    # Tied: the dead layer at every q, the sparse layer where the quantile is 0 (q 0.5, 0.6).
    expected_tied = np.zeros((1, 5, 3), dtype=bool)
    expected_tied[0, :, 0] = True
    expected_tied[0, :2, 1] = True
    for out in results.values():
        np.testing.assert_array_equal(out.tied, expected_tied)
        assert out.tied_layers == 7
    assert results["inclusive"].fully_masked_layers == 7
    assert results["strict"].fully_masked_layers == 0
    np.testing.assert_allclose(results["strict"].masked_fraction[0, :, 0], 0.0)
    np.testing.assert_allclose(results["strict"].masked_fraction[0, :2, 1],
                               (sparse > 0).mean())
    # With alpha 0 the inclusive rule zeroes the whole first stage: the prediction no longer
    # depends on the image, so at most one class (a quarter of the probe) is right.
    assert results["inclusive"].acc1[0, 0, 0] <= 0.25


def test_soft_and_quantile_masks_multiply_the_activations():
    torch.manual_seed(0)
    net = TinyNet(4).eval()
    shapes = layer_output_shapes(net, ["features.6"], (SIZE, SIZE))
    m = np.random.default_rng(2).random(shapes["features.6"])
    masks = VariableMasks({"features.6": m}, shapes, [0.7], "strict", torch.device("cpu"))
    weights = torch.as_tensor(m, dtype=torch.float32)
    x = torch.rand(4, 3, SIZE, SIZE)
    network = MaskedNetwork(net, ["features.6"], reuse_prefix=False)
    capture = ActivationCapture(net, ["features.6"], "none", [])
    selected = torch.as_tensor(m >= np.quantile(m, 0.7))
    expected = {
        MaskConfig("soft"): lambda a: a * weights,
        MaskConfig("soft_inverse"): lambda a: a * (1 - weights),
        MaskConfig("quantile", 1.5, 0.7): lambda a: torch.where(selected, 1.5 * a, a),
    }
    with torch.no_grad(), network, capture:
        network.forward(x, None)
        plain = capture.pop()["features.6"]
        for config, function in expected.items():
            network.forward(x, masks.mask(config))
            torch.testing.assert_close(capture.pop()["features.6"], function(plain))


def flagged_result(shape: tuple[int, ...], seed: int) -> AnalysisResult:
    """A sobol result of one layer "conv" with ST in [0, 1] for two variables; about a fifth of
    the units flagged, half of those with the raw ST 1e9 (clipped to 1: the most sensitive)
    and half with -25 (clipped to 0)."""
    rng = np.random.default_rng(seed)
    st = rng.uniform(0.05, 0.95, size=(2, *shape))
    flags = rng.choice([0, FLAG_CONSTANT, FLAG_UNSUPPORTED, FLAG_NEGLIGIBLE], size=shape,
                       p=[0.8, 0.05, 0.05, 0.1]).astype(np.uint8)
    high = (flags > 0) & (rng.random(shape) < 0.5)
    st[:, high], st[:, (flags > 0) & ~high] = 1e9, -25.0
    return AnalysisResult("sobol", ["hue", "hflip"], {"conv": {"ST": st}}, n=8,
                          evaluations=32, flags={"conv": flags})


def test_quantile_and_top_units_masks_rank_only_valid_units():
    result = flagged_result((4, 5, 5), seed=6)
    maps, valid = sensitivity_maps(result, "ST", ["conv"])
    m, ok = maps["conv"][0], valid["conv"]
    np.testing.assert_array_equal(ok, result.flags["conv"] == 0)
    flagged_high = ~ok & (result.layers["conv"]["ST"][0] == 1e9)  # raw values kept
    assert flagged_high.sum() > 3 and np.all(m[flagged_high] == 1.0)
    for q in (0.5, 0.9):
        selected, tied = quantile_mask(m, q, valid=ok)
        assert not tied
        np.testing.assert_array_equal(selected, ok & (m >= np.quantile(m[ok], q)))
        assert not np.any(selected & ~ok)
        # Counting the flagged units would select them and move the threshold.
        assert np.any(quantile_mask(m, q)[0] & flagged_high)
    # Ties among the valid units only: every valid unit at 0.3, flagged ones at 0 and 1.
    level = np.where(ok, 0.3, m)
    strict, tied = quantile_mask(level, 0.5, "strict", ok)
    assert tied and not strict.any()
    inclusive, tied = quantile_mask(level, 0.5, "inclusive", ok)
    assert tied and np.array_equal(inclusive, ok)
    empty, tied = quantile_mask(m, 0.5, valid=np.zeros_like(ok))
    assert not empty.any() and not tied
    top = top_units_mask(m, 10, ok)
    assert top.sum() == 10 and not np.any(top & ~ok)
    assert m[top].min() >= m[ok & ~top].max()
    assert np.any(top_units_mask(m, 10) & flagged_high)
    with pytest.raises(ValueError, match="only"):
        top_units_mask(m, int(ok.sum()) + 1, ok)


def test_soft_and_quantile_masks_leave_flagged_units_untouched():
    torch.manual_seed(0)
    net = TinyNet(4).eval()
    layers = ["features.2", "features.6"]
    shapes = layer_output_shapes(net, layers, (SIZE, SIZE))
    rng = np.random.default_rng(7)
    # features.2: a full map; features.6: a channel map (C,) broadcast over H and W.
    maps = {"features.2": rng.random(shapes["features.2"]),
            "features.6": rng.random(shapes["features.6"][:1])}
    valid = {layer: rng.random(m.shape) < 0.7 for layer, m in maps.items()}
    for layer, m in maps.items():
        # What raw values 1e9 and -25 clip to: 1 would lead every ranking, 0 zero the unit.
        m[~valid[layer]] = rng.random(np.count_nonzero(~valid[layer])) < 0.5
    broadcast = {"features.2": shapes["features.2"], "features.6": (16, 1, 1)}
    x = torch.rand(4, 3, SIZE, SIZE)
    network = MaskedNetwork(net, layers, reuse_prefix=False)
    capture = ActivationCapture(net, layers, "none", [])
    with torch.no_grad(), network, capture:
        network.forward(x, None)
        plain = capture.pop()
        for layer, m in maps.items():  # one layer at a time: its input stays unmasked
            masks = VariableMasks({layer: m}, broadcast, [0.7], "strict", torch.device("cpu"),
                                  valid)
            w = torch.as_tensor(m, dtype=torch.float32).reshape(broadcast[layer])
            keep = torch.as_tensor(valid[layer]).reshape(broadcast[layer])
            chosen = valid[layer] & (m >= np.quantile(m[valid[layer]], 0.7))
            selected = torch.as_tensor(chosen).reshape(broadcast[layer])
            assert masks.fraction[0.7][layer] == pytest.approx(chosen.mean())
            a = plain[layer]
            expected = {
                MaskConfig("soft"): torch.where(keep, a * w, a),
                MaskConfig("soft_inverse"): torch.where(keep, a * (1 - w), a),
                MaskConfig("quantile", 1.5, 0.7): torch.where(selected, 1.5 * a, a),
            }
            for config, value in expected.items():
                network.forward(x, masks.mask(config))
                torch.testing.assert_close(capture.pop()[layer], value)


def test_masking_results_count_valid_units_and_store_them(tmp_path):
    torch.manual_seed(0)
    net = TinyNet(4).eval()
    shapes = layer_output_shapes(net, LAYERS[:2], (SIZE, SIZE))
    rng = np.random.default_rng(8)
    maps = {layer: rng.random((1, *shape)) for layer, shape in shapes.items()}
    valid = {layer: rng.random(shape) < 0.6 for layer, shape in shapes.items()}
    maps["features.2"][0][valid["features.2"]] = 0.0  # every valid unit tied at the minimum
    for layer in maps:
        maps[layer][0][~valid[layer]] = 1.0
    images = torch.rand(8, 3, SIZE, SIZE)
    labels = torch.arange(4).repeat_interleave(2)
    out = evaluate_masking(net, maps, ["v"], images, labels, [], k=1, ties="inclusive",
                           valid=valid)
    np.testing.assert_allclose(out.valid_fraction, [valid[layer].mean() for layer in maps])
    for q, quantile in enumerate(out.quantiles):
        for i, layer in enumerate(maps):
            chosen, _ = quantile_mask(maps[layer][0], quantile, "inclusive", valid[layer])
            assert out.masked_fraction[0, q, i] == pytest.approx(chosen.mean())
    assert np.all(out.masked_fraction <= out.valid_fraction)
    # Inclusive ties select every valid unit of features.2 (and nothing flagged): "fully
    # masked" counts it although 40% of its units stay.
    np.testing.assert_allclose(out.masked_fraction[0, :, 0], out.valid_fraction[0])
    assert out.tied[0, :, 0].all() and out.fully_masked_layers == 5
    store = ResultsStore(tmp_path / "results.h5")
    assert store.write_result(GROUP_KIND, "flagged", out) == "masking/flagged"
    stored = store.read_result(MaskingResult, GROUP_KIND, "flagged")
    np.testing.assert_array_equal(stored.valid_fraction, out.valid_fraction)
    assert stored.fully_masked_layers == 5


@pytest.mark.slow
def test_prefix_reuse_gives_the_accuracies_of_plain_masked_forwards(planted):
    maps, valid = sensitivity_maps(planted["result"], "ST", LAYERS)
    images, labels = planted["images"][::8], planted["labels"][::8]  # 8 per class
    runs = {
        reuse: evaluate_masking(planted["net"], maps, planted["result"].group_names, images,
                                labels, ["hue", "hflip"], mask_variables=["hue", "hflip"], k=1,
                                problem=planted["problem"], reuse_prefix=reuse, valid=valid)
        for reuse in (True, False)
    }
    assert runs[True].prefix_reuse.startswith("prefix up to 'features.2'")
    assert runs[False].prefix_reuse == "prefix reuse disabled"
    assert runs[True].acc1.shape == (3, 2, 17)
    for key in ("acc1", "acc5", "unmasked_acc1", "masked_fraction", "valid_fraction"):
        np.testing.assert_array_equal(getattr(runs[True], key), getattr(runs[False], key))
    np.testing.assert_array_equal(runs[True].valid_fraction,
                                  planted["result"].valid_fraction())


def test_prefix_split_keeps_a_skip_connection_live():
    # Cut inside a residual block: the block input (the skip) is needed after the cut too.
    torch.manual_seed(0)
    model = ImageClassifier("resnet18", num_classes=4, small_input=False, image_size=SIZE).eval()
    layers = ["layer1.0.bn2", "layer3"]
    shapes = layer_output_shapes(model, layers, (SIZE, SIZE))
    maps = {layer: np.random.default_rng(3).random(shape) for layer, shape in shapes.items()}
    masks = VariableMasks(maps, shapes, [0.5], "strict", torch.device("cpu"))
    split = MaskedNetwork(model, layers)
    plain = MaskedNetwork(model, layers, reuse_prefix=False)
    assert split.split is not None and split.split.layer == "layer1.0.bn2"
    x = torch.rand(4, 3, SIZE, SIZE)
    with torch.no_grad(), split, plain:
        state = split.prefix(x)
        assert len(state) == 2  # the bn2 output and the block input
        for config in default_configurations(quantiles=[0.5]):
            mask = masks.mask(config)
            torch.testing.assert_close(split.suffix(state, mask), plain.forward(x, mask),
                                       rtol=0, atol=0)
        torch.testing.assert_close(split.suffix(state, None), model(x), rtol=0, atol=0)


def _ddp_worker(rank: int, world_size: int, out: str) -> None:
    """One rank of a gloo process group: masking of an untrained TinyNet on its shard."""
    torch.set_num_threads(1)
    result = small_masking_run()
    if rank == 0:
        np.savez(out, acc1=result.acc1, acc5=result.acc5, unmasked=result.unmasked_acc1)


def small_masking_run(**options):
    """Masking of an untrained TinyNet on 10 random images (the same on every process);
    ``options`` go to evaluate_masking."""
    torch.manual_seed(0)
    net = TinyNet(4).eval()
    shapes = layer_output_shapes(net, LAYERS, (SIZE, SIZE))
    rng = np.random.default_rng(4)
    maps = {layer: rng.random((2, *shape)) for layer, shape in shapes.items()}
    images = torch.rand(10, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    labels = torch.arange(10) % 4
    return evaluate_masking(net, maps, ["hue", "hflip"], images, labels, ["hue", "hflip"], k=2,
                            batch_images=3, **options)


def test_masking_gives_its_image_forwards_up_front_then_plain_lines(capsys):
    small_masking_run()
    lines = capsys.readouterr().err.splitlines()
    # Per image: the original and 2 draws of 2 augmentations, each unmasked and under 2 mask
    # variables x 17 configurations: 5 x 35 forwards.
    assert lines[0] == (
        "masking: 1750 image forwards (10 probe images, each as the original and 2 draws of "
        "each of 2 augmentations, x 35 passes: unmasked and 2 mask variables x 17 "
        "configurations)"
    )
    assert all(re.fullmatch(r"masking: \d+/1750 image forwards \(\d+%\), [\d.]+/s, ETA .+", line)
               for line in lines[1:-1]) and len(lines) > 3
    assert re.fullmatch(r"masking: 1750/1750 image forwards \(100%\), [\d.]+/s, done in .+",
                        lines[-1])
    small_masking_run(progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_two_processes_give_the_single_process_accuracies(tmp_path):
    out = tmp_path / "ddp.npz"
    fork_ranks(_ddp_worker, 2, str(out))
    single = small_masking_run()
    ddp = np.load(out)
    # Ranks take images 0-4 and 5-9; the hit counts are summed exactly.
    np.testing.assert_array_equal(ddp["acc1"], single.acc1)
    np.testing.assert_array_equal(ddp["acc5"], single.acc5)
    np.testing.assert_array_equal(ddp["unmasked"], single.unmasked_acc1)


class TinyModule(pl.LightningModule):
    """TinyNet as a LightningModule (``net``: the hooked network)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return nn.functional.cross_entropy(self(images), labels)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), 1e-2)


@pytest.mark.slow
def test_callback_writes_masking_of_the_epoch_analysis(tmp_path):
    torch.manual_seed(0)
    data = PlantedFactorDataModule("colour", num_classes=4, image_size=SIZE, train_per_class=8,
                                   val_per_class=2, seed=0, batch_size=16)
    engine = EngineConfig(method="sobol", n=4, layers=[*LAYERS, "fc"],
                          reduction="channel_mean", progress=False)
    sensitivity = SensitivityCallback(
        engine=engine, problem={"augmentations": ["hue", "hflip"],
                                "auxiliaries": ["class", "image"]},
        images_per_class=2,
    )
    callback = MaskingCallback(variables=["hue"], k=1, images_per_class=2)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[sensitivity, callback])
    trainer.fit(TinyModule(), datamodule=data)
    (result,) = callback.results
    assert result.epoch == 0 and result.analysis == "epoch_0000" and result.value == "ST"
    assert result.inputs == ["original", "hue", "hflip"] and result.layers == LAYERS
    store = ResultsStore(tmp_path / "sensitivity.h5")
    stored = store.read_result(MaskingResult, GROUP_KIND, "epoch_0000")
    np.testing.assert_array_equal(stored.acc1, result.acc1)
    analysis = store.read_analysis("epoch_0000")
    np.testing.assert_array_equal(stored.valid_fraction, analysis.valid_fraction()[:3])
    heatmap = tmp_path / "sensitivity" / "epoch_0000_masking_specificity.png"
    assert heatmap.stat().st_size > 0
    record = masking_record(result, heatmap)
    assert record["analysis/epoch"] == 0
    assert record["masking/unmasked/hue/acc1"] == pytest.approx(result.unmasked_acc1[1])
    assert "masking/specificity/hflip/hue" in record
    assert len(record["masking/table"].data) == 3 + 3 * 17


# ---------------------------------------------------------------------------------- the CLI
def write_results(path: Path, small_input: bool = False) -> Path:
    """A results file with a Sobol analysis "sobol" of random maps shaped like ResNet18's
    default checkpoints at 32 px (stock stem, or the small-input stem's larger maps); a tenth
    of every layer's units flagged, with the raw ST 1e9."""
    model = ImageClassifier("resnet18", num_classes=4, small_input=small_input, image_size=SIZE)
    layers = ["maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]
    problem = AugmentationProblem(["hue", "hflip"], auxiliaries=("class", "image"), n_classes=4,
                                  images_per_class=2)
    g, rng = len(problem.groups), np.random.default_rng(0)
    shapes = layer_output_shapes(model, layers, (SIZE, SIZE))
    flags = {layer: (rng.random(shape) < 0.1).astype(np.uint8) * FLAG_NEGLIGIBLE
             for layer, shape in shapes.items()}
    layers_maps = {
        layer: {"S1": rng.random((g, *shape)),
                "ST": np.where(flags[layer] > 0, 1e9, rng.random((g, *shape)))}
        for layer, shape in shapes.items()
    }
    store = ResultsStore(path)
    store.write_metadata(model="resnet18", dataset="planted:colour", image_size=SIZE, seed=0,
                         problem=problem)
    store.write_analysis("sobol", AnalysisResult("sobol", problem.group_names, layers_maps,
                                                 n=8, evaluations=48, flags=flags))
    return path


def cli(checkpoint: Path, results: Path, *args: str) -> int:
    """``analyze.py masking`` of ``results`` with the small probe settings of this module."""
    return helpers.cli(
        "masking", "--checkpoint", checkpoint, "--results", results,
        "--data.image_size", SIZE, "--images-per-class", "2", "--small_input", "false",
        "--accelerator", "cpu", "--masking.k", "1", *args,
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_cli_writes_masking_into_the_results_file(checkpoint, tmp_path, capsys):
    results = write_results(tmp_path / "results.h5")
    assert cli(checkpoint, results, "--analysis", "sobol", "--masking.variables", "[hue]") == 0
    printed = capsys.readouterr().out
    figure = tmp_path / "figures" / "sobol_masking_specificity.png"
    assert str(results) in printed and str(figure) in printed
    assert "prefix up to 'maxpool'" in printed
    out = ResultsStore(results).read_result(MaskingResult, GROUP_KIND, "sobol")
    assert out.variables == ["hue"] and out.inputs == ["original", "hue", "hflip"]
    assert out.layers == ["maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
    assert out.acc1.shape == (3, 1, 17) and out.specificity.shape == (2, 1)
    assert out.value == "ST" and out.n_images == 8 and figure.stat().st_size > 0
    # The flagged units (raw ST 1e9: the largest) are left out of every quantile mask.
    analysis = ResultsStore(results).read_analysis("sobol")
    np.testing.assert_allclose(out.valid_fraction, analysis.valid_fraction()[:6])
    assert 0.85 < out.valid_fraction.min() and out.valid_fraction.max() < 0.95
    maps, valid = sensitivity_maps(analysis, "ST", out.layers)
    for q, quantile in enumerate(out.quantiles):
        for i, layer in enumerate(out.layers):
            chosen, _ = quantile_mask(maps[layer][0], quantile, valid=valid[layer])
            assert out.masked_fraction[0, q, i] == pytest.approx(chosen.mean())


def test_cli_bad_input_exits_2_and_writes_nothing(checkpoint, tmp_path, capsys):
    results = write_results(tmp_path / "results.h5")
    before = digest(results)
    assert cli(checkpoint, results, "--analysis", "nope") == 2
    error = capsys.readouterr().err
    assert "no complete analysis 'nope'" in error and "['sobol']" in error
    other = write_results(tmp_path / "small" / "results.h5", small_input=True)
    other_before = digest(other)
    assert cli(checkpoint, other, "--analysis", "sobol") == 2
    error = capsys.readouterr().err
    assert "maps of layer 'maxpool' have unit shape (64, 32, 32)" in error
    assert "(64, 8, 8)" in error
    assert digest(results) == before and digest(other) == other_before
    assert not (tmp_path / "figures").exists() and not (tmp_path / "small" / "figures").exists()
