"""The W&B dashboard recipe (callbacks/wandb_dashboard.py, tools/wandb_dashboard.py): built from a
real results file, its keys checked against what offline runs of those analyses logged (their
transaction logs), turned into a wandb_workspaces Workspace that is never saved, and the
lineage link checked with stand-ins for the public API. Nothing here reaches the network.

Tiny settings (32 px stock ResNet18, 4 planted classes x 1 probe image, n 4, full maps of
layer1 and fc): a Sobol' and a contrast analysis in one results file, a W&B run each.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import cli
from wandb_records import history_row, offline_runs, run_config, run_summary

from callbacks.wandb_dashboard import (
    GROUP_BY,
    HEATMAPS_SECTION,
    TRAINER_STEP,
    TRAINING_SECTION,
    build_workspace,
    dashboard_recipe,
    link_run,
    matching_version,
    merge_layouts,
    offline_run_ids,
    read_layouts,
    recipe_keys,
)
from callbacks.wandb_logging import STEP_METRIC
from sensitivity.store import ResultsStore

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "wandb_dashboard.py"
LAYERS = ["layer1", "fc"]
METHODS = ["sobol", "contrast"]
COMMON = [
    "--data.image_size", "32", "--images-per-class", "1", "--small_input", "false",
    "--layers", json.dumps(LAYERS), "--reduction", "none", "--accelerator", "cpu",
    "--no_progress", "--n", "4",
]
pytestmark = [
    pytest.mark.usefixtures("one_thread_per_module"),
    # n = 4 is plenty for a layout; the engine's warning about trusting the indices is noise
    pytest.mark.filterwarnings("ignore:n = 4 is too small"),
]


@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """(results file, {method: {"keys": every logged history key, "summary", "config",
    "id"}}) of a Sobol' and a contrast analysis, each logged to an offline run."""
    run_dir = tmp_path_factory.mktemp("dashboard") / "run"
    assert cli("sobol", "--output", run_dir, *COMMON, quiet=True) == 0
    assert cli("contrast", "--output", run_dir, "--contrast_k", "2", *COMMON, quiet=True) == 0
    runs = {}
    for records in offline_runs(run_dir):
        rows = [history_row(r.history) for r in records if r.HasField("history")]
        config = run_config(records)
        (run,) = [r.run for r in records if r.HasField("run")]
        runs[config["method"]] = {
            "keys": {key for row in rows for key in row}, "summary": run_summary(records),
            "config": config, "id": run.run_id}
    assert sorted(runs) == sorted(METHODS)
    return run_dir / "results.h5", runs


@pytest.fixture(scope="module")
def recipe(analysed) -> dict:
    return dashboard_recipe(read_layouts(analysed[0]))


