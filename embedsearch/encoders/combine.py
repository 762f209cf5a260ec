"""Several encoders as one: their L2-normalised embeddings concatenated and re-normalised.

``build-index DATA --model A --model B=WEIGHTS`` builds one ordinary bundle whose vectors
are ``normalise([normalise(A(x)), normalise(B(x))])``: every part weighs the same, cosine
similarity is the mean of the parts' cosines, and kNN, heads, dedupe, views and serving
work unchanged. Each image is decoded once; every part's geometry (resize, crop) runs in
the decode threads. Parts may differ in input size (EfficientNet-Lite0 224 px beside Lite2
260 px): each part's crop is zero-padded at the bottom and right to the largest one so the
parts stack along the channel axis, and each part sees exactly its own crop again.

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


def concat_parts(spec: str) -> list[str] | None:
    """The parts of a concatenation written as one spec, ``A+B`` or ``concat:A+B`` (as a
    bundle records it), e.g. ``efficientnet-lite0+efficientnet-lite2``; None for one
    encoder."""
    body = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    parts = [p.strip() for p in body.split("+")]
    if len(parts) > 1 and not all(parts):
        raise EncoderError(f"{spec!r}: an empty part in a concatenation",
                           hint="write it as SPEC+SPEC, e.g. efficientnet-lite0+efficientnet-lite2")
    return parts if len(parts) > 1 else None


class _Preprocess:
    """Each part's PIL geometry, stacked along the channel axis (3 channels per part), each
    crop zero-padded to the largest part's size (:func:`part_batch` takes it back out)."""

    def __init__(self, parts: list[Encoder]) -> None:
        self.parts = parts
        self.crops = [p.preprocess.crop for p in parts]
        self.crop = max(self.crops)
        self.resize = max(p.preprocess.resize for p in parts)  # JPEG draft: large enough

    @property
    def worker_bytes(self) -> int:
        """Size of one image as :meth:`worker_transform` returns it (every part padded)."""
        return sum(p.preprocess.worker_bytes * self.crop ** 2 // c ** 2
                   for p, c in zip(self.parts, self.crops, strict=True))

    def stack(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The parts' CHW tensors, each padded to :attr:`crop`, joined along channels."""
        import torch
        import torch.nn.functional as F

        if len({t.dtype for t in tensors}) > 1:  # uint8 geometry beside a float transform
            tensors = [t.float() if t.dtype == torch.uint8 else t for t in tensors]
        return torch.cat([F.pad(t, (0, self.crop - t.shape[-1], 0, self.crop - t.shape[-2]))
                          for t in tensors], dim=0)

    def worker_transform(self, image: Image.Image) -> torch.Tensor:
        return self.stack([p.preprocess.worker_transform(image) for p in self.parts])

    def finish(self, batch: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        out = []
        for i, (p, c) in enumerate(zip(self.parts, self.crops, strict=True)):
            x = p.preprocess.finish(part_batch(batch, i, c))
            out.append(x if c == self.crop else F.pad(x, (0, self.crop - c, 0, self.crop - c)))
        return torch.cat(out, dim=1)

    def describe(self) -> dict[str, Any]:
        return {"parts": [p.preprocess.describe() for p in self.parts]}


def part_batch(batch: torch.Tensor, i: int, crop: int) -> torch.Tensor:
    """Part ``i``'s own ``crop`` × ``crop`` input out of a stacked, padded NCHW batch."""
    x = batch[:, 3 * i:3 * i + 3]
    return x if x.shape[-1] == crop and x.shape[-2] == crop else x[..., :crop, :crop].contiguous()


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
        """Every part's full preprocessing, stacked along the channel axis (padded)."""
        return self.preprocess.stack([p.transform(image) for p in self.parts])

    def encode_tensors(self, batch: torch.Tensor) -> np.ndarray:
        """Embed a preprocessed batch (``transform``, or ``preprocess.finish`` of stacked
        ``worker_transform`` outputs): each part its own 3 channels."""
        return _join([p.encode_tensors(part_batch(batch, i, c))
                      for i, (p, c) in enumerate(zip(self.parts, self.preprocess.crops,
                                                     strict=True))])

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
