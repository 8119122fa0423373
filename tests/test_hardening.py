"""Drills that need real processes or several runs (two writers, signals, a lone rank, full disk,
read-only folders), and runs that must just work (fp16 resume, torn log line, ...)."""

import json
import os
import re
import shlex
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

import export_hf
import fineweb
import plot_log
import train_gpt2
from conftest import (
    ENV,
    REPO,
    TIMEOUT,
    TINY_RUN,
    file_size_limit,
    read_until,
    run_script,
    snapshot,
    start,
    tiny_checkpoint,
    write_random_shards,
)
from machinery import progress
from machinery.cli import run_cli
from machinery.tokenizer import gpt2_tokenizer

# --- drills with real processes: two writers on one folder, stop signals, a lone rank -------------


def assert_a_second_run_is_refused(first, script, flags, folder):
    """With `first` paused (it holds folder's lock and writes nothing meanwhile), the same command
    again ends in one line that names the folder and first's pid; then first goes on."""
    first.send_signal(signal.SIGSTOP)
    second = run_script(script, *flags)
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"{folder} is in use by another run (pid {first.pid}@" in second.stderr.splitlines()[-1]
    first.send_signal(signal.SIGCONT)


def test_a_second_trainer_on_one_log_dir_is_refused_and_a_second_ctrl_c_exits_at_once(tmp_path):
    data = write_random_shards(tmp_path / "data", train_lengths=(70_000,))
    log = str(tmp_path / "log")
    # 512 micro-steps per step: the second Ctrl-C comes long before the step could end and save.
    flags = [*TINY_RUN, "--data_dir", data, "--log_dir", log, "--total_batch_size", "65536"]
    first = start("train_gpt2.py", *flags)
    try:
        read_until(first, r"^data ")
        assert_a_second_run_is_refused(first, "train_gpt2.py", flags, f"--log_dir {log}")
        time.sleep(1)  # the first goes on, undisturbed, until told to stop
        first.send_signal(signal.SIGINT)
        read_until(first, r"^SIGINT: saving a checkpoint after this step")
        first.send_signal(signal.SIGINT)
        output = first.communicate(timeout=TIMEOUT)[0]
    finally:
        first.kill()
    assert first.returncode == 130 and "Traceback" not in output, output
    assert output.strip().splitlines()[-1].startswith("interrupted: stopped at once, without")
    assert os.listdir(log) == ["log.txt"]  # no checkpoint, no torn .tmp, the lock released


def test_fineweb_refuses_a_second_run_and_after_sigterm_a_rerun_finishes_the_same_shards(tmp_path):
    corpus, cut = tmp_path / "corpus", str(tmp_path / "cut")
    corpus.mkdir()
    text = open(os.path.join(REPO, "README.md")).read()
    for k in range(60):  # 60 documents of ~1.5 MB: several seconds of tokenizing on 2 cores
        (corpus / f"doc{k:02d}.txt").write_text(f"document {k}\n" + text * 160)
    flags = ["--input", str(corpus), "--shard_size", "2000000", "--num_proc", "2"]
    run = start("fineweb.py", *flags, "--out", cut)
    try:
        read_until(run, r"tokenizing")
        assert_a_second_run_is_refused(run, "fineweb.py", [*flags, "--out", cut], f"--out {cut}")
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
        rerun = run_script("fineweb.py", *flags, "--out", tmp_path / out)
        assert rerun.returncode == 0, rerun.stderr
    assert snapshot(cut) == snapshot(tmp_path / "whole")  # the lock gone, nothing else left
    assert json.load(open(os.path.join(cut, "shard_progress.json")))["finished"]


@pytest.mark.parametrize("rank, stop", [(1, signal.SIGTERM), (0, signal.SIGINT)])
def test_a_rank_started_without_its_group_says_it_is_waiting_and_stops_when_told(
    tmp_path, random_shards, rank, stop
):
    port = str(29517 + rank)
    variables = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}  # fmt: skip
    # A step of 2 ranks. It used to wait for its peers without a word, inside torch's wait, where
    # Python's handlers did not run: Ctrl-C and SIGTERM did nothing.
    run = start("train_gpt2.py", *TINY_RUN, "--data_dir", random_shards, "--total_batch_size",
                "256", "--log_dir", tmp_path / "log", env={**ENV, **variables})  # fmt: skip
    try:
        lines = read_until(run, r"waiting")
        time.sleep(1)
        run.send_signal(stop)
        assert run.wait(timeout=10) == -stop
    finally:
        run.kill()
        run.wait()
    peers = "rank 1" if rank == 0 else "rank 0"
    assert lines[-1].startswith(f"rank {rank} of 2: waiting for {peers} at 127.0.0.1:{port}"), lines
    assert not os.path.exists(tmp_path / "log")


