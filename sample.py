r"""Sample text from GPT-2: OpenAI's weights, a Hugging Face directory, or a checkpoint of this
project.

    python sample.py --init gpt2 --prompt "Hello, I'm a language model," --num_samples 4 \
        --max_new_tokens 64 --top_k 50 --seed 42
    python sample.py --init log/model_19072.pt --temperature 0.8

An empty --prompt starts from <|endoftext|>, that is, from the beginning of a document.
"""

import torch

from machinery.cli import (
    AT_LEAST_0,
    POSITIVE,
    SEED,
    ArgumentParser,
    HelpFormatter,
    check_ranges,
    run_cli,
)
from machinery.devices import out_of_memory, pick_autocast_dtype, pick_device
from machinery.memory import keep_freed_memory
from machinery.tokenizer import gpt2_tokenizer
from train_gpt2 import load_model, sample_texts

# Each numeric flag's range (cli.check_ranges, which also refuses nan and inf). Logits are divided
# by the temperature: below 1e-3 they overflow to inf and the sampling breaks, so 0 is the greedy
# choice.
FLAG_RANGES = {
    "num_samples": POSITIVE,
    "max_new_tokens": AT_LEAST_0,
    "top_k": POSITIVE,
    "seed": SEED,
    "temperature": (
        lambda value: value == 0 or value >= 1e-3,
        "0 (the most likely token) or at least 1e-3",
    ),
}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument(
        "--init",
        default="gpt2",
        help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, "
        "a Hugging Face directory, or log/model_XXXXX.pt",
    )
    p.add_argument(
        "--prompt",
        default="Hello, I'm a language model,",
        help="text to continue; empty: a new document",
    )
    p.add_argument(
        "--num_samples", type=int, default=4, help="continuations of the prompt, drawn in one batch"
    )
    p.add_argument("--max_new_tokens", type=int, default=64, help="tokens to add to the prompt")
    p.add_argument(
        "--temperature", type=float, default=1.0, help="0 always picks the most likely token"
    )
    p.add_argument(
        "--top_k",
        type=int,
        default=50,
        help="sample among the k most likely tokens only (GPT-2's 50)",
    )
    p.add_argument("--seed", type=int, default=42, help="the same seed gives the same samples")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="autocast dtype, as in training; float32 for exact greedy text (--temperature 0)",
    )
    args = p.parse_args(argv)
    check_ranges(args, FLAG_RANGES)
    return args


def sample(args):
    """The prompt and its continuations, as one string per sample."""
    device = pick_device(args.device)
    if device.type == "cpu":
        keep_freed_memory(
            every_size=True
        )  # each token's buffers are not faulted in and zeroed again
    model = load_model(args.init, device)
    dtype, _ = pick_autocast_dtype(args.dtype, device)
    try:
        return sample_texts(
            model,
            gpt2_tokenizer(),
            args.prompt,
            num_samples=args.num_samples,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
            autocast=torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32),
        )
    except torch.OutOfMemoryError:
        raise out_of_memory(
            device, "lower --num_samples (they are drawn in one batch) or --max_new_tokens"
        ) from None


def main(argv=None):
    samples = sample(parse_args(argv))
    for i, text in enumerate(samples):
        print(f"---------- sample {i + 1}/{len(samples)} ----------")
        print(text)


if __name__ == "__main__":
    run_cli(main)
