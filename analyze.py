"""Analyse a network's activations: ``python analyze.py sobol|shapley|variance|contrast [options]``.

Per layer and unit, how much of each activation's variance each augmentation (and the order,
class and image variables) explains: Sobol indices, Shapley effects, per-unit moments, or paired
treatment-control contrasts (METHOD.md). On a stored analysis (``--results RUN/results.h5
--analysis NAME``): ``masking|single-class`` (they run the network) and
``contrast-stats|correlation|lda|compare|report``, and ``suppress`` (a nuisance's units
attenuated, chosen on a validation split, reported on a test split); results go into the same
file.

``python analyze.py sobol`` alone runs the CPU demo (configs/analyze/demo.yaml); presets for the
published ImageNet settings are in configs/analyze/. Options, outputs, W&B, several processes
and exit statuses (2: bad input, nothing written; 1: results written, W&B failed): docs/CLI.md.

This file only dispatches to the ``cli`` package (docs/ARCHITECTURE.md).
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
    build_suppress_parser,
    normalise_args,
    requested_method,
)
from cli.statistics import run_statistics
from cli.suppress import run_suppress
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
    "build_suppress_parser",
    "main",
    "normalise_args",
    "requested_method",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI.

    Several processes (devices > 1) need the command line: Lightning relaunches this script
    with ``sys.argv`` for the other ranks.

    Args:
        argv: the arguments (default: the command line).

    Returns:
        The exit status: 0, 1 (results written, W&B failed) or 2 (bad input).
    """
    args = normalise_args(sys.argv[1:] if argv is None else argv)
    method = requested_method(args)
    if method == "suppress":
        return run_suppress(args)
    if method in STATISTICS:
        return run_statistics(method, args)
    parser = build_parser()
    try:
        cfg = parser.parse_args(args)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if cfg.method in MASKING_METHODS:
        return run_masking(cfg)
    return run_engine(cfg, parser.dump(cfg))


if __name__ == "__main__":
    sys.exit(main())
