"""Hardening: bad inputs and faults across the scripts, as one table, and the drills that need real
processes.

Each row of the table names a script, sets up a folder for it, and states what must come of it: the
exit status, the files it may create, change or remove (none for a refusal), and a substring of its
last line. The test runs the script's main() in this process through run_cli, as its command line
would, and also checks that no traceback was printed. Rows cover every class of fault: numbers,
paths, data, resumes, foreign files, concurrency (a lock held by another process), out of memory and
divergence.

Below the table, with real processes: two trainers on one --log_dir and two fineweb.py on one --out
cannot both run; the data loader reads the same tokens per step for any number of processes, at
shard ends too, and a run resumed on 2 ranks from a 1-rank checkpoint continues on the 2-rank run's
stream; SIGTERM cuts an evaluation short; a second Ctrl-C exits at once without a traceback.
"""

import fnmatch
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np
import pytest
import torch

import export_hf
import fineweb
import hellaswag
import plot_log
import sample
import train_gpt2
from conftest import REPO, TINY_MODEL
from machinery.checkpoints import checkpoint_step
from machinery.cli import run_cli
from machinery.shards import BIN_HEADER_INTS, BIN_MAGIC, BIN_VERSION
from train_gpt2 import GPT, DataLoaderLite, GPTConfig, configure_optimizer

# 6 steps of 128 tokens: 4 sequences of 32, one process, one micro-step.
TINY_RUN = TINY_MODEL + [
    "--batch_size", "4", "--seq_len", "32", "--total_batch_size", "128", "--max_steps", "6",
    "--warmup_steps", "2",
    "--eval_every", "3", "--val_tokens", "256", "--no-hellaswag", "--no-sample_every_eval",
]  # fmt: skip
TINY_CONFIG = GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=4, n_embd=64)
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
TIMEOUT = 180


# --- the table ------------------------------------------------------------------------------------
# A row is a setup function, registered with @row(script, says, exit_code, changes). It gets a
# Workspace (a temporary folder with good shards in data/) and returns the script's argv.

ROWS = []


def row(script, says, exit_code=1, changes=()):
    """Register the decorated setup as a row: `script` (a main function) run on its argv must exit
    with exit_code, its last line must contain `says`, and only paths matching the globs in
    `changes` (relative to the workspace) may appear, change or disappear."""

    def register(setup):
        ROWS.append(pytest.param(script, setup, exit_code, changes, says, id=setup.__name__))
        return setup

    return register


class Workspace:
    """A temporary folder for one row: data/ holds a val and a train shard of random GPT-2 token
    ids."""

    def __init__(self, root, monkeypatch):
        self.root, self.monkeypatch = str(root), monkeypatch
        self.data, self.log = self.path("data"), self.path("log")
        os.makedirs(self.data)
        rng = np.random.default_rng(0)
        np.save(
            self.path("data/tiny_val_000000.npy"), rng.integers(0, 50257, 4096, dtype=np.uint16)
        )
        np.save(
            self.path("data/tiny_train_000001.npy"), rng.integers(0, 50257, 8192, dtype=np.uint16)
        )
        self.holders, self.servers = [], []

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def train(self, *flags):
        return [*TINY_RUN, "--data_dir", self.data, "--log_dir", self.log, *flags]

    def write(self, relative, content):
        path = self.path(relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
        return path

    def hold_lock(self, folder):
        """Another process that holds `folder`'s lock until the row ends."""
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, folder],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        self.holders.append(holder)
        assert holder.stdout.readline().strip() == "locked"

    def hold_port(self, port):
        """A server listening on 127.0.0.1:port until the row ends, as another program's would."""
        import socket

        self.servers.append(socket.create_server(("127.0.0.1", port)))

    def release(self):
        for holder in self.holders:
            holder.kill()
            holder.wait()
        for server in self.servers:
            server.close()


HOLD_LOCK = """
import sys, time
from machinery.files import output_lock
with output_lock(sys.argv[1], "--folder"):
    print("locked", flush=True)
    time.sleep(600)
"""


def checkpoint(path, config=TINY_CONFIG, data_dir=None, total_batch_size=128, **extra):
    """A checkpoint in the trainer's layout for `config`; resumable (optimizer, loader, RNG) with
    data_dir."""
    model = GPT(config)
    state = {"model": model.state_dict(), "config": asdict(config), **extra}
    if data_dir:
        loader = DataLoaderLite(data_dir, 4, 32, 0, 1, "train", total_batch_size)
        optimizer = configure_optimizer(model, 0.1, 6e-4, (0.9, 0.95), 1e-8, "cpu")
        state.update(optimizer=optimizer.state_dict(), scaler={}, step=checkpoint_step(path) or 3)
        state.update(
            loader=loader.state_dict(), rng={"torch": torch.get_rng_state()}, args={}, **extra
        )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)
    return path


def hf_directory(w, config, weights="model.safetensors"):
    """A Hugging Face GPT-2 folder with `config` as config.json and a weights file of plain
    tensors."""
    folder = w.path("hf")
    w.write("hf/config.json", json.dumps({"model_type": "gpt2", **config}))
    torch.save({"wte.weight": torch.zeros(3)}, os.path.join(folder, weights))
    return folder


# Numbers: every numeric flag must be finite and in its range, by one table (FLAG_RANGES).
@row(train_gpt2.main, "--max_lr must be a finite number")
def max_lr_inf(w):
    return w.train("--max_lr", "inf")


@row(train_gpt2.main, "--max_lr must be a finite number")
def max_lr_nan(w):
    return w.train("--max_lr", "nan")


@row(train_gpt2.main, "--min_lr must be a finite number")
def min_lr_nan(w):
    return w.train("--min_lr", "nan")


@row(train_gpt2.main, "--weight_decay must be a finite number")
def weight_decay_overflowing_to_inf(w):
    return w.train("--weight_decay", "1e400")


@row(train_gpt2.main, "--grad_clip must be a finite number")
def grad_clip_inf(w):
    return w.train("--grad_clip", "inf")


@row(train_gpt2.main, "--beta2 must be a finite number, in [0, 1)")
def beta2_one(w):
    return w.train("--beta2", "1")


@row(train_gpt2.main, "--eps must be a finite number, in (0, 1e-3]")
def eps_negative(w):
    return w.train("--eps=-1e-8")


@row(train_gpt2.main, "a larger eps makes AdamW's steps vanish")
def eps_so_large_that_nothing_is_learned(w):
    return w.train("--eps", "1e300")


@row(train_gpt2.main, "each step would decay every weight by all of it; lower --weight_decay")
def weight_decay_that_wipes_the_weights(w):
    return w.train("--weight_decay", "1e10")


@row(train_gpt2.main, "--peak_flops must be a finite number, positive")
def peak_flops_zero(w):
    return w.train("--peak_flops", "0")


@row(train_gpt2.main, "--n_head must be a finite number, positive")
def n_head_zero(w):
    return w.train("--n_head", "0")


@row(train_gpt2.main, "--val_tokens must be a finite number, positive")
def val_tokens_zero(w):
    return w.train("--val_tokens", "0")


@row(train_gpt2.main, "--vocab_size 100 is smaller than GPT-2's 50257")
def vocab_size_too_small(w):
    return w.train("--vocab_size", "100")


@row(sample.main, "--temperature must be a finite number")
def sample_temperature_nan(w):
    return [
        "--init",
        checkpoint(w.path("model_00005.pt")),
        "--temperature",
        "nan",
        "--device",
        "cpu",
    ]


@row(
    sample.main, "--temperature must be a finite number, 0 (the most likely token) or at least 1e-3"
)
def sample_temperature_tiny(w):
    return [
        "--init",
        checkpoint(w.path("model_00005.pt")),
        "--temperature",
        "1e-40",
        "--device",
        "cpu",
    ]


@row(sample.main, "--top_k must be a finite number, positive")
def sample_top_k_zero(w):
    return ["--init", checkpoint(w.path("model_00005.pt")), "--top_k", "0", "--device", "cpu"]


@row(fineweb.main, "--shard_size and --num_proc must be at least 1")
def fineweb_shard_size_zero(w):
    return [
        "--input",
        w.write("corpus.txt", "some text"),
        "--out",
        w.path("out"),
        "--shard_size",
        "0",
    ]


# Paths: each path flag must be the right kind of thing.
@row(train_gpt2.main, "is a file, not a folder")
def log_dir_is_a_file(w):
    w.write("log", "not a folder")
    return w.train()


@row(train_gpt2.main, "no train shards")
def data_dir_missing(w):
    return w.train("--data_dir", w.path("nowhere"))


@row(train_gpt2.main, "no train shards")
def folder_named_like_a_shard_is_not_one(w):
    os.remove(w.path("data/tiny_train_000001.npy"))
    os.makedirs(w.path("data/tiny_train_000001.bin"))
    return w.train()


