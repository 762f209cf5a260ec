"""Honest evaluation by default (issue 19): no self-votes, split layouts, one embedding cache
for every command, evaluation output and report permissions."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from embedsearch.dedupe.report import write_leakage
from embedsearch.store.io import default_file_mode


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_report_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        assert default_file_mode() == 0o666 & ~umask
        files = write_leakage(pd.DataFrame({"id_a": [], "id_b": []}), tmp_path / "leak",
                              html_page=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(files["leakage_csv"].stat().st_mode) == 0o666 & ~umask


# -- one embedding cache for every command ---------------------------------------------------
def test_second_bundle_on_the_same_images_encodes_nothing(collection: Path, tmp_path: Path
                                                          ) -> None:
    from embedsearch import build_index, load_bundle

    first = build_index(collection, out=tmp_path / "a", model="test:tiny")
    assert first.encoded == 24 and first.from_shared == 0
    assert first.manifest["encoding"]["images"] == 24
    # Another bundle, another path to the same bytes: found by content hash.
    copy = tmp_path / "copy"
    shutil.copytree(collection, copy)
    second = build_index(copy, out=tmp_path / "b", model="test:tiny")
    assert second.encoded == 0 and second.from_shared == 24
    # The throughput measured by the first build travels with the vectors.
    assert second.manifest["encoding"]["images"] == 24
    a, b = load_bundle(tmp_path / "a"), load_bundle(tmp_path / "b")
    assert np.array_equal(np.asarray(a.embeddings), np.asarray(b.embeddings))
    assert (tmp_path / "embedding-cache" / "embeddings.sqlite").is_file()


def test_cache_can_be_turned_off(collection: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from embedsearch import build_index

    monkeypatch.setenv("EMBEDSEARCH_CACHE_DIR", "off")
    build_index(collection, out=tmp_path / "a", model="test:tiny")
    assert build_index(collection, out=tmp_path / "b", model="test:tiny").encoded == 24


def test_cache_evicts_least_recently_used_and_survives_concurrent_writers(tmp_path: Path
                                                                          ) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from embedsearch.store.shared import SharedCache

    dim = 16
    rng = np.random.default_rng(0)

    def writer(w: int) -> None:
        cache = SharedCache(tmp_path / "c", "enc", dim, limit=10**9)
        for b in range(5):
            shas = [f"{w}-{b}-{i}" for i in range(20)]
            cache.put_many(shas, rng.random((20, dim), dtype=np.float32))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(writer, range(4)))
    cache = SharedCache(tmp_path / "c", "enc", dim, limit=10**9)
    assert len(cache) == 4 * 5 * 20
    # A limit of 50 vectors: the oldest go, the ones just read stay.
    small = SharedCache(tmp_path / "c", "enc", dim, limit=50 * dim * 4)
    assert set(small.get_many(["3-4-0", "3-4-1"])) == {"3-4-0", "3-4-1"}
    small.put_many(["new"], np.ones((1, dim), np.float32))
    assert len(small) <= 50
    assert set(small.get_many(["3-4-0", "3-4-1", "new", "0-0-0"])) == {"3-4-0", "3-4-1", "new"}


# -- no self-matches ---------------------------------------------------------------------------
def test_indexed_images_do_not_vote_for_themselves(collection: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import embedsearch.embed as embed_mod
    from embedsearch import build_index, load_bundle

    build_index(collection, out=tmp_path / "b", model="test:tiny")
    bundle = load_bundle(tmp_path / "b")
    paths = sorted(collection.rglob("*.jpg"))
    # Same picture, other bytes (padding after the JPEG's end): caught by the embedding.
    padded = tmp_path / "red_000_padded.jpg"
    padded.write_bytes((collection / "red" / "red_000.jpg").read_bytes() + b"\0" * 16)
    encoded: list[int] = []
    real = embed_mod.embed_sources
    monkeypatch.setattr(embed_mod, "embed_sources",
                        lambda enc, src, **kw: (encoded.append(len(src)), real(enc, src, **kw))[1])
    preds = bundle.predict([*paths, padded], k=3)
    assert sum(encoded) == 1  # the indexed files reuse the bundle's vectors
    for p, path in zip(preds, paths, strict=False):
        own = path.relative_to(collection).as_posix()
        assert p.in_index["id"] == own and p.in_index["excluded"] >= 1
        assert own not in [n["id"] for n in p.neighbours]
        assert all(n["similarity"] < 0.9999 for n in p.neighbours)
    assert preds[-1].in_index["id"] == "red/red_000.jpg"
    # For search, the image itself may come first.
    searched = bundle.predict(paths[:1], k=3, allow_self=True)[0]
    assert searched.neighbours[0]["id"] == paths[0].relative_to(collection).as_posix()
    assert searched.in_index == {}
