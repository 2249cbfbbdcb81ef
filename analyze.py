"""Analyse a network's activations: ``python analyze.py sobol|shapley|variance|contrast [options]``.

Statistics of a stored analysis: ``python analyze.py contrast-stats|correlation|lda|report
--results RUN/results.h5 --analysis NAME`` (Wilcoxon tests, Spearman correlations, LDA, the HTML
report; written into the same results file / RUN/report).

Guided masking and the single-class analysis of a stored analysis: ``python analyze.py
masking|single-class --results RUN/results.h5 --analysis NAME`` with the model and data options
of the analysis (they run the network; results go into the same file).

Per layer and unit, how much of each activation's variance each augmentation (and the order,
class and image variables) explains: Sobol indices, Shapley effects, per-unit moments, or paired
treatment-control contrasts (METHOD.md). ``python analyze.py sobol`` alone runs the embedded
demo (configs/analyze/demo.yaml: planted-factor images, 64 px, ResNet18); presets for the
published ImageNet settings are in configs/analyze/ (``--config imagenet_sobol --arch alexnet``).
``python analyze.py --help`` lists every option; docs/CLI.md explains them.

Outputs go to the run directory (``--output``, default ``runs/analysis/<name>/version_<n>``):
results.h5 (docs/RESULTS_FORMAT.md), figures/<name>_<key>.png heatmaps, config.yaml and, with
``--store-activations``, activations_<name>.h5 (every design row once, linked from results.h5).
Every command but report also logs to Weights & Biases (docs/CLI.md "W&B"): an offline run in
<run directory>/wandb/ for ``wandb sync`` by default, online with WANDB_MODE=online or
``--wandb_project NAME``, none with ``--wandb false`` or WANDB_MODE=disabled.

Several processes (``--devices 2 --strategy ddp``, torchrun, SLURM) are launched by Lightning's
Trainer; each analyses its shard of the design and rank zero writes. Bad input (unknown layer,
Sobol n not a power of two, a checkpoint of another architecture, an empty image folder...) is
reported on stderr with exit status 2 before any output is created; exit status 1 means the
results were written but W&B logging failed.

This file only dispatches: each family of commands lives in the ``cli`` package (``cli.options``
the parsers, ``cli.analysis``, ``cli.statistics``, ``cli.masking``; docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cli.analysis import run_engine
from cli.inputs import build_probe
from cli.masking import run_masking
from cli.options import (
    MASKING_METHODS,
    PRESETS,
    STATISTICS,
    build_parser,
    build_statistics_parser,
    normalise_args,
    requested_method,
)
from cli.statistics import run_statistics
from sensitivity.config import METHODS

# What tests and docs/CLI.md reach through ``analyze``: the parsers, the method names, the
# preset folder, and the probe of a command line.
__all__ = [
    "MASKING_METHODS",
    "METHODS",
    "PRESETS",
    "STATISTICS",
    "build_parser",
    "build_probe",
    "build_statistics_parser",
    "main",
    "normalise_args",
    "requested_method",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default: the command line); returns the exit status.

    Several processes (devices > 1) need the command line: Lightning relaunches this script
    with ``sys.argv`` for the other ranks.
    """
    args = normalise_args(sys.argv[1:] if argv is None else argv)
    method = requested_method(args)
    if method in STATISTICS:
        return run_statistics(method, args)
    parser = build_parser()
    try:
        cfg = parser.parse_args(args)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if cfg.method in MASKING_METHODS:
        return run_masking(cfg, parser.dump(cfg))
    return run_engine(cfg, parser.dump(cfg))


if __name__ == "__main__":
    sys.exit(main())
