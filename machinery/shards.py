"""Token shards: their names, finding a split's shards, checking a shard's header and token ids, and
the fingerprint a checkpoint records so that a resume notices changed data. torch-free."""

import contextlib
import glob
import json
import os
import re
import zlib

import numpy as np

from machinery.cli import UserError
from machinery.tokenizer import GPT2_VOCAB_SIZE

# -----------------------------------------------------------------------------
# Shards. fineweb.py writes uint16 .npy files; llm.c and modded-nanogpt write .bin files: a header
# of 256 int32 (magic, version, token count, ...), then the uint16 tokens.
# A shard's name as fineweb.py and llm.c write it: PREFIX_SPLIT_INDEX.npy or .bin. Matched whole,
# the split is the word right before the index: a prefix "x_train" cannot make a val shard
# (x_train_val_000000.npy) look like a train shard.
SHARD_NAME = re.compile(r"(.+)_(train|val)_(\d{6})\.(npy|bin)")
BIN_MAGIC, BIN_VERSION, BIN_HEADER_INTS = 20240520, 1, 256
BIN_HEADER_BYTES = 4 * BIN_HEADER_INTS


def bin_header_tokens(path):
    """The token count of an llm.c .bin shard, from its header, checked against the file's size."""
    header = np.fromfile(path, dtype=np.int32, count=BIN_HEADER_INTS)
    if len(header) < BIN_HEADER_INTS or header[0] != BIN_MAGIC or header[1] != BIN_VERSION:
        found = f"magic {header[0]}, version {header[1]}" if len(header) >= 2 else "no header"
        raise UserError(
            f"{path}: bad header ({found}; expected magic {BIN_MAGIC}, version {BIN_VERSION}): "
            "not an llm.c token shard"
        )
    size, expected = os.path.getsize(path), BIN_HEADER_BYTES + 2 * int(header[2])
    if size != expected:
        raise UserError(
            f"{path}: {size} bytes, header promises {expected}: the file is truncated, download it "
            "again"
        )
    return int(header[2])


