"""How fast fineweb.py turns text into shards, against what the tokenizer allows on this machine.

    python benchmarks/fineweb.py [--text /work/shared/data/tinyshakespeare.txt] [--megabytes 64]

Builds a corpus of --megabytes of text from --text (paragraphs grouped into documents of about
--doc_chars characters, the whole repeated), stored as parquet like FineWeb-edu (or jsonl / txt). The
ceiling is the number of cores times tiktoken's single-thread encode_ordinary throughput on the same
documents, with no file writing. Then fineweb.py runs as a subprocess on the corpus, and both its
whole-process throughput (wall clock from start to exit, Python start-up and imports included) and the
throughput it reports itself (from the start of main()) are printed as a share of the ceiling.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import pyarrow as pa
import pyarrow.parquet as pq

from fineweb import available_cores
from train_gpt2 import gpt2_tokenizer


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default="/work/shared/data/tinyshakespeare.txt", help="any English text file")
    parser.add_argument("--megabytes", type=float, default=64, help="size of the corpus")
    parser.add_argument("--doc_chars", type=int, default=4000, help="characters per document (FineWeb-edu averages ~4500)")
    parser.add_argument("--format", choices=["parquet", "jsonl", "txt"], default="parquet")
    parser.add_argument("--shard_size", type=int, default=10**7)
    parser.add_argument("--num_proc", type=int, default=available_cores())
    args = parser.parse_args()

    with open(args.text, encoding="utf-8") as f:
        documents = make_documents(f.read(), args.doc_chars, int(args.megabytes * 1e6))
    chars = sum(len(d) for d in documents)
    print(f"corpus: {len(documents):,} documents, {chars / 1e6:.1f} M characters from {args.text}, as {args.format}")

    encoding = gpt2_tokenizer()
    start, start_cpu = time.perf_counter(), time.process_time()
    tokens = sum(len(encoding.encode_ordinary(d)) + 1 for d in documents)  # + 1: the EOT before each document
    single_thread = tokens / (time.perf_counter() - start)
    single_thread_cpu = tokens / (time.process_time() - start_cpu)
    cores = available_cores()
    ceiling = cores * single_thread
    print(f"ceiling: {cores} cores x {single_thread / 1e6:.2f} M tokens/s (single-thread encode_ordinary) = {ceiling / 1e6:.2f} M tokens/s")

    with tempfile.TemporaryDirectory() as directory:
        corpus = write_corpus(documents, directory, args.format)
        out = os.path.join(directory, "shards")
        command = [sys.executable, "fineweb.py", "--input", corpus, "--out", out, "--shard_size", str(args.shard_size), "--num_proc", str(args.num_proc)]
        children_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        run = subprocess.run(command, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # fineweb.py and its workers
        cpu = after.ru_utime + after.ru_stime - children_cpu.ru_utime - children_cpu.ru_stime
        if run.returncode != 0:
            sys.exit(f"fineweb.py failed:\n{run.stderr}")
        with open(os.path.join(out, "edufineweb_progress.json")) as f:
            written = json.load(f)["tokens"]
    assert written == tokens, (written, tokens)
    reported = float(run.stdout.strip().splitlines()[-1].rsplit(", ", 1)[1].split()[0].replace(",", ""))
    print(f"fineweb.py --num_proc {args.num_proc}: {tokens:,} tokens in {wall:.2f} s")
    print(f"  whole process (start-up and imports included): {tokens / wall / 1e6:.2f} M tokens/s = {100 * tokens / wall / ceiling:.0f}% of the ceiling")
    print(f"  as reported by fineweb.py (from the start of main()): {reported / 1e6:.2f} M tokens/s = {100 * reported / ceiling:.0f}% of the ceiling")
    # CPU time is less disturbed than wall time by other programs running at the same time.
    print(
        f"  CPU time: {cpu:.2f} core-seconds, {tokens / cpu / 1e6:.2f} M tokens per core-second = "
        f"{100 * tokens / cpu / single_thread_cpu:.0f}% of encode_ordinary's {single_thread_cpu / 1e6:.2f} M (start-up included)"
    )


if __name__ == "__main__":
    main()
