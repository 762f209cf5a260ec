"""Check that every module of a package imports without POSIX-only parts of Python.

``import embedsearch`` (and every submodule) must work on Windows and macOS. Linux CI can't
run those systems, so this check takes away, *from the package's own code only*, what
they lack:

- the POSIX-only standard modules (``fcntl``, ``resource``, ``pwd``, ``termios``, …): an
  import of one of them by the package fails as it would on Windows;
- the ``os`` and ``signal`` names that Windows (or macOS: ``os.sched_getaffinity``) does not
  have: the package's modules get an ``os``/``signal`` without them, so module-level use
  (``os.geteuid()``, ``signal.SIGKILL``) fails here too.

Third-party libraries are left alone: on Windows they take their own Windows branches.
An import inside a function is not checked (it runs only when called; guard it there).

Run ``python -m tests.platform_imports [PACKAGE]`` (exit status 1 and a list of failures
when a module does not import); ``tests/test_platform_imports.py`` runs it too.
"""

from __future__ import annotations

import builtins
import importlib
import importlib.util
import sys
import traceback
import types
from pathlib import Path
from typing import Any

#: Standard modules that exist only on POSIX systems.
POSIX_ONLY_MODULES = frozenset({
    "fcntl", "resource", "pwd", "grp", "termios", "tty", "pty", "posix", "syslog", "crypt",
    "nis", "spwd", "readline", "curses", "_curses", "_posixsubprocess", "_posixshmem",
})
#: ``os`` names missing on Windows (sched_getaffinity: on macOS as well).
POSIX_ONLY_OS = frozenset({
    "fork", "forkpty", "getuid", "geteuid", "getgid", "getegid", "getgroups", "getpgid",
    "getpgrp", "setsid", "setpgrp", "setpgid", "setuid", "seteuid", "killpg", "nice",
    "sched_getaffinity", "sched_setaffinity", "chown", "fchown", "lchown", "pread", "pwrite",
    "sync", "getloadavg", "sysconf", "sysconf_names", "statvfs", "fstatvfs", "mkfifo",
    "mknod", "uname", "getpriority", "setpriority", "wait3", "wait4", "WNOHANG", "posix_spawn",
    "posix_fadvise", "memfd_create", "O_NONBLOCK", "O_NOFOLLOW", "O_DIRECTORY", "O_CLOEXEC",
    "O_SYNC", "O_NOCTTY", "openpty", "ttyname", "getresuid", "initgroups", "register_at_fork",
})
#: What Windows' ``signal`` module has; everything else in it is masked.
WINDOWS_SIGNAL = frozenset({
    "signal", "getsignal", "default_int_handler", "set_wakeup_fd", "raise_signal",
    "strsignal", "valid_signals", "Signals", "Handlers", "SIG_DFL", "SIG_IGN", "NSIG",
    "SIGABRT", "SIGFPE", "SIGILL", "SIGINT", "SIGSEGV", "SIGTERM",
})


class _Masked(types.ModuleType):
    """A view of a module without some of its names."""

    def __init__(self, module: types.ModuleType, hidden: frozenset[str] | None,
                 shown: frozenset[str] | None = None) -> None:
        super().__init__(module.__name__, module.__doc__)
        self._module, self._hidden, self._shown = module, hidden, shown

    def __getattr__(self, name: str) -> Any:
        masked = (name in self._hidden if self._hidden is not None
                  else not name.startswith("__") and name not in (self._shown or ()))
        if masked:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r} on "
                                 "Windows (masked by tests/platform_imports.py)")
        return getattr(self._module, name)


def _views() -> dict[str, types.ModuleType]:
    import os
    import signal

    return {"os": _Masked(os, POSIX_ONLY_OS),
            "signal": _Masked(signal, None, WINDOWS_SIGNAL)}


def module_names(package: str) -> list[str]:
    """Every module of ``package`` (from its files; ``__main__`` modules are scripts)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} is not an importable package")
    names = []
    for root in spec.submodule_search_locations:
        for path in sorted(Path(root).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__main__":
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.append(".".join((package, *parts)))
    return names


def check(package: str) -> dict[str, str]:
    """Import every module of ``package`` with the POSIX-only parts masked for its code;
    returns {module: error} for those that failed."""
    views = _views()
    real_import = builtins.__import__

    def masked_import(name: str, globals: dict[str, Any] | None = None,
                      locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
        importer = (globals or {}).get("__name__") or ""
        if level == 0 and (importer == package or importer.startswith(package + ".")):
            if name in POSIX_ONLY_MODULES or name.split(".")[0] in POSIX_ONLY_MODULES:
                raise ModuleNotFoundError(
                    f"No module named {name!r} on Windows (masked by "
                    f"tests/platform_imports.py)", name=name)
            if name in views:
                return views[name]
        return real_import(name, globals, locals, fromlist, level)

    failures: dict[str, str] = {}
    builtins.__import__ = masked_import
    try:
        for name in module_names(package):
            try:
                importlib.import_module(name)
            except BaseException as exc:  # SystemExit at import time is a failure too
                tb = traceback.extract_tb(exc.__traceback__)
                where = next((f"{f.filename}:{f.lineno}" for f in reversed(tb)
                              if "platform_imports" not in f.filename), "")
                failures[name] = f"{type(exc).__name__}: {exc} ({where})"
    finally:
        builtins.__import__ = real_import
    return failures


def main(argv: list[str]) -> int:
    package = argv[0] if argv else "embedsearch"
    failures = check(package)
    names = module_names(package)
    if failures:
        print(f"{len(failures)} of {len(names)} {package} modules do not import without "
              "POSIX-only modules and names (as on Windows/macOS):", file=sys.stderr)
        for name, error in failures.items():
            print(f"  {name}: {error}", file=sys.stderr)
        print("import POSIX-only modules inside the function that needs them, behind a "
              "fallback (see store/io.py, serve/guard.py)", file=sys.stderr)
        return 1
    print(f"all {len(names)} {package} modules import without POSIX-only modules and names")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
