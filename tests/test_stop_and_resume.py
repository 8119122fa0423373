"""Stopped or killed scripts, and what a resume then finds: SIGTERM is one line, exit 143; a killed
export is cleared; a cut-short evaluation is resumed; changed data is refused."""

import os
import re
import shutil
import signal
import time

import numpy as np
import pytest
import torch

import export_hf
import train_gpt2
from conftest import TINY_RUN, file_size_limit, read_until, run_trainer, start, write_random_shards
from machinery import progress


def tiny_run(tmp_path, val_tokens=4096):
    """TINY_RUN warming up for 1 step, on random shards in tmp_path/data, logging to tmp_path/log;
    the caller adds --max_steps and what its case needs."""
    data = write_random_shards(tmp_path / "data", val_tokens=val_tokens)
    log = str(tmp_path / "log")
    return [*TINY_RUN, "--data_dir", data, "--log_dir", log, "--warmup_steps", "1"]


def test_sigterm_ends_any_script_with_one_line_and_exit_143():
    # A script with no words of its own for a stop (sample.py, export_hf.py, ...), in a process of
    # its own: without run_cli's handler, SIGTERM would kill it outright (no clean-up, status -15).
    script = (
        "import os, signal, time\nfrom machinery.cli import run_cli\ndef main(argv):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(30)\nrun_cli(main)\n"
    )
    ended = start("-c", script)
    output = ended.communicate(timeout=60)[0]  # stdout and stderr
    assert (ended.returncode, output.strip()) == (143, "terminated")


def test_an_export_clears_the_build_folders_a_killed_export_left(tmp_path):
    out = tmp_path / "gpt2-ours"
    left = [tmp_path / ".gpt2-ours.tmpab_cd123", tmp_path / ".gpt2-ours.tmpab_cd123.old"]
    others = [tmp_path / ".gpt2-ours2.tmpab_cd123", tmp_path / "gpt2-ours.tmpab_cd123"]
    for folder in left + others:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    config = train_gpt2.GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=8)
    export_hf.export_hf(train_gpt2.GPT(config), str(out))
    assert not any(folder.exists() for folder in left)
    assert all(folder.exists() for folder in others)  # another export's, or the user's
    assert sorted(os.listdir(out)) == sorted(export_hf.EXPORT_FILES)


# SIGTERM during the evaluation after the last step: the checkpoint says its evaluation is pending,
# and --resume does it (no training step), then saves it as done; with more steps to go, it does the
# evaluation, then trains. On 2 fully sharded ranks the signal goes to rank 1 only.
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.mark.parametrize("nproc", [1, 2], ids=["1 process", "2 ranks"])
def test_a_stop_during_the_last_evaluation_is_resumed_into_that_evaluation(tmp_path, nproc):
    log = tmp_path / "log"
    flags = [*tiny_run(tmp_path, val_tokens=1_000_000), "--total_batch_size", "256",
             "--max_steps", "2", "--eval_every", "100", "--no-eval_first"]  # fmt: skip
    flags += ["--shard", "full"] if nproc == 2 else []
    # An evaluation of 999,000 tokens after the last step: far longer than the test waits.
    launcher = TORCHRUN if nproc == 2 else []
    run = start(*launcher, "train_gpt2.py", *flags, "--val_tokens", 999000)
    try:
        line = read_until(run, r"^step +1/\d+ \| loss")[-1]
        time.sleep(1)
        # The one process, or rank 1 of torchrun's (not torchrun, whose handler is a traceback)
        sent = time.monotonic()
        os.kill(run.pid if nproc == 1 else children(run.pid)[1], signal.SIGTERM)
        stopped = line + run.communicate(timeout=300)[0]
        seconds = time.monotonic() - sent
    finally:
        run.kill()
    assert run.returncode == 0 and "Traceback" not in stopped, stopped
    assert "evaluation cut short by the stop request" in stopped, stopped
    assert not re.search(r"\| val loss \d", stopped)
    assert f"saved {log / 'model_00001.pt'}" in stopped and "stopped after step 1" in stopped
    if nproc == 1:
        assert seconds < 20, f"{seconds:.1f} s from SIGTERM to exit"
        shutil.copytree(log, tmp_path / "more")  # to resume with more steps to go
    assert torch.load(log / "model_00001.pt", weights_only=True)["eval_pending"] is True
    assert not os.path.exists(log / "model_00002.pt")

    resumed = run_trainer(*flags, "--val_tokens", 2048, "--resume", nproc=nproc)
    assert re.search(r"^step +1/1 \| val loss \d", resumed.stdout, re.M), resumed.stdout
    assert not re.search(r"^step +\d+/\d+ \| loss", resumed.stdout, re.M)  # no step trained
    assert "at step 1" in resumed.stdout  # the summary's val loss is this evaluation's
    logged = (log / "log.txt").read_text().splitlines()
    assert logged[-1].startswith("1 val "), logged
    assert torch.load(log / "model_00001.pt", weights_only=True)["eval_pending"] is False
    if nproc == 1:  # the evaluation that was cut short comes before the next step
        more = run_trainer(*flags, "--val_tokens", 256, "--resume", "--max_steps", 3, "--log_dir",
                           tmp_path / "more")  # fmt: skip
        assert re.search(r"^step 1/2 \| val loss \d.*\n(.*\n)*step 2/2 \| loss", more.stdout, re.M)


