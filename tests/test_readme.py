"""The README's examples stay true: every command and option it shows exists in the CLI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from embedsearch.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


SHELL = ("", "bash", "sh", "console")


def _readme_commands() -> list[list[str]]:
    """The ``embedsearch …`` lines of the README's shell blocks. Fences are paired in order,
    so that a ```toml or ```python block cannot pair the others' fences the wrong way round."""
    commands: list[list[str]] = []
    fence: str | None = None  # the open block's language; None outside a block
    block: list[str] = []
    for line in README.read_text(encoding="utf-8").splitlines():
        if not line.startswith("```"):
            block.append(line)
        elif fence is None:
            fence, block = line[3:].strip(), []
        else:
            if fence in SHELL:
                for cmd in "\n".join(block).replace("\\\n", " ").splitlines():
                    cmd = cmd.split("#", 1)[0].strip()
                    if cmd.startswith("embedsearch "):
                        commands.append(shlex.split(cmd))
            fence = None
    assert fence is None, "README has an unclosed ``` block"
    return commands


COMMANDS = _readme_commands()


def test_readme_shows_the_main_commands() -> None:
    shown = {c[1] for c in COMMANDS if len(c) > 1}
    assert {"build-index", "predict"} <= shown


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c[:2]) for c in COMMANDS])
def test_readme_command_parses(argv: list[str]) -> None:
    args = argv[1:]
    while args and args[0].startswith("-"):  # global options such as -q
        args = args[1:]
    assert args, argv
    ctx = click.Context(main)
    cmd = main.get_command(ctx, args[0])
    assert cmd is not None, f"README shows unknown command {args[0]!r}"
    known = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
    for token in args[1:]:
        if token.startswith("--") or re.fullmatch(r"-[A-Za-z]", token):
            name = token.split("=", 1)[0]
            assert name in known, f"README shows {name} for {args[0]}, which does not have it"
