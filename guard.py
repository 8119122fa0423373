"""What guards a training run, and what a reader of the tutorial can skip: the checks of the flags, the
log folder's lock across ranks, the checks of shards and of the data a checkpoint was trained on, the
names and checks of checkpoints, which checkpoint --resume continues, divergence, and Ctrl-C/SIGTERM.

Not in train_gpt2.py because none of it is how GPT-2 is built or trained: each function turns a way a
run could go wrong (a flag that makes no sense, a shard of another tokenizer, a checkpoint of another
run or another program, a NaN) into one line that says what is wrong and what to do.
"""

import contextlib
import glob
import hashlib
import json
import math
import os
import re
import signal
import sys

import numpy as np
import torch

from common import (
    BELOW_ONE,
    GPT2_VOCAB_SIZE,
    NOT_NEGATIVE,
    POSITIVE,
    SEED,
    SHARD_NAME,
    UserError,
    check_master_address,
    check_ranges,
    output_lock,
    torchrun_group,
)

# -----------------------------------------------------------------------------
# Flags: the range of every numeric flag (checked by common.check_ranges, which also refuses nan and
# inf), then the combinations that make no sense, refused before any work starts.

FLAG_RANGES = {
    **dict.fromkeys(
        ["total_batch_size", "batch_size", "seq_len", "n_layer", "n_head", "n_embd", "block_size", "vocab_size"]
        + ["max_steps", "eval_every", "ckpt_every", "val_tokens", "peak_flops"],
        POSITIVE,
    ),
    # AdamW moves each weight by about the learning rate per step: above 1 no run can train, and far above
    # it the update overflows float32 inside the optimizer.
    **dict.fromkeys(["max_lr", "min_lr"], (lambda value: 0 <= value <= 1, "in [0, 1]")),
    **dict.fromkeys(["weight_decay", "grad_clip", "eps", "warmup_steps"], NOT_NEGATIVE),
    "seed": SEED,
    **dict.fromkeys(["beta1", "beta2"], BELOW_ONE),
}


def check_args(args, world_size):
    """Refuse flags that make no sense before any work starts, each with one line that says why."""
    check_ranges(args, FLAG_RANGES)
    if args.min_lr > args.max_lr:
        raise UserError(f"--min_lr {args.min_lr} is above --max_lr {args.max_lr}")
    if args.init and args.resume:
        raise UserError(
            "--init and --resume together: --init starts a new run from given weights, --resume continues a run "
            "(a fine-tune too, without --init); pass one of them"
        )
    if args.eval_only and not (args.init or args.resume):
        raise UserError("--eval_only evaluates given weights: pass --init NAME_OR_PATH or --resume [PATH]")
    if args.vocab_size < GPT2_VOCAB_SIZE:
        raise UserError(f"--vocab_size {args.vocab_size} is smaller than GPT-2's {GPT2_VOCAB_SIZE} tokens")
    tokens_per_micro_step = args.batch_size * args.seq_len * world_size
    if args.total_batch_size % tokens_per_micro_step and not args.eval_only:  # --eval_only takes no step
        raise UserError(
            f"--total_batch_size {args.total_batch_size} is not divisible by batch_size*seq_len*world_size = "
            f"{args.batch_size}*{args.seq_len}*{world_size} = {tokens_per_micro_step}: change one of them"
        )


@contextlib.contextmanager
def log_dir_lock(log_dir, procs, device):
    """Rank 0 holds --log_dir's lock for the whole run (common.output_lock), so that a second run on
    the same folder is refused before it reads or removes anything there. All ranks learn whether it
    got the lock, so that none goes on alone; only rank 0's message is printed."""
    with contextlib.ExitStack() as stack:
        refusal = None
        if procs.master:
            try:
                stack.enter_context(output_lock(log_dir, "--log_dir"))
            except UserError as e:
                refusal = e
        if procs.any(refusal is not None, device):
            raise refusal or silent(UserError(f"rank 0 could not lock --log_dir {log_dir}"))
        yield


