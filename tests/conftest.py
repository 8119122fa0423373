"""What the test files share: the repository on sys.path and its path, the tiny model's flags, two
tiny token corpora, a guard for signal handlers, and a stand-in for a full disk. The constants and
the stand-in are imported as `from conftest import REPO` (pytest puts tests/ on sys.path); the
corpora and the guard are fixtures."""

import contextlib
import os
import resource
import signal
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `import train_gpt2` works however pytest is started

# train_gpt2.py's flags for a 2-layer, 64-wide GPT that trains in seconds on a CPU. float32, so that
# every run does the same arithmetic and two runs can be compared bit for bit.
TINY_MODEL = [
    "--n_layer",
    "2",
    "--n_head",
    "4",
    "--n_embd",
    "64",
    "--block_size",
    "64",
    "--dtype",
    "float32",
]


@pytest.fixture(scope="session")
def random_shards(tmp_path_factory):
    """A directory with a val shard (16,384 tokens) and a train shard (32,768 tokens) of GPT-2 token
    ids drawn uniformly from a fixed seed, named as fineweb.py names its shards. Shared: treat it as
    read-only."""
    rng = np.random.default_rng(0)
    data_dir = tmp_path_factory.mktemp("random_shards")
    np.save(data_dir / "tiny_val_000000.npy", rng.integers(0, 50257, 16384, dtype=np.uint16))
    np.save(data_dir / "tiny_train_000001.npy", rng.integers(0, 50257, 32768, dtype=np.uint16))
    return str(data_dir)


@pytest.fixture(scope="session")
def text_shards(tmp_path_factory):
    """A small real-text corpus (this repository's own source, tokenized): a val shard of 2,048
    tokens and a train shard of the rest. Shared: treat it as read-only."""
    from machinery.tokenizer import (  # here, not at the top: REPO is on sys.path only from above
        EOT_TOKEN,
        gpt2_tokenizer,
    )

    enc = gpt2_tokenizer()
    text = open(os.path.join(REPO, "train_gpt2.py")).read()
    tokens = np.array([EOT_TOKEN] + enc.encode_ordinary(text), dtype=np.uint16)
    data_dir = tmp_path_factory.mktemp("text_shards")
    np.save(data_dir / "text_val_000000.npy", tokens[:2048])
    np.save(data_dir / "text_train_000001.npy", tokens[2048:])
    return str(data_dir)


@pytest.fixture
def keep_signal_handlers():
    """A training run in the test's own process installs SIGINT/SIGTERM handlers; give pytest its
    own back."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@contextlib.contextmanager
def file_size_limit(max_bytes):
    """Writes past max_bytes fail, as on a full disk (RLIMIT_FSIZE; SIGXFSZ ignored so the write
    just errs)."""
    old_limits, old_handler = (
        resource.getrlimit(resource.RLIMIT_FSIZE),
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN),
    )
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, old_limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limits)
        signal.signal(signal.SIGXFSZ, old_handler)
