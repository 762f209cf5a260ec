"""Items 6 and 7: tampered, swapped or mismatched files are refused; nothing is unpickled."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from embedsearch import build_index, load_bundle
from embedsearch.bundle import write_manifest
from embedsearch.cli import main
from embedsearch.errors import BundleError, BundleMismatchError, EncoderError
from embedsearch.store.io import file_digest
from tests.conftest import draw_image, make_collection

TINY = "test:tiny"


class Payload:
    """Unpickling this creates the marker file: proof that pickled code ran."""

    marker: Path

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[override]
        return (open, (str(self.marker), "w"))


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    images = make_collection(tmp_path / "images", per_class=5)
    return build_index(images, out=tmp_path / "bundle", model=TINY).path


def role(bundle: Path, name: str) -> Path:
    return bundle / json.loads((bundle / "manifest.json").read_text())["roles"][name]


def rehash(bundle: Path) -> None:
    """Update manifest.json to the files as they are now: a forger's best effort, so the
    loader's own checks (not the hashes) must catch what follows."""
    mpath = bundle / "manifest.json"
    m = json.loads(mpath.read_text())
    for rel in m["files"]:
        m["files"][rel] = {"bytes": (bundle / rel).stat().st_size,
                           "sha256": file_digest(bundle / rel)}
    write_manifest(bundle, m)  # the manifest's own checksum recomputed too


def open_everything(bundle: Path) -> None:
    b = load_bundle(bundle)
    _ = b.items, b.embeddings, b.index, b.failures


def assert_cli_refuses(bundle: Path, *names: str) -> str:
    """`info` and `predict` both refuse with exit code 4, the file named, a rebuild hint."""
    query = next((bundle.parent / "images").rglob("*.jpg"))
    for args in (["info", "--index", str(bundle)], ["predict", str(query), "--index", str(bundle)]):
        r = CliRunner().invoke(main, ["-q", *args])
        assert r.exit_code == 4, r.output + repr(r.exception)
        assert "Traceback" not in r.output
        for name in names:
            assert name in r.output, r.output
        assert "build-index" in r.output and "--overwrite" in r.output
    return r.output


# -- item 6: tampering and mismatch ------------------------------------------------------
def test_edited_embeddings(bundle: Path) -> None:
    emb = role(bundle, "embeddings")
    arr = np.load(emb)
    arr[3, 5] += 0.25
    np.save(emb, arr)
    with pytest.raises(BundleError, match=r"does not match manifest\.json"):
        load_bundle(bundle)
    out = assert_cli_refuses(bundle, emb.name)
    assert f"--out {bundle}" in out and "--model test:tiny" in out


@pytest.mark.parametrize("which", ["embeddings", "items", "index", "failures"])
def test_truncated_files(bundle: Path, which: str) -> None:
    f = role(bundle, which)
    f.write_bytes(f.read_bytes()[:-40])
    with pytest.raises(BundleError, match=f.name):
        load_bundle(bundle)
    assert_cli_refuses(bundle, f.name)
    # Even with the hashes forged to match, the damaged file itself is refused.
    rehash(bundle)
    with pytest.raises(BundleError, match=f.name):
        open_everything(bundle)


def test_edited_items_table(bundle: Path) -> None:
    items = role(bundle, "items")
    df = pd.read_parquet(items)
    df.loc[0, "label"] = "blue" if df.loc[0, "label"] != "blue" else "red"
    df.to_parquet(items, index=False)
    assert_cli_refuses(bundle, items.name)
    # Dropping rows and forging the hash: the row counts no longer agree.
    df.iloc[:-1].to_parquet(items, index=False)
    rehash(bundle)
    with pytest.raises(BundleError, match="rows, the manifest says"):
        open_everything(bundle)


def test_edited_index(bundle: Path) -> None:
    index = role(bundle, "index")
    data = bytearray(index.read_bytes())
    data[-7] ^= 0xFF
    index.write_bytes(bytes(data))
    assert_cli_refuses(bundle, index.name)


def test_embeddings_of_another_shape_with_forged_hash(bundle: Path) -> None:
    emb = role(bundle, "embeddings")
    np.save(emb, np.load(emb)[:-1])
    rehash(bundle)
    with pytest.raises(BundleError, match=r"expected float32 \(15, 64\)"):
        open_everything(bundle)
    np.save(emb, np.load(emb).astype(np.float64))
    rehash(bundle)
    with pytest.raises(BundleError, match="float64"):
        open_everything(bundle)


