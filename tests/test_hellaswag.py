"""hellaswag.py: the data, rendering, batched scoring equal to one at a time, a model of known
answers, DDP splitting and the CLI; offline."""

import json
import os
import re

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from conftest import run_script, tiny_checkpoint
from machinery import hellaswag
from machinery.cli import UserError
from machinery.tokenizer import gpt2_tokenizer
from train_gpt2 import GPT, GPTConfig


# Six ordinary examples: the right ending differs from the wrong ones from its first word on, and
# the endings have different lengths. The labels cover 0..3 so that no fixed position can pass.
def example(ctx, label, *endings):
    return {"ctx": ctx, "endings": list(endings), "label": label}


# fmt: off
EXAMPLES = [
    example("The chef cracks two eggs into a bowl. She", 0,
            "whisks them with a fork until they are smooth.", "paints the fence.",
            "jumps over a very tall building while singing loudly.", "sleeps."),
    example("A boy kicks a ball across the park. His dog", 1, "reads a newspaper.",
            "runs after it and brings it back to him.", "files taxes online.",
            "orbits the moon at night."),
    example("The pianist sits down at the piano. He", 2, "eats the keys.", "drives a truck.",
            "places his hands on the keys and begins to play a slow song.", "melts."),
    example("Rain begins to fall on the city. People", 3, "swim in the clouds.", "sell the sun.",
            "become trees.", "open their umbrellas and hurry inside."),
    example("A woman holds a paintbrush near a canvas. She", 0,
            "dips it in blue paint and draws the sky.", "barks.", "flies to Mars in a shoe.",
            "counts the ocean."),
    example("Two men lift a heavy sofa. They", 1, "eat it for lunch.",
            "carry it carefully up the stairs into the new apartment.", "turn into birds.",
            "whisper."),
]
# One example where acc and acc_norm must disagree. The model is trained on its context followed by
# the long right ending once, and by "ran" (then more words) three times: after the context, "ran"
# gets probability 3/4 and the right ending's first word 1/4; the rest is memorised. So the one-word
# wrong ending "ran" has the lower summed loss (-ln 3/4 = 0.29 < -ln 1/4 = 1.39), and the 15-word
# right ending the lower mean loss (about 1.39 / 15 = 0.09 < 0.29).
LENGTH_EXAMPLE = example("Lisa looked at the old map and", 1, "ran",
    "followed the faded red line across the hills to the hidden valley by the river.",
    "ate glue.", "purple seven.")
# fmt: on
LENGTH_EXAMPLE_DECOY = LENGTH_EXAMPLE["ctx"] + " ran to the station to catch the morning train."
ALL_EXAMPLES = EXAMPLES + [LENGTH_EXAMPLE]
EXPECTED_COUNTS = dict(n=7, correct=6, correct_norm=7)  # acc misses LENGTH_EXAMPLE only


class WordTokenizer(dict):
    """A stand-in for GPT-2's BPE, of a few hundred words so that a model learns the examples in a
    second: each word with its leading space is one token, numbered as first seen (the dict)."""

    def encode_ordinary(self, text):
        return [self.setdefault(word, len(self)) for word in re.findall(r" ?[^ ]+", text)]


WORD_MODEL_CONFIG = GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=2, n_embd=64)


