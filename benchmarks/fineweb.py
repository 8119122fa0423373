"""How fast fineweb.py turns text into shards, on two kinds of text in four shapes, against two
references.

    python benchmarks/fineweb.py [--megabytes 8] [--copies 2 8] [--repeat 5] \\
        [--text shakespeare.txt]

The two kinds of text come with every Python: prose (the language reference's topics in pydoc_data,
or --text FILE cut into documents at blank lines) and code with markup (the standard library's .py
files, one document each: code, comments and reST docstrings). Each is written in four shapes: one
.txt file per document, a few large .txt files, one jsonl file and one parquet file. For each corpus
this prints:
- start-up: the whole fineweb.py process on a corpus of the first document alone;
- steady: the marginal rate between runs on two numbers of copies of the corpus (--copies, 2 and 8),
  so that the start-up, and the filling and draining of the pipeline, cancel out: what a long run
  (FineWeb's 10B tokens) gets;
- whole: the whole process on the larger copy, start-up included;
and the steady rate as a share of two references on the same documents, measured in turns with it:
- bare pool: multiprocessing.Pool(cores) encoding the documents with encode_ordinary, sent in ~1 MB
  batches, with no reading and no writing;
- 2 x single: the number of cores times single-thread encode_ordinary, which assumes the cores run
  side by side at full speed (a shared or virtual machine may not give that).
Every figure is the median of --repeat runs: wall time on a shared machine is noisy.
"""

import argparse
import collections
import glob
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # to import common and fineweb
from fineweb import available_cores  # noqa: E402
from machinery.tokenizer import gpt2_tokenizer  # noqa: E402

# -----------------------------------------------------------------------------
# The corpora.


def prose_documents(text_file, doc_chars, total_chars):
    """Paragraphs (split at blank lines) grouped into documents of about doc_chars, up to
    total_chars."""
    if text_file:
        with open(text_file, encoding="utf-8") as f:
            text = f.read()
    else:
        from pydoc_data.topics import topics  # the prose of Python's language reference, ~0.5 MB

        text = "\n\n".join(topics[name] for name in sorted(topics))
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    documents, current = [], []
    for paragraph in paragraphs:
        current.append(paragraph)
        if sum(len(p) for p in current) >= doc_chars:
            documents.append("\n\n".join(current))
            current = []
    documents.append("\n\n".join(current))
    return take(documents, total_chars)


def code_documents(total_chars):
    """The standard library's .py files, one document each (0.1-200 KB, mostly a few KB), up to
    total_chars."""
    stdlib = sysconfig.get_paths()["stdlib"]
    documents = []
    for path in sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)):
        if "site-packages" not in path:
            try:
                with open(path, encoding="utf-8") as f:
                    documents.append(f.read())
            except (UnicodeDecodeError, OSError):  # a few test files are deliberately not UTF-8
                pass
    return take(documents, total_chars)


def take(documents, total_chars):
    """The first documents that hold total_chars characters, the list repeated if it holds fewer."""
    taken, chars = [], 0
    while chars < total_chars:
        for document in documents:
            taken.append(document)
            chars += len(document)
            if chars >= total_chars:
                break
    return taken


SHAPES = ["txt files", "4 txt files", "jsonl", "parquet"]


