"""Inference backends beside torch: OpenVINO and ONNX Runtime run an exported image tower.

An encoder is always built in torch (its weights, preprocessing and identity come from
there). :func:`use_backend` then exports the image tower once, caches the export in the
user cache dir under a key made of everything that decides the graph (encoder identity,
weights digest, torch and runtime versions, input size), and runs batches through the
runtime instead of torch.

Every time a runtime is attached, it embeds the fingerprint image and must agree with
torch's own embedding of it to cosine >= :data:`MIN_COSINE`; otherwise the encoder stays
on torch with a warning. That tolerance is ten times tighter than the one bundles already
accept between CPU kernels (``bundle.FINGERPRINT_MIN_COSINE`` = 0.999), and on
clothing-small the 10-NN predictions were identical to torch's
(benchmarks/results/throughput.md), so the backend is *not* part of the encoder identity:
a bundle built with one backend is queried and extended with another.

``auto`` picks the fastest installed runtime in the measured order :data:`AUTO_ORDER`
(OpenVINO, then ONNX Runtime; benchmarks/results/throughput.md) for fp32 encoders on CPU;
bf16, a model on an accelerator, or an encoder that declares ``prefers_torch`` stay on torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.errors import EncoderError

if TYPE_CHECKING:
    from embedsearch.encoders.base import Encoder

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "openvino", "onnxruntime")
#: Fastest first, as measured on CPU (benchmarks/results/throughput.md).
AUTO_ORDER = ("openvino", "onnxruntime")
#: Cosine a runtime's fingerprint embedding must reach against torch's.
MIN_COSINE = 0.9999
#: The Python module each runtime needs, and how to get it.
_MODULES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}
_INSTALL = {"openvino": "pip install openvino (a default dependency of embedsearch)",
            "onnxruntime": "pip install 'embedsearch[onnxruntime]'"}
#: Set by the CLI's ``--backend``; else the environment, else "auto".
_default: str | None = None

Runtime = Callable[[np.ndarray], np.ndarray]


def set_default_backend(name: str | None) -> None:
    """The backend :func:`load_encoder` uses when none is passed (None: env or auto)."""
    global _default
    _default = _check_name(name) if name is not None else None


def default_backend() -> str:
    return _default or _check_name(os.environ.get("EMBEDSEARCH_BACKEND", "auto"))


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise EncoderError(f"unknown backend {name!r}", hint=f"use one of {', '.join(BACKENDS)}")
    return name


def installed(name: str) -> bool:
    """Whether the runtime's package can be imported (torch always can)."""
    return name == "torch" or importlib.util.find_spec(_MODULES[name]) is not None


def cache_root() -> Path:
    """Where exports live: $EMBEDSEARCH_EXPORT_DIR, else the shared embedding cache's
    $EMBEDSEARCH_CACHE_DIR (unless "off": exports are not embeddings), else
    $XDG_CACHE_HOME/embedsearch, else ~/.cache/embedsearch (a package's weights folder may
    be read-only, a cache dir is not)."""
    env = os.environ.get("EMBEDSEARCH_EXPORT_DIR") or os.environ.get("EMBEDSEARCH_CACHE_DIR")
    if env and env.lower() != "off":
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "embedsearch"


def cpu_threads() -> int:
    """Cores this process may run on (affinity/cgroup-aware where the OS says so)."""
    with contextlib.suppress(AttributeError):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def use_backend(encoder: Encoder, backend: str | None = None) -> str:
    """Run ``encoder`` through ``backend`` (None: the default). Returns the backend in use.

    Falls back to torch, with a warning, when the runtime is missing, the export fails or
    the exported graph disagrees with torch on the fingerprint image.
    """
    name = _check_name(backend or default_backend())
    encoder.runtime, encoder.backend = None, "torch"
    if name == "torch":
        return "torch"
    why_torch = _torch_only_reason(encoder)
    if name == "auto":
        if why_torch or encoder.prefers_torch:
            return "torch"
        candidates = [b for b in AUTO_ORDER if installed(b)]
        if not candidates:
            log.debug("auto backend: neither openvino nor onnxruntime is installed: torch")
            return "torch"
    else:
        if why_torch:
            log.warning("backend %s not used for %s (%s): running torch", name, encoder.spec,
                        why_torch)
            return "torch"
        if not installed(name):
            log.warning("backend %s is not installed: running %s with torch (%s)", name,
                        encoder.spec, _INSTALL[name])
            return "torch"
        candidates = [name]
    for cand in candidates:
        try:
            runtime = _attach(encoder, cand)
        except Exception as exc:  # any runtime/export failure must leave a working encoder
            log.warning("backend %s failed for %s (%s: %s): trying the next, then torch",
                        cand, encoder.spec, type(exc).__name__, str(exc)[:300])
            continue
        cos, reference = _agreement(encoder, runtime)
        if cos < MIN_COSINE:
            log.warning("backend %s embeds the fingerprint image of %s at cosine %.6f to "
                        "torch (< %s): not used", cand, encoder.spec, cos, MIN_COSINE)
            continue
        encoder.runtime, encoder.backend = runtime, cand
        encoder._fingerprint = None
        _record_light(encoder, cand, reference)
        return cand
    return "torch"


