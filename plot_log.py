"""Plot a training log: loss against step, and HellaSwag accuracy, beside the OpenAI reference numbers.

    python plot_log.py log/log.txt -o loss.png

The log has one line per measurement, `{step} {kind} {value}`, where kind is train, val or hella.
"""

import argparse
import os

import matplotlib

matplotlib.use("Agg")  # draw into files only; no display needed
import matplotlib.pyplot as plt
import numpy as np

from common import UserError, atomic_write, run_cli

# The numbers we are trying to beat. Val loss is on FineWeb-edu shard 0; HellaSwag is acc_norm.
GPT2_124M_VAL_LOSS = 3.2924
GPT2_124M_HELLASWAG = 0.2955
GPT3_124M_HELLASWAG = 0.337


def parse_log(path):
    """Read the log into {kind: (steps, values)}, keeping only the latest run's points for each step.

    A resumed run appends to the same log and starts again from its checkpoint's step, so a step can
    repeat. When a line goes back to a step already logged (or behind the previous line's step), the
    points from that step on belong to the abandoned run: we drop them from every series.
    """
    if not os.path.isfile(path):
        raise UserError(f"no log file at {path}; pass the log.txt your training run wrote")
    series = {}
    previous_step = -1
    try:
        with open(path) as f:
            lines = f.read().splitlines()  # a log has one short line per step: it fits in memory
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); pass the log.txt your training run wrote") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file; pass the log.txt your training run wrote") from None
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            step_text, kind, value_text = line.split()
            step, value = int(step_text), float(value_text)
        except ValueError:
            raise UserError(
                f"{path} line {line_number}: expected '<step> <kind> <value>', got {line.strip()[:60]!r}"
            ) from None
        steps, values = series.setdefault(kind, ([], []))
        if step < previous_step or (steps and step <= steps[-1]):
            for old_steps, old_values in series.values():
                keep = sum(1 for s in old_steps if s < step)
                del old_steps[keep:], old_values[keep:]
        steps.append(step)
        values.append(value)
        previous_step = step
    if not series.get("train") and not series.get("val"):
        raise UserError(f"{path} has no train or val lines to plot")
    return series


def moving_average(steps, values, window):
    """Centred moving average; the ends, where the window does not fit, are left out."""
    averaged = np.convolve(values, np.ones(window) / window, mode="valid")
    start = (window - 1) // 2
    return steps[start : start + len(averaged)], averaged


def plot_loss(ax, series):
    train_steps, train_loss = series.get("train", ([], []))
    val_steps, val_loss = series.get("val", ([], []))
    # Train loss jumps from batch to batch: draw it faintly, with a moving average on top.
    ax.plot(train_steps, train_loss, color="tab:blue", alpha=0.25, linewidth=0.8)
    if train_loss:
        window = max(1, len(train_loss) // 50)
        ax.plot(*moving_average(train_steps, train_loss, window), color="tab:blue", label="train")
    ax.plot(val_steps, val_loss, color="tab:orange", marker=".", label="val")
    ax.axhline(GPT2_124M_VAL_LOSS, color="red", linestyle="--", label=f"OpenAI GPT-2 124M ({GPT2_124M_VAL_LOSS})")
    # The first steps (loss ~11) would squash the rest of the curve: show at most 3 nats above the best.
    losses = np.array(train_loss + val_loss)
    losses = losses[np.isfinite(losses)]  # a diverged run can log nan or inf
    lowest, highest = (losses.min(), losses.max()) if losses.size else (GPT2_124M_VAL_LOSS,) * 2
    top = max(min(highest, lowest + 3.0), GPT2_124M_VAL_LOSS)
    bottom = min(lowest, GPT2_124M_VAL_LOSS)
    margin = 0.05 * (top - bottom) + 0.05
    ax.set_ylim(bottom - margin, top + margin)
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    ax.legend()
    ax.grid(alpha=0.3)


def plot_hellaswag(ax, series):
    steps, accuracy = series.get("hella", ([], []))
    if not steps:
        ax.text(0.5, 0.5, "no HellaSwag lines in this log", ha="center", va="center", transform=ax.transAxes)
        ax.axis("off")
        return
    ax.plot(steps, accuracy, color="tab:green", marker=".", label="ours")
    ax.axhline(GPT2_124M_HELLASWAG, color="red", linestyle="--", label=f"OpenAI GPT-2 124M ({GPT2_124M_HELLASWAG})")
    ax.axhline(GPT3_124M_HELLASWAG, color="purple", linestyle="--", label=f"GPT-3 124M ({GPT3_124M_HELLASWAG})")
    ax.set(xlabel="step", ylabel="acc_norm", title="HellaSwag")
    ax.legend()
    ax.grid(alpha=0.3)


def save_figure(fig, out_path):
    """Write the figure atomically: a half-drawn image never replaces a good one."""
    extension = os.path.splitext(out_path)[1] or ".png"
    image_format = extension[1:].lower()
    if image_format not in fig.canvas.get_supported_filetypes():
        raise UserError(f"cannot write {extension} files; use an output name ending in .png, .pdf or .svg")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with atomic_write(out_path) as f:
        fig.savefig(f, dpi=120, format=image_format)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", help="the log.txt a training run wrote (e.g. log/log.txt)")
    parser.add_argument("-o", "--out", help="image to write (.png, .pdf, .svg); default: loss.png next to the log")
    args = parser.parse_args(argv)
    out_path = args.out or os.path.join(os.path.dirname(args.log), "loss.png")
    series = parse_log(args.log)
    fig, (loss_ax, hella_ax) = plt.subplots(1, 2, figsize=(13, 4.5))
    plot_loss(loss_ax, series)
    plot_hellaswag(hella_ax, series)
    fig.tight_layout()
    save_figure(fig, out_path)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    run_cli(main)
