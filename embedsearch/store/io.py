"""Atomic, pickle-free file writes and verified reads.

Every write goes to a temporary file in the target folder, is fsync'ed and then
``os.replace``'d into place, so a reader sees the old file or the new one, never half.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO

import numpy as np

from embedsearch.errors import BundleError, BundleLockedError
from embedsearch.store.space import is_out_of_space, no_space_message

if TYPE_CHECKING:
    import pandas as pd

TMP_PREFIX = ".tmp-"
#: Flags for reading a file without waiting: O_NONBLOCK keeps a FIFO from blocking until a
#: writer comes (POSIX only: Windows has no FIFOs in the file system, and wants O_BINARY).
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


def open_for_reading(path: str | os.PathLike[str]) -> BinaryIO:
    """Open ``path`` for binary reading at once, whatever it is (callers check ``S_ISREG``
    on ``os.fstat(fh.fileno())`` before reading: a FIFO or device would block or never end).
    """
    return os.fdopen(os.open(path, _READ_FLAGS), "rb")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


#: errno values that mean "this folder cannot take the write", not a bug.
_NO_WRITE = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG)


_WRITE_HINT = ("free disk space or choose a writable folder with --out; the previous bundle, "
               "if any, is untouched and still loads")


def _write_error(path: Path, exc: OSError) -> BundleError:
    return BundleError(f"cannot write {path}: {exc.strerror or exc}", hint=_WRITE_HINT)


def default_file_mode() -> int:
    """The mode ``open()`` would give a new file: 0o666 less the process umask."""
    try:  # Linux tells the umask without changing it (os.umask is process-wide, racy)
        with open("/proc/self/status", encoding="ascii") as fh:
            umask = next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, writer: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``writer(file)`` atomically; a failure leaves no temp file.

    The file gets the user's normal permissions (umask), not the temp file's private 0600:
    reports and bundles are meant to be shared like any file the user writes.
    """
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            writer(fh)
            fh.flush()
            if hasattr(os, "fchmod"):  # POSIX (Windows from Python 3.13: a read-only bit)
                os.fchmod(fh.fileno(), default_file_mode())
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        written = 0
        if tmp is not None:
            with contextlib.suppress(OSError):
                written = os.stat(tmp).st_size
                os.unlink(tmp)
        if isinstance(exc, OSError) and is_out_of_space(exc):
            raise BundleError(f"cannot write {path}: {no_space_message(path, exc, written)}",
                              hint=_WRITE_HINT) from exc
        if isinstance(exc, OSError) and exc.errno in _NO_WRITE:
            raise _write_error(path, exc) from exc
        raise
    _fsync_dir(path.parent)


def write_json(path: Path, obj: Any) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n").encode()
    atomic_write(path, lambda fh: fh.write(data))


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable JSON ({exc})",
                          hint="the file is damaged; rebuild the bundle") from exc


def read_versioned_json(path: Path, fmt: str, schema: int, what: str, fix: str
                        ) -> dict[str, Any]:
    """Read a self-describing JSON artifact, refusing another format or schema version."""
    obj = read_json(path)
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise BundleError(f"{path} is not an embedsearch {what}")
    if obj.get("schema_version") != schema:
        raise BundleError(f"{path} has schema {obj.get('schema_version')}, this version reads "
                          f"{schema}", hint=fix)
    return obj


def write_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda fh: np.save(fh, np.ascontiguousarray(array), allow_pickle=False))


def read_npy(path: Path, mmap: bool = True) -> np.ndarray:
    """Load a numeric .npy without ever unpickling (object arrays are refused)."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as exc:
        raise BundleError(f"{path}: refused: not a plain numeric array ({exc})",
                          hint="rebuild the bundle; embedsearch never loads pickled data") from exc
    except OSError as exc:
        raise BundleError(f"{path}: unreadable ({exc})", hint="rebuild the bundle") from exc


def write_parquet(path: Path, df: pd.DataFrame) -> None:
    atomic_write(path, lambda fh: df.to_parquet(fh, index=False))


def read_parquet(path: Path) -> pd.DataFrame:
    import pandas as pd

    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise BundleError(f"{path}: unreadable parquet ({exc})",
                          hint="rebuild the bundle") from exc


def file_digest(path: Path) -> str:
    """sha256 of a regular file; anything else (a FIFO, /dev/zero) raises OSError at once."""
    h = hashlib.sha256()
    with open_for_reading(path) as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, socket or device)",
                          str(path))
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def remove_temp_files(folder: Path) -> int:
    """Delete temp files left by a killed writer. Returns how many were removed."""
    count = 0
    if folder.is_dir():
        for p in folder.rglob(TMP_PREFIX + "*"):
            with contextlib.suppress(OSError):
                p.unlink()
                count += 1
    return count


@contextlib.contextmanager
def exclusive_lock(folder: Path, wait: bool = False) -> Iterator[None]:
    """Hold an advisory lock on ``folder`` (its ``.lock`` file says which process holds it).

    filelock's native lock (``flock`` on POSIX, ``LockFileEx`` on Windows) is released by
    the OS when the process dies, so a ``kill -9`` never leaves a stale lock behind. It
    locks a descriptor opened here, without truncating: a refused writer still reads the
    holder's pid.
    """
    from filelock import lock_descriptor, unlock_descriptor

    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0),
                     0o644)
    except OSError as exc:  # read-only, full, or the path is a file: nothing to build into
        raise _write_error(folder / ".lock", exc) from exc
    try:
        if not lock_descriptor(fd, blocking=wait):
            raise BundleLockedError(
                f"{folder} is being written by {_lock_holder(fd)}",
                hint="wait for the other build to finish (or stop it); the lock is released "
                "automatically when that process ends",
            )
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"pid {os.getpid()}".encode())
        try:
            yield
        finally:
            unlock_descriptor(fd)
    finally:
        os.close(fd)


def _lock_holder(fd: int) -> str:
    """What the holder wrote into the lock file ("pid N"); Windows forbids reading a
    region another process has locked."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 64).decode(errors="replace").strip() or "another process"
    except OSError:
        return "another process"