def load_tool():
    """tools/wandb_dashboard.py as a module (it is a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("wandb_dashboard_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layouts_come_from_the_results_file(analysed):
    layouts = read_layouts(analysed[0])
    assert [layout.method for layout in layouts] == METHODS
    sobol, contrast = layouts
    assert list(sobol.layers) == LAYERS and sobol.value_keys == ["S1", "ST"]
    assert sobol.keys == ("S1", "S1_conf", "ST", "ST_conf")
    assert contrast.value_keys == ["effect_size", "mean_diff"]
    assert "class" in sobol.variables and "class" not in contrast.variables  # augmentations
    assert merge_layouts([*layouts, *layouts]) == layouts


def test_one_section_per_method_and_layer(recipe):
    names = [section["name"] for section in recipe["sections"]]
    assert names == [f"{m} / {layer}" for m in METHODS for layer in LAYERS] + [
        HEATMAPS_SECTION, TRAINING_SECTION]
    sobol_layer1 = recipe["sections"][0]
    assert [p["title"] for p in sobol_layer1["panels"]] == [
        "sobol layer1: median S1", "sobol layer1: median S1 half-width",
        "sobol layer1: median ST", "sobol layer1: median ST half-width",
        "sobol layer1: share of valid units"]
    assert recipe["groupby"] == ["arch", "problem.set"]
    assert recipe["pinned_columns"] == [
        *(f"summary:dominant/{m}/{layer}" for m in METHODS for layer in LAYERS),
        "summary:final/val_acc1"]
    assert json.loads(json.dumps(recipe)) == recipe  # plain data


def test_every_recipe_key_was_logged_and_every_median_is_charted(analysed, recipe):
    _, runs = analysed
    for section in recipe["sections"][: len(METHODS) * len(LAYERS)]:
        method, layer = section["name"].split(" / ")
        logged = runs[method]["keys"]
        for panel in section["panels"]:
            assert panel["x"] == STEP_METRIC and STEP_METRIC in logged
            assert all(f"/{method}/{layer}/" in key for key in panel["y"])
            assert set(panel["y"]) <= logged, panel["title"]
            if "metric_regex" in panel:  # the regex form selects exactly the same keys
                assert {k for k in logged if re.fullmatch(panel["metric_regex"], k)} == set(
                    panel["y"])
    charted = set(recipe_keys(recipe))
    for method, run in runs.items():
        medians = {k for k in run["keys"]
                   if k.endswith(("/median", "/valid_fraction")) and "/lines/" not in k}
        assert medians and medians <= charted, method
        heatmaps = {k for k in run["keys"] if k.startswith(f"sensitivity/{method}/heatmap/")}
        assert heatmaps == {k for k in recipe_keys(recipe, "media") if f"/{method}/" in k}
        pinned = {c.removeprefix("summary:") for c in recipe["pinned_columns"]
                  if f"/{method}/" in c}
        assert pinned and pinned <= set(run["summary"])


def test_training_section_charts_what_the_classifier_logs(analysed, recipe):
    """The training keys are the classifier's ``self.log`` names, against the step Lightning's
    WandbLogger defines (a training run would be too slow to log here)."""
    import inspect

    from pytorch_lightning.loggers import WandbLogger

    (training,) = [s for s in recipe["sections"] if s["name"] == TRAINING_SECTION]
    logged = re.findall(r'self\.log\("([^"]+)"',
                        (ROOT / "lightning_modules" / "classifier.py").read_text())
    assert sorted(k for p in training["panels"] for k in p["y"]) == sorted(logged)
    assert {p["x"] for p in training["panels"]} == {TRAINER_STEP}
    assert f'step_metric="{TRAINER_STEP}"' in inspect.getsource(WandbLogger)
    no_training = dashboard_recipe(read_layouts(analysed[0]), training=False)
    assert TRAINING_SECTION not in [s["name"] for s in no_training["sections"]]
    assert "summary:final/val_acc1" not in no_training["pinned_columns"]


def test_runs_carry_the_config_keys_they_are_grouped_by(analysed):
    for run in analysed[1].values():
        config = run["config"]
        assert config["arch"] == "resnet18" and config["problem"]["set"] == "1"
        for key in GROUP_BY:  # a nested config key, as W&B groups by it
            value = config
            for part in key.split("."):
                value = value[part]
            assert value


def test_build_workspace_lays_out_the_recipe_without_saving(recipe):
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    workspace = build_workspace(recipe, "someone", "augsens", "sensitivity")
    assert isinstance(workspace, ws.Workspace)
    assert (workspace.entity, workspace.project, workspace.name) == (
        "someone", "augsens", "sensitivity")
    assert [s.name for s in workspace.sections] == [s["name"] for s in recipe["sections"]]
    for built, section in zip(workspace.sections, recipe["sections"], strict=True):
        assert built.is_open == section["is_open"]
        for panel, spec in zip(built.panels, section["panels"], strict=True):
            if spec["kind"] == "line":
                assert isinstance(panel, wr.LinePlot)
                assert (panel.x, panel.y, panel.metric_regex) == (spec["x"], spec["y"], None)
            else:
                assert isinstance(panel, wr.MediaBrowser) and panel.media_keys == spec["keys"]
    settings = workspace.runset_settings
    assert [g.name for g in settings.groupby] == ["arch", "problem.set"]
    assert all(isinstance(g, ws.Config) for g in settings.groupby)
    assert settings.pinned_columns == ["run:displayName", *recipe["pinned_columns"]]
    # what .save() would send, built offline: config keys as the backend stores them
    (runset,) = workspace._to_model().spec.section.run_sets
    assert [(k.section, k.name) for k in runset.grouping] == [
        ("config", "arch.value"), ("config", "problem.value.set")]
    regex = build_workspace(recipe, "someone", "augsens", "x", any_variable=True)
    assert regex.sections[0].panels[0].metric_regex == recipe["sections"][0]["panels"][0][
        "metric_regex"]


@pytest.mark.slow
def test_recipe_command_prints_the_recipe(analysed, recipe):
    results = str(analysed[0])
    done = subprocess.run([sys.executable, str(TOOL), "recipe", "--results", results,
                           "--format", "json"], capture_output=True, text=True, check=False,
                          cwd=ROOT.parent, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == recipe
    done = subprocess.run([sys.executable, str(TOOL), "recipe", "--results", results],
                          capture_output=True, text=True, check=False, timeout=120)
    assert yaml.safe_load(done.stdout) == recipe


@pytest.mark.slow
def test_missing_results_file_exits_2(tmp_path):
    missing = tmp_path / "nothing.h5"
    done = subprocess.run([sys.executable, str(TOOL), "recipe", "--results", str(missing)],
                          capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert f"wandb_dashboard.py recipe: error: no results file at {missing}" in done.stderr


def test_bad_inputs_exit_2(tmp_path, capsys):
    tool = load_tool()
    empty = tmp_path / "empty.h5"
    ResultsStore(empty).write_metadata(model="resnet18", dataset="planted", image_size=32,
                                       seed=0)
    assert tool.main(["recipe", "--results", str(empty)]) == 2
    assert f"no sensitivity analysis in {empty}" in capsys.readouterr().err
    not_hdf5 = tmp_path / "notes.h5"
    not_hdf5.write_text("not HDF5")
    assert tool.main(["workspace", "--results", str(not_hdf5), "--entity", "e",
                      "--project", "p"]) == 2
    assert f"{not_hdf5} is not a results file" in capsys.readouterr().err
    assert tool.main(["link", "--run-dir", str(tmp_path / "no-run"), "--entity", "e",
                      "--project", "p"]) == 2
    assert "no directory" in capsys.readouterr().err
    assert tool.main(["link", "--run-dir", str(tmp_path), "--entity", "e",
                      "--project", "p"]) == 2
    assert "no offline W&B run in" in capsys.readouterr().err


def test_offline_run_ids(analysed):
    results, runs = analysed
    ids = sorted(run["id"] for run in runs.values())
    assert sorted(offline_run_ids(results.parent)) == ids
    assert sorted(offline_run_ids(results.parent / "wandb")) == ids
    (folder, *_) = sorted((results.parent / "wandb").glob("offline-run-*"))
    assert offline_run_ids(folder) == [folder.name.rsplit("-", 1)[1]]


# ------------------------------------------------------------------ link, with stand-ins
class FakeArtifact:
    def __init__(self, version: int, digest: str) -> None:
        self.id, self.digest = f"id-{version}", digest
        self.name = f"checkpoint-train1:v{version}"


class FakeRun:
    def __init__(self, config: dict, used: tuple = ()) -> None:
        self.config, self.used, self.declared = config, list(used), []

    def used_artifacts(self) -> list:
        return self.used

    def use_artifact(self, artifact: FakeArtifact) -> FakeArtifact:
        self.declared.append(artifact)
        return artifact


class FakeApi:
    """``wandb.Api()``'s ``run`` and ``artifacts`` over fixed runs and versions."""

    def __init__(self, runs: dict[str, FakeRun], versions: list[FakeArtifact]) -> None:
        self.runs, self.versions, self.asked = runs, versions, []

    def run(self, path: str) -> FakeRun:
        if path not in self.runs:
            raise ValueError(f"Could not find run {path}")
        return self.runs[path]

    def artifacts(self, type_name: str, name: str) -> list[FakeArtifact]:
        self.asked.append((type_name, name))
        return self.versions