def children(pid):
    """The pids of the processes `pid` started (torchrun's ranks), once both are up."""
    for _ in range(100):
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids = [int(child) for child in f.read().split()]
        if len(pids) == 2:
            return pids
        time.sleep(0.1)
    raise AssertionError(f"torchrun started {pids}")


# A full disk ends a run with the way on: --resume and the intact checkpoint it continues from, or,
# where no checkpoint was saved yet, the same command again (a --resume would be refused). The data
# of a resumed run must be the data it was trained and evaluated on: a shard replaced or changed in
# place (same name, same length) is refused, before any file is written.
def test_a_full_disk_says_how_to_go_on_a_changed_val_split_is_refused_an_old_fingerprint_is_not(
    tmp_path,
):
    data, log = tmp_path / "data", tmp_path / "log"
    flags = [*tiny_run(tmp_path), "--eval_every", "2", "--ckpt_every", "2"]
    with file_size_limit(1 << 20), pytest.raises(train_gpt2.UserError) as first:
        train_gpt2.main([*flags, "--max_steps", "4"])  # a checkpoint of the tiny model is ~40 MB
    message = str(first.value)
    assert "no intact checkpoint was saved yet" in message, message
    assert "model_00001.pt" in message and "(without --resume)" in message
    assert sorted(os.listdir(log)) == ["log.txt"]  # no torn checkpoint left taking space
    train_gpt2.main([*flags, "--max_steps", "2"])
    with file_size_limit(1 << 20), pytest.raises(train_gpt2.UserError) as later:
        train_gpt2.main([*flags, "--max_steps", "4", "--resume"])
    intact = f"--resume; it continues from {log / 'model_00001.pt'}, which is intact"
    assert intact in str(later.value), later.value

    val = np.load(data / "tiny_val_000000.npy")
    val[2000] ^= 1  # one token, in the middle of the shard
    np.save(data / "tiny_val_000000.npy", val)
    before = {name: (log / name).read_bytes() for name in os.listdir(log)}
    with pytest.raises(train_gpt2.UserError, match="tiny_val_000000.npy holds other tokens now"):
        train_gpt2.main([*flags, "--max_steps", "4", "--resume"])
    assert {name: (log / name).read_bytes() for name in os.listdir(log)} == before

    # A checkpoint written before the val split was fingerprinted, whose train fingerprint is a
    # checksum of each shard's head and tail: names and sizes are compared, and it resumes.
    checkpoint = torch.load(log / "model_00001.pt", weights_only=True)
    del checkpoint["val_data"]
    checkpoint["loader"]["data"] = [[name, tokens, "ab" * 32] for name, tokens, _ in
                                    checkpoint["loader"]["data"]]  # fmt: skip
    torch.save(checkpoint, log / "model_00001.pt")
    train_gpt2.main([*flags, "--max_steps", "4", "--resume"])
    assert os.path.exists(log / "model_00003.pt")


def test_a_log_line_that_finds_the_disk_full_is_taken_back_whole(tmp_path):
    log = progress.RunLog(str(tmp_path), resume=False, master=True)
    log.write("0 train 10.9")
    with file_size_limit(len("0 train 10.9\n") + 5), pytest.raises(OSError):
        log.write("1 train 10.8")  # 13 bytes past the 5 left: never half a line
    log.close()
    assert (tmp_path / "log.txt").read_text() == "0 train 10.9\n"
