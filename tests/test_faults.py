"""Faults: bad input to any script, as one table, and the drills that need a real training process.

Each row of the table names a script, sets up a folder for it, and states what must come of it: the
exit status, the text its last line holds (a refusal's is one `error:` line), and the files it may
create, change or remove (none for a refusal). The test runs the script's main() in this process
through run_cli, as its command line would, and checks that no traceback was printed; a few rows run
again end to end, in a fresh interpreter. Rows cover every class of fault: numbers, paths, data,
resumes, foreign files, concurrency (a lock held by another process), torchrun's variables, out of
memory and divergence.

The drills: SIGKILL mid-step, during evaluation and during a checkpoint write, each followed by
--resume, ends bit-identical to a run never killed, and a torn checkpoint never replaces the good
one; SIGTERM and SIGINT save the current step and exit 0 within seconds, also while blocked on a
full pipe. Checkpoints are read with weights_only=True: opening one cannot run code. Drills of the
other scripts and of several processes are in test_hardening.py; fineweb.py's in test_fineweb.py.
"""

import fcntl
import fnmatch
import glob
import json
import os
import queue
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time

import numpy as np
import pytest
import torch

import export_hf
import fineweb
import hellaswag
import plot_log
import sample
import train_gpt2
from conftest import (
    ENV,
    REPO,
    TIMEOUT,
    TINY_RUN,
    TINY_SHAPE,
    file_size_limit,
    snapshot,
    tiny_checkpoint,
    write_bin_shard,
    write_random_shards,
)
from machinery.checkpoints import latest_checkpoint
from machinery.cli import UserError, run_cli
from train_gpt2 import GPT, GPTConfig, load_checkpoint, load_model, save_checkpoint

# --- the table ------------------------------------------------------------------------------------

# torchrun's variables of a one-process group
GROUP = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
# What keeps the Hugging Face libraries off the network, or points them elsewhere
OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy",
           "NO_PROXY")  # fmt: skip
HOLD_LOCK = """
import sys, time
from machinery.files import output_lock
with output_lock(sys.argv[1], "--folder"):
    print("locked", flush=True)
    time.sleep(600)
"""


class Workspace:
    """A temporary folder for one row: data/ holds a val shard of 4,096 random tokens and a train
    shard of 8,192. The with_* methods change it and return it, so that a row's setup reads as one
    expression; the others return a path or a script's argv. Paths are relative to the folder."""

    def __init__(self, root, monkeypatch):
        self.root, self.monkeypatch = str(root), monkeypatch
        self.data, self.log = write_random_shards(self.path("data")), self.path("log")
        self.holders, self.servers = [], []

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def write(self, relative, content):
        path = self.path(relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
        return path

    def weights(self, relative="model_00005.pt", **entries):
        """A checkpoint of the tiny model's weights and config only."""
        return tiny_checkpoint(self.path(relative), **entries)

    def resumable(self, relative="log/model_00003.pt", **entries):
        """A checkpoint that a run on data/ can resume."""
        return tiny_checkpoint(self.path(relative), data_dir=self.data, **entries)

    def damaged(self, **entries):
        """The argv of a run resuming log/model_00003.pt with its entries replaced (None: removed;
        a function: applied to the entry), as a hand edit would leave them."""
        path = self.resumable()
        state = torch.load(path, weights_only=True)
        for key, value in entries.items():
            if value is None:
                del state[key]
            else:
                state[key] = value(state[key]) if callable(value) else value
        torch.save(state, path)
        return self.train("--resume", "--no-shuffle")  # the order resumable() read in

    # --- the scripts' argvs
    def train(self, *flags):
        return [*TINY_RUN, "--data_dir", self.data, "--log_dir", self.log, *flags]

    def sample(self, *flags):
        return ["--init", self.weights(), "--device", "cpu", *flags]

    def export(self, out, *flags):
        out = out if out in ("", ".") else self.path(out)  # those two as the user typed them
        return ["--init", self.weights(), "--out", out, *flags]

    def fineweb(self, *flags, name="corpus.txt", text="some text", out="out"):
        return ["--input", self.write(name, text), "--out", self.path(out), *flags]

    def plot(self, log, out="loss.png"):
        return [self.write("log.txt", log), "-o", self.path(out)]

    # --- changes that return the workspace
    def with_file(self, relative, content):
        self.write(relative, content)
        return self

    def with_folder(self, relative):
        os.makedirs(self.path(relative))
        return self

    def with_link(self, target, link):
        os.symlink(self.path(target), self.path(link))
        return self

    def with_copy(self, source, copy):
        shutil.copy(self.path(source), self.path(copy))
        return self

    def moved(self, source, destination):
        os.rename(self.path(source), self.path(destination))
        return self

    def without(self, *relatives):
        for relative in relatives:
            os.remove(self.path(relative))
        return self

    def truncated(self, relative):
        os.truncate(self.path(relative), os.path.getsize(self.path(relative)) // 2)
        return self

    def with_shard(self, relative, tokens):
        np.save(self.path(relative), tokens)
        return self

    def with_bin(self, relative, tokens, **header):
        write_bin_shard(self.path(relative), tokens, **header)
        return self

    def with_weights(self, relative, **entries):
        self.weights(relative, **entries)
        return self

    def with_resumable(self, relative, **entries):
        self.resumable(relative, **entries)
        return self

    def with_patch(self, target, name, value):
        self.monkeypatch.setattr(target, name, value)
        return self

    def in_its_folder(self):
        self.monkeypatch.chdir(self.root)
        return self

    def with_group(self, **variables):
        """torchrun's variables: these, and none of the others."""
        for name in GROUP:
            self.monkeypatch.delenv(name, raising=False)
        for name, value in variables.items():
            self.monkeypatch.setenv(name, value)
        return self

    def in_group(self, **changes):
        """A one-process group's variables, with these changes."""
        return self.with_group(**{**GROUP, **changes})

    def with_env(self, **variables):
        for name, value in variables.items():
            self.monkeypatch.setenv(name, value)
        return self

    def online(self, **variables):
        """None of the offline variables, then these."""
        for name in OFFLINE:
            self.monkeypatch.delenv(name, raising=False)
        return self.with_env(**variables)

    def argv(self, *argv):
        """The end of a chain of changes: the script's argv."""
        return list(argv)

    def with_lock(self, folder):
        """Another process that holds `folder`'s lock until the row ends."""
        holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, self.path(folder)], cwd=REPO,
                                  stdout=subprocess.PIPE, text=True, env=ENV)  # fmt: skip
        self.holders.append(holder)
        assert holder.stdout.readline().strip() == "locked"
        return self

    def with_port_in_use(self, port):
        """A server listening on 127.0.0.1:port until the row ends, as another program's would."""
        import socket

        self.servers.append(socket.create_server(("127.0.0.1", port)))
        return self

    def release(self):
        for holder in self.holders:
            holder.kill()
            holder.wait()
        for server in self.servers:
            server.close()


def nanogpt_checkpoint(w):
    """nanoGPT's layout: 'model_args' for the model, and 'config' holding its training settings."""
    model_args = dict(TINY_SHAPE, bias=False, dropout=0.0)
    state = {"model": GPT(GPTConfig(**TINY_SHAPE)).state_dict(), "model_args": model_args}
    state.update(iter_num=5, config={"out_dir": "out", "eval_interval": 2000, "batch_size": 12})
    state["config"].update(model_args)
    torch.save(state, w.path("ckpt.pt"))
    return w.path("ckpt.pt")


def hf_directory(w, n_head, extra=None):
    """A Hugging Face GPT-2 folder: config.json with `n_head`, and a pytorch_model.bin of plain
    tensors (and `extra`)."""
    config = dict(n_positions=64, vocab_size=50257, n_layer=2, n_head=n_head, n_embd=64)
    w.write("hf/config.json", json.dumps({"model_type": "gpt2", **config}))
    torch.save({"wte.weight": torch.zeros(3), **(extra or {})}, w.path("hf/pytorch_model.bin"))
    return ["--init", w.path("hf"), "--device", "cpu"]


