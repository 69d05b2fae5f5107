"""The interface a custom layer implements to say which weights to prune."""

import abc

from kprune.api_export import kprune_export


@kprune_export("kprune")
class PrunableLayer(abc.ABC):
    """Mixin for custom layers that choose which of their weights to prune.

    Inherit from it next to `keras.layers.Layer` and return the weight
    variables to prune from `get_prunable_weights()`.
    `kprune.prune_low_magnitude` then prunes the layer like a built-in one.
    A layer that has a `get_prunable_weights` method without inheriting
    from this class is accepted too, as in `tfmot`.

    Example:

    ```python
    class MyDense(keras.layers.Dense, kprune.PrunableLayer):
        def get_prunable_weights(self):
            return [self.kernel]
    ```
    """

    @abc.abstractmethod
    def get_prunable_weights(self) -> list:
        """Returns the list of weight variables to prune."""
