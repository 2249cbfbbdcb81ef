"""SensitivityCallback in real fits (tiny ResNet18 at 32 px): the results file, the PNGs, the W&B
offline run, resuming from a checkpoint, construction from the demo YAML and a 2-process DDP fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from helpers import FLOAT32_SUMS
from jsonargparse import ArgumentParser
from PIL import Image
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger
from wandb_records import (
    assert_sobol_summary_logged,
    history_row,
    read_wandb_records,
    same_summary,
)

import analyze
from callbacks import SensitivityCallback
from callbacks.wandb_logging import STEP_METRIC, TABLE_COLUMNS
from data import PlantedFactorDataModule
from lightning_modules import ImageClassifier
from lightning_modules.weights import state_dict_sha256
from sensitivity.capture import DEFAULT_LAYERS
from sensitivity.config import EngineConfig
from sensitivity.engine import run_analysis
from sensitivity.problem import AugmentationProblem

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
CLASSES = 2
PER_CLASS = 2  # probe images per class
PROBLEM = {"augmentations": ["hue", "hflip"], "auxiliaries": ["class", "image"]}
GROUPS = ["hue", "hflip", "class", "image"]
# The engine's settings as YAML gives them (init_args.engine) and as Python objects.
ENGINE = {"method": "sobol", "n": 4, "batch_rows": 64, "reduction": "channel_mean",
          "progress": False}
SETTINGS = {"engine": EngineConfig(**ENGINE), "problem": PROBLEM,
            "images_per_class": PER_CLASS, "store_activations": True}
ROWS = 4 * (len(GROUPS) + 2)  # Sobol: n base points x (G + 2) rows
STEPS_PER_EPOCH = 2  # 2 classes x 8 training images / batch 8
LAYERS = list(DEFAULT_LAYERS["resnet18"])


def planted(**overrides) -> PlantedFactorDataModule:
    settings = {"image_size": SIZE, "num_classes": CLASSES, "train_per_class": 8,
                "val_per_class": 4, "batch_size": 8, **overrides}
    return PlantedFactorDataModule(**settings)


class SanityWatcher(pl.Callback):
    """Whether the results file existed when Lightning's sanity check ended (None: no check)."""

    def __init__(self, results: Path) -> None:
        self.results = results
        self.existed: bool | None = None

    def on_sanity_check_end(self, trainer, pl_module) -> None:
        self.existed = self.results.exists()


@dataclass
class Fit:
    run_dir: Path
    callback: SensitivityCallback
    sanity: SanityWatcher
    wandb_dir: Path


def fit(run_dir: Path, max_epochs: int, ckpt_path: Path | None = None) -> Fit:
    """A seeded fit with the callback, a W&B offline logger and a last.ckpt after every epoch."""
    pl.seed_everything(0, verbose=False)
    callback = SensitivityCallback(**SETTINGS)
    sanity = SanityWatcher(run_dir / "sensitivity.h5")
    logger = WandbLogger(save_dir=str(run_dir), offline=True, project="augsens-test")
    last = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last")
    trainer = pl.Trainer(
        max_epochs=max_epochs, default_root_dir=run_dir, logger=logger,
        callbacks=[callback, sanity, last], num_sanity_val_steps=1, log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False,
    )
    model = ImageClassifier("resnet18", num_classes=CLASSES, image_size=SIZE)
    trainer.fit(model, datamodule=planted(), ckpt_path=ckpt_path)
    wandb_dir = Path(logger.experiment.dir).parent  # .dir is <run>/files
    logger.experiment.finish()  # flushes the offline run's files
    return Fit(run_dir, callback, sanity, wandb_dir)


@pytest.fixture(scope="module")
def fits(tmp_path_factory) -> tuple[Fit, Fit]:
    """One epoch, then a second fit resumed from its last.ckpt for one more epoch."""
    tmp = tmp_path_factory.mktemp("callback")
    first = fit(tmp / "first", max_epochs=1)
    resumed = fit(tmp / "resumed", max_epochs=2, ckpt_path=tmp / "first/checkpoints/last.ckpt")
    return first, resumed


def stored(path: Path, name: str) -> dict[str, dict[str, np.ndarray]]:
    with h5py.File(path, "r") as f:
        g = f[f"analyses/{name}"]
        return {layer: {k: g[layer][k][()] for k in g[layer]} for layer in g.attrs["layers"]}


