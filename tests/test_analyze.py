"""analyze.py end to end: results file, 2-process DDP, SIGKILL + resume, bad input.

Multi-process runs go through ``python analyze.py --devices 2 --strategy ddp`` on CPU (Lightning
launches the second process, gloo); everything else calls ``analyze.main`` in this process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import cli

import analyze
from lightning_modules import ImageClassifier
from sensitivity import resume
from sensitivity.config import EngineConfig, build_design
from sensitivity.problem import AugmentationProblem
from sensitivity.store import ResultsStore

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["layer1", "layer3", "fc"]
# 32 px stock ResNet18 (cheap), 4 planted classes x 2 probe images, channel means of the
# convolutional stages and the softmax head.
COMMON = [
    "--data.image_size", "32", "--images-per-class", "2", "--small_input", "false",
    "--layers", json.dumps(LAYERS), "--reduction", "{layer1: channel_mean, layer3: channel_mean}",
    "--accelerator", "cpu", "--no_progress",
]
# EngineConfig settings of the forward that analyze.py exposes as options.
ENGINE_OPTIONS = ("precision", "deduplicate", "channels_last", "compile")


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def assert_same_indices(a, b, rtol: float = 1e-6) -> None:
    assert a.layer_names == b.layer_names and a.group_names == b.group_names
    assert a.toggles == b.toggles and a.interval == b.interval
    for layer, values in a.layers.items():
        np.testing.assert_array_equal(b.flags[layer], a.flags[layer], err_msg=f"{layer}/flag")
        for key, value in values.items():
            np.testing.assert_allclose(b.layers[layer][key], value, rtol=rtol, atol=1e-7,
                                       err_msg=f"{layer}/{key}")


@pytest.mark.slow
def test_results_file_follows_the_documented_format(checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli("sobol", "--checkpoint", checkpoint, "--output", out, "--n", "8", *COMMON) == 0
    printed = capsys.readouterr().out
    assert str(out / "results.h5") in printed and "sobol_S1.png" in printed
    problem = AugmentationProblem(1, n_classes=4, images_per_class=2)
    g = len(problem.groups)
    with h5py.File(out / "results.h5", "r") as f:
        assert f.attrs["format"] == "augsens-results" and f.attrs["format_version"] == 1
        assert f.attrs["model"] == "resnet18" and "checkpoint" in f.attrs["weights"]
        assert f.attrs["dataset"] == "planted:colour" and list(f.attrs["image_size"]) == [32, 32]
        assert f.attrs["seed"] == 0 and "method: sobol" in f.attrs["config"]
        assert list(f["problem"].attrs["group_names"]) == problem.group_names
        assert f["problem"].attrs["set"] == 1
        a = f["analyses/sobol"]
        assert a.attrs["status"] == "complete" and a.attrs["method"] == "sobol"
        assert a.attrs["n"] == 8 and a.attrs["evaluations"] == 8 * (g + 2)
        assert a.attrs["epoch"] == -1 and list(a.attrs["layers"]) == LAYERS
        assert list(a.attrs["group_names"]) == problem.group_names
        # The settings that determine the result (sensitivity.engine.analysis_attrs).
        assert (a.attrs["design"], a.attrs["block_size"]) == ("SobolDesign", g + 2)
        assert (a.attrs["seed"], a.attrs["precision"], a.attrs["conf_level"]) == (0, "32", 0.95)
        assert json.loads(a.attrs["reduction"]) == dict.fromkeys(LAYERS[:2], "channel_mean")
        for flag in ("second_order", "deduplicate", "channels_last", "compile"):
            assert not a.attrs[flag], flag
        shapes = {"layer1": (64,), "layer3": (256,), "fc": (4,)}
        for layer, shape in shapes.items():
            lg = a[layer]
            assert tuple(lg.attrs["unit_shape"]) == shape
            for key in ("S1", "ST", "S1_conf", "ST_conf"):
                assert lg[key].dtype == np.float32 and lg[key].shape == (g, *shape)
            for key in ("mean", "var", "std", "cv"):
                assert lg[key].shape == shape
        # the head is analysed after softmax: probabilities
        assert abs(float(a["fc"]["mean"][()].sum()) - 1.0) < 1e-5
    assert (out / "figures" / "sobol_ST.png").stat().st_size > 0
    assert (out / "config.yaml").exists()
    assert not list(out.glob("*.resume*"))


@pytest.mark.slow
def test_two_processes_equal_one_and_store_every_row_once(checkpoint, tmp_path, one_thread):
    # 16 base points of 10 rows, 4 per batch: rank 0 takes blocks 0-7, rank 1 blocks 8-15, so
    # both runs forward the same batches and differ only in float64 summation order.
    args = ["sobol", "--checkpoint", checkpoint, "--n", "16", "--batch_rows", "40", *COMMON]
    assert cli(*args, "--output", tmp_path / "one") == 0
    ddp = tmp_path / "ddp"
    done = subprocess.run(
        [sys.executable, str(ROOT / "analyze.py"), *map(str, args), "--output", str(ddp),
         "--devices", "2", "--strategy", "ddp", "--store-activations"],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in done.stderr + done.stdout  # really two processes
    one = ResultsStore(tmp_path / "one" / "results.h5").read_analysis("sobol")
    two = ResultsStore(ddp / "results.h5").read_analysis("sobol")
    assert_same_indices(one, two)
    assert two.evaluations == one.evaluations == 160
    problem = AugmentationProblem(1, n_classes=4, images_per_class=2)
    design = build_design(problem, EngineConfig(method="sobol", n=16, seed=0))
    with h5py.File(ddp / "results.h5", "r") as f:  # follows the external link
        rows = f["activations/sobol"]
        np.testing.assert_array_equal(rows["row_index"][()], np.arange(160))
        np.testing.assert_array_equal(rows["design"][()], design.rows())
        assert rows["layer3"].shape == (160, 256) and rows["fc"].shape == (160, 4)
        np.testing.assert_array_equal(rows["row_kind"][()], np.arange(160) % 10)
    assert not list(ddp.glob("*rank*"))  # shards merged and removed


@pytest.mark.slow
def test_two_processes_run_a_user_augmentation_as_one(checkpoint, tmp_path, one_thread, user):
    """An augmentation registered by import path (tests/user_augmentations.py): every rank
    imports it, and two processes give one process's result."""
    augmentations = ["hue", "user_augmentations:channel_swap"]
    problem = AugmentationProblem(augmentations, n_classes=4, images_per_class=2)
    rows = len(problem.group_names) + 2
    # 8 base points, 2 per batch: both runs forward the same batches (see above)
    args = ["sobol", "--checkpoint", checkpoint, "--n", "8", "--batch_rows", str(2 * rows),
            "--set", json.dumps(augmentations), *COMMON]
    assert cli(*args, "--output", tmp_path / "one", quiet=True) == 0
    env = {**subprocess_env(), "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    done = subprocess.run(
        [sys.executable, str(ROOT / "analyze.py"), *map(str, args), "--output",
         str(tmp_path / "ddp"), "--devices", "2", "--strategy", "ddp"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in done.stderr + done.stdout
    one = ResultsStore(tmp_path / "one" / "results.h5").read_analysis("sobol")
    two = ResultsStore(tmp_path / "ddp" / "results.h5").read_analysis("sobol")
    assert "channel_swap" in one.group_names
    assert_same_indices(one, two)


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(checkpoint, tmp_path, one_thread, caplog):
    # One block per batch and a checkpoint after every block: the run lasts long enough to be
    # killed after its first checkpoints.
    args = ["shapley", "--checkpoint", checkpoint, "--n", "64", "--batch_rows", "9", *COMMON]
    assert cli(*args, "--output", tmp_path / "reference") == 0
    out = tmp_path / "resumed"
    state = out / "shapley.resume.pt"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "analyze.py"), *map(str, args), "--output", str(out),
         "--checkpoint_every", "1"],
        cwd=tmp_path, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while not state.exists():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no resume state was written"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    # Nothing half-written is visible: no results file, or one without the analysis.
    store = ResultsStore(out / "results.h5")
    assert store.analyses() == []
    saved = torch.load(state, weights_only=True)
    assert 1 <= saved["next_block"] < 64
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="sensitivity.engine"):
        assert cli(*args, "--output", out, "--checkpoint_every", "1") == 0
    resumed = time.monotonic() - started
    problem = AugmentationProblem(1, n_classes=4, images_per_class=2)
    block = build_design(problem, EngineConfig(method="shapley", n=64)).block_size
    done = saved["next_block"]
    assert (f"at row {done * block} of {64 * block}: blocks [0, {done}) of this shard already "
            f"done") in caplog.text
    assert not state.exists()
    reference = ResultsStore(tmp_path / "reference" / "results.h5").read_analysis("shapley")
    result = store.read_analysis("shapley")
    assert_same_indices(reference, result)
    # seconds: the killed run up to its last checkpoint plus the resumed run
    assert saved["seconds"] < result.seconds <= saved["seconds"] + resumed