@contextlib.contextmanager
def one_error_line(procs):
    """In a torchrun group, a user error on any rank reaches the screen once, naming its rank: the first rank
    to fail says it (counted in the group's store), the others' errors stay silent, and a rank that a
    failed peer leaves stuck in a collective exits without its traceback (torchrun then ends the group)."""
    try:
        yield
    except (UserError, RuntimeError) as e:
        if not (procs.ddp and torch.distributed.is_initialized()) or getattr(e, "speaks", None) is False:
            raise  # one process; or a rank's echo of an error that another rank says
        user_error = isinstance(e, UserError)
        try:
            store = torch.distributed.distributed_c10d._get_default_store()
            errors_before = store.add("user_errors", int(user_error)) - int(user_error)
        except Exception:  # the store went with a failed peer
            errors_before = None
        if not user_error and errors_before == 0:
            raise  # no rank reported a user error: this failure's traceback is the report
        error = UserError(f"rank {procs.rank}: {e}" if user_error else "stopped: another rank of the group failed")
        error.speaks = user_error and not errors_before
        raise error from None


def silent(error):
    """`error` marked as the echo of an error that another rank says: run_cli prints nothing for it."""
    error.speaks = False
    return error


def join_group(procs, backend):
    """Join the torchrun group at MASTER_ADDR:MASTER_PORT. A host that does not resolve is refused at once. Ranks
    started by hand (RANK, WORLD_SIZE, ... set, no torchrun) say that they wait for the others, rather than
    hang silently when those never come; and while the group forms, Ctrl-C and SIGTERM end the process
    (torch waits inside C++, where Python's handlers would only run after half an hour)."""
    check_master_address()
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    if "TORCHELASTIC_RUN_ID" not in os.environ and procs.world_size > 1:
        others = "rank 0" if procs.rank else f"ranks 1 to {procs.world_size - 1}" if procs.world_size > 2 else "rank 1"
        print(f"rank {procs.rank} of {procs.world_size}: waiting for {others} at {where} (set by MASTER_ADDR, "
              "MASTER_PORT); start every rank, or unset RANK, LOCAL_RANK and WORLD_SIZE; Ctrl-C stops the wait",
              file=sys.stderr, flush=True)  # fmt: skip
    handlers = {sig: signal.signal(sig, signal.SIG_DFL) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        torch.distributed.init_process_group(backend=backend)
    except torch.distributed.DistNetworkError as e:  # rank 0 could not open the group's port
        if "EADDRINUSE" not in str(e):
            raise
        raise UserError(
            f"MASTER_PORT={os.environ['MASTER_PORT']} on {os.environ['MASTER_ADDR']} is in use by another program "
            "(another run?): pass a free port (torchrun --master_port, or MASTER_PORT)"
        ) from None
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


# -----------------------------------------------------------------------------
# Shards. fineweb.py writes uint16 .npy files; llm.c and modded-nanogpt write .bin files: a header of
# 256 int32 (magic, version, token count, ...), then the uint16 tokens.

BIN_MAGIC, BIN_VERSION, BIN_HEADER_INTS = 20240520, 1, 256


def bin_shard_tokens(path):
    """The token count of an llm.c .bin shard, from its header, checked against the file's size."""
    header = np.fromfile(path, dtype=np.int32, count=BIN_HEADER_INTS)
    if len(header) < BIN_HEADER_INTS or header[0] != BIN_MAGIC or header[1] != BIN_VERSION:
        found = f"magic {header[0]}, version {header[1]}" if len(header) >= 2 else "no header"
        raise UserError(
            f"{path}: bad header ({found}; expected magic {BIN_MAGIC}, version {BIN_VERSION}): not an llm.c token shard"
        )
    num_tokens = int(header[2])
    expected_bytes = 4 * BIN_HEADER_INTS + 2 * num_tokens
    if os.path.getsize(path) != expected_bytes:
        raise UserError(
            f"{path}: {os.path.getsize(path)} bytes, header promises {expected_bytes}: "
            "the file is truncated, download it again"
        )
    return num_tokens


def npy_shard(path):
    """A .npy shard memory-mapped, or one line that says why it is not one."""
    try:
        tokens = np.load(path, mmap_mode="r")
    except Exception as e:
        raise UserError(
            f"{path}: not a readable .npy shard ({e}): it is probably truncated, regenerate it with fineweb.py"
        ) from None
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise UserError(
            f"{path}: tokens are {tokens.dtype} with shape {tokens.shape}, expected a 1-D uint16 array: "
            "regenerate it with fineweb.py"
        )
    return tokens


def check_token_ids(path, tokens):
    """Refuse a shard with ids the tokenizer never makes (a shard of another tokenizer, or uint16 data that
    is not tokens): past the embedding table they would crash a step deep into the run, and below it they
    would train rows that no text uses. Reading a shard once costs about as much as a few training steps."""
    if len(tokens) == 0:  # it would hold no sequence, and count as minus one in an epoch
        raise UserError(f"{path} holds no tokens: remove it, or regenerate the shards with fineweb.py")
    largest = int(tokens.max())
    if largest >= GPT2_VOCAB_SIZE:
        raise UserError(
            f"{path} holds token id {largest}, but GPT-2's tokenizer has {GPT2_VOCAB_SIZE} tokens: it is not "
            "a shard of GPT-2 tokens; remove it, or regenerate it with fineweb.py"
        )
    return tokens


def find_shards(data_dir, split):
    """The paths of the split's shards in data_dir, in index order. Only files count: a folder named like
    a shard is not one. Shards of two corpora (two prefixes, or two shards with one index) are refused."""
    if not data_dir.strip():
        raise UserError(f"--data_dir {data_dir!r} names no folder: pass the folder that holds the shards")
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise UserError(f"--data_dir {data_dir} is a file, not a folder: pass the folder that holds the shards")
    shards, prefixes = {}, {}
    for name in sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else []:
        match = SHARD_NAME.fullmatch(name)
        path = os.path.join(data_dir, name)
        if match and os.path.islink(path) and not os.path.exists(path):
            raise UserError(
                f"{path} is a symbolic link to {os.readlink(path)}, which does not exist: mount or copy the "
                "shards it points to, or remove the link"
            )
        if not (match and match.group(2) == split and os.path.isfile(path)):
            continue
        index = int(match.group(3))
        prefixes.setdefault(match.group(1), name)
        if len(prefixes) > 1:
            raise UserError(
                f"{data_dir} holds {split} shards of two corpora ({', '.join(prefixes.values())}): keep one corpus "
                "per --data_dir"
            )
        if index in shards:
            raise UserError(
                f"{data_dir} holds two {split} shards with index {index} ({os.path.basename(shards[index])}, "
                f"{name}): keep one corpus per --data_dir"
            )
        shards[index] = path
    if not shards:
        raise UserError(
            f"no {split} shards (*_{split}_NNNNNN.npy or .bin) in {data_dir}: run `python fineweb.py` "
            f"(or fineweb.py --input your.txt --out {data_dir}) first"
        )
    if split == "train":
        note_unfinished_data(data_dir)
    return [shards[index] for index in sorted(shards)]


def note_unfinished_data(data_dir):
    """Say (once per group) that a fineweb.py run into data_dir has not finished: its shards so far are used."""
    for path in glob.glob(os.path.join(glob.escape(data_dir), "*_progress.json")):
        try:
            with open(path) as f:
                finished = json.load(f).get("finished", True)
        except (OSError, ValueError, AttributeError):  # not fineweb.py's: nothing to say
            continue
        group = torchrun_group()
        if not finished and (group is None or group[0] == 0):
            print(f"note: {path} says its fineweb.py run has not finished: training uses the shards written so far")


def no_step_in_split(paths, shards, window, split):
    """The error for a split too short to hold one batch (val: --batch_size rows per rank) or one step (train)."""
    longest = max(range(len(paths)), key=lambda i: len(shards[i]))
    lower = "--batch_size (or --seq_len)" if split == "val" else "--total_batch_size (or --batch_size/--seq_len)"
    return UserError(
        f"{paths[longest]} has {len(shards[longest])} tokens, fewer than one batch of all ranks' "
        f"sequences + 1 = {window + 1}, and the {split} split holds no {'batch' if split == 'val' else 'step'}: "
        f"lower {lower} or add data"
    )


# -----------------------------------------------------------------------------
# The data a checkpoint was trained on: its loader state records the step size, the order and a
# fingerprint of the train shards, so that a resume on other data or another batch is refused.


def data_fingerprint(paths, shards):
    """[name, tokens, digest] of each shard: enough to notice a shard that was replaced, cut, or regenerated
    differently, cheaply (the digest covers a shard's first and last 4096 tokens, not all of it)."""
    edges = 4096
    return [
        [
            os.path.basename(path),
            len(tokens),
            hashlib.sha256(tokens[:edges].tobytes() + tokens[-edges:].tobytes()).hexdigest(),
        ]
        for path, tokens in zip(paths, shards)
    ]


def check_loader_state(state, step_tokens, seq_len, data, shuffle, seed, epoch_sequences):
    """Refuse to resume a loader state saved with another step size, sequence length, data or order
    (checkpoints from before these were recorded are taken as they are), or a position past the epoch."""
    then = (state.get("step_tokens", step_tokens), state.get("seq_len", seq_len))
    if then != (step_tokens, seq_len):
        raise UserError(
            f"the checkpoint read steps of {then[0]} tokens in sequences of {then[1]}, this run {step_tokens} in "
            f"{seq_len}: resume with its --total_batch_size and --seq_len (the number of processes and "
            "--batch_size may change)"
        )
    check_same_data(state.get("data", data), data)
    if state.get("sequence", 0) >= epoch_sequences or state.get("sequence", 0) % (step_tokens // seq_len):
        raise UserError(
            f"the checkpoint's data position (sequence {state['sequence']}) is not the start of a step of an epoch "
            f"of {epoch_sequences} sequences: the checkpoint is damaged; resume from an earlier one"
        )
    shuffled, then_seed = state.get("shuffle", False), state.get("seed")  # older checkpoints read in order
    if shuffled != shuffle or (shuffled and then_seed != seed):
        order = f"--shuffle --seed {then_seed}" if shuffled else "--no-shuffle"
        raise UserError(f"the checkpoint read the train shards in another order: resume with {order}")


def check_same_data(then, now):
    """Refuse to resume on train shards other than the checkpoint's (`then`, `now`: data_fingerprint's)."""
    if then != now:
        then_shard, now_shard = next(((a, b) for a, b in zip(then, now) if a != b), (None, None))
        detail = (
            f"{len(then)} train shards then, {len(now)} now"
            if then_shard is None
            else f"{then_shard[0]} of {then_shard[1]:,} tokens then, {now_shard[0]} of {now_shard[1]:,} now"
        )
        raise UserError(
            f"the train shards are not the ones the checkpoint was trained on ({detail}): "
            "point --data_dir at the data of the run"
        )


# -----------------------------------------------------------------------------
# Checkpoints: which files count as one, what a file must hold to be one of ours, and which one
# --resume continues.

# The names the trainer writes, and the only files that count as checkpoints: not a half-written
# model_00042.pt.tmp, nor a copy a user made, such as model_00002_backup.pt.
CHECKPOINT_NAME = re.compile(r"model_(\d{5,})\.pt")


def latest_checkpoint(log_dir):
    """The checkpoint of the highest step in log_dir, or None."""
    steps = {}
    for path in glob.glob(os.path.join(glob.escape(log_dir), "model_*.pt")):
        if (match := CHECKPOINT_NAME.fullmatch(os.path.basename(path))) and os.path.isfile(path):
            steps[int(match.group(1))] = path
    return steps[max(steps)] if steps else None


def checkpoint_step(path):
    """The step in a checkpoint's name (model_00042.pt: 42), or None for another name."""
    match = CHECKPOINT_NAME.fullmatch(os.path.basename(path))
    return int(match.group(1)) if match else None


def remove_stale_checkpoints(log_dir):
    """Remove checkpoints whose write was interrupted (the previous one is intact). The caller holds
    --log_dir's lock, so no other run can be writing them; only names the trainer writes are removed."""
    for stale in glob.glob(os.path.join(log_dir, "model_*.pt.tmp")):
        if CHECKPOINT_NAME.fullmatch(os.path.basename(stale).removesuffix(".tmp")):
            os.remove(stale)


@contextlib.contextmanager
def reading_checkpoint(path):
    """Around torch.load of `path`: a missing file, or one that is not a checkpoint, is one line."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint file")
    try:
        yield
    except Exception as e:
        raise UserError(
            f"{path} is not a checkpoint of this project ({type(e).__name__}): "
            "it may be truncated or another kind of file"
        ) from None


def check_checkpoint(checkpoint, path, config_class):
    """Refuse a file that torch.load read but that is not one of our checkpoints."""
    if not isinstance(checkpoint, dict) or not {"model", "config"} <= checkpoint.keys():
        raise UserError(f"{path} is not a checkpoint of this project: it lacks the 'model' and 'config' entries")
    check_config(checkpoint["config"], path, config_class)


def check_config(config, source, config_class):
    """Refuse a model config that GPT cannot be built from, before building it: one from another program
    (nanoGPT's checkpoints also hold a 'config', of training settings), or one with impossible sizes."""
    fields = set(config_class.__dataclass_fields__)
    if not isinstance(config, dict) or config.keys() != fields:
        found = sorted(config)[:4] if isinstance(config, dict) else type(config).__name__
        raise UserError(
            f"{source} is not a checkpoint of this project: its config holds {found}, not {sorted(fields)} "
            "(checkpoints of nanoGPT and other trainers are laid out differently)"
        )
    bad = [f"{k} {v!r}" for k, v in config.items() if not (isinstance(v, int) and v > 0)]
    if bad or config["n_embd"] % config["n_head"]:
        raise UserError(
            f"{source}: its model config is impossible ({', '.join(bad) or 'n_embd not divisible by n_head'}): "
            "sizes must be positive integers and n_embd a multiple of n_head"
        )


def check_weights_fit(expected, state, source):
    """Refuse a state dict whose names or shapes differ from the model's (`expected`), naming a tensor."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - {"lm_head.weight"})
    if missing or unexpected:
        raise UserError(
            f"{source} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}; "
            "was it saved from another model or another --n_layer/--n_head/--n_embd?"
        )
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise UserError(
                f"{source} does not fit this model: {key} is {tuple(state[key].shape)} there and "
                f"{tuple(tensor.shape)} here; was it saved with another --n_layer/--n_head/--n_embd/--vocab_size?"
            )
        if state[key].is_floating_point() and not torch.isfinite(state[key]).all():
            raise UserError(
                f"{source}: {key} holds NaN or inf, so its outputs would too (a run that diverged before it "
                "was saved): use an earlier checkpoint"
            )


def config_differences(weights, config, names):
    """Where the run's GPTConfig differs from `weights` (the config dict of the weights it loads) among `names`,
    as flags: '--n_layer 12 there, 24 here, ...'; empty when they agree."""
    return ", ".join(
        f"--{name} {weights.get(name)} there, {getattr(config, name)} here"
        for name in names
        if weights.get(name) != getattr(config, name)
    )


def check_shape(config, seq_len):
    """Refuse a model shape that cannot be built, or too short a context for --seq_len."""
    if config.n_embd % config.n_head:
        raise UserError(f"--n_embd {config.n_embd} must be divisible by --n_head {config.n_head}")
    if seq_len > config.block_size:
        raise UserError(f"--seq_len {seq_len} is longer than the model's --block_size {config.block_size}")


def check_same_model(then, config, path):
    """A resumed run is the checkpoint's model (`then`, its config dict): every field must agree."""
    if differences := config_differences(then, config, vars(config)):
        raise UserError(
            f"{path} is from another model ({differences}): resume with the model flags it was trained with"
        )


def check_same_shape(weights, config, shape_flags, init):
    """--init's weights set the model's shape: a shape flag that disagrees with them is refused."""
    if differences := config_differences(weights, config, shape_flags):
        raise UserError(
            f"--init {init} has another shape ({differences}): its weights set the model's shape, "
            "so leave out --n_layer/--n_head/--n_embd/--block_size"
        )


def checkpoint_to_resume(resume, log_dir, load, writes=True):
    """(path, contents) of the checkpoint that --resume continues, read by `load` ((None, None) without --resume):
    the newest one in --log_dir (bare --resume, 'latest') or in a folder --resume names, or the file it names.
    A resumed run that `writes` its checkpoints to --log_dir needs a folder that holds no other run's, nor newer
    ones of this run (they would be overwritten, or taken by the next --resume); --eval_only writes nothing."""
    if resume is None:
        return None, None
    if not resume.strip():
        raise UserError("--resume '' names no checkpoint: pass a file or a folder, or --resume alone for --log_dir's")
    folder = log_dir if resume == "latest" else resume
    by_folder = resume == "latest" or os.path.isdir(folder)
    if by_folder:
        resume = latest_checkpoint(folder)
        if resume is None:
            raise UserError(
                f"--resume: no checkpoint model_*.pt in {folder}: start without --resume, or pass --log_dir of the run"
            )
    if resume.endswith(".tmp"):
        raise UserError(
            f"--resume {resume}: a .tmp file is a checkpoint whose write was cut short, not a checkpoint; "
            "pass the model_XXXXX.pt before it"
        )
    try:
        checkpoint = load(resume)  # first: a file that is no checkpoint is said as such
    except UserError as e:  # a torn newest checkpoint, say: the one before it is resumed once it is moved away
        others = glob.glob(os.path.join(glob.escape(folder), "model_*.pt")) if by_folder else []
        if not any(CHECKPOINT_NAME.fullmatch(os.path.basename(path)) and path != resume for path in others):
            raise
        raise UserError(f"{e}; move it out of {os.path.dirname(resume) or '.'} to resume the one before it") from None
    named, step = checkpoint_step(resume), checkpoint.get("step")
    beside = writes and in_folder(resume, log_dir)  # the resumed run's checkpoints go beside it
    if beside and named is not None and whole(step) and step < named:  # the newest name is what --resume takes
        raise UserError(
            f"{resume} holds step {step}, not the step {named} of its name (a renamed copy?): resumed, its checkpoints "
            f"would sort before it, and the next --resume would go back to step {step}; rename it model_{step:05d}.pt"
        )
    kept = writes and latest_checkpoint(log_dir)  # a file or the newest in a folder: the same rule
    if kept and not in_folder(resume, log_dir):
        raise UserError(
            f"--log_dir {log_dir} holds checkpoints of another run ({os.path.basename(kept)}): resuming "
            f"{resume} there would overwrite them; pass an empty --log_dir for the resumed run"
        )
    newer = kept and not os.path.samefile(kept, resume) and whole(step)
    if newer and step < checkpoint_step(kept):
        raise UserError(
            f"--log_dir {log_dir} holds {os.path.basename(kept)}, newer than {resume}: training on from an earlier "
            "checkpoint there would overwrite the newer ones, and the next --resume would take them; pass a new "
            "--log_dir for this resume, or move the newer checkpoints away"
        )
    return resume, checkpoint


SCALER_FIELDS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


def check_resumable(checkpoint, path):
    """A checkpoint that can continue a run: not one of weights only (sample.py and export_hf.py read those),
    and each entry a resume reads of the right kind, checked once here, so that a damaged or hand-edited
    file is one line and not a KeyError deep inside the restore."""
    if "optimizer" not in checkpoint:
        raise UserError(
            f"{path} holds weights only (no optimizer state): it cannot be resumed; start a new run from its "
            f"weights with --init {path}"
        )
    optimizer, loader, rng = checkpoint["optimizer"], checkpoint.get("loader"), checkpoint.get("rng")
    scaler = checkpoint.get("scaler")
    position = ("sequence",) if isinstance(loader, dict) and "sequence" in loader else ("shard", "position")
    wrong = {
        "step": not whole(checkpoint.get("step")),
        "optimizer": not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
                          and isinstance(optimizer.get("param_groups"), list) and optimizer["param_groups"]),
        # empty where the run was not in fp16; else GradScaler's fields, with a scale it can multiply a loss by
        "scaler": not (scaler == {} or isinstance(scaler, dict) and set(SCALER_FIELDS) <= scaler.keys()
                       and all(isinstance(scaler[k], (int, float)) for k in SCALER_FIELDS)
                       and math.isfinite(scaler["scale"]) and scaler["scale"] > 0),
        "loader": not (isinstance(loader, dict) and all(whole(loader.get(k)) for k in ("epoch", *position))
                       and isinstance(loader.get("data", []), list)
                       and all(isinstance(shard, list) and len(shard) == 3 for shard in loader.get("data", []))),
        "rng": not (isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor)
                    and rng["torch"].shape == torch.get_rng_state().shape
                    and all(isinstance(state, torch.Tensor) and state.dtype == torch.uint8 for state in rng.values())),
        "args": not isinstance(checkpoint.get("args", {}), dict),
        "eval_pending": not isinstance(checkpoint.get("eval_pending", False), bool),
    }  # fmt: skip
    if any(wrong.values()):
        raise UserError(
            f"{path}: its {', '.join(k for k, bad in wrong.items() if bad)} entry is missing or damaged, so it "
            "cannot be resumed; resume from an earlier checkpoint (its weights still load with --init)"
        )


def whole(value):
    """Whether a checkpoint's counter (a step, an epoch, a position) is a whole number from 0 up."""
    return type(value) is int and value >= 0


def check_steps_left(start_step, max_steps):
    """A resumed run with steps still to train; a finished one is refused before anything is written."""
    if start_step >= max_steps:
        raise UserError(
            f"the checkpoint is after step {start_step - 1} and --max_steps is {max_steps}: nothing to train; "
            f"raise --max_steps to train on"
        )


def check_new_run(log_dir):
    """A new run must not write over the checkpoints of another (every rank checks, so none goes on alone)."""
    if latest_checkpoint(log_dir):
        raise UserError(
            f"{log_dir} already holds checkpoints: pass --resume to continue that run, or choose another --log_dir"
        )


def open_log(log_dir, resume):
    """log.txt, open for the run's lines. A resume appends, after dropping a last line cut short by a kill
    (its own line would start mid-line); a new run writes it anew, and says so if an earlier run (one that
    saved no checkpoint) left one."""
    path = os.path.join(log_dir, "log.txt")
    if os.path.islink(path):
        raise UserError(
            f"{path} is a symbolic link (to {os.readlink(path)}): the run would write through it; remove the link, "
            "or pass another --log_dir"
        )
    if resume:
        with contextlib.suppress(FileNotFoundError), open(path, "rb+") as f:
            text = f.read()
            if text and not text.endswith(b"\n"):
                f.truncate(text.rfind(b"\n") + 1)
        return open(path, "a")
    if os.path.isfile(path) and os.path.getsize(path):
        print(f"note: {path} of an earlier run that saved no checkpoint is replaced", flush=True)
    return open(path, "w")


def check_sample_prompt(prompt, enc, new_tokens, block_size):
    """The samples at each evaluation add new_tokens to the prompt, within the model's context."""
    tokens = len(enc.encode(prompt, allowed_special={"<|endoftext|>"})) or 1  # an empty one is <|endoftext|>
    if tokens + new_tokens > block_size:
        raise UserError(
            f"the samples' prompt is {tokens} token{'s' * (tokens > 1)}: with the {new_tokens} that each sample adds, "
            f"past the model's context of {block_size}; pass a shorter --sample_prompt, a larger --block_size, or "
            "--no-sample_every_eval"
        )


def in_folder(path, folder):
    """Whether the file `path` lies directly in `folder`, however either is spelled."""
    return os.path.realpath(os.path.dirname(os.path.abspath(path))) == os.path.realpath(folder)


# -----------------------------------------------------------------------------
# Divergence: a loss, gradient or weight that is inf or NaN will not come back, so the run stops before
# such weights are saved, and names the checkpoint to go back to.


def check_finite(train_loss, norm, loss_scaling, step, log_dir):
    """Stop at a step whose loss or gradient norm is inf or NaN (loss_scaling: fp16's scaler is on)."""
    # With fp16 the scaler skips steps whose gradients overflowed, so only its loss must be finite.
    if not (math.isfinite(train_loss) and (loss_scaling or math.isfinite(norm.item()))):
        stop_diverged(step, f"loss {train_loss} / grad norm {norm.item()} is not finite", log_dir)


def check_finite_weights(model, step, log_dir):
    """A step can leave inf or NaN weights behind a finite loss (a learning rate far too high): checked
    before each checkpoint (on every rank, which hold the same weights), so that none ever holds them."""
    if not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all():
        stop_diverged(step, "the loss is finite, but the weights after the step are not", log_dir)


def stop_diverged(step, fault, log_dir):
    """End a diverged run with one line that names the checkpoint to go back to, if there is one."""
    kept = latest_checkpoint(log_dir)
    advice = f"last good checkpoint: {kept}: resume from it" if kept else "no checkpoint was saved yet: start again"
    raise UserError(f"step {step}: {fault}; stopping without saving. {advice} with a lower --max_lr")


# -----------------------------------------------------------------------------
# Signals.


class StopRequest:
    """SIGINT/SIGTERM (Ctrl-C, a cluster's preemption) ask the run to stop: it finishes the step it is in
    (an evaluation stops between batches), saves a checkpoint and exits 0. A second Ctrl-C stops at once:
    run_cli says so in one line, and a checkpoint being written is discarded (atomic_write)."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C raises KeyboardInterrupt
        notice = f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping\n"
        # os.write, not print: the signal can arrive in the middle of a print (say, one blocked on a full
        # pipe), and print cannot be re-entered: it would raise instead of letting the run save and stop.
        with contextlib.suppress(OSError):
            os.write(sys.stdout.fileno(), notice.encode())
