"""HellaSwag eval speed for the GPT-2 124M shape: examples/s of hellaswag.py's batched scoring
against one example (4 rows) per forward pass, the way build-nanogpt scores, in fp32 and in bf16
autocast.

    python benchmarks/hellaswag.py                      # CPU, 64 examples
                                                        # (about 10 minutes on 2 cores)
    python benchmarks/hellaswag.py --device cuda --examples 512 --text shakespeare.txt

Random weights and synthetic examples: speed does not depend on what the weights are. The examples
are cut from --text (any English text; by default this repository's README.md, so that a fresh clone
runs as is) at HellaSwag's lengths: contexts of 20 to 60 tokens, endings of 10 to 40. Each line also
says how far the scores are from the exact fp32 ones.
With a few dozen examples a big batch mixes rows of more different lengths (more padding) than it
would among the 10,042 of the real set, so big batches come out a little slower here than in a real
run.
"""

import argparse
import os
import random
import sys
import time

# Run as `python benchmarks/hellaswag.py`, Python puts benchmarks/ on sys.path, not the repository.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from machinery import hellaswag
from machinery.cli import UserError, run_cli
from machinery.tokenizer import gpt2_tokenizer
from train_gpt2 import GPT, GPTConfig

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def synthetic_examples(text, enc, n, seed=0):
    """n HellaSwag-shaped examples: windows of random token spans of `text`, decoded back to
    text."""
    rng = random.Random(seed)
    tokens = enc.encode_ordinary(text)

    def window(length):
        start = rng.randrange(len(tokens) - length)
        return enc.decode(tokens[start : start + length]).strip()

    return [
        {
            "ctx": window(rng.randint(20, 60)),
            "endings": [window(rng.randint(10, 40)) for _ in range(4)],
            "label": rng.randrange(4),
        }
        for _ in range(n)
    ]


def full_rows(context, endings):
    """build-nanogpt's rendering: 4 rows of context + ending, right-padded, and a mask over each
    ending."""
    length = len(context) + max(len(ending) for ending in endings)
    tokens = torch.zeros((4, length), dtype=torch.long)
    mask = torch.zeros((4, length), dtype=torch.long)
    for i, ending in enumerate(endings):
        tokens[i, : len(context) + len(ending)] = torch.tensor(context + ending)
        mask[i, len(context) : len(context) + len(ending)] = 1
    return tokens, mask


def one_example_per_forward(model, examples, enc, device, autocast_dtype):
    """build-nanogpt's way: one (4, L) forward per example, the loss of every position in fp32, then
    masked. Returns the summed losses and counts (E, 4), like hellaswag.score_examples."""
    sums, counts = [], []
    autocast = torch.autocast(
        device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32
    )
    with torch.no_grad(), autocast:
        for example in examples:
            tokens, mask = full_rows(*hellaswag.render_example(example, enc))
            tokens, mask = tokens.to(device), mask.to(device)
            logits, _ = model(tokens)
            losses = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none"
            )
            losses = losses.view(4, -1) * mask[:, 1:]
            sums.append(losses.sum(dim=1).cpu())
            counts.append(mask[:, 1:].sum(dim=1).cpu())
    return torch.stack(sums), torch.stack(counts)


def timed(device, fn, *args):
    """fn(*args) and the seconds it took on device."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--text", default=README, help="text file to cut the examples from (default: README.md)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--examples", type=int, default=64, help="examples per measurement")
    parser.add_argument(
        "--batch_sizes", default="4,16", help="examples per forward pass of the batched scoring"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="every method runs once per round; each keeps its best time",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)"
    )
    args = parser.parse_args(argv)
    if not os.path.isfile(args.text):
        raise UserError(f"--text {args.text}: no such file")
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(GPTConfig()).to(device).eval()  # 124M, random weights
    enc = gpt2_tokenizer()
    examples = synthetic_examples(text, enc, args.examples)
    rendered = [hellaswag.render_example(example, enc) for example in examples]
    full = [len(context) + len(ending) for context, endings in rendered for ending in endings]
    packed = [len(hellaswag.pack_example(context, endings).tokens) for context, endings in rendered]
    print(
        f"{len(examples)} examples on {device} ({torch.get_num_threads()} threads): context "
        f"+ ending of {min(full)} to {max(full)} tokens (mean {sum(full) / len(full):.0f}); "
        f"packed rows of {sum(packed) / len(packed):.0f} tokens on average"
    )

    # name -> function of a list of examples, returning summed losses and counts (E, 4)
    methods = {}
    for dtype in (torch.float32, torch.bfloat16):
        dtype_name = str(dtype).removeprefix("torch.")
        methods[f"{dtype_name:>8} | one example per forward"] = lambda exs, dtype=dtype: (
            one_example_per_forward(model, exs, enc, device, dtype)
        )
        for b in map(int, args.batch_sizes.split(",")):
            methods[f"{dtype_name:>8} | packed, {b} examples per forward"] = (
                lambda exs, b=b, dtype=dtype: hellaswag.score_examples(
                    model, exs, enc, device, b, dtype
                )
            )
    # Rounds, not one method after another: the machine may be busier at some moments than at
    # others, and the best of several interleaved runs is the least disturbed one of each method.
    best, scores = {}, {}
    for run in methods.values():
        run(examples[:2])  # warm-up: first-call allocations
    for _ in range(args.rounds):
        for name, run in methods.items():
            scores[name], seconds = timed(device, run, examples)
            best[name] = min(best.get(name, seconds), seconds)

    exact_sums, counts = scores[next(iter(methods))]  # fp32, one example at a time
    exact_pred, exact_pred_norm = hellaswag.predictions(exact_sums, counts)
    baseline = best[next(iter(methods))]
    print(
        f"{'   dtype | method':<45} | {'speed':<18} | vs fp32 one per forward | error of the scores"
    )
    for name in methods:
        sums, method_counts = scores[name]
        assert torch.equal(method_counts, counts)
        pred, pred_norm = hellaswag.predictions(sums, counts)
        changed = (pred != exact_pred).sum().item() + (pred_norm != exact_pred_norm).sum().item()
        print(
            f"{name:<45} | {len(examples) / best[name]:6.2f} examples/s | "
            f"{baseline / best[name]:22.2f}x | max |mean loss - exact fp32| "
            f"{((sums - exact_sums) / counts).abs().max().item():.1e} | "
            f"{changed} of {2 * len(examples)} answers (acc, acc_norm) differ"
        )


if __name__ == "__main__":
    run_cli(main)
