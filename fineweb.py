"""Tokenize a text corpus into uint16 shards for train_gpt2.py: FineWeb-edu by default, or your own
files.

    python fineweb.py                                   # HuggingFaceFW/fineweb-edu sample-10BT
                                                        # -> edu_fineweb10B/
    python fineweb.py --input my_corpus/ --out my_data  # local .txt, .jsonl and .parquet files

Every document becomes the end-of-text token 50256 followed by its GPT-2 tokens, and the documents
are laid end to end and cut into shards of --shard_size tokens: edufineweb_val_000000.npy (the
validation split), then edufineweb_train_000001.npy, ... (from --input files: shard_val_000000.npy,
...). Each shard is a numpy uint16 array saved with np.save, the layout build-nanogpt uses, so
existing data directories keep working.

The run is resumable: documents are always read in the same order, every finished shard is written
atomically, and a small progress file next to the shards records how many documents the finished
shards hold. Running the same command again after a crash or Ctrl-C skips those documents and
produces exactly the files an uninterrupted run would have produced.
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
# Finding the input files. A folder given to --input stands for the .txt, .jsonl and .parquet files
# in it and its subfolders, sorted by path. A link in it that points nowhere is refused: the file it
# stood for would be missing from the shards without a word. A link that cannot be followed (a loop
# of links, or a link back to a folder it lies in) is left out with one note: following it would
# find nothing, or the same files again and again.

INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def find_input_files(paths):
    """The files named by --input, each folder replaced by the input files under it, each file kept
    once, where it first comes (named twice, its text could be in the val split and in train)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(input_files_under(path, above=frozenset()))
            if not found:
                raise UserError(
                    f"--input {path}: the directory holds no .txt, .jsonl or .parquet files"
                )
            files += found
        elif not os.path.exists(path):
            raise UserError(f"--input {path}: no such file or directory")
        elif not path.endswith(INPUT_SUFFIXES):
            raise UserError(
                f"--input {path}: unsupported file type; use "
                f".txt (one document per file), .jsonl or .parquet"
            )
        else:
            files.append(path)
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
    """The input files in folder and its subfolders, hidden ones left out as glob does; `above`: the
    real paths of the folders that folder lies in. os.scandir tells files from folders without a
    stat call per file: 5 times faster than glob on 15,000 files. Like glob, it follows links to
    folders and leaves out a folder it may not read."""
    real = os.path.realpath(folder)
    if real in above:
        print(f"note: {folder} is a link back to {real}, a folder it lies in: left out")
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
# files, a range of lines of a jsonl file, or rows that the main process read itself (of a parquet
# file, or of a Hugging Face dataset). A piece is (reader, *arguments), and reader(*arguments)
# yields (where, text) for each of its documents in order; `where` names the file and line or row,
# so that a bad document can be reported precisely. The workers read .txt and jsonl pieces
# themselves: when the main process read and parsed all the text and sent it through a pipe, that
# cost a tenth of the tokenizing, on cores that the workers need. Pieces can start after any number
# of documents: that is how a resumed run jumps over the documents that finished shards hold.

PIECE_BYTES = 1 << 20


def first_line(error):
    """An exception's message cut to its first line, to quote it in a one-line error."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def cannot_read(path, error):
    """The error for an input file that cannot be read: they are read all through a long run."""
    moved = (
        "; was it moved or deleted during the run?" if isinstance(error, FileNotFoundError) else ""
    )
    return UserError(f"{path}: cannot read it ({error.strerror or error}){moved}")


def read_bytes(path, start=0, size=-1):
    """size bytes of an input file from byte start on (all of it by default)."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(size)
    except OSError as e:
        raise cannot_read(path, e) from None


def read_txt_files(paths):
    """A piece of .txt files, each one a document: its line ends made LF (from CRLF, and from a lone
    CR) as text mode does, a UTF-8 byte-order mark at its start dropped (.jsonl lines drop it too).
    Decoding the bytes whole takes a third less time than text mode: it matters with small files."""
    for path in paths:
        yield (path,), read_txt(path)


def read_txt(path):
    try:
        text = read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.removeprefix("\ufeff")


