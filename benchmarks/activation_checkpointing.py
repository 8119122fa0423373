"""Peak memory (max RSS) of one training step of GPT-2 124M, with and without
--activation_checkpointing, each in a process of its own (a process's peak never goes down, so the
two cannot share one), on the CPU in fp32, with the memory estimate of machinery/devices.py beside
each figure.

    python benchmarks/activation_checkpointing.py [--batch_size 4] [--seq_len 1024]
"""

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def one_step(batch_size, seq_len, recompute):
    """In the child: build 124M and AdamW, run one step on random tokens, print the peak RSS."""
    import torch

    import train_gpt2
    from machinery import devices

    torch.manual_seed(0)
    model = train_gpt2.GPT(train_gpt2.GPTConfig(vocab_size=50304))
    model.activation_checkpointing = recompute
    optimizer = train_gpt2.configure_optimizer(model, 0.1, 6e-4, (0.9, 0.95), 1e-8, "cpu")
    x = torch.randint(0, 50257, (batch_size, seq_len))
    y = torch.randint(0, 50257, (batch_size, seq_len))
    started = time.perf_counter()
    _, loss = model(x, y)
    loss.backward()
    optimizer.step()  # AdamW's moments come into being here: part of the step's peak
    seconds = time.perf_counter() - started
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))  # KiB
    params = sum(p.numel() for p in model.parameters())
    estimate = devices.training_bytes(model.config, params, batch_size, seq_len,
                                      recompute=recompute)  # fmt: skip
    print(f"{hwm * 1024} {estimate} {seconds:.1f} {loss.item():.6f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--child", choices=("plain", "recompute"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return one_step(args.batch_size, args.seq_len, args.child == "recompute")
    import torch

    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), "?")
    print(f"GPT-2 124M, one step at B={args.batch_size}, T={args.seq_len}, fp32, eager | "
          f"torch {torch.__version__} | {cpu}, {os.cpu_count()} cores")  # fmt: skip
    print(f"{'':28s} {'max RSS':>10s} {'estimate':>10s} {'step':>8s}  loss")
    for child in ("plain", "recompute"):
        out = subprocess.run([sys.executable, __file__, "--child", child,
                              "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len)],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        rss, estimate, seconds, loss = out.split()
        name = "--activation_checkpointing" if child == "recompute" else "without"
        print(f"{name:28s} {int(rss) / 2**30:7.2f} GiB {int(estimate) / 2**30:7.2f} GiB "
              f"{seconds:>6s} s  {loss}")  # fmt: skip


if __name__ == "__main__":
    main()
