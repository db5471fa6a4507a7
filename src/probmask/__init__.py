"""probmask: sparsify neural networks under one global budget with probabilistic masking.

This package is the library. Importing it reads no arguments, starts no writer, touches no file
and loads none of the experiment application's dependencies; the application (configuration,
data, models, methods, the runner and the command line) is :mod:`probmask.app`.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from probmask.budget import check_sparsity, kept_count
    from probmask.fixing import repair_mask, topk_mask
    from probmask.granularity import ELEMENT, OUTPUT_CHANNEL, Granularity
    from probmask.masked import MaskedModel
    from probmask.masks import MaskMode, relaxed_mask, relaxed_masked_weight
    from probmask.nm import NM, check_semi_structured, parse_nm, project_groups_, topn_mask
    from probmask.projection import ProjectionResult, project, project_
    from probmask.report import LayerReport, Report
    from probmask.schedules import CubicBudget, TemperatureSchedule
    from probmask.selection import DEFAULT_MODULE_TYPES, select_targets
    from probmask.sparsifier import ProbMask, accumulate_samples

# The public names and their modules. They are imported on first use, so that importing a
# submodule (the command line's entry point, probmask.app.cli) does not import torch first.
_EXPORTS = {
    "check_sparsity": "budget", "kept_count": "budget",
    "repair_mask": "fixing", "topk_mask": "fixing",
    "ELEMENT": "granularity", "OUTPUT_CHANNEL": "granularity", "Granularity": "granularity",
    "MaskedModel": "masked",
    "MaskMode": "masks", "relaxed_mask": "masks", "relaxed_masked_weight": "masks",
    "NM": "nm", "check_semi_structured": "nm", "parse_nm": "nm", "project_groups_": "nm", "topn_mask": "nm",
    "ProjectionResult": "projection", "project": "projection", "project_": "projection",
    "LayerReport": "report", "Report": "report",
    "CubicBudget": "schedules", "TemperatureSchedule": "schedules",
    "DEFAULT_MODULE_TYPES": "selection", "select_targets": "selection",
    "ProbMask": "sparsifier", "accumulate_samples": "sparsifier",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'probmask' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"probmask.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


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
    "NM",
    "ProbMask",
    "ProjectionResult",
    "Report",
    "TemperatureSchedule",
    "accumulate_samples",
    "check_semi_structured",
    "check_sparsity",
    "kept_count",
    "parse_nm",
    "project",
    "project_",
    "project_groups_",
    "relaxed_mask",
    "relaxed_masked_weight",
    "repair_mask",
    "select_targets",
    "topk_mask",
    "topn_mask",
]