@row(export_hf.main, "--out is empty")
def export_out_empty(w):
    return ["--init", checkpoint(w.path("model_00005.pt")), "--out", ""]


@row(export_hf.main, "is a file, not a folder")
def export_out_is_a_file(w):
    w.write("exported", "not a folder")
    return ["--init", checkpoint(w.path("model_00005.pt")), "--out", w.path("exported")]


@row(fineweb.main, "is a file, not a folder")
def fineweb_out_is_a_file(w):
    w.write("out", "not a folder")
    return ["--input", w.write("corpus.txt", "some text"), "--out", w.path("out")]


@row(plot_log.main, "is not a text file")
def plot_a_binary_file(w):
    return [w.write("log.txt", bytes(range(256)) * 4), "-o", w.path("loss.png")]


@row(plot_log.main, "expected '<step> <kind> <value>'")
def plot_a_text_file_that_is_not_a_log(w):
    return [w.write("log.txt", "x" * 10_000 + "\n"), "-o", w.path("loss.png")]


# Data: shards that are not GPT-2 tokens, or names that would mix the splits or two corpora.
@row(train_gpt2.main, "holds token id 60000, but GPT-2's tokenizer has 50257 tokens")
def npy_shard_with_token_ids_past_the_vocabulary(w):
    np.save(w.path("data/tiny_train_000001.npy"), np.full(8192, 60000, dtype=np.uint16))
    return w.train()


@row(train_gpt2.main, "holds token id 50300")
def bin_shard_with_token_ids_past_the_vocabulary(w):
    os.remove(w.path("data/tiny_train_000001.npy"))
    header = np.zeros(BIN_HEADER_INTS, dtype=np.int32)
    header[:3] = BIN_MAGIC, BIN_VERSION, 8192
    w.write(
        "data/llmc_train_000001.bin",
        header.tobytes() + np.full(8192, 50300, dtype=np.uint16).tobytes(),
    )
    return w.train()


@row(
    train_gpt2.main,
    "holds train shards of two corpora (other_train_000001.npy, tiny_train_000001.npy)",
)
def two_corpora_in_one_folder(w):
    shutil.copy(w.path("data/tiny_train_000001.npy"), w.path("data/other_train_000001.npy"))
    return w.train()


@row(
    train_gpt2.main,
    "holds train shards of two corpora (other_train_000007.npy, tiny_train_000001.npy)",
)
def two_corpora_with_different_indices_in_one_folder(w):
    shutil.copy(
        w.path("data/tiny_train_000001.npy"), w.path("data/other_train_000007.npy")
    )  # mixed silently
    return w.train()


@row(
    train_gpt2.main, "two train shards with index 1 (tiny_train_000001.bin, tiny_train_000001.npy)"
)
def one_index_as_npy_and_as_bin(w):
    tokens = np.load(w.path("data/tiny_train_000001.npy"))
    header = np.zeros(BIN_HEADER_INTS, dtype=np.int32)
    header[:3] = BIN_MAGIC, BIN_VERSION, len(tokens)
    w.write("data/tiny_train_000001.bin", header.tobytes() + tokens.tobytes())
    return w.train()


@row(train_gpt2.main, "no train shards")
def a_prefix_ending_in_train_does_not_make_val_a_train_shard(w):
    os.remove(w.path("data/tiny_train_000001.npy"))
    os.rename(w.path("data/tiny_val_000000.npy"), w.path("data/x_train_val_000000.npy"))
    return w.train()


@row(fineweb.main, "--prefix 'x_train'")
def fineweb_prefix_naming_a_split(w):
    return [
        "--input",
        w.write("corpus.txt", "some text"),
        "--out",
        w.path("out"),
        "--prefix",
        "x_train",
    ]


@row(fineweb.main, "every document was empty", exit_code=0, changes=["out", "out/*"])
def fineweb_empty_documents_say_so(w):
    return ["--input", w.write("empty.txt", ""), "--out", w.path("out"), "--num_proc", "1"]


@row(fineweb.main, "is damaged")
def fineweb_damaged_progress_file(w):
    w.write("out/edufineweb_progress.json", '{"settings": ')
    return ["--input", w.write("corpus.txt", "some text"), "--out", w.path("out")]


@row(fineweb.main, "other settings (input")
def fineweb_input_replaced_by_a_file_of_the_same_size(w):
    corpus = w.write("corpus.txt", "the first corpus, " * 200)
    fineweb.main(
        ["--input", corpus, "--out", w.path("out"), "--shard_size", "500", "--num_proc", "1"]
    )
    w.write("corpus.txt", "another corpus!!, " * 200)  # same size, other text
    return ["--input", corpus, "--out", w.path("out"), "--shard_size", "500", "--num_proc", "1"]


# Resume: only the trainer's own checkpoints count, and a checkpoint must fit the data and the run.
@row(train_gpt2.main, "no checkpoint model_*.pt in")
def a_users_backup_is_not_a_checkpoint(w):
    checkpoint(w.path("log/model_00002_backup.pt"), data_dir=w.data)
    return w.train("--resume")


@row(train_gpt2.main, "a .tmp file is a checkpoint whose write was cut short")
def resume_from_a_tmp_file_by_name(w):
    return w.train("--resume", checkpoint(w.path("log/model_00003.pt.tmp"), data_dir=w.data))


@row(train_gpt2.main, "no checkpoint model_*.pt in")
def resume_from_an_empty_folder(w):
    os.makedirs(w.path("elsewhere"))
    return w.train("--resume", w.path("elsewhere"))


@row(train_gpt2.main, "holds checkpoints of another run (model_00007.pt)")
def resume_from_another_folder_into_a_used_log_dir(w):
    checkpoint(w.path("log/model_00007.pt"), data_dir=w.data)
    return w.train("--resume", checkpoint(w.path("other/model_00003.pt"), data_dir=w.data))


@row(
    train_gpt2.main,
    "not the ones the checkpoint was trained on (tiny_train_000001.npy of 8,192 tokens then",
)
def resume_after_the_data_changed(w):
    path = checkpoint(w.path("log/model_00003.pt"), data_dir=w.data)
    np.save(
        w.path("data/tiny_train_000001.npy"), np.arange(8192, dtype=np.uint16)
    )  # regenerated differently
    return w.train("--resume", path)


@row(train_gpt2.main, "1 train shards then, 2 now")
def resume_after_a_shard_was_added(w):
    path = checkpoint(w.path("log/model_00003.pt"), data_dir=w.data)
    np.save(w.path("data/tiny_train_000002.npy"), np.arange(8192, dtype=np.uint16))
    return w.train("--resume", path)


@row(train_gpt2.main, "resume with its --total_batch_size")
def resume_with_another_total_batch_size(w):
    path = checkpoint(w.path("log/model_00003.pt"), data_dir=w.data)
    return w.train("--resume", path, "--total_batch_size", "256")


# Foreign files: checkpoints of other programs, impossible configs, pickles.
def nanogpt_checkpoint(w):
    """nanoGPT's layout: 'model_args' for the model, and 'config' holding its training settings."""
    model_args = dict(
        n_layer=2, n_head=4, n_embd=64, block_size=64, bias=False, vocab_size=50304, dropout=0.0
    )
    state = {"model": GPT(TINY_CONFIG).state_dict(), "model_args": model_args, "iter_num": 5}
    state["config"] = {"out_dir": "out", "eval_interval": 2000, "batch_size": 12, **model_args}
    torch.save(state, w.path("ckpt.pt"))
    return w.path("ckpt.pt")


@row(sample.main, "laid out differently")
def sample_a_nanogpt_checkpoint(w):
    return ["--init", nanogpt_checkpoint(w), "--device", "cpu"]


@row(export_hf.main, "laid out differently")
def export_a_nanogpt_checkpoint(w):
    return ["--init", nanogpt_checkpoint(w), "--out", w.path("exported")]


@row(sample.main, "its model config is impossible (n_head 0)")
def sample_a_checkpoint_with_n_head_0(w):
    path = checkpoint(w.path("model_00005.pt"))
    state = torch.load(path, weights_only=True)
    state["config"]["n_head"] = 0
    torch.save(state, path)
    return ["--init", path, "--device", "cpu"]


@row(train_gpt2.main, "its model config is impossible (n_embd not divisible by n_head)")
def resume_a_checkpoint_with_indivisible_heads(w):
    path = checkpoint(w.path("log/model_00003.pt"), data_dir=w.data)
    state = torch.load(path, weights_only=True)
    state["config"]["n_head"] = 3
    torch.save(state, path)
    return w.train("--resume", path)


