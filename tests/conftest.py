"""What the tests share (`from conftest import ...`): the tiny run, subprocess helpers, shard,
checkpoint and snapshot builders, a full disk; train_gpt2 is imported inside helpers only."""

import contextlib
import hashlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
from dataclasses import asdict

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `import train_gpt2` works however pytest is started

# A 2-layer, 64-wide GPT that trains in seconds on a CPU, as GPTConfig's fields and as
# train_gpt2.py's flags. float32, so that every run does the same arithmetic and two runs can be
# compared bit for bit.
TINY_SHAPE = dict(block_size=64, vocab_size=50304, n_layer=2, n_head=4, n_embd=64)
TINY_MODEL = "--n_layer 2 --n_head 4 --n_embd 64 --block_size 64 --dtype float32".split()
# The tiny model trained for 6 steps of 128 tokens (4 sequences of 32, one micro-step), evaluated
# on 256 tokens after steps 2 and 5. A test changes a flag by adding it again: the last one wins.
TINY_RUN = (
    TINY_MODEL
    + (
        "--batch_size 4 --seq_len 32 --total_batch_size 128 --max_steps 6 --warmup_steps 2 "
        "--eval_every 3 --val_tokens 256 --no-hellaswag --no-sample_every_eval"
    ).split()
)
# A test's subprocesses: one thread, so as not to fight other tests for the cores and to do the same
# arithmetic in every run; unbuffered, so that each line reaches the test when it is printed.
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
TIMEOUT = 300  # seconds: generous, since a loaded 2-core machine is slow; a healthy run needs a few


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """torch on one thread in the tests' own process too, as in their subprocesses (ENV): tiny
    models run as fast as on two, many times faster on busy cores, and sums add in one order."""
    import torch  # here, not at the top: conftest itself needs no torch

    torch.set_num_threads(1)


def run_script(*args, env=ENV):
    """python with these arguments (a script of the repository and its flags, or -c and code) in a
    fresh interpreter."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=TIMEOUT)  # fmt: skip


def run_trainer(*flags, nproc=1, cwd=REPO, script="train_gpt2.py"):
    """train_gpt2.py (or a script that runs it) with these flags in a subprocess (under torchrun for
    nproc > 1); it must exit with status 0. Returns the CompletedProcess."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    launcher = [sys.executable, *(torchrun if nproc > 1 else [])]
    command = [*launcher, os.path.join(REPO, script), *map(str, flags)]
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, env=ENV, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def start(*args, env=ENV):
    """python with these arguments in a subprocess that the test reads as it runs (read_until): its
    stdout and stderr merged into one pipe."""
    command = [sys.executable, *map(str, args)]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def read_until(proc, pattern):
    """Lines of proc's output up to the first that matches `pattern` (None: to its end); none fails
    the test (an exit, or a run that hangs: killed after TIMEOUT seconds)."""
    watchdog = threading.Timer(TIMEOUT, proc.kill)
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if pattern is not None and re.search(pattern, line):
                return lines
    finally:
        watchdog.cancel()
    if pattern is None:
        return lines
    raise AssertionError(f"exit {proc.wait()} before a line matched {pattern!r}:\n{''.join(lines)}")


def assert_bit_identical(checkpoint, other, differing=("args",)):
    """The two checkpoints hold the same entries, bit for bit: tensors of one dtype and equal,
    containers item by item; all but `differing` (args: each run's own command line). Returns the
    first, loaded."""
    import torch

    def same(a, b, where):
        assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
        elif isinstance(a, (dict, list, tuple)):
            if not isinstance(a, dict):  # a sequence: its items by index
                a, b = dict(enumerate(a)), dict(enumerate(b))
            assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
            for key in a:
                same(a[key], b[key], f"{where}[{key!r}]")
        else:
            assert a == b, f"{where}: {a!r} vs {b!r}"

    ours, theirs = (
        torch.load(p, map_location="cpu", weights_only=True) for p in (checkpoint, other)
    )
    compared = [{k: v for k, v in state.items() if k not in differing} for state in (ours, theirs)]
    same(*compared, os.path.basename(checkpoint))
    return ours