@pytest.mark.slow
def test_results_file_follows_the_results_format(fits):
    first, _ = fits
    with h5py.File(first.run_dir / "sensitivity.h5", "r") as f:
        assert f.attrs["format"] == "augsens-results"
        assert f.attrs["model"] == "resnet18" and f.attrs["dataset"] == "planted:colour"
        assert list(f.attrs["image_size"]) == [SIZE, SIZE]
        assert list(f.attrs["class_names"]) == ["red", "green"]
        assert list(f["problem"].attrs["group_names"]) == GROUPS
        assert list(f["analyses"]) == ["epoch_0000"]
        g = f["analyses/epoch_0000"]
        assert g.attrs["status"] == "complete" and g.attrs["method"] == "sobol"
        assert (g.attrs["epoch"], g.attrs["global_step"]) == (0, STEPS_PER_EPOCH)
        assert (g.attrs["n"], g.attrs["evaluations"]) == (4, ROWS)
        assert list(g.attrs["group_names"]) == GROUPS and list(g.attrs["layers"]) == LAYERS
        assert g.attrs["reduction"] == "channel_mean"
        assert (g.attrs["design"], g.attrs["block_size"]) == ("SobolDesign", len(GROUPS) + 2)
        assert (g.attrs["split"], g.attrs["images_per_class"]) == ("val", PER_CLASS)
        assert (g.attrs["precision"], g.attrs["conf_level"], g.attrs["seed"]) == ("32", 0.95, 0)
        for flag in ("second_order", "deduplicate", "channels_last", "compile"):
            assert not g.attrs[flag], flag
        for layer in LAYERS:
            channels = int(g[layer].attrs["unit_shape"][0])
            for key in ("S1", "ST", "S1_conf", "ST_conf"):
                assert g[layer][key].shape == (len(GROUPS), channels)
                assert g[layer][key].dtype == np.float32
            assert g[layer]["var"].shape == (channels,)
        assert g["fc/ST"].shape == (len(GROUPS), CLASSES)
        # Raw channel means of every design row, linked from the results file.
        assert f["activations/epoch_0000/fc"].shape == (ROWS, CLASSES)
        assert f["activations/epoch_0000/design"].shape[0] == ROWS


@pytest.mark.slow
def test_stored_analysis_is_that_of_the_epochs_final_weights(fits):
    """The callback analysed the weights its epoch ended with (saved in last.ckpt) in eval mode."""
    first, _ = fits
    model = ImageClassifier.load_from_checkpoint(first.run_dir / "checkpoints/last.ckpt")
    problem = AugmentationProblem(**PROBLEM, n_classes=CLASSES, images_per_class=PER_CLASS)
    probe = planted().probe_set(PER_CLASS)[0]
    config = EngineConfig(method="sobol", n=4, batch_rows=64, reduction="channel_mean",
                          progress=False)
    direct = run_analysis(model, problem, probe, config)
    saved = stored(first.run_dir / "sensitivity.h5", "epoch_0000")
    for layer in LAYERS:
        for key in ("S1", "ST", "mean", "var"):
            # Same weights, rows and batches: equal up to the float32 storage.
            np.testing.assert_allclose(saved[layer][key], direct.layers[layer][key], rtol=1e-6)
    assert same_summary(first.callback.history[0]["summary"], direct.summary())


@pytest.mark.slow
def test_pngs_heatmaps_per_analysis_and_history(fits):
    first, resumed = fits
    for run, epoch in ((first, 0), (resumed, 1)):
        for name in (f"epoch_{epoch:04d}_S1", f"epoch_{epoch:04d}_ST", "history_S1", "history_ST"):
            with Image.open(run.run_dir / "sensitivity" / f"{name}.png") as image:
                assert image.format == "PNG" and min(image.size) > 200


@pytest.mark.slow
def test_nothing_is_analyzed_in_the_sanity_check(fits):
    first, _ = fits
    assert first.sanity.existed is False  # the sanity check ran, and wrote nothing
    assert first.callback.epochs == [0]


