import keras
import numpy as np
import pytest
from keras import layers

import kprune
from kprune.wrapper import collect_pruned_layers
from testing import classification_data
from testing import compile_classifier
from testing import fit_pruned
from testing import mlp
from testing import small_cnn
from testing import steps


def weights_of(model):
    return [np.array(w) for w in model.get_weights()]


def test_prune_layer_wraps_that_layer():
    dense = layers.Dense(4)
    wrapped = kprune.prune_low_magnitude(dense)
    assert isinstance(wrapped, kprune.PruneLowMagnitude)
    assert wrapped.layer is dense
    assert wrapped.name == "prune_low_magnitude_" + dense.name


def test_prune_list_of_layers_keeps_weightless_layers_untouched():
    flatten, dense, dropout = (
        layers.Flatten(),
        layers.Dense(3),
        layers.Dropout(0.1),
    )
    out = kprune.prune_low_magnitude([flatten, dense, dropout])
    assert out[0] is flatten and out[2] is dropout
    assert isinstance(out[1], kprune.PruneLowMagnitude)


def test_already_wrapped_layers_are_not_wrapped_twice():
    wrapped = kprune.prune_low_magnitude(layers.Dense(4))
    assert kprune.prune_low_magnitude(wrapped) is wrapped
    model = keras.Sequential([keras.Input((3,)), wrapped, layers.Dense(2)])
    again = kprune.prune_low_magnitude(model)
    assert len(collect_pruned_layers(again)) == 2
    assert all(
        not isinstance(layer.layer, kprune.PruneLowMagnitude)
        for layer in collect_pruned_layers(again)
    )


def test_pruned_sequential_starts_from_the_input_model_weights():
    model = small_cnn()
    x, _ = classification_data(shape=(8, 8, 1))
    pruned = kprune.prune_low_magnitude(model)
    np.testing.assert_allclose(
        pruned.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )
    assert len(collect_pruned_layers(pruned)) == 2


def test_input_model_is_left_unchanged_by_pruning_and_training():
    model = mlp()
    before = weights_of(model)
    pruned = compile_classifier(
        kprune.prune_low_magnitude(
            model, kprune.ConstantSparsity(0.9, 0, frequency=1)
        )
    )
    x, y = classification_data()
    fit_pruned(pruned, x, y, epochs=2)
    for a, b in zip(before, weights_of(model)):
        np.testing.assert_array_equal(a, b)
    assert not any(
        isinstance(layer, kprune.PruneLowMagnitude) for layer in model.layers
    )
    assert all(w.constraint is None for w in model.trainable_weights)


def test_normalization_layers_stay_dense_in_a_model():
    model = keras.Sequential(
        [
            keras.Input((6,)),
            layers.Dense(5),
            layers.BatchNormalization(),
            layers.Dense(2),
        ]
    )
    pruned = kprune.prune_low_magnitude(model)
    kinds = [type(layer).__name__ for layer in pruned.layers]
    assert kinds == [
        "PruneLowMagnitude",
        "BatchNormalization",
        "PruneLowMagnitude",
    ]


def nested_functional_with_shared_layer():
    inner = keras.Sequential(
        [keras.Input((6,)), layers.Dense(6, activation="relu")], name="inner"
    )
    shared = layers.Dense(6, activation="tanh", name="shared")
    inputs = keras.Input((6,))
    x = shared(inputs)
    x = inner(x)
    x = shared(x)
    outputs = layers.Dense(3, name="head")(x)
    return keras.Model(inputs, outputs)


def test_functional_model_with_nested_model_and_shared_layer():
    model = nested_functional_with_shared_layer()
    x, y = classification_data(shape=(6,))
    pruned = kprune.prune_low_magnitude(model)
    np.testing.assert_allclose(
        pruned.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )
    names = sorted(layer.layer.name for layer in collect_pruned_layers(pruned))
    inner_dense = model.get_layer("inner").layers[0].name
    assert names == sorted([inner_dense, "head", "shared"])
    assert isinstance(
        pruned.get_layer("inner").layers[0], kprune.PruneLowMagnitude
    )
    shared = [layer for layer in pruned.layers if layer.name.endswith("shared")]
    assert len(shared) == 1  # one wrapper serves both call sites


def test_shared_layer_step_counts_once_per_batch():
    model = nested_functional_with_shared_layer()
    x, y = classification_data(n=20, shape=(6,))
    pruned = compile_classifier(kprune.prune_low_magnitude(model))
    fit_pruned(pruned, x, y, epochs=2, batch_size=4)
    assert steps(pruned) == [10, 10, 10]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"block_size": (2,)}, "block_size"),
        ({"block_size": (0, 2)}, "block_size"),
        ({"block_pooling_type": "MEAN"}, "block_pooling_type"),
        ({"sparsity_m_by_n": (4, 4)}, "sparsity_m_by_n"),
        ({"sparsity_m_by_n": (2, 4), "block_size": (2, 2)}, "cannot be"),
        ({"pruning_schedule": 0.5}, "pruning_schedule"),
        ({"block_size": (2, 2)}, "rank-2"),
    ],
)
def test_invalid_arguments_fail_at_the_call_and_change_nothing(kwargs, match):
    model = small_cnn()
    before = weights_of(model)
    with pytest.raises(ValueError, match=match):
        kprune.prune_low_magnitude(model, **kwargs)
    for a, b in zip(before, weights_of(model)):
        np.testing.assert_array_equal(a, b)
    assert all(w.constraint is None for w in model.trainable_weights)


