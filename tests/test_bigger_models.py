"""Every GPT-2 size (--model), --activation_checkpointing, --shard optimizer/full on 2 gloo ranks
equal to one process with resumable one-file checkpoints, and the memory estimate."""

import argparse
import contextlib
import copy
import os
import re
import shutil
import sys
from itertools import product

import pytest
import torch

import export_hf
import train_gpt2
from conftest import REPO, TINY_RUN, TINY_SHAPE, run_trainer, write_hellaswag, write_random_shards
from machinery import devices, flags, progress, torchrun
from machinery.cli import UserError

# Each size's parameter count by OpenAI (Hugging Face's GPT2LMHeadModel, 50257 tokens: the trainer
# pads the vocabulary to 50304 rows, 47 more rows of n_embd each), and its recipe in the GPT-3
# paper, Table 2.1: learning rate, tokens per step, warmup steps, steps.
SIZES = {
    "gpt2": (124_439_808, 6e-4, 2**19, 715, 19073),
    "gpt2-medium": (354_823_168, 3e-4, 2**19, 715, 19073),
    "gpt2-large": (774_030_080, 2.5e-4, 2**19, 715, 19073),
    "gpt2-xl": (1_557_611_200, 2e-4, 2**20, 357, 9536),
}


def logged(log_dir):
    """{(step, kind): value} of every line of a run's log.txt."""
    with open(os.path.join(log_dir, "log.txt")) as f:
        lines = [line.split() for line in f]
    return {(int(step), kind): float(value) for step, kind, value in lines}


# --- --model --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", flags.GPT2_SIZES)
def test_each_model_gives_its_shape_parameter_count_and_recipe_in_the_start_up_block(
    model, random_shards
):
    args = flags.parse(["--model", model, "--batch_size", "1", "--seq_len", "64",
                        "--data_dir", random_shards])  # fmt: skip
    parameters, *recipe = SIZES[model]
    lr, batch, warmup, steps = recipe
    assert [args.max_lr, args.total_batch_size, args.warmup_steps, args.max_steps] == recipe
    assert args.min_lr == pytest.approx(0.1 * lr)
    with torch.device("meta"):  # the shape without the memory: gpt2-xl is 6 GB in fp32
        gpt = train_gpt2.GPT(train_gpt2.model_config(args))
    expected = parameters + (50304 - 50257) * gpt.config.n_embd
    loaders = [train_gpt2.DataLoaderLite(args.data_dir, 1, 64, 0, 1, split, 64)
               for split in ("train", "val")]  # fmt: skip
    block = progress.start_block(args, 1, torch.device("cpu"), False, torch.float32, "test", gpt,
                                 "~", (0, steps - 1, 1), (*loaders, 1))  # fmt: skip
    shape = flags.MODELS[model]
    layers = f"{shape['n_layer']} layers, {shape['n_head']} heads, {shape['n_embd']} channels"
    assert f"model       {expected:,} parameters: {layers}" in block
    recipe = re.search(r"^recipe      .*$", block, re.M).group(0)
    assert recipe.startswith(f"recipe      --model {model}: --n_layer {shape['n_layer']} ")
    assert f"--max_lr {lr:g}, --total_batch_size {batch:,} (GPT-3 paper, Table 2.1" in recipe
    assert f"--warmup_steps {warmup} (375M tokens" in recipe
    assert f"--max_steps {steps:,} (10B tokens" in recipe
    assert ("the nearest row to 1558M" in recipe) == (model == "gpt2-xl")


def test_a_flag_given_overrides_the_model_and_the_start_up_block_says_so():
    args = flags.parse(["--model", "gpt2-large", "--max_lr", "1e-4", "--n_layer", "2"])
    assert (args.max_lr, args.min_lr, args.total_batch_size) == (1e-4, pytest.approx(1e-5), 2**19)
    config = train_gpt2.model_config(args)
    assert (config.n_layer, config.n_embd) == (2, 1280)
    line = progress.recipe_line(args)
    assert "--n_head 20 --n_embd 1280 (GPT-2's shape)" in line and "--n_layer" not in line
    assert line.rstrip().endswith("as given: --max_lr")
    # every flag of the recipe and of the shape given: nothing to say, as before --model existed
    given = flags.parse("--n_layer 2 --n_head 2 --n_embd 8 --max_lr 1e-3 --total_batch_size 64 "
                        "--warmup_steps 1 --max_steps 2".split())  # fmt: skip
    assert progress.recipe_line(given) == ""


