"""The analysis engine: one loop from design rows to per-unit sensitivity arrays (METHOD.md 3-7).

Every analysis (Sobol, Shapley, variance, contrast), from the CLI or from a training callback,
runs ``run_analysis``:

    design blocks of this rank's shard -> rows -> decoded parameters + probe images (each unique
    image loaded once per batch; in DataLoader workers when num_workers > 0) -> augmentation on
    the model's device -> forward under inference mode with hooks -> accumulators -> result.

Sharding: blocks [n_blocks * r // W, n_blocks * (r + 1) // W) belong to rank r of W (contiguous,
deterministic). Batches are whole blocks. The accumulators are torchmetrics Metrics with summed
states, so ``compute()`` under an initialised process group makes every rank hold the global
sums: every rank must call ``run_analysis`` and every rank gets the global result.

Resume: with ``state_path`` and ``checkpoint_every = k > 0`` the accumulator states, the next
block and a fingerprint of everything that determines the result are saved atomically (temporary
file + ``os.replace``) after every batch that completes k or more blocks since the last save. A
run started with an existing state file and the same inputs continues after the saved block and
ends with exactly the sums of an uninterrupted run (batches fall on the same block boundaries).
A state file whose fingerprint differs is a ValueError naming the differing fields (never a
silent restart: the file may hold days of work). The state file is removed when the analysis
completes. With several processes each rank keeps its own file, ``<stem>.rank<r>-of-<W><suffix>``.

Seconds: ``AnalysisResult.seconds`` is the wall time of the analysis as rank zero measures it,
from the call of ``run_analysis`` to its result, summed over an interrupted run (up to its last
saved checkpoint: the work after it is lost and redone) and the runs that resume it. Every rank
returns rank zero's number, so it means the same for one process and for DDP.

Progress (``EngineConfig.progress``, rank zero, stderr; ``sensitivity.progress``): first the work
("320 rows (32 blocks of 10 rows, 25 blocks per batch)") and, resumed, "resuming at row N of M"
(rows of this rank's shard), then a bar with rows/s and ETA on a terminal, plain lines otherwise.

This module imports torch, numpy and the rest of ``sensitivity``; never Lightning or wandb.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import Metric

from sensitivity.capture import ActivationCapture, model_device
from sensitivity.designs import (
    ContrastDesign,
    Design,
    PermutationDesign,
    ShapleyDesign,
    SobolDesign,
    uniform_rows,
)
from sensitivity.estimators import (
    ContrastAccumulator,
    MomentsAccumulator,
    PermutationShapleyAccumulator,
    ShapleyAccumulator,
    SobolAccumulator,
)
from sensitivity.problem import AugmentationProblem, DecodedRows
from sensitivity.progress import Progress
from sensitivity.results import AnalysisResult
from sensitivity.store import ActivationWriter, describe_differences

METHODS = ("sobol", "shapley", "variance", "contrast")
SHAPLEY_METHODS = ("goda", "permutation")
SAMPLINGS = ("rqmc", "mc")
# The fewest base points (trajectories) in which a variable may change for its indices: a
# mean of k non-zero terms has a relative standard error of about 1 / sqrt(k), so 16 keeps it
# near 25% (a 95% interval of about +-50% of the index). Fewer: a warning with the n to use.
MIN_TOGGLES = 16
PRECISIONS = ("32", "bf16", "16")
# 3: replicated Sobol' states, Shapley y0 sums.
STATE_VERSION = 3
log = logging.getLogger(__name__)
# Images may leave [0, 1] by float round-off of their decoding; augmentations tolerate 1e-4 too.
_IMAGE_TOLERANCE = 1e-4


@dataclass
class EngineConfig:
    """Settings of one analysis run.

    method: "sobol" | "shapley" | "variance" | "contrast".
    n: Sobol base points (a power of two), Shapley trajectories (goda) or permutations
        (permutation), variance rows, or contrast probe images.
    seed: design seed; the same seed and inputs give the same result.
    sampling: Sobol base points: "rqmc" (randomised quasi-Monte Carlo: ``replicates``
        independently scrambled Sobol' sequences, half-widths from Student's t over the
        replicate estimates) or "mc" (i.i.d. uniform points, half-widths from the delta method
        over base points). Either way the switch, class, image (and short order) columns are
        drawn balanced (``designs.BalancedPairs``).
    replicates: rqmc replicates (a power of two >= 2; at most n are used).
    second_order: Sobol S2 (2G + 2 rows per base point instead of G + 2).
    shapley_method: "goda" (trajectories, G + 1 rows each) or "permutation" (Song, Nelson and
        Staum: G * n_outer * n_inner rows per permutation).
    contrast_k: parameter draws per augmentation and image for "contrast".
    layers: checkpoint module names of the hooked module; None -> capture.default_layers.
    reduction: "none" (every element a unit) | "channel_mean", or {layer: reduction}.
    batch_rows: rows per forward pass. Batches hold whole design blocks (as many as fit, at least
        one); a block larger than batch_rows is forwarded in chunks of batch_rows rows, its
        captured outputs (block_size x units) held until the block is complete.
    checkpoint_every: design blocks between resume checkpoints; 0 = off.
    precision: "32", "bf16" or "16" (float16): autocast on the forward only; accumulation is
        always float64. docs/PERFORMANCE.md gives the speed and the effect on the indices.
    num_workers: DataLoader workers decoding rows and loading probe images (0: in process). With
        workers the next batches are prepared (and pinned, on CUDA) while the device works.
    progress: on rank zero (stderr): the work up front, then a progress bar with rows/s and ETA
        on a terminal, a plain line per tenth of the rows (or 30 s) otherwise.
    conf_level: confidence level of the ``*_conf`` half-widths.
    deduplicate: forward each distinct augmented image of a batch once. Rows that decode to the
        same probe image with the same active augmentations, in the same relative order, with
        the same parameters (e.g. AB_j of an augmentation switched off in both A and B) give the
        same outputs: 22-24% of a Sobol' design's rows at p_on = 0.5. Outputs equal
        those of a full forward up to the batch-composition round-off of the kernels (none on
        the CPUs measured: bit-identical results).
    channels_last: run the forward in channels-last memory format (faster convolutions on most
        CPUs and GPUs); the model's parameters are converted back afterwards. Outputs change by
        float round-off (another summation order), and so do the indices.
    compile: ``torch.compile`` the model's forward for this run. The compile time (seconds to
        minutes) is paid by the first run in a process (later runs reuse the compiled code),
        and the capture hooks break the compiled graph at every checkpoint, so it rarely pays
        off (docs/PERFORMANCE.md). Outputs change by float round-off.
    """

    method: str = "sobol"
    n: int = 64
    seed: int = 0
    sampling: str = "rqmc"
    replicates: int = 16
    second_order: bool = False
    shapley_method: str = "goda"
    n_outer: int = 1
    n_inner: int = 3
    contrast_k: int = 4
    layers: list[str] | None = None
    reduction: str | dict[str, str] = "none"
    batch_rows: int = 256
    checkpoint_every: int = 0
    precision: str = "32"
    num_workers: int = 0
    progress: bool = True
    conf_level: float = 0.95
    deduplicate: bool = False
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ValueError naming the first invalid setting."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; valid: {list(METHODS)}")
        if self.shapley_method not in SHAPLEY_METHODS:
            raise ValueError(
                f"unknown shapley_method {self.shapley_method!r}; valid: {list(SHAPLEY_METHODS)}"
            )
        if self.sampling not in SAMPLINGS:
            raise ValueError(
                f"unknown sampling {self.sampling!r}; valid: {list(SAMPLINGS)} (rqmc: replicated "
                f"scrambled Sobol' points, mc: i.i.d. points)"
            )
        if str(self.precision) not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        self.precision = str(self.precision)
        minimum = {"n": 2, "n_outer": 1, "n_inner": 2, "contrast_k": 1, "batch_rows": 1,
                   "checkpoint_every": 0, "num_workers": 0, "seed": 0, "replicates": 2}
        for name, low in minimum.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("n", "replicates") if self.method == "sobol" else ():
            value = getattr(self, name)
            if value & (value - 1):
                lower = 1 << (value.bit_length() - 1)
                raise ValueError(
                    f"{name} must be a power of two for Sobol indices, got {value}: a Sobol' "
                    f"sequence is balanced only over its first 2^m points; use {lower} or "
                    f"{lower * 2}"
                )
        if not 0.0 < float(self.conf_level) < 1.0:
            raise ValueError(f"conf_level must lie strictly between 0 and 1, got {self.conf_level}")
        if isinstance(self.layers, str):
            raise ValueError(f"layers must be a list of module names, got {self.layers!r}")
        for name in ("deduplicate", "channels_last", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        """A plain mapping of the settings (for metadata)."""
        return dataclasses.asdict(self)

    @property
    def effective_replicates(self) -> int:
        """Replicates the Sobol' design uses: min(replicates, n) with rqmc, else 1."""
        if self.method != "sobol" or self.sampling != "rqmc":
            return 1
        return min(self.replicates, self.n)


