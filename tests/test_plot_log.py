"""plot_log.py: reading a (resumed) training log and drawing it into an image."""

import math
import os

import matplotlib.image
import numpy as np
import pytest

import plot_log
from conftest import run_script
from plot_log import GPT2_124M_FINEWEB_EDU_VAL_LOSS, build_figure, main, parse_log


def run_lines(first_step, last_step, with_hella, evals_first=True, eval_every=25):
    """Log lines of one run. build-nanogpt logs a step's val and hella before its train loss
    (evals_first); train_gpt2.py logs them after."""
    lines = []
    for step in range(first_step, last_step + 1):
        loss = 3.3 + 7.7 * math.exp(-step / 40) + 0.1 * math.sin(step)
        evals = [f"{step} val {loss:.4f}"] if step % eval_every == 0 else []
        if evals and with_hella:
            evals.append(f"{step} hella {0.25 + step / 10000:.4f}")
        train = [f"{step} train {loss:.6f}"]
        lines += evals + train if evals_first else train + evals
    return lines


def write_log(tmp_path, lines, name="log.txt"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("evals_first", [True, False])
def test_resumed_log_keeps_the_latest_run(tmp_path, evals_first):
    # Ran to step 120, crashed, resumed from the checkpoint at 75, crashed again in the middle of
    # step 100 (its last line not logged), resumed from 100 exactly, then ran to 110.
    crashed_mid_step = run_lines(75, 100, True, evals_first)[:-1]
    resumed = run_lines(100, 110, True, evals_first)
    lines = run_lines(0, 120, True, evals_first) + crashed_mid_step + ["", "  "] + resumed
    series = parse_log(write_log(tmp_path, lines))
    assert series["train"][0] == list(range(111))
    assert series["val"][0] == series["hella"][0] == [0, 25, 50, 75, 100]
    assert series == parse_log(write_log(tmp_path, run_lines(0, 110, True), "fresh.txt"))


def test_a_resumed_run_keeps_its_evals_and_drops_those_it_has_not_reached(tmp_path):
    # The abandoned run evaluated at 100; the resumed one (from 80, between evals) stopped at 90:
    # the old run's evals at 100 must go too, though only train lines repeat steps.
    series = parse_log(write_log(tmp_path, run_lines(0, 105, True) + run_lines(80, 90, True)))
    assert series["val"][0] == series["hella"][0] == [0, 25, 50, 75]
    assert series["train"][0][-1] == 90
    # Crashed after step 3, resumed from step 2, where the new run evaluates before training: its
    # val point at 2 is new, and must survive the train line at 2 that discards the old run's steps
    # 2 and 3.
    old_run = ["0 val 11.0", "0 train 11.0", "1 train 9.0", "2 train 8.0", "3 train 7.0"]
    series = parse_log(write_log(tmp_path, old_run + ["2 val 7.5", "2 train 7.9", "3 train 7.1"]))
    assert series["train"] == ([0, 1, 2, 3], [11.0, 9.0, 7.9, 7.1])
    assert series["val"] == ([0, 2], [11.0, 7.5])


@pytest.mark.parametrize("out", ["plots/loss.png", None])
def test_the_script_draws_a_resumed_log_or_one_without_hellaswag(tmp_path, out):
    if out:
        log = write_log(tmp_path, run_lines(0, 120, True) + run_lines(75, 200, True))
    else:  # a first step diverged, no HellaSwag lines, and the image goes next to the log
        log = write_log(tmp_path, ["0 train nan"] + run_lines(1, 60, False))
    result = run_script("plot_log.py", log, *(["-o", tmp_path / out] if out else []))
    assert result.returncode == 0, result.stderr
    image = tmp_path / (out or "loss.png")
    with open(image, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(image) > 10_000
    pixels = matplotlib.image.imread(image)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 600
    assert pixels.std() > 0.05  # lines and text drawn, not one flat colour
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 20
    # No temporary file left behind.
    assert [p.name for p in image.parent.iterdir() if p.name != "log.txt"] == ["loss.png"]


# --- What the figure shows, read back from the matplotlib Figure: a PNG says nothing of its panels


def figure_for(tmp_path, lines, **options):
    return build_figure(parse_log(write_log(tmp_path, lines)), **options)


def legend_texts(ax):
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def notes(ax):
    return [t.get_text() for t in ax.texts]


def only(lines, *kinds):
    return [line for line in lines if line.split()[1] in kinds]


# 200 train points: each drawn faintly, and their moving average over 200 // 50 = 4 steps.
TRAIN = ["train, each step", "train, mean of 4 steps"]
VAL = "val, each evaluation"
LOSS_REFERENCE = f"OpenAI GPT-2 124M, FineWeb-edu val: {GPT2_124M_FINEWEB_EDU_VAL_LOSS}"


def reference_lines(ax):
    """The horizontal reference lines drawn on ax, by their height."""
    return sorted(line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == "--")


def test_panels_legends_and_reference_lines_follow_the_log_and_the_flags(tmp_path, monkeypatch):
    lines = run_lines(0, 200, True)
    train = only(lines, "train")
    # A log with val lines only still has a loss panel; too few points to smooth: plain "train".
    # The last figure's val line is looked at below.
    loss_alone = [(train[:30], ["train"]), (train, TRAIN), (only(lines, "val"), [VAL])]
    for panel_lines, legend in loss_alone + [(only(lines, "train", "val"), [*TRAIN, VAL])]:
        (ax,) = figure_for(tmp_path, panel_lines).axes
        assert legend_texts(ax) == legend
    val_line = next(line for line in ax.get_lines() if line.get_label() == VAL)
    assert val_line.get_marker() == "o"  # each evaluation is a point: between two, no measurement

    log = write_log(tmp_path, lines)
    series = parse_log(log)
    # By default HellaSwag's references only: the loss one holds for FineWeb-edu val alone, which
    # log.txt can't show. Of the flags --ref and --no-ref the last one given wins, as with any pair
    # of flags; each gives the figure that build_figure's options give.
    figures = []
    monkeypatch.setattr(plot_log, "save_figure", lambda fig, out_path: figures.append(fig))
    loss = ([], [*TRAIN, VAL])  # each panel as (its reference lines, its legend)
    loss_and_reference = ([3.2924], [*TRAIN, VAL, LOSS_REFERENCE])
    hella = ([0.2955, 0.337], ["this run", "OpenAI GPT-2 124M: 0.2955", "GPT-3 124M: 0.337"])
    hella_alone = ([], ["this run"])
    for flags, options, panels in [
        ([], {}, [loss, hella]),
        (["--ref"], dict(loss_reference=True), [loss_and_reference, hella]),
        (["--ref", "--no-ref"], dict(hellaswag_reference=False), [loss, hella_alone]),
    ]:
        main([str(log), *flags])
        for figure in [figures.pop(), build_figure(series, **options)]:
            assert [ax.get_title() for ax in figure.axes] == ["Loss", "HellaSwag"]
            assert [(reference_lines(ax), legend_texts(ax)) for ax in figure.axes] == panels

    low, high = build_figure(series, loss_reference=True).axes[0].get_ylim()
    assert low < GPT2_124M_FINEWEB_EDU_VAL_LOSS < high
    # A short run whose loss is still far above the reference: the axis reaches down to it anyway.
    short_run = [f"{step} train {9.0 - 0.01 * step}" for step in range(100)]
    low, high = figure_for(tmp_path, short_run, loss_reference=True).axes[0].get_ylim()
    assert low < GPT2_124M_FINEWEB_EDU_VAL_LOSS < 8.0 < high


def test_clipped_axis_says_how_many_points_it_hides(tmp_path):
    # Loss falls from 11 to 3.3: the axis stops 3 nats above the lowest loss, hiding first steps.
    lines = ["0 train nan"] + run_lines(1, 200, False)
    series = parse_log(write_log(tmp_path, lines))
    ax = build_figure(series).axes[0]
    top = ax.get_ylim()[1]
    losses = np.array(series["train"][1] + series["val"][1])
    hidden = int(np.sum(losses > top))  # nan compares False: not counted as above
    assert hidden > 5
    assert f"y clipped at {top:.2f}: {hidden} points above (--no-clip shows them)" in notes(ax)[0]
    assert "1 point nan/inf: not drawn" in notes(ax)[0]

    ax = build_figure(series, clip=False).axes[0]
    assert ax.get_ylim()[1] > np.nanmax(losses)
    assert notes(ax) == ["1 point nan/inf: not drawn"]

    # A curve that fits in the clip window hides nothing and says nothing.
    flat = [f"{step} train {3.5 + 0.01 * step}" for step in range(50)]
    assert notes(figure_for(tmp_path, flat).axes[0]) == []


def test_help_lists_every_flag_with_its_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for flag in ("--out", "--ref", "--no-ref", "--no-clip"):
        assert flag in help_text
    # --ref and --no-ref share one setting: its default is told once, in words, not "(default:".
    assert help_text.count("default") == 3  # --out's, --ref's, --no-clip's
    assert "(default:" not in help_text