@pytest.mark.parametrize("method, key", [("variance", "var"), ("contrast", "effect_size")])
def test_other_methods_run_from_the_cli(checkpoint, tmp_path, method, key):
    out = tmp_path / method
    assert cli(method, "--checkpoint", checkpoint, "--output", out, "--n", "4", *COMMON) == 0
    result = ResultsStore(out / "results.h5").read_analysis(method)
    assert result.method == method and key in result.layers["fc"]
    assert (out / "figures").is_dir() == (method != "variance")  # no empty folder


def test_engine_options_are_the_engine_config_fields():
    """analyze.py's engine options are generated from EngineConfig: one per field (the method
    is the command), with its docstring as help and its switches as --x / --no_x."""
    parser = analyze.build_parser()
    known = set(parser._option_string_actions)
    for field in dataclasses.fields(EngineConfig):
        if field.name != "method":
            assert f"--{field.name}" in known, field.name
    assert {"--no_progress", "--channels-last", "--no_second_order"} <= known
    help_text = parser._option_string_actions["--conf_level"].help
    assert help_text.startswith("confidence level of the ``*_conf`` half-widths")


def test_engine_options_are_recorded_with_the_analysis(checkpoint, tmp_path):
    out = tmp_path / "run"
    flags = ["--n", "4", "--precision", "bf16", "--deduplicate", "--channels_last"]
    assert cli("variance", "--checkpoint", checkpoint, "--output", out, *COMMON, *flags) == 0
    attrs = ResultsStore(out / "results.h5").analysis_attrs("variance")
    expected = {"precision": "bf16", "deduplicate": True, "channels_last": True, "compile": False}
    assert {name: attrs[name] for name in ENGINE_OPTIONS} == expected
    saved = (out / "config.yaml").read_text()
    assert "deduplicate: true" in saved and "channels_last: true" in saved