def test_one_cpu_step_of_a_gpt2_medium_layer(random_shards):
    # The trainer's own step, on one layer of gpt2-medium's width and heads as --model builds it
    # (its parameters are counted above): 24 layers would spend 20 s on the same code.
    args = flags.parse(["--model", "gpt2-medium", "--n_layer", "1", "--data_dir", random_shards])
    model = train_gpt2.GPT(train_gpt2.model_config(args))
    assert (model.config.n_embd, model.config.n_head, model.config.block_size) == (1024, 16, 1024)
    betas = (args.beta1, args.beta2)
    optimizer = train_gpt2.configure_optimizer(model, args.weight_decay, args.max_lr, betas,
                                               args.eps, "cpu")  # fmt: skip
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loader = train_gpt2.DataLoaderLite(random_shards, 1, 64, 0, 1, "train")
    before = model.transformer.h[0].attn.c_attn.weight.clone()
    loss, norm = train_gpt2.train_step(model, optimizer, scaler, loader, 1, args.max_lr,
                                       args.grad_clip, contextlib.nullcontext())  # fmt: skip
    assert 10 < loss.item() < 12 and torch.isfinite(norm)  # about ln(50257) = 10.8 at the start
    assert not torch.equal(before, model.transformer.h[0].attn.c_attn.weight)


# --- --activation_checkpointing -------------------------------------------------------------------


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = train_gpt2.GPT(train_gpt2.GPTConfig(**TINY_SHAPE))
    recomputed = copy.deepcopy(plain)
    recomputed.activation_checkpointing = True
    x, y = torch.randint(0, 50257, (2, 32)), torch.randint(0, 50257, (2, 32))
    losses = [model(x, y)[1] for model in (plain, recomputed)]
    for loss in losses:
        loss.backward()
    assert losses[0].item() == losses[1].item()
    for a, b in zip(plain.parameters(), recomputed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=0)
    with torch.no_grad():  # evaluation and sampling keep no activations: nothing to recompute
        assert torch.equal(plain(x)[0], recomputed(x)[0])


def test_activation_checkpointing_trains_the_same_losses_and_a_resume_keeps_the_model(tmp_path):
    # A tiny shape under gpt2-medium's recipe: resumed under the default --model gpt2, its
    # learning rate would double without a word.
    data, log = write_random_shards(tmp_path / "data"), tmp_path / "plain"
    run = [*TINY_RUN, "--data_dir", data, "--total_batch_size", "256", "--max_steps", "4",
           "--eval_every", "100", "--device", "cpu", "--no-compile"]  # fmt: skip
    medium = [*run, "--model", "gpt2-medium"]
    for name, recompute in [("plain", []), ("recomputed", ["--activation_checkpointing"])]:
        train_gpt2.main([*medium, "--log_dir", str(tmp_path / name), *recompute])
    plain, recomputed = logged(log), logged(tmp_path / "recomputed")
    assert [step for step, kind in plain if kind == "train"] == [0, 1, 2, 3]
    assert recomputed == pytest.approx(plain, abs=1e-6)  # and the val losses
    before = sorted(os.listdir(log))
    with pytest.raises(UserError, match="was trained with --model gpt2-medium, this run has "
                       "--model gpt2: resume with --model gpt2-medium"):  # fmt: skip
        train_gpt2.main([*run, "--max_steps", "6", "--log_dir", str(log), "--resume"])
    assert sorted(os.listdir(log)) == before
    train_gpt2.main([*medium, "--max_steps", "6", "--log_dir", str(log), "--resume"])
    assert "model_00005.pt" in os.listdir(log)


# --- --shard --------------------------------------------------------------------------------------


def test_shard_full_refuses_fp16():
    # fp16's loss scaler would judge an overflow by this rank's shard of the gradients alone
    model = train_gpt2.GPT(train_gpt2.GPTConfig(**TINY_SHAPE))
    with pytest.raises(UserError, match="--shard full trains in bf16 or fp32, not fp16"):
        torchrun.fully_shard_model(model, torch.float16)


