"""Mask groups: pruned layers whose masks are computed together.

Global magnitude pruning (one threshold over several layers) and structured
pruning (a removed unit also removes the weights that read it in the next
layer) need every layer's updated weights to compute any one mask. Keras 3
optimizers apply all variable updates before running any constraint, so
the group's leader (the step-advancing weight of its first layer) computes
all masks of the group in its own constraint, on the steps its schedule
names, assigns them, and re-zeroes the other weights of the group. The
other weights' constraints then only apply their mask. Re-zeroing in the
leader keeps every weight exactly zero outside its mask after each update
even if an optimizer visits the variables in another order.
"""

from keras import ops


class MaskGroup:
    """Base of mask groups; subclasses implement `compute_masks`.

    Args:
        wrappers: The `PruneLowMagnitude` layers of the group, in model
            order; the first one leads.
    """

    def __init__(self, wrappers):
        self.wrappers = list(wrappers)
        self.leader = self.wrappers[0]
        self.entries = [
            (wrapper, index)
            for wrapper in self.wrappers
            for index in range(len(wrapper.pruning_vars))
        ]

    def compute_masks(self, weights, sparsity):
        """Returns `(masks, thresholds)`, one per entry of `self.entries`."""
        raise NotImplementedError

    def constrain(self, constraint, weight):
        """Called by a member weight's constraint; returns the new weight."""
        wrapper, index = constraint.wrapper, constraint.index
        _, mask_var, _ = wrapper.pruning_vars[index]
        if wrapper is not self.leader or not constraint.advances_step:
            mask = ops.convert_to_tensor(mask_var)
            return ops.where(mask, weight, ops.zeros((), weight.dtype))
        should_prune, sparsity = wrapper.pruning_schedule(wrapper.pruning_step)
        position = self.entries.index((wrapper, index))

        def update():
            weights = [
                weight
                if i == position
                else ops.convert_to_tensor(w.pruning_vars[j][0])
                for i, (w, j) in enumerate(self.entries)
            ]
            masks, thresholds = self.compute_masks(weights, sparsity)
            for i, ((w, j), mask, threshold) in enumerate(
                zip(self.entries, masks, thresholds)
            ):
                variable, mask_v, threshold_v = w.pruning_vars[j]
                mask_v.assign(mask)
                threshold_v.assign(ops.cast(threshold, threshold_v.dtype))
                if i != position:
                    variable.assign(
                        ops.where(
                            mask, weights[i], ops.zeros((), variable.dtype)
                        )
                    )
            return masks[position]

        def keep():
            return ops.convert_to_tensor(mask_var)

        mask = ops.cond(should_prune, update, keep)
        return ops.where(mask, weight, ops.zeros((), weight.dtype))


def connect_groups(model, wrappers):
    """Connects the layers of `model` whose schedules prune across layers.

    Called by `UpdatePruningStep.on_train_begin`. Layers whose schedule is
    a `kprune.GlobalSparsity` form one group per `group` name; layers whose
    schedule is a `kprune.StructuredSparsity` form one structured group.
    Other layers are left alone.

    Raises:
        ValueError: If the layers of one group disagree on the schedule.
    """
    from kprune import allocation
    from kprune import structured

    for wrapper in wrappers:
        wrapper._mask_group = None
    global_groups = {}
    structured_wrappers = []
    for wrapper in wrappers:
        schedule = wrapper.pruning_schedule
        if isinstance(schedule, allocation.GlobalSparsity):
            global_groups.setdefault(schedule.group, []).append(wrapper)
        elif isinstance(schedule, structured.StructuredSparsity):
            structured_wrappers.append(wrapper)
    for members in global_groups.values():
        group = allocation.GlobalMagnitudeGroup(members)
        for wrapper in members:
            wrapper._mask_group = group
    if structured_wrappers:
        group = structured.StructuredGroup(model, structured_wrappers)
        for wrapper in structured_wrappers:
            wrapper._mask_group = group
