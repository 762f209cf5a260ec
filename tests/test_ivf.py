"""IVF indexes: sample-trained, filled block by block, recall measured and recorded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedsearch import build_index, load_bundle
from embedsearch.index import (
    EXACT_LIMIT,
    auto_index_type,
    make_index,
    read_faiss,
    search,
    write_faiss,
)
from embedsearch.index.ivf import (
    build_ivf,
    choose_nlist,
    exact_topk,
    recall_at_k,
)
from embedsearch.predict import Predictor


def clustered(n: int, dim: int = 32, centres: int = 50, spread: float = 0.35,
              seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres: neighbourhoods like real embeddings have."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, dim))
    x = c[rng.integers(0, centres, n)] + spread * rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def test_ivf_records_recall_measured_against_exact_search(tmp_path: Path) -> None:
    x = clustered(6000)
    path = tmp_path / "emb.npy"
    np.save(path, x)
    mm = np.load(path, mmap_mode="r")  # filled from a memmap, in blocks smaller than n
    index, info = build_ivf(mm, "ivf", block=1000)
    assert index.ntotal == 6000 and info["type"] == "ivf" and not info["exact"]
    assert info["nlist"] == choose_nlist(5400) == 138  # trained on rows other than queries
    assert info["train_rows"] < 6000 and info["recall_queries"] == 600
    assert info["recall_at_10"] >= 0.95 and info["recall_sweep"][str(info["nprobe"])] == \
        info["recall_at_10"]
    # The chosen nprobe is the first to reach the target: the one before it did not.
    probes = [int(p) for p in info["recall_sweep"]]
    assert probes[-1] == info["nprobe"]
    assert all(info["recall_sweep"][str(p)] < 0.95 for p in probes[:-1])
    # Recomputing recall independently at the chosen nprobe gives the recorded figure.
    rng = np.random.default_rng(1)
    q_ids = rng.choice(6000, 300, replace=False)
    _, exact = exact_topk(x, x[q_ids], 11)
    _, approx = index.search(x[q_ids], 11)
    assert abs(recall_at_k(approx, exact, q_ids) - info["recall_at_10"]) < 0.03
    # nprobe survives serialisation.
    write_faiss(tmp_path / "i.faiss", index)
    assert read_faiss(tmp_path / "i.faiss").nprobe == info["nprobe"]


def test_recall_at_k_leaves_the_query_out() -> None:
    exact = np.array([[7, 1, 2, 3]])
    assert recall_at_k(np.array([[7, 1, 2, 9]]), exact, np.array([7]), k=3) == pytest.approx(2 / 3)
    assert recall_at_k(np.array([[1, 2, 3, 7]]), exact, np.array([7]), k=3) == 1.0


def test_exact_topk_in_blocks_matches_one_flat_search() -> None:
    x = clustered(2500, seed=3)
    index, _ = make_index(x, "flat")
    sims, ids = index.search(x[:20], 10)
    bs, bi = exact_topk(x, x[:20], 10, block=333)
    np.testing.assert_array_equal(bi, ids)
    np.testing.assert_allclose(bs, sims, atol=1e-6)


def test_ivfpq_compresses_and_measures_its_recall() -> None:
    x = clustered(12000, dim=64, seed=2)
    index, info = make_index(x, "ivfpq")
    assert info["type"] == "ivfpq" and info["bytes_per_vector"] <= 64 // 2
    assert 0 < info["recall_at_10"] <= 1 and info["recall_queries"] == 1000
    # Below the target, the cheapest nprobe within the plateau of the best recall is kept.
    best = max(info["recall_sweep"].values())
    assert info["recall_at_10"] >= min(best - 0.005, 0.95)
    assert info["nprobe"] == min(int(p) for p, r in info["recall_sweep"].items()
                                 if r >= min(best - 0.005, 0.95))
    res = search(index, x[:5], 3)
    assert all(len(r) == 3 and (r >= 0).all() for r in res.ids)


def test_auto_picks_flat_then_ivf_then_ivfpq() -> None:
    assert auto_index_type(EXACT_LIMIT, 1280) == "flat"
    assert auto_index_type(EXACT_LIMIT + 1, 1280) == "ivf"
    assert auto_index_type(10_000_000, 1280) == "ivfpq"


def test_build_index_with_ivf_bundle_searches_reference_rows_only(split_collection: Path
                                                                  ) -> None:
    res = build_index(split_collection, name="ivf", model="test:tiny", index_type="ivf")
    info = res.manifest["index"]
    assert info["type"] == "ivf" and "recall_at_10" in info and info["recall_queries"] >= 1
    b = load_bundle("ivf")
    assert type(b.index).__name__ == "IndexIVFFlat"
    # Held-out test rows are never returned, through IVF search parameters.
    preds = Predictor(b).predict_vectors(np.asarray(b.embeddings[24:]),
                                         b.items["id"].iloc[24:].tolist(), k=3)
    assert all(n["id"] not in set(b.items["id"].iloc[24:]) for p in preds for n in p.neighbours)
