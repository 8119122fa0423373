"""HellaSwag: the common-sense sentence-completion benchmark people use to judge a GPT-2 124M run.

Each example is a context and 4 possible endings, one of them right. We score the completion style,
0-shot (as build-nanogpt and the GPT-3 paper do): the context's tokens, then an ending's tokens with
a leading space, and the model's cross-entropy on the ending's tokens only. Two answers are counted:
  acc       the ending with the lowest summed loss (favours short endings),
  acc_norm  the ending with the lowest mean loss per token (the headline number).
OpenAI's GPT-2 on the 10,042 validation examples: 124M acc 0.2859 / acc_norm 0.2955,
1558M (gpt2-xl) acc 0.3842 / acc_norm 0.4893. Random guessing gets 0.25.
The model comes in as an argument (train_gpt2.py calls evaluator(), hellaswag.py
evaluate_hellaswag()): this module imports nothing of the model's file."""

import contextlib
import json
import os
import urllib.request
from collections import namedtuple
from http.client import HTTPException
from itertools import islice

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from machinery import torchrun
from machinery.cli import UserError
from machinery.files import atomic_write
from machinery.tokenizer import cache_path, gpt2_tokenizer

# -----------------------------------------------------------------------------
# The data: hellaswag_val.jsonl from the authors' repository, one JSON object per line. We use three
# fields: "ctx" (the context), "endings" (4 strings) and "label" (the index of the right ending).
# It is downloaded once into a cache directory; offline, pass a copy with --data.

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_FILE = "hellaswag_val.jsonl"


def default_cache_dir():
    return cache_path("hellaswag")


def hellaswag_path(data=None, cache_dir=None, download=True, url=HELLASWAG_URL):
    """Where hellaswag_val.jsonl is: `data` if given (it must exist), else the copy in cache_dir
    (default_cache_dir()), downloaded from `url` if missing, or None with download=False."""
    if data is not None:
        if not os.path.isfile(data):  # missing, a folder, or '' (no path at all)
            raise UserError(
                f"{data!r} is not a file: pass the path of {HELLASWAG_FILE} (from {HELLASWAG_URL})"
            )
        return data
    path = os.path.join(cache_dir or default_cache_dir(), HELLASWAG_FILE)
    if os.path.isfile(path):
        return path
    if not download:
        return None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot write to {os.path.dirname(path)} ({e}): set XDG_CACHE_HOME "
            f"to a writable directory, or pass --data PATH"
        ) from None
    with atomic_write(path) as f:  # an interrupted download leaves no torn file to trust
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                size = response.headers.get("Content-Length")  # bytes to come, when the server says
                with tqdm(total=int(size) if size else None, unit="B", unit_scale=True,
                          desc=f"downloading {HELLASWAG_FILE}") as bar:  # fmt: skip
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
        except (OSError, HTTPException) as e:  # no network, timeout, HTTP error, connection cut
            raise UserError(
                f"could not download {url} ({e}); on a machine with network, "
                f"download that file and pass --data PATH (or put it at {path})"
            ) from None
    return path


def load_examples(path, limit=None):
    """The first `limit` examples (default: all) of a HellaSwag jsonl file, each line checked."""
    try:
        with open(path, encoding="utf-8") as f:
            # blank lines (a trailing newline or two) are not examples
            lines = ((f"{path}, line {n}", line) for n, line in enumerate(f, 1) if line.strip())
            examples = [parse_example(line, where) for where, line in islice(lines, limit)]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}): pass the path of {HELLASWAG_FILE}") from None
    if not examples:
        raise UserError(f"{path} holds no examples: pass the path of {HELLASWAG_FILE}")
    return examples


def parse_example(line, where):
    """One line of the jsonl file as an example dict; `where` (file, line) goes into any error."""
    try:
        example = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg}); is this {HELLASWAG_FILE}?") from None
    get = example.get if isinstance(example, dict) else lambda name: None
    ctx, endings, label = get("ctx"), get("endings"), get("label")
    # An empty context has no last token to predict an ending's first; a JSON true is no label.
    texts = type(endings) is list and len(endings) == 4 and all(type(e) is str for e in endings)
    if not (isinstance(ctx, str) and ctx and texts and type(label) is int and 0 <= label <= 3):
        raise UserError(f"{where}: expected a JSON object with 'ctx' (a non-empty string), "
                        "'endings' (4 strings) and 'label' (an integer from 0 to 3)")  # fmt: skip
    return example


