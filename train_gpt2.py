"""GPT-2 (124M) from scratch, in the lecture's order: the network, OpenAI's weights, the data
loader, the validation loss, AdamW and its schedule, the torchrun group and DDP, mixed precision,
the training step, checkpoints, sampling, the loop and main(). Importing it does no work. A call
into `machinery` (clear errors, file formats, progress lines, HellaSwag) is one line a reader may
skip."""

import contextlib
import functools
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from machinery import (
    checkpoints,
    cli,
    devices,
    flags,
    hellaswag,
    hf_format,
    progress,
    shards,
    tokenizer,
    torchrun,
)
from machinery.cli import UserError
from machinery.files import atomic_write
from machinery.tokenizer import GPT2_VOCAB_SIZE, gpt2_tokenizer

# -----------------------------------------------------------------------------
# The model. GPT-2 is a stack of identical pre-LayerNorm transformer blocks between a token+position
# embedding and a final LayerNorm; the output head shares its weight with the token embedding.
# Module names follow OpenAI's checkpoint (transformer.h.0.attn.c_attn, ...) so its weights map 1:1.


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context the position embedding covers
    vocab_size: int = 50257  # rows of the embedding: 50257 tokens, or padded (50304 in training)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768  # OpenAI's four sizes (124M to 1558M): flags.GPT2_SIZES, shapes in MODELS


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        # query, key and value of all heads at once; then back into the residual stream
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, kv_cache=None, attn_mask=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size): each head attends on its own slice of the channels
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if kv_cache is not None:  # generation: earlier positions' keys and values from the cache
            k, v = kv_cache.append(k, v)
        # Causal: each position sees itself and the ones before it (flash attention where there is
        # one); a single new token sees the whole cache. hellaswag's packed rows bring a mask.
        causal = attn_mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
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
    """One layer's keys and values of the positions so far, preallocated for max_len: generating
    a token then needs a forward pass over that token alone."""

    def __init__(self, max_len):
        self.max_len, self.length = max_len, 0
        self.keys = self.values = None  # allocated on first use, in the dtype autocast gives k, v

    def append(self, k, v):
        """Store k, v of shape (B, n_head, T, head_size); return those of all positions so far."""
        T = k.size(2)
        assert self.length == 0 or T == 1, "the prompt at once, then one token at a time"
        if self.keys is None:
            shape = (*k.shape[:2], self.max_len, k.size(3))  # (B, n_head, max_len, head_size)
            self.keys, self.values = k.new_empty(shape), v.new_empty(shape)
        self.keys[:, :, self.length : self.length + T] = k
        self.values[:, :, self.length : self.length + T] = v
        self.length += T
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.activation_checkpointing = False  # True: each block is recomputed in the backward
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
                wpe=nn.Embedding(config.block_size, config.n_embd),  # position embedding
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
        """idx, targets: (B, T) token ids -> logits (B, T, 50257), mean cross-entropy (or None)."""
        logits = self.logits(self.hidden_states(idx))
        loss = None
        if targets is not None:  # (B, T, V) -> (B*T, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def hidden_states(self, idx, kv_caches=None, positions=None, attn_mask=None):
        """(B, T) token ids -> (B, T, n_embd), the input of logits() (apart: generate() needs the
        last position's logits only). Rows start at position 0, or where kv_caches (one KVCache per
        layer) end; hellaswag packs sequences in a row and passes positions (B, T) and attn_mask."""
        T = idx.size(1)
        if positions is None:
            start = kv_caches[0].length if kv_caches else 0
            assert start + T <= self.config.block_size, f"{start + T} tokens, past block_size"
            positions = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)  # (B, T, C) + (T, C)
        for i, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and torch.is_grad_enabled():  # keep only x, not all
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)  # recomputed
            else:
                x = block(x, kv_caches[i] if kv_caches else None, attn_mask)
        return self.transformer.ln_f(x)

    def logits(self, hidden):
        """(..., n_embd) hidden states -> (..., 50257) next-token logits, through the tied head."""
        return self.lm_head(hidden)[..., : self.n_real_tokens]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Continue each row of idx (B, T) by max_new_tokens tokens -> (B, T + max_new_tokens).
        temperature=0 picks the most likely token; top_k keeps the k most likely (GPT-2 used 50)."""
        total = idx.size(1) + max_new_tokens
        if total > self.config.block_size:
            raise UserError(
                f"prompt ({idx.size(1)} tokens) + {max_new_tokens} new tokens exceeds the context "
                f"window of {self.config.block_size}: shorten the prompt or ask for fewer tokens"
            )
        kv_caches = [KVCache(total) for _ in range(self.config.n_layer)]
        hidden = self.hidden_states(idx, kv_caches=kv_caches)  # the prompt fills the caches at once
        for _ in range(max_new_tokens):
            logits = self.logits(hidden[:, -1]).float()  # (B, vocab): the last position predicts
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                candidates = None  # None: every token of the vocabulary
                if top_k is not None:  # the k best only: also far cheaper than 50257 tokens
                    logits, candidates = torch.topk(logits, min(top_k, logits.size(-1)))  # (B, k)
                probs = F.softmax(logits, dim=-1)
                next_token = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
                if candidates is not None:
                    next_token = candidates.gather(-1, next_token)  # position among k -> token id
            idx = torch.cat([idx, next_token], dim=1)
            if idx.size(1) < total:  # the last token needs no forward pass: nothing follows it
                hidden = self.hidden_states(next_token, kv_caches=kv_caches)
        return idx

    @classmethod
    def from_pretrained(cls, name_or_path):
        """OpenAI's GPT-2: a hub name (gpt2 ... gpt2-xl) or a Hugging Face directory."""
        config, state = openai_weights(name_or_path)
        model = cls(config)
        load_weights(model, state, source=name_or_path)
        return model


