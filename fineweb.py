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
import fcntl
import functools
import glob
import hashlib
import io
import json
import multiprocessing
import os
import signal
import socket
import sys
import time
import urllib.parse

import numpy as np
from tqdm import tqdm

from machinery.cli import ArgumentParser, UserError, run_cli
from machinery.files import atomic_write, output_lock
from machinery.memory import keep_freed_memory
from machinery.shards import SHARD_NAME
from machinery.tokenizer import EOT_TOKEN, gpt2_tokenizer

# -----------------------------------------------------------------------------
# Reading documents. The input is cut, in a fixed order, into pieces of about a megabyte: a few .txt
# files, a range of lines of a jsonl file, or rows that the main process read itself (of a parquet
# file, or of a Hugging Face dataset). A piece is (reader, *arguments), and reader(*arguments)
# yields (where, text) for each of its documents in order; `where` names the file and line or row,
# so that a bad document can be reported precisely. The workers read .txt and jsonl pieces
# themselves: when the main process read and parsed all the text and sent it through a pipe, that
# cost a tenth of the tokenizing, on cores that the workers need. Pieces can start after any number
# of documents, which is how a resumed run jumps over the documents that finished shards already
# hold.

PIECE_BYTES = 1 << 20
INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def find_input_files(paths):
    """The files named by --input, with each directory replaced by the supported files inside it,
    sorted."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(input_files_under(path))
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
    return without_duplicates(files)


def without_duplicates(files):
    """files with each file kept once, where it first comes (named twice, a file's text could be in
    the val split and in train); a note names each one dropped."""
    first_name, kept = {}, []
    for path in files:
        real = os.path.realpath(path)
        if real in first_name:
            print(
                f"note: --input names {path} twice (first as "
                f"{first_name[real]}): it is tokenized once"
            )
        else:
            first_name[real] = path
            kept.append(path)
    return kept


def input_files_under(folder):
    """The .txt, .jsonl and .parquet files in folder and its subfolders, hidden ones left out as
    glob does. os.scandir tells files from folders without a stat call per file: 5 times faster than
    glob on 15,000 files. Like glob, it follows links to folders, and leaves out what it cannot read
    (a loop of links, a folder without permission)."""
    try:
        with os.scandir(folder) as listing:
            entries = list(listing)
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            is_folder = entry.is_dir()
            is_input = not is_folder and entry.name.endswith(INPUT_SUFFIXES) and entry.is_file()
        except OSError:
            continue
        if is_folder:
            yield from input_files_under(entry.path)
        elif is_input:
            yield entry.path


def first_line(error):
    """An exception's message cut to its first line, to quote it in a one-line error."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def describe(where):
    """('data.jsonl', 'line', 7) -> 'data.jsonl line 7'."""
    return " ".join(str(part) for part in where)


def cannot_read(path, error):
    """The error for an input file that could not be read; files are read throughout a run that may
    last hours."""
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


def read_txt(path):
    """A .txt file is one document, its line ends made LF (from CRLF, and from a lone CR), as text
    mode does, without a UTF-8 byte-order mark at its start.

    Reading bytes and decoding them whole takes a third less time than text mode, which matters with
    many small files.
    """
    data = read_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.removeprefix("\ufeff")  # a byte-order mark is no text (.jsonl lines drop it too)


def read_txt_files(paths):
    """A piece of .txt files, each one a document."""
    for path in paths:
        yield (path,), read_txt(path)


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


def given_documents(documents):
    """A piece that the main process read itself: its (where, text) pairs."""
    return documents


