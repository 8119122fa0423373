"""benchmarks/speed_ladder.py: every rung runs the trainer's real step, and no rung changes the
numbers."""

import math
import os
import sys

from conftest import REPO

# benchmarks/ is no package: on sys.path, last, so as not to hide the repository's hellaswag.py
sys.path.append(os.path.join(REPO, "benchmarks"))
import speed_ladder  # noqa: E402


def test_the_cpu_rungs_run_and_keep_the_numbers(capsys):
    # The smallest shape that compiles, trained (lr 1e-2, 6 steps on real text) until the loss has
    # left ln(50257), its random-init value: equal losses then mean equal training, not equal noise.
    # Rung 6 holds rungs 4's and 5's settings (compile, flash attention): one compile checks all.
    argv = "--device cpu --n_layer 1 --n_head 2 --n_embd 32 --batch_size 2 --seq_len 32 --steps 3"
    rows = speed_ladder.main([*argv.split(), "--warmup", "3", "--lr", "1e-2", "--rungs", "1,2,3,6"])
    by_rung = {row["rung"]: row for row in rows}

    assert by_rung[2]["skipped"] == "CUDA only"  # TF32
    assert {by_rung[n]["skipped"] for n in (4, 5, 7)} == {"not in --rungs"}
    timed = [row for row in rows if "skipped" not in row]
    assert [row["rung"] for row in timed] == [1, 3, 6]
    first = by_rung[1]
    assert first["loss"] < math.log(50257) - 0.5
    for row in timed:
        assert row["ms"] > 0 and row["tokens_per_s"] > 0
        assert abs(row["loss"] - first["loss"]) < 0.02, row  # rungs 3 and 6 run in bf16
    printed = capsys.readouterr().out
    assert "6. + vocab 50304" in printed and "4. + torch.compile     skipped: not in" in printed


def test_padding_the_vocabulary_keeps_the_model():
    base = speed_ladder.GPT(speed_ladder.GPTConfig(32, 50257, 1, 2, 32))
    padded = speed_ladder.padded_copy(base, 50304)
    wte = padded.transformer.wte.weight
    assert wte.shape == (50304, 32) and not wte[50257:].any()  # the extra rows start at zero
    x = speed_ladder.torch.randint(0, 50257, (2, 16))
    logits, loss = base(x, x)
    padded_logits, padded_loss = padded(x, x)
    assert padded_logits.shape == logits.shape  # the padded rows are never a target or a prediction
    assert speed_ladder.torch.allclose(padded_loss, loss, atol=1e-6)


def test_the_top_rung_is_what_the_trainer_does_by_default():
    top = speed_ladder.cumulative_settings()[-1]
    trainer = speed_ladder.TRAINER_DEFAULTS
    assert top.vocab_size == trainer.vocab_size
    assert top.tf32 and top.compile and top.flash and top.fused_adamw
    assert top.dtype == speed_ladder.torch.bfloat16
