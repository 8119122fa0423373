r"""Sample text from GPT-2: OpenAI's weights, a Hugging Face directory, or a checkpoint of this project.

    python sample.py --init gpt2 --prompt "Hello, I'm a language model," --num_samples 4 --max_new_tokens 64 \
        --top_k 50 --seed 42
    python sample.py --init log/model_19072.pt --temperature 0.8

An empty --prompt starts from <|endoftext|>, that is, from the beginning of a document.
"""

import argparse

from common import UserError, gpt2_tokenizer, run_cli
from train_gpt2 import load_model, pick_autocast_dtype, pick_device, sample_texts


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--init",
        default="gpt2",
        help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, a Hugging Face directory, or log/model_XXXXX.pt",
    )
    p.add_argument("--prompt", default="Hello, I'm a language model,")
    p.add_argument("--num_samples", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 always picks the most likely token")
    p.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens only")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    args = p.parse_args(argv)
    for flag, value, smallest in [
        ("num_samples", args.num_samples, 1),
        ("max_new_tokens", args.max_new_tokens, 0),
        ("top_k", args.top_k, 1),
        ("temperature", args.temperature, 0),
    ]:
        if value < smallest:
            raise UserError(f"--{flag} is {value}: it must be at least {smallest}")
    return args


def sample(args):
    """The prompt and its continuations, as one string per sample."""
    device = pick_device(args.device)
    model = load_model(args.init, device)
    # bf16 where the device has it, as in training: each new token reads every weight once, so half the
    # bytes is close to twice the speed (1.8x on a 2-core AMX CPU, see benchmarks/sampling.py).
    dtype = pick_autocast_dtype("auto", device)
    return sample_texts(
        model,
        gpt2_tokenizer(),
        args.prompt,
        args.num_samples,
        args.max_new_tokens,
        device,
        dtype,
        args.temperature,
        args.top_k,
        args.seed,
    )


def main(argv=None):
    samples = sample(parse_args(argv))
    for i, text in enumerate(samples):
        print(f"---------- sample {i + 1}/{len(samples)} ----------")
        print(text)


if __name__ == "__main__":
    run_cli(main)