class VarianceDesign(Design):
    """``n`` i.i.d. uniform rows, one per block, for per-unit moments (method "variance").

    Rows come from ``designs.uniform_rows`` keyed by ``seed``, so any block range is
    regenerated alone, without sampler state. Plain Monte Carlo (not quasi-random) keeps the
    rows independent, which the moments' confidence intervals assume.
    """

    def __init__(self, d: int, n: int, seed: int = 0) -> None:
        self.d = int(d)
        self.n_blocks = int(n)
        self.seed = int(seed)
        self.block_size = 1
        self.groups = [[c] for c in range(self.d)]

    def _rows(self, start: int, stop: int) -> np.ndarray:
        return uniform_rows([self.seed], start, stop, self.d)

    def row_kinds(self) -> list[str]:
        return ["row"]


def build_design(problem: AugmentationProblem, config: EngineConfig) -> Design:
    """The design of ``config.method`` over ``problem``'s columns and groups."""
    config.validate()
    groups = problem.group_columns
    if config.method == "sobol":
        return SobolDesign(
            problem.d, config.n, config.seed, groups, config.second_order,
            replicates=config.effective_replicates,
            sampling="sobol" if config.sampling == "rqmc" else "random",
            discrete=problem.discrete_columns(),
        )
    if config.method == "shapley" and config.shapley_method == "goda":
        return ShapleyDesign(
            problem.d, config.n, config.seed, groups, discrete=problem.discrete_columns()
        )
    if config.method == "shapley":
        return PermutationDesign(
            problem.d, config.n, config.n_outer, config.n_inner, config.seed, groups
        )
    if config.method == "variance":
        return VarianceDesign(problem.d, config.n, config.seed)
    return ContrastDesign(problem, config.n, config.contrast_k, config.seed)


