"""Fault drills: a training run that is killed, interrupted or fed bad input loses nothing and says
why.

- SIGKILL mid-step, during evaluation and during a checkpoint write, each followed by --resume: the
  run ends bit-identical to one that was never killed, and a torn checkpoint never replaces the good
  one.
- SIGTERM and SIGINT: a checkpoint of the current step, exit 0 within seconds, an exact resume.
- A table of bad inputs: one `error:` line, a non-zero exit, no traceback, no file touched.
- Checkpoints are read with weights_only=True: opening one cannot run code.
fineweb.py's kill-and-rerun drill is in test_fineweb.py.
"""

import fcntl
import glob
import hashlib
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
from dataclasses import asdict

import numpy as np
import pytest
import torch

import sample
import train_gpt2
from conftest import REPO, TINY_MODEL, file_size_limit
from machinery.checkpoints import checkpoint_step, latest_checkpoint
from machinery.cli import UserError, run_cli
from machinery.shards import BIN_HEADER_INTS, BIN_MAGIC, BIN_VERSION
from train_gpt2 import GPT, GPTConfig, load_checkpoint, load_model, save_checkpoint

# 12 steps of 128 tokens; evaluation after steps 3, 7 and 11.
TINY_RUN = TINY_MODEL + [
    "--batch_size", "4", "--seq_len", "32", "--total_batch_size", "128", "--max_steps", "12",
    "--warmup_steps", "2", "--eval_every", "4", "--val_tokens", "2048", "--no-hellaswag",
    "--no-sample_every_eval",
]  # fmt: skip
LAST_STEP = 11
# One thread: no fight for the cores with other tests. Unbuffered: each line reaches the test when
# printed.
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
TIMEOUT = 180  # seconds: generous, since a loaded 2-core machine is slow; a healthy run needs a few


# --- helpers: a training run the test can watch and signal ----------------------------------------


