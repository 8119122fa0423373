"""HellaSwag: the common-sense sentence-completion benchmark people use to judge a GPT-2 124M run.

Each example is a context and 4 possible endings, one of them right. A language model "answers" by
which ending it finds most likely after the context. We use the completion style, 0-shot (as
build-nanogpt and the GPT-3 paper do): the context's tokens, then an ending's tokens with a leading
space, and the model's cross-entropy on the ending's tokens only. Two answers are counted:
  acc       the ending with the lowest summed loss (favours short endings),
  acc_norm  the ending with the lowest mean loss per token (the headline number).
OpenAI's GPT-2 on the 10,042 validation examples: 124M acc 0.2859 / acc_norm 0.2955,
1558M (gpt2-xl) acc 0.3842 / acc_norm 0.4893. Random guessing gets 0.25.


This module holds the benchmark: its data, the rendering and packing of an example, and the scoring.
It takes the model as an argument (train_gpt2.py's evaluations call in_loop_eval(), hellaswag.py's
command line evaluate_hellaswag()), and imports nothing of the model's file.
"""

import collections
import contextlib
import json
import os
import urllib.request
from http.client import HTTPException

import torch
import torch.nn.functional as F
from tqdm import tqdm

from machinery.cli import UserError
from machinery.files import atomic_write

# -----------------------------------------------------------------------------
# The data: hellaswag_val.jsonl from the authors' repository, one JSON object per line. We use three
# fields: "ctx" (the context), "endings" (4 strings) and "label" (the index of the right ending).
# It is downloaded once into a cache directory; offline, pass a copy with --data.

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_FILE = "hellaswag_val.jsonl"


