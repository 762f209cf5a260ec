"""Every embedsearch module imports without POSIX-only parts of Python (Windows, macOS).

The check itself lives in tests/platform_imports.py (CI also runs it before pytest); it
runs in a fresh interpreter, since it must see every module imported for the first time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def _check(package: str, *path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([*map(str, path), str(REPO),
                                          os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "tests.platform_imports", package],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def test_every_embedsearch_module_imports_without_posix_only_modules() -> None:
    out = _check("embedsearch")
    assert out.returncode == 0, out.stderr
    assert "modules import without POSIX-only modules and names" in out.stdout


def test_the_check_finds_posix_only_imports_and_names(tmp_path: Path) -> None:
    pkg = tmp_path / "planted_pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    files = {
        "uses_fcntl.py": "import fcntl\n",
        "sub/uses_resource.py": "from resource import getrlimit\n",
        "uses_euid.py": "import os\nROOT = os.geteuid() == 0\n",
        "uses_fork.py": "from os import fork\n",
        "uses_sigkill.py": "import signal\nKILL = signal.SIGKILL\n",
        # Fine on every system: an import inside a function, a guarded name, portable names.
        "lazy.py": "def lock(fd):\n    import fcntl\n    fcntl.flock(fd, fcntl.LOCK_EX)\n",
        "guarded.py": "import os\nCPUS = len(os.sched_getaffinity(0)) "
                      "if hasattr(os, 'sched_getaffinity') else os.cpu_count()\n",
        "portable.py": "import os, signal\nSEP, TERM = os.sep, signal.SIGTERM\n",
    }
    for name, code in files.items():
        (pkg / name).write_text(code)
    out = _check("planted_pkg", tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    failed = {line.split(":")[0].strip() for line in out.stderr.splitlines()
              if line.startswith("  planted_pkg")}
    assert failed == {"planted_pkg.uses_fcntl", "planted_pkg.sub.uses_resource",
                      "planted_pkg.uses_euid", "planted_pkg.uses_fork",
                      "planted_pkg.uses_sigkill"}, out.stderr
    assert "5 of 10 planted_pkg modules" in out.stderr
    assert "uses_euid.py:2" in out.stderr  # the failing line is named
