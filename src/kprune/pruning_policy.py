"""`PruningPolicy`: model-wide rules on which layers may be pruned."""

import abc


class PruningPolicy(abc.ABC):
    """Decides which layers of a model `prune_low_magnitude` may prune.

    Subclass it and pass an instance as `pruning_policy=` when pruning a
    whole model: `ensure_model_supports_pruning` is called once on the
    model and may raise to refuse it; `allow_pruning` is asked for each
    layer that could be pruned, and layers it refuses stay dense.

    Example:

    ```python
    class KeepFirstLayerDense(kprune.PruningPolicy):
        def __init__(self, first_layer_name):
            self.first_layer_name = first_layer_name

        def allow_pruning(self, layer):
            return layer.name != self.first_layer_name

        def ensure_model_supports_pruning(self, model):
            pass

    pruned = kprune.prune_low_magnitude(
        model, pruning_policy=KeepFirstLayerDense("conv1")
    )
    ```
    """

    @abc.abstractmethod
    def allow_pruning(self, layer) -> bool:
        """Returns whether `layer` may be pruned."""

    @abc.abstractmethod
    def ensure_model_supports_pruning(self, model) -> None:
        """Raises `ValueError` if `model` cannot be pruned under this policy."""
