"""The analysis engine on an analytic network: its units are known functions of the augmented
image (mean chroma, mean intensity), so the engine's loop can be checked against the same rows
evaluated directly and against what the augmentations must do."""

from __future__ import annotations

import io
import json
import logging
import math
import re
import sys
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import FLOAT32_SUMS, fork_ranks
from torch import nn
from torch.utils.data import Dataset

from sensitivity import config as config_module
from sensitivity import gsa
from sensitivity import plan as plan_module
from sensitivity.activations import ActivationWriter
from sensitivity.config import MIN_TOGGLES, EngineConfig, analysis_attrs, build_design
from sensitivity.distributed import resolve_world, shard_path, shard_range
from sensitivity.engine import run_analysis
from sensitivity.estimators import (
    FLAG_CONSTANT,
    FLAG_NEGLIGIBLE,
    FLAG_UNSUPPORTED,
    FLAG_VALID,
    ContrastAccumulator,
    PermutationShapleyAccumulator,
)
from sensitivity.plan import SmallSampleWarning, layer_shapes, plan_analysis
from sensitivity.problem import AugmentationProblem
from sensitivity.store import ResultsStore

SIZE = 16
AUGS = ["saturation", "grayscale", "brightness", "rolling"]


class ColourStats(nn.Module):
    """(B, 3, H, W) -> (B, 2): mean chroma (max - min over channels) and mean intensity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chroma = (x.amax(1) - x.amin(1)).mean((1, 2))
        return torch.stack([chroma, x.mean((1, 2, 3))], dim=1)


class AnalyticNet(nn.Module):
    """Analytic units ("stats") followed by a small head; float64 unless told otherwise.

    fail_after: raise RuntimeError on that many-th batch forward (a crash mid-analysis).
    rows: images forwarded in batches so far.
    """

    def __init__(self, dtype: torch.dtype = torch.float64, fail_after: int | None = None):
        super().__init__()
        self.stats = ColourStats()
        self.head = nn.Linear(2, 3, dtype=dtype)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
            self.head.bias.zero_()
        self.fail_after = fail_after
        self.batches = 0
        self.rows = 0
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:  # not the one-image dry forward
            self.batches += 1
            self.rows += x.shape[0]
            self.modes.append(self.training)
            if self.fail_after is not None and self.batches > self.fail_after:
                raise RuntimeError("simulated crash")
        return self.head(self.stats(x))


class TinyConvNet(nn.Module):
    """Two 3x3 convolutions and a linear head, float32, seeded: a real convolutional forward.

    formats: per eager batch forward, whether the input and the conv weights are channels-last.
    traced: whether torch.compile traced the forward (no per-call record inside a compiled
    forward: a growing list is a guard that fails, and recompiles, at every call).
    """

    # Most products summed into one output: conv2's 8 channels x 3 x 3.
    FAN_IN = 72

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        self.formats: list[tuple[bool, bool]] = []
        self.traced = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            self.traced = True
        elif x.shape[0] > 1:  # not the one-image dry forward
            weight = self.conv1.weight
            self.formats.append(
                (
                    x.is_contiguous(memory_format=torch.channels_last),
                    weight.is_contiguous(memory_format=torch.channels_last),
                )
            )
        return self.head(self.conv2(self.relu(self.conv1(x))).mean((2, 3)))


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    """2 classes x 2 images, colourful 16 px images in [0, 1] (class-major)."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(4, 3, 1, 1, generator=g)
    return (0.6 * base + 0.4 * torch.rand(4, 3, SIZE, SIZE, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def problem() -> AugmentationProblem:
    return AugmentationProblem(AUGS, n_classes=2, images_per_class=2)


def direct_outputs(problem, probe, rows: np.ndarray) -> np.ndarray:
    """The "stats" units of every row evaluated in one batch, float32 as the hooks store them."""
    decoded = problem.decode(rows, SIZE, SIZE)
    images = problem.augment(probe[decoded.image_index].double(), decoded)
    with torch.no_grad():
        return ColourStats()(images).float().double().numpy()


def gsa_problem(problem: AugmentationProblem) -> gsa.Problem:
    labels = [g.name for g in problem.groups for _ in g.columns]
    return gsa.Problem(problem.column_names, [(0.0, 1.0)] * problem.d, labels)


def run(problem, probe, model=None, **settings) -> tuple:
    settings = {"layers": ["stats"], "progress": False, **settings}
    config = EngineConfig(**settings)
    return run_analysis(model or AnalyticNet(), problem, probe, config), config


def test_sobol_equals_gsa_on_the_same_rows_and_ranks_the_augmentations(problem, probe):
    result, config = run(problem, probe, method="sobol", n=64, seed=3, batch_rows=50)
    design = build_design(problem, config)
    assert design.replicates == config.replicates == 16
    Y = direct_outputs(problem, probe, design.rows())
    expected = gsa.sobol_from_outputs(gsa_problem(problem), Y, replicates=16)
    stats = result.layers["stats"]
    for key in ("S1", "ST", "S1_conf", "ST_conf"):
        np.testing.assert_allclose(stats[key], getattr(expected, key), **FLOAT32_SUMS)
    np.testing.assert_allclose(stats["mean"], Y.mean(0), rtol=FLOAT32_SUMS["rtol"])
    np.testing.assert_allclose(stats["var"], Y.var(0), rtol=FLOAT32_SUMS["rtol"])
    assert result.evaluations == design.n_rows == 64 * (len(problem.groups) + 2)
    assert result.group_names == problem.group_names and result.n == 64
    names = problem.group_names
    chroma_top = {names[i] for i in np.argsort(stats["ST"][:, 0])[-2:]}
    assert chroma_top == {"saturation", "grayscale"}  # grayscale removes chroma entirely
    assert names[int(np.argmax(stats["ST"][:, 1]))] == "brightness"
    # A circular shift keeps every pixel: neither unit can depend on rolling.
    assert np.all(np.abs(stats["ST"][names.index("rolling")]) < 1e-10)


def test_shapley_matches_gsa_and_puts_saturation_and_grayscale_on_top(problem, probe):
    result, _ = run(problem, probe, method="shapley", n=48, seed=1, batch_rows=40)
    design = build_design(problem, EngineConfig(method="shapley", n=48, seed=1))
    X = design.rows()
    # Balanced switch columns can repeat a value between x1 and x2 (the same cell's midpoint):
    # the trajectories' group orders are given, not read from X.
    expected = gsa.shapley_from_outputs(
        gsa_problem(problem), X, direct_outputs(problem, probe, X), design.permutations()
    )
    stats = result.layers["stats"]
    for key in ("shapley", "shapley_normalized", "shapley_conf"):
        np.testing.assert_allclose(stats[key], getattr(expected, key), **FLOAT32_SUMS)
    names = problem.group_names
    top = {names[i] for i in np.argsort(stats["shapley_normalized"][:, 0])[-2:]}
    assert top == {"saturation", "grayscale"}
    # efficiency: the shares' float32 partial sums are rounded apart from their total's
    np.testing.assert_allclose(stats["shapley_normalized"].sum(0), 1.0, rtol=FLOAT32_SUMS["rtol"])


def test_permutation_shapley_contrast_and_variance_equal_direct_accumulation(problem, probe):
    g, a = len(problem.groups), len(problem.augmentations)
    cases = {
        "permutation": ({"method": "shapley", "shapley_method": "permutation", "n": 3,
                         "n_outer": 2, "n_inner": 3, "batch_rows": 20}, "shapley"),
        "contrast": ({"method": "contrast", "n": 4, "contrast_k": 3, "batch_rows": 20},
                     "effect_size"),
        "variance": ({"method": "variance", "n": 50, "batch_rows": 16}, "var"),
    }
    for label, (settings, key) in cases.items():
        result, config = run(problem, probe, seed=2, **settings)
        design = build_design(problem, config)
        Y = direct_outputs(problem, probe, design.rows())
        blocks = torch.from_numpy(Y).reshape(design.n_blocks, design.block_size, 2)
        if label == "permutation":
            acc = PermutationShapleyAccumulator(g, 2, 3, (2,))
            acc.update(blocks, torch.from_numpy(design.permutations()))
            expected = acc.compute().shapley
        elif label == "contrast":
            acc = ContrastAccumulator(a, 3, (2,))
            acc.update(blocks)
            expected = acc.compute().effect_size
            assert result.group_names == AUGS
        else:
            expected = Y.var(0)
        np.testing.assert_allclose(result.layers["stats"][key], expected, **FLOAT32_SUMS,
                                   err_msg=label)
        assert result.evaluations == design.n_rows


def test_partition_selects_the_second_half_of_the_probe(probe):
    problem = AugmentationProblem(AUGS, auxiliaries=("class", "image", "partition"),
                                  n_classes=2, images_per_class=2)
    both_splits = torch.cat([probe, 1.0 - probe])  # split 0, then split 1
    result, config = run(problem, both_splits, method="variance", n=64, batch_rows=16)
    rows = build_design(problem, config).rows()
    decoded = problem.decode(rows, SIZE, SIZE)
    index = decoded.image_index + 4 * decoded.partition
    assert set(index.tolist()) == set(range(8))
    with torch.no_grad():
        Y = ColourStats()(problem.augment(both_splits[index].double(), decoded)).float().double()
    np.testing.assert_allclose(result.layers["stats"]["mean"], Y.numpy().mean(0),
                               rtol=FLOAT32_SUMS["rtol"])
    with pytest.raises(ValueError, match=r"expects 8 .* x 2 partitions"):
        run(problem, probe, method="variance", n=4)


class CountingProbe(Dataset):
    """The probe images as a Dataset of (image, label) that records every image it loads."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images, self.loads = images, []

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        self.loads.append(index)
        return self.images[index], index // 2


def test_each_unique_image_is_loaded_once_per_batch(problem, probe):
    config = {"method": "sobol", "n": 32, "batch_rows": 45}  # 5 blocks of 9 rows per batch
    from_tensor, _ = run(problem, probe, **config)
    counting = CountingProbe(probe)
    from_dataset, cfg = run(problem, counting, **config)
    design = build_design(problem, cfg)
    expected = []
    for start in range(0, design.n_blocks, 5):
        index = problem.decode(design.rows(start, min(start + 5, 32)), SIZE, SIZE).image_index
        expected += sorted(set(index.tolist()))
    assert counting.loads[1:] == expected  # loads[0]: the engine reads item 0 for the image size
    assert len(expected) < design.n_rows / 4
    for key, value in from_tensor.layers["stats"].items():
        np.testing.assert_array_equal(value, from_dataset.layers["stats"][key])


@pytest.mark.slow
def test_dataloader_workers_give_the_same_result(problem, probe):
    inline, _ = run(problem, probe, method="sobol", n=16, batch_rows=18)
    workers, _ = run(problem, CountingProbe(probe), method="sobol", n=16, batch_rows=18,
                     num_workers=2)
    for key, value in inline.layers["stats"].items():
        np.testing.assert_array_equal(value, workers.layers["stats"][key])


@pytest.mark.parametrize("background", [False, True])
def test_resume_after_a_crash_equals_an_uninterrupted_run(
        problem, probe, tmp_path, caplog, background):
    # With the background thread the crash comes while the previous batch's job may still be
    # queued: it is finished first, so the checkpoint holds every batch forwarded before it.
    settings = {"method": "sobol", "n": 64, "batch_rows": 36, "checkpoint_every": 4,
                "background": background}
    reference, _ = run(problem, probe, **settings)
    state = tmp_path / "state.pt"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_analysis(AnalyticNet(fail_after=5), problem, probe,
                     EngineConfig(layers=["stats"], progress=False, **settings), state_path=state)
    assert state.exists()
    saved = torch.load(state, weights_only=True)
    assert saved["next_block"] == 20  # 5 batches of 4 blocks done before the crash
    with pytest.raises(ValueError, match=r"differs in: config\.seed \(saved 0, now 1\)\)"):
        run_analysis(AnalyticNet(), problem, probe,
                     EngineConfig(layers=["stats"], progress=False, **{**settings, "seed": 1}),
                     state_path=state)
    resumed_model = AnalyticNet()
    with caplog.at_level(logging.INFO, logger="sensitivity.engine"):
        resumed = run_analysis(resumed_model, problem, probe,
                               EngineConfig(layers=["stats"], progress=False, **settings),
                               state_path=state)
    assert "resuming sobol" in caplog.text
    assert resumed_model.batches == 16 - 5  # only the 11 batches after block 20
    assert not state.exists()  # removed once the analysis is complete
    for key, value in reference.layers["stats"].items():
        np.testing.assert_allclose(resumed.layers["stats"][key], value, rtol=1e-12, atol=1e-15)


# 64 Sobol' base points of 9 rows (4 augmentations + order, class, image), 4 per batch.
PROGRESS_SETTINGS = {"method": "sobol", "n": 64, "batch_rows": 36}


def test_progress_gives_the_work_then_plain_lines_off_a_terminal(problem, probe, capsys):
    run(problem, probe, progress=True, **PROGRESS_SETTINGS)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "sobol: 576 rows (64 blocks of 9 rows, 4 blocks per batch)"
    middle = [re.fullmatch(r"sobol: (\d+)/576 rows \(\d+%\), [\d.]+/s, ETA \d+ s", line)
              for line in lines[1:-1]]
    assert all(middle) and len(middle) == 9  # one line per tenth of the rows
    assert re.fullmatch(r"sobol: 576/576 rows \(100%\), [\d.]+/s, done in \d+ s", lines[-1])
    run(problem, probe, progress=False, **PROGRESS_SETTINGS)
    assert capsys.readouterr().err == ""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_counts_whole_rows(problem, probe, monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    run(problem, probe, progress=True, **PROGRESS_SETTINGS)
    text = sys.stderr.getvalue()
    assert "0/576" in text and "576/576" in text and " rows/s" in text
    assert not re.search(r"\d\.\d\d/576", text)  # tqdm's unit_scale printed "0.00/576"


def test_a_resumed_run_says_where_and_adds_the_seconds_of_both_parts(
    problem, probe, tmp_path, capsys
):
    config = EngineConfig(layers=["stats"], checkpoint_every=4, **PROGRESS_SETTINGS)
    state = tmp_path / "state.pt"
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_analysis(AnalyticNet(fail_after=5), problem, probe, config, state_path=state)
    interrupted = time.perf_counter() - started
    saved = torch.load(state, weights_only=True)
    assert saved["next_block"] == 20 and 0 < saved["seconds"] <= interrupted
    capsys.readouterr()
    started = time.perf_counter()
    result = run_analysis(AnalyticNet(), problem, probe, config, state_path=state)
    resumed = time.perf_counter() - started
    lines = capsys.readouterr().err.splitlines()
    assert lines[:2] == ["sobol: 576 rows (64 blocks of 9 rows, 4 blocks per batch)",
                         "sobol: resuming at row 180 of 576"]
    # The interrupted run up to its last checkpoint plus all of the resumed run.
    assert 0.5 * resumed < result.seconds - saved["seconds"] <= resumed


def _ddp_resume_worker(rank: int, world_size: int, problem, probe, out: str) -> None:
    """One rank of a gloo group: a sobol run crashing after 3 batches, then its resumption."""
    torch.set_num_threads(1)
    config = EngineConfig(layers=["stats"], progress=False, checkpoint_every=4,
                          **PROGRESS_SETTINGS)
    state = Path(out) / "state.pt"
    if rank == 1:
        time.sleep(0.3)  # the ranks' clocks start apart, as processes launched one by one
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_analysis(AnalyticNet(fail_after=3), problem, probe, config, state_path=state)
    saved = torch.load(shard_path(state, rank, world_size), weights_only=True)
    result = run_analysis(AnalyticNet(), problem, probe, config, state_path=state)
    record = {"seconds": result.seconds, "saved": float(saved["seconds"])}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_ddp_resume_gives_every_rank_rank_zeros_seconds(problem, probe, tmp_path):
    fork_ranks(_ddp_resume_worker, 2, problem, probe, str(tmp_path))
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert zero["seconds"] == one["seconds"]  # rank zero's number, not each rank its own
    assert zero["seconds"] > zero["saved"] > 0 and one["saved"] != zero["saved"]


def _mismatch_worker(rank: int, world_size: int, problem, probe, out: str) -> None:
    """One rank of a gloo group; rank 1 was started with another p_on (as a rank importing
    another version of an augmentation would differ): every rank must refuse the run."""
    if rank == 1:
        problem = AugmentationProblem.from_config({**problem.to_config(), "p_on": 0.25})
    config = EngineConfig(layers=["stats"], progress=False, **PROGRESS_SETTINGS)
    try:
        run_analysis(AnalyticNet(), problem, probe, config)
    except ValueError as error:
        (Path(out) / f"rank{rank}.txt").write_text(str(error))


@pytest.mark.slow
def test_ranks_started_with_another_problem_are_refused_on_every_rank(problem, probe,
                                                                      tmp_path):
    fork_ranks(_mismatch_worker, 2, problem, probe, str(tmp_path))
    for rank in range(2):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert message.startswith("ranks [1] have another problem (augmentations, their "
                                  "registrations and bounds) than rank 0")


def test_activation_writer_gets_every_row_with_its_outputs(problem, probe, tmp_path):
    config = EngineConfig(method="sobol", n=8, layers=["stats", "head"], progress=False,
                          batch_rows=27)
    model = AnalyticNet()
    design = build_design(problem, config)
    shapes = layer_shapes(model, (SIZE, SIZE), config)
    assert shapes == {"stats": (2,), "head": (3,)}
    path = tmp_path / "act.h5"
    with ActivationWriter(path, "t", shapes, problem.d, design.row_kinds(),
                          n_rows=design.n_rows) as writer:
        run_analysis(model, problem, probe, config, activation_writer=writer)
    with h5py.File(path, "r") as f:
        g = f["activations/t"]
        np.testing.assert_array_equal(g["row_index"][()], np.arange(design.n_rows))
        np.testing.assert_array_equal(g["design"][()], design.rows())
        np.testing.assert_allclose(g["stats"][()], direct_outputs(problem, probe, design.rows()))
        np.testing.assert_allclose(g["head"][()].sum(1), 1.0, rtol=1e-6)  # softmax of the head
    with pytest.raises(ValueError, match="activation storage cannot be resumed"):
        run_analysis(model, problem, probe,
                     EngineConfig(n=8, layers=["stats", "head"], checkpoint_every=1),
                     state_path=tmp_path / "s.pt", activation_writer=writer)


class DryCounting(AnalyticNet):
    """AnalyticNet that also counts its one-image (dry) forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.dry = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.dry += x.shape[0] == 1
        return super().forward(x)


def count_design_builds(monkeypatch) -> list[int]:
    """Counts every ``build_design`` call (plan_analysis's and analysis_attrs's)."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return build_design(*args, **kwargs)

    monkeypatch.setattr(config_module, "build_design", counted)
    monkeypatch.setattr(plan_module, "build_design", counted)
    return calls


def test_a_run_with_a_writer_builds_its_design_once_and_forwards_one_dry_image(
    problem, probe, tmp_path, monkeypatch
):
    config = EngineConfig(method="sobol", n=32, layers=["stats", "head"], progress=False,
                          batch_rows=36)
    builds, model = count_design_builds(monkeypatch), DryCounting()
    plan = plan_analysis(model, problem, probe, config)
    assert plan.unit_shapes == {"stats": (2,), "head": (3,)} and plan.image_size == (SIZE, SIZE)
    assert sum(plan.toggles.values()) > 0 and model.dry == 1
    with ActivationWriter(tmp_path / "act.h5", "t", plan.unit_shapes, problem.d,
                          plan.design.row_kinds(), n_rows=plan.design.n_rows) as writer:
        result = run_analysis(model, problem, probe, config, plan=plan, activation_writer=writer)
    assert (len(builds), model.dry) == (1, 1)
    assert result.settings == analysis_attrs(config, plan.design)
    assert result.settings["design"] == "SobolDesign" and result.settings["block_size"] == 9
    assert result.toggles == plan.toggles and result.evaluations == plan.design.n_rows
    # Without a plan the run makes its own: still one design and one dry forward.
    alone = DryCounting()
    again = run_analysis(alone, problem, probe, config)
    assert (len(builds), alone.dry) == (2, 1)
    for key, value in result.layers["stats"].items():
        np.testing.assert_array_equal(again.layers["stats"][key], value)
    with pytest.raises(ValueError, match="plan was made for another problem, probe or config"):
        run_analysis(model, problem, probe, EngineConfig(method="sobol", n=32, seed=1,
                                                          layers=["stats", "head"]), plan=plan)


def test_results_file_attributes_are_the_same_from_settings_and_from_attrs(
    problem, probe, tmp_path
):
    """The settings the engine returns are what callers passed as attrs (docs/RESULTS_FORMAT.md):
    a results file written either way holds the same analysis attributes."""
    result, config = run(problem, probe, method="shapley", n=16, shapley_method="permutation",
                         n_inner=2)
    settings = analysis_attrs(config, build_design(problem, config))
    assert result.settings == settings
    from_settings, from_attrs = ResultsStore(tmp_path / "a.h5"), ResultsStore(tmp_path / "b.h5")
    from_settings.write_analysis("x", result)
    from_attrs.write_analysis("x", result, attrs=settings)
    first, second = from_settings.analysis_attrs("x"), from_attrs.analysis_attrs("x")
    del first["created"], second["created"]  # the time of writing
    assert first == second and first["n_outer"] == 1 and first["design"] == "PermutationDesign"


def test_eval_mode_during_the_run_and_train_mode_restored(problem, probe):
    model = AnalyticNet()
    model.train()
    run(problem, probe, model=model, method="variance", n=8, batch_rows=4)
    assert model.modes and not any(model.modes)
    assert model.training and model.head.training


def assert_within_roundoff(result, reference, unit_roundoff: float, fan_in: int) -> None:
    """``result``'s indices and moments equal ``reference``'s up to the round-off of a forward.

    Another precision, summation order or kernel moves an output y by about
    u sqrt(K) rms(y): K products summed, each rounded with unit round-off u, the errors adding
    up as a random walk. That moves the mean by as much, the variance by twice as much times
    the spread sigma, and an index (a ratio of (co)variances) by as much in units of sigma:
    rms / sigma amplifies it on units that hardly vary. The factor 4 covers the estimators'
    sums of products of outputs (TinyConvNet, 4 seeds, N = 16 to 64: at most 1.2 of the bound
    without it, for bf16, float16 and channels-last alike).
    """
    for layer, ref in reference.layers.items():
        got = result.layers[layer]
        sigma = ref["std"]
        error = 4 * math.sqrt(fan_in) * unit_roundoff * np.hypot(ref["mean"], sigma)
        varies = sigma > 0  # a constant unit's indices are 0 by definition
        bounds = {"mean": error, "var": 2 * error * sigma + error**2}
        for key in ("S1", "ST"):
            bounds[key] = np.where(varies, error / np.where(varies, sigma, 1.0), np.inf)
        for key, bound in bounds.items():
            assert np.isfinite(got[key]).all(), f"{layer}/{key}"
            excess = np.abs(got[key] - ref[key]) / bound
            assert excess.max() <= 1.0, f"{layer}/{key}: {excess.max():.3g} x the round-off bound"


def run_conv(problem, probe, **settings) -> tuple:
    """An analysis of a fresh TinyConvNet: channel means of conv1, every element of conv2 (its
    maps: conv2 sees the memory format), the softmax head."""
    model = TinyConvNet()
    config = EngineConfig(
        method="sobol",
        n=32,
        batch_rows=72,
        layers=["conv1", "conv2", "head"],
        reduction={"conv1": "channel_mean"},
        progress=False,
        **settings,
    )
    return run_analysis(model, problem, probe, config), model


def test_deduplicate_forwards_fewer_rows_with_identical_results(problem, probe):
    # Batches of at most 36 rows x 768 values stay under PyTorch's parallel grain size (32768
    # elements), so every kernel runs serially and a row's outputs cannot depend on which rows
    # share its batch: the results must be bit-identical, not merely close.
    for method in ("sobol", "shapley"):
        settings = {"method": method, "n": 32, "batch_rows": 36, "layers": ["stats", "head"]}
        full, config = run(problem, probe, **settings)
        model, timings = AnalyticNet(), {}
        deduplicated = run_analysis(
            model,
            problem,
            probe,
            EngineConfig(**settings, progress=False, deduplicate=True),
            timings=timings,
        )
        design = build_design(problem, config)
        assert timings["rows"] == design.n_rows
        assert timings["forwarded"] == model.rows < design.n_rows
        for layer, values in full.layers.items():
            for key, value in values.items():
                np.testing.assert_array_equal(
                    deduplicated.layers[layer][key], value, err_msg=f"{method} {layer}/{key}"
                )
        if method == "sobol":
            # AB_j with augmentation j off in both A and B is A again (the switch and the unused
            # parameters are all that differ): a lower bound on what must not be forwarded.
            a = len(problem.augmentations)
            active = problem.decode(design.rows(), SIZE, SIZE).active.numpy()
            active = active.reshape(design.n_blocks, design.block_size, a)
            off_in_both = ~active[:, 0, :] & ~active[:, 1 : 1 + a, :].diagonal(axis1=1, axis2=2)
            assert problem.group_names[:a] == list(problem.augmentations)
            assert design.row_kinds()[1 : 1 + a] == [f"AB_{j}" for j in range(a)]
            assert 0 < off_in_both.sum() <= design.n_rows - timings["forwarded"]


def test_channels_last_changes_the_indices_by_float32_roundoff_only(problem, probe):
    reference, contiguous = run_conv(problem, probe)
    result, model = run_conv(problem, probe, channels_last=True)
    assert contiguous.formats and not any(x or w for x, w in contiguous.formats)
    assert model.formats and all(x and w for x, w in model.formats)  # the forward ran channels-last
    assert_within_roundoff(result, reference, 2.0**-24, TinyConvNet.FAN_IN)
    for name, parameter in model.named_parameters():  # converted back for training
        assert parameter.is_contiguous(), name
        if parameter.ndim == 4:
            assert not parameter.is_contiguous(memory_format=torch.channels_last), name


def test_bf16_and_float16_autocast_stay_within_their_roundoff_of_float32(problem, probe):
    reference, _ = run_conv(problem, probe)
    mean_error = {}
    # Unit round-off: bfloat16 keeps 8 significant bits (about 2-3 decimal digits), float16 11.
    for precision, unit_roundoff in (("bf16", 2.0**-8), ("16", 2.0**-11)):
        result, _ = run_conv(problem, probe, precision=precision)
        assert_within_roundoff(result, reference, unit_roundoff, TinyConvNet.FAN_IN)
        mean_error[precision] = np.mean(
            np.abs(result.layers["conv2"]["ST"] - reference.layers["conv2"]["ST"])
        )
    # Both really ran in reduced precision, and float16's 3 more bits show.
    assert 0 < mean_error["16"] < mean_error["bf16"]


@pytest.mark.slow
def test_compile_gives_the_eager_indices_within_float32_roundoff(problem, probe):
    reference, eager = run_conv(problem, probe)
    result, model = run_conv(problem, probe, compile=True)
    assert not eager.traced and model.traced  # dynamo traced the model's forward
    assert_within_roundoff(result, reference, 2.0**-24, TinyConvNet.FAN_IN)


def test_bad_inputs_are_clear_value_errors(problem, probe):
    with pytest.raises(ValueError, match=r"unknown layer name\(s\) \['conv9'\].*stats, head"):
        run(problem, probe, layers=["conv9"], n=4)
    with pytest.raises(ValueError, match=r"n must be a power of two.*use 8 or 16"):
        EngineConfig(method="sobol", n=12)
    with pytest.raises(ValueError, match="probe holds 3 images but the problem expects 4"):
        run(problem, probe[:3], n=4)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        run(problem, probe * 255, n=4)
    with pytest.raises(ValueError, match=r"torch\.distributed is not initialised"):
        run_analysis(AnalyticNet(), problem, probe, EngineConfig(n=4, layers=["stats"]),
                     rank=0, world_size=2)
    with pytest.raises(ValueError, match="unknown method"):
        EngineConfig(method="sobel")
    with pytest.raises(ValueError, match=r"precision must be one of \['32', 'bf16', '16'\]"):
        EngineConfig(precision="fp16")
    with pytest.raises(ValueError, match="channels_last must be True or False"):
        EngineConfig(channels_last="yes")
    with pytest.raises(ValueError, match=r"threads must be a positive integer or None"):
        EngineConfig(threads=0)
    with pytest.raises(ValueError, match="accumulation_threads must be a positive integer"):
        EngineConfig(accumulation_threads=True)


def test_threads_leave_the_results_and_torchs_setting_as_they_were(problem, probe):
    """threads sets the forward's intra-op threads and accumulation_threads the accumulation's
    workers; neither changes a value (the analytic net's kernels do not depend on them), and
    torch's thread count is restored."""
    before = torch.get_num_threads()
    one, _ = run(problem, probe, method="sobol", n=16, threads=1)
    assert torch.get_num_threads() == before
    two, _ = run(problem, probe, method="sobol", n=16, threads=2, accumulation_threads=2)
    assert torch.get_num_threads() == before
    for key, value in one.layers["stats"].items():
        np.testing.assert_array_equal(two.layers["stats"][key], value, err_msg=key)


def test_shards_cover_every_block_once():
    for n_blocks, world in [(64, 2), (10, 3), (2, 4)]:
        covered = [b for r in range(world) for b in range(*shard_range(n_blocks, r, world))]
        assert covered == list(range(n_blocks))


def test_shard_path_names_each_ranks_file_and_resolve_world_defaults_to_one_process():
    path = Path("runs/x/activations_sobol.h5")
    assert shard_path(path, 0, 1) == path
    assert shard_path(path, 1, 4) == Path("runs/x/activations_sobol.rank1-of-4.h5")
    assert shard_path(Path("sobol.resume.pt"), 0, 2) == Path("sobol.resume.rank0-of-2.pt")
    assert resolve_world(None, None) == (0, 1) == resolve_world(0, None)
    for rank, world_size in ((1, 1), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="need 0 <= rank < world_size"):
            resolve_world(rank, world_size)
    with pytest.raises(ValueError, match=r"world_size=2 but torch\.distributed is not initialised"):
        resolve_world(1, 2)


def test_toggle_counts_are_the_base_points_where_ab_j_differs_from_a(problem, probe):
    """The counts recorded with the result, recomputed from the decoded rows: group j changes in
    base point n iff row AB_j decodes to other parameters than row A in group j."""
    with pytest.warns(SmallSampleWarning, match=r"n = 8 is too small.*use n >= 32"):
        result, config = run(problem, probe, method="sobol", n=8, seed=5)
    design = build_design(problem, config)
    g = len(problem.groups)
    decoded = problem.decode(design.rows(), SIZE, SIZE)
    blocks = np.arange(8) * (g + 2)
    for j, group in enumerate(problem.groups):
        a, ab = decoded.select(torch.from_numpy(blocks)), decoded.select(
            torch.from_numpy(blocks + 1 + j)
        )
        if group.kind == "augmentation":
            k = problem.augmentations.index(group.name)
            changed = a.active[:, k] != ab.active[:, k]
            for name, value in a.params[group.name].items():
                moved = value != ab.params[group.name][name]
                changed |= a.active[:, k] & ab.active[:, k] & moved
        elif group.kind == "order":
            changed = (a.order != ab.order).any(1)
        elif group.kind == "class":
            changed = a.class_index != ab.class_index
        else:
            changed = a.image_index != ab.image_index
        assert result.toggles[group.name] == int(changed.sum()), group.name
    # A balanced switch changes in exactly half of the base points at p_on = 0.5.
    assert result.toggles["grayscale"] == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error", SmallSampleWarning)
        big, _ = run(problem, probe, method="sobol", n=32, seed=5)
    assert min(big.toggles.values()) >= MIN_TOGGLES


def test_goda_toggles_and_advice_count_trajectories(problem, probe):
    with pytest.warns(SmallSampleWarning, match="trajectories"):
        result, config = run(problem, probe, method="shapley", n=8, seed=1)
    design = build_design(problem, config)
    x1, x2 = design.pair_rows(0, 8)
    expected = problem.changed_groups(x1, x2).sum(0)
    assert [result.toggles[g] for g in problem.group_names] == expected.tolist()
    # A balanced switch differs between x1 and x2 in exactly half of the trajectories.
    assert result.toggles["grayscale"] == 4


class PlantedUnits(nn.Module):
    """(B, 3, H, W) -> (B, 4): a real unit (mean intensity), 1e-9 noise about 0, a "ReLU"
    active in only 2 rows of the whole design, and 0.5 plus 1e-9 noise (a constant once the
    hooks store float32).

    The two rows of the sparse unit are the first rows of the first forwarded batch."""

    def __init__(self) -> None:
        super().__init__()
        self.stats = nn.Identity()
        self.fired = 0
        self.noise = torch.Generator().manual_seed(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        mean = x.mean((1, 2, 3))
        noise = 1e-9 * torch.randn(2, b, generator=self.noise, dtype=x.dtype)
        sparse = torch.zeros(b, dtype=x.dtype)
        if b > 1 and self.fired < 2:
            take = min(2, b) - self.fired
            sparse[:take] = 5.0 + mean[:take]
            self.fired += take
        return self.stats(torch.stack([mean, noise[0], sparse, 0.5 + noise[1]], 1))


@pytest.mark.parametrize("method", ["sobol", "shapley"])
def test_planted_degenerate_units_are_flagged_and_kept_out_of_summaries(
    problem, probe, method, tmp_path
):
    result, _ = run(problem, probe, model=PlantedUnits(), method=method, n=64, seed=2)
    flags = result.flags["stats"]
    assert flags.tolist() == [FLAG_VALID, FLAG_NEGLIGIBLE, FLAG_UNSUPPORTED, FLAG_CONSTANT]
    key = result.value_keys[0]
    raw = result.layers["stats"][key]
    assert np.isfinite(raw).all() and np.abs(raw[:, 2]).max() > 0  # raw values are kept
    stats = result.layer_statistics(key)
    for name in ("median", "mean", "p10", "p90"):
        np.testing.assert_allclose(stats[name][0], raw[:, 0])  # only the valid unit counts
    assert result.valid_fraction().tolist() == [0.25]
    path = tmp_path / "results.h5"
    ResultsStore(path).write_analysis("a", result)
    with h5py.File(path, "r") as f:
        assert f["analyses/a/stats/flag"][()].tolist() == flags.tolist()
        assert f["analyses/a/stats"].attrs["n_valid"] == 1
    back = ResultsStore(path).read_analysis("a")
    assert back.flags["stats"].tolist() == flags.tolist()
