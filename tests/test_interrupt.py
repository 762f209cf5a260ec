"""Items 3 and 5: kill -9 at any point loses nothing; two writers never interleave.

Builds run in a child interpreter (``DRIVER``) so they can really be SIGKILLed. The child
can slow the test encoder down (so the parent can catch it mid-encode) and can die with
``os._exit(137)`` at a named point of the write path, exactly as a kill there would.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from embedsearch import build_index, load_bundle
from embedsearch.cli import main
from embedsearch.errors import BundleLockedError
from embedsearch.predict import Predictor
from tests import proc
from tests.conftest import draw_image, make_collection

TINY = "test:tiny"
SHARD = 8

DRIVER = r"""
import os, sys, time
from pathlib import Path
import embedsearch_test_encoders as fam  # the test encoder plugin (tests/plugins)
import embedsearch.index as index_mod
import embedsearch.bundle as bundle_mod  # writes manifest.json (write_manifest)
from embedsearch.store.cache import ShardCache
from embedsearch.store.io import atomic_write

data, out, delay, crash = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
forward = fam.TinyEncoder._forward

def slow_forward(self, batch):
    time.sleep(delay)
    return forward(self, batch)

def die_writing_index(path, index):  # killed halfway through writing the index file
    def writer(fh):
        fh.write(b"IxFI" + b"\0" * 64)
        fh.flush()
        os._exit(137)
    atomic_write(path, writer)

write_json = bundle_mod.write_json

def die_before_manifest(path, obj):
    if Path(path).name == "manifest.json":
        os._exit(137)
    write_json(path, obj)

def die_after_manifest(self):
    os._exit(137)

fam.TinyEncoder._forward = slow_forward
if crash == "index":
    index_mod.write_faiss = die_writing_index
elif crash == "manifest":
    bundle_mod.write_json = die_before_manifest
elif crash == "cleanup":
    ShardCache.clear = die_after_manifest