def test_n_by_m_on_a_rank_one_weight_is_rejected_at_the_call():
    class Scale(layers.Layer, kprune.PrunableLayer):
        def build(self, shape):
            self.scale = self.add_weight(shape=(shape[-1],))

        def call(self, x):
            return x * self.scale

        def get_prunable_weights(self):
            return [self.scale]

    layer = Scale()
    layer.build((None, 4))
    with pytest.raises(ValueError, match="rank >= 2"):
        kprune.prune_low_magnitude(layer, sparsity_m_by_n=(2, 4))


def test_unknown_layer_with_weights_names_both_ways_to_prune_it():
    class Custom(layers.Layer):
        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1], 2))

        def call(self, x):
            return x @ self.w

    model = keras.Sequential([keras.Input((3,)), Custom(name="mystery")])
    with pytest.raises(ValueError) as error:
        kprune.prune_low_magnitude(model)
    message = str(error.value)
    assert "mystery" in message and "PrunableLayer" in message
    assert "clone_function" in message


def test_prunable_layer_and_dense_subclass_are_pruned():
    class Tied(layers.Dense, kprune.PrunableLayer):
        def get_prunable_weights(self):
            return [self.kernel, self.bias]

    class MyDense(layers.Dense):
        pass

    model = keras.Sequential([keras.Input((4,)), Tied(4), MyDense(2)])
    pruned = kprune.prune_low_magnitude(model)
    counts = [len(layer.pruning_vars) for layer in pruned.layers]
    assert counts == [2, 1]


def test_pruning_policy_decides_which_layers_are_pruned():
    class SkipFirst(kprune.PruningPolicy):
        def allow_pruning(self, layer):
            return not isinstance(layer, layers.Conv2D)

        def ensure_model_supports_pruning(self, model):
            if len(model.layers) < 2:
                raise ValueError("too small")

    pruned = kprune.prune_low_magnitude(small_cnn(), pruning_policy=SkipFirst())
    assert [
        type(layer.layer).__name__ for layer in collect_pruned_layers(pruned)
    ] == ["Dense"]
    tiny = keras.Sequential([keras.Input((2,)), layers.Dense(1)])
    with pytest.raises(ValueError, match="too small"):
        kprune.prune_low_magnitude(tiny, pruning_policy=SkipFirst())
    with pytest.raises(ValueError, match="whole models"):
        kprune.prune_low_magnitude(layers.Dense(2), pruning_policy=SkipFirst())


def test_non_layer_input_is_rejected():
    with pytest.raises(ValueError, match="to_prune"):
        kprune.prune_low_magnitude("dense")
    with pytest.raises(ValueError, match="to_prune"):
        kprune.prune_low_magnitude([layers.Dense(2), 3])


def test_tfmot_clone_function_pattern_prunes_only_chosen_layers():
    def prune_dense_only(layer):
        if isinstance(layer, layers.Dense):
            return kprune.prune_low_magnitude(
                layer, kprune.ConstantSparsity(0.5, 0, frequency=1)
            )
        return layer

    model = small_cnn()
    pruned = keras.models.clone_model(model, clone_function=prune_dense_only)
    assert [
        type(layer).__name__ for layer in collect_pruned_layers(pruned)
    ] == ["PruneLowMagnitude"]
    compile_classifier(pruned)
    x, y = classification_data(shape=(8, 8, 1))
    fit_pruned(pruned, x, y)
    conv_kernel = pruned.layers[0].kernel.numpy()
    dense_kernel = collect_pruned_layers(pruned)[0].layer.kernel.numpy()
    assert (conv_kernel != 0).all()
    assert (dense_kernel == 0).mean() == pytest.approx(0.5, abs=0.01)


def test_pattern_arguments_apply_only_to_layers_being_wrapped():
    conv = kprune.prune_low_magnitude(layers.Conv2D(4, 3))
    model = keras.Sequential(
        [keras.Input((8, 8, 1)), conv, layers.Flatten(), layers.Dense(3)]
    )
    # The layer wrapped first keeps its own pattern, and the call says so.
    with pytest.warns(UserWarning, match="already pruned"):
        pruned = kprune.prune_low_magnitude(model, block_size=(2, 1))
    blocks = [layer.block_size for layer in collect_pruned_layers(pruned)]
    assert blocks == [(1, 1), (2, 1)]


def _net():
    return keras.Sequential(
        [
            keras.Input((4,)),
            layers.Dense(8, name="dense1"),
            layers.Dense(8, name="dense2"),
            layers.Dense(2, name="out"),
        ],
        name="net",
    )


