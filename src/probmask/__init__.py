"""probmask: sparsify neural networks under one global budget with probabilistic masking.

Importing probmask reads no arguments, starts no writer and touches no file.
"""

from probmask.fixing import repair_mask, topk_mask
from probmask.masks import MaskMode, relaxed_mask, relaxed_masked_weight
from probmask.projection import ProjectionResult, project, project_
from probmask.report import LayerReport, Report
from probmask.schedules import CubicBudget, TemperatureSchedule
from probmask.selection import DEFAULT_MODULE_TYPES, select_targets
from probmask.sparsifier import ProbMask, accumulate_samples

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODULE_TYPES",
    "CubicBudget",
    "LayerReport",
    "MaskMode",
    "ProbMask",
    "ProjectionResult",
    "Report",
    "TemperatureSchedule",
    "accumulate_samples",
    "project",
    "project_",
    "relaxed_mask",
    "relaxed_masked_weight",
    "repair_mask",
    "select_targets",
    "topk_mask",
]
