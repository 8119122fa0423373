"""Memory: an evaluation splits batches to fit, with the same loss; a run that cannot fit is
refused before its first step, naming a --batch_size that fits; the start-up block's estimate."""

import contextlib
import io
import os
import re
import resource
import subprocess
import sys

import pytest
import torch

import train_gpt2
from conftest import REPO, write_random_shards
from machinery import torchrun
from machinery.cli import UserError
from train_gpt2 import GPT, GPTConfig

# A 1-layer model with GPT-2's context and padded vocabulary: at the default --batch_size 64 and
# --seq_len 1024, the logits of one val batch are 64 x 1024 x 50304 fp32 numbers, 13 GB, and their
# softmax as much.
WIDE_CONTEXT = "--n_layer 1 --n_head 2 --n_embd 32 --block_size 1024 --dtype float32".split()
ADDRESS_SPACE = 5 * 2**30  # the limit the default-batch evaluation runs under: a few GB, not 26


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
    """A 1-layer checkpoint, what the run that saved it printed, and a val split of 64 x 1024 + 1
    tokens: one batch of 64, or 16 of 4."""
    data_dir = str(tmp_path_factory.mktemp("wide_data"))
    write_random_shards(data_dir, 64 * 1024 + 1, (4 * 1024 + 1,))
    log_dir = tmp_path_factory.mktemp("wide_log")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        train_gpt2.main([*WIDE_CONTEXT, "--data_dir", data_dir, "--log_dir", str(log_dir), *(
            "--batch_size 1 --total_batch_size 1024 --max_steps 1 --warmup_steps 1 "
            "--val_tokens 1024 --no-hellaswag --no-sample_every_eval --no-eval_first "
            "--device cpu").split()])  # fmt: skip
    return str(log_dir / "model_00000.pt"), data_dir, out.getvalue()


def limit_address_space():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def test_eval_only_with_the_default_batch_fits_a_few_gb(wide_run):
    """The default batch, 64 rows, is evaluated in parts that fit (that the parts' loss is the whole
    batch's, test_validation_loss_in_parts_is_the_loss_of_the_whole_batch checks)."""
    checkpoint, data_dir, _ = wide_run
    command = [sys.executable, os.path.join(REPO, "train_gpt2.py"), "--init", checkpoint,
               "--data_dir", data_dir, "--eval_only", "--no-hellaswag", "--device", "cpu",
               "--dtype", "float32"]  # fmt: skip
    limited = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                             preexec_fn=limit_address_space)  # fmt: skip
    assert limited.returncode == 0, limited.stdout + limited.stderr
    rows = int(re.search(r"(\d+) rows per forward pass \(memory holds", limited.stdout).group(1))
    assert 1 <= rows < 64  # the batch was split: 64 rows at once would need about 26 GB
    val_loss = float(re.search(r"^val loss (\d+\.\d+) \|", limited.stdout, re.M).group(1))
    assert 10 < val_loss < 12  # one step from random weights on random tokens: about ln(50257)


def test_validation_loss_in_parts_is_the_loss_of_the_whole_batch(random_shards):
    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=1, n_head=2, n_embd=32))
    loader = train_gpt2.DataLoaderLite(random_shards, 8, 64, 0, 1, "val")
    autocast, procs = torch.autocast("cpu", enabled=False), torchrun.Processes()

    def validation_loss(**rows):
        return train_gpt2.validation_loss(model, loader, 3, autocast, procs, **rows)

    whole = validation_loss()
    assert validation_loss(rows=8) == whole  # one part: exact
    for rows in (1, 3, 5):  # parts of unequal size too
        assert validation_loss(rows=rows) == pytest.approx(whole, abs=1e-5)


def test_a_run_that_cannot_fit_is_refused_before_its_first_step_naming_the_batch_size(tmp_path):
    log_dir = tmp_path / "log"
    # a step of each split: the loaders come first
    write_random_shards(tmp_path, 16384 * 64 + 1, (16384 * 64 + 1,))
    flags = ["--data_dir", str(tmp_path), "--log_dir", str(log_dir), *(
        "--n_layer 1 --n_head 2 --n_embd 32 --block_size 64 --seq_len 64 --batch_size 16384 "
        f"--total_batch_size {16384 * 64} --device cpu --no-hellaswag --no-compile").split(),
    ]  # fmt: skip
    # 16,384 sequences of 64 positions over 50,304 tokens: about 1.6 TB of logits and gradients per
    # micro-step
    with pytest.raises(UserError) as error:
        train_gpt2.main(flags)
    message = str(error.value)
    assert "\n" not in message
    assert re.fullmatch(
        r"the run needs about [\d.]+ GiB per step at --batch_size 16384 "
        r"and cpu has [\d.]+ GiB available: "
        r"use --batch_size \d+ \(--total_batch_size 1048576 stays: "
        r"more micro-steps make up the difference\)",
        message,
    ), message
    smaller = int(re.search(r"use --batch_size (\d+)", message).group(1))
    assert (16384 * 64) % (smaller * 64) == 0  # a divisor: the step keeps its tokens
    assert not log_dir.exists()  # refused before anything was written


def test_the_start_up_block_prints_the_estimate(wide_run):
    estimate = (
        r"^memory      ~[\d.]+ GiB per process estimated for a step, [\d.]+ GiB available on cpu$"
    )
    assert re.search(estimate, wide_run[2], re.M), wide_run[2]
