"""Atomic, pickle-free file writes and verified reads.

Every write goes to a temporary file in the target folder, is fsync'ed and then
``os.replace``'d into place, so a reader sees the old file or the new one, never half.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from embedsearch.errors import BundleError, BundleLockedError

if TYPE_CHECKING:
    import pandas as pd

TMP_PREFIX = ".tmp-"


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


#: errno values that mean "this folder cannot take the write", not a bug.
_NO_WRITE = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG)


def _write_error(path: Path, exc: OSError) -> BundleError:
    return BundleError(
        f"cannot write {path}: {exc.strerror or exc}",
        hint="free disk space or choose a writable folder with --out; "
        "the previous bundle, if any, is untouched and still loads",
    )


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
            os.fchmod(fh.fileno(), default_file_mode())
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
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
    h = hashlib.sha256()
    with open(path, "rb") as fh:
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
    """Hold an advisory lock on ``folder``.

    ``flock`` is released by the kernel when the process dies, so a ``kill -9`` never
    leaves a stale lock behind.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # read-only, full, or the path is a file: nothing to build into
        raise _write_error(folder / ".lock", exc) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise BundleLockedError(
                f"{folder} is being written by {holder}",
                hint="wait for the other build to finish (or stop it); the lock is released "
                "automatically when that process ends",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield
    finally:
        os.close(fd)