@row(sample.main, "config.json: its model config is impossible (n_head 0)")
def sample_a_hugging_face_folder_with_n_head_0(w):
    config = dict(n_positions=64, vocab_size=50257, n_layer=2, n_head=0, n_embd=64)
    return ["--init", hf_directory(w, config, "pytorch_model.bin"), "--device", "cpu"]


@row(sample.main, "a pytorch_model.bin of plain tensors")
def sample_a_pickled_pytorch_model_bin(w):
    config = dict(n_positions=64, vocab_size=50257, n_layer=2, n_head=4, n_embd=64)
    folder = hf_directory(w, config, "pytorch_model.bin")
    torch.save(
        {"wte.weight": torch.zeros(3), "extra": Pickled()},
        os.path.join(folder, "pytorch_model.bin"),
    )
    return ["--init", folder, "--device", "cpu"]


class Pickled:
    """An object that only an unrestricted (code-running) unpickler can load."""


# Concurrency: a folder locked by a live process refuses a second writer; a dead process's lock does
# not.
@row(train_gpt2.main, "is in use by another run (pid ")
def log_dir_held_by_another_process(w):
    w.hold_lock(w.log)
    return w.train()


@row(fineweb.main, "is in use by another run (pid ")
def fineweb_out_held_by_another_process(w):
    w.hold_lock(w.path("out"))
    return ["--input", w.write("corpus.txt", "some text"), "--out", w.path("out")]


@row(train_gpt2.main, "no checkpoint model_*.pt in", changes=["log/.lock"])
def a_dead_process_lock_never_blocks(w):
    w.write(
        "log/.lock", "999999999@a-host-that-crashed\n"
    )  # the refusal that follows is the next check's
    return w.train("--resume")


# Faults during a run: out of memory, divergence.
def out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@row(
    train_gpt2.main,
    "lower --batch_size (now 4) and keep --total_batch_size 128",
    changes=["log", "log/log.txt"],
)
def out_of_memory_in_a_training_step(w):
    w.monkeypatch.setattr(train_gpt2, "train_step", out_of_memory)
    return w.train()


@row(train_gpt2.main, "out of memory on cpu: lower --batch_size", changes=["log", "log/*"])
def out_of_memory_in_an_evaluation(w):
    w.monkeypatch.setattr(train_gpt2, "validation_loss", out_of_memory)
    return w.train()


@row(sample.main, "lower --num_samples")
def out_of_memory_while_sampling(w):
    w.monkeypatch.setattr(GPT, "generate", out_of_memory)
    return ["--init", checkpoint(w.path("model_00005.pt")), "--device", "cpu"]


@row(train_gpt2.main, "--max_lr must be a finite number, in [0, 1]")
def max_lr_past_what_adamw_can_step(w):
    return w.train("--max_lr", "1e38")


def diverging_train_step(bad_step, weights):
    """train_step as it is until call `bad_step`, which returns a NaN loss, or (weights=True) leaves
    inf weights behind a finite loss."""
    calls = []

    def train_step(step_model, *args):
        loss, norm = real_train_step(step_model, *args)
        calls.append(None)
        if len(calls) - 1 == bad_step:
            if not weights:
                return loss * float("nan"), norm
            next(step_model.parameters()).data.fill_(float("inf"))
        return loss, norm

    real_train_step = train_gpt2.train_step
    return train_step


@row(
    train_gpt2.main,
    "no checkpoint was saved yet: start again with a lower --max_lr",
    changes=["log", "log/*"],
)
def loss_nan_before_any_checkpoint(w):
    w.monkeypatch.setattr(train_gpt2, "train_step", diverging_train_step(0, weights=False))
    return w.train()


@row(
    train_gpt2.main,
    "the weights after the step are not; stopping without saving. last good checkpoint",
    changes=["log", "log/*"],
)
def weights_inf_behind_a_finite_loss(w):
    w.monkeypatch.setattr(train_gpt2, "train_step", diverging_train_step(2, weights=True))
    return w.train("--ckpt_every", "1")


# Third round: corners where a run lost files or trained wrongly with exit 0, and tracebacks where
# one line was due. The processes of a run: one rule for torchrun's variables (none: one process;
# all, consistent: a group; anything in between: refused, naming the variable).
GROUP = {
    "RANK": "0",
    "LOCAL_RANK": "0",
    "WORLD_SIZE": "1",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
}


def group_variables(w, **variables):
    for name in GROUP:
        w.monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        w.monkeypatch.setenv(name, value)


@row(
    train_gpt2.main,
    "RANK=1 is set but LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are not: start the",
)
def rank_left_in_the_environment(w):
    group_variables(w, RANK="1")  # trained alone, printed and wrote nothing, exit 0
    return w.train()


@row(train_gpt2.main, "WORLD_SIZE=2 is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not")
def world_size_alone(w):
    group_variables(w, WORLD_SIZE="2")  # trained on half of each step and logged half the loss
    return w.train()


@row(train_gpt2.main, "RANK=0 LOCAL_RANK=abc WORLD_SIZE=1: each must be a whole number")
def local_rank_not_a_number(w):
    group_variables(w, **{**GROUP, "LOCAL_RANK": "abc"})
    return w.train()


@row(
    train_gpt2.main,
    "RANK=2 LOCAL_RANK=0 WORLD_SIZE=2: a group needs 0 <= LOCAL_RANK <= RANK < WORLD_SIZE",
)
def rank_past_the_world(w):
    group_variables(w, **{**GROUP, "RANK": "2", "WORLD_SIZE": "2"})
    return w.train()


@row(sample.main, "no_such.pt' is not a file, a directory, or one of gpt2")
def local_rank_alone_does_not_silence_an_error(w):
    group_variables(w, LOCAL_RANK="1")  # silenced every script's error line
    return ["--init", w.path("no_such.pt"), "--device", "cpu"]


# Resumes that overwrote another run.
@row(train_gpt2.main, "holds checkpoints of another run (model_00003.pt): resuming")
def resume_a_folder_into_a_log_dir_of_another_run(w):
    checkpoint(w.path("log/model_00003.pt"), data_dir=w.data)
    checkpoint(w.path("other/model_00001.pt"), data_dir=w.data, step=1)
    return w.train("--resume", w.path("other"))  # resumed, then overwrote log/'s newer checkpoint


@row(
    export_hf.main,
    "holds files that an export does not write (log.txt, model_00005.pt): --force replaces only",
)
def export_over_its_own_log_dir(w):
    checkpoint(w.path("log/model_00005.pt"))
    w.write("log/log.txt", "0 train 10.9\n")
    # deleted log.txt and every checkpoint, the exported one too, exit 0
    return ["--init", w.path("log/model_00005.pt"), "--out", w.log, "--force"]


@row(export_hf.main, "is a symbolic link: pass the folder it points to")
def export_out_a_symbolic_link(w):
    os.makedirs(w.path("real"))
    os.symlink(w.path("real"), w.path("link"))  # exported, then a traceback and exit 1
    return ["--init", checkpoint(w.path("model_00005.pt")), "--out", w.path("link"), "--force"]


@row(export_hf.main, "--out . holds the current folder")
def export_out_the_current_folder(w):
    w.monkeypatch.chdir(w.root)
    return ["--init", checkpoint(w.path("model_00005.pt")), "--out", ".", "--force"]


def damaged_checkpoint(w, **entries):
    """A resumable checkpoint in log/, then its entries replaced (None: removed), as a hand edit
    would."""
    path = checkpoint(w.path("log/model_00003.pt"), data_dir=w.data)
    state = torch.load(path, weights_only=True)
    for key, value in entries.items():
        if value is None:
            del state[key]
        else:
            state[key] = value(state[key]) if callable(value) else value
    torch.save(state, path)
    return w.train("--resume", "--no-shuffle")  # the order checkpoint() read in


@row(train_gpt2.main, "its step entry is missing or damaged, so it cannot be resumed")
def checkpoint_step_negative(w):
    return damaged_checkpoint(
        w, step=-5
    )  # resumed at step -4, wrote model_-0004.pt, overwrote its source


@row(train_gpt2.main, "its step entry is missing or damaged")
def checkpoint_step_a_float(w):
    return damaged_checkpoint(w, step=3.0)


@row(train_gpt2.main, "its scaler, rng entry is missing or damaged")
def checkpoint_without_scaler_and_rng(w):
    return damaged_checkpoint(w, scaler=None, rng=None)


@row(train_gpt2.main, "its optimizer entry is missing or damaged")
def checkpoint_with_an_empty_optimizer(w):
    return damaged_checkpoint(w, optimizer={})


@row(
    train_gpt2.main,
    "is not the start of a step of an epoch of 252 sequences: the checkpoint is damaged",
)
def checkpoint_position_past_the_data(w):
    return damaged_checkpoint(w, loader=lambda loader: {**loader, "sequence": 10**6})


