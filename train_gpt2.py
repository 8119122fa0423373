"""GPT-2 (124M) from scratch, in the lecture's order: the network, OpenAI's weights, the data loader, the
validation loss, AdamW and its schedule, the processes of a torchrun group, the training step, checkpoints,
sampling, and the run: its flags, the loop and main(). Importing this file does no work.

A call into guard, devices, hf_format, progress or hellaswag is machinery a careful tool needs (clear
errors, device probing, file formats, progress lines, HellaSwag): one line here, which a reader can skip.
"""

import argparse
import contextlib
import functools
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import devices
import guard
import hellaswag
import hf_format
import progress
from common import GPT2_VOCAB_SIZE, HelpFormatter, UserError, add_flags, atomic_write, gpt2_tokenizer, run_cli

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


# OpenAI's sizes: 124M (12 layers, 12 heads, 768 wide), 350M (24, 16, 1024), 774M (36, 20, 1280), 1558M (48, 25, 1600)
GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


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
        if kv_cache is not None:  # generation: the keys and values of earlier positions come from the cache
            k, v = kv_cache.append(k, v)
        # Causal: each position sees itself and the ones before it (flash attention where available); a single
        # new token may see the whole cache. hellaswag.py's packed rows bring their own mask instead.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1)
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


class KVCache:
    """One layer's keys and values of the positions seen so far, so that generating a token needs a
    forward pass over that token alone. Preallocated for max_len positions and filled left to right."""

    def __init__(self, max_len):
        self.max_len, self.length = max_len, 0
        self.keys = self.values = None  # allocated on first use, in the dtype autocast gives k and v

    def append(self, k, v):
        """Store k, v of shape (B, n_head, T, head_size); return the keys and values of all positions."""
        T = k.size(2)
        # The prompt goes in at once (causal attention), then one token at a time (which sees every position).
        assert self.length == 0 or T == 1, "after the prompt, feed one token at a time"
        if self.keys is None:
            B, n_head, _, head_size = k.shape
            self.keys = k.new_empty(B, n_head, self.max_len, head_size)
            self.values = v.new_empty(B, n_head, self.max_len, head_size)
        self.keys[:, :, self.length : self.length + T] = k
        self.values[:, :, self.length : self.length + T] = v
        self.length += T
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
            wpe=nn.Embedding(config.block_size, config.n_embd),  # position embedding
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))  # fmt: skip
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
        """idx, targets: (B, T) token ids -> logits (B, T, 50257), mean cross-entropy loss (None without targets)."""
        logits = self.logits(self.hidden_states(idx))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())  # (B, T, V) -> (B*T, V)
        return logits, loss

    def hidden_states(self, idx, kv_caches=None, positions=None, attn_mask=None):
        """(B, T) token ids -> (B, T, n_embd), the input of logits() (kept apart, so that generate() pays the
        vocabulary matmul for the last position only). Each row is one sequence at positions 0..T-1, or with
        kv_caches (one KVCache per layer) it continues the cached positions. hellaswag.py packs sequences
        into a row and passes each token's positions (B, T) and who may see whom, attn_mask (B, 1, T, T)."""
        T = idx.size(1)
        if positions is None:
            start = kv_caches[0].length if kv_caches else 0
            assert start + T <= self.config.block_size, f"{start + T} tokens, block_size {self.config.block_size}"
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
        temperature=0 picks the most likely token; top_k keeps only the k most likely (GPT-2 used 50)."""
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
        """OpenAI's GPT-2: a hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a Hugging Face directory."""
        config, state = openai_weights(name_or_path)
        model = cls(config)
        load_weights(model, state, source=name_or_path)
        return model


# -----------------------------------------------------------------------------
# OpenAI's weights, in Hugging Face's format, to check this model against the original (its logits equal
# GPT2LMHeadModel's) and to start from them. hf_format reads the files. What matters here: OpenAI used
# Conv1D layers, which store a weight as (in, out), the transpose of nn.Linear's (out, in).


def openai_weights(name_or_path):
    """The GPTConfig and the state dict (in this model's layout) of OpenAI's GPT-2."""
    config, hf_state, source = hf_format.read_gpt2(name_or_path, GPT2_SIZES)
    guard.check_config(config, source, GPTConfig)
    state = {k: (v.t() if k.endswith(hf_format.CONV1D_WEIGHTS) else v) for k, v in hf_state.items()}
    return GPTConfig(**config), state


