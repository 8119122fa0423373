r"""Sample text from GPT-2: OpenAI's weights, a Hugging Face directory, or a checkpoint of this
project. An empty --prompt starts from <|endoftext|>, that is, from the beginning of a document.

    python sample.py --init gpt2 --prompt "Hello, I'm a language model," --num_samples 4 \
        --max_new_tokens 64 --top_k 50 --seed 42
    python sample.py --init log/model_19072.pt --temperature 0.8
"""

import torch

from machinery import cli
from machinery.cli import AT_LEAST_0, POSITIVE, SEED, ArgumentParser, HelpFormatter, run_cli
from machinery.devices import out_of_memory_said, pick_autocast_dtype, pick_device
from machinery.memory import keep_freed_memory
from machinery.tokenizer import gpt2_tokenizer
from train_gpt2 import load_model, sample_texts

# Logits are divided by the temperature: below 1e-3 they overflow to inf and the sampling breaks,
# so 0 is the greedy choice.
TEMPERATURE = (lambda v: v == 0 or v >= 1e-3, "0 (the most likely token) or at least 1e-3")
FLAGS = {
    "sampling": [
        ("--init", "gpt2", "gpt2, gpt2-medium, gpt2-large, gpt2-xl, a Hugging Face directory, or "
         "log/model_XXXXX.pt"),
        ("--prompt", "Hello, I'm a language model,", "text to continue; empty: a new document"),
        ("--num_samples", 4, "continuations of the prompt, drawn in one batch", POSITIVE),
        ("--max_new_tokens", 64, "tokens to add to the prompt", AT_LEAST_0),
        ("--temperature", 1.0, "0 always picks the most likely token", TEMPERATURE),
        ("--top_k", 50, "sample among the k most likely tokens only (GPT-2's 50)", POSITIVE),
        ("--seed", 42, "the same seed gives the same samples", SEED),
        ("--device", str, "cuda, mps or cpu (default: the best available)"),
        ("--dtype", ("auto", "bfloat16", "float16", "float32"), "autocast dtype, as in training; "
         "float32 for exact greedy text (--temperature 0)"),
    ],
}  # fmt: skip


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    args = cli.parse_flags(parser, FLAGS, argv)
    device = pick_device(args.device)
    if device.type == "cpu":
        keep_freed_memory(every_size=True)  # each token's buffers are not zeroed again
    model = load_model(args.init, device)
    dtype, _ = pick_autocast_dtype(args.dtype, device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with out_of_memory_said(device, "lower --num_samples (drawn in one batch) or --max_new_tokens"):
        samples = sample_texts(model, gpt2_tokenizer(), args.prompt, num_samples=args.num_samples,
                               max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_k=args.top_k, seed=args.seed, autocast=autocast)  # fmt: skip
    for i, text in enumerate(samples):
        print(f"---------- sample {i + 1}/{len(samples)} ----------")
        print(text)


if __name__ == "__main__":
    run_cli(main)
