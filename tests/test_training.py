import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import kprune
from kprune.wrapper import collect_pruned_layers
from testing import classification_data
from testing import compile_classifier
from testing import fit_pruned
from testing import mlp
from testing import pruned_weights
from testing import reference_kept
from testing import requires_tensorflow
from testing import slow_except
from testing import small_cnn
from testing import steps


class RecordAfterEachBatch(keras.callbacks.Callback):
    """Records, after every optimizer update, each pruned weight's zeros."""

    def __init__(self):
        super().__init__()
        self.zeros = []
        self.violations = 0

    def on_train_batch_end(self, batch, logs=None):
        row = []
        for weight, mask in pruned_weights(self.model):
            self.violations += int(np.count_nonzero(weight[~mask]))
            row.append(int(np.count_nonzero(weight == 0)))
        self.zeros.append(row)


@pytest.mark.parametrize("compile_again", [False, True])
def test_fit_without_update_pruning_step_fails_and_the_advice_works(
    compile_again,
):
    model = mlp()
    schedule = kprune.ConstantSparsity(0.5, begin_step=0, frequency=4)
    pruned = compile_classifier(kprune.prune_low_magnitude(model, schedule))
    before = [np.array(w) for w in pruned.get_weights()]
    x, y = classification_data()
    with pytest.raises(RuntimeError, match="UpdatePruningStep") as error:
        pruned.fit(x, y, epochs=1, verbose=0)
    if keras.backend.backend() == "jax":
        # Keras's JAX `fit` detaches the weights from the model before the
        # first step and cannot reattach them when that step fails: the
        # message says so, and that pruning the original model again works.
        assert "can no longer be used" in str(error.value)
        assert "Prune the original model again" in str(error.value)
        pruned = kprune.prune_low_magnitude(model, schedule)
        compile_classifier(pruned)
    else:
        assert "no need to compile again" in str(error.value)
        for a, b in zip(before, pruned.get_weights()):
            np.testing.assert_array_equal(a, b)
        if compile_again:
            compile_classifier(pruned)
    fit_pruned(pruned, x, y)
    assert steps(pruned) == [8, 8]
    assert kprune.sparsity_report(pruned)["pruned_total"][
        "sparsity"
    ] == pytest.approx(0.5, abs=0.01)


def test_first_batch_is_step_one_and_step_counts_batches():
    pruned = compile_classifier(kprune.prune_low_magnitude(mlp()))
    x, y = classification_data(n=24)
    fit_pruned(pruned, x, y, epochs=1, batch_size=4)
    assert steps(pruned) == [6, 6]
    fit_pruned(pruned, x, y, epochs=2, batch_size=8)
    assert steps(pruned) == [12, 12]


def test_masks_change_only_at_schedule_steps_with_exact_counts():
    schedule = kprune.PolynomialDecay(
        0.2, 0.8, begin_step=2, end_step=8, frequency=3
    )
    pruned = compile_classifier(kprune.prune_low_magnitude(mlp(), schedule))
    record = RecordAfterEachBatch()
    x, y = classification_data(n=40)
    fit_pruned(pruned, x, y, epochs=1, batch_size=4, callbacks=[record])
    sizes = [w.size for w, _ in pruned_weights(pruned)]
    for step, zeros in enumerate(record.zeros, start=1):
        last_prune = max([s for s in (2, 5, 8) if s <= step], default=None)
        for size, count in zip(sizes, zeros):
            if last_prune is None:
                assert count == 0
            else:
                sparsity = float(schedule(last_prune)[1])
                assert count == size - reference_kept(size, sparsity)
    assert record.violations == 0


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "rmsprop", "adamw"])
def test_pruned_weights_are_zero_after_every_optimizer_update(optimizer):
    opt = keras.optimizers.get(optimizer)
    if optimizer == "sgd":
        opt = keras.optimizers.SGD(0.1, momentum=0.9)
    pruned = compile_classifier(
        kprune.prune_low_magnitude(
            small_cnn(), kprune.ConstantSparsity(0.7, 0, frequency=3)
        ),
        optimizer=opt,
    )
    record = RecordAfterEachBatch()
    x, y = classification_data(n=40, shape=(8, 8, 1))
    fit_pruned(pruned, x, y, epochs=2, callbacks=[record])
    assert record.violations == 0
    for weight, mask in pruned_weights(pruned):
        assert np.count_nonzero(weight == 0) >= weight.size - mask.sum()
        assert weight.size - mask.sum() == weight.size - reference_kept(
            weight.size, 0.7
        )