def inputs(digest: str, used: bool = False) -> dict:
    return {"inputs": {"checkpoint": {"artifact": "checkpoint-train1", "digest": digest,
                                      "path": "/runs/x/model.ckpt", "training_run": "train1",
                                      "used": used}}}


def test_link_declares_the_version_with_the_recorded_digest():
    versions = [FakeArtifact(0, "aaa"), FakeArtifact(1, "bbb"), FakeArtifact(2, "ccc")]
    assert matching_version(versions, "bbb") is versions[1]
    assert matching_version(versions, "zzz") is None
    runs = {"e/p/an1": FakeRun(inputs("bbb")), "e/p/an2": FakeRun(inputs("zzz")),
            "e/p/an3": FakeRun(inputs("ccc", used=True)), "e/p/an4": FakeRun({"arch": "x"}),
            "e/p/an5": FakeRun(inputs("aaa"), used=(versions[0],))}
    api = FakeApi(runs, versions)
    ok, line = link_run(api, "e", "p", "an1")
    assert ok and line == "an1: uses checkpoint-train1:v1"
    assert runs["e/p/an1"].declared == [versions[1]]
    assert api.asked == [("model", "e/p/checkpoint-train1")]
    ok, line = link_run(api, "e", "p", "an2")
    assert not ok and "no version of e/p/checkpoint-train1 has digest zzz" in line
    assert "sync the training run train1" in line
    for run_id in ("an3", "an4", "an5"):  # online already, no checkpoint, linked before
        assert link_run(api, "e", "p", run_id)[0]
    assert all(not runs[f"e/p/{r}"].declared for r in ("an2", "an3", "an4", "an5"))
    ok, line = link_run(api, "e", "p", "missing")
    assert not ok and "Could not find run e/p/missing" in line and "wandb sync" in line
