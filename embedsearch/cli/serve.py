"""``serve``: a web page and HTTP API over an index."""

from __future__ import annotations

from pathlib import Path

import click

from embedsearch.cli.options import (
    command,
    device_option,
    encoder_weights_option,
    index_option,
    k_option,
    neighbours_option,
)
from embedsearch.errors import EmbedsearchError


@command("serve")
@index_option(required=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (0.0.0.0 exposes the index and its images to the "
              "network).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535),
              help="Port to listen on.")
@k_option(10, max_k=100)
@neighbours_option(12, max_n=100)
@click.option("--max-upload-mb", default=10.0, show_default=True,
              type=click.FloatRange(0.01, 1024), help="Largest accepted upload.")
@click.option("--max-pixels", default=40_000_000, show_default=True,
              type=click.IntRange(1), help="Largest accepted image (width × height).")
@encoder_weights_option("Only if it moved since the build.")
@device_option
@click.pass_context
def serve_cmd(ctx: click.Context, index_name: str, host: str, port: int, k: int,
              n_neighbours: int, max_upload_mb: float, max_pixels: int,
              weights: Path | None, device: str) -> None:
    """Serve an index: a web page and HTTP API to classify an image and browse its
    nearest neighbours (API docs at /docs)."""
    try:
        import uvicorn

        from embedsearch.serve import create_app
    except ImportError as exc:
        raise EmbedsearchError(f"serving needs FastAPI and uvicorn ({exc.name} is missing)",
                               hint='pip install -e ".[serve]"') from exc

    from embedsearch.bundle import load_bundle

    bundle = load_bundle(index_name)
    bundle.device = device
    app = create_app(bundle, k=k, n_neighbours=n_neighbours, weights=weights,
                     max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_pixels=max_pixels)
    # Load the model before binding the port, so a broken bundle is a clear CLI error.
    app.state.service.load()
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"serving {app.state.service.bundle.path} at http://{shown}:{port}/ "
               f"(API docs: http://{shown}:{port}/docs); Ctrl+C stops", err=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.secho(f"warning: listening on {host}: anyone who can reach this port can query "
                    "the index and view its images", fg="yellow", err=True)
    from embedsearch.serve.guard import server_config

    uvicorn.Server(server_config(app, host, port, log_level="debug" if ctx.obj.get("debug")
                                 else "info", access_log=not ctx.obj.get("quiet"))).run()
