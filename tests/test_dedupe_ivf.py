"""Dedupe candidates through an IVF index (the path above ``IVF_LIMIT`` rows)."""

from __future__ import annotations

import numpy as np
import pytest

from embedsearch.dedupe.search import candidate_pairs


@pytest.mark.parametrize("kind", ["gaussian", "clustered"])
def test_ivf_candidates_find_the_planted_pairs_and_invent_none(kind: str) -> None:
    rng = np.random.default_rng(1)
    n, d, n_dup = 8000, 256, 300
    if kind == "gaussian":
        x = rng.standard_normal((n, d)).astype(np.float32)
    else:  # non-negative, clustered, CNN-like
        x = np.maximum(rng.standard_normal((40, d))[rng.integers(0, 40, n)]
                       + 0.8 * rng.standard_normal((n, d)), 0).astype(np.float32)
    src = rng.choice(n - n_dup, n_dup, replace=False)
    dst = np.arange(n - n_dup, n)
    x[dst] = np.abs(x[src] + rng.uniform(0.05, 0.3, (n_dup, 1)) * rng.standard_normal(
        (n_dup, d)) * np.abs(x[src]).mean(1, keepdims=True)) * np.sign(x[src] + 1e-9)
    exact = candidate_pairs(x, 0.9, exact_limit=n + 1)
    ivf = candidate_pairs(x, 0.9, exact_limit=0, ivf_limit=0)
    assert ivf.method.startswith("ivf") and exact.method == "exact"
    found = set(zip(ivf.i.tolist(), ivf.j.tolist(), strict=True))
    truth = set(zip(exact.i.tolist(), exact.j.tolist(), strict=True))
    assert found <= truth  # every pair re-scored on the full vectors: none invented
    planted = {(int(a), int(b)) for a, b in zip(src, dst, strict=True)} & truth
    assert len(planted) > 200
    assert len(planted & found) / len(planted) >= 0.99
    assert len(found) / len(truth) >= 0.99
