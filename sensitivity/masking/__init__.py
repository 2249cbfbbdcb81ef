"""Guided masking (METHOD.md section 8): damage the units most sensitive to a variable and
measure top-1/top-5 accuracy, per-class accuracy and confusion matrices on original and on
singly-augmented inputs.

One concern per module:

- ``masks``: mask configurations, sensitivity maps, quantile/top/random unit selections, the
  masks of one variable (``VariableMasks``);
- ``network``: the masked network, split with torch.fx so that the unmasked prefix runs once
  per input batch (``MaskedNetwork``);
- ``inputs``: the probe inputs, each image original and singly augmented (``ProbeInputs``);
- ``schedule``: the suffix forwards in order, several configurations batched in one or row
  ranges of one, at most ``batch_rows`` rows each (``Schedule``, ``default_batch_rows``);
- ``evaluation``: the loop of masked forwards and the accuracies (``run_plans``,
  ``evaluate_masking``);
- ``resume``: a masking run's resume states (``MaskingCheckpoints``, ``masking_resume_fields``);
- ``result``: ``MaskingResult``, its profiles (top-1, per-class, confusion) and its
  specificity; stored with ``ResultsStore.write_result(GROUP_KIND, name, result)``, drawn by
  ``sensitivity.report.specificity_figure``;
- ``clustering``: hierarchical clustering of the (input, mask variable) profiles
  (``cluster_masking``, the reference's prediction/hca step), stored with the result;
- ``figures``: its dendrogram (imports matplotlib, so not imported here);
- ``stored``: what masking takes from a stored analysis (``read_stored_analysis``,
  ``masking_maps``), for analyze.py and the MaskingCallback alike.

This package imports torch, numpy and scipy; never Lightning or wandb.
"""

from sensitivity.masking.clustering import (
    METHODS,
    METRICS,
    ProfileClustering,
    check_clustering,
    cluster_masking,
    cluster_profiles,
)
from sensitivity.masking.evaluation import (
    MaskedAccuracy,
    MaskedRun,
    computed,
    evaluate_masking,
    run_plans,
)
from sensitivity.masking.inputs import ORIGINAL, ProbeInputs, input_problem, load_images
from sensitivity.masking.masks import (
    ALPHAS,
    KINDS,
    QUANTILES,
    TIES,
    VALUE_KEYS,
    FactorMask,
    MapPlacement,
    MaskConfig,
    PlanItem,
    VariableMasks,
    configuration_quantiles,
    default_configurations,
    default_value,
    factor_mask,
    map_placement,
    prepare_masks,
    quantile_mask,
    random_units_mask,
    selection_mask,
    sensitivity_maps,
    stacked_mask,
    top_units_mask,
)
from sensitivity.masking.network import (
    Mask,
    MaskedNetwork,
    layer_output_shapes,
    layer_outputs,
    positional_layers,
)
from sensitivity.masking.result import GROUP_KIND, PROFILES, MaskingResult, specificity_matrix
from sensitivity.masking.resume import MaskingCheckpoints, masking_resume_fields
from sensitivity.masking.schedule import Forward, Schedule, default_batch_rows, pass_groups
from sensitivity.masking.stored import (
    MaskingMaps,
    StoredAnalysis,
    masking_maps,
    read_stored_analysis,
)

__all__ = [
    "ALPHAS",
    "GROUP_KIND",
    "KINDS",
    "METHODS",
    "METRICS",
    "ORIGINAL",
    "PROFILES",
    "QUANTILES",
    "TIES",
    "VALUE_KEYS",
    "FactorMask",
    "Forward",
    "MapPlacement",
    "Mask",
    "MaskConfig",
    "MaskedAccuracy",
    "MaskedNetwork",
    "MaskedRun",
    "MaskingCheckpoints",
    "MaskingMaps",
    "MaskingResult",
    "PlanItem",
    "ProbeInputs",
    "ProfileClustering",
    "Schedule",
    "StoredAnalysis",
    "VariableMasks",
    "check_clustering",
    "cluster_masking",
    "cluster_profiles",
    "computed",
    "configuration_quantiles",
    "default_batch_rows",
    "default_configurations",
    "default_value",
    "evaluate_masking",
    "factor_mask",
    "input_problem",
    "layer_output_shapes",
    "layer_outputs",
    "load_images",
    "map_placement",
    "masking_maps",
    "masking_resume_fields",
    "pass_groups",
    "positional_layers",
    "prepare_masks",
    "quantile_mask",
    "random_units_mask",
    "read_stored_analysis",
    "run_plans",
    "selection_mask",
    "sensitivity_maps",
    "specificity_matrix",
    "stacked_mask",
    "top_units_mask",
]
