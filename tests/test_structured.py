import keras
import numpy as np
import pytest
from keras import layers

import kprune
import testing
from kprune.wrapper import collect_pruned_layers


def structured(sparsity=0.5, norm="l2", frequency=2):
    return kprune.StructuredSparsity(
        kprune.ConstantSparsity(sparsity, begin_step=1, frequency=frequency),
        norm=norm,
    )


def conv_bn_model():
    return keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            layers.Conv2D(6, 3, padding="same", name="c1"),
            layers.BatchNormalization(name="bn"),
            layers.ReLU(name="relu"),
            layers.Conv2D(8, 3, activation="relu", name="c2"),
            layers.MaxPooling2D(name="pool"),
            layers.Flatten(name="flatten"),
            layers.Dense(10, activation="relu", name="d1"),
            layers.Dense(3, name="out"),
        ]
    )


def train(model, x, y, epochs=2):
    testing.compile_classifier(model)
    testing.fit_pruned(model, x, y, epochs=epochs)
    return model


@pytest.fixture(scope="module")
def trained_conv_bn():
    """`conv_bn_model` trained at structured sparsity 0.5, and its inputs:
    one fit that the tests below only read."""
    keras.utils.set_random_seed(0)
    x, y = testing.classification_data(n=16, shape=(8, 8, 2))
    pruned = train(
        kprune.prune_low_magnitude(conv_bn_model(), structured(0.5)), x, y
    )
    return pruned, x


def test_structured_pruning_masks_whole_units_and_what_reads_them(
    trained_conv_bn,
):
    pruned, _ = trained_conv_bn
    masks = {
        w.layer.name: keras.ops.convert_to_numpy(w.pruning_vars[0][1])
        for w in collect_pruned_layers(pruned)
    }
    c1_units = masks["c1"].reshape(-1, 6).any(axis=0)
    assert c1_units.sum() == 3
    # Every kept filter is whole, every removed one is all zero.
    assert set(masks["c1"].reshape(-1, 6).all(axis=0)) <= {True, False}
    np.testing.assert_array_equal(
        masks["c1"].reshape(-1, 6).all(axis=0), c1_units
    )
    # c2 reads only c1's kept channels, and keeps 4 of its 8 filters.
    np.testing.assert_array_equal(masks["c2"].any(axis=(0, 1, 3)), c1_units)
    c2_units = masks["c2"].reshape(-1, 8).any(axis=0)
    assert c2_units.sum() == 4
    # d1 reads c2's channels after Flatten: 3 x 3 positions of each.
    np.testing.assert_array_equal(masks["d1"].any(axis=1), np.tile(c2_units, 9))
    # The output layer keeps its 3 units but drops d1's removed inputs.
    assert masks["out"].all(axis=0).sum() == 0
    assert masks["out"].any(axis=0).all()
    assert masks["out"].any(axis=1).sum() == 5


def test_units_are_ranked_by_the_chosen_norm():
    kernel = np.zeros((4, 3), "float32")
    kernel[:, 0] = [3.0, 0, 0, 0]  # L1 3, L2 3
    kernel[:, 1] = [1.0, 1, 1, 1]  # L1 4, L2 2
    kernel[:, 2] = [0.1, 0, 0, 0]
    for norm, kept in (("l1", 1), ("l2", 0)):
        model = keras.Sequential(
            [
                keras.Input((4,)),
                layers.Dense(3, name="h"),
                layers.Dense(2, name="o"),
            ]
        )
        model.get_layer("h").kernel.assign(kernel)
        pruned = kprune.prune_low_magnitude(
            model,
            kprune.StructuredSparsity(
                kprune.ConstantSparsity(0.6, 1, frequency=1), norm=norm
            ),
        )
        pruned.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
        x = np.zeros((4, 4), "float32")
        testing.fit_pruned(pruned, x, np.zeros((4, 2)))
        mask = keras.ops.convert_to_numpy(
            pruned.get_layer("prune_low_magnitude_h").pruning_vars[0][1]
        )
        assert np.flatnonzero(mask.any(axis=0)).tolist() == [kept], norm


def test_shrink_model_gives_the_same_predictions_with_fewer_parameters(
    trained_conv_bn,
):
    pruned, x = trained_conv_bn
    small = kprune.shrink_model(pruned)
    assert not collect_pruned_layers(small)
    np.testing.assert_allclose(
        testing.inference(small, x),
        testing.inference(pruned, x),
        rtol=1e-5,
        atol=1e-5,
    )
    # c1 6->3 filters, c2 8->4, d1 10->5: count what must remain.
    c1 = 3 * 3 * 2 * 3 + 3
    bn = 4 * 3
    c2 = 3 * 3 * 3 * 4 + 4
    d1 = (3 * 3 * 4) * 5 + 5
    out = 5 * 3 + 3
    assert small.count_params() == c1 + bn + c2 + d1 + out
    assert small.get_layer("c2").filters == 4
    assert small.get_layer("d1").units == 5