NEW_SCHEDULE = kprune.PolynomialDecay(0.1, 0.8, 0, 10)


def test_repruning_a_pruned_model_with_a_new_schedule_warns():
    pruned = kprune.prune_low_magnitude(_net())
    with pytest.warns(UserWarning, match="already pruned.*strip_pruning"):
        again = kprune.prune_low_magnitude(pruned, NEW_SCHEDULE)
    # As in tfmot, the wrappers keep their own schedule.
    assert all(
        w.pruning_schedule == kprune.ConstantSparsity(0.5, 0)
        for w in collect_pruned_layers(again)
    )
    # Stripping first prunes with the new schedule.
    stripped = kprune.strip_pruning(pruned)
    fresh = kprune.prune_low_magnitude(stripped, NEW_SCHEDULE)
    assert all(
        w.pruning_schedule == NEW_SCHEDULE for w in collect_pruned_layers(fresh)
    )


def test_repruning_a_pruned_model_with_its_own_arguments_is_silent(recwarn):
    pruned = kprune.prune_low_magnitude(_net(), NEW_SCHEDULE)
    kprune.prune_low_magnitude(pruned)
    kprune.prune_low_magnitude(pruned, NEW_SCHEDULE)
    assert not [w for w in recwarn if "already pruned" in str(w.message)]


def test_repruning_a_pruned_layer_with_a_new_schedule_fails():
    wrapped = kprune.prune_low_magnitude(layers.Dense(3))
    with pytest.raises(ValueError, match="already pruned.*layer.layer"):
        kprune.prune_low_magnitude(wrapped, NEW_SCHEDULE)
    with pytest.warns(UserWarning, match="already pruned"):
        kprune.prune_low_magnitude([wrapped, layers.Dense(2)], NEW_SCHEDULE)
    rewrapped = kprune.prune_low_magnitude(wrapped.layer, NEW_SCHEDULE)
    assert rewrapped.pruning_schedule == NEW_SCHEDULE


@pytest.mark.parametrize(
    "kwargs",
    [
        {"layers": ["net"]},
        {"layers": {"net": {}}},
        {"pruning_schedule": {"net": 0.5}},
    ],
    ids=["layers list", "layers dict", "schedule dict"],
)
def test_the_model_own_name_as_a_layer_key_fails(kwargs):
    with pytest.raises(ValueError, match="names the model itself.*'net'"):
        kprune.prune_low_magnitude(_net(), **kwargs)


def test_nested_model_name_as_a_layer_key_fails():
    inner = _net()
    x = keras.Input((4,))
    outer = keras.Model(x, layers.Dense(1, name="head")(inner(x)))
    with pytest.raises(
        ValueError, match=r"names models, not layers: \['net'\]"
    ):
        kprune.prune_low_magnitude(outer, layers=["net", "head"])


def test_structured_layer_whose_neighbour_is_not_structured_warns():
    structured = kprune.StructuredSparsity(kprune.ConstantSparsity(0.5, 0))
    with pytest.warns(UserWarning, match="prune nothing.*'dense1'.*'dense2'"):
        kprune.prune_low_magnitude(
            _net(), pruning_schedule={"dense1": structured}
        )


def test_structured_layers_that_prune_something_do_not_warn(recwarn):
    structured = kprune.StructuredSparsity(kprune.ConstantSparsity(0.5, 0))
    # dense2 keeps its units (it feeds `out`) but loses dense1's inputs.
    kprune.prune_low_magnitude(
        _net(), pruning_schedule={"dense1": structured, "dense2": structured}
    )
    # For the whole model the output layer keeps its units by design.
    kprune.prune_low_magnitude(_net(), pruning_schedule=structured)
    assert not [w for w in recwarn if "StructuredSparsity" in str(w.message)]


@pytest.mark.parametrize(
    "to_prune,keyword,suggestion",
    [
        (_net, "pruning_shedule", "pruning_schedule"),
        (lambda: layers.Dense(2), "pruning_shedule", "pruning_schedule"),
        (lambda: layers.Dense(2), "nmae", "name"),
        (_net, "layer", "layers"),
    ],
    ids=["model", "layer", "layer argument", "model layers"],
)
def test_misspelled_keyword_is_unknown_with_a_suggestion(
    to_prune, keyword, suggestion
):
    with pytest.raises(
        ValueError,
        match=f"Unknown argument `{keyword}`.*Did you mean `{suggestion}`",
    ):
        kprune.prune_low_magnitude(
            to_prune(), **{keyword: kprune.ConstantSparsity(0.5, 0)}
        )


def test_layer_arguments_for_a_model_say_they_are_for_layers():
    with pytest.raises(ValueError, match="`name` is a `keras.layers.Layer`"):
        kprune.prune_low_magnitude(_net(), name="pruned")
    assert kprune.prune_low_magnitude(layers.Dense(2), name="p").name == "p"