@row(train_gpt2.main, "holds NaN or inf, so its outputs would too")
def checkpoint_with_nan_weights(w):
    nan = {"transformer.h.0.mlp.c_fc.weight": None}
    return damaged_checkpoint(
        w, model=lambda model: {k: v * float("nan") if k in nan else v for k, v in model.items()}
    )


@row(sample.main, "holds NaN or inf, so its outputs would too")
def sample_from_nan_weights(w):
    path = checkpoint(w.path("model_00005.pt"))
    state = torch.load(path, weights_only=True)
    state["model"]["transformer.ln_f.weight"] *= float("nan")
    torch.save(state, path)
    return ["--init", path, "--device", "cpu"]


@row(
    train_gpt2.main,
    "the checkpoint is after step 5 and --max_steps is 6: nothing to train; raise --max_steps",
)
def resume_a_finished_run(w):
    return damaged_checkpoint(w, step=5)  # said "steps 6 to 5"


# Data taken silently.
@row(train_gpt2.main, "tiny_train_000002.npy holds no tokens: remove it")
def a_shard_of_no_tokens(w):
    np.save(
        w.path("data/tiny_train_000002.npy"), np.zeros(0, dtype=np.uint16)
    )  # miscounted the epoch
    return w.train()


@row(train_gpt2.main, "tiny_train_000002.npy is a symbolic link to")
def a_shard_that_is_a_dangling_link(w):
    os.symlink(w.path("gone.npy"), w.path("data/tiny_train_000002.npy"))  # skipped without a word
    return w.train()


# Flags and paths that reached a library's traceback.
@row(train_gpt2.main, "--seed must be a finite number, in [0, 2**63)")
def seed_too_large_for_torch(w):
    return w.train("--seed", str(10**23))


@row(sample.main, "--device 'meta' is not a device this project runs on")
def sample_on_the_meta_device(w):
    return ["--init", checkpoint(w.path("model_00005.pt")), "--device", "meta"]


@row(
    hellaswag.main,
    "a model with block_size 1 cannot score HellaSwag: it needs at least 2 positions",
)
def hellaswag_on_a_model_too_short_for_an_example(w):
    config = GPTConfig(block_size=1, vocab_size=50304, n_layer=1, n_head=1, n_embd=8)
    w.write(
        "hellaswag.jsonl",
        json.dumps({"ctx": "A man", "endings": ["runs", "sits", "eats", "sings"], "label": 0}),
    )
    model = checkpoint(w.path("model_00005.pt"), config=config)
    return ["--init", model, "--data", w.path("hellaswag.jsonl"), "--device", "cpu"]


@row(
    train_gpt2.main,
    "log/log.txt: is a folder where a file is needed: move the folder",
    changes=["log/.lock"],
)
def log_txt_a_folder(w):
    os.makedirs(w.path("log/log.txt"))
    return w.train()


@row(
    fineweb.main,
    "out/.lock: is a folder where a file is needed: move the folder, or pass another path",
)
def fineweb_lock_file_a_folder(w):
    w.write("notes.txt", "a short document")
    os.makedirs(w.path("out/.lock"))  # the lock's open was a traceback (as a read-only --out is)
    return ["--input", w.path("notes.txt"), "--out", w.path("out")]


@row(fineweb.main, "notes.txt/shards: a file is in the way where this path needs a folder")
def fineweb_out_under_a_file(w):
    w.write("notes.txt", "a short document")
    return ["--input", w.path("notes.txt"), "--out", w.path("notes.txt/shards")]


# --- fourth round: what a red-team found after the third ------------------------------------------
# The group's meeting place, checked before any wait (torch retried a bad host for half an hour).
@row(train_gpt2.main, "MASTER_PORT=99999: the group's port must be a number from 1 to 65535")
def master_port_past_the_last_port(w):
    group_variables(w, **{**GROUP, "MASTER_PORT": "99999"})
    return w.train()


@row(train_gpt2.main, "MASTER_PORT=abc: the group's port must be a number from 1 to 65535")
def master_port_not_a_number(w):
    group_variables(w, **{**GROUP, "MASTER_PORT": "abc"})  # a ValueError traceback from torch
    return w.train()


@row(train_gpt2.main, "MASTER_ADDR=no-such-host.invalid: no such host")
def master_addr_that_does_not_resolve(w):
    group_variables(
        w, **{**GROUP, "MASTER_ADDR": "no-such-host.invalid"}
    )  # retried, deaf to SIGTERM
    return w.train()


@row(train_gpt2.main, "WORLD_SIZE=2 is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not")
def empty_group_variables_count_as_unset(w):
    group_variables(
        w, RANK="", LOCAL_RANK="", WORLD_SIZE="2"
    )  # said "RANK= ... is set but RANK ... is not"
    return w.train()


@row(
    train_gpt2.main,
    "MASTER_PORT=29511 on 127.0.0.1 is in use by another program (another run?): pass a free port",
)
def master_port_in_use(w):
    w.hold_port(29511)
    group_variables(w, **{**GROUP, "MASTER_PORT": "29511"})  # torch's DistNetworkError traceback
    return w.train()


# A stray torchrun environment silences no script but the trainer's echoes.
ELASTIC = {
    **GROUP,
    "RANK": "1",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "2",
    "TORCHELASTIC_RUN_ID": "stray",
}


@row(sample.main, "no_such.pt' is not a file, a directory, or one of gpt2")
def sample_in_a_stray_torchrun_environment(w):
    group_variables(w, **ELASTIC)  # exit 1 without a word
    return ["--init", w.path("no_such.pt"), "--device", "cpu"]


@row(plot_log.main, "no_such.txt")
def plot_in_a_stray_torchrun_environment(w):
    group_variables(w, **ELASTIC)
    return [w.path("no_such.txt")]


# Checkpoint entries that still reached a traceback, or trained wrongly.
@row(train_gpt2.main, "its loader entry is missing or damaged")
def checkpoint_data_fingerprint_not_a_list(w):
    return damaged_checkpoint(w, loader=lambda loader: {**loader, "data": 5})  # IndexError


@row(train_gpt2.main, "its rng entry is missing or damaged")
def checkpoint_rng_state_of_the_wrong_size(w):
    return damaged_checkpoint(
        w, rng=lambda rng: {"torch": rng["torch"][:100]}
    )  # set_rng_state's RuntimeError


@row(train_gpt2.main, "its args entry is missing or damaged")
def checkpoint_args_none(w):
    return damaged_checkpoint(w, args=lambda args: None)  # AttributeError in the resume's line


FP16_SCALER = {
    "scale": 65536.0,
    "growth_factor": 2.0,
    "backoff_factor": 0.5,
    "growth_interval": 2000,
}


@row(train_gpt2.main, "its scaler entry is missing or damaged")
def checkpoint_scale_not_a_number(w):
    return damaged_checkpoint(
        w, scaler={**FP16_SCALER, "_growth_tracker": 0, "scale": "big"}
    )  # TypeError


@row(train_gpt2.main, "its scaler entry is missing or damaged")
def checkpoint_scaler_without_a_scale(w):
    return damaged_checkpoint(
        w, scaler={"growth_factor": 2.0, "_growth_tracker": 0}
    )  # KeyError, an empty log.txt


@row(train_gpt2.main, "its scaler entry is missing or damaged")
def checkpoint_scale_nan(w):
    return damaged_checkpoint(
        w, scaler={**FP16_SCALER, "_growth_tracker": 0, "scale": float("nan")}
    )  # no step


@row(train_gpt2.main, "its scaler entry is missing or damaged")
def checkpoint_scale_negative(w):
    return damaged_checkpoint(
        w, scaler={**FP16_SCALER, "_growth_tracker": 0, "scale": -1.0}
    )  # every step skipped


@row(train_gpt2.main, "the checkpoint is after step 5 and --max_steps is 6")
def a_folder_named_like_a_newer_checkpoint_is_not_one(w):
    argv = damaged_checkpoint(w, step=5)  # log/model_00003.pt, after step 5: the one to resume
    os.makedirs(w.path("log/model_00009.pt"))  # was taken as the newest checkpoint
    return argv


@row(train_gpt2.main, "holds model_00005.pt, newer than")
def resume_an_earlier_checkpoint_among_newer_ones(w):
    checkpoint(w.path("log/model_00005.pt"), data_dir=w.data)
    # resumed, then wrote over model_00005.pt of the first course; the next --resume took its
    # model_00009.pt
    return w.train("--resume", checkpoint(w.path("log/model_00003.pt"), data_dir=w.data))


