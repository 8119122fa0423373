"""Plot a training log: loss against step, and HellaSwag accuracy when the log has it.

    python plot_log.py log/log.txt -o loss.png

The log has one line per measurement, `{step} {kind} {value}`, where kind is train, val or hella.
Only what the log has is drawn: a run without HellaSwag gets one panel, a run without val no val
line."""

import argparse
import os

import numpy as np
from matplotlib.figure import Figure  # not pyplot: we write files, and need no window or backend

from machinery.cli import ArgumentParser, HelpFormatter, UserError, run_cli
from machinery.files import atomic_write

# Reference numbers. OpenAI's GPT-2 124M reaches this loss on FineWeb-edu val (shard 0): it compares
# with our val loss only when we validate on FineWeb-edu too.
GPT2_124M_FINEWEB_EDU_VAL_LOSS = 3.2924
# HellaSwag acc_norm is the same benchmark for every run: these compare with any run's hella line.
GPT2_124M_HELLASWAG = 0.2955
GPT3_124M_HELLASWAG = 0.337

# The first steps (loss ~11) would squash the rest of the curve: by default the y-axis shows at most
# this many nats above the lowest loss, and says how many points that hides.
CLIP_NATS = 3.0


def parse_log(path):
    """The log as {kind: (steps, values)}. A resumed run appends to the log from its checkpoint's
    step on: when a line goes back to a step already logged, the points from that step on belong to
    the abandoned run, and are dropped from every series."""
    try:  # an OSError (no such file, permissions) is run_cli's to say
        with open(path) as f:
            text = f.read()  # a log has one short line per step: it fits in memory
    except UnicodeDecodeError:
        raise UserError(
            f"{path} is not a text file; pass the log.txt your training run wrote"
        ) from None
    lines = text.splitlines()
    # a line cut short (being written, or killed), even if it parses
    if lines and not text.endswith("\n"):
        print(f"note: the last line of {path} is cut short ({lines.pop()[:60]!r}): it is left out")
    series, previous_step = {}, -1
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            step_text, kind, value_text = line.split()
            step, value = int(step_text), float(value_text)
        except ValueError:
            raise UserError(
                f"{path} line {line_number}: expected '<step> <kind> <value>', got "
                f"{line.strip()[:60]!r}"
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


def finite_points(series, kind):
    """(steps, values) of one kind without nan and inf, and how many those were: a diverged run logs
    them, and matplotlib would skip them without a word."""
    steps, values = (np.asarray(a, dtype=float) for a in series.get(kind, ([], [])))
    keep = np.isfinite(values)
    return steps[keep], values[keep], int(np.sum(~keep))


def points(n):
    return "1 point" if n == 1 else f"{n} points"


def plot_loss(ax, series, reference=False, clip=True):
    """Train and val loss, whichever the log has, and with `reference` OpenAI's loss on FineWeb-edu
    val; `clip`: see CLIP_NATS. Only lines with points get a legend entry: an empty "val" reads as
    val data lost."""
    train_steps, train_loss, train_skipped = finite_points(series, "train")
    val_steps, val_loss, val_skipped = finite_points(series, "val")
    if train_loss.size:
        # Train loss jumps from batch to batch: drawn faintly, with a centred moving average on top
        # (the ends, where the window does not fit, left out).
        window = max(1, train_loss.size // 50)
        faint = "train, each step" if window > 1 else "train"
        ax.plot(train_steps, train_loss, color="tab:blue", alpha=0.25, linewidth=0.8, label=faint)
        if window > 1:
            averaged = np.convolve(train_loss, np.ones(window) / window, mode="valid")
            steps = train_steps[(window - 1) // 2 :][: len(averaged)]
            ax.plot(steps, averaged, color="tab:blue", label=f"train, mean of {window} steps")
    # a point per evaluation: the line between two says nothing of the steps in between
    if val_loss.size:
        ax.plot(val_steps, val_loss, color="tab:orange", marker="o", markersize=4,
                label="val, each evaluation")  # fmt: skip
    if reference:
        label = f"OpenAI GPT-2 124M, FineWeb-edu val: {GPT2_124M_FINEWEB_EDU_VAL_LOSS}"
        ax.axhline(GPT2_124M_FINEWEB_EDU_VAL_LOSS, color="red", linestyle="--", label=label)
    skipped = train_skipped + val_skipped
    notes = [f"{points(skipped)} nan/inf: not drawn"] if skipped else []
    losses = np.concatenate([train_loss, val_loss])
    if losses.size:
        bottom, highest = losses.min(), losses.max()
        top = min(highest, bottom + CLIP_NATS) if clip else highest
        if reference:  # the reference line stays in view, however far our curve is from it
            top = max(top, GPT2_124M_FINEWEB_EDU_VAL_LOSS)
            bottom = min(bottom, GPT2_124M_FINEWEB_EDU_VAL_LOSS)
        margin = 0.05 * (top - bottom) + 0.05
        ax.set_ylim(bottom - margin, top + margin)
        if hidden := int(np.sum(losses > top + margin)):
            notes.append(
                f"y clipped at {top + margin:.2f}: {points(hidden)} above (--no-clip shows them)"
            )
    if notes:
        # Bottom left: a loss curve starts high and falls to the right, so that corner is empty.
        box = dict(facecolor="white", edgecolor="0.7", alpha=0.9)
        ax.text(0.01, 0.02, "\n".join(notes), transform=ax.transAxes, ha="left", va="bottom",
                fontsize=8, bbox=box)  # fmt: skip
    ax.set(xlabel="step", ylabel="cross-entropy loss (nats/token)", title="Loss")
    if ax.get_legend_handles_labels()[1]:  # none when every loss is nan: the note says so instead
        ax.legend(loc="upper right")
    ax.grid(alpha=0.3)


def plot_hellaswag(ax, series, reference=True):
    """Our HellaSwag acc_norm, and with `reference` the GPT-2 and GPT-3 124M scores."""
    steps, accuracy, skipped = finite_points(series, "hella")
    if accuracy.size:
        ax.plot(steps, accuracy, color="tab:green", marker=".", label="this run")
    if reference:
        for name, score, color in (("OpenAI GPT-2 124M", GPT2_124M_HELLASWAG, "red"),
                                   ("GPT-3 124M", GPT3_124M_HELLASWAG, "purple")):  # fmt: skip
            ax.axhline(score, color=color, linestyle="--", label=f"{name}: {score}")
    if skipped:
        ax.text(0.99, 0.02, f"{points(skipped)} nan/inf: not drawn", transform=ax.transAxes,
                ha="right", fontsize=8)  # fmt: skip
    ax.set(xlabel="step", ylabel="acc_norm (chance: 0.25)", title="HellaSwag")
    if ax.get_legend_handles_labels()[1]:
        ax.legend(loc="lower right")
    ax.grid(alpha=0.3)


def build_figure(series, loss_reference=False, hellaswag_reference=True, clip=True):
    """The figure of a parsed log: a loss panel, and a HellaSwag one if the log has hella lines."""
    has_hella = bool(series.get("hella", ([], []))[0])
    fig = Figure(figsize=(13, 4.5) if has_hella else (7, 4.5))
    axes = fig.subplots(1, 2 if has_hella else 1, squeeze=False)[0]
    plot_loss(axes[0], series, reference=loss_reference, clip=clip)
    if has_hella:
        plot_hellaswag(axes[1], series, reference=hellaswag_reference)
    fig.tight_layout()
    return fig


def save_figure(fig, out_path):
    """Write the figure atomically: a half-drawn image never replaces a good one."""
    extension = os.path.splitext(out_path)[1] or ".png"
    image_format = extension[1:].lower()
    if image_format not in fig.canvas.get_supported_filetypes():
        raise UserError(
            f"cannot write {extension} files; use an output name ending in .png, .pdf or .svg"
        )
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with atomic_write(out_path) as f:
        fig.savefig(f, dpi=120, format=image_format)


class DocstringHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The module docstring's example keeps its line breaks; each flag's default shows once."""


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=DocstringHelpFormatter)
    parser.add_argument("log", help="the log.txt a training run wrote (e.g. log/log.txt)")
    parser.add_argument(
        "-o", "--out", help="image to write (.png, .pdf, .svg); default: loss.png next to the log"
    )
    # Three settings on one dest. log.txt does not say which data a run used, so the loss reference
    # (true of FineWeb-edu val only) waits for --ref; HellaSwag's hold for any run: on by default.
    parser.add_argument(
        "--ref", dest="ref", action="store_const", const="all", default="hellaswag",
        help=f"also draw OpenAI GPT-2 124M's loss on FineWeb-edu val "
        f"({GPT2_124M_FINEWEB_EDU_VAL_LOSS}), which compares with your val "
        f"loss only if your val data is FineWeb-edu (log.txt cannot tell); "
        f"default: only the HellaSwag references, which hold for every run",
    )  # fmt: skip
    parser.add_argument(
        "--no-ref", dest="ref", action="store_const", const="none",
        default=argparse.SUPPRESS,  # --ref's default is the one; --help shows it there, once
        help="draw no reference lines at all, for a plot of your run alone",
    )  # fmt: skip
    parser.add_argument(
        "--no-clip", dest="clip", action="store_false",
        help=f"show every loss point; by default the y-axis stops {CLIP_NATS:g} nats above the "
        "lowest loss so the first steps (~11) do not squash the curve, and a note says how many "
        "points that hides",
    )  # fmt: skip
    args = parser.parse_args(argv)
    out_path = args.out or os.path.join(os.path.dirname(args.log), "loss.png")
    series = parse_log(args.log)
    references = dict(loss_reference=args.ref == "all", hellaswag_reference=args.ref != "none")
    save_figure(build_figure(series, clip=args.clip, **references), out_path)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    run_cli(main)