def _torch_only_reason(encoder: Encoder) -> str | None:
    if encoder.precision != "fp32":
        return f"precision {encoder.precision} runs in torch autocast"
    device = next((p.device.type for p in encoder.model.parameters()), "cpu")
    if device != "cpu" or str(getattr(encoder, "device", "cpu")) not in ("cpu", "None"):
        return "the model is on an accelerator"
    return None


def _fingerprint_input(encoder: Encoder) -> Any:
    from embedsearch.encoders.base import fingerprint_image

    return encoder.transform(fingerprint_image()).unsqueeze(0)


def _agreement(encoder: Encoder, runtime: Runtime) -> tuple[float, np.ndarray]:
    """Cosine between torch's and the runtime's features of the fingerprint image, and
    torch's (L2-normalised) features."""
    import torch

    x = _fingerprint_input(encoder)
    with torch.inference_mode():
        ref = encoder._forward(x).float().numpy()[0].astype(np.float64)
    ref /= max(float(np.linalg.norm(ref)), 1e-12)
    return _cosine(ref, runtime(x.numpy())[0]), ref


def _cosine(ref: np.ndarray, got: np.ndarray) -> float:
    got = np.asarray(got, np.float64)
    den = np.linalg.norm(ref) * np.linalg.norm(got)
    return float(ref @ got / den) if den > 0 and np.isfinite(got).all() else -1.0


