"""HellaSwag: the common-sense sentence-completion benchmark people use to judge a GPT-2 124M run.

Each example is a context and 4 possible endings, one of them right. A language model "answers" by
which ending it finds most likely after the context. We use the completion style, 0-shot (as
build-nanogpt and the GPT-3 paper do): the context's tokens, then an ending's tokens with a leading
space, and the model's cross-entropy on the ending's tokens only. Two answers are counted:
  acc       the ending with the lowest summed loss (favours short endings),
  acc_norm  the ending with the lowest mean loss per token (the headline number).
OpenAI's GPT-2 on the 10,042 validation examples: 124M acc 0.2859 / acc_norm 0.2955,
1558M (gpt2-xl) acc 0.3842 / acc_norm 0.4893. Random guessing gets 0.25.

    python hellaswag.py --init gpt2                      # OpenAI's weights (any size name)
    python hellaswag.py --init log/model_19072.pt        # a checkpoint of train_gpt2.py
    python hellaswag.py --init gpt2 --data hellaswag_val.jsonl --limit 1000
    python hellaswag.py --init gpt2-xl --dtype bfloat16  # faster; a few near-tied answers may change

The training loop calls evaluate() from its eval step; the rest of the file builds up to it.
"""

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from http.client import HTTPException

import torch
import torch.nn.functional as F
from tqdm import tqdm

from train_gpt2 import UserError, gpt2_tokenizer, load_model, pick_device

PROTOCOL = "completion style, 0-shot, acc = lowest summed loss, acc_norm = lowest mean loss"

# -----------------------------------------------------------------------------
# The data: hellaswag_val.jsonl from the authors' repository, one JSON object per line. We use three
# fields: "ctx" (the context), "endings" (4 strings) and "label" (the index of the right ending).
# It is downloaded once into a cache directory; offline, pass a copy with --data.

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_FILE = "hellaswag_val.jsonl"