@pytest.mark.slow
def test_resumed_fit_continues_the_epochs_and_keeps_the_history(fits):
    first, resumed = fits
    assert resumed.callback.epochs == [0, 1]
    assert same_summary(resumed.callback.history[0], first.callback.history[0])
    assert resumed.callback.history[1]["global_step"] == 2 * STEPS_PER_EPOCH
    with h5py.File(resumed.run_dir / "sensitivity.h5", "r") as f:
        assert list(f["analyses"]) == ["epoch_0001"]  # the new run directory holds the new epoch
        assert f["analyses/epoch_0001"].attrs["epoch"] == 1
    checkpoint = torch.load(first.run_dir / "checkpoints/last.ckpt", weights_only=True)
    state = checkpoint["callbacks"][first.callback.state_key]
    fresh = SensitivityCallback(**SETTINGS)
    fresh.load_state_dict(state)
    assert same_summary(fresh.history, first.callback.history)


@pytest.mark.slow
def test_wandb_offline_run_holds_the_indices_heatmaps_and_table(fits):
    first, _ = fits
    (log,) = first.wandb_dir.glob("run-*.wandb")
    records = read_wandb_records(log)
    metrics = {
        r.metric.name or r.metric.glob_name: r.metric for r in records if r.HasField("metric")
    }
    assert metrics["sensitivity/*"].step_metric == STEP_METRIC
    assert STEP_METRIC in metrics
    rows = [history_row(r.history) for r in records if r.HasField("history")]
    (row,) = [row for row in rows if STEP_METRIC in row]
    assert row[STEP_METRIC] == 0
    summary = first.callback.history[0]["summary"]
    assert_sobol_summary_logged(row, summary, LAYERS, first.wandb_dir / "files")
    table_ref = row["sensitivity/sobol/summary"]
    table = json.loads((first.wandb_dir / "files" / table_ref["path"]).read_text())
    assert table["columns"] == TABLE_COLUMNS
    assert len(table["data"]) == 4 * len(LAYERS) * len(GROUPS)  # S1, ST and half-widths
    epoch, layer, variable, key, median, *_ = table["data"][0]
    assert median == pytest.approx(summary[key][layer][variable]["median"], nan_ok=True)
    assert epoch == 0


def test_demo_yaml_builds_the_callback():
    """configs/demo.yaml's trainer.callbacks entry parses as LightningCLI parses it."""
    demo = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[pl.Callback])
    config = parser.parse_object({"callbacks": demo["trainer"]["callbacks"]})
    (callback,) = parser.instantiate(config).callbacks
    assert isinstance(callback, SensitivityCallback)
    assert callback.method == "shapley" and callback.store_activations
    assert callback.problem_config["auxiliaries"] == ["class", "image"]


def test_yaml_engine_settings_build_the_engine_config():
    """init_args.engine as LightningCLI parses it: the fields of EngineConfig, validated (an
    unquoted 16 is YAML's number); without it, EngineConfig's defaults."""
    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[pl.Callback])

    def built(engine: dict) -> SensitivityCallback:
        entry = {"class_path": "callbacks.SensitivityCallback", "init_args": {"engine": engine}}
        (callback,) = parser.instantiate(parser.parse_object({"callbacks": [entry]})).callbacks
        return callback

    engine = built({**ENGINE, "precision": 16, "deduplicate": True}).config
    assert engine == EngineConfig(**ENGINE, precision="16", deduplicate=True)
    with pytest.raises(ValueError, match="power of two"):
        built({"n": 6})
    assert SensitivityCallback().config == EngineConfig()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"problem": {"augmentations": ["hue"], "n_classes": 3}}, "come from the datamodule"),
        ({"problem": {"augmentations": ["sepia"]}}, "unknown augmentation"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"split": "test"}, "split"),
    ],
)
def test_bad_settings_are_value_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        SensitivityCallback(**settings)


def test_unknown_layer_fails_before_the_first_training_step(tmp_path):
    engine = EngineConfig(**ENGINE, layers=["layer9"])
    callback = SensitivityCallback(**{**SETTINGS, "engine": engine})
    trainer = pl.Trainer(max_epochs=1, default_root_dir=tmp_path, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback])
    model = ImageClassifier("resnet18", num_classes=CLASSES, image_size=SIZE)
    with pytest.raises(ValueError, match="unknown layer name"):
        trainer.fit(model, datamodule=planted())
    assert trainer.global_step == 0 and not (tmp_path / "sensitivity.h5").exists()


