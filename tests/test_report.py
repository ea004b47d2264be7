"""The parity report's figure, read from its axes (not its pixels): a cosine near 1 drawn flat, an unmeasured
panel drawn as text alone, legends clear of the points."""

import matplotlib.pyplot as plt
import pytest

from ce_guard.report import PANELS, report_figure

CLEAN_STEPS, DRIFT_STEPS = range(0, 60, 10), range(60, 80, 10)


def receipts(cosine_at: dict[int, float] | None = None) -> list[dict]:
    """Clean checks whose cosine wobbles by 4e-13 under 1 (float64 rounding), then a scale drift at the end
    (the cosine stays near 1, every error jumps to the top right). No dL/dW: the weight was not compared."""
    records = []
    for i, step in enumerate([*CLEAN_STEPS, *DRIFT_STEPS]):
        drift = step in DRIFT_STEPS
        cosine = (cosine_at or {}).get(step, 1 - (1 + 4 * (i % 2)) * 1e-13)
        metrics = {"ce_parity/margin_loss": 1e3 if drift else 1e-3 * (i + 1),
                   "ce_parity/margin_grad_hidden": 4e2 if drift else 1e-2,
                   "ce_parity/loss_rel_err": 0.1 if drift else 1e-8 * (i + 1),
                   "ce_parity/budget_loss_rel": 2e-6,
                   "ce_parity/grad_hidden_norm_ratio": 0.9 if drift else 1 + 1e-8 * i,
                   "ce_parity/budget_grad_hidden_rel": 2e-5,
                   "ce_parity/grad_cosine": cosine}
        cause = "normalization_scale" if drift else "within_budget"
        records.append({"step": step, "drift": drift, "cause": cause, "summary": "", "metrics": metrics})
    return records


@pytest.fixture
def drawn():
    """Draw a figure (so tick labels, offset texts and legend extents exist) and close it afterwards."""
    figures = []

    def draw(records):
        fig = report_figure(records)
        fig.canvas.draw()
        figures.append(fig)
        return {metrics[0].name: ax for ax, (_, metrics) in zip(fig.axes, PANELS, strict=True)}

    yield draw
    for fig in figures:
        plt.close(fig)


def visible_ytick_labels(ax) -> list[str]:
    if not (ax.axison and ax.yaxis.get_visible()):
        return []
    return [t.get_text() for t in ax.get_yticklabels() if t.get_visible() and t.get_text()]


def point_heights(ax) -> list[float]:
    """The marked points of the axes' lines, as fractions of the axes' height."""
    (line,) = [line for line in ax.lines if line.get_marker() not in (None, "", "None")]
    return [ax.transAxes.inverted().transform(ax.transData.transform(xy))[1] for xy in line.get_xydata()]


def test_the_cosine_panel_draws_a_clean_run_flat_and_a_real_drop_high(drawn):
    ax = drawn(receipts(cosine_at={70: 1 - 1e-5}))["grad_cosine"]  # a z-loss-sized turn (tests/assets)
    assert ax.yaxis.get_offset_text().get_text() == ""  # no "1e-13+1": the ticks read as they are
    heights = point_heights(ax)
    clean, turned = heights[: len(CLEAN_STEPS)], heights[-1]
    assert max(clean) - min(clean) < 0.05  # a 4e-13 wobble is flat
    assert turned - max(clean) > 0.25  # 1e-5 off is plainly off


def test_an_unmeasured_panel_is_its_text_alone_and_the_steps_stay_labelled(drawn):
    axes = drawn(receipts())
    unmeasured = axes["grad_weight_norm_ratio"]
    assert visible_ytick_labels(unmeasured) == []
    assert [t.get_text() for t in unmeasured.texts] == ["not measured"]
    assert visible_ytick_labels(axes["grad_cosine"]) != []
    shown = [ax for ax in axes.values() if ax.axison and any(t.get_text() for t in ax.get_xticklabels())]
    assert shown and shown[-1].get_xlabel() == "trainer/global_step"


def test_no_legend_covers_a_point(drawn):
    axes = drawn(receipts())
    legends = [(ax, ax.get_legend()) for ax in axes.values() if ax.get_legend() is not None]
    assert len(legends) >= 3  # margins, loss and dL/dh each name a budget
    for ax, legend in legends:
        box = legend.get_window_extent()
        for line in ax.lines:
            if line.get_marker() in (None, "", "None"):
                continue
            for x, y in ax.transData.transform(line.get_xydata()):
                assert not box.contains(x, y), f"{ax.get_title(loc='left')}: the legend covers ({x:.0f}, {y:.0f})"
