"""Tokenize a text corpus into uint16 shards for train_gpt2.py: FineWeb-edu by default, or your own
files.

    python fineweb.py                                   # FineWeb-edu sample-10BT -> edu_fineweb10B/
    python fineweb.py --input my_corpus/ --out my_data  # local .txt, .jsonl and .parquet files

Each document becomes the end-of-text token 50256 and its GPT-2 tokens, laid end to end and cut into
shards of --shard_size tokens, uint16 arrays saved with np.save as build-nanogpt saves them:
edufineweb_val_000000.npy (the val split), edufineweb_train_000001.npy, ... (shard_... for --input).
A rerun after a crash or Ctrl-C resumes: documents are read in a fixed order, finished shards are
written atomically, and a progress file beside them counts the documents they hold, so the rerun
skips those and makes exactly the files an uninterrupted run would have made.
"""

import collections
import contextlib
import functools
import glob
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import signal
import sys
import time

import numpy as np
from tqdm import tqdm

from machinery.cli import ArgumentParser, UserError, run_cli
from machinery.files import atomic_write, output_lock
from machinery.memory import keep_freed_memory
from machinery.shards import SHARD_NAME
from machinery.tokenizer import EOT_TOKEN, gpt2_tokenizer

# -----------------------------------------------------------------------------
# Finding the input files: a folder stands for the .txt, .jsonl and .parquet files under it, sorted.

INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def find_input_files(paths):
    """The files named by --input, each kept once, where it first comes (named twice, its text
    could be in the val split and in train)."""
    files = []
    for path in paths:
        found = sorted(input_files_under(path, frozenset())) if os.path.isdir(path) else [path]
        if not found:
            problem = "the directory holds no .txt, .jsonl or .parquet files"
        elif not os.path.exists(path):
            problem = "no such file or directory"
        elif not found[0].endswith(INPUT_SUFFIXES):
            problem = "unsupported file type; use .txt (one document per file), .jsonl or .parquet"
        else:
            files += found
            continue
        raise UserError(f"--input {path}: {problem}")
    first_names = {}  # real path -> the name it first came by
    for path in files:
        real = os.path.realpath(path)
        if real in first_names:
            first = first_names[real]
            print(f"note: --input names {path} twice (first as {first}): it is tokenized once")
        else:
            first_names[real] = path
    return list(first_names.values())


def input_files_under(folder, above):
    """The input files under folder as glob lists them, 5 times faster on 15,000 files. A link to
    nowhere is refused (its file would be missing without a word); one that cannot be followed, or
    back to a folder it lies in (`above`: their real paths, whose files are listed), is left out."""
    real = os.path.realpath(folder)
    if real in above:
        return
    try:
        with os.scandir(folder) as listing:
            entries = list(listing)
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_symlink():
            try:
                os.stat(entry.path)
            except FileNotFoundError:
                raise UserError(
                    f"{entry.path} is a symbolic link to {os.readlink(entry.path)}, which does "
                    f"not exist: mount or copy what it points to, or remove the link"
                ) from None
            except OSError as e:
                print(f"note: {entry.path} cannot be followed ({e.strerror}): left out")
                continue
        if entry.is_dir():
            yield from input_files_under(entry.path, above | {real})
        elif entry.name.endswith(INPUT_SUFFIXES) and entry.is_file():
            yield entry.path


# -----------------------------------------------------------------------------
# Reading documents. The input is cut, in a fixed order, into pieces of about a megabyte: a few .txt
# files, lines of a jsonl file, or rows the main process read (of a parquet file or a Hugging Face
# dataset). A piece is (reader, *arguments); reader(*arguments) yields the text of each document.
# Workers read .txt and jsonl pieces themselves: parsing in the main process cost a tenth of the
# tokenizing, on cores the workers need. A resume leaves out the `skip` documents that finished
# shards hold: each file's planner returns what it did not skip.

PIECE_BYTES = 1 << 20