class Pickled:
    """An object that only an unrestricted (code-running) unpickler can load."""


def out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def diverging_train_step(bad_step, weights):
    """train_step as it is until call `bad_step`, which returns a NaN loss, or (weights=True) leaves
    inf weights behind a finite loss."""
    calls, real_train_step = [], train_gpt2.train_step

    def train_step(step_model, *args):
        loss, norm = real_train_step(step_model, *args)
        calls.append(None)
        if len(calls) - 1 == bad_step:
            if not weights:
                return loss * float("nan"), norm
            next(step_model.parameters()).data.fill_(float("inf"))
        return loss, norm

    return train_step


def sample_from_nan_weights(w):
    model = GPT(GPTConfig(**TINY_SHAPE))
    model.transformer.ln_f.weight.data *= float("nan")
    return ["--init", w.weights(model=model), "--device", "cpu"]


def resume_after_the_data_changed(w, shard, tokens):
    path = w.resumable()
    w.with_shard(shard, tokens)  # after the checkpoint: it saw the data as it was
    return w.train("--resume", path)


def fineweb_input_replaced_by_a_file_of_the_same_size(w):
    flags = ["--shard_size", "500", "--num_proc", "1"]
    fineweb.main(w.fineweb(*flags, text="the first corpus, " * 200))
    return w.fineweb(*flags, text="another corpus!!, " * 200)  # same size, other text


def hellaswag_on_a_model_too_short_for_an_example(w):
    example = {"ctx": "A man", "endings": ["runs", "sits", "eats", "sings"], "label": 0}
    short = GPT(GPTConfig(block_size=1, vocab_size=50304, n_layer=1, n_head=1, n_embd=8))
    return ["--init", w.weights(model=short), "--data", w.write("h.jsonl", json.dumps(example)),
            "--device", "cpu"]  # fmt: skip


def row(name, script, setup, says, code=1, changes=()):
    """`script` (a module with a main) run on the argv that setup(workspace) returns must exit with
    `code`, its last line must hold each of `says` (a string or several; {w.data}, {w.log} and
    {w.root} name the workspace's folders), and only paths matching the globs in `changes` may
    appear, change or disappear."""
    says = (says,) if isinstance(says, str) else says
    return pytest.param(script, setup, says, code, changes, id=name)


