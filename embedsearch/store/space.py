"""Say which device is full and how much room a write needed, instead of a bare errno.

A short write (numpy's "436480 requested and 333792 written", errno unset) and ENOSPC are
both "the device is full"; the message names the device and its mount point, the megabytes
the file needed (at least what was written plus what was refused) and what is free.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

_SHORT_WRITE = re.compile(r"(\d+) requested and (\d+) written")


def is_out_of_space(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT) or (
        exc.errno is None and _SHORT_WRITE.search(str(exc)) is not None)


def mount_of(path: Path) -> tuple[str, str]:
    """(device, mount point) of the file system holding ``path``."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    device = str(p)
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 1 and fields[1].replace("\\040", " ") == str(p):
                device = fields[0]  # the last match is the mount on top
    except OSError:
        pass
    return device, str(p)


def no_space_message(path: Path, exc: OSError, written: int) -> str:
    """"no space left on DEVICE (mounted at M), N MB needed, F MB free" for a failed write."""
    m = _SHORT_WRITE.search(str(exc))
    refused = int(m[1]) - int(m[2]) if m else 0
    needed = max(written + refused, 1)
    device, mount = mount_of(path.parent)
    try:
        free = f", {shutil.disk_usage(mount).free / 1e6:.1f} MB free"
    except OSError:
        free = ""
    at_least = "" if m else "at least "
    size = f"{needed / 1e6:.1f} MB" if needed >= 100_000 else f"{needed / 1e3:.1f} kB"
    return (f"no space left on {device} (mounted at {mount}): {path.name} needs "
            f"{at_least}{size}{free}")