def plan_jsonl(path, text_field, skip, piece_bytes):
    """The pieces of a jsonl file after its first `skip` documents: whole lines, about piece_bytes
    at a time.

    The main process reads the file only to find where lines end and to number them; the workers
    parse them.
    """
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
    """The `text_field` column of a parquet file, read a batch of rows at a time so memory stays
    bounded.

    This runs in the main process, which sends the rows on in pieces: a worker could only read whole
    row groups, and a group holds megabytes (FineWeb's hold a thousand documents) or far more
    (pyarrow writes a million rows to a group by default), too few pieces to keep every worker busy
    on a file of a few groups.
    """
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
    if not holds_text(schema.field(text_field).type):
        raise UserError(
            f"{path}: column '{text_field}' holds {schema.field(text_field).type}, not text"
        )
    # Row groups that the finished shards of an earlier run already hold are skipped without being
    # read.
    group, row = 0, 0
    while group < parquet.num_row_groups and skip >= parquet.metadata.row_group(group).num_rows:
        skip -= parquet.metadata.row_group(group).num_rows
        row += parquet.metadata.row_group(group).num_rows
        group += 1
    if group == parquet.num_row_groups:
        return
    batches = parquet.iter_batches(
        batch_size=1024, row_groups=range(group, parquet.num_row_groups), columns=[text_field]
    )
    while True:
        try:  # a damaged page, or a file moved meanwhile: reading goes on for as long as the run
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path} from row {row}: cannot read it ({first_line(e)})") from None
        if batch is None:
            return
        for text in batch.column(0).to_pylist():
            if skip:
                skip -= 1
            elif text is None:
                raise UserError(f"{path} row {row}: no text in column '{text_field}' (null)")
            else:
                yield (path, "row", row), text
            row += 1


def holds_text(arrow_type):
    """Whether a parquet column holds plain strings, however Arrow stores them: as offsets (string,
    large_string), as views (string_view), or as a dictionary of repeated values; all read as
    str."""
    import pyarrow as pa

    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    is_string_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow 16 and later
    return (
        pa.types.is_string(arrow_type)
        or pa.types.is_large_string(arrow_type)
        or is_string_view(arrow_type)
    )


def pieces_of_documents(documents, piece_chars=PIECE_BYTES):
    """(where, text) pairs that the main process reads, grouped into pieces of at least piece_chars
    characters."""
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
    """How many documents a file holds, without parsing them (only needed to skip whole files on
    resume)."""
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
        # this runs as long as the run does: a file may have been moved or deleted since it started
        try:
            if skip:
                count = count_documents(path)
                if skip >= count:
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


def load_hf_dataset(dataset, name, split, streaming, text_field):
    """The split of a Hugging Face dataset, downloaded now (or opened for streaming); fails with one
    clear line."""
    unreachable = hub_unreachable()
    if unreachable:  # datasets would retry for half a minute before saying so
        raise UserError(
            f"{unreachable}, so {dataset} cannot be downloaded; pass local .parquet, .jsonl "
            f"or .txt files with --input (FineWeb-edu's parquet files, downloaded elsewhere)"
        )
    import datasets  # imported here: it takes a second to import and --input runs never need it

    try:
        rows = datasets.load_dataset(dataset, name=name, split=split, streaming=streaming)
    except Exception as e:  # no network, unknown name, ...: the library raises many different types
        raise UserError(
            f"could not load {dataset} ({name}, {split}) with the "
            f"datasets library: {first_line(e)}. Without network, download "
            f"its parquet files elsewhere and pass them with --input"
        ) from None
    if rows.column_names is not None and text_field not in rows.column_names:
        raise UserError(
            f"{dataset}: no column '{text_field}' (columns: "
            f"{', '.join(rows.column_names)}); pick one with --text_field"
        )
    return rows


