"""analyze.py's W&B logging: offline runs under the analysis run directory, read back from their
transaction logs (.wandb), for an engine method, masking, single-class and the statistics commands;
--wandb false and WANDB_MODE=disabled log nothing; the mode follows --wandb_project and WANDB_MODE.

Tiny settings (32 px stock ResNet18, 4 planted classes x 1 probe image, Sobol n 4, full maps of
layer1 (64 x 8 x 8) and fc, one masking draw) keep it fast; W&B is offline (conftest) and never
reaches the network.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import cli
from wandb.proto import wandb_internal_pb2
from wandb_records import (
    artifacts,
    assert_sobol_summary_logged,
    history_row,
    offline_runs,
    run_config,
    runs_by_command,
)

from callbacks.wandb_logging import ARTIFACT_TYPE, STEP_METRIC, TABLE_COLUMNS, wandb_mode
from sensitivity import masking
from sensitivity.store import ResultsStore

LAYERS = ["layer1", "fc"]
COMMON = [
    "--data.image_size", "32", "--images-per-class", "1", "--small_input", "false",
    "--layers", json.dumps(LAYERS), "--reduction", "none", "--accelerator", "cpu",
    "--no_progress",
]
# One intra-op thread: on the shared 2-core machine two threads under contention make the
# masking forwards tens of times slower.
pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def logged_row(records: list[wandb_internal_pb2.Record]) -> dict:
    (row,) = [history_row(r.history) for r in records if r.HasField("history")]
    return row


def step_metrics(records: list[wandb_internal_pb2.Record]) -> dict[str, str]:
    return {r.metric.glob_name or r.metric.name: r.metric.step_metric
            for r in records if r.HasField("metric")}


@pytest.fixture(scope="module")
def sobol_run(tmp_path_factory) -> tuple[Path, str]:
    """(run directory, printed output) of a small Sobol analysis of a random ResNet18: n = 16,
    enough for the fc units and most layer1 channels to be valid (at n = 4 they are flagged,
    and single-class and LDA have nothing to work on)."""
    run_dir = tmp_path_factory.mktemp("analysis") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli("sobol", "--output", run_dir, "--n", "16", *COMMON) == 0
    return run_dir, out.getvalue()


def test_sobol_logs_an_offline_run_in_the_run_directory(sobol_run):
    run_dir, printed = sobol_run
    (directory,) = (run_dir / "wandb").glob("offline-run-*")
    assert f"W&B offline run {directory}" in printed
    assert f"wandb sync {directory}" in printed
    records = runs_by_command(run_dir)["sobol"]
    (run,) = [r.run for r in records if r.HasField("run")]
    assert (run.project, run.display_name) == ("augsens", "sobol")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert (config["method"], config["n"], config["layers"]) == ("sobol", 16, LAYERS)
    assert step_metrics(records)["sensitivity/*"] == STEP_METRIC
    row = logged_row(records)
    assert row[STEP_METRIC] == -1  # not an epoch of a training run
    summary = ResultsStore(run_dir / "results.h5").read_analysis("sobol").summary()
    assert_sobol_summary_logged(row, summary, LAYERS, directory / "files")
    table = json.loads((directory / "files" / row["sensitivity/sobol/summary"]["path"]).read_text())
    assert table["columns"] == TABLE_COLUMNS
    assert len(table["data"]) == sum(len(v) for layers in summary.values() for v in layers.values())
    # offline too, the results file is an artifact (a staged copy, uploaded by wandb sync)
    (artifact,) = artifacts(records, ARTIFACT_TYPE)
    assert artifact.name == f"results-{run_dir.parent.name}-run"
    assert [entry.path for entry in artifact.manifest.contents] == ["results.h5"]


@pytest.mark.slow
def test_masking_on_the_results_file_logs_the_masking_keys(sobol_run, capsys):
    run_dir, _ = sobol_run
    # one input augmentation and two mask variables: 2 x 2 x 17 masked evaluations
    assert cli("masking", "--results", run_dir / "results.h5", "--analysis", "sobol",
               "--masking.k", "1", "--masking.augmentations", "[erasing]",
               "--masking.variables", "[erasing, class]", *COMMON) == 0
    records = runs_by_command(run_dir)["masking"]
    printed = capsys.readouterr().out
    (directory,) = [d for d in (run_dir / "wandb").glob("offline-run-*") if str(d) in printed]
    assert step_metrics(records)["masking/*"] == STEP_METRIC
    row = logged_row(records)
    stored = ResultsStore(run_dir / "results.h5").read_result(
        masking.MaskingResult, masking.GROUP_KIND, "sobol"
    )
    for i, name in enumerate(stored.inputs):
        assert row[f"masking/unmasked/{name}/acc1"] == pytest.approx(stored.unmasked_acc1[i])
        assert row[f"masking/unmasked/{name}/acc5"] == pytest.approx(stored.unmasked_acc5[i])
    for i, name in enumerate(stored.inputs[1:]):
        for v, variable in enumerate(stored.variables):
            np.testing.assert_allclose(row[f"masking/specificity/{name}/{variable}"],
                                       stored.specificity[i, v])  # NaN: constant profiles
    table = json.loads((directory / "files" / row["masking/table"]["path"]).read_text())
    assert stored.inputs == ["original", "erasing"] and stored.variables == ["erasing", "class"]
    # per input its unmasked accuracy, then every (variable, configuration)
    assert len(table["data"]) == 2 * (1 + 2 * len(stored.configurations))
    assert row["masking/specificity_heatmap"]["_type"] == "image-file"


def test_correlation_logs_a_table_and_mean_correlations(sobol_run):
    run_dir, _ = sobol_run
    assert cli("correlation", "--results", run_dir / "results.h5", "--analysis", "sobol") == 0
    row = logged_row(runs_by_command(run_dir)["correlation"])
    with h5py.File(run_dir / "results.h5", "r") as f:
        variables = len(f["correlation/sobol"].attrs["variables"])
        for layer in LAYERS:
            for key in ("S1", "ST"):
                pairs = f[f"correlation/sobol/{layer}/{key}/variables"][()]
                upper = np.abs(pairs[np.triu_indices(variables, k=1)])
                expected = upper[np.isfinite(upper)].mean()
                assert row[f"correlation/{layer}/{key}/mean_abs"] == pytest.approx(expected)
    # every pair of variables, and every variable against mean, var and cv
    assert row["correlation/table"]["nrows"] == len(LAYERS) * 2 * (
        variables * (variables - 1) // 2 + 3 * variables)


@pytest.mark.slow
def test_single_class_and_lda_log_their_keys(sobol_run):
    run_dir, _ = sobol_run
    results = run_dir / "results.h5"
    assert cli("single-class", "--results", results, "--analysis", "sobol", "--masking.k", "1",
               "--masking.variables", "[erasing]", "--single_class.n", "2",
               "--single_class.trials", "1000", *COMMON) == 0
    assert cli("lda", "--results", results, "--analysis", "sobol", "--folds", "2",
               "--repeats", "1") == 0
    runs = runs_by_command(run_dir)
    row = logged_row(runs["single-class"])
    assert step_metrics(runs["single-class"])["single_class/*"] == STEP_METRIC
    with h5py.File(results, "r") as f:
        g = f["single_class/sobol"]
        assert list(g.attrs["variables"]) == ["erasing"]
        jaccard = g["jaccard"][()]  # (variables, configurations)
        threshold = g.attrs["threshold"]
        lda = f["lda/sobol/layer1/ST/accuracy"][()]  # one accuracy per fold
    assert row["single_class/erasing/max_jaccard"] == pytest.approx(np.nanmax(jaccard[0]))
    assert row["single_class/erasing/matched"] == int(np.sum(jaccard[0] > threshold))
    assert row["single_class/threshold"] == pytest.approx(threshold)
    assert row["single_class/table"]["nrows"] == 1
    row = logged_row(runs["lda"])
    assert row["lda/layer1/ST/accuracy"] == pytest.approx(lda.mean())
    assert row["lda/layer1/ST/accuracy_sd"] == pytest.approx(lda.std(ddof=1))
    assert row["lda/chance"] == pytest.approx(1 / 8)  # 5 augmentations, order, class, image
    assert row["lda/table"]["nrows"] == 2  # layer1 x (S1, ST); fc has no spatial maps


def test_contrast_stats_log_the_significant_unit_counts(tmp_path):
    out = tmp_path / "contrast"
    assert cli("contrast", "--output", out, "--n", "4", "--contrast_k", "2",
               "--store-activations", "--wandb", "false", *COMMON) == 0
    assert cli("contrast-stats", "--results", out / "results.h5", "--analysis", "contrast",
               "--alpha", "0.5") == 0
    row = logged_row(runs_by_command(out)["contrast-stats"])
    assert row["contrast_stats/n_pairs"] == 4 and row["contrast_stats/alpha"] == 0.5
    with h5py.File(out / "results.h5", "r") as f:
        augmentations = list(f["wilcoxon/contrast"].attrs["variables"])
        for layer in LAYERS:
            counts = f[f"wilcoxon/contrast/{layer}/n_significant"][()]
            for augmentation, count in zip(augmentations, counts, strict=True):
                assert row[f"contrast_stats/{layer}/{augmentation}/n_significant"] == count
    assert row["contrast_stats/table"]["nrows"] == len(LAYERS) * len(augmentations)


def test_wandb_false_and_disabled_mode_log_nothing(tmp_path, monkeypatch, capsys):
    assert cli("variance", "--output", tmp_path / "off", "--n", "4", "--wandb", "false",
               *COMMON) == 0
    assert (tmp_path / "off" / "results.h5").is_file()
    assert not (tmp_path / "off" / "wandb").exists()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert cli("variance", "--output", tmp_path / "disabled", "--n", "4", *COMMON) == 0
    assert not (tmp_path / "disabled" / "wandb").exists()
    assert "W&B" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("enabled", "project", "env", "mode"),
    [
        (True, None, None, "offline"),
        (True, "augsens", None, "online"),
        (True, None, "online", "online"),
        (True, "augsens", "offline", "offline"),  # an explicit WANDB_MODE wins
        (True, None, "dryrun", "offline"),
        (True, "augsens", "disabled", None),
        (False, "augsens", "online", None),
    ],
)
def test_wandb_mode(enabled, project, env, mode):
    assert wandb_mode(enabled, project, {} if env is None else {"WANDB_MODE": env}) == mode


def test_unknown_wandb_mode_is_bad_input(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    assert cli("variance", "--output", tmp_path / "run", "--n", "4", *COMMON) == 2
    assert "WANDB_MODE='sometimes' is not a W&B mode" in capsys.readouterr().err
    assert not (tmp_path / "run" / "results.h5").exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--wandb_group", "my sweep/1", "--wandb_group 'my sweep/1': a W&B group is 1-128"),
        ("--wandb_project", "team/project", "--wandb_project 'team/project': W&B project"),
        ("--wandb_tags", json.dumps(["x" * 65]), "--wandb_tags: 'xxx"),
        ("--wandb_job_type", "", "--wandb_job_type: '' has 0 characters"),
    ],
)
def test_names_wandb_rejects_are_refused_before_any_compute(tmp_path, capsys, option, value,
                                                           message):
    assert cli("variance", "--output", tmp_path / "run", "--n", "4", option, value,
               *COMMON) == 2
    error = capsys.readouterr().err
    assert message in error
    assert not (tmp_path / "run" / "results.h5").exists()


def test_run_names_given_on_the_command_line_and_an_unknown_entity_offline(tmp_path):
    """Offline nothing checks the entity (W&B does on sync): no error; the names given win over
    the defaults (group of the run directory, job type analyze, tags arch and set)."""
    run_dir = tmp_path / "run"
    assert cli("sobol", "--output", run_dir, "--n", "4", "--wandb_entity", "no-such-team-4f7",
               "--wandb_group", "sweep-3", "--wandb_job_type", "baseline",
               "--wandb_tags", "[a,b]", *COMMON, quiet=True) == 0
    records = runs_by_command(run_dir)["sobol"]
    (run,) = [r.run for r in records if r.HasField("run")]
    assert (run.entity, run.run_group, run.job_type) == ("no-such-team-4f7", "sweep-3",
                                                         "baseline")
    assert list(run.tags) == ["a", "b"]
    assert run_config(records)["wandb_tags"] == ["a", "b"]
    # the defaults, where nothing is given
    assert cli("sobol", "--output", run_dir, "--name", "plain", "--n", "4", *COMMON,
               quiet=True) == 0
    runs = [r.run for records in offline_runs(run_dir) for r in records if r.HasField("run")]
    (plain,) = [run for run in runs if run.display_name == "plain"]
    assert (plain.run_group, plain.job_type) == (f"{tmp_path.name}-run", "analyze")
    assert list(plain.tags) == ["resnet18", "set-1"]
