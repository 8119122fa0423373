"""The memory estimate of machinery/devices.py (the one the trainer checks before its first step)
per GPU for each GPT-2 size on 8 GPUs: DDP (--shard none), --shard optimizer and --shard full,
without and with --activation_checkpointing; at --batch_size 1 and 8 (T=1024), and the largest
--batch_size that fits a 24, 40 and 80 GiB GPU and divides the --model's step. No GPU is used:
the figures are the estimate's, fitted to eager runs on a CPU (a compiled bf16 run needs less).

    python benchmarks/memory_table.py [--gpus 8] [--seq_len 1024]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_gpt2  # noqa: E402
from machinery import devices, flags  # noqa: E402

GPU_GIB = (24, 40, 80)
SETTINGS = [(shard, recompute) for shard in ("none", "optimizer", "full") for recompute in (0, 1)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=1024)
    args = p.parse_args()
    T, gpus = args.seq_len, args.gpus
    sizes = " | ".join(f"B on {gib} GiB" for gib in GPU_GIB)
    print(f"| --model | parameters | --shard | recompute | B=1 | B=8 | {sizes} |")
    print("| --- " * (6 + len(GPU_GIB)) + "|")
    for model in flags.GPT2_SIZES:
        run = flags.parse(["--model", model, "--seq_len", str(T)])
        with torch.device("meta"):  # the shape and count, no memory
            gpt = train_gpt2.GPT(train_gpt2.model_config(run))
        params = sum(p.numel() for p in gpt.parameters())
        steps = [b for b in (64, 32, 16, 8, 4, 2, 1) if run.total_batch_size % (b * T * gpus) == 0]
        for shard, recompute in SETTINGS:
            setting = dict(shard=shard, ranks=gpus, recompute=recompute)
            gib = {b: devices.training_bytes(gpt.config, params, b, T, **setting) / 2**30
                   for b in {*steps, 1, 8}}  # fmt: skip
            fits = [next((b for b in steps if gib[b] <= cap), None) for cap in GPU_GIB]
            largest = " | ".join("-" if b is None else str(b) for b in fits)
            print(f"| {model} | {params / 1e6:,.0f}M | {shard} | {'yes' if recompute else 'no'} | "
                  f"{gib[1]:.1f} | {gib[8]:.1f} | {largest} |")  # fmt: skip


if __name__ == "__main__":
    main()
