"""Several encoders as one: their L2-normalised embeddings concatenated and re-normalised.

``build-index DATA --model A --model B=WEIGHTS`` builds one ordinary bundle whose vectors
are ``normalise([normalise(A(x)), normalise(B(x))])``: every part weighs the same, cosine
similarity is the mean of the parts' cosines, and kNN, heads, dedupe, views and serving
work unchanged. The parts must share the input size (e.g. 224 px), so each image is
decoded once and every part's geometry (resize, crop) runs in the decode threads.

Identity: the bundle records the spec ``concat:A+B``, each part's full identity (weights
sha256, preprocessing, precision) and a fingerprint made the same way, so a bundle is
refused when any part changed; :func:`encoder_from_identity` rebuilds the combination for
queries from that record, never from the spec string alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.errors import EncoderError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from embedsearch.encoders.base import Encoder

PREFIX = "concat:"


class _Preprocess:
    """Each part's PIL geometry, stacked along the channel axis (3 channels per part)."""

    def __init__(self, parts: list[Encoder]) -> None:
        crops = {p.preprocess.crop for p in parts}
        if len(crops) != 1:
            raise EncoderError(
                "encoders with different input sizes cannot be concatenated: "
                + ", ".join(f"{p.spec} {p.preprocess.crop} px" for p in parts),
                hint="combine encoders of the same input size (e.g. 224 px)")
        self.parts = parts
        self.crop = crops.pop()
        self.resize = max(p.preprocess.resize for p in parts)  # JPEG draft: large enough

    def worker_transform(self, image: Image.Image) -> torch.Tensor:
        import torch

        tensors = [p.preprocess.worker_transform(image) for p in self.parts]
        if len({t.dtype for t in tensors}) > 1:  # uint8 geometry beside a float transform
            tensors = [t.float() if t.dtype == torch.uint8 else t for t in tensors]
        return torch.cat(tensors, dim=0)

    def finish(self, batch: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.cat([p.preprocess.finish(batch[:, 3 * i:3 * i + 3])
                          for i, p in enumerate(self.parts)], dim=1)

    def describe(self) -> dict[str, Any]:
        return {"parts": [p.preprocess.describe() for p in self.parts]}


class CombinedEncoder:
    """Duck-types :class:`embedsearch.encoders.base.Encoder` for the pipeline."""

    supports_text = False

    def __init__(self, parts: list[Encoder]) -> None:
        if len(parts) < 2:
            raise EncoderError("concatenation needs at least two encoders")
        self.parts = parts
        self.preprocess = _Preprocess(parts)
        self.spec = PREFIX + "+".join(p.spec for p in parts)
        self.dim = sum(p.dim for p in parts)
        self.precision = parts[0].precision
        self.device = parts[0].device  # every part loads on the same device
        #: Recorded with the build's throughput: each part's runtime, e.g. "openvino+torch".
        self.backend = "+".join(dict.fromkeys(p.backend for p in parts))
        self._fingerprint: np.ndarray | None = None

    def transform(self, image: Image.Image) -> torch.Tensor:
        """Every part's full preprocessing, stacked along the channel axis."""
        import torch

        return torch.cat([p.transform(image) for p in self.parts], dim=0)

    def encode_tensors(self, batch: torch.Tensor) -> np.ndarray:
        """Embed a preprocessed batch (``transform``, or ``preprocess.finish`` of stacked
        ``worker_transform`` outputs): each part its own 3 channels."""
        return _join([p.encode_tensors(batch[:, 3 * i:3 * i + 3])
                      for i, p in enumerate(self.parts)])

    def encode_images(self, images: list[Image.Image], batch_size: int = 32) -> np.ndarray:
        return _join([p.encode_images(images, batch_size) for p in self.parts])

    def fingerprint(self) -> np.ndarray:
        if self._fingerprint is None:
            self._fingerprint = _join([p.fingerprint()[None, :] for p in self.parts])[0]
        return self._fingerprint

    def identity(self) -> dict[str, Any]:
        import hashlib

        parts = [p.identity() for p in self.parts]
        digest = hashlib.sha256("|".join(str(p["weights"].get("sha256")) for p in parts)
                                .encode()).hexdigest()
        return {"spec": self.spec, "dim": self.dim,
                "weights": {"source": "parts", "sha256": digest},
                "preprocess": self.preprocess.describe(),
                "normalisation": "l2 of the concatenated l2-normalised parts",
                "dtype": "float32", "precision": self.precision,
                "impl_version": parts[0]["impl_version"], "supports_text": False,
                "parts": parts}

    def encode_text(self, texts: list[str]) -> np.ndarray:
        raise EncoderError(f"encoder {self.spec} has no text tower",
                           hint="zero-shot needs a single CLIP encoder")


def _join(vectors: list[np.ndarray]) -> np.ndarray:
    X = np.hstack(vectors).astype(np.float32, copy=False)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def combine(models: list[str], precision: str | None = None,
            device: str = "auto") -> CombinedEncoder:
    """``["efficientnet-lite0", "torchvision:mobilenet_v2@IMAGENET1K_V1=FILE"]`` → one
    encoder (``SPEC=FILE`` gives a part's weights file)."""
    from embedsearch.encoders import DEFAULT_PRECISION, load_encoder
    from embedsearch.encoders.choice import parse_models

    return CombinedEncoder([load_encoder(c.spec, c.weights,
                                         precision=precision or DEFAULT_PRECISION, device=device)
                            for c in parse_models(models)])


def encoder_from_identity(identity: dict[str, Any],
                          weights: str | os.PathLike[str] | None = None,
                          device: str = "auto") -> CombinedEncoder:
    """Rebuild a bundle's combination from its recorded parts (their weights files where
    they were files; ``weights`` is not accepted: parts keep their own)."""
    from embedsearch.encoders import load_encoder

    if weights is not None:
        raise EncoderError("--weights does not apply to a concatenated encoder",
                           hint="each part's weights file is recorded in the bundle")
    parts = []
    for part in identity["parts"]:
        w = part.get("weights", {})
        path = w.get("path") if w.get("source") == "file" else None
        if path and not Path(path).is_file():
            raise EncoderError(f"the weights {path} of part {part['spec']} are gone",
                               hint="put the file back, or rebuild the bundle with --overwrite")
        parts.append(load_encoder(part["spec"], path, precision=part.get("precision", "fp32"),
                                  device=device))
    return CombinedEncoder(parts)
