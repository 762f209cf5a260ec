"""The README's examples stay true: every command and option it shows exists in the CLI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from embedsearch.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_commands() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("embedsearch "):
                commands.append(shlex.split(line))
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
        if token.startswith("--"):
            name = token.split("=", 1)[0]
            assert name in known, f"README shows {name} for {args[0]}, which does not have it"
