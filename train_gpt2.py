"""GPT-2 (124M) from scratch: the model, the data, and the training run, in one file.

Read it top to bottom: the network, the tokenizer, the data loader, evaluation, the optimizer and its
schedule, checkpoints, sampling, and finally main(), which wires them into a training run on one
device or on many with torchrun. Importing this file does no work, so every piece can be used alone.
"""

import argparse
import collections
import contextlib
import functools
import glob
import hashlib
import inspect
import json
import math
import os
import re
import signal
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from http.client import HTTPException

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import (
    BELOW_ONE,
    EOT_TOKEN,
    GPT2_VOCAB_SIZE,
    NOT_NEGATIVE,
    POSITIVE,
    HelpFormatter,
    UserError,
    atomic_write,
    check_ranges,
    gpt2_tokenizer,
    output_lock,
    run_cli,
)

# -----------------------------------------------------------------------------
# The model. GPT-2 is a stack of identical pre-LayerNorm transformer blocks between a token+position
# embedding and a final LayerNorm; the output head shares its weight with the token embedding.
# Module names follow OpenAI's checkpoint (transformer.h.0.attn.c_attn, ...) so its weights map 1:1.


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context the position embedding covers
    vocab_size: int = 50257  # rows of the embedding table: 50257 tokens, or padded (50304 in training)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


# OpenAI's four released sizes; every other field is GPTConfig's default.
GPT2_SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # query, key, value of all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)  # back into the residual stream

    def forward(self, x, kv_cache=None, attn_mask=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size): each head attends on its own slice of the channels
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if kv_cache is None:
            # Causal unless the caller says who may see whom (attn_mask (B, 1, T, T), True = may see).
            # The causal case runs flash attention where available.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None)
        else:
            # Generation: a prompt is fed in one go into an empty cache (causal mask), then one token at
            # a time; a single new query may look at every cached position, so it needs no mask.
            assert kv_cache.length == 0 or T == 1, "after the prompt, feed one token at a time"
            k, v = kv_cache.append(k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, n_head, T, head_size) -> (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # the approximation OpenAI trained with
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm: normalise, transform, add back. The residual path stays a clean sum."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, attn_mask=None):
        x = x + self.attn(self.ln_1(x), kv_cache, attn_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in GPT-2
        # Padded vocabulary rows are never real tokens: the logits stop at the tokenizer's size, so
        # padded ids get no probability, are never sampled, and take no part in the loss.
        self.n_real_tokens = min(config.vocab_size, GPT2_VOCAB_SIZE)
        self.apply(self._init_weights)
        # Each block adds two projections to the residual stream; scaling their init by
        # 1/sqrt(2 * n_layer) keeps the stream's variance from growing with depth (GPT-2 paper).
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None):
        """idx, targets: (B, T) token ids. Returns logits (B, T, 50257) and the mean cross-entropy
        loss (None without targets)."""
        logits = self.logits(self.hidden_states(idx))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())  # (B, T, V) -> (B*T, V)
        return logits, loss

    def hidden_states(self, idx, kv_caches=None, positions=None, attn_mask=None):
        """(B, T) token ids -> (B, T, n_embd): the final LayerNorm's output, which logits() turns into
        next-token logits. Kept apart from them so that a caller that needs the logits of only a few
        positions (generate(), hellaswag.py) does not pay the big vocabulary matmul for every position.

        By default each row is one sequence: positions 0..T-1, causal attention. kv_caches (one KVCache
        per layer, for generate()) holds earlier positions of the rows, and idx continues after them.
        A row may instead hold several sequences that share a beginning, as hellaswag.py packs a context
        and its 4 endings: then positions (B, T) gives each token's place in its own sequence and
        attn_mask (B, 1, T, T) which tokens each token may see."""
        T = idx.size(1)
        if positions is None:
            start = kv_caches[0].length if kv_caches else 0
            assert start + T <= self.config.block_size, (
                f"sequence of {start + T} tokens, block_size is {self.config.block_size}"
            )
            positions = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)  # (B, T, C) + (T, C) or (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_caches[i] if kv_caches else None, attn_mask)
        return self.transformer.ln_f(x)

    def logits(self, hidden):
        """(..., n_embd) hidden states -> (..., 50257) next-token logits, through the tied output head."""
        return self.lm_head(hidden)[..., : self.n_real_tokens]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Continue each row of idx (B, T) by max_new_tokens tokens; returns (B, T + max_new_tokens).
        temperature=0 picks the most likely token; top_k keeps only the k most likely (GPT-2 used 50).
        The KV cache makes each step a forward pass over one position, not the whole sequence."""
        total = idx.size(1) + max_new_tokens
        if total > self.config.block_size:
            raise UserError(
                f"prompt ({idx.size(1)} tokens) + {max_new_tokens} new tokens exceeds the context window of "
                f"{self.config.block_size}: shorten the prompt or ask for fewer tokens"
            )
        kv_caches = [KVCache(total) for _ in range(self.config.n_layer)]
        hidden = self.hidden_states(idx, kv_caches=kv_caches)  # the whole prompt fills the caches in one pass
        for _ in range(max_new_tokens):
            logits = self.logits(hidden[:, -1]).float()  # (B, vocab): only the last position predicts the next token
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                candidates = None  # None: every token of the vocabulary
                if top_k is not None:  # draw among the k best only: also far cheaper than over 50257 tokens
                    logits, candidates = torch.topk(logits, min(top_k, logits.size(-1)))  # (B, k) each
                probs = F.softmax(logits, dim=-1)
                next_token = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
                if candidates is not None:
                    next_token = candidates.gather(-1, next_token)  # position among the k -> token id
            idx = torch.cat([idx, next_token], dim=1)
            if idx.size(1) < total:  # the last token needs no forward pass: nothing comes after it
                hidden = self.hidden_states(next_token, kv_caches=kv_caches)
        return idx

    @classmethod
    def from_pretrained(cls, name_or_path):
        """OpenAI's GPT-2 from a Hugging Face hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or from a
        local directory in Hugging Face format; read_gpt2_weights (below) explains the format."""
        config, state = read_gpt2_weights(name_or_path)
        model = cls(config)
        load_weights(model, state, source=name_or_path)
        return model


# Generation keeps each layer's keys and values, so that each new token costs a forward pass over one
# position instead of the whole sequence.
class KVCache:
    """One layer's keys and values of the positions seen so far, so that generating a token needs a
    forward pass over that token alone. Preallocated for max_len positions and filled left to right."""

    def __init__(self, max_len):
        self.max_len = max_len
        self.length = 0
        self.keys = self.values = None

    def append(self, k, v):
        """Store k, v of shape (B, n_head, T, head_size); return the keys and values of all positions."""
        if self.keys is None:  # allocated on first use, in the dtype autocast gives k and v
            B, n_head, _, head_size = k.shape
            self.keys = k.new_empty(B, n_head, self.max_len, head_size)
            self.values = v.new_empty(B, n_head, self.max_len, head_size)
        T = k.size(2)
        self.keys[:, :, self.length : self.length + T] = k
        self.values[:, :, self.length : self.length + T] = v
        self.length += T
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]


# -----------------------------------------------------------------------------
# OpenAI's weights, in Hugging Face's format. Read to check this model against the original (its logits
# equal GPT2LMHeadModel's) and to start from them; written by export_hf.py so that any Hugging Face tool
# can load what we train. The module names above follow OpenAI's checkpoint, so the weights map 1:1.

# OpenAI's checkpoint uses Conv1D layers, whose weights are stored (in, out), transposed from nn.Linear.
HF_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# GPTConfig's fields under the names Hugging Face's GPT2Config gives them.
HF_CONFIG_NAMES = {
    "block_size": "n_positions",
    "vocab_size": "vocab_size",
    "n_layer": "n_layer",
    "n_head": "n_head",
    "n_embd": "n_embd",
}


def read_gpt2_weights(name_or_path):
    """The GPTConfig and the state dict (in this model's layout) of OpenAI's GPT-2: a hub name, downloaded
    once and cached, or a local Hugging Face directory (config.json + model.safetensors or pytorch_model.bin)."""
    if os.path.isdir(name_or_path):
        directory = name_or_path
    elif name_or_path in GPT2_SIZES:
        directory = download_gpt2(name_or_path)
    else:
        raise UserError(
            f"'{name_or_path}' is neither a directory nor one of {', '.join(GPT2_SIZES)}: "
            "pass an OpenAI size name or a Hugging Face GPT-2 directory"
        )
    hf_config, hf_state = read_hf_checkpoint(directory)
    try:
        config = {field: hf_config[hf_name] for field, hf_name in HF_CONFIG_NAMES.items()}
    except KeyError as e:
        raise UserError(f"{directory}/config.json lacks {e}: it is not a complete GPT-2 config") from None
    check_config(config, f"{directory}/config.json")
    config = GPTConfig(**config)
    state = {k: (v.t() if k.endswith(HF_CONV1D_WEIGHTS) else v) for k, v in hf_state.items()}
    return config, state


def download_gpt2(name):
    """Fetch OpenAI's weights from the Hugging Face hub (cached after the first time); return the directory."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            repo_id=f"openai-community/{name}", allow_patterns=["config.json", "model.safetensors"]
        )
    except Exception as e:  # no network, hub down, no huggingface_hub: all end the same way for the user
        raise UserError(
            f"could not download '{name}' from the Hugging Face hub ({type(e).__name__}); on a machine with "
            f"network run `hf download openai-community/{name} config.json model.safetensors "
            f"--local-dir {name}`, copy that directory here and pass its path instead of '{name}'"
        ) from None


# The GPT2Config settings under which Hugging Face's GPT-2 is OpenAI's network (first value: the default).
OPENAI_GPT2_SETTINGS = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # both are the tanh approximation of GELU
    "layer_norm_epsilon": (1e-5,),
    "tie_word_embeddings": (True,),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
}


