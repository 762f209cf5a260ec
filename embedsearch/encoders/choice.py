"""Encoder choices given on the command line: ``--model SPEC`` or ``SPEC=FILE``, with
``--weights`` matched by position or by spec."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from embedsearch.errors import InputError


@dataclass(frozen=True)
class ModelChoice:
    """An encoder spec and its optional local weights file."""

    spec: str
    weights: Path | None = None

    @property
    def label(self) -> str:
        return self.spec + (f" ({self.weights.name})" if self.weights else "")


def parse_models(models: Sequence[str], weights: Sequence[str | os.PathLike[str] | None]
                 | dict[str, str | os.PathLike[str]] | None = None) -> list[ModelChoice]:
    """``models`` as specs or ``SPEC=FILE``; ``weights`` matched to them by position (a
    list) or by spec (a dict)."""
    if not models:
        raise InputError("give at least one encoder (--model SPEC)")
    out: list[ModelChoice] = []
    wlist = list(weights) if isinstance(weights, (list, tuple)) else []
    if len(wlist) > len(models):
        raise InputError(f"{len(wlist)} --weights for {len(models)} --model",
                         hint="give one --weights per --model, in the same order, or use "
                         "--model SPEC=FILE")
    for i, raw in enumerate(models):
        spec, sep, file = str(raw).partition("=")
        spec = spec.strip()
        w: str | os.PathLike[str] | None = file.strip() if sep else None
        if w is None and isinstance(weights, dict):
            w = weights.get(spec)
        if w is None and i < len(wlist):
            w = wlist[i]
        path = Path(w).expanduser() if w else None
        if path is not None and not path.is_file():
            raise InputError(f"weights file {path} (for {spec}) does not exist")
        out.append(ModelChoice(spec, path))
    if len({(m.spec, m.weights) for m in out}) < len(out):
        raise InputError("the same encoder is listed twice")
    return out
