"""How fast fineweb.py turns text into shards, against what the tokenizer allows on this machine.

    python benchmarks/fineweb.py [--text /work/shared/data/tinyshakespeare.txt] [--megabytes 64]

Builds a corpus of --megabytes of text from --text (paragraphs grouped into documents of about
--doc_chars characters, the whole repeated), stored as parquet like FineWeb-edu (or jsonl / txt). The
ceiling is the number of cores times tiktoken's single-thread encode_ordinary throughput on the same
documents, with no file writing; for reference, the rate of that many processes encoding at once is
printed too (a shared or virtual machine may not give all its cores at full speed at once). Then
fineweb.py runs as a subprocess on the corpus, and its throughput is printed as a share of the ceiling:
as a whole process (wall clock from start to exit), and after start-up (Python, imports, building the
tokenizer: the time of a run on a one-document corpus). Last, its CPU cost per token, which other
programs on the machine disturb less than wall time.
"""

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # to import fineweb and train_gpt2

import pyarrow as pa
import pyarrow.parquet as pq

from common import gpt2_tokenizer
from fineweb import available_cores


def make_documents(text, doc_chars, total_chars):
    """Paragraphs (split at blank lines) grouped into documents of about doc_chars, repeated to total_chars."""
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    documents, current = [], []
    for paragraph in paragraphs:
        current.append(paragraph)
        if sum(len(p) for p in current) >= doc_chars:
            documents.append("\n\n".join(current))
            current = []
    if current:
        documents.append("\n\n".join(current))
    repeats = -(-total_chars // sum(len(d) for d in documents))
    return documents * repeats


def write_corpus(documents, directory, file_format):
    """The documents as one parquet or jsonl file, or one .txt file each; returns the path for --input."""
    if file_format == "parquet":
        path = os.path.join(directory, "corpus.parquet")
        pq.write_table(pa.table({"text": documents}), path, row_group_size=4096)
    elif file_format == "jsonl":
        path = os.path.join(directory, "corpus.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in documents)
    else:
        path = os.path.join(directory, "corpus")
        os.makedirs(path)
        for index, document in enumerate(documents):
            with open(os.path.join(path, f"{index:07d}.txt"), "w") as f:
                f.write(document)
    return path


def run_fineweb(corpus, out, shard_size, num_proc):
    """Run fineweb.py as its own process; returns (wall seconds, CPU seconds of it and its workers, tokens written)."""
    command = [
        sys.executable,
        "fineweb.py",
        "--input",
        corpus,
        "--out",
        out,
        "--shard_size",
        str(shard_size),
        "--num_proc",
        str(num_proc),
    ]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode != 0:
        sys.exit(f"fineweb.py failed:\n{run.stderr}")
    with open(os.path.join(out, "edufineweb_progress.json")) as f:
        tokens = json.load(f)["tokens"]
    shutil.rmtree(out)
    return wall, cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime, tokens


def encode_timed(documents, encoding):
    """Encode the documents with encode_ordinary; returns (tokens, start time, end time)."""
    start = time.time()
    tokens = sum(len(encoding.encode_ordinary(d)) + 1 for d in documents)  # + 1: the EOT before each document
    return tokens, start, time.time()


def parallel_encoding_rate(documents, encoding, processes):
    """Tokens/s of `processes` processes encoding a share of the documents each, all at once, timed inside
    them: what the cores give together, with no writing and no passing of documents. On a shared or virtual
    machine this can be well below their number times one core's rate."""
    with multiprocessing.Pool(processes) as pool:
        results = pool.starmap(encode_timed, [(documents[share::processes], encoding) for share in range(processes)])
    return sum(tokens for tokens, _, _ in results) / (
        max(end for _, _, end in results) - min(start for _, start, _ in results)
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default="/work/shared/data/tinyshakespeare.txt", help="any English text file")
    parser.add_argument("--megabytes", type=float, default=64, help="size of the corpus")
    parser.add_argument(
        "--doc_chars", type=int, default=4000, help="characters per document (FineWeb-edu averages ~4500)"
    )
    parser.add_argument("--format", choices=["parquet", "jsonl", "txt"], default="parquet")
    parser.add_argument("--shard_size", type=int, default=10**7)
    parser.add_argument("--num_proc", type=int, default=available_cores())
    parser.add_argument("--repeat", type=int, default=3, help="measure everything this many times and keep the best")
    args = parser.parse_args()

    with open(args.text, encoding="utf-8") as f:
        documents = make_documents(f.read(), args.doc_chars, int(args.megabytes * 1e6))
    chars = sum(len(d) for d in documents)
    print(f"corpus: {len(documents):,} documents, {chars / 1e6:.1f} M characters from {args.text}, as {args.format}")
    encoding = gpt2_tokenizer()
    cores = available_cores()

    # The measurements take turns, so that all of them see the machine in the same moods; the best of each is kept.
    singles, parallels, runs, startups = [], [], [], []
    with tempfile.TemporaryDirectory() as directory:
        corpus = write_corpus(documents, directory, args.format)
        os.makedirs(os.path.join(directory, "tiny"))
        tiny = write_corpus(documents[:1], os.path.join(directory, "tiny"), args.format)
        for _ in range(args.repeat):
            cpu_start = time.process_time()
            tokens, start, end = encode_timed(documents, encoding)
            singles.append((end - start, time.process_time() - cpu_start))
            parallels.append(parallel_encoding_rate(documents, encoding, cores))
            runs.append(run_fineweb(corpus, os.path.join(directory, "shards"), args.shard_size, args.num_proc))
            startups.append(run_fineweb(tiny, os.path.join(directory, "shards"), args.shard_size, args.num_proc))
    single_seconds, single_cpu = min(singles)
    ceiling = cores * tokens / single_seconds
    wall, cpu, tokens_written = min(runs)
    assert tokens_written == tokens, (tokens_written, tokens)
    startup_wall, startup_cpu, _ = min(startups)
    steady = tokens / (wall - startup_wall) if wall > startup_wall else None

    print(
        f"ceiling: {cores} cores x {tokens / single_seconds / 1e6:.2f} M tokens/s (single-thread encode_ordinary) = {ceiling / 1e6:.2f} M tokens/s"
    )
    print(
        f"  for reference, {cores} processes encoding at once reach {max(parallels) / 1e6:.2f} M tokens/s = {100 * max(parallels) / ceiling:.0f}% of it here"
    )
    print(
        f"fineweb.py --num_proc {args.num_proc} (best of {args.repeat}): {tokens:,} tokens in {wall:.2f} s, {cpu:.2f} CPU seconds"
    )
    print(
        f"  whole process: {tokens / wall / 1e6:.2f} M tokens/s = {100 * tokens / wall / ceiling:.0f}% of the ceiling"
    )
    print(
        f"  start-up (a one-document corpus: Python, imports, tokenizer, pool): {startup_wall:.2f} s, {startup_cpu:.2f} CPU seconds"
    )
    if steady:  # else other programs disturbed the measurements too much: try a larger --repeat
        print(f"  after start-up: {steady / 1e6:.2f} M tokens/s = {100 * steady / ceiling:.0f}% of the ceiling")
    # CPU time is less disturbed than wall time when other programs share the machine.
    print(
        f"  CPU per token after start-up: {100 * single_cpu / (cpu - startup_cpu):.0f}% as efficient as single-thread encode_ordinary"
    )


if __name__ == "__main__":
    main()