def read_hf_checkpoint(directory):
    """The config dict and the tensors of a Hugging Face GPT-2 directory, keyed as our GPT names them:
    with the 'transformer.' prefix (which some files omit), without the attention-mask buffers and the
    lm_head (tied to wte)."""
    config_path = os.path.join(directory, "config.json")
    safetensors_path = os.path.join(directory, "model.safetensors")
    bin_path = os.path.join(directory, "pytorch_model.bin")
    try:
        with open(config_path) as f:
            hf_config = json.load(f)
        if hf_config.get("model_type") != "gpt2":
            raise ValueError(f"model_type is {hf_config.get('model_type')!r}")
        if os.path.exists(safetensors_path):
            from safetensors.torch import load_file

            hf_state = load_file(safetensors_path)
        else:
            hf_state = torch.load(bin_path, map_location="cpu", weights_only=True)
    except Exception as e:  # the message's first line only: torch's for a pickle goes on for lines
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(
            f"{directory} is not a Hugging Face GPT-2 checkpoint ({type(e).__name__}: {reason}): it needs a "
            "config.json with model_type gpt2 and a model.safetensors, or a pytorch_model.bin of plain tensors "
            "(one that holds other Python objects is refused, since loading it could run code: convert it to "
            "safetensors)"
        ) from None
    # GPT2Config can also describe variants of the network (another activation, an untied output head,
    # other attention scaling); loading one into our GPT would silently give a different model.
    variant = {
        key: hf_config[key]
        for key, allowed in OPENAI_GPT2_SETTINGS.items()
        if hf_config.get(key, allowed[0]) not in allowed
    }
    if variant:
        raise UserError(
            f"{directory} is a GPT-2 variant that this model does not implement ({variant}); "
            "only OpenAI's architecture loads"
        )
    state = {}
    for key, tensor in hf_state.items():
        key = key.removeprefix("transformer.")
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
            continue  # causal-mask buffers, and the head that is tied to wte
        state["transformer." + key] = tensor
    return hf_config, state


def to_hf_checkpoint(model):
    """The tensors and config.json of `model` as a Hugging Face GPT2LMHeadModel (export_hf.py writes them):
    the reverse of read_gpt2_weights, with the vocabulary cut back to the tokenizer's 50257 tokens."""
    n_tokens = model.n_real_tokens  # the padded rows of the embedding are never real tokens: drop them
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # the same tensor as wte; transformers ties them again on load (tie_word_embeddings)
        tensor = tensor.detach().cpu()
        if name == "transformer.wte.weight":
            tensor = tensor[:n_tokens]
        if name.endswith(HF_CONV1D_WEIGHTS):
            tensor = tensor.t()
        tensors[name] = tensor.contiguous()
    config = dict(asdict(model.config), vocab_size=n_tokens)
    hf_config = {hf_name: config[field] for field, hf_name in HF_CONFIG_NAMES.items()}
    hf_config.update({name: allowed[0] for name, allowed in OPENAI_GPT2_SETTINGS.items()})
    hf_config.update(
        architectures=["GPT2LMHeadModel"],
        model_type="gpt2",
        n_ctx=config["block_size"],  # the older name of n_positions, still read by some converters
        # This project trains without dropout; transformers would otherwise default to OpenAI's 0.1.
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        bos_token_id=EOT_TOKEN,
        eos_token_id=EOT_TOKEN,
    )
    return tensors, hf_config


def load_weights(model, state, source):
    """Copy state into model, checking every name and shape first, so that a checkpoint of another
    configuration ends with one line that says which tensor does not fit."""
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # lm_head is wte
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
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(state[key])


# -----------------------------------------------------------------------------
# The data loader. The corpus is pre-tokenized into shards (fineweb.py): uint16 .npy files, or the .bin
# shards of llm.c / modded-nanogpt (a 256 x int32 header, then uint16 tokens). Shards are memory-mapped,
# so a 10B-token corpus costs no RAM. Each optimizer step consumes one global window of
# total_batch_size tokens (+1 for the last target); each micro-step of each rank reads its own B*T
# slice of it, so that the tokens of a step do not depend on how many processes share it.

BIN_MAGIC, BIN_VERSION, BIN_HEADER_INTS = 20240520, 1, 256


def load_shard(path):
    """Memory-map one shard's tokens as a 1-D uint16 array, or explain what is wrong with the file."""
    if path.endswith(".bin"):
        header = np.fromfile(path, dtype=np.int32, count=BIN_HEADER_INTS)
        if len(header) < BIN_HEADER_INTS or header[0] != BIN_MAGIC or header[1] != BIN_VERSION:
            found = f"magic {header[0]}, version {header[1]}" if len(header) >= 2 else "no header"
            raise UserError(
                f"{path}: bad header ({found}; expected magic {BIN_MAGIC}, version {BIN_VERSION}): "
                "not an llm.c token shard"
            )
        num_tokens = int(header[2])
        expected_bytes = 4 * BIN_HEADER_INTS + 2 * num_tokens
        if os.path.getsize(path) != expected_bytes:
            raise UserError(
                f"{path}: {os.path.getsize(path)} bytes, header promises {expected_bytes}: "
                "the file is truncated, download it again"
            )
        tokens = np.memmap(path, dtype=np.uint16, mode="r", offset=4 * BIN_HEADER_INTS, shape=(num_tokens,))
        return check_token_ids(path, tokens)
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
    return check_token_ids(path, tokens)


def check_token_ids(path, tokens):
    """Refuse a shard with ids the tokenizer never makes (a shard of another tokenizer, or uint16 data that
    is not tokens): past the embedding table they would crash a step deep into the run, and below it they
    would train rows that no text uses. Reading a shard once costs about as much as a few training steps."""
    largest = int(tokens.max()) if len(tokens) else 0
    if largest >= GPT2_VOCAB_SIZE:
        raise UserError(
            f"{path} holds token id {largest}, but GPT-2's tokenizer has {GPT2_VOCAB_SIZE} tokens: it is not "
            "a shard of GPT-2 tokens; remove it, or regenerate it with fineweb.py"
        )
    return tokens


# A shard's name as fineweb.py and llm.c write it, matched whole: PREFIX_SPLIT_INDEX.npy or .bin. Matched
# whole, the split is the word right before the index, so a prefix such as "x_train" cannot make a val
# shard (x_train_val_000000.npy) look like a train shard.
SHARD_NAME = re.compile(r"(.+)_(train|val)_(\d{6})\.(npy|bin)")


def find_shards(data_dir, split):
    """The paths of the split's shards in data_dir, in index order. Only files count: a folder named like
    a shard is not one. Two shards with one index (two corpora in one folder) are refused."""
    shards = {}
    for name in sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else []:
        match = SHARD_NAME.fullmatch(name)
        path = os.path.join(data_dir, name)
        if not (match and match.group(2) == split and os.path.isfile(path)):
            continue
        index = int(match.group(3))
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
    return [shards[index] for index in sorted(shards)]


