"""The analysis engine: one loop from design rows to per-unit sensitivity arrays (METHOD.md 3-7).

Every analysis (Sobol, Shapley, variance, contrast), from the CLI or from a training callback,
runs ``run_analysis``:

    plan (sensitivity.plan: checks, design, unit shapes, toggles) -> design blocks of this
    rank's shard -> rows -> decoded parameters + probe images (each unique image loaded once per
    batch; in DataLoader workers when num_workers > 0; sensitivity.batches) -> augmentation of
    each distinct image on the model's device -> forward under inference mode with hooks
    (sensitivity.forward) -> accumulators (sensitivity.accumulators) -> result.

Background thread (``EngineConfig.background``, sensitivity.background; automatic: on a CPU
with more than one core): one thread loads and augments the next batch and sums each layer of a
batch as the forward makes its output (``_forward_all``), which also makes each layer's sums
(zeros, GBs for large layers) the first time; ``compute()`` takes one more chunk worker. Results
are identical with it on or off; the peak memory can hold two batches' outputs instead of one.
When the forward or the loading of a batch fails, the previous batch's job (its sums and
checkpoint) is finished before the error is raised.

Sharding (sensitivity.distributed): blocks [n_blocks * r // W, n_blocks * (r + 1) // W) belong to
rank r of W (contiguous, deterministic). Batches are whole blocks. The accumulators are
torchmetrics Metrics with summed states, so ``compute()`` under an initialised process group
makes every rank hold the global sums: every rank must call ``run_analysis`` and every rank gets
the global result.

Resume (sensitivity.resume): with ``state_path`` and ``checkpoint_every = k > 0`` the
accumulator states, the next block and a fingerprint of everything that determines the result
are saved atomically after every batch that completes k or more blocks since the last save. A
run started with an existing state file and the same inputs continues after the saved block and
ends with exactly the sums of an uninterrupted run (batches fall on the same block boundaries).
A state file whose fingerprint differs is a ValueError naming the differing fields. The state
file is removed when the analysis completes. With several processes each rank keeps its own
file, ``<stem>.rank<r>-of-<W><suffix>`` (``distributed.shard_path``).

Adaptive N (``EngineConfig.target_halfwidth``, sensitivity.adaptive): the design of ``max_n``
blocks runs in stages [0, n), [n, 2n), ...; each stage is sharded like a whole run, then every
rank computes the (synced) accumulators and takes the same decision: stop, or run the next
stage. A stage boundary is saved to the resume file (with the stage), and a resumed rank whose
state lies in an earlier stage than another rank's catches up without deciding (the decisions
it would take were taken already: to grow).

Seconds: ``AnalysisResult.seconds`` is the wall time of the analysis as rank zero measures it,
from the call of ``run_analysis`` to its result, summed over an interrupted run (up to its last
saved checkpoint: the work after it is lost and redone) and the runs that resume it. Every rank
returns rank zero's number, so it means the same for one process and for DDP.

Progress (``EngineConfig.progress``, rank zero, stderr; ``sensitivity.progress``): first the work
("320 rows (32 blocks of 10 rows, 25 blocks per batch)") and, resumed, "resuming at row N of M"
(rows of this rank's shard), then a bar with rows/s and ETA on a terminal, plain lines otherwise;
an adaptive run has one per stage, each followed by its decision ("half-width 0.031 > target
0.02 at N=256, growing to 512").

This module imports torch, numpy and the rest of ``sensitivity``; never Lightning or wandb.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from sensitivity import adaptive
from sensitivity.accumulators import LayerAccumulators, analysis_result
from sensitivity.activations import ActivationWriter
from sensitivity.background import Background, uses_background
from sensitivity.batches import Batch, BatchSource, batch_loader, batch_ranges
from sensitivity.capture import ActivationCapture, model_device
from sensitivity.config import EngineConfig
from sensitivity.designs import Design
from sensitivity.distributed import (
    check_same_on_every_rank,
    max_on_every_rank,
    rank_zero_seconds,
    resolve_world,
    shard_path,
    shard_range,
)
from sensitivity.estimators.partial_sums import intra_op_threads
from sensitivity.forward import BatchForward, Stopwatch, channels_last_weights
from sensitivity.plan import (
    AnalysisPlan,
    SmallSampleWarning,
    hooked_module,
    plan_analysis,
    small_n_advice,
)
from sensitivity.problem import AugmentationProblem
from sensitivity.progress import Progress
from sensitivity.results import AnalysisResult
from sensitivity.resume import ResumeFile, resume_fields

log = logging.getLogger(__name__)


def run_analysis(
    model: nn.Module,
    problem: AugmentationProblem,
    probe: Tensor | Dataset,
    config: EngineConfig,
    *,
    plan: AnalysisPlan | None = None,
    layer_root: nn.Module | None = None,
    device: torch.device | str | None = None,
    state_path: str | os.PathLike[str] | None = None,
    activation_writer: ActivationWriter | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    timings: dict[str, float] | None = None,
) -> AnalysisResult:
    """Run one analysis of ``model``'s activations over ``problem``; see the module docstring.

    Args:
        model: ``model(x)`` maps images (B, 3, H, W) in [0, 1] to logits and normalises itself
            (an ImageClassifier). It is moved to ``device`` (default: where its parameters
            are), run in eval mode, and its train/eval flags are restored afterwards.
        problem: the augmentation problem.
        probe: the probe images, class-major: a tensor (n_images, 3, H, W) float in [0, 1] or
            a Dataset whose items are such images or (image, label) tuples (loaded lazily, in
            workers with num_workers > 0). n_images = problem.n_classes * images_per_class,
            twice that with a ``partition`` auxiliary (split 0 first).
        config: the settings.
        plan: ``plan_analysis(model, problem, probe, config, layer_root)`` made by the caller
            (e.g. to build the activation writer from it); None plans here. Either way the
            design is built and the dry forward made once per run.
        layer_root: the module whose ``named_modules()`` names the layers; default ``model.net``
            if it exists, else ``model``.
        device: where to run; default where the model's parameters are.
        state_path: resume file (module docstring); ``checkpoint_every > 0`` to write it.
        activation_writer: receives every row of this rank's shard (global row indices, design
            rows, captured outputs); the caller finalizes it. Not resumable: refused together
            with checkpointing.
        rank, world_size: default to torch.distributed's when initialised, else 0 and 1.
        timings: a dict to receive where the time went, in seconds: "setup" (checks, dry
            forward), "data" (decoding rows and loading images, or waiting for the workers that
            do, and the copy to the device), "augment", "forward" (with the hooks),
            "accumulate" (the first batch's includes making the sums), "store", "checkpoint",
            "compute", "results"; and the counts "rows" and "forwarded" (rows actually
            forwarded: fewer with ``deduplicate``). With the background thread "augment" and
            "accumulate" are the caller's waits for it, and "data_background",
            "augment_background", "accumulate_background" (and "store_background",
            "checkpoint_background") the thread's own seconds, overlapped with the caller's.
            On CUDA the device is synchronised at every phase boundary so that each phase is
            charged its own kernels, which removes some overlap: time the overall rate without
            ``timings``.

    Returns:
        The global AnalysisResult on every rank: "S1"... (sobol), "shapley"... (shapley),
        "mean_diff"... (contrast) and per-unit "mean", "var" (population), "std", "cv", conf
        half-widths for every method; ``settings`` holds ``config.analysis_attrs``.

    Raises:
        ValueError: invalid inputs (``plan_analysis``), a plan or writer not for them, a writer
            with checkpointing, another's resume state, ranks with other problems (``_start``).
    """
    started = time.perf_counter()
    rank, world_size = resolve_world(rank, world_size)
    device = torch.device(model_device(model)[0] if device is None else device)
    model.to(device)
    plan = _checked_plan(plan, model, problem, probe, config, layer_root)
    _check_writer(activation_writer, plan, state_path)
    if plan.advice and rank == 0 and not config.adaptive:  # adaptive: checked at the N reached
        warnings.warn(plan.advice, SmallSampleWarning, stacklevel=2)
    run = _start(plan, model, device, (rank, world_size), state_path, activation_writer, timings,
                 started)
    # The plan's layouts (detected or given) as overrides: nothing is detected mid-run.
    capture = ActivationCapture(
        hooked_module(model, layer_root), list(plan.unit_shapes), config.reduction,
        layouts={name: unit.layout for name, unit in plan.layouts.items()},
    )
    computed = _accumulate(run, model, capture, device)
    seconds = rank_zero_seconds(run.seconds_before + time.perf_counter() - started, world_size,
                                device)
    result = analysis_result(plan, computed, seconds, run.decision)
    _warn_adaptive(config, result, run.decision, rank)
    if run.resume is not None:
        run.resume.remove()
    run.watch.mark("results")
    return result


# --------------------------------------------------------------------------------- the steps
def _checked_plan(
    plan: AnalysisPlan | None,
    model: nn.Module,
    problem: AugmentationProblem,
    probe: Tensor | Dataset,
    config: EngineConfig,
    layer_root: nn.Module | None,
) -> AnalysisPlan:
    """The caller's plan, checked against the other arguments, else a new one."""
    if plan is None:
        return plan_analysis(model, problem, probe, config, layer_root)
    if plan.problem is not problem or plan.config != config or plan.probe.source is not probe:
        raise ValueError(
            "the plan was made for another problem, probe or config; pass the ones given to "
            "plan_analysis, or no plan"
        )
    config.validate()  # the caller may have changed a setting since planning
    return plan


def _check_writer(
    writer: ActivationWriter | None,
    plan: AnalysisPlan,
    state_path: str | os.PathLike[str] | None,
) -> None:
    """ValueError unless ``writer`` (if any) expects the plan's layers, unit shapes and d, in a
    run without checkpoints."""
    if writer is None:
        return
    if state_path is not None and plan.config.checkpoint_every:
        raise ValueError(
            "activation storage cannot be resumed (the raw rows of a killed run are lost); use "
            "either an activation_writer or checkpoint_every > 0 with a state_path, not both"
        )
    expected = {k: tuple(v) for k, v in writer.unit_shapes.items()}
    if expected != plan.unit_shapes or writer.d != plan.problem.d:
        raise ValueError(
            f"the activation writer expects layers {expected} and d={writer.d}, but this "
            f"analysis captures {plan.unit_shapes} with d={plan.problem.d}; build it from the "
            f"plan (plan_analysis: unit_shapes, design.row_kinds(), design.n_rows)"
        )


@dataclass
class _Run:
    """One rank's pass over its shards: what the steps of ``run_analysis`` share.

    Attributes:
        plan: the analysis plan.
        world: (rank, world size).
        stages: the block ranges run one after the other (``adaptive.stages``; one for a
            fixed N).
        stage: the stage running.
        decide_from: the first stage after which to decide; the stages before it were
            decided (to grow) by the run a resumed one continues.
        shard: this rank's blocks [start, stop) of the stage.
        per_batch: design blocks per batch.
        accumulators: the per-layer sums.
        resume: the rank's resume file, or None.
        writer: the activation writer, or None.
        next_block: the first block to run (after a resumed state's).
        seconds_before: seconds spent by the runs this one resumes.
        started: ``time.perf_counter()`` at the call of ``run_analysis``.
        bar: rank zero's progress over the stage.
        watch: the phases' timings.
        last_saved: the block after the last saved state.
        decision: an adaptive run's last decision, else None.
    """

    plan: AnalysisPlan
    world: tuple[int, int]
    stages: list[tuple[int, int]]
    stage: int
    decide_from: int
    shard: tuple[int, int]
    per_batch: int
    accumulators: LayerAccumulators
    resume: ResumeFile | None
    writer: ActivationWriter | None
    next_block: int
    seconds_before: float
    started: float
    bar: Progress
    watch: Stopwatch
    last_saved: int
    decision: adaptive.Decision | None = None


def _stage_shard(stage: tuple[int, int], rank: int, world_size: int) -> tuple[int, int]:
    """This rank's blocks [start, stop) of a stage's blocks."""
    start, stop = shard_range(stage[1] - stage[0], rank, world_size)
    return stage[0] + start, stage[0] + stop


def _start(
    plan: AnalysisPlan,
    model: nn.Module,
    device: torch.device,
    world: tuple[int, int],
    state_path: str | os.PathLike[str] | None,
    writer: ActivationWriter | None,
    timings: dict[str, float] | None,
    started: float,
) -> _Run:
    """Allocate the accumulators, continue a saved state if there is one, start the progress.

    Args:
        plan: the analysis plan.
        model: the analysed model, on ``device`` (its weights are fingerprinted).
        device: where the accumulators' states live.
        world: (rank, world size).
        state_path, writer, timings: as ``run_analysis``.
        started: ``time.perf_counter()`` at the call of ``run_analysis``.

    Returns:
        The state of this rank's pass, at ``next_block`` (after a saved state's).

    Raises:
        ValueError: ranks with different problems (``check_same_on_every_rank``); an adaptive
            run with fewer first-stage blocks than processes.
    """
    config, design = plan.config, plan.design
    rank, world_size = world
    check_same_on_every_rank(json.dumps(plan.problem.to_config(), sort_keys=True),
                             "problem (augmentations, their registrations and bounds)",
                             world_size, device)
    if config.adaptive and config.n < world_size:
        # Every rank must add blocks between two computes: torchmetrics returns a cached
        # result, without the collective the other ranks wait in, from a metric not updated.
        raise ValueError(
            f"an adaptive run needs n >= the number of processes ({world_size}), got n = "
            f"{config.n}"
        )
    stages = adaptive.stages(config)
    per_batch = max(1, config.batch_rows // design.block_size)
    stage, seconds_before, resume, saved = 0, 0.0, None, None
    if state_path is not None:
        resume = ResumeFile(
            shard_path(Path(state_path), rank, world_size),
            resume_fields(plan, model, rank, world_size, per_batch),
        )
        saved = resume.load()
    accumulators = LayerAccumulators(config, plan.problem, plan.unit_shapes, device,
                                     uses_background(config, device))
    shard = _stage_shard(stages[0], rank, world_size)
    next_block = shard[0]
    if saved is not None:
        accumulators.load_state(saved["states"])
        stage, seconds_before = int(saved.get("stage", 0)), float(saved["seconds"])
        shard, next_block = _stage_shard(stages[stage], rank, world_size), int(saved["next_block"])
        log.info(
            "resuming %s from %s at row %d of %d%s: blocks [%d, %d) of this shard already "
            "done", config.method, resume.path, (next_block - shard[0]) * design.block_size,
            (shard[1] - shard[0]) * design.block_size,
            f" of stage {stage}" if config.adaptive else "", shard[0], next_block,
        )
    decide_from = max_on_every_rank(stage, world_size, device) if config.adaptive else 0
    bar = _progress(config, design, stages[stage], shard, next_block, world)
    watch = Stopwatch(timings, device, started)
    watch.mark("setup")
    return _Run(plan, world, stages, stage, decide_from, shard, per_batch, accumulators, resume,
                writer, next_block, seconds_before, started, bar, watch, next_block)


def _progress(
    config: EngineConfig, design: Design, stage: tuple[int, int], shard: tuple[int, int],
    next_block: int, world: tuple[int, int],
) -> Progress:
    """Rank zero's progress over the rows of its shard [start, stop) (blocks) of a stage, from
    ``next_block`` on (a resumed run); its work line says what the stage will forward."""
    start, stop = shard
    rank, world_size = world
    per_batch = min(max(1, config.batch_rows // design.block_size), max(1, stop - start))
    rows = (stop - start) * design.block_size
    work = (f"{rows} rows ({stop - start} blocks of {design.block_size} rows, {per_batch} "
            f"blocks per batch)")
    if world_size > 1:
        work += (f": this process's shard of {(stage[1] - stage[0]) * design.block_size} "
                 f"rows over {world_size} processes")
    if config.adaptive and stage[0] == 0:
        work += (f", N = {stage[1]} first (adaptive: doubled up to {config.max_n} until the "
                 f"half-width is <= {config.target_halfwidth:g})")
    elif config.adaptive:
        work += f", N {stage[0]} -> {stage[1]} (adaptive)"
    return Progress(
        f"{config.method} rank {rank}" if world_size > 1 else config.method, rows, "rows",
        work=work, initial=(next_block - start) * design.block_size,
        enabled=config.progress and rank == 0,
    )


def _accumulate(
    run: _Run, model: nn.Module, capture: ActivationCapture, device: torch.device
) -> dict[str, tuple[Any, Any]]:
    """Forward every batch of the shard from ``run.next_block`` on and sum it, stage by stage
    until an adaptive run decides to stop.

    Returns:
        ``LayerAccumulators.compute()``: {layer: (the method's result or None, moments)}, the
        global sums under DDP.
    """
    plan, config = run.plan, run.plan.config
    forward = BatchForward(model, plan, capture, device, run.watch)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        # Parameters change format outside inference mode: they must stay usable for training.
        with (intra_op_threads(config.threads),
              channels_last_weights(model, config.channels_last),
              torch.inference_mode(), capture,
              Background(uses_background(config, device), device) as background):
            forward.module = torch.compile(model) if config.compile else model
            while True:
                batches = batch_ranges(*run.shard, run.per_batch, run.next_block)
                loader = batch_loader(
                    BatchSource(plan.design, plan.problem, plan.probe, batches,
                                config.deduplicate),
                    config.num_workers, pin_memory=device.type == "cuda",
                )
                _forward_all(run, forward, loader, background)
                run.bar.close()
                if run.stage < run.decide_from:
                    _next_stage(run)
                    continue
                computed = run.accumulators.compute()
                run.watch.mark("compute")
                if not _grows(run, computed):
                    return computed
                _next_stage(run)
    finally:
        run.bar.close()
        for module, mode in modes.items():
            module.training = mode


def _forward_all(
    run: _Run, forward: BatchForward, loader: Iterable[Batch], background: Background
) -> None:
    """Forward every batch of ``loader`` and sum it (``_record``).

    With the background thread, batch k is summed there while the caller forwards batch k + 1;
    where every layer's module runs once per forward (``AnalysisPlan.repeated``) and nothing is
    stored, each layer is handed to the thread as soon as the forward makes it, so that the
    sums of the first layers run beside the forward of the last ones.
    """
    recorded: Future[None] | None = None
    by_layer = background.enabled and run.writer is None and not run.plan.repeated
    try:
        # closing: an error here stops the background thread's batches now, not when the
        # traceback that holds this frame is freed.
        with contextlib.closing(forward.batches(loader, background)) as augmented_batches:
            for batch, augmented in augmented_batches:
                summed: list[Future[None]] = []
                sink = (_layer_sink(run, forward, batch, background, summed)
                        if by_layer and len(augmented) == 1 else None)
                outputs = forward.run(batch, augmented, sink)
                del augmented
                if recorded is not None:  # the previous batch's sums (and its error, if any)
                    recorded.result()
                    run.watch.mark("accumulate")
                recorded = background.submit(_record, run, forward, batch, outputs, summed,
                                             background.enabled)
                # Free this batch's outputs as soon as they are summed: the peak holds one
                # batch of outputs inline, about two with the background thread.
                del outputs
    except BaseException:
        # The previous batch's job (its sums, then its checkpoint) is sound work queued before
        # anything of the failed batch: finish it, so that a resume starts after that batch.
        if recorded is not None:
            wait([recorded])
        raise
    if recorded is not None:
        recorded.result()
        run.watch.mark("accumulate")


def _layer_sink(
    run: _Run, forward: BatchForward, batch: Batch, background: Background,
    summed: list[Future[None]],
) -> Callable[[str, Tensor], None]:
    """The capture's sink for one batch: each layer's output queued to the background thread
    (``_sum_layer``) as the forward makes it, its job appended to ``summed``."""

    def sink(layer: str, output: Tensor) -> None:
        summed.append(background.submit(_sum_layer, run, forward, batch, {layer: output}))

    return sink


def _grows(run: _Run, computed: dict[str, tuple[Any, Any]]) -> bool:
    """An adaptive run's decision after its stage (False for a fixed N), said on rank zero."""
    config = run.plan.config
    if not config.adaptive:
        return False
    last = run.stage == len(run.stages) - 1
    run.decision = adaptive.decide(config, computed, run.stages[run.stage], last)
    run.bar.note(run.decision.text)
    log.info("%s: %s", config.method, run.decision.text)
    return run.decision.grow


def _next_stage(run: _Run) -> None:
    """Move to the next stage's shard and progress; save the boundary (all sums so far)."""
    config = run.plan.config
    run.stage += 1
    stage = run.stages[run.stage]
    run.shard = _stage_shard(stage, *run.world)
    run.next_block = run.last_saved = run.shard[0]
    run.bar = _progress(config, run.plan.design, stage, run.shard, run.next_block, run.world)
    if run.resume is not None and config.checkpoint_every:
        run.resume.save(run.next_block, run.seconds_before + time.perf_counter() - run.started,
                        run.accumulators.state(), run.stage)
        run.watch.mark("checkpoint")


def _sum(
    run: _Run, forward: BatchForward, batch: Batch, outputs: dict[str, Tensor],
    watch: Stopwatch,
) -> dict[str, Tensor]:
    """Add a batch's outputs (all its layers or some, as ``forward.run`` gives them) to the
    accumulators, charged to ``watch``.

    Returns:
        The outputs of every row (``forward.expand``).
    """
    outputs = forward.expand(batch, outputs)
    run.accumulators.update(outputs, batch.stop - batch.start, batch.permutations,
                            batch.replicate)
    watch.mark("accumulate")
    return outputs


def _sum_layer(
    run: _Run, forward: BatchForward, batch: Batch, outputs: dict[str, Tensor]
) -> None:
    """``_sum`` of one layer's outputs, a job of the background thread."""
    _sum(run, forward, batch, outputs, run.watch.background())


def _record(
    run: _Run, forward: BatchForward, batch: Batch, outputs: dict[str, Tensor] | None,
    summed: list[Future[None]], in_background: bool,
) -> None:
    """Sum a batch's outputs (``forward.run``'s; None when its layers were handed on one by one
    as ``summed``, whose errors are raised here), store them (activation writer), count them,
    checkpoint; in the background thread, charged to its own phases."""
    for layer in summed:  # done: queued before this job
        layer.result()
    watch = run.watch.background() if in_background else run.watch
    if outputs is not None:
        outputs = _sum(run, forward, batch, outputs, watch)
    if run.writer is not None:
        size = run.plan.design.block_size
        run.writer.append(np.arange(batch.start * size, batch.stop * size), batch.rows, outputs)
        watch.mark("store")
    run.bar.update(len(batch.rows))
    every = run.plan.config.checkpoint_every
    if (
        run.resume is not None
        and every
        and batch.stop - run.last_saved >= every
        and batch.stop < run.shard[1]
    ):
        run.resume.save(batch.stop, run.seconds_before + time.perf_counter() - run.started,
                        run.accumulators.state(), run.stage)
        run.last_saved = batch.stop
        watch.mark("checkpoint")


def _warn_adaptive(
    config: EngineConfig, result: AnalysisResult, decision: adaptive.Decision | None, rank: int
) -> None:
    """Rank zero, an adaptive run (a decision): the max_n shortfall, and the small-N advice at
    the N reached (the fixed-N advice is given before the run)."""
    if decision is None or rank != 0:
        return
    if decision.warning is not None:
        warnings.warn(decision.warning, adaptive.HalfwidthWarning, stacklevel=3)
    advice = small_n_advice(result.toggles, config, result.n)
    if advice:
        warnings.warn(advice, SmallSampleWarning, stacklevel=3)