@pytest.mark.slow
def test_two_process_ddp_fit_equals_one_process_analysis(tmp_path):
    """train.py under DDP on 2 CPU processes: each rank analyses half of the design; the stored
    result equals a one-process analysis of the saved weights (float32 storage)."""
    config = tmp_path / "callback.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": [{
        "class_path": "callbacks.SensitivityCallback",
        "init_args": {**SETTINGS, "engine": {**ENGINE, "n": 8}},
    }]}}))
    command = [
        sys.executable, "train.py", f"--config={config}", f"--runs_dir={tmp_path}",
        "--run_name=ddp", f"--data.image_size={SIZE}", f"--data.num_classes={CLASSES}",
        "--data.train_per_class=8", "--data.val_per_class=4", "--data.batch_size=4",
        "--trainer.max_epochs=1", "--trainer.devices=2", "--trainer.strategy=ddp",
        "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "ddp/version_0"
    assert f"sensitivity      {run_dir / 'sensitivity.h5'}" in done.stdout
    model = ImageClassifier.load_from_checkpoint(run_dir / "checkpoints/last.ckpt")
    problem = AugmentationProblem(**PROBLEM, n_classes=CLASSES, images_per_class=PER_CLASS)
    probe = planted().probe_set(PER_CLASS)[0]
    config = EngineConfig(method="sobol", n=8, reduction="channel_mean", progress=False)
    single = run_analysis(model, problem, probe, config)
    saved = stored(run_dir / "sensitivity.h5", "epoch_0000")
    for layer in LAYERS:
        valid = single.flags[layer] == 0
        np.testing.assert_array_equal(saved[layer]["flag"], single.flags[layer])
        for key in ("S1", "ST", "S1_conf", "ST_conf", "mean", "var"):
            # partial sums of other batches, then float32 storage; flagged units (never shown)
            # amplify round-off without bound
            np.testing.assert_allclose(saved[layer][key][..., valid],
                                       single.layers[layer][key][..., valid], **FLOAT32_SUMS)
    with h5py.File(run_dir / "sensitivity.h5", "r") as f:  # both shards merged, every row once
        np.testing.assert_array_equal(f["activations/epoch_0000/row_index"][()],
                                      np.arange(8 * (len(GROUPS) + 2)))


@pytest.mark.slow
def test_each_epoch_records_the_weights_it_analyzed(fits):
    first, _ = fits
    model = ImageClassifier.load_from_checkpoint(first.run_dir / "checkpoints/last.ckpt")
    with h5py.File(first.run_dir / "sensitivity.h5", "r") as f:
        g = f["analyses/epoch_0000"].attrs
        assert g["weights_sha256"] == state_dict_sha256(model)
        assert (g["model"], g["dataset"]) == ("resnet18", "planted:colour")
        assert g["weights"] == f.attrs["weights"] and list(g["image_size"]) == [SIZE, SIZE]
        assert json.loads(g["problem"]) == json.loads(f["problem"].attrs["config"])


@pytest.mark.slow
def test_analyze_reuses_the_callbacks_probe_from_the_checkpoint(fits):
    """analyze.py --data.checkpoint_split val takes exactly the probe the callback analysed;
    the --data options alone (same seed) do not: the planted splits depend on their sizes."""
    first, _ = fits
    parser = analyze.build_parser()
    checkpoint = str(first.run_dir / "checkpoints/last.ckpt")
    options = ["sobol", "--checkpoint", checkpoint, "--images-per-class", str(PER_CLASS),
               "--data.num_classes", str(CLASSES), "--data.image_size", str(SIZE)]
    cfg = parser.parse_args(analyze.normalise_args([*options, "--data.checkpoint_split", "val"]))
    probe, n_classes, class_names, dataset = analyze.build_probe(cfg, partition=False)
    assert torch.equal(probe, first.callback.probe)
    assert (n_classes, class_names, dataset) == (CLASSES, ["red", "green"], "planted:colour")
    plain, *_ = analyze.build_probe(parser.parse_args(analyze.normalise_args(options)), False)
    assert not torch.equal(plain, first.callback.probe)