def read_jsonl_lines(path, text_field, start, stop, first_line_number):
    """A piece of a jsonl file: its lines in bytes start to stop, the first of them line
    first_line_number. Each line is a JSON object with the document in its `text_field`; blank lines
    are ignored."""
    lines = read_bytes(path, start, stop - start).split(b"\n")
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
        yield (path, "line", line_number), text


def plan_jsonl(path, text_field, skip, piece_bytes):
    """The pieces of a jsonl file after its first `skip` documents: whole lines, about piece_bytes
    at a time. The main process only finds where lines end and numbers them; the workers parse."""
    with open(path, "rb") as f:
        line_number = 1
        while skip:  # resuming: find the line after the last document that finished shards hold
            if not f.readline().isspace():
                skip -= 1
            line_number += 1
        start = f.tell()
        while block := f.read(piece_bytes):
            block += f.readline()  # up to the end of the line that the block cut
            yield read_jsonl_lines, path, text_field, start, start + len(block), line_number
            start += len(block)
            line_number += block.count(b"\n")


def read_parquet(path, text_field, skip):
    """The documents of a parquet file's `text_field` column after its first `skip` rows. This runs
    in the main process, which sends the rows on in pieces: a worker could only read whole row
    groups, and a group holds megabytes (FineWeb's hold a thousand documents) or far more (pyarrow
    writes a million rows to a group by default), too few pieces to keep every worker busy on a file
    of a few groups. Rows are read a batch at a time, so memory stays bounded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable parquet file ({first_line(e)})") from None
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise UserError(
            f"{path}: no column '{text_field}' (columns: "
            f"{', '.join(schema.names)}); pick one with --text_field"
        )
    # Plain strings, however Arrow stores them: as offsets, as views, or as a dictionary of repeated
    # values; all read as str.
    column_type = schema.field(text_field).type
    stored = column_type.value_type if pa.types.is_dictionary(column_type) else column_type
    if str(stored) not in ("string", "large_string", "string_view"):
        raise UserError(f"{path}: column '{text_field}' holds {column_type}, not text")
    # Row groups that the finished shards of an earlier run hold already are skipped unread.
    group, row = 0, 0
    while group < parquet.num_row_groups and skip >= (
        rows := parquet.metadata.row_group(group).num_rows
    ):
        skip, row, group = skip - rows, row + rows, group + 1
    groups = range(group, parquet.num_row_groups)

    def batches(row, skip):
        try:  # a damaged page, or a file moved meanwhile: reading goes on for as long as the run
            for batch in parquet.iter_batches(
                batch_size=1024, row_groups=groups, columns=[text_field]
            ):
                yield batch.column(0).to_pylist()[skip:]
                row, skip = row + batch.num_rows, max(0, skip - batch.num_rows)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path} from row {row}: cannot read it ({first_line(e)})") from None

    return text_rows(batches(row, skip), path, text_field, row + skip)


def text_rows(batches, name, text_field, row):
    """(where, text) of each row of `batches` (lists of a column's values), the first one numbered
    `row`: the rows of a parquet file or of a Hugging Face dataset."""
    for texts in batches:
        for text in texts:
            if not isinstance(text, str):
                null = " (null)" if text is None else ""
                raise UserError(f"{name} row {row}: no text in column '{text_field}'{null}")
            yield (name, "row", row), text
            row += 1


def load_hf_dataset(dataset, name, split, streaming, text_field):
    """The split of a Hugging Face dataset, downloaded now (or opened for streaming). Whatever stops
    it (no network, HF_HUB_OFFLINE=1 without the dataset in the cache, an unknown name) is one line:
    the library raises many different types."""
    import datasets  # imported here: it takes a second to import and --input runs never need it

    try:
        rows = datasets.load_dataset(dataset, name=name, split=split, streaming=streaming)
    except Exception as e:
        raise UserError(
            f"could not load {dataset} ({name}, {split}) with the "
            f"datasets library: {first_line(e).rstrip('.')}. Without network, download "
            f"its parquet files elsewhere and pass them with --input"
        ) from None
    if rows.column_names is not None and text_field not in rows.column_names:
        raise UserError(
            f"{dataset}: no column '{text_field}' (columns: "
            f"{', '.join(rows.column_names)}); pick one with --text_field"
        )
    return rows


def hf_documents(rows, dataset, text_field, skip=0):
    """(where, text) for every row of a loaded Hugging Face dataset after its first `skip` rows."""
    if hasattr(rows, "__len__") and skip >= len(rows):  # Dataset.skip refuses to skip it all
        return iter(())
    batches = (batch[text_field] for batch in rows.skip(skip).iter(batch_size=1024))
    return text_rows(batches, dataset, text_field, skip)


def given_documents(documents):
    """A piece that the main process read itself: its (where, text) pairs."""
    return documents


def pieces_of_documents(documents, piece_chars=PIECE_BYTES):
    """The (where, text) pairs that the main process read, in pieces of piece_chars or more."""
    piece, chars = [], 0
    for where, text in documents:
        piece.append((where, text))
        chars += len(text)
        if chars >= piece_chars:
            yield given_documents, piece
            piece, chars = [], 0
    if piece:
        yield given_documents, piece


def count_documents(path):
    """How many documents a file holds, without parsing them (to skip whole files on resume)."""
    if path.endswith(".txt"):
        return 1
    if path.endswith(".jsonl"):
        with open(path, "rb") as f:
            return sum(1 for line in f if not line.isspace())
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def plan_pieces(files, text_field, skip=0, piece_bytes=PIECE_BYTES):
    """The pieces of the files in order, leaving out their first `skip` documents."""
    txt_files, txt_bytes = [], 0  # .txt files waiting to fill a piece
    for path in files:
        try:  # this runs as long as the run does: a file may have been moved or deleted since
            if skip and skip >= (count := count_documents(path)):
                skip -= count
                continue
            if path.endswith(".txt"):
                txt_files.append(path)
                txt_bytes += os.path.getsize(path)
                if txt_bytes >= piece_bytes:
                    yield read_txt_files, txt_files
                    txt_files, txt_bytes = [], 0
                continue
            if txt_files:  # the .txt files before this file make a piece of their own
                yield read_txt_files, txt_files
                txt_files, txt_bytes = [], 0
            if path.endswith(".jsonl"):
                yield from plan_jsonl(path, text_field, skip, piece_bytes)
            else:
                yield from pieces_of_documents(read_parquet(path, text_field, skip), piece_bytes)
        except OSError as e:
            raise cannot_read(path, e) from None
        skip = 0
    if txt_files:
        yield read_txt_files, txt_files


# -----------------------------------------------------------------------------
# Tokenizing, in worker processes. A task is a piece of about a megabyte of text, which the worker
# reads (or receives) and answers with one uint16 array: big tasks keep the cost of handing out work
# small next to the tokenizing itself. The tokenizer is a function from a piece's texts to (ids,
# document_ends): an EOT and the tokens of each text, laid end to end, and where each text's tokens
# end. Any tokenizer of single texts can be plugged in through tokenize_documents; ids must fit in
# uint16, which is checked because a larger id would silently wrap around.

EOT_TEXT = "<|endoftext|>"  # how tiktoken writes EOT_TOKEN in text
EOT_ARRAY = np.array([EOT_TOKEN])


def available_cores():
    """The cores this process may run on (fewer than os.cpu_count() in a container, or taskset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def gpt2_encode(encoding, text, special=frozenset()):
    """GPT-2 ids of `text` as a uint32 array, special tokens other than those in `special` taken as
    plain text (as encode_ordinary does). encode_to_numpy hands the ids over as an array without
    making a Python int of each: ~15% faster than encode_ordinary and turning its list into one."""
    try:
        return encoding.encode_to_numpy(text, allowed_special=special, disallowed_special=())
    except UnicodeEncodeError:
        # lone surrogates (JSON allows them): repaired as encode_ordinary does
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return encoding.encode_to_numpy(text, allowed_special=special, disallowed_special=())


def tokenize_documents(texts, encode):
    """(ids, document_ends) of the texts with a tokenizer of one text at a time, encode(text)."""
    encoded = [np.asarray(encode(text)) for text in texts]
    parts = [part for document in encoded for part in (EOT_ARRAY, document)]
    # casting="unsafe" only so that an empty document's float64 np.asarray([]) joins in; ids are
    # checked later.
    ids = np.concatenate(parts, dtype=np.int64, casting="unsafe")
    return ids, np.cumsum([1 + len(document) for document in encoded], dtype=np.int64)


def gpt2_tokenize(encoding, texts):
    """(ids, document_ends) of the texts, each text's tokens those of encode_ordinary. The texts are
    joined by the end-of-text marker and encoded in one call that takes the marker for the EOT
    token. tiktoken encodes the text between two markers on its own, so each text gets the tokens it
    would get alone, with one call per piece instead of one per text: the workers' CPU time fell by
    2% on prose of 2 KB documents. A text that holds the marker itself, as plain text, would be cut
    there: a piece with one goes a text at a time."""
    if any(EOT_TEXT in text for text in texts):
        return tokenize_documents(texts, functools.partial(gpt2_encode, encoding))
    ids = gpt2_encode(encoding, EOT_TEXT + EOT_TEXT.join(texts), special={EOT_TEXT})
    document_starts = np.flatnonzero(ids == EOT_TOKEN)  # no text holds the marker: the EOTs put in
    return ids, np.append(document_starts[1:], len(ids)).astype(np.int64)


worker_tokenize = None  # each worker's tokenizer, set once by init_worker: a task can't carry it


def init_worker(tokenize):
    global worker_tokenize
    worker_tokenize = tokenize
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the main process stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the pool stops its workers with SIGTERM
    keep_freed_memory()


def tokenize_piece(piece):
    """In a worker: read a piece's documents and tokenize them; (ids as uint16, document_ends)."""
    reader, *arguments = piece
    wheres, texts = [], []
    for where, text in reader(*arguments):
        wheres.append(where)
        texts.append(text)
    if not texts:  # a piece of nothing but blank lines
        return np.empty(0, dtype=np.uint16), np.empty(0, dtype=np.int64)
    ids, document_ends = worker_tokenize(texts)
    if ids.max() >= 2**16 or ids.min() < 0:
        first_bad = np.flatnonzero((ids >= 2**16) | (ids < 0))[0]
        where = wheres[np.searchsorted(document_ends, first_bad, side="right")]
        raise UserError(
            f"{' '.join(map(str, where))}: the tokenizer made token id {ids[first_bad]}, which "
            f"does not fit the uint16 shards; use a tokenizer with fewer than 65536 tokens"
        )
    return ids.astype(np.uint16), document_ends


def tokenize_in_order(pieces, pool, max_in_flight):
    """(ids, document_ends) for each piece, in order, tokenized by the pool's workers. Pool.imap
    would keep the order too, but it plans its whole input ahead into memory whenever planning is
    faster than tokenizing; here at most max_in_flight pieces are out. An error that a worker raised
    (a bad line) is raised here, after the pieces before it are written."""
    in_flight = collections.deque()
    for piece in pieces:
        in_flight.append(pool.apply_async(tokenize_piece, (piece,)))
        if len(in_flight) > max_in_flight:
            yield in_flight.popleft().get()
    while in_flight:
        yield in_flight.popleft().get()


# -----------------------------------------------------------------------------
# Writing shards, resumably. The progress file records the settings of the run and, after each
# finished shard, how many documents the finished shards hold in full and how many tokens of the
# next document they already hold. A rerun with the same settings starts right there; one with other
# settings is refused, so that shards of two different runs never mix.

HASHED_INPUT_BYTES = 1 << 16  # input files from this size on are keyed by a hash of their ends too


def shard_path(out_dir, prefix, index):
    # The first shard is the validation split, as in build-nanogpt.
    split = "val" if index == 0 else "train"
    return os.path.join(out_dir, f"{prefix}_{split}_{index:06d}.npy")


def progress_path(out_dir, prefix):
    return os.path.join(out_dir, f"{prefix}_progress.json")


def temp_path(out_dir, prefix, name):
    # Hidden, and without "train" or "val" in the name: no data loader ever takes it for a shard.
    return os.path.join(out_dir, f".{prefix}_{name}.tmp")


def input_key(path):
    """What identifies an input file's content for a resume: its size, its modification time to the
    nanosecond (the quick check of rsync), and for a file of 64 KiB or more a hash of its first and
    last MiB, which catches even a copy that kept the original's time. A smaller file is not read
    for its key: on 15,000 .txt files of 4 KB, reading each one twice (to key it, then to tokenize
    it) took 0.5 s of a 3.4 s run, while hashing a large file's ends costs under 1% of its
    tokenizing."""
    edge = 1 << 20
    try:
        stat = os.stat(path)
        key = {"path": os.path.abspath(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if stat.st_size >= HASHED_INPUT_BYTES:
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read(edge))
                if stat.st_size > edge:  # and its last MiB, or what follows the first: none twice
                    f.seek(max(edge, stat.st_size - edge))
                    digest.update(f.read(edge))
            key["ends_sha256"] = digest.hexdigest()
    except OSError as e:
        raise cannot_read(path, e) from None
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
    except (OSError, ValueError):  # unreadable, or not JSON
        progress = None
    if not (isinstance(progress, dict) and "settings" in progress):  # written atomically: by hand?
        raise UserError(
            f"{path} is damaged: delete it and the {prefix} shards "
            f"beside it to start over, or pass another --out"
        )
    old = progress["settings"]
    for key in old.get("input") or []:  # a run of an earlier version hashed small files too
        if isinstance(key, dict) and key.get("bytes", HASHED_INPUT_BYTES) < HASHED_INPUT_BYTES:
            key.pop("ends_sha256", None)
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
    """One setting that differs between the earlier run and this one, in words; for the input files,
    the first one that differs rather than two lists of thousands."""
    if name != "input":
        return f"{name} {old!r} -> {new!r}"
    for old_file, new_file in zip(old or [], new or []):
        if old_file.get("path") != new_file["path"]:
            return f"input {old_file.get('path')} -> {new_file['path']}"
        if old_file != new_file:
            return f"input {new_file['path']} changed since (its size, time or content)"
    return f"input {len(old) if old else 'no'} files -> {len(new) if new else 'no'} files"


def save_progress(out_dir, prefix, progress):
    # On one line: json writes with its fast C encoder only without indent, and the settings name
    # every input file, so with thousands of small .txt files an indented file cost more to write
    # than the files to read.
    temp = temp_path(out_dir, prefix, "progress")
    with atomic_write(progress_path(out_dir, prefix), temp_path=temp) as f:
        f.write((json.dumps(progress, sort_keys=True) + "\n").encode())


def npy_header(tokens):
    """The header np.save writes before `tokens` uint16 values. numpy pads it so that the count can
    grow to 21 digits without changing its length: a shard's header is written first and corrected
    in place."""
    header = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(np.dtype(np.uint16))
    np.lib.format.write_array_header_1_0(
        header, {"descr": descr, "fortran_order": False, "shape": (tokens,)}
    )
    return header.getvalue()


class ShardAbandoned(Exception):
    """Told to the open shard's atomic_write when the run stops for a reason not its write."""


class ShardWriter:
    """Lays pieces' tokens end to end and cuts them into .npy shards of shard_size tokens. Each
    piece's tokens go straight into the shard's temporary file, while the workers tokenize the
    next pieces: collecting a whole shard in memory first left its write (and its fsync) for the
    end, when the workers wait. atomic_write renames the file once the shard is full; an error or
    Ctrl-C before then removes it (use the writer in a `with` block), and only a failed write of the
    shard is reported as one. After each shard the progress is saved."""

    def __init__(self, out_dir, prefix, shard_size, progress):
        self.out_dir, self.prefix, self.shard_size = out_dir, prefix, shard_size
        self.progress = dict(progress)
        self.open_shard = contextlib.ExitStack()  # the atomic_write of the shard being filled
        self.shard_file = None
        self.filled = 0  # tokens in the shard being filled
        self.documents = progress["documents"]  # documents added, counting earlier runs' ones
        self.skip_tokens = progress["tokens_of_next_document"]  # already in finished shards

    def __enter__(self):
        return self

    def __exit__(self, error_type, error, traceback):
        # The run stopped for a reason of its own (an input, a dropped connection, Ctrl-C), which
        # goes on to the user as it is. The shard being filled is abandoned: atomic_write removes
        # its file when told so with an error that it does not take for a failed write, as it would
        # an OSError.
        with contextlib.suppress(ShardAbandoned):
            self.open_shard.__exit__(ShardAbandoned, ShardAbandoned(), None)

    def write(self, data, offset=None):
        """Write data into the shard being filled (at offset, or at its end). A failed write (a full
        disk) ends it as atomic_write ends any: its file removed, and one line naming it."""
        try:
            if offset is not None:
                self.shard_file.seek(offset)
            self.shard_file.write(data)
        except OSError:
            self.open_shard.__exit__(*sys.exc_info())  # raises atomic_write's UserError
            raise

    def add(self, ids, document_ends):
        """Add one piece: its documents' ids end to end, document i ending at document_ends[i]."""
        start, self.skip_tokens = self.skip_tokens, 0
        while start < len(ids):
            if self.shard_file is None:
                self.start_shard()
            taken = min(self.shard_size - self.filled, len(ids) - start)
            self.write(ids[start : start + taken])
            self.filled += taken
            start += taken
            if self.filled == self.shard_size:
                # the piece's documents done in full, and the tokens of the next one done
                whole = int(np.searchsorted(document_ends, start, side="right"))
                begun = start - (int(document_ends[whole - 1]) if whole else 0)
                self.finish_shard(self.documents + whole, begun)
        self.documents += len(document_ends)

    def finish(self):
        """Finish the last, shorter shard, and the run (saved with the last shard's counts)."""
        self.progress["finished"] = True
        if self.filled:
            header = npy_header(self.filled)
            assert len(header) == len(npy_header(self.shard_size)), "it would move the tokens"
            self.write(header, offset=0)
            self.finish_shard(self.documents, 0)
        else:
            save_progress(self.out_dir, self.prefix, self.progress)

    def start_shard(self):
        index = self.progress["shards"]
        if not os.path.exists(progress_path(self.out_dir, self.prefix)):  # settings first on disk
            os.makedirs(self.out_dir, exist_ok=True)
            save_progress(self.out_dir, self.prefix, self.progress)
        temp = temp_path(self.out_dir, self.prefix, f"{index:06d}")
        write = atomic_write(shard_path(self.out_dir, self.prefix, index), temp_path=temp)
        self.shard_file = self.open_shard.enter_context(write)
        self.write(npy_header(self.shard_size))

    def finish_shard(self, documents, tokens_of_next_document):
        self.open_shard.close()  # atomic_write: flush, fsync and rename the shard into place
        self.shard_file = None
        self.progress["shards"] += 1
        self.progress["tokens"] += self.filled
        self.progress.update(documents=documents, tokens_of_next_document=tokens_of_next_document)
        save_progress(self.out_dir, self.prefix, self.progress)
        self.filled = 0


def write_shards(
    pieces, tokenize, out_dir, prefix, shard_size, num_proc, progress, start_method=None
):
    """Tokenize the pieces with up to num_proc workers into shards; returns the final progress.
    `pieces` must start where `progress` left off (plan_pieces(..., skip=progress["documents"])).
    `tokenize` goes to each worker once: under the spawn start method (macOS, Windows) it is
    pickled, so it must be a module-level function or a functools.partial of one, as gpt2_tokenize
    is. No more workers start than the cores can run, nor than there are pieces: the first pieces
    are planned now to count them. The shards are the same with any number of workers."""
    pieces = iter(pieces)
    first_pieces = list(itertools.islice(pieces, min(num_proc, available_cores())))
    num_proc = max(1, len(first_pieces))
    writer = ShardWriter(out_dir, prefix, shard_size, progress)
    keep_freed_memory()  # here for the ids coming back (and parquet's rows), in each worker too
    # The pool comes first: under fork its workers start before the bar starts its monitor thread
    # (forking a process that runs threads is unsafe).
    context = multiprocessing.get_context(start_method)
    pool = context.Pool(num_proc, initializer=init_worker, initargs=(tokenize,))
    bar = tqdm(initial=progress["tokens"], unit="tok", unit_scale=True, desc="tokenizing")
    with pool, writer, bar:
        pieces = itertools.chain(first_pieces, pieces)
        for ids, document_ends in tokenize_in_order(pieces, pool, max_in_flight=2 * num_proc):
            already_written = writer.skip_tokens  # by an earlier run, for a resumed first piece
            writer.add(ids, document_ends)
            bar.update(len(ids) - already_written)
            bar.set_postfix(shards=writer.progress["shards"], refresh=False)
        if writer.documents == 0:
            raise UserError(
                "the corpus holds no documents; check --input (or --dataset, --name, --split)"
            )
        writer.finish()
        bar.set_postfix(shards=writer.progress["shards"])
    return writer.progress


# -----------------------------------------------------------------------------
# The command line.


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
    return parser.parse_args(argv)


def default_prefix(out_dir, local_input):
    """The prefix of the shards that out_dir already holds (a rerun resumes them; from the val shard
    if the progress file is lost), else edufineweb for the FineWeb-edu download and a name that
    claims no corpus, shard, for local files."""
    for suffix in ["_progress.json", "_val_000000.npy"]:
        held = glob.glob(os.path.join(glob.escape(out_dir), "*" + suffix))
        if len(held) == 1:
            return os.path.basename(held[0]).removesuffix(suffix)
    return "shard" if local_input else "edufineweb"


def main(argv=None):
    args = parse_args(argv)
    args.prefix = args.prefix or default_prefix(args.out, args.input)
    if args.shard_size < 1 or args.num_proc < 1:
        raise UserError("--shard_size and --num_proc must be at least 1")
    # The trainer tells the splits apart by the word before the shard's number; a prefix that names
    # a split or a folder would make names other loaders (build-nanogpt's glob of *_train_*) read
    # wrongly.
    if not args.prefix or os.sep in args.prefix or "_train" in args.prefix or "_val" in args.prefix:
        raise UserError(
            f"--prefix {args.prefix!r}: use a plain name without '/', '_train' or '_val'"
        )
    settings = {"tokenizer": "gpt2", "shard_size": args.shard_size, "text_field": args.text_field}
    files = None
    if args.input:
        files = find_input_files(args.input)
        settings["input"] = [input_key(path) for path in files]
    else:
        settings.update(
            dataset=args.dataset, name=args.name, split=args.split, streaming=args.streaming
        )
    with output_lock(args.out, "--out"):  # one writer per folder; removed if this run makes nothing
        check_one_corpus(args.out, args.prefix)
        write_corpus(args, settings, files)


def check_one_corpus(out_dir, prefix):
    """The trainer reads one corpus per folder: shards of another prefix in --out are refused."""
    for name in sorted(os.listdir(out_dir)):
        match = SHARD_NAME.fullmatch(name)
        if match and match.group(1) != prefix:
            raise UserError(
                f"--out {out_dir} holds shards of another corpus ({name}), and "
                f"the trainer reads one corpus per folder: pass an empty --out "
                f"for this one, or --prefix {match.group(1)} to go on with that one"
            )


def write_corpus(args, settings, files):
    """Tokenize the corpus into args.out, resuming an earlier run with the same settings."""
    start_time = time.perf_counter()
    progress = load_progress(args.out, args.prefix, settings)
    if progress["finished"]:
        print(
            f"{args.out} is already complete: {progress['documents']:,} "
            f"documents, {progress['tokens']:,} tokens, {progress['shards']} shards"
        )
        return
    if progress["shards"]:
        print(
            f"resuming after {progress['shards']} finished "
            f"shards ({progress['documents']:,} documents)"
        )
    if files is not None:
        pieces = plan_pieces(files, args.text_field, skip=progress["documents"])
    else:
        rows = load_hf_dataset(args.dataset, args.name, args.split, args.streaming, args.text_field)
        pieces = pieces_of_documents(
            hf_documents(rows, args.dataset, args.text_field, skip=progress["documents"])
        )
    tokenize = functools.partial(gpt2_tokenize, gpt2_tokenizer())
    tokens_before = progress["tokens"]
    progress = write_shards(
        pieces, tokenize, args.out, args.prefix, args.shard_size, args.num_proc, progress,
        start_method=args.start_method,
    )  # fmt: skip

    seconds = time.perf_counter() - start_time
    tokens = progress["tokens"] - tokens_before
    print(
        f"{progress['documents']:,} documents, {progress['tokens']:,} tokens, "
        f"{progress['shards']} shards in {args.out}; this run: {tokens:,} "
        f"tokens in {seconds:.1f} s, {tokens / seconds:,.0f} tokens/s"
    )
    if progress["tokens"] == progress["documents"]:  # each document added its EOT and nothing else
        print(
            "note: every document was empty: the shards hold "
            "end-of-text tokens only, nothing to train on"
        )
    elif progress["shards"] == 1:
        print(
            f"note: the corpus filled only the val shard; for train shards too, "
            f"pass a --shard_size below {progress['tokens']:,} to a new --out"
        )


if __name__ == "__main__":
    run_cli(main, interrupted="finished shards are kept; run the same command again to resume")
