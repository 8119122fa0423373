"""GPT-2 (124M) from scratch: the model, the data, and the training run, in one file.

Read it top to bottom: the network, the tokenizer, the data loader, evaluation, the optimizer and its
schedule, checkpoints, sampling, and finally main(), which wires them into a training run on one
device or on many with torchrun. Importing this file does no work, so every piece can be used alone.
"""

import argparse
import contextlib
import glob
import inspect
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import EOT_TOKEN, GPT2_VOCAB_SIZE, UserError, atomic_write, gpt2_tokenizer, run_cli

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
        try:
            config = GPTConfig(**{field: hf_config[hf_name] for field, hf_name in HF_CONFIG_NAMES.items()})
        except KeyError as e:
            raise UserError(f"{directory}/config.json lacks {e}: it is not a complete GPT-2 config") from None
        model = cls(config)
        state = {k: (v.t() if k.endswith(HF_CONV1D_WEIGHTS) else v) for k, v in hf_state.items()}
        load_weights(model, state, source=directory)
        return model


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
    # GPT2Config can also describe variants of the network (another activation, an untied output head,
    # other attention scaling); loading one into our GPT would silently give a different model.
    variant = {
        key: hf_config[key]
        for key, allowed in OPENAI_GPT2_SETTINGS.items()
        if hf_config.get(key, allowed[0]) not in allowed
    }
    if variant:
        raise UserError(
            f"{directory} is a GPT-2 variant that this model does not implement ({variant}); only OpenAI's architecture loads"
        )
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


# -----------------------------------------------------------------------------
# The data loader. The corpus is pre-tokenized into shards (fineweb.py): uint16 .npy files, or the .bin
# shards of llm.c / modded-nanogpt (a 256 x int32 header, then uint16 tokens). Shards are memory-mapped,
# so a 10B-token corpus costs no RAM. Each optimizer step consumes one global window of
# B*T*world_size tokens (+1 for the last target); rank r reads its own B*T slice of that window.

BIN_MAGIC, BIN_VERSION, BIN_HEADER_INTS = 20240520, 1, 256


def load_shard(path):
    """Memory-map one shard's tokens as a 1-D uint16 array, or explain what is wrong with the file."""
    if path.endswith(".bin"):
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
                f"{path}: {os.path.getsize(path)} bytes, header promises {expected_bytes}: the file is truncated, download it again"
            )
        return np.memmap(path, dtype=np.uint16, mode="r", offset=4 * BIN_HEADER_INTS, shape=(num_tokens,))
    try:
        tokens = np.load(path, mmap_mode="r")
    except Exception as e:
        raise UserError(
            f"{path}: not a readable .npy shard ({e}): it is probably truncated, regenerate it with fineweb.py"
        ) from None
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise UserError(
            f"{path}: tokens are {tokens.dtype} with shape {tokens.shape}, expected a 1-D uint16 array: regenerate it with fineweb.py"
        )
    return tokens


