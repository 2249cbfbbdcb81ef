"""The figure of a suppression experiment (``sensitivity.suppression``): test top-1 accuracy
against the nuisance's distortion strength, per method, on ``sensitivity.report``'s Agg figures
(no pyplot)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from sensitivity.report import new_figure, save_figure
from sensitivity.suppression import SuppressionResult


def suppression_figure(result: SuppressionResult) -> Figure:
    """Test top-1 accuracy against distortion strength (0: clean): the unmasked network, the
    chosen suppression, and the random controls' mean with a band of +- one standard deviation
    (min to max as thin dotted lines).

    Args:
        result: the suppression result.

    Returns:
        The figure; its lines carry gids "unmasked", "suppression", "random_mean",
        "random_min", "random_max" (tests read their y-data).
    """
    x = np.concatenate([[0.0], result.strengths])
    figure = new_figure(6.0, 4.0)
    ax = figure.add_subplot()
    ax.plot(x, result.test_unmasked_acc1, "o-", color="0.3", label="unmasked", gid="unmasked")
    ax.plot(x, result.test_chosen_acc1, "s-", color="C0", gid="suppression",
            label=f"suppression {result.chosen}")
    random = result.test_random_acc1
    if len(random):
        mean, spread = random.mean(axis=0), random.std(axis=0)
        ax.plot(x, mean, "^--", color="C3", gid="random_mean",
                label=f"random, same units per layer (mean +- sd of {len(random)})")
        ax.fill_between(x, mean - spread, mean + spread, color="C3", alpha=0.2, linewidth=0)
        for gid, values in (("random_min", random.min(axis=0)),
                            ("random_max", random.max(axis=0))):
            ax.plot(x, values, ":", color="C3", linewidth=0.8, gid=gid)
    ax.set_xlabel(f"{result.variable} distortion strength s (0: clean)")
    ax.set_ylabel("test top-1 accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(x)
    ax.set_title(f"suppressing {result.variable} ({result.value} maps of {result.analysis}; "
                 f"chosen on validation by {result.criterion})", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    return figure


def save_suppression_figure(result: SuppressionResult, out_dir: str | Path, name: str) -> Path:
    """Write the figure as ``<out_dir>/<name>_suppression.png``.

    Args:
        result: the suppression result.
        out_dir: the folder (created when missing).
        name: file name stem.

    Returns:
        The path written.
    """
    return save_figure(suppression_figure(result), out_dir, f"{name}_suppression.png")