def test_bad_input_exits_non_zero_without_results(checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    wrong_weights = tmp_path / "resnet18_state.pth"
    torch.save(ImageClassifier("resnet18", num_classes=4).net.state_dict(), wrong_weights)
    cases = {
        "layer": (["--layers", "[layer9]"], r"unknown layer name\(s\) \['layer9'\].*layer1"),
        "n": (["--n", "12"], "n must be a power of two"),
        "architecture": (["--arch", "alexnet"], "holds architecture resnet18, not alexnet"),
        "folder": (["--data.root", empty], "has no class subfolders"),
        "precision": (["--precision", "fp8"], r"one of \['32', 'bf16', '16'\], got 'fp8'"),
    }
    for label, (extra, message) in cases.items():
        out = tmp_path / label
        code = cli("sobol", "--checkpoint", checkpoint, "--output", out, *COMMON, *extra)
        err = capsys.readouterr().err
        assert code == 2, label
        assert "analyze.py: error:" in err and re.search(message, err), err
        assert not (out / "results.h5").exists(), label
    out = tmp_path / "weights"
    assert cli("sobol", "--arch", "resnet34", "--weights", wrong_weights, "--output", out,
               *COMMON) == 2
    assert "does not match architecture 'resnet34'" in capsys.readouterr().err
    assert not out.exists()
    assert cli("masking") == 2
    assert "pass --results" in capsys.readouterr().err


@pytest.mark.slow
def test_image_folder_probe_is_loaded_lazily_in_workers(checkpoint, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(4):
        (tmp_path / "folder" / f"class{c}").mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "folder" / f"class{c}" / f"{i}.png")
    out = tmp_path / "run"
    assert cli("variance", "--checkpoint", checkpoint, "--output", out, "--n", "16",
               "--data.root", tmp_path / "folder", "--num_workers", "1", *COMMON) == 0
    meta = ResultsStore(out / "results.h5").read_metadata()
    assert meta["dataset"] == str(tmp_path / "folder") and meta["image_size"] == [32, 32]
    assert meta["class_names"] == [f"class{c}" for c in range(4)]


def test_presets_parse_and_ask_for_the_image_folder(capsys):
    presets = sorted(p.stem for p in analyze.PRESETS.glob("imagenet_*.yaml"))
    assert presets == ["imagenet_shapley", "imagenet_sobol"]
    for name in presets:
        for arch in ("alexnet", "vgg11", "resnet18"):
            assert cli("--config", name, "--arch", arch, "--no_progress") == 2
            assert "pass --data.root" in capsys.readouterr().err
    parser = analyze.build_parser()
    args = ["--config", "imagenet_sobol", "--arch", "alexnet"]
    cfg = parser.parse_args(analyze.normalise_args(args))
    assert (cfg.method, cfg.n, cfg.second_order, cfg.arch) == ("sobol", 2**17, True, "alexnet")
    assert (cfg.data.image_size, cfg.reduction, cfg.problem.preset) == (224, "none", "paper")
    cfg = parser.parse_args(analyze.normalise_args(["--config", "imagenet_shapley"]))
    assert (cfg.shapley_method, cfg.n, cfg.n_outer, cfg.n_inner) == ("permutation", 256, 64, 16)
    assert cfg.arch == "resnet18"


@pytest.mark.slow
def test_each_analysis_carries_its_provenance_and_other_runs_are_refused(checkpoint, tmp_path,
                                                                         capsys):
    out = tmp_path / "run"
    assert cli("sobol", "--checkpoint", checkpoint, "--output", out, "--n", "8", *COMMON) == 0
    results = out / "results.h5"
    before = ResultsStore(results).read_metadata()
    # Another model, image size and augmentation set into the same folder: refused up front.
    code = cli("variance", "--name", "other", "--output", out, "--n", "4", *COMMON,
               "--data.image_size", "64", "--set", "2")
    err = capsys.readouterr().err
    assert code == 2 and "pass another --output" in err, err
    for part in ("weights_sha256 (in the file ", "image_size (in the file [32, 32], now "
                 "[64, 64])", "problem.augmentations (in the file ["):
        assert part in err, err
    store = ResultsStore(results)
    assert store.read_metadata() == before and store.analyses() == ["sobol"]
    # The same model and data: a second analysis, each describing itself.
    assert cli("variance", "--checkpoint", checkpoint, "--output", out, "--n", "4", *COMMON) == 0
    meta = store.read_metadata()
    assert meta["weights_sha256"] == hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
    for name in ("sobol", "variance"):
        attrs = store.analysis_attrs(name)
        for key in ("model", "weights", "weights_sha256", "dataset", "image_size"):
            assert attrs[key] == meta[key], (name, key)
        assert json.loads(attrs["problem"]) == json.loads(meta["problem"]["config"])
        assert f"method: {name}" in attrs["config"]
    assert "method: variance" in (out / "config.yaml").read_text()


def test_random_initialisations_of_other_seeds_are_other_weights(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli("variance", "--output", out, "--n", "4", *COMMON) == 0
    capsys.readouterr()
    assert cli("variance", "--name", "seed1", "--seed", "1", "--output", out, "--n", "4",
               *COMMON) == 2
    err = capsys.readouterr().err
    assert "weights_sha256" in err and "random initialisation is set by --seed" in err
    attrs = ResultsStore(out / "results.h5").analysis_attrs("variance")
    assert attrs["weights"] == "none" and len(attrs["weights_sha256"]) == 64


class StopAfterFirstSave(Exception):
    """Stands in for a killed process once the first resume state is on disk."""


@pytest.mark.slow
def test_refused_resume_names_the_field_and_leaves_the_config(checkpoint, tmp_path, capsys,
                                                              monkeypatch):
    out = tmp_path / "run"
    args = ["sobol", "--checkpoint", checkpoint, "--output", out, "--n", "8", "--batch_rows",
            "20", "--checkpoint_every", "1", *COMMON]
    save_state = resume.save_state

    def save_then_stop(path, payload):
        save_state(path, payload)
        raise StopAfterFirstSave

    with monkeypatch.context() as patched:
        patched.setattr(resume, "save_state", save_then_stop)
        with pytest.raises(StopAfterFirstSave):
            cli(*args)
    assert (out / "sobol.resume.pt").exists() and not (out / "config.yaml").exists()
    assert cli(*args, "--seed", "3") == 2
    err = capsys.readouterr().err
    assert "differs in: config.seed (saved 0, now 3))" in err, err
    assert not (out / "config.yaml").exists()  # the rejected config is not written anywhere
    assert cli(*args) == 0  # the pending state continues
    assert "seed: 0" in (out / "config.yaml").read_text()
    assert not (out / "sobol.resume.pt").exists()


def test_spawning_strategies_are_refused_before_any_output(checkpoint, tmp_path, capsys):
    assert "ddp_spawn" not in analyze.build_parser().format_help()
    out = tmp_path / "run"
    for strategy in ("ddp_spawn", "ddp_fork"):
        assert cli("sobol", "--checkpoint", checkpoint, "--output", out, "--strategy", strategy,
                   *COMMON) == 2
        err = capsys.readouterr().err
        assert f"--strategy {strategy} is not supported" in err and "use --strategy ddp" in err
    assert not out.exists()


def test_unreadable_checkpoint_or_weights_is_a_clean_input_error(tmp_path, capsys):
    garbage = tmp_path / "random.ckpt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    for option in ("--checkpoint", "--weights"):
        out = tmp_path / option.strip("-")
        assert cli("sobol", option, garbage, "--output", out, *COMMON) == 2, option
        err = capsys.readouterr().err
        assert f"{garbage} is not a readable torch file" in err, err
        assert "weights_only" not in err and "Traceback" not in err
        assert not out.exists()


def test_output_that_is_a_file_is_refused_before_any_compute(checkpoint, tmp_path, capsys):
    taken = tmp_path / "notes.txt"
    taken.write_text("keep me")
    for out in (taken, taken / "run"):
        assert cli("sobol", "--checkpoint", checkpoint, "--output", out, *COMMON) == 2
        err = capsys.readouterr().err
        assert f"--output {out}: {taken} is a file, not a directory" in err, err
    assert taken.read_text() == "keep me"
