"""kprune: prune Keras 3 models while they train.

A drop-in for `tfmot.sparsity.keras`: its names, with the same arguments,
are at the top level. What kprune adds lives in one module per concern:
`kprune.allocation`, `kprune.structured`, `kprune.sensitivity`,
`kprune.oneshot`, `kprune.export`, `kprune.compression`, `kprune.report`,
`kprune.plots`, `kprune.pruning_policy` and `kprune.registry`. Each name
is declared once, with `@kprune_export` (see `kprune.api_export`), which
builds every `__all__` and registers the classes that serialize.
"""

from kprune import allocation
from kprune import api_export
from kprune import compression
from kprune import export
from kprune import oneshot
from kprune import plots
from kprune import pruning_policy
from kprune import registry
from kprune import report
from kprune import sensitivity
from kprune import structured
from kprune.callbacks import PruningSummaries
from kprune.callbacks import UpdatePruningStep
from kprune.prunable_layer import PrunableLayer
from kprune.prune import prune_low_magnitude
from kprune.prune import prune_scope
from kprune.prune import strip_pruning
from kprune.pruning_policy import PruneForLatencyOnXNNPack
from kprune.pruning_policy import PruningPolicy
from kprune.schedules import ConstantSparsity
from kprune.schedules import PolynomialDecay
from kprune.schedules import PruningSchedule
from kprune.wrapper import PruneLowMagnitude

__version__ = "0.1.0"

__all__ = api_export.public_names("kprune")

# Before 0.2 these names were at the top level too. They stay reachable
# here so that code written then runs unchanged, but they are not in
# `__all__` nor in the reference: each is documented in its module.
from kprune.allocation import GlobalSparsity  # noqa: E402
from kprune.allocation import erk_sparsities  # noqa: E402
from kprune.allocation import per_layer_schedules  # noqa: E402
from kprune.allocation import prunable_layer_names  # noqa: E402
from kprune.compression import load_compact  # noqa: E402
from kprune.compression import save_compact  # noqa: E402
from kprune.export import export_litert  # noqa: E402
from kprune.plots import plot_mask  # noqa: E402
from kprune.plots import plot_schedule  # noqa: E402
from kprune.plots import plot_sparsity  # noqa: E402
from kprune.registry import register_prunable_layer  # noqa: E402
from kprune.report import sparsity_report  # noqa: E402
from kprune.report import summary  # noqa: E402
from kprune.sensitivity import SensitivityResult  # noqa: E402
from kprune.sensitivity import sensitivity_analysis  # noqa: E402
from kprune.structured import StructuredSparsity  # noqa: E402
from kprune.structured import shrink_model  # noqa: E402
from kprune.structured import structured_plan  # noqa: E402
