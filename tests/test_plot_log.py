"""plot_log.py: reading a (resumed) training log and drawing it into an image."""

import math
import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from common import UserError, run_cli
from conftest import REPO
from plot_log import main, parse_log

PLOT_LOG = os.path.join(REPO, "plot_log.py")


def run_lines(first_step, last_step, with_hella, evals_first=True, eval_every=25):
    """Log lines of one run. build-nanogpt logs a step's val and hella before its train loss (evals_first);
    train_gpt2.py logs them after."""
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


def plot(*args):
    return subprocess.run([sys.executable, PLOT_LOG, *map(str, args)], capture_output=True, text=True, timeout=60)


def assert_real_image(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 10_000
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 600
    assert pixels.std() > 0.05  # lines and text drawn, not one flat colour
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 20


@pytest.mark.parametrize("evals_first", [True, False])
def test_resumed_log_keeps_the_latest_run(tmp_path, evals_first):
    # Ran to step 120, crashed, resumed from the checkpoint at 75, crashed again in the middle of step
    # 100 (its last line not logged), resumed from 100 exactly, then ran to 110.
    crashed_mid_step = run_lines(75, 100, True, evals_first)[:-1]
    resumed = run_lines(100, 110, True, evals_first)
    lines = run_lines(0, 120, True, evals_first) + crashed_mid_step + ["", "  "] + resumed
    series = parse_log(write_log(tmp_path, lines))
    assert series["train"][0] == list(range(111))
    assert series["val"][0] == [0, 25, 50, 75, 100]
    assert series["hella"][0] == [0, 25, 50, 75, 100]
    fresh = parse_log(write_log(tmp_path, run_lines(0, 110, True), "fresh.txt"))
    for kind in ("train", "val", "hella"):
        assert series[kind][1] == fresh[kind][1]


def test_resume_drops_evals_the_new_run_has_not_reached(tmp_path):
    # The abandoned run evaluated at 100; the resumed one (from 80, between evals) stopped at 90: the old
    # run's evals at 100 must go too, though only train lines repeat steps.
    lines = run_lines(0, 105, True) + run_lines(80, 90, True)
    series = parse_log(write_log(tmp_path, lines))
    assert series["val"][0] == [0, 25, 50, 75]
    assert series["hella"][0] == [0, 25, 50, 75]
    assert series["train"][0][-1] == 90


def test_resumed_run_that_evaluates_first(tmp_path):
    # Crashed after step 3, resumed from step 2, where the new run evaluates before training: its val
    # point at 2 is new, and must survive the train line at 2 that discards the old run's steps 2 and 3.
    old_run = ["0 val 11.0", "0 train 11.0", "1 train 9.0", "2 train 8.0", "3 train 7.0"]
    new_run = ["2 val 7.5", "2 train 7.9", "3 train 7.1"]
    series = parse_log(write_log(tmp_path, old_run + new_run))
    assert series["train"] == ([0, 1, 2, 3], [11.0, 9.0, 7.9, 7.1])
    assert series["val"] == ([0, 2], [11.0, 7.5])


def test_plots_resumed_partial_log_with_hellaswag(tmp_path):
    log = write_log(tmp_path, run_lines(0, 120, True) + run_lines(75, 200, True))
    out = tmp_path / "plots" / "loss.png"
    result = plot(log, "-o", out)
    assert result.returncode == 0, result.stderr
    assert_real_image(out)
    assert [p.name for p in out.parent.iterdir()] == ["loss.png"]  # no temporary file left behind


def test_plots_log_without_hellaswag_next_to_the_log(tmp_path):
    log = write_log(tmp_path, ["0 train nan"] + run_lines(1, 60, False))  # and a first step that diverged
    result = plot(log)
    assert result.returncode == 0, result.stderr
    assert_real_image(tmp_path / "loss.png")


def assert_one_line_error(capsys, argv, start, message=""):
    with pytest.raises(SystemExit) as exited:
        run_cli(main, [str(a) for a in argv])
    assert exited.value.code == 1
    stderr = capsys.readouterr().err
    assert stderr.startswith(f"error: {start}") and message in stderr
    assert stderr.count("\n") == 1  # one line, no traceback


@pytest.mark.parametrize(
    "lines, message",
    [
        (["0 train 10.9", "", "1 train oops"], "line 3"),
        (["0 train 10.9", "1 train"], "line 2"),
        (["x train 10.9"], "line 1"),
        (["0 hella 0.25"], "no train or val lines"),
    ],
)
def test_bad_log_is_one_line_error(tmp_path, capsys, lines, message):
    log = write_log(tmp_path, lines)
    with pytest.raises(UserError, match=message):
        parse_log(log)
    assert_one_line_error(capsys, [log, "-o", tmp_path / "loss.png"], str(log), message)
    assert not (tmp_path / "loss.png").exists()


def test_missing_log_and_bad_output_name(tmp_path, capsys):
    assert_one_line_error(capsys, [tmp_path / "nope.txt", "-o", tmp_path / "loss.png"], "no log file at")
    log = write_log(tmp_path, run_lines(0, 30, False))
    assert_one_line_error(capsys, [log, "-o", tmp_path / "loss.txt"], "cannot write .txt files")
    assert os.listdir(tmp_path) == ["log.txt"]
