"""The command line of every script: the user-error type; run_cli, which says an error, Ctrl-C or
SIGTERM in one line; argparse's parser and help format; flag tables, with each number's range.
torch-free, and it imports nothing of this project: every script and module may build on it."""

import argparse
import errno
import math
import os
import signal
import sys

# -----------------------------------------------------------------------------
# Errors a user can fix (a bad flag, a missing file) are raised as UserError wherever they are
# found, and run_cli turns them into one line on stderr and exit status 1, never a traceback.


class UserError(Exception):
    """A mistake the user can fix: run_cli prints it as one line and exits 1."""


class DiskFull(UserError):
    """A write that found the disk full; `filename`: the file it was writing."""

    def __init__(self, message, filename):
        super().__init__(message)
        self.filename = filename


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the script is: it unwinds as on Ctrl-C (atomic writes drop a part)."""


def raise_terminated(signum, frame):
    raise Terminated


def run_cli(main, argv=None, interrupted=None, group=False):
    """main(argv) as a script's entry point: a UserError or OSError is `error: ...` and exit 1,
    Ctrl-C and SIGTERM one line (`interrupted` says what was kept) and exit 130 and 143, as a shell
    says them. group (torchrun's): an error is said once per machine, or by the rank that speaks."""
    signal.signal(signal.SIGTERM, raise_terminated)  # kill, a cluster's preemption: as Ctrl-C
    try:
        return main(argv)
    except UserError as e:
        message, speaks = str(e), getattr(e, "speaks", None)
    except OSError as e:
        message, speaks = os_error_line(e), None
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: one line, not a traceback
        terminated = isinstance(e, Terminated)
        said = f": {interrupted}" if interrupted else ""
        print(f"\n{'terminated' if terminated else 'interrupted'}{said}", file=sys.stderr)
        sys.exit(143 if terminated else 130)
    if speaks is None:  # an error every rank may meet alike (a missing folder): said per machine
        local_rank = os.environ.get("LOCAL_RANK", "0").strip()  # its first process says it
        speaks = not group or "TORCHELASTIC_RUN_ID" not in os.environ or local_rank in ("", "0")
    if speaks:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


# -----------------------------------------------------------------------------
# A failed read or write (an OSError) as one line that says what to do. The writes that matter are
# atomic (checkpoints, shards, progress files), so whatever was finished before a failure is intact.

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space left, a quota, a file-size limit
IN_THE_WAY = (
    "a file is in the way where this path needs a folder: pass another path, or move the file"
)
OS_ERRORS = {
    errno.EISDIR: "is a folder where a file is needed: move the folder, or pass another path",
    errno.ENOTDIR: IN_THE_WAY,
    errno.EEXIST: IN_THE_WAY,  # a file where a folder of the path should be
    errno.EROFS: "is on a read-only file system: pass a path on a disk this machine may write to",
    errno.EACCES: (
        "permission denied: change its permissions, or pass a path this user may read or write"
    ),
}


def os_error_line(error, path=None):
    """What a failed read or write of `path` (default: the error's own) says."""
    path = path or error.filename
    if error.errno in DISK_FULL:
        return (
            f"the disk is full{f' while writing {path}' if path else ''}: free some space and run "
            "the command again; the files finished before are intact on disk"
        )
    reason = OS_ERRORS.get(
        error.errno,
        f"{error.strerror or error}: check that the path exists and that this user may read or "
        "write it",
    )
    return f"{path}: {reason}" if path else reason


# -----------------------------------------------------------------------------
# argparse, its help page, and a table of flags made into arguments, each number in its range.


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose mistakes are a UserError (one line, exit 1), not a usage block."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows a flag's default, if any, after its reason, unless the reason names it."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_flags(parser, table, argv=None):
    """argv parsed with a table of flags, {group title: [(flag, default, reason[, range]), ...]},
    and each number checked against its range (a flag left at None is not). The default's type is
    the flag's; True makes a --flag/--no-flag pair (off: --no-flag), False a switch; a type (int,
    float, str, bool) means no default (bool: a --flag/--no-flag pair left at None); a tuple lists
    the choices, the first being the default; "[PATH]" an optional value, "latest" when left out."""
    for title, rows in table.items():
        group = parser.add_argument_group(title)
        for flag, default, reason, *_ in rows:
            if default == "[PATH]":
                how = dict(nargs="?", const="latest", default=None)
            elif default is True or default is bool:
                how = dict(action=argparse.BooleanOptionalAction, default=default is True or None)
            elif default is False:
                how = dict(action="store_true")
            elif isinstance(default, tuple):
                how = dict(default=default[0], choices=default)
            elif isinstance(default, type):
                how = dict(type=default, default=None)
            else:
                how = dict(type=type(default), default=default)
            group.add_argument(flag, help=reason, **how)
    args = parser.parse_args(argv)
    ranges = {row[0][2:]: row[3] for rows in table.values() for row in rows if len(row) == 4}
    for name, (test, must_be) in ranges.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and test(value)):
            raise UserError(f"--{name} must be a finite number, {must_be}; got {value}")
    return args


# A flag's range: what its value must pass, and how the error says it. float() accepts "nan" and
# "inf" (and "1e400", which overflows to inf), so every value must also be finite.
POSITIVE = (lambda value: value > 0, "positive")
AT_LEAST_0 = (lambda value: value >= 0, "at least 0")
BELOW_1 = (lambda value: 0 <= value < 1, "in [0, 1)")
# AdamW moves each weight by about the learning rate per step: above 1 no run can train, and far
# above it the update overflows float32 inside the optimizer.
UNIT = (lambda value: 0 <= value <= 1, "in [0, 1]")
SEED = (lambda value: 0 <= value < 2**63, "in [0, 2**63): torch's generators take 64-bit seeds")