# -----------------------------------------------------------------------------
# Rendering. An example is scored as 4 sequences, the context and each ending (with the leading
# space that joins them); only the ending's tokens are scored. The 4 sequences share their start,
# so we pack them into one row: the context once, then the 4 endings, each placed (by its position
# numbers) right after the context and seeing only the context and itself: one row of ~140 tokens
# instead of 4 padded rows of ~75.


def render_example(example, enc, max_len=None):
    """(context tokens, [4 endings' tokens]), cut to fit max_len (the model's block_size): an ending
    keeps at most max_len - 1 tokens, and the context loses tokens from its start (the same for all
    4) until the longest ending fits."""
    context = enc.encode_ordinary(example["ctx"])
    endings = [enc.encode_ordinary(" " + ending) for ending in example["endings"]]
    if max_len is not None:
        if max_len < 2:  # the context's last token predicts an ending's first: no room for both
            raise UserError(
                f"a model with block_size {max_len} cannot "
                f"score HellaSwag: it needs at least 2 positions"
            )
        endings = [ending[: max_len - 1] for ending in endings]
        context = context[-(max_len - max(len(ending) for ending in endings)) :]
    return context, endings


# One example as a row: its tokens, each token's position in its own sequence, and its segment (0
# for the context, k + 1 for ending k); then, for every ending token in order, the row index whose
# output predicts it, the token itself, and which ending (0..3) it belongs to.
PackedExample = namedtuple(
    "PackedExample", "tokens positions segments predict_at targets ending_of"
)


def pack_example(context, endings):
    """The row of an example (see PackedExample). Ending token j is predicted by the output just
    before it: the context's last token for j = 0, the ending's token j - 1 after that. So an
    ending's last token predicts nothing and is left out of the row: it is only a target."""
    tokens, positions, segments = list(context), list(range(len(context))), [0] * len(context)
    predict_at, targets, ending_of = [], [], []
    for k, ending in enumerate(endings):
        start = len(tokens)  # where this ending's tokens go (it has at least one: its space)
        predict_at += [len(context) - 1] + list(range(start, start + len(ending) - 1))
        targets += ending
        ending_of += [k] * len(ending)
        tokens += ending[:-1]
        positions += range(len(context), len(context) + len(ending) - 1)
        segments += [k + 1] * (len(ending) - 1)
    return PackedExample(tokens, positions, segments, predict_at, targets, ending_of)


def attention_mask(segments, positions):
    """segments, positions (B, L) -> (B, 1, L, L), True where token q (dim 2) may see token s (dim
    3): s is in the context or in q's own ending, and not later. No real token sees padding (-1)."""
    seg_q, seg_s = segments[:, :, None], segments[:, None, :]
    visible = ((seg_s == 0) | (seg_s == seg_q)) & (positions[:, None, :] <= positions[:, :, None])
    return visible.unsqueeze(1)  # one mask for all heads


# -----------------------------------------------------------------------------
# Scoring: each ending token's loss is the cross-entropy of the output that predicts it. Only those
# outputs become logits: the (positions, 50257) logits are the largest tensor here.


def ending_losses(model, packed, device):
    """One forward pass: each ending's summed loss (E, 4) and token count (E, 4). The caller sets
    no_grad and any autocast."""

    def padded(field, pad=0):  # one field of every example as a right-padded row each
        rows = [torch.tensor(getattr(example, field)) for example in packed]
        return pad_sequence(rows, batch_first=True, padding_value=pad).to(device)

    def flat(field):  # one field of every example, laid end to end
        return torch.tensor([x for ex in packed for x in getattr(ex, field)], device=device)

    positions, segments = padded("positions"), padded("segments", pad=-1)  # -1: padding
    mask = attention_mask(segments, positions)
    hidden = model.hidden_states(padded("tokens"), positions=positions, attn_mask=mask)
    rows = torch.tensor([i for i, ex in enumerate(packed) for _ in ex.targets], device=device)
    logits = model.logits(hidden[rows, flat("predict_at")]).float()
    losses = F.cross_entropy(logits, flat("targets"), reduction="none")
    ending = 4 * rows + flat("ending_of")  # the (example, ending) of each loss, as one index
    sums = torch.zeros(4 * len(packed), device=device).index_add_(0, ending, losses)
    counts = torch.bincount(ending, minlength=4 * len(packed))
    return sums.view(-1, 4), counts.view(-1, 4)