def first_line(error):
    """An exception's message cut to its first line, to quote it in a one-line error."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


@contextlib.contextmanager
def reading(path):
    """Input files are read all through a long run: one may be moved or deleted meanwhile."""
    try:
        yield
    except OSError as e:
        moved = (
            "; was it moved or deleted during the run?" if isinstance(e, FileNotFoundError) else ""
        )
        raise UserError(f"{path}: cannot read it ({e.strerror or e}){moved}") from None


def plan_pieces(files, text_field, skip=0, piece_bytes=PIECE_BYTES):
    """The pieces of the files in order, leaving out their first `skip` documents."""
    txt_files, txt_bytes = [], 0  # .txt files waiting to fill a piece
    for path in files:
        with reading(path):
            if path.endswith(".txt") and skip:  # a .txt file is one document
                skip -= 1
            elif path.endswith(".txt"):
                txt_files.append(path)
                txt_bytes += os.path.getsize(path)
            if txt_files and (txt_bytes >= piece_bytes or not path.endswith(".txt")):
                yield read_txt_files, txt_files  # full, or a piece of its own before another file
                txt_files, txt_bytes = [], 0
            if path.endswith(".jsonl"):
                skip = yield from plan_jsonl(path, text_field, skip, piece_bytes)
            elif path.endswith(".parquet"):
                skip = yield from plan_parquet(path, text_field, skip, piece_bytes)
    if txt_files:
        yield read_txt_files, txt_files


def read_txt_files(paths):
    return [read_txt(path) for path in paths]


def read_txt(path):
    """A .txt file's text as text mode reads it (a third faster), without a byte-order mark."""
    with reading(path), open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n").removeprefix("\ufeff")


def plan_jsonl(path, text_field, skip, piece_bytes):
    """A jsonl file's lines, about piece_bytes at a time, found and numbered here; the workers parse
    them. A piece of blank lines only is left out: every piece holds a document."""
    with open(path, "rb") as f:
        line_number = 1
        while skip and (line := f.readline()):
            if not line.isspace():
                skip -= 1
            line_number += 1
        start = f.tell()
        while block := f.read(piece_bytes):
            block += f.readline()  # up to the end of the line that the block cut
            if not block.isspace():
                yield read_jsonl_lines, path, text_field, start, start + len(block), line_number
            start += len(block)
            line_number += block.count(b"\n")
    return skip


def read_jsonl_lines(path, text_field, start, stop, first_line_number):
    with reading(path), open(path, "rb") as f:
        f.seek(start)
        lines = f.read(stop - start).split(b"\n")
    for line_number, line in enumerate(lines, start=first_line_number):
        if not line or line.isspace():  # not line.strip(), which copies every line to test it
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path} line {line_number}: not valid JSON ({e})") from None
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise UserError(
                f"{path} line {line_number}: no text in field "
                f"'{text_field}' (pick the field with --text_field)"
            )
        yield text


def check_column(name, columns, text_field):
    if text_field not in columns:
        raise UserError(
            f"{name}: no column '{text_field}' (columns: "
            f"{', '.join(columns)}); pick one with --text_field"
        )