def test_mid_epoch_checkpoint_is_as_sparse_as_the_schedule(tmp_path):
    pruned = compile_classifier(
        kprune.prune_low_magnitude(
            mlp(hidden=32), kprune.ConstantSparsity(0.75, 0, frequency=2)
        )
    )
    path = str(tmp_path / "ckpt.weights.h5")
    checkpoint = keras.callbacks.ModelCheckpoint(
        path, save_weights_only=True, save_freq=5
    )
    x, y = classification_data(n=36)
    fit_pruned(pruned, x, y, epochs=1, callbacks=[checkpoint])
    restored = kprune.prune_low_magnitude(mlp(hidden=32))
    restored.load_weights(path)
    assert steps(restored) == [5, 5]
    for weight, mask in pruned_weights(restored):
        assert not mask.all()
        assert np.count_nonzero(weight[~mask]) == 0
        assert mask.sum() == reference_kept(weight.size, 0.75)


def test_user_weight_constraints_still_apply():
    model = keras.Sequential(
        [
            keras.Input((6,)),
            layers.Dense(8, kernel_constraint=keras.constraints.NonNeg()),
            layers.Dense(3),
        ]
    )
    pruned = compile_classifier(
        kprune.prune_low_magnitude(
            model, kprune.ConstantSparsity(0.5, 0, frequency=1)
        )
    )
    x, y = classification_data(shape=(6,))
    fit_pruned(pruned, x, y, epochs=2)
    kernel, mask = pruned_weights(pruned)[0]
    assert (kernel >= 0).all()
    assert np.count_nonzero(kernel[~mask]) == 0
    stripped = kprune.strip_pruning(pruned)
    assert isinstance(
        stripped.layers[0].kernel.constraint, keras.constraints.NonNeg
    )


# Keras's torch trainer runs one step per execution.
multi_step_executions = pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="steps_per_execution > 1 is not supported on torch",
)


def train_seeded_mlp(schedule, n, **compile_kwargs):
    """One epoch of a seeded MLP; returns its pruned weights and steps."""
    keras.utils.set_random_seed(7)
    pruned = compile_classifier(
        kprune.prune_low_magnitude(mlp(), schedule), **compile_kwargs
    )
    x, y = classification_data(n=n)
    fit_pruned(pruned, x, y, epochs=1)
    return pruned_weights(pruned), steps(pruned)


@pytest.mark.slow
def test_training_under_xla_matches_graph_mode_masks():
    schedule = kprune.PolynomialDecay(0.3, 0.8, 0, 12, frequency=4)
    graph, graph_steps = train_seeded_mlp(schedule, 48, jit_compile=False)
    xla, xla_steps = train_seeded_mlp(schedule, 48, jit_compile=True)
    assert graph_steps == xla_steps == [12, 12]
    for (w1, m1), (w2, m2) in zip(graph, xla):
        assert m1.sum() == m2.sum() == reference_kept(m1.size, 0.8)
        np.testing.assert_allclose(w1, w2, atol=1e-4)