def test_shrink_model_saves_and_loads_as_a_plain_model(tmp_path):
    keras.utils.set_random_seed(2)
    x, y = testing.classification_data(n=8, shape=(8, 8, 2))
    pruned = train(
        kprune.prune_low_magnitude(conv_bn_model(), structured(0.25)),
        x,
        y,
        epochs=1,
    )
    path = tmp_path / "pruned.keras"
    pruned.save(path)
    loaded = keras.saving.load_model(path)
    assert collect_pruned_layers(loaded)[0].pruning_schedule == structured(0.25)
    small = kprune.shrink_model(loaded)
    small.save(tmp_path / "small.keras")
    reloaded = keras.saving.load_model(tmp_path / "small.keras")
    np.testing.assert_allclose(
        testing.inference(reloaded, x),
        testing.inference(pruned, x),
        rtol=1e-5,
        atol=1e-5,
    )


def residual_model():
    inputs = keras.Input((6,))
    a = layers.Dense(8, activation="relu", name="a")(inputs)
    b = layers.Dense(8, name="b")(a)
    c = layers.Add(name="add")([a, b])
    d = layers.Dense(5, activation="relu", name="d")(c)
    e = layers.Dense(3, name="e")(d)
    return keras.Model(inputs, e)


def test_residual_branches_lose_the_same_units():
    keras.utils.set_random_seed(3)
    x, y = testing.classification_data(n=16, shape=(6,))
    pruned = kprune.prune_low_magnitude(residual_model(), structured(0.4))
    plan = kprune.structured_plan(pruned)
    assert plan == {
        "a": None,
        "b": None,
        "d": None,
        "e": "its output is a model output",
    }
    train(pruned, x, y)
    masks = {
        w.layer.name: keras.ops.convert_to_numpy(w.pruning_vars[0][1])
        for w in collect_pruned_layers(pruned)
    }
    kept = masks["a"].any(axis=0)
    assert kept.sum() == 5
    # b reads a and is added to it: same units in and out.
    np.testing.assert_array_equal(masks["b"].any(axis=0), kept)
    np.testing.assert_array_equal(masks["b"].any(axis=1), kept)
    np.testing.assert_array_equal(masks["d"].any(axis=1), kept)
    small = kprune.shrink_model(pruned)
    assert small.get_layer("a").units == small.get_layer("b").units == 5
    assert small.get_layer("d").units == 3
    assert small.count_params() == (6 * 5 + 5) + (5 * 5 + 5) + (5 * 3 + 3) + (
        3 * 3 + 3
    )
    np.testing.assert_allclose(
        testing.inference(small, x),
        testing.inference(pruned, x),
        rtol=1e-5,
        atol=1e-5,
    )


def test_conv_residual_block_with_batch_norm_shrinks_consistently():
    keras.utils.set_random_seed(6)
    inputs = keras.Input((6, 6, 2))
    stem = layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    h = layers.BatchNormalization(name="bn1")(stem)
    h = layers.ReLU()(h)
    h = layers.Conv2D(8, 3, padding="same", name="conv_a")(h)
    h = layers.BatchNormalization(name="bn2")(h)
    block = layers.Add(name="add1")([stem, h])
    h = layers.Conv2D(8, 1, name="conv_b")(block)
    block = layers.Add(name="add2")([block, h])
    h = layers.GlobalAveragePooling2D()(block)
    outputs = layers.Dense(3, name="head")(h)
    model = keras.Model(inputs, outputs)
    pruned = kprune.prune_low_magnitude(model, structured(0.5))
    plan = kprune.structured_plan(pruned)
    assert plan["stem"] is None and plan["conv_a"] is None
    assert plan["conv_b"] is None
    x, y = testing.classification_data(n=16, shape=(6, 6, 2))
    train(pruned, x, y)
    small = kprune.shrink_model(pruned)
    for name in ("stem", "conv_a", "conv_b"):
        assert small.get_layer(name).filters == 4
    assert small.get_layer("bn1").gamma.shape == (4,)
    np.testing.assert_allclose(
        testing.inference(small, x),
        testing.inference(pruned, x),
        rtol=1e-5,
        atol=1e-5,
    )