@row(train_gpt2.main, "s.txt is not a checkpoint of this project")
def resume_a_file_that_is_not_a_checkpoint_into_a_used_log_dir(w):
    checkpoint(w.path("log/model_00003.pt"), data_dir=w.data)
    return w.train("--resume", w.write("s.txt", "notes"))  # said "holds checkpoints of another run"


@row(train_gpt2.main, "--resume '' names no checkpoint")
def resume_an_empty_path(w):
    return w.train("--resume", "")  # started a new run


@row(train_gpt2.main, "it cannot be resumed; start a new run from its weights with --init")
def resume_weights_only(w):
    return w.train("--resume", checkpoint(w.path("log/model_00003.pt")))


@row(export_hf.main, "holds files that an export does not write (vocab.json)")
def export_force_over_a_folder_named_like_an_export_file(w):
    w.write("out/vocab.json/important.txt", "mine")  # deleted with the earlier export
    return ["--init", checkpoint(w.path("model_00005.pt")), "--out", w.path("out"), "--force"]


# Mistakes on the command line: one line and exit 1, as every other user error (argparse: usage and
# exit 2).
@row(train_gpt2.main, "argument --max_steps: expected one argument (see")
def a_flag_without_its_value(w):
    return [*w.train(), "--max_steps"]


@row(sample.main, "unrecognized arguments: --bogus (see")
def an_unknown_flag(w):
    return ["--bogus"]


@row(train_gpt2.main, "the val split holds no batch: lower --batch_size (or --seq_len)")
def eval_only_with_a_batch_past_the_val_split(w):
    return w.train(
        "--init", checkpoint(w.path("model_00005.pt")), "--eval_only", "--batch_size", "256"
    )


@row(hellaswag.main, "nowhere.pt' is not a file, a directory")
def hellaswag_init_checked_before_the_download(w):
    w.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return ["--init", w.path("nowhere.pt"), "--device", "cpu"]  # said the download's error first


LOG = "-1 val 10.9\n0 train 10.9\n1 train 10.5\n1 val 10.4\n"


@row(plot_log.main, "notes.txt: a file is in the way where this path needs a folder")
def plot_out_under_a_file(w):
    w.write("notes.txt", "mine")  # said "File exists"
    return [w.write("log.txt", LOG), "-o", w.path("notes.txt/loss.png")]


@row(plot_log.main, "loss.png: it is a folder; pass a file's path")
def plot_out_a_folder(w):
    os.makedirs(w.path("loss.png"))  # said "is the disk full?"-like advice
    return [w.write("log.txt", LOG), "-o", w.path("loss.png")]


def no_offline_variables(w, **variables):
    for name in (
        "HF_HUB_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "HF_ENDPOINT",
        "HTTPS_PROXY",
        "https_proxy",
        "NO_PROXY",
    ):
        w.monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        w.monkeypatch.setenv(name, value)


@row(fineweb.main, "the proxy http://127.0.0.1:9 (127.0.0.1:9) cannot be reached")
def fineweb_behind_a_dead_proxy(w):
    no_offline_variables(w, HTTPS_PROXY="http://127.0.0.1:9")  # 25 s of datasets' retries
    return ["--out", w.path("out")]


@row(fineweb.main, "HF_ENDPOINT=hub.example is not a URL such as https://huggingface.co")
def fineweb_hf_endpoint_not_a_url(w):
    no_offline_variables(w, HF_ENDPOINT="hub.example")  # said "host None"
    return ["--out", w.path("out")]


# --- fifth round ----------------------------------------------------------------------------------


@row(sample.main, "--seed must be a finite number, in [0, 2**63)")
def sample_seed_too_large_for_torch(w):
    return [
        "--init",
        checkpoint(w.path("model_00005.pt")),
        "--seed",
        str(2**70),
        "--device",
        "cpu",
    ]  # a traceback


@row(train_gpt2.main, "val loss", exit_code=0)
def eval_only_of_an_earlier_checkpoint_among_newer_ones(w):
    earlier = checkpoint(w.path("log/model_00001.pt"), data_dir=w.data)
    checkpoint(w.path("log/model_00005.pt"), data_dir=w.data)
    return w.train(
        "--eval_only", "--resume", earlier
    )  # refused as overwriting, though --eval_only writes nothing


@row(train_gpt2.main, "val loss", exit_code=0)
def eval_only_of_another_run_with_a_used_log_dir(w):
    checkpoint(w.path("log/model_00005.pt"), data_dir=w.data)
    return w.train(
        "--eval_only",
        "--resume",
        os.path.dirname(checkpoint(w.path("other/model_00002.pt"), data_dir=w.data)),
    )


@row(train_gpt2.main, "model_00009.pt holds step 3, not the step 9 of its name (a renamed copy?)")
def resume_a_checkpoint_named_past_its_step(w):
    checkpoint(
        w.path("log/model_00009.pt"), data_dir=w.data, step=3
    )  # later checkpoints sorted before it
    return w.train("--resume", "--no-shuffle")


@row(train_gpt2.main, "move it out of")
def resume_a_torn_newest_checkpoint(w):
    checkpoint(w.path("log/model_00003.pt"), data_dir=w.data)
    w.write(
        "log/model_00005.pt", b""
    )  # the advice was to pass the earlier one, which is refused as older
    return w.train("--resume")


@row(
    train_gpt2.main,
    "the samples' prompt is 70 tokens: with the 32 that each sample adds, "
    "past the model's context of 64",
)
def sample_prompt_too_long_for_the_model(w):
    return w.train(
        "--sample_every_eval", "--sample_prompt", " word" * 70
    )  # failed at the first evaluation


@row(train_gpt2.main, "", exit_code=0, changes=["log", "log/*"])
def sample_prompt_too_long_is_no_matter_without_samples(w):
    return w.train("--no-sample_every_eval", "--sample_prompt", " word" * 70)


@row(
    train_gpt2.main,
    "the samples' prompt is 1 token: with the 32 that each sample adds, "
    "past the model's context of 32",
)
def sample_prompt_empty_is_one_token(w):
    w.write(
        "log/log.txt", "0 train 9.0\n"
    )  # it was replaced, then the run failed at its first evaluation
    return w.train("--block_size", "32", "--sample_every_eval", "--sample_prompt", "")


@row(train_gpt2.main, "", exit_code=0, changes=["new", "new/*"])
def resume_a_renamed_checkpoint_into_a_new_folder(w):
    checkpoint(
        w.path("log/model_00002.pt"), data_dir=w.data, step=1
    )  # its successors sort after it there
    return [*TINY_RUN, "--data_dir", w.data, "--log_dir", w.path("new"),
            "--resume", w.path("log/model_00002.pt"), "--no-shuffle"]  # fmt: skip


@row(
    train_gpt2.main,
    "is not a checkpoint of this project (EOFError): it may be truncated or another kind of file",
)
def resume_a_torn_checkpoint_with_none_before_it(w):
    w.write("log/model_00005.pt", b"")  # said "move it out of log to resume the one before it"
    return w.train("--resume")


@row(train_gpt2.main, "log/log.txt is a symbolic link (to ", changes=["log/.lock"])
def log_txt_a_symbolic_link(w):
    os.makedirs(w.log)
    os.symlink(
        w.write("keep.txt", "the user's own file\n"), w.path("log/log.txt")
    )  # was overwritten
    return w.train()


@row(
    fineweb.main,
    "holds shards of another corpus (tiny_train_000001.npy), "
    "and the trainer reads one corpus per folder",
)
def fineweb_into_a_folder_of_another_corpus(w):
    w.write(
        "notes.txt", "a short document"
    )  # added shard_* beside tiny_*: the folder no longer trained
    return ["--input", w.path("notes.txt"), "--out", w.data, "--prefix", "shard"]


@row(hellaswag.main, "the path '' names no file")
def hellaswag_data_empty(w):
    return ["--init", checkpoint(w.path("model_00005.pt")), "--data", ""]


@row(train_gpt2.main, "is a symbolic link to")
def log_dir_a_dangling_link(w):
    os.symlink(w.path("gone"), w.log)  # said "File exists"
    return w.train()


@row(train_gpt2.main, "--data_dir '' names no folder")
def data_dir_empty(w):
    return [*TINY_RUN, "--data_dir", "", "--log_dir", w.log]  # "no train shards ... in : run ..."


@row(
    train_gpt2.main,
    "data/tiny_val_000000.npy is a file, not a folder: pass the folder that holds the shards",
)
def data_dir_a_file(w):
    return [*TINY_RUN, "--data_dir", w.path("data/tiny_val_000000.npy"), "--log_dir", w.log]


@row(hellaswag.main, "is a folder: pass the path of the hellaswag_val.jsonl file in it")
def hellaswag_data_a_folder(w):
    return ["--init", checkpoint(w.path("model_00005.pt")), "--data", w.data]