def analysis_attrs(config: EngineConfig, problem: AugmentationProblem) -> dict[str, Any]:
    """What the results file records of an analysis's settings (docs/RESULTS_FORMAT.md).

    The attributes of /analyses/<name> besides the standard ones, as plain values: "design"
    (class name) and "block_size" (rows per block) of the design over ``problem``, "seed",
    "min_toggles", "reduction", "precision", "conf_level", the forward options "deduplicate",
    "channels_last", "compile", and the method's own settings ("second_order" and "sampling"
    for Sobol;
    "shapley_method", plus "n_outer" and "n_inner" for permutations; "contrast_k").
    """
    design = build_design(problem, config)
    attrs: dict[str, Any] = {
        "design": type(design).__name__,
        "block_size": design.block_size,
        "seed": config.seed,
        "min_toggles": MIN_TOGGLES,
        "reduction": config.reduction,
        "precision": config.precision,
        "conf_level": config.conf_level,
        "deduplicate": config.deduplicate,
        "channels_last": config.channels_last,
        "compile": config.compile,
    }
    if config.method == "sobol":
        attrs.update(second_order=config.second_order, sampling=config.sampling)
    if config.method == "shapley":
        attrs["shapley_method"] = config.shapley_method
        if config.shapley_method == "permutation":
            attrs.update(n_outer=config.n_outer, n_inner=config.n_inner)
    if config.method == "contrast":
        attrs["contrast_k"] = config.contrast_k
    return attrs


def hooked_module(model: nn.Module, layer_root: nn.Module | None = None) -> nn.Module:
    """Where the hooks go: ``layer_root``, else ``model.net`` (an ImageClassifier), else model."""
    if layer_root is not None:
        return layer_root
    net = getattr(model, "net", None)
    return net if isinstance(net, nn.Module) else model


def layer_shapes(
    model: nn.Module,
    image_size: tuple[int, int],
    config: EngineConfig,
    layer_root: nn.Module | None = None,
) -> dict[str, tuple[int, ...]]:
    """{layer: unit shape} the analysis will report, from one dry forward of ``model``.

    What an ``ActivationWriter`` for this analysis needs; ValueError for unknown layer names
    (the message lists the valid ones).
    """
    capture = ActivationCapture(hooked_module(model, layer_root), config.layers, config.reduction)
    return capture.unit_shapes(image_size, forward=model)


def check_inputs(
    model: nn.Module,
    problem: AugmentationProblem,
    probe: Tensor | Dataset,
    config: EngineConfig,
    layer_root: nn.Module | None = None,
) -> dict[str, tuple[int, ...]]:
    """Every check ``run_analysis`` makes before its first forward, without running it.

    ValueError for a bad config (e.g. Sobol n not a power of two), a probe of the wrong size,
    shape or range, a design the problem cannot take, or unknown layer names (listing the valid
    ones). Returns {layer: unit shape}. Lets a caller fail before creating any output.
    """
    config.validate()
    source = _Probe(probe, problem)
    build_design(problem, config)
    return layer_shapes(model, (source.height, source.width), config, layer_root)


class SmallSampleWarning(UserWarning):
    """N is too small for the problem: a variable changes in too few base points."""


