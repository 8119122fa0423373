"""The trainer's flags: every hyperparameter with its default (GPT-2 124M's recipe), the reason
shown in --help and the range a number must lie in; then the rules between flags (check())."""

from machinery import cli
from machinery.cli import AT_LEAST_0, BELOW_1, POSITIVE, SEED, UNIT, UserError
from machinery.tokenizer import GPT2_VOCAB_SIZE

# GPT-2's four sizes (GPT-2 paper, Table 2) with GPT-3's recipe for its size (GPT-3 paper, Table
# 2.1: learning rate and batch in tokens; GPT-3 has no 1558M row, so gpt2-xl takes the 1.3B one,
# the nearest; the 2.7B row would take 1.6e-4). GPT-3 warmed up over 375M tokens at every size;
# a run is one epoch of FineWeb-edu's 10B tokens. --model fills each flag not given from these.
MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "max_lr", "total_batch_size", "row")
MODELS = {name: dict(zip(MODEL_FIELDS, row)) for name, row in {
    "gpt2": (12, 12, 768, 6e-4, 2**19, "GPT-3 Small (125M)"),
    "gpt2-medium": (24, 16, 1024, 3e-4, 2**19, "GPT-3 Medium (350M)"),
    "gpt2-large": (36, 20, 1280, 2.5e-4, 2**19, "GPT-3 Large (760M)"),
    "gpt2-xl": (48, 25, 1600, 2e-4, 2**20, "GPT-3 XL (1.3B), the nearest row to 1558M"),
}.items()}  # fmt: skip
GPT2_SIZES = tuple(MODELS)
WARMUP_TOKENS, RUN_TOKENS = 375_000_000, 10_000_000_000
RECIPE_FLAGS = ("max_lr", "total_batch_size", "warmup_steps", "max_steps")
MODEL_SHAPE = ("n_layer", "n_head", "n_embd")  # GPT-2's context is 1024 at every size
SHAPE_FLAGS = (*MODEL_SHAPE, "block_size")  # what weights fix: a flag given must agree with them


def shape(model):
    """The --model's GPTConfig fields but the vocabulary."""
    return dict(block_size=1024, **{name: MODELS[model][name] for name in MODEL_SHAPE})


# AdamW's eps is added to the root of the second moment: past 1e-3 it swamps a typical gradient's
# root (about 1e-3 to 1e-6), and every update shrinks towards nothing.
EPS = (lambda value: 0 < value <= 1e-3, "in (0, 1e-3]: a larger eps makes AdamW's steps vanish")
FLAGS = {
    "data": [
        ("--data_dir", "edu_fineweb10B", "shards written by fineweb.py (or llm.c .bin shards)"),
        ("--total_batch_size", int, "tokens per optimizer step (default: GPT-3's for the --model's "
         "size: 2**19, ~0.5M, up to gpt2-large; 2**20 for gpt2-xl)", POSITIVE),
        ("--batch_size", 64, "sequences per micro-step per GPU (B); lower it for memory", POSITIVE),
        ("--seq_len", 1024, "tokens per sequence (T): GPT-2's context", POSITIVE),
        ("--shuffle", True, "read the train shards and their sequences in a new order each epoch, "
         "drawn from --seed; --no-shuffle reads them front to back, as the lecture does"),
    ],
    "model": [
        ("--model", GPT2_SIZES, "the GPT-2 to train: its shape, and GPT-3's recipe for its size "
         "(learning rate, batch, warmup); a flag given sets its own value"),
        ("--init", str, "start from these weights (gpt2, gpt2-medium, gpt2-large, gpt2-xl, a "
         "Hugging Face GPT-2 directory, or log/model_XXXXX.pt), a fresh optimizer at step 0"),
        ("--n_layer", int, "transformer blocks (default: the --model's, 12 for gpt2, or the "
         "weights')", POSITIVE),
        ("--n_head", int, "attention heads (default: the --model's, 12 for gpt2, or the "
         "weights')", POSITIVE),
        ("--n_embd", int, "channels (default: the --model's, 768 for gpt2, or the weights')",
         POSITIVE),
        ("--block_size", int, "longest context (default: 1024, or the weights')", POSITIVE),
        ("--vocab_size", 50304, "50257 padded to a multiple of 128 for faster matmuls", POSITIVE),
    ],
    "optimisation": [
        ("--max_lr", float, "peak learning rate (default: GPT-3's for the --model, 6e-4 for gpt2)",
         UNIT),
        ("--min_lr", float, "final learning rate (default: 10%% of --max_lr, as GPT-3)", UNIT),
        ("--warmup_steps", int, "linear warmup (default: 375M tokens, as GPT-3: 715 steps of "
         "2**19)", AT_LEAST_0),
        ("--max_steps", int, "steps (default: 10B tokens, one epoch of FineWeb-edu: 19073 steps of "
         "2**19)", POSITIVE),
        ("--weight_decay", 0.1, "decoupled AdamW decay on matrices (GPT-3)", AT_LEAST_0),
        ("--beta1", 0.9, "AdamW first-moment decay (GPT-3)", BELOW_1),
        ("--beta2", 0.95, "AdamW second-moment decay (GPT-3)", BELOW_1),
        ("--eps", 1e-8, "AdamW epsilon (GPT-3)", EPS),
        ("--grad_clip", 1.0, "clip the global gradient norm (GPT-3); 0: off, as nanoGPT",
         AT_LEAST_0),
        ("--seed", 1337, "seed of the weight init and of the data order", SEED),
    ],
    "evaluation, logging and checkpoints": [
        ("--eval_every", 250, "steps between val loss / HellaSwag / samples", POSITIVE),
        ("--eval_first", True, "evaluate the starting weights before step 0 (not on --resume)"),
        ("--val_tokens", 10485760, "val tokens per evaluation (20 steps of 2**19)", POSITIVE),
        ("--hellaswag", True, "HellaSwag acc_norm at each evaluation"),
        ("--hellaswag_data", str, "local hellaswag_val.jsonl (default: the cached download)"),
        ("--sample_every_eval", True, "print 4 samples at each evaluation"),
        ("--sample_prompt", str, "the samples' prompt (default: the val split's first words)"),
        ("--eval_only", False, "only evaluate the --init or --resume weights; write nothing"),
        ("--log_dir", "log", "log.txt and checkpoints go here"),
        ("--ckpt_every", 5000, "steps between checkpoints (also at the end and on a stop signal)",
         POSITIVE),
        ("--resume", "[PATH]", "continue from --log_dir's latest checkpoint, or the given path"),
    ],
    "hardware": [
        ("--device", str, "cuda, mps or cpu (default: the best available)"),
        ("--dtype", ("auto", "bfloat16", "float16", "float32"), "autocast; auto: bf16 where the "
         "hardware has it, fp16 + loss scaling on older GPUs, else fp32 (emulated bf16 is slower)"),
        ("--compile", bool, "torch.compile the model (default: on for CUDA)"),
        ("--shard", ("none", "optimizer", "full"), "under torchrun: none keeps a full "
         "copy of the state on every rank (DDP); optimizer shards AdamW's moments over the ranks "
         "(ZeRO-1): 8 + 8/ranks bytes a parameter, not 16; full shards the weights and gradients "
         "too (FSDP2): 16/ranks"),
        ("--activation_checkpointing", False, "recompute each block's activations in the backward "
         "pass: the same numbers, about a third more compute, far less activation memory"),
        ("--peak_flops", float, "device peak FLOP/s for MFU (known for A100/H100/H200)", POSITIVE),
    ],
}  # fmt: skip

