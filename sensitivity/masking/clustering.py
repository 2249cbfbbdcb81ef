"""Hierarchical clustering of masking profiles (the reference's prediction/hca step).

Every (input set, mask variable) pair of a masking result has a profile: what the network does
on that input under that variable's masks, over the configurations (``MaskingResult.profiles``:
top-1 accuracies, per-class accuracies or confusion rates). Profiles that move together group
the variables whose masks act alike and the input augmentations they hurt alike.

Distance (``metric``):

- ``spearman`` (default, the reference's): d = sqrt(1 - |rho|), rho the Spearman correlation of
  two profiles; anti-correlated profiles count as close, as in the reference. Profiles with the
  same ranks are at 0 (up to round-off). A constant profile has no ranking, and Spearman's rho is
  undefined: two constant profiles (the same, all tied, ranks) are at 0, a constant profile and
  a varying one at 1 (rho taken as 0).
- ``euclidean``: the Euclidean distance of the profiles (the only metric for the centroid,
  median and ward methods, which assume it).

The linkage is ``scipy.cluster.hierarchy.linkage`` of the condensed distance matrix with
``method`` (default ``average``, the reference's); the flat clusters are
``fcluster(linkage, threshold, criterion="distance")``: profiles joined at a cophenetic distance
of at most ``threshold``. The default threshold is 0.7 times the largest merge distance, the
height below which ``scipy.cluster.hierarchy.dendrogram`` colours its clusters, so that the
dendrogram's colours are the stored clusters (the reference cut its Spearman distance at 0.025).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.cluster.hierarchy
import scipy.spatial.distance
import scipy.stats

if TYPE_CHECKING:
    from sensitivity.masking.result import MaskingResult

METRICS = ("spearman", "euclidean")
METHODS = ("single", "complete", "average", "weighted", "centroid", "median", "ward")
# Methods whose update rule assumes Euclidean distances between the observations.
EUCLIDEAN_METHODS = ("centroid", "median", "ward")
# The default cut, as a share of the largest merge distance (scipy's dendrogram colouring).
DEFAULT_CUT = 0.7
# The subgroup of /masking/<name> that holds the clustering.
SUBGROUP = "clustering"


def check_clustering(method: str, metric: str, threshold: float | None = None) -> None:
    """ValueError for an unknown method or metric, a method that needs Euclidean distances
    with another metric, or a negative threshold (call it before any computation)."""
    if method not in METHODS:
        raise ValueError(f"unknown cluster method {method!r}; valid: {list(METHODS)}")
    if metric not in METRICS:
        raise ValueError(f"unknown cluster metric {metric!r}; valid: {list(METRICS)}")
    if method in EUCLIDEAN_METHODS and metric != "euclidean":
        raise ValueError(f"cluster method {method!r} assumes Euclidean distances; pass metric "
                         f"'euclidean' or a method among {list(METHODS[:4])}")
    if threshold is not None and not threshold >= 0.0:
        raise ValueError(f"the cluster threshold must be a distance >= 0, got {threshold}")


def spearman_distance(profiles: np.ndarray) -> np.ndarray:
    """(n, n) sqrt(1 - |rho|) between the rows of ``profiles`` (n, F) (module docstring).

    The Spearman correlation is the Pearson correlation of the rows' ranks (ties averaged),
    computed here so that constant rows get the documented distances instead of NaN.
    """
    ranks = scipy.stats.rankdata(profiles, axis=1)
    centred = ranks - ranks.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    varying = norms > 0
    scaled = np.divide(centred, norms[:, None], out=np.zeros_like(centred),
                       where=varying[:, None])
    rho = np.clip(scaled @ scaled.T, -1.0, 1.0)
    # Two constant rows have the same (all tied) ranks: distance 0, not the 1 of rho = 0.
    rho[~varying[:, None] & ~varying[None, :]] = 1.0
    return np.sqrt(1.0 - np.abs(rho))


def profile_distance(profiles: np.ndarray, metric: str) -> np.ndarray:
    """(n, n) distances between the rows of ``profiles`` (n, F), symmetric, zero diagonal."""
    if metric == "spearman":
        distance = spearman_distance(profiles)
    else:
        distance = scipy.spatial.distance.squareform(
            scipy.spatial.distance.pdist(profiles, metric))
    distance = (distance + distance.T) / 2.0  # exact symmetry for squareform
    np.fill_diagonal(distance, 0.0)
    return distance


@dataclass
class ProfileClustering:
    """A hierarchical clustering of masking profiles.

    Attributes:
        labels: (n,) "<input> | <mask variable>", input-major (row i V + v).
        profiles: (n, F) float64, the profiles clustered (``MaskingResult.profiles``).
        distance: (n, n) float64, their distances (``metric``).
        linkage: (n - 1, 4) float64, scipy's linkage matrix (merged clusters, distance,
            size).
        clusters: (n,) int64, the flat cluster of each profile, 1..K.
        profile: what the profiles are ("top1", "per_class", "confusion").
        method, metric: the linkage method and the distance.
        threshold: the cut distance of the flat clusters.
    """

    labels: list[str]
    profiles: np.ndarray
    distance: np.ndarray
    linkage: np.ndarray
    clusters: np.ndarray
    profile: str
    method: str
    metric: str
    threshold: float

    @property
    def count(self) -> int:
        """K, the number of flat clusters."""
        return int(self.clusters.max())

    def members(self) -> list[list[str]]:
        """The labels of each flat cluster 1..K, in label order."""
        return [[label for label, c in zip(self.labels, self.clusters, strict=True) if c == k]
                for k in range(1, self.count + 1)]

    def arrays(self) -> dict[str, np.ndarray]:
        """The datasets of /masking/<name>/clustering (docs/RESULTS_FORMAT.md)."""
        return {f"{SUBGROUP}/{key}": np.asarray(getattr(self, key)) for key in
                ("labels", "profiles", "distance", "linkage", "clusters")}

    def attrs(self) -> dict[str, Any]:
        """The attributes it adds to the /masking/<name> group."""
        return {"cluster_profile": self.profile, "cluster_method": self.method,
                "cluster_metric": self.metric, "cluster_threshold": self.threshold,
                "cluster_count": self.count}

    @classmethod
    def from_group(
        cls, arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any]
    ) -> ProfileClustering:
        """The clustering back from the stored subgroup's arrays and the group's attrs."""
        return cls(
            labels=[str(label) for label in arrays["labels"]],
            profiles=np.asarray(arrays["profiles"]), distance=np.asarray(arrays["distance"]),
            linkage=np.asarray(arrays["linkage"]),
            clusters=np.asarray(arrays["clusters"], dtype=np.int64),
            profile=str(attrs["cluster_profile"]), method=str(attrs["cluster_method"]),
            metric=str(attrs["cluster_metric"]), threshold=float(attrs["cluster_threshold"]),
        )


def cluster_profiles(
    profiles: np.ndarray,
    labels: Sequence[str],
    *,
    method: str = "average",
    metric: str = "spearman",
    threshold: float | None = None,
    profile: str = "top1",
) -> ProfileClustering:
    """Cluster the rows of ``profiles`` hierarchically.

    Args:
        profiles: (n, F) one profile per row, n >= 2, finite.
        labels: (n,) their names.
        method, metric: the linkage method and the distance (module docstring).
        threshold: the cut distance; None: 0.7 times the largest merge distance.
        profile: what the profiles are, recorded.

    Returns:
        The clustering.
    """
    check_clustering(method, metric, threshold)
    profiles = np.asarray(profiles, dtype=np.float64)
    if profiles.ndim != 2 or len(profiles) < 2 or len(labels) != len(profiles):
        raise ValueError(f"need n >= 2 profiles (n, F) and n labels, got {profiles.shape} and "
                         f"{len(labels)} labels")
    if not np.isfinite(profiles).all():
        raise ValueError("profiles must be finite")
    distance = profile_distance(profiles, metric)
    linkage = scipy.cluster.hierarchy.linkage(
        scipy.spatial.distance.squareform(distance, checks=False), method)
    cut = DEFAULT_CUT * float(linkage[:, 2].max()) if threshold is None else float(threshold)
    clusters = scipy.cluster.hierarchy.fcluster(linkage, cut, criterion="distance")
    return ProfileClustering(list(labels), profiles, distance, linkage,
                             clusters.astype(np.int64), profile, method, metric, cut)


def cluster_masking(
    result: MaskingResult,
    *,
    method: str = "average",
    metric: str = "spearman",
    threshold: float | None = None,
) -> ProfileClustering | None:
    """Cluster the (input set, mask variable) profiles of ``result`` (its ``profile``).

    Args:
        result: a masking result.
        method, metric, threshold: as ``cluster_profiles``.

    Returns:
        The clustering of the I V profiles (input-major), None when there are fewer than two.
    """
    profiles = result.profiles()
    n_inputs, n_variables = profiles.shape[:2]
    if n_inputs * n_variables < 2:
        check_clustering(method, metric, threshold)
        return None
    labels = [f"{name} | {variable}" for name in result.inputs for variable in result.variables]
    return cluster_profiles(profiles.reshape(n_inputs * n_variables, -1), labels,
                            method=method, metric=metric, threshold=threshold,
                            profile=result.profile)
