import keras
import numpy as np
import pytest
from keras import layers

import kprune
import testing
from kprune.wrapper import collect_pruned_layers


def three_layer_model():
    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            layers.Conv2D(5, 3, name="conv"),
            layers.Flatten(name="flatten"),
            layers.Dense(12, activation="relu", name="hidden"),
            layers.Dense(3, name="out"),
        ]
    )


def pruned_vars(model):
    return [
        (layer, w, m)
        for layer in collect_pruned_layers(model)
        for w, m, _ in layer.pruning_vars
    ]


def fit_once(model, optimizer, x, y, steps=1, batch_size=8):
    testing.compile_classifier(model, optimizer=optimizer)
    return testing.fit_pruned(
        model,
        x[: steps * batch_size],
        y[: steps * batch_size],
        batch_size=batch_size,
    )


def global_schedule(sparsity, **kwargs):
    return kprune.GlobalSparsity(
        kprune.ConstantSparsity(sparsity, begin_step=1, frequency=1),
        **kwargs,
    )


def test_global_sparsity_keeps_exactly_the_largest_magnitudes_of_all_layers():
    keras.utils.set_random_seed(1)
    pruned = kprune.prune_low_magnitude(
        three_layer_model(), global_schedule(0.8)
    )
    before = [
        keras.ops.convert_to_numpy(w).copy() for _, w, _ in pruned_vars(pruned)
    ]
    x, y = testing.classification_data(n=8, shape=(6, 6, 2))
    # A zero learning rate leaves the weights as they were when scored.
    fit_once(pruned, keras.optimizers.SGD(0.0), x, y)
    masks = [keras.ops.convert_to_numpy(m) for _, _, m in pruned_vars(pruned)]
    flat = np.concatenate([np.abs(b).ravel() for b in before])
    expected = testing.reference_magnitude_mask(flat, 0.8)
    got = np.concatenate([m.ravel() for m in masks])
    assert got.sum() == testing.reference_kept(flat.size, 0.8)
    np.testing.assert_array_equal(got, expected)
    # Layers end at different sparsities: the allocation is global.
    assert len({round(float(m.mean()), 3) for m in masks}) == 3
    for _, w, m in pruned_vars(pruned):
        values = keras.ops.convert_to_numpy(w)
        assert np.all(values[~keras.ops.convert_to_numpy(m)] == 0)


def test_global_sparsity_honours_a_per_layer_cap():
    keras.utils.set_random_seed(2)
    model = three_layer_model()
    schedule = kprune.ConstantSparsity(0.9, begin_step=1, frequency=1)
    pruned = kprune.prune_low_magnitude(
        model,
        {
            "conv": kprune.GlobalSparsity(schedule),
            # Small weights: uncapped, the global threshold would take most.
            "hidden": kprune.GlobalSparsity(schedule),
            "out": kprune.GlobalSparsity(schedule, max_sparsity=0.25),
        },
    )
    out_kernel = pruned.get_layer("prune_low_magnitude_out").layer.kernel
    out_kernel.assign(keras.ops.convert_to_numpy(out_kernel) * 1e-3)
    x, y = testing.classification_data(n=8, shape=(6, 6, 2))
    fit_once(pruned, keras.optimizers.SGD(0.0), x, y)
    rows = pruned_vars(pruned)
    kept = [int(keras.ops.convert_to_numpy(m).sum()) for _, _, m in rows]
    sizes = [int(np.prod(w.shape)) for _, w, _ in rows]
    assert kept[2] == testing.reference_kept(sizes[2], 0.25)
    assert sum(kept) == testing.reference_kept(sum(sizes), 0.9)


def test_global_sparsity_reaches_the_target_overall_while_training():
    keras.utils.set_random_seed(3)
    schedule = kprune.GlobalSparsity(
        kprune.PolynomialDecay(0.3, 0.75, begin_step=0, end_step=6, frequency=2)
    )
    pruned = kprune.prune_low_magnitude(three_layer_model(), schedule)
    x, y = testing.classification_data(n=32, shape=(6, 6, 2))
    testing.compile_classifier(pruned)
    testing.fit_pruned(pruned, x, y, epochs=2, batch_size=4)
    rows = pruned_vars(pruned)
    kept = sum(int(keras.ops.convert_to_numpy(m).sum()) for _, _, m in rows)
    size = sum(int(np.prod(w.shape)) for _, w, _ in rows)
    assert kept == testing.reference_kept(size, 0.75)
    for _, w, m in rows:
        values = keras.ops.convert_to_numpy(w)
        assert np.all(values[~keras.ops.convert_to_numpy(m)] == 0)
    stripped = kprune.strip_pruning(pruned)
    np.testing.assert_allclose(
        testing.inference(stripped, x),
        testing.inference(pruned, x),
        rtol=1e-5,
        atol=1e-6,
    )