# Flags that make no sense together: (what must hold, what to say where it does not).
RULES = [
    (lambda a, _: a.min_lr <= a.max_lr, "--min_lr {min_lr} is above --max_lr {max_lr}"),
    (lambda a, _: a.max_lr * a.weight_decay < 1, "--weight_decay {weight_decay} x "
     "--max_lr {max_lr} is 1 or more: each step would decay every weight by all of it; lower "
     "--weight_decay"),
    (lambda a, _: not (a.init and a.resume), "--init and --resume together: --init starts "
     "a new run from given weights, --resume continues a run (a fine-tune too, without --init); "
     "pass one"),
    (lambda a, _: not a.eval_only or a.init or a.resume, "--eval_only evaluates given weights: "
     "pass --init NAME_OR_PATH or --resume [PATH]"),
    (lambda a, _: a.vocab_size >= GPT2_VOCAB_SIZE, "--vocab_size {vocab_size} is smaller than "
     f"GPT-2's {GPT2_VOCAB_SIZE} tokens"),
    (lambda a, ranks: a.eval_only or a.total_batch_size % (a.batch_size * a.seq_len * ranks) == 0,
     "--total_batch_size {total_batch_size} is not divisible by batch_size*seq_len*world_size = "
     "{batch_size}*{seq_len}*{world_size} = {micro_step_tokens}: change one of them"),
    (lambda a, _: a.shard == "none" or not a.eval_only, "--eval_only keeps no optimizer and no "
     "gradients, and holds the weights whole on each rank: leave out --shard {shard}"),
    (lambda a, ranks: a.shard == "none" or ranks > 1, "--shard {shard} shares the "
     "state over the ranks of a torchrun group, and this is one process: start it with "
     "torchrun --nproc_per_node=N (N of 2 or more), or leave out --shard"),
]  # fmt: skip


def parse(argv=None):
    p = cli.ArgumentParser(
        description="Train GPT-2 (124M by default, or --model's size) on pre-tokenized shards, "
        "from scratch or from --init weights; or only evaluate weights (--eval_only).",
        formatter_class=cli.HelpFormatter,
    )
    args = cli.parse_flags(p, FLAGS, argv)  # each number in its range
    # The recipe flags left out take the --model's values (at 2**19 tokens a step, the lecture's 715
    # warmup steps and 19073 steps); the start-up block says which did.
    size = MODELS[args.model]
    batch = size["total_batch_size"]
    recipe = dict(max_lr=size["max_lr"], total_batch_size=batch,
                  warmup_steps=WARMUP_TOKENS // batch, max_steps=RUN_TOKENS // batch)  # fmt: skip
    args.from_model = [name for name in RECIPE_FLAGS if getattr(args, name) is None]
    for name in args.from_model:
        setattr(args, name, recipe[name])
    if args.min_lr is None:
        args.min_lr = 0.1 * args.max_lr
    return args


def check(args, world_size):
    """Refuse flags that make no sense together, in one line."""
    fields = dict(vars(args), world_size=world_size)  # what a rule's message may name
    fields["micro_step_tokens"] = args.batch_size * args.seq_len * world_size
    for holds, message in RULES:
        if not holds(args, world_size):
            raise UserError(message.format(**fields))
