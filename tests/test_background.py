"""The background thread (EngineConfig.background): the same results with it on and off, the
augmentation, the accumulation and the sums' allocation really off the caller's thread, errors
raised in the caller, the automatic rule, a resume that switches it; and each distinct image
augmented once."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from test_engine import AUGS, SIZE, AnalyticNet

from sensitivity import background as background_module
from sensitivity.accumulators import LayerAccumulators
from sensitivity.background import Background, uses_background
from sensitivity.config import EngineConfig
from sensitivity.engine import run_analysis
from sensitivity.plan import plan_analysis
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


@pytest.fixture
def accumulator_threads(monkeypatch):
    """Records the thread of every layer's accumulators made by ``LayerAccumulators``, and the
    thread and layers of every update; an update raises on call ``fail_at[0]`` (1-based) when
    set."""
    seen: dict[str, list] = {"allocate": [], "update": []}
    fail_at: list[int | None] = [None]
    make, update = LayerAccumulators._layer, LayerAccumulators.update

    def recorded_make(self, layer):
        if layer not in self.moments:
            seen["allocate"].append(threading.current_thread().name)
        return make(self, layer)

    def recorded_update(self, outputs, *args):
        seen["update"].append((threading.current_thread().name, tuple(outputs)))
        if len(seen["update"]) == fail_at[0]:
            raise RuntimeError("accumulation failed on purpose")
        return update(self, outputs, *args)

    monkeypatch.setattr(LayerAccumulators, "_layer", recorded_make)
    monkeypatch.setattr(LayerAccumulators, "update", recorded_update)
    return seen, fail_at


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(4, 3, SIZE, SIZE, generator=g)


def analyse(probe, problem=None, model=None, timings=None, state_path=None, **settings):
    config = EngineConfig(layers=["stats", "head"], progress=False, **settings)
    return run_analysis(model or AnalyticNet(), problem or RecordingProblem(), probe, config,
                        timings=timings, state_path=state_path)


def assert_identical(result, reference) -> None:
    """Every array of every layer of ``reference`` bit-identical in ``result``."""
    for layer, values in reference.layers.items():
        for key, value in values.items():
            np.testing.assert_array_equal(result.layers[layer][key], value,
                                          err_msg=f"{layer}/{key}")


@pytest.mark.parametrize("settings", [
    {"method": "sobol", "n": 32, "batch_rows": 36},
    {"method": "sobol", "n": 32, "batch_rows": 36, "deduplicate": True},
    {"method": "sobol", "n": 32, "batch_rows": 36, "num_workers": 1},  # loaded in a process
    # blocks of 12 permutations x 5 rows forwarded in chunks of 16 rows
    {"method": "shapley", "shapley_method": "permutation", "n": 4, "n_outer": 1,
     "n_inner": 2, "batch_rows": 16},
])
def test_the_background_thread_gives_the_same_results(probe, settings, accumulator_threads):
    before = torch.get_num_threads()
    seen, _ = accumulator_threads
    results, timings, problems, models, updates = {}, {}, {}, {}, {}
    for on in (False, True):
        timings[on], problems[on], models[on] = {}, RecordingProblem(), AnalyticNet()
        results[on] = analyse(probe, problems[on], models[on], timings[on],
                              background=on, **settings)
        assert torch.get_num_threads() == before
        updates[on] = list(seen["update"])
        seen["update"].clear()
    assert_identical(results[True], results[False])
    assert models[True].rows == models[False].rows == timings[True]["forwarded"]
    assert timings[True]["rows"] == timings[False]["rows"]
    assert len(problems[True].threads) == len(problems[False].threads) > 2
    main = threading.main_thread().name
    assert set(problems[False].threads) == {t for t, _ in updates[False]} == {main}
    # Made where they are first summed: beside the forward with the background thread.
    assert len(seen["allocate"]) == 4 and set(seen["allocate"][:2]) == {main}
    assert all(name.startswith("analysis-background") for name in seen["allocate"][2:])
    layers = [layer for _, summed in updates[False] for layer in summed]
    assert sorted(layer for _, summed in updates[True] for layer in summed) == sorted(layers)
    assert len(layers) > 4 and all(len(summed) == 2 for _, summed in updates[False])
    # One layer at a time as the forward makes it, except for batches forwarded in several
    # chunks (some of the permutation blocks larger than a batch).
    if settings["method"] == "sobol":
        assert all(len(summed) == 1 for _, summed in updates[True])
    for name in problems[True].threads + [t for t, _ in updates[True]]:
        assert name.startswith("analysis-background")
    for phase in ("augment_background", "accumulate_background"):
        assert timings[True][phase] > 0 and phase not in timings[False]


@pytest.mark.parametrize("fail_at", [1, 3])  # 1: before anything is summed
def test_an_error_in_the_background_augmentation_is_raised_by_the_analysis(probe, fail_at):
    threads_before = threading.active_count()
    with pytest.raises(RuntimeError, match="augmentation failed on purpose"):
        analyse(probe, RecordingProblem(fail_at=fail_at), method="sobol", n=32, batch_rows=36,
                background=True)
    # The background thread is gone with the analysis, not left for the garbage collector.
    assert threading.active_count() == threads_before


def test_an_error_in_the_background_accumulation_stops_the_analysis_resumably(
    probe, accumulator_threads, tmp_path
):
    """The failed batch is never checkpointed: the state left behind resumes to the sums of an
    uninterrupted run (a layer summed after the failure, as the next layers of the batch may
    be, is dropped with the analysis)."""
    seen, fail_at = accumulator_threads
    settings = {"method": "sobol", "n": 32, "batch_rows": 36, "checkpoint_every": 1}
    reference = analyse(probe, background=False, **settings)
    fail_at[0] = len(seen["update"]) + 5  # the first layer of the third batch
    state = tmp_path / "sobol.resume.pt"
    threads_before = threading.active_count()
    with pytest.raises(RuntimeError, match="accumulation failed on purpose"):
        analyse(probe, state_path=state, background=True, **settings)
    assert threading.active_count() == threads_before
    assert state.exists()
    fail_at[0] = None
    resumed = analyse(probe, state_path=state, background=True, **settings)
    assert_identical(resumed, reference)


def test_an_error_making_the_sums_in_the_background_is_raised_by_the_analysis(
    probe, monkeypatch
):
    def fail(self, layer):
        raise MemoryError("no room for the sums")

    monkeypatch.setattr(LayerAccumulators, "_layer", fail)
    threads_before = threading.active_count()
    with pytest.raises(MemoryError, match="no room for the sums"):
        analyse(probe, method="sobol", n=32, batch_rows=36, background=True)
    assert threading.active_count() == threads_before


class TwiceNet(AnalyticNet):
    """AnalyticNet whose "stats" module runs twice per forward (the last call is captured)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.stats(x)
        return super().forward(x)