@contextlib.contextmanager
def reading(path):
    """Around the memory map of a shard: a file that cannot be read as one is one line."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        raise UserError(
            f"{path}: not a readable .npy shard ({e}): it is probably truncated, regenerate it "
            "with fineweb.py"
        ) from None


def check_tokens(path, tokens):
    """Refuse ids the tokenizer never makes (another tokenizer's, or not tokens): past the embedding
    they crash a step deep into the run, below it they train rows no text uses. Reading a shard
    once costs a few training steps."""
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise UserError(
            f"{path}: tokens are {tokens.dtype} with shape {tokens.shape}, expected a 1-D uint16 "
            "array: regenerate it with fineweb.py"
        )
    if len(tokens) == 0:  # it would hold no sequence, and count as minus one in an epoch
        raise UserError(
            f"{path} holds no tokens: remove it, or regenerate the shards with fineweb.py"
        )
    largest = int(tokens.max())
    if largest >= GPT2_VOCAB_SIZE:
        raise UserError(
            f"{path} holds token id {largest}, but GPT-2's tokenizer has {GPT2_VOCAB_SIZE} tokens: "
            "it is not a shard of GPT-2 tokens; remove it, or regenerate it with fineweb.py"
        )
    return tokens


def find(data_dir, split):
    """The paths of the split's shard files in data_dir, in index order; two corpora are refused."""
    if not data_dir.strip():
        raise UserError(
            f"--data_dir {data_dir!r} names no folder: pass the folder that holds the shards"
        )
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise UserError(
            f"--data_dir {data_dir} is a file, not a folder: pass the folder that holds the shards"
        )
    shards, prefixes = {}, {}
    for name in sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else []:
        match = SHARD_NAME.fullmatch(name)
        path = os.path.join(data_dir, name)
        if match and os.path.islink(path) and not os.path.exists(path):
            raise UserError(
                f"{path} is a symbolic link to {os.readlink(path)}, which does not exist: "
                "mount or copy the shards it points to, or remove the link"
            )
        if not (match and match.group(2) == split and os.path.isfile(path)):
            continue
        index = int(match.group(3))
        prefixes.setdefault(match.group(1), name)
        if len(prefixes) > 1:
            raise UserError(
                f"{data_dir} holds {split} shards of two corpora "
                f"({', '.join(prefixes.values())}): keep one corpus per --data_dir"
            )
        if index in shards:
            raise UserError(
                f"{data_dir} holds two {split} shards with index {index} "
                f"({os.path.basename(shards[index])}, {name}): keep one corpus per --data_dir"
            )
        shards[index] = path
    if not shards:
        raise UserError(
            f"no {split} shards (*_{split}_NNNNNN.npy or .bin) in {data_dir}: run "
            f"`python fineweb.py` (or fineweb.py --input your.txt --out {data_dir}) first"
        )
    # A fineweb.py run into data_dir that has not finished: training uses its shards so far.
    rank_0 = split == "train" and os.environ.get("RANK", "0").strip() in ("", "0")
    for path in glob.glob(os.path.join(glob.escape(data_dir), "*_progress.json")) if rank_0 else []:
        with contextlib.suppress(OSError, ValueError, AttributeError):  # not fineweb.py's: no note
            with open(path) as f:
                if not json.load(f).get("finished", True):
                    print(
                        f"note: {path} says its fineweb.py run has not finished: training uses the "
                        "shards written so far"
                    )
    return [shards[index] for index in sorted(shards)]


def no_step_in_split(paths, shards, window, split):
    """The error for a split too short for one batch (val: --batch_size rows per rank) or step."""
    longest = max(range(len(paths)), key=lambda i: len(shards[i]))
    unit, lower = "batch", "--batch_size (or --seq_len)"
    if split == "train":
        unit, lower = "step", "--total_batch_size (or --batch_size/--seq_len)"
    return UserError(
        f"{paths[longest]} has {len(shards[longest])} tokens, fewer than one batch of all ranks' "
        f"sequences + 1 = {window + 1}, and the {split} split holds no {unit}: lower {lower} or "
        "add data"
    )


# -----------------------------------------------------------------------------
# The data a checkpoint was trained on: its loader state records the step size, the order and a
# fingerprint of the train shards, so that a resume on other data or another batch is refused.


def fingerprint(paths, shards):
    """[name, tokens, CRC-32 of all its bytes] of each shard: a shard replaced, cut, or changed
    anywhere is noticed (0.15 s per GiB on a 2-core AMD EPYC, beside the read of its token ids)."""
    return [
        [os.path.basename(path), len(tokens), f"{zlib.crc32(memoryview(tokens).cast('B')):08x}"]
        for path, tokens in zip(paths, shards)
    ]


def check_loader_state(state, loader):
    """Refuse to resume a loader state saved with another step size, sequence length, data or order
    (a checkpoint from before one was recorded is taken as it is), or a position past the epoch."""
    then = (state.get("step_tokens", loader.window), state.get("seq_len", loader.T))
    if then != (loader.window, loader.T):
        raise UserError(
            f"the checkpoint read steps of {then[0]} tokens in sequences of {then[1]}, this run "
            f"{loader.window} in {loader.T}: resume with its --total_batch_size and --seq_len "
            "(the number of processes and --batch_size may change)"
        )
    check_same_data(state.get("data", loader.data), loader.data, "train")
    sequence = state.get("sequence", 0)
    if sequence >= loader.epoch_sequences or sequence % (loader.window // loader.T):
        raise UserError(
            f"the checkpoint's data position (sequence {sequence}) is not the start of a step of "
            f"an epoch of {loader.epoch_sequences} sequences: the checkpoint is damaged; resume "
            "from an earlier one"
        )
    shuffled, seed = state.get("shuffle", False), state.get("seed")  # older ones read in order
    if shuffled != loader.shuffle or (shuffled and seed != loader.seed):
        order = f"--shuffle --seed {seed}" if shuffled else "--no-shuffle"
        raise UserError(
            f"the checkpoint read the train shards in another order: resume with {order}"
        )


def check_same_data(then, now, split):
    """Refuse to resume on `split` shards other than the checkpoint's (then, now: fingerprints)."""
    if any(len(entry) < 3 or len(entry[2]) != 8 for entry in then):
        # An older checkpoint's checksum (of each shard's head and tail) is not a CRC-32 of the
        # whole: names and sizes are what can be compared.
        then, now = [entry[:2] for entry in then], [entry[:2] for entry in now]
    if then == now:
        return
    changed = next(((a, b) for a, b in zip(then, now) if a != b), None)
    if changed is None:
        detail = f"{len(then)} {split} shards then, {len(now)} now"
    elif changed[0][:2] == changed[1][:2]:  # same name and length, another checksum
        detail = f"{changed[0][0]} holds other tokens now"
    else:
        (name_then, tokens_then), (name_now, tokens_now) = changed[0][:2], changed[1][:2]
        detail = f"{name_then} of {tokens_then:,} tokens then, {name_now} of {tokens_now:,} now"
    raise UserError(
        f"the {split} shards are not the ones the checkpoint was trained on ({detail}): "
        "point --data_dir at the data of the run"
    )
