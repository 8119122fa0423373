"""The speed ladder of the "Let's reproduce GPT-2 (124M)" lecture: the same training step, made
faster one rung at a time, each rung keeping every one before it. It times train_gpt2.py's own
train_step (the model, AdamW, the loss and the data loader the trainer uses) and prints one row per
rung: ms per step, tokens/s, MFU where the device's peak is known, peak GPU memory, the speed-ups,
and the lecture's figure (one A100, B=16, T=1024).

    python benchmarks/speed_ladder.py --device cuda                    # 124M, B=16, T=1024
    python benchmarks/speed_ladder.py --device cuda --batch_size 64
    python benchmarks/speed_ladder.py --device cpu --n_layer 2 --n_head 4 --n_embd 128 \\
        --batch_size 4 --seq_len 128 --steps 5

Every rung starts from the same weights (the padded vocabulary rows, where there are any, start at
zero and are never a target) and trains on the same tokens, so their losses can be compared: the
last column is each rung's loss after --steps steps, which should match the first rung's (to about
1e-4 in fp32 and TF32, to about 0.01 in bf16). The top rung is what train_gpt2.py does by default on
a GPU.
"""

import argparse
import contextlib
import copy
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from machinery import flags
from machinery.cli import UserError, run_cli
from machinery.devices import device_peak_flops, flops_per_token, pick_device
from machinery.tokenizer import EOT_TOKEN, GPT2_VOCAB_SIZE, gpt2_tokenizer
from train_gpt2 import (
    GPT,
    DataLoaderLite,
    GPTConfig,
    configure_optimizer,
    mixed_precision,
    train_step,
)

TRAINER_DEFAULTS = flags.parse([])  # the top rung must be what the trainer does: read its defaults


@dataclass(frozen=True)
class Settings:
    """What one rung changes in the training step."""

    tf32: bool = False  # TF32 tensor cores for fp32 matmuls (CUDA)
    dtype: torch.dtype = torch.float32  # autocast dtype
    compile: bool = False  # torch.compile the model
    flash: bool = (
        False  # let scaled_dot_product_attention pick its fastest kernel (flash attention)
    )
    vocab_size: int = GPT2_VOCAB_SIZE  # rows of the embedding table
    fused_adamw: bool = False  # AdamW's fused CUDA kernel


# name, what it adds, whether it needs CUDA, the lecture's ms/step on an A100 (B=16, T=1024)
RUNGS = [
    ("fp32", {}, False, 1000),
    ("+ TF32 matmuls", {"tf32": True}, True, 333),
    ("+ bf16 autocast", {"dtype": torch.bfloat16}, False, 300),
    ("+ torch.compile", {"compile": True}, False, 130),
    ("+ flash attention", {"flash": True}, False, 96),
    (
        f"+ vocab {TRAINER_DEFAULTS.vocab_size}",
        {"vocab_size": TRAINER_DEFAULTS.vocab_size},
        False,
        93,
    ),
    ("+ fused AdamW", {"fused_adamw": True}, True, 90),
]


def cumulative_settings():
    """Each rung's settings: its own change on top of every rung before it."""
    settings, result = Settings(), []
    for _, change, _, _ in RUNGS:
        settings = replace(settings, **change)
        result.append(settings)
    return result


