"""The dendrogram of a clustering of masking profiles (``clustering.ProfileClustering``), drawn
on ``sensitivity.report``'s Agg figures (no pyplot)."""

from __future__ import annotations

from pathlib import Path

import scipy.cluster.hierarchy
from matplotlib.figure import Figure

from sensitivity.masking.clustering import ProfileClustering
from sensitivity.masking.result import PROFILES
from sensitivity.report import new_figure, save_figure

_DISTANCES = {"spearman": r"$\sqrt{1 - |\rho_{\mathrm{Spearman}}|}$",
              "euclidean": "Euclidean distance"}


def dendrogram_figure(clustering: ProfileClustering) -> Figure:
    """The dendrogram of ``clustering``, leaves on the left, one per (input, mask variable).

    Args:
        clustering: the clustering.

    Returns:
        The figure: links below the cut coloured by flat cluster (the stored clusters), the
        cut drawn as a dotted line, leaf labels "<input> | <mask variable>" in dendrogram
        order.
    """
    n = len(clustering.labels)
    figure = new_figure(7.0, max(3.0, 1.2 + 0.22 * n))
    ax = figure.add_subplot()
    scipy.cluster.hierarchy.dendrogram(
        clustering.linkage, labels=clustering.labels, orientation="right", ax=ax,
        color_threshold=clustering.threshold, above_threshold_color="0.4", leaf_font_size=8,
    )
    ax.axvline(clustering.threshold, color="black", linestyle=":", linewidth=1.0)
    ax.set_xlabel(_DISTANCES[clustering.metric])
    ax.set_title(
        f"masking profiles ({PROFILES[clustering.profile]})\n{clustering.method} linkage, "
        f"{clustering.count} clusters at distance {clustering.threshold:.3g}", fontsize=10,
    )
    return figure


def save_dendrogram(clustering: ProfileClustering, out_dir: str | Path, name: str) -> Path:
    """Write the dendrogram as ``<out_dir>/<name>_masking_dendrogram.png``.

    Args:
        clustering: the clustering.
        out_dir: the folder (created when missing).
        name: file name stem.

    Returns:
        The path written.
    """
    return save_figure(dendrogram_figure(clustering), out_dir, f"{name}_masking_dendrogram.png")
