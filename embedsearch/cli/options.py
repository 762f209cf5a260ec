"""The CLI's vocabulary: one option decorator per concept, so that a concept has one name and
one help text in every command, and the mechanism that keeps renamed options working for one
release (a note on stderr says what to type instead).

A renamed option is declared on its command (``command(NAME, renamed={OLD: NEW})``): the
old name still parses, prints a note on stderr, and is listed under the command's help; the
README's "Renamed options" table lists them all (tests/test_cli.py checks it does).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from embedsearch.classify import DEFAULT_SELECT_BY, SELECT_BY

F = Callable[..., Any]

_noted: set[tuple[str, str]] = set()


def deprecation_note(old: str, new: str) -> None:
    """Tell the user, once per process and name, on stderr (stdout stays data), that ``old``
    still works for this release and ``new`` is what to type from now on."""
    if (old, new) in _noted:
        return
    _noted.add((old, new))
    click.echo(f"note: {old} is deprecated and will be removed in the next release; "
               f"use {new}", err=True)


def rename_args(args: Sequence[str], renamed: Mapping[str, str], where: str = ""
                ) -> list[str]:
    """``args`` with every old option name in ``renamed`` replaced by its new name (also in
    the ``--old=value`` form), noting each on stderr. Stops at ``--``, after which every
    token is an argument."""
    out: list[str] = []
    for i, token in enumerate(args):
        if token == "--":
            return [*out, *args[i:]]
        old, eq, value = token.partition("=")
        if old in renamed and token.startswith("--" if eq else "-"):
            new = renamed[old]
            deprecation_note(f"{where}{old}", f"{where}{new}")
            token = f"{new}={value}" if eq else new
        out.append(token)
    return out


class Command(click.Command):
    """A command that still accepts the old names of its renamed options (``renamed``:
    old -> new), listed under its help, for one release."""

    def __init__(self, *args: Any, renamed: Mapping[str, str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.renamed = dict(renamed or {})
        if self.renamed:
            listed = "\n".join(f"  {old} -> {new}" for old, new in self.renamed.items())
            self.epilog = (f"{self.epilog}\n\n" if self.epilog else "") + \
                f"\b\nRenamed (the old names work until the next release):\n{listed}"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if self.renamed:
            args = rename_args(args, self.renamed, where=f"{self.name} ")
        return super().parse_args(ctx, args)


def command(name: str, renamed: Mapping[str, str] | None = None, **kwargs: Any
            ) -> Callable[[F], Command]:
    """``click.command`` with :class:`Command` (renamed options) and the project's ``-h``."""
    return click.command(name, cls=Command, renamed=renamed,
                         context_settings={"help_option_names": ["-h", "--help"]}, **kwargs)


def _join(*parts: str | None) -> str:
    return " ".join(p for p in parts if p)


# -- options shared by several commands -----------------------------------------------------
def json_option(record: str) -> Callable[[F], F]:
    """``--json``: always JSON lines, one record per line; ``record`` says what one is."""
    return click.option("--json", "as_json", is_flag=True,
                        help=f"JSON lines on stdout: one JSON object per line, {record}. "
                        "Messages go to stderr.")


def index_option(required: bool = False, multiple: bool = False, extra: str | None = None
                 ) -> Callable[[F], F]:
    """``--index``: the bundle a command reads, in every command."""
    return click.option("--index", "index_name" + ("s" if multiple else ""), required=required,
                        multiple=multiple, metavar="NAME",
                        help=_join("Index bundle: a name under ./indexes/ or a bundle folder.",
                                   extra))


def dup_threshold_option(default: str) -> Callable[[F], F]:
    """``-t/--dup-threshold``: the near-duplicate cosine, in every command that groups
    duplicates; ``default`` says what an unset value means there."""
    return click.option("--dup-threshold", "-t", "dup_threshold", type=float,
                        help="Near-duplicate threshold: cosine similarity at or above which "
                        f"two images count as near-duplicates. Default: {default}.")


def k_option(default: int = 10, max_k: int | None = None,
             what: str = "Neighbours that vote (kNN k).") -> Callable[[F], F]:
    """``-k/--k``: kNN's k, an integer (benchmark's sweep: :func:`k_sweep_option`)."""
    return click.option("-k", "--k", "k", default=default, show_default=True,
                        type=click.IntRange(1, max_k), help=what)


def k_sweep_option(default: str = "1,5,10,20,50") -> Callable[[F], F]:
    """``-k/--k`` where several values are swept: integers, comma-separated and/or repeated
    (``--k 1,5,10`` or ``-k 1 -k 5 -k 10``)."""
    return click.option("-k", "--k", "ks", multiple=True, default=(default,),
                        show_default=True, callback=_parse_ks, metavar="K[,K…]",
                        help="kNN k values to sweep: integers, comma-separated and/or "
                        "repeated.")