@row(
    sample.main,
    "is the folder of a training run, not a Hugging Face model: pass one of its checkpoints",
)
def sample_from_a_log_dir(w):
    checkpoint(w.path("log/model_00005.pt"))
    return ["--init", w.log, "--device", "cpu"]  # spoke of config.json only


def snapshot(root):
    """{relative path: sha256 of a file, 'folder', or where a symbolic link points} of everything
    under root."""
    found = {}
    for folder, folders, files in os.walk(root):
        for name in folders:
            found[os.path.relpath(os.path.join(folder, name), root)] = "folder"
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                found[os.path.relpath(path, root)] = "link to " + os.readlink(path)
                continue
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return found


@pytest.mark.parametrize("script, setup, exit_code, changes, says", ROWS)
def test_fault(
    script, setup, exit_code, changes, says, tmp_path, monkeypatch, capsys, keep_signal_handlers
):
    w = Workspace(tmp_path, monkeypatch)
    try:
        argv = setup(w)
        before = snapshot(w.root)
        capsys.readouterr()  # what the setup printed is not the row's output
        try:
            run_cli(script, argv)
            code = 0
        except SystemExit as e:
            code = e.code
    finally:
        w.release()
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, out + err
    assert code == exit_code, out + err
    lines = (err if exit_code else out).strip().splitlines()
    assert lines and says in lines[-1], f"{says!r} not in the last line of:\n{out + err}"
    after = snapshot(w.root)
    touched = {path for path in before.keys() | after.keys() if before.get(path) != after.get(path)}
    unexpected = {
        path for path in touched if not any(fnmatch.fnmatch(path, glob) for glob in changes)
    }
    assert not unexpected, f"files touched: {sorted(unexpected)}"


def test_the_table_covers_enough_faults():
    assert len(ROWS) >= 118


# --- concurrency: one writer per folder, with real processes --------------------------------------