# -----------------------------------------------------------------------------
# OpenAI's weights, in Hugging Face's format, to check this model against the original (its logits
# equal GPT2LMHeadModel's) and to start from them. What matters here: OpenAI used Conv1D layers,
# which store a weight as (in, out), the transpose of nn.Linear's (out, in).


def openai_weights(name_or_path):
    """The GPTConfig and the state dict (in this model's layout) of OpenAI's GPT-2."""
    config, hf_state, source = hf_format.read_gpt2(name_or_path, flags.GPT2_SIZES)
    checkpoints.check_config(config, source, GPTConfig)
    state = {k: v.t() if k.endswith(hf_format.CONV1D_WEIGHTS) else v for k, v in hf_state.items()}
    return GPTConfig(**config), state


def load_weights(model, state, source):
    """Copy state into model, once every name and shape is checked to fit."""
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # it is wte
    checkpoints.check_weights_fit(expected, state, source)
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(state[key])


# -----------------------------------------------------------------------------
# The data loader. fineweb.py tokenizes the corpus into shards of uint16 tokens (llm.c's .bin shards
# work too), memory-mapped, so that a 10B-token corpus costs no RAM. A step reads total_batch_size
# tokens, and each micro-step of each rank its own B*T slice of them.


def load_shard(path):
    """One shard's tokens as a 1-D uint16 array, memory-mapped: fineweb.py's .npy, or llm.c's .bin
    (a header of 256 int32, then the tokens). A file that is neither is said in one line."""
    with shards.reading(path):
        if path.endswith(".bin"):
            shape, offset = (shards.bin_header_tokens(path),), shards.BIN_HEADER_BYTES
            tokens = np.memmap(path, dtype=np.uint16, mode="r", offset=offset, shape=shape)
        else:
            tokens = np.load(path, mmap_mode="r")
    return shards.check_tokens(path, tokens)


