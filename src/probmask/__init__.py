"""probmask: sparsify neural networks under one global budget with probabilistic masking.

This package is the library. Importing it reads no arguments, starts no writer, touches no file
and loads none of the experiment application's dependencies; the application (configuration,
data, models, methods, the runner and the command line) is :mod:`probmask.app`.
"""

from probmask.budget import check_sparsity, kept_count
from probmask.fixing import repair_mask, topk_mask
from probmask.granularity import ELEMENT, OUTPUT_CHANNEL, Granularity
from probmask.masked import MaskedModel
from probmask.masks import MaskMode, relaxed_mask, relaxed_masked_weight
from probmask.projection import ProjectionResult, project, project_
from probmask.report import LayerReport, Report
from probmask.schedules import CubicBudget, TemperatureSchedule
from probmask.selection import DEFAULT_MODULE_TYPES, select_targets
from probmask.sparsifier import ProbMask, accumulate_samples

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODULE_TYPES",
    "ELEMENT",
    "OUTPUT_CHANNEL",
    "CubicBudget",
    "Granularity",
    "LayerReport",
    "MaskMode",
    "MaskedModel",
    "ProbMask",
    "ProjectionResult",
    "Report",
    "TemperatureSchedule",
    "accumulate_samples",
    "check_sparsity",
    "kept_count",
    "project",
    "project_",
    "relaxed_mask",
    "relaxed_masked_weight",
    "repair_mask",
    "select_targets",
    "topk_mask",
]