class DataLoaderLite:
    """This rank's batches of B sequences of T tokens from the shards of one split, as a stream of sequences.

    A shard is cut into sequence windows: window k covers tokens [k*T, k*T+T+1), T inputs and, one token
    later, T targets (so neighbouring windows share one token); a shard's tail shorter than a window is
    never read. One epoch is a stream of these windows, and an optimizer step takes the next S =
    step_tokens/T of them, all ranks and all micro-steps together (by default one micro-step of all
    ranks): micro-step m of rank r reads the B sequences of block m * world_size + r of the step. So a
    step reads the same sequences however many processes share it (one process accumulating k
    micro-steps, or k processes) and whatever B is, and the state is one global position in the stream,
    which a run on any number of processes can resume.

    In order (shuffle=False, the lecture's loader), the stream is each shard's windows front to back, a
    shard after the other; a step never crosses a shard's end: when the next step does not fit, the next
    shard begins (so up to S-1 windows at each shard's end are skipped). Shuffled, each epoch reads the
    shards in a random order and each shard's windows in a random order, drawn from the seed and the epoch
    number alone (so the order never depends on the world size, B, or when the run was resumed); steps
    run across shard ends, and only the last sequences of the epoch that do not fill a step are left over
    (fewer than S, a different few each epoch). In both, no window is read twice in an epoch."""

    def __init__(self, data_dir, B, T, process_rank, num_processes, split, step_tokens=None, shuffle=False, seed=0):
        self.B, self.T = B, T
        self.process_rank, self.num_processes = process_rank, num_processes
        self.shuffle, self.seed = shuffle, seed
        self.window = step_tokens or B * T * num_processes  # tokens of all ranks in one optimizer step
        self.step_sequences = self.window // T  # S; check_args makes the step a whole number of micro-steps
        self.micro_steps = self.window // (B * T * num_processes)
        paths = find_shards(data_dir, split)
        self.shards = [load_shard(p) for p in paths]
        self.data = data_fingerprint(paths, self.shards)
        self.windows = np.array([(len(tokens) - 1) // T for tokens in self.shards])  # sequence windows per shard
        # The windows each shard puts in the stream: all of them shuffled; in order, whole steps only (so a
        # shard shorter than a step, such as the last one fineweb.py writes, is skipped: it is counted unread).
        self.used = self.windows if shuffle else self.windows // self.step_sequences * self.step_sequences
        self.epoch_sequences = int(self.used.sum()) // self.step_sequences * self.step_sequences
        if self.epoch_sequences == 0:
            longest = max(range(len(paths)), key=lambda i: len(self.shards[i]))
            raise UserError(
                f"{paths[longest]} has {len(self.shards[longest])} tokens, fewer than one batch of all ranks' "
                f"sequences + 1 = {self.window + 1}, and the {split} split holds no step: lower "
                "--total_batch_size (or --batch_size/--seq_len) or add data"
            )
        self.reset()

    def reset(self):
        self.epoch, self.sequence, self.micro_step = 0, 0, 0  # sequence: the step's first, in the epoch's stream

    def steps_per_epoch(self):
        return self.epoch_sequences // self.step_sequences

    def unread_per_epoch(self):
        """(tokens at shard ends shorter than a window, windows left out of each epoch's steps)."""
        tails = sum(len(tokens) - 1 - n * self.T for tokens, n in zip(self.shards, self.windows))
        return int(tails), int(self.windows.sum()) - self.epoch_sequences

    def next_batch(self):
        """x, y of shape (B, T): this rank's inputs and, one token later, their targets."""
        block = self.micro_step * self.num_processes + self.process_rank
        first = self.sequence + block * self.B
        rows = [self.shards[shard][k * self.T : k * self.T + self.T + 1] for shard, k in self.windows_at(first)]
        buf = torch.from_numpy(np.stack(rows).astype(np.int64))  # read from the memory map, row by row
        x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
        self.micro_step += 1
        if self.micro_step == self.micro_steps:  # the step's sequences are used up: every rank moves on together
            self.micro_step = 0
            self.sequence += self.step_sequences
            if self.sequence == self.epoch_sequences:  # the epoch is over: the next one starts (reshuffled)
                self.epoch, self.sequence = self.epoch + 1, 0
        return x, y

    def windows_at(self, first):
        """(shard, window) of the B sequences of this epoch's stream from sequence `first` on."""
        shards = len(self.shards)
        order = (
            np.random.default_rng([self.seed, self.epoch]).permutation(shards) if self.shuffle else np.arange(shards)
        )
        starts = np.cumsum(self.used[order]) - self.used[order]  # each shard's first sequence in the stream
        for sequence in range(first, first + self.B):
            position = np.searchsorted(starts, sequence, side="right") - 1
            shard, k = int(order[position]), sequence - int(starts[position])
            if self.shuffle:
                k = int(window_order(self.seed, self.epoch, shard, int(self.windows[shard]))[k])
            yield shard, k

    # Saved between steps, the state is where the next step starts: the same on every rank. The step size,
    # the order and the data it points into are saved with it, so that a resume can tell when they changed.
    def state_dict(self):
        return {
            "epoch": self.epoch,
            "sequence": self.sequence,
            "seq_len": self.T,
            "step_tokens": self.window,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "data": self.data,
        }

    def load_state_dict(self, state):
        """Continue where `state` ends; the data, --total_batch_size, --seq_len and the order must be what
        it was saved with (checkpoints from before these were recorded are taken as they are)."""
        if (state.get("step_tokens", self.window), state.get("seq_len", self.T)) != (self.window, self.T):
            raise UserError(
                f"the checkpoint read steps of {state.get('step_tokens', self.window)} tokens in sequences of "
                f"{state.get('seq_len', self.T)}, this run {self.window} in {self.T}: resume with its "
                "--total_batch_size and --seq_len (the number of processes and --batch_size may change)"
            )
        check_same_data(state.get("data", self.data), self.data)
        shuffled, seed = state.get("shuffle", False), state.get("seed")  # older checkpoints read in order
        if shuffled != self.shuffle or (shuffled and seed != self.seed):
            order = f"--shuffle --seed {seed}" if shuffled else "--no-shuffle"
            raise UserError(f"the checkpoint read the train shards in another order: resume with {order}")
        self.epoch, self.micro_step = state["epoch"], 0
        if "sequence" in state:
            self.sequence = state["sequence"]
        else:  # a checkpoint from before the stream of sequences: a shard and a token position in it
            self.sequence = int(self.used[: state["shard"]].sum()) + state["position"] // self.T


@functools.lru_cache(maxsize=4)
def window_order(seed, epoch, shard, windows):
    """The order in which epoch `epoch` reads the `windows` windows of shard number `shard`: a permutation
    from a generator of its own, so that a rank computes only the orders of the shards it reads."""
    return np.random.default_rng([seed, epoch, shard]).permutation(windows)


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


# -----------------------------------------------------------------------------
# Evaluation: the mean loss on a fixed stretch of the validation split, the same tokens every time so
# that the curve is comparable across steps (and with OpenAI's GPT-2, 3.2924 on FineWeb-edu shard 0).


@torch.no_grad()
def validation_loss(model, val_loader, steps, autocast, procs, stop=None):
    """Mean loss over `steps` batches from the start of the validation split, averaged over ranks.
    A stop request (StopRequest, below) ends the loop between batches; the result is then meaningless,
    but every rank still joins the final reduction, so that none waits for another."""
    device = next(model.parameters()).device
    model.eval()
    val_loader.reset()
    loss_sum = torch.zeros((), device=device)
    for _ in range(steps):
        if stop is not None and stop.requested:
            break
        x, y = val_loader.next_batch()
        with autocast:
            _, loss = model(x.to(device), y.to(device))
        loss_sum += loss.detach()
    model.train()
    return procs.mean(loss_sum).item() / steps


# -----------------------------------------------------------------------------
# HellaSwag, the multiple-choice benchmark that the lecture runs during training (hellaswag.py runs it
# alone and explains the protocol). The data: hellaswag_val.jsonl from the authors' repository, one
# JSON object per line. We use three fields: "ctx" (the context), "endings" (4 strings) and "label"
# (the index of the right ending).
# It is downloaded once into a cache directory; offline, pass a copy with --data.

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_FILE = "hellaswag_val.jsonl"


def default_cache_dir():
    """$XDG_CACHE_HOME/gpt2-repro/hellaswag, or ~/.cache/gpt2-repro/hellaswag (the usual Linux place)."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "gpt2-repro", "hellaswag")


def hellaswag_path(data=None, cache_dir=None, download=True, url=HELLASWAG_URL):
    """Where hellaswag_val.jsonl is: `data` if given (it must exist), else the copy in cache_dir
    (default_cache_dir() when None), downloaded from `url` first if it is not there. With
    download=False a missing cached copy gives None, so a caller can skip the eval without network."""
    if data is not None:
        if not os.path.isfile(data):
            raise UserError(f"{data}: no such file; pass the path of {HELLASWAG_FILE} (from {HELLASWAG_URL})")
        return data
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, HELLASWAG_FILE)
    if os.path.isfile(path):
        return path
    if not download:
        return None
    download_file(url, path)
    return path


def download_file(url, path):
    """Fetch url into path atomically, so that an interrupted download never leaves a torn file where
    the next run would trust it."""
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot write to {directory} ({e}): set XDG_CACHE_HOME to a writable directory, or pass --data PATH"
        ) from None
    with atomic_write(path) as f:
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                size = response.headers.get("Content-Length")  # bytes to come, when the server says
                with tqdm(
                    total=int(size) if size else None,
                    unit="B",
                    unit_scale=True,
                    desc=f"downloading {os.path.basename(path)}",
                ) as bar:
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
        except (OSError, HTTPException) as e:  # no network, timeout, HTTP error, connection cut short
            raise UserError(
                f"could not download {url} ({e}); on a machine with network, download that file and pass "
                f"--data PATH (or put it at {path})"
            ) from None


def load_examples(path, limit=None):
    """The examples of a HellaSwag jsonl file (the first `limit` of them), each a dict with at least
    ctx (str), endings (4 str) and label (int 0..3). A bad line ends with an error naming it."""
    examples = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if limit is not None and len(examples) == limit:
                    break
                if line.strip():  # blank lines (a trailing newline or two) are not examples
                    examples.append(parse_example(line, f"{path}, line {line_number}"))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}): pass the path of {HELLASWAG_FILE}") from None
    if not examples:
        raise UserError(f"{path} holds no examples: pass the path of {HELLASWAG_FILE}")
    return examples


def parse_example(line, where):
    """One line of the jsonl file as an example dict; `where` (file and line) goes into any error."""
    try:
        example = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg}); is this {HELLASWAG_FILE}?") from None
    if not isinstance(example, dict):
        raise UserError(f"{where}: expected a JSON object with ctx, endings and label")
    ctx, endings, label = example.get("ctx"), example.get("endings"), example.get("label")
    if not (isinstance(ctx, str) and ctx):  # the context's last token predicts each ending's first
        raise UserError(f"{where}: 'ctx' must be a non-empty string (the context)")
    if not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)):
        raise UserError(f"{where}: 'endings' must be a list of 4 strings")
    if not (isinstance(label, int) and not isinstance(label, bool) and 0 <= label <= 3):
        raise UserError(f"{where}: 'label' must be an integer from 0 to 3 (the right ending), got {label!r}")
    return example


# -----------------------------------------------------------------------------
# Rendering. An example is scored as 4 sequences, the context followed by each ending (with the leading
# space that joins it to the context); only the ending's tokens are scored. The 4 sequences share their
# beginning, so we pack them into one row: the context once, then the 4 endings, each placed (by its
# position numbers) right after the context and seeing only the context and itself. A context of ~40
# tokens and endings of ~25 make a row of ~140 tokens instead of 4 rows of ~75, padded.


def render_example(example, enc, max_len=None):
    """The tokens of an example's context and of its 4 endings: (context, [4 endings]). Context plus
    ending must fit in max_len (the model's block_size): an ending keeps at most max_len - 1 tokens, and
    a context too long for the longest ending loses tokens from its start (the same ones for all 4)."""
    context = enc.encode_ordinary(example["ctx"])
    endings = [enc.encode_ordinary(" " + ending) for ending in example["endings"]]
    if max_len is not None:
        endings = [ending[: max_len - 1] for ending in endings]
        context = context[-(max_len - max(len(ending) for ending in endings)) :]
    return context, endings


# One example as a row: its tokens, each token's position in its own sequence, and its segment (0 for
# the context, k + 1 for ending k); then, for every ending token in order, the row index whose output
# predicts it, the token itself, and which ending (0..3) it belongs to.
PackedExample = collections.namedtuple("PackedExample", "tokens positions segments predict_at targets ending_of")


def pack_example(context, endings):
    """The row of an example (see PackedExample). Ending token j is predicted by the output just before
    it: the context's last token for j = 0, the ending's token j - 1 after that. So an ending's last
    token predicts nothing and is left out of the row: it is only a target."""
    tokens, positions, segments = list(context), list(range(len(context))), [0] * len(context)
    predict_at, targets, ending_of = [], [], []
    for k, ending in enumerate(endings):
        start = len(tokens)  # where this ending's tokens go in the row (it has at least one: its space)
        predict_at += [len(context) - 1] + list(range(start, start + len(ending) - 1))
        targets += ending
        ending_of += [k] * len(ending)
        tokens += ending[:-1]
        positions += range(len(context), len(context) + len(ending) - 1)
        segments += [k + 1] * (len(ending) - 1)
    return PackedExample(tokens, positions, segments, predict_at, targets, ending_of)


def attention_mask(segments, positions):
    """Who may see whom in packed rows: segments, positions (B, L) -> (B, 1, L, L), True where token q (dim 2)
    may see token s (dim 3): s is in the context or in q's own ending, and not at a later position. Padding
    (segment -1) is seen by no real token."""
    seg_q, seg_s = segments[:, :, None], segments[:, None, :]
    visible = ((seg_s == 0) | (seg_s == seg_q)) & (positions[:, None, :] <= positions[:, :, None])
    return visible.unsqueeze(1)  # one mask for all heads


# -----------------------------------------------------------------------------
# Scoring. The outputs at the predicting positions go through the output head, and the cross-entropy
# against the ending's tokens is each token's loss. Only those positions become logits: the
# (positions, 50257) logits are the largest tensor here, and the rest of the row needs none.


def ending_losses(model, packed, device):
    """One forward pass over packed examples (one right-padded row each) on `device`: the summed loss of
    each ending's tokens (E, 4) and how many there are (E, 4). The caller sets no_grad and any autocast."""
    length = max(len(example.tokens) for example in packed)
    tokens = torch.zeros((len(packed), length), dtype=torch.long)
    positions = torch.zeros((len(packed), length), dtype=torch.long)
    segments = torch.full((len(packed), length), -1, dtype=torch.long)  # -1: padding
    for i, example in enumerate(packed):
        n = len(example.tokens)
        tokens[i, :n] = torch.tensor(example.tokens)
        positions[i, :n] = torch.tensor(example.positions)
        segments[i, :n] = torch.tensor(example.segments)
    tokens, positions, segments = tokens.to(device), positions.to(device), segments.to(device)
    hidden = model.hidden_states(
        tokens, positions=positions, attn_mask=attention_mask(segments, positions)
    )  # (E, L, n_embd)

    def flat(field):  # one field of every example, laid end to end, as a tensor on the device
        return torch.tensor([x for example in packed for x in getattr(example, field)], device=device)

    rows = torch.tensor([i for i, example in enumerate(packed) for _ in example.targets], device=device)
    losses = F.cross_entropy(model.logits(hidden[rows, flat("predict_at")]).float(), flat("targets"), reduction="none")
    ending = 4 * rows + flat("ending_of")  # the (example, ending) each loss belongs to, as one index
    sums = torch.zeros(4 * len(packed), device=device).index_add_(0, ending, losses)
    counts = torch.bincount(ending, minlength=4 * len(packed))
    return sums.view(-1, 4), counts.view(-1, 4)


def score_examples(model, examples, enc, device, batch_size, autocast_dtype=torch.float32, progress=False, stop=None):
    """Summed losses (E, 4) and scored token counts (E, 4) of every ending of every example, batch_size
    examples (one row each) per forward pass. The rows are sorted by length first so that a batch holds
    rows of about the same length and little compute goes into padding; the results are put back in
    the examples' order. autocast_dtype float32 (no autocast) is exact; bfloat16 is faster where
    matmuls have bf16 units, but its rounding moves the mean losses by about 0.001 to 0.01, enough to
    flip a few near-tied answers. A stop request (as in validation_loss) ends the scoring between batches."""
    device_type = torch.device(device).type
    packed = [pack_example(*render_example(example, enc, max_len=model.config.block_size)) for example in examples]
    order = sorted(
        range(len(packed)), key=lambda i: len(packed[i].tokens), reverse=True
    )  # longest first: OOM shows at once
    sum_losses = torch.zeros(len(packed), 4)
    n_tokens = torch.zeros(len(packed), 4, dtype=torch.long)
    autocast = torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32)
    with torch.no_grad(), autocast:
        with tqdm(total=len(packed), unit="example", desc="hellaswag", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                if stop is not None and stop.requested:
                    break
                batch = order[start : start + batch_size]
                batch_losses, batch_counts = ending_losses(model, [packed[i] for i in batch], device)
                sum_losses[batch] = batch_losses.cpu()
                n_tokens[batch] = batch_counts.cpu()
                bar.update(len(batch))
    return sum_losses, n_tokens


def predictions(sum_losses, n_tokens):
    """The chosen ending of each example by summed loss (acc) and by mean loss per token (acc_norm)."""
    return sum_losses.argmin(dim=-1), (sum_losses / n_tokens).argmin(dim=-1)


def evaluate_hellaswag(
    model, examples, enc, device, batch_size, rank=0, world_size=1, autocast_dtype=torch.float32, progress=False,
    stop=None,
):  # fmt: skip
    """HellaSwag counts over all `examples`: dict(n, correct, correct_norm) (correct for acc, correct_norm
    for acc_norm). With DDP every rank calls this with the same examples and scores its share (rank r
    takes examples r, r + world_size, ...); the counts are then summed with all_reduce, so every rank
    gets the totals (torch.distributed must be initialised when world_size > 1). `model` is a GPT (a
    torch.compile'd one runs its uncompiled methods here), not the DDP wrapper: evaluation needs no
    gradient sync. autocast_dtype, stop: as in score_examples()."""
    my_examples = examples[rank::world_size]
    if my_examples:
        sum_losses, n_tokens = score_examples(
            model, my_examples, enc, device, batch_size, autocast_dtype, progress, stop
        )
        pred, pred_norm = predictions(sum_losses, n_tokens)
        labels = torch.tensor([example["label"] for example in my_examples])
        counts = [len(my_examples), (pred == labels).sum().item(), (pred_norm == labels).sum().item()]
    else:
        counts = [0, 0, 0]  # more ranks than examples: this rank still joins the all_reduce
    if world_size > 1:
        counts = torch.tensor(counts, dtype=torch.long, device=device)
        torch.distributed.all_reduce(counts)
        counts = counts.tolist()
    n, correct, correct_norm = counts
    return dict(n=n, correct=correct, correct_norm=correct_norm)


def load_hellaswag_eval(args, enc, procs, download=True):
    """A function model -> HellaSwag acc_norm, each rank scoring its share of the examples, or None when it
    is switched off or its data cannot be had (a one-line notice says why). download=False uses the cached
    copy only, for --eval_only, which writes no file."""
    if not args.hellaswag:
        return None
    if args.hellaswag_data:
        path = hellaswag_path(args.hellaswag_data)  # a path the user gave must exist
    else:
        if procs.master and download:  # one download into the cache, which the other ranks then read
            with contextlib.suppress(UserError):
                hellaswag_path()
        if procs.ddp:
            torch.distributed.barrier()
        path = hellaswag_path(download=False)
        if path is None:
            procs.print(
                f"HellaSwag skipped: its data is not cached{' and could not be downloaded' if download else ''}; "
                "pass --hellaswag_data PATH to a local hellaswag_val.jsonl, or --no-hellaswag"
            )
            return None
    examples = load_examples(path)

    def hellaswag_acc_norm(model, autocast_dtype, stop=None):
        device = next(model.parameters()).device
        # One row per example, shorter than a training row: --batch_size of them fit where training does.
        counts = evaluate_hellaswag(
            model, examples, enc, device, args.batch_size, procs.rank, procs.world_size, autocast_dtype, stop=stop
        )
        return counts["correct_norm"] / counts["n"]

    return hellaswag_acc_norm


# -----------------------------------------------------------------------------
# Optimisation: AdamW with decoupled weight decay on the matrices only (decaying biases and LayerNorm
# gains just fights the normalisation), a linear warmup, then cosine decay to min_lr.


def configure_optimizer(model, weight_decay, lr, betas, eps, device_type, fused=None):
    """AdamW over model's parameters. fused: the fused CUDA kernel, which updates every parameter in one
    launch instead of several per tensor; None takes it wherever it exists (CUDA)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # matmul weights and embeddings
    no_decay = [p for p in params if p.dim() < 2]  # biases and LayerNorm parameters
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if fused is None:
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def get_lr(step, max_lr, min_lr, warmup_steps, max_steps):
    """Learning rate for 0-based `step`: linear warmup to max_lr, cosine decay to min_lr at max_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    decay_ratio = (step - warmup_steps) / (max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * decay_ratio)) * (max_lr - min_lr)


# -----------------------------------------------------------------------------
# Checkpoints hold everything a run needs to continue at exactly the same token with exactly the same
# numbers: weights, optimizer moments, step, data position, RNG states, and the config as a plain dict.
# They are written to a temporary file and renamed, so a crash mid-write leaves the previous one intact.


def save_checkpoint(path, state):
    with atomic_write(path) as f:
        torch.save(state, f)


# The names save_run writes, and the only files that count as checkpoints: not a half-written
# model_00042.pt.tmp, nor a copy a user made, such as model_00002_backup.pt.
CHECKPOINT_NAME = re.compile(r"model_(\d{5,})\.pt")


def latest_checkpoint(log_dir):
    """The checkpoint of the highest step in log_dir, or None."""
    steps = {}
    for path in glob.glob(os.path.join(log_dir, "model_*.pt")):
        if match := CHECKPOINT_NAME.fullmatch(os.path.basename(path)):
            steps[int(match.group(1))] = path
    return steps[max(steps)] if steps else None


def read_weights(init):
    """The GPTConfig and the state dict of `init`: an OpenAI size name, a Hugging Face directory, or a
    checkpoint of this project (log/model_XXXXX.pt)."""
    if init in GPT2_SIZES or os.path.isdir(init):
        return read_gpt2_weights(init)
    if os.path.isfile(init):
        checkpoint = load_checkpoint(init)
        return GPTConfig(**checkpoint["config"]), checkpoint["model"]
    raise UserError(f"--init {init!r} is not a file, a directory, or one of {', '.join(GPT2_SIZES)}")


def load_model(init, device="cpu"):
    """A GPT holding the weights of `init` (as read_weights reads them), ready for inference on `device`."""
    config, state = read_weights(init)
    model = GPT(config)
    load_weights(model, state, source=init)
    return model.to(device).eval()


def load_checkpoint(path):
    """A checkpoint of this project, read with weights_only=True so that a downloaded file cannot run code."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"{path} is not a checkpoint of this project ({type(e).__name__}): "
            "it may be truncated or another kind of file"
        ) from None
    if not isinstance(checkpoint, dict) or not {"model", "config"} <= checkpoint.keys():
        raise UserError(f"{path} is not a checkpoint of this project: it lacks the 'model' and 'config' entries")
    check_config(checkpoint["config"], path)
    return checkpoint


def check_config(config, source):
    """Refuse a model config that GPT cannot be built from, before building it: one from another program
    (nanoGPT's checkpoints also hold a 'config', of training settings), or one with impossible sizes."""
    fields = set(GPTConfig.__dataclass_fields__)
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


# -----------------------------------------------------------------------------
# Sampling: continuations of a prompt, for the samples printed during training and for sample.py.


def sample_texts(model, enc, prompt, *, num_samples, max_new_tokens, temperature=1.0, top_k=50, seed=42, autocast):
    """The prompt and its continuations, one string per sample. An empty prompt starts a new document."""
    device = next(model.parameters()).device
    prompt_ids = enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [EOT_TOKEN]
    idx = torch.tensor([prompt_ids] * num_samples, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)  # on the model's device: same samples every call
    with autocast:
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    return [enc.decode(row.tolist()) for row in out]


# -----------------------------------------------------------------------------
# Throughput: model FLOPs utilisation (MFU) is the fraction of the device's peak that the model's own
# arithmetic uses: 6 FLOPs per parameter per token (forward + backward), plus attention's score matmuls.

PEAK_BF16_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}  # dense bf16, SXM


def flops_per_token(config, seq_len, num_params):
    non_embedding = num_params - config.block_size * config.n_embd  # the position table does no matmul
    return 6 * non_embedding + 12 * config.n_layer * config.n_embd * seq_len


def device_peak_flops(device):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for gpu, flops in PEAK_BF16_FLOPS.items():
            if gpu in name:
                return flops
    return None


# -----------------------------------------------------------------------------
# Devices and number formats. Autocast runs the matmuls in a 16-bit format where the hardware has fast
# units for it and keeps fp32 where precision matters (softmax, norms, the loss); the weights, their
# gradients and the optimizer stay fp32.


def pick_device(requested):
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(
                f"--device {requested}, but PyTorch sees no CUDA GPU: install a CUDA build of torch or use --device cpu"
            )
        if requested == "mps" and not torch.backends.mps.is_available():
            raise UserError("--device mps, but MPS is not available: use --device cpu")
        try:
            return torch.device(requested)
        except RuntimeError:
            raise UserError(
                f"--device {requested!r} is not a device PyTorch knows: use cuda, cuda:N, mps or cpu"
            ) from None
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_native_bf16(cpuinfo=None):
    """Whether the CPU computes in bf16 in hardware: x86 AMX or AVX512-BF16, Arm's BF16 extension. Without
    it PyTorch emulates bf16, and a training step runs many times slower than in fp32 (a 4-layer model
    here: 4.4 s in fp32, 245 s in bf16). `cpuinfo`: the text of /proc/cpuinfo (read when None)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:  # not Linux: no way to tell, so no bf16
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):  # x86, Arm
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})


def auto_dtype(device_type, native_bf16):
    """The autocast dtype `--dtype auto` picks, and why, as a pure function of the device's type and whether
    it does bf16 in hardware. bf16 keeps fp32's range, so it trains without loss scaling; fp16 needs a
    loss scaler and serves GPUs without bf16; emulated bf16 is slower than fp32, so such CPUs stay in fp32."""
    if device_type == "cuda":
        if native_bf16:
            return torch.bfloat16, "the GPU has bf16 tensor cores"
        return torch.float16, "the GPU lacks bf16: fp16 with loss scaling"
    if device_type == "cpu":
        if native_bf16:
            return torch.bfloat16, "the CPU has native bf16 (AMX or AVX512-BF16)"
        return torch.float32, "the CPU has no native bf16 (no AMX, no AVX512-BF16): emulated bf16 is slower"
    return torch.float32, f"{device_type}: autocast to a 16-bit type is not set up for it here"


def pick_autocast_dtype(requested, device):
    """(dtype, reason): `--dtype` as given, or auto_dtype() for this device."""
    if requested != "auto":
        return getattr(torch, requested), "as --dtype asks"
    if device.type == "cuda":
        return auto_dtype("cuda", torch.cuda.is_bf16_supported())
    return auto_dtype(device.type, device.type == "cpu" and cpu_has_native_bf16())


def autocast_context(device, dtype):
    """The mixed-precision context, built once and entered as `with autocast:` (no-op for fp32)."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


def out_of_memory(device, advice):
    """The UserError for a device that ran out of memory: the memory figures, and what to lower."""
    figures = ""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        peak = torch.cuda.max_memory_allocated(device)
        figures = f" ({peak / 2**30:.1f} GiB at the peak of {total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free now)"
    return UserError(f"out of memory on {device}{figures}: {advice}")


def use_fast_math(device):
    """Speed-ups that change no result a run depends on."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls that autocast leaves
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # tiny floats as zero: x86 handles them slowly (17% per step here)


# -----------------------------------------------------------------------------
# Processes. torchrun starts one process per GPU (or per CPU worker with gloo) and sets RANK and
# WORLD_SIZE: each process reads its own slice of every batch, and DDP averages their gradients so that
# they stay one model. Without torchrun there is one process.


@dataclass(frozen=True)
class Processes:
    ddp: bool = False
    rank: int = 0
    local_rank: int = 0  # the GPU of this process on its machine
    world_size: int = 1

    @property
    def master(self):
        return self.rank == 0  # only rank 0 prints, logs and saves

    def print(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs)

    def any(self, flag, device):
        """Whether `flag` is true on any rank; every rank gets the same answer."""
        if not self.ddp:
            return flag
        flags = torch.tensor(float(flag), device=device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.SUM)
        return flags.item() > 0

    def mean(self, tensor):
        """The mean of `tensor` over the ranks (summed, then divided: gloo has no average)."""
        if self.ddp:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
            tensor /= self.world_size
        return tensor


def torchrun_processes():
    env = os.environ
    ddp = "RANK" in env and "WORLD_SIZE" in env
    return Processes(ddp, int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))


# -----------------------------------------------------------------------------
# The training step: one optimizer step over total_batch_size tokens, read as grad_accum_steps
# micro-batches of B x T per process. Gradients add up over the micro-steps (each loss divided by their
# number, so the sum is the gradient of the mean), are clipped to a global norm, and AdamW applies them.


def train_step(step_model, optimizer, scaler, loader, grad_accum_steps, lr, grad_clip, autocast):
    """One optimizer step; returns this process's mean loss and the gradient norm before clipping (tensors).
    step_model: the GPT as training runs it (compiled and/or in DDP); scaler: enabled for fp16 only."""
    device = next(step_model.parameters()).device
    ddp = isinstance(step_model, nn.parallel.DistributedDataParallel)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(grad_accum_steps):
        x, y = loader.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # DDP averages gradients across ranks on the last micro-step only; before it, they add up locally.
        last_micro_step = micro_step == grad_accum_steps - 1
        with contextlib.nullcontext() if last_micro_step or not ddp else step_model.no_sync():
            with autocast:
                _, loss = step_model(x, y)
            loss = loss / grad_accum_steps  # backward of the mean over micro-steps, not their sum
            loss_sum += loss.detach()
            scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(step_model.parameters(), grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    scaler.step(optimizer)  # with fp16, skipped when the gradients overflowed
    scaler.update()
    return loss_sum, norm


# -----------------------------------------------------------------------------
# The training run. main() parses the flags, sets up one process or a torchrun group, and calls train():
# set up (or resume) the run, then the loop: step, report, evaluate now and then, save now and then.


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Train GPT-2 (124M by default) on pre-tokenized shards, from scratch or from --init weights; "
        "or only evaluate weights (--eval_only).",
        formatter_class=HelpFormatter,
    )
    add_data_flags(p.add_argument_group("data"))
    add_model_flags(p.add_argument_group("model"))
    add_optimisation_flags(p.add_argument_group("optimisation"))
    add_evaluation_flags(p.add_argument_group("evaluation, logging and checkpoints"))
    add_hardware_flags(p.add_argument_group("hardware"))
    args = p.parse_args(argv)
    if args.min_lr is None:
        args.min_lr = 0.1 * args.max_lr
    return args


def add_data_flags(g):
    """Where the tokens come from and how many make one step."""
    g.add_argument("--data_dir", default="edu_fineweb10B", help="shards written by fineweb.py (or llm.c .bin shards)")
    g.add_argument(
        "--total_batch_size", type=int, default=524288, help="tokens per optimizer step: 2**19, ~0.5M as in GPT-3 Small"
    )
    g.add_argument(
        "--batch_size", type=int, default=64, help="sequences per micro-step per GPU (B); lower it if memory runs out"
    )
    g.add_argument("--seq_len", type=int, default=1024, help="tokens per sequence (T): GPT-2's context")
    g.add_argument(
        "--shuffle",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="read the train shards, and each shard's sequences, in a new order each epoch drawn from --seed: "
        "batches that mix the corpus; --no-shuffle reads them front to back, as the lecture does",
    )


def add_model_flags(g):
    """The network's shape, or the weights it starts from."""
    g.add_argument(
        "--init",
        default=None,
        help="start from these weights (gpt2, gpt2-medium, gpt2-large, gpt2-xl, a Hugging Face GPT-2 directory, "
        "or log/model_XXXXX.pt) with a fresh optimizer at step 0: fine-tuning",
    )
    g.add_argument(
        "--n_layer", type=int, default=None, help="transformer blocks (default: GPT-2 124M's 12, or the weights')"
    )
    g.add_argument(
        "--n_head", type=int, default=None, help="attention heads (default: GPT-2 124M's 12, or the weights')"
    )
    g.add_argument("--n_embd", type=int, default=None, help="channels (default: GPT-2 124M's 768, or the weights')")
    g.add_argument(
        "--block_size", type=int, default=None, help="longest context the model takes (default: 1024, or the weights')"
    )
    g.add_argument(
        "--vocab_size", type=int, default=50304, help="50257 tokens padded to a multiple of 128 for faster matmuls"
    )


def add_optimisation_flags(g):
    """AdamW and its schedule: GPT-3 Small's recipe, as the lecture uses it."""
    g.add_argument("--max_lr", type=float, default=6e-4, help="peak learning rate (GPT-3 Small)")
    g.add_argument(
        "--min_lr", type=float, default=None, help="final learning rate (default: 10%% of --max_lr, as GPT-3)"
    )
    g.add_argument("--warmup_steps", type=int, default=715, help="linear warmup: 375M tokens, as GPT-3")
    g.add_argument(
        "--max_steps", type=int, default=19073, help="10B tokens / 524288 tokens per step: one epoch of FineWeb-edu 10B"
    )
    g.add_argument("--weight_decay", type=float, default=0.1, help="decoupled AdamW decay on matrices (GPT-3)")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW first-moment decay (GPT-3)")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW second-moment decay (GPT-3)")
    g.add_argument("--eps", type=float, default=1e-8, help="AdamW epsilon (GPT-3)")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm (GPT-3)")
    g.add_argument("--seed", type=int, default=1337, help="seed of the weight init and of the data order")


def add_evaluation_flags(g):
    """What the run measures, prints and keeps."""
    g.add_argument("--eval_every", type=int, default=250, help="steps between val loss / HellaSwag / samples")
    g.add_argument(
        "--val_tokens", type=int, default=10485760, help="tokens of the val split per evaluation (20 steps of 2**19)"
    )
    g.add_argument(
        "--hellaswag", action=argparse.BooleanOptionalAction, default=True, help="HellaSwag acc_norm at each evaluation"
    )
    g.add_argument("--hellaswag_data", default=None, help="local hellaswag_val.jsonl (default: the cached download)")
    g.add_argument(
        "--sample_every_eval",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="print 4 samples at each evaluation",
    )
    g.add_argument(
        "--eval_only",
        action="store_true",
        help="evaluate the --init or --resume weights (val loss, HellaSwag), print, write no file, and exit",
    )
    g.add_argument("--log_dir", default="log", help="log.txt and checkpoints go here")
    g.add_argument(
        "--ckpt_every", type=int, default=5000, help="steps between checkpoints (also at the end and on SIGINT/SIGTERM)"
    )
    g.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from the latest checkpoint in --log_dir, or from the given path",
    )