def start(script, *args):
    """A script in a subprocess, its stdout and stderr merged into one pipe read by the test."""
    return subprocess.Popen(
        [sys.executable, script, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )


def read_until(proc, pattern):
    """Lines of proc's output up to the first that matches `pattern` (the test fails if none
    does)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(pattern, line):
            return lines
    raise AssertionError(f"exit {proc.wait()} before a line matched {pattern!r}:\n{''.join(lines)}")


def random_shards(folder, val_tokens=4096, train_lengths=(8192,)):
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    np.save(
        os.path.join(folder, "tiny_val_000000.npy"),
        rng.integers(0, 50257, val_tokens, dtype=np.uint16),
    )
    for index, length in enumerate(train_lengths, start=1):
        np.save(
            os.path.join(folder, f"tiny_train_{index:06d}.npy"),
            rng.integers(0, 50257, length, dtype=np.uint16),
        )
    return str(folder)


def test_two_trainers_on_one_log_dir_cannot_both_run(tmp_path):
    data, log = random_shards(tmp_path / "data"), str(tmp_path / "log")
    first = start(
        "train_gpt2.py", *TINY_RUN, "--data_dir", data, "--log_dir", log, "--max_steps", "100000"
    )
    try:
        read_until(first, r"^step +0/")
        first.send_signal(
            signal.SIGSTOP
        )  # holds the lock, writes nothing while the second one tries
        second = subprocess.run(
            [sys.executable, "train_gpt2.py", *TINY_RUN, "--data_dir", data, "--log_dir", log],
            cwd=REPO, capture_output=True, text=True, env=ENV, timeout=TIMEOUT,
        )  # fmt: skip
        assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
        assert (
            f"--log_dir {log} is in use by another run (pid {first.pid}@"
            in second.stderr.splitlines()[-1]
        )
        first.send_signal(signal.SIGCONT)
        first.send_signal(
            signal.SIGTERM
        )  # the first run goes on, undisturbed, until it is told to stop
        assert first.wait(timeout=TIMEOUT) == 0
    finally:
        first.kill()
    assert not os.path.exists(os.path.join(log, ".lock"))  # released and removed at the end


def test_two_fineweb_runs_on_one_out_cannot_both_run(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": f"document {i} " * 50}) + "\n" for i in range(2000))
    )
    out, flags = (
        str(tmp_path / "out"),
        ["--input", str(corpus), "--shard_size", "5000", "--num_proc", "1"],
    )
    first = start("fineweb.py", *flags, "--out", out)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(os.path.join(out, ".lock")) and time.monotonic() < deadline:
            time.sleep(0.001)
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run(
            [sys.executable, "fineweb.py", *flags, "--out", out],
            cwd=REPO, capture_output=True, text=True, env=ENV, timeout=TIMEOUT,
        )  # fmt: skip
        assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"--out {out} is in use by another run (pid" in second.stderr.splitlines()[-1]
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=TIMEOUT) == 0, first.stdout.read()
    finally:
        first.kill()
    assert "tiny" not in os.listdir(out) and ".lock" not in os.listdir(out)
    with open(os.path.join(out, "shard_progress.json")) as f:
        assert json.load(f)["finished"]


# --- the loader's stream does not depend on the number of processes -------------------------------


def steps_read(data_dir, world_size, micro_steps, steps, state=None, shuffle=False):
    """The sequences of each optimizer step, in block order (micro-step m of rank r is block m *
    world_size + r), as lists of first tokens, read by world_size loaders; and the state after
    them."""
    B, T = 2, 8
    loaders = [DataLoaderLite(data_dir, B, T, rank, world_size, "train",
                              B * T * world_size * micro_steps, shuffle)
               for rank in range(world_size)]  # fmt: skip
    for loader in loaders:
        if state:
            loader.load_state_dict(state)
    read = []
    for _ in range(steps):
        blocks = {}
        for micro_step in range(micro_steps):
            for rank, loader in enumerate(loaders):
                x, y = loader.next_batch()
                assert torch.equal(x[:, 1:], y[:, :-1])
                blocks[micro_step * world_size + rank] = x[:, 0].tolist()
        read.append([blocks[i] for i in sorted(blocks)])
    return read, loaders[0].state_dict()


@pytest.mark.parametrize("shuffle", [False, True])
def test_each_step_reads_the_same_tokens_for_any_number_of_processes(tmp_path, shuffle):
    window = 2 * 8 * 4  # 4 sequences of 8 tokens per step
    # shard ends where one process's micro-window would still fit but the step's window does not
    lengths = [3 * window + 20, 4 * window + 1, 2 * window + window // 2]
    for k, length in enumerate(lengths):
        np.save(
            tmp_path / f"marked_train_{k:06d}.npy",
            (10000 * k + np.arange(length)).astype(np.uint16),
        )
    steps = 2 * sum((length - 1) // window for length in lengths) + 3  # two epochs and more
    one, _ = steps_read(str(tmp_path), world_size=1, micro_steps=4, steps=steps, shuffle=shuffle)
    for world_size, micro_steps in [(2, 2), (4, 1)]:
        assert steps_read(str(tmp_path), world_size, micro_steps, steps, shuffle=shuffle)[0] == one
    # a state saved by one process is resumed by four, on the same stream
    _, state = steps_read(str(tmp_path), world_size=1, micro_steps=4, steps=3, shuffle=shuffle)
    assert (state["epoch"], state["sequence"]) == (0, 3 * 8)  # in order: the end of shard 0
    assert steps_read(str(tmp_path), 4, 1, steps - 3, state, shuffle)[0] == one[3:]


def test_resume_on_two_ranks_from_a_one_rank_checkpoint_near_a_shard_end(tmp_path):
    """A 1-process run (2 micro-steps) checkpointed at a shard's end, resumed under torchrun on 2
    ranks, ends where a 2-rank run that never stopped ends: same weights, same data position."""
    window = 256  # --total_batch_size
    data = random_shards(
        tmp_path / "data", val_tokens=2048, train_lengths=(3 * window + 130, 5 * window + 1)
    )
    flags = [
        *TINY_MODEL, "--data_dir", data, "--batch_size", "4", "--seq_len", "32",
        "--total_batch_size", str(window), "--max_steps", "6", "--warmup_steps", "2",
        "--eval_every", "100", "--val_tokens", "256", "--no-hellaswag",
        "--no-sample_every_eval", "--ckpt_every", "3", "--no-shuffle",
    ]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

    def run(launcher, log_dir, *more):
        result = subprocess.run(
            [*launcher, "train_gpt2.py", *flags, "--log_dir", str(log_dir), *more],
            cwd=REPO, capture_output=True, text=True, env=ENV, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        return result

    run([sys.executable], tmp_path / "one")  # step 2 ends shard 1: step 3 reads shard 2
    run(torchrun, tmp_path / "two")
    os.makedirs(tmp_path / "resumed")
    shutil.copy(tmp_path / "one" / "model_00002.pt", tmp_path / "resumed")
    resumed = run(torchrun, tmp_path / "resumed", "--resume")
    assert "resumed from" in resumed.stdout and "2 process(es) x 1 micro-steps" in resumed.stdout
    ours = torch.load(tmp_path / "resumed" / "model_00005.pt", weights_only=True)
    for reference in ("two", "one"):
        theirs = torch.load(tmp_path / reference / "model_00005.pt", weights_only=True)
        assert ours["loader"] == theirs["loader"]
        for key in theirs["model"]:  # accumulation and DDP add the same gradients in another order
            torch.testing.assert_close(ours["model"][key], theirs["model"][key], atol=1e-5, rtol=0)
    assert (
        ours["loader"]["sequence"] == 24 + 3 * 8
    )  # 3 steps into shard 2 (shard 1 holds 3 steps), as both read


# --- signals --------------------------------------------------------------------------------------


def test_sigterm_cuts_an_evaluation_short_then_saves_and_exits_0(tmp_path):
    data = random_shards(tmp_path / "data", val_tokens=1_000_000)
    log = str(tmp_path / "log")
    # An evaluation of ~7800 batches after step 1: far longer than the test waits for.
    flags = [
        "--data_dir",
        data,
        "--log_dir",
        log,
        "--eval_every",
        "2",
        "--val_tokens",
        "999000",
        "--no-eval_first",
    ]
    run = start("train_gpt2.py", *TINY_RUN, *flags)
    try:
        read_until(run, r"^step +1/")
        time.sleep(0.5)
        sent = time.monotonic()
        run.send_signal(signal.SIGTERM)
        output = run.communicate(timeout=TIMEOUT)[0]
        seconds = time.monotonic() - sent
    finally:
        run.kill()
    assert run.returncode == 0 and "Traceback" not in output, output
    assert "evaluation cut short by the stop request" in output and not re.search(
        r"\| val loss \d", output
    )
    assert (
        f"saved {os.path.join(log, 'model_00001.pt')}" in output
        and "stopped after step 1" in output
    )
    assert seconds < 20, f"{seconds:.1f} s from SIGTERM to exit"
    # The resumed run does the evaluation that was cut short before its first step (a shorter one
    # here).
    resumed = subprocess.run(
        [sys.executable, "train_gpt2.py", *TINY_RUN, *flags, "--resume", "--max_steps", "3",
         "--val_tokens", "256"],
        cwd=REPO, capture_output=True, text=True, env=ENV, timeout=TIMEOUT,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert re.search(
        r"^step 1/2 \| val loss \d.*\n(.*\n)*step 2/2 \| loss", resumed.stdout, re.M
    ), resumed.stdout


def test_a_second_ctrl_c_exits_at_once_without_a_traceback(tmp_path):
    data = random_shards(tmp_path / "data", train_lengths=(70_000,))
    log = str(tmp_path / "log")
    # 512 micro-steps per step: the second Ctrl-C comes long before the step could end and save.
    run = start(
        "train_gpt2.py",
        *TINY_RUN,
        "--data_dir",
        data,
        "--log_dir",
        log,
        "--total_batch_size",
        "65536",
    )
    try:
        read_until(run, r"^data ")
        time.sleep(1)
        run.send_signal(signal.SIGINT)
        read_until(run, r"^SIGINT: saving a checkpoint after this step")
        run.send_signal(signal.SIGINT)
        output = run.communicate(timeout=TIMEOUT)[0]
    finally:
        run.kill()
    assert run.returncode == 130 and "Traceback" not in output, output
    assert (
        output.strip().splitlines()[-1].startswith("interrupted: stopped at once, without saving")
    )
    assert os.listdir(log) == ["log.txt"]  # no checkpoint, no torn .tmp, the lock released


@pytest.mark.skipif(
    not os.path.exists("/dev/full"),
    reason="needs Linux's /dev/full, a file whose writes fail as on a full disk",
)
def test_a_full_disk_at_any_write_is_one_error_line(capsys):
    def writes_a_log_line(
        argv,
    ):  # log.txt's lines are plain writes, not atomic ones: any of them can hit it
        with open("/dev/full", "w") as log:
            log.write("0 train 10.9\n")

    with pytest.raises(SystemExit) as exited:
        run_cli(writes_a_log_line)
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the disk is full") and err.count("\n") == 1, err


# --- third round: drills with real processes, and the cases that must just work -------------------


def test_fineweb_on_sigterm_says_so_in_one_line_and_a_rerun_finishes_the_same_shards(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    for k in range(60):  # 60 documents of ~1.5 MB: several seconds of tokenizing on 2 cores
        (corpus / f"doc{k:02d}.txt").write_text(f"document {k}\n" + text * 160)
    flags = ["--input", str(corpus), "--shard_size", "2000000", "--num_proc", "2"]
    run = start("fineweb.py", *flags, "--out", str(tmp_path / "cut"))
    try:
        read_until(run, r"tokenizing")
        time.sleep(0.5)
        run.send_signal(signal.SIGTERM)
        output = run.communicate(timeout=TIMEOUT)[0]
    finally:
        run.kill()
    assert run.returncode == 143, output
    assert "Traceback" not in output and "BrokenPipe" not in output, output
    assert output.strip().splitlines()[-1] == (
        "terminated: finished shards are kept; run the same command again to resume"
    )
    for out in ("cut", "whole"):  # the cut run, finished by a rerun, and one that never stopped
        rerun = subprocess.run([sys.executable, "fineweb.py", *flags, "--out", str(tmp_path / out)],
                               cwd=REPO, capture_output=True, text=True, env=ENV,
                               timeout=TIMEOUT)  # fmt: skip
        assert rerun.returncode == 0, rerun.stderr
    assert snapshot(tmp_path / "cut") == snapshot(tmp_path / "whole")


@pytest.mark.parametrize("rank, stop", [(1, signal.SIGTERM), (0, signal.SIGINT)])
def test_a_rank_started_without_its_group_says_it_is_waiting_and_stops_when_told(
    tmp_path, rank, stop
):
    data = random_shards(tmp_path / "data")
    port = str(29517 + rank)
    variables = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}  # fmt: skip
    run = subprocess.Popen(
        [sys.executable, "train_gpt2.py", *TINY_RUN, "--data_dir", data,
         "--log_dir", str(tmp_path / "log"), "--total_batch_size", "256"],  # a step of 2 ranks
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**ENV, **variables},
    )  # fmt: skip
    try:
        lines = read_until(run, r"waiting")  # it used to wait for its peers without a word
        # inside torch's wait, where Python's handlers did not run: Ctrl-C and SIGTERM did
        # nothing
        time.sleep(1)
        run.send_signal(stop)
        assert run.wait(timeout=10) == -stop
    finally:
        run.kill()
        run.wait()
    peers = "rank 1" if rank == 0 else "rank 0"
    assert lines[-1].startswith(f"rank {rank} of 2: waiting for {peers} at 127.0.0.1:{port}"), lines
    assert not os.path.exists(tmp_path / "log")


def test_an_export_that_fills_the_disk_is_one_line_and_leaves_nothing(tmp_path):
    path = checkpoint(str(tmp_path / "model_00005.pt"))  # 13 MB of weights
    limit = "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); " \
            "resource.setrlimit(resource.RLIMIT_FSIZE, " \
            "(4 << 20, resource.RLIM_INFINITY))"  # fmt: skip
    script = (
        f"{limit}\nimport sys, export_hf\nfrom machinery import cli\n"
        "cli.run_cli(export_hf.main, sys.argv[1:])"
    )
    run = subprocess.run([sys.executable, "-c", script, "--init", path,
                          "--out", str(tmp_path / "hf")], cwd=REPO, capture_output=True,
                         text=True, env=ENV, timeout=TIMEOUT)  # fmt: skip
    assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("error: the disk is full") or "is the disk full?" in run.stderr, (
        run.stderr
    )
    assert sorted(os.listdir(tmp_path)) == ["model_00005.pt"]  # no export, no half-written folder


def test_only_the_trainer_leaves_an_error_to_its_machines_first_rank(monkeypatch, capsys):
    for name, value in {
        **GROUP,
        "RANK": "1",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "2",
        "TORCHELASTIC_RUN_ID": "x",
    }.items():
        monkeypatch.setenv(name, value)

    def fails(argv):
        raise train_gpt2.UserError("no train shards in data")

    for group, said in [(True, ""), (False, "error: no train shards in data\n")]:
        with pytest.raises(SystemExit):
            run_cli(fails, group=group)
        assert (
            capsys.readouterr().err == said
        )  # in a torchrun group, LOCAL_RANK 0 of the machine says it


def test_a_run_resumed_in_fp16_starts_a_fresh_loss_scaler(tmp_path):
    """--dtype auto picks fp16 where a run moves to an older GPU: its checkpoint's scaler state is
    empty."""
    data, log = random_shards(tmp_path / "data"), str(tmp_path / "log")
    flags = [
        *TINY_RUN,
        "--data_dir",
        data,
        "--log_dir",
        log,
        "--ckpt_every",
        "3",
        "--no-eval_first",
    ]
    first = subprocess.run([sys.executable, "train_gpt2.py", *flags, "--max_steps", "3"], cwd=REPO,
                           capture_output=True, text=True, env=ENV, timeout=TIMEOUT)  # fmt: skip
    assert first.returncode == 0, first.stderr
    resumed = subprocess.run([sys.executable, "train_gpt2.py", *flags, "--resume",
                              "--dtype", "float16"], cwd=REPO, capture_output=True,
                             text=True, env=ENV, timeout=TIMEOUT)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "autocast float16" in resumed.stdout
    scaler = torch.load(os.path.join(log, "model_00005.pt"), weights_only=True)["scaler"]
    assert scaler and scaler["scale"] > 0  # the fp16 run's own scaler, saved for its next resume


def test_fineweb_drops_a_file_named_twice_and_a_byte_order_mark(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("The first document.")
    (corpus / "b.txt").write_bytes(
        "\ufeffThe second document.".encode()
    )  # as Windows' Notepad saves
    fineweb.main(
        [
            "--input",
            str(corpus),
            str(corpus / "a.txt"),
            "--out",
            str(tmp_path / "out"),
            "--num_proc",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert f"note: --input names {corpus / 'a.txt'} twice (first as {corpus / 'a.txt'})" in out
    assert "2 documents" in out  # not 3: a.txt's text is not in the val split and in train too
    tokens = np.load(tmp_path / "out" / "shard_val_000000.npy")
    from machinery.tokenizer import gpt2_tokenizer

    enc = gpt2_tokenizer()
    expected = [
        50256,
        *enc.encode("The first document."),
        50256,
        *enc.encode("The second document."),
    ]
    assert tokens.tolist() == expected  # no tokens for the mark


def test_training_on_the_shards_of_an_unfinished_fineweb_run_says_so(
    tmp_path, capsys, keep_signal_handlers
):
    data = random_shards(tmp_path / "data")
    with open(os.path.join(data, "tiny_progress.json"), "w") as f:
        json.dump({"finished": False, "shards": 2, "documents": 10, "tokens": 12288}, f)
    train_gpt2.main(
        [*TINY_RUN, "--data_dir", data, "--log_dir", str(tmp_path / "log"), "--max_steps", "1"]
    )
    assert (
        "says its fineweb.py run has not finished: training uses the shards written so far"
        in capsys.readouterr().out
    )


SCRIPTS = ("sample.py", "plot_log.py")


def test_the_next_commands_are_quoted_for_the_shell_and_the_clock_can_step_back(
    tmp_path, capsys, monkeypatch
):
    import shlex

    from machinery import progress

    report = progress.Progress(0, 9)
    monkeypatch.setattr(
        time, "time", lambda: 0.0
    )  # the wall clock set back to 1970: no effect on what is shown
    elapsed, _ = report.step_done(1)
    assert elapsed >= 0
    report.train_loss, report.checkpoint = 5.0, "my run/model_00009.pt"
    monkeypatch.chdir(REPO)
    progress.print_summary(report, "my run/log.txt", "ROMEO's line")
    lines = capsys.readouterr().out.splitlines()
    sample_line = next(line for line in lines if line.startswith("next"))
    assert shlex.split(sample_line.removeprefix("next")) == [
        "python", "sample.py", "--init", "my run/model_00009.pt", "--prompt", "ROMEO's line"
    ]  # fmt: skip
    monkeypatch.chdir(
        tmp_path
    )  # run from another folder, the commands name the scripts where they are
    progress.print_summary(report, "log.txt", "a")
    commands = [shlex.split(line[12:]) for line in capsys.readouterr().out.splitlines()[-2:]]
    assert [words[1] for words in commands] == [
        os.path.relpath(os.path.join(REPO, name)) for name in SCRIPTS
    ]
    assert "done in 0:00:0" in "\n".join(lines)


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody may write to: a read-only tmpfs mounted there when the test runs as root
    (root ignores permissions), else a folder without write permission."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield str(folder)
        folder.chmod(0o755)
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(
            "runs as root, which ignores permissions, and may not mount a read-only folder here"
        )
    try:
        yield str(folder)
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_every_script_says_a_read_only_folder_in_one_line(
    tmp_path, read_only_folder, capsys, keep_signal_handlers
):
    data, text = random_shards(tmp_path / "data"), tmp_path / "a.txt"
    text.write_text("A document.")
    log = tmp_path / "log.txt"
    log.write_text("0 train 10.9\n1 train 9.5\n1 val 9.7\n")
    model = checkpoint(str(tmp_path / "model_00005.pt"))
    runs = [
        (
            train_gpt2.main,
            [*TINY_RUN, "--data_dir", data, "--log_dir", read_only_folder],
        ),  # the lock's open
        (
            train_gpt2.main,
            [*TINY_RUN, "--data_dir", data, "--log_dir", os.path.join(read_only_folder, "run")],
        ),
        (fineweb.main, ["--input", str(text), "--out", read_only_folder]),
        (export_hf.main, ["--init", model, "--out", os.path.join(read_only_folder, "hf")]),
        (plot_log.main, [str(log), "-o", os.path.join(read_only_folder, "loss.png")]),
    ]
    before = snapshot(tmp_path)
    for script, argv in runs:
        with pytest.raises(SystemExit) as exited:
            run_cli(script, argv)
        err = capsys.readouterr().err
        assert exited.value.code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
        assert read_only_folder in err and re.search(
            "read-only file system|permission denied", err
        ), err
        assert "disk is full" not in err
    assert snapshot(tmp_path) == before


def test_a_resume_drops_a_torn_last_line_of_the_log_and_the_plot_leaves_one_out(
    tmp_path, capsys, keep_signal_handlers
):
    data, log = random_shards(tmp_path / "data"), tmp_path / "log"
    flags = [
        *TINY_RUN,
        "--data_dir",
        data,
        "--log_dir",
        str(log),
        "--no-eval_first",
        "--no-shuffle",
    ]
    train_gpt2.main([*flags, "--max_steps", "3"])
    with open(log / "log.txt", "a") as f:
        f.write("3 trai")  # a kill in the middle of a line
    torn = (log / "log.txt").read_text()
    assert plot_log.parse_log(str(log / "log.txt"))["train"][0] == [0, 1, 2]
    assert (
        f"note: the last line of {log / 'log.txt'} is cut short ('3 trai'): it is left out"
        in capsys.readouterr().out
    )
    train_gpt2.main([*flags, "--max_steps", "6", "--resume"])
    lines = (log / "log.txt").read_text().splitlines()
    assert (
        lines[: len(torn.splitlines()) - 1] == torn.splitlines()[:-1]
    )  # what was whole is kept as it was
    assert all(re.fullmatch(r"\d+ (train|val) [0-9.]+", line) for line in lines), (
        lines
    )  # was "3 trai3 train 10.8"
    assert plot_log.parse_log(str(log / "log.txt"))["train"][0] == [0, 1, 2, 3, 4, 5]
    (log / "log.txt").write_text(
        "0 train 3.5\n1 train 2"
    )  # cut from "1 train 2.345": it parses, and is left out
    assert plot_log.parse_log(str(log / "log.txt"))["train"] == ([0], [3.5])


def test_a_new_run_says_it_replaces_an_earlier_log_and_that_its_warmup_is_too_long(
    tmp_path, capsys, keep_signal_handlers
):
    data, log = random_shards(tmp_path / "data"), tmp_path / "log"
    log.mkdir()
    (log / "log.txt").write_text("0 train 3.0\n1000 val 2.5\n")  # a run that saved no checkpoint
    train_gpt2.main(
        [
            *TINY_RUN,
            "--data_dir",
            data,
            "--log_dir",
            str(log),
            "--max_steps",
            "1",
            "--warmup_steps",
            "4",
        ]
    )
    out = capsys.readouterr().out
    assert f"note: {log / 'log.txt'} of an earlier run that saved no checkpoint is replaced" in out
    assert (
        "note: --warmup_steps 4 is not below --max_steps 1: "
        "the learning rate only warms up, to 25% of" in out
    )
    assert "1000 val" not in (log / "log.txt").read_text()


def test_ctrl_c_in_any_script_is_one_line_and_exit_130(capsys):
    def interrupted_main(argv):
        # as Ctrl-C in sample.py's or hellaswag.py's loop: a traceback before
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exited:
        run_cli(interrupted_main)
    assert exited.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted"