def default_cache_dir():
    """$XDG_CACHE_HOME/gpt2-repro/hellaswag, or ~/.cache/gpt2-repro/hellaswag (the usual Linux
    place)."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "gpt2-repro", "hellaswag")


def hellaswag_path(data=None, cache_dir=None, download=True, url=HELLASWAG_URL):
    """Where hellaswag_val.jsonl is: `data` if given (it must exist), else the copy in cache_dir
    (default_cache_dir() when None), downloaded from `url` first if it is not there. With
    download=False a missing cached copy gives None, so a caller can skip the eval without
    network."""
    if data is not None:
        if not data.strip():
            raise UserError(f"the path {data!r} names no file: pass the path of {HELLASWAG_FILE}")
        if os.path.isdir(data):
            raise UserError(f"{data} is a folder: pass the path of the {HELLASWAG_FILE} file in it")
        if not os.path.isfile(data):
            raise UserError(
                f"{data}: no such file; pass the path of {HELLASWAG_FILE} (from {HELLASWAG_URL})"
            )
        return data
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, HELLASWAG_FILE)
    if os.path.isfile(path):
        return path
    if not download:
        return None
    download_file(url, path)
    return path


def download_file(url, path):
    """Fetch url into path atomically, so that an interrupted download never leaves a torn file
    where the next run would trust it."""
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot write to {directory} ({e}): set XDG_CACHE_HOME "
            f"to a writable directory, or pass --data PATH"
        ) from None
    with atomic_write(path) as f:
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                size = response.headers.get("Content-Length")  # bytes to come, when the server says
                with tqdm(total=int(size) if size else None, unit="B", unit_scale=True,
                          desc=f"downloading {os.path.basename(path)}") as bar:  # fmt: skip
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
        # no network, timeout, HTTP error, connection cut short
        except (OSError, HTTPException) as e:
            raise UserError(
                f"could not download {url} ({e}); on a machine with network, "
                f"download that file and pass --data PATH (or put it at {path})"
            ) from None


def load_examples(path, limit=None):
    """The examples of a HellaSwag jsonl file (the first `limit` of them), each a dict with at least
    ctx (str), endings (4 str) and label (int 0..3). A bad line ends with an error naming it."""
    examples = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if limit is not None and len(examples) == limit:
                    break
                if line.strip():  # blank lines (a trailing newline or two) are not examples
                    examples.append(parse_example(line, f"{path}, line {line_number}"))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}): pass the path of {HELLASWAG_FILE}") from None
    if not examples:
        raise UserError(f"{path} holds no examples: pass the path of {HELLASWAG_FILE}")
    return examples


def parse_example(line, where):
    """One line of the jsonl file as an example dict; `where` (file and line) goes into any
    error."""
    try:
        example = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg}); is this {HELLASWAG_FILE}?") from None
    if not isinstance(example, dict):
        raise UserError(f"{where}: expected a JSON object with ctx, endings and label")
    ctx, endings, label = example.get("ctx"), example.get("endings"), example.get("label")
    if not (isinstance(ctx, str) and ctx):  # the context's last token predicts each ending's first
        raise UserError(f"{where}: 'ctx' must be a non-empty string (the context)")
    if not (
        isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)
    ):
        raise UserError(f"{where}: 'endings' must be a list of 4 strings")
    if not (isinstance(label, int) and not isinstance(label, bool) and 0 <= label <= 3):
        raise UserError(
            f"{where}: 'label' must be an integer from 0 to 3 (the right ending), got {label!r}"
        )
    return example


# -----------------------------------------------------------------------------
# Rendering. An example is scored as 4 sequences, the context followed by each ending (with the
# leading space that joins it to the context); only the ending's tokens are scored. The 4 sequences
# share their beginning, so we pack them into one row: the context once, then the 4 endings, each
# placed (by its position numbers) right after the context and seeing only the context and itself. A
# context of ~40 tokens and endings of ~25 make a row of ~140 tokens instead of 4 rows of ~75,
# padded.


def render_example(example, enc, max_len=None):
    """The tokens of an example's context and of its 4 endings: (context, [4 endings]). Context plus
    ending must fit in max_len (the model's block_size): an ending keeps at most max_len - 1 tokens,
    and a context too long for the longest ending loses tokens from its start (the same ones for
    all 4)."""
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
PackedExample = collections.namedtuple(
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
    """Who may see whom in packed rows: segments, positions (B, L) -> (B, 1, L, L), True where token
    q (dim 2) may see token s (dim 3): s is in the context or in q's own ending, and not at a later
    position. Padding (segment -1) is seen by no real token."""
    seg_q, seg_s = segments[:, :, None], segments[:, None, :]
    visible = ((seg_s == 0) | (seg_s == seg_q)) & (positions[:, None, :] <= positions[:, :, None])
    return visible.unsqueeze(1)  # one mask for all heads


# -----------------------------------------------------------------------------
# Scoring. The outputs at the predicting positions go through the output head, and the cross-entropy
# against the ending's tokens is each token's loss. Only those positions become logits: the
# (positions, 50257) logits are the largest tensor here, and the rest of the row needs none.


def ending_losses(model, packed, device):
    """One forward pass over packed examples (one right-padded row each) on `device`: the summed
    loss of each ending's tokens (E, 4) and how many there are (E, 4). The caller sets no_grad and
    any autocast."""
    length = max(len(example.tokens) for example in packed)
    tokens = torch.zeros((len(packed), length), dtype=torch.long)
    positions = torch.zeros((len(packed), length), dtype=torch.long)
    segments = torch.full((len(packed), length), -1, dtype=torch.long)  # -1: padding
    for i, example in enumerate(packed):
        n = len(example.tokens)
        tokens[i, :n] = torch.tensor(example.tokens)
        positions[i, :n] = torch.tensor(example.positions)
        segments[i, :n] = torch.tensor(example.segments)
    tokens, positions, segments = tokens.to(device), positions.to(device), segments.to(device)
    mask = attention_mask(segments, positions)
    hidden = model.hidden_states(tokens, positions=positions, attn_mask=mask)  # (E, L, n_embd)

    def flat(field):  # one field of every example, laid end to end, as a tensor on the device
        return torch.tensor(
            [x for example in packed for x in getattr(example, field)], device=device
        )

    rows = torch.tensor([i for i, ex in enumerate(packed) for _ in ex.targets], device=device)
    logits = model.logits(hidden[rows, flat("predict_at")]).float()
    losses = F.cross_entropy(logits, flat("targets"), reduction="none")
    ending = 4 * rows + flat(
        "ending_of"
    )  # the (example, ending) each loss belongs to, as one index
    sums = torch.zeros(4 * len(packed), device=device).index_add_(0, ending, losses)
    counts = torch.bincount(ending, minlength=4 * len(packed))
    return sums.view(-1, 4), counts.view(-1, 4)


def score_examples(model, examples, enc, device, batch_size, autocast_dtype=torch.float32,
                   progress=False, stop=None):  # fmt: skip
    """Summed losses (E, 4) and scored token counts (E, 4) of every ending of every example,
    batch_size examples (one row each) per forward pass. The rows are sorted by length first so that
    a batch holds rows of about the same length and little compute goes into padding; the results
    are put back in the examples' order. autocast_dtype float32 (no autocast) is exact; bfloat16 is
    faster where matmuls have bf16 units, but its rounding moves the mean losses by about 0.001 to
    0.01, enough to flip a few near-tied answers. A stop request (as in validation_loss) ends the
    scoring between batches."""
    device_type = torch.device(device).type
    packed = [
        pack_example(*render_example(example, enc, max_len=model.config.block_size))
        for example in examples
    ]
    # longest first: if memory runs out, it does at once
    order = sorted(range(len(packed)), key=lambda i: len(packed[i].tokens), reverse=True)
    sum_losses = torch.zeros(len(packed), 4)
    n_tokens = torch.zeros(len(packed), 4, dtype=torch.long)
    enabled = autocast_dtype != torch.float32
    autocast = torch.autocast(device_type, dtype=autocast_dtype, enabled=enabled)
    with torch.no_grad(), autocast:
        with tqdm(total=len(packed), unit="example", desc="hellaswag", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                if stop is not None and stop.requested:
                    break
                batch = order[start : start + batch_size]
                batch_losses, batch_counts = ending_losses(
                    model, [packed[i] for i in batch], device
                )
                sum_losses[batch] = batch_losses.cpu()
                n_tokens[batch] = batch_counts.cpu()
                bar.update(len(batch))
    return sum_losses, n_tokens


def predictions(sum_losses, n_tokens):
    """The chosen ending of each example by summed loss (acc) and by mean loss per token
    (acc_norm)."""
    return sum_losses.argmin(dim=-1), (sum_losses / n_tokens).argmin(dim=-1)


def evaluate_hellaswag(
    model, examples, enc, device, batch_size, rank=0, world_size=1, autocast_dtype=torch.float32,
    progress=False, stop=None,
):  # fmt: skip
    """HellaSwag counts over all `examples`: dict(n, correct, correct_norm) (correct for acc,
    correct_norm for acc_norm). With DDP every rank calls this with the same examples and scores its
    share (rank r takes examples r, r + world_size, ...); the counts are then summed with
    all_reduce, so every rank gets the totals (torch.distributed must be initialised when
    world_size > 1). `model` is a GPT (a torch.compile'd one runs its uncompiled methods here), not
    the DDP wrapper: evaluation needs no gradient sync. autocast_dtype, stop: as in
    score_examples()."""
    my_examples = examples[rank::world_size]
    if my_examples:
        sum_losses, n_tokens = score_examples(
            model, my_examples, enc, device, batch_size, autocast_dtype, progress, stop
        )
        pred, pred_norm = predictions(sum_losses, n_tokens)
        labels = torch.tensor([example["label"] for example in my_examples])
        correct, correct_norm = (pred == labels).sum().item(), (pred_norm == labels).sum().item()
        counts = [len(my_examples), correct, correct_norm]
    else:
        counts = [0, 0, 0]  # more ranks than examples: this rank still joins the all_reduce
    if world_size > 1:
        counts = torch.tensor(counts, dtype=torch.long, device=device)
        torch.distributed.all_reduce(counts)
        counts = counts.tolist()
    n, correct, correct_norm = counts
    return dict(n=n, correct=correct, correct_norm=correct_norm)


def in_loop_eval(data, enc, procs, batch_size, autocast_dtype, download=True):
    """For train_gpt2.py's evaluations: a function (model, stop=None) -> HellaSwag acc_norm, each
    rank scoring its share of the examples, or None when its data cannot be had (a one-line notice
    says why). data: --hellaswag_data, or None for the cached download; download=False uses the
    cached copy only, for --eval_only, which writes no file. batch_size: examples per forward
    pass."""
    if data:
        path = hellaswag_path(data)  # a path the user gave must exist
    else:
        # one download into the cache, which the other ranks then read
        if procs.master and download:
            with contextlib.suppress(UserError):
                hellaswag_path()
        if procs.ddp:
            torch.distributed.barrier()
        path = hellaswag_path(download=False)
        if path is None:
            could_not = " and could not be downloaded" if download else ""
            procs.print(f"HellaSwag skipped: its data is not cached{could_not}; pass "
                        "--hellaswag_data PATH to a local hellaswag_val.jsonl, or "
                        "--no-hellaswag")  # fmt: skip
            return None
    examples = load_examples(path)

    def hellaswag_acc_norm(model, stop=None):
        device = next(model.parameters()).device
        # One row per example, shorter than a training row: --batch_size of them fit where
        # training does.
        counts = evaluate_hellaswag(model, examples, enc, device, batch_size, procs.rank,
                                    procs.world_size, autocast_dtype, stop=stop)  # fmt: skip
        return counts["correct_norm"] / counts["n"]

    return hellaswag_acc_norm