def test_global_sparsity_saves_loads_and_keeps_one_threshold(tmp_path):
    keras.utils.set_random_seed(4)
    pruned = kprune.prune_low_magnitude(
        three_layer_model(), global_schedule(0.6)
    )
    x, y = testing.classification_data(n=8, shape=(6, 6, 2))
    fit_once(pruned, "adam", x, y)
    path = tmp_path / "global.keras"
    pruned.save(path)
    loaded = keras.saving.load_model(path)
    schedules = [w.pruning_schedule for w in collect_pruned_layers(loaded)]
    assert all(s == global_schedule(0.6) for s in schedules)
    before = [
        keras.ops.convert_to_numpy(w).copy() for _, w, _ in pruned_vars(loaded)
    ]
    loaded.compile(
        optimizer=keras.optimizers.SGD(0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    testing.fit_pruned(loaded, x, y, batch_size=8)
    got = np.concatenate(
        [
            keras.ops.convert_to_numpy(m).ravel()
            for _, _, m in pruned_vars(loaded)
        ]
    )
    flat = np.concatenate([np.abs(b).ravel() for b in before])
    np.testing.assert_array_equal(
        got, testing.reference_magnitude_mask(flat, 0.6)
    )


def test_global_layers_with_different_schedules_fail_to_start():
    pruned = kprune.prune_low_magnitude(
        testing.mlp(),
        {
            "dense": kprune.GlobalSparsity(kprune.ConstantSparsity(0.5, 0)),
            "dense_1": kprune.GlobalSparsity(kprune.ConstantSparsity(0.6, 0)),
        },
    )
    x, y = testing.classification_data(n=4)
    testing.compile_classifier(pruned)
    with pytest.raises(ValueError, match="must share one schedule"):
        testing.fit_pruned(pruned, x, y)


def test_global_sparsity_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`schedule` must be"):
        kprune.GlobalSparsity(0.5)
    with pytest.raises(ValueError, match="max_sparsity"):
        kprune.GlobalSparsity(kprune.ConstantSparsity(0.5, 0), max_sparsity=1)
    with pytest.raises(ValueError, match="group"):
        kprune.GlobalSparsity(kprune.ConstantSparsity(0.5, 0), group="")


def rigl_erk(shapes, sparsity, dense=()):
    """RigL's `get_sparsities_erdos_renyi` loop, transcribed."""
    dense_layers = set(dense)
    while True:
        divisor, rhs, raw = 0.0, 0.0, {}
        for name, shape in shapes.items():
            n = np.prod(shape)
            if name in dense_layers:
                rhs -= n * sparsity
            else:
                rhs += n * (1 - sparsity)
                raw[name] = np.sum(shape) / np.prod(shape)
                divisor += raw[name] * n
        eps = rhs / divisor
        top = max(raw.values())
        if top * eps > 1:
            dense_layers |= {n for n, p in raw.items() if p == top}
        else:
            break
    return {
        name: 0.0 if name in dense_layers else 1 - eps * raw[name]
        for name in shapes
    }


def erk_model():
    return keras.Sequential(
        [
            keras.Input((10, 10, 3)),
            layers.Conv2D(4, 3, name="c1"),
            layers.Conv2D(32, 3, name="c2"),
            layers.Flatten(name="flat"),
            layers.Dense(64, name="d1"),
            layers.Dense(10, name="d2"),
        ]
    )


def test_erk_densities_follow_the_formula_and_meet_the_target():
    model = erk_model()
    shapes = {
        layer.name: tuple(layer.kernel.shape)
        for layer in model.layers
        if hasattr(layer, "kernel")
    }
    got = kprune.erk_sparsities(model, 0.8)
    assert list(got) == ["c1", "c2", "d1", "d2"]
    expected = rigl_erk(shapes, 0.8)
    for name in shapes:
        assert got[name] == pytest.approx(expected[name], abs=1e-9)
    # c1 and d2 are small: their ERK densities would exceed 1, so they are
    # kept dense and the others share the rest.
    assert got["c1"] == got["d2"] == 0.0
    sizes = {n: np.prod(s) for n, s in shapes.items()}
    kept = sum(sizes[n] * (1 - got[n]) for n in shapes)
    assert kept == pytest.approx(0.2 * sum(sizes.values()))
    ratio = {
        n: (1 - got[n]) * np.prod(s) / np.sum(s)
        for n, s in shapes.items()
        if got[n] > 0
    }
    assert max(ratio.values()) == pytest.approx(min(ratio.values()))


def test_erk_caps_and_dense_layers_redistribute_the_budget():
    model = erk_model()
    got = kprune.erk_sparsities(
        model, 0.8, max_sparsity={"c2": 0.3}, dense_layers=["d2"]
    )
    assert list(got) == ["c1", "c2", "d1"]
    assert got["c2"] == pytest.approx(0.3)
    sizes = {
        layer.name: np.prod(layer.kernel.shape)
        for layer in model.layers
        if layer.name in got
    }
    kept = sum(sizes[n] * (1 - got[n]) for n in got)
    assert kept == pytest.approx(0.2 * sum(sizes.values()))
    assert kprune.erk_sparsities(model, 0.5, power_scale=0) == pytest.approx(
        dict.fromkeys(["c1", "c2", "d1", "d2"], 0.5)
    )


def test_erk_rejects_unreachable_caps_and_unknown_names():
    model = erk_model()
    with pytest.raises(ValueError, match="caps keep at least"):
        kprune.erk_sparsities(model, 0.9, max_sparsity=0.5)
    with pytest.raises(ValueError, match="not prunable layers"):
        kprune.erk_sparsities(model, 0.9, dense_layers=["flat"])
    with pytest.raises(ValueError, match="target_sparsity"):
        kprune.erk_sparsities(model, 1.0)


@pytest.mark.slow
def test_erk_targets_train_to_the_overall_sparsity():
    keras.utils.set_random_seed(5)
    model = three_layer_model()
    targets = kprune.erk_sparsities(model, 0.8)
    schedules = kprune.per_layer_schedules(
        targets, kprune.PolynomialDecay(0.4, 0.8, 1, 4, frequency=1)
    )
    pruned = kprune.prune_low_magnitude(model, schedules)
    x, y = testing.classification_data(n=16, shape=(6, 6, 2))
    testing.compile_classifier(pruned)
    testing.fit_pruned(pruned, x, y)
    rows = pruned_vars(pruned)
    kept = sum(int(keras.ops.convert_to_numpy(m).sum()) for _, _, m in rows)
    size = sum(int(np.prod(w.shape)) for _, w, _ in rows)
    # Each layer rounds its own kept count: off by at most one per layer.
    assert abs(kept - 0.2 * size) <= len(rows)


def test_per_layer_schedules_scale_the_template_to_each_target():
    got = kprune.per_layer_schedules(
        {"a": 0.4, "b": 0.0, "c": 0.8},
        kprune.PolynomialDecay(0.2, 0.8, begin_step=5, end_step=50, power=2),
    )
    assert got == {
        "a": kprune.PolynomialDecay(0.1, 0.4, 5, 50, power=2),
        "c": kprune.PolynomialDecay(0.2, 0.8, 5, 50, power=2),
    }
    constant = kprune.per_layer_schedules(
        {"a": 0.3}, kprune.ConstantSparsity(0.9, 10, frequency=7)
    )
    assert constant == {"a": kprune.ConstantSparsity(0.3, 10, frequency=7)}
    with pytest.raises(ValueError, match="ConstantSparsity"):
        kprune.per_layer_schedules({"a": 0.3}, global_schedule(0.5))
    with pytest.raises(ValueError, match="sparsities"):
        kprune.per_layer_schedules({"a": 1.5}, constant["a"])


def test_a_schedule_dict_prunes_only_the_named_layers():
    model = testing.mlp()
    pruned = kprune.prune_low_magnitude(
        model,
        {"dense_1": 0.5},  # a sparsity means ConstantSparsity(s, 0)
    )
    wrappers = collect_pruned_layers(pruned)
    assert [w.layer.name for w in wrappers] == ["dense_1"]
    assert wrappers[0].pruning_schedule == kprune.ConstantSparsity(0.5, 0)
    with pytest.raises(ValueError, match="not prunable layers"):
        kprune.prune_low_magnitude(model, {"nope": 0.5})
    with pytest.raises(ValueError, match="whole models only"):
        kprune.prune_low_magnitude(layers.Dense(2), {"dense": 0.5})
    with pytest.raises(ValueError, match=r"pruning_schedule\['dense'\]"):
        kprune.prune_low_magnitude(model, {"dense": "half"})


def test_prunable_layer_names_lists_layers_in_model_order():
    assert kprune.prunable_layer_names(three_layer_model()) == [
        "conv",
        "hidden",
        "out",
    ]


@pytest.mark.parametrize("reverse", [False, True])
def test_global_masks_hold_in_a_custom_loop_whatever_the_variable_order(
    reverse,
):
    keras.utils.set_random_seed(6)
    pruned = kprune.prune_low_magnitude(
        three_layer_model(), global_schedule(0.7)
    )
    callback = kprune.UpdatePruningStep()
    callback.set_model(pruned)
    callback.on_train_begin()
    optimizer = keras.optimizers.SGD(0.1)
    variables = list(pruned.trainable_variables)
    if reverse:
        variables = variables[::-1]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 6, 6, 2)).astype("float32")
    for _ in range(3):
        # The training-mode call computes the masks; `apply` zeroes the
        # weights outside them, in whatever order it visits the variables.
        pruned(x, training=True)
        grads = [
            keras.ops.convert_to_tensor(
                rng.normal(size=v.shape).astype("float32")
            )
            for v in variables
        ]
        optimizer.apply(grads, variables)
    rows = pruned_vars(pruned)
    kept = sum(int(keras.ops.convert_to_numpy(m).sum()) for _, _, m in rows)
    size = sum(int(np.prod(w.shape)) for _, w, _ in rows)
    assert kept == testing.reference_kept(size, 0.7)
    for _, w, m in rows:
        values = keras.ops.convert_to_numpy(w)
        assert np.all(values[~keras.ops.convert_to_numpy(m)] == 0)
    assert testing.steps(pruned) == [3, 3, 3]
