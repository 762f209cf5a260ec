"""Inference backends: export once, agree with torch, fall back to torch when they cannot."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from embedsearch import build_index, load_bundle
from embedsearch.encoders import backends, load_encoder
from embedsearch.encoders.base import Encoder, WeightsInfo
from embedsearch.errors import EncoderError
from embedsearch.query import embed_paths

TINY = "test:tiny"
RUNTIMES = [pytest.param(b, marks=pytest.mark.skipif(not backends.installed(b),
                                                     reason=f"{b} is not installed"))
            for b in backends.AUTO_ORDER]


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EMBEDSEARCH_EXPORT_DIR", str(tmp_path / "cache"))
    # No shared embedding cache: every build here must really run its backend.
    monkeypatch.setenv("EMBEDSEARCH_CACHE_DIR", "off")
    return tmp_path / "cache"


def _conv(backend: str) -> Encoder:
    """A small random conv net (seeded) behind the real Encoder class and test preprocessing:
    exportable by every runtime, weights with no file hash (digested from the tensors)."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 24, 3), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    enc = Encoder("test:conv", net, load_encoder(TINY).preprocess, WeightsInfo("none"))
    backends.use_backend(enc, backend)
    return enc


def _exports(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "exports").glob("*") if not p.name.startswith("."))


@pytest.mark.parametrize("name", RUNTIMES)
def test_runtime_matches_torch_and_export_is_cached(name: str, _cache: Path,
                                                    collection: Path) -> None:
    torch_enc = _conv("torch")
    enc = _conv(name)
    assert enc.backend == name and enc.runtime is not None
    assert len(_exports(_cache)) == 1 and (_exports(_cache)[0] / "done.json").is_file()
    import torch

    batch = torch.rand(23, 3, 32, 32)
    want = torch_enc.encode_tensors(batch)
    np.testing.assert_allclose(enc.encode_tensors(batch), want, atol=1e-5)
    if name == "openvino":  # cut into requests of 4 (a work queue): rows back in order
        chunked = backends.OpenVINORuntime(_exports(_cache)[0] / "model.xml", chunk=4)
        np.testing.assert_allclose(chunked(batch.numpy()), enc.runtime(batch.numpy()),
                                   atol=1e-6)
    # A second load reuses the export (no second folder, no temp folder left behind).
    again = _conv(name)
    assert again.backend == name and len(list((_cache / "exports").iterdir())) == 1
    # Same vectors through the whole build, so the backend stays out of the identity.
    a = build_index(collection, out="a", encoder=torch_enc)
    b = build_index(collection, out="b", encoder=enc)
    assert a.encoded == b.encoded == 24
    assert a.manifest["encoder"] == b.manifest["encoder"]
    assert b.manifest["machine"]["backend"] == name
    np.testing.assert_allclose(load_bundle("a").embeddings, load_bundle("b").embeddings,
                               atol=1e-5)