def hub_unreachable(timeout=5):
    """Why the Hugging Face hub (HF_ENDPOINT, or huggingface.co) cannot be reached, or None: one
    connection tried, for a few seconds, to the hub or to the proxy that the environment names for
    it (a live proxy may still fail to reach the hub: only the download itself can tell)."""
    url = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    endpoint = urllib.parse.urlsplit(url)
    try:
        port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    except ValueError:  # a port that is not a number
        port = None
    if endpoint.scheme not in ("http", "https") or not endpoint.hostname or port is None:
        return (
            f"HF_ENDPOINT={url} is not a URL such as "
            f"https://huggingface.co (set it to the hub's, or unset it)"
        )
    from urllib.request import (
        getproxies,
        proxy_bypass,
    )  # here: 35 ms to import, and only a download needs them

    host, what = endpoint.hostname, "the Hugging Face hub"
    proxies = getproxies()  # HTTPS_PROXY, ALL_PROXY, ... as the download reads them
    proxy = proxies.get(endpoint.scheme) or proxies.get("all")
    if proxy and not proxy_bypass(endpoint.hostname):
        via = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        try:
            host, port, what = (
                via.hostname,
                via.port or (443 if via.scheme == "https" else 80),
                f"the proxy {proxy}",
            )
            if not host:
                raise ValueError(proxy)
        except ValueError:
            return (
                f"the proxy {proxy} is not a URL such as "
                f"http://host:3128 (fix or unset HTTPS_PROXY/ALL_PROXY)"
            )
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{what} ({host}:{port}) cannot be reached: {e.strerror or e}"
    return None


def offline_variable():
    """The variable (name=value) by which the user says that the Hugging Face hub is out of reach,
    or None."""
    for name in ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"]:
        value = os.environ.get(name, "")
        if value.upper() in {
            "1",
            "ON",
            "YES",
            "TRUE",
        }:  # the values huggingface_hub and datasets take for true
            return f"{name}={value}"
    return None


def hf_documents(rows, dataset, text_field, skip=0):
    """(where, text) for every row of a loaded Hugging Face dataset, leaving out the first `skip`
    rows."""
    if hasattr(rows, "__len__") and skip >= len(
        rows
    ):  # all done already: Dataset.skip refuses to skip it all
        return
    row = skip
    for batch in rows.skip(skip).iter(batch_size=1024):
        for text in batch[text_field]:
            if not isinstance(text, str):
                raise UserError(f"{dataset} row {row}: no text in column '{text_field}'")
            yield (dataset, "row", row), text
            row += 1


# -----------------------------------------------------------------------------
# Tokenizing, in worker processes. A task is a piece of about a megabyte of text, which the worker
# reads (or receives) and answers with one uint16 array: big tasks keep the cost of handing out work
# small next to the tokenizing itself. The tokenizer is a function from a piece's texts to (ids,
# document_ends): an EOT and the tokens of each text, laid end to end, and where each text's tokens
# end. Any tokenizer of single texts can be plugged in through tokenize_documents; ids must fit in
# uint16, which is checked because a larger id would silently wrap around.


def gpt2_encode(encoding, text):
    """GPT-2 ids of `text` as a uint32 array, special tokens treated as plain text (as
    encode_ordinary does).

    encode_to_numpy hands the ids over as an array without making a Python int of each, which makes
    it ~15% faster than encode_ordinary followed by turning its list into an array.
    """
    try:
        return encoding.encode_to_numpy(text, disallowed_special=())
    except (
        UnicodeEncodeError
    ):  # lone surrogates (JSON allows them): repair them as encode_ordinary does
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return encoding.encode_to_numpy(text, disallowed_special=())


EOT_ARRAY = np.array([EOT_TOKEN])


def tokenize_documents(texts, encode):
    """(ids, document_ends) of the texts with a tokenizer of one text at a time,
    encode(text) -> ids."""
    encoded = [np.asarray(encode(text)) for text in texts]
    parts = []
    for document in encoded:
        parts += [EOT_ARRAY, document]
    # casting="unsafe" only so that an empty document's float64 np.asarray([]) joins in; ids are
    # checked later.
    ids = np.concatenate(parts, dtype=np.int64, casting="unsafe")
    return ids, np.cumsum([1 + len(document) for document in encoded], dtype=np.int64)


EOT_TEXT = "<|endoftext|>"  # how tiktoken writes EOT_TOKEN in text