def test_block_sparsity_prunes_whole_blocks_during_training():
    pruned = compile_classifier(
        kprune.prune_low_magnitude(
            mlp(inputs=8, hidden=16),
            kprune.ConstantSparsity(0.5, 0, frequency=2),
            block_size=(4, 2),
            block_pooling_type="MAX",
        )
    )
    x, y = classification_data()
    fit_pruned(pruned, x, y, epochs=1)
    kernel, mask = pruned_weights(pruned)[0]  # 8 x 16: 2 x 8 blocks
    tiles = mask.reshape(2, 4, 8, 2).transpose(0, 2, 1, 3).reshape(16, 8)
    assert set(tiles.sum(axis=1)) == {0, 8}
    assert (tiles.sum(axis=1) == 8).sum() == reference_kept(16, 0.5)


def test_m_by_n_sparsity_holds_per_group_during_training():
    pruned = compile_classifier(
        kprune.prune_low_magnitude(
            small_cnn(),
            kprune.ConstantSparsity(0.5, 0, frequency=2),
            sparsity_m_by_n=(2, 4),
        )
    )
    x, y = classification_data(shape=(8, 8, 1))
    fit_pruned(pruned, x, y, epochs=1)
    conv_kernel, _ = pruned_weights(pruned)[0]  # (3, 3, 1, 4): 1 input
    dense_kernel, _ = pruned_weights(pruned)[1]  # (36, 3)
    groups = dense_kernel.reshape(9, 4, 3)
    assert ((groups != 0).sum(axis=1) <= 2).all()
    assert (conv_kernel != 0).any()  # one channel: tail group keeps it


@requires_tensorflow
def test_custom_training_loop_with_gradient_tape():
    pruned = kprune.prune_low_magnitude(
        mlp(), kprune.ConstantSparsity(0.6, 0, frequency=2)
    )
    optimizer = keras.optimizers.Adam()
    optimizer.build(pruned.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x, y = classification_data(n=32)

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, pruned(xb, training=True))
        grads = tape.gradient(loss, pruned.trainable_variables)
        optimizer.apply(grads, pruned.trainable_variables)

    with pytest.raises(RuntimeError, match="on_train_begin"):
        train_step(x[:4], y[:4])

    step_callback = kprune.UpdatePruningStep()
    step_callback.set_model(pruned)
    step_callback.on_train_begin()
    for epoch in range(2):
        for i in range(0, 32, 4):
            step_callback.on_train_batch_begin(batch=i)  # tfmot habit: no-op
            train_step(x[i : i + 4], y[i : i + 4])
        step_callback.on_epoch_end(epoch)
    assert steps(pruned) == [16, 16]
    for weight, mask in pruned_weights(pruned):
        assert mask.sum() == reference_kept(weight.size, 0.6)
        assert np.count_nonzero(weight[~mask]) == 0


def test_model_sparsity_is_in_fit_history():
    pruned = compile_classifier(
        kprune.prune_low_magnitude(
            mlp(), kprune.ConstantSparsity(0.8, 0, frequency=1)
        )
    )
    x, y = classification_data()
    history = fit_pruned(pruned, x, y, epochs=2)
    total = sum(w.size for w, _ in pruned_weights(pruned))
    zeros = sum(w.size - m.sum() for w, m in pruned_weights(pruned))
    assert history.history["sparsity"][-1] == pytest.approx(zeros / total)
    assert history.history["sparsity"][-1] > 0.79


def test_subclassed_schedule_drives_training():
    class PruneAtStepTwo(kprune.PruningSchedule):
        def __call__(self, step):
            return (
                keras.ops.equal(step, 2),
                keras.ops.convert_to_tensor(0.5, "float32"),
            )

        def get_config(self):
            return {}

    pruned = compile_classifier(
        kprune.prune_low_magnitude(mlp(), PruneAtStepTwo())
    )
    record = RecordAfterEachBatch()
    x, y = classification_data(n=16)
    fit_pruned(pruned, x, y, callbacks=[record])
    assert [z[0] for z in record.zeros] == [0, 64, 64, 64]