def test_a_layer_run_twice_per_forward_is_summed_with_its_batch(probe, accumulator_threads):
    seen, _ = accumulator_threads
    settings = {"method": "sobol", "n": 32, "batch_rows": 36}
    config = EngineConfig(layers=["stats", "head"], progress=False, **settings)
    assert plan_analysis(TwiceNet(), RecordingProblem(), probe, config).repeated == ("stats",)
    inline = analyse(probe, model=TwiceNet(), background=False, **settings)
    seen["update"].clear()
    threaded = analyse(probe, model=TwiceNet(), background=True, **settings)
    # Whole batches, both layers at once: no output is handed on before the forward ends.
    assert seen["update"] and all(summed == ("stats", "head") for _, summed in seen["update"])
    assert_identical(threaded, inline)


def test_background_jobs_run_in_order_in_the_submitters_inference_mode():
    order: list[tuple[int, bool, str]] = []

    def job(i: int) -> int:
        order.append((i, torch.is_inference_mode_enabled(), threading.current_thread().name))
        return i

    with Background(True, torch.device("cpu")) as background, torch.inference_mode():
        futures = [background.submit(job, i) for i in range(5)]
        assert [f.result() for f in futures] == list(range(5))
    assert [i for i, _, _ in order] == list(range(5))
    assert all(inference and name.startswith("analysis-background")
               for _, inference, name in order)
    inline = Background(False, torch.device("cpu"))
    assert inline.submit(job, 7).result() == 7
    assert order[-1] == (7, False, threading.main_thread().name)
    with pytest.raises(ZeroDivisionError):  # inline: raised at once, in the caller
        inline.submit(lambda: 1 / 0)


def test_a_run_killed_with_the_background_thread_resumes_without_it_to_the_same_sums(
    probe, tmp_path
):
    settings = {"method": "sobol", "n": 32, "batch_rows": 36, "checkpoint_every": 1}
    reference = analyse(probe, **settings)
    state = tmp_path / "sobol.resume.pt"
    with pytest.raises(RuntimeError, match="simulated crash"):
        analyse(probe, model=AnalyticNet(fail_after=5), state_path=state, background=True,
                **settings)
    assert state.exists()
    resumed = analyse(probe, state_path=state, background=False, **settings)
    assert_identical(resumed, reference)


def test_the_background_thread_is_automatic_on_a_cpu_process_with_more_than_one_core(
        monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(background_module.os, "sched_getaffinity", lambda _: {0, 1})
    for threads in (None, 1, 2, 4):
        assert uses_background(EngineConfig(threads=threads), cpu), threads
        assert not uses_background(EngineConfig(threads=threads), cuda), threads
        assert not uses_background(EngineConfig(threads=threads, background=False), cpu)
    assert uses_background(EngineConfig(threads=2, background=True), cuda)
    monkeypatch.setattr(background_module.os, "sched_getaffinity", lambda _: {0})
    assert not uses_background(EngineConfig(threads=1), cpu)
    assert uses_background(EngineConfig(threads=1, background=True), cpu)
    with pytest.raises(ValueError, match=r"background must be True, False or None"):
        EngineConfig(background="yes")


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
    assert_identical(deduplicated, full)