def _parse_ks(_ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]
              ) -> tuple[int, ...]:
    given = ",".join(value)
    try:
        ks = tuple(int(v) for v in given.replace(" ", "").split(",") if v)
    except ValueError:
        raise click.BadParameter(
            f"{given!r}: give comma-separated integers, e.g. 1,5,10") from None
    if not ks or min(ks) < 1:
        raise click.BadParameter("k values must be positive integers")
    return ks


def neighbours_option(default: int, max_n: int | None = None) -> Callable[[F], F]:
    """``-n/--neighbours``: how many neighbours are shown per query."""
    return click.option("--neighbours", "-n", "n_neighbours", default=default,
                        show_default=True, type=click.IntRange(1, max_n),
                        help="Neighbours shown per query image.")


def device_option(f: F) -> F:
    """``--device``, shared by every command that encodes images."""
    return click.option(
        "--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N|mps",
        help="Where images are encoded: auto picks a CUDA GPU, else Apple's MPS, else the CPU. "
        "Not part of a bundle's identity: a bundle built on a GPU is queried on a CPU.")(f)


def batch_size_option(f: F) -> F:
    """``--batch-size`` of encoding."""
    return click.option("--batch-size", type=click.IntRange(min=1),
                        help="Images per encoding batch (default: 32 on CPU, 256 on CUDA).")(f)


def workers_option(f: F) -> F:
    """``--workers``: image decoding workers, in every command that encodes images."""
    return click.option("--workers", type=click.IntRange(min=0),
                        help="Image decoding workers: threads on CPU, processes on a GPU "
                        "(default: one per core; on a GPU all cores but one; 0: decode in "
                        "the main thread).")(f)


def precision_option(f: F) -> F:
    """``--precision`` of the encoder's arithmetic."""
    return click.option(
        "--precision", type=click.Choice(["fp32", "bf16", "fp16"]),
        help="Encoder arithmetic: fp32, or bf16 / fp16 autocast (bf16: faster on CPUs with "
        "AVX-512 BF16; fp16: on GPUs; vectors differ slightly, and the bundle is always "
        "queried at its precision). Default: fp32, or the bundle's.")(f)


def model_option(help: str, multiple: bool = False, dest: str = "model") -> Callable[[F], F]:
    """``-m/--model``: an encoder spec (see ``embedsearch models``)."""
    return click.option("--model", "-m", dest, multiple=multiple,
                        help=_join("Encoder spec (see `embedsearch models`).", help))


def encoder_weights_option(help: str) -> Callable[[F], F]:
    """``--weights``: a local weights file of the encoder."""
    return click.option("--weights", type=click.Path(path_type=Path, dir_okay=False),
                        help=_join("Local weights file of the encoder (.safetensors or a "
                                   "tensor-only .pt).", help))


def table_columns_options(f: F) -> F:
    """``--path-col``, ``--label-col``, ``--split-col`` of a CSV/parquet collection."""
    for name, what in (("split", "train/val/test splits"), ("label", "labels"),
                       ("path", "image paths")):
        f = click.option(f"--{name}-col", help=f"CSV/parquet column with {what}.")(f)
    return f


def split_map_option(f: F) -> F:
    """``--split-map``: names for splits that are not recognised."""
    return click.option(
        "--split-map", help="Name splits that are not recognised, e.g. holdout=test,extra=train "
        "(folder names or split-column values). Recognised without it: names with the words "
        "train, val/valid/dev, test (sample_train, val2017, …).")(f)


def exclude_option(f: F) -> F:
    """``--exclude``: a reviewed list of images to leave out."""
    return click.option(
        "--exclude", type=click.Path(path_type=Path, dir_okay=False),
        help="Leave out the images a reviewed list names (CSV with an id column, e.g. from "
        "`embedsearch audit`; rows with a decision column count only when it says exclude). "
        "Listed as skipped with reason 'excluded'.")(f)


def out_option(what: str) -> Callable[[F], F]:
    """``--out``: where a command writes (``what`` says what and its default)."""
    return click.option("--out", type=click.Path(path_type=Path), help=what)


def no_html_option(f: F) -> F:
    """``--no-html``: skip a report's HTML page."""
    return click.option("--no-html", is_flag=True,
                        help="Skip report.html (the page with thumbnails).")(f)


def seed_option(what: str) -> Callable[[F], F]:
    """``--seed``: ``what`` it seeds."""
    return click.option("--seed", default=0, show_default=True, type=int,
                        help=f"Random seed of {what}.")


def select_by_option(what: str) -> Callable[[F], F]:
    """``--select-by``: the validation metric settings are chosen by."""
    return click.option("--select-by", type=click.Choice(list(SELECT_BY)),
                        default=DEFAULT_SELECT_BY, show_default=True,
                        help=f"Metric {what} chosen by, on validation.")