@pytest.mark.parametrize("name", RUNTIMES)
def test_disagreeing_runtime_falls_back_to_torch(name: str, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    real = backends._attach

    def wrong(encoder, backend):  # a runtime whose numbers are off (e.g. reduced precision)
        run = real(encoder, backend)
        return lambda x: run(x) + 0.05 * np.random.default_rng(0).standard_normal(
            (len(x), encoder.dim)).astype(np.float32)

    monkeypatch.setattr(backends, "_attach", wrong)
    with caplog.at_level(logging.WARNING):
        enc = _conv(name)
    assert enc.backend == "torch" and enc.runtime is None
    assert "cosine" in caplog.text and "not used" in caplog.text


def test_missing_runtime_and_auto(monkeypatch: pytest.MonkeyPatch,
                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(backends, "installed", lambda name: name == "torch")
    with caplog.at_level(logging.WARNING):
        assert _conv("openvino").backend == "torch"
    assert "not installed" in caplog.text
    # auto with neither runtime installed: torch, silently.
    assert _conv("auto").backend == "torch"
    with pytest.raises(EncoderError, match="unknown backend"):
        load_encoder(TINY, backend="tensorrt")


def test_auto_keeps_torch_where_a_runtime_cannot_help(monkeypatch: pytest.MonkeyPatch) -> None:
    # The hand-written test encoder, and bf16 (torch autocast) never leave torch on auto.
    assert load_encoder(TINY).backend == "torch"
    if any(backends.installed(b) for b in backends.AUTO_ORDER):
        assert _conv("auto").backend == next(b for b in backends.AUTO_ORDER
                                             if backends.installed(b))
    enc = load_encoder(TINY)
    enc.configure("bf16")
    assert backends.use_backend(enc, "auto") == "torch"
    monkeypatch.setenv("EMBEDSEARCH_BACKEND", "nonsense")
    with pytest.raises(EncoderError, match="unknown backend"):
        backends.default_backend()


@pytest.mark.parametrize("name", RUNTIMES[:1])
def test_light_path_embeds_without_torch_and_rechecks(name: str, _cache: Path,
                                                      collection: Path,
                                                      queries: dict[str, Path],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    import json
    import os
    import subprocess
    import sys

    enc = _conv(name)  # attaching the runtime records the light entry
    build_index(collection, out="b", encoder=enc)
    bundle = load_bundle("b")
    light = bundle.image_encoder()
    assert isinstance(light, backends.LightEncoder) and bundle._encoder is None
    paths = list(queries.values())
    on_torch = load_bundle("b")
    on_torch._encoder = _conv("torch")  # what Bundle.encoder() would build for a registry spec
    np.testing.assert_allclose(embed_paths(bundle, paths)[0], embed_paths(on_torch, paths)[0],
                               atol=1e-5)
    # A fresh process predicts through the export without importing torch at all.
    code = ("import sys; from pathlib import Path; from embedsearch.predict import Predictor; "
            f"p = Predictor('b').predict([Path({str(paths[0])!r})], k=3); "
            "assert p[0].status == 'ok', p; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    # An entry whose recorded torch fingerprint no longer matches is not used (warned).
    entry = next((_cache / "light").glob("*.json"))
    rec = json.loads(entry.read_text())
    rec["torch_fingerprint"] = list(-np.asarray(rec["torch_fingerprint"]))
    entry.write_text(json.dumps(rec))
    with caplog.at_level(logging.WARNING):
        assert backends.light_encoder(bundle.encoder_identity) is None
    assert "no longer matches torch" in caplog.text
    # --backend torch never takes the light path.
    entry.write_text(json.dumps({**rec, "torch_fingerprint": list(-np.asarray(
        rec["torch_fingerprint"]))}))
    assert backends.light_encoder(bundle.encoder_identity) is not None
    backends.set_default_backend("torch")
    try:
        assert backends.light_encoder(bundle.encoder_identity) is None
    finally:
        backends.set_default_backend(None)


@pytest.mark.parametrize("name", RUNTIMES[:1])
def test_build_on_cpu_takes_the_light_path_with_the_same_identity(name: str, _cache: Path,
                                                                  collection: Path) -> None:
    """Once a full encoder of a packaged model has recorded its verified export, a later
    build of the default spec on the CPU embeds through the export without importing
    torch, and writes the same encoder identity and the same vectors as the full path; a
    GPU (or any device but the CPU) or other weights keep the full path."""
    import json
    import os
    import subprocess
    import sys

    from embedsearch.encoders import DEFAULT_ENCODER
    from embedsearch.pipeline import _cpu_only

    full = load_encoder(DEFAULT_ENCODER, backend=name)  # records the light entry
    build_index(collection, out="full", encoder=full)
    code = ("import sys; from embedsearch import build_index; "
            "build_index(sys.argv[1], out='light', device='cpu'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(collection)], capture_output=True,
                         text=True, env={**os.environ, "EMBEDSEARCH_BACKEND": name,
                                         "PYTHONPATH": str(Path(__file__).parents[1])})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    a, b = load_bundle("full"), load_bundle("light")
    assert a.manifest["encoder"] == b.manifest["encoder"]
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-5)
    # an entry whose weights file lies outside this interpreter's packages is not used
    entry = next((_cache / "light").glob("*.json"))
    rec = json.loads(entry.read_text())
    rec["identity"]["weights"]["path"] = "/elsewhere/" + Path(
        rec["identity"]["weights"]["path"]).name
    entry.write_text(json.dumps(rec))
    assert backends.light_encoder_for_spec(DEFAULT_ENCODER, "fp32") is None
    assert _cpu_only("cpu") and not _cpu_only("cuda") and not _cpu_only("mps")