class Trainer:
    """train_gpt2.py in a subprocess whose output (stdout and stderr together) is read line by line
    as it is printed, so that a test can act at a chosen moment of the run."""

    def __init__(self, log_dir, data_dir, *flags):
        command = [
            sys.executable,
            os.path.join(REPO, "train_gpt2.py"),
            *TINY_RUN,
            "--data_dir",
            data_dir,
            "--log_dir",
            str(log_dir),
            *flags,
        ]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=REPO
        )
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
        same = a.dtype == b.dtype and torch.equal(a, b)
        assert same, f"{where} differs"
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
        ours = torch.load(checkpoint_path(log_dir, step), map_location="cpu", weights_only=True)
        reference = torch.load(
            checkpoint_path(reference_dir, step), map_location="cpu", weights_only=True
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
    time.sleep(
        random.Random(7).uniform(0.0, 1.0) * step_ms / 1000
    )  # step 5 started as step 4's line came
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
    assert not glob.glob(
        os.path.join(log_dir, "*.tmp")
    )  # a resume removes what an earlier kill tore

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
    assert step_of(good) < step_of(torn) and not os.path.exists(
        torn.removesuffix(".tmp")
    )  # the torn write replaced nothing
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
    notice = next(
        i
        for i, line in enumerate(run.lines)
        if line.startswith(f"{signal_name}: saving a checkpoint")
    )
    before = [
        int(m.group(1))
        for line in run.lines[:notice]
        if (m := re.match(r"step +(\d+)/\d+ \| loss", line))
    ]
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
    rare = [
        "--ckpt_every",
        "1000",
    ]  # no periodic checkpoint: any checkpoint was written for the signal

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
    assert seconds_to_exit < 30, (
        f"took {seconds_to_exit:.1f}s to stop"
    )  # a step and a save: well under 1s on an idle machine

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
    assert run.printed(
        r"^step +7/\d+ \| (val loss|evaluation cut short)"
    )  # the latter unless the eval was fast
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
    env = {
        k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"
    }  # stdout buffered, as in a normal run
    proc = subprocess.Popen(
        [sys.executable, "train_gpt2.py", *tiny],
        stdout=write_fd,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
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
    assert (
        checkpoint_steps(tmp_path) == [stopped] and stopped >= 20
    )  # it ran until the pipe was full


# --- the bad-input table --------------------------------------------------------------------------
# Each case prepares a data directory and a log directory under tmp_path, and returns the flags to
# add to TINY_RUN and fragments the error line must contain. The good shards come from
# `random_shards`.


def copy_shards(corpus, data_dir, *splits):
    for split in splits:
        for path in glob.glob(os.path.join(corpus, f"*_{split}_*.npy")):
            shutil.copy(path, data_dir)


def write_bin_shard(path, tokens, magic=BIN_MAGIC, promised=None):
    header = np.zeros(BIN_HEADER_INTS, dtype=np.int32)
    header[:3] = magic, BIN_VERSION, len(tokens) if promised is None else promised
    with open(path, "wb") as f:
        f.write(header.tobytes() + tokens.astype(np.uint16).tobytes())


def tiny_checkpoint(path, n_layer=2, with_optimizer=True):
    """A checkpoint in the project's format for the tiny model, built directly (no training
    needed)."""
    config = GPTConfig(block_size=64, vocab_size=50304, n_layer=n_layer, n_head=4, n_embd=64)
    model = GPT(config)
    state = {"model": model.state_dict(), "config": asdict(config)}
    if with_optimizer:
        state.update(
            optimizer=torch.optim.AdamW(model.parameters()).state_dict(),
            step=checkpoint_step(path) or 0,
        )
    torch.save(state, path)
    return str(path)


def no_shards(corpus, data, log):
    return [], ["no train shards", str(data)]


def only_val_split(corpus, data, log):
    copy_shards(corpus, data, "val")
    return [], ["no train shards"]


def only_train_split(corpus, data, log):
    copy_shards(corpus, data, "train")
    return [], ["no val shards"]


def truncated_npy(corpus, data, log):
    copy_shards(corpus, data, "val", "train")
    path = glob.glob(os.path.join(data, "*_train_*.npy"))[0]
    os.truncate(path, os.path.getsize(path) // 2)  # what an interrupted copy leaves
    return [], [os.path.basename(path), "truncated"]


def int32_npy(corpus, data, log):
    copy_shards(corpus, data, "val")
    np.save(os.path.join(data, "tiny_train_000001.npy"), np.arange(5000, dtype=np.int32))
    return [], ["tiny_train_000001.npy", "int32", "uint16"]


def bin_with_wrong_magic(corpus, data, log):
    copy_shards(corpus, data, "val")
    write_bin_shard(os.path.join(data, "fineweb_train_000001.bin"), np.arange(5000), magic=12345)
    return [], ["fineweb_train_000001.bin", "magic 12345"]


def truncated_bin(corpus, data, log):
    copy_shards(corpus, data, "val")
    write_bin_shard(
        os.path.join(data, "fineweb_train_000001.bin"), np.arange(5000), promised=100_000_000
    )
    return [], ["fineweb_train_000001.bin", "truncated"]


def shard_shorter_than_a_batch(corpus, data, log):
    copy_shards(corpus, data, "val")
    np.save(os.path.join(data, "tiny_train_000001.npy"), np.arange(100, dtype=np.uint16))
    return [], ["tiny_train_000001.npy", "fewer than one batch"]


def resume_from_random_bytes(corpus, data, log):
    copy_shards(corpus, data, "val", "train")
    path = os.path.join(log, "model_00005.pt")
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).bytes(10_000))
    return ["--resume", path], [path, "not a checkpoint"]


def resume_from_missing_file(corpus, data, log):
    copy_shards(corpus, data, "val", "train")
    path = os.path.join(log, "model_00099.pt")
    return ["--resume", path], [path]


def resume_from_weights_only_checkpoint(corpus, data, log):
    copy_shards(corpus, data, "val", "train")
    path = tiny_checkpoint(os.path.join(log, "model_00005.pt"), with_optimizer=False)
    return ["--resume", path], [path, "weights only"]


def resume_with_another_n_layer(corpus, data, log):
    copy_shards(corpus, data, "val", "train")
    path = tiny_checkpoint(os.path.join(log, "model_00005.pt"), n_layer=2)
    return ["--resume", "--n_layer", "3"], [
        path,
        "--n_layer 2 there, 3 here",
        "model flags it was trained with",
    ]


def resume_with_no_checkpoint(corpus, data, log):
    copy_shards(corpus, data, "val", "train")
    with open(os.path.join(log, "log.txt"), "w") as f:
        f.write("0 train 10.8\n")
    return ["--resume"], ["no checkpoint", str(log)]


def fresh_start_over_checkpoints(corpus, data, log):
    """Starting without --resume where a run left checkpoints would overwrite its log and
    checkpoints."""
    copy_shards(corpus, data, "val", "train")
    tiny_checkpoint(os.path.join(log, "model_00005.pt"))
    with open(os.path.join(log, "log.txt"), "w") as f:
        f.write("5 train 10.8\n")
    return [], ["already holds checkpoints", "--resume"]


def total_batch_not_divisible(corpus, data, log):
    copy_shards(corpus, data, "val", "train")
    return ["--total_batch_size", "200"], ["--total_batch_size 200", "not divisible", "128"]


def seq_len_over_block_size(corpus, data, log):
    copy_shards(corpus, data, "val", "train")
    return ["--seq_len", "128", "--total_batch_size", "512"], ["--seq_len 128", "--block_size 64"]


def bad_flag(flag, value):
    def case(corpus, data, log):
        copy_shards(corpus, data, "val", "train")
        return [f"--{flag}", value], [f"--{flag}", value]

    case.__name__ = f"{flag}_{value}"
    return case


BAD_INPUTS = [
    no_shards, only_val_split, only_train_split, truncated_npy, int32_npy, bin_with_wrong_magic,
    truncated_bin, shard_shorter_than_a_batch, resume_from_random_bytes, resume_from_missing_file,
    resume_from_weights_only_checkpoint, resume_with_another_n_layer, resume_with_no_checkpoint,
    fresh_start_over_checkpoints, total_batch_not_divisible, seq_len_over_block_size,
    bad_flag("batch_size", "0"), bad_flag("seq_len", "0"), bad_flag("max_steps", "-1"),
    bad_flag("max_lr", "-1"), bad_flag("ckpt_every", "0"), bad_flag("eval_every", "0"),
    bad_flag("warmup_steps", "-5"),
]  # fmt: skip


def files_in(*directories):
    """{path: sha256 of its bytes} of every file under the directories: a before/after snapshot."""
    snapshot = {}
    for directory in directories:
        for root, _, names in os.walk(directory):
            for name in names:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    snapshot[path] = hashlib.sha256(f.read()).hexdigest()
    return snapshot


def prepare(case, tmp_path, corpus):
    data, log = tmp_path / "data", tmp_path / "log"
    data.mkdir()
    log.mkdir()
    flags, fragments = case(corpus, str(data), str(log))
    argv = [
        *TINY_RUN,
        "--data_dir",
        str(data),
        "--log_dir",
        str(log),
        "--ckpt_every",
        "3",
        *flags,
    ]  # later flags win
    return argv, fragments, (data, log)


def assert_one_error_line(stderr, fragments):
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), stderr
    assert "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in lines[-1], f"{fragment!r} not in {lines[-1]!r}"


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda case: case.__name__)
def test_bad_input_is_one_error_line_and_touches_no_file(
    case, tmp_path, random_shards, capsys, keep_signal_handlers
):
    argv, fragments, directories = prepare(case, tmp_path, random_shards)
    before = files_in(*directories)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_gpt2.main, argv)
    assert exit_info.value.code not in (0, None)
    assert_one_error_line(capsys.readouterr().err, fragments)
    assert files_in(*directories) == before