def default_cache_dir():
    """$XDG_CACHE_HOME/gpt2-repro/hellaswag, or ~/.cache/gpt2-repro/hellaswag (the usual Linux place)."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "gpt2-repro", "hellaswag")


def hellaswag_path(data=None, cache_dir=None, download=True, url=HELLASWAG_URL):
    """Where hellaswag_val.jsonl is: `data` if given (it must exist), else the copy in cache_dir
    (default_cache_dir() when None), downloaded from `url` first if it is not there. With
    download=False a missing cached copy gives None, so a caller can skip the eval without network."""
    if data is not None:
        if not os.path.isfile(data):
            raise UserError(f"{data}: no such file; pass the path of {HELLASWAG_FILE} (from {HELLASWAG_URL})")
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
    """Fetch url into path through a temporary file in the same directory, so that an interrupted
    download never leaves a torn file where the next run would trust it."""
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    except OSError as e:
        raise UserError(f"cannot write to {directory} ({e}): set XDG_CACHE_HOME to a writable directory, or pass --data PATH") from None
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=30) as response:
            size = response.headers.get("Content-Length")  # bytes to come, when the server says
            with tqdm(total=int(size) if size else None, unit="B", unit_scale=True, desc=f"downloading {os.path.basename(path)}") as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp_path, path)
    except (OSError, HTTPException) as e:  # no network, timeout, HTTP error, connection cut short
        raise UserError(
            f"could not download {url} ({e}); on a machine with network, download that file and pass "
            f"--data PATH (or put it at {path})"
        ) from None
    finally:
        if os.path.exists(tmp_path):  # left only by a failure, Ctrl-C included
            os.remove(tmp_path)


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
    """One line of the jsonl file as an example dict; `where` (file and line) goes into any error."""
    try:
        example = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg}); is this {HELLASWAG_FILE}?") from None
    if not isinstance(example, dict):
        raise UserError(f"{where}: expected a JSON object with ctx, endings and label")
    ctx, endings, label = example.get("ctx"), example.get("endings"), example.get("label")
    if not isinstance(ctx, str):
        raise UserError(f"{where}: 'ctx' must be a string (the context)")
    if not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)):
        raise UserError(f"{where}: 'endings' must be a list of 4 strings")
    if not (isinstance(label, int) and not isinstance(label, bool) and 0 <= label <= 3):
        raise UserError(f"{where}: 'label' must be an integer from 0 to 3 (the right ending), got {label!r}")
    return example


# -----------------------------------------------------------------------------
# Rendering. Each ending becomes one row: the context's tokens, then the ending's tokens (with the
# leading space that joins it to the context). The mask marks the ending's tokens: only they are scored.
# Rows are right-padded; with causal attention a real position never sees the padding after it.


def render_rows(example, enc, max_len=None):
    """The 4 rows of an example as (tokens, number of ending tokens at its end). A row longer than
    max_len (the model's block_size) keeps its last max_len tokens: it loses context from the left."""
    context = enc.encode_ordinary(example["ctx"])
    rows = []
    for ending in example["endings"]:
        ending_tokens = enc.encode_ordinary(" " + ending)
        row = context + ending_tokens
        if max_len is not None:
            row = row[-max_len:]
        rows.append((row, min(len(ending_tokens), len(row))))
    return rows


def pad_rows(rows):
    """(tokens, n_ending) rows -> tokens (R, L) and mask (R, L), right-padded with token 0 and mask 0."""
    length = max(len(row) for row, _ in rows)
    tokens = torch.zeros((len(rows), length), dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (row, n_ending) in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, len(row) - n_ending : len(row)] = 1
    return tokens, mask


def render_example(example, enc, max_len=None):
    """tokens (4, L), mask (4, L) (1 exactly over each ending's tokens) and the label of one example."""
    tokens, mask = pad_rows(render_rows(example, enc, max_len))
    return tokens, mask, example["label"]


# -----------------------------------------------------------------------------
# Scoring. The logits at position t predict token t+1, so an ending token at t+1 is scored by the
# cross-entropy at t. Only those positions are turned into fp32 losses: the (rows, positions, 50257)
# logits are the largest tensor here, and the context and padding positions need no loss at all.


def ending_losses(model, tokens, mask):
    """One forward pass over rows (R, L) on the model's device: the summed loss of each row's masked
    tokens (R,) and how many there are (R,). The caller sets no_grad and any autocast."""
    logits, _ = model(tokens)
    scored = mask[:, 1:].bool()  # position t is scored when token t+1 belongs to the ending
    token_losses = torch.zeros(scored.shape, device=tokens.device)
    token_losses[scored] = F.cross_entropy(logits[:, :-1][scored].float(), tokens[:, 1:][scored], reduction="none")
    return token_losses.sum(dim=1), scored.sum(dim=1)


def score_examples(model, examples, enc, device, batch_size, autocast_dtype=torch.float32, progress=False):
    """Summed losses (E, 4) and scored token counts (E, 4) of every ending of every example, batch_size
    examples' worth of rows (4 per example) per forward pass. The rows are sorted by length first so
    that a batch holds rows of about the same length and little compute goes into padding; the
    results are put back in the examples' order. autocast_dtype float32 (no autocast) is exact;
    bfloat16 is faster where matmuls have bf16 units, but its rounding moves the mean losses by about
    0.001 to 0.01, enough to flip a few near-tied answers."""
    device_type = torch.device(device).type
    rows = [row for example in examples for row in render_rows(example, enc, max_len=model.config.block_size)]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]), reverse=True)  # longest first: OOM shows at once
    sum_losses = torch.zeros(len(rows))
    n_tokens = torch.zeros(len(rows), dtype=torch.long)
    rows_per_batch = 4 * batch_size
    autocast = torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32)
    with torch.no_grad(), autocast:
        with tqdm(total=len(rows), unit="ending", desc="hellaswag", disable=not progress) as bar:
            for start in range(0, len(rows), rows_per_batch):
                batch = order[start : start + rows_per_batch]
                tokens, mask = pad_rows([rows[i] for i in batch])
                batch_losses, batch_counts = ending_losses(model, tokens.to(device), mask.to(device))
                sum_losses[batch] = batch_losses.cpu()
                n_tokens[batch] = batch_counts.cpu()
                bar.update(len(batch))
    return sum_losses.view(-1, 4), n_tokens.view(-1, 4)