class DataLoaderLite:
    """This rank's batches of B sequences of T tokens from one split. Shards are cut into windows of
    T+1 tokens (T inputs and, one later, T targets), and a step takes the next S = step_tokens/T
    windows of the epoch's stream: micro-step m of rank r reads block m * world_size + r of them. So
    a step reads the same sequences on any number of processes, and one global position is the
    state. In order (the lecture's loader) a step never crosses a shard's end; shuffled, each epoch
    reads the shards, and each shard's windows, in an order drawn from the seed and the epoch."""

    def __init__(self, data_dir, B, T, rank, num_processes, split, step_tokens=None, shuffle=False,
                 seed=0):  # fmt: skip
        self.B, self.T = B, T
        self.process_rank, self.num_processes = rank, num_processes
        self.shuffle, self.seed = shuffle, seed
        self.window = step_tokens or B * T * num_processes  # tokens of all ranks in one step
        self.step_sequences = self.window // T  # S; the flags make a step whole micro-steps
        self.micro_steps = self.window // (B * T * num_processes)
        paths = shards.find(data_dir, split)  # PREFIX_{train,val}_NNNNNN.npy (or .bin), in order
        self.shards = [load_shard(p) for p in paths]
        self.data = shards.fingerprint(paths, self.shards)  # saved with the state: a resume checks
        self.windows = np.array([(len(tokens) - 1) // T for tokens in self.shards])  # per shard
        # The windows each shard puts in the stream: all of them shuffled; in order, whole steps
        # only (a shard shorter than a step, such as fineweb.py's last, is skipped and counted).
        steps_only = self.windows // self.step_sequences * self.step_sequences
        self.used = self.windows if shuffle else steps_only
        self.epoch_sequences = int(self.used.sum()) // self.step_sequences * self.step_sequences
        if self.epoch_sequences == 0:
            raise shards.no_step_in_split(paths, self.shards, self.window, split)
        self.reset()

    def reset(self):
        self.epoch, self.sequence, self.micro_step = 0, 0, 0  # sequence: the step's first

    def steps_per_epoch(self):
        return self.epoch_sequences // self.step_sequences

    def next_batch(self):
        """x, y of shape (B, T): this rank's inputs and, one token later, their targets."""
        block = self.micro_step * self.num_processes + self.process_rank
        first = self.sequence + block * self.B
        rows = [
            self.shards[s][k * self.T : (k + 1) * self.T + 1] for s, k in self.windows_at(first)
        ]
        buf = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T+1), from the memory map
        x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
        self.micro_step += 1
        if self.micro_step == self.micro_steps:  # the step's sequences are used: all move on
            self.micro_step = 0
            self.sequence += self.step_sequences
            if self.sequence == self.epoch_sequences:  # the epoch is over: the next one starts
                self.epoch, self.sequence = self.epoch + 1, 0
        return x, y

    def windows_at(self, first):
        """(shard, window) of the B sequences of this epoch's stream from sequence `first` on."""
        shuffled = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
        order = shuffled if self.shuffle else np.arange(len(self.shards))
        starts = np.cumsum(self.used[order]) - self.used[order]  # each shard's first sequence
        for sequence in range(first, first + self.B):
            position = np.searchsorted(starts, sequence, side="right") - 1
            shard, k = int(order[position]), sequence - int(starts[position])
            if self.shuffle:
                k = int(window_order(self.seed, self.epoch, shard, int(self.windows[shard]))[k])
            yield shard, k

    # Where the next step starts (the same on every rank), with what a resume must find unchanged.
    def state_dict(self):
        return dict(epoch=self.epoch, sequence=self.sequence, seq_len=self.T, seed=self.seed,
                    step_tokens=self.window, shuffle=self.shuffle, data=self.data)  # fmt: skip

    def load_state_dict(self, state):
        """Continue where `state` ends; data, step, sequence length and order must be the same."""
        shards.check_loader_state(state, self)
        self.epoch, self.micro_step = state["epoch"], 0
        if "sequence" in state:
            self.sequence = state["sequence"]
        else:  # a checkpoint from before the stream of sequences: a shard and a position in it
            self.sequence = int(self.used[: state["shard"]].sum()) + state["position"] // self.T


@functools.lru_cache(maxsize=4)
def window_order(seed, epoch, shard, windows):
    """A shard's windows in an epoch, from a generator of its own: a rank draws what it reads."""
    return np.random.default_rng([seed, epoch, shard]).permutation(windows)


# -----------------------------------------------------------------------------
# The validation loss: the mean loss on a fixed stretch of the validation split, the same tokens
# every time, so that the curve compares across steps (and with OpenAI's GPT-2: 3.2924 on
# FineWeb-edu).


@torch.no_grad()
def validation_loss(model, val_loader, steps, autocast, procs, stop=None, rows=None):
    """Mean loss over `steps` batches from the start of the val split, averaged over ranks, `rows`
    sequences per forward pass (default: the batch). A stop request ends the loop between batches
    (the result is then meaningless), on every rank at once: none is left waiting for the others."""
    device = next(model.parameters()).device
    model.eval()
    val_loader.reset()
    loss_sum = torch.zeros((), device=device)
    for _ in range(steps):
        if stop is not None and stop.agreed():
            break
        x, y = val_loader.next_batch()  # (B, T) each
        for xs, ys in zip(x.split(rows or len(x)), y.split(rows or len(x))):  # (rows, T) at a time
            with autocast:
                _, loss = model(xs.to(device), ys.to(device))
            loss_sum += loss.detach() * (len(xs) / len(x))  # the batch's mean, from its parts'
    model.train()
    return procs.mean(loss_sum).item() / steps


# -----------------------------------------------------------------------------
# Optimisation: AdamW with decoupled weight decay on the matrices only (decaying biases and
# LayerNorm gains just fights the normalisation), a linear warmup, then cosine decay to min_lr.


def configure_optimizer(model, weight_decay, lr, betas, eps, device_type, shard=False, fused=None):
    """AdamW, or ZeRO-1 with shard; fused (default on CUDA): one kernel updates every parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # matmul weights and embeddings
    no_decay = [p for p in params if p.dim() < 2]  # biases and LayerNorm parameters
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]  # fmt: skip
    fused = device_type == "cuda" if fused is None else fused
    if shard:  # PyTorch's ZeroRedundancyOptimizer over AdamW: the same steps, 1/ranks the moments
        return torchrun.sharded_adamw(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def get_lr(step, max_lr, min_lr, warmup_steps, max_steps):
    """Learning rate of 0-based `step`: linear warmup to max_lr, cosine decay to min_lr."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    decay_ratio = (step - warmup_steps) / (max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * decay_ratio)) * (max_lr - min_lr)


# -----------------------------------------------------------------------------
# The torchrun group. torchrun starts one process per GPU (or CPU worker, with gloo) and sets RANK,
# LOCAL_RANK and WORLD_SIZE in each; every rank reads its own slice of each batch, and DDP averages
# their gradients. Without torchrun: one process.


def join_group(group, device):
    """This process's place in the torchrun group (rank, local rank, world size), all joined."""
    if group is None:
        return torchrun.Processes()
    procs = torchrun.Processes(True, *group)
    with torchrun.waiting_for_peers(procs):  # says so, and lets Ctrl-C end the wait
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return procs


def mean_loss_and_stop_flag(loss, stop_requested, procs):
    """The loss averaged over ranks and whether any rank must stop, in one all_reduce."""
    stats = torch.stack([loss, torch.tensor(float(stop_requested), device=loss.device)])
    if procs.ddp:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    return stats[0].item() / procs.world_size, stats[1].item() > 0


# -----------------------------------------------------------------------------
# Mixed precision. TF32 lets the fp32 matmuls of a GPU use its tensor cores; autocast runs the
# matmuls in bf16 (fp16 with a loss scaler on GPUs without bf16) and keeps fp32 where precision
# matters (softmax, norms, the loss). Weights, gradients and AdamW's moments stay fp32.


def mixed_precision(requested, device):
    """(dtype, why it was chosen, the autocast context): built once, entered as `with autocast:`."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32
    devices.speed_up_cpu(device)  # flush denormals, keep freed memory: no result changes
    dtype, reason = devices.pick_autocast_dtype(requested, device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    return dtype, reason, autocast


# -----------------------------------------------------------------------------
# The training step: total_batch_size tokens, read as grad_accum_steps micro-batches of B x T per
# process. Gradients add up over the micro-steps, are clipped to a global norm, and AdamW applies
# them.


def train_step(step_model, optimizer, scaler, loader, grad_accum_steps, lr, grad_clip, autocast):
    """One optimizer step; this process's mean loss and the gradient norm before clipping (tensors).
    step_model: the GPT as training runs it (compiled and/or in DDP); scaler: on for fp16 only."""
    device = next(step_model.parameters()).device
    ddp = isinstance(step_model, nn.parallel.DistributedDataParallel)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(grad_accum_steps):
        x, y = loader.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # DDP averages gradients across ranks on the last micro-step; before, they add up locally.
        last_micro_step = micro_step == grad_accum_steps - 1
        if torchrun.is_fully_sharded(step_model):  # FSDP2: the same, by reduce-scattering once
            step_model.set_requires_gradient_sync(last_micro_step)
        with contextlib.nullcontext() if last_micro_step or not ddp else step_model.no_sync():
            with autocast:
                _, loss = step_model(x, y)
            loss = loss / grad_accum_steps  # backward of the mean over micro-steps, not their sum
            loss_sum += loss.detach()
            scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    # grad_clip 0: no clipping (an infinite bound scales every gradient by exactly 1)
    norm = torch.nn.utils.clip_grad_norm_(step_model.parameters(), grad_clip or math.inf)
    for group in optimizer.param_groups:
        group["lr"] = lr
    scaler.step(optimizer)  # with fp16, skipped when the gradients overflowed
    scaler.update()
    return loss_sum, norm


# -----------------------------------------------------------------------------
# Checkpoints hold all a run needs to go on at the same token with the same numbers: weights,
# optimizer moments, step, data position, RNG states, the config. Written atomically (a crash leaves
# the last intact), and checked whole when read (a file damaged on disk is said as such).


def save_checkpoint(path, state):
    with atomic_write(path) as f:
        torch.save(state, f)


def checkpoint_state(model, weights, moments, scaler, step, loaders, device, args, eval_pending):
    """What a checkpoint holds after `step`, with the model's and AdamW's whole state dicts."""
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return dict(model=weights, optimizer=moments, step=step, scaler=scaler.state_dict(),
                eval_pending=eval_pending, rng=rng, loader=loaders[0].state_dict(),
                val_data=loaders[1].data, config=asdict(model.config), args=vars(args))  # fmt: skip


def load_checkpoint(path):
    """A checkpoint of this project. weights_only=True: a downloaded file cannot run code."""
    with checkpoints.reading(path):  # missing, damaged on disk, or not a checkpoint: one line
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoints.check_checkpoint(checkpoint, path, GPTConfig)
    return checkpoint


def restore_checkpoint(checkpoint, model, optimizer, scaler, loaders, device):
    """Restore all but the weights (loaded already) as after the checkpoint's step: the next."""
    torchrun.load_optimizer_state(model, optimizer, checkpoint["optimizer"])  # sharded or not
    if checkpoint["scaler"]:  # empty where the run was not in fp16: fp16 then starts afresh
        scaler.load_state_dict(checkpoint["scaler"])
    train_loader, val_loader = loaders
    train_loader.load_state_dict(checkpoint["loader"])
    shards.check_same_data(checkpoint.get("val_data", val_loader.data), val_loader.data, "val")
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if device.type == "cuda" and "cuda" in checkpoint["rng"]:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
    return checkpoint["step"] + 1


def read_weights(init):
    """GPTConfig and state dict of an OpenAI size, a Hugging Face folder, or log/model_XXXXX.pt."""
    if init in flags.GPT2_SIZES or os.path.isdir(init):
        return openai_weights(init)
    if os.path.isfile(init):
        checkpoint = load_checkpoint(init)
        return GPTConfig(**checkpoint["config"]), checkpoint["model"]
    sizes = ", ".join(flags.GPT2_SIZES)
    raise UserError(f"--init {init!r} is not a file, a directory, or one of {sizes}")


def load_model(init, device="cpu"):
    """A GPT holding the weights of `init` (as read_weights reads them), for inference on device."""
    config, state = read_weights(init)
    model = GPT(config)
    load_weights(model, state, source=init)
    return model.to(device).eval()


# -----------------------------------------------------------------------------
# Sampling: continuations of a prompt, for the samples printed during training and for sample.py.
SAMPLE_TOKENS = 32  # what each sample printed at an evaluation adds to its prompt


def sample_texts(model, enc, prompt, *, num_samples, max_new_tokens, temperature=1.0, top_k=50,
                 seed=42, autocast):  # fmt: skip
    """The prompt and its continuations, one string per sample. An empty prompt: a new document."""
    device = next(model.parameters()).device
    prompt_ids = enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [enc.eot_token]
    idx = torch.tensor([prompt_ids] * num_samples, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)  # the same samples at each call
    with autocast:
        out = model.generate(idx, max_new_tokens, temperature, top_k, generator=generator)
    return [enc.decode(row.tolist()) for row in out]


def sample_prompt(args, val_loader, enc, block_size):
    """--sample_prompt, or the first line of the val split's first 8 tokens: its own words."""
    first_line = enc.decode(val_loader.shards[0][1:9].tolist()).strip().split("\n")[0]
    prompt = first_line if args.sample_prompt is None else args.sample_prompt
    if args.sample_every_eval:  # said now: a prompt too long would end the run at its first eval
        tokenizer.check_prompt_fits(prompt, enc, SAMPLE_TOKENS, block_size)
    return prompt


# -----------------------------------------------------------------------------
# Setting up a run. Its weights come from its own checkpoint (--resume), from others' (--init:
# fine-tuning), or from a random draw of the --model's shape, which the shape flags may change.


def build_model(args, device):
    """The run's GPT on `device`, and the path and contents of the checkpoint --resume continues."""
    path, checkpoint = checkpoints.to_resume(args.resume, args.log_dir, load_checkpoint,
                                             writes=not args.eval_only)  # fmt: skip
    if checkpoint is not None:
        config = model_config(args, checkpoint["config"])
        checkpoints.check_same_model(checkpoint["config"], config, path)
        checkpoints.check_checkpoint(checkpoint, path, GPTConfig, resume=True)
        model = GPT(config)
        load_weights(model, checkpoint["model"], source=path)
    elif args.init:
        init_config, state = read_weights(args.init)
        config = model_config(args, asdict(init_config))
        checkpoints.check_same_model(asdict(init_config), config, args.init, flags.SHAPE_FLAGS)
        model = GPT(config)
        state = hf_format.padded_vocabulary(state, config.vocab_size)
        load_weights(model, state, source=args.init)
    else:
        model = GPT(model_config(args))
    return model.to(device), path, checkpoint


def model_config(args, weights=None):
    """The run's GPTConfig: a shape flag left out takes the weights' (a dict), or the --model's."""
    shape_of = weights or flags.shape(args.model)
    shape = {k: getattr(args, k) or shape_of.get(k) for k in flags.SHAPE_FLAGS}  # None or > 0
    config = GPTConfig(vocab_size=args.vocab_size, **shape)
    checkpoints.check_shape(config, args.seq_len)
    return config


def validation_data(args, procs):
    """The val split's loader and how many of its batches an evaluation reads (--val_tokens)."""
    B, T = args.batch_size, args.seq_len
    val_loader = DataLoaderLite(args.data_dir, B, T, procs.rank, procs.world_size, "val")
    return val_loader, min(args.val_tokens // val_loader.window, val_loader.steps_per_epoch()) or 1


@dataclass
class Evaluation:
    """What each evaluation reads and does: the val loss, HellaSwag, a few samples."""

    val_loader: DataLoaderLite
    val_steps: int  # batches of the val split per evaluation
    rows: int  # sequences per forward pass: --batch_size, or fewer where memory is short
    autocast: torch.autocast
    hellaswag: object  # (model, stop) -> acc_norm, or None when off
    prompt: str  # what the samples continue
    samples: bool  # whether to draw them

    def run(self, model, forward_model, procs, stop, report, log, step):
        """Each logged, on every rank; whether all ran to the end (a stop cuts them short)."""
        label, started = report.label(step), time.time()
        val_loss = validation_loss(forward_model, self.val_loader, self.val_steps, self.autocast,
                                   procs, stop, self.rows)  # fmt: skip
        cut = stop.agreed()  # the same on every rank, so that all go on to the same next part
        if not cut:
            procs.print(f"{label} | val loss {val_loss:.4f} | {progress.since(started)}")
            report.val_done(step, val_loss)
            log.write(f"{step} val {val_loss:.4f}")
        if self.hellaswag and not cut:
            started = time.time()
            acc_norm = self.hellaswag(model, stop)  # uncompiled: its row lengths vary
            cut = stop.agreed()
            if not cut:
                took = progress.since(started)
                procs.print(f"{label} | hellaswag acc_norm {acc_norm:.4f} | {took}")
                report.hellaswag = acc_norm
                log.write(f"{step} hella {acc_norm:.4f}")
        if self.samples and not cut and (procs.master or torchrun.is_fully_sharded(model)):
            started = time.time()
            texts = sample_texts(model, gpt2_tokenizer(), self.prompt, num_samples=4,
                                 max_new_tokens=SAMPLE_TOKENS, autocast=self.autocast)  # fmt: skip
            procs.print("\n".join(f"sample {i}: {text}" for i, text in enumerate(texts)))
            procs.print(f"{label} | 4 samples | {progress.since(started)}")
        if cut:
            redo = "; --resume redoes it" if step >= 0 else ""  # not the one before step 0
            procs.print(f"{label} | evaluation cut short by the stop request{redo}")
        return not cut


# -----------------------------------------------------------------------------
# The training loop: set up (or resume), then per step: the learning rate, the step, the loss over
# ranks, a check that it is finite, its line; now and then an evaluation and a checkpoint.


def train(args, device, procs):
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    dtype, dtype_reason, autocast = mixed_precision(args.dtype, device)
    B, T, world_size = args.batch_size, args.seq_len, procs.world_size
    last_step = args.max_steps - 1
    train_loader = DataLoaderLite(args.data_dir, B, T, procs.rank, world_size, "train",
                                  args.total_batch_size, args.shuffle, args.seed)  # fmt: skip
    val_loader, val_steps = validation_data(args, procs)
    model, path, checkpoint = build_model(args, device)  # path: of --resume's checkpoint, or None
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    memory = devices.check_training_fits(model, args, world_size, device, use_compile)
    rows = devices.evaluation_rows(model, B, T, device, procs)  # fewer than B if memory is short
    model.activation_checkpointing = args.activation_checkpointing
    if args.shard == "full":  # FSDP2, in place: the optimizer below holds this rank's shards only
        torchrun.fully_shard_model(model, dtype)
    optimizer = configure_optimizer(model, args.weight_decay, args.max_lr, (args.beta1, args.beta2),
                                    args.eps, device.type, args.shard == "optimizer")  # fmt: skip
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 only
    start_step, eval_pending, loaders = 0, False, (train_loader, val_loader)
    if checkpoint is not None:
        start_step = restore_checkpoint(checkpoint, model, optimizer, scaler, loaders, device)
        eval_pending = checkpoint.get("eval_pending", False)
        checkpoints.check_resumed_run(checkpoint, path, start_step, args)
        procs.print(progress.resumed(path, start_step, args, checkpoint.get("args", {})))
    if procs.master:
        checkpoints.remove_stale(args.log_dir)  # a write cut short: the one before is intact
    forward_model = torch.compile(model) if use_compile else model
    step_model = forward_model
    if procs.ddp and args.shard != "full":
        device_ids = [device.index] if device.type == "cuda" else None
        step_model = nn.parallel.DistributedDataParallel(forward_model, device_ids=device_ids)
    enc, grad_accum_steps = gpt2_tokenizer(), args.total_batch_size // (B * T * world_size)
    hella = args.hellaswag and hellaswag.evaluator(args.hellaswag_data, procs, device, rows, dtype)
    procs.print(progress.start_block(args, world_size, device, use_compile, dtype, dtype_reason,
                                     model, memory, (start_step, last_step, grad_accum_steps),
                                     (train_loader, val_loader, val_steps)))  # fmt: skip
    prompt = sample_prompt(args, val_loader, enc, model.config.block_size)
    evaluation = Evaluation(val_loader, val_steps, rows, autocast, hella or None, prompt,
                            args.sample_every_eval)  # fmt: skip
    mfu_flops = devices.step_flops_of_peak(model, args, device, world_size)  # None: peak unknown
    log = progress.RunLog(args.log_dir, args.resume, procs.master)
    stop = torchrun.StopRequest(procs, device)
    report = progress.Progress(start_step, last_step)

    def evaluate(step):
        return evaluation.run(model, forward_model, procs, stop, report, log, step)

    def save(step, eval_pending):
        checkpoints.check_finite_weights(model, step, args.log_dir, procs, device)  # none saves NaN
        weights, moments = torchrun.whole_state(model, optimizer, procs)  # rank 0 gets them all
        if procs.master:
            path = os.path.join(args.log_dir, f"model_{step:05d}.pt")
            save_checkpoint(path, checkpoint_state(model, weights, moments, scaler, step, loaders,
                                                   device, args, eval_pending))  # fmt: skip
            print(f"saved {path}", flush=True)
            report.checkpoint = path

    if eval_pending or (args.eval_first and not args.resume):  # a resume evaluated its step
        done = evaluate(start_step - 1)
        if eval_pending and start_step == args.max_steps:  # resumed only to finish the evaluation
            save(start_step - 1, eval_pending=not done)
    epoch = train_loader.epoch
    for step in range(start_step, args.max_steps):
        t0 = time.perf_counter()
        lr = get_lr(step, args.max_lr, args.min_lr, args.warmup_steps, args.max_steps)
        loss, norm = train_step(step_model, optimizer, scaler, train_loader, grad_accum_steps, lr,
                                args.grad_clip, autocast)  # fmt: skip
        train_loss, stop_now = mean_loss_and_stop_flag(loss, stop.requested, procs)
        checkpoints.check_finite(train_loss, norm, scaler.is_enabled(), step, args.log_dir)
        if device.type == "cuda":
            torch.cuda.synchronize()  # so that dt measures the step, not just its launch
        dt = time.perf_counter() - t0
        gib = devices.peak_memory_gib(device)
        procs.print(progress.step_line(report, step, train_loss, lr, norm.item(), dt, args,
                                       mfu_flops, gib), flush=True)  # fmt: skip
        log.write(f"{step} train {train_loss:.6f}")
        if train_loader.epoch != epoch:  # the step read the epoch's last sequences
            epoch = train_loader.epoch
            procs.print(progress.epoch_done(epoch - 1, step, args.total_batch_size))
        eval_pending = False
        if (step + 1) % args.eval_every == 0 or step == last_step:
            checkpoints.check_finite_weights(model, step, args.log_dir, procs, device)
            eval_pending = not evaluate(step)
            stop_now = procs.any(stop.requested, device)  # a signal may come during it
        if (step + 1) % args.ckpt_every == 0 or step == last_step or stop_now:
            save(step, eval_pending)
            if stop_now:
                procs.print(f"stopped after step {step}; continue with --resume")
                break
    log.close()
    if procs.master:
        progress.print_summary(report, os.path.join(args.log_dir, "log.txt"), prompt)


def evaluate_only(args, device, procs):
    """--eval_only: the val loss and HellaSwag of --init or --resume weights; no file written."""
    dtype, dtype_reason, autocast = mixed_precision(args.dtype, device)
    val_loader, val_steps = validation_data(args, procs)
    model, path, _ = build_model(args, device)
    rows = devices.evaluation_rows(model, args.batch_size, args.seq_len, device, procs)
    weights, world_size = path or args.init, procs.world_size
    procs.print(progress.eval_only_block(weights, model, world_size, device, dtype, dtype_reason,
                                         args.data_dir, val_loader, val_steps, rows))  # fmt: skip
    hella = args.hellaswag and hellaswag.evaluator(args.hellaswag_data, procs, device, rows, dtype,
                                                   download=False)  # fmt: skip
    started = time.time()  # not compiled: one pass over the val tokens costs less than compiling
    val_loss = validation_loss(model, val_loader, val_steps, autocast, procs, rows=rows)
    procs.print(f"val loss {val_loss:.6f} | {progress.since(started)}")
    if hella:
        started = time.time()
        procs.print(f"hellaswag acc_norm {hella(model):.4f} | {progress.since(started)}")


# -----------------------------------------------------------------------------
# main(): the flags, one process or a torchrun group, then the run.


def main(argv=None):
    args = flags.parse(argv)  # every hyperparameter, its default and why: train_gpt2.py --help
    group = torchrun.variables()  # (RANK, LOCAL_RANK, WORLD_SIZE) as torchrun sets them, or None
    flags.check(args, world_size=group[2] if group else 1)
    device = devices.pick_device(args.device)
    if device.type == "cuda" and group:
        device = torch.device("cuda", group[1])  # one GPU per process: LOCAL_RANK's
        torch.cuda.set_device(device)
    procs = join_group(group, device)  # every rank waits here for the others
    # --eval_only writes nothing, so it needs no lock. In a group, an error is said once, named.
    lock = torchrun.log_dir_lock(args.log_dir, procs, device)
    lock = contextlib.nullcontext() if args.eval_only else lock
    out_of_memory = devices.out_of_memory_said(device, devices.lower_batch_size(args))
    try:
        with torchrun.one_error_line(procs), lock, out_of_memory:
            (evaluate_only if args.eval_only else train)(args, device, procs)
    finally:
        if procs.ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    stopped = "stopped at once, without saving; --resume takes the last checkpoint, if any"
    cli.run_cli(main, interrupted=stopped, group=True)