def test_sharded_runs_log_one_process_numbers_and_their_checkpoints_resume_anywhere(
    tmp_path, random_shards, capsys
):
    """2 sharded gloo ranks == one process of 2 micro-steps: losses, HellaSwag (7: shares 4 and 3),
    samples, one plain-AdamW checkpoint; resumed on any --shard and world size as unbroken."""
    run = [*TINY_RUN, "--data_dir", random_shards, "--total_batch_size", "256", "--ckpt_every", "3",
           "--hellaswag", "--hellaswag_data", write_hellaswag(tmp_path / "hellaswag.jsonl", n=7),
           "--sample_every_eval"]  # fmt: skip
    train_gpt2.main([*run, "--log_dir", str(tmp_path / "one")])
    samples = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sample")]
    reference = logged(tmp_path / "one")
    assert sorted(reference) == sorted([*product(range(6), ["train"]),
                                        *product([-1, 2, 5], ["val", "hella"])])  # fmt: skip
    plain = torch.load(tmp_path / "one" / "model_00005.pt", weights_only=True)
    for shard, said in [("optimizer", "AdamW's moments"),
                        ("full", "weights, gradients and AdamW's moments")]:  # fmt: skip
        sharded = run_trainer(*run, "--log_dir", tmp_path / shard, "--shard", shard, nproc=2,
                              script=rank_1_short_of_memory(tmp_path))  # fmt: skip
        assert f"({said} over 2 ranks)" in sharded.stdout
        assert logged(tmp_path / shard) == pytest.approx(reference, abs=1e-5)
        printed = sharded.stdout.splitlines()
        assert [line for line in printed if line.startswith("sample")] == samples
        # One file in today's layout, written by rank 0: a plain AdamW's state, every entry of it.
        ours = torch.load(tmp_path / shard / "model_00005.pt", weights_only=True)
        assert ours["optimizer"]["param_groups"] == plain["optimizer"]["param_groups"]
        assert_close(ours["optimizer"]["state"], plain["optimizer"]["state"])  # keys too
        assert_close(ours["model"], plain["model"])

    # Stopped after step 2, full's goes on as the unbroken run on one plain process, and the plain
    # process's on 2 fully sharded ranks (the sharded files hold a plain AdamW's entries, as
    # checked above): each ends where the unbroken run ends, weights and data position.
    for name, source, shard, nproc in [("full_to_one", "full", "none", 1),
                                       ("one_to_full", "one", "full", 2)]:  # fmt: skip
        os.makedirs(tmp_path / name)
        shutil.copy(tmp_path / source / "model_00002.pt", tmp_path / name)
        resumed = run_trainer(*run, "--log_dir", tmp_path / name, "--resume", "--shard", shard,
                              "--no-hellaswag", "--no-sample_every_eval", nproc=nproc)  # fmt: skip
        assert "resumed from" in resumed.stdout
        losses = {key: value for key, value in logged(tmp_path / name).items() if key[0] > 2}
        assert losses == pytest.approx({key: reference[key] for key in losses}, abs=1e-5)
        assert sorted(losses) == [(3, "train"), (4, "train"), (5, "train"), (5, "val")]
        end = torch.load(tmp_path / name / "model_00005.pt", weights_only=True)
        assert_close(end["model"], plain["model"])
        assert end["loader"] == plain["loader"]

    # sample.py and export_hf.py read it as any other checkpoint
    model = train_gpt2.load_model(str(tmp_path / "full" / "model_00005.pt"))
    fp32 = torch.autocast("cpu", enabled=False)
    texts = train_gpt2.sample_texts(model, train_gpt2.gpt2_tokenizer(), "Hello", num_samples=1,
                                    max_new_tokens=4, autocast=fp32)  # fmt: skip
    assert texts[0].startswith("Hello")
    export_hf.export_hf(model, str(tmp_path / "hf"))
    assert sorted(os.listdir(tmp_path / "hf")) == sorted(export_hf.EXPORT_FILES)


def rank_1_short_of_memory(folder):
    """A script that runs train_gpt2.py with rank 1 seeing memory for one evaluation row only: the
    ranks must agree on the rows per forward pass, or fully sharded ones wait for each other."""
    path = folder / "rank_1_short_of_memory.py"
    path.write_text(
        f"import os, runpy, sys\nsys.path.insert(0, {REPO!r})\nfrom machinery import devices\n"
        "rows = devices.evaluation_rows\nif os.environ['RANK'] == '1':  # as if at --batch_size 1\n"
        "    devices.evaluation_rows = lambda model, B, *more: rows(model, 1, *more)\n"
        f"runpy.run_path({os.path.join(REPO, 'train_gpt2.py')!r}, run_name='__main__')\n"
    )
    return str(path)