def predictions(sum_losses, n_tokens):
    """The chosen ending of each example by summed loss (acc) and by mean loss per token (acc_norm)."""
    return sum_losses.argmin(dim=-1), (sum_losses / n_tokens).argmin(dim=-1)


def evaluate(model, examples, enc, device, batch_size, rank=0, world_size=1, autocast_dtype=torch.float32, progress=False):
    """HellaSwag counts over all `examples`: dict(n, correct, correct_norm) (correct for acc, correct_norm
    for acc_norm). With DDP every rank calls this with the same examples and scores its share (rank r
    takes examples r, r + world_size, ...); the counts are then summed with all_reduce, so every rank
    gets the totals (torch.distributed must be initialised when world_size > 1). `model` is a GPT or a
    torch.compile'd GPT, not the DDP wrapper: evaluation needs no gradient sync. autocast_dtype: as in
    score_examples()."""
    my_examples = examples[rank::world_size]
    if my_examples:
        sum_losses, n_tokens = score_examples(model, my_examples, enc, device, batch_size, autocast_dtype, progress)
        pred, pred_norm = predictions(sum_losses, n_tokens)
        labels = torch.tensor([example["label"] for example in my_examples])
        counts = [len(my_examples), (pred == labels).sum().item(), (pred_norm == labels).sum().item()]
    else:
        counts = [0, 0, 0]  # more ranks than examples: this rank still joins the all_reduce
    if world_size > 1:
        counts = torch.tensor(counts, dtype=torch.long, device=device)
        torch.distributed.all_reduce(counts)
        counts = counts.tolist()
    n, correct, correct_norm = counts
    return dict(n=n, correct=correct, correct_norm=correct_norm)


# -----------------------------------------------------------------------------
# The command line: evaluate one model on the validation set and print one summary line.


def parse_args(argv):
    parser = argparse.ArgumentParser(description="HellaSwag accuracy of a GPT-2 model (" + PROTOCOL + ")")
    parser.add_argument("--init", required=True, help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, a Hugging Face directory, or a checkpoint .pt")
    parser.add_argument("--data", default=None, help=f"path of {HELLASWAG_FILE} (default: download once into {default_cache_dir()})")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    parser.add_argument("--batch_size", type=int, default=None, help="examples per forward pass (4 rows each); default 16 on a GPU, 4 on CPU (measured fastest there)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="float32: exact, the way the reference numbers were measured; bfloat16 autocast: faster on GPUs and CPUs with bf16 units, a few answers may change")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    device = pick_device(args.device)
    batch_size = args.batch_size or (4 if device.type == "cpu" else 16)
    autocast_dtype = getattr(torch, args.dtype)
    examples = load_examples(hellaswag_path(args.data), args.limit)
    model = load_model(args.init, device)
    enc = gpt2_tokenizer()
    start = time.perf_counter()
    result = evaluate(model, examples, enc, device, batch_size, autocast_dtype=autocast_dtype, progress=True)
    seconds = time.perf_counter() - start
    n, correct, correct_norm = result["n"], result["correct"], result["correct_norm"]
    print(
        f"hellaswag {args.init}: {n} examples, acc {correct}/{n} = {correct / n:.4f}, "
        f"acc_norm {correct_norm}/{n} = {correct_norm / n:.4f}, {n / seconds:.1f} examples/s on {device} "
        f"in {str(autocast_dtype).removeprefix('torch.')} ({PROTOCOL})"
    )


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