def attention_backends(flash):
    """The math backend alone (attention as plain matmuls and a softmax, as the lecture's first
    rungs wrote it), or every backend, for scaled_dot_product_attention to pick the fastest."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return contextlib.nullcontext() if flash else sdpa_kernel([SDPBackend.MATH])


def padded_copy(model, vocab_size):
    """A GPT like `model` with vocab_size embedding rows: its weights, the extra rows zero. The
    logits stop at the tokenizer's 50257, so the extra rows are never a target and their gradient
    stays zero."""
    padded = GPT(replace(model.config, vocab_size=vocab_size))
    state = model.state_dict()
    wte = state["transformer.wte.weight"]
    state["transformer.wte.weight"] = torch.cat(
        [wte, wte.new_zeros(vocab_size - len(wte), wte.size(1))]
    )
    state["lm_head.weight"] = state["transformer.wte.weight"]
    padded.load_state_dict(state)
    return padded


def time_rung(settings, base_model, data_dir, args, device):
    """(ms per step for each timed step, the loss of the last step, peak memory in bytes or
    None)."""
    torch.set_float32_matmul_precision("high" if settings.tf32 else "highest")
    # A fresh copy of the shared initial weights: every rung starts where the first one did.
    if settings.vocab_size == base_model.config.vocab_size:
        model = copy.deepcopy(base_model)
    else:
        model = padded_copy(base_model, settings.vocab_size)
    model = model.to(device)
    optimizer = configure_optimizer(
        model, 0.1, args.lr, (0.9, 0.95), 1e-8, device.type, fused=settings.fused_adamw
    )
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 and fp32 need no loss scaling
    loader = DataLoaderLite(data_dir, args.batch_size, args.seq_len, 0, 1, "train")
    step_model = torch.compile(model) if settings.compile else model
    autocast = torch.autocast(
        device.type, dtype=settings.dtype, enabled=settings.dtype != torch.float32
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, loss = [], None
    with attention_backends(settings.flash):
        for step in range(
            args.warmup + args.steps
        ):  # the same tokens, in the same order, for every rung
            t0 = time.perf_counter()
            loss, _ = train_step(step_model, optimizer, scaler, loader, 1, args.lr, 1.0, autocast)
            loss = loss.item()  # waits for the device, like the trainer's report of each step
            if step >= args.warmup:
                times.append(1000 * (time.perf_counter() - t0))
    peak_memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return times, loss, peak_memory


def corpus_shards(text_path, tokens_needed, directory):
    """A train shard of at least tokens_needed tokens of real text (the file repeated as often as it
    takes), named as fineweb.py names shards, in `directory`."""
    try:
        with open(text_path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise UserError(f"--text {text_path}: {e.strerror}; pass a text file to train on") from None
    tokens = [EOT_TOKEN] + gpt2_tokenizer().encode_ordinary(text)
    if len(tokens) < 2:
        raise UserError(f"--text {text_path} holds no text")
    repeats = -(-tokens_needed // len(tokens))
    np.save(
        os.path.join(directory, "ladder_train_000001.npy"),
        np.array(tokens * repeats, dtype=np.uint16),
    )
    return directory


def run_ladder(args):
    """Time each rung asked for; returns a list of row dicts (a skipped rung has a 'skipped'
    reason)."""
    device = pick_device(args.device)
    mixed_precision(
        "auto", device
    )  # as the trainer does; each rung then sets the fp32 matmul precision itself
    config = GPTConfig(args.seq_len, GPT2_VOCAB_SIZE, args.n_layer, args.n_head, args.n_embd)
    torch.manual_seed(args.seed)
    base_model = GPT(config)  # every rung starts from these weights
    peak_flops = device_peak_flops(device)
    num_params = sum(p.numel() for p in base_model.parameters())
    rows = []
    with tempfile.TemporaryDirectory() as data_dir:
        corpus_shards(
            args.text, (args.warmup + args.steps) * args.batch_size * args.seq_len + 1, data_dir
        )
        for number, ((name, _, cuda_only, lecture_ms), settings) in enumerate(
            zip(RUNGS, cumulative_settings()), 1
        ):
            row = {"rung": number, "name": name, "lecture_ms": lecture_ms}
            rows.append(row)
            if number not in args.rungs:
                row["skipped"] = "not in --rungs"
            elif cuda_only and device.type != "cuda":
                row["skipped"] = "CUDA only"
            else:
                try:
                    times, loss, memory = time_rung(settings, base_model, data_dir, args, device)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    row["skipped"] = "out of memory"
                    continue
                ms = statistics.median(times)
                tokens = args.batch_size * args.seq_len
                row.update(ms=ms, tokens_per_s=1000 * tokens / ms, loss=loss, memory=memory)
                if peak_flops:
                    row["mfu"] = (
                        flops_per_token(config, args.seq_len, num_params)
                        * row["tokens_per_s"]
                        / peak_flops
                    )
            print_row(row, rows)
    return rows


def print_row(row, rows):
    """One line of the table, printed as soon as the rung is timed (compiled rungs take a while)."""
    if len(rows) == 1:
        print(f"{'rung':<22} {'ms/step':>8} {'tok/s':>10} {'MFU':>6} {'memory':>9} {'vs 1':>6} "
              f"{'vs prev':>7} {'lecture':>8} {'loss':>9}")  # fmt: skip
    if "skipped" in row:
        print(f"{row['rung']}. {row['name']:<19} skipped: {row['skipped']}", flush=True)
        return
    timed = [r for r in rows if "ms" in r]
    first, previous = timed[0], timed[-2] if len(timed) > 1 else timed[0]
    mfu = f"{100 * row['mfu']:.1f}%" if "mfu" in row else "-"
    memory = f"{row['memory'] / 2**30:.1f} GiB" if row["memory"] is not None else "-"
    lecture = f"{row['lecture_ms']} ms" if row["lecture_ms"] else "-"
    print(
        f"{row['rung']}. {row['name']:<19} {row['ms']:8.1f} {row['tokens_per_s']:10,.0f} "
        f"{mfu:>6} {memory:>9} {row['tokens_per_s'] / first['tokens_per_s']:5.2f}x "
        f"{row['tokens_per_s'] / previous['tokens_per_s']:6.2f}x {lecture:>8} {row['loss']:9.5f}",
        flush=True,
    )


def parse_ladder_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument(
        "--batch_size", type=int, default=16, help="sequences per step (B); the lecture's 16"
    )
    p.add_argument(
        "--seq_len", type=int, default=1024, help="tokens per sequence (T); GPT-2's 1024"
    )
    p.add_argument("--n_layer", type=int, default=12, help="GPT-2 124M: 12")
    p.add_argument("--n_head", type=int, default=12, help="GPT-2 124M: 12")
    p.add_argument("--n_embd", type=int, default=768, help="GPT-2 124M: 768")
    p.add_argument(
        "--steps", type=int, default=10, help="timed steps per rung (the median is shown)"
    )
    p.add_argument(
        "--warmup", type=int, default=4, help="steps before the timed ones (compiling, allocating)"
    )
    p.add_argument(
        "--rungs",
        default=",".join(str(i) for i in range(1, len(RUNGS) + 1)),
        help="which rungs to time",
    )
    p.add_argument(
        "--lr", type=float, default=6e-4, help="AdamW's learning rate, the same for every rung"
    )
    p.add_argument("--seed", type=int, default=1337, help="seed of the shared initial weights")
    default_text = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"
    )
    p.add_argument(
        "--text",
        default=default_text,
        help="text to train on, repeated as needed (default: README.md)",
    )
    args = p.parse_args(argv)
    try:
        args.rungs = {int(r) for r in args.rungs.split(",")}
    except ValueError:
        raise UserError(
            f"--rungs {args.rungs}: give rung numbers separated by commas, e.g. 1,3,4"
        ) from None
    for name in ("batch_size", "seq_len", "n_layer", "n_head", "n_embd", "steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if args.warmup < 0:
        raise UserError("--warmup must not be negative")
    if args.n_embd % args.n_head:
        raise UserError(f"--n_embd {args.n_embd} must be divisible by --n_head {args.n_head}")
    return args


def main(argv=None):
    args = parse_ladder_args(argv)
    device = pick_device(args.device)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"speed ladder on {name}, torch {torch.__version__}: {args.n_layer} "
        f"layers, {args.n_head} heads, {args.n_embd} channels, B={args.batch_size}, "
        f"T={args.seq_len}, median of {args.steps} steps after {args.warmup}"
    )
    return run_ladder(args)


if __name__ == "__main__":
    run_cli(main)