# -- export cache ------------------------------------------------------------------------
def export_key(encoder: Encoder, backend: str) -> str:
    """Hash of everything that decides the exported graph and its numbers."""
    import torch

    ident = encoder.identity()
    weights = ident["weights"].get("sha256") or _state_digest(encoder)
    version = importlib.import_module(_MODULES[backend]).__version__
    blob = json.dumps({"identity": ident, "weights": weights, "torch": torch.__version__,
                       "backend": backend, "version": str(version),
                       "input": [3, encoder.preprocess.crop, encoder.preprocess.crop],
                       "class": type(encoder).__qualname__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _state_digest(encoder: Encoder) -> str:
    """Digest of the parameters themselves, for weights with no file hash (random/hub)."""
    h = hashlib.sha256()
    for key, tensor in encoder.model.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _export_dir(encoder: Encoder, backend: str) -> Path:
    """The cached export's folder, exporting into it first when it does not exist yet.

    The export is written into a temp folder beside it and renamed into place, so a
    reader sees a whole export or none; two processes exporting at once both succeed and
    one rename wins.
    """
    root = cache_root() / "exports"
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in encoder.spec)[:60]
    final = root / f"{slug}-{backend}-{export_key(encoder, backend)}"
    if (final / "done.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-export-", dir=root))
    try:
        _EXPORTERS[backend](encoder, tmp)
        (tmp / "done.json").write_text(json.dumps({"spec": encoder.spec, "backend": backend,
                                                   "identity": encoder.identity()}))
        try:
            os.replace(tmp, final)
        except OSError:  # another process got there first (the folder exists, not empty)
            if not (final / "done.json").is_file():
                raise
        log.info("exported %s for %s to %s", encoder.spec, backend, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


class _Tower:
    """The encoder's ``_forward`` as a torch module, for tracing exporters."""

    @staticmethod
    def build(encoder: Encoder) -> Any:
        import torch

        class Tower(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = encoder.model  # registers the parameters

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return encoder._forward(x).float()

        return Tower().eval()


def _export_openvino(encoder: Encoder, folder: Path) -> None:
    import openvino as ov
    import torch

    crop = encoder.preprocess.crop
    with torch.no_grad():
        model = ov.convert_model(_Tower.build(encoder),
                                 example_input=torch.zeros(1, 3, crop, crop),
                                 input=[(-1, 3, crop, crop)])
    # fp16 weight compression is the default of save_model: it would change the vectors.
    ov.save_model(model, folder / "model.xml", compress_to_fp16=False)


def _export_onnx(encoder: Encoder, folder: Path) -> None:
    import torch

    crop = encoder.preprocess.crop
    # The TorchScript exporter needs only the onnx package (the dynamo one also onnxscript);
    # it warns that it is legacy, which is not the user's business.
    # Without grad, nn.MultiheadAttention takes a fused fast path (CLIP's ViTs) that the
    # exporter cannot write; the plain path computes the same attention.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    with contextlib.ExitStack() as stack:
        stack.callback(torch.backends.mha.set_fastpath_enabled, fastpath)
        stack.enter_context(torch.no_grad())
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        torch.onnx.export(_Tower.build(encoder), (torch.zeros(1, 3, crop, crop),),
                          str(folder / "model.onnx"), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
                          opset_version=17, dynamo=False)


_EXPORTERS = {"openvino": _export_openvino, "onnxruntime": _export_onnx}


# -- runtimes ------------------------------------------------------------------------------
def _attach(encoder: Encoder, backend: str) -> Runtime:
    return _open(backend, _export_dir(encoder, backend))


def _open(backend: str, folder: Path) -> Runtime:
    if backend == "openvino":
        return OpenVINORuntime(folder / "model.xml")
    return OnnxRuntime(folder / "model.onnx")


class OpenVINORuntime:
    """An OpenVINO CPU model run as several independent single-threaded streams.

    Why streams, not one multi-threaded request: threads of one request meet at a barrier
    after every layer, so when another process takes a core, the thread on it stalls the
    others; independent streams keep going on whatever cores are free (the contention
    benchmark in benchmarks/throughput.py). A batch is split evenly across the streams;
    ``chunk`` cuts it into smaller requests that the streams take as they finish one (a
    work queue). Smaller requests did not help beside a busy process and cost idle speed
    (4 images: 0.96× model-only, 0.89× pipeline; benchmarks/results/thread_policy.md):
    the scheduler shares both cores among all runnable threads, so no stream lags alone.
    fp32 inference precision is forced: on CPUs with bf16 units OpenVINO otherwise
    defaults to bf16, which moves the vectors (fingerprint cosine 0.9997 here).
    """

    def __init__(self, xml: Path, threads: int | None = None, streams: int | None = None,
                 chunk: int | None = None) -> None:
        import openvino as ov

        threads = threads or cpu_threads()
        core = ov.Core()
        config: dict[str, Any] = {
            "PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": "f32", "ENABLE_CPU_PINNING": False}
        if streams:  # else the THROUGHPUT hint's choice (one stream per core here)
            config["NUM_STREAMS"] = streams
        self.compiled = core.compile_model(core.read_model(xml), "CPU", config)
        self.streams = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self.chunk = chunk
        self.queue = ov.AsyncInferQueue(self.compiled, self.streams)
        self.queue.set_callback(self._done)
        self._outs: list[np.ndarray | None] = []
        self._lock = threading.Lock()  # the requests are reused: one batch at a time

    def _done(self, request: Any, index: int) -> None:
        self._outs[index] = request.get_output_tensor(0).data.copy()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, np.float32)
        size = max(1, -(-len(batch) // self.streams))
        if self.chunk:
            size = min(size, self.chunk)
        parts = [batch[i:i + size] for i in range(0, len(batch), size)]
        with self._lock:
            self._outs = [None] * len(parts)
            for i, part in enumerate(parts):
                self.queue.start_async({0: part}, userdata=i, share_inputs=True)
            self.queue.wait_all()
            outs = self._outs
        return np.concatenate(outs)


class OnnxRuntime:
    """ONNX Runtime CPU session; its intra-op threads sleep instead of spinning when idle,
    which costs little alone and keeps a contended core free for whoever holds it."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or cpu_threads()
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": np.ascontiguousarray(batch, np.float32)})[0]


# -- light path: a cached, verified export without torch -----------------------------------
#: PIL resampling filter of each interpolation name torchvision records.
_PIL_FILTERS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
LIGHT_FORMAT = "embedsearch-light-encoder"


class LightPreprocess:
    """Shorter-side resize, centre crop and normalisation in PIL + numpy: what torchvision's
    eval transform does (checked bit for bit against it before an entry is recorded)."""

    def __init__(self, resize: int, crop: int, interpolation: str, mean: list[float],
                 std: list[float]) -> None:
        self.resize, self.crop = resize, crop
        self.filter = _PIL_FILTERS[interpolation]
        self.mean = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(1, -1, 1, 1)

    def worker_transform(self, image: Any) -> np.ndarray:
        """PIL image → uint8 CHW array (torchvision's Resize(int) + CenterCrop on PIL)."""
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.resize * long / short)
        size = (self.resize, new_long) if w <= h else (new_long, self.resize)
        if size != (w, h):
            image = image.resize(size, self.filter)
        w, h = image.size  # both >= crop, as resize >= crop (checked when recorded)
        top, left = round((h - self.crop) / 2.0), round((w - self.crop) / 2.0)
        image = image.crop((left, top, left + self.crop, top + self.crop))
        arr = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def finish(self, batch: np.ndarray) -> np.ndarray:
        x = batch.astype(np.float32) / np.float32(255)
        return (x - self.mean) / self.std


class LightEncoder:
    """Image embedding through a cached export only: no torch, timm or torchvision import.

    Made by :func:`light_encoder` from an entry that a full encoder recorded after its
    runtime passed the fingerprint check; it repeats that check on every load."""

    supports_text = False

    def __init__(self, entry: dict[str, Any], runtime: Runtime) -> None:
        self.entry = entry
        self.spec = entry["identity"]["spec"]
        self.dim = int(entry["identity"]["dim"])
        self.backend = entry["backend"]
        self.runtime = runtime
        self.preprocess = LightPreprocess(**entry["preprocess"])
        self._fingerprint: np.ndarray | None = None

    def identity(self) -> dict[str, Any]:
        return dict(self.entry["identity"])

    def encode_tensors(self, batch: np.ndarray) -> np.ndarray:
        feats = np.asarray(self.runtime(np.ascontiguousarray(batch, np.float32)), np.float32)
        feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
        if not np.isfinite(feats).all():
            raise EncoderError(f"encoder {self.spec} produced NaN or infinite values",
                               hint="delete the export cache (embedsearch --backend torch)")
        return feats

    def fingerprint(self) -> np.ndarray:
        if self._fingerprint is None:
            from embedsearch.encoders.base import fingerprint_image

            x = self.preprocess.worker_transform(fingerprint_image())
            self._fingerprint = self.encode_tensors(self.preprocess.finish(x[None]))[0]
        return self._fingerprint


def _light_path(identity: dict[str, Any]) -> Path:
    from embedsearch.encoders.identity import encoder_digest

    key = encoder_digest(identity, 24)
    return cache_root() / "light" / f"{key}.json"


def _light_params(encoder: Encoder) -> dict[str, Any] | None:
    """LightPreprocess arguments when they reproduce the encoder's own transform exactly."""
    import torch
    from PIL import Image

    d = encoder.preprocess.describe()
    if d["interpolation"] not in _PIL_FILTERS or d["resize_shorter_side"] < d["center_crop"]:
        return None
    params = {"resize": d["resize_shorter_side"], "crop": d["center_crop"],
              "interpolation": d["interpolation"], "mean": d["mean"], "std": d["std"]}
    light = LightPreprocess(**params)
    from embedsearch.encoders.base import fingerprint_image

    probe = np.asarray(fingerprint_image())
    for size in ((256, 256), (301, 203), (190, 420)):  # square, landscape, portrait
        image = Image.fromarray(probe).resize(size)
        ref = encoder.preprocess.finish(encoder.preprocess.worker_transform(image)[None])
        mine = light.finish(light.worker_transform(image)[None])
        if not torch.equal(torch.from_numpy(mine), ref):
            return None
    return params


def _record_light(encoder: Encoder, backend: str, reference: np.ndarray) -> None:
    """Let later processes embed images with this export without building the model."""
    from embedsearch.store.io import write_json

    path = _light_path(encoder.identity())
    try:
        params = _light_params(encoder)
        if params is None:
            return
        write_json(path, {
            "format": LIGHT_FORMAT, "identity": encoder.identity(), "backend": backend,
            "export": _export_dir(encoder, backend).name,
            "runtime_version": str(importlib.import_module(_MODULES[backend]).__version__),
            "preprocess": params, "torch_fingerprint": [float(v) for v in reference]})
    except Exception as exc:  # the light path is an optimisation: never fail the load
        log.debug("no light entry for %s: %s", encoder.spec, exc)


def light_encoder(identity: dict[str, Any]) -> LightEncoder | None:
    """A verified :class:`LightEncoder` for ``identity``, or None (then build the encoder).

    Used only where the process default backend allows the recorded runtime, the runtime's
    version is the one that was verified, the export is still there, and the export still
    embeds the fingerprint image like torch did (cosine >= :data:`MIN_COSINE`).
    """
    name = default_backend()
    path = _light_path(identity)
    if name == "torch" or not path.is_file():
        return None
    from embedsearch.encoders.identity import encoder_key

    try:
        entry = json.loads(path.read_text())
        backend = entry["backend"]
        if entry.get("format") != LIGHT_FORMAT or name not in ("auto", backend) \
                or encoder_key(entry["identity"]) != encoder_key(identity) \
                or not installed(backend):
            return None
        module = importlib.import_module(_MODULES[backend])
        if Path(entry["export"]).name != entry["export"] or entry["export"] in ("", ".", ".."):
            return None  # an entry must name a folder inside exports/, nothing else
        folder = cache_root() / "exports" / entry["export"]
        if str(module.__version__) != entry["runtime_version"] \
                or not (folder / "done.json").is_file():
            return None
        enc = LightEncoder(entry, _open(backend, folder))
        cos = _cosine(np.asarray(entry["torch_fingerprint"], np.float64), enc.fingerprint())
    except Exception as exc:  # a damaged entry or export: the full path rebuilds it
        log.debug("light encoder unusable (%s: %s)", type(exc).__name__, exc)
        return None
    if cos < MIN_COSINE:
        log.warning("the cached %s export of %s no longer matches torch (cosine %.6f): "
                    "rebuilding the encoder", backend, identity.get("spec"), cos)
        return None
    return enc


def light_encoder_for_spec(spec: str, precision: str) -> LightEncoder | None:
    """A verified :class:`LightEncoder` for a model spec with its default (packaged)
    weights, found among the recorded entries, for a build on the CPU; None where there is
    none (then build the encoder).

    An entry is used only where it was recorded for this spec and precision by this
    encoder implementation, from packaged weights whose file is still there, in this
    interpreter's packages (not another environment's), with the recorded sha256, and
    passes :func:`light_encoder`'s checks (runtime version, export, fingerprint against
    torch's). Its identity is then the one a full encoder recorded, so
    a bundle built either way is the same bundle. Skipping the torch import and the model
    build saves ~2.5 CPU-s per command (3.6 → ~1 s of start-up measured on the 2-core VM),
    which is most of what a small ``dedupe DIR`` spends outside the model."""
    from embedsearch.encoders.base import ENCODER_IMPL_VERSION, sha256_file

    root = cache_root() / "light"
    if default_backend() == "torch" or not root.is_dir():
        return None
    for path in sorted(root.glob("*.json")):
        try:
            identity = json.loads(path.read_text())["identity"]
            weights = identity["weights"]
            if identity["spec"] != spec or identity["precision"] != precision \
                    or identity["impl_version"] != ENCODER_IMPL_VERSION \
                    or not str(weights["source"]).startswith("package:") \
                    or not _importable_here(Path(weights["path"])) \
                    or sha256_file(Path(weights["path"])) != weights["sha256"]:
                continue
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.debug("light entry %s skipped: %s", path.name, exc)
            continue
        encoder = light_encoder(identity)
        if encoder is not None:
            return encoder
    return None


def _importable_here(path: Path) -> bool:
    """Whether ``path`` is a file under one of this interpreter's import paths."""
    import sys

    path = path.resolve()
    return path.is_file() and any(path.is_relative_to(Path(p).resolve())
                                  for p in sys.path if p and Path(p).is_dir())
