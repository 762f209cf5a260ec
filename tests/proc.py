"""Subprocess helpers: run the real CLI, kill builds, drop root's permission bypass."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO

#: setpriv drops the capabilities that let root ignore permission bits, so "permission
#: denied" and "read-only folder" can be tested for real even when the tests run as root.
_DROP_DAC = ["--bounding-set=-dac_override,-dac_read_search", "--"]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def cli(*args: str, prefix: list[str] | None = None, cwd: Path | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``embedsearch ARGS`` in a fresh interpreter (stdout and stderr captured as text)."""
    return subprocess.run([*(prefix or []), sys.executable, "-m", "embedsearch.cli", *args],
                          capture_output=True, text=True, env=env(), cwd=cwd or REPO,
                          timeout=timeout)


def python(code: str, *args: str, prefix: list[str] | None = None) -> subprocess.Popen[str]:
    """Start ``python -c CODE ARGS`` in the background."""
    return subprocess.Popen([*(prefix or []), sys.executable, "-c", code, *args], env=env(),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@functools.cache
def unprivileged_prefix() -> list[str] | None:
    """Command prefix under which permission bits apply, or None when none is available."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        probe = Path(d) / "probe"
        probe.write_text("x")
        probe.chmod(0)
        r = subprocess.run([setpriv, *_DROP_DAC, "cat", str(probe)], capture_output=True)
        return [setpriv, *_DROP_DAC] if r.returncode != 0 else None


def require_permission_bits() -> list[str]:
    prefix = unprivileged_prefix()
    if prefix is None:
        pytest.skip("running as root and setpriv cannot drop CAP_DAC_OVERRIDE here, so "
                    "permission bits are not enforced and 'permission denied' cannot be made")
    return prefix


def wait_for(check: Callable[[], bool], timeout: float = 180, what: str = "condition",
             proc: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"process ended before {what}: rc={proc.returncode}\n{err}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def kill9(proc: subprocess.Popen[str]) -> None:
    proc.kill()  # SIGKILL: no finally blocks, no atexit, no cleanup
    proc.wait(timeout=30)
    assert proc.returncode == -9
