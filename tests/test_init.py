"""--init (fine-tuning) and --eval_only, offline: a random saved GPT2LMHeadModel stands in for
OpenAI's weights."""

import glob
import os
import shutil
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

import train_gpt2
from conftest import (
    assert_bit_identical,
    read_until,
    run_trainer,
    snapshot,
    start,
    tiny_checkpoint,
    write_hellaswag,
)
from machinery.cli import run_cli
from machinery.tokenizer import GPT2_VOCAB_SIZE
from test_model import SMALL, random_gpt, random_hf_model
from train_gpt2 import DataLoaderLite, load_model

# Micro-batches of 4 x 32 tokens, 1,024 val tokens per evaluation, exact fp32 arithmetic.
BATCH = [
    "--batch_size", "4", "--seq_len", "32", "--total_batch_size", "128", "--val_tokens", "1024",
    "--dtype", "float32", "--no-hellaswag", "--no-sample_every_eval",
]  # fmt: skip
# 30 steps of fine-tuning: val loss after steps 14 and 29, checkpoints after steps 9, 19 and 29.
FINE_TUNE = BATCH + (
    "--max_steps 30 --warmup_steps 3 --max_lr 1e-3 --eval_every 15 --ckpt_every 10".split()
)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random GPT-2 (SMALL, context 64) as save_pretrained writes it, LayerNorms, biases too."""
    directory = tmp_path_factory.mktemp("hf_gpt2")
    random_hf_model(**SMALL, n_positions=64).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def fine_tune(hf_dir, text_shards, tmp_path_factory):
    """The log folder of 30 uninterrupted steps of fine-tuning from hf_dir (FINE_TUNE's flags)."""
    log_dir = str(tmp_path_factory.mktemp("fine_tune"))
    run_trainer("--init", hf_dir, "--data_dir", text_shards, "--log_dir", log_dir, *FINE_TUNE)
    return log_dir


def eval_only(capsys, *flags):
    """--eval_only in this process: the val loss it prints, and everything it printed."""
    run_cli(train_gpt2.main, ["--eval_only", *BATCH, *flags])
    out = capsys.readouterr().out
    [line] = [line for line in out.splitlines() if line.startswith("val loss ")]
    return float(line.split()[2]), out


def read_log(log_dir):
    return [line.split() for line in open(os.path.join(log_dir, "log.txt"))]


# --- --eval_only ----------------------------------------------------------------------------------


def test_eval_only_gives_the_val_loss_transformers_gives_in_one_process_and_under_torchrun(
    hf_dir, text_shards, tmp_path, capsys
):
    # It needs no train split; --val_tokens is rounded down to whole batches (of 128, 2 x 128).
    [shard] = glob.glob(os.path.join(text_shards, "*_val_*.npy"))
    os.makedirs(tmp_path / "val_only")
    shutil.copy(shard, tmp_path / "val_only")
    flags = ["--init", hf_dir, "--data_dir", str(tmp_path / "val_only"), "--val_tokens", "1100"]
    flags += ["--hellaswag", "--hellaswag_data", write_hellaswag(tmp_path / "hellaswag.jsonl")]
    val_loss, out = eval_only(capsys, *flags)
    assert "1,024 tokens" in out
    # The same 1,024 tokens through transformers' own model: the first 1,024 inputs of the val
    # shard, each predicting the token after it, in rows of 32.
    tokens = torch.from_numpy(np.load(shard)[:1025].astype(np.int64))
    hf_model = GPT2LMHeadModel.from_pretrained(hf_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = hf_model(tokens[:-1].view(-1, 32)).logits
    expected = F.cross_entropy(logits.flatten(0, 1), tokens[1:]).item()
    assert abs(val_loss - expected) < 1e-5, (val_loss, expected)
    # Two ranks each score half of the val batches and half of the HellaSwag examples; the results
    # are one process's.
    result = run_trainer("--eval_only", *BATCH, *flags, nproc=2)
    assert "2 process(es)" in result.stdout and "1,024 tokens" in result.stdout
    [ddp_line] = [line for line in result.stdout.splitlines() if line.startswith("val loss ")]
    assert abs(float(ddp_line.split()[2]) - val_loss) < 1e-5

    def acc_norm(text):
        return [line.split(" | ")[0] for line in text.splitlines() if line.startswith("hellaswag")]

    assert acc_norm(result.stdout) == acc_norm(out) and len(acc_norm(out)) == 1


def test_eval_only_writes_no_file(hf_dir, text_shards, fine_tune, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where a download would go
    # --init, with a log folder that does not exist: it is not created, HellaSwag is not downloaded
    _, out = eval_only(capsys, "--init", hf_dir, "--data_dir", text_shards,
                       "--log_dir", str(tmp_path / "log"), "--hellaswag")  # fmt: skip
    assert "HellaSwag skipped: its data is not cached;" in out
    # Nothing but the tokenizer's own cache of its merge table (made once per machine by any script)
    tokenizer_cache = {"cache", "cache/gpt2-repro", "cache/gpt2-repro/gpt2.tiktoken"}
    assert set(snapshot(tmp_path)) <= tokenizer_cache
    # --resume, in a run's log folder: nothing in it changes, not even the leftover of an
    # interrupted write that a training run would delete
    log_dir = tmp_path / "run"
    log_dir.mkdir()
    for name in ("log.txt", "model_00029.pt"):
        shutil.copy(os.path.join(fine_tune, name), log_dir)
    (log_dir / "model_00039.pt.tmp").write_bytes(b"torn")
    hellaswag = write_hellaswag(tmp_path / "hellaswag.jsonl")
    before = {k: v for k, v in snapshot(tmp_path).items() if k not in tokenizer_cache}
    _, out = eval_only(capsys, "--resume", "--log_dir", str(log_dir), "--data_dir", text_shards,
                       "--hellaswag", "--hellaswag_data", hellaswag)  # fmt: skip
    assert f"weights     {log_dir / 'model_00029.pt'}" in out and "hellaswag acc_norm" in out
    assert {k: v for k, v in snapshot(tmp_path).items() if k not in tokenizer_cache} == before


# --- fine-tuning ----------------------------------------------------------------------------------


def test_fine_tune_lowers_the_val_loss(hf_dir, text_shards, fine_tune, capsys):
    before, _ = eval_only(capsys, "--init", hf_dir, "--data_dir", text_shards)
    log = read_log(fine_tune)
    assert log[0][:2] == ["-1", "val"] and log[1][:2] == ["0", "train"]  # the steps start fresh
    assert abs(float(log[0][2]) - before) < 1e-3  # the starting weights' loss, as --eval_only
    val = {int(step): float(value) for step, kind, value in log if kind == "val"}
    assert sorted(val) == [-1, 14, 29]  # -1: the starting weights, before the first step
    assert val[29] < val[14] < before - 0.5 and abs(val[-1] - before) < 1e-3
    # the fine-tuned weights, evaluated alone, give the val loss the run logged
    after, _ = eval_only(capsys, "--resume", "--log_dir", fine_tune, "--data_dir", text_shards)
    assert abs(after - val[29]) < 1e-4


def test_fine_tune_killed_then_resumed_is_bit_exact(hf_dir, text_shards, fine_tune, tmp_path):
    log_dir = str(tmp_path / "killed")
    flags = ["--init", hf_dir, "--data_dir", text_shards, "--log_dir", log_dir, *FINE_TUNE]
    run = start("train_gpt2.py", *flags)
    try:
        read_until(run, r"^step 12/29")  # after the checkpoint of step 9, well before the next
        run.send_signal(signal.SIGKILL)
    finally:
        run.kill()
        run.communicate()
    assert run.returncode == -signal.SIGKILL
    # the lock: see files.output_lock
    assert sorted(os.listdir(log_dir)) == [".lock", "log.txt", "model_00009.pt"]
    # resumed as any run is: its flags and --resume (no --init: the checkpoint holds the config)
    result = run_trainer("--resume", "--data_dir", text_shards, "--log_dir", log_dir, *FINE_TUNE)
    assert "at step 10" in result.stdout and "step  9/29 |" not in result.stdout
    straight, resumed = (os.path.join(folder, "model_00029.pt") for folder in (fine_tune, log_dir))
    assert_bit_identical(straight, resumed)


def test_init_from_our_checkpoint_keeps_its_weights(text_shards, tmp_path):
    model = random_gpt(vocab_size=50304, block_size=64, **SMALL)  # random padded rows too
    path = tiny_checkpoint(str(tmp_path / "ours.pt"), model=model)
    log_dir = tmp_path / "log"
    # one step at learning rate 0: AdamW leaves every weight as it was, so the checkpoint shows what
    # was loaded
    flags = "--max_steps 1 --warmup_steps 0 --max_lr 0 --eval_every 1 --ckpt_every 1".split()
    argv = ["--init", path, "--data_dir", text_shards, "--log_dir", str(log_dir), *BATCH, *flags]
    run_cli(train_gpt2.main, argv)
    step_0 = DataLoaderLite(text_shards, 4, 32, 0, 1, "train", 128, shuffle=True, seed=1337)
    x, y = step_0.next_batch()
    with torch.no_grad():
        _, expected = load_model(path)(x, y)
    step, kind, loss = read_log(log_dir)[1]  # after the starting weights' val loss
    assert (step, kind) == ("0", "train") and abs(float(loss) - expected.item()) < 1e-6
    loaded = torch.load(log_dir / "model_00000.pt", weights_only=True)["model"]
    for key, tensor in model.state_dict().items():
        if key in ("transformer.wte.weight", "lm_head.weight"):  # the padding is fresh: zero rows
            assert torch.equal(loaded[key][:GPT2_VOCAB_SIZE], tensor[:GPT2_VOCAB_SIZE]), key
            assert not loaded[key][GPT2_VOCAB_SIZE:].any(), key
        else:
            assert torch.equal(loaded[key], tensor), key