# The same, end to end in a fresh interpreter, for a few cases: exit status and stderr as a user
# sees them.
@pytest.mark.parametrize(
    "case", [no_shards, int32_npy, resume_with_another_n_layer], ids=lambda case: case.__name__
)
def test_bad_input_from_the_command_line(case, tmp_path, random_shards):
    argv, fragments, directories = prepare(case, tmp_path, random_shards)
    before = files_in(*directories)
    result = subprocess.run(
        [sys.executable, "train_gpt2.py", *argv],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
        timeout=TIMEOUT,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # nothing but the error line
    assert_one_error_line(result.stderr, fragments)
    assert files_in(*directories) == before


# --- sample.py ------------------------------------------------------------------------------------


def test_sample_with_unknown_init_is_one_error_line():
    result = subprocess.run(
        [sys.executable, "sample.py", "--init", "nonexistent_thing", "--device", "cpu"],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
        timeout=TIMEOUT,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert_one_error_line(result.stderr, ["nonexistent_thing"])
    assert result.stdout == ""


def test_sample_prompt_longer_than_the_context_window(tmp_path, capsys):
    path = tiny_checkpoint(tmp_path / "model_00005.pt")  # block_size 64
    before = files_in(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(
            sample.main,
            [
                "--init",
                path,
                "--device",
                "cpu",
                "--prompt",
                "the cat sat on the mat " * 20,
                "--max_new_tokens",
                "8",
                "--num_samples",
                "1",
            ],
        )
    assert exit_info.value.code == 1
    assert_one_error_line(capsys.readouterr().err, ["context window", "64"])
    assert files_in(tmp_path) == before


# --- checkpoints cannot run code ------------------------------------------------------------------


class RunsCodeWhenUnpickled:
    """Unpickling this calls open(marker, "w"), creating the marker file: the harmless stand-in for
    what a malicious checkpoint would run (os.system, ...)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_cannot_run_code(tmp_path, random_shards, capsys, keep_signal_handlers):
    marker = tmp_path / "code_ran"
    path = str(tmp_path / "model_00005.pt")
    tiny_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["args"] = RunsCodeWhenUnpickled(
        str(marker)
    )  # a real checkpoint with one poisoned entry
    torch.save(checkpoint, path)
    torch.load(path, weights_only=False)  # the payload is live: an unrestricted load runs it
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UserError, match="not a checkpoint"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="not a checkpoint"):
        load_model(path)
    with pytest.raises(SystemExit):
        run_cli(
            train_gpt2.main,
            [
                *TINY_RUN,
                "--data_dir",
                random_shards,
                "--log_dir",
                str(tmp_path / "log"),
                "--resume",
                path,
            ],
        )
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
        for path in (
            str(tmp_path / "model_00004.pt"),
            previous,
        ):  # a new checkpoint, and one overwritten
            with pytest.raises(
                UserError,
                match=f"(the disk is full while writing|could not write) "
                f"{re.escape(path)}:? .*disk",
            ):
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