LOG = "-1 val 10.9\n0 train 10.9\n1 train 10.5\n1 val 10.4\n"
FP16_SCALER = dict(scale=65536.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                   _growth_tracker=0)  # fmt: skip
ELASTIC = dict(GROUP, RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", TORCHELASTIC_RUN_ID="stray")
NO_INIT = "no_such.pt' is not a file, a directory, or one of gpt2"
TRAIN_SHARD, VAL_SHARD = "data/tiny_train_000001.npy", "data/tiny_val_000000.npy"
A_SHARD_OF = "holds train shards of two corpora (other_train_{}.npy, tiny_train_000001.npy)"
CONTEXT = "with the 32 that each sample adds, past the model's context of"

# A comment after a row says what the script did before its fix, where that was not a refusal.
# fmt: off
FAULTS = [
    # Numbers: every numeric flag must be finite and in its range, by one table (FLAG_RANGES).
    row("max_lr_inf", train_gpt2, lambda w: w.train("--max_lr", "inf"),
        "--max_lr must be a finite number"),
    row("max_lr_nan", train_gpt2, lambda w: w.train("--max_lr", "nan"),
        "--max_lr must be a finite number"),
    row("max_lr_past_what_adamw_can_step", train_gpt2, lambda w: w.train("--max_lr", "1e38"),
        "--max_lr must be a finite number, in [0, 1]"),
    row("min_lr_nan", train_gpt2, lambda w: w.train("--min_lr", "nan"),
        "--min_lr must be a finite number"),
    row("weight_decay_overflowing_to_inf", train_gpt2, lambda w: w.train("--weight_decay", "1e400"),
        "--weight_decay must be a finite number"),
    row("grad_clip_inf", train_gpt2, lambda w: w.train("--grad_clip", "inf"),
        "--grad_clip must be a finite number"),
    row("beta2_one", train_gpt2, lambda w: w.train("--beta2", "1"),
        "--beta2 must be a finite number, in [0, 1)"),
    row("eps_negative", train_gpt2, lambda w: w.train("--eps=-1e-8"),
        "--eps must be a finite number, in (0, 1e-3]"),
    row("eps_so_large_that_nothing_is_learned", train_gpt2, lambda w: w.train("--eps", "1e300"),
        "a larger eps makes AdamW's steps vanish"),
    row("weight_decay_that_wipes_the_weights", train_gpt2,
        lambda w: w.train("--weight_decay", "1e10"),
        "each step would decay every weight by all of it; lower --weight_decay"),
    row("peak_flops_zero", train_gpt2, lambda w: w.train("--peak_flops", "0"),
        "--peak_flops must be a finite number, positive"),
    row("n_head_zero", train_gpt2, lambda w: w.train("--n_head", "0"),
        "--n_head must be a finite number, positive"),
    row("val_tokens_zero", train_gpt2, lambda w: w.train("--val_tokens", "0"),
        "--val_tokens must be a finite number, positive"),
    row("vocab_size_too_small", train_gpt2, lambda w: w.train("--vocab_size", "100"),
        "--vocab_size 100 is smaller than GPT-2's 50257"),
    row("seed_too_large_for_torch", train_gpt2, lambda w: w.train("--seed", str(10**23)),
        "--seed must be a finite number, in [0, 2**63)"),
    *[row(f"{flag}_{value}", train_gpt2, lambda w, flag=flag, value=value:
          w.train(f"--{flag}", value), (f"--{flag}", value))
      for flag, value in [("batch_size", "0"), ("seq_len", "0"), ("max_steps", "-1"),
                          ("max_lr", "-1"), ("ckpt_every", "0"), ("eval_every", "0"),
                          ("warmup_steps", "-5")]],
    row("total_batch_not_divisible", train_gpt2, lambda w: w.train("--total_batch_size", "200"),
        ("--total_batch_size 200", "not divisible", "128")),
    row("seq_len_over_block_size", train_gpt2,
        lambda w: w.train("--seq_len", "128", "--total_batch_size", "512"),
        ("--seq_len 128", "--block_size 64")),
    row("sample_temperature_nan", sample, lambda w: w.sample("--temperature", "nan"),
        "--temperature must be a finite number"),
    row("sample_temperature_tiny", sample, lambda w: w.sample("--temperature", "1e-40"),
        "--temperature must be a finite number, 0 (the most likely token) or at least 1e-3"),
    row("sample_top_k_zero", sample, lambda w: w.sample("--top_k", "0"),
        "--top_k must be a finite number, positive"),
    row("sample_seed_too_large_for_torch", sample, lambda w: w.sample("--seed", str(2**70)),
        "--seed must be a finite number, in [0, 2**63)"),  # a traceback
    row("sample_on_the_meta_device", sample, lambda w: w.sample("--device", "meta"),
        "--device 'meta' is not a device this project runs on"),
    row("sample_prompt_longer_than_the_context_window", sample,
        lambda w: w.sample("--prompt", "the cat sat on the mat " * 20, "--max_new_tokens", "8",
                           "--num_samples", "1"),
        ("context window", "64")),
    row("fineweb_shard_size_zero", fineweb, lambda w: w.fineweb("--shard_size", "0"),
        "--shard_size and --num_proc must be at least 1"),

    # Command lines: one line and exit 1, as every other user error (argparse: usage and exit 2).
    row("a_flag_without_its_value", train_gpt2, lambda w: [*w.train(), "--max_steps"],
        "argument --max_steps: expected one argument (see"),
    row("an_unknown_flag", sample, lambda w: ["--bogus"], "unrecognized arguments: --bogus (see"),
    row("sample_with_an_unknown_init", sample,
        lambda w: ["--init", "nonexistent_thing", "--device", "cpu"], "nonexistent_thing"),

    # Paths: each path flag must be the right kind of thing.
    row("log_dir_is_a_file", train_gpt2, lambda w: w.with_file("log", "not a folder").train(),
        "is a file, not a folder"),
    row("log_dir_a_dangling_link", train_gpt2, lambda w: w.with_link("gone", "log").train(),
        "is a symbolic link to"),  # said "File exists"
    row("log_txt_a_folder", train_gpt2, lambda w: w.with_folder("log/log.txt").train(),
        "log/log.txt: is a folder where a file is needed: move the folder", changes=["log/.lock"]),
    row("log_txt_a_symbolic_link", train_gpt2,  # log.txt was overwritten, the user's own file
        lambda w: w.with_file("keep.txt", "the user's own file\n").with_folder("log")
                   .with_link("keep.txt", "log/log.txt").train(),
        "log/log.txt is a symbolic link (to ", changes=["log/.lock"]),
    row("data_dir_missing", train_gpt2, lambda w: w.train("--data_dir", w.path("nowhere")),
        "no train shards"),
    row("data_dir_empty", train_gpt2, lambda w: w.train("--data_dir", ""),
        "--data_dir '' names no folder"),  # "no train shards ... in : run ..."
    row("data_dir_a_file", train_gpt2, lambda w: w.train("--data_dir", w.path(VAL_SHARD)),
        "data/tiny_val_000000.npy is a file, not a folder: pass the folder that holds the shards"),
    row("no_shards", train_gpt2, lambda w: w.without(TRAIN_SHARD, VAL_SHARD).train(),
        ("no train shards", "{w.data}")),
    row("only_val_split", train_gpt2, lambda w: w.without(TRAIN_SHARD).train(), "no train shards"),
    row("only_train_split", train_gpt2, lambda w: w.without(VAL_SHARD).train(), "no val shards"),
    row("folder_named_like_a_shard_is_not_one", train_gpt2,
        lambda w: w.without(TRAIN_SHARD).with_folder("data/tiny_train_000001.bin").train(),
        "no train shards"),
    row("a_prefix_ending_in_train_does_not_make_val_a_train_shard", train_gpt2,
        lambda w: w.without(TRAIN_SHARD).moved(VAL_SHARD, "data/x_train_val_000000.npy").train(),
        "no train shards"),
    row("export_out_empty", export_hf, lambda w: w.export(""), "--out is empty"),
    row("export_out_is_a_file", export_hf,
        lambda w: w.with_file("exported", "not a folder").export("exported"),
        "is a file, not a folder"),
    row("export_out_a_symbolic_link", export_hf,  # exported, then a traceback and exit 1
        lambda w: w.with_folder("real").with_link("real", "link").export("link", "--force"),
        "is a symbolic link: pass the folder it points to"),
    row("export_out_the_current_folder", export_hf,
        lambda w: w.in_its_folder().export(".", "--force"),
        "--out . holds the current folder"),
    row("export_over_its_own_log_dir", export_hf,  # deleted log.txt and every checkpoint, exit 0
        lambda w: ["--init", w.with_file("log/log.txt", "0 train 10.9\n")
                   .weights("log/model_00005.pt"), "--out", w.log, "--force"],
        "holds files that an export does not write (log.txt, model_00005.pt): "
        "--force replaces only"),
    row("export_force_over_a_folder_named_like_an_export_file", export_hf,  # deleted, exit 0
        lambda w: w.with_file("out/vocab.json/important.txt", "mine").export("out", "--force"),
        "holds files that an export does not write (vocab.json)"),
    row("fineweb_out_is_a_file", fineweb, lambda w: w.with_file("out", "not a folder").fineweb(),
        "is a file, not a folder"),
    row("fineweb_out_under_a_file", fineweb,
        lambda w: w.fineweb(name="notes.txt", text="a short document", out="notes.txt/shards"),
        "notes.txt/shards: a file is in the way where this path needs a folder"),
    row("fineweb_lock_file_a_folder", fineweb,  # the lock's open was a traceback
        lambda w: w.with_folder("out/.lock").fineweb(name="notes.txt", text="a short document"),
        "out/.lock: is a folder where a file is needed: move the folder, or pass another path"),
    row("plot_a_binary_file", plot_log, lambda w: w.plot(bytes(range(256)) * 4),
        "is not a text file"),
    row("plot_a_text_file_that_is_not_a_log", plot_log, lambda w: w.plot("x" * 10_000 + "\n"),
        "expected '<step> <kind> <value>'"),
    row("plot_out_under_a_file", plot_log,  # said "File exists"
        lambda w: w.with_file("notes.txt", "mine").plot(LOG, out="notes.txt/loss.png"),
        "notes.txt: a file is in the way where this path needs a folder"),
    row("plot_out_a_folder", plot_log, lambda w: w.with_folder("loss.png").plot(LOG),
        "loss.png: it is a folder; pass a file's path"),
    row("hellaswag_data_empty", hellaswag, lambda w: ["--init", w.weights(), "--data", ""],
        "the path '' names no file"),
    row("hellaswag_data_a_folder", hellaswag, lambda w: ["--init", w.weights(), "--data", w.data],
        "is a folder: pass the path of the hellaswag_val.jsonl file in it"),
    row("hellaswag_init_checked_before_the_download", hellaswag,  # said the download's error first
        lambda w: w.with_env(HF_HUB_OFFLINE="1").argv("--init", w.path("nowhere.pt"),
                                                      "--device", "cpu"),
        "nowhere.pt' is not a file, a directory"),

    # Data: shards that are not GPT-2 tokens, or names that would mix the splits or two corpora.
    row("truncated_npy", train_gpt2, lambda w: w.truncated(TRAIN_SHARD).train(),
        ("tiny_train_000001.npy", "truncated")),  # what an interrupted copy leaves
    row("int32_npy", train_gpt2,
        lambda w: w.with_shard(TRAIN_SHARD, np.arange(5000, dtype=np.int32)).train(),
        ("tiny_train_000001.npy", "int32", "uint16")),
    row("shard_shorter_than_a_batch", train_gpt2,
        lambda w: w.with_shard(TRAIN_SHARD, np.arange(100, dtype=np.uint16)).train(),
        ("tiny_train_000001.npy", "fewer than one batch")),
    row("bin_with_wrong_magic", train_gpt2,
        lambda w: w.without(TRAIN_SHARD)
                   .with_bin("data/fineweb_train_000001.bin", np.arange(5000), magic=12345).train(),
        ("fineweb_train_000001.bin", "magic 12345")),
    row("truncated_bin", train_gpt2,
        lambda w: w.without(TRAIN_SHARD).with_bin("data/fineweb_train_000001.bin",
                                                  np.arange(5000), promised=100_000_000).train(),
        ("fineweb_train_000001.bin", "truncated")),
    row("npy_shard_with_token_ids_past_the_vocabulary", train_gpt2,
        lambda w: w.with_shard(TRAIN_SHARD, np.full(8192, 60000, dtype=np.uint16)).train(),
        "holds token id 60000, but GPT-2's tokenizer has 50257 tokens"),
    row("bin_shard_with_token_ids_past_the_vocabulary", train_gpt2,
        lambda w: w.without(TRAIN_SHARD)
                   .with_bin("data/llmc_train_000001.bin", np.full(8192, 50300)).train(),
        "holds token id 50300"),
    row("two_corpora_in_one_folder", train_gpt2,
        lambda w: w.with_copy(TRAIN_SHARD, "data/other_train_000001.npy").train(),
        A_SHARD_OF.format("000001")),
    row("two_corpora_with_different_indices_in_one_folder", train_gpt2,  # mixed silently
        lambda w: w.with_copy(TRAIN_SHARD, "data/other_train_000007.npy").train(),
        A_SHARD_OF.format("000007")),
    row("one_index_as_npy_and_as_bin", train_gpt2,
        lambda w: w.with_bin("data/tiny_train_000001.bin", np.load(w.path(TRAIN_SHARD))).train(),
        "two train shards with index 1 (tiny_train_000001.bin, tiny_train_000001.npy)"),
    row("a_shard_of_no_tokens", train_gpt2,  # miscounted the epoch
        lambda w: w.with_shard("data/tiny_train_000002.npy", np.zeros(0, np.uint16)).train(),
        "tiny_train_000002.npy holds no tokens: remove it"),
    row("a_shard_that_is_a_dangling_link", train_gpt2,  # skipped without a word
        lambda w: w.with_link("gone.npy", "data/tiny_train_000002.npy").train(),
        "tiny_train_000002.npy is a symbolic link to"),
    row("fineweb_prefix_naming_a_split", fineweb, lambda w: w.fineweb("--prefix", "x_train"),
        "--prefix 'x_train'"),
    row("fineweb_into_a_folder_of_another_corpus", fineweb,  # the folder no longer trained
        lambda w: w.fineweb("--prefix", "shard", name="notes.txt", text="a short document",
                            out="data"),
        "holds shards of another corpus (tiny_train_000001.npy), "
        "and the trainer reads one corpus per folder"),
    row("fineweb_empty_documents_say_so", fineweb,
        lambda w: w.fineweb("--num_proc", "1", name="empty.txt", text=""),
        "every document was empty", code=0, changes=["out", "out/*"]),
    row("fineweb_damaged_progress_file", fineweb,
        lambda w: w.with_file("out/edufineweb_progress.json", '{"settings": ').fineweb(),
        "is damaged"),
    row("fineweb_input_replaced_by_a_file_of_the_same_size", fineweb,
        fineweb_input_replaced_by_a_file_of_the_same_size, "other settings (input"),

    # Resumes: only the trainer's own checkpoints count, and one must fit the data and the run.
    row("resume_with_no_checkpoint", train_gpt2,
        lambda w: w.with_file("log/log.txt", "0 train 10.8\n").train("--resume"),
        ("no checkpoint", "{w.log}")),
    row("resume_from_an_empty_folder", train_gpt2,
        lambda w: w.with_folder("elsewhere").train("--resume", w.path("elsewhere")),
        "no checkpoint model_*.pt in"),
    row("a_users_backup_is_not_a_checkpoint", train_gpt2,
        lambda w: w.with_resumable("log/model_00002_backup.pt").train("--resume"),
        "no checkpoint model_*.pt in"),
    row("a_dead_process_lock_never_blocks", train_gpt2,  # the refusal is the next check's
        lambda w: w.with_file("log/.lock", "999999999@a-host-that-crashed\n").train("--resume"),
        "no checkpoint model_*.pt in", changes=["log/.lock"]),
    row("resume_from_missing_file", train_gpt2,
        lambda w: w.with_folder("log").train("--resume", w.path("log/model_00099.pt")),
        "{w.log}/model_00099.pt"),
    row("resume_an_empty_path", train_gpt2, lambda w: w.train("--resume", ""),
        "--resume '' names no checkpoint"),  # started a new run
    row("resume_from_a_tmp_file_by_name", train_gpt2,
        lambda w: w.train("--resume", w.resumable("log/model_00003.pt.tmp")),
        "a .tmp file is a checkpoint whose write was cut short"),
    row("resume_from_random_bytes", train_gpt2,
        lambda w: w.train("--resume", w.write("log/model_00005.pt",
                                               np.random.default_rng(0).bytes(10_000))),
        ("{w.log}/model_00005.pt", "not a checkpoint")),
    row("resume_a_torn_checkpoint_with_none_before_it", train_gpt2,  # said "move it out of log"
        lambda w: w.with_file("log/model_00005.pt", b"").train("--resume"),
        "is not a checkpoint of this project (EOFError): "
        "it may be truncated or another kind of file"),
    row("resume_a_torn_newest_checkpoint", train_gpt2,  # said pass the earlier one: refused, older
        lambda w: w.with_resumable("log/model_00003.pt").with_file("log/model_00005.pt", b"")
                   .train("--resume"),
        "move it out of"),
    row("resume_from_weights_only_checkpoint", train_gpt2,
        lambda w: w.train("--resume", w.weights("log/model_00005.pt")),
        ("{w.log}/model_00005.pt", "weights only")),
    row("resume_weights_only", train_gpt2,
        lambda w: w.train("--resume", w.weights("log/model_00003.pt")),
        "it cannot be resumed; start a new run from its weights with --init"),
    row("resume_with_another_n_layer", train_gpt2,
        lambda w: w.with_resumable("log/model_00005.pt").train("--resume", "--n_layer", "3"),
        ("{w.log}/model_00005.pt", "--n_layer 2 there, 3 here", "model flags it was trained with")),
    row("resume_with_another_total_batch_size", train_gpt2,
        lambda w: w.train("--resume", w.resumable(), "--total_batch_size", "256"),
        "resume with its --total_batch_size"),
    row("resume_after_the_data_changed", train_gpt2,  # regenerated differently
        lambda w: resume_after_the_data_changed(w, TRAIN_SHARD, np.arange(8192, dtype=np.uint16)),
        "not the ones the checkpoint was trained on (tiny_train_000001.npy holds other tokens"),
    row("resume_after_a_shard_was_added", train_gpt2,
        lambda w: resume_after_the_data_changed(w, "data/tiny_train_000002.npy",
                                                np.arange(8192, dtype=np.uint16)),
        "1 train shards then, 2 now"),
    row("fresh_start_over_checkpoints", train_gpt2,  # would overwrite its log and checkpoints
        lambda w: w.with_resumable("log/model_00005.pt").with_file("log/log.txt", "5 train 10.8\n")
                   .train(),
        ("already holds checkpoints", "--resume")),
    row("resume_from_another_folder_into_a_used_log_dir", train_gpt2,
        lambda w: w.with_resumable("log/model_00007.pt")
                   .train("--resume", w.resumable("other/model_00003.pt")),
        "holds checkpoints of another run (model_00007.pt)"),
    row("resume_a_folder_into_a_log_dir_of_another_run", train_gpt2,  # then overwrote log/'s newer
        lambda w: w.with_resumable("log/model_00003.pt").with_resumable("other/model_00001.pt",
                                                                         step=1)
                   .train("--resume", w.path("other")),
        "holds checkpoints of another run (model_00003.pt): resuming"),
    row("resume_an_earlier_checkpoint_among_newer_ones", train_gpt2,  # wrote over model_00005.pt
        lambda w: w.with_resumable("log/model_00005.pt").train("--resume", w.resumable()),
        "holds model_00005.pt, newer than"),
    row("resume_a_file_that_is_not_a_checkpoint_into_a_used_log_dir", train_gpt2,
        lambda w: w.with_resumable("log/model_00003.pt")
                   .train("--resume", w.write("s.txt", "notes")),  # "checkpoints of another run"
        "s.txt is not a checkpoint of this project"),
    row("resume_a_checkpoint_named_past_its_step", train_gpt2,  # later ones sorted before it
        lambda w: w.with_resumable("log/model_00009.pt", step=3).train("--resume", "--no-shuffle"),
        "model_00009.pt holds step 3, not the step 9 of its name (a renamed copy?)"),
    row("resume_a_renamed_checkpoint_into_a_new_folder", train_gpt2,
        lambda w: w.with_resumable("log/model_00002.pt", step=1)  # its successors sort after it
                   .train("--log_dir", w.path("new"), "--resume", w.path("log/model_00002.pt"),
                          "--no-shuffle"),
        "", code=0, changes=["new", "new/*"]),
    row("eval_only_of_an_earlier_checkpoint_among_newer_ones", train_gpt2,  # refused as overwriting
        lambda w: w.with_resumable("log/model_00005.pt")
                   .train("--eval_only", "--resume", w.resumable("log/model_00001.pt")),
        "val loss", code=0),
    row("eval_only_of_another_run_with_a_used_log_dir", train_gpt2,
        lambda w: w.with_resumable("log/model_00005.pt").with_resumable("other/model_00002.pt")
                   .train("--eval_only", "--resume", w.path("other")),
        "val loss", code=0),
    row("eval_only_with_a_batch_past_the_val_split", train_gpt2,
        lambda w: w.train("--init", w.weights(), "--eval_only", "--batch_size", "256"),
        "the val split holds no batch: lower --batch_size (or --seq_len)"),

    # Checkpoint entries that reached a traceback, or trained wrongly.
    row("checkpoint_step_negative", train_gpt2, lambda w: w.damaged(step=-5),  # model_-0004.pt
        "its step entry is missing or damaged, so it cannot be resumed"),
    row("checkpoint_step_a_float", train_gpt2, lambda w: w.damaged(step=3.0),
        "its step entry is missing or damaged"),
    row("checkpoint_without_scaler_and_rng", train_gpt2, lambda w: w.damaged(scaler=None, rng=None),
        "its scaler, rng entry is missing or damaged"),
    row("checkpoint_with_an_empty_optimizer", train_gpt2, lambda w: w.damaged(optimizer={}),
        "its optimizer entry is missing or damaged"),
    row("checkpoint_position_past_the_data", train_gpt2,
        lambda w: w.damaged(loader=lambda loader: {**loader, "sequence": 10**6}),
        "is not the start of a step of an epoch of 252 sequences: the checkpoint is damaged"),
    row("checkpoint_data_fingerprint_not_a_list", train_gpt2,  # IndexError
        lambda w: w.damaged(loader=lambda loader: {**loader, "data": 5}),
        "its loader entry is missing or damaged"),
    row("checkpoint_rng_state_of_the_wrong_size", train_gpt2,  # set_rng_state's RuntimeError
        lambda w: w.damaged(rng=lambda rng: {"torch": rng["torch"][:100]}),
        "its rng entry is missing or damaged"),
    row("checkpoint_args_none", train_gpt2, lambda w: w.damaged(args=lambda args: None),
        "its args entry is missing or damaged"),  # AttributeError in the resume's line
    row("checkpoint_scale_not_a_number", train_gpt2,  # TypeError
        lambda w: w.damaged(scaler=dict(FP16_SCALER, scale="big")),
        "its scaler entry is missing or damaged"),
    row("checkpoint_scaler_without_a_scale", train_gpt2,  # KeyError, an empty log.txt
        lambda w: w.damaged(scaler={"growth_factor": 2.0, "_growth_tracker": 0}),
        "its scaler entry is missing or damaged"),
    row("checkpoint_scale_nan", train_gpt2,  # no step
        lambda w: w.damaged(scaler=dict(FP16_SCALER, scale=float("nan"))),
        "its scaler entry is missing or damaged"),
    row("checkpoint_scale_negative", train_gpt2,  # every step skipped
        lambda w: w.damaged(scaler=dict(FP16_SCALER, scale=-1.0)),
        "its scaler entry is missing or damaged"),
    row("checkpoint_with_nan_weights", train_gpt2,
        lambda w: w.damaged(model=lambda model: {
            k: v * float("nan") if k == "transformer.h.0.mlp.c_fc.weight" else v
            for k, v in model.items()}),
        "holds NaN or inf, so its outputs would too"),
    row("resume_a_checkpoint_with_indivisible_heads", train_gpt2,
        lambda w: w.train("--resume", w.resumable(config=dict(TINY_SHAPE, n_head=3))),
        "its model config is impossible (n_embd not divisible by n_head)"),
    row("resume_a_finished_run", train_gpt2, lambda w: w.damaged(step=5),  # said "steps 6 to 5"
        "the checkpoint is after step 5 and --max_steps is 6: nothing to train; raise --max_steps"),
    row("a_folder_named_like_a_newer_checkpoint_is_not_one", train_gpt2,  # was taken as the newest
        lambda w: w.with_folder("log/model_00009.pt").damaged(step=5),
        "the checkpoint is after step 5 and --max_steps is 6"),

    # Foreign files: checkpoints of other programs, impossible configs, pickles.
    row("sample_a_nanogpt_checkpoint", sample,
        lambda w: ["--init", nanogpt_checkpoint(w), "--device", "cpu"], "laid out differently"),
    row("export_a_nanogpt_checkpoint", export_hf,
        lambda w: ["--init", nanogpt_checkpoint(w), "--out", w.path("exported")],
        "laid out differently"),
    row("sample_a_checkpoint_with_n_head_0", sample,
        lambda w: ["--init", w.weights(config=dict(TINY_SHAPE, n_head=0)), "--device", "cpu"],
        "its model config is impossible (n_head 0)"),
    row("sample_from_nan_weights", sample, sample_from_nan_weights,
        "holds NaN or inf, so its outputs would too"),
    row("sample_a_hugging_face_folder_with_n_head_0", sample, lambda w: hf_directory(w, 0),
        "config.json: its model config is impossible (n_head 0)"),
    row("sample_a_pickled_pytorch_model_bin", sample,
        lambda w: hf_directory(w, 4, {"extra": Pickled()}), "a pytorch_model.bin of plain tensors"),
    row("sample_from_a_log_dir", sample,  # spoke of config.json only
        lambda w: ["--init", w.with_weights("log/model_00005.pt").log, "--device", "cpu"],
        "is the folder of a training run, not a Hugging Face model: pass one of its checkpoints"),
    row("hellaswag_on_a_model_too_short_for_an_example", hellaswag,
        hellaswag_on_a_model_too_short_for_an_example,
        "a model with block_size 1 cannot score HellaSwag: it needs at least 2 positions"),

    # Concurrency: a folder locked by a live process refuses a second writer.
    row("log_dir_held_by_another_process", train_gpt2, lambda w: w.with_lock("log").train(),
        "is in use by another run (pid "),
    row("fineweb_out_held_by_another_process", fineweb, lambda w: w.with_lock("out").fineweb(),
        "is in use by another run (pid "),

    # Faults during a run: out of memory, divergence.
    row("out_of_memory_in_a_training_step", train_gpt2,
        lambda w: w.with_patch(train_gpt2, "train_step", out_of_memory).train(),
        "lower --batch_size (now 4) and keep --total_batch_size 128",
        changes=["log", "log/log.txt"]),
    row("out_of_memory_in_an_evaluation", train_gpt2,
        lambda w: w.with_patch(train_gpt2, "validation_loss", out_of_memory).train(),
        "out of memory on cpu: lower --batch_size", changes=["log", "log/*"]),
    row("out_of_memory_while_sampling", sample,
        lambda w: w.with_patch(GPT, "generate", out_of_memory).sample(), "lower --num_samples"),
    row("loss_nan_before_any_checkpoint", train_gpt2,
        lambda w: w.with_patch(train_gpt2, "train_step", diverging_train_step(0, False)).train(),
        "no checkpoint was saved yet: start again with a lower --max_lr", changes=["log", "log/*"]),
    row("weights_inf_behind_a_finite_loss", train_gpt2,
        lambda w: w.with_patch(train_gpt2, "train_step", diverging_train_step(2, True))
                   .train("--ckpt_every", "1"),
        "the weights after the step are not; stopping without saving. last good checkpoint",
        changes=["log", "log/*"]),
    row("sample_prompt_too_long_for_the_model", train_gpt2,  # failed at the first evaluation
        lambda w: w.train("--sample_every_eval", "--sample_prompt", " word" * 70),
        f"the samples' prompt is 70 tokens: {CONTEXT} 64"),
    row("sample_prompt_too_long_is_no_matter_without_samples", train_gpt2,
        lambda w: w.train("--no-sample_every_eval", "--sample_prompt", " word" * 70),
        "", code=0, changes=["log", "log/*"]),
    row("sample_prompt_empty_is_one_token", train_gpt2,  # log.txt was replaced, then it failed
        lambda w: w.with_file("log/log.txt", "0 train 9.0\n")
                   .train("--block_size", "32", "--sample_every_eval", "--sample_prompt", ""),
        f"the samples' prompt is 1 token: {CONTEXT} 32"),

    # The processes of a run: one rule for torchrun's variables (none: one process; all,
    # consistent: a group; anything in between: refused, naming the variable), and a meeting place
    # checked before any wait (torch retried a bad host for half an hour).
    row("rank_left_in_the_environment", train_gpt2,  # trained alone, wrote nothing, exit 0
        lambda w: w.with_group(RANK="1").train(),
        "RANK=1 is set but LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are not: start the"),
    row("world_size_alone", train_gpt2,  # trained on half of each step, logged half the loss
        lambda w: w.with_group(WORLD_SIZE="2").train(),
        "WORLD_SIZE=2 is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not"),
    row("empty_group_variables_count_as_unset", train_gpt2,  # said "RANK= ... is set but RANK"
        lambda w: w.with_group(RANK="", LOCAL_RANK="", WORLD_SIZE="2").train(),
        "WORLD_SIZE=2 is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not"),
    row("local_rank_not_a_number", train_gpt2, lambda w: w.in_group(LOCAL_RANK="abc").train(),
        "RANK=0 LOCAL_RANK=abc WORLD_SIZE=1: each must be a whole number"),
    row("rank_past_the_world", train_gpt2,
        lambda w: w.in_group(RANK="2", WORLD_SIZE="2").train(),
        "RANK=2 LOCAL_RANK=0 WORLD_SIZE=2: a group needs 0 <= LOCAL_RANK <= RANK < WORLD_SIZE"),
    row("master_port_past_the_last_port", train_gpt2,
        lambda w: w.in_group(MASTER_PORT="99999").train(),
        "MASTER_PORT=99999: the group's port must be a number from 1 to 65535"),
    row("master_port_not_a_number", train_gpt2,  # a ValueError traceback from torch
        lambda w: w.in_group(MASTER_PORT="abc").train(),
        "MASTER_PORT=abc: the group's port must be a number from 1 to 65535"),
    row("master_addr_that_does_not_resolve", train_gpt2,  # retried, deaf to SIGTERM
        lambda w: w.in_group(MASTER_ADDR="no-such-host.invalid").train(),
        "MASTER_ADDR=no-such-host.invalid: no such host"),
    row("master_port_in_use", train_gpt2,  # torch's DistNetworkError traceback
        lambda w: w.with_port_in_use(29511).in_group(MASTER_PORT="29511").train(),
        "MASTER_PORT=29511 on 127.0.0.1 is in use by another program (another run?): "
        "pass a free port"),
    # A stray torchrun environment silences no script but the trainer's echoes.
    row("local_rank_alone_does_not_silence_an_error", sample,  # silenced every script's error
        lambda w: w.with_group(LOCAL_RANK="1").argv("--init", w.path("no_such.pt"),
                                                    "--device", "cpu"),
        NO_INIT),
    row("sample_in_a_stray_torchrun_environment", sample,  # exit 1 without a word
        lambda w: w.with_group(**ELASTIC).argv("--init", w.path("no_such.pt"), "--device", "cpu"),
        NO_INIT),
    row("plot_in_a_stray_torchrun_environment", plot_log,
        lambda w: w.with_group(**ELASTIC).argv(w.path("no_such.txt")), "no_such.txt"),

    # Downloads: whatever stops the datasets library (here a hub address that is no URL; a dead
    # proxy or no network the same, after its retries) is one line that says to pass --input.
    row("fineweb_hf_endpoint_not_a_url", fineweb,  # said "host None"
        lambda w: w.online(HF_ENDPOINT="hub.example").argv("--out", w.path("out")),
        "could not load HuggingFaceFW/fineweb-edu (sample-10BT, train) with the datasets library"),
]
# fmt: on


@pytest.mark.parametrize("script, setup, says, code, changes", FAULTS)
def test_fault(script, setup, says, code, changes, tmp_path, monkeypatch, capsys):  # fmt: skip
    w = Workspace(tmp_path, monkeypatch)
    try:
        argv = setup(w)
        before = snapshot(w.root)
        capsys.readouterr()  # what the setup printed is not the row's output
        try:
            run_cli(script.main, argv)
            exit_code = 0
        except SystemExit as e:
            exit_code = e.code
    finally:
        w.release()
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, out + err
    assert exit_code == code, out + err
    lines = (err if code else out).strip().splitlines()
    assert lines and (code == 0 or lines[-1].startswith("error: ")), out + err
    for fragment in says:
        assert fragment.format(w=w) in lines[-1], f"{fragment!r} not in the last line of:\n{err}"
    after = snapshot(w.root)
    touched = {path for path in before.keys() | after.keys() if before.get(path) != after.get(path)}
    unexpected = {path for path in touched if not any(fnmatch.fnmatch(path, g) for g in changes)}
    assert not unexpected, f"files touched: {sorted(unexpected)}"


# The same, end to end in a fresh interpreter, for a few rows: exit status and output as a user sees
# them, and nothing but the error line.
END_TO_END = (
    "no_shards",
    "int32_npy",
    "resume_with_another_n_layer",
    "sample_with_an_unknown_init",
)


@pytest.mark.parametrize("script, setup, says, code, changes",
                         [fault for fault in FAULTS if fault.id in END_TO_END])  # fmt: skip
def test_fault_from_the_command_line(script, setup, says, code, changes, tmp_path, monkeypatch):
    w = Workspace(tmp_path, monkeypatch)
    argv = setup(w)
    before = snapshot(w.root)
    result = subprocess.run([sys.executable, f"{script.__name__}.py", *argv], capture_output=True,
                            text=True, env=ENV, cwd=REPO, timeout=TIMEOUT)  # fmt: skip
    assert result.returncode == 1 and result.stdout == "", result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "Traceback" not in line
    for fragment in says:
        assert fragment.format(w=w) in line, f"{fragment!r} not in {line!r}"
    assert snapshot(w.root) == before


# --- a training run the test can watch and signal -------------------------------------------------

# 12 steps of 128 tokens: evaluation on 2,048 tokens after steps 3, 7 and 11.
LONG_RUN = [*TINY_RUN, "--max_steps", "12", "--eval_every", "4", "--val_tokens", "2048"]
LAST_STEP = 11


class Trainer:
    """train_gpt2.py in a subprocess whose output (stdout and stderr together) is read line by line
    as it is printed, so that a test can act at a chosen moment of the run."""

    def __init__(self, log_dir, data_dir, *flags):
        command = [sys.executable, os.path.join(REPO, "train_gpt2.py"), *LONG_RUN,
                   "--data_dir", data_dir, "--log_dir", str(log_dir), *flags]  # fmt: skip
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=ENV, cwd=REPO)  # fmt: skip
        self.lines = []
        self.ended = False
        self._queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def _next_line(self, deadline):
        line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        if line is None:
            self.ended = True
        else:
            self.lines.append(line)
        return line

    def wait_for(self, pattern):
        """Read output until a line matches the regex `pattern`; return the match."""
        deadline = time.monotonic() + TIMEOUT
        while not self.ended:
            try:
                line = self._next_line(deadline)
            except queue.Empty:
                self.stop()
                raise AssertionError(
                    f"no line matched {pattern!r} within {TIMEOUT}s:\n{self.output()}"
                ) from None
            if line is not None and re.search(pattern, line):
                return re.search(pattern, line)
        raise AssertionError(
            f"the run ended (exit {self.proc.wait()}) before a line matched "
            f"{pattern!r}:\n{self.output()}"
        )

    def send(self, sig):
        self.proc.send_signal(sig)

    def finish(self):
        """Wait for the process to end, reading all of its output; return the exit code."""
        deadline = time.monotonic() + TIMEOUT
        try:
            while not self.ended:
                self._next_line(deadline)
        except queue.Empty:
            self.stop()
            raise AssertionError(
                f"the run did not end within {TIMEOUT}s:\n{self.output()}"
            ) from None
        return self.proc.wait()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def output(self):
        return "\n".join(self.lines)

    def printed(self, pattern):
        return any(re.search(pattern, line) for line in self.lines)


