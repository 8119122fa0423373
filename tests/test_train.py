"""The training run: schedule, data loader striding over any number of ranks, exact resume,
learning, compile."""

import os
import re
import shutil

import numpy as np
import pytest
import torch

import train_gpt2
from conftest import TINY_MODEL, assert_bit_identical, run_trainer, write_bin_shard, write_hellaswag
from machinery import progress
from train_gpt2 import DataLoaderLite, get_lr

# --- the learning-rate schedule -------------------------------------------------------------------


def test_lr_schedule_warms_up_then_decays_to_min():
    kw = dict(max_lr=6e-4, min_lr=6e-5, warmup_steps=10, max_steps=100)
    lrs = [get_lr(step, **kw) for step in range(101)]
    assert lrs[0] > 0
    assert lrs[9] == pytest.approx(6e-4)  # the end of warmup reaches max_lr
    assert max(lrs) == pytest.approx(6e-4)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))  # warmup rises
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine only falls
    assert lrs[100] == pytest.approx(6e-5)
    assert get_lr(1000, **kw) == pytest.approx(6e-5)


# --- the data loader ------------------------------------------------------------------------------


def make_marked_shards(directory, lengths):
    """Train shards whose token at offset i of shard k is 10000 * k + i, so a window's first token
    says where it was read."""
    for k, length in enumerate(lengths):
        tokens = (10000 * k + np.arange(length)).astype(np.uint16)
        np.save(directory / f"marked_train_{k:06d}.npy", tokens)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_loader_striding_shard_switch_and_wraparound(tmp_path, world_size):
    B, T = 2, 8
    window = B * T * world_size
    # ends that fit, a shard shorter than a step (fineweb.py's last may be: skipped), ends that just
    # miss, exactly fit
    lengths = [5 * window + 7, window // 2, 3 * window, 4 * window + 1]
    make_marked_shards(tmp_path, lengths)
    loaders = [
        DataLoaderLite(str(tmp_path), B, T, rank, world_size, "train") for rank in range(world_size)
    ]
    # windows whose +1 target token still fits in the shard: (length - 1) // window of them
    windows_per_shard = [(length - 1) // window for length in lengths]
    assert loaders[0].steps_per_epoch() == sum(windows_per_shard)

    seen = set()
    for epoch in range(2):
        for shard, num_windows in enumerate(windows_per_shard):
            for w in range(num_windows):
                for rank, loader in enumerate(loaders):
                    assert loader.epoch == epoch  # every rank in the same epoch
                    x, y = loader.next_batch()
                    start = w * window + rank * B * T  # the striding: the window, the rank
                    expected = 10000 * shard + np.arange(start, start + B * T + 1)
                    assert torch.equal(x.flatten(), torch.from_numpy(expected[:-1]))
                    assert torch.equal(y.flatten(), torch.from_numpy(expected[1:]))
                    if epoch == 0:
                        assert (shard, start) not in seen  # no window twice in an epoch
                        seen.add((shard, start))
    assert all(loader.epoch == 2 and loader.sequence == 0 for loader in loaders)


def test_loader_state_round_trips_mid_shard(tmp_path):
    make_marked_shards(tmp_path, [1000, 1000])
    loader = DataLoaderLite(str(tmp_path), 4, 16, 1, 2, "train")
    assert isinstance(loader.shards[0], np.memmap)  # read from disk as needed, not loaded whole
    for _ in range(9):  # 9 windows of 128: into the second shard
        loader.next_batch()
    state = loader.state_dict()
    assert state["epoch"] == 0 and state["sequence"] == 9 * 8 > loader.used[0]  # in the 2nd shard
    resumed = DataLoaderLite(str(tmp_path), 4, 16, 1, 2, "train")
    resumed.load_state_dict(state)
    for _ in range(10):  # across the wrap-around too
        for a, b in zip(loader.next_batch(), resumed.next_batch()):
            assert torch.equal(a, b)
    assert resumed.state_dict() == loader.state_dict()


def rows_read(loader, steps):
    """The window each row of `steps` optimizer steps starts at, as (shard, token offset) read off a
    marked shard's first token, in the order a 1-process loader reads them."""
    rows = []
    for _ in range(steps * loader.micro_steps):
        x, y = loader.next_batch()
        assert torch.equal(x[:, 1:], y[:, :-1])
        rows += [divmod(int(token), 10000) for token in x[:, 0]]
    return rows


SHUFFLED_LENGTHS = [530, 1000, 777, 64 * 5 + 1]  # tails of 1 to 15 tokens, and one that fits


def shuffled_loader(directory, seed=0, B=2, T=16, step_tokens=128):
    return DataLoaderLite(str(directory), B, T, 0, 1, "train", step_tokens, shuffle=True, seed=seed)


def test_shuffled_order_reads_every_window_once_an_epoch_and_depends_on_seed_and_epoch(tmp_path):
    make_marked_shards(tmp_path, SHUFFLED_LENGTHS)
    loader = shuffled_loader(tmp_path)
    steps = loader.steps_per_epoch()
    epoch0 = rows_read(loader, steps)
    windows = {(shard, k * 16) for shard, length in enumerate(SHUFFLED_LENGTHS)
               for k in range((length - 1) // 16)}  # fmt: skip
    tails, left_over = progress.unread_per_epoch(loader)
    assert tails == sum((length - 1) % 16 for length in SHUFFLED_LENGTHS)
    assert len(epoch0) == len(set(epoch0)) == len(windows) - left_over
    assert 0 <= left_over < 8  # fewer than one step
    assert set(epoch0) <= windows and {shard for shard, _ in epoch0} == set(range(4))
    assert (loader.epoch, loader.sequence) == (1, 0)  # the epoch ended with its last whole step
    epoch1 = rows_read(loader, steps)
    assert epoch0 != epoch1  # each epoch its own order
    assert rows_read(shuffled_loader(tmp_path), 2 * steps) == epoch0 + epoch1  # the same seed
    assert rows_read(shuffled_loader(tmp_path, seed=1), steps) != epoch0  # another seed, order
    assert epoch0 != sorted(epoch0)  # shuffled indeed
    # --batch_size does not change it: 8 sequences per step, read as 4 micro-steps of 2 or one of 8
    assert rows_read(shuffled_loader(tmp_path, B=8), steps) == epoch0


# mid-epoch, at its last step, at its end, past it
@pytest.mark.parametrize("steps_before", [5, 19, 20, 21])
def test_shuffled_loader_resumes_exactly(tmp_path, steps_before):
    make_marked_shards(tmp_path, SHUFFLED_LENGTHS)
    straight = rows_read(shuffled_loader(tmp_path), 50)
    assert shuffled_loader(tmp_path).steps_per_epoch() == 20
    loader = shuffled_loader(tmp_path)
    rows_read(loader, steps_before)
    resumed = shuffled_loader(tmp_path, B=4)  # and on another --batch_size
    resumed.load_state_dict(loader.state_dict())
    assert rows_read(resumed, 50 - steps_before) == straight[steps_before * 8 :]


def test_a_resume_in_another_order_is_refused_and_one_from_before_the_shuffle_reads_on(tmp_path):
    make_marked_shards(tmp_path, SHUFFLED_LENGTHS)
    state = shuffled_loader(tmp_path, seed=3).state_dict()
    in_order = DataLoaderLite(str(tmp_path), 2, 16, 0, 1, "train", 128)
    for other in (shuffled_loader(tmp_path, seed=4), in_order):
        with pytest.raises(train_gpt2.UserError, match="another order: resume with --shuffle --se"):
            other.load_state_dict(state)
    # a checkpoint from before the shuffle saved the next step as a shard and a token position
    old_state = dict(shard=1, position=2 * 128, epoch=0, step_tokens=128, data=in_order.data)
    in_order.load_state_dict(old_state)
    assert in_order.next_batch()[0][0, 0].item() == 10000 + 2 * 128
    with pytest.raises(train_gpt2.UserError, match="resume with --no-shuffle"):
        shuffled_loader(tmp_path).load_state_dict(old_state)


def test_loader_reads_llm_c_bin_shards(tmp_path):
    write_bin_shard(tmp_path / "fineweb_val_000000.bin", np.arange(300))
    x, y = DataLoaderLite(str(tmp_path), 2, 10, 0, 1, "val").next_batch()
    assert torch.equal(x.flatten(), torch.arange(20))
    assert torch.equal(y.flatten(), torch.arange(1, 21))


# --- the training run -----------------------------------------------------------------------------


def test_resume_is_bit_identical(tmp_path, text_shards):
    """8 steps == 4, --resume, 4 more, bit for bit, the resumed half crossing a shuffled epoch's
    end (3 steps an epoch)."""
    data = tmp_path / "data"
    os.makedirs(data)
    shutil.copy(os.path.join(text_shards, "text_val_000000.npy"), data)
    train = np.load(os.path.join(text_shards, "text_train_000001.npy"))[:900]
    np.save(data / "text_train_000001.npy", train)
    args = [*TINY_MODEL, "--data_dir", data, *(
        "--batch_size 4 --seq_len 32 --total_batch_size 256 --max_steps 8 --warmup_steps 2 "
        "--eval_every 3 --val_tokens 512 --ckpt_every 4 --no-hellaswag --no-sample_every_eval"
    ).split()]  # fmt: skip
    straight_run = run_trainer(*args, "--log_dir", tmp_path / "straight")
    assert "epoch       3 steps, shuffled by --seed 1337" in straight_run.stdout
    assert "epoch 0 done at step 2: 768 tokens seen" in straight_run.stdout
    os.makedirs(tmp_path / "resumed")  # as if stopped after 4 of 8 steps
    shutil.copy(tmp_path / "straight" / "model_00003.pt", tmp_path / "resumed")
    result = run_trainer(*args, "--log_dir", tmp_path / "resumed", "--resume")
    assert "resumed from" in result.stdout and "at step 4" in result.stdout
    # the first half is not trained again
    assert "step 3/7 |" not in result.stdout and "step 4/7 |" in result.stdout
    checkpoints = [tmp_path / run / "model_00007.pt" for run in ("straight", "resumed")]
    straight = assert_bit_identical(*checkpoints)  # and returns the first, loaded
    assert straight["loader"]["epoch"] == 2
    straight_losses = [
        line for line in open(tmp_path / "straight" / "log.txt") if int(line.split()[0]) >= 4
    ]
    assert open(tmp_path / "resumed" / "log.txt").readlines() == straight_losses
    assert "note:" not in result.stdout
    # An earlier checkpoint into a new folder, with another --val_tokens: the run goes on, says
    # where its checkpoints go, and that its val losses measure other tokens.
    earlier = tmp_path / "straight" / "model_00003.pt"
    changed = tmp_path / "changed"
    result = run_trainer(*args, "--log_dir", changed, "--resume", earlier, "--val_tokens", 1024)
    assert f"resumed from {earlier} at step 4; new checkpoints go to {changed}" in result.stdout
    assert "note: --val_tokens is 1024, the run before was 512" in result.stdout
    assert os.path.exists(changed / "model_00007.pt")


def test_a_compiled_run_learns_real_text_with_eval_hellaswag_and_sampling(tmp_path, text_shards):
    """build-nanogpt ships with compile off because it broke its in-loop evals: here they all run
    compiled, and the model learns."""
    result = run_trainer(*TINY_MODEL, "--data_dir", text_shards, "--log_dir", tmp_path / "log",
                         "--hellaswag_data", write_hellaswag(tmp_path / "h.jsonl"), *("--compile "
                         "--batch_size 8 --seq_len 64 --total_batch_size 512 --max_steps 24 "
                         "--warmup_steps 4 --max_lr 3e-3 --eval_every 12 "
                         "--val_tokens 1024").split())  # fmt: skip
    assert "compile on" in result.stdout and "tok/s" in result.stdout
    evals = re.findall(r"^(step +\d+/\d+) \| val loss", result.stdout, re.M)
    assert evals == ["step 11/23", "step 23/23"]
    assert result.stdout.count('sample 0: """GPT-2 (124M') == 3  # the val split's start, each eval
    log = [line.split() for line in open(tmp_path / "log" / "log.txt")]
    train = [float(v) for _, kind, v in log if kind == "train"]
    val = [float(v) for _, kind, v in log if kind == "val"]
    assert train[0] > 10.5  # ln(50257) = 10.8: the start is uniform guessing
    assert sum(train[-5:]) / 5 < train[0] - 3.0
    assert len(val) == 3 and val[0] > 10.5 and val[2] < val[1] < 9.0  # val[0]: the start
    hella = [(step, float(acc)) for step, kind, acc in log if kind == "hella"]
    assert [step for step, _ in hella] == ["-1", "11", "23"]
    assert all(0 <= acc <= 1 for _, acc in hella)
    assert os.path.exists(tmp_path / "log" / "model_00023.pt")


def test_grad_clip_0_is_no_clipping(random_shards):
    """--grad_clip 0 means no clipping, as in nanoGPT: the steps equal AdamW's on the raw gradients
    bit for bit, and the model learns (a bound of 0 would zero every gradient instead)."""
    from train_gpt2 import GPT, GPTConfig, configure_optimizer, train_step

    config = GPTConfig(block_size=32, vocab_size=50304, n_layer=1, n_head=2, n_embd=32)
    models, losses = [], []
    for clip in (0, None):  # None: the same step by hand, without clip_grad_norm_
        torch.manual_seed(0)
        model = GPT(config)
        optimizer = configure_optimizer(model, 0.1, 1e-2, (0.9, 0.95), 1e-8, "cpu")
        loader = DataLoaderLite(random_shards, 4, 32, 0, 1, "train")
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        for _ in range(3):
            if clip is None:
                optimizer.zero_grad(set_to_none=True)
                x, y = loader.next_batch()
                loss = model(x, y)[1]
                loss.backward()
                optimizer.step()
            else:
                loss = train_step(model, optimizer, scaler, loader, 1, 1e-2, clip,
                                  torch.autocast("cpu", enabled=False))[0]  # fmt: skip
            losses.append(loss.item())
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
    assert losses[:3] == losses[3:] and losses[2] < losses[0]


# --- the loader's stream does not depend on the number of processes -------------------------------


def steps_read(data_dir, world_size, micro_steps, steps, state=None, shuffle=False):
    """Each step's first tokens in block order (micro-step m of rank r: block m * world_size + r),
    read by world_size loaders; and the state after them."""
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
    make_marked_shards(tmp_path, lengths)
    steps = 2 * sum((length - 1) // window for length in lengths) + 3  # two epochs and more
    one, _ = steps_read(str(tmp_path), world_size=1, micro_steps=4, steps=steps, shuffle=shuffle)
    for world_size, micro_steps in [(2, 2), (4, 1)]:
        assert steps_read(str(tmp_path), world_size, micro_steps, steps, shuffle=shuffle)[0] == one
    # a state saved by one process is resumed by four, on the same stream
    _, state = steps_read(str(tmp_path), world_size=1, micro_steps=4, steps=3, shuffle=shuffle)
    assert (state["epoch"], state["sequence"]) == (0, 3 * 8)  # in order: the end of shard 0
    assert steps_read(str(tmp_path), 4, 1, steps - 3, state, shuffle)[0] == one[3:]
