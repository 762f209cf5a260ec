"""Concatenated encoders: one ordinary bundle, identity of every part, queries rebuilt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from embedsearch.bundle import load_bundle
from embedsearch.cli import main
from embedsearch.encoders import load_encoder
from embedsearch.encoders.combine import CombinedEncoder, combine
from embedsearch.errors import EmbedsearchError, EncoderError
from embedsearch.pipeline import build_index
from embedsearch.predict import Predictor
from embedsearch.query import embed_paths
from tests.conftest import MOBILENET, REPO

TINY = "test:tiny"


def test_concatenated_bundle_is_the_normalised_join(collection: Path,
                                                    queries: dict[str, Path]) -> None:
    build_index(collection, name="one", model=TINY)
    enc = CombinedEncoder([load_encoder(TINY), load_encoder(TINY)])
    both = build_index(collection, name="two", encoder=enc)
    ident = both.manifest["encoder"]
    assert ident["spec"] == "concat:test:tiny+test:tiny" and ident["dim"] == 128
    assert [p["spec"] for p in ident["parts"]] == [TINY, TINY]
    a, b = load_bundle("one"), load_bundle("two")
    Xa, Xb = np.asarray(a.embeddings), np.asarray(b.embeddings)
    assert np.allclose(Xb[:, :64] * np.sqrt(2), Xa, atol=1e-6)
    assert np.allclose(Xb[:, 64:], Xb[:, :64])
    # Queries are embedded by the combination rebuilt from the recorded parts.
    q = embed_paths(b, [queries["red"]])[0]
    assert q.shape == (1, 128) and np.isclose(np.linalg.norm(q), 1, atol=1e-6)
    from embedsearch.data.images import load_image  # the server's path: one image

    enc2 = b.encoder()
    image = load_image(queries["red"], target_size=enc2.preprocess.resize).image
    one = enc2.encode_tensors(enc2.transform(image)[None])
    assert np.allclose(one, q, atol=1e-5)
    assert Predictor(b).predict([queries["red"]])[0].label == "red"
    # A rebuild without --model keeps the combination and re-encodes nothing.
    again = build_index(collection, name="two")
    assert again.encoded == 0 and again.manifest["encoder"]["spec"] == ident["spec"]
    # Another encoder on the same bundle is refused, as for any bundle.
    r = CliRunner().invoke(main, ["build-index", str(collection), "--name", "two",
                                  "--model", TINY])
    assert r.exit_code != 0 and "was built with encoder concat:" in r.output


def test_parts_of_different_input_sizes_each_see_their_own_crop(
        collection: Path, queries: dict[str, Path]) -> None:
    """test:tiny (32 px) beside EfficientNet-Lite0 (224 px): each part's crop is padded to
    stack, and each part embeds exactly what it embeds alone, on the decode-worker path
    and on the one-image path (the server's)."""
    import torch

    from embedsearch.data.images import load_image

    enc = combine([TINY, "efficientnet-lite0"])
    tiny, lite0 = enc.parts
    assert enc.preprocess.crops == [tiny.preprocess.crop, 224] and tiny.preprocess.crop < 224
    images = [load_image(p, target_size=enc.preprocess.resize).image for p in queries.values()]

    def alone(e: object, path: str) -> np.ndarray:
        if path == "worker":
            x = torch.stack([e.preprocess.worker_transform(i) for i in images])
            return e.encode_tensors(e.preprocess.finish(x))
        return e.encode_tensors(torch.stack([e.transform(i) for i in images]))

    for path in ("worker", "transform"):
        ref = np.hstack([v / np.linalg.norm(v, axis=1, keepdims=True)
                         for v in (alone(tiny, path), alone(lite0, path))])
        ref /= np.linalg.norm(ref, axis=1, keepdims=True)
        assert np.allclose(alone(enc, path), ref, atol=1e-6), path
    # One padded image as the decode workers ship it: the larger part's size, every part.
    assert enc.preprocess.worker_bytes == 2 * 3 * 224 * 224
    # The same combination as one spec, A+B, through a build; the bundle records concat:A+B.
    both = build_index(collection, name="ab", model=f"{TINY}+efficientnet-lite0")
    assert both.manifest["encoder"]["spec"] == f"concat:{TINY}+efficientnet-lite0"
    assert both.manifest["encoder"]["dim"] == 64 + 1280


def test_concatenation_errors() -> None:
    with pytest.raises(EncoderError, match="empty part"):
        build_index(REPO / "examples" / "clothing-mini", name="x", model=f"{TINY}+")
    with pytest.raises(EmbedsearchError, match="ambiguous"):
        build_index(REPO / "examples" / "clothing-mini", name="x", model=[TINY, TINY],
                    weights=MOBILENET)
    with pytest.raises(EncoderError, match="at least two"):
        CombinedEncoder([load_encoder(TINY)])


@pytest.mark.slow
@pytest.mark.skipif(not MOBILENET.is_file(), reason=f"{MOBILENET} absent (../shared)")
def test_cli_concatenates_two_real_encoders() -> None:
    """~40 s: EfficientNet-Lite0 + MobileNetV2 on the example collection, via the CLI."""
    data = REPO / "examples" / "clothing-mini"
    spec = f"torchvision:mobilenet_v2@IMAGENET1K_V1={MOBILENET}"
    r = CliRunner().invoke(main, ["build-index", str(data), "--name", "both",
                                  "--model", "efficientnet-lite0", "--model", spec])
    assert r.exit_code == 0, r.output
    r2 = CliRunner().invoke(main, ["build-index", str(data), "--name", "lite0"])
    assert r2.exit_code == 0, r2.output
    both, lite0 = load_bundle("both"), load_bundle("lite0")
    assert both.dim == 2560 and both.encoder_identity["parts"][1]["weights"]["source"] == "file"
    Xb, Xl = np.asarray(both.embeddings), np.asarray(lite0.embeddings)
    assert np.allclose(Xb[:, :1280] * np.sqrt(2), Xl, atol=1e-4)
    pred = CliRunner().invoke(main, ["predict", str(data / "test"), "--index", "both"])
    assert pred.exit_code == 0 and "accuracy" in pred.output
