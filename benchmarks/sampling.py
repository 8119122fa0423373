"""Sampling throughput of GPT-2 124M on the CPU: GPT.generate with its KV cache against recomputing
the whole sequence at every step (the loop of build-nanogpt). Random weights: the speed does not
depend on them. Both paths run under the same settings, which the output states.

    python benchmarks/sampling.py                     # 4 sequences x 256 new tokens, both paths
    python benchmarks/sampling.py --dtype fp32 --threads 1 --skip_recompute
"""

import argparse
import contextlib
import os
import platform
import sys
import time

# Run as `python benchmarks/sampling.py`, Python puts benchmarks/ on sys.path, not the repository.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from machinery.tokenizer import gpt2_tokenizer
from train_gpt2 import GPT, GPTConfig


@torch.no_grad()
def generate_with_cache(model, idx, max_new_tokens, top_k, generator):
    return model.generate(idx, max_new_tokens, top_k=top_k, generator=generator)


@torch.no_grad()
def generate_by_recomputing(model, idx, max_new_tokens, top_k, generator):
    """build-nanogpt's sampling loop: forward the whole sequence, keep the last position's logits,
    sample among the top k, append, repeat."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx)
        probs = F.softmax(logits[:, -1, :].float(), dim=-1)
        topk_probs, topk_ids = torch.topk(probs, top_k, dim=-1)
        choice = torch.multinomial(topk_probs, 1, generator=generator)
        idx = torch.cat([idx, torch.gather(topk_ids, -1, choice)], dim=1)
    return idx


def tokens_per_second(generate, model, idx, max_new_tokens, top_k, autocast, repeats):
    """New tokens per second of generate(model, idx, max_new_tokens, top_k, generator), best of
    `repeats` runs: on a shared machine the fastest run is the one least disturbed by other work.
    Each run has its own autocast region, as in sample.py, so each pays for casting the weights to
    bf16 once."""
    generator = torch.Generator().manual_seed(42)
    with autocast():
        generate(
            model, idx, 2, top_k, generator
        )  # warm-up: first-call allocations and kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        with autocast():
            out = generate(model, idx, max_new_tokens, top_k, generator)
        best = min(best, time.perf_counter() - start)
    assert out.shape == (idx.size(0), idx.size(1) + max_new_tokens)
    return idx.size(0) * max_new_tokens / best


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_samples", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default="bf16",
        help="bf16: autocast, as sample.py does on GPUs",
    )
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument(
        "--flush_denormal", action="store_true", help="treat denormal floats as zero (x86)"
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="runs of the cached path; the best counts"
    )
    p.add_argument(
        "--skip_recompute",
        action="store_true",
        help="time only the cached path (recomputing is slow)",
    )
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(args.flush_denormal)
    torch.manual_seed(0)
    model = GPT(GPTConfig()).eval()  # 124M, vocab 50257
    prompt = gpt2_tokenizer().encode_ordinary("Hello, I'm a language model,")
    idx = torch.tensor([prompt] * args.num_samples)
    bf16 = args.dtype == "bf16"

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    print(
        f"GPT-2 124M, random weights, {args.num_samples} sequences x {args.max_new_tokens} "
        f"new tokens after a {len(prompt)}-token prompt, top_k {args.top_k}\n"
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} "
        f"threads, {args.dtype}{' autocast' if bf16 else ''}, flush_denormal {args.flush_denormal}"
    )
    cached_speed = tokens_per_second(
        generate_with_cache, model, idx, args.max_new_tokens, args.top_k, autocast, args.repeats
    )
    print(f"KV cache (GPT.generate): {cached_speed:8.1f} tokens/s")
    if not args.skip_recompute:
        # one run only: it takes minutes
        recompute_speed = tokens_per_second(
            generate_by_recomputing, model, idx, args.max_new_tokens, args.top_k, autocast, 1
        )
        print(f"recompute every step:    {recompute_speed:8.1f} tokens/s")
        print(f"KV cache is {cached_speed / recompute_speed:.1f}x faster")


if __name__ == "__main__":
    main()