class DataLoaderLite:
    def __init__(self, data_dir, B, T, process_rank, num_processes, split):
        self.B, self.T = B, T
        self.process_rank, self.num_processes = process_rank, num_processes
        self.window = B * T * num_processes  # tokens consumed by all ranks together in one next_batch()
        paths = sorted(
            glob.glob(os.path.join(data_dir, f"*_{split}_*.npy"))
            + glob.glob(os.path.join(data_dir, f"*_{split}_*.bin"))
        )
        if not paths:
            raise UserError(
                f"no {split} shards (*_{split}_*.npy or .bin) in {data_dir}: run `python fineweb.py` (or fineweb.py --input your.txt --out {data_dir}) first"
            )
        self.shards = [load_shard(p) for p in paths]
        for path, tokens in zip(paths, self.shards):
            if len(tokens) < self.window + 1:
                raise UserError(
                    f"{path} has {len(tokens)} tokens, fewer than one batch of B*T*world_size+1 = {self.window + 1}: lower --batch_size/--seq_len or add data"
                )
        self.reset()

    def reset(self):
        self.shard, self.position, self.epoch = 0, 0, 0

    def steps_per_epoch(self):
        return sum((len(tokens) - 1) // self.window for tokens in self.shards)

    def next_batch(self):
        """x, y of shape (B, T): this rank's inputs and, one token later, their targets."""
        start = self.position + self.process_rank * self.B * self.T
        buf = torch.from_numpy(self.shards[self.shard][start : start + self.B * self.T + 1].astype(np.int64))
        x = buf[:-1].view(self.B, self.T)
        y = buf[1:].view(self.B, self.T)
        # Every rank advances by the same global window, so all ranks stay on the same shard and switch
        # together, exactly when the next global window would not fit in this one.
        self.position += self.window
        if self.position + self.window + 1 > len(self.shards[self.shard]):
            self.shard, self.position = (self.shard + 1) % len(self.shards), 0
            self.epoch += self.shard == 0  # past the last shard: wrap around, a new epoch
        return x, y

    # The position is global (the start of the next global window), so it is the same on every rank:
    # one state restores all ranks, even if the run resumes on a different number of processes.
    def state_dict(self):
        return {"shard": self.shard, "position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state):
        self.shard, self.position, self.epoch = state["shard"], state["position"], state["epoch"]


# -----------------------------------------------------------------------------
# Evaluation: the mean loss on a fixed stretch of the validation split, the same tokens every time so
# that the curve is comparable across steps (and with OpenAI's GPT-2, 3.2924 on FineWeb-edu shard 0).


@torch.no_grad()
def validation_loss(model, val_loader, steps, device, autocast_dtype, ddp):
    """Mean loss over `steps` batches from the start of the validation split, averaged over ranks."""
    model.eval()
    val_loader.reset()
    loss_sum = torch.zeros((), device=device)
    for _ in range(steps):
        x, y = val_loader.next_batch()
        with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
            _, loss = model(x.to(device), y.to(device))
        loss_sum += loss.detach()
    if ddp:
        torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.SUM)  # gloo has no AVG
        loss_sum /= torch.distributed.get_world_size()
    model.train()
    return loss_sum.item() / steps


def load_hellaswag_eval(args, enc, rank, world_size, ddp, print0):
    """A function (model, device, autocast_dtype) -> HellaSwag acc_norm, each rank scoring its share of the examples, or
    None when it is switched off or its data cannot be had (a one-line notice says why)."""
    if not args.hellaswag:
        return None
    import hellaswag  # imported here, not at the top: hellaswag.py itself builds on this file

    if args.hellaswag_data:
        path = hellaswag.hellaswag_path(args.hellaswag_data)  # a path the user gave must exist
    else:
        path = None
        if rank == 0:  # one download into the cache, which the other ranks then read
            try:
                path = hellaswag.hellaswag_path()
            except UserError:
                print0(
                    "HellaSwag skipped: its data is not cached and could not be downloaded; pass --hellaswag_data PATH to a local hellaswag_val.jsonl, or --no-hellaswag"
                )
        if ddp:
            torch.distributed.barrier()
        path = hellaswag.hellaswag_path(download=False)
        if path is None:
            return None
    examples = hellaswag.load_examples(path)
    examples_per_forward = args.batch_size  # one row per example, shorter than a training row: fits where training does

    def hellaswag_acc_norm(model, device, autocast_dtype):
        counts = hellaswag.evaluate(
            model, examples, enc, device, examples_per_forward, rank, world_size, autocast_dtype
        )
        return counts["correct_norm"] / counts["n"]

    return hellaswag_acc_norm


# -----------------------------------------------------------------------------
# Optimisation: AdamW with decoupled weight decay on the matrices only (decaying biases and LayerNorm
# gains just fights the normalisation), a linear warmup, then cosine decay to min_lr.


def configure_optimizer(model, weight_decay, lr, betas, eps, device_type):
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # matmul weights and embeddings
    no_decay = [p for p in params if p.dim() < 2]  # biases and LayerNorm parameters
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused CUDA kernel updates every parameter in one launch instead of several per tensor.
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


def latest_checkpoint(log_dir):
    """The newest model_XXXXX.pt in log_dir, or None. Half-written .tmp files never match."""
    paths = glob.glob(os.path.join(log_dir, "model_*.pt"))
    # More digits first, then as text: past step 99999, model_100000.pt comes after model_99999.pt.
    return max(paths, key=lambda path: (len(path), path)) if paths else None


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
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"{path} is not a checkpoint of this project ({type(e).__name__}): it may be truncated or another kind of file"
        ) from None
    if not isinstance(checkpoint, dict) or not {"model", "config"} <= checkpoint.keys():
        raise UserError(f"{path} is not a checkpoint of this project: it lacks the 'model' and 'config' entries")
    return checkpoint


