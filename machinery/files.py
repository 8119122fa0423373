"""Writing files so that nothing is lost: atomic writes, and the lock of an output folder so that
two runs never write one folder. torch-free: fineweb.py and plot_log.py use it too."""

import contextlib
import fcntl
import os
import socket

from machinery.cli import DISK_FULL, DiskFull, UserError, os_error_line

# -----------------------------------------------------------------------------
# One writer per output folder: two would overwrite each other's files and delete the other's
# half-written ones as stale. A writer holds an OS lock on <folder>/.lock while it writes; a second
# one is refused at once. The OS drops the lock when its process ends, even by SIGKILL. POSIX record
# locks (lockf), not flock: a child process (tokenizer workers, torch.compile's compilers) does not
# inherit them, so a worker that outlives a killed parent holds nothing. Not covered: two writers in
# one process, and network file systems without POSIX locks.

LOCK_NAME = ".lock"


@contextlib.contextmanager
def output_lock(folder, flag):
    """`with output_lock(folder, "--out"):` creates folder if needed and holds its lock for the
    block; at the end the lock file goes, and so do the folders it created if left empty."""
    if os.path.islink(folder) and not os.path.exists(folder):
        raise UserError(
            f"{flag} {folder} is a symbolic link to {os.readlink(folder)}, "
            f"which is no folder: point it at one, or pass another {flag}"
        )
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{flag} {folder} is a file, not a folder: pass a folder's path")
    created, parent = [], os.path.abspath(folder)  # the folders this block makes, deepest first
    while not os.path.isdir(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    try:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise UserError(f"{flag} {os_error_line(e, folder)}") from None
        path = os.path.join(folder, LOCK_NAME)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 200).decode(errors="replace").strip()
                os.close(fd)
                raise UserError(
                    f"{flag} {folder} is in use by another run (pid "
                    f"{holder or 'a process that is starting'}): wait for it to end, or pass "
                    f"another {flag}"
                ) from None
            # The holder removes the file just before it lets go: if the file we locked is no
            # longer at `path`, a newcomer may hold a new one there. Then try again on that one.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode())
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.remove(path)  # while still held: nobody else holds a file about to disappear
            os.close(fd)
    finally:
        for made in created:  # rmdir fails on a folder that is not empty: it stays
            with contextlib.suppress(OSError):
                os.rmdir(made)  # a refused run leaves no folder behind


# -----------------------------------------------------------------------------
# Atomic writes: a file is written beside its target, flushed to disk, then renamed over it, so that
# a crash, a kill or a full disk leaves either the old file or the new one, never a torn one.


@contextlib.contextmanager
def atomic_write(path, mode="wb", temp_path=None):
    """`with atomic_write(path) as f:` writes f to path only if the block finishes. A failed write
    (a full disk, a lost mount, a folder at path) removes the temporary file and raises a UserError
    naming path."""
    temp_path = temp_path or path + ".tmp"
    try:
        with open(temp_path, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: it never points at a torn file
        os.replace(temp_path, path)
    except (OSError, RuntimeError) as e:
        # torch.save reports a failed write as a RuntimeError, with the OSError as its context
        error = e if isinstance(e, OSError) else e.__context__
        if not isinstance(error, OSError):
            raise UserError(f"could not write {path}: is the disk full?") from None
        if error.errno in DISK_FULL:  # named by its target: the temporary file is gone
            raise DiskFull(os_error_line(error, path), path) from None
        raise UserError(
            f"could not write {os_error_line(error, path)} (any earlier {path} is intact)"
        ) from None
    finally:
        # after an error or Ctrl-C; a kill leaves the temporary file for the next run to remove
        with contextlib.suppress(OSError):
            os.remove(temp_path)


def in_folder(path, folder):
    """Whether the file `path` lies directly in `folder`, however either is spelled."""
    return os.path.realpath(os.path.dirname(os.path.abspath(path))) == os.path.realpath(folder)
