"""Training throughput for a fixed config: tokens/s, and MFU against the device's measured matmul peak.

    python benchmarks/train.py                  # CPU: a small GPT, fp32 vs bf16 autocast
    python benchmarks/train.py --device cuda    # GPU: GPT-2 124M at B=64, T=1024, bf16, compiled

Random tokens stand in for data: throughput does not depend on what the tokens are.
"""

import argparse
import os
import sys
import time

# Run as `python benchmarks/train.py`, Python puts benchmarks/ on sys.path, not the repository.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from devices import device_peak_flops, flops_per_token, pick_device
from train_gpt2 import GPT, GPTConfig, configure_optimizer


def matmul_flops(device, dtype, n=4096, repeats=10):
    """Measured FLOP/s of a large square matmul: the ceiling that the model's matmuls can approach."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_throughput(config, B, T, device, dtype, compile_model, steps):
    torch.manual_seed(0)
    model = GPT(config).to(device)
    optimizer = configure_optimizer(model, 0.1, 6e-4, (0.9, 0.95), 1e-8, device.type)
    train_model = torch.compile(model) if compile_model else model
    x = torch.randint(0, 50257, (B, T), device=device)
    y = torch.randint(0, 50257, (B, T), device=device)
    times = []
    for _ in range(steps + 2):  # the first two steps warm up (and compile)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = train_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        sync(device)
        times.append(time.perf_counter() - t0)
    dt = sorted(times[2:])[len(times[2:]) // 2]  # median step
    num_params = sum(p.numel() for p in model.parameters())
    return B * T / dt, flops_per_token(config, T, num_params) * B * T / dt


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        config, B, T, runs = GPTConfig(vocab_size=50304), 64, 1024, [(torch.bfloat16, True)]
    else:
        torch.set_flush_denormal(True)
        config, B, T, runs = (
            GPTConfig(vocab_size=50304, n_layer=4, n_head=4, n_embd=256, block_size=256),
            8,
            256,
            [(torch.float32, False), (torch.bfloat16, False)],
        )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name} | torch {torch.__version__} | model {config} | B={B} T={T}")
    for dtype, compile_model in runs:
        peak = device_peak_flops(device) if device.type == "cuda" else None
        measured_peak = matmul_flops(device, dtype)
        tokens_per_s, model_flops = train_throughput(config, B, T, device, dtype, compile_model, args.steps)
        line = (
            f"{str(dtype):15s} compile={compile_model!s:5s} | {tokens_per_s:10,.0f} tok/s"
            f" | model {model_flops / 1e12:7.2f} TFLOP/s"
            f" | matmul peak measured {measured_peak / 1e12:.2f} TFLOP/s"
            f" -> {100 * model_flops / measured_peak:.0f}% of it"
        )
        if peak:
            line += f" | MFU {100 * model_flops / peak:.1f}% of the {peak / 1e12:.0f} TFLOP/s spec"
        print(line, flush=True)


if __name__ == "__main__":
    main()