def gpt2_tokenize(encoding, texts):
    """(ids, document_ends) of the texts with GPT-2's tokenizer, each text's tokens those of
    encode_ordinary.

    The texts are joined by the end-of-text marker and encoded in one call that takes the marker for
    the EOT token. tiktoken encodes the text between two markers on its own, so each text gets the
    tokens it would get alone, with one call per piece instead of one per text: the workers' CPU
    time fell by 2% on prose of 2 KB documents. A text that holds the marker itself, as plain text,
    would be cut there: a piece with one goes a text at a time.
    """
    if any(EOT_TEXT in text for text in texts):
        return tokenize_documents(texts, functools.partial(gpt2_encode, encoding))
    joined = EOT_TEXT + EOT_TEXT.join(texts)
    try:
        ids = encoding.encode_to_numpy(joined, allowed_special={EOT_TEXT}, disallowed_special=())
    except (
        UnicodeEncodeError
    ):  # lone surrogates, as in gpt2_encode; the ASCII markers keep texts apart
        joined = joined.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        ids = encoding.encode_to_numpy(joined, allowed_special={EOT_TEXT}, disallowed_special=())
    document_starts = np.flatnonzero(
        ids == EOT_TOKEN
    )  # no text holds the marker, so these are the EOTs put in
    return ids, np.append(document_starts[1:], len(ids)).astype(np.int64)


worker_tokenize = (
    None  # each worker's tokenizer, set once by init_worker: a Pool task can't be given it cheaply
)


def init_worker(tokenize):
    global worker_tokenize
    worker_tokenize = tokenize
    signal.signal(
        signal.SIGINT, signal.SIG_IGN
    )  # Ctrl-C is handled by the main process, which stops the pool
    signal.signal(
        signal.SIGTERM, signal.SIG_DFL
    )  # the pool stops its workers with SIGTERM: they just end
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
            f"{describe(where)}: the tokenizer made token id {ids[first_bad]}, which "
            f"does not fit the uint16 shards; use a tokenizer with fewer than 65536 tokens"
        )
    return ids.astype(np.uint16), document_ends


# -----------------------------------------------------------------------------
# Writing shards, resumably. The progress file records the settings of the run and, after each
# finished shard, how many documents the finished shards hold in full and how many tokens of the
# next document they already hold. A rerun with the same settings starts right there; one with other
# settings is refused, so that shards of two different runs never mix.


def shard_path(out_dir, prefix, index):
    split = (
        "val" if index == 0 else "train"
    )  # the first shard is the validation split, as in build-nanogpt
    return os.path.join(out_dir, f"{prefix}_{split}_{index:06d}.npy")


def progress_path(out_dir, prefix):
    return os.path.join(out_dir, f"{prefix}_progress.json")


def temp_path(out_dir, prefix, name):
    # Hidden, and without "train" or "val" in the name, so no data loader ever mistakes it for a
    # shard.
    return os.path.join(out_dir, f".{prefix}_{name}.tmp")


HASHED_INPUT_BYTES = 1 << 16  # input files from this size on are keyed by a hash of their ends too


def load_progress(out_dir, prefix, settings):
    """The progress of an earlier run with these settings in out_dir, or a fresh start; refuses a
    mismatch."""
    fresh = {
        "settings": settings,
        "shards": 0,
        "documents": 0,
        "tokens_of_next_document": 0,
        "tokens": 0,
        "finished": False,
    }
    if not os.path.isdir(out_dir):
        return fresh
    for leftover in glob.glob(
        os.path.join(out_dir, f".{prefix}_*.tmp")
    ):  # from a run that was killed
        os.remove(leftover)
    if not os.path.exists(progress_path(out_dir, prefix)):
        if glob.glob(os.path.join(out_dir, f"{prefix}_*_*.npy")):
            raise UserError(
                f"{out_dir} already holds {prefix} shards but no "
                f"{os.path.basename(progress_path(out_dir, prefix))} saying "
                f"how they were made; delete them or pass another --out"
            )
        return fresh
    try:
        with open(progress_path(out_dir, prefix)) as f:
            progress = json.load(f)
    except (OSError, ValueError):  # unreadable, or not JSON
        progress = None
    if not (
        isinstance(progress, dict) and "settings" in progress
    ):  # it is written atomically: edited by hand?
        raise UserError(
            f"{progress_path(out_dir, prefix)} is damaged: delete it and the "
            f"{prefix} shards beside it to start over, or pass another --out"
        )
    for key in (
        progress["settings"].get("input") or []
    ):  # a run of an earlier version hashed small files too
        if isinstance(key, dict) and key.get("bytes", HASHED_INPUT_BYTES) < HASHED_INPUT_BYTES:
            key.pop("ends_sha256", None)
    if progress["settings"] != settings:
        old = progress["settings"]
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