def plan_parquet(path, text_field, skip, piece_bytes):
    """A parquet file's rows are read here, a batch at a time: a worker could only read whole row
    groups, of a thousand rows (FineWeb's) or a million (pyarrow's default), too few pieces."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable parquet file ({first_line(e)})") from None
    check_column(path, parquet.schema_arrow.names, text_field)
    if skip >= parquet.metadata.num_rows:
        return skip - parquet.metadata.num_rows
    yield from pieces_of_documents(parquet_rows(parquet, path, text_field, skip), piece_bytes)
    return 0


def parquet_rows(parquet, path, text_field, skip):
    import pyarrow as pa

    # The row groups that finished shards hold are skipped unread (skip is under the file's rows).
    group, row = 0, 0
    while skip >= (rows := parquet.metadata.row_group(group).num_rows):
        skip, row, group = skip - rows, row + rows, group + 1
    groups = range(group, parquet.num_row_groups)
    try:  # a damaged page, or a file moved meanwhile: reading goes on for as long as the run
        for batch in parquet.iter_batches(batch_size=1024, row_groups=groups, columns=[text_field]):
            yield from text_rows(batch.column(0).to_pylist()[skip:], path, text_field, row + skip)
            row, skip = row + batch.num_rows, max(0, skip - batch.num_rows)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path} from row {row}: cannot read it ({first_line(e)})") from None


def text_rows(texts, name, text_field, first_row):
    for row, text in enumerate(texts, start=first_row):
        if not isinstance(text, str):
            held = "null" if text is None else type(text).__name__  # int64 in parquet is int
            raise UserError(f"{name} row {row}: column '{text_field}' holds {held}, not text")
        yield text


def hf_documents(rows, dataset, text_field, skip=0):
    """The text of every row of a loaded Hugging Face dataset after its first `skip` rows."""
    if hasattr(rows, "__len__") and skip >= len(rows):  # Dataset.skip refuses to skip it all
        return iter(())
    texts = (text for batch in rows.skip(skip).iter(batch_size=1024) for text in batch[text_field])
    return text_rows(texts, dataset, text_field, skip)


def pieces_of_documents(documents, piece_chars=PIECE_BYTES):
    """The documents read here, in pieces of piece_chars or more (their reader: iter)."""
    piece, chars = [], 0
    for text in documents:
        piece.append(text)
        chars += len(text)
        if chars >= piece_chars:
            yield iter, piece
            piece, chars = [], 0
    if piece:
        yield iter, piece


# -----------------------------------------------------------------------------
# Tokenizing, in worker processes, a piece per task: big tasks keep the cost of handing out work
# small. A tokenizer maps a piece's texts to (ids, document_ends): an EOT and each text's tokens,
# end to end, and where each text's tokens end. GPT-2's ids (at most 50256) fit uint16.

EOT_TEXT = "<|endoftext|>"  # how tiktoken writes EOT_TOKEN in text


def available_cores():
    """The cores this process may run on (fewer than os.cpu_count() in a container, or taskset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def gpt2_encode(encoding, text, special=frozenset()):
    """GPT-2 ids of `text` as a uint32 array, special tokens other than `special` read as plain
    text. encode_to_numpy makes no Python int of each id: ~15% faster than encode_ordinary."""
    try:
        return encoding.encode_to_numpy(text, allowed_special=special, disallowed_special=())
    except UnicodeEncodeError:
        # lone surrogates (JSON allows them): repaired as encode_ordinary does
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return encoding.encode_to_numpy(text, allowed_special=special, disallowed_special=())


def tokenize_documents(texts, encode):
    """(ids, document_ends) of the texts with a tokenizer of one text at a time, encode(text)."""
    encoded = [np.asarray(encode(text), dtype=np.int64) for text in texts]
    ids = np.concatenate([part for document in encoded for part in ([EOT_TOKEN], document)])
    return ids, np.cumsum([1 + len(document) for document in encoded], dtype=np.int64)


def gpt2_tokenize(encoding, texts):
    """(ids, document_ends) of the texts, as encode_ordinary encodes each. One call on the texts
    joined by EOT markers (2% less CPU than a call each) gives each text the tokens it gets alone:
    tiktoken encodes between markers on its own. A text holding the marker would be cut there."""
    if any(EOT_TEXT in text for text in texts):
        return tokenize_documents(texts, functools.partial(gpt2_encode, encoding))
    ids = gpt2_encode(encoding, EOT_TEXT + EOT_TEXT.join(texts), special={EOT_TEXT})
    document_starts = np.flatnonzero(ids == EOT_TOKEN)  # no text holds the marker: the EOTs put in
    return ids, np.append(document_starts[1:], len(ids)).astype(np.int64)


worker_tokenize = None  # each worker's tokenizer, set once by init_worker: a task can't carry it


def init_worker(tokenize):
    global worker_tokenize
    worker_tokenize = tokenize
    # Ctrl-C, or a SIGTERM to the whole group (a container's stop): the main process stops the
    # pool; a worker killed while it sends ids back would leave the pool's result queue locked.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    keep_freed_memory()


def tokenize_piece(piece):
    """In a worker: read a piece's documents and tokenize them; (ids as uint16, document_ends)."""
    reader, *arguments = piece
    ids, document_ends = worker_tokenize(list(reader(*arguments)))
    return ids.astype(np.uint16), document_ends


def tokenize_in_order(pieces, pool, max_in_flight):
    """(ids, document_ends) of each piece in order, at most max_in_flight pieces out (Pool.imap
    would plan its whole input into memory when planning outruns tokenizing)."""
    in_flight = collections.deque()
    for piece in pieces:
        in_flight.append(pool.apply_async(tokenize_piece, (piece,)))
        if len(in_flight) > max_in_flight:
            yield in_flight.popleft().get()
    yield from (result.get() for result in in_flight)


# -----------------------------------------------------------------------------
# Writing shards, resumably. The progress file records the run's settings and, after each shard, how
# many documents the finished shards hold in full and how many tokens of the next one. A rerun with
# other settings is refused, so that shards of two different runs never mix.


def progress_path(out_dir, prefix):
    return os.path.join(out_dir, f"{prefix}_progress.json")


def temp_path(out_dir, prefix, name):  # hidden, and not named *_train_* or *_val_*: no shard
    return os.path.join(out_dir, f".{prefix}_{name}.tmp")


def input_key(path):
    """An input file's size and modification time to the nanosecond (rsync's quick check), and from
    64 KiB on a hash of its first and last MiB (catching a copy that kept the time). Hashing small
    files took 0.5 s of a 3.4 s run on 15,000 of 4 KB; a large file's costs under 1%."""
    edge = 1 << 20
    with reading(path):
        stat = os.stat(path)
        key = {"path": os.path.abspath(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if stat.st_size >= 1 << 16:
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read(edge))
                if stat.st_size > edge:  # and its last MiB, or what follows the first: none twice
                    f.seek(max(edge, stat.st_size - edge))
                    digest.update(f.read(edge))
            key["ends_sha256"] = digest.hexdigest()
    return key


def load_progress(out_dir, prefix, settings):
    """The progress of an earlier run with these settings in out_dir, or a fresh start."""
    path = progress_path(out_dir, prefix)
    for leftover in glob.glob(os.path.join(out_dir, f".{prefix}_*.tmp")):  # of a killed run
        os.remove(leftover)
    if not os.path.exists(path):
        if glob.glob(os.path.join(out_dir, f"{prefix}_*_*.npy")):
            raise UserError(
                f"{out_dir} already holds {prefix} shards but no {os.path.basename(path)} "
                f"saying how they were made; delete them or pass another --out"
            )
        fresh = {"settings": settings, "shards": 0, "documents": 0, "tokens_of_next_document": 0}
        return {**fresh, "tokens": 0, "finished": False}
    try:
        with open(path) as f:
            progress = json.load(f)
        old = progress["settings"]
    except (OSError, ValueError, TypeError, KeyError):  # unreadable, not JSON, or no settings
        raise UserError(
            f"{path} is damaged: delete it and the {prefix} shards "
            f"beside it to start over, or pass another --out"
        ) from None
    if old != settings:
        changed = ", ".join(
            describe_change(key, old.get(key), settings.get(key))
            for key in sorted(old.keys() | settings.keys())
            if old.get(key) != settings.get(key)
        )
        raise UserError(
            f"{out_dir} holds shards made with other settings ({changed}); "
            f"rerun with the same flags to resume, or pass another --out"
        )
    return progress


def describe_change(name, old, new):
    """A setting that changed, in words; for the input files, the first one that differs."""
    if name != "input":
        return f"{name} {old!r} -> {new!r}"
    for old_file, new_file in zip(old or [], new or []):
        if old_file.get("path") != new_file["path"]:
            return f"input {old_file.get('path')} -> {new_file['path']}"
        if old_file != new_file:
            return f"input {new_file['path']} changed since (its size, time or content)"
    return f"input {len(old) if old else 'no'} files -> {len(new) if new else 'no'} files"


def npy_header(tokens):
    """The header np.save writes before `tokens` uint16 values, padded so that the count can grow
    to 21 digits in place: a shard's header is written first and corrected at the end."""
    header, descr = io.BytesIO(), np.lib.format.dtype_to_descr(np.dtype(np.uint16))
    np.lib.format.write_array_header_1_0(
        header, {"descr": descr, "fortran_order": False, "shape": (tokens,)}
    )
    return header.getvalue()


class ShardWriter:
    """Lays pieces' tokens end to end into .npy shards, streamed into the open shard's temporary
    file (collected in memory, a shard's write and fsync came at the end, while the workers wait).
    atomic_write renames it when full; close() after an error or Ctrl-C removes it."""

    def __init__(self, out_dir, prefix, shard_size, progress):
        self.out_dir, self.prefix, self.shard_size = out_dir, prefix, shard_size
        self.progress = dict(progress)
        self.open_shard = contextlib.ExitStack()  # the atomic_write of the shard being filled
        self.shard_file, self.filled = None, 0  # the shard being filled, and its tokens
        self.documents = progress["documents"]  # documents added, counting earlier runs' ones
        self.skip_tokens = progress["tokens_of_next_document"]  # already in finished shards

    def close(self):
        # The run stopped for a reason of its own (an input, a dropped connection, Ctrl-C): the open
        # shard is removed with an error that atomic_write does not take for a failed write.
        self.open_shard.__exit__(Exception, Exception("shard abandoned"), None)

    def write(self, data):
        """A failed write (a full disk) ends the shard as atomic_write ends any, in one line."""
        try:
            self.shard_file.write(data)
        except OSError:
            self.open_shard.__exit__(*sys.exc_info())  # raises atomic_write's UserError
            raise

    def save_progress(self):
        # On one line: json's fast C encoder works only without indent, and the settings name every
        # input file: indented, the file cost more to write than thousands of small inputs to read.
        temp = temp_path(self.out_dir, self.prefix, "progress")
        with atomic_write(progress_path(self.out_dir, self.prefix), temp_path=temp) as f:
            f.write((json.dumps(self.progress, sort_keys=True) + "\n").encode())

    def add(self, ids, document_ends):
        """Add one piece: its documents' ids end to end, document i ending at document_ends[i]."""
        start, self.skip_tokens = self.skip_tokens, 0
        while start < len(ids):
            if self.shard_file is None:
                index = self.progress["shards"]
                if not os.path.exists(progress_path(self.out_dir, self.prefix)):  # settings first
                    os.makedirs(self.out_dir, exist_ok=True)
                    self.save_progress()
                split = "val" if index == 0 else "train"  # the first shard: val, as build-nanogpt
                path = os.path.join(self.out_dir, f"{self.prefix}_{split}_{index:06d}.npy")
                temp = temp_path(self.out_dir, self.prefix, f"{index:06d}")
                self.shard_file = self.open_shard.enter_context(atomic_write(path, temp_path=temp))
                self.write(npy_header(self.shard_size))
            taken = min(self.shard_size - self.filled, len(ids) - start)
            self.write(ids[start : start + taken])
            self.filled, start = self.filled + taken, start + taken
            if self.filled == self.shard_size:
                # the piece's documents done in full, and the tokens of the next one done
                whole = int(np.searchsorted(document_ends, start, side="right"))
                begun = start - (int(document_ends[whole - 1]) if whole else 0)
                self.finish_shard(self.documents + whole, begun)
        self.documents += len(document_ends)

    def finish_shard(self, documents, tokens_of_next_document):
        if self.filled < self.shard_size:  # the last shard: its header says how many tokens it has
            header = npy_header(self.filled)
            assert len(header) == len(npy_header(self.shard_size)), "it would move the tokens"
            self.shard_file.seek(0)
            self.write(header)
        self.open_shard.close()  # atomic_write: flush, fsync and rename the shard into place
        self.progress["shards"] += 1
        self.progress["tokens"] += self.filled
        self.progress.update(documents=documents, tokens_of_next_document=tokens_of_next_document)
        self.save_progress()
        self.shard_file, self.filled = None, 0


def write_shards(
    pieces, tokenize, out_dir, prefix, shard_size, num_proc, progress, start_method=None
):
    """Tokenize the pieces (from where `progress` left off) with up to num_proc workers, no more
    than there are cores or pieces, into shards; returns the final progress. `tokenize` is pickled
    under spawn (macOS, Windows): a module-level function or a functools.partial of one."""
    pieces = iter(pieces)
    first_pieces = list(itertools.islice(pieces, min(num_proc, available_cores())))
    if not first_pieces and progress["documents"] == 0:  # said before any worker starts
        raise UserError(
            "the corpus holds no documents; check --input (or --dataset, --name, --split)"
        )
    num_proc = max(1, len(first_pieces))
    writer = ShardWriter(out_dir, prefix, shard_size, progress)
    keep_freed_memory()  # here for the ids coming back (and parquet's rows), in each worker too
    # The pool first: under fork, its workers start before the bar's monitor thread (forking a
    # process that runs threads is unsafe).
    context = multiprocessing.get_context(start_method)
    pool = context.Pool(num_proc, initializer=init_worker, initargs=(tokenize,))
    bar = tqdm(initial=progress["tokens"], unit="tok", unit_scale=True, desc="tokenizing")
    try:
        with contextlib.closing(writer), bar:
            pieces = itertools.chain(first_pieces, pieces)
            for ids, document_ends in tokenize_in_order(pieces, pool, max_in_flight=2 * num_proc):
                already_written = writer.skip_tokens  # by an earlier run, for a resumed 1st piece
                writer.add(ids, document_ends)
                bar.update(len(ids) - already_written)
                bar.set_postfix(shards=writer.progress["shards"], refresh=False)
            writer.progress["finished"] = True
            if writer.filled:  # the last, shorter shard, saved with the run's final counts
                writer.finish_shard(writer.documents, 0)
            else:
                writer.save_progress()
            bar.set_postfix(shards=writer.progress["shards"])
    finally:
        # Not Pool's terminate (what `with pool` does): a worker it kills while it sends back ids
        # holds the result queue's lock for ever, and the pool's own shutdown then waits on that
        # lock (an error or Ctrl-C hung the run so). Closed, the workers finish the pieces handed
        # out (about a second), then exit.
        pool.close()
        pool.join()
    return writer.progress


# -----------------------------------------------------------------------------
# The command line.

SUMMARY = "{documents:,} documents, {tokens:,} tokens, {shards} shards"  # .format_map(progress)


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    methods = multiprocessing.get_all_start_methods()
    for flag, options, reason in [  # argparse's options for each flag, and its help
        ("--input", {"nargs": "+", "metavar": "PATH"}, "local .txt (one document each), .jsonl or "
         ".parquet files or directories; without it, --dataset is downloaded"),
        ("--out", {"default": "edu_fineweb10B"}, "directory for the shards (default: %(default)s)"),
        ("--prefix", {}, "shard names: PREFIX_val_000000.npy, PREFIX_train_000001.npy, ... "
         "(default: edufineweb for the download, shard for --input files, or the prefix of the run "
         "that --out holds)"),
        ("--shard_size", {"type": int, "default": 10**8},
         "tokens per shard, of 2 bytes each on disk (default: %(default)s)"),
        ("--num_proc", {"type": int, "default": available_cores()},
         "tokenizing processes (default: %(default)s, the cores this process may use)"),
        ("--start_method", {"choices": methods, "default": multiprocessing.get_start_method()},
         "how the tokenizing processes start; the shards are the same with any of them "
         "(default: %(default)s, this platform's)"),
        ("--dataset", {"default": "HuggingFaceFW/fineweb-edu"},
         "Hugging Face dataset to download when there is no --input (default: %(default)s)"),
        ("--name", {"default": "sample-10BT"}, "its configuration (default: %(default)s)"),
        ("--split", {"default": "train"}, "its split to tokenize (default: %(default)s)"),
        ("--streaming", {"action": "store_true"},
         "tokenize while downloading, without keeping the dataset on disk"),
        ("--text_field", {"default": "text"},
         "the JSON field or column that holds the text (default: %(default)s)"),
    ]:  # fmt: skip
        parser.add_argument(flag, help=reason, **options)
    args = parser.parse_args(argv)
    if args.shard_size < 1 or args.num_proc < 1:
        raise UserError("--shard_size and --num_proc must be at least 1")
    if not args.prefix:  # a rerun goes on with the run in --out, found by its progress file
        held = glob.glob(os.path.join(glob.escape(args.out), "*_progress.json"))
        if len(held) == 1:
            args.prefix = os.path.basename(held[0]).removesuffix("_progress.json")
        else:  # shard, which claims no corpus, for files
            args.prefix = "shard" if args.input else "edufineweb"
    # The trainer tells the splits apart by the word before the shard's number; a prefix naming a
    # split or a folder would make other loaders (build-nanogpt's glob of *_train_*) misread names.
    if not args.prefix or any(part in args.prefix for part in (os.sep, "_train", "_val")):
        raise UserError(
            f"--prefix {args.prefix!r}: use a plain name without '/', '_train' or '_val'"
        )
    return args


def load_hf_dataset(args):
    """The split of a Hugging Face dataset, downloaded now (or opened for streaming). Whatever stops
    it (no network, offline without a cache, an unknown name) is one line: it raises many types."""
    import datasets  # imported here: it takes a second to import and --input runs never need it

    try:
        rows = datasets.load_dataset(
            args.dataset, name=args.name, split=args.split, streaming=args.streaming
        )
    except Exception as e:
        raise UserError(
            f"could not load {args.dataset} ({args.name}, {args.split}) with the datasets library: "
            f"{first_line(e).rstrip('.')}. Without network, download its parquet files elsewhere "
            "and pass them with --input"
        ) from None
    if rows.column_names is not None:
        check_column(args.dataset, rows.column_names, args.text_field)
    return rows


def main(argv=None):
    args = parse_args(argv)
    settings = {"tokenizer": "gpt2", "shard_size": args.shard_size, "text_field": args.text_field}
    if args.input:
        files = find_input_files(args.input)
        settings["input"] = [input_key(path) for path in files]
    else:
        settings |= {key: vars(args)[key] for key in ("dataset", "name", "split", "streaming")}
    with output_lock(args.out, "--out"):  # one writer per folder; removed if this run makes nothing
        # The trainer reads one corpus per folder: shards of another prefix in --out are refused.
        for name in sorted(os.listdir(args.out)):
            match = SHARD_NAME.fullmatch(name)
            if match and match.group(1) != args.prefix:
                raise UserError(
                    f"--out {args.out} holds shards of another corpus ({name}), and "
                    f"the trainer reads one corpus per folder: pass an empty --out "
                    f"for this one, or --prefix {match.group(1)} to go on with that one"
                )
        start_time = time.perf_counter()
        progress = load_progress(args.out, args.prefix, settings)
        if progress["finished"]:
            print(f"{args.out} is already complete: {SUMMARY.format_map(progress)}")
            return
        if progress["shards"]:
            print(
                f"resuming after {progress['shards']} finished "
                f"shards ({progress['documents']:,} documents)"
            )
        if args.input:
            pieces = plan_pieces(files, args.text_field, skip=progress["documents"])
        else:
            documents = hf_documents(
                load_hf_dataset(args), args.dataset, args.text_field, progress["documents"]
            )
            pieces = pieces_of_documents(documents)
        tokenize = functools.partial(gpt2_tokenize, gpt2_tokenizer())
        tokens_before = progress["tokens"]
        progress = write_shards(
            pieces, tokenize, args.out, args.prefix, args.shard_size, args.num_proc, progress,
            start_method=args.start_method,
        )  # fmt: skip
    seconds, tokens = time.perf_counter() - start_time, progress["tokens"] - tokens_before
    print(
        f"{SUMMARY.format_map(progress)} in {args.out}; this run: {tokens:,} "
        f"tokens in {seconds:.1f} s, {tokens / seconds:,.0f} tokens/s"
    )
    if progress["tokens"] == progress["documents"]:  # each document added its EOT and nothing else
        print(
            "note: every document was empty: the shards hold "
            "end-of-text tokens only, nothing to train on"
        )


if __name__ == "__main__":
    run_cli(main, interrupted="finished shards are kept; run the same command again to resume")