def test_each_pruned_layer_owns_its_schedule():
    model = mlp()
    first = kprune.prune_low_magnitude(
        model.layers[0], kprune.ConstantSparsity(0.25, 0, frequency=1)
    )
    second = kprune.prune_low_magnitude(
        model.layers[1], kprune.ConstantSparsity(0.75, 0, frequency=1)
    )
    pruned = compile_classifier(
        keras.Sequential([keras.Input((8,)), first, second])
    )
    x, y = classification_data()
    fit_pruned(pruned, x, y)
    sparsities = [1 - m.mean() for _, m in pruned_weights(pruned)]
    assert sparsities == [pytest.approx(0.25), pytest.approx(0.75)]
    assert len(collect_pruned_layers(pruned)) == 2


def test_tfmot_guide_style_sequential_with_input_shape_on_first_layer():
    with pytest.warns(UserWarning, match="input_shape"):  # Keras 3's own
        first = layers.Dense(12, input_shape=(8,))
    pruned = keras.Sequential(
        [
            kprune.prune_low_magnitude(
                first,
                pruning_schedule=kprune.ConstantSparsity(0.5, 0, frequency=2),
            ),
            layers.Flatten(),
            layers.Dense(3),
        ]
    )
    assert pruned.built
    compile_classifier(pruned)
    x, y = classification_data()
    fit_pruned(pruned, x, y)
    weight, mask = pruned_weights(pruned)[0]
    assert mask.sum() == reference_kept(weight.size, 0.5)


def test_tf_keras_models_are_keras_3_models_and_prune():
    model = tf.keras.Sequential(
        [
            tf.keras.Input((8,)),
            tf.keras.layers.Dense(6),
            tf.keras.layers.Dense(3),
        ]
    )
    pruned = compile_classifier(
        kprune.prune_low_magnitude(
            model, kprune.ConstantSparsity(0.5, 0, frequency=1)
        )
    )
    x, y = classification_data()
    fit_pruned(pruned, x, y)
    assert all(
        mask.sum() == reference_kept(w.size, 0.5)
        for w, mask in pruned_weights(pruned)
    )


def test_model_built_lazily_in_fit_is_driven_from_step_one():
    pruned = keras.Sequential(
        kprune.prune_low_magnitude(
            [layers.Dense(6), layers.Dense(3)],
            pruning_schedule=kprune.ConstantSparsity(0.5, 1, frequency=3),
        )
    )
    assert not pruned.built
    compile_classifier(pruned)
    record = RecordAfterEachBatch()
    x, y = classification_data(n=16)
    fit_pruned(pruned, x, y, callbacks=[record])
    assert steps(pruned) == [4, 4]
    assert [zeros[0] > 0 for zeros in record.zeros] == [True] * 4


@multi_step_executions
def test_steps_per_execution_follows_the_schedule_per_step():
    schedule = kprune.PolynomialDecay(0.2, 0.9, 0, 10, frequency=3)
    one, one_steps = train_seeded_mlp(schedule, 40, steps_per_execution=1)
    four, four_steps = train_seeded_mlp(schedule, 40, steps_per_execution=4)
    assert one_steps == four_steps == [10, 10]
    sparsity = float(schedule(9)[1])  # the last pruning step
    for (w1, m1), (w2, m2) in zip(one, four):
        np.testing.assert_array_equal(m1, m2)
        np.testing.assert_allclose(w1, w2, atol=1e-5)
        assert m1.sum() == reference_kept(m1.size, sparsity)


def test_layers_wrapped_inside_a_subclassed_model_are_driven():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = kprune.prune_low_magnitude(
                layers.Dense(16, activation="relu"),
                pruning_schedule=kprune.ConstantSparsity(0.75, 0, frequency=2),
            )
            self.head = layers.Dense(3)

        def call(self, x, training=None):
            return self.head(self.hidden(x, training=training))

    net = compile_classifier(Net())
    x, y = classification_data()
    fit_pruned(net, x, y)
    assert steps(net) == [8]
    kernel = keras.ops.convert_to_numpy(net.hidden.layer.kernel)
    assert (kernel != 0).sum() == reference_kept(kernel.size, 0.75)
    sparse = net.hidden.masked_layer_weights()[0]
    np.testing.assert_array_equal(sparse, kernel)


