"""How the engine augments: each distinct image once, and the next batch in a background
thread (EngineConfig.augment_ahead): the same results, the augmentation really off the caller's
thread, errors raised in the caller, the automatic rule, and a resume that switches it."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from test_engine import AUGS, SIZE, AnalyticNet

from sensitivity import forward as forward_module
from sensitivity.config import EngineConfig
from sensitivity.engine import run_analysis
from sensitivity.forward import augments_ahead
from sensitivity.problem import AugmentationProblem


class RecordingProblem(AugmentationProblem):
    """Records the thread of every ``augment`` call; raises on call ``fail_at`` (1-based)."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__(AUGS, n_classes=2, images_per_class=2)
        self.threads: list[str] = []
        self.rows = 0
        self.fail_at = fail_at

    def augment(self, images, decoded):
        self.threads.append(threading.current_thread().name)
        self.rows += len(images)
        if self.fail_at is not None and len(self.threads) == self.fail_at:
            raise RuntimeError("augmentation failed on purpose")
        return super().augment(images, decoded)


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(4, 3, SIZE, SIZE, generator=g)


def analyse(probe, problem=None, model=None, timings=None, state_path=None, **settings):
    config = EngineConfig(layers=["stats", "head"], progress=False, **settings)
    return run_analysis(model or AnalyticNet(), problem or RecordingProblem(), probe, config,
                        timings=timings, state_path=state_path)


@pytest.mark.parametrize("settings", [
    {"method": "sobol", "n": 32, "batch_rows": 36},
    {"method": "sobol", "n": 32, "batch_rows": 36, "deduplicate": True},
    {"method": "sobol", "n": 32, "batch_rows": 36, "num_workers": 1},  # loaded in a process
    # blocks of 12 permutations x 5 rows forwarded in chunks of 16 rows
    {"method": "shapley", "shapley_method": "permutation", "n": 4, "n_outer": 1,
     "n_inner": 2, "batch_rows": 16},
])
def test_augmenting_ahead_gives_the_same_results_from_a_background_thread(probe, settings):
    before = torch.get_num_threads()
    results, timings, problems, models = {}, {}, {}, {}
    for ahead in (False, True):
        timings[ahead], problems[ahead], models[ahead] = {}, RecordingProblem(), AnalyticNet()
        results[ahead] = analyse(probe, problems[ahead], models[ahead], timings[ahead],
                                 augment_ahead=ahead, **settings)
        assert torch.get_num_threads() == before
    for layer, values in results[False].layers.items():
        for key, value in values.items():
            np.testing.assert_array_equal(results[True].layers[layer][key], value,
                                          err_msg=f"{layer}/{key}")
    assert models[True].rows == models[False].rows == timings[True]["forwarded"]
    assert timings[True]["rows"] == timings[False]["rows"]
    assert len(problems[True].threads) == len(problems[False].threads) > 2
    assert set(problems[False].threads) == {threading.main_thread().name}
    assert all(name.startswith("augment-ahead") for name in problems[True].threads)
    assert timings[True]["augment_ahead"] > 0 and "augment_ahead" not in timings[False]


def test_an_error_while_augmenting_ahead_is_raised_by_the_analysis(probe):
    threads_before = threading.active_count()
    with pytest.raises(RuntimeError, match="augmentation failed on purpose"):
        analyse(probe, RecordingProblem(fail_at=3), method="sobol", n=32, batch_rows=36,
                augment_ahead=True)
    # The background thread is gone with the analysis, not left for the garbage collector.
    assert threading.active_count() == threads_before


def test_a_run_killed_while_augmenting_ahead_resumes_without_it_to_the_same_sums(
    probe, tmp_path
):
    settings = {"method": "sobol", "n": 32, "batch_rows": 36, "checkpoint_every": 1}
    reference = analyse(probe, **settings)
    state = tmp_path / "sobol.resume.pt"
    with pytest.raises(RuntimeError, match="simulated crash"):
        analyse(probe, model=AnalyticNet(fail_after=5), state_path=state, augment_ahead=True,
                **settings)
    assert state.exists()
    resumed = analyse(probe, state_path=state, augment_ahead=False, **settings)
    for layer, values in reference.layers.items():
        for key, value in values.items():
            np.testing.assert_array_equal(resumed.layers[layer][key], value,
                                          err_msg=f"{layer}/{key}")


def test_augmenting_ahead_is_automatic_where_the_forward_leaves_a_core_free(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(forward_module.os, "sched_getaffinity", lambda _: {0, 1})
    assert augments_ahead(EngineConfig(threads=1), cpu)
    assert not augments_ahead(EngineConfig(threads=2), cpu)
    assert not augments_ahead(EngineConfig(), cpu)  # torch's threads: maybe every core
    assert not augments_ahead(EngineConfig(threads=1), cuda)
    assert augments_ahead(EngineConfig(threads=2, augment_ahead=True), cpu)
    assert not augments_ahead(EngineConfig(threads=1, augment_ahead=False), cpu)
    monkeypatch.setattr(forward_module.os, "sched_getaffinity", lambda _: {0})
    assert not augments_ahead(EngineConfig(threads=1), cpu)
    with pytest.raises(ValueError, match=r"augment_ahead must be True, False or None"):
        EngineConfig(augment_ahead="yes")


def test_each_distinct_image_is_augmented_once_and_copied_for_the_rows_that_repeat_it(probe):
    """Without deduplication every row is forwarded, but a row whose augmented image equals an
    earlier row's (e.g. AB_j with augmentation j off in A and B) is not augmented again: the
    rows augmented are the rows a deduplicated run forwards, and the results are the same."""
    settings = {"method": "sobol", "n": 32, "batch_rows": 36}
    problem, model, timings = RecordingProblem(), AnalyticNet(), {}
    full = analyse(probe, problem, model, timings, **settings)
    dedup_problem, dedup_timings = RecordingProblem(), {}
    deduplicated = analyse(probe, dedup_problem, timings=dedup_timings, deduplicate=True,
                           **settings)
    assert model.rows == timings["rows"] == timings["forwarded"]
    assert problem.rows == dedup_problem.rows == dedup_timings["forwarded"] < model.rows
    for layer, values in full.layers.items():
        for key, value in values.items():
            np.testing.assert_array_equal(deduplicated.layers[layer][key], value,
                                          err_msg=f"{layer}/{key}")
