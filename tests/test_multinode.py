"""Two machines on one: torchrun agents --nnodes 2 meeting by c10d on 127.0.0.1, one gloo process
each, each node in its own folder with the data at the same path. c10d ignores --node_rank and gives
rank 0 to the node whose address sorts first: node 0 is 127.0.0.1, node 1 127.0.0.2 (both loopback),
so that node 0 is rank 0 however the agents are scheduled."""

import os
import socket
import subprocess
import sys

import torch

from conftest import ENV, REPO, TINY_RUN, run_trainer, write_hellaswag

# A step of 256 tokens: one micro-step on each of 2 nodes, or 2 in one process.
FLAGS = [*TINY_RUN, "--total_batch_size", "256", "--eval_every", "2", "--val_tokens", "512",
         "--ckpt_every", "2"]  # fmt: skip


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(data_dir, node_dirs, *more, check=True, caches=(None, None)):
    """Both agents of a 2-node torchrun group, started together and awaited; (returncode, stdout,
    stderr) per node, each 0 when `check`. caches: each node's XDG_CACHE_HOME, if its own."""
    port = free_port()
    agents = []
    for node_rank, (cwd, cache) in enumerate(zip(node_dirs, caches)):
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
            "--local_addr", f"127.0.0.{node_rank + 1}", "--nproc_per_node", "1",
            "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "multinode-test",
            os.path.join(REPO, "train_gpt2.py"), "--data_dir", data_dir,
            "--log_dir", "log", *FLAGS, *more,
        ]  # fmt: skip
        os.makedirs(cwd, exist_ok=True)
        agents.append(
            subprocess.Popen(
                command,
                cwd=cwd,
                env=dict(ENV, XDG_CACHE_HOME=str(cache)) if cache else ENV,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    results = []
    for agent in agents:
        stdout, stderr = agent.communicate(timeout=300)
        results.append((agent.returncode, stdout.decode(), stderr.decode()))
    for code, stdout, stderr in results:
        assert code == 0 or not check, stdout[-2000:] + stderr[-3000:]
    return results


def test_two_nodes_train_as_one_process_with_accumulation_and_resume(tmp_path, text_shards):
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    # HellaSwag's data is in node 0's cache only: rank 0 sends its examples, and both score them
    # (had node 0 alone scored them, it would wait for node 1 in each batch's collective).
    os.makedirs(tmp_path / "cache0" / "gpt2-repro" / "hellaswag")
    write_hellaswag(tmp_path / "cache0" / "gpt2-repro" / "hellaswag" / "hellaswag_val.jsonl")
    caches = (tmp_path / "cache0", tmp_path / "cache1")
    (rank0_out, _), _ = [
        (out, err)
        for _, out, err in two_nodes(
            text_shards, [node0, node1], "--max_steps", "2", "--hellaswag", caches=caches
        )
    ]
    assert "hellaswag acc_norm" in rank0_out
    assert "2 process(es)" in rank0_out and "x 2 process(es) x 1 micro-steps" in rank0_out
    # Only global rank 0 writes: node 1 has no log folder at all.
    assert sorted(os.listdir(node0 / "log")) == ["log.txt", "model_00001.pt"]
    assert not (node1 / "log").exists()

    # The same run in one process with 2 micro-steps, and on the nodes resumed to step 4.
    single = tmp_path / "single"
    os.makedirs(single)
    run_trainer("--data_dir", text_shards, "--log_dir", "log", *FLAGS, "--max_steps", 4, cwd=single)
    os.makedirs(node1 / "log")  # as a second machine would have it: a copy of rank 0's folder
    for name in os.listdir(node0 / "log"):
        (node1 / "log" / name).write_bytes((node0 / "log" / name).read_bytes())
    resumed = two_nodes(text_shards, [node0, node1], "--max_steps", "4", "--resume")
    assert "resumed from log/model_00001.pt at step 2" in resumed[0][1]
    for step in ("00001", "00003"):
        ours = torch.load(node0 / "log" / f"model_{step}.pt", weights_only=True)
        theirs = torch.load(single / "log" / f"model_{step}.pt", weights_only=True)
        assert ours["loader"] == theirs["loader"]
        for key in theirs["model"]:  # DDP and accumulation add the same gradients in another order
            torch.testing.assert_close(ours["model"][key], theirs["model"][key], atol=1e-5, rtol=0)
    assert sorted(os.listdir(node1 / "log")) == ["log.txt", "model_00001.pt"]  # nothing new
    log = (node0 / "log" / "log.txt").read_text().splitlines()
    assert log[0].startswith("-1 val ") and log[-1].startswith("3 val ")
    # the resume did not evaluate step -1 again
    assert sum(line.startswith("-1 val") for line in log) == 1


def test_a_user_error_on_one_rank_only_reaches_the_screen_once_naming_the_rank(
    tmp_path, text_shards
):
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    os.makedirs(node0)
    os.symlink(text_shards, node0 / "data")  # --data_dir data: there on node 0, missing on node 1
    results = two_nodes("data", [node0, node1], "--max_steps", "2", check=False)
    assert all(code != 0 for code, _, _ in results)
    screen = "".join(out + err for _, out, err in results)
    errors = [line for line in screen.splitlines() if line.startswith("error:")]
    assert errors == ["error: rank 1: no train shards (*_train_NNNNNN.npy or .bin) in data: "
                      "run `python fineweb.py` "
                      "(or fineweb.py --input your.txt --out data) first"], screen  # fmt: skip
    assert not (node0 / "log" / "log.txt").exists() or (node0 / "log" / "log.txt").read_text() == ""
