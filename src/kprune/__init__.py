"""kprune: prune Keras 3 models while they train.

A drop-in for `tfmot.sparsity.keras`: the same public names and arguments.
"""

from kprune.callbacks import PruningSummaries
from kprune.callbacks import UpdatePruningStep
from kprune.prunable_layer import PrunableLayer
from kprune.prune import prune_low_magnitude
from kprune.prune import prune_scope
from kprune.prune import strip_pruning
from kprune.pruning_policy import PruningPolicy
from kprune.registry import register_prunable_layer
from kprune.schedules import ConstantSparsity
from kprune.schedules import PolynomialDecay
from kprune.schedules import PruningSchedule
from kprune.wrapper import PruneLowMagnitude

__version__ = "0.1.0"

__all__ = [
    "ConstantSparsity",
    "PolynomialDecay",
    "PrunableLayer",
    "PruneLowMagnitude",
    "PruningPolicy",
    "PruningSchedule",
    "PruningSummaries",
    "UpdatePruningStep",
    "prune_low_magnitude",
    "prune_scope",
    "register_prunable_layer",
    "strip_pruning",
]