def write_random_shards(folder, val_tokens=4096, train_lengths=(8192,)):
    """A val shard and train shards of GPT-2 token ids drawn uniformly from a fixed seed, named as
    fineweb.py names its shards (tiny_val_000000.npy, tiny_train_000001.npy, ...)."""
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for index, length in enumerate((val_tokens, *train_lengths)):
        name = f"tiny_{'train' if index else 'val'}_{index:06d}.npy"
        np.save(os.path.join(folder, name), rng.integers(0, 50257, length, np.uint16))
    return str(folder)


def write_bin_shard(path, tokens, magic=None, promised=None):
    """A shard in llm.c's .bin format: a header (magic, version, token count: `promised` when given)
    and the tokens as uint16."""
    from machinery.shards import BIN_HEADER_INTS, BIN_MAGIC, BIN_VERSION

    header = np.zeros(BIN_HEADER_INTS, dtype=np.int32)
    header[:3] = magic or BIN_MAGIC, BIN_VERSION, len(tokens) if promised is None else promised
    with open(path, "wb") as f:
        f.write(header.tobytes() + np.asarray(tokens).astype(np.uint16).tobytes())
    return str(path)


def write_hellaswag(path, n=6):
    """n HellaSwag examples of 4 endings, right one cycling through 0..3."""
    endings = ["a", "b c", "d e f", "g"]
    with open(path, "w") as f:
        for i in range(n):
            example = {"ctx": f"Example {i}: the model reads", "endings": endings, "label": i % 4}
            f.write(json.dumps(example) + "\n")
    return str(path)


def tiny_checkpoint(path, model=None, data_dir=None, **entries):
    """A checkpoint of `model` (a fresh tiny GPT) without training; with data_dir, resumable at
    TINY_RUN's batch (optimizer, scaler, RNG, position, its name's step). `entries` override."""
    import torch

    from machinery.checkpoints import checkpoint_step
    from train_gpt2 import GPT, DataLoaderLite, GPTConfig, configure_optimizer

    model = model or GPT(GPTConfig(**TINY_SHAPE))
    state = {"model": model.state_dict(), "config": asdict(model.config)}
    if data_dir:
        optimizer = configure_optimizer(model, 0.1, 6e-4, (0.9, 0.95), 1e-8, "cpu")
        loader = DataLoaderLite(data_dir, 4, 32, 0, 1, "train", 128)
        state.update(optimizer=optimizer.state_dict(), scaler={}, loader=loader.state_dict())
        state.update(step=checkpoint_step(path) or 3, rng={"torch": torch.get_rng_state()}, args={})
    state.update(entries)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)
    return str(path)


def snapshot(root):
    """{relative path: sha256, "folder" or "link to <target>"} of everything under root."""
    found = {}
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                found[os.path.relpath(path, root)] = "link to " + os.readlink(path)
            elif name in folders:
                found[os.path.relpath(path, root)] = "folder"
            else:
                with open(path, "rb") as f:
                    found[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return found


@pytest.fixture(scope="session")
def random_shards(tmp_path_factory):
    """A folder with a val shard of 16,384 random tokens and a train shard of 32,768. Shared: treat
    it as read-only."""
    return write_random_shards(tmp_path_factory.mktemp("random_shards"), 16384, (32768,))


@pytest.fixture(scope="session")
def text_shards(tmp_path_factory):
    """A small real-text corpus (this repository's own source, tokenized): a val shard of 2,048
    tokens and a train shard of the rest. Shared: treat it as read-only."""
    from machinery.tokenizer import EOT_TOKEN, gpt2_tokenizer

    text = open(os.path.join(REPO, "train_gpt2.py")).read()
    tokens = np.array([EOT_TOKEN, *gpt2_tokenizer().encode_ordinary(text)], dtype=np.uint16)
    data_dir = tmp_path_factory.mktemp("text_shards")
    np.save(data_dir / "text_val_000000.npy", tokens[:2048])
    np.save(data_dir / "text_train_000001.npy", tokens[2048:])
    return str(data_dir)


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """Give pytest its SIGINT/SIGTERM/SIGHUP handlers back after an in-process run: left behind,
    later tests' forked workers would inherit a stop request's handler and ignore SIGTERM."""
    handlers = {
        sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@contextlib.contextmanager
def file_size_limit(max_bytes):
    """Writes past max_bytes fail, as on a full disk (RLIMIT_FSIZE; SIGXFSZ ignored so the write
    just errs)."""
    old_limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, old_limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limits)
        signal.signal(signal.SIGXFSZ, old_handler)
