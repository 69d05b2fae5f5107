"""kprune: prune Keras 3 models while they train.

A drop-in for `tfmot.sparsity.keras`: the same public names and arguments.
"""

from kprune.allocation import GlobalSparsity
from kprune.allocation import erk_sparsities
from kprune.allocation import per_layer_schedules
from kprune.allocation import prunable_layer_names
from kprune.callbacks import PruningSummaries
from kprune.callbacks import UpdatePruningStep
from kprune.compression import load_compact
from kprune.compression import save_compact
from kprune.export import export_litert
from kprune.plots import plot_mask
from kprune.plots import plot_schedule
from kprune.plots import plot_sparsity
from kprune.prunable_layer import PrunableLayer
from kprune.prune import prune_low_magnitude
from kprune.prune import prune_scope
from kprune.prune import strip_pruning
from kprune.pruning_policy import PruneForLatencyOnXNNPack
from kprune.pruning_policy import PruningPolicy
from kprune.registry import register_prunable_layer
from kprune.schedules import ConstantSparsity
from kprune.schedules import PolynomialDecay
from kprune.schedules import PruningSchedule
from kprune.sensitivity import SensitivityResult
from kprune.sensitivity import sensitivity_analysis
from kprune.structured import StructuredSparsity
from kprune.structured import shrink_model
from kprune.structured import structured_plan
from kprune.summary import sparsity_report
from kprune.summary import summary
from kprune.wrapper import PruneLowMagnitude

__version__ = "0.1.0"

__all__ = [
    "ConstantSparsity",
    "GlobalSparsity",
    "PolynomialDecay",
    "PrunableLayer",
    "PruneForLatencyOnXNNPack",
    "PruneLowMagnitude",
    "PruningPolicy",
    "PruningSchedule",
    "PruningSummaries",
    "SensitivityResult",
    "StructuredSparsity",
    "UpdatePruningStep",
    "erk_sparsities",
    "export_litert",
    "load_compact",
    "per_layer_schedules",
    "plot_mask",
    "plot_schedule",
    "plot_sparsity",
    "prunable_layer_names",
    "prune_low_magnitude",
    "prune_scope",
    "register_prunable_layer",
    "save_compact",
    "sensitivity_analysis",
    "shrink_model",
    "sparsity_report",
    "strip_pruning",
    "structured_plan",
    "summary",
]
