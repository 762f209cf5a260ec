"""The ``embedsearch`` command group: global options and error handling."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from embedsearch import __version__
from embedsearch.errors import EmbedsearchError


class _Group(click.Group):
    """Maps EmbedsearchError to a one-paragraph message and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EmbedsearchError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.secho(f"error: {exc.message}", fg="red", err=True)
            if exc.hint:
                click.echo(f"  hint: {exc.hint}", err=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:
            # Disk full, permissions, a vanished file: the environment, not a bug, so a
            # message rather than a traceback (--debug still shows it).
            if ctx.obj and ctx.obj.get("debug"):
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            click.secho(f"error: {where}{exc.strerror or exc}", fg="red", err=True)
            click.echo("  hint: check free disk space and permissions; run with --debug for "
                       "the traceback", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="embedsearch")
@click.option("--debug", is_flag=True, help="Show full tracebacks and debug logs.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option("--backend", type=click.Choice(["auto", "torch", "openvino", "onnxruntime"]),
              envvar="EMBEDSEARCH_BACKEND", default="auto", show_default=True,
              help="Runtime of the encoder's forward pass for every command; auto: the "
              "fastest installed (OpenVINO, then ONNX Runtime, else torch), checked against "
              "torch on a reference image.")
@click.option("--cache-dir", help="Shared embedding cache folder, used by every command so "
              "that no image is encoded twice (default: $EMBEDSEARCH_CACHE_DIR, else the user "
              "cache folder, ~/.cache/embedsearch on Linux; 'off' turns it off).")
@click.option("--cache-size", help="Size limit of the shared embedding cache, e.g. 2GB "
              "(default: $EMBEDSEARCH_CACHE_SIZE, else 4GB); least recently used vectors go.")
@click.pass_context
def main(ctx: click.Context, debug: bool, quiet: bool, backend: str, cache_dir: str | None,
         cache_size: str | None) -> None:
    """Classify, search and de-duplicate image collections with a frozen pretrained encoder
    and a FAISS index."""
    ctx.obj = {"debug": debug, "quiet": quiet}
    if cache_dir is not None or cache_size is not None:
        import os

        from embedsearch.store.shared import ENV_DIR, ENV_SIZE, parse_size

        # Through the environment, so that worker processes (Ray) see the same store.
        if cache_dir is not None:
            os.environ[ENV_DIR] = cache_dir
        if cache_size is not None:
            parse_size(cache_size)  # a clear error now rather than at the first write
            os.environ[ENV_SIZE] = cache_size
    if backend != "auto":
        from embedsearch.encoders.backends import set_default_backend

        set_default_backend(backend)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not debug:
        # Hub clients log every retry; our own error message says what to do instead.
        for noisy in ("huggingface_hub", "timm", "root"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
