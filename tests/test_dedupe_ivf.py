"""Dedupe candidates through an IVF index (the path above ``IVF_LIMIT`` rows)."""

from __future__ import annotations

from pathlib import Path

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


@pytest.mark.parametrize("power", [1.0, 0.5])
def test_descriptors_of_a_memmap_equal_those_of_the_array_and_leave_it_intact(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, power: float) -> None:
    from embedsearch.dedupe import search
    from embedsearch.errors import EmbedsearchError
    from embedsearch.store.io import read_npy

    monkeypatch.setattr(search, "BLOCK", 700)  # several blocks, none page-aligned
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2500, 512)) * rng.uniform(0.5, 2, (2500, 1))).astype(np.float32)
    np.save(tmp_path / "v.npy", x)
    mm = read_npy(tmp_path / "v.npy", mmap=True)
    want = np.sign(x) * np.abs(x) ** power
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    for given in (mm, np.asarray(mm), x.copy(), x.astype(np.float64)):
        got = search.as_unit_vectors(given, power)
        assert not np.may_share_memory(got, mm)
        np.testing.assert_allclose(got, want, atol=2e-6)
        if given is not mm and np.may_share_memory(given, mm) and _mapped_kib(tmp_path) is not None:
            # the pages were let go as read (a 64 KiB fault-around window per block stays)
            assert _mapped_kib(tmp_path) < 0.2 * x.nbytes / 1024
    np.testing.assert_array_equal(np.asarray(mm), x)  # released pages read back unchanged
    with pytest.raises(EmbedsearchError, match="NaN"):
        bad = x.copy()
        bad[2400, 5] = np.nan
        search.as_unit_vectors(bad, power)


def _mapped_kib(folder: Path) -> int | None:
    """Resident KiB of this process's mappings of files in ``folder`` (None: no /proc)."""
    smaps = Path("/proc/self/smaps")
    if not smaps.is_file():
        return None
    total, inside = 0, False
    for line in smaps.read_text().splitlines():
        if line[:1].isalnum() and "-" in line.split()[0] and ":" not in line.split()[0]:
            inside = str(folder) in line
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total
