"""Training speed, measured two ways.

    python benchmarks/train.py                          # CPU: the README's tiny run, whole process
    python benchmarks/train.py --against 3afb8e3        # ... and the same run on that commit's
                                                        # code, in turns
    python benchmarks/train.py --device cuda            # GPU: one GPT-2 124M step at B=64, T=1024,
                                                        # bf16, compiled

On a CPU, the README's tiny run (4 layers, 128 channels, 1,024 tokens per step) trains --steps steps
(250 in the README) as a whole process, --runs times, on shards that fineweb.py makes from --text.
Each run prints its wall time, the steady tokens/s of its step lines (the median step), the share of
its CPU time spent in the kernel (system time: page faults, zeroing memory) and its peak memory (max
RSS); then the medians, and with --against, the same for that commit's code (taken with
`git archive`, run alternately with this tree's) and the ratios. Both must log the same losses: the
script says whether they do.

On a GPU, random tokens stand in for data (throughput does not depend on what they are), and the
step is timed in this process, with the model's FLOP/s against the device's measured matmul peak.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(
    0, REPO
)  # run as `python benchmarks/train.py`, Python puts benchmarks/ on sys.path, not the repository

# The README's tiny run, but for --max_steps.
TINY_RUN = (
    "--n_layer 4 --n_head 4 --n_embd 128 --batch_size 4 --seq_len 64 --total_batch_size 1024 "
    "--warmup_steps 25 --max_lr 3e-3 --eval_every 125 --val_tokens 32768 --ckpt_every 125 "
    "--no-hellaswag"
)


# -----------------------------------------------------------------------------
# CPU: the README's tiny run as a whole process, this tree against another commit.


def tiny_run(repo, data_dir, log_dir, steps):
    """One run of the tiny model in `repo`'s code: its figures, and its log.txt."""
    command = [
        sys.executable,
        "train_gpt2.py",
        "--data_dir",
        data_dir,
        "--log_dir",
        log_dir,
        *TINY_RUN.split(),
    ]
    command += ["--max_steps", str(steps)]
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        sys.exit(f"error: the run in {repo} failed:\n{output[-2000:]}")
    step_speeds = [float(s.replace(",", "")) for s in re.findall(r"\| ([\d,]+) tok/s", output)]
    with open(os.path.join(log_dir, "log.txt")) as f:
        log = f.read()
    return {
        "wall s": wall,
        "tok/s": statistics.median(step_speeds[1:] or step_speeds),  # the first step warms up
        "kernel share": usage.ru_stime / (usage.ru_utime + usage.ru_stime),
        "peak MiB": usage.ru_maxrss / 1024,  # Linux reports KiB
    }, log


def compare_runs(trees, data_dir, steps, runs):
    """{tree name: [figures of each run]}, the trees run in turns, and whether they all logged the
    same."""
    figures, logs = {name: [] for name in trees}, set()
    with tempfile.TemporaryDirectory() as scratch:
        for i in range(runs):
            for name, repo in trees.items():
                run_figures, log = tiny_run(
                    repo, data_dir, os.path.join(scratch, f"{name}{i}"), steps
                )
                figures[name].append(run_figures)
                logs.add(log)
                shown = " | ".join(
                    f"{k} {v:,.3f}" if k == "kernel share" else f"{k} {v:,.1f}"
                    for k, v in run_figures.items()
                )
                print(f"run {i + 1} {name:6s} {shown}", flush=True)
    return figures, len(logs) == 1


def cpu_main(args):
    import torch  # the version this runs with, for the first line

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        ),
        "?",
    )
    print(
        f"CPU {cpu}, {os.cpu_count()} cores | torch "
        f"{torch.__version__} | {args.steps} steps, {args.runs} runs"
    )
    with tempfile.TemporaryDirectory() as scratch:
        trees = {"this": REPO}
        if args.against:
            trees[args.against] = os.path.join(scratch, "against")
            os.mkdir(trees[args.against])
            archive = subprocess.run(
                ["git", "archive", args.against], cwd=REPO, capture_output=True, check=True
            )
            subprocess.run(
                ["tar", "-x", "-C", trees[args.against]], input=archive.stdout, check=True
            )
        data_dir = os.path.join(scratch, "data")
        fineweb = [
            sys.executable,
            "fineweb.py",
            "--input",
            args.text,
            "--out",
            data_dir,
            "--shard_size",
            "100000",
        ]
        subprocess.run(fineweb, cwd=REPO, check=True, capture_output=True)
        figures, same_losses = compare_runs(trees, data_dir, args.steps, args.runs)
    medians = {
        name: {k: statistics.median(run[k] for run in runs) for k in runs[0]}
        for name, runs in figures.items()
    }
    for name, median in medians.items():
        print(f"median {name:6s} " + " | ".join(f"{k} {v:,.3f}" for k, v in median.items()))
    if args.against:
        this, other = medians["this"], medians[args.against]
        ratios = {k: this[k] / other[k] for k in ("wall s", "tok/s", "peak MiB")}
        print(f"this / {args.against}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
        print(
            "the runs logged the same losses" if same_losses else "the runs logged DIFFERENT losses"
        )


# -----------------------------------------------------------------------------
# GPU: one training step of GPT-2 124M, timed in this process.


def matmul_flops(device, dtype, n=4096, repeats=10):
    """Measured FLOP/s of a large square matmul: the ceiling that the model's matmuls can
    approach."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def gpu_main(args):
    import torch

    from machinery.devices import device_peak_flops, flops_per_token, pick_device
    from train_gpt2 import GPT, GPTConfig, configure_optimizer

    device = pick_device(args.device)
    torch.set_float32_matmul_precision("high")
    config, B, T = GPTConfig(vocab_size=50304), 64, 1024
    torch.manual_seed(0)
    model = GPT(config).to(device)
    optimizer = configure_optimizer(model, 0.1, 6e-4, (0.9, 0.95), 1e-8, device.type)
    train_model = torch.compile(model)
    x, y = (torch.randint(0, 50257, (B, T), device=device) for _ in range(2))
    times = []
    for _ in range(args.steps + 2):  # the first two steps warm up (and compile)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            _, loss = train_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times[2:])
    model_flops = (
        flops_per_token(config, T, sum(p.numel() for p in model.parameters())) * B * T / dt
    )
    peak, measured = device_peak_flops(device), matmul_flops(device, torch.bfloat16)
    line = (
        f"{torch.cuda.get_device_name(device)} | torch "
        f"{torch.__version__} | {B * T / dt:,.0f} tok/s"
    )
    share = f"{100 * model_flops / measured:.0f}% of the measured matmul peak"
    line += f" | model {model_flops / 1e12:.1f} TFLOP/s, {share}"
    if peak:
        line += f" | MFU {100 * model_flops / peak:.1f}% of the {peak / 1e12:.0f} TFLOP/s spec"
    print(line)


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--device", default="cpu", help="cpu: the tiny run as a whole process; cuda: one 124M step"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=20,
        help="training steps per run (the README's run: 250; GPU: timed)",
    )
    p.add_argument("--runs", type=int, default=3, help="CPU: runs of each tree, in turns")
    p.add_argument(
        "--against", default=None, help="CPU: a commit whose code runs in turns with this tree's"
    )
    p.add_argument(
        "--text", default=os.path.join(REPO, "README.md"), help="CPU: the text to train on"
    )
    args = p.parse_args()
    if args.device == "cpu":
        cpu_main(args)
    else:
        gpu_main(args)


if __name__ == "__main__":
    main()