# -----------------------------------------------------------------------------
# Sampling: continuations of a prompt, for the samples printed during training and for sample.py.


def sample_texts(
    model, enc, prompt, num_samples, max_new_tokens, device, autocast_dtype, temperature=1.0, top_k=50, seed=42
):
    """The prompt and its continuations, one string per sample. An empty prompt starts a new document."""
    prompt_ids = enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [EOT_TOKEN]
    idx = torch.tensor([prompt_ids] * num_samples, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)  # on the model's device: same samples every call
    with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
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
# The training run. main() parses the flags, sets up one process or a torchrun DDP group, and trains.


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Train GPT-2 (124M by default) on pre-tokenized shards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", default="edu_fineweb10B", help="shards written by fineweb.py (or llm.c .bin shards)")
    g.add_argument(
        "--total_batch_size", type=int, default=524288, help="tokens per optimizer step: 2**19, ~0.5M as in GPT-3 Small"
    )
    g.add_argument(
        "--batch_size", type=int, default=64, help="sequences per micro-step per GPU (B); lower it if memory runs out"
    )
    g.add_argument("--seq_len", type=int, default=1024, help="tokens per sequence (T): GPT-2's context")
    g = p.add_argument_group("model")
    g.add_argument("--n_layer", type=int, default=12, help="transformer blocks (GPT-2 124M: 12)")
    g.add_argument("--n_head", type=int, default=12, help="attention heads (GPT-2 124M: 12)")
    g.add_argument("--n_embd", type=int, default=768, help="channels (GPT-2 124M: 768)")
    g.add_argument("--block_size", type=int, default=1024, help="longest context the model can take (GPT-2: 1024)")
    g.add_argument(
        "--vocab_size", type=int, default=50304, help="50257 tokens padded to a multiple of 128 for faster matmuls"
    )
    g = p.add_argument_group("optimisation")
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
    g.add_argument("--seed", type=int, default=1337, help="seed of the weight init")
    g = p.add_argument_group("evaluation, logging and checkpoints")
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
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="autocast dtype; auto: bf16 where supported, fp16 + loss scaling on older GPUs",
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
    args = p.parse_args(argv)
    if args.min_lr is None:
        args.min_lr = 0.1 * args.max_lr
    return args