# --- in one process: the cases that must just work, and one line for each fault -------------------


def test_an_export_that_fills_the_disk_is_one_line_and_leaves_nothing(tmp_path, capsys):
    path = tiny_checkpoint(str(tmp_path / "model_00005.pt"))  # 13 MB of weights
    with file_size_limit(4 << 20), pytest.raises(SystemExit) as exited:
        run_cli(export_hf.main, ["--init", path, "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert exited.value.code == 1 and err.count("\n") == 1, err
    assert err.startswith("error: the disk is full") or "is the disk full?" in err
    assert sorted(os.listdir(tmp_path)) == ["model_00005.pt"]  # no export, no half-written folder


def test_fineweb_drops_a_file_named_twice_and_a_byte_order_mark(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("The first document.")
    (corpus / "b.txt").write_bytes("\ufeffThe second document.".encode())  # as Notepad saves
    argv = ["--input", str(corpus), str(corpus / "a.txt"), "--out", str(tmp_path / "out")]
    fineweb.main([*argv, "--num_proc", "1"])
    out = capsys.readouterr().out
    assert f"note: --input names {corpus / 'a.txt'} twice (first as {corpus / 'a.txt'})" in out
    assert "2 documents" in out  # not 3: a.txt's text is not in the val split and in train too
    tokens = np.load(tmp_path / "out" / "shard_val_000000.npy")
    enc = gpt2_tokenizer()
    documents = ("The first document.", "The second document.")
    assert tokens.tolist() == [t for d in documents for t in [50256, *enc.encode(d)]]  # no mark


def test_the_next_commands_are_quoted_for_the_shell_and_the_clock_can_step_back(
    tmp_path, capsys, monkeypatch
):
    report = progress.Progress(0, 9)
    monkeypatch.setattr(time, "time", lambda: 0.0)  # the wall clock set back to 1970: no effect
    assert report.step_done(1)[0] >= 0  # seconds since the start
    report.train_loss, report.checkpoint = 5.0, "my run/model_00009.pt"
    monkeypatch.chdir(REPO)
    progress.print_summary(report, "my run/log.txt", "ROMEO's line")
    lines = capsys.readouterr().out.splitlines()
    sample_line = next(line for line in lines if line.startswith("next"))
    assert shlex.split(sample_line.removeprefix("next")) == [
        "python", "sample.py", "--init", "my run/model_00009.pt", "--prompt", "ROMEO's line"
    ]  # fmt: skip
    monkeypatch.chdir(tmp_path)  # run from another folder, the commands name the scripts there
    progress.print_summary(report, "log.txt", "a")
    commands = [shlex.split(line[12:]) for line in capsys.readouterr().out.splitlines()[-2:]]
    assert [words[1] for words in commands] == [
        os.path.relpath(os.path.join(REPO, name)) for name in ("sample.py", "plot_log.py")
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
    mount = ["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(folder)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("runs as root, which ignores permissions, and may not mount a folder here")
    try:
        yield str(folder)
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_every_script_says_a_read_only_folder_in_one_line(tmp_path, read_only_folder, capsys):
    data, text = write_random_shards(tmp_path / "data"), tmp_path / "a.txt"
    text.write_text("A document.")
    log = tmp_path / "log.txt"
    log.write_text("0 train 10.9\n1 train 9.5\n1 val 9.7\n")
    model = tiny_checkpoint(str(tmp_path / "model_00005.pt"))
    train = [*TINY_RUN, "--data_dir", data, "--log_dir"]
    runs = [
        (train_gpt2.main, [*train, read_only_folder]),  # the lock's open
        (train_gpt2.main, [*train, os.path.join(read_only_folder, "run")]),
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
        assert read_only_folder in err, err
        assert re.search("read-only file system|permission denied", err), err
        assert "disk is full" not in err
    assert snapshot(tmp_path) == before


def test_a_new_run_notes_what_it_finds_and_its_fp16_resume_drops_a_torn_last_log_line(
    tmp_path, capsys
):
    """A new run notes unfinished shards, an earlier log and a warmup as long as the run. A kill
    can leave half a line at the end of log.txt; --dtype auto picks fp16 where a run moves to an
    older GPU, and its checkpoint's scaler state is empty."""
    data, log = write_random_shards(tmp_path / "data"), tmp_path / "log"
    with open(os.path.join(data, "tiny_progress.json"), "w") as f:  # a fineweb.py run cut short
        json.dump({"finished": False, "shards": 2, "documents": 10, "tokens": 12288}, f)
    log.mkdir()
    (log / "log.txt").write_text("0 train 3.0\n1000 val 2.5\n")  # a run that saved no checkpoint
    flags = [*TINY_RUN, "--data_dir", data, "--log_dir", str(log), "--no-eval_first"]
    flags += ["--no-shuffle", "--warmup_steps", "4"]
    train_gpt2.main([*flags, "--max_steps", "1"])
    out = capsys.readouterr().out
    for note in [
        "says its fineweb.py run has not finished: training uses the shards written so far",
        f"note: {log / 'log.txt'} of an earlier run that saved no checkpoint is replaced",
        "note: --warmup_steps 4 is not below --max_steps 1: the learning rate only warms up, "
        "to 25% of",
    ]:
        assert note in out, out
    assert "1000 val" not in (log / "log.txt").read_text()
    with open(log / "log.txt", "a") as f:
        f.write("1 trai")  # a kill in the middle of a line
    torn = (log / "log.txt").read_text()
    assert plot_log.parse_log(str(log / "log.txt"))["train"][0] == [0]
    note = f"note: the last line of {log / 'log.txt'} is cut short ('1 trai'): it is left out"
    assert note in capsys.readouterr().out
    train_gpt2.main([*flags, "--max_steps", "4", "--resume", "--dtype", "float16"])
    out = capsys.readouterr().out
    assert "resumed from" in out and "autocast float16" in out
    scaler = torch.load(log / "model_00003.pt", weights_only=True)["scaler"]
    assert scaler and scaler["scale"] > 0  # the fp16 run's own scaler, saved for its next resume
    lines = (log / "log.txt").read_text().splitlines()
    # what was whole is kept as it was; the torn line is gone (was "1 trai1 train 10.8")
    assert lines[: len(torn.splitlines()) - 1] == torn.splitlines()[:-1]
    assert all(re.fullmatch(r"\d+ (train|val) [0-9.]+", line) for line in lines), lines
    assert plot_log.parse_log(str(log / "log.txt"))["train"][0] == [0, 1, 2, 3]
    # cut from "1 train 2.345": it parses, and is left out
    (log / "log.txt").write_text("0 train 3.5\n1 train 2")
    assert plot_log.parse_log(str(log / "log.txt"))["train"] == ([0], [3.5])


def writes_a_log_line_to_a_full_disk(argv):
    # log.txt's lines are plain writes, not atomic ones: any of them can hit a full disk
    with open("/dev/full", "w") as log:
        log.write("0 train 10.9\n")


def interrupted(argv):
    raise KeyboardInterrupt  # as Ctrl-C in sample.py's or hellaswag.py's loop: was a traceback


def finds_no_shards(argv):
    raise train_gpt2.UserError("no train shards in data")


# torchrun's second process on a machine: the trainer (group=True) leaves its errors to LOCAL_RANK 0
# (any other script says its error in any environment: test_faults.py's stray torchrun rows)
SECOND_RANK = dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", TORCHELASTIC_RUN_ID="x")


@pytest.mark.parametrize(
    "main, group, code, said",
    [
        (writes_a_log_line_to_a_full_disk, {}, 1, "error: the disk is full.*\n"),
        (interrupted, {}, 130, r"\s*interrupted\s*"),
        (finds_no_shards, SECOND_RANK, 1, ""),
    ],
)
def test_a_full_disk_and_ctrl_c_in_any_script_are_one_line_and_a_second_rank_says_nothing(
    main, group, code, said, capsys, monkeypatch
):
    if main is writes_a_log_line_to_a_full_disk and not os.path.exists("/dev/full"):
        pytest.skip("needs Linux's /dev/full, a file whose writes fail as on a full disk")
    for name, value in group.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        run_cli(main, group=bool(group))
    assert exited.value.code == code
    err = capsys.readouterr().err
    assert re.fullmatch(said, err), err