@pytest.fixture
def trainers():
    """Start Trainers through this list; any still running when the test ends (a failed test) is
    killed."""
    started = []
    yield lambda *args: started.append(Trainer(*args)) or started[-1]
    for trainer in started:
        trainer.stop()


def step_of(path):
    """The step in a checkpoint's name: 7 for log/model_00007.pt (and for its temporary
    log/model_00007.pt.tmp)."""
    return int(re.fullmatch(r"model_(\d+)\.pt(\.tmp)?", os.path.basename(path)).group(1))


def checkpoint_steps(log_dir):
    return sorted(step_of(p) for p in glob.glob(os.path.join(log_dir, "model_*.pt")))


def checkpoint_path(log_dir, step):
    return os.path.join(str(log_dir), f"model_{step:05d}.pt")


def assert_same(a, b, where):
    """a == b, exactly: tensors bit for bit (torch.equal), containers element by element."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def read_log(log_dir):
    with open(os.path.join(log_dir, "log.txt")) as f:
        return [tuple(line.split()) for line in f if line.strip()]


def assert_matches_reference(log_dir, reference_dir):
    """Every checkpoint the interrupted run left equals the uninterrupted run's of the same step
    (all of it: weights, optimizer moments, scaler, data position, RNG; only the command-line args
    and whether a signal cut the step's evaluation short differ), the final one included, and every
    number it logged is the uninterrupted run's number."""
    steps = checkpoint_steps(log_dir)
    assert steps and steps[-1] == LAST_STEP, f"the run did not finish: checkpoints at {steps}"
    for step in steps:
        ours, reference = (
            torch.load(checkpoint_path(folder, step), map_location="cpu", weights_only=True)
            for folder in (log_dir, reference_dir)
        )
        for key in ("args", "eval_pending"):
            del ours[key], reference[key]
        assert_same(ours, reference, f"model_{step:05d}.pt")
    # A resumed run appends to log.txt and logs again the steps after its checkpoint: same values.
    reference_values = {(step, kind): value for step, kind, value in read_log(reference_dir)}
    for step, kind, value in read_log(log_dir):
        assert reference_values[(step, kind)] == value, (
            f"log.txt: step {step} {kind} {value}, "
            f"uninterrupted run {reference_values[(step, kind)]}"
        )
    assert {(step, kind) for step, kind, _ in read_log(log_dir)} == reference_values.keys()


@pytest.fixture(scope="module")
def reference_run(random_shards, tmp_path_factory):
    """The run never interrupted, with a checkpoint after every step to compare against."""
    log_dir = tmp_path_factory.mktemp("reference")
    run = Trainer(log_dir, random_shards, "--ckpt_every", "1")
    assert run.finish() == 0, run.output()
    assert checkpoint_steps(log_dir) == list(range(LAST_STEP + 1))
    return str(log_dir)


# --- SIGKILL at three moments, then --resume ------------------------------------------------------


def kill_during_checkpoint_write(run, log_dir):
    """SIGKILL `run` the moment a checkpoint's temporary file appears. Returns that file's path, or
    None when the write finished (the file was renamed) before the kill landed."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and run.proc.poll() is None:
        partial = glob.glob(os.path.join(log_dir, "*.tmp"))
        if partial:
            run.send(signal.SIGKILL)
            assert run.finish() == -signal.SIGKILL
            return partial[0] if os.path.exists(partial[0]) else None
        time.sleep(0.0005)
    raise AssertionError(f"no checkpoint write was seen:\n{run.output()}")


def test_sigkill_mid_step_mid_eval_and_mid_checkpoint_write_then_resume_is_exact(
    tmp_path, random_shards, reference_run, trainers
):
    log_dir = str(tmp_path / "log")

    # 1. Mid-step: at a random moment of step 5, once a checkpoint exists (they follow steps 2, 5,
    # 8, 11).
    run = trainers(log_dir, random_shards, "--ckpt_every", "3")
    run.wait_for(r"^saved .*model_00002\.pt$")
    step_ms = int(run.wait_for(r"^step +4/\d+ \| loss .* \| (\d+) ms \|").group(1))
    # step 5 started as step 4's line came
    time.sleep(random.Random(7).uniform(0.0, 1.0) * step_ms / 1000)
    run.send(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    assert checkpoint_steps(log_dir) in ([2], [2, 5])

    # 2. During evaluation: step 7's line is printed just before its val loss is computed. On a
    # badly overloaded machine the kill may land after the evaluation: then roll back to step 5 and
    # try again.
    for _ in range(3):
        run = trainers(log_dir, random_shards, "--ckpt_every", "3", "--resume")
        run.wait_for(r"^resumed from .*model_0000[25]\.pt at step [36]$")
        run.wait_for(r"^step +7/\d+ \| loss")
        run.send(signal.SIGKILL)
        assert run.finish() == -signal.SIGKILL
        if not run.printed(r"^step +7/\d+ \| val loss"):
            break
        for step in checkpoint_steps(log_dir):
            if step > 5:
                os.remove(checkpoint_path(log_dir, step))
    else:
        pytest.fail("three kills in a row landed after the evaluation, none during it")
    assert checkpoint_steps(log_dir) == [2, 5]
    # a resume removes what an earlier kill tore
    assert not glob.glob(os.path.join(log_dir, "*.tmp"))

    # 3. During a checkpoint write: a checkpoint every step, killed as soon as a temporary file
    # appears.
    for _ in range(3):
        run = trainers(log_dir, random_shards, "--ckpt_every", "1", "--resume")
        torn = kill_during_checkpoint_write(run, log_dir)
        if torn:
            break
    else:
        pytest.fail(
            "three kills in a row landed after the checkpoint's rename, none during its write"
        )
    good = latest_checkpoint(log_dir)
    # the torn write replaced nothing
    assert step_of(good) < step_of(torn) and not os.path.exists(torn.removesuffix(".tmp"))
    load_checkpoint(good)  # the previous checkpoint is whole

    # 4. Resume from the last whole checkpoint and run to the end.
    run = trainers(log_dir, random_shards, "--ckpt_every", "3", "--resume")
    assert run.finish() == 0, run.output()
    assert run.printed(f"^resumed from {re.escape(good)} at step {step_of(good) + 1}$")
    assert not os.path.exists(torn) and not glob.glob(os.path.join(log_dir, "*.tmp"))
    assert_matches_reference(log_dir, reference_run)


# --- SIGTERM and SIGINT: save the current step and exit 0 -----------------------------------------


def stop_step(run, signal_name):
    """The step after which the run stopped, checked against when the signal arrived: the handler
    prints a line at once, so the last step line before it says which step the run was in at that
    moment."""
    notice = next(i for i, line in enumerate(run.lines)
                  if line.startswith(f"{signal_name}: saving a checkpoint"))  # fmt: skip
    before = [int(m.group(1)) for line in run.lines[:notice]
              if (m := re.match(r"step +(\d+)/\d+ \| loss", line))]  # fmt: skip
    stopped = [
        int(m.group(1))
        for line in run.lines[notice:]
        if (m := re.fullmatch(r"stopped after step (\d+); continue with --resume", line))
    ]
    assert len(stopped) == 1, run.output()
    stopped = stopped[0]
    # The step in progress when the signal came finishes (or, if it had already passed the point
    # where ranks agree to stop, the one after it); nothing later. A signal during the evaluation
    # after a step cuts the evaluation short, and that step is the one saved.
    cut_short = any(
        re.match(rf"step +{before[-1]}/\d+ \| evaluation cut short", line) for line in run.lines
    )
    assert before[-1] + (0 if cut_short else 1) <= stopped <= before[-1] + 2, run.output()
    return stopped


def test_sigterm_and_sigint_save_the_current_step_exit_0_and_resume_exactly(
    tmp_path, random_shards, reference_run, trainers
):
    log_dir = str(tmp_path / "log")
    rare = ["--ckpt_every", "1000"]  # no periodic checkpoint: any checkpoint was for the signal

    # SIGTERM (a cluster's preemption) in the middle of the steps.
    run = trainers(log_dir, random_shards, *rare)
    run.wait_for(r"^step +2/\d+ \| loss")
    time.sleep(0.05)
    sent = time.monotonic()
    run.send(signal.SIGTERM)
    assert run.finish() == 0, run.output()
    seconds_to_exit = time.monotonic() - sent
    term_step = stop_step(run, "SIGTERM")
    assert run.printed(f"^saved {re.escape(checkpoint_path(log_dir, term_step))}$")
    assert checkpoint_steps(log_dir) == [term_step]
    assert "Traceback" not in run.output()
    # a step and a save: well under 1s on an idle machine
    assert seconds_to_exit < 30, f"took {seconds_to_exit:.1f}s to stop"

    # SIGINT (Ctrl-C) during the evaluation after step 7: it stops between two batches, and step 7
    # is saved.
    run = trainers(log_dir, random_shards, *rare, "--resume")
    run.wait_for(
        f"^resumed from {re.escape(checkpoint_path(log_dir, term_step))} at step {term_step + 1}$"
    )
    run.wait_for(r"^step +7/\d+ \| loss")
    sent = time.monotonic()
    run.send(signal.SIGINT)
    assert run.finish() == 0, run.output()
    seconds_to_exit = time.monotonic() - sent
    int_step = stop_step(run, "SIGINT")
    # the latter unless the eval was fast
    assert run.printed(r"^step +7/\d+ \| (val loss|evaluation cut short)")
    assert checkpoint_steps(log_dir) == [term_step, int_step]
    assert "Traceback" not in run.output() and "KeyboardInterrupt" not in run.output()
    assert seconds_to_exit < 30, f"took {seconds_to_exit:.1f}s to stop"

    # Resuming from what the signals saved ends where the uninterrupted run ended, bit for bit.
    run = trainers(log_dir, random_shards, *rare, "--resume")
    assert run.finish() == 0, run.output()
    assert checkpoint_steps(log_dir) == [term_step, int_step, LAST_STEP]
    assert_matches_reference(log_dir, reference_run)


def pipe_fill(read_fd):
    """Bytes waiting in a pipe."""
    return struct.unpack("i", fcntl.ioctl(read_fd, termios.FIONREAD, b"\0\0\0\0"))[0]


@pytest.mark.skipif(
    not hasattr(fcntl, "F_SETPIPE_SZ"), reason="needs Linux pipes whose size can be set"
)
def test_sigterm_while_printing_to_a_full_pipe_still_saves(tmp_path, random_shards):
    """`python train_gpt2.py | tee log` with tee stalled: the run blocks inside print, and the
    signal arrives there. The notice of the stop must not re-enter print (RuntimeError: reentrant
    call)."""
    read_fd, write_fd = os.pipe()
    capacity = fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 4096)  # fills after ~50 step lines
    tiny = [
        "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16",
        "--batch_size", "1", "--seq_len", "16", "--total_batch_size", "16", "--warmup_steps", "2",
        "--max_steps", "100000", "--eval_every", "100000", "--ckpt_every", "100000",
        "--val_tokens", "16", "--no-hellaswag", "--no-sample_every_eval", "--dtype", "float32",
        "--data_dir", random_shards, "--log_dir", str(tmp_path),
    ]  # fmt: skip
    env = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}  # buffered, as in a normal run
    proc = subprocess.Popen([sys.executable, "train_gpt2.py", *tiny], stdout=write_fd,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)  # fmt: skip
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        try:
            # Blocked: the pipe is (nearly) full and stays so while the run would print a line every
            # few ms.
            deadline, last_fill, still_since = time.monotonic() + TIMEOUT, -1, time.monotonic()
            while (
                (fill := pipe_fill(read_fd)) < capacity - 256
                or fill != last_fill
                or time.monotonic() - still_since < 0.5
            ):
                if fill != last_fill:
                    last_fill, still_since = fill, time.monotonic()
                assert proc.poll() is None and time.monotonic() < deadline, (
                    proc.stderr.read() if proc.poll() is not None else "the pipe never filled"
                )
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            stdout = pipe.read().decode()  # tee wakes up: the blocked print, then the rest
            assert proc.wait(timeout=TIMEOUT) == 0, stdout[-1000:] + proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
    assert "Traceback" not in proc.stderr.read()
    stopped = int(
        re.search(r"^stopped after step (\d+); continue with --resume$", stdout, re.M).group(1)
    )
    assert checkpoint_steps(tmp_path) == [stopped] and stopped >= 20  # it ran until the pipe filled


# --- checkpoints cannot run code ------------------------------------------------------------------


class RunsCodeWhenUnpickled:
    """Unpickling this calls open(marker, "w"), creating the marker file: the harmless stand-in for
    what a malicious checkpoint would run (os.system, ...)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_cannot_run_code(tmp_path, random_shards, capsys):
    marker = tmp_path / "code_ran"
    # a real checkpoint with one poisoned entry
    path = tiny_checkpoint(
        str(tmp_path / "model_00005.pt"), args=RunsCodeWhenUnpickled(str(marker))
    )
    torch.load(path, weights_only=False)  # the payload is live: an unrestricted load runs it
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UserError, match="not a checkpoint"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="not a checkpoint"):
        load_model(path)
    with pytest.raises(SystemExit):
        log_dir = str(tmp_path / "log")
        run_cli(train_gpt2.main, [*TINY_RUN, "--data_dir", random_shards, "--log_dir", log_dir,
                                  "--resume", path])  # fmt: skip
    with pytest.raises(SystemExit):
        run_cli(sample.main, ["--init", path, "--device", "cpu"])
    for line in capsys.readouterr().err.strip().splitlines():
        assert line.startswith(f"error: {path} is not a checkpoint"), line
    assert not marker.exists()


