"""HellaSwag accuracy of a GPT-2 model: OpenAI's weights, a Hugging Face directory, or a checkpoint
of train_gpt2.py. The benchmark itself lives in machinery/hellaswag.py.

    python hellaswag.py --init gpt2                      # OpenAI's weights (any size name)
    python hellaswag.py --init log/model_19072.pt        # a checkpoint of train_gpt2.py
    python hellaswag.py --init gpt2 --data hellaswag_val.jsonl --limit 1000
    python hellaswag.py --init gpt2-xl --dtype bfloat16  # faster; a few near-tied answers change
"""

import time

import torch

from machinery import cli
from machinery import hellaswag as benchmark
from machinery.devices import pick_device
from machinery.memory import keep_freed_memory
from machinery.tokenizer import gpt2_tokenizer
from train_gpt2 import load_model

PROTOCOL = "completion style, 0-shot, acc = lowest summed loss, acc_norm = lowest mean loss"


def main(argv=None):
    flags = {
        "evaluation": [
            ("--data", str, f"path of {benchmark.HELLASWAG_FILE} (default: download once into "
             f"{benchmark.default_cache_dir()})"),
            ("--limit", int, "evaluate only the first N examples", cli.POSITIVE),
            ("--batch_size", int, "examples per forward pass (one row of ~140 tokens each); "
             "default 32 on a GPU, 4 on CPU (measured fastest there)", cli.POSITIVE),
            ("--device", str, "cuda, mps or cpu (default: the best available)"),
            ("--dtype", ("float32", "bfloat16"), "float32: exact, the way the reference numbers "
             "were measured; bfloat16 autocast: faster on GPUs and CPUs with bf16 units, a few "
             "answers may change"),
        ],
    }  # fmt: skip
    description = f"HellaSwag accuracy of a GPT-2 model ({PROTOCOL})"
    parser = cli.ArgumentParser(description=description, formatter_class=cli.HelpFormatter)
    parser.add_argument("--init", required=True, help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, a "
                        "Hugging Face directory, or a checkpoint .pt")  # fmt: skip
    args = cli.parse_flags(parser, flags, argv)
    device = pick_device(args.device)
    if device.type == "cpu":
        keep_freed_memory(every_size=True)  # each batch's buffers are not zeroed again
    batch_size = args.batch_size or (4 if device.type == "cpu" else 32)
    autocast_dtype = getattr(torch, args.dtype)
    # A wrong --data is said before the model loads, a wrong --init before the download.
    path = benchmark.hellaswag_path(args.data, download=False)
    model = load_model(args.init, device)
    examples = benchmark.load_examples(path or benchmark.hellaswag_path(), args.limit)
    enc = gpt2_tokenizer()
    start = time.perf_counter()
    result = benchmark.evaluate_hellaswag(
        model, examples, enc, device, batch_size, autocast_dtype=autocast_dtype, progress=True
    )
    seconds = time.perf_counter() - start
    n, correct, correct_norm = result["n"], result["correct"], result["correct_norm"]
    print(
        f"hellaswag {args.init}: {n} examples, acc {correct}/{n} = {correct / n:.4f}, "
        f"acc_norm {correct_norm}/{n} = {correct_norm / n:.4f}, {n / seconds:.1f} "
        f"examples/s on {device} in {str(autocast_dtype).removeprefix('torch.')} ({PROTOCOL})"
    )


if __name__ == "__main__":
    cli.run_cli(main)
