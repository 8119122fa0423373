"""Faults: bad input to any script as one table of rows (exit status, the one last line, the files
it may touch), run through main() in this process; and the SIGKILL/SIGTERM/SIGINT drills of a real
training run, which must resume bit-identical to a run never stopped."""

import fcntl
import fnmatch
import glob
import json
import os
import random
import re
import shutil
import signal
import socket
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
    assert_bit_identical,
    file_size_limit,
    read_until,
    run_script,
    snapshot,
    start,
    tiny_checkpoint,
    write_bin_shard,
    write_hellaswag,
    write_random_shards,
)
from machinery.checkpoints import latest_checkpoint
from machinery.cli import UserError, run_cli
from test_model import SMALL, random_hf_model
from train_gpt2 import GPT, GPTConfig, load_checkpoint, save_checkpoint

# --- the table ------------------------------------------------------------------------------------

# torchrun's variables of a one-process group
GROUP = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
# What keeps the Hugging Face libraries off the network, or points them elsewhere
OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy",
           "NO_PROXY")  # fmt: skip
# A fine-tune from --init (test_init.py's): steps of 4 x 32 tokens, exact fp32
INIT_RUN = (
    "--batch_size 4 --seq_len 32 --total_batch_size 128 --val_tokens 1024 --dtype float32 "
    "--no-hellaswag --no-sample_every_eval --max_steps 30 --warmup_steps 3 --max_lr 1e-3 "
    "--eval_every 15 --ckpt_every 10"
).split()
HOLD_LOCK = """
import sys, time
from machinery.files import output_lock
with output_lock(sys.argv[1], "--folder"):
    print("locked", flush=True)
    time.sleep(600)
"""
# The changes of a workspace that are one call on paths in its folder
ON_PATHS = dict(folder=os.makedirs, link=os.symlink, copied=shutil.copy, removed=os.remove)
ON_PATHS["truncated"] = lambda path: os.truncate(path, os.path.getsize(path) // 2)


class RunsCodeWhenUnpickled:
    """Unpickling this creates the marker file: a harmless stand-in for a malicious payload."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class Workspace:
    """A row's folder, with random shards in data/. w.with_<change>(...) (ON_PATHS, a method, or
    monkeypatch's) makes a change and returns w, so a setup is one chain ending in an argv."""

    def __init__(self, root, monkeypatch):
        self.root, self.monkeypatch = str(root), monkeypatch
        self.data, self.log = write_random_shards(self.path("data")), self.path("log")
        self.cleanup = []  # what ends the processes and servers the row started

    def __getattr__(self, name):
        if not name.startswith("with_"):
            raise AttributeError(name)
        change = name.removeprefix("with_")

        def chained(*args, **kwargs):
            if change in ON_PATHS:
                ON_PATHS[change](*map(self.path, args))
            else:  # a method of the workspace, or of its monkeypatch (setattr, chdir)
                (getattr(self, change, None) or getattr(self.monkeypatch, change))(*args, **kwargs)
            return self

        return chained

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def file(self, relative, content):
        path = self.path(relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
        return path

    def shard(self, relative, tokens, **header):
        """A .npy shard, or a .bin in llm.c's format with these header fields."""
        if relative.endswith(".bin"):
            write_bin_shard(self.path(relative), tokens, **header)
        else:
            np.save(self.path(relative), tokens)

    def weights(self, relative="model_00005.pt", **entries):
        """A weights-only tiny checkpoint at `relative` (a step n: log/model_<n>.pt)."""
        if isinstance(relative, int):
            relative = f"log/model_{relative:05d}.pt"
        return tiny_checkpoint(self.path(relative), **entries)

    def resumable(self, relative=3, **entries):
        """A checkpoint, named as weights() names them, that a run on data/ can resume."""
        return self.weights(relative, data_dir=self.data, **entries)

    def damaged_weights(self):
        """model_00005.pt with 16 KB of its embedding overwritten by weights that load and train."""
        path = self.weights()
        self.scribble("model_00005.pt", FINITE_16_KB)
        return path

    def nan_weights(self):
        model = GPT(GPTConfig(**TINY_SHAPE))
        model.transformer.ln_f.weight.data *= float("nan")
        return self.weights(model=model)

    def code_running_weights(self):
        """A checkpoint whose unpickling creates code_ran, which the row's snapshot would see."""
        path = self.weights(args=RunsCodeWhenUnpickled(self.path("code_ran")))
        torch.load(path, weights_only=False)  # the payload is live: an unrestricted load runs it
        os.remove(self.path("code_ran"))
        return path

    def nanogpt(self):
        """nanoGPT's layout: 'model_args' for the model, 'config' its training settings."""
        model_args = dict(TINY_SHAPE, bias=False, dropout=0.0)
        state = {"model": GPT(GPTConfig(**TINY_SHAPE)).state_dict(), "model_args": model_args}
        config = {"out_dir": "out", "eval_interval": 2000, "batch_size": 12, **model_args}
        state.update(iter_num=5, config=config)
        torch.save(state, self.path("ckpt.pt"))
        return self.path("ckpt.pt")

    def hf(self, n_head, extra=None):
        """A HF GPT-2 folder: config.json with `n_head` (None: none), pytorch_model.bin (+extra)."""
        config = dict(n_positions=64, vocab_size=50257, n_layer=2, n_embd=64)
        config.update({} if n_head is None else dict(n_head=n_head))
        self.file("hf/config.json", json.dumps({"model_type": "gpt2", **config}))
        weights = {"wte.weight": torch.zeros(3), **(extra or {})}
        torch.save(weights, self.path("hf/pytorch_model.bin"))
        return self.path("hf")

    def scribble(self, relative, data):
        """`data` written over the middle of a file, as a failing disk or a bad copy leaves it."""
        with open(self.path(relative), "r+b") as f:
            f.seek(os.path.getsize(self.path(relative)) // 2)
            f.write(data)

    def ran(self, script, argv):
        """script.main(argv), run before the row's own."""
        script.main(argv)

    def env(self, *unset, **variables):
        """The environment variables named in `unset` removed, then these set."""
        for name in unset:
            self.monkeypatch.delenv(name, raising=False)
        for name, value in variables.items():
            self.monkeypatch.setenv(name, value)

    def lock(self, folder):
        """Another process that holds `folder`'s lock until the row ends."""
        holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, self.path(folder)], cwd=REPO,
                                  stdout=subprocess.PIPE, text=True, env=ENV)  # fmt: skip
        self.cleanup += [holder.kill, holder.wait]
        assert holder.stdout.readline().strip() == "locked"

    def port_in_use(self, port):
        """A server listening on 127.0.0.1:port until the row ends, as another program's would."""
        self.cleanup.append(socket.create_server(("127.0.0.1", port)).close)

    # --- the scripts' argvs
    def train(self, *flags):
        return [*TINY_RUN, "--data_dir", self.data, "--log_dir", self.log, *flags]

    def group(self, **variables):
        """A run in a one-process group, with these of its variables changed."""
        return self.with_env(**dict(GROUP, **variables)).train()

    def damaged(self, **entries):
        """A run resuming log/model_00003.pt with entries replaced (None: removed; a function:
        applied)."""
        path = self.resumable()
        state = torch.load(path, weights_only=True)
        for key, value in entries.items():
            if value is None:
                del state[key]
            else:
                state[key] = value(state[key]) if callable(value) else value
        torch.save(state, path)
        return self.train("--resume", "--no-shuffle")  # the order resumable() read in

    def sample(self, *flags, init=None):
        """sample.py's (or hellaswag.py's) argv: the model at `init`, the tiny one by default."""
        return ["--init", init or self.weights(), "--device", "cpu", *flags]

    def init(self, *flags, init="hf_gpt2"):
        """A fine-tune's argv: no model flags, the shape comes from --init (a random HF GPT-2)."""
        if init == "hf_gpt2":
            random_hf_model(**SMALL, n_positions=64).save_pretrained(self.path(init))
        init = ["--init", self.path(init)] if init else []
        return [*INIT_RUN, "--data_dir", self.data, "--log_dir", self.log, *init, *flags]

    def export(self, out, *flags, init=None):
        out = out if out in ("", ".") else self.path(out)  # those two as the user typed them
        return ["--init", init or self.weights(), "--out", out, *flags]

    def fineweb(self, *flags, name="corpus.txt", text="some text", out="out"):
        return ["--input", self.file(name, text), "--out", self.path(out), *flags]

    def plot(self, log, out="loss.png"):
        return [self.file("log.txt", log), "-o", self.path(out)]


def out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def cpu_allocator_failure(*args, **kwargs):  # what a CPU's allocator raises: not OutOfMemoryError
    raise RuntimeError(
        "DefaultCPUAllocator: can't allocate memory: you tried to allocate 617558016"
    )


def diverging_train_step(bad_step, weights):
    """train_step, but call `bad_step` returns a NaN loss, or (weights) leaves inf weights."""
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


def row(script, name, setup, says, code=1, changes=()):
    """script.main(setup(w)) exits with `code`, its last line holds each of `says` ({w.root}...
    formatted), only paths matching `changes` globs change. A string setup: flags to w.<script>()"""
    says = (says,) if isinstance(says, str) else says
    return pytest.param(script, setup, says, code, changes, id=name)


def rows(script, *table):
    """The rows of one script, each as row()'s arguments after the script."""
    return [row(script, *entry) for entry in table]


LOG = "-1 val 10.9\n0 train 10.9\n1 train 10.5\n1 val 10.4\n"
FP16_SCALER = dict(scale=65536.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                   _growth_tracker=0)  # fmt: skip
ELASTIC = dict(GROUP, RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", TORCHELASTIC_RUN_ID="stray")
NO_INIT = "no_such.pt' is not a file, a directory, or one of gpt2"
NAN_WEIGHTS = "holds NaN or inf, so its outputs would too"
TRAIN_SHARD, VAL_SHARD = "data/tiny_train_000001.npy", "data/tiny_val_000000.npy"
BIN = "data/fineweb_train_000001.bin"  # a train shard in llm.c's format
A_SHARD_OF = "holds train shards of two corpora (other_train_{}.npy, tiny_train_000001.npy)"
CONTEXT = "with the 32 that each sample adds, past the model's context of"
DAMAGED = "entry is missing or damaged"
FINITE = "must be a finite number"
OTHER_TOKENS = np.arange(8192, dtype=np.uint16)  # a train shard's worth, not the random ones
FINITE_16_KB = np.full(4096, 0.5, np.float32).tobytes()  # weights that load and train, wrongly
SMALL_SHARDS = ["--shard_size", "500", "--num_proc", "1"]  # fineweb's: 500 tokens, one process
EXAMPLE = {"ctx": "A man", "endings": ["runs", "sits", "eats", "sings"], "label": 0}

# One rows() per script in each section. A comment after a row says what the script did before its
# fix, where that was not a refusal.
# fmt: off
FAULTS = [
    # Numbers: every numeric flag must be finite and in its range, by one table (FLAG_RANGES).
    *rows(train_gpt2,
        ("max_lr_inf", "--max_lr inf", f"--max_lr {FINITE}"),
        ("max_lr_nan", "--max_lr nan", f"--max_lr {FINITE}"),
        ("max_lr_past_what_adamw_can_step", "--max_lr 1e38", f"--max_lr {FINITE}, in [0, 1]"),
        ("min_lr_nan", "--min_lr nan", f"--min_lr {FINITE}"),
        ("weight_decay_overflowing_to_inf", "--weight_decay 1e400", f"--weight_decay {FINITE}"),
        ("grad_clip_inf", "--grad_clip inf", f"--grad_clip {FINITE}"),
        ("beta2_one", "--beta2 1", f"--beta2 {FINITE}, in [0, 1)"),
        ("eps_negative", "--eps=-1e-8", f"--eps {FINITE}, in (0, 1e-3]"),
        ("eps_so_large_that_nothing_is_learned", "--eps 1e300",
         "a larger eps makes AdamW's steps vanish"),
        ("weight_decay_that_wipes_the_weights", "--weight_decay 1e10",
         "each step would decay every weight by all of it; lower --weight_decay"),
        ("peak_flops_zero", "--peak_flops 0", f"--peak_flops {FINITE}, positive"),
        ("n_head_zero", "--n_head 0", f"--n_head {FINITE}, positive"),
        ("val_tokens_zero", "--val_tokens 0", f"--val_tokens {FINITE}, positive"),
        ("vocab_size_too_small", "--vocab_size 100",
         "--vocab_size 100 is smaller than GPT-2's 50257"),
        ("seed_too_large_for_torch", f"--seed {10**23}", f"--seed {FINITE}, in [0, 2**63)"),
        *[(f"{flag}_{value}", f"--{flag} {value}", (f"--{flag}", value))
          for flag, value in [("batch_size", "0"), ("seq_len", "0"), ("max_steps", "-1"),
                              ("max_lr", "-1"), ("ckpt_every", "0"), ("eval_every", "0"),
                              ("warmup_steps", "-5")]],
        ("total_batch_not_divisible", "--total_batch_size 200",
         ("--total_batch_size 200", "not divisible", "128")),
        ("seq_len_over_block_size", "--seq_len 128 --total_batch_size 512",
         ("--seq_len 128", "--block_size 64")),
        *[row for shard in ("optimizer", "full") for row in [
            (f"shard_{shard}_in_one_process", f"--shard {shard}",
             "this is one process: start it with torchrun"),
            (f"eval_only_with_shard_{shard}", f"--eval_only --init gpt2 --shard {shard}",
             f"weights whole on each rank: leave out --shard {shard}")]],
        # --init: the shape comes from the weights, and flags must agree with it
        ("init_with_another_n_layer", lambda w: w.init("--n_layer", "3"),
         ("--init {w.root}/hf_gpt2 has another shape", "--n_layer 2 there, 3 here")),
        ("init_with_another_block_size", lambda w: w.init("--n_embd", "64", "--block_size", "128"),
         "(--block_size 64 there, 128 here)"),
        ("init_seq_len_past_its_block_size",
         lambda w: w.init("--seq_len", "128", "--total_batch_size", "512"),
         ("--seq_len 128", "--block_size 64")),
        ("init_and_resume", lambda w: w.init("--resume"), "--init and --resume together"),
        ("eval_only_without_weights", lambda w: w.init("--eval_only", init=None),
         ("--eval_only", "--init", "--resume")),
        ("init_from_nowhere", lambda w: w.init(init="nowhere"), ("nowhere", "is not a file"))),
    *rows(sample,
        ("sample_temperature_nan", "--temperature nan", f"--temperature {FINITE}"),
        ("sample_temperature_tiny", "--temperature 1e-40",
         f"--temperature {FINITE}, 0 (the most likely token) or at least 1e-3"),
        ("sample_top_k_zero", "--top_k 0", f"--top_k {FINITE}, positive"),
        ("sample_seed_too_large_for_torch", f"--seed {2**70}",  # a traceback
         f"--seed {FINITE}, in [0, 2**63)"),
        ("sample_new_tokens_past_the_context", "--max_new_tokens 60", "context window"),
        ("sample_num_samples_zero", "--num_samples 0", "--num_samples"),
        ("sample_temperature_negative", "--temperature -1", "--temperature"),
        ("sample_max_new_tokens_negative", "--max_new_tokens -1", "--max_new_tokens"),
        ("sample_on_the_meta_device", "--device meta",
         "--device 'meta' is not a device this project runs on"),
        ("sample_prompt_longer_than_the_context_window",
         lambda w: w.sample("--prompt", "the cat sat on the mat " * 20, "--max_new_tokens", "8",
                            "--num_samples", "1"),
         ("context window", "64"))),
    *rows(fineweb,
        ("fineweb_shard_size_zero", "--shard_size 0",
         "--shard_size and --num_proc must be at least 1")),

    # Command lines: one line and exit 1, as every other user error (argparse: usage and exit 2).
    row(train_gpt2, "a_flag_without_its_value", lambda w: [*w.train(), "--max_steps"],
        "argument --max_steps: expected one argument (see"),
    *rows(sample,
        ("an_unknown_flag", lambda w: ["--bogus"], "unrecognized arguments: --bogus (see"),
        ("sample_with_an_unknown_init", lambda w: w.sample(init="nonexistent_thing"),
         "nonexistent_thing")),

    # Paths: each path flag must be the right kind of thing.
    *rows(train_gpt2,
        ("log_dir_is_a_file", lambda w: w.with_file("log", "not a folder").train(),
         "is a file, not a folder"),
        ("log_dir_a_dangling_link", lambda w: w.with_link("gone", "log").train(),
         "is a symbolic link to"),  # said "File exists"
        ("log_txt_a_folder", lambda w: w.with_folder("log/log.txt").train(),
         "log/log.txt: is a folder where a file is needed: move the folder", 1, ["log/.lock"]),
        ("log_txt_a_symbolic_link",  # log.txt was overwritten, the user's own file
         lambda w: w.with_file("keep.txt", "the user's own file\n").with_folder("log")
                    .with_link("keep.txt", "log/log.txt").train(),
         "log/log.txt is a symbolic link (to ", 1, ["log/.lock"]),
        ("log_dir_name_too_long",  # past the file system's 255 bytes: and no folder left behind
         lambda w: w.train("--log_dir", w.path("new", "parent", "x" * 300)), "--log_dir"),
        ("data_dir_missing", lambda w: w.train("--data_dir", w.path("nowhere")), "no train shards"),
        ("data_dir_empty", lambda w: w.train("--data_dir", ""),
         "--data_dir '' names no folder"),  # "no train shards ... in : run ..."
        ("data_dir_a_file", lambda w: w.train("--data_dir", w.path(VAL_SHARD)),
         "data/tiny_val_000000.npy is a file, not a folder: pass the folder that holds the shards"),
        ("no_shards", lambda w: w.with_removed(TRAIN_SHARD).with_removed(VAL_SHARD).train(),
         ("no train shards", "{w.data}")),
        ("only_val_split", lambda w: w.with_removed(TRAIN_SHARD).train(), "no train shards"),
        ("only_train_split", lambda w: w.with_removed(VAL_SHARD).train(), "no val shards"),
        ("folder_named_like_a_shard_is_not_one",
         lambda w: w.with_removed(TRAIN_SHARD).with_folder("data/tiny_train_000001.bin").train(),
         "no train shards"),
        ("a_prefix_ending_in_train_does_not_make_val_a_train_shard",
         lambda w: w.with_copied(VAL_SHARD, "data/x_train_val_000000.npy")
                    .with_removed(TRAIN_SHARD).with_removed(VAL_SHARD).train(), "no train shards")),
    *rows(export_hf,
        ("export_out_empty", lambda w: w.export(""), "--out is empty"),
        ("export_out_is_a_file",
         lambda w: w.with_file("exported", "not a folder").export("exported"),
         "is a file, not a folder"),
        ("export_out_a_symbolic_link",  # exported, then a traceback and exit 1
         lambda w: w.with_folder("real").with_link("real", "link").export("link", "--force"),
         "is a symbolic link: pass the folder it points to"),
        ("export_out_the_current_folder", lambda w: w.with_chdir(w.root).export(".", "--force"),
         "--out . holds the current folder"),
        ("export_over_its_own_log_dir",  # deleted log.txt and every checkpoint, exit 0
         lambda w: w.with_file("log/log.txt", "0 train 10.9\n")
                    .export("log", "--force", init=w.weights(5)),
         "holds files that an export does not write (log.txt, model_00005.pt): "
         "--force replaces only"),
        ("export_force_over_a_folder_named_like_an_export_file",  # deleted, exit 0
         lambda w: w.with_file("out/vocab.json/important.txt", "mine").export("out", "--force"),
         "holds files that an export does not write (vocab.json)"),
        ("export_over_an_export_without_force",
         lambda w: w.with_ran(export_hf, w.export("hf")).export("hf"), "--force"),
        ("export_over_other_files_without_force",
         lambda w: w.with_file("notes/notes.txt", "mine").export("notes"), "--force")),
    *rows(fineweb,
        ("fineweb_out_is_a_file", lambda w: w.with_file("out", "not a folder").fineweb(),
         "is a file, not a folder"),
        ("fineweb_out_under_a_file",
         lambda w: w.fineweb(name="notes.txt", text="a short document", out="notes.txt/shards"),
         "notes.txt/shards: a file is in the way where this path needs a folder"),
        ("fineweb_lock_file_a_folder",  # the lock's open was a traceback
         lambda w: w.with_folder("out/.lock").fineweb(name="notes.txt", text="a short document"),
         "out/.lock: is a folder where a file is needed: move the folder, or pass another path")),
    row(train_gpt2, "log_dir_lock_file_a_folder", lambda w: w.with_folder("log/.lock").train(),
        "log/.lock: is a folder where a file is needed: move the folder, or pass another path"),
    row(export_hf, "export_lock_file_a_folder", lambda w: w.with_folder("hf/.lock").export("hf"),
        "hf/.lock: is a folder where a file is needed: move the folder, or pass another path"),
    *rows(plot_log,
        ("plot_a_binary_file", lambda w: w.plot(bytes(range(256)) * 4), "is not a text file"),
        ("plot_a_text_file_that_is_not_a_log", lambda w: w.plot("x" * 10_000 + "\n"),
         "expected '<step> <kind> <value>'"),
        ("plot_out_under_a_file",  # said "File exists"
         lambda w: w.with_file("notes.txt", "mine").plot(LOG, out="notes.txt/loss.png"),
         "notes.txt: a file is in the way where this path needs a folder"),
        ("plot_out_a_folder", lambda w: w.with_folder("loss.png").plot(LOG),
         "loss.png: is a folder where a file is needed"),
        ("plot_a_missing_log", lambda w: [w.path("nope.txt"), "-o", w.path("loss.png")],
         "nope.txt: No such file or directory: check that the path exists"),
        ("plot_out_a_txt_file", lambda w: w.plot(LOG, out="loss.txt"), "cannot write .txt files"),
        *[(f"plot_a_log_{name}", lambda w, log=log: w.plot(log), ("error: {w.root}/log.txt", said))
          for name, log, said in [("with_a_bad_value", "0 train 10.9\n\n1 train oops\n", "line 3"),
                                  ("line_cut_short", "0 train 10.9\n1 train\n", "line 2"),
                                  ("with_a_bad_step", "x train 10.9\n", "line 1"),
                                  ("without_losses", "0 hella 0.25\n", "no train or val lines")]]),
    *rows(hellaswag,
        ("hellaswag_data_empty", lambda w: ["--init", w.weights(), "--data", ""],
         "'' is not a file: pass the path of hellaswag_val.jsonl"),
        ("hellaswag_data_a_folder", lambda w: ["--init", w.weights(), "--data", w.data],
         "data' is not a file: pass the path of hellaswag_val.jsonl"),
        ("hellaswag_init_checked_before_the_download",  # said the download's error first
         lambda w: w.with_env(HF_HUB_OFFLINE="1").sample(init=w.path("nowhere.pt")),
         "nowhere.pt' is not a file, a directory"),
        ("hellaswag_data_missing", lambda w: ["--init", "gpt2", "--data", w.path("missing.jsonl")],
         "missing.jsonl' is not a file")),

    # Data: shards that are not GPT-2 tokens, or names that would mix the splits or two corpora.
    *rows(train_gpt2,
        ("truncated_npy", lambda w: w.with_truncated(TRAIN_SHARD).train(),
         ("tiny_train_000001.npy", "truncated")),  # what an interrupted copy leaves
        ("int32_npy", lambda w: w.with_shard(TRAIN_SHARD, np.arange(5000, dtype=np.int32)).train(),
         ("tiny_train_000001.npy", "int32", "uint16")),
        ("big_endian_npy",  # the same values, read byte-swapped on this machine: other tokens
         lambda w: w.with_shard(TRAIN_SHARD, np.arange(5000, dtype=">u2")).train(),
         "tokens are >u2 with shape (5000,), expected a 1-D uint16 array"),
        ("two_dimensional_npy",
         lambda w: w.with_shard(TRAIN_SHARD, np.zeros((50, 100), np.uint16)).train(),
         "tokens are uint16 with shape (50, 100), expected a 1-D uint16 array"),
        ("npy_without_a_header", lambda w: w.with_file(TRAIN_SHARD, b"\x00" * 5000).train(),
         "tiny_train_000001.npy"),
        ("shard_shorter_than_a_batch",
         lambda w: w.with_shard(TRAIN_SHARD, np.arange(100, dtype=np.uint16)).train(),
         ("tiny_train_000001.npy", "fewer than one batch")),
        ("bin_with_wrong_magic",
         lambda w: w.with_removed(TRAIN_SHARD).with_shard(BIN, range(5000), magic=12345).train(),
         ("fineweb_train_000001.bin", "magic 12345")),
        ("truncated_bin",
         lambda w: w.with_removed(TRAIN_SHARD).with_shard(BIN, range(5000), promised=10**8).train(),
         ("fineweb_train_000001.bin", "truncated")),
        ("npy_shard_with_token_ids_past_the_vocabulary",
         lambda w: w.with_shard(TRAIN_SHARD, np.full(8192, 60000, dtype=np.uint16)).train(),
         "holds token id 60000, but GPT-2's tokenizer has 50257 tokens"),
        ("bin_shard_with_token_ids_past_the_vocabulary", lambda w: w.with_removed(TRAIN_SHARD)
                    .with_shard("data/llmc_train_000001.bin", np.full(8192, 50300)).train(),
         "holds token id 50300"),
        ("two_corpora_in_one_folder",
         lambda w: w.with_copied(TRAIN_SHARD, "data/other_train_000001.npy").train(),
         A_SHARD_OF.format("000001")),
        ("two_corpora_with_different_indices_in_one_folder",  # mixed silently
         lambda w: w.with_copied(TRAIN_SHARD, "data/other_train_000007.npy").train(),
         A_SHARD_OF.format("000007")),
        ("one_index_as_npy_and_as_bin",
         lambda w: w.with_shard("data/tiny_train_000001.bin", np.load(w.path(TRAIN_SHARD))).train(),
         "two train shards with index 1 (tiny_train_000001.bin, tiny_train_000001.npy)"),
        ("a_shard_of_no_tokens",  # miscounted the epoch
         lambda w: w.with_shard("data/tiny_train_000002.npy", np.zeros(0, np.uint16)).train(),
         "tiny_train_000002.npy holds no tokens: remove it"),
        ("a_shard_that_is_a_dangling_link",  # skipped without a word
         lambda w: w.with_link("gone.npy", "data/tiny_train_000002.npy").train(),
         "tiny_train_000002.npy is a symbolic link to")),
    *rows(fineweb,
        ("fineweb_prefix_naming_a_split", "--prefix x_train", "--prefix 'x_train'"),
        ("fineweb_into_a_folder_of_another_corpus",  # the folder no longer trained
         lambda w: w.fineweb("--prefix", "shard", name="notes.txt", text="a short document",
                             out="data"),
         "holds shards of another corpus (tiny_train_000001.npy), "
         "and the trainer reads one corpus per folder"),
        ("fineweb_empty_documents_say_so",
         lambda w: w.fineweb("--num_proc", "1", name="empty.txt", text=""),
         "every document was empty", 0, ["out", "out/*"]),
        ("fineweb_damaged_progress_file",
         lambda w: w.with_file("out/edufineweb_progress.json", '{"settings": ').fineweb(),
         "is damaged"),
        ("fineweb_input_replaced_by_a_file_of_the_same_size",  # same size, other text
         lambda w: w.with_ran(fineweb, w.fineweb(*SMALL_SHARDS, text="the first corpus, " * 200))
                    .fineweb(*SMALL_SHARDS, text="another corpus!!, " * 200),
         "other settings (input")),
    # Resumes: only the trainer's own checkpoints count, and one must fit the data and the run.
    *rows(train_gpt2,
        ("resume_with_no_checkpoint",
         lambda w: w.with_file("log/log.txt", "0 train 10.8\n").train("--resume"),
         ("no checkpoint", "{w.log}")),
        ("resume_from_an_empty_folder",
         lambda w: w.with_folder("elsewhere").train("--resume", w.path("elsewhere")),
         "no checkpoint model_*.pt in"),
        ("a_users_backup_is_not_a_checkpoint",
         lambda w: w.with_resumable("log/model_00002_backup.pt").train("--resume"),
         "no checkpoint model_*.pt in"),
        ("a_dead_process_lock_never_blocks",  # the refusal is the next check's
         lambda w: w.with_file("log/.lock", "999999999@a-host-that-crashed\n").train("--resume"),
         "no checkpoint model_*.pt in", 1, ["log/.lock"]),
        ("resume_from_missing_file",
         lambda w: w.with_folder("log").train("--resume", w.path("log/model_00099.pt")),
         "{w.log}/model_00099.pt"),
        ("resume_an_empty_path", lambda w: w.train("--resume", ""),
         "--resume '' names no checkpoint"),  # started a new run
        ("resume_from_a_tmp_file_by_name",
         lambda w: w.train("--resume", w.resumable("log/model_00003.pt.tmp")),
         "a .tmp file is a checkpoint whose write was cut short"),
        ("resume_from_random_bytes",
         lambda w: w.train("--resume", w.file("log/model_00005.pt",
                                              np.random.default_rng(0).bytes(10_000))),
         ("{w.log}/model_00005.pt", "not a checkpoint")),
        ("resume_a_torn_checkpoint_with_none_before_it",  # said "move it out of log"
         lambda w: w.with_file("log/model_00005.pt", b"").train("--resume"),
         "is not a checkpoint of this project (EOFError): "
         "it may be truncated or another kind of file"),
        ("resume_a_torn_newest_checkpoint",  # said pass the earlier one: refused, older
         lambda w: w.with_resumable(3).with_file("log/model_00005.pt", b"").train("--resume"),
         "move it out of"),
        ("resume_a_checkpoint_that_runs_code",  # checkpoints are read with weights_only=True
         lambda w: w.train("--resume", w.code_running_weights()),
         "{w.root}/model_00005.pt is not a checkpoint"),
        ("resume_from_weights_only_checkpoint", lambda w: w.train("--resume", w.weights(5)),
         ("{w.log}/model_00005.pt", "weights only")),
        ("resume_weights_only", lambda w: w.train("--resume", w.weights(3)),
         "it cannot be resumed; start a new run from its weights with --init"),
        ("resume_with_another_n_layer",
         lambda w: w.with_resumable(5).train("--resume", "--n_layer", "3"),
         ("{w.log}/model_00005.pt", "--n_layer 2 there, 3 here",
          "model flags it was trained with")),
        ("resume_with_another_total_batch_size",
         lambda w: w.train("--resume", w.resumable(), "--total_batch_size", "256"),
         "resume with its --total_batch_size"),
        ("resume_after_the_data_changed",  # regenerated differently
         lambda w: w.with_resumable(3).with_shard(TRAIN_SHARD, OTHER_TOKENS)
                    .train("--resume", w.path("log/model_00003.pt")),
         "not the ones the checkpoint was trained on (tiny_train_000001.npy holds other tokens"),
        ("resume_after_a_shard_was_added",
         lambda w: w.with_resumable(3).with_shard("data/tiny_train_000002.npy", OTHER_TOKENS)
                    .train("--resume", w.path("log/model_00003.pt")), "1 train shards then, 2 now"),
        ("fresh_start_over_checkpoints",  # would overwrite its log and checkpoints
         lambda w: w.with_resumable(5).with_file("log/log.txt", "5 train 10.8\n").train(),
         ("already holds checkpoints", "--resume")),
        ("resume_from_another_folder_into_a_used_log_dir",
         lambda w: w.with_resumable(7).train("--resume", w.resumable("other/model_00003.pt")),
         "holds checkpoints of another run (model_00007.pt)"),
        ("resume_a_folder_into_a_log_dir_of_another_run",  # then overwrote log/'s newer
         lambda w: w.with_resumable(3).with_resumable("other/model_00001.pt", step=1)
                    .train("--resume", w.path("other")),
         "holds checkpoints of another run (model_00003.pt): resuming"),
        ("resume_an_earlier_checkpoint_among_newer_ones",  # wrote over model_00005.pt
         lambda w: w.with_resumable(5).train("--resume", w.resumable()),
         "holds model_00005.pt, newer than"),
        ("resume_a_file_that_is_not_a_checkpoint_into_a_used_log_dir",
         lambda w: w.with_resumable(3).train("--resume", w.file("s.txt", "notes")),
         "s.txt is not a checkpoint of this project"),  # "checkpoints of another run"
        ("resume_a_checkpoint_named_past_its_step",  # later ones sorted before it
         lambda w: w.with_resumable(9, step=3).train("--resume", "--no-shuffle"),
         "model_00009.pt holds step 3, not the step 9 of its name (a renamed copy?)"),
        ("resume_a_renamed_checkpoint_into_a_new_folder",
         lambda w: w.with_resumable(2, step=1)  # its successors sort after it
                    .train("--log_dir", w.path("new"), "--resume", w.path("log/model_00002.pt"),
                           "--no-shuffle"), "", 0, ["new", "new/*"]),
        ("eval_only_of_an_earlier_checkpoint_among_newer_ones",  # refused as overwriting
         lambda w: w.with_resumable(5).train("--eval_only", "--resume", w.resumable(1)),
         "val loss", 0),
        ("eval_only_of_another_run_with_a_used_log_dir",
         lambda w: w.with_resumable(5).with_resumable("other/model_00002.pt")
                    .train("--eval_only", "--resume", w.path("other")), "val loss", 0),
        ("eval_only_with_a_batch_past_the_val_split",
         lambda w: w.train("--init", w.weights(), "--eval_only", "--batch_size", "256"),
         "the val split holds no batch: lower --batch_size (or --seq_len)"),

        # Checkpoint entries that reached a traceback, or trained wrongly.
        ("checkpoint_step_negative", lambda w: w.damaged(step=-5),  # model_-0004.pt
         f"its step {DAMAGED}, so it cannot be resumed"),
        ("checkpoint_step_a_float", lambda w: w.damaged(step=3.0), f"its step {DAMAGED}"),
        ("checkpoint_without_scaler_and_rng", lambda w: w.damaged(scaler=None, rng=None),
         f"its scaler, rng {DAMAGED}"),
        ("checkpoint_with_an_empty_optimizer", lambda w: w.damaged(optimizer={}),
         f"its optimizer {DAMAGED}"),
        ("checkpoint_position_past_the_data",
         lambda w: w.damaged(loader=lambda loader: {**loader, "sequence": 10**6}),
         "is not the start of a step of an epoch of 252 sequences: the checkpoint is damaged"),
        ("checkpoint_data_fingerprint_not_a_list",  # IndexError
         lambda w: w.damaged(loader=lambda loader: {**loader, "data": 5}), f"its loader {DAMAGED}"),
        ("checkpoint_rng_state_of_the_wrong_size",  # set_rng_state's RuntimeError
         lambda w: w.damaged(rng=lambda rng: {"torch": rng["torch"][:100]}), f"its rng {DAMAGED}"),
        ("checkpoint_args_none", lambda w: w.damaged(args=lambda args: None),
         f"its args {DAMAGED}"),  # AttributeError in the resume's line
        ("checkpoint_scale_not_a_number",  # TypeError
         lambda w: w.damaged(scaler=dict(FP16_SCALER, scale="big")), f"its scaler {DAMAGED}"),
        ("checkpoint_scaler_without_a_scale",  # KeyError, an empty log.txt
         lambda w: w.damaged(scaler={"growth_factor": 2.0, "_growth_tracker": 0}),
         f"its scaler {DAMAGED}"),
        ("checkpoint_scale_nan", lambda w: w.damaged(scaler=dict(FP16_SCALER, scale=float("nan"))),
         f"its scaler {DAMAGED}"),  # no step
        ("checkpoint_scale_negative",  # every step skipped
         lambda w: w.damaged(scaler=dict(FP16_SCALER, scale=-1.0)), f"its scaler {DAMAGED}"),
        ("checkpoint_with_nan_weights", lambda w: w.damaged(model=lambda model: {
             k: v * float("nan") if k == "transformer.h.0.mlp.c_fc.weight" else v
             for k, v in model.items()}), "holds NaN or inf, so its outputs would too"),
        ("resume_a_checkpoint_with_indivisible_heads",
         lambda w: w.train("--resume", w.resumable(config=dict(TINY_SHAPE, n_head=3))),
         "its model config is impossible (n_embd not divisible by n_head)"),
        ("resume_a_finished_run", lambda w: w.damaged(step=5),  # said "steps 6 to 5"
         "the checkpoint is after step 5 and --max_steps is 6: nothing to train; "
         "raise --max_steps"),
        ("a_folder_named_like_a_newer_checkpoint_is_not_one",  # was taken as the newest
         lambda w: w.with_folder("log/model_00009.pt").damaged(step=5),
         "the checkpoint is after step 5 and --max_steps is 6")),

    # Damage on disk: a checkpoint whose bytes changed since it was written (its zip entries'
    # CRC-32s), or that was cut short, is refused by every script that reads one, before any write.
    *rows(train_gpt2,
        ("resume_a_checkpoint_with_16_kb_overwritten",  # resumed, and trained on other weights
         lambda w: w.with_resumable(3).with_scribble("log/model_00003.pt", FINITE_16_KB)
                    .train("--resume"),
         "model_00003.pt is damaged on disk (model_00003/data/0 is cut short or changed since"),
        ("resume_a_checkpoint_with_64_bytes_of_0xff",  # said "a run that diverged"
         lambda w: w.with_resumable(3).with_scribble("log/model_00003.pt", b"\xff" * 64)
                    .train("--resume"), "model_00003.pt is damaged on disk"),
        ("resume_a_checkpoint_cut_in_half",
         lambda w: w.with_resumable(3).with_truncated("log/model_00003.pt").train("--resume"),
         "model_00003.pt is damaged on disk (its end is cut short"),
        ("init_from_a_damaged_checkpoint", lambda w: w.train("--init", w.damaged_weights()),
         "model_00005.pt is damaged on disk"),
        ("eval_only_of_a_damaged_checkpoint",
         lambda w: w.train("--eval_only", "--init", w.damaged_weights()),
         "model_00005.pt is damaged on disk")),
    row(sample, "sample_a_damaged_checkpoint", lambda w: w.sample(init=w.damaged_weights()),
        "model_00005.pt is damaged on disk"),
    row(hellaswag, "hellaswag_on_a_damaged_checkpoint",
        lambda w: w.sample("--data", write_hellaswag(w.path("h.jsonl")), init=w.damaged_weights()),
        "model_00005.pt is damaged on disk"),
    row(export_hf, "export_a_damaged_checkpoint",
        lambda w: w.export("hf", init=w.damaged_weights()), "model_00005.pt is damaged on disk"),
    # NaN weights, intact on disk: every script that loads weights refuses them before any write.
    *rows(train_gpt2,
        ("init_from_nan_weights", lambda w: w.train("--init", w.nan_weights()), NAN_WEIGHTS),
        ("eval_only_of_nan_weights", lambda w: w.train("--eval_only", "--init", w.nan_weights()),
         NAN_WEIGHTS)),
    row(hellaswag, "hellaswag_on_nan_weights",
        lambda w: w.sample("--data", write_hellaswag(w.path("h.jsonl")), init=w.nan_weights()),
        NAN_WEIGHTS),
    row(export_hf, "export_nan_weights", lambda w: w.export("hf", init=w.nan_weights()),
        NAN_WEIGHTS),

    # Foreign files: checkpoints of other programs, impossible configs, pickles.
    row(export_hf, "export_a_nanogpt_checkpoint",
        lambda w: w.export("exported", init=w.nanogpt()), "laid out differently"),
    *rows(sample,
        ("sample_a_nanogpt_checkpoint", lambda w: w.sample(init=w.nanogpt()),
         "laid out differently"),
        ("sample_a_checkpoint_that_runs_code", lambda w: w.sample(init=w.code_running_weights()),
         "{w.root}/model_00005.pt is not a checkpoint"),
        ("sample_a_checkpoint_with_n_head_0",
         lambda w: w.sample(init=w.weights(config=dict(TINY_SHAPE, n_head=0))),
         "its model config is impossible (n_head 0)"),
        ("sample_from_nan_weights", lambda w: w.sample(init=w.nan_weights()), NAN_WEIGHTS),
        ("sample_a_hugging_face_folder_with_n_head_0", lambda w: w.sample(init=w.hf(0)),
         "config.json: its model config is impossible (n_head 0)"),
        ("sample_a_hugging_face_config_without_n_head", lambda w: w.sample(init=w.hf(None)),
         "hf/config.json lacks n_head: it is not a complete GPT-2 config"),
        ("sample_a_pickled_pytorch_model_bin",
         lambda w: w.sample(init=w.hf(4, {"extra": RunsCodeWhenUnpickled(w.path("code_ran"))})),
         "a pytorch_model.bin of plain tensors"),
        ("sample_from_a_log_dir",  # spoke of config.json only
         lambda w: w.sample(init=w.with_weights(5).log),
         "is the folder of a training run, not a Hugging Face model: pass one of its checkpoints")),
    row(hellaswag, "hellaswag_on_a_model_too_short_for_an_example",
        lambda w: w.sample("--data", w.file("h.jsonl", json.dumps(EXAMPLE)), init=w.weights(
            model=GPT(GPTConfig(block_size=1, vocab_size=50304, n_layer=1, n_head=1, n_embd=8)))),
        "a model with block_size 1 cannot score HellaSwag: it needs at least 2 positions"),

    # Concurrency: a folder locked by a live process refuses a second writer.
    row(train_gpt2, "log_dir_held_by_another_process", lambda w: w.with_lock("log").train(),
        "is in use by another run (pid "),
    row(fineweb, "fineweb_out_held_by_another_process", lambda w: w.with_lock("out").fineweb(),
        "is in use by another run (pid "),
    row(export_hf, "export_out_held_by_another_process",
        lambda w: w.with_lock("hf").export("hf"), "is in use by another run (pid "),

    # Faults during a run: out of memory, divergence.
    *rows(train_gpt2,
        ("out_of_memory_in_a_training_step",
         lambda w: w.with_setattr(train_gpt2, "train_step", out_of_memory).train(),
         "lower --batch_size (now 4) and keep --total_batch_size 128", 1, ["log", "log/log.txt"]),
        ("out_of_memory_in_an_evaluation",
         lambda w: w.with_setattr(train_gpt2, "validation_loss", out_of_memory).train(),
         "out of memory on cpu: lower --batch_size", 1, ["log", "log/*"]),
        ("cpu_allocator_failure_in_an_evaluation",  # a traceback
         lambda w: w.with_setattr(train_gpt2, "validation_loss", cpu_allocator_failure).train(),
         "out of memory on cpu: lower --batch_size", 1, ["log", "log/*"]),
        ("out_of_memory_on_a_rank_of_a_group",  # said by no rank: another rank's traceback instead
         lambda w: w.with_setattr(train_gpt2, "validation_loss", out_of_memory)
                    .group(MASTER_PORT="29531"),
         "rank 0: out of memory on cpu: lower --batch_size", 1, ["log", "log/*"]),
        ("loss_nan_before_any_checkpoint",
         lambda w: w.with_setattr(train_gpt2, "train_step", diverging_train_step(0, False)).train(),
         "no checkpoint was saved yet: start again with a lower --max_lr", 1, ["log", "log/*"]),
        ("weights_inf_behind_a_finite_loss",
         lambda w: w.with_setattr(train_gpt2, "train_step", diverging_train_step(2, True))
                    .train("--ckpt_every", "1", "--sample_every_eval"),  # step 2 evaluates: samples
         "the weights after the step are not; stopping without saving. last good checkpoint",
         1, ["log", "log/*"]),
        ("sample_prompt_too_long_for_the_model",  # failed at the first evaluation
         lambda w: w.train("--sample_every_eval", "--sample_prompt", " word" * 70),
         f"the samples' prompt is 70 tokens: {CONTEXT} 64"),
        ("sample_prompt_too_long_is_no_matter_without_samples",
         lambda w: w.train("--no-sample_every_eval", "--sample_prompt", " word" * 70),
         "", 0, ["log", "log/*"]),
        ("sample_prompt_empty_is_one_token",  # log.txt was replaced, then it failed
         lambda w: w.with_file("log/log.txt", "0 train 9.0\n")
                    .train("--block_size", "32", "--sample_every_eval", "--sample_prompt", ""),
         f"the samples' prompt is 1 token: {CONTEXT} 32")),
    row(sample, "out_of_memory_while_sampling",
        lambda w: w.with_setattr(GPT, "generate", out_of_memory).sample(), "lower --num_samples"),

    # The processes of a run: one rule for torchrun's variables (none: one process; all,
    # consistent: a group; anything in between: refused, naming the variable), and a meeting place
    # checked before any wait (torch retried a bad host for half an hour).
    *rows(train_gpt2,
        ("rank_left_in_the_environment",  # trained alone, wrote nothing, exit 0
         lambda w: w.with_env(*GROUP, RANK="1").train(),
         "RANK=1 is set but LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are not: start the"),
        ("world_size_alone",  # trained on half of each step, logged half the loss
         lambda w: w.with_env(*GROUP, WORLD_SIZE="2").train(),
         "WORLD_SIZE=2 is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not"),
        ("empty_group_variables_count_as_unset",  # said "RANK= ... is set but RANK"
         lambda w: w.with_env(*GROUP, RANK="", LOCAL_RANK="", WORLD_SIZE="2").train(),
         "WORLD_SIZE=2 is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not"),
        ("local_rank_not_a_number", lambda w: w.group(LOCAL_RANK="abc"),
         "RANK=0 LOCAL_RANK=abc WORLD_SIZE=1: each must be a whole number"),
        ("rank_past_the_world", lambda w: w.group(RANK="2", WORLD_SIZE="2"),
         "RANK=2 LOCAL_RANK=0 WORLD_SIZE=2: a group needs 0 <= LOCAL_RANK <= RANK < WORLD_SIZE"),
        ("master_port_past_the_last_port", lambda w: w.group(MASTER_PORT="99999"),
         "MASTER_PORT=99999: the group's port must be a number from 1 to 65535"),
        ("master_port_not_a_number", lambda w: w.group(MASTER_PORT="abc"),  # torch's ValueError
         "MASTER_PORT=abc: the group's port must be a number from 1 to 65535"),
        ("master_addr_that_does_not_resolve",  # retried, deaf to SIGTERM
         lambda w: w.group(MASTER_ADDR="no-such-host.invalid"),
         "MASTER_ADDR=no-such-host.invalid: no such host"),
        ("master_port_in_use",  # torch's DistNetworkError traceback
         lambda w: w.with_port_in_use(29511).group(MASTER_PORT="29511"),
         "MASTER_PORT=29511 on 127.0.0.1 is in use by another program (another run?): "
         "pass a free port")),
    # A stray torchrun environment silences no script but the trainer's echoes.
    *rows(sample,
        ("local_rank_alone_does_not_silence_an_error",  # silenced every script's error
         lambda w: w.with_env(*GROUP, LOCAL_RANK="1").sample(init=w.path("no_such.pt")), NO_INIT),
        ("sample_in_a_stray_torchrun_environment",  # exit 1 without a word
         lambda w: w.with_env(**ELASTIC).sample(init=w.path("no_such.pt")), NO_INIT)),
    row(plot_log, "plot_in_a_stray_torchrun_environment",
        lambda w: [w.with_env(**ELASTIC).path("no_such.txt")], "no_such.txt"),

    # Downloads: whatever stops the datasets library (here a hub address that is no URL; a dead
    # proxy or no network the same, after its retries) is one line that says to pass --input.
    row(fineweb, "fineweb_hf_endpoint_not_a_url",  # said "host None"
        lambda w: ["--out", w.with_env(*OFFLINE, HF_ENDPOINT="hub.example").path("out")],
        "could not load HuggingFaceFW/fineweb-edu (sample-10BT, train) with the datasets library"),
]
# fmt: on


@pytest.fixture
def w(tmp_path, monkeypatch):
    workspace = Workspace(tmp_path, monkeypatch)
    yield workspace
    for end in workspace.cleanup:
        end()


# A few rows run again, end to end in a fresh interpreter: exit status and output as a user sees
# them, nothing but the error line, and no file changed.
END_TO_END = "no_shards int32_npy resume_with_another_n_layer sample_with_an_unknown_init".split()


@pytest.mark.parametrize("script, setup, says, code, changes", FAULTS)
def test_fault(script, setup, says, code, changes, w, capsys, request):
    if isinstance(setup, str):  # flags to w.<script>(): w.train for train_gpt2
        argv = getattr(w, script.__name__.removesuffix("_gpt2"))(*setup.split())
    else:
        argv = setup(w)
    before = snapshot(w.root)
    capsys.readouterr()  # what the setup printed is not the row's output
    try:
        run_cli(script.main, argv)
        exit_code = 0
    except SystemExit as e:
        exit_code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, out + err
    assert exit_code == code, out + err
    lines = (err if code else out).strip().splitlines()
    assert lines and (code == 0 or len(lines) == 1 and lines[0].startswith("error: ")), out + err
    for fragment in says:
        assert fragment.format(w=w) in lines[-1], f"{fragment!r} not in the last line of:\n{err}"
    after = snapshot(w.root)
    touched = {path for path in before.keys() | after.keys() if before.get(path) != after.get(path)}
    unexpected = {path for path in touched if not any(fnmatch.fnmatch(path, g) for g in changes)}
    assert not unexpected, f"files touched: {sorted(unexpected)}"
    if request.node.callspec.id in END_TO_END:
        result = run_script(f"{script.__name__}.py", *argv)
        assert result.returncode == 1 and result.stdout == "", result.stdout + result.stderr
        assert result.stderr.strip().splitlines() == lines[-1:], result.stderr
        assert snapshot(w.root) == before


# --- a training run the test can watch and signal -------------------------------------------------

# 12 steps of 128 tokens: evaluation on 2,048 tokens after steps 3, 7 and 11.
LONG_RUN = [*TINY_RUN, "--max_steps", "12", "--eval_every", "4", "--val_tokens", "2048"]
LAST_STEP = 11


class Trainer:
    """train_gpt2.py on LONG_RUN in a subprocess (conftest's start), its output kept as read."""

    def __init__(self, log_dir, data_dir, *flags):
        folders = ["--data_dir", data_dir, "--log_dir", log_dir]
        self.proc = start("train_gpt2.py", *LONG_RUN, *folders, *flags)
        self.lines = []

    def wait_for(self, pattern):
        """Read output until a line matches the regex `pattern`; return the match."""
        self.lines += read_until(self.proc, pattern)
        return re.search(pattern, self.lines[-1])

    def finish(self):
        """Read the rest of the output; return the exit code."""
        self.lines += read_until(self.proc, None)
        return self.proc.wait()

    def output(self):
        return "".join(self.lines)

    def printed(self, pattern):
        return any(re.search(pattern, line) for line in self.lines)


@pytest.fixture
def trainers():
    """Start Trainers through this; any still running when the test ends (it failed) is killed."""
    started = []
    yield lambda *args: started.append(Trainer(*args)) or started[-1]
    for trainer in started:
        trainer.proc.kill()  # nothing, if it has ended
        trainer.proc.communicate()


def step_of(path):
    """The step in a checkpoint's name: 7 for log/model_00007.pt (and log/model_00007.pt.tmp)."""
    return int(re.fullmatch(r"model_(\d+)\.pt(\.tmp)?", os.path.basename(path)).group(1))


def checkpoint_steps(log_dir):
    return sorted(step_of(p) for p in glob.glob(os.path.join(log_dir, "model_*.pt")))


def checkpoint_path(log_dir, step):
    return os.path.join(str(log_dir), f"model_{step:05d}.pt")


def read_log(log_dir):
    with open(os.path.join(log_dir, "log.txt")) as f:
        return {tuple(line.split()) for line in f if line.strip()}


def assert_matches_reference(log_dir, reference_dir):
    """Every checkpoint left equals the uninterrupted run's of its step (all but args and
    eval_pending), the final one included, and every logged number is the same."""
    steps = checkpoint_steps(log_dir)
    assert steps and steps[-1] == LAST_STEP, f"the run did not finish: checkpoints at {steps}"
    for step in steps:
        paths = (checkpoint_path(folder, step) for folder in (log_dir, reference_dir))
        assert_bit_identical(*paths, differing=("args", "eval_pending"))
    # A resumed run appends to log.txt and logs again the steps after its checkpoint: same values.
    ours, reference = read_log(log_dir), read_log(reference_dir)
    assert ours == reference, f"log.txt lines not in both runs' logs: {sorted(ours ^ reference)}"


@pytest.fixture(scope="module")
def reference_run(random_shards, tmp_path_factory):
    """The run never interrupted, with a checkpoint after every step to compare against."""
    log_dir = tmp_path_factory.mktemp("reference")
    run = Trainer(log_dir, random_shards, "--ckpt_every", "1")
    assert run.finish() == 0, run.output()
    assert checkpoint_steps(log_dir) == list(range(LAST_STEP + 1))
    return str(log_dir)


# --- SIGKILL at three moments, then --resume ------------------------------------------------------


def kill(run):
    run.proc.kill()
    assert run.finish() == -signal.SIGKILL


def kill_during_checkpoint_write(run, log_dir):
    """SIGKILL `run` the moment a checkpoint's temporary file appears. Returns that file's path, or
    None when the write finished (the file was renamed) before the kill landed."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and run.proc.poll() is None:
        if partial := glob.glob(os.path.join(log_dir, "*.tmp")):
            kill(run)
            return partial[0] if os.path.exists(partial[0]) else None
        time.sleep(0.0005)
    raise AssertionError(f"no checkpoint write was seen:\n{run.output()}")


def test_sigkill_mid_step_mid_eval_and_mid_checkpoint_write_then_resume_is_exact(
    tmp_path, random_shards, reference_run, trainers
):
    log_dir = str(tmp_path / "log")
    every_3, every_step = ["--ckpt_every", "3"], ["--ckpt_every", "1"]

    # 1. Mid-step: at a random moment of step 5 (begun as step 4's line came), once a checkpoint
    # exists (they follow steps 2, 5, 8, 11).
    run = trainers(log_dir, random_shards, *every_3)
    run.wait_for(r"^saved .*model_00002\.pt$")
    step_ms = int(run.wait_for(r"^step +4/\d+ \| loss .* \| (\d+) ms \|").group(1))
    time.sleep(random.Random(7).uniform(0.0, 1.0) * step_ms / 1000)
    kill(run)
    assert checkpoint_steps(log_dir) in ([2], [2, 5])

    # 2. During evaluation: step 7's line is printed just before its val loss is computed. If the
    # kill lands after the evaluation (a badly overloaded machine), roll back to step 5, try again.
    for _ in range(3):
        run = trainers(log_dir, random_shards, *every_3, "--resume")
        run.wait_for(r"^resumed from .*model_0000[25]\.pt at step [36]$")
        run.wait_for(r"^step +7/\d+ \| loss")
        kill(run)
        if not run.printed(r"^step +7/\d+ \| val loss"):
            break
        for step in checkpoint_steps(log_dir):
            if step > 5:
                os.remove(checkpoint_path(log_dir, step))
    else:
        pytest.fail("three kills in a row landed after the evaluation, none during it")
    assert checkpoint_steps(log_dir) == [2, 5]
    assert not glob.glob(os.path.join(log_dir, "*.tmp"))  # a resume removes what a kill tore

    # 3. During a checkpoint write (one every step): killed as soon as a temporary file appears.
    for _ in range(3):
        if torn := kill_during_checkpoint_write(
            trainers(log_dir, random_shards, *every_step, "--resume"), log_dir
        ):
            break
    else:
        pytest.fail("three kills in a row landed after the checkpoint's rename, none during it")
    good = latest_checkpoint(log_dir)
    # the torn write replaced nothing
    assert step_of(good) < step_of(torn) and not os.path.exists(torn.removesuffix(".tmp"))
    load_checkpoint(good)  # the previous checkpoint is whole

    # 4. Resume from the last whole checkpoint and run to the end.
    run = trainers(log_dir, random_shards, *every_3, "--resume")
    assert run.finish() == 0, run.output()
    assert run.printed(f"^resumed from {re.escape(good)} at step {step_of(good) + 1}$")
    assert not os.path.exists(torn) and not glob.glob(os.path.join(log_dir, "*.tmp"))
    assert_matches_reference(log_dir, reference_run)


# --- SIGTERM and SIGINT: save the current step and exit 0 -----------------------------------------


def stopped_step(output):
    """The N of the output's one line "stopped after step N; continue with --resume"."""
    [step] = re.findall(r"^stopped after step (\d+); continue with --resume$", output, re.M)
    return int(step)


def stop_with(run, sig, log_dir):
    """`sig` to `run`: it saves and exits 0 within 30 s, no traceback. Returns the step saved,
    checked against the last step line before the handler's notice."""
    sent = time.monotonic()
    run.proc.send_signal(sig)
    assert run.finish() == 0, run.output()
    assert time.monotonic() - sent < 30, f"took {time.monotonic() - sent:.1f}s to stop"
    output = run.output()
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    before, notice, after = output.partition(f"\n{sig.name}: saving a checkpoint")
    assert notice, output
    last = int(re.findall(r"^step +(\d+)/\d+ \| loss", before, re.M)[-1])
    stopped = stopped_step(after)
    # The step in progress when the signal came finishes (or, if it had already passed the point
    # where ranks agree to stop, the one after it); nothing later. A signal during the evaluation
    # after a step cuts the evaluation short, and that step is the one saved.
    cut_short = run.printed(rf"^step +{last}/\d+ \| evaluation cut short")
    assert last + (0 if cut_short else 1) <= stopped <= last + 2, output
    assert run.printed(f"^saved {re.escape(checkpoint_path(log_dir, stopped))}$")
    return stopped


def test_sigterm_sigint_and_sighup_save_the_current_step_exit_0_and_resume_exactly(
    tmp_path, random_shards, reference_run, trainers
):
    log_dir = str(tmp_path / "log")
    rare = ["--ckpt_every", "1000"]  # no periodic checkpoint: any checkpoint was for the signal

    # SIGTERM (a cluster's preemption) in the middle of the steps.
    run = trainers(log_dir, random_shards, *rare)
    run.wait_for(r"^step +2/\d+ \| loss")
    time.sleep(0.05)
    term_step = stop_with(run, signal.SIGTERM, log_dir)
    assert checkpoint_steps(log_dir) == [term_step]

    # SIGINT (Ctrl-C) during the evaluation after step 7: it stops between two batches, saving 7.
    run = trainers(log_dir, random_shards, *rare, "--resume")
    saved = re.escape(checkpoint_path(log_dir, term_step))
    run.wait_for(f"^resumed from {saved} at step {term_step + 1}$")
    run.wait_for(r"^step +7/\d+ \| loss")
    int_step = stop_with(run, signal.SIGINT, log_dir)
    # the latter unless the eval was fast
    assert run.printed(r"^step +7/\d+ \| (val loss|evaluation cut short)")
    assert checkpoint_steps(log_dir) == [term_step, int_step]

    # Resuming from what the signals saved ends where the uninterrupted run ended, bit for bit.
    run = trainers(log_dir, random_shards, *rare, "--resume")
    assert run.finish() == 0, run.output()
    assert checkpoint_steps(log_dir) == [term_step, int_step, LAST_STEP]
    assert_matches_reference(log_dir, reference_run)

    # SIGHUP (the terminal closed) too
    hup_dir = str(tmp_path / "hup")
    run = trainers(hup_dir, random_shards, *rare)
    run.wait_for(r"^step +3/")
    hup_step = stop_with(run, signal.SIGHUP, hup_dir)
    assert checkpoint_steps(hup_dir) == [hup_step]


def pipe_fill(read_fd):
    """Bytes waiting in a pipe."""
    return struct.unpack("i", fcntl.ioctl(read_fd, termios.FIONREAD, b"\0\0\0\0"))[0]


@pytest.mark.skipif(
    not hasattr(fcntl, "F_SETPIPE_SZ"), reason="needs Linux pipes whose size can be set"
)
def test_sigterm_while_printing_to_a_full_pipe_still_saves(tmp_path, random_shards):
    """`train_gpt2.py | tee` with tee stalled: SIGTERM arrives inside a blocked print, and the
    stop notice must not re-enter print (RuntimeError: reentrant call)."""
    read_fd, write_fd = os.pipe()
    capacity = fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 4096)  # fills after ~50 step lines
    tiny = (
        "--n_layer 1 --n_head 2 --n_embd 16 --block_size 16 --batch_size 1 --seq_len 16 "
        "--total_batch_size 16 --warmup_steps 2 --max_steps 100000 --eval_every 100000 "
        "--ckpt_every 100000 --val_tokens 16 --no-hellaswag --no-sample_every_eval --dtype float32"
    ).split()
    env = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}  # buffered, as in a normal run
    proc = subprocess.Popen([sys.executable, "train_gpt2.py", *tiny, "--data_dir", random_shards,
                             "--log_dir", str(tmp_path)], stdout=write_fd, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)  # fmt: skip
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        try:
            # Blocked: the pipe (nearly) full for 0.5 s, while the run prints a line every few ms.
            deadline, fills = time.monotonic() + TIMEOUT, [-1]
            while fills[-1] < capacity - 256 or fills[-10:] != [fills[-1]] * 10:
                assert proc.poll() is None and time.monotonic() < deadline, (
                    proc.stderr.read() if proc.poll() is not None else "the pipe never filled"
                )
                time.sleep(0.05)
                fills.append(pipe_fill(read_fd))
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            stdout = pipe.read().decode()  # tee wakes up: the blocked print, then the rest
            assert proc.wait(timeout=TIMEOUT) == 0, stdout[-1000:] + proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
    assert "Traceback" not in proc.stderr.read()
    stopped = stopped_step(stdout)
    assert checkpoint_steps(tmp_path) == [stopped] and stopped >= 20  # it ran until the pipe filled


# --- checkpoint writes are atomic ---------------------------------------------------------------


def test_a_failed_checkpoint_write_leaves_the_previous_one_and_no_partial_file(tmp_path):
    previous = str(tmp_path / "model_00003.pt")
    save_checkpoint(previous, {"step": 3, "weights": torch.arange(10)})
    with pytest.raises(TypeError):  # unpicklable (a lock): a write dying half way, not for the disk
        save_checkpoint(previous, {"step": 4, "weights": torch.zeros(10), "bad": threading.Lock()})
    # A full disk, for a new checkpoint and for one overwritten: 4 MB, past the 1 MB left.
    with file_size_limit(1 << 20):
        for path in (str(tmp_path / "model_00004.pt"), previous):
            with pytest.raises(UserError, match=f"(the disk is full while writing|could not write) "
                               f"{re.escape(path)}:? .*disk"):  # fmt: skip
                save_checkpoint(path, {"step": 4, "weights": torch.zeros(1 << 20)})
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
