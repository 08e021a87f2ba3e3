"""Output folders: checked before any slow work, locked while a run uses them, and filesystem
errors on them turned into one line.

* :func:`check_writable_dir`: ``--out`` that is a file, under a file, or on a read-only or
  unwritable filesystem is a one-line error before data or models are loaded.
* :class:`RunLock`: ``<run_dir>/.lock`` held with ``fcntl.flock`` for the whole run; the holder's
  pid, host, command and start time are written into it, and a second run into the same folder
  fails at once naming them. The kernel releases the lock when its process dies (even SIGKILL),
  so a lock left by a dead run never blocks the rerun that resumes it. The lock covers the folders
  inside the run directory too: a command whose folder lies inside a locked run directory (its
  ``prune/``, or deeper) is refused naming the run, and a run does not start while a command holds
  the lock of one of its stage folders (the direct subfolders). The run's own stages lock their
  folders inside :meth:`RunLock.stages`.
* :func:`os_error_message`: the one line for an ``OSError`` met while writing outputs (the run
  folder's writers, :mod:`curlprune.store.rundir`, give such errors the file's name).
* :func:`remove_orphans`: the temporary files of writes that a kill interrupted
  (``.<name>.<random>.tmp`` of :func:`curlprune.store.rundir.atomic_write`) are removed when a command
  takes the folder's lock again, so a resumed run leaves none behind (issue 18).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from curlprune.errors import CurlpruneError

LOCK_FILE = ".lock"
# the temporary files of curlprune.store.rundir.atomic_write: mkstemp(prefix=".<name>.", suffix=".tmp"), 8 random characters
ORPHAN_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")

# lock files of run directories whose own stages are running in this context (RunLock.stages)
_OWN_STAGES: ContextVar[frozenset[str]] = ContextVar("curlprune_own_stages", default=frozenset())

# errors that come from the environment (disk, permissions, paths), not from a bug
OUTPUT_ERRNOS = {
    errno.ENOSPC: "the disk is full: free some space or choose another --out",
    errno.EDQUOT: "the disk quota is exhausted: free some space or choose another --out",
    errno.EFBIG: "the file is too large for this filesystem: choose another --out",
    errno.EROFS: "the filesystem is read-only: choose a writable --out",
    errno.EACCES: "permission denied: choose a folder you can write to",
    errno.EPERM: "operation not permitted: choose a folder you can write to",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "it is a folder, not a file: choose a file path",
    errno.EEXIST: "it already exists as a file: choose another path",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
    errno.EIO: "the disk reported an input/output error: check the disk",
}


def os_error_message(exc: OSError) -> str | None:
    """One line for an environmental ``OSError`` (disk full, read-only, permissions, bad path).

    Args:
        exc: the error; its ``filename`` (set by :mod:`curlprune.store.rundir`'s writers) is named.
    Returns:
        "cannot write <path>: <what happened and what to do>", or None for other errors (those are
        bugs and stay loud).
    """
    advice = OUTPUT_ERRNOS.get(exc.errno)
    if advice is None:
        return None
    path = exc.filename if exc.filename is not None else "an output file"
    if exc.filename2 is not None:
        path = f"{exc.filename2} (from {exc.filename})"
    return f"cannot write {path}: {advice}"


def check_named(path: str | os.PathLike, what: str = "--out") -> None:
    """Refuse an output folder given as an empty string (``--out "$OUT"`` with OUT unset), which
    ``Path`` would take as the current folder.

    Raises:
        CurlpruneError: ``path`` is empty or blank.
    """
    if isinstance(path, str) and not path.strip():
        raise CurlpruneError(f"{what} is empty: name the output folder, e.g. runs/p ('.' for the current folder)")


def check_writable_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Check that ``path`` is (or can be created as) a folder this process can write into.

    Nothing is left behind: a probe file is created in the nearest existing folder and removed.

    Args:
        path: the output folder (``--out``).
        what: how the message names it.
    Returns:
        ``path`` as a Path.
    Raises:
        CurlpruneError: naming the path and what to do when it is an existing file, lies under a
            file, or its filesystem is read-only or not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CurlpruneError(f"{what} {path} is an existing file, not a folder: choose a folder path (or move the file away)")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise CurlpruneError(f"{what} {path} lies under {existing}, which is a file, not a folder: choose another path")
    reason = _probe(existing)
    if reason:
        raise CurlpruneError(f"{what} {path} cannot be written ({existing}: {reason})")
    return path


def check_writable_file(path: str | os.PathLike, what: str = "output") -> Path:
    """Check that the file ``path`` can be written: not a folder, its folder (or the nearest
    existing one) a writable folder. Nothing is left behind.

    Args:
        path: the output file (e.g. ``export``'s ``.onnx``).
        what: how the message names it.
    Returns:
        ``path`` as a Path.
    Raises:
        CurlpruneError: naming ``path`` and what to do.
    """
    path = Path(path)
    if path.is_dir():
        raise CurlpruneError(f"{what} {path} is a folder, not a file: name the file to write")
    existing = path.parent
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise CurlpruneError(f"{what} {path} lies under {existing}, which is a file, not a folder: choose another path")
    reason = _probe(existing)
    if reason:
        raise CurlpruneError(f"{what} {path} cannot be written ({existing}: {reason})")
    return path


def _probe(folder: Path) -> str | None:
    """Why a file cannot be created in ``folder`` (None: it can); the probe file is removed."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".curlprune-probe-"):
            pass
    except OSError as exc:
        if exc.errno == errno.ENOENT and folder.is_dir():  # procfs, sysfs: the folder exists, new files do not
            return "a virtual filesystem (like /proc or /sys) that takes no new files: choose a folder on a disk"
        return OUTPUT_ERRNOS.get(exc.errno, exc.strerror or type(exc).__name__)
    return None


class RunLock:
    """An exclusive lock on a run directory (``<run_dir>/.lock``) for one process.

    ``acquire()`` checks the folder (:func:`check_writable_dir`), creates it if needed, takes the lock without waiting and writes the
    holder's details; a held lock is a :class:`CurlpruneError` naming its holder, and so is a held
    lock of a folder it lies inside (a run directory at work) or of one of its direct subfolders
    (a command at work in a stage folder). ``release()`` removes the lock file (and the folder when
    the lock created it and nothing else was written; so are the missing parents it created).
    Usable as a context manager.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        check_named(run_dir)
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self._created: list[Path] = []  # the folders acquire() created, deepest first

    def acquire(self) -> "RunLock":
        """Check the folder, create it if needed and take the lock without waiting; then remove the
        temporary files that killed writes left in it (:func:`remove_orphans`).

        Returns:
            ``self``.
        Raises:
            CurlpruneError: the folder is not writable (:func:`check_writable_dir`), or another
                process holds the lock, the lock of a folder it lies inside, or that of one of its
                subfolders (the holder's pid, host, start time and command are named).
        """
        if self._fd is not None:
            return self
        check_writable_dir(self.run_dir)
        self._created = [folder for folder in (self.run_dir, *self.run_dir.parents) if not folder.exists()]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                self._cleanup_dir()
                raise CurlpruneError(
                    f"{self.run_dir} is in use by another run ({holder}): wait for it to finish, or use another --out"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            # the previous holder may have removed the file between our open and flock: retry on the new one
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        try:  # after taking our own lock, so that of two commands starting together one sees the other
            _check_nested(self.run_dir)
        except BaseException:
            self.release()
            raise
        remove_orphans(self.run_dir)  # nothing of ours writes here now: leftovers are a killed writer's
        return self

    @contextmanager
    def stages(self) -> Iterator[None]:
        """While inside, locks taken in this context in folders inside the (held) run directory do
        not count this lock as another run's: the run's own stages (its prune stage) lock their folders."""
        token = _OWN_STAGES.set(_OWN_STAGES.get() | {str(self.path.resolve())})
        try:
            yield
        finally:
            _OWN_STAGES.reset(token)

    def release(self) -> None:
        """Remove the lock file and drop the lock (a no-op when not held); the folders the lock
        created (the run directory and any missing parents) are removed again when nothing else was
        written into them, so a command that fails before writing leaves no trace (issue 18)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it, so no other process locks a removed file
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        for folder in self._created:
            try:
                folder.rmdir()  # only when empty: the run wrote nothing there
            except OSError:
                return

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _held_by_another(lock: Path) -> bool:
    """Whether another open of ``lock`` (another process, or another RunLock) holds it now."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # drops the probe's lock, if it got it
    return False


def remove_orphans(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that interrupted atomic writes left in ``folder`` and below.

    Call it only while holding ``folder``'s :class:`RunLock`. Nothing is removed when a folder above
    is locked by another run (it may be writing here), and a subfolder locked by another run is
    left alone, so a live write's temporary file is never taken away.

    Args:
        folder: the locked folder.
    Returns:
        The files removed.
    """
    folder = Path(folder)
    if any(_held_by_another(parent / LOCK_FILE) for parent in folder.resolve().parents):
        return []
    removed = []
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        dirs[:] = [d for d in dirs if not _held_by_another(here / d / LOCK_FILE)]
        for name in files:
            if ORPHAN_NAME.match(name):
                try:
                    (here / name).unlink()
                    removed.append(here / name)
                except FileNotFoundError:
                    pass
    return removed


def _check_nested(run_dir: Path) -> None:
    """Raise when a folder ``run_dir`` lies inside, or a direct subfolder of it, is locked by another run.

    Only lock files that hold a holder record (or nothing yet) are probed, with a shared lock that
    is dropped at once; those of this context's own run (:meth:`RunLock.stages`) are skipped.
    """
    here = run_dir.resolve()
    for parent in here.parents:
        holder = _held_by_other(parent / LOCK_FILE)
        if holder is not None:
            raise CurlpruneError(f"{run_dir} lies inside the run directory {parent}, which is in use by another run ({holder}): "
                                 f"wait for it to finish, or choose an --out outside {parent}")
    try:
        children = [c for c in here.iterdir() if c.is_dir()]
    except OSError:
        return
    for child in sorted(children):
        holder = _held_by_other(child / LOCK_FILE)
        if holder is not None:
            raise CurlpruneError(f"{run_dir / child.name} is in use by another run ({holder}), inside the run directory {run_dir}: "
                                 f"wait for it to finish, or use another --out")


def _held_by_other(path: Path) -> str | None:
    """The holder of the run lock ``path`` when another run holds it, else None."""
    if str(path) in _OWN_STAGES.get() or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if not _is_run_lock(fd):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        except OSError:
            return None
        return None
    finally:
        os.close(fd)  # drops the shared lock


def _is_run_lock(fd: int) -> bool:
    """Whether a lock file holds a :class:`RunLock` holder record (or nothing yet): other tools' ``.lock`` files are not ours."""
    try:
        text = os.pread(fd, 4096, 0).decode()
        return not text.strip() or "pid" in json.loads(text)
    except (OSError, ValueError, TypeError):
        return False


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "it has just started"
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')}: {info.get('command')}"