def check_args(args, world_size):
    """Refuse flags that make no sense before any work starts, each with one line that says why."""
    for name in (
        "total_batch_size",
        "batch_size",
        "seq_len",
        "n_layer",
        "n_head",
        "n_embd",
        "block_size",
        "vocab_size",
        "max_steps",
        "eval_every",
        "ckpt_every",
        "val_tokens",
    ):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("max_lr", "min_lr", "weight_decay", "grad_clip", "eps", "warmup_steps"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must not be negative, got {getattr(args, name)}")
    if not (0 <= args.beta1 < 1 and 0 <= args.beta2 < 1):
        raise UserError(f"--beta1 and --beta2 must be in [0, 1), got {args.beta1}, {args.beta2}")
    if args.min_lr > args.max_lr:
        raise UserError(f"--min_lr {args.min_lr} is above --max_lr {args.max_lr}")
    if args.n_embd % args.n_head:
        raise UserError(f"--n_embd {args.n_embd} must be divisible by --n_head {args.n_head}")
    if args.seq_len > args.block_size:
        raise UserError(f"--seq_len {args.seq_len} is longer than the model's --block_size {args.block_size}")
    if args.vocab_size < GPT2_VOCAB_SIZE:
        raise UserError(f"--vocab_size {args.vocab_size} is smaller than GPT-2's {GPT2_VOCAB_SIZE} tokens")
    tokens_per_micro_step = args.batch_size * args.seq_len * world_size
    if args.total_batch_size % tokens_per_micro_step:
        raise UserError(
            f"--total_batch_size {args.total_batch_size} is not divisible by batch_size*seq_len*world_size = "
            f"{args.batch_size}*{args.seq_len}*{world_size} = {tokens_per_micro_step}: change one of them"
        )


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


def pick_autocast_dtype(requested, device):
    """bf16 keeps fp32's range, so it trains with no loss scaling; fp16 only where bf16 is missing."""
    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16
    return torch.float32


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
    """SIGINT/SIGTERM (Ctrl-C, a cluster's preemption) ask the run to stop: it finishes the step it is in,
    saves a checkpoint and exits 0. A second Ctrl-C stops at once."""

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


def train(args):
    # torchrun sets RANK/WORLD_SIZE: one process per GPU (or per CPU worker with gloo), each with its
    # own slice of the data; DDP averages their gradients so they stay one model.
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    master = rank == 0  # only rank 0 prints, logs and saves
    print0 = print if master else (lambda *a, **k: None)
    check_args(args, world_size)
    device = pick_device(args.device)
    if device.type == "cuda" and ddp:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if ddp:
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        run_training(args, device, ddp, rank, world_size, master, print0)
    finally:
        if ddp:
            torch.distributed.destroy_process_group()


def run_training(args, device, ddp, rank, world_size, master, print0):
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls that autocast leaves
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # tiny floats as zero: x86 handles them slowly (17% per step here)
    autocast_dtype = pick_autocast_dtype(args.dtype, device)
    autocast = lambda: torch.autocast(
        device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32
    )

    B, T = args.batch_size, args.seq_len
    grad_accum_steps = args.total_batch_size // (B * T * world_size)
    train_loader = DataLoaderLite(args.data_dir, B, T, rank, world_size, "train")
    val_loader = DataLoaderLite(args.data_dir, B, T, rank, world_size, "val")
    val_steps = min(args.val_tokens // val_loader.window, val_loader.steps_per_epoch()) or 1

    config = GPTConfig(
        block_size=args.block_size,
        vocab_size=args.vocab_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
    )
    raw_model = GPT(config).to(device)
    num_params = sum(p.numel() for p in raw_model.parameters())
    optimizer = configure_optimizer(
        raw_model, args.weight_decay, args.max_lr, (args.beta1, args.beta2), args.eps, device.type
    )
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)  # fp16 only

    os.makedirs(args.log_dir, exist_ok=True)
    start_step = 0
    if args.resume:
        path = latest_checkpoint(args.log_dir) if args.resume == "latest" else args.resume
        if path is None:
            raise UserError(
                f"--resume: no checkpoint model_*.pt in {args.log_dir}: start without --resume, or pass --log_dir of the run"
            )
        checkpoint = load_checkpoint(path)
        if checkpoint["config"] != asdict(config):
            differences = ", ".join(
                f"--{k} {v} there, {getattr(config, k)} here"
                for k, v in checkpoint["config"].items()
                if getattr(config, k, None) != v
            )
            raise UserError(
                f"{path} is from another model ({differences}): resume with the model flags it was trained with"
            )
        if "optimizer" not in checkpoint:
            raise UserError(f"{path} holds weights only (no optimizer state): it cannot be resumed")
        load_weights(raw_model, checkpoint["model"], source=path)
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        train_loader.load_state_dict(checkpoint["loader"])
        set_rng_state(checkpoint["rng"], device)
        start_step = checkpoint["step"] + 1
        print0(f"resumed from {path} at step {start_step}")
    elif latest_checkpoint(args.log_dir):  # every rank checks, so that no rank goes on alone
        raise UserError(
            f"{args.log_dir} already holds checkpoints: pass --resume to continue that run, or choose another --log_dir"
        )
    for stale in glob.glob(os.path.join(args.log_dir, "*.tmp")) if master else []:
        os.remove(stale)  # a checkpoint whose write was interrupted: the previous one is intact

    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    model = torch.compile(raw_model) if use_compile else raw_model
    train_model = (
        torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if ddp
        else model
    )
    peak_flops = args.peak_flops or device_peak_flops(device)
    flops_per_step = flops_per_token(config, T, num_params) * args.total_batch_size
    enc = gpt2_tokenizer()
    hellaswag_eval = load_hellaswag_eval(args, enc, rank, world_size, ddp, print0)

    print0(
        f"{num_params:,} parameters | {world_size} process(es) on {device} | autocast {autocast_dtype} | compile {use_compile}"
    )
    print0(
        f"{args.total_batch_size:,} tokens per step = {B} x {T} x {world_size} ranks x {grad_accum_steps} micro-steps | val {val_steps * val_loader.window:,} tokens"
    )
    log_path = os.path.join(args.log_dir, "log.txt")
    log_file = open(log_path, "a" if args.resume else "w") if master else None
    stop = StopRequest()
    last_step = args.max_steps - 1
    for step in range(start_step, args.max_steps):
        t0 = time.time()
        optimizer.zero_grad(set_to_none=True)
        loss_accum = torch.zeros((), device=device)
        for micro_step in range(grad_accum_steps):
            x, y = train_loader.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # DDP averages gradients across ranks on the last micro-step only; before it, they accumulate locally.
            last_micro_step = micro_step == grad_accum_steps - 1
            with contextlib.nullcontext() if last_micro_step or not ddp else train_model.no_sync():
                with autocast():
                    _, loss = train_model(x, y)
                loss = loss / grad_accum_steps  # backward of the mean over micro-steps, not their sum
                loss_accum += loss.detach()
                scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        # One all_reduce brings every rank the mean loss and whether any rank was asked to stop.
        stats = torch.stack([loss_accum, torch.tensor(float(stop.requested), device=device)])
        if ddp:
            torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.SUM)
        train_loss, stop_now = stats[0].item() / world_size, stats[1].item() > 0
        if not math.isfinite(train_loss) or (not scaler.is_enabled() and not math.isfinite(norm.item())):
            kept = latest_checkpoint(args.log_dir)
            raise UserError(
                f"step {step}: loss {train_loss} / grad norm {norm.item()} is not finite, stopping; last good checkpoint: {kept}: resume from it with a lower --max_lr"
            )
        lr = get_lr(step, args.max_lr, args.min_lr, args.warmup_steps, args.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        mfu = f" | mfu {100 * flops_per_step / dt / (peak_flops * world_size):.1f}%" if peak_flops else ""
        print0(
            f"step {step:5d} | loss {train_loss:.6f} | lr {lr:.4e} | norm {norm.item():.4f} | dt {1000 * dt:.0f}ms | tok/s {args.total_batch_size / dt:,.0f}{mfu}",
            flush=True,
        )
        if master:
            log_file.write(f"{step} train {train_loss:.6f}\n")

        if (step + 1) % args.eval_every == 0 or step == last_step:
            val_loss = validation_loss(model, val_loader, val_steps, device, autocast_dtype, ddp)
            print0(f"step {step:5d} | val loss {val_loss:.4f}")
            if master:
                log_file.write(f"{step} val {val_loss:.4f}\n")
            if hellaswag_eval:
                acc_norm = hellaswag_eval(raw_model, device, autocast_dtype)  # uncompiled: its lengths vary
                print0(f"step {step:5d} | hellaswag acc_norm {acc_norm:.4f}")
                if master:
                    log_file.write(f"{step} hella {acc_norm:.4f}\n")
            if master and args.sample_every_eval:
                for i, text in enumerate(
                    sample_texts(raw_model, enc, "Hello, I'm a language model,", 4, 32, device, autocast_dtype)
                ):
                    print(f"sample {i}: {text}")
        if master:
            log_file.flush()

        if (step + 1) % args.ckpt_every == 0 or step == last_step or stop_now:
            if master:
                path = os.path.join(args.log_dir, f"model_{step:05d}.pt")
                save_checkpoint(
                    path,
                    {
                        "model": raw_model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(),
                        "step": step,
                        "loader": train_loader.state_dict(),
                        "rng": rng_state(device),
                        "config": asdict(config),
                        "args": vars(args),
                    },
                )
                print(f"saved {path}", flush=True)
            if stop_now:
                print0(f"stopped after step {step}; continue with --resume")
                break
    if master:
        log_file.close()


def main(argv=None):
    train(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