def load_weights(model, state, source):
    """Copy state into model, once guard has checked that every name and shape fits."""
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # lm_head is wte
    guard.check_weights_fit(expected, state, source)
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(state[key])


# -----------------------------------------------------------------------------
# The data loader. fineweb.py tokenizes the corpus into shards of uint16 tokens (llm.c's .bin shards work
# too), memory-mapped, so that a 10B-token corpus costs no RAM. A step reads total_batch_size tokens, and
# each micro-step of each rank its own B*T slice of them.


def load_shard(path):
    """One shard's tokens, memory-mapped as a 1-D uint16 array: fineweb.py's .npy, or llm.c's .bin (a
    header of 256 int32, then the tokens). guard says what is wrong with a file that is neither."""
    if path.endswith(".bin"):
        num_tokens = guard.bin_shard_tokens(path)
        tokens = np.memmap(path, dtype=np.uint16, mode="r", offset=4 * guard.BIN_HEADER_INTS, shape=(num_tokens,))
    else:
        tokens = guard.npy_shard(path)
    return guard.check_token_ids(path, tokens)


class DataLoaderLite:
    """This rank's batches of B sequences of T tokens from one split. Shards are cut into windows of T+1
    tokens (T inputs and, one later, T targets), and a step takes the next S = step_tokens/T windows of the
    epoch's stream: micro-step m of rank r reads block m * world_size + r of them. So a step reads the same
    sequences on any number of processes, and one global position is the state. In order (the lecture's
    loader) a step never crosses a shard's end; shuffled, each epoch reads the shards, and each shard's
    windows, in an order drawn from the seed and the epoch alone."""

    def __init__(self, data_dir, B, T, process_rank, num_processes, split, step_tokens=None, shuffle=False, seed=0):
        self.B, self.T = B, T
        self.process_rank, self.num_processes = process_rank, num_processes
        self.shuffle, self.seed = shuffle, seed
        self.window = step_tokens or B * T * num_processes  # tokens of all ranks in one optimizer step
        self.step_sequences = self.window // T  # S; check_args makes the step a whole number of micro-steps
        self.micro_steps = self.window // (B * T * num_processes)
        paths = guard.find_shards(data_dir, split)  # PREFIX_{train,val}_NNNNNN.npy (or .bin), in index order
        self.shards = [load_shard(p) for p in paths]
        self.data = guard.data_fingerprint(paths, self.shards)  # saved with the state: a resume checks it
        self.windows = np.array([(len(tokens) - 1) // T for tokens in self.shards])  # sequence windows per shard
        # The windows each shard puts in the stream: all of them shuffled; in order, whole steps only (so a
        # shard shorter than a step, such as the last one fineweb.py writes, is skipped: it is counted unread).
        self.used = self.windows if shuffle else self.windows // self.step_sequences * self.step_sequences
        self.epoch_sequences = int(self.used.sum()) // self.step_sequences * self.step_sequences
        if self.epoch_sequences == 0:
            raise guard.no_step_in_split(paths, self.shards, self.window, split)
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
        buf = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T+1), read from the memory map row by row
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

    # Where the next step starts (the same on every rank), with what a resume must find unchanged.
    def state_dict(self):
        return dict(epoch=self.epoch, sequence=self.sequence, seq_len=self.T, step_tokens=self.window,
                    shuffle=self.shuffle, seed=self.seed, data=self.data)  # fmt: skip

    def load_state_dict(self, state):
        """Continue where `state` ends; the data, --total_batch_size, --seq_len and the order must be the same."""
        guard.check_loader_state(state, self.window, self.T, self.data, self.shuffle, self.seed, self.epoch_sequences)
        self.epoch, self.micro_step = state["epoch"], 0
        if "sequence" in state:
            self.sequence = state["sequence"]
        else:  # a checkpoint from before the stream of sequences: a shard and a token position in it
            self.sequence = int(self.used[: state["shard"]].sum()) + state["position"] // self.T


@functools.lru_cache(maxsize=4)
def window_order(seed, epoch, shard, windows):
    """The order of a shard's windows in an epoch, from a generator of its own: a rank draws only what it reads."""
    return np.random.default_rng([seed, epoch, shard]).permutation(windows)


# -----------------------------------------------------------------------------
# The validation loss: the mean loss on a fixed stretch of the validation split, the same tokens every
# time, so that the curve is comparable across steps (and with OpenAI's GPT-2: 3.2924 on FineWeb-edu).


@torch.no_grad()
def validation_loss(model, val_loader, steps, autocast, procs, stop=None, rows=None):
    """Mean loss over `steps` batches from the start of the validation split, averaged over ranks; `rows`
    sequences per forward pass (default: the whole batch), where memory holds fewer logits than a batch has.
    A stop request (guard.StopRequest) ends the loop between batches (the result is then meaningless),
    and every rank still joins the reduction, so that none waits for another."""
    device = next(model.parameters()).device
    model.eval()
    val_loader.reset()
    loss_sum = torch.zeros((), device=device)
    for _ in range(steps):
        if stop is not None and stop.requested:
            break
        x, y = val_loader.next_batch()  # (B, T) each
        for xs, ys in zip(x.split(rows or len(x)), y.split(rows or len(x))):  # (rows, T) at a time
            with autocast:
                _, loss = model(xs.to(device), ys.to(device))
            loss_sum += loss.detach() * (len(xs) / len(x))  # the batch's mean, from its parts' means
    model.train()
    return procs.mean(loss_sum).item() / steps


# -----------------------------------------------------------------------------
# Optimisation: AdamW with decoupled weight decay on the matrices only (decaying biases and LayerNorm
# gains just fights the normalisation), a linear warmup, then cosine decay to min_lr.


def configure_optimizer(model, weight_decay, lr, betas, eps, device_type, fused=None):
    """AdamW; fused (default on CUDA): one kernel launch updates every parameter, not several per tensor."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # matmul weights and embeddings
    no_decay = [p for p in params if p.dim() < 2]  # biases and LayerNorm parameters
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device_type == "cuda" if fused is None else fused
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
# Processes. torchrun starts one process per GPU (or CPU worker, with gloo) and sets RANK, WORLD_SIZE, ...;
# each reads its own slice of every batch, and DDP averages their gradients. Without torchrun: one process.


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
    group = common.torchrun_group()  # (RANK, LOCAL_RANK, WORLD_SIZE), all set and consistent, or None: one process
    return Processes(True, *group) if group else Processes()


def mean_loss_and_stop_flag(loss, stop_requested, procs):
    """The loss averaged over ranks and whether any rank was asked to stop, in one all_reduce: all stop together."""
    stats = torch.stack([loss, torch.tensor(float(stop_requested), device=loss.device)])
    if procs.ddp:
        torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.SUM)
    return stats[0].item() / procs.world_size, stats[1].item() > 0


# -----------------------------------------------------------------------------
# The training step: total_batch_size tokens, read as grad_accum_steps micro-batches of B x T per process.
# Gradients add up over the micro-steps, are clipped to a global norm, and AdamW applies them.


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
# Checkpoints hold all a run needs to go on at the same token with the same numbers: weights, optimizer
# moments, step, data position, RNG states, the config. Written atomically: a crash leaves the last intact.


def save_checkpoint(path, state):
    with atomic_write(path) as f:
        torch.save(state, f)


def checkpoint_state(model, optimizer, scaler, step, eval_pending, loader, device, args):
    """What a checkpoint holds after `step`; eval_pending: the step's evaluation was cut short by a signal."""
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step,
                eval_pending=eval_pending, loader=loader.state_dict(), rng=rng, config=asdict(model.config),
                args=vars(args))  # fmt: skip


