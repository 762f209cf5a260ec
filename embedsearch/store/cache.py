"""The shard cache: embeddings committed while a build runs, so a killed build resumes.

Each shard is ``shard-XXXXXX.npy`` (float32 vectors of the images that decoded) plus
``shard-XXXXXX.parquet`` (one row per image tried: id, size, mtime, sha256, status, row).
``cache.json`` lists the committed shards and is rewritten after each shard: it is the
commit point, so a shard that is not listed there does not exist.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.errors import BundleError
from embedsearch.store.io import (
    file_digest,
    read_json,
    read_npy,
    read_parquet,
    write_json,
    write_npy,
    write_parquet,
)
from embedsearch.store.verify import file_mismatch

if TYPE_CHECKING:
    import pandas as pd

CACHE_SCHEMA = 1
#: Columns of a shard's metadata table (and of the bundle's items table, plus label/split).
META_COLUMNS = ("id", "size", "mtime_ns", "sha256", "status", "detail", "width", "height", "row")


@dataclass
class Shard:
    name: str
    rows: int
    records: int
    npy_sha256: str
    meta_sha256: str

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


class ShardCache:
    """Append-only shards for one encoder, inside ``folder``."""

    def __init__(self, folder: Path, encoder_key: str) -> None:
        self.folder = folder
        self.encoder_key = encoder_key
        self.shards: list[Shard] = []
        state_path = folder / "cache.json"
        if state_path.exists():
            state = read_json(state_path)
            if state.get("encoder_key") == encoder_key:
                self.shards = [Shard(**s) for s in state.get("shards", [])]
            else:
                # Shards from another encoder can never be reused: start over.
                self.clear()

    def _commit(self) -> None:
        write_json(self.folder / "cache.json", {
            "schema": CACHE_SCHEMA,
            "encoder_key": self.encoder_key,
            "shards": [s.as_dict() for s in self.shards],
        })

    def append(self, vectors: np.ndarray, meta: pd.DataFrame) -> Shard:
        """Write one shard and commit it."""
        index = max((int(s.name.split("-")[1]) for s in self.shards), default=-1) + 1
        name = f"shard-{index:06d}"
        npy, pq = self.folder / f"{name}.npy", self.folder / f"{name}.parquet"
        write_npy(npy, vectors.astype(np.float32, copy=False))
        write_parquet(pq, meta)
        shard = Shard(name, int(vectors.shape[0]), len(meta), file_digest(npy), file_digest(pq))
        self.shards.append(shard)
        self._commit()
        return shard

    def load(self) -> list[tuple[np.ndarray, pd.DataFrame]]:
        """Every committed shard as (vectors, meta), verified against its recorded hash."""
        out = []
        for s in self.shards:
            npy, pq = self.folder / f"{s.name}.npy", self.folder / f"{s.name}.parquet"
            if file_mismatch(npy, {"sha256": s.npy_sha256}) is not None \
                    or file_mismatch(pq, {"sha256": s.meta_sha256}) is not None:
                raise BundleError(
                    f"cache shard {npy} is missing or was modified after it was written",
                    hint=f"delete the folder {self.folder} to re-encode those images",
                )
            out.append((read_npy(npy), read_parquet(pq)))
        return out

    def clear(self) -> None:
        """Forget all shards (after they were consolidated into the bundle)."""
        self.shards = []
        if self.folder.exists():
            self._commit()
            for p in self.folder.glob("shard-*"):
                with contextlib.suppress(OSError):
                    p.unlink()
