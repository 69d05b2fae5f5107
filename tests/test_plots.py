"""Plots of sparsity, schedules and masks."""

import keras
import numpy as np
import pytest

import kprune
from testing import classification_data
from testing import compile_classifier
from testing import fit_pruned
from testing import small_cnn

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG"


def rendered(figure):
    """`figure` drawn by Agg, and the renderer (for text extents)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return canvas.get_renderer()


def test_plot_sparsity_draws_one_bar_per_pruned_weight(tmp_path):
    pruned = compile_classifier(
        kprune.prune_low_magnitude(
            small_cnn(), kprune.ConstantSparsity(0.75, 0, frequency=1)
        )
    )
    fit_pruned(pruned, *classification_data(shape=(8, 8, 1)))
    path = tmp_path / "sparsity.png"
    figure = kprune.plot_sparsity(kprune.strip_pruning(pruned), path)
    bars = figure.axes[0].patches
    assert len(bars) == 2
    report = kprune.sparsity_report(pruned)["weights"]
    expected = [100 * r["sparsity"] for r in report if r["pruned"]]
    np.testing.assert_allclose([b.get_width() for b in bars], expected)
    assert path.read_bytes()[:4] == PNG_MAGIC


def test_plot_schedule_draws_the_target_and_marks_pruning_steps(tmp_path):
    schedule = kprune.PolynomialDecay(0.5, 0.9, 0, 40, frequency=10)
    figure = kprune.plot_schedule(schedule, 60, tmp_path / "schedule.svg")
    target, marks = figure.axes[0].lines
    steps, values = target.get_data()
    assert list(steps) == list(range(1, 61))
    assert values[0] == pytest.approx(50 + 40 * (1 - (1 - 1 / 40) ** 3))
    assert values[-1] == pytest.approx(90)
    assert list(marks.get_xdata()) == [10, 20, 30, 40]
    assert (tmp_path / "schedule.svg").read_text().lstrip().startswith("<")


def test_plot_mask_shows_kept_weights_black(tmp_path):
    weight = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, -3.0]], np.float32)
    figure = kprune.plot_mask(weight, tmp_path / "mask.png")
    image = figure.axes[0].images[0].get_array()
    np.testing.assert_array_equal(image, weight != 0)
    assert "50.0% zeros" in figure.axes[0].get_title()
    conv = np.ones((3, 3, 2, 4), np.float32)
    assert kprune.plot_mask(conv).axes[0].images[0].get_array().shape == (
        18,
        4,
    )


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: kprune.plot_schedule(0.5, 10), "PruningSchedule"),
        (
            lambda: kprune.plot_schedule(kprune.ConstantSparsity(0.5, 0), 0),
            "end_step",
        ),
        (lambda: kprune.plot_mask(np.float32(1.0)), "rank >= 1"),
    ],
)
def test_plots_reject_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_plot_sparsity_labels_of_large_layers_fit_in_the_figure(tmp_path):
    from matplotlib.text import Text

    model = keras.Sequential(
        [
            keras.Input((1600,)),
            keras.layers.Dense(1600, name="a_rather_long_layer_name"),
            keras.layers.Dense(10),
        ]
    )
    kernel = keras.ops.convert_to_numpy(model.layers[0].kernel)
    kernel[:, : 1600 * 9 // 10] = 0.0
    model.layers[0].kernel.assign(kernel)
    figure = kprune.plot_sparsity(model, tmp_path / "sparsity.png")
    renderer = rendered(figure)
    texts = [
        t for t in figure.findobj(Text) if t.get_visible() and t.get_text()
    ]
    assert "90.0% of 2,560,000" in [t.get_text() for t in texts]
    for text in texts:
        extent = text.get_window_extent(renderer)
        assert figure.bbox.contains(extent.x0, extent.y0), text.get_text()
        assert figure.bbox.contains(extent.x1, extent.y1), text.get_text()


@pytest.mark.parametrize("shape", [(2, 3), (3, 3, 2, 4), (7,), (40, 5)])
def test_plot_mask_ticks_are_whole_rows_and_columns(shape):
    weight = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    figure = kprune.plot_mask(weight)
    rendered(figure)
    axes = figure.axes[0]
    rows, cols = axes.images[0].get_array().shape
    for ticks, limit in [(axes.get_yticks(), rows), (axes.get_xticks(), cols)]:
        shown = [t for t in ticks if -0.5 <= t <= limit - 0.5]
        assert shown, ticks
        assert all(float(t).is_integer() for t in shown), ticks
