"""Comparing runs in W&B, read from the offline runs' transaction logs: a demo-sized train.py
run with the SensitivityCallback, then analyze.py sobol on its checkpoint.

Checked: complete configs (callback settings, seed, arch, inferred values, version, problem),
group / job type / tags, robust summaries per layer, a line series per layer, incremental table
rows per epoch, run summary metrics, the results and checkpoint artifacts and the analysis run's
use of that checkpoint (recorded offline by its digest, since W&B declares uses only online).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import yaml
from helpers import cli
from wandb.proto import wandb_internal_pb2
from wandb_records import (
    artifacts,
    history_row,
    offline_runs,
    run_config,
    run_summary,
)

import train
from callbacks.wandb_artifacts import CHECKPOINT_TYPE, RESULTS_TYPE, checkpoint_artifact
from callbacks.wandb_config import CHECKPOINT_KEY, recorded_run
from callbacks.wandb_logging import STEP_METRIC, TABLE_COLUMNS, metric_key
from sensitivity.capture import DEFAULT_LAYERS
from sensitivity.store import ResultsStore

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread_per_module")]

EPOCHS = 2
LAYERS = list(DEFAULT_LAYERS["resnet18"])
AUGMENTATIONS = ["hue", "hflip"]
GROUPS = [*AUGMENTATIONS, "class", "image"]
CALLBACK = {
    "class_path": "callbacks.SensitivityCallback",
    "init_args": {
        "engine": {"method": "sobol", "n": 4, "reduction": "channel_mean", "seed": 3,
                   "progress": False},
        "problem": {"augmentations": AUGMENTATIONS, "p_on": 0.5,
                    "auxiliaries": ["class", "image"]},
        "images_per_class": 2,
        "split": "val",
    },
}
# A second analysis of the same run, into its own file: the run config keeps both.
VARIANCE = {
    "class_path": "callbacks.SensitivityCallback",
    "init_args": {"engine": {"method": "variance", "n": 4, "progress": False},
                  "problem": CALLBACK["init_args"]["problem"], "images_per_class": 2,
                  "results_file": "variance.h5"},
}


def run_record(records: list[wandb_internal_pb2.Record]) -> wandb_internal_pb2.RunRecord:
    (run,) = [r.run for r in records if r.HasField("run")]
    return run


def analysis_rows(records: list[wandb_internal_pb2.Record]) -> list[dict]:
    """The logged rows of the Sobol analyses (the variance callback logs only the epoch)."""
    return [row for row in (history_row(r.history) for r in records if r.HasField("history"))
            if STEP_METRIC in row and "sensitivity/sobol/summary" in row]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """train.py for two epochs (planted colours, 32 px) with a Sobol callback, then
    ``analyze.py sobol --checkpoint last.ckpt`` into the training run's directory."""
    tmp = tmp_path_factory.mktemp("comparison")
    config = tmp / "train.yaml"
    config.write_text(yaml.safe_dump({
        "seed_everything": 7,
        "run_name": "cmp",
        "runs_dir": str(tmp / "runs"),
        "trainer": {"max_epochs": EPOCHS, "callbacks": [CALLBACK, VARIANCE], "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"arch": "resnet18", "optimizer": "adamw", "lr": 0.002},
        "data": {"class_path": "data.PlantedFactorDataModule",
                 "init_args": {"num_classes": 2, "image_size": 32, "train_per_class": 8,
                               "val_per_class": 4, "batch_size": 8}},
    }))
    with contextlib.redirect_stdout(io.StringIO()):
        trained = train.main(["--config", str(config)])
    run_dir = trained.run_dir
    (train_records,) = offline_runs(run_dir)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    analysis_dir = tmp / "analysis"
    assert cli("sobol", "--checkpoint", checkpoint, "--output", analysis_dir, "--n", "4",
               "--images-per-class", "2", "--data.num_classes", "2", "--data.image_size", "32",
               "--problem.augmentations", "[hue,hflip]", "--data.checkpoint_split", "val",
               "--reduction", "channel_mean", quiet=True) == 0
    (analysis_records,) = offline_runs(analysis_dir)
    return {"train": train_records, "analysis": analysis_records, "run_dir": run_dir,
            "analysis_dir": analysis_dir, "checkpoint": checkpoint}


def test_training_run_config_is_complete(runs):
    config = run_config(runs["train"])
    assert config["seed"] == 7 and config["seed_everything"] == 7
    assert config["arch"] == "resnet18" and config["run_name"] == "cmp"
    # inferred by the model from the data
    assert config["model"]["num_classes"] == 2 and config["model"]["image_size"] == 32
    assert config["model"]["small_input"] is True
    assert config["version"]["package"] and config["version"]["commit"]
    # the callback's settings, as given and resolved
    callbacks = config["trainer"]["callbacks"]
    assert [c["init_args"]["engine"]["method"] for c in callbacks] == ["sobol", "variance"]
    assert callbacks[0]["init_args"]["engine"]["n"] == 4
    assert set(config["sensitivity"]) == {"sobol", "variance"}
    sobol = config["sensitivity"]["sobol"]
    assert sobol["engine"]["layers"] == LAYERS
    assert sobol["engine"]["method"] == "sobol" and sobol["images_per_class"] == 2
    problem = config["problem"]
    assert problem["augmentations"] == AUGMENTATIONS and problem["auxiliaries"] == ["class",
                                                                                     "image"]
    assert (problem["set"], problem["p_on"], problem["N"]) == ("custom", 0.5, 4)
    assert problem["design"] == "SobolDesign" and problem["interval"]


def test_runs_are_grouped_typed_and_tagged(runs):
    trained, analysed = run_record(runs["train"]), run_record(runs["analysis"])
    group = f"cmp-{runs['run_dir'].name}"
    assert (trained.run_group, trained.job_type) == (group, "train")
    assert list(trained.tags) == ["resnet18", "set-custom"]
    # the analysis of the checkpoint joins the training run's group, in its project
    assert (analysed.run_group, analysed.job_type) == (group, "analyze")
    assert analysed.project == trained.project
    assert list(analysed.tags) == ["resnet18", "set-custom"]


def test_analysis_config_holds_the_inferred_values(runs):
    config = run_config(runs["analysis"])
    assert config["arch"] == "resnet18" and config["seed"] == 0
    assert config["checkpoint"] == str(runs["checkpoint"])
    assert config["layers"] == LAYERS and config["second_order"] is False
    assert config["weights"] is None  # given as null: shown, not dropped
    assert config["problem"]["augmentations"] == AUGMENTATIONS
    assert config["problem"]["N"] == 4 and config["command"] == "sobol"


def test_each_epoch_logs_robust_summaries_for_every_layer(runs):
    rows = analysis_rows(runs["train"])
    assert [row[STEP_METRIC] for row in rows] == list(range(EPOCHS))
    for row in rows:
        for layer in LAYERS:
            assert 0 <= row[f"sensitivity/sobol/{layer}/valid_fraction"] <= 1
            for variable in GROUPS:
                for key in ("S1", "ST"):
                    for statistic in ("median", "mean"):
                        assert f"{metric_key('sobol', layer, variable, key)}/{statistic}" in row
                    assert f"{metric_key('sobol', layer, variable, key)}_conf/median" in row


def test_scalars_are_hidden_from_auto_panels_and_charted_per_epoch(runs):
    metrics = [r.metric for r in runs["train"] if r.HasField("metric")]
    hidden = {m.name for m in metrics if m.options.hidden}
    assert f"{metric_key('sobol', 'fc', 'hue', 'S1')}/median" in hidden
    globbed = {m.glob_name: m.step_metric for m in metrics if m.glob_name}
    assert globbed["sensitivity/*"] == STEP_METRIC


def test_a_line_series_per_layer_across_epochs(runs):
    """One chart per layer: a line per variable through every epoch's median S1 (a gap where
    the layer had no valid unit), as stored in the results file."""
    last = analysis_rows(runs["train"])[-1]
    files = Path(next((runs["run_dir"] / "wandb").glob("offline-run-*"))) / "files"
    store = ResultsStore(runs["run_dir"] / "sensitivity.h5")
    medians = [store.read_analysis(f"epoch_{e:04d}").summary()["S1"] for e in range(EPOCHS)]
    for layer in LAYERS:
        # W&B stores a custom chart's data as the table "<key>_table"
        chart = last[f"sensitivity/sobol/lines/{layer}_table"]
        table = json.loads((files / chart["path"]).read_text())
        points = {(row["lineKey"], row["step"]): row["lineVal"]
                  for row in (dict(zip(table["columns"], r, strict=True)) for r in table["data"])}
        assert len(points) == len(table["data"]) == EPOCHS * len(GROUPS)
        for (variable, epoch), value in points.items():
            expected = medians[epoch][layer][variable]["median"]
            assert value == (None if expected != expected else pytest.approx(expected))
    assert "sensitivity/sobol/lines/valid_fraction_table" in last


def test_the_summary_table_grows_by_one_analysis_per_epoch(runs):
    rows = analysis_rows(runs["train"])
    files = Path(next((runs["run_dir"] / "wandb").glob("offline-run-*"))) / "files"
    per_epoch = 4 * len(LAYERS) * len(GROUPS)  # S1, ST and their half-widths
    for epoch, row in enumerate(rows):
        ref = row["sensitivity/sobol/summary"]
        assert ref["log_mode"] == "INCREMENTAL"
        table = json.loads((files / ref["path"]).read_text())
        assert table["columns"] == TABLE_COLUMNS
        # each increment holds only its epoch's rows
        assert len(table["data"]) == per_epoch
        assert {r[0] for r in table["data"]} == {epoch}


def test_run_summary_names_the_dominant_variable_and_shares(runs):
    summary = run_summary(runs["train"])
    result = ResultsStore(runs["run_dir"] / "sensitivity.h5").read_analysis(
        f"epoch_{EPOCHS - 1:04d}")
    medians = result.summary()["S1"]
    shares = result.top_variable_shares()
    for layer in LAYERS:
        valid = {v: s["median"] for v, s in medians[layer].items() if s["median"] == s["median"]}
        expected = max(valid, key=valid.get) if valid else "none"
        assert summary[f"dominant/sobol/{layer}"] == expected
        logged = [summary[f"top_share/sobol/{layer}/{v}"] for v in GROUPS]
        assert logged == pytest.approx([shares[layer][v] for v in GROUPS])
        assert sum(logged) == pytest.approx(1.0) or sum(logged) == 0
    assert 0 <= summary["final/val_acc1"] <= 1


def test_results_and_checkpoints_are_artifacts_offline(runs):
    group = f"cmp-{runs['run_dir'].name}"
    results = {a.name: [e.path for e in a.manifest.contents]
               for a in artifacts(runs["train"], RESULTS_TYPE)}
    assert results == {f"sensitivity-{group}": ["sensitivity.h5"],
                       f"variance-{group}": ["variance.h5"]}
    checkpoints = artifacts(runs["train"], CHECKPOINT_TYPE)
    run_id = run_record(runs["train"]).run_id
    assert checkpoints and {a.name for a in checkpoints} == {f"checkpoint-{run_id}"}
    aliases = {alias for a in checkpoints for alias in a.aliases}
    assert {"best", "last", "latest"} <= aliases
    (analysis_results,) = artifacts(runs["analysis"], RESULTS_TYPE)
    assert [e.path for e in analysis_results.manifest.contents] == ["results.h5"]


def test_the_analysis_run_names_the_checkpoint_it_used(runs):
    """Train -> checkpoint -> analysis: the checkpoint records its run, and the analysis run
    records the very artifact version (name and digest) the training run logged for it."""
    run_id = run_record(runs["train"]).run_id
    recorded = recorded_run(runs["checkpoint"])
    assert recorded is not None and recorded["run_id"] == run_id
    assert CHECKPOINT_KEY == "wandb"
    inputs = run_config(runs["analysis"])["inputs"]["checkpoint"]
    assert inputs["artifact"] == f"checkpoint-{run_id}" and inputs["used"] is False
    last = [a for a in artifacts(runs["train"], CHECKPOINT_TYPE) if "last" in a.aliases]
    assert [a.digest for a in last] == [inputs["digest"]]
    assert checkpoint_artifact(runs["checkpoint"], run_id).digest == inputs["digest"]