def add_hardware_flags(g):
    """Where and in which number format the run computes."""
    g.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="autocast dtype; auto: bf16 where the GPU or CPU has it in hardware, fp16 + loss scaling on older "
        "GPUs, else fp32 (emulated bf16 is slower)",
    )
    g.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the model (default: on for CUDA)",
    )
    g.add_argument(
        "--peak_flops", type=float, default=None, help="device peak FLOP/s for MFU (known for A100/H100/H200)"
    )


# The range of every numeric flag, checked by check_ranges (which also refuses nan and inf).
FLAG_RANGES = {
    **dict.fromkeys(
        ["total_batch_size", "batch_size", "seq_len", "n_layer", "n_head", "n_embd", "block_size", "vocab_size"]
        + ["max_steps", "eval_every", "ckpt_every", "val_tokens", "peak_flops"],
        POSITIVE,
    ),
    # AdamW moves each weight by about the learning rate per step: above 1 no run can train, and far above
    # it the update overflows float32 inside the optimizer.
    **dict.fromkeys(["max_lr", "min_lr"], (lambda value: 0 <= value <= 1, "in [0, 1]")),
    **dict.fromkeys(["weight_decay", "grad_clip", "eps", "warmup_steps", "seed"], NOT_NEGATIVE),
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


def main(argv=None):
    args = parse_args(argv)
    procs = torchrun_processes()
    check_args(args, procs.world_size)
    device = pick_device(args.device)
    if device.type == "cuda" and procs.ddp:
        device = torch.device("cuda", procs.local_rank)
        torch.cuda.set_device(device)
    if procs.ddp:
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        if args.eval_only:
            evaluate_only(args, device, procs)  # writes nothing, so it needs no lock
        else:
            with log_dir_lock(args, procs, device):
                train(args, device, procs)
    except torch.OutOfMemoryError:
        raise out_of_memory(
            device,
            f"lower --batch_size (now {args.batch_size}) and keep --total_batch_size {args.total_batch_size}: "
            "more micro-steps make up the difference, and the run stays the same",
        ) from None
    finally:
        if procs.ddp:
            torch.distributed.destroy_process_group()


@contextlib.contextmanager
def log_dir_lock(args, procs, device):
    """Rank 0 holds --log_dir's lock for the whole run (common.output_lock), so that a second run on
    the same folder is refused before it reads or removes anything there. All ranks learn whether it
    got the lock, so that none goes on alone; only rank 0's message is printed."""
    with contextlib.ExitStack() as stack:
        refusal = None
        if procs.master:
            try:
                stack.enter_context(output_lock(args.log_dir, "--log_dir"))
            except UserError as e:
                refusal = e
        if procs.any(refusal is not None, device):
            raise refusal or UserError(f"rank 0 could not lock --log_dir {args.log_dir}")
        yield


@dataclass
class Run:
    """What a training run sets up once, for the steps of its loop to use."""

    args: argparse.Namespace
    procs: Processes
    device: torch.device
    dtype: torch.dtype
    autocast: torch.autocast
    model: GPT  # the weights, as checkpoints, HellaSwag and sampling see them
    forward_model: nn.Module  # model, compiled where --compile is on: the training and val forward
    step_model: nn.Module  # forward_model, in DDP under torchrun: what train_step runs
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_loader: DataLoaderLite
    val_loader: DataLoaderLite
    grad_accum_steps: int
    val_steps: int
    start_step: int
    eval_pending: bool  # the checkpoint's evaluation was cut short by a signal: do it before the first step
    enc: object  # the tokenizer, for samples
    hellaswag: object  # model, dtype -> acc_norm; None when off
    log: object  # log.txt, open on rank 0 only
    flops_per_step: float  # the model's arithmetic in one optimizer step, for MFU
    peak_flops: float  # the device's, None when unknown


def train(args, device, procs):
    run = set_up_run(args, device, procs)
    stop = StopRequest()
    last_step = args.max_steps - 1
    progress = Progress(run.start_step, last_step)
    if run.start_step > last_step:
        procs.print(f"nothing to train: the run is past step {last_step} already; raise --max_steps to go on")
        if procs.master:
            run.log.close()
        return
    if run.eval_pending:
        evaluate_and_sample(run, progress, run.start_step - 1, stop)
    epoch = run.train_loader.epoch
    for step in range(run.start_step, args.max_steps):
        t0 = time.time()
        lr = get_lr(step, args.max_lr, args.min_lr, args.warmup_steps, args.max_steps)
        loss, norm = train_step(
            run.step_model, run.optimizer, run.scaler, run.train_loader, run.grad_accum_steps, lr, args.grad_clip,
            run.autocast,
        )  # fmt: skip
        train_loss, stop_now = mean_loss_and_stop_flag(loss, stop.requested, procs)
        check_finite(run, step, train_loss, norm)
        if device.type == "cuda":
            torch.cuda.synchronize()  # so that dt measures the step, not just its launch
        report_step(run, progress, step, train_loss, lr, norm, time.time() - t0)
        if run.train_loader.epoch != epoch:  # the step read the epoch's last sequences
            epoch = run.train_loader.epoch
            procs.print(f"epoch {epoch - 1} done at step {step}: {(step + 1) * args.total_batch_size:,} tokens seen")
        eval_pending = False
        if (step + 1) % args.eval_every == 0 or step == last_step:
            eval_pending = not evaluate_and_sample(run, progress, step, stop)
            stop_now = procs.any(stop.requested, device)  # a signal may have come during the evaluation
        if procs.master:
            run.log.flush()
        if (step + 1) % args.ckpt_every == 0 or step == last_step or stop_now:
            check_finite_weights(run, step)
            if procs.master:
                progress.checkpoint = save_run(run, step, eval_pending)
            if stop_now:
                procs.print(f"stopped after step {step}; continue with --resume")
                break
    if procs.master:
        run.log.close()
        print_summary(run, progress)


def evaluate_only(args, device, procs):
    """--eval_only: the val loss of the --init or --resume weights over --val_tokens of the val split, and
    their HellaSwag acc_norm when its data is at hand, printed with the time each took. Every rank scores
    its share, as during training. No file is written, not even the log folder: it can run beside a
    training run, or on a read-only copy of its checkpoints."""
    use_fast_math(device)
    dtype, dtype_reason = pick_autocast_dtype(args.dtype, device)
    val_loader, val_steps = validation_data(args, procs)
    model, path, _ = build_model(args, device)
    procs.print(
        f"weights     {path or args.init}: {sum(p.numel() for p in model.parameters()):,} parameters\n"
        f"device      {procs.world_size} process(es) on {device} | "
        f"autocast {str(dtype).removeprefix('torch.')}: {dtype_reason}\n"
        f"data        {args.data_dir}: {val_steps * val_loader.window:,} tokens of {describe_split(val_loader)} val"
    )
    hellaswag = load_hellaswag_eval(args, gpt2_tokenizer(), procs, download=False)
    # Not compiled: one pass over the val tokens would spend longer compiling than it saves.
    started = time.time()
    val_loss = validation_loss(model, val_loader, val_steps, autocast_context(device, dtype), procs)
    procs.print(f"val loss {val_loss:.6f} | {time.time() - started:.1f} s")
    if hellaswag:
        started = time.time()
        procs.print(f"hellaswag acc_norm {hellaswag(model, dtype):.4f} | {time.time() - started:.1f} s")


def set_up_run(args, device, procs):
    """The model, optimizer, data and evaluations of a run, from scratch or from a checkpoint; prints them."""
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    use_fast_math(device)
    dtype, dtype_reason = pick_autocast_dtype(args.dtype, device)
    B, T = args.batch_size, args.seq_len
    train_loader = DataLoaderLite(
        args.data_dir, B, T, procs.rank, procs.world_size, "train", args.total_batch_size, args.shuffle, args.seed
    )
    val_loader, val_steps = validation_data(args, procs)
    model, resume_path, checkpoint = build_model(args, device)
    config = model.config
    betas = (args.beta1, args.beta2)
    optimizer = configure_optimizer(model, args.weight_decay, args.max_lr, betas, args.eps, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 only
    start_step, eval_pending = resume_or_start(
        args, procs, device, optimizer, scaler, train_loader, resume_path, checkpoint
    )

    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    forward_model = torch.compile(model) if use_compile else model
    step_model = forward_model
    if procs.ddp:
        step_model = nn.parallel.DistributedDataParallel(
            forward_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    enc = gpt2_tokenizer()
    hellaswag = load_hellaswag_eval(args, enc, procs)

    grad_accum_steps = args.total_batch_size // (B * T * procs.world_size)
    num_params = sum(p.numel() for p in model.parameters())
    flops_per_step = flops_per_token(config, T, num_params) * args.total_batch_size
    procs.print(
        f"log folder  {args.log_dir} (log.txt and checkpoints)\n"
        f"device      {procs.world_size} process(es) on {device} | compile {'on' if use_compile else 'off'} | "
        f"autocast {str(dtype).removeprefix('torch.')}: {dtype_reason}\n"
        f"model       {num_params:,} parameters: {config.n_layer} layers, {config.n_head} heads, "
        f"{config.n_embd} channels, vocabulary {config.vocab_size}{f' | weights of {args.init}' if args.init else ''}\n"
        f"batch       {args.total_batch_size:,} tokens per step = {B} x {T} x {procs.world_size} process(es) x "
        f"{grad_accum_steps} micro-steps | steps {start_step} to {args.max_steps - 1}\n"
        f"data        {args.data_dir}: {describe_split(train_loader)} train, {describe_split(val_loader)} val "
        f"({val_steps * val_loader.window:,} tokens per evaluation)\n"
        f"epoch       {describe_epoch(train_loader)}"
    )
    log = open(os.path.join(args.log_dir, "log.txt"), "a" if args.resume else "w") if procs.master else None
    return Run(
        args, procs, device, dtype, autocast_context(device, dtype), model, forward_model, step_model, optimizer,
        scaler, train_loader, val_loader, grad_accum_steps, val_steps, start_step, eval_pending, enc, hellaswag,
        log, flops_per_step, args.peak_flops or device_peak_flops(device),
    )  # fmt: skip


def validation_data(args, procs):
    """The val split's loader and how many of its batches an evaluation reads (--val_tokens, at most all)."""
    val_loader = DataLoaderLite(args.data_dir, args.batch_size, args.seq_len, procs.rank, procs.world_size, "val")
    return val_loader, min(args.val_tokens // val_loader.window, val_loader.steps_per_epoch()) or 1


# A run starts from weights of its own (--resume), from someone else's (--init: fine-tuning), or from a
# random draw. Weights set the model's shape, so the shape flags are needed only for a random draw.
SHAPE_FLAGS = ("n_layer", "n_head", "n_embd", "block_size")


def build_model(args, device):
    """The run's GPT on `device` with the weights it starts from, and the checkpoint path and contents that
    --resume continues ((None, None) for a new run). --init's weights get a fresh vocabulary padding."""
    path, checkpoint = checkpoint_to_resume(args)
    if checkpoint is not None:
        config = model_config(args, checkpoint["config"])
        if differences := config_differences(checkpoint["config"], config, asdict(config)):
            raise UserError(
                f"{path} is from another model ({differences}): resume with the model flags it was trained with"
            )
        model = GPT(config)
        load_weights(model, checkpoint["model"], source=path)
    elif args.init:
        init_config, state = read_weights(args.init)
        config = model_config(args, asdict(init_config))
        if differences := config_differences(asdict(init_config), config, SHAPE_FLAGS):
            raise UserError(
                f"--init {args.init} has another shape ({differences}): its weights set the model's shape, "
                "so leave out --n_layer/--n_head/--n_embd/--block_size"
            )
        model = GPT(config)
        load_weights(model, padded_vocabulary(state, config.vocab_size), source=args.init)
    else:
        model = GPT(model_config(args))
    return model.to(device), path, checkpoint


def checkpoint_to_resume(args):
    """(path, checkpoint) of the run that --resume continues, or (None, None) without --resume: the newest
    checkpoint in --log_dir (bare --resume) or in a folder --resume names, or the file it names. A run
    resumed from another folder writes its own checkpoints to --log_dir, so that folder must not hold
    another run's."""
    if not args.resume:
        return None, None
    folder = args.log_dir if args.resume == "latest" else args.resume
    if args.resume == "latest" or os.path.isdir(folder):
        path = latest_checkpoint(folder)
        if path is None:
            raise UserError(
                f"--resume: no checkpoint model_*.pt in {folder}: start without --resume, or pass --log_dir of the run"
            )
    elif args.resume.endswith(".tmp"):
        raise UserError(
            f"--resume {args.resume}: a .tmp file is a checkpoint whose write was cut short, not a checkpoint; "
            "pass the model_XXXXX.pt before it"
        )
    else:
        path = args.resume
        kept = latest_checkpoint(args.log_dir)
        if kept and os.path.isfile(path) and not in_folder(path, args.log_dir):
            raise UserError(
                f"--log_dir {args.log_dir} holds checkpoints of another run ({os.path.basename(kept)}): resuming "
                f"{path} there would overwrite them; pass an empty --log_dir for the resumed run"
            )
    checkpoint = load_checkpoint(path)
    if "optimizer" not in checkpoint:
        raise UserError(f"{path} holds weights only (no optimizer state): it cannot be resumed")
    return path, checkpoint


def model_config(args, weights=None):
    """The run's GPTConfig. `weights`: the config (a dict) of the weights the run starts from; a shape flag
    left out takes their value (GPT-2 124M's without weights). The vocabulary is always --vocab_size."""
    shape_of = weights or asdict(GPTConfig())
    shape = {name: shape_of.get(name) if getattr(args, name) is None else getattr(args, name) for name in SHAPE_FLAGS}
    config = GPTConfig(vocab_size=args.vocab_size, **shape)
    if config.n_embd % config.n_head:
        raise UserError(f"--n_embd {config.n_embd} must be divisible by --n_head {config.n_head}")
    if args.seq_len > config.block_size:
        raise UserError(f"--seq_len {args.seq_len} is longer than the model's --block_size {config.block_size}")
    return config


def config_differences(weights, config, names):
    """Where the run's GPTConfig differs from `weights` (the config dict of the weights it loads) among `names`,
    as flags: '--n_layer 12 there, 24 here, ...'; empty when they agree."""
    return ", ".join(
        f"--{name} {weights.get(name)} there, {getattr(config, name)} here"
        for name in names
        if weights.get(name) != getattr(config, name)
    )


def padded_vocabulary(state, vocab_size):
    """`state` with its token embedding (tied to the output head) cut to GPT-2's 50257 real tokens, then
    padded with zero rows to vocab_size, as training from scratch pads it, so that the matmuls run as fast.
    A padded row is never an input and never a target (the logits stop at 50257), so it stays zero."""
    key = "transformer.wte.weight"
    if key not in state:
        return state  # load_weights says what is missing
    real = state[key][:GPT2_VOCAB_SIZE]
    padded = real.new_zeros(vocab_size, real.size(1))
    padded[: len(real)] = real
    return {**state, key: padded}


def resume_or_start(args, procs, device, optimizer, scaler, train_loader, path, checkpoint):
    """The first step to run and whether the evaluation before it is still to do: (0, False) for a new run
    in an empty --log_dir, or the step after the checkpoint's at `path` (None for a new run), with the
    optimizer, scaler, data position and random state restored from it. build_model has loaded its weights."""
    start_step, eval_pending = 0, False
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        train_loader.load_state_dict(checkpoint["loader"])
        set_rng_state(checkpoint["rng"], device)
        start_step, eval_pending = checkpoint["step"] + 1, checkpoint.get("eval_pending", False)
        elsewhere = "" if in_folder(path, args.log_dir) else f"; new checkpoints go to {args.log_dir}"
        procs.print(f"resumed from {path} at step {start_step}{elsewhere}")
        # A resume may evaluate on more or fewer val tokens (--seq_len cannot change: the loader refuses it).
        then = checkpoint.get("args", {}).get("val_tokens", args.val_tokens)
        if then != args.val_tokens:
            procs.print(f"note: --val_tokens is {args.val_tokens}, the run before was {then}: its val losses "
                        "compare with this run's only roughly")  # fmt: skip
    elif latest_checkpoint(args.log_dir):  # every rank checks, so that no rank goes on alone
        raise UserError(
            f"{args.log_dir} already holds checkpoints: pass --resume to continue that run, or choose another --log_dir"
        )
    # A checkpoint whose write was interrupted (the previous one is intact). We hold --log_dir's lock, so
    # no other run can be writing it; only names save_run writes are removed, never a file of the user's.
    for stale in glob.glob(os.path.join(args.log_dir, "model_*.pt.tmp")) if procs.master else []:
        if CHECKPOINT_NAME.fullmatch(os.path.basename(stale).removesuffix(".tmp")):
            os.remove(stale)
    return start_step, eval_pending


def in_folder(path, folder):
    """Whether the file `path` lies directly in `folder`, however either is spelled."""
    return os.path.realpath(os.path.dirname(os.path.abspath(path))) == os.path.realpath(folder)


def mean_loss_and_stop_flag(loss, stop_requested, procs):
    """The loss averaged over ranks, and whether any rank was asked to stop: one all_reduce brings both,
    so that all ranks stop after the same step."""
    stats = torch.stack([loss, torch.tensor(float(stop_requested), device=loss.device)])
    if procs.ddp:
        torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.SUM)
    return stats[0].item() / procs.world_size, stats[1].item() > 0


def check_finite(run, step, train_loss, norm):
    """A loss or gradient that is inf or NaN will not come back: stop before the weights are saved."""
    # With fp16 the scaler skips steps whose gradients overflowed, so only its loss must be finite.
    if not (math.isfinite(train_loss) and (run.scaler.is_enabled() or math.isfinite(norm.item()))):
        stop_diverged(run, step, f"loss {train_loss} / grad norm {norm.item()} is not finite")


def check_finite_weights(run, step):
    """A step can leave inf or NaN weights behind a finite loss (a learning rate far too high): checked
    before each checkpoint (on every rank, which hold the same weights), so that none ever holds them."""
    if not torch.stack([torch.isfinite(p).all() for p in run.model.parameters()]).all():
        stop_diverged(run, step, "the loss is finite, but the weights after the step are not")


def stop_diverged(run, step, fault):
    """End a diverged run with one line that names the checkpoint to go back to, if there is one."""
    kept = latest_checkpoint(run.args.log_dir)
    advice = f"last good checkpoint: {kept}: resume from it" if kept else "no checkpoint was saved yet: start again"
    raise UserError(f"step {step}: {fault}; stopping without saving. {advice} with a lower --max_lr")


def report_step(run, progress, step, train_loss, lr, norm, dt):
    """The step's line on stdout (where the run is, how fast it goes) and its loss in log.txt."""
    progress.train_loss = train_loss
    elapsed, left = progress.step_done(step)
    speed = f"{1000 * dt:.0f} ms | {run.args.total_batch_size / dt:,.0f} tok/s"
    if run.peak_flops:  # the model's arithmetic per second, as a share of what the devices can do
        speed += f" | mfu {100 * run.flops_per_step / dt / (run.peak_flops * run.procs.world_size):.1f}%"
    if run.device.type == "cuda":
        speed += f" | mem {torch.cuda.max_memory_allocated(run.device) / 2**30:.1f} GiB"
    run.procs.print(
        f"{progress.label(step)} | loss {train_loss:.6f} | lr {lr:.4e} | norm {norm.item():.4f} | {speed} | "
        f"{format_seconds(elapsed)} elapsed, {format_seconds(left)} left",
        flush=True,
    )
    if run.procs.master:
        run.log.write(f"{step} train {train_loss:.6f}\n")


def evaluate_and_sample(run, progress, step, stop):
    """Val loss (all ranks), HellaSwag (all ranks, each its share) and a few samples (rank 0), logged.
    A stop request cuts the evaluations short between batches: what they had not finished is not
    reported, and every rank still runs each reduction, so that none waits for another. Returns whether
    they all ran to the end (the resumed run does them again if not)."""
    procs = run.procs
    started = time.time()
    val_loss = validation_loss(run.forward_model, run.val_loader, run.val_steps, run.autocast, procs, stop)
    if not stop.requested:
        procs.print(f"{progress.label(step)} | val loss {val_loss:.4f} | {time.time() - started:.1f} s")
        progress.val_done(step, val_loss)
        if procs.master:
            run.log.write(f"{step} val {val_loss:.4f}\n")
    if run.hellaswag:
        started = time.time()
        acc_norm = run.hellaswag(run.model, run.dtype, stop)  # uncompiled: its row lengths vary
        if not stop.requested:
            procs.print(f"{progress.label(step)} | hellaswag acc_norm {acc_norm:.4f} | {time.time() - started:.1f} s")
            progress.hellaswag = acc_norm
            if procs.master:
                run.log.write(f"{step} hella {acc_norm:.4f}\n")
    if procs.master and run.args.sample_every_eval and not stop.requested:
        started = time.time()
        prompt = "Hello, I'm a language model,"
        texts = sample_texts(run.model, run.enc, prompt, num_samples=4, max_new_tokens=32, autocast=run.autocast)
        for i, text in enumerate(texts):
            print(f"sample {i}: {text}")
        print(f"{progress.label(step)} | 4 samples | {time.time() - started:.1f} s")
    if stop.requested:
        procs.print(f"{progress.label(step)} | evaluation cut short by the stop request; a resume does it again")
    return not stop.requested


def save_run(run, step, eval_pending):
    """A checkpoint of everything the run needs to go on after `step` as if it had never stopped, its
    evaluation included when a signal cut that short (eval_pending)."""
    path = os.path.join(run.args.log_dir, f"model_{step:05d}.pt")
    state = {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "step": step,
        "eval_pending": eval_pending,
        "loader": run.train_loader.state_dict(),
        "rng": rng_state(run.device),
        "config": asdict(run.model.config),
        "args": vars(run.args),
    }
    save_checkpoint(path, state)
    print(f"saved {path}", flush=True)
    return path


class Progress:
    """Where the run is: for each step's elapsed time and estimate of the time left, and the last block."""

    def __init__(self, first_step, last_step):
        self.first_step, self.last_step = first_step, last_step
        self.started = self.last_step_end = time.time()
        self.seconds_per_step = None  # smoothed over recent steps, evaluations and checkpoints included
        self.train_loss = self.val_loss = self.best_val_loss = self.best_val_step = None
        self.hellaswag = self.checkpoint = None

    def label(self, step):
        return f"step {step:{len(str(self.last_step))}d}/{self.last_step}"

    def step_done(self, step):
        """(seconds since the start, estimated seconds left, None until there is an estimate)."""
        now = time.time()
        interval, self.last_step_end = now - self.last_step_end, now
        if step > self.first_step:  # the first step compiles and warms up: it says nothing of the others
            smoothed = self.seconds_per_step
            self.seconds_per_step = interval if smoothed is None else 0.9 * smoothed + 0.1 * interval
        left = None if self.seconds_per_step is None else self.seconds_per_step * (self.last_step - step)
        return now - self.started, left

    def val_done(self, step, val_loss):
        self.val_loss = val_loss
        if self.best_val_loss is None or val_loss < self.best_val_loss:
            self.best_val_loss, self.best_val_step = val_loss, step


def format_seconds(seconds):
    if seconds is None:
        return "?"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def print_summary(run, progress):
    """The last block: what the run reached, where it is, and what to run next."""
    val = "-" if progress.val_loss is None else f"{progress.val_loss:.4f}"
    best = ""
    if progress.best_val_step is not None:
        best = f" (best {progress.best_val_loss:.4f} at step {progress.best_val_step})"
    hellaswag = "" if progress.hellaswag is None else f" | hellaswag acc_norm {progress.hellaswag:.4f}"
    log_path = os.path.join(run.args.log_dir, "log.txt")
    print(f"\ndone in {format_seconds(time.time() - progress.started)}")
    print(f"final       train loss {progress.train_loss:.4f} | val loss {val}{best}{hellaswag}")
    print(f"checkpoint  {progress.checkpoint}")
    print(f"log         {log_path}")
    print(f"next        python sample.py --init {progress.checkpoint}")
    print(f"            python plot_log.py {log_path}")


def describe_epoch(loader):
    """One epoch of the train split: its steps, its order, and what it leaves unread."""
    tails, left_over = loader.unread_per_epoch()
    order = f"shuffled by --seed {loader.seed}" if loader.shuffle else "in order (--no-shuffle)"
    where = "at the epoch's end" if loader.shuffle else "at shard ends"
    return (
        f"{loader.steps_per_epoch():,} steps, {order} | unread each epoch: {tails:,} tokens of shard tails "
        f"shorter than a sequence, {left_over:,} sequences that do not fill a step ({where})"
    )


def describe_split(loader):
    tokens = sum(len(shard) for shard in loader.shards)
    return f"{len(loader.shards)} shard{'s' if len(loader.shards) > 1 else ''}, {tokens:,} tokens"


def rng_state(device):
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


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


if __name__ == "__main__":
    run_cli(main, interrupted="stopped at once, without saving; the last checkpoint is intact: continue with --resume")