# --- checkpoint writes are atomic -----------------------------------------------------------------


class CannotBeSaved:
    """Pickling this fails with a TypeError, as pickle fails on a lock or an open file: a checkpoint
    write that dies half way for a reason other than the disk, which atomic_write passes on
    unchanged."""

    def __reduce__(self):
        raise TypeError("this object cannot be saved")


def test_a_failed_checkpoint_write_leaves_the_previous_one(tmp_path):
    path = str(tmp_path / "model_00003.pt")
    save_checkpoint(path, {"step": 3, "weights": torch.arange(10)})
    with pytest.raises(TypeError):
        save_checkpoint(path, {"step": 4, "weights": torch.zeros(10), "bad": CannotBeSaved()})
    kept = torch.load(path, weights_only=True)
    assert kept["step"] == 3 and torch.equal(kept["weights"], torch.arange(10))


def test_a_full_disk_is_one_error_and_leaves_no_partial_file(tmp_path):
    previous = str(tmp_path / "model_00003.pt")
    save_checkpoint(previous, {"step": 3, "weights": torch.arange(10)})
    too_big = {
        "step": 4,
        "weights": torch.zeros(1 << 20),
    }  # 4 MB, past the 1 MB the "disk" has left
    with file_size_limit(1 << 20):
        for path in (str(tmp_path / "model_00004.pt"), previous):  # a new one, and one overwritten
            with pytest.raises(UserError, match=f"(the disk is full while writing|could not write) "
                               f"{re.escape(path)}:? .*disk"):  # fmt: skip
                save_checkpoint(path, too_big)
    assert os.listdir(tmp_path) == ["model_00003.pt"]  # no partial file left taking space
    kept = torch.load(previous, weights_only=True)
    assert kept["step"] == 3 and torch.equal(kept["weights"], torch.arange(10))


def test_latest_checkpoint_skips_partial_files_and_orders_by_step(tmp_path):
    assert latest_checkpoint(str(tmp_path)) is None
    for step in (999, 99999, 100000):
        (tmp_path / f"model_{step:05d}.pt").write_bytes(b"")
    (tmp_path / "model_100001.pt.tmp").write_bytes(b"torn")  # a write that was interrupted
    # model_100000.pt sorts before model_99999.pt as text; the step number decides.
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "model_100000.pt")
