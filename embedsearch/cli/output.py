"""What every command prints the same way: JSON lines, progress bars, the encoder line."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click


def echo_json(record: Any) -> None:
    """One JSON-lines record on stdout (one object, one line)."""
    click.echo(json.dumps(record, ensure_ascii=False))


def progress_factory(ctx: click.Context, desc: str
                     ) -> Callable[[int, int], Callable[[int], None]] | None:
    """A tqdm progress bar on stderr for the library's ``progress`` hook (none with -q)."""
    if ctx.obj.get("quiet"):
        return None

    def start(total: int, done: int) -> Callable[[int], None]:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=done, desc=desc, unit="img", file=sys.stderr,
                   dynamic_ncols=True, smoothing=0.1)
        return bar.update

    return start


def echo_encoder(identity: dict[str, Any]) -> None:
    click.echo(f"encoder  {identity['spec']} ({identity['dim']}-d, "
               f"{identity.get('precision', 'fp32')}, weights: {identity['weights']['source']})")


def echo_reuse(res: Any) -> None:
    """How many images a folder's build had to encode (stderr; none with -q)."""
    if click.get_current_context().obj.get("quiet"):
        return
    click.echo(f"{res.path}: encoded {res.encoded:,} images, reused {res.reused:,}"
               + (f" ({res.from_shared:,} from the shared embedding cache)"
                  if res.from_shared else ""), err=True)