def write_corpus(documents, directory, shape):
    """Write the documents in a shape; returns (path for --input, the documents as fineweb.py will
    see them)."""
    os.makedirs(directory)
    if shape == "txt files":
        for index, document in enumerate(documents):
            with open(
                os.path.join(directory, f"{index:07d}.txt"), "w", encoding="utf-8", newline=""
            ) as f:
                f.write(document)
        # fineweb.py reads .txt files with universal newlines
        return directory, [d.replace("\r\n", "\n").replace("\r", "\n") for d in documents]
    if shape == "4 txt files":
        files = min(4, len(documents))
        joined = ["\n\n".join(documents[part::files]) for part in range(files)]
        return write_corpus(joined, os.path.join(directory, "big"), "txt files")
    if shape == "jsonl":
        path = os.path.join(directory, "corpus.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in documents)
        return path, documents
    path = os.path.join(directory, "corpus.parquet")
    pq.write_table(
        pa.table({"text": documents}), path, row_group_size=1000
    )  # FineWeb's files have 1000-row groups
    return path, documents


# -----------------------------------------------------------------------------
# The measurements.


def run_fineweb(corpus, out, num_proc):
    """Run fineweb.py as its own process; returns (wall seconds, tokens written)."""
    command = [
        sys.executable,
        "fineweb.py",
        "--input",
        corpus,
        "--out",
        out,
        "--num_proc",
        str(num_proc),
    ]
    start = time.perf_counter()
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        sys.exit(f"fineweb.py failed:\n{run.stderr}")
    with open(os.path.join(out, "edufineweb_progress.json")) as f:
        tokens = json.load(f)["tokens"]
    shutil.rmtree(out)
    return wall, tokens


encoding = None  # each process's tokenizer, for the references


def set_encoding():
    global encoding
    encoding = gpt2_tokenizer()


def encode_batch(documents):
    return sum(
        len(encoding.encode_ordinary(d)) + 1 for d in documents
    )  # + 1: the EOT before each document


def batches(documents, batch_chars=1 << 20):
    batch, chars = [], 0
    for document in documents:
        batch.append(document)
        chars += len(document)
        if chars >= batch_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def single_rate(documents):
    start = time.perf_counter()
    tokens = encode_batch(documents)
    return tokens / (time.perf_counter() - start)


def pool_rate(pool, documents):
    """Tokens/s of the (already started) pool encoding the documents sent to it in ~1 MB batches."""
    start = time.perf_counter()
    tokens = sum(pool.imap(encode_batch, batches(documents)))
    return tokens / (time.perf_counter() - start)


def measure(documents, shape, copies, repeat, num_proc, pool, directory):
    """Median figures of one corpus in one shape, and of the ratios of each run to the references
    measured right beside it (pairing keeps a ratio meaningful while the machine's speed drifts)."""
    small_copies, large_copies = copies
    tiny, _ = write_corpus(documents[:1], os.path.join(directory, "tiny"), shape)
    small, seen = write_corpus(documents * small_copies, os.path.join(directory, "small"), shape)
    large, seen_large = write_corpus(
        documents * large_copies, os.path.join(directory, "large"), shape
    )
    out = os.path.join(directory, "out")
    figures = collections.defaultdict(list)
    for _ in range(repeat):  # in turns, so that every figure sees the machine in the same moods
        startup, _ = run_fineweb(tiny, out, num_proc)
        small_wall, small_tokens = run_fineweb(small, out, num_proc)
        large_wall, large_tokens = run_fineweb(large, out, num_proc)
        steady = (large_tokens - small_tokens) / max(large_wall - small_wall, 1e-9)
        whole = large_tokens / large_wall
        bare_pool = pool_rate(pool, seen_large)
        two_single = available_cores() * single_rate(seen)
        for name, value in [
            ("start-up", startup),
            ("steady", steady),
            ("whole", whole),
            ("bare pool", bare_pool),
            ("2 x single", two_single),
            ("steady/pool", steady / bare_pool),
            ("steady/2x", steady / two_single),
            ("whole/pool", whole / bare_pool),
        ]:
            figures[name].append(value)
    shutil.rmtree(directory)
    median = {name: statistics.median(values) for name, values in figures.items()}
    return median, figures, len(seen), large_tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--megabytes",
        type=float,
        default=8,
        help="characters of each corpus, in millions; with fewer, "
        "runs on a quiet machine last under a second and the marginal "
        "rate measures the filling of the pipeline more than its pace",
    )
    parser.add_argument(
        "--copies",
        type=int,
        nargs=2,
        default=[2, 8],
        help="copies of the corpus in the two runs of the marginal rate",
    )
    parser.add_argument(
        "--repeat", type=int, default=5, help="runs of each measurement; medians are printed"
    )
    parser.add_argument(
        "--text", help="a text file to use as the prose instead of pydoc_data's topics"
    )
    parser.add_argument("--kinds", nargs="+", default=["prose", "code"], choices=["prose", "code"])
    parser.add_argument("--shapes", nargs="+", default=SHAPES, choices=SHAPES)
    args = parser.parse_args()
    cores = available_cores()
    total_chars = int(args.megabytes * 1e6)
    texts = {
        "prose": lambda: prose_documents(args.text, 4000, total_chars),
        "code": lambda: code_documents(total_chars),
    }
    print(
        f"{cores} cores; fineweb.py --num_proc {cores}; each corpus x{args.copies[0]} "
        f"and x{args.copies[1]} (M tokens: of x{args.copies[1]}); medians "
        f"of {args.repeat} runs (min-max of steady/pool); rates in M tokens/s"
    )
    print(
        f"{'corpus':<22} {'docs':>6} {'M tokens':>8} {'start-up':>8} "
        f"{'steady':>6} {'whole':>5} {'bare pool':>9} {'2 x single':>10} "
        f"{'steady/pool':>20} {'steady/2x':>9} {'whole/pool':>10}"
    )
    with (
        multiprocessing.Pool(cores, initializer=set_encoding) as pool,
        tempfile.TemporaryDirectory() as directory,
    ):
        set_encoding()
        for kind in args.kinds:
            documents = texts[kind]()
            for shape in args.shapes:
                m, runs, count, tokens = measure(
                    documents,
                    shape,
                    args.copies,
                    args.repeat,
                    cores,
                    pool,
                    os.path.join(directory, "corpus"),
                )
                spread = f"({min(runs['steady/pool']):.2f}-{max(runs['steady/pool']):.2f})"
                print(
                    f"{kind + ', ' + shape:<22} {count:>6,} {tokens / 1e6:>8.1f} "
                    f"{m['start-up']:>7.2f}s {m['steady'] / 1e6:>6.2f} "
                    f"{m['whole'] / 1e6:>5.2f} {m['bare pool'] / 1e6:>9.2f} "
                    f"{m['2 x single'] / 1e6:>10.2f} {m['steady/pool']:>8.2f} "
                    f"{spread:>11} {m['steady/2x']:>9.2f} {m['whole/pool']:>10.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