def input_key(path):
    """What identifies an input file's content for a resume: its size, its modification time to the
    nanosecond (the quick check of rsync), and for a file of 64 KiB or more a hash of its first and
    last MiB, which catches even a copy that kept the original's time. A smaller file is not read
    for its key: on 15,000 .txt files of 4 KB, reading each one twice (to key it, then to tokenize
    it) took 0.5 s of a 3.4 s run, before any worker started, while hashing a large file's ends
    costs under 1% of tokenizing it."""
    edge = 1 << 20
    try:
        stat = os.stat(path)
        key = {"path": os.path.abspath(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if stat.st_size >= HASHED_INPUT_BYTES:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                digest.update(f.read(edge))
                if (
                    stat.st_size > edge
                ):  # and its last MiB, or what follows the first one, no byte read twice
                    f.seek(max(edge, stat.st_size - edge))
                    digest.update(f.read(edge))
            key["ends_sha256"] = digest.hexdigest()
    except OSError as e:
        raise cannot_read(path, e) from None
    return key


def describe_change(name, old, new):
    """One setting that differs between the earlier run and this one, in words; for the input files,
    the first one that differs rather than two lists of thousands."""
    if name != "input":
        return f"{name} {old!r} -> {new!r}"
    for old_file, new_file in zip(old or [], new or []):
        if old_file != new_file:
            if old_file.get("path") != new_file["path"]:
                return f"input {old_file.get('path')} -> {new_file['path']}"
            return f"input {new_file['path']} changed since (its size, time or content)"
    return f"input {len(old) if old else 'no'} files -> {len(new) if new else 'no'} files"


def save_progress(out_dir, prefix, progress):
    # On one line: json writes with its fast C encoder only without indent, and the settings name
    # every input file, so with thousands of small .txt files an indented file cost more to write
    # than the files to read.
    text = json.dumps(progress, sort_keys=True) + "\n"
    with atomic_write(
        progress_path(out_dir, prefix), temp_path=temp_path(out_dir, prefix, "progress")
    ) as f:
        f.write(text.encode())


def npy_header(tokens):
    """The header np.save writes before `tokens` uint16 values. numpy pads it so that the count can
    grow to 21 digits without changing its length, so a shard's header can be written first and
    corrected in place."""
    header = io.BytesIO()
    dtype = np.lib.format.dtype_to_descr(np.dtype(np.uint16))
    np.lib.format.write_array_header_1_0(
        header, {"descr": dtype, "fortran_order": False, "shape": (tokens,)}
    )
    return header.getvalue()


class ShardAbandoned(Exception):
    """Passed to the open shard's atomic_write when the run stops for another reason than the
    shard's write."""


class ShardWriter:
    """Lays pieces' tokens end to end and cuts them into shards of shard_size tokens, each one a
    .npy file.

    Each piece's tokens go straight into the shard's temporary file, while the workers tokenize the
    next pieces: collecting a whole shard in memory first left its write (and its fsync) for the
    end, when the workers wait. atomic_write renames the file once the shard is full; an error or
    Ctrl-C before then removes it (use the writer in a `with` block), and only a failed write of the
    shard is reported as one. After each shard the progress is saved: how many documents the
    finished shards hold in full, and how many tokens of the next document they hold already. A
    resumed writer starts there.
    """

    def __init__(self, out_dir, prefix, shard_size, progress):
        self.out_dir, self.prefix, self.shard_size = out_dir, prefix, shard_size
        self.progress = dict(progress)
        self.open_shard = (
            contextlib.ExitStack()
        )  # the atomic_write of the shard being filled, if one is
        self.shard_file = None
        self.filled = 0  # tokens in the shard being filled
        self.documents = progress[
            "documents"
        ]  # documents added so far, counting the ones of earlier runs
        self.skip_tokens = progress[
            "tokens_of_next_document"
        ]  # tokens of the first document in finished shards

    def __enter__(self):
        return self

    def __exit__(self, error_type, error, traceback):
        if error_type is None:
            return self.open_shard.__exit__(None, None, None)
        # The run stopped for a reason of its own (an input, a dropped connection, Ctrl-C), which
        # goes on to the user as it is. The shard being filled is abandoned: atomic_write removes
        # its file when told so with an error that it does not take for a failed write, as it would
        # an OSError.
        with contextlib.suppress(ShardAbandoned):
            self.open_shard.__exit__(ShardAbandoned, ShardAbandoned(), None)
        return False

    def write(self, data, offset=None):
        """Write data into the shard being filled, at offset or after what it holds. A failed write
        (a full disk) ends the shard as atomic_write ends any: its file removed, and one line that
        names it."""
        try:
            if offset is not None:
                self.shard_file.seek(offset)
            self.shard_file.write(data)
        except OSError:
            self.open_shard.__exit__(*sys.exc_info())  # raises atomic_write's UserError
            raise

    def add(self, ids, document_ends):
        """Add one piece: ids holds its documents one after another, document i ends at
        document_ends[i]."""
        start, self.skip_tokens = self.skip_tokens, 0
        while start < len(ids):
            if self.shard_file is None:
                self.start_shard()
            taken = min(self.shard_size - self.filled, len(ids) - start)
            self.write(ids[start : start + taken])
            self.filled += taken
            start += taken
            if self.filled == self.shard_size:
                whole = int(
                    np.searchsorted(document_ends, start, side="right")
                )  # documents of the piece done
                begun = start - (
                    int(document_ends[whole - 1]) if whole else 0
                )  # tokens of the next one done
                self.finish_shard(self.documents + whole, begun)
        self.documents += len(document_ends)

    def finish(self):
        """Finish the last, shorter shard and mark the run finished."""
        self.progress["finished"] = (
            True  # saved with the last shard's counts: the progress is written once, not twice
        )
        if self.filled:
            header = npy_header(self.filled)
            assert len(header) == len(npy_header(self.shard_size)), (
                "a shorter header would move the tokens"
            )
            self.write(header, offset=0)
            self.finish_shard(self.documents, 0)
        else:
            save_progress(self.out_dir, self.prefix, self.progress)

    def start_shard(self):
        index = self.progress["shards"]
        if not os.path.exists(
            progress_path(self.out_dir, self.prefix)
        ):  # the settings go on disk before any shard
            os.makedirs(self.out_dir, exist_ok=True)
            save_progress(self.out_dir, self.prefix, self.progress)
        write = atomic_write(
            shard_path(self.out_dir, self.prefix, index),
            temp_path=temp_path(self.out_dir, self.prefix, f"{index:06d}"),
        )
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


PIPE_BYTES = (
    1 << 20
)  # the most an unprivileged process may give a pipe on Linux (/proc/sys/fs/pipe-max-size)


def widen_pipes(pool):
    """Give the pool's two pipes (tasks in, results out) room for a whole piece, where the system
    allows it.

    A pipe holds 64 KB on Linux, so a worker handing back a piece's ids (about 500 KB) had to wait
    for the main process to read them 64 KB at a time, instead of tokenizing its next piece; a
    parquet piece's text going out did the same. With 1 MB pipes the steady rate rose by 0.01-0.05
    of the bare pool's on each of the five corpora tried. Pool offers no public way to its pipes: on
    a Python or a system without these attributes, this does nothing and only speed is lost.
    """
    if not hasattr(fcntl, "F_SETPIPE_SZ"):  # Linux only
        return
    for queue in (pool._inqueue, pool._outqueue):
        with contextlib.suppress(
            AttributeError, OSError
        ):  # OSError: a system whose pipe-max-size is lower
            fcntl.fcntl(queue._reader.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)


def tokenize_in_order(pieces, pool, max_in_flight):
    """(ids, document_ends) for each piece, in order, tokenized by the pool's workers.

    Pool.imap would also keep the order, but it plans its whole input ahead into memory whenever
    planning is faster than tokenizing; here at most max_in_flight pieces are handed out and not yet
    answered. An error that a worker raised (a bad line) is raised here, after the pieces before it
    are written.
    """
    in_flight = collections.deque()
    for piece in pieces:
        in_flight.append(pool.apply_async(tokenize_piece, (piece,)))
        if len(in_flight) > max_in_flight:
            yield in_flight.popleft().get()
    while in_flight:
        yield in_flight.popleft().get()


def write_shards(
    pieces, tokenize, out_dir, prefix, shard_size, num_proc, progress, start_method=None
):
    """Tokenize the pieces with num_proc workers into shards; returns the final progress.

    `pieces` must start where `progress` left off (plan_pieces(..., skip=progress["documents"])).
    `tokenize` goes to each worker once: under the spawn start method (macOS, Windows) it is
    pickled, so it must be a module-level function or a functools.partial of one, as gpt2_tokenize
    is.
    """
    writer = ShardWriter(out_dir, prefix, shard_size, progress)
    # here for the ids coming back (and parquet's rows); init_worker does it in each worker
    keep_freed_memory()
    # The pool comes first: under fork its workers start before the bar starts its monitor thread
    # (forking a process that runs threads is unsafe).
    context = multiprocessing.get_context(start_method)
    pool = context.Pool(num_proc, initializer=init_worker, initargs=(tokenize,))
    widen_pipes(pool)
    with (
        pool,
        writer,
        tqdm(initial=progress["tokens"], unit="tok", unit_scale=True, desc="tokenizing") as bar,
    ):
        for ids, document_ends in tokenize_in_order(pieces, pool, max_in_flight=2 * num_proc):
            tokens_written_before = (
                writer.skip_tokens
            )  # by an earlier run, for the first piece of a resumed one
            writer.add(ids, document_ends)
            bar.update(len(ids) - tokens_written_before)
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


def available_cores():
    """The cores this process may run on (fewer than os.cpu_count() in a container or under
    taskset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="local .txt (one document each), .jsonl or .parquet "
        "files or directories; without it, --dataset is downloaded",
    )
    parser.add_argument(
        "--out", default="edu_fineweb10B", help="directory for the shards (default: %(default)s)"
    )
    parser.add_argument(
        "--prefix",
        help="shard names: PREFIX_val_000000.npy, PREFIX_train_000001.npy, "
        "... (default: edufineweb for the download, shard for "
        "--input files, or the prefix of the run that --out holds)",
    )
    parser.add_argument(
        "--shard_size",
        type=int,
        default=10**8,
        help="tokens per shard, of 2 bytes each on disk (default: %(default)s)",
    )
    parser.add_argument(
        "--num_proc",
        type=int,
        default=available_cores(),
        help="tokenizing processes (default: %(default)s, the cores this process may use)",
    )
    parser.add_argument(
        "--start_method",
        choices=multiprocessing.get_all_start_methods(),
        default=multiprocessing.get_start_method(),
        help="how the tokenizing processes start; the shards are the "
        "same with any of them (default: %(default)s, this platform's)",
    )
    parser.add_argument(
        "--dataset",
        default="HuggingFaceFW/fineweb-edu",
        help="Hugging Face dataset to download when there is no --input (default: %(default)s)",
    )
    parser.add_argument(
        "--name", default="sample-10BT", help="its configuration (default: %(default)s)"
    )
    parser.add_argument(
        "--split", default="train", help="its split to tokenize (default: %(default)s)"
    )
    parser.add_argument(
        "--streaming",
        action="store_true",
        help="tokenize while downloading, without keeping the dataset on disk",
    )
    parser.add_argument(
        "--text_field",
        default="text",
        help="the JSON field or column that holds the text (default: %(default)s)",
    )
    return parser.parse_args(argv)


def default_prefix(out_dir, local_input):
    """The prefix of the shards that out_dir already holds (a rerun resumes them), else edufineweb
    for the FineWeb-edu download and a name that claims no corpus, shard, for local files."""
    held = sorted(glob.glob(os.path.join(glob.escape(out_dir), "*_progress.json")))
    if len(held) == 1:
        return os.path.basename(held[0]).removesuffix("_progress.json")
    val_shards = sorted(
        glob.glob(os.path.join(glob.escape(out_dir), "*_val_000000.npy"))
    )  # progress file lost
    if len(val_shards) == 1:
        return os.path.basename(val_shards[0]).removesuffix("_val_000000.npy")
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
    if (
        not args.input and offline_variable()
    ):  # before datasets spends seconds importing and retrying
        raise UserError(
            f"{offline_variable()} says there is no network, so {args.dataset} "
            f"cannot be downloaded; pass local .parquet, .jsonl or .txt files "
            f"with --input (FineWeb-edu's parquet files, downloaded elsewhere)"
        )

    settings = {"tokenizer": "gpt2", "shard_size": args.shard_size, "text_field": args.text_field}
    if args.input:
        files = find_input_files(args.input)
        settings["input"] = [input_key(path) for path in files]
    else:
        settings.update(
            dataset=args.dataset, name=args.name, split=args.split, streaming=args.streaming
        )
    with output_lock(
        args.out, "--out"
    ):  # one writer per folder; removed again if this run makes nothing
        check_one_corpus(args.out, args.prefix)
        write_corpus(args, settings, files if args.input else None)


def check_one_corpus(out_dir, prefix):
    """The trainer reads one corpus per folder: shards of another prefix in --out are refused, not
    added to."""
    for name in sorted(os.listdir(out_dir)):
        match = SHARD_NAME.fullmatch(name)
        if match and match.group(1) != prefix:
            raise UserError(
                f"--out {out_dir} holds shards of another corpus ({name}), and "
                f"the trainer reads one corpus per folder: pass an empty --out "
                f"for this one, or --prefix {match.group(1)} to go on with that one"
            )


def write_corpus(args, settings, files):
    """Tokenize the corpus into args.out, resuming an earlier run with the same settings; prints
    what it did."""
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
    if args.input:
        pieces = plan_pieces(files, args.text_field, skip=progress["documents"])
    else:
        rows = load_hf_dataset(args.dataset, args.name, args.split, args.streaming, args.text_field)
        pieces = pieces_of_documents(
            hf_documents(rows, args.dataset, args.text_field, skip=progress["documents"])
        )
    tokenize = functools.partial(gpt2_tokenize, gpt2_tokenizer())
    tokens_before = progress["tokens"]
    progress = write_shards(
        pieces,
        tokenize,
        args.out,
        args.prefix,
        args.shard_size,
        args.num_proc,
        progress,
        start_method=args.start_method,
    )

    seconds = time.perf_counter() - start_time
    tokens = progress["tokens"] - tokens_before
    print(
        f"{progress['documents']:,} documents, {progress['tokens']:,} tokens, "
        f"{progress['shards']} shards in {args.out}; this run: {tokens:,} "
        f"tokens in {seconds:.1f} s, {tokens / seconds:,.0f} tokens/s"
    )
    if (
        progress["tokens"] == progress["documents"]
    ):  # each document added its end-of-text token and nothing else
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