def test_m_by_n_groups_input_channels_of_transposed_convolutions():
    model = keras.Sequential(
        [
            keras.Input((4, 4, 8)),
            layers.Conv2DTranspose(3, 2),
            layers.Flatten(),
            layers.Dense(2),
        ]
    )
    pruned = compile_classifier(
        kprune.prune_low_magnitude(
            model,
            kprune.ConstantSparsity(0.5, 0, frequency=1),
            sparsity_m_by_n=(2, 4),
        )
    )
    x, y = classification_data(shape=(4, 4, 8), classes=2)
    fit_pruned(pruned, x, y)
    kernel, _ = pruned_weights(pruned)[0]  # (2, 2, 3 filters, 8 inputs)
    groups = kernel.reshape(2, 2, 3, 2, 4)
    assert ((groups != 0).sum(axis=-1) == 2).all()


@multi_step_executions
@pytest.mark.parametrize("jit_compile", slow_except(False, [False, True]))
def test_mask_update_due_inside_an_execution_chunk_happens_at_its_step(
    jit_compile,
):
    # Step 3 is in the middle of the first chunk of 4 steps: pruning at the
    # end of the chunk (step 4) would give other weights than one step at
    # a time.
    schedule = kprune.ConstantSparsity(0.5, begin_step=3, end_step=3)
    one, one_steps = train_seeded_mlp(schedule, 40, steps_per_execution=1)
    four, four_steps = train_seeded_mlp(
        schedule, 40, steps_per_execution=4, jit_compile=jit_compile
    )
    assert one_steps == four_steps == [10, 10]
    for (w1, m1), (w2, m2) in zip(one, four):
        np.testing.assert_array_equal(m1, m2)
        np.testing.assert_allclose(w1, w2, atol=1e-5)
        assert m1.sum() == reference_kept(m1.size, 0.5)


def test_model_that_drops_training_says_to_pass_it_on():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = kprune.prune_low_magnitude(layers.Dense(4))
            self.head = layers.Dense(3)

        def call(self, x):
            return self.head(self.hidden(x))

    net = compile_classifier(Net())
    x, y = classification_data()
    with pytest.raises(RuntimeError, match="training=training"):
        fit_pruned(net, x, y)


@pytest.mark.parametrize(
    "equation,output_shape,groups_axis",
    [
        # An attention query kernel (hidden 8, 2 heads, 4 per head): the
        # inputs are on axis 0, the heads on axis -2.
        ("abc,cde->abde", (3, 2, 4), 0),
        # An attention output kernel (2 heads, 4 per head, hidden 8): the
        # inputs are axes 0 and 1, consecutive along axis 1.
        ("abcd,cde->abe", (3, 8), 1),
    ],
)
def test_m_by_n_groups_the_contracted_axis_of_einsum_dense_kernels(
    equation, output_shape, groups_axis
):
    inputs = keras.Input((3, 8) if equation.startswith("abc,") else (3, 2, 4))
    outputs = layers.EinsumDense(equation, output_shape)(inputs)
    model = keras.Sequential(
        [keras.Model(inputs, outputs), layers.Flatten(), layers.Dense(2)]
    )
    pruned = compile_classifier(
        kprune.prune_low_magnitude(
            model,
            kprune.ConstantSparsity(0.5, 0, frequency=1),
            sparsity_m_by_n=(2, 4),
        )
    )
    x, y = classification_data(shape=tuple(inputs.shape[1:]), classes=2)
    fit_pruned(pruned, x, y)
    kernel, _ = pruned_weights(pruned)[0]
    moved = np.moveaxis(kernel, groups_axis, -1)
    groups = moved.reshape(*moved.shape[:-1], -1, 4)
    assert ((groups != 0).sum(axis=-1) == 2).all()