def assert_close(ours, theirs):
    """Equal up to float noise: two state dicts' tensors, and their keys (nested ones too)."""
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


# --- the memory estimate --------------------------------------------------------------------------


def estimate_args(**flags_given):
    args = flags.parse(["--model", "gpt2-xl"])
    return argparse.Namespace(**{**vars(args), **flags_given})


def test_the_estimate_counts_sharding_and_recomputation():
    with torch.device("meta"):
        model = train_gpt2.GPT(train_gpt2.model_config(estimate_args()))
    config, params = model.config, sum(p.numel() for p in model.parameters())
    ddp = devices.training_bytes(config, params, 4, 1024)
    sharded = devices.training_bytes(config, params, 4, 1024, shard="optimizer", ranks=8)
    full = devices.training_bytes(config, params, 4, 1024, shard="full", ranks=8)
    recomputed = devices.training_bytes(config, params, 4, 1024, recompute=True)
    assert ddp - sharded == 8 * params - 8 * params // 8  # 7/8 of AdamW's moments are elsewhere
    # 1/8 of all 16 bytes, and the whole weights and gradients of the root and 2 of 48 blocks
    block = 12 * config.n_embd**2 + 13 * config.n_embd
    assert ddp - full == 16 * params - 16 * params // 8 - 8 * (params - 46 * block)
    per_token = (16 * 48 - (48 + 16)) * config.n_embd * 4  # kept: block inputs + one block
    assert ddp - recomputed == 4 * 1024 * per_token


def test_a_run_that_cannot_fit_even_at_batch_size_1_names_checkpointing_and_sharding(monkeypatch):
    args = estimate_args(batch_size=8, seq_len=1024, total_batch_size=2**20)
    with torch.device("meta"):
        model = train_gpt2.GPT(train_gpt2.model_config(args))
    monkeypatch.setattr(devices, "available_bytes", lambda device: 24 * 2**30)  # a 24 GB GPU
    with pytest.raises(UserError) as error:
        devices.check_training_fits(model, args, 1, torch.device("cuda"), compiled=False)
    message = str(error.value)
    assert "\n" not in message
    assert "even --batch_size 1 does not fit; --activation_checkpointing would need" in message
    fits = r" fits ~[\d.]+ GiB per process at --batch_size [1-8]"
    assert re.search(rf"; --shard optimizer on 8 GPUs{fits}; --shard full on 8 GPUs{fits}; "
                     rf"--shard full on 8 GPUs with --activation_checkpointing{fits}; else a "
                     r"smaller model", message), message  # fmt: skip
    # sharded over the group's 8 ranks already: the start-up block's line says so
    line = devices.check_training_fits(model, estimate_args(batch_size=1, shard="optimizer"), 8,
                                       torch.device("cuda"), compiled=False)  # fmt: skip
    assert "(AdamW's moments over 8 ranks), 24.0 GiB available on cuda" in line
    # fully sharded and recomputing already, on 4 GB GPUs: nothing left to name but a smaller model
    monkeypatch.setattr(devices, "available_bytes", lambda device: 4 * 2**30)
    args = estimate_args(batch_size=4, seq_len=1024, shard="full", activation_checkpointing=True)
    with pytest.raises(UserError, match="even --batch_size 1 does not fit; else a smaller model"):
        devices.check_training_fits(model, args, 8, torch.device("cuda"), compiled=False)


def test_the_table_in_the_docs_is_the_estimates_own(capsys, monkeypatch):
    # appended: benchmarks/hellaswag.py must not hide the repository's hellaswag.py
    monkeypatch.setattr(sys, "path", [*sys.path, os.path.join(REPO, "benchmarks")])
    monkeypatch.setattr(sys, "argv", ["memory_table.py"])
    import memory_table

    memory_table.main()
    rows = capsys.readouterr().out.splitlines()
    with open(os.path.join(REPO, "docs", "bigger_models.md")) as f:
        docs = f.read().splitlines()
    assert len(rows) == 2 + 4 * 6 and all(row in docs for row in rows)  # 4 sizes x 6 settings