def toggle_counts(problem: AugmentationProblem, design: Design) -> dict[str, int]:
    """{variable: base points (Sobol') or trajectories (Goda) in which it changes}.

    What a variable's indices rest on: S1_j and ST_j are means over base points of terms that
    are zero wherever AB_j equals A in group j; Goda's steps likewise. Empty for the other
    designs. Decodes only the pairs (A, B) or (x1, x2), in chunks.
    """
    if not isinstance(design, SobolDesign | ShapleyDesign):
        return {}
    counts = np.zeros(len(problem.groups), dtype=np.int64)
    step = max(1, 2**20 // max(1, problem.d))
    for start in range(0, design.n_blocks, step):
        first, second = design.pair_rows(start, min(start + step, design.n_blocks))
        counts += problem.changed_groups(first, second).sum(axis=0)
    return {name: int(c) for name, c in zip(problem.group_names, counts, strict=True)}


def small_n_advice(toggles: Mapping[str, int], config: EngineConfig) -> str | None:
    """The warning to give when a variable changes in fewer than MIN_TOGGLES base points
    (trajectories), with the smallest n that reaches it for every variable; else None."""
    if not toggles:
        return None
    short = {name: count for name, count in toggles.items() if count < MIN_TOGGLES}
    if not short:
        return None
    rate = min(count for count in toggles.values()) / config.n
    needed = math.ceil(MIN_TOGGLES / rate) if rate > 0 else None
    if needed is not None and config.method == "sobol":
        needed = 1 << (needed - 1).bit_length()
    what = "base points" if config.method == "sobol" else "trajectories"
    listed = ", ".join(
        f"{name} {count}" for name, count in sorted(short.items(), key=lambda item: item[1])
    )
    fix = f"use n >= {needed}" if needed else "check the problem (a variable never changes)"
    return (
        f"n = {config.n} is too small for this problem: these variables change in fewer than "
        f"{MIN_TOGGLES} {what} (of {config.n}): {listed}; their indices rest on too few terms "
        f"to be trusted; {fix}"
    )


def shard_range(n_blocks: int, rank: int, world_size: int) -> tuple[int, int]:
    """Blocks [start, stop) of ``rank`` among ``world_size``: contiguous, sizes differ by <= 1."""
    return n_blocks * rank // world_size, n_blocks * (rank + 1) // world_size


def rank_state_path(state_path: Path, rank: int, world_size: int) -> Path:
    """The state file of one rank: ``state_path`` itself in a single process."""
    if world_size == 1:
        return state_path
    return state_path.with_name(f"{state_path.stem}.rank{rank}-of-{world_size}{state_path.suffix}")


# --------------------------------------------------------------------------------- probe images
def _as_image(item: Any, index: int) -> Tensor:
    """A probe item ((3, H, W) tensor or a tuple starting with one) as the image tensor."""
    image = item[0] if isinstance(item, tuple | list) else item
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(
            f"probe item {index} is {shape}; expected an image tensor (3, H, W) in [0, 1] or a "
            f"tuple (image, label)"
        )
    return image


def _check_range(images: Tensor, what: str) -> None:
    if not images.is_floating_point():
        raise ValueError(f"{what} must be floating point in [0, 1], got {images.dtype}")
    low, high = (float(v) for v in images.aminmax())
    if not (low >= -_IMAGE_TOLERANCE and high <= 1.0 + _IMAGE_TOLERANCE):
        raise ValueError(
            f"{what} must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]; pass images "
            f"scaled to [0, 1] without ImageNet normalisation (the model normalises after "
            f"augmenting)"
        )


class _Probe:
    """The probe images, a tensor (N, 3, H, W) or a Dataset of N items, class-major."""

    def __init__(self, probe: Tensor | Dataset, problem: AugmentationProblem) -> None:
        partitions = _partition_count(problem)
        expected = problem.n_images * partitions
        if isinstance(probe, Tensor):
            if probe.ndim != 4 or probe.shape[1] != 3:
                raise ValueError(
                    f"probe must be images (N, 3, H, W) in [0, 1], got shape {tuple(probe.shape)}"
                )
            _check_range(probe, "probe images")
            count, self.height, self.width = probe.shape[0], probe.shape[2], probe.shape[3]
        elif isinstance(probe, Dataset) and hasattr(probe, "__len__"):
            count = len(probe)
            if count == 0:
                raise ValueError("the probe dataset is empty; it needs one item per probe image")
            first = _as_image(probe[0], 0)
            _check_range(first, "probe image 0")
            self.height, self.width = int(first.shape[1]), int(first.shape[2])
        else:
            raise ValueError(
                f"probe must be a tensor (N, 3, H, W) or a Dataset with a length, got "
                f"{type(probe).__name__}"
            )
        if count != expected:
            split = " x 2 partitions" if partitions == 2 else ""
            raise ValueError(
                f"the probe holds {count} images but the problem expects {expected} "
                f"(n_classes {problem.n_classes} x images_per_class {problem.images_per_class}"
                f"{split}, class-major); build the problem with the probe's class and image counts"
            )
        self.probe = probe
        self.count = count
        self.n_images = problem.n_images

    def load(self, index: Tensor) -> Tensor:
        """Images (len(index), 3, H, W) of the probe indices ``index`` (int64, CPU)."""
        if isinstance(self.probe, Tensor):
            return self.probe[index.to(self.probe.device)]
        images = [_as_image(self.probe[i], i) for i in index.tolist()]
        stacked = torch.stack(images)
        if tuple(stacked.shape[2:]) != (self.height, self.width):
            raise ValueError(
                f"probe images differ in size: {tuple(stacked.shape[2:])} vs "
                f"{(self.height, self.width)}; every probe image needs the same size"
            )
        _check_range(stacked, "probe images")
        return stacked

    def fingerprint(self) -> str:
        if isinstance(self.probe, Tensor):
            return _tensor_digest([self.probe])
        first = _as_image(self.probe[0], 0)
        return f"{type(self.probe).__name__}:{self.count}:{_tensor_digest([first])}"


def _partition_count(problem: AugmentationProblem) -> int:
    """Probe splits: 2 with a ``partition`` auxiliary (split p owns images p * n_images ...)."""
    return 2 if "partition" in problem.auxiliaries else 1


def _tensor_digest(tensors: list[Tensor]) -> str:
    """sha256 of the tensors' bytes (exact: a resumed run must see the very same inputs)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------- data loading
@dataclass
class _Batch:
    """One batch of whole design blocks [start, stop), ready for the device.

    rows: (R, d) float64 design rows; decoded: their parameters; images: (U, 3, H, W) the
    unique probe images of the batch; inverse: (R,) int64 row -> index into ``images``;
    permutations: (stop - start, G) int64 group orders (Shapley designs) or None.
    replicate: (stop - start,) int64 replicate of each block (replicated Sobol') or None.
    distinct, copies: with deduplication, (F,) int64 the rows to forward (first occurrences, in
    row order) and (R,) int64 row -> index into them; None otherwise.
    """

    start: int
    stop: int
    rows: np.ndarray
    decoded: DecodedRows
    images: Tensor
    inverse: Tensor
    permutations: Tensor | None
    replicate: Tensor | None = None
    distinct: Tensor | None = None
    copies: Tensor | None = None

    def pin_memory(self) -> _Batch:
        """Page-locked images for asynchronous copies (DataLoader pin_memory)."""
        return dataclasses.replace(self, images=self.images.pin_memory())

    def forwarded(self) -> tuple[Tensor, DecodedRows]:
        """(rows to forward (F,) into ``images`` via ``inverse``, their decoded parameters)."""
        if self.distinct is None:
            return self.inverse, self.decoded
        return self.inverse[self.distinct], self.decoded.select(self.distinct)


class _BatchSource(Dataset):
    """Item i = batch i: rows of blocks [start, stop), decoded, with their unique probe images.

    Runs in DataLoader workers when num_workers > 0: only numpy and CPU torch, no device work.
    """

    def __init__(
        self,
        design: Design,
        problem: AugmentationProblem,
        probe: _Probe,
        batches: list[tuple[int, int]],
        deduplicate: bool = False,
    ) -> None:
        self.design, self.problem, self.probe, self.batches = design, problem, probe, batches
        self.with_permutations = isinstance(design, ShapleyDesign | PermutationDesign)
        self.deduplicate = deduplicate

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> _Batch:
        start, stop = self.batches[i]
        rows = self.design.rows(start, stop)
        decoded = self.problem.decode(rows, self.probe.height, self.probe.width)
        index = decoded.image_index
        if decoded.partition is not None:
            index = index + decoded.partition * self.probe.n_images
        # Rows of a batch share few images (A and AB_j rows share theirs by design): load each
        # once and expand on the device.
        unique, inverse = torch.unique(index, return_inverse=True)
        permutations = (
            torch.from_numpy(self.design.permutations(start, stop))
            if self.with_permutations
            else None
        )
        replicate = (
            torch.from_numpy(self.design.replicate_of(start, stop))
            if isinstance(self.design, SobolDesign) and self.design.replicates > 1
            else None
        )
        distinct = copies = None
        if self.deduplicate:
            distinct, copies = _distinct_rows(decoded, index)
        return _Batch(
            start, stop, rows, decoded, self.probe.load(unique), inverse, permutations,
            replicate, distinct, copies,
        )


def _distinct_rows(decoded: DecodedRows, image: Tensor) -> tuple[Tensor, Tensor]:
    """Rows whose augmented images are identical, from what determines them (METHOD.md s. 2-3).

    A row's image is a function of its probe image, the active augmentations in their relative
    application order, their parameters, and nothing else: switched-off augmentations' values
    and the positions of inactive augmentations in the order do not matter. image: (R,) int64
    probe index (partition included). Returns (distinct, copies): (F,) int64 the first row of
    each distinct image, ascending; (R,) int64 each row's index into ``distinct``.
    """
    active = decoded.active
    # rank[r, a] = number of active augmentations applied before a in row r (-1: a is off)
    in_order = torch.gather(active, 1, decoded.order).long()
    rank = torch.empty_like(in_order).scatter_(1, decoded.order, in_order.cumsum(1) - 1)
    columns = [image.double()[:, None], torch.where(active, rank, -1).double()]
    for a, params in enumerate(decoded.params.values()):
        for value in params.values():
            columns.append(torch.where(active[:, a], value.double(), 0.0)[:, None])
    _, inverse = torch.unique(torch.cat(columns, 1), dim=0, return_inverse=True)
    rows = torch.arange(len(image))
    first = torch.full((int(inverse.max()) + 1,), len(image)).scatter_reduce(
        0, inverse, rows, "amin"
    )
    distinct, order = torch.sort(first)
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order))
    return distinct, position[inverse]


def _keep(item: _Batch) -> _Batch:
    return item


def _batches(start: int, stop: int, per_batch: int, resume_at: int) -> list[tuple[int, int]]:
    """Block ranges [a, b) of the shard [start, stop) from ``resume_at`` on; boundaries are
    start + k * per_batch whatever ``resume_at``, so a resumed run adds the same batches."""
    return [(a, min(a + per_batch, stop)) for a in range(resume_at, stop, per_batch)]


# --------------------------------------------------------------------------------- accumulators
class _LayerAccumulators:
    """The method's accumulator and a MomentsAccumulator for each layer; a first-order Sobol'
    accumulator gives the moments of every row itself (its ``moments`` after compute()), at a
    fraction of the cost of a second pass over the outputs."""

    def __init__(
        self,
        config: EngineConfig,
        problem: AugmentationProblem,
        shapes: Mapping[str, tuple[int, ...]],
        device: torch.device,
    ) -> None:
        self.method = config.method
        g = len(problem.groups)
        level = config.conf_level
        self.main: dict[str, Metric | None] = {}
        self.moments: dict[str, MomentsAccumulator | None] = {}
        for layer, shape in shapes.items():
            if config.method == "sobol":
                main: Metric | None = SobolAccumulator(
                    g, shape, config.second_order, level, config.effective_replicates
                )
            elif config.method == "shapley" and config.shapley_method == "goda":
                main = ShapleyAccumulator(g, shape, level)
            elif config.method == "shapley":
                main = PermutationShapleyAccumulator(
                    g, config.n_outer, config.n_inner, shape, level
                )
            elif config.method == "contrast":
                main = ContrastAccumulator(
                    len(problem.augmentations), config.contrast_k, shape, level
                )
            else:
                main = None
            self.main[layer] = None if main is None else main.to(device)
            own = config.method == "sobol" and not config.second_order
            self.moments[layer] = None if own else MomentsAccumulator(shape, level).to(device)

    def update(
        self,
        outputs: Mapping[str, Tensor],
        n_blocks: int,
        perms: Tensor | None,
        replicate: Tensor | None,
    ) -> None:
        """outputs: {layer: (n_blocks * block_size, *unit_shape)}; perms: (n_blocks, G) group
        orders (Shapley designs); replicate: (n_blocks,) replicate ids (replicated Sobol')."""
        for layer, Y in outputs.items():
            moments = self.moments[layer]
            if moments is not None:
                moments.update(Y)
            main = self.main[layer]
            if main is None:
                continue
            blocks = Y.reshape(n_blocks, -1, *Y.shape[1:])
            if perms is not None:
                main.update(blocks, perms.to(Y.device))
            elif isinstance(main, SobolAccumulator):
                main.update(blocks, replicate)
            else:
                main.update(blocks)

    def metrics(self) -> dict[str, Metric]:
        """Every accumulator by a stable key ("<layer>/main", "<layer>/moments")."""
        out: dict[str, Metric] = {}
        for layer in self.moments:
            if self.main[layer] is not None:
                out[f"{layer}/main"] = self.main[layer]
            if self.moments[layer] is not None:
                out[f"{layer}/moments"] = self.moments[layer]
        return out

    def state(self) -> dict[str, dict[str, Tensor]]:
        return {
            key: {name: value.detach().to("cpu").clone() for name, value in m.metric_state.items()}
            for key, m in self.metrics().items()
        }

    def load_state(self, states: Mapping[str, Mapping[str, Tensor]]) -> None:
        for key, metric in self.metrics().items():
            saved = states[key]
            for name in metric.metric_state:
                current = getattr(metric, name)
                value = saved[name]
                if value.shape != current.shape:
                    raise ValueError(
                        f"saved state {key}.{name} has shape {tuple(value.shape)}, expected "
                        f"{tuple(current.shape)}"
                    )
                setattr(metric, name, value.to(current.device, current.dtype))

    def compute(self) -> dict[str, tuple[Any, Any]]:
        """{layer: (main result or None, moments result)}; a collective under DDP (every rank
        computes every metric in the same order)."""
        out = {}
        with warnings.catch_warnings():
            # A rank whose shard is empty (more ranks than blocks) never updates; its zero sums
            # are still part of the global ones.
            warnings.filterwarnings("ignore", message=".*was called before the ``update``")
            for layer, moments in self.moments.items():
                metric = self.main[layer]
                main = None if metric is None else metric.compute()
                out[layer] = (main, metric.moments if moments is None else moments.compute())
        return out


def _moment_arrays(moments: Any) -> dict[str, np.ndarray]:
    """mean, population var/std/cv (results format) and the moments' half-widths."""
    n = moments.n
    population = (n - 1) / n  # MomentsAccumulator reports the sample variance (ddof 1)
    return {
        "mean": moments.mean,
        "var": moments.var * population,
        "std": moments.std * math.sqrt(population),
        "cv": moments.cv * math.sqrt(population),
        "mean_conf": moments.mean_conf,
        "var_conf": moments.var_conf,
    }


def _layer_arrays(
    method: str, main: Any, moments: Any
) -> tuple[dict[str, np.ndarray], int, np.ndarray]:
    """Result arrays of one layer, its constant-unit count and its unit flags."""
    arrays: dict[str, np.ndarray] = {}
    if method == "sobol":
        arrays.update(S1=main.S1, ST=main.ST, S1_conf=main.S1_conf, ST_conf=main.ST_conf)
        if main.S2 is not None:
            arrays.update(S2=main.S2, S2_conf=main.S2_conf)
    elif method == "shapley":
        arrays.update(
            shapley=main.shapley,
            shapley_normalized=main.shapley_normalized,
            shapley_conf=main.shapley_conf,
            shapley_normalized_conf=main.shapley_normalized_conf,
        )
    elif method == "contrast":
        arrays.update(
            mean_diff=main.mean_diff,
            sd_diff=main.sd_diff,
            effect_size=main.effect_size,
            mean_diff_conf=main.mean_diff_conf,
            effect_size_conf=main.effect_size_conf,
        )
    if method in ("sobol", "shapley"):
        arrays.update(index_variance=main.variance, index_variance_conf=main.variance_conf)
    arrays.update(_moment_arrays(moments))
    source = moments if main is None else main
    return arrays, source.n_constant, source.flag


# --------------------------------------------------------------------------------- resume state
def _model_digest(model: nn.Module) -> str:
    state = model.state_dict()
    names = hashlib.sha256(json.dumps(list(state)).encode()).hexdigest()
    return f"{names}:{_tensor_digest(list(state.values()))}"


def _save_state(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically: a killed writer leaves the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_state(path: Path, fields: dict[str, Any], fingerprint: str) -> dict[str, Any] | None:
    """The saved state at ``path`` if it exists; ValueError when it belongs to other inputs."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file gets the same advice
        # Only the type: torch's text for a corrupt file advises weights_only=False (unsafe).
        raise ValueError(
            f"cannot read the resume state {path} ({type(error).__name__}: truncated or "
            f"corrupt); delete it to start afresh"
        ) from error
    if not isinstance(saved, dict) or saved.get("version") != STATE_VERSION:
        raise ValueError(f"{path} is not a resume state of this engine; delete it to start afresh")
    if saved.get("fingerprint") != fingerprint:
        differ = describe_differences(saved.get("fields", {}), fields)
        raise ValueError(
            f"the resume state {path} was written by a different analysis (differs in: "
            f"{differ or 'unknown'}); rerun with the same model, probe, problem and "
            f"settings to continue it, or delete the file to start afresh"
        )
    return saved


# --------------------------------------------------------------------------------- the loop
class _Stopwatch:
    """Adds the seconds since the previous mark to ``timings[phase]``; no-op without a dict."""

    def __init__(self, timings: dict[str, float] | None, device: torch.device, start: float):
        self.timings = timings
        self.sync = timings is not None and device.type == "cuda"
        self.device = device
        self.last = start

    def mark(self, phase: str) -> None:
        if self.timings is None:
            return
        if self.sync:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[phase] = self.timings.get(phase, 0.0) + now - self.last
        self.last = now

    def count(self, rows: int, forwarded: int) -> None:
        if self.timings is not None:
            self.timings["rows"] = self.timings.get("rows", 0) + rows
            self.timings["forwarded"] = self.timings.get("forwarded", 0) + forwarded


def _rows_into(buffers: dict[str, Tensor], key: str, values: Tensor, index: Tensor) -> Tensor:
    """values[index] written into a buffer kept in ``buffers[key]`` from batch to batch: a
    fresh outputs-sized tensor per batch costs page faults on CPU (hundreds of MB)."""
    buffer = buffers.get(key)
    if (
        buffer is None
        or buffer.shape[0] < len(index)
        or buffer.shape[1:] != values.shape[1:]
        or buffer.dtype != values.dtype
        or buffer.device != values.device
    ):
        buffer = buffers[key] = values.new_empty((len(index), *values.shape[1:]))
    return torch.index_select(values, 0, index, out=buffer[: len(index)])


@contextlib.contextmanager
def _memory_format(model: nn.Module, channels_last: bool) -> Iterator[None]:
    """Inside: the model's 4-D parameters and buffers in channels-last format (when asked);
    the ones converted are made contiguous again on exit."""
    converted = []
    if channels_last:
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            if tensor.ndim == 4 and tensor.is_contiguous():
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
                converted.append(tensor)
    try:
        yield
    finally:
        for tensor in converted:
            tensor.data = tensor.data.contiguous()


def _resolve_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialised else 1
    if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if world_size > 1 and not initialised:
        raise ValueError(
            f"world_size={world_size} but torch.distributed is not initialised: the accumulators "
            f"sum their shards through the process group; initialise it (Lightning's DDP does) "
            f"or run with world_size=1"
        )
    return rank, world_size


def _progress(
    config: EngineConfig, design: Design, shard: tuple[int, int], next_block: int,
    rank: int, world_size: int,
) -> Progress:
    """Rank zero's progress over the rows of its shard [start, stop) (blocks), from
    ``next_block`` on (a resumed run); its work line says what the run will forward."""
    start, stop = shard
    per_batch = min(max(1, config.batch_rows // design.block_size), max(1, stop - start))
    rows = (stop - start) * design.block_size
    work = (f"{rows} rows ({stop - start} blocks of {design.block_size} rows, {per_batch} "
            f"blocks per batch)")
    if world_size > 1:
        work += f": this process's shard of {design.n_rows} rows over {world_size} processes"
    return Progress(
        f"{config.method} rank {rank}" if world_size > 1 else config.method, rows, "rows",
        work=work, initial=(next_block - start) * design.block_size,
        enabled=config.progress and rank == 0,
    )


def _rank_zero_seconds(seconds: float, world_size: int, device: torch.device) -> float:
    """``seconds`` as rank zero measured it, on every rank (one broadcast under DDP)."""
    if world_size == 1:
        return seconds
    value = torch.tensor([seconds], dtype=torch.float64, device=device)
    torch.distributed.broadcast(value, src=0)
    return float(value.item())


def run_analysis(
    model: nn.Module,
    problem: AugmentationProblem,
    probe: Tensor | Dataset,
    config: EngineConfig,
    *,
    layer_root: nn.Module | None = None,
    device: torch.device | str | None = None,
    state_path: str | os.PathLike[str] | None = None,
    activation_writer: ActivationWriter | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    timings: dict[str, float] | None = None,
) -> AnalysisResult:
    """Run one analysis of ``model``'s activations over ``problem``; see the module docstring.

    model: ``model(x)`` maps images (B, 3, H, W) in [0, 1] to logits and normalises itself
        (an ImageClassifier). It is moved to ``device`` (default: where its parameters are), run
        in eval mode, and its train/eval flags are restored afterwards.
    probe: the probe images, class-major: a tensor (n_images, 3, H, W) float in [0, 1] or a
        Dataset whose items are such images or (image, label) tuples (loaded lazily, in
        workers with num_workers > 0). n_images = problem.n_classes * images_per_class, twice
        that with a ``partition`` auxiliary (split 0 first).
    layer_root: the module whose ``named_modules()`` names the layers; default ``model.net``
        if it exists, else ``model``.
    state_path: resume file (module docstring); ``checkpoint_every > 0`` to write it.
    activation_writer: receives every row of this rank's shard (global row indices, design
        rows, captured outputs); the caller finalizes it. Not resumable: refused together with
        checkpointing.
    rank, world_size: default to torch.distributed's when initialised, else 0 and 1.
    timings: a dict to receive where the time went, in seconds: "setup" (checks, dry forward,
        accumulator allocation), "data" (decoding rows and loading images, or waiting for the
        workers that do, and the copy to the device), "augment", "forward" (with the hooks),
        "accumulate", "store", "checkpoint", "compute", "results"; and the counts "rows" and
        "forwarded" (rows actually forwarded: fewer with ``deduplicate``). On CUDA the device is
        synchronised at every phase boundary so that each phase is charged its own kernels,
        which removes some overlap: time the overall rate without ``timings``.

    Returns the global AnalysisResult on every rank: "S1"... (sobol), "shapley"... (shapley),
    "mean_diff"... (contrast) and per-unit "mean", "var" (population), "std", "cv", conf
    half-widths for every method.
    """
    started = time.perf_counter()
    if not isinstance(config, EngineConfig):
        raise ValueError(f"config must be an EngineConfig, got {type(config).__name__}")
    config.validate()
    if not isinstance(problem, AugmentationProblem):
        raise ValueError(f"problem must be an AugmentationProblem, got {type(problem).__name__}")
    rank, world_size = _resolve_world(rank, world_size)
    if activation_writer is not None and state_path is not None and config.checkpoint_every:
        raise ValueError(
            "activation storage cannot be resumed (the raw rows of a killed run are lost); use "
            "either an activation_writer or checkpoint_every > 0 with a state_path, not both"
        )
    if isinstance(probe, Tensor) and config.num_workers and probe.device.type != "cpu":
        probe = probe.cpu()  # workers index the probe; they must not touch the accelerator
    source = _Probe(probe, problem)
    design = build_design(problem, config)
    if device is None:
        device = model_device(model)[0]
    device = torch.device(device)
    model.to(device)
    model_dtype = model_device(model)[1]
    root = hooked_module(model, layer_root)
    capture = ActivationCapture(root, config.layers, config.reduction)
    shapes = capture.unit_shapes((source.height, source.width), forward=model)
    if activation_writer is not None:
        expected = {k: tuple(v) for k, v in activation_writer.unit_shapes.items()}
        if expected != shapes or activation_writer.d != problem.d:
            raise ValueError(
                f"the activation writer expects layers {expected} and d={activation_writer.d}, "
                f"but this analysis captures {shapes} with d={problem.d}; build it from "
                f"layer_shapes() and the problem"
            )
    accumulators = _LayerAccumulators(config, problem, shapes, device)
    toggles = toggle_counts(problem, design)
    advice = small_n_advice(toggles, config)
    if advice and rank == 0:
        warnings.warn(advice, SmallSampleWarning, stacklevel=2)

    shard_start, shard_stop = shard_range(design.n_blocks, rank, world_size)
    per_batch = max(1, config.batch_rows // design.block_size)
    next_block, seconds_before = shard_start, 0.0
    path = None if state_path is None else rank_state_path(Path(state_path), rank, world_size)
    fields: dict[str, Any] = {}
    fingerprint = ""
    if path is not None:
        fields = {
            "config": {k: v for k, v in config.to_dict().items()
                       if k not in ("checkpoint_every", "num_workers", "progress")},
            "layers": list(shapes),
            "unit_shapes": {k: list(v) for k, v in shapes.items()},
            "problem": problem.to_config(),
            "design": [type(design).__name__, design.n_blocks, design.block_size, design.d],
            "rank": rank,
            "world_size": world_size,
            "blocks_per_batch": per_batch,
            "image_size": [source.height, source.width],
            "probe": source.fingerprint(),
            "model": _model_digest(model),
        }
        fingerprint = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        saved = _load_state(path, fields, fingerprint)
        if saved is not None:
            accumulators.load_state(saved["states"])
            next_block, seconds_before = int(saved["next_block"]), float(saved["seconds"])
            log.info(
                "resuming %s from %s at row %d of %d: blocks [%d, %d) of this shard already "
                "done", config.method, path, (next_block - shard_start) * design.block_size,
                (shard_stop - shard_start) * design.block_size, shard_start, next_block,
            )

    batches = _batches(shard_start, shard_stop, per_batch, next_block)
    loader = DataLoader(
        _BatchSource(design, problem, source, batches, config.deduplicate),
        batch_size=None,
        shuffle=False,
        num_workers=config.num_workers,
        collate_fn=_keep,
        pin_memory=device.type == "cuda",
    )
    autocast = torch.autocast(
        device.type,
        dtype=torch.float16 if config.precision == "16" else torch.bfloat16,
        enabled=config.precision != "32",
    )
    image_format = torch.channels_last if config.channels_last else torch.contiguous_format
    modes = {module: module.training for module in model.modules()}
    bar = _progress(config, design, (shard_start, shard_stop), next_block, rank, world_size)
    last_saved = next_block
    expanded: dict[str, Tensor] = {}  # reused across batches (deduplicate)
    watch = _Stopwatch(timings, device, started)
    watch.mark("setup")
    model.eval()
    try:
        # Parameters change format outside inference mode: they must stay usable for training.
        with _memory_format(model, config.channels_last), torch.inference_mode(), capture:
            forward = torch.compile(model) if config.compile else model
            for batch in loader:
                unique = batch.images.to(device, model_dtype, non_blocking=True)
                rows_of, decoded = batch.forwarded()
                rows_of = rows_of.to(device)
                watch.mark("data")
                # A block larger than batch_rows (a permutation-Shapley block) is forwarded in
                # chunks; the accumulators still receive whole blocks.
                chunks = []
                for first in range(0, len(rows_of), config.batch_rows):
                    rows = slice(first, first + config.batch_rows)
                    augmented = problem.augment(
                        unique[rows_of[rows]], decoded.select(rows)
                    ).contiguous(memory_format=image_format)
                    watch.mark("augment")
                    with autocast:
                        forward(augmented)
                    chunks.append(capture.pop())
                    watch.mark("forward")
                outputs = (
                    chunks[0] if len(chunks) == 1
                    else {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
                )
                if batch.copies is not None:
                    copies = batch.copies.to(device)
                    outputs = {k: _rows_into(expanded, k, v, copies) for k, v in outputs.items()}
                accumulators.update(
                    outputs, batch.stop - batch.start, batch.permutations, batch.replicate
                )
                watch.mark("accumulate")
                watch.count(len(batch.rows), len(rows_of))
                if activation_writer is not None:
                    rows = np.arange(batch.start * design.block_size,
                                     batch.stop * design.block_size)
                    activation_writer.append(rows, batch.rows, outputs)
                    watch.mark("store")
                bar.update(len(batch.rows))
                if (
                    path is not None
                    and config.checkpoint_every
                    and batch.stop - last_saved >= config.checkpoint_every
                    and batch.stop < shard_stop
                ):
                    _save_state(path, {
                        "version": STATE_VERSION,
                        "fingerprint": fingerprint,
                        "fields": fields,
                        "next_block": batch.stop,
                        "seconds": seconds_before + time.perf_counter() - started,
                        "states": accumulators.state(),
                    })
                    last_saved = batch.stop
                    watch.mark("checkpoint")
                # Free this batch's outputs before the next forward allocates its own: the peak
                # holds one batch of activations, not two.
                del outputs, chunks, augmented
            computed = accumulators.compute()
            watch.mark("compute")
    finally:
        bar.close()
        for module, mode in modes.items():
            module.training = mode
    seconds = _rank_zero_seconds(seconds_before + time.perf_counter() - started, world_size,
                                 device)

    layers: dict[str, dict[str, np.ndarray]] = {}
    n_constant: dict[str, int] = {}
    flags: dict[str, np.ndarray] = {}
    for layer, (main, moments) in computed.items():
        layers[layer], n_constant[layer], flags[layer] = _layer_arrays(
            config.method, main, moments
        )
    main, moments = next(iter(computed.values()))
    result = AnalysisResult(
        method=config.method,
        group_names=(
            list(problem.augmentations) if config.method == "contrast" else problem.group_names
        ),
        layers=layers,
        n=config.n,
        evaluations=design.n_rows,
        seconds=seconds,
        n_constant=n_constant,
        flags=flags,
        interval=(moments if main is None else main).interval,
        replicates=config.effective_replicates,
        toggles=toggles,
    )
    if path is not None:
        path.unlink(missing_ok=True)
    watch.mark("results")
    return result