def load_checkpoint(path):
    """A checkpoint of this project. weights_only=True, so that a downloaded file cannot run code."""
    with guard.reading_checkpoint(path):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    guard.check_checkpoint(checkpoint, path, GPTConfig)
    return checkpoint


def restore_checkpoint(checkpoint, optimizer, scaler, loader, device):
    """Restore all but the weights (already loaded) as they were after the checkpoint's step; the next step."""
    optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint["scaler"]:  # empty where the run before was not in fp16: a run moving to fp16 starts afresh
        scaler.load_state_dict(checkpoint["scaler"])
    loader.load_state_dict(checkpoint["loader"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if device.type == "cuda" and "cuda" in checkpoint["rng"]:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
    return checkpoint["step"] + 1


def read_weights(init):
    """GPTConfig and state dict of an OpenAI size name, a Hugging Face directory, or log/model_XXXXX.pt."""
    if init in GPT2_SIZES or os.path.isdir(init):
        return openai_weights(init)
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


# -----------------------------------------------------------------------------
# Sampling: continuations of a prompt, for the samples printed during training and for sample.py.
SAMPLE_TOKENS = 32  # what each sample printed at an evaluation adds to its prompt


def sample_texts(model, enc, prompt, *, num_samples, max_new_tokens, temperature=1.0, top_k=50, seed=42, autocast):
    """The prompt and its continuations, one string per sample. An empty prompt starts a new document."""
    device = next(model.parameters()).device
    prompt_ids = enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [enc.eot_token]
    idx = torch.tensor([prompt_ids] * num_samples, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)  # on the model's device: same samples every call
    with autocast:
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    return [enc.decode(row.tolist()) for row in out]


def sample_prompt(args, val_loader, enc, block_size):
    """--sample_prompt, or the first line of the val split's first 8 tokens (after <|endoftext|>): its own words."""
    first_line = enc.decode(val_loader.shards[0][1:9].tolist()).strip().split("\n")[0]
    prompt = first_line if args.sample_prompt is None else args.sample_prompt
    if args.sample_every_eval:  # said now: a prompt too long would end the run at its first evaluation
        guard.check_sample_prompt(prompt, enc, SAMPLE_TOKENS, block_size)
    return prompt


# -----------------------------------------------------------------------------
# The run's flags: every hyperparameter, GPT-2 124M's recipe as its default, its reason shown in --help.

FLAGS = {
    "data": [
        ("--data_dir", "edu_fineweb10B", "shards written by fineweb.py (or llm.c .bin shards)"),
        ("--total_batch_size", 524288, "tokens per optimizer step: 2**19, ~0.5M as in GPT-3 Small"),
        ("--batch_size", 64, "sequences per micro-step per GPU (B); lower it if memory runs out"),
        ("--seq_len", 1024, "tokens per sequence (T): GPT-2's context"),
        ("--shuffle", True, "read the train shards, and each shard's sequences, in a new order each epoch drawn "
         "from --seed: batches that mix the corpus; --no-shuffle reads them front to back, as the lecture does"),
    ],
    "model": [
        ("--init", str, "start from these weights (gpt2, gpt2-medium, gpt2-large, gpt2-xl, a Hugging Face GPT-2 "
         "directory, or log/model_XXXXX.pt) with a fresh optimizer at step 0: fine-tuning"),
        ("--n_layer", int, "transformer blocks (default: GPT-2 124M's 12, or the weights')"),
        ("--n_head", int, "attention heads (default: GPT-2 124M's 12, or the weights')"),
        ("--n_embd", int, "channels (default: GPT-2 124M's 768, or the weights')"),
        ("--block_size", int, "longest context the model takes (default: 1024, or the weights')"),
        ("--vocab_size", 50304, "50257 tokens padded to a multiple of 128 for faster matmuls"),
    ],
    "optimisation": [
        ("--max_lr", 6e-4, "peak learning rate (GPT-3 Small)"),
        ("--min_lr", float, "final learning rate (default: 10%% of --max_lr, as GPT-3)"),
        ("--warmup_steps", 715, "linear warmup: 375M tokens, as GPT-3"),
        ("--max_steps", 19073, "10B tokens / 524288 tokens per step: one epoch of FineWeb-edu 10B"),
        ("--weight_decay", 0.1, "decoupled AdamW decay on matrices (GPT-3)"),
        ("--beta1", 0.9, "AdamW first-moment decay (GPT-3)"),
        ("--beta2", 0.95, "AdamW second-moment decay (GPT-3)"),
        ("--eps", 1e-8, "AdamW epsilon (GPT-3)"),
        ("--grad_clip", 1.0, "clip the global gradient norm (GPT-3)"),
        ("--seed", 1337, "seed of the weight init and of the data order"),
    ],
    "evaluation, logging and checkpoints": [
        ("--eval_every", 250, "steps between val loss / HellaSwag / samples"),
        ("--eval_first", True, "evaluate the starting weights before step 0, as the lecture does (not on --resume)"),
        ("--val_tokens", 10485760, "tokens of the val split per evaluation (20 steps of 2**19)"),
        ("--hellaswag", True, "HellaSwag acc_norm at each evaluation"),
        ("--hellaswag_data", str, "local hellaswag_val.jsonl (default: the cached download)"),
        ("--sample_every_eval", True, "print 4 samples at each evaluation"),
        ("--sample_prompt", str, "what the samples continue (default: the val split's first words, in any corpus)"),
        ("--eval_only", False, "evaluate the --init or --resume weights (val loss, HellaSwag), print, write nothing"),
        ("--log_dir", "log", "log.txt and checkpoints go here"),
        ("--ckpt_every", 5000, "steps between checkpoints (also at the end and on SIGINT/SIGTERM)"),
        ("--resume", "[PATH]", "continue from the latest checkpoint in --log_dir, or from the given path"),
    ],
    "hardware": [
        ("--device", str, "cuda, mps or cpu (default: the best available)"),
        ("--dtype", ("auto", "bfloat16", "float16", "float32"), "autocast dtype; auto: bf16 where the GPU or CPU "
         "has it in hardware, fp16 + loss scaling on older GPUs, else fp32 (emulated bf16 is slower)"),
        ("--compile", bool, "torch.compile the model (default: on for CUDA)"),
        ("--peak_flops", float, "device peak FLOP/s for MFU (known for A100/H100/H200)"),
    ],
}  # fmt: skip


def parse_args(argv=None):
    p = common.ArgumentParser(
        description="Train GPT-2 (124M by default) on pre-tokenized shards, from scratch or from --init weights; "
        "or only evaluate weights (--eval_only).",
        formatter_class=HelpFormatter,
    )
    add_flags(p, FLAGS)
    args = p.parse_args(argv)
    if args.min_lr is None:
        args.min_lr = 0.1 * args.max_lr
    return args


# -----------------------------------------------------------------------------
# Setting up a run. Its weights come from its own checkpoint (--resume), from others' (--init: fine-tuning),
# or from a random draw; weights set the model's shape, so the shape flags are for a random draw.

SHAPE_FLAGS = ("n_layer", "n_head", "n_embd", "block_size")


def model_config(shape, vocab_size, seq_len, weights=None):
    """The run's GPTConfig: a shape flag left out (None) takes the value of `weights` (a config dict), or 124M's."""
    shape_of = weights or asdict(GPTConfig())
    config = GPTConfig(vocab_size=vocab_size, **{k: shape_of.get(k) if v is None else v for k, v in shape.items()})
    guard.check_shape(config, seq_len)
    return config


def build_model(args, device):
    """The run's GPT on `device`, and the path and contents of the checkpoint --resume continues (or None)."""
    path, checkpoint = guard.checkpoint_to_resume(args.resume, args.log_dir, load_checkpoint, not args.eval_only)
    shape = {name: getattr(args, name) for name in SHAPE_FLAGS}
    if checkpoint is not None:
        config = model_config(shape, args.vocab_size, args.seq_len, checkpoint["config"])
        guard.check_same_model(checkpoint["config"], config, path)
        guard.check_resumable(checkpoint, path)
        model = GPT(config)
        load_weights(model, checkpoint["model"], source=path)
    elif args.init:
        init_config, state = read_weights(args.init)
        config = model_config(shape, args.vocab_size, args.seq_len, asdict(init_config))
        guard.check_same_shape(asdict(init_config), config, SHAPE_FLAGS, args.init)
        model = GPT(config)
        load_weights(model, hf_format.padded_vocabulary(state, config.vocab_size), source=args.init)
    else:
        model = GPT(model_config(shape, args.vocab_size, args.seq_len))
    return model.to(device), path, checkpoint


def validation_data(args, procs):
    """The val split's loader and how many of its batches an evaluation reads (--val_tokens, at most all)."""
    val_loader = DataLoaderLite(args.data_dir, args.batch_size, args.seq_len, procs.rank, procs.world_size, "val")
    return val_loader, min(args.val_tokens // val_loader.window, val_loader.steps_per_epoch()) or 1


@dataclass
class Run:
    """What a training run sets up once, for the steps of its loop to use."""

    args: argparse.Namespace
    procs: Processes
    device: torch.device
    model: GPT  # the weights, as checkpoints, HellaSwag and sampling see them
    forward_model: nn.Module  # model, compiled where --compile is on: the training and val forward
    step_model: nn.Module  # forward_model, in DDP under torchrun: what train_step runs
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # loss scaling, for fp16 only
    train_loader: DataLoaderLite
    val_loader: DataLoaderLite
    val_steps: int  # batches of the val split per evaluation
    val_rows: int  # sequences per forward pass in an evaluation: --batch_size, or fewer where memory is short
    grad_accum_steps: int
    autocast: torch.autocast
    start_step: int
    eval_pending: bool  # the checkpoint's evaluation was cut short by a signal: do it before the first step
    hellaswag: object  # (model, stop) -> acc_norm, or None when off
    log: object  # log.txt, open on rank 0 only
    mfu_flops: float  # the model's arithmetic in one step over the devices' peak FLOP/s; None if unknown
    prompt: str  # what the samples at each evaluation continue


def set_up_run(args, device, procs):
    """The model, optimizer, data and evaluations of a run, from scratch or from a checkpoint; prints them."""
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    devices.use_fast_math(device)
    dtype, dtype_reason = devices.pick_autocast_dtype(args.dtype, device)
    B, T = args.batch_size, args.seq_len
    train_loader = DataLoaderLite(
        args.data_dir, B, T, procs.rank, procs.world_size, "train", args.total_batch_size, args.shuffle, args.seed
    )
    val_loader, val_steps = validation_data(args, procs)
    model, path, checkpoint = build_model(args, device)  # path: of the checkpoint --resume continues, or None
    num_params = sum(p.numel() for p in model.parameters())
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    memory = devices.check_training_fits(model.config, num_params, args, procs.world_size, device, use_compile)
    val_rows = devices.evaluation_rows(model.config, num_params, B, T, device)  # fewer than B where memory is short
    betas = (args.beta1, args.beta2)
    optimizer = configure_optimizer(model, args.weight_decay, args.max_lr, betas, args.eps, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start_step, eval_pending = resume_or_start(args, procs, device, optimizer, scaler, train_loader, checkpoint, path)

    forward_model = torch.compile(model) if use_compile else model
    step_model = forward_model
    if procs.ddp:
        step_model = nn.parallel.DistributedDataParallel(
            forward_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    enc = gpt2_tokenizer()
    acc_norm = hellaswag.in_loop_eval(args.hellaswag_data, enc, procs, val_rows, dtype) if args.hellaswag else None

    grad_accum_steps = args.total_batch_size // (B * T * procs.world_size)
    peak_flops = args.peak_flops or devices.device_peak_flops(device)
    flops_per_step = devices.flops_per_token(model.config, T, num_params) * args.total_batch_size
    procs.print(progress.start_block(
        args, procs.world_size, device, use_compile, dtype, dtype_reason, num_params, model.config, memory,
        (start_step, args.max_steps - 1, grad_accum_steps), (train_loader, val_loader, val_steps * val_loader.window),
    ))  # fmt: skip
    prompt = sample_prompt(args, val_loader, enc, model.config.block_size)  # checked before log.txt is opened
    log = guard.open_log(args.log_dir, args.resume) if procs.master else None
    return Run(
        args, procs, device, model, forward_model, step_model, optimizer, scaler, train_loader, val_loader,
        val_steps, val_rows, grad_accum_steps, devices.autocast_context(device, dtype), start_step, eval_pending,
        acc_norm, log, flops_per_step / (peak_flops * procs.world_size) if peak_flops else None, prompt,
    )  # fmt: skip


def resume_or_start(args, procs, device, optimizer, scaler, train_loader, checkpoint, path):
    """(first step, whether its evaluation is still to do): the checkpoint at `path` restored, or a new run checked."""
    start_step, eval_pending = 0, False
    if checkpoint is not None:
        start_step = restore_checkpoint(checkpoint, optimizer, scaler, train_loader, device)
        guard.check_steps_left(start_step, args.max_steps)
        eval_pending = checkpoint.get("eval_pending", False)
        in_log_dir, then = guard.in_folder(path, args.log_dir), checkpoint.get("args", {})
        procs.print(progress.resumed(path, start_step, args.log_dir, in_log_dir, then, args.val_tokens))
    else:
        guard.check_new_run(args.log_dir)
    if procs.master:
        guard.remove_stale_checkpoints(args.log_dir)
    return start_step, eval_pending


# -----------------------------------------------------------------------------
# The training loop: set up (or resume), then per step: the learning rate, the step, the loss over ranks,
# a check that it is finite, its line; now and then an evaluation and a checkpoint.


def train(args, device, procs):
    run = set_up_run(args, device, procs)
    stop = guard.StopRequest()
    last_step = args.max_steps - 1
    report = progress.Progress(run.start_step, last_step)
    if run.eval_pending or (args.eval_first and not args.resume):  # a resume evaluated its step already
        evaluate_and_sample(run, report, run.start_step - 1, stop)
    epoch = run.train_loader.epoch
    for step in range(run.start_step, args.max_steps):
        t0 = time.perf_counter()
        lr = get_lr(step, args.max_lr, args.min_lr, args.warmup_steps, args.max_steps)
        loss, norm = train_step(run.step_model, run.optimizer, run.scaler, run.train_loader, run.grad_accum_steps,
                                lr, args.grad_clip, run.autocast)  # fmt: skip
        train_loss, stop_now = mean_loss_and_stop_flag(loss, stop.requested, procs)
        guard.check_finite(train_loss, norm, run.scaler.is_enabled(), step, args.log_dir)
        if device.type == "cuda":
            torch.cuda.synchronize()  # so that dt measures the step, not just its launch
        report_step(run, report, step, train_loss, lr, norm, time.perf_counter() - t0)
        if run.train_loader.epoch != epoch:  # the step read the epoch's last sequences
            epoch = run.train_loader.epoch
            procs.print(f"epoch {epoch - 1} done at step {step}: {(step + 1) * args.total_batch_size:,} tokens seen")
        eval_pending = False
        if (step + 1) % args.eval_every == 0 or step == last_step:
            eval_pending = not evaluate_and_sample(run, report, step, stop)
            stop_now = procs.any(stop.requested, device)  # a signal may have come during the evaluation
        if procs.master:
            run.log.flush()
        if (step + 1) % args.ckpt_every == 0 or step == last_step or stop_now:
            save_run(run, report, step, eval_pending)
            if stop_now:
                procs.print(f"stopped after step {step}; continue with --resume")
                break
    if procs.master:
        run.log.close()
        progress.print_summary(report, os.path.join(args.log_dir, "log.txt"), run.prompt)


def report_step(run, report, step, train_loss, lr, norm, dt):
    """The step's line on stdout (where the run is, how fast it goes) and its loss in log.txt."""
    mfu = run.mfu_flops / dt if run.mfu_flops else None
    tokens, memory = run.args.total_batch_size, devices.peak_memory_gib(run.device)
    run.procs.print(progress.step_line(report, step, train_loss, lr, norm.item(), dt, tokens, mfu, memory), flush=True)
    if run.procs.master:
        run.log.write(f"{step} train {train_loss:.6f}\n")


def evaluate_and_sample(run, report, step, stop):
    """Val loss and HellaSwag (all ranks) and a few samples (rank 0), logged. A stop request cuts them short
    (nothing unfinished is reported); returns whether they ran to the end (a resume does them again if not)."""
    procs, started = run.procs, time.time()
    val_loss = validation_loss(
        run.forward_model, run.val_loader, run.val_steps, run.autocast, procs, stop, run.val_rows
    )
    if not stop.requested:
        procs.print(f"{report.label(step)} | val loss {val_loss:.4f} | {time.time() - started:.1f} s")
        report.val_done(step, val_loss)
        if procs.master:
            run.log.write(f"{step} val {val_loss:.4f}\n")
    if run.hellaswag:
        started = time.time()
        acc_norm = run.hellaswag(run.model, stop)  # uncompiled: its row lengths vary
        if not stop.requested:
            procs.print(f"{report.label(step)} | hellaswag acc_norm {acc_norm:.4f} | {time.time() - started:.1f} s")
            report.hellaswag = acc_norm
            if procs.master:
                run.log.write(f"{step} hella {acc_norm:.4f}\n")
    if procs.master and run.args.sample_every_eval and not stop.requested:
        started, enc, prompt = time.time(), gpt2_tokenizer(), run.prompt
        texts = sample_texts(run.model, enc, prompt, num_samples=4, max_new_tokens=SAMPLE_TOKENS, autocast=run.autocast)
        for i, text in enumerate(texts):
            print(f"sample {i}: {text}")
        print(f"{report.label(step)} | 4 samples | {time.time() - started:.1f} s")
    if stop.requested:
        procs.print(f"{report.label(step)} | evaluation cut short by the stop request; a resume does it again")
    return not stop.requested


def save_run(run, report, step, eval_pending):
    """Rank 0's checkpoint after `step`, once every rank has checked that the weights are finite."""
    guard.check_finite_weights(run.model, step, run.args.log_dir)
    if run.procs.master:
        path = os.path.join(run.args.log_dir, f"model_{step:05d}.pt")
        state = checkpoint_state(
            run.model, run.optimizer, run.scaler, step, eval_pending, run.train_loader, run.device, run.args
        )
        save_checkpoint(path, state)
        print(f"saved {path}", flush=True)
        report.checkpoint = path


def evaluate_only(args, device, procs):
    """--eval_only: the val loss of the --init or --resume weights, and their HellaSwag acc_norm when its data
    is at hand, each with its time. Every rank scores its share. No file is written, not even the log folder."""
    devices.use_fast_math(device)
    dtype, dtype_reason = devices.pick_autocast_dtype(args.dtype, device)
    val_loader, val_steps = validation_data(args, procs)
    model, path, _ = build_model(args, device)
    num_params = sum(p.numel() for p in model.parameters())
    rows = devices.evaluation_rows(model.config, num_params, args.batch_size, args.seq_len, device)
    procs.print(progress.eval_only_block(path or args.init, num_params, procs.world_size, device, dtype, dtype_reason,
                                         args.data_dir, val_steps * val_loader.window, val_loader, rows))  # fmt: skip
    enc = gpt2_tokenizer()
    acc_norm = args.hellaswag and hellaswag.in_loop_eval(args.hellaswag_data, enc, procs, rows, dtype, download=False)
    started = time.time()  # not compiled: one pass over the val tokens would spend longer compiling than it saves
    val_loss = validation_loss(model, val_loader, val_steps, devices.autocast_context(device, dtype), procs, None, rows)
    procs.print(f"val loss {val_loss:.6f} | {time.time() - started:.1f} s")
    if acc_norm:
        started = time.time()
        procs.print(f"hellaswag acc_norm {acc_norm(model):.4f} | {time.time() - started:.1f} s")


# -----------------------------------------------------------------------------
# main(): the flags, one process or a torchrun group, then the run.


def main(argv=None):
    args = parse_args(argv)
    procs = torchrun_processes()
    guard.check_args(args, procs.world_size)
    device = devices.pick_device(args.device)
    if device.type == "cuda" and procs.ddp:
        device = torch.device("cuda", procs.local_rank)
        torch.cuda.set_device(device)
    if procs.ddp:  # every rank waits here for the others (guard.join_group says so when they are started by hand)
        guard.join_group(procs, backend="nccl" if device.type == "cuda" else "gloo")
    # --eval_only writes nothing, so it needs no lock. In a group, the first rank's error is said once, named.
    lock = contextlib.nullcontext() if args.eval_only else guard.log_dir_lock(args.log_dir, procs, device)
    try:
        with guard.one_error_line(procs), lock:
            (evaluate_only if args.eval_only else train)(args, device, procs)
    except torch.OutOfMemoryError:
        advice = devices.LOWER_BATCH_SIZE.format(args.batch_size, args.total_batch_size)
        raise devices.out_of_memory(device, advice) from None
    finally:
        if procs.ddp:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_cli(main, interrupted="stopped at once, without saving; --resume takes the last checkpoint, if any", group=True)