from embedsearch import build_index
build_index(data, out=out, model="test:tiny", shard_size=8, batch_size=4, num_workers=0)
print("finished")
"""


def start_build(data: Path, out: Path, delay: float = 0.0, crash: str = "none"
                ) -> proc.subprocess.Popen[str]:
    return proc.python(DRIVER, str(data), str(out), str(delay), crash)


def committed_shards(bundle: Path) -> int:
    import json

    state = bundle / "cache" / "cache.json"
    try:
        return len(json.loads(state.read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def temp_files(bundle: Path) -> list[Path]:
    return [p for p in bundle.rglob(".tmp-*")]


def snapshot(bundle: Path) -> tuple[list[str], np.ndarray, list[str]]:
    b = load_bundle(bundle)
    return list(b.items["id"]), np.array(b.embeddings), list(b.items["sha256"])


def assert_same_bundle(a: Path, b: Path) -> None:
    ids_a, vec_a, sha_a = snapshot(a)
    ids_b, vec_b, sha_b = snapshot(b)
    assert ids_a == ids_b
    assert sha_a == sha_b
    np.testing.assert_allclose(vec_a, vec_b, atol=1e-6, rtol=0)
    ia, ib = load_bundle(a).index, load_bundle(b).index
    assert ia.ntotal == ib.ntotal == len(ids_a)


def assert_clean(bundle: Path) -> None:
    assert temp_files(bundle) == []
    assert list((bundle / "cache").glob("shard-*")) == []
    m = load_bundle(bundle).manifest
    # Only the files of the committed generation remain.
    assert sorted(p.relative_to(bundle).as_posix() for p in (bundle / "data").iterdir()) \
        == sorted(m["roles"].values())


@pytest.fixture
def hundred(tmp_path: Path) -> Path:
    return make_collection(tmp_path / "images", per_class=34)  # 102 images


def test_kill9_during_encoding_resumes_to_an_identical_bundle(hundred: Path, tmp_path: Path
                                                              ) -> None:
    out = tmp_path / "killed"
    child = start_build(hundred, out, delay=0.15)
    proc.wait_for(lambda: committed_shards(out) >= 2, what="two committed shards", proc=child)
    proc.kill9(child)
    assert not (out / "manifest.json").exists()
    done = committed_shards(out)
    assert 2 <= done < 102 // SHARD

    res = build_index(hundred, out=out, model=TINY, shard_size=SHARD, num_workers=0)
    assert res.reused >= done * SHARD  # the committed shards were not encoded again
    assert res.encoded == 102 - res.reused
    ref = build_index(hundred, out=tmp_path / "uninterrupted", model=TINY)
    assert_same_bundle(out, ref.path)
    assert_clean(out)


@pytest.mark.parametrize("crash", ["index", "manifest", "cleanup"])
def test_kill_while_writing_keeps_the_previous_generation(tmp_path: Path, crash: str) -> None:
    images = make_collection(tmp_path / "images", per_class=6)
    out = tmp_path / "bundle"
    build_index(images, out=out, model=TINY)
    before = snapshot(out)
    for i in range(5):
        draw_image("blue", 900 + i).save(images / "blue" / f"new_{i}.jpg")

    child = start_build(images, out, crash=crash)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 137, err
    if crash == "index":
        assert temp_files(out), "the crash should have left a half-written temp file"

    # What readers see: the last committed generation, complete and verified.
    after = load_bundle(out)
    if crash == "cleanup":  # the manifest was written: the new generation is committed
        assert len(after.items) == 23
    else:
        ids, vectors, sha = snapshot(out)
        assert ids == before[0] and sha == before[2]
        np.testing.assert_array_equal(vectors, before[1])
        assert after.manifest["generation"] == 1
    assert len(after.index.search(np.asarray(after.embeddings[:1]), 1)[1]) == 1

    # Re-running finishes the job from the committed shards, with nothing to re-encode.
    res = build_index(images, out=out, model=TINY)
    assert res.encoded == 0
    ref = build_index(images, out=tmp_path / "uninterrupted", model=TINY)
    assert_same_bundle(out, ref.path)
    assert_clean(out)


def test_second_build_refuses_while_first_holds_the_lock_and_kill9_frees_it(
        tmp_path: Path) -> None:
    images = make_collection(tmp_path / "images", per_class=4)
    out = tmp_path / "bundle"
    build_index(images, out=out, model=TINY)
    for i in range(80):
        draw_image("green", 700 + i).save(images / "green" / f"more_{i}.jpg")
    holder = start_build(images, out, delay=1.0)  # killed below, long before it ends
    lock = out / ".lock"
    proc.wait_for(lambda: lock.read_text().strip() == f"pid {holder.pid}", what="lock taken",
                  proc=holder)
    try:
        # A second build: refused at once with a message that says what to do.
        with pytest.raises(BundleLockedError, match=f"pid {holder.pid}"):
            build_index(images, out=out, model=TINY)
        r = CliRunner().invoke(main, ["-q", "build-index", str(images), "--out", str(out)])
        assert r.exit_code == 5, r.output
        assert f"is being written by pid {holder.pid}" in r.output
        assert "wait for the other build" in r.output and "Traceback" not in r.output

        # Readers do not take the lock: predicts at once (a CLI process and two threads
        # here), during the build, all work.
        query = images / "red" / "red_000.jpg"
        reader = proc.python("from embedsearch.cli import main; main()",
                             "-q", "predict", str(query), "--index", str(out), "--json")
        with ThreadPoolExecutor(2) as pool:
            labels = list(pool.map(lambda _: Predictor(out).predict([query])[0].label,
                                   range(2)))
        assert labels == ["red", "red"]
        stdout, stderr = reader.communicate(timeout=120)
        assert reader.returncode == 0, stderr
        assert '"label": "red"' in stdout
        assert holder.poll() is None, "the holder should still be encoding"
    finally:
        proc.kill9(holder)

    # flock dies with its process: no stale lock, the next build runs and resumes.
    assert re.fullmatch(r"pid \d+", lock.read_text().strip())
    res = build_index(images, out=out, model=TINY)
    assert res.reused >= 12 and res.manifest["counts"]["embedded"] == 92
    assert_clean(out)


def test_lock_is_per_bundle(tmp_path: Path) -> None:
    from embedsearch.store.io import exclusive_lock

    a, b = tmp_path / "a", tmp_path / "b"
    with exclusive_lock(a), exclusive_lock(b):
        pass
    # The same process asking again (a second build from a notebook) is refused as well.
    with exclusive_lock(a), pytest.raises(BundleLockedError), exclusive_lock(a):
        pass
    assert os.path.exists(a / ".lock")


def test_reader_verifying_while_a_build_commits_gets_the_new_generation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import embedsearch.store.verify as verify_mod

    images = make_collection(tmp_path / "images", per_class=3)
    out = tmp_path / "bundle"
    build_index(images, out=out, model=TINY)
    draw_image("red", 555).save(images / "red" / "late.jpg")
    real_digest = verify_mod.file_digest
    state = {"committed": False}

    def digest_while_a_build_commits(path: Path) -> str:
        if not state["committed"]:
            state["committed"] = True
            # Generation 2 is committed and generation 1's files removed mid-verification.
            build_index(images, out=out, model=TINY)
        return real_digest(path)

    monkeypatch.setattr(verify_mod, "file_digest", digest_while_a_build_commits)
    b = load_bundle(out)
    assert b.manifest["generation"] == 2 and len(b.items) == 10
    assert "red/late.jpg" in set(b.items["id"])