def score_examples(model, examples, enc, device, batch_size, autocast_dtype=torch.float32,
                   progress=False, stop=None):  # fmt: skip
    """ending_losses of every example, in batches of rows of about the same length (little compute
    goes into padding). float32 (no autocast) is exact; bfloat16 is faster where matmuls have bf16
    units but moves mean losses by 0.001 to 0.01, enough to flip a few near-tied answers. A stop
    request (as in validation_loss) ends the scoring between batches."""
    packed = [pack_example(*render_example(ex, enc, model.config.block_size)) for ex in examples]
    # longest first: if memory runs out, it does at once
    order = sorted(range(len(packed)), key=lambda i: len(packed[i].tokens), reverse=True)
    sum_losses = torch.zeros(len(packed), 4)
    n_tokens = torch.zeros(len(packed), 4, dtype=torch.long)
    enabled = autocast_dtype != torch.float32
    autocast = torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=enabled)
    bar = tqdm(total=len(packed), unit="example", desc="hellaswag", disable=not progress)
    with torch.no_grad(), autocast, bar:
        for start in range(0, len(order), batch_size):
            if stop is not None and stop.agreed():  # on all ranks at once, as validation_loss
                break
            batch = order[start : start + batch_size]
            losses, counts = ending_losses(model, [packed[i] for i in batch], device)
            sum_losses[batch], n_tokens[batch] = losses.cpu(), counts.cpu()
            bar.update(len(batch))
    return sum_losses, n_tokens


def predictions(sum_losses, n_tokens):
    """The chosen ending of each example by summed loss (acc) and by mean loss per token."""
    return sum_losses.argmin(dim=-1), (sum_losses / n_tokens).argmin(dim=-1)


def evaluate_hellaswag(model, examples, enc, device, batch_size, rank=0, world_size=1,
                       autocast_dtype=torch.float32, progress=False, stop=None):  # fmt: skip
    """dict(n, correct, correct_norm) over all `examples`, for acc and acc_norm. With DDP every rank
    passes all examples, scores its share and gets the totals. `model` is the GPT, not the DDP
    wrapper: evaluation needs no gradient sync (a compiled one runs its uncompiled methods here)."""
    own = examples[rank::world_size]  # this rank's share
    # Every rank runs as many forward passes (with --shard full each needs all ranks): a share one
    # short is made up with copies of the first example, scored but not counted.
    turns = -(-len(examples) // world_size)
    scored = own + examples[:1] * (turns - len(own))
    sums, tokens = score_examples(model, scored, enc, device, batch_size, autocast_dtype, progress,
                                  stop)  # fmt: skip
    labels = torch.tensor([example["label"] for example in own], dtype=torch.long)
    chosen = predictions(sums[: len(own)], tokens[: len(own)])
    counts = [len(own)] + [(pred == labels).sum().item() for pred in chosen]
    if world_size > 1:
        counts = torch.tensor(counts, dtype=torch.long, device=device)
        torch.distributed.all_reduce(counts)
        counts = counts.tolist()
    return dict(zip(("n", "correct", "correct_norm"), counts))


def evaluator(data, procs, device, batch_size, autocast_dtype, download=True):
    """For train_gpt2.py: a function (model, stop=None) -> acc_norm, or None (and a notice why) when
    the data cannot be had. data: --hellaswag_data, or None for the cached download; download=False
    (--eval_only, which writes no file) uses a cached copy only."""
    path = None
    if procs.master:  # rank 0 reads the examples and sends them: every rank scores the same ones
        if not data and download:
            with contextlib.suppress(UserError):  # offline: the notice below says so
                hellaswag_path()
        path = hellaswag_path(data or None, download=False)  # a path the user gave must exist
    examples = procs.from_rank_0(path and load_examples(path), device)
    if examples is None:
        could_not = " and could not be downloaded" if download else ""
        procs.print(f"HellaSwag skipped: its data is not cached{could_not}; pass "
                    "--hellaswag_data PATH to a local hellaswag_val.jsonl, or "
                    "--no-hellaswag")  # fmt: skip
        return None
    enc = gpt2_tokenizer()

    def hellaswag_acc_norm(model, stop=None):
        device = next(model.parameters()).device
        # one row per example, shorter than a training row: --batch_size of them fit
        with torchrun.root_weights_gathered(model):  # --shard full: it calls no forward
            counts = evaluate_hellaswag(model, examples, enc, device, batch_size, procs.rank,
                                        procs.world_size, autocast_dtype, stop=stop)  # fmt: skip
        return counts["correct_norm"] / counts["n"]

    return hellaswag_acc_norm