def test_manifest_from_another_bundle(bundle: Path, tmp_path: Path) -> None:
    other_images = tmp_path / "other"
    for i in range(4):
        (other_images / "x").mkdir(parents=True, exist_ok=True)
        draw_image("green", 300 + i).save(other_images / "x" / f"{i}.jpg")
    other = build_index(other_images, out=tmp_path / "other_bundle", model=TINY).path
    shutil.copy(other / "manifest.json", bundle / "manifest.json")
    with pytest.raises(BundleError, match=r"manifest\.json comes from another bundle"):
        load_bundle(bundle)
    assert_cli_refuses(bundle, "does not match manifest.json")


@pytest.mark.parametrize("damage", ["truncated", "no roles", "role outside", "no hash"])
def test_damaged_or_edited_manifest(bundle: Path, damage: str) -> None:
    mpath = bundle / "manifest.json"
    text = mpath.read_text()
    m = json.loads(text)
    if damage == "truncated":
        mpath.write_text(text[: len(text) // 2])
    elif damage == "no roles":
        del m["roles"]
        mpath.write_text(json.dumps(m))
    elif damage == "role outside":
        m["roles"]["index"] = "../elsewhere/index.faiss"
        mpath.write_text(json.dumps(m))
    else:
        del m["files"][m["roles"]["index"]]
        mpath.write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"manifest\.json"):
        load_bundle(bundle)
    r = CliRunner().invoke(main, ["info", "--index", str(bundle)])
    assert r.exit_code == 4 and "Traceback" not in r.output
    assert "manifest.json" in r.output and "rebuild" in r.output


def _other_tiny():
    """Another encoder with the same 64-d output (colour channels swapped)."""
    import embedsearch_test_encoders as fam

    class Swapped(fam.TinyEncoder):
        def _forward(self, batch):  # type: ignore[no-untyped-def]
            return super()._forward(batch.flip(1))

    base = fam.build_tiny(TINY, "tiny", None)
    return Swapped("test:swapped", base.model, base.preprocess, base.weights)


def test_index_from_another_encoder_of_the_same_dimension(bundle: Path, tmp_path: Path
                                                          ) -> None:
    other = build_index(bundle.parent / "images", out=tmp_path / "swapped",
                        encoder=_other_tiny()).path
    assert load_bundle(other).dim == load_bundle(bundle).dim
    index = role(bundle, "index")
    shutil.copy(role(other, "index"), index)
    assert_cli_refuses(bundle, index.name)
    rehash(bundle)  # same dim, same row count, forged hash: the content check still refuses
    with pytest.raises(BundleMismatchError, match="does not hold this bundle's embeddings"):
        open_everything(bundle)
    r = CliRunner().invoke(main, ["-q", "predict", str(next((bundle.parent / "images")
                                                            .rglob("*.jpg"))),
                                  "--index", str(bundle)])
    assert r.exit_code == 4 and index.name in r.output and "build-index" in r.output


def test_bundle_queried_by_another_encoder_of_the_same_dimension(bundle: Path) -> None:
    b = load_bundle(bundle)
    with pytest.raises(BundleMismatchError, match="test:swapped"):
        b.check_vectors_from(_other_tiny().identity(), "these query vectors")
    # The same spec that now embeds differently is caught by the fingerprint.
    b.manifest["fingerprint"] = list(np.roll(b.manifest["fingerprint"], 1))
    with pytest.raises(BundleMismatchError, match="differently"):
        b.encoder()


def test_head_from_another_encoder_is_refused(bundle: Path, tmp_path: Path) -> None:
    from embedsearch.head_store import load_bundle_head
    from embedsearch.training import fit_head

    head = fit_head(load_bundle(bundle), "linear")
    other = build_index(bundle.parent / "images", out=tmp_path / "swapped",
                        encoder=_other_tiny()).path
    with pytest.raises(BundleMismatchError, match="test:tiny"):
        load_bundle_head(load_bundle(other), head.path)


# -- item 7: no pickle ------------------------------------------------------------------
def test_object_npy_as_embeddings_is_refused_unexecuted(bundle: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    emb = role(bundle, "embeddings")
    arr = np.empty((15, 64), dtype=object)
    arr[0, 0] = Payload(marker)
    np.save(emb, arr, allow_pickle=True)
    rehash(bundle)  # the hashes match: the loader itself must refuse
    with pytest.raises(BundleError, match="not a plain numeric array"):
        open_everything(bundle)
    r = CliRunner().invoke(main, ["-q", "predict", str(next((bundle.parent / "images")
                                                            .rglob("*.jpg"))),
                                  "--index", str(bundle)])
    assert r.exit_code == 4 and emb.name in r.output and "Traceback" not in r.output
    assert not marker.exists()


def test_object_npy_in_the_shard_cache_is_refused_unexecuted(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    images = make_collection(tmp_path / "images", per_class=3)
    out = tmp_path / "b"
    build_index(images, out=out, model=TINY)
    draw_image("red", 999).save(images / "red" / "new.jpg")
    # A build that was interrupted after committing a shard; then the shard is replaced.
    from embedsearch.encoders import load_encoder
    from embedsearch.pipeline import _meta_frame
    from embedsearch.store.cache import ShardCache

    enc = load_encoder(TINY)
    from embedsearch.encoders.identity import encoder_key

    cache = ShardCache(out / "cache", encoder_key(enc.identity()))
    cache.append(np.zeros((1, 64), np.float32), _meta_frame([{
        "id": "red/new.jpg", "size": 1, "mtime_ns": 1, "sha256": "x", "status": "ok",
        "detail": "", "width": 1, "height": 1, "row": 0}]))
    shard = out / "cache" / "shard-000000.npy"
    np.save(shard, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    state = json.loads((out / "cache" / "cache.json").read_text())
    state["shards"][0]["npy_sha256"] = file_digest(shard)
    (out / "cache" / "cache.json").write_text(json.dumps(state))
    r = CliRunner().invoke(main, ["-q", "build-index", str(images), "--out", str(out)])
    assert r.exit_code == 4, r.output
    assert "shard-000000.npy" in r.output and "Traceback" not in r.output
    assert not marker.exists()


def _evil_checkpoints(folder: Path, marker: Path) -> dict[str, Path]:
    import torch

    evil = {"features.0.0.weight": Payload(marker)}
    paths = {"zip": folder / "evil.pt", "legacy": folder / "evil_legacy.pth",
             "raw": folder / "evil_raw.bin", "renamed": folder / "evil.safetensors"}
    torch.save(evil, paths["zip"])
    torch.save(evil, paths["legacy"], _use_new_zipfile_serialization=False)
    paths["raw"].write_bytes(pickle.dumps(evil))
    shutil.copy(paths["zip"], paths["renamed"])
    return paths


def test_pickled_weights_are_refused_unexecuted(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    marker = tmp_path / "PWNED"
    images = make_collection(tmp_path / "images", per_class=2)
    for kind, path in _evil_checkpoints(tmp_path, marker).items():
        r = CliRunner().invoke(main, ["-q", "build-index", str(images), "--out",
                                      str(tmp_path / f"b_{kind}"), "--model",
                                      "torchvision:mobilenet_v2", "--weights", str(path)])
        assert r.exit_code == 3, (kind, r.output, r.exception)
        assert str(path) in r.output and "Traceback" not in r.output, r.output
        assert ("pickled code is never executed" in r.output
                or "not a valid safetensors file" in r.output), r.output
        assert not marker.exists(), kind


def test_pickled_weights_refused_by_every_loader(tmp_path: Path) -> None:
    from embedsearch.encoders.base import load_state_dict

    marker = tmp_path / "PWNED"
    for path in _evil_checkpoints(tmp_path, marker).values():
        with pytest.raises(EncoderError):
            load_state_dict(path)
    assert not marker.exists()


def test_weights_for_another_architecture_are_a_clear_error(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "wrong.pt"
    torch.save({"features.0.0.weight": torch.zeros(3, 3)}, path)  # plain tensors, wrong shape
    r = CliRunner().invoke(main, ["-q", "build-index", str(make_collection(tmp_path / "i", 1)),
                                  "--out", str(tmp_path / "b"), "--model",
                                  "torchvision:mobilenet_v2", "--weights", str(path)])
    assert r.exit_code == 3, (r.output, r.exception)
    assert str(path) in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("garbage", [b"", b"not a faiss index at all" * 10,
                                     b"IxFI" + b"\xff" * 60])
def test_garbage_index_is_refused(bundle: Path, garbage: bytes) -> None:
    index = role(bundle, "index")
    index.write_bytes(garbage)
    rehash(bundle)
    with pytest.raises(BundleError, match="not a readable faiss index"):
        open_everything(bundle)
    r = CliRunner().invoke(main, ["-q", "predict", str(next((bundle.parent / "images")
                                                            .rglob("*.jpg"))),
                                  "--index", str(bundle)])
    assert r.exit_code == 4 and index.name in r.output and "Traceback" not in r.output
