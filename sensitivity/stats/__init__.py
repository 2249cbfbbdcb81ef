"""Statistics on stored analyses (METHOD.md sections 7 and 10), one module each:

- ``wilcoxon``: treatment-control tests on the raw activations of a contrast analysis
  (``--store-activations``): Wilcoxon signed-rank test per unit, its rank-biserial correlation,
  and a Benjamini-Yekutieli correction applied per layer and augmentation
  (``contrast_statistics``);
- ``correlation``: Spearman correlation between the sensitivity maps of two variables across
  units, and against the unit covariates mean, variance and CV (``correlation_statistics``);
- ``lda``: linear discriminant analysis of channel maps by variable (``lda_statistics``);
- ``comparison``: two analyses of one network compared (Sobol' against Shapley): Spearman
  correlation of their maps per variable, of each map against mean, variance and CV, and the
  decay of each variable's largest values (``comparison_statistics``);
- ``groups``: the /wilcoxon, /correlation, /lda, /comparison groups of the results file,
  written and read (``read_tree``) through ``ResultsStore``; layout in docs/RESULTS_FORMAT.md.

Correlation, LDA and comparison leave out the units the analysis flagged
(``AnalysisResult.flags``): their raw indices can be anything (1e16, -25) and would dominate
ranks and features. The array functions are pure numpy/scipy/scikit-learn; the ``*_statistics``
functions read an analysis from a results file and write their result next to it. With
``progress`` (default) they report their work up front and then per layer (Wilcoxon,
comparison), per layer and value type (correlation) or per LDA fit, on stderr
(``sensitivity.progress``). No Lightning, no wandb.
"""

from sensitivity.stats.comparison import (
    DEFAULT_TOP,
    LayerMaps,
    comparison_statistics,
    cross_spearman,
    layer_maps,
    top_values,
)
from sensitivity.stats.correlation import (
    MIN_CORRELATION_UNITS,
    MapCorrelation,
    correlation_statistics,
    map_correlations,
    spearman_by_position,
)
from sensitivity.stats.groups import (
    COMPARISON_GROUP,
    CORRELATION_GROUP,
    COVARIATES,
    LDA_GROUP,
    SENSITIVITY_KEYS,
    WILCOXON_GROUP,
    read_tree,
)
from sensitivity.stats.lda import LdaResult, lda_channel_maps, lda_samples, lda_statistics
from sensitivity.stats.wilcoxon import (
    ASYMPTOTIC,
    EXACT,
    PERMUTATION,
    TEST_METHODS,
    SignedRankResult,
    by_correction,
    contrast_statistics,
    paired_differences,
    signed_rank_test,
)

__all__ = [
    "ASYMPTOTIC",
    "COMPARISON_GROUP",
    "CORRELATION_GROUP",
    "COVARIATES",
    "DEFAULT_TOP",
    "EXACT",
    "LDA_GROUP",
    "MIN_CORRELATION_UNITS",
    "PERMUTATION",
    "SENSITIVITY_KEYS",
    "TEST_METHODS",
    "WILCOXON_GROUP",
    "LayerMaps",
    "LdaResult",
    "MapCorrelation",
    "SignedRankResult",
    "by_correction",
    "comparison_statistics",
    "contrast_statistics",
    "correlation_statistics",
    "cross_spearman",
    "layer_maps",
    "lda_channel_maps",
    "lda_samples",
    "lda_statistics",
    "map_correlations",
    "paired_differences",
    "read_tree",
    "signed_rank_test",
    "spearman_by_position",
    "top_values",
]
