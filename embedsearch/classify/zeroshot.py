"""CLIP zero-shot classification: class names → prompts → text embeddings → cosine logits.

Each class is the mean of its normalised prompt embeddings (a prompt ensemble),
renormalised; logits are ``logit_scale · cos`` with the model's own learnt scale (100 for
released CLIP models), so probabilities come out of the same softmax CLIP was trained
with. No labelled image is needed. Text embeddings are cached per (encoder, classes,
templates) so predicting again does not run the text tower.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.classify.metrics import softmax
from embedsearch.errors import BundleError, EmbedsearchError
from embedsearch.store.io import atomic_write, file_digest, read_json, write_json
from embedsearch.store.verify import file_mismatch

if TYPE_CHECKING:
    from embedsearch.encoders.base import Encoder

log = logging.getLogger(__name__)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "photo": (
        "a photo of a {}.",
        "a photo of the {}.",
        "a close-up photo of a {}.",
        "a good photo of a {}.",
        "a bad photo of a {}.",
        "a cropped photo of a {}.",
        "a bright photo of a {}.",
        "a photo of the small {}.",
        "a photo of the large {}.",
    ),
    "art": (
        "a painting in the style of {}.",
        "an artwork in the style of {}.",
        "a {} painting.",
        "a work of {} art.",
        "a reproduction of a painting in the style of {}.",
        "a detail of a {} painting.",
        "art in the style of {}.",
    ),
}
DEFAULT_TEMPLATES = "photo"
#: CLIP clamps its learnt logit scale at 100; random or odd weights may carry other values.
MAX_LOGIT_SCALE = 100.0
CACHE_FORMAT = "embedsearch-zeroshot"


def prompt_name(label: str) -> str:
    """A class label as words: ``art_nouveau`` → ``art nouveau``, ``long-sleeve`` → ``long
    sleeve``; a hyphen next to a single letter stays (``t-shirt``)."""
    text = label.replace("_", " ")
    text = re.sub(r"(?<=\w\w)-(?=\w\w)", " ", text)
    return " ".join(text.split())


def resolve_templates(templates: str | Sequence[str] | None) -> list[str]:
    """A set name ("photo", "art"), or custom templates each containing ``{}``."""
    if templates is None:
        templates = DEFAULT_TEMPLATES
    if isinstance(templates, str):
        if templates in TEMPLATE_SETS:
            return list(TEMPLATE_SETS[templates])
        templates = [templates]
    out: list[str] = []
    for t in templates:
        if t in TEMPLATE_SETS:
            out.extend(TEMPLATE_SETS[t])
        elif t.count("{}") != 1:
            raise EmbedsearchError(
                f"prompt template {t!r} must contain {{}} exactly once (where the class name "
                "goes)", hint=f"e.g. \"a photo of a {{}}.\", or a set: {', '.join(TEMPLATE_SETS)}")
        else:
            out.append(t)
    if not out:
        raise EmbedsearchError("no prompt templates given")
    return list(dict.fromkeys(out))


def check_text_capable(identity: dict[str, Any]) -> None:
    """Refuse zero-shot for encoders without a text tower, before loading any model."""
    if not identity.get("supports_text"):
        raise EmbedsearchError(
            f"zero-shot needs a CLIP encoder with a text tower; {identity.get('spec')} embeds "
            "images only",
            hint="use --method knn or head, or build the index with a CLIP encoder, e.g. "
            "--model openclip:ViT-B-32@laion2b_s34b_b79k")


class ZeroShotClassifier:
    """Zero-shot classifier with the shared contract; ``classes_`` sorted like scikit-learn.

    ``names`` maps a class to the words put into the prompts (default: :func:`prompt_name`).
    """

    kind = "zeroshot"

    def __init__(self, encoder: Encoder | None = None, classes: Sequence[str] = (),
                 templates: str | Sequence[str] | None = None,
                 names: dict[str, str] | None = None) -> None:
        self.encoder = encoder
        self.classes_ = np.asarray(sorted({str(c) for c in classes}), dtype=str)
        if len(self.classes_) < 2:
            raise EmbedsearchError(
                f"zero-shot needs at least two class names, got {len(self.classes_)}",
                hint="pass them with --classes cat,dog,bird")
        self.templates = resolve_templates(templates)
        self.names = {c: (names or {}).get(c) or prompt_name(c) for c in self.classes_}
        self.text_embeddings: np.ndarray | None = None
        self.logit_scale = MAX_LOGIT_SCALE

    def fit(self, X: np.ndarray | None = None, y: Sequence[str] | None = None
            ) -> ZeroShotClassifier:
        """Embed the prompts (``X``/``y`` are ignored: no training data is needed)."""
        if self.encoder is None:
            raise EmbedsearchError("a ZeroShotClassifier without an encoder cannot embed prompts")
        check_text_capable(self.encoder.identity())
        dim = self.encoder.dim
        rows = np.zeros((len(self.classes_), dim), np.float64)
        for i, c in enumerate(self.classes_):
            emb = self.encoder.encode_text([t.format(self.names[c]) for t in self.templates])
            rows[i] = emb.astype(np.float64).mean(axis=0)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True) + 1e-12
        self.text_embeddings = rows.astype(np.float32)
        scale = getattr(getattr(self.encoder, "model", None), "logit_scale", None)
        if scale is not None:
            self.logit_scale = float(min(float(np.exp(float(scale))), MAX_LOGIT_SCALE))
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        if self.text_embeddings is None:
            self.fit()
        assert self.text_embeddings is not None
        x = np.asarray(X, np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.shape[1] != self.text_embeddings.shape[1]:
            raise EmbedsearchError(f"vectors are {x.shape[1]}-d, the text embeddings "
                                   f"{self.text_embeddings.shape[1]}-d",
                                   hint="use image embeddings from the same CLIP encoder")
        return self.logit_scale * (x @ self.text_embeddings.T)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return softmax(self.decision_function(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.decision_function(X).argmax(axis=1)]

    # -- cache ----------------------------------------------------------------------------
    def cache_key(self, identity: dict[str, Any]) -> str:
        from embedsearch.encoders.identity import encoder_key

        blob = json.dumps({"encoder": encoder_key(identity), "templates": self.templates,
                           "names": [[c, self.names[c]] for c in self.classes_]})
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def save_cache(self, folder: Path, identity: dict[str, Any]) -> Path:
        from safetensors.numpy import save as st_save

        assert self.text_embeddings is not None
        key = self.cache_key(identity)
        blob = st_save({"text_embeddings": self.text_embeddings})
        wpath = folder / f"{key}.safetensors"
        atomic_write(wpath, lambda fh: fh.write(blob))
        write_json(folder / f"{key}.json", {
            "format": CACHE_FORMAT, "classes": list(map(str, self.classes_)),
            "names": self.names, "templates": self.templates, "logit_scale": self.logit_scale,
            "sha256": file_digest(wpath), "encoder": identity})
        return wpath

    def load_cache(self, folder: Path, identity: dict[str, Any]) -> bool:
        """Use cached text embeddings when present and intact; False when absent/stale."""
        from safetensors.numpy import load_file

        key = self.cache_key(identity)
        wpath, jpath = folder / f"{key}.safetensors", folder / f"{key}.json"
        if not (wpath.is_file() and jpath.is_file()):
            return False
        try:
            meta = read_json(jpath)
            ok = (meta.get("format") == CACHE_FORMAT
                  and file_mismatch(wpath, {"sha256": meta.get("sha256")}) is None
                  and meta.get("classes") == list(map(str, self.classes_))
                  and meta.get("templates") == self.templates)
            emb = load_file(str(wpath))["text_embeddings"] if ok else None
        except (BundleError, OSError, KeyError, ValueError) as exc:
            log.warning("ignoring damaged zero-shot cache %s: %s", wpath, exc)
            return False
        if emb is None or emb.shape != (len(self.classes_), identity["dim"]):
            log.warning("ignoring stale zero-shot cache %s", wpath)
            return False
        self.text_embeddings = np.asarray(emb, np.float32)
        self.logit_scale = float(meta["logit_scale"])
        return True
