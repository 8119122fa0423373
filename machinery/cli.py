"""The command line of every script: the user-error type and run_cli, which turns one into a single
line and exit 1 (an OSError too, and Ctrl-C/SIGTERM into one line); argparse's parser and help
format; a table of flags made into arguments, with the range each numeric flag must lie in.

torch-free, and it imports nothing of this project: every script and module may build on it.
"""

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


def run_cli(main, argv=None, interrupted=None, group=False):
    """Call main(argv) as a script's entry point: a UserError, or an OSError (a path that cannot be
    read or written), becomes `error: ...` on stderr and exit 1; Ctrl-C becomes one line and exit
    130, and SIGTERM the same with exit 143 (as a shell reports them), so that a script unwinds and
    removes its partial files either way; `interrupted`, if given, is said after that line, to say
    what was kept. group: the script runs as a torchrun group (the trainer), where an error is said
    once per machine (by its LOCAL_RANK 0), or by the one rank whose UserError `speaks`; every
    other script speaks whatever the environment holds."""
    signal.signal(signal.SIGTERM, raise_terminated)  # kill, a cluster's preemption: as Ctrl-C
    try:
        return main(argv)
    except UserError as e:
        message, speaks = str(e), getattr(e, "speaks", None)
    except OSError as e:
        message, speaks = os_error_line(e), None
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: one line, not a traceback
        said = f": {interrupted}" if interrupted else ""
        print(
            f"\n{'terminated' if isinstance(e, Terminated) else 'interrupted'}{said}",
            file=sys.stderr,
        )
        sys.exit(143 if isinstance(e, Terminated) else 130)  # as a shell reports SIGTERM, SIGINT
    if speaks is None:
        speaks = not group or says_for_its_machine()
    if speaks:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def says_for_its_machine():
    """Whether this process says an error that each rank of a torchrun group may meet alike (a
    missing folder): under torchrun its LOCAL_RANK 0 does; a process started otherwise always
    speaks."""
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    return not under_torchrun or os.environ.get("LOCAL_RANK", "0").strip() in ("", "0")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose mistakes (an unknown flag, a missing value) are a UserError: one
    line and exit 1 like every other user error, not argparse's usage block and exit 2."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space left, a quota, a file-size limit


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the script is, so that it unwinds as on Ctrl-C (atomic writes discard
    their part)."""


def raise_terminated(signum, frame):
    raise Terminated


def os_error_line(error, path=None):
    """What a failed read or write (an OSError) of `path` (default: the error's own) says: a full
    disk, a file or folder where the other is needed, a read-only disk, a permission, or the
    system's reason."""
    # The writes that matter are atomic (checkpoints, shards, progress files), so whatever was
    # finished before a failure is intact.
    if error.errno in DISK_FULL:
        where = f" while writing {path or error.filename}" if path or error.filename else ""
        return (
            f"the disk is full{where}: free some space and run the command again; the files "
            "finished before are intact on disk"
        )
    where = f"{path or error.filename}: " if path or error.filename else ""
    if error.errno == errno.EISDIR:
        return f"{where}is a folder where a file is needed: move the folder, or pass another path"
    if error.errno in (errno.ENOTDIR, errno.EEXIST):  # a file where a folder of the path should be
        return (
            f"{where}a file is in the way where this path needs "
            f"a folder: pass another path, or move the file"
        )
    if error.errno == errno.EROFS:
        return (
            f"{where}is on a read-only file system: pass a path on a disk this machine may write to"
        )
    if error.errno == errno.EACCES:
        return (
            f"{where}permission denied: change its permissions, "
            f"or pass a path this user may read or write"
        )
    return (
        f"{where}{error.strerror or error}: check that the "
        f"path exists and that this user may read or write it"
    )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help lists each flag's default once: after its reason, unless the reason already names it
    or there is none to show."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_flags(parser, table):
    """Add a table of flags, {group title: [(flag, default, reason[, range]), ...]}, to a parser.
    The default's type is the flag's; True makes a --flag/--no-flag pair (off: --no-flag), False a
    switch; a type (int, float, str, bool) means no default (bool: a --flag/--no-flag pair left at
    None); a tuple lists the choices, the first being the default; "[PATH]" an optional value,
    "latest" when left out."""
    for title, rows in table.items():
        group = parser.add_argument_group(title)
        for flag, default, reason, *_ in rows:  # the range is checked by check_ranges
            if default == "[PATH]":
                group.add_argument(flag, nargs="?", const="latest", default=None, help=reason)
            elif default is True or default is bool:
                default = None if default is bool else True
                group.add_argument(
                    flag, action=argparse.BooleanOptionalAction, default=default, help=reason
                )
            elif default is False:
                group.add_argument(flag, action="store_true", help=reason)
            elif isinstance(default, tuple):
                group.add_argument(flag, default=default[0], choices=default, help=reason)
            elif isinstance(default, type):
                group.add_argument(flag, type=default, default=None, help=reason)
            else:
                group.add_argument(flag, type=type(default), default=default, help=reason)


# -----------------------------------------------------------------------------
# Numeric flags are checked against the range in their row of the flag table, not one `if` each.
# float() accepts "nan" and "inf" (and "1e400", which overflows to inf), so every value must also be
# finite.

POSITIVE = (lambda value: value > 0, "positive")
AT_LEAST_0 = (lambda value: value >= 0, "at least 0")
BELOW_1 = (lambda value: 0 <= value < 1, "in [0, 1)")
# AdamW moves each weight by about the learning rate per step: above 1 no run can train, and far
# above it the update overflows float32 inside the optimizer.
UNIT = (lambda value: 0 <= value <= 1, "in [0, 1]")
SEED = (lambda value: 0 <= value < 2**63, "in [0, 2**63): torch's generators take 64-bit seeds")


def check_ranges(args, table):
    """Refuse the first flag of a flag table (see add_flags) whose value fails its range's test or
    is not finite. A flag left at None (an optional one not given) is not checked."""
    ranges = {row[0][2:]: row[3] for rows in table.values() for row in rows if len(row) == 4}
    for name, (test, must_be) in ranges.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and test(value)):
            raise UserError(f"--{name} must be a finite number, {must_be}; got {value}")
