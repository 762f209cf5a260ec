"""Leave a reviewed list of images out of ``build-index`` and ``benchmark``.

The list is a CSV/TSV (or parquet) with an ``id`` column (ids as the audit writes them:
paths relative to the collection root), or a plain text file with one id per line. When
the table has a ``decision`` column (the audit's ``--relabel-csv`` has one), only rows
whose decision is ``exclude``/``remove``/``drop``/``quarantine`` are left out, so a
reviewed relabel sheet can be passed as it is.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

from embedsearch.errors import InputError

if TYPE_CHECKING:
    from embedsearch.data.scan import Collection

EXCLUDE_DECISIONS = frozenset({"exclude", "remove", "drop", "quarantine"})
#: Reason code of an image left out by a list (in the bundle's failures table).
EXCLUDED = "excluded"


def read_exclude_list(path: str | os.PathLike[str]) -> set[str]:
    """The ids a reviewed list says to leave out."""
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such exclude list",
                         hint="pass a CSV with an id column, e.g. the audit's issues.csv "
                         "filtered by hand, or a text file with one id per line")
    suffix = p.suffix.lower()
    if suffix in (".txt", ".lst", ""):
        return {line.strip() for line in p.read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")}
    if suffix == ".parquet":
        table = pd.read_parquet(p)
    else:
        table = pd.read_csv(p, sep="\t" if suffix == ".tsv" else ",", dtype=str,
                            keep_default_na=False)
    if "id" not in table.columns:
        raise InputError(f"{p} has no id column (columns: {', '.join(map(str, table.columns))})",
                         hint="name the column of image ids (relative paths) 'id'")
    if "decision" in table.columns:
        chosen = table["decision"].astype(str).str.strip().str.lower().isin(EXCLUDE_DECISIONS)
        table = table[chosen]
    return {str(i) for i in table["id"] if str(i)}


def exclude_records(collection: Collection, path: str | os.PathLike[str]) -> Collection:
    """``collection`` without the listed images; each is recorded as skipped with reason
    ``excluded`` (so the bundle's failures table says what the list removed)."""
    from embedsearch.data.scan import Skipped

    ids = read_exclude_list(path)
    keep = [r for r in collection.records if r.id not in ids]
    gone = [Skipped(r.id, EXCLUDED, f"listed in {path}") for r in collection.records
            if r.id in ids]
    return dataclasses.replace(collection, records=keep, skipped=[*collection.skipped, *gone])
