"""HellaSwag eval speed for the GPT-2 124M shape: examples/s of hellaswag.py's batched scoring against
one example (4 rows) per forward pass, the way build-nanogpt scores, in fp32 and in bf16 autocast.

    python benchmarks/hellaswag.py                      # CPU, 32 examples
    python benchmarks/hellaswag.py --device cuda --examples 512

Random weights and synthetic examples: speed does not depend on what the weights are. The examples are
cut from tinyshakespeare (or random tokens if it is absent) at HellaSwag's lengths: contexts of 20 to
60 tokens, endings of 10 to 40. Each line also says how far the scores are from the exact fp32 ones.
"""

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import hellaswag  # noqa: E402
from train_gpt2 import GPT, GPTConfig, gpt2_tokenizer  # noqa: E402

TEXT_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "tinyshakespeare.txt")


def synthetic_examples(enc, n, seed=0):
    """n HellaSwag-shaped examples: text windows of tinyshakespeare decoded from random token spans."""
    rng = random.Random(seed)
    if os.path.isfile(TEXT_PATH):
        with open(TEXT_PATH, encoding="utf-8") as f:
            tokens = enc.encode_ordinary(f.read())
    else:
        tokens = [rng.randrange(50000) for _ in range(100_000)]

    def window(length):
        start = rng.randrange(len(tokens) - length)
        return enc.decode(tokens[start : start + length]).strip()

    return [
        {"ctx": window(rng.randint(20, 60)), "endings": [window(rng.randint(10, 40)) for _ in range(4)], "label": rng.randrange(4)}
        for _ in range(n)
    ]


def one_example_per_forward(model, examples, enc, device, autocast_dtype):
    """build-nanogpt's way: one (4, L) forward per example, the loss of every position in fp32, then
    masked. Returns the summed losses and counts (E, 4), like hellaswag.score_examples."""
    sums, counts = [], []
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32)
    with torch.no_grad(), autocast:
        for example in examples:
            tokens, mask, _ = hellaswag.render_example(example, enc)
            tokens, mask = tokens.to(device), mask.to(device)
            logits, _ = model(tokens)
            losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
            losses = losses.view(4, -1) * mask[:, 1:]
            sums.append(losses.sum(dim=1).cpu())
            counts.append(mask[:, 1:].sum(dim=1).cpu())
    return torch.stack(sums), torch.stack(counts)


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--examples", type=int, default=32, help="examples per measurement")
    parser.add_argument("--batch_sizes", default="4,16,32", help="examples per forward pass of the batched scoring")
    parser.add_argument("--repeats", type=int, default=2, help="each measurement is the best of this many")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(GPTConfig()).to(device).eval()  # 124M, random weights
    enc = gpt2_tokenizer()
    examples = synthetic_examples(enc, args.examples)
    rows = [row for ex in examples for row, _ in hellaswag.render_rows(ex, enc)]
    print(f"{len(examples)} examples on {device} ({torch.get_num_threads()} threads), rows of {min(map(len, rows))} to {max(map(len, rows))} tokens (mean {sum(map(len, rows)) / len(rows):.0f})")

    methods = [(f"one example per forward", None)] + [(f"batched, {b} examples per forward", int(b)) for b in args.batch_sizes.split(",")]
    warmup = examples[:2]
    exact = None  # fp32 one-at-a-time scores: the reference for the error column
    baseline = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name, batch_size in methods:
            if batch_size is None:
                run = lambda exs: one_example_per_forward(model, exs, enc, device, dtype)  # noqa: E731
            else:
                run = lambda exs: hellaswag.score_examples(model, exs, enc, device, batch_size, dtype)  # noqa: E731
            run(warmup)
            best = None
            for _ in range(args.repeats):
                (sums, counts), seconds = timed(lambda: run(examples), device)
                best = seconds if best is None else min(best, seconds)
            if exact is None:
                exact = (sums, counts)
            assert torch.equal(counts, exact[1])
            baseline.setdefault(dtype, best)
            mean_loss_error = ((sums - exact[0]) / counts).abs().max().item()
            pred, pred_norm = hellaswag.predictions(sums, counts)
            exact_pred, exact_pred_norm = hellaswag.predictions(*exact)
            changed = (pred != exact_pred).sum().item() + (pred_norm != exact_pred_norm).sum().item()
            print(
                f"{str(dtype).removeprefix('torch.'):>8} | {name:<34} | {len(examples) / best:7.2f} examples/s | "
                f"{baseline[torch.float32] / best:5.2f}x fp32 one-per-forward | max |mean loss - exact| {mean_loss_error:.1e} | "
                f"{changed} of {2 * len(examples)} answers changed",
                flush=True,
            )


if __name__ == "__main__":
    main()