def write_jsonl(path, lines):
    """Lines are dicts (written as JSON) or raw strings (written as they are)."""
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def memorised():
    """A tiny GPT trained until it knows the right ending of every example by heart (see
    LENGTH_EXAMPLE), and its word tokenizer."""
    words = WordTokenizer()
    texts = [ex["ctx"] + " " + ex["endings"][ex["label"]] for ex in ALL_EXAMPLES]
    texts += [LENGTH_EXAMPLE_DECOY] * 3
    sequences = [torch.tensor(words.encode_ordinary(text)) for text in texts]
    inputs = pad_sequence([s[:-1] for s in sequences], batch_first=True)
    # the targets' padding, -100, is what cross_entropy ignores
    targets = pad_sequence([s[1:] for s in sequences], batch_first=True, padding_value=-100)
    torch.manual_seed(0)
    model = GPT(WORD_MODEL_CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(100):
        _, loss = model(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1  # memorised: what is left is the 3:1 choice after LENGTH_EXAMPLE's ctx
    return model.eval(), words


def test_load_examples_reads_fields_skips_blank_lines_limits_and_needs_an_example(tmp_path):
    path = write_jsonl(tmp_path / "val.jsonl", EXAMPLES[:3] + ["", "   "])
    assert hellaswag.load_examples(path) == EXAMPLES[:3]
    assert hellaswag.load_examples(path, limit=2) == EXAMPLES[:2]
    with pytest.raises(UserError, match="no examples"):
        hellaswag.load_examples(write_jsonl(tmp_path / "empty.jsonl", []))
    with pytest.raises(UserError, match="cannot read"):
        hellaswag.load_examples(str(tmp_path))  # a directory


BAD_LINES = {
    "not JSON": ('{"ctx": "a", "endings": ["a", "b", "c", "d"], "label": 0', "not valid JSON"),
    "missing ctx": ({"endings": ["a", "b", "c", "d"], "label": 0}, "'ctx'"),
    "empty ctx": ({"ctx": "", "endings": ["a", "b", "c", "d"], "label": 0}, "'ctx'"),
    "missing label": ({"ctx": "x", "endings": ["a", "b", "c", "d"]}, "'label'"),
    "label out of range": ({"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 4}, "'label'"),
    "label as text": ({"ctx": "x", "endings": ["a", "b", "c", "d"], "label": "1"}, "'label'"),
    "3 endings": ({"ctx": "x", "endings": ["a", "b", "c"], "label": 0}, "'endings'"),
    "ending not text": ({"ctx": "x", "endings": ["a", "b", "c", 4], "label": 0}, "'endings'"),
    "not an object": ("[1, 2, 3]", "JSON object"),
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_bad_line_is_a_user_error_naming_file_and_line(tmp_path, case):
    bad_line, expected = BAD_LINES[case]
    path = write_jsonl(tmp_path / "val.jsonl", [EXAMPLES[0], "", bad_line, EXAMPLES[1]])
    with pytest.raises(UserError, match=r"val\.jsonl, line 3: ") as error:
        hellaswag.load_examples(path)
    assert expected in str(error.value)


def test_the_data_path_and_the_cache_that_one_download_fills(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hellaswag.default_cache_dir() == str(tmp_path / "xdg" / "gpt2-repro" / "hellaswag")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home_cache = tmp_path / "home" / ".cache" / "gpt2-repro" / "hellaswag"
    assert hellaswag.default_cache_dir() == str(home_cache)
    # A path given must exist; else the file is downloaded into the cache, once.
    source = write_jsonl(tmp_path / "source.jsonl", EXAMPLES)
    assert hellaswag.hellaswag_path(source) == source
    with pytest.raises(UserError, match="is not a file: pass the path of hellaswag_val.jsonl"):
        hellaswag.hellaswag_path(str(tmp_path / "missing.jsonl"))
    cache_dir = str(tmp_path / "cache")
    assert hellaswag.hellaswag_path(cache_dir=cache_dir, download=False) is None
    assert not os.path.exists(cache_dir)
    # A file:// URL goes through the same urllib code as the real https one, without network.
    path = hellaswag.hellaswag_path(cache_dir=cache_dir, url="file://" + source)
    assert path == os.path.join(cache_dir, "hellaswag_val.jsonl")
    assert hellaswag.load_examples(path) == EXAMPLES
    assert os.listdir(cache_dir) == ["hellaswag_val.jsonl"]  # no temporary file left behind
    os.remove(source)  # the second call must use the cache, not the URL
    assert hellaswag.hellaswag_path(cache_dir=cache_dir, url="file://" + source) == path
    assert hellaswag.hellaswag_path(cache_dir=cache_dir, download=False) == path
    # A failed download (of the source, now gone) or an unwritable cache: a user error, no file.
    other_cache = tmp_path / "other_cache"
    with pytest.raises(UserError, match="could not download.*--data PATH"):
        hellaswag.hellaswag_path(cache_dir=str(other_cache), url="file://" + source)
    assert os.listdir(other_cache) == []
    write_jsonl(source, EXAMPLES)  # back: the download works, the write cannot
    under_a_file = str(tmp_path / "source.jsonl" / "cache")  # cannot be made
    with pytest.raises(UserError, match="cannot write to .*XDG_CACHE_HOME"):
        hellaswag.hellaswag_path(cache_dir=under_a_file, url="file://" + source)


def test_render_example_gives_the_context_and_the_endings_with_a_space_cut_to_fit():
    enc, example = gpt2_tokenizer(), EXAMPLES[2]
    full_context, full_endings = hellaswag.render_example(example, enc)
    assert full_context == enc.encode_ordinary(example["ctx"])
    assert [enc.decode(e) for e in full_endings] == [" " + e for e in example["endings"]]
    # Context + ending is the tokenization of the whole sentence: BPE keeps the space joining them.
    for ending, text in zip(full_endings, example["endings"]):
        assert full_context + ending == enc.encode_ordinary(example["ctx"] + " " + text)
    # With max_len, the context is cut so that the longest ending fits.
    longest = max(len(ending) for ending in full_endings)
    context, endings = hellaswag.render_example(example, enc, max_len=longest + 3)
    assert endings == full_endings  # endings are what is scored: they are kept whole
    assert context == full_context[-3:]  # the context loses tokens from its start
    context, endings = hellaswag.render_example(example, enc, max_len=4)  # < the longest ending
    assert endings == [ending[:3] for ending in full_endings] and context == full_context[-1:]


def test_packed_row_puts_each_ending_right_after_the_context_and_the_mask_keeps_them_apart():
    context, endings = [10, 11, 12], [[20, 21], [30], [40, 41, 42], [50, 51]]
    packed = hellaswag.pack_example(context, endings)
    # The row: the context, then each ending without its last token (that token predicts nothing).
    assert packed.tokens == [10, 11, 12, 20, 40, 41, 50]
    assert packed.positions == [0, 1, 2, 3, 3, 4, 3]  # each ending starts after the context
    assert packed.segments == [0, 0, 0, 1, 3, 3, 4]
    # Each ending token is a target once, predicted at the row index of the token before it in its
    # own sequence (context + ending): the context's last (index 2) for each ending's first token.
    assert packed.targets == [20, 21, 30, 40, 41, 42, 50, 51]
    assert packed.ending_of == [0, 0, 1, 2, 2, 2, 3, 3]
    assert packed.predict_at == [2, 3, 2, 2, 4, 5, 2, 6]
    # The attention mask lets an ending see the context and itself only.
    segments = torch.tensor([packed.segments + [-1]])  # one padding token at the end
    positions = torch.tensor([packed.positions + [0]])
    mask = hellaswag.attention_mask(segments, positions)[0, 0]
    # What each of the 7 tokens sees, all of it: the padding token (7) is in none of the lists.
    sees = [[s for s in range(mask.size(1)) if mask[q, s]] for q in range(7)]
    causal_context = [[0], [0, 1], [0, 1, 2]]
    # ending 0; ending 2, which sees nothing of ending 0; ending 3
    assert sees == causal_context + [[0, 1, 2, 3], [0, 1, 2, 4], [0, 1, 2, 4, 5], [0, 1, 2, 6]]


def alone(model, context, ending):
    """The summed loss of an ending's tokens, the model reading context + ending alone."""
    tokens = torch.tensor([context + ending])
    logits, _ = model(tokens)
    losses = torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:], reduction="none")
    return losses[len(context) - 1 :].sum()


def test_batched_scores_equal_each_ending_scored_alone():
    torch.manual_seed(0)
    model = GPT(WORD_MODEL_CONFIG).eval()  # random weights: every score is different
    words = WordTokenizer()
    long_endings = ["short.", "a bit longer than that.", "x", "the end."]
    long_context = example(" ".join(f"w{i}" for i in range(80)), 0, *long_endings)
    examples = ALL_EXAMPLES + [long_context]  # endings of 1 to 15 tokens; a context over 64
    block_size = WORD_MODEL_CONFIG.block_size
    rendered = [hellaswag.render_example(ex, words, block_size) for ex in examples]
    with torch.no_grad():
        reference_sums = torch.tensor([[alone(model, c, e) for e in ends] for c, ends in rendered])
    reference_counts = torch.tensor([[len(e) for e in endings] for _, endings in rendered])
    # Every ending token is scored: the context before it predicts the first one.
    words_per_ending = [[len(e.split()) for e in ex["endings"]] for ex in ALL_EXAMPLES]
    assert reference_counts[:7].tolist() == words_per_ending
    for batch_size in (1, 3, 100):
        sums, counts = hellaswag.score_examples(model, examples, words, "cpu", batch_size)
        assert torch.equal(counts, reference_counts)
        torch.testing.assert_close(sums, reference_sums, rtol=1e-5, atol=1e-5)


def test_acc_by_sum_acc_norm_by_mean_and_a_memorised_model_finds_the_right_endings(memorised):
    # Ending 0: one token of loss 3 (sum 3, mean 3); ending 1: five of loss 1 (sum 5, mean 1).
    sum_losses = torch.tensor([[3.0, 5.0, 9.0, 12.0], [4.0, 2.0, 6.0, 8.0]])
    n_tokens = torch.tensor([[1, 5, 3, 4], [2, 2, 2, 2]])
    pred, pred_norm = hellaswag.predictions(sum_losses, n_tokens)
    assert pred.tolist() == [0, 1] and pred_norm.tolist() == [1, 1]
    # The memorised model finds the right endings, compiled or not, and in bf16 too.
    model, words = memorised
    sum_losses, n_tokens = hellaswag.score_examples(model, ALL_EXAMPLES, words, "cpu", batch_size=4)
    pred, pred_norm = hellaswag.predictions(sum_losses, n_tokens)
    labels = [ex["label"] for ex in ALL_EXAMPLES]
    assert pred_norm.tolist() == labels
    # acc differs on LENGTH_EXAMPLE only: the one-word "ran" wins the sum and loses the mean.
    assert pred.tolist() == labels[:-1] + [0]
    bf16_sums, bf16_counts = hellaswag.score_examples(
        model, ALL_EXAMPLES, words, "cpu", batch_size=4, autocast_dtype=torch.bfloat16
    )
    assert torch.equal(bf16_counts, n_tokens)
    assert not torch.equal(bf16_sums, sum_losses)  # autocast did run in bf16
    torch.testing.assert_close(bf16_sums / n_tokens, sum_losses / n_tokens, atol=0.1, rtol=0.05)
    assert hellaswag.evaluate_hellaswag(model, ALL_EXAMPLES, words, "cpu", 2) == EXPECTED_COUNTS
    # The eager backend runs Dynamo's tracing (the part that sees the changing batch shapes) without
    # the C++ compile time of the default backend.
    compiled = torch.compile(model, backend="eager")
    assert hellaswag.evaluate_hellaswag(compiled, ALL_EXAMPLES, words, "cpu", 3) == EXPECTED_COUNTS


def ddp_worker(rank, world, init_file, model, words):
    """One rank of a gloo run on CPU: it evaluates its share and checks the totals it gets back (a
    failed assert here makes spawn raise in the test)."""
    torch.distributed.init_process_group(
        "gloo", init_method="file://" + init_file, rank=rank, world_size=world
    )
    try:
        counts = hellaswag.evaluate_hellaswag(model, ALL_EXAMPLES, words, "cpu", 2, rank, world)
        assert counts == EXPECTED_COUNTS  # the totals, each example counted once
    finally:
        torch.distributed.destroy_process_group()


def test_evaluate_splits_examples_across_ranks_and_reduces(tmp_path, memorised):
    model, words = memorised
    torch.multiprocessing.spawn(
        ddp_worker, args=(2, str(tmp_path / "init"), model, words), nprocs=2
    )


def test_cli_prints_the_summary_line_of_its_counts(tmp_path):
    # The CLI reads text with GPT-2's tokenizer: a model of GPT-2's vocabulary, random weights.
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=32)).eval()
    checkpoint = tiny_checkpoint(str(tmp_path / "model.pt"), model=model)
    data = write_jsonl(tmp_path / "val.jsonl", ALL_EXAMPLES)
    counts = hellaswag.evaluate_hellaswag(model, ALL_EXAMPLES, gpt2_tokenizer(), "cpu", 16)
    result = run_script("hellaswag.py", "--init", checkpoint, "--data", data, "--batch_size", "3",
                        "--device", "cpu")  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    acc, norm = counts["correct"], counts["correct_norm"]
    counted = f"7 examples, acc {acc}/7 = {acc / 7:.4f}, acc_norm {norm}/7 = {norm / 7:.4f}"
    speed = r", [0-9.]+ examples/s on cpu in float32 "
    protocol = "(completion style, 0-shot, acc = lowest summed loss, acc_norm = lowest mean loss)"
    pattern = re.escape(f"hellaswag {checkpoint}: {counted}") + speed + re.escape(protocol)
    assert re.fullmatch(pattern, summary), summary