def test_an_identity_skip_from_the_input_leaves_the_block_alone():
    inputs = keras.Input((4,))
    h = layers.Dense(4, name="branch")(inputs)
    h = layers.Add(name="add")([inputs, h])
    model = keras.Model(inputs, layers.Dense(2, name="o")(h))
    pruned = kprune.prune_low_magnitude(model, structured(0.5))
    reason = kprune.structured_plan(pruned)["branch"]
    assert "'add' (Add) also takes a model input" in reason
    assert "cannot share one mask" in reason


def test_conv_to_global_pooling_to_dense_and_conv1d_shrink():
    keras.utils.set_random_seed(4)
    model = keras.Sequential(
        [
            keras.Input((10, 3)),
            layers.Conv1D(6, 3, activation="relu", name="c"),
            layers.Dropout(0.1),
            layers.GlobalAveragePooling1D(),
            layers.Dense(4, name="o"),
        ]
    )
    x, y = testing.classification_data(n=16, shape=(10, 3), classes=4)
    pruned = train(
        kprune.prune_low_magnitude(model, structured(0.5, "l1")), x, y
    )
    small = kprune.shrink_model(pruned)
    assert small.get_layer("c").filters == 3
    assert small.count_params() == (3 * 3 * 3 + 3) + (3 * 4 + 4)
    np.testing.assert_allclose(
        testing.inference(small, x),
        testing.inference(pruned, x),
        rtol=1e-5,
        atol=1e-5,
    )


def test_structured_sparsity_rejects_bad_arguments_and_models():
    with pytest.raises(ValueError, match="norm"):
        kprune.StructuredSparsity(kprune.ConstantSparsity(0.5, 0), norm="l3")
    with pytest.raises(ValueError, match="schedule"):
        kprune.StructuredSparsity(
            kprune.GlobalSparsity(kprune.ConstantSparsity(0.5, 0))
        )
    with pytest.raises(ValueError, match="nothing to shrink"):
        kprune.shrink_model(
            kprune.prune_low_magnitude(
                testing.mlp(), kprune.ConstantSparsity(0.5, 0)
            )
        )


def test_a_layer_read_by_two_branches_shrinks_for_both():
    keras.utils.set_random_seed(5)
    inputs = keras.Input((6,))
    shared = layers.Dense(8, activation="tanh", name="shared")(inputs)
    left = layers.Dense(3, name="left")(shared)
    right = layers.Dense(2, name="right")(layers.Dropout(0.2)(shared))
    model = keras.Model(inputs, [left, right])
    pruned = kprune.prune_low_magnitude(model, structured(0.5))
    assert kprune.structured_plan(pruned)["shared"] is None
    pruned.compile(optimizer="adam", loss=["mse", "mse"])
    x = np.random.default_rng(0).normal(size=(16, 6)).astype("float32")
    testing.fit_pruned(pruned, x, [x[:, :3], x[:, :2]], epochs=2)
    small = kprune.shrink_model(pruned)
    assert small.get_layer("shared").units == 4
    assert small.count_params() == (6 * 4 + 4) + (4 * 3 + 3) + (4 * 2 + 2)
    for got, want in zip(
        testing.inference(small, x), testing.inference(pruned, x)
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_plan_gives_a_reason_for_every_layer_it_leaves_alone():
    model = keras.Sequential(
        [
            keras.Input((4, 4, 3)),
            layers.Conv2D(4, 1, name="c"),
            layers.LayerNormalization(name="ln"),
            layers.Flatten(),
            layers.Dense(6, activation="softmax", name="soft"),
            layers.Dense(5, name="h"),
            layers.Dense(2, name="o"),
        ]
    )
    schedule = structured(0.5)
    pruned = kprune.prune_low_magnitude(
        model, {"c": schedule, "soft": schedule, "o": schedule}
    )
    plan = kprune.structured_plan(pruned)
    assert "'ln' (LayerNormalization)" in plan["c"]
    assert "cannot rewire" in plan["c"]
    assert plan["soft"] == "its softmax mixes its units"
    assert "h" not in plan  # not pruned with StructuredSparsity
    assert plan["o"] == "its output is a model output"


def test_a_shared_layer_keeps_its_units():
    inputs = keras.Input((4,))
    shared = layers.Dense(4, name="shared")
    hidden = shared(shared(inputs))
    model = keras.Model(inputs, layers.Dense(2, name="o")(hidden))
    pruned = kprune.prune_low_magnitude(model, structured(0.5))
    assert (
        "shared (called more than once)"
        in kprune.structured_plan(pruned)["shared"]
    )
