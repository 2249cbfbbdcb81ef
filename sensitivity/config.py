"""The settings of one analysis: ``EngineConfig``, the values it accepts, the design it builds
and what a results file records of it (docs/RESULTS_FORMAT.md).

The one definition of the engine's settings: the command line (analyze.py), the training
callback, the Lightning module and the engine all take an ``EngineConfig``; ``build_design``
turns it into the sampling design and ``analysis_attrs`` into the attributes of
/analyses/<name>. Imports numpy, ``sensitivity.designs`` and ``sensitivity.layouts`` only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sensitivity.designs import (
    ContrastDesign,
    Design,
    PermutationDesign,
    ShapleyDesign,
    SobolDesign,
    VarianceDesign,
    check_power_of_two,
)
from sensitivity.layouts import check_layouts

if TYPE_CHECKING:
    from sensitivity.problem import AugmentationProblem

METHODS = ("sobol", "shapley", "variance", "contrast")
SHAPLEY_METHODS = ("goda", "permutation")
SAMPLINGS = ("rqmc", "mc")
PRECISIONS = ("32", "bf16", "16")
# The fewest base points (trajectories) in which a variable may change for its indices: a
# mean of k non-zero terms has a relative standard error of about 1 / sqrt(k), so 16 keeps it
# near 25% (a 95% interval of about +-50% of the index). Fewer: a warning with the n to use.
MIN_TOGGLES = 16
# The smallest value of each integer setting (validate); below it the design or the loop
# would be empty or meaningless.
_MINIMUM = {"n": 2, "n_outer": 1, "n_inner": 2, "contrast_k": 1, "batch_rows": 1,
            "checkpoint_every": 0, "num_workers": 0, "seed": 0, "replicates": 2}


@dataclass
class EngineConfig:
    """Settings of one analysis run; construction validates them (ValueError).

    Attributes:
        method: "sobol" | "shapley" | "variance" | "contrast".
        n: Sobol base points (a power of two), Shapley trajectories (goda) or permutations
            (permutation), variance rows, or contrast probe images.
        seed: design seed; the same seed and inputs give the same result.
        sampling: Sobol base points: "rqmc" (randomised quasi-Monte Carlo: ``replicates``
            independently scrambled Sobol' sequences, half-widths from Student's t over the
            replicate estimates) or "mc" (i.i.d. uniform points, half-widths from the delta
            method over base points). Either way the switch, class, image (and short order)
            columns are drawn balanced (``designs.BalancedPairs``).
        replicates: rqmc replicates (a power of two >= 2; at most n are used).
        second_order: Sobol S2 (2G + 2 rows per base point instead of G + 2).
        shapley_method: "goda" (trajectories, G + 1 rows each) or "permutation" (Song, Nelson
            and Staum: G * n_outer * n_inner rows per permutation).
        n_outer: outer draws per position of a permutation ("permutation" only).
        n_inner: inner draws per outer draw ("permutation" only; >= 2 for a variance).
        contrast_k: parameter draws per augmentation and image for "contrast".
        layers: checkpoint module names of the hooked module; None -> capture.default_layers.
            "<module>:<index or key>" captures one element of a module that returns a tuple or
            dict (e.g. "encoder.layers.encoder_layer_1.self_attention:0").
        reduction: "none" (every element a unit) | "channel_mean" (one unit per channel or
            hidden feature: the mean over pixels or tokens) | "cls_token" (the class token of a
            ViT encoder), or {layer: reduction}.
        layouts: {layer: layout} for layers whose output layout is not detected (or to
            override it): "nchw" (B, C, H, W), "nhwc" (B, H, W, C), "tokens" (B, L, D),
            "tokens_cls" (B, L, D) with a class token at index 0, "flat" (B, F); None: every
            layout detected (torchvision's CNNs, ViT, Swin, MaxViT).
        batch_rows: rows per forward pass. Batches hold whole design blocks (as many as fit, at
            least one); a block larger than batch_rows is forwarded in chunks of batch_rows
            rows, its captured outputs (block_size x units) held until the block is complete.
        checkpoint_every: design blocks between resume checkpoints; 0 = off.
        precision: "32", "bf16" or "16" (float16): autocast on the forward only; accumulation
            is always float64. docs/PERFORMANCE.md gives the speed and the effect on the
            indices. The integers 32 and 16 are read as their strings (YAML reads an unquoted
            16 as a number).
        num_workers: DataLoader workers decoding rows and loading probe images (0: in
            process). With workers the next batches are prepared (and pinned, on CUDA) while
            the device works.
        progress: on rank zero (stderr): the work up front, then a progress bar with rows/s and
            ETA on a terminal, a plain line per tenth of the rows (or 30 s) otherwise.
        conf_level: confidence level of the ``*_conf`` half-widths.
        deduplicate: forward each distinct augmented image of a batch once. Rows that decode to
            the same probe image with the same active augmentations, in the same relative
            order, with the same parameters (e.g. AB_j of an augmentation switched off in both
            A and B) give the same outputs: 22-24% of a Sobol' design's rows at p_on = 0.5.
            Outputs equal those of a full forward up to the batch-composition round-off of the
            kernels (none on the CPUs measured: bit-identical results).
        channels_last: run the forward in channels-last memory format (faster convolutions on
            most CPUs and GPUs); the model's parameters are converted back afterwards. Outputs
            change by float round-off (another summation order), and so do the indices.
        compile: ``torch.compile`` the model's forward for this run. The compile time (seconds
            to minutes) is paid by the first run in a process (later runs reuse the compiled
            code), and the capture hooks break the compiled graph at every checkpoint, so it
            rarely pays off (docs/PERFORMANCE.md). Outputs change by float round-off.
        threads: torch's intra-op threads for the forward passes (None: torch's current
            setting); restored afterwards. The augmentation and the accumulation run with one
            intra-op thread whatever this says: under a competing load their many short
            parallel regions stall on a descheduled thread and ran 2x slower with 2 threads
            than with 1 (docs/PERFORMANCE.md, "Threads").
        accumulation_threads: worker threads taking chunks of units in the accumulation and
            in compute(), each with one intra-op thread; results are identical for any number.
            1 (the default) is never slower than itself under load; more are faster on a
            machine of one's own (2 workers: 1.2-1.5x on 2 cores) but were 2x slower than 1
            with another job on the cores (Python's lock passes between the workers).
        background: one more thread (sensitivity.background, one intra-op thread) loads and
            augments the next batch and sums each layer's outputs as the forward makes them
            (making each layer's sums there the first time), and compute() takes one more
            chunk worker. The results are identical; the peak can hold two batches' outputs
            instead of one. None (the default): on the CPU when the process has more than one
            core, whatever ``threads`` is; on 2 cores it was the fastest setting at 1 and 2
            forward threads, quiet and under a competing load. False keeps the analysis to
            ``threads`` busy threads (e.g. ``threads=1`` on a machine shared with others).
        target_halfwidth: adaptive N (sobol and shapley; METHOD.md "Adaptive N"): start at n
            and double N (Sobol' base points: each replicate's sequence extended; trajectories or
            permutations) until every layer's ``halfwidth_quantile`` quantile of the half-widths
            of its valid units' main indices (S1 and ST; Shapley shares) is at most this, or N
            reaches ``max_n``. None: a fixed N = n.
        max_n: the largest N an adaptive run may reach (a power of two for Sobol'); required
            with ``target_halfwidth``.
        halfwidth_quantile: the quantile, in (0, 1], of a layer's half-widths that must meet
            ``target_halfwidth`` (1: every valid unit's).
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
    layouts: dict[str, str] | None = None
    batch_rows: int = 256
    checkpoint_every: int = 0
    # int too: configuration files (YAML) and the command line give 16 and 32 as numbers.
    precision: str | int = "32"
    num_workers: int = 0
    progress: bool = True
    conf_level: float = 0.95
    deduplicate: bool = False
    channels_last: bool = False
    compile: bool = False
    threads: int | None = None
    accumulation_threads: int = 1
    background: bool | None = None
    target_halfwidth: float | None = None
    max_n: int | None = None
    halfwidth_quantile: float = 0.9

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every setting; normalises ``precision`` to a string.

        Raises:
            ValueError: naming the first invalid setting and the valid values.
        """
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
        for name, low in _MINIMUM.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("n", "replicates") if self.method == "sobol" else ():
            check_power_of_two(name, getattr(self, name))
        if not 0.0 < float(self.conf_level) < 1.0:
            raise ValueError(f"conf_level must lie strictly between 0 and 1, got {self.conf_level}")
        if isinstance(self.layers, str):
            raise ValueError(f"layers must be a list of module names, got {self.layers!r}")
        if self.layouts is not None:
            check_layouts(self.layouts)
        for name in ("deduplicate", "channels_last", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        t = self.threads
        if t is not None and (isinstance(t, bool) or not isinstance(t, int | np.integer) or t < 1):
            raise ValueError(f"threads must be a positive integer or None (torch's), got {t!r}")
        if self.background is not None and not isinstance(self.background, bool):
            raise ValueError(
                f"background must be True, False or None (automatic), got {self.background!r}"
            )
        t = self.accumulation_threads
        if isinstance(t, bool) or not isinstance(t, int | np.integer) or t < 1:
            raise ValueError(f"accumulation_threads must be a positive integer, got {t!r}")
        self._validate_adaptive()

    def _validate_adaptive(self) -> None:
        """Check target_halfwidth, max_n and halfwidth_quantile (ValueError naming the fix)."""
        q = self.halfwidth_quantile
        if isinstance(q, bool) or not isinstance(q, int | float) or not 0.0 < q <= 1.0:
            raise ValueError(
                f"halfwidth_quantile must lie in (0, 1] (0.5: the median half-width, 1: the "
                f"largest), got {q!r}"
            )
        eps, max_n = self.target_halfwidth, self.max_n
        if eps is None:
            if max_n is not None:
                raise ValueError(
                    f"max_n ({max_n}) applies only to an adaptive run: give target_halfwidth "
                    f"too, or drop max_n"
                )
            return
        if (isinstance(eps, bool) or not isinstance(eps, int | float)
                or not math.isfinite(eps) or eps <= 0):
            raise ValueError(f"target_halfwidth must be a number > 0, got {eps!r}")
        if self.method not in ("sobol", "shapley"):
            raise ValueError(
                f"target_halfwidth (adaptive N) applies to sobol and shapley, not {self.method}"
            )
        if max_n is None:
            raise ValueError(
                "target_halfwidth needs max_n, the largest N the run may grow to (it bounds "
                "the cost)"
            )
        if isinstance(max_n, bool) or not isinstance(max_n, int | np.integer) or max_n < self.n:
            raise ValueError(f"max_n must be an integer >= n ({self.n}), got {max_n!r}")
        if self.method == "sobol":
            check_power_of_two("max_n", max_n)

    def to_dict(self) -> dict[str, Any]:
        """A plain mapping of the settings (for metadata and resume fingerprints).

        Returns:
            {field name: value}, every field of the dataclass.
        """
        return dataclasses.asdict(self)

    @property
    def adaptive(self) -> bool:
        """Whether the data choose N (``target_halfwidth`` given)."""
        return self.target_halfwidth is not None

    @property
    def design_n(self) -> int:
        """Blocks of the design: ``max_n`` for an adaptive run, else n."""
        return self.max_n if self.adaptive and self.max_n is not None else self.n

    @property
    def effective_replicates(self) -> int:
        """Replicates the Sobol' design uses: min(replicates, n) with rqmc, else 1."""
        if self.method != "sobol" or self.sampling != "rqmc":
            return 1
        return min(self.replicates, self.n)


def build_design(problem: AugmentationProblem, config: EngineConfig) -> Design:
    """The design of ``config.method`` over ``problem``'s columns and groups.

    Args:
        problem: the augmentation problem (its d columns, groups and discrete columns).
        config: the analysis settings; validated again here.

    Returns:
        A ``SobolDesign``, ``ShapleyDesign``, ``PermutationDesign``, ``VarianceDesign`` or
        ``ContrastDesign`` of ``config.n`` blocks (``max_n`` blocks in stages of doubling
        size for an adaptive run, the first n of them the design of n).

    Raises:
        ValueError: for invalid settings or a problem the design cannot take (e.g. contrast
            with an always-on augmentation).
    """
    config.validate()
    groups = problem.group_columns
    if config.method == "sobol":
        return SobolDesign(
            problem.d, config.design_n, config.seed, groups, config.second_order,
            replicates=config.effective_replicates,
            sampling="sobol" if config.sampling == "rqmc" else "random",
            discrete=problem.discrete_columns(), first_stage=config.n,
        )
    if config.method == "shapley" and config.shapley_method == "goda":
        return ShapleyDesign(
            problem.d, config.design_n, config.seed, groups, discrete=problem.discrete_columns(),
            first_stage=config.n,
        )
    if config.method == "shapley":
        return PermutationDesign(
            problem.d, config.design_n, config.n_outer, config.n_inner, config.seed, groups
        )
    if config.method == "variance":
        return VarianceDesign(problem.d, config.n, config.seed)
    return ContrastDesign(problem, config.n, config.contrast_k, config.seed)


def analysis_attrs(config: EngineConfig, design: Design) -> dict[str, Any]:
    """What the results file records of an analysis's settings (docs/RESULTS_FORMAT.md).

    Args:
        config: the analysis settings.
        design: the run's design (``AnalysisPlan.design``, ``build_design``).

    Returns:
        The attributes of /analyses/<name> besides the standard ones, as plain values:
        "design" (class name) and "block_size" (rows per block) of the design, "seed",
        "min_toggles", "reduction", "precision", "conf_level", the forward options
        "deduplicate", "channels_last", "compile", and the method's own settings
        ("second_order" and "sampling" for Sobol; "shapley_method", plus "n_outer" and
        "n_inner" for permutations; "contrast_k"), and for an adaptive run "n_start",
        "max_n", "target_halfwidth" and "halfwidth_quantile" (the engine adds what it reached).
    """
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
    if config.adaptive:
        attrs.update(n_start=config.n, max_n=config.max_n,
                     target_halfwidth=float(config.target_halfwidth),
                     halfwidth_quantile=float(config.halfwidth_quantile))
    return attrs
