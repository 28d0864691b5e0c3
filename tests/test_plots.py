"""plots.png (dermfast.eval.plots): round tick values, a log loss axis, the synth stage's VAE -> denoiser marker
read from the run's config.yaml, the lr axis named as the base lr, a legend under the axes."""
import csv
import math

import numpy as np
import pytest
from PIL import Image

from dermfast.eval import plots


def write_log(d, steps=40, loss=lambda s: 2.0 * 0.9 ** s, lr=lambda s: 5e-4 * s / 40):
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "log.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "loss", "lr"])
        for s in range(1, steps + 1):
            w.writerow([0, s, loss(s), lr(s)])
    return d / "log.csv"


def test_log_loss_axis_with_decade_ticks(tmp_path):
    log = write_log(tmp_path / "run")  # loss 1.8 .. 0.03: over a decade
    fig = plots.training_figure(log)
    loss, lr = fig.panels
    assert loss.y_scale == "log" and lr.y_scale == "linear"
    values = [v for v, _ in loss.yticks]
    assert values == [0.05, 0.1, 0.2, 0.5, 1.0, 2.0]
    assert [s for _, s in loss.yticks] == ["0.05", "0.1", "0.2", "0.5", "1", "2"]
    # a log axis: equal ratios are equal distances (the tick rows in the image are where log10 puts them)
    img = np.asarray(fig.image.convert("L"))
    x0, y0, x1, y1 = loss.plot_box
    tick_rows = [y for y in range(y0, y1) if img[y, x0 - 3] < 100]  # the 4-px tick marks left of the frame
    assert len(tick_rows) == 6
    top, bottom = tick_rows[0], tick_rows[-1]  # image rows grow downwards: the largest value is on top
    pos = np.log10(values[::-1])
    expect = top + (pos[0] - pos) / (pos[0] - pos[-1]) * (bottom - top)
    assert np.abs(np.array(tick_rows) - expect).max() <= 1.5, (tick_rows, expect)
    # lr: round linear ticks, the axis says it is the schedule's base lr
    assert lr.ylabel == "lr (base)" and [s for _, s in lr.yticks][:3] == ["0", "0.0001", "0.0002"]
    assert [s for _, s in loss.xticks] == ["5", "10", "15", "20", "25", "30", "35", "40"]


def test_loss_with_a_zero_or_negative_value_stays_linear(tmp_path):
    log = write_log(tmp_path / "run", loss=lambda s: 1.0 - s / 20)  # crosses zero
    loss = plots.training_figure(log).panels[0]
    assert loss.y_scale == "linear"
    assert all(math.isclose(v / 0.5, round(v / 0.5), abs_tol=1e-9) for v, _ in loss.yticks)  # steps of 0.5
    assert len(loss.yticks) >= 3


def test_synth_marker_from_config_and_legend_below(tmp_path):
    run = tmp_path / "synth"
    log = write_log(run)
    (run / "config.yaml").write_text("stage: synth\nvae_steps: 12\nvae: null\nmax_steps: 40\n")
    with open(run / "eval.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "balanced_accuracy", "auroc", "ece"])
        for s in (10, 20, 30, 40):
            w.writerow([s, 0, 0.3 + s / 100, 0.5 + s / 100, 0.2 - s / 400])
    out = plots.save_training_plots(log, run / "plots.png", eval_csv=run / "eval.csv")
    fig = plots.training_figure(log, eval_csv=run / "eval.csv")
    assert [p.markers for p in fig.panels] == [[(12.5, "VAE | denoiser")]] * 3
    # the dashed marker line is drawn in the written PNG, in the marker's grey, at step 12.5
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    loss = fig.panels[0]
    x0, y0, x1, y1 = loss.plot_box
    col = round(loss.x_to_px(12.5))
    grey = np.all(np.abs(img[y0 + 1:y1, col - 1:col + 2] - plots.MARKER_COLOUR) <= 10, axis=-1).any(axis=1)
    assert grey.sum() > 0.3 * (y1 - y0)
    # the legend of the several eval curves lies under the axes, not over the curves
    ev = fig.panels[2]
    assert ev.legend_box is not None and ev.legend_box[1] > ev.plot_box[3]
    assert ev.legend_box[3] <= fig.image.height
    assert all(p.legend_box is None for p in fig.panels[:2])  # one curve: no legend


@pytest.mark.parametrize("cfg", ["stage: synth\nvae_steps: 0\nvae: null\n",           # VAE-only is not a switch
                                 "stage: synth\nvae_steps: 120\nvae: /some/vae\n",     # --vae: no VAE phase
                                 "stage: synth\nvae_steps: 100\nvae: null\n",          # switch after the last row
                                 "stage: mae\nepochs: 3\n"])
def test_no_marker_without_a_switch_in_the_logged_steps(tmp_path, cfg):
    run = tmp_path / "r"
    log = write_log(run)
    (run / "config.yaml").write_text(cfg)
    assert all(p.markers == [] for p in plots.training_figure(log).panels)


def test_explicit_markers_and_empty_log(tmp_path):
    log = write_log(tmp_path / "r")
    assert plots.training_figure(log, markers=[(20, "phase 2")]).panels[1].markers == [(20, "phase 2")]
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "log.csv").write_text("epoch,step,loss,lr\n")
    with pytest.raises(ValueError, match="no rows"):
        plots.save_training_plots(tmp_path / "e" / "log.csv", tmp_path / "e" / "p.png")


def test_nice_and_log_ticks():
    assert plots.nice_ticks(0, 1, 5) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert plots.nice_ticks(1, 60, 7) == [10, 20, 30, 40, 50, 60]
    assert plots.log_ticks(1e-4, 3.0) == [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    assert plots.log_ticks(0.3, 0.8) == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
